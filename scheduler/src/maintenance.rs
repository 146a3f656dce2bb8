//! The maintenance loop: every `maintenance_interval`, one replica (the holder of a
//! transaction-scoped advisory lock) reclaims expired leases and promotes due scheduled jobs.
//!
//! The lock is taken per pass, not held: a replica that dies mid-pass releases it with its
//! connection, and the next pass of any replica takes over. Each statement guards itself with
//! `SKIP LOCKED` and a state check, so even two concurrent passes could not double-reclaim.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::store::jobs;
use crate::wake::Wake;
use crate::Result;

/// Rows one statement touches at most, so that a pass never holds many locks for long.
const BATCH: i64 = 1000;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub led: bool,
    pub requeued: u64,
    pub failed: u64,
    pub promoted: u64,
}

/// Runs one maintenance pass, if no other replica is running one.
pub async fn run_pass(pool: &PgPool, wake: &Wake) -> Result<PassReport> {
    let mut tx = pool.begin().await?;
    if !jobs::try_lead_maintenance(&mut tx).await? {
        return Ok(PassReport::default());
    }
    let reclaimed = jobs::reclaim_expired(&mut tx, BATCH).await?;
    let promoted = jobs::promote_due(&mut tx, BATCH).await?;
    if reclaimed.requeued > 0 || promoted > 0 {
        jobs::notify_available(&mut tx).await?;
    }
    tx.commit().await?;
    if reclaimed.requeued > 0 || promoted > 0 {
        wake.notify();
    }
    if reclaimed.requeued > 0 || reclaimed.failed > 0 {
        tracing::info!(
            requeued = reclaimed.requeued,
            failed = reclaimed.failed,
            "reclaimed expired leases"
        );
    }
    Ok(PassReport {
        led: true,
        requeued: reclaimed.requeued,
        failed: reclaimed.failed,
        promoted,
    })
}

/// Runs passes every `interval` until `shutdown` fires. A full batch runs the next pass at
/// once; errors (Postgres away) are logged and retried on the next tick.
pub async fn run(
    pool: PgPool,
    wake: Wake,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        loop {
            match run_pass(&pool, &wake).await {
                Ok(report) => {
                    let full = report.requeued + report.failed >= BATCH as u64
                        || report.promoted >= BATCH as u64;
                    if !full {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "maintenance pass failed");
                    break;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}
