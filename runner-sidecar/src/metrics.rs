//! The sidecar's own metrics, in Prometheus text format on an optional listener
//! (`SLUICE_RUNNER_METRICS_LISTEN`, off by default): attempts by outcome, tool spawn latency,
//! attempts running, completions waiting in the outbox.
//!
//! The counters are process-wide atomics ([`METRICS`]): the code that counts (an attempt's
//! end, a spawn deep in an executor) need not carry a handle, and one process is one runner.
//! The listener answers `GET /metrics` and nothing else; it reads at most 8 KiB of request
//! within 5 s, and serves one connection at a time per task, closing each after its answer.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Spawn latency buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// How attempts ended here.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Its completion was applied.
    Completed,
    /// The lease was lost before the completion arrived.
    LeaseLost,
    /// The completion could not be delivered.
    NotDelivered,
    /// The attempt was abandoned (stopped: cancelled, lease lost, drained).
    Abandoned,
}

const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Completed, "completed"),
    (Outcome::LeaseLost, "lease_lost"),
    (Outcome::NotDelivered, "not_delivered"),
    (Outcome::Abandoned, "abandoned"),
];

pub struct Metrics {
    attempts: [AtomicU64; 4],
    running: AtomicI64,
    outbox: AtomicI64,
    spawn_buckets: [AtomicU64; BUCKETS.len()],
    spawn_count: AtomicU64,
    /// Sum of spawn times, in microseconds.
    spawn_sum_us: AtomicU64,
}

/// This process's metrics.
pub static METRICS: Metrics = Metrics::new();

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub const fn new() -> Metrics {
        Metrics {
            attempts: [const { AtomicU64::new(0) }; 4],
            running: AtomicI64::new(0),
            outbox: AtomicI64::new(0),
            spawn_buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            spawn_count: AtomicU64::new(0),
            spawn_sum_us: AtomicU64::new(0),
        }
    }

    pub fn attempt_ended(&self, outcome: Outcome) {
        self.attempts[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt started (+1) or ended (-1).
    pub fn running(&self, delta: i64) {
        self.running.fetch_add(delta, Ordering::Relaxed);
    }

    /// A completion entered (+1) or left (-1) the outbox.
    pub fn outbox(&self, delta: i64) {
        self.outbox.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn spawned(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (bucket, bound) in self.spawn_buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.spawn_count.fetch_add(1, Ordering::Relaxed);
        self.spawn_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The exposition (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        family(
            &mut out,
            "sluice_runner_attempts_total",
            "counter",
            "Attempts ended on this runner, by outcome.",
        );
        for (outcome, name) in OUTCOMES {
            let count = load(&self.attempts[outcome as usize]);
            let _ = writeln!(
                out,
                "sluice_runner_attempts_total{{outcome=\"{name}\"}} {count}"
            );
        }
        for (name, help, value) in [
            (
                "sluice_runner_attempts_running",
                "Attempts running now.",
                &self.running,
            ),
            (
                "sluice_runner_outbox_depth",
                "Completions waiting to be delivered.",
                &self.outbox,
            ),
        ] {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "sluice_runner_spawn_seconds";
        family(
            &mut out,
            name,
            "histogram",
            "Time to start a tool in its sandbox.",
        );
        for (bucket, bound) in self.spawn_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", load(bucket));
        }
        let count = load(&self.spawn_count);
        let sum = load(&self.spawn_sum_us) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

/// A family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Binds the metrics listener (logging the address it got).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut buffer = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8 << 10 {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let answer = if request.starts_with(b"GET /metrics ") {
                let body = METRICS.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = socket.write_all(answer.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_what_was_reported() {
        let metrics = Metrics::new();
        metrics.attempt_ended(Outcome::Completed);
        metrics.attempt_ended(Outcome::Completed);
        metrics.attempt_ended(Outcome::LeaseLost);
        metrics.spawned(Duration::from_millis(3));
        metrics.outbox(1);
        let text = metrics.render();
        assert!(text.contains("sluice_runner_attempts_total{outcome=\"completed\"} 2\n"));
        assert!(text.contains("sluice_runner_attempts_total{outcome=\"lease_lost\"} 1\n"));
        assert!(text.contains("sluice_runner_spawn_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("sluice_runner_spawn_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("sluice_runner_spawn_seconds_count 1\n"));
        assert!(text.contains("sluice_runner_outbox_depth 1\n"));
    }
}
