//! Serving a router on a TCP listener with the bounds a server facing untrusted clients needs.
//!
//! - A client must send a request's headers within the header timeout, and an idle
//!   keep-alive connection is closed after the same time (hyper starts that clock whenever
//!   it waits for a request head): a connection that sends half a request and then nothing
//!   is gone after it (L-11, slowloris).
//! - At most `max_connections` connections are open per listener; past it a new connection is
//!   closed at once, so a flood cannot take the descriptors other requests (and the database
//!   pool) need. The public and the internal listener count apart, so runners keep their
//!   room whatever happens on the public port.
//! - An accept error (EMFILE above all) pauses accepting briefly instead of spinning.
//!
//! [`raise_descriptor_limit`] lifts the soft descriptor limit to the hard one at start, and
//! [`connection_budget`] splits what is left between the two listeners.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to send a request's headers, and to start the next request on a kept-alive
    /// connection.
    pub header_timeout: Duration,
}

/// Descriptors kept for everything but client connections: the database pool, the LISTEN
/// connection, files, the runtime's own.
const RESERVED_DESCRIPTORS: u64 = 512;
/// The most connections either listener takes by default, however many descriptors exist.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Raises this process's soft descriptor limit to its hard limit (allowed without privileges)
/// and returns the soft limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The default connection caps of the public and the internal listener for a process that
/// may open `descriptors`: two thirds and one third of what is left after the reserve, each
/// at most [`DEFAULT_MAX_CONNECTIONS`], so that both full together still leave the reserve.
pub fn connection_budget(descriptors: u64) -> (usize, usize) {
    let budget = descriptors.saturating_sub(RESERVED_DESCRIPTORS).max(64) as usize;
    let public = (budget * 2 / 3).clamp(32, DEFAULT_MAX_CONNECTIONS);
    let internal = (budget / 3).clamp(16, DEFAULT_MAX_CONNECTIONS);
    (public, internal)
}

/// Serves `router` on `listener` within `limits` until `shutdown` turns true, then lets the
/// requests in flight finish (idle connections close at once).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ListenerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(accepted) = accepted else {
            break;
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, or the peer gave up: wait a little, never spin.
                tracing::warn!(error = %err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    limit = limits.max_connections,
                    "connection limit reached; closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let stopping = tokio::select! {
                _ = connection.as_mut() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if stopping {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve_and_gives_runners_their_share() {
        let (public, internal) = connection_budget(20_000);
        assert_eq!(public, DEFAULT_MAX_CONNECTIONS);
        assert!(internal >= 6000, "{internal}");
        assert!(public as u64 + internal as u64 + RESERVED_DESCRIPTORS <= 20_000);
        let (public, internal) = connection_budget(1024);
        assert!(public as u64 + internal as u64 + RESERVED_DESCRIPTORS <= 1024);
        assert!(internal >= 16);
        let (public, internal) = connection_budget(100);
        assert!(public >= 32 && internal >= 16);
    }
}
