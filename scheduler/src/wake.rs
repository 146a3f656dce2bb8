//! One shared LISTEN connection per scheduler: `sluice_jobs` wakes long-polling claims,
//! `sluice_events` feeds the live event streams ([`crate::service::events::Hub`]).
//!
//! Every waiting claim subscribes to a [`tokio::sync::watch`] counter instead of holding its
//! own database connection, so a thousand idle runners cost one connection. The insert trigger
//! NOTIFYs once per statement; the maintenance loop NOTIFYs after reclaims and promotions.
//! When the listener connection drops, the counter is bumped so that waiters re-check at once,
//! and the waiters' fallback poll covers the gap until it is back.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::service::events::Hub;

/// The channel the jobs trigger notifies.
pub const CHANNEL: &str = "sluice_jobs";
/// The channel event appends and terminal states notify (`'<job> <run>'`).
pub const EVENTS_CHANNEL: &str = "sluice_events";

/// A handle to wake waiting claims; cheap to clone.
#[derive(Clone)]
pub struct Wake {
    tx: watch::Sender<u64>,
}

impl Default for Wake {
    fn default() -> Self {
        Self::new()
    }
}

impl Wake {
    /// A fresh wake channel.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        Wake { tx }
    }

    /// A receiver to await the next wake-up with `changed()`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Listens until `shutdown` fires, reconnecting with back-off after errors.
pub async fn listen(pool: PgPool, wake: Wake, events: Hub, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut listener = match connect(&pool).await {
            Ok(listener) => {
                backoff = Duration::from_millis(100);
                // Anything inserted or streamed while we were not listening is there now.
                wake.notify();
                events.wake_all();
                listener
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot LISTEN for new jobs; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(note)) if note.channel() == EVENTS_CHANNEL => {
                        events.notify(note.payload())
                    }
                    Ok(Some(_)) => wake.notify(),
                    // The connection was lost; the next try_recv reconnects and re-LISTENs.
                    Ok(None) => {
                        tracing::warn!("LISTEN connection lost; reconnecting");
                        wake.notify();
                        events.wake_all();
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN failed; reconnecting");
                        wake.notify();
                        events.wake_all();
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([CHANNEL, EVENTS_CHANNEL]).await?;
    Ok(listener)
}
