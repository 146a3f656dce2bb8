//! Prometheus metrics (`GET /metrics`, OpenMetrics text): counters and histograms the other
//! services report to as things happen, and gauges read from the database when scraped.
//!
//! Labels are low-cardinality only: queue names, states, outcomes, route patterns (never a
//! job id, a runner id or a raw path).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_protocol::RunnerId;
use sqlx::PgPool;

use crate::store;

type Labels = Vec<(&'static str, String)>;

/// Latency buckets, 0.5 ms to 60 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

/// Job duration buckets, 10 ms to 6 h.
fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
    ]
    .into_iter()
}

fn histogram_family() -> Family<Labels, Histogram, fn() -> Histogram> {
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

/// The scheduler's metrics; one per process, shared by every service.
pub struct Metrics {
    registry: Registry,
    enqueued: Family<Labels, Counter>,
    claimed: Family<Labels, Counter>,
    claim_seconds: Histogram,
    pickup_seconds: Histogram,
    /// The two series of `attempt_duration_seconds`, held so that a completion looks nothing
    /// up.
    attempt_by_outcome: (Histogram, Histogram),
    reclaims: Family<Labels, Counter>,
    heartbeat_gap: Histogram,
    http_requests: Family<Labels, Counter>,
    http_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    sse_streams: Gauge,
    sse_dropped: Counter,
    /// When each runner last heartbeated here (for the gap histogram).
    last_heartbeat: Mutex<HashMap<RunnerId, Instant>>,
    /// The queues that have a label of their own.
    queues: Mutex<std::collections::HashSet<String>>,
}

/// Most queues labelled by name; the rest are counted as [`OTHER_QUEUES`].
pub const MAX_QUEUE_LABELS: usize = 1000;
/// The label of queues past [`MAX_QUEUE_LABELS`].
pub const OTHER_QUEUES: &str = "_other";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let enqueued = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_enqueued",
            "Jobs enqueued through the API, by queue (SQL inserts are not seen here)",
            enqueued.clone(),
        );
        let claimed = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_claimed",
            "Attempts leased to runners, by queue",
            claimed.clone(),
        );
        let claim_seconds = Histogram::new(latency_buckets());
        registry.register(
            "claim_statement_seconds",
            "Time the claim statement took (one per claim request and wake-up)",
            claim_seconds.clone(),
        );
        let pickup_seconds = Histogram::new(latency_buckets());
        registry.register(
            "job_pickup_seconds",
            "Time from a job becoming claimable (its run_at) to its claim",
            pickup_seconds.clone(),
        );
        let attempt_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(duration_buckets()));
        registry.register(
            "attempt_duration_seconds",
            "Time from claim to completion of attempts, by outcome",
            attempt_seconds.clone(),
        );
        let reclaims = Family::<Labels, Counter>::default();
        registry.register(
            "lease_reclaims",
            "Attempts ended by the scheduler rather than their runner, by reason and result",
            reclaims.clone(),
        );
        let heartbeat_gap = Histogram::new(latency_buckets());
        registry.register(
            "runner_heartbeat_gap_seconds",
            "Time between two heartbeats of one runner at this replica",
            heartbeat_gap.clone(),
        );
        let http_requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by listener, method, route pattern and status",
            http_requests.clone(),
        );
        let http_seconds = histogram_family();
        registry.register(
            "http_request_seconds",
            "Time to answer HTTP requests (to the response head), by listener and route pattern",
            http_seconds.clone(),
        );
        let sse_streams = Gauge::default();
        registry.register(
            "event_streams",
            "Live event streams (SSE) open now",
            sse_streams.clone(),
        );
        let sse_dropped = Counter::default();
        registry.register(
            "event_stream_clients_dropped",
            "Event stream clients dropped for falling too far behind",
            sse_dropped.clone(),
        );
        // One statement each: `get_or_create` answers under a read lock that a temporary
        // holds to the statement's end, and creating the second series needs the write lock.
        let succeeded = attempt_seconds
            .get_or_create(&vec![("outcome", "succeeded".to_string())])
            .clone();
        let failed = attempt_seconds
            .get_or_create(&vec![("outcome", "failed".to_string())])
            .clone();
        let attempt_by_outcome = (succeeded, failed);
        Metrics {
            registry,
            enqueued,
            claimed,
            claim_seconds,
            pickup_seconds,
            attempt_by_outcome,
            reclaims,
            heartbeat_gap,
            http_requests,
            http_seconds,
            sse_streams,
            sse_dropped,
            last_heartbeat: Mutex::default(),
            queues: Mutex::default(),
        }
    }

    /// Jobs enqueued, by the queue of each.
    pub fn enqueued<'a>(&self, queues: impl Iterator<Item = &'a str>) {
        for (queue, count) in runs(queues) {
            self.enqueued
                .get_or_create(&vec![("queue", self.queue_label(queue))])
                .inc_by(count);
        }
    }

    /// A queue's label: its name for the first [`MAX_QUEUE_LABELS`] queues seen, `_other`
    /// past them (queue names come from clients; labels must stay few).
    fn queue_label(&self, queue: &str) -> String {
        let mut seen = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(queue) {
            return queue.to_string();
        }
        if seen.len() < MAX_QUEUE_LABELS {
            seen.insert(queue.to_string());
            return queue.to_string();
        }
        OTHER_QUEUES.to_string()
    }

    /// One claim statement's time, and what it leased: (queue, seconds waited) per job.
    /// One claim statement's time, and what it leased: (queue, seconds waited) per job.
    pub fn claimed<'a>(&self, took: Duration, jobs: impl Iterator<Item = (&'a str, f64)>) {
        self.claim_seconds.observe(took.as_secs_f64());
        let queues = jobs.map(|(queue, waited)| {
            self.pickup_seconds.observe(waited);
            queue
        });
        for (queue, count) in runs(queues) {
            self.claimed
                .get_or_create(&vec![("queue", self.queue_label(queue))])
                .inc_by(count);
        }
    }

    pub fn attempt_ended(&self, succeeded: bool, seconds: f64) {
        let (succeeded_seconds, failed_seconds) = &self.attempt_by_outcome;
        if succeeded {
            succeeded_seconds.observe(seconds)
        } else {
            failed_seconds.observe(seconds)
        }
    }

    pub fn reclaimed(&self, reason: &'static str, result: &'static str, count: u64) {
        if count > 0 {
            self.reclaims
                .get_or_create(&vec![("reason", reason.into()), ("result", result.into())])
                .inc_by(count);
        }
    }

    pub fn heartbeat(&self, runner: RunnerId) {
        let now = Instant::now();
        let mut last = self
            .last_heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = last.insert(runner, now) {
            self.heartbeat_gap
                .observe(now.duration_since(previous).as_secs_f64());
        }
        // Forget runners not heard from in ten minutes (they are gone, or talk to another
        // replica), so the map stays as large as the live fleet.
        if last.len() > 64 && last.len().is_power_of_two() {
            last.retain(|_, at| now.duration_since(*at) < Duration::from_secs(600));
        }
    }

    pub fn http(
        &self,
        listener: &'static str,
        method: &str,
        route: &str,
        status: u16,
        took: Duration,
    ) {
        self.http_requests
            .get_or_create(&vec![
                ("listener", listener.to_string()),
                ("method", method.to_string()),
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.http_seconds
            .get_or_create(&vec![
                ("listener", listener.to_string()),
                ("route", route.to_string()),
            ])
            .observe(took.as_secs_f64());
    }

    /// A live event stream opened; the guard closes it when dropped.
    pub fn stream_opened(self: &std::sync::Arc<Self>) -> StreamGuard {
        self.sse_streams.inc();
        StreamGuard(self.clone())
    }

    /// Event streams open now.
    pub fn event_streams(&self) -> i64 {
        self.sse_streams.get()
    }

    pub fn stream_client_dropped(&self) {
        self.sse_dropped.inc();
    }

    /// The whole exposition: what was counted, then the gauges read from `pool` now, and
    /// `topics`, the jobs and runs the event streams follow.
    pub async fn render(&self, pool: &PgPool, topics: usize) -> String {
        let mut text = String::new();
        let _ = encode_registry(&mut text, &self.registry);
        let mut sampled = Registry::with_prefix("sluice");
        let followed: Gauge = Gauge::default();
        followed.set(topics as i64);
        sampled.register(
            "event_topics",
            "Jobs and runs followed by open event streams (one read per new event each)",
            followed,
        );
        sample(&mut sampled, pool).await;
        let _ = encode_registry(&mut text, &sampled);
        let _ = encode_eof(&mut text);
        text
    }
}

/// Runs of equal queue names and their lengths: a counter is looked up once per run (a
/// claim's or a batch's jobs mostly share one queue), not once per job.
fn runs<'a>(queues: impl Iterator<Item = &'a str>) -> Vec<(&'a str, u64)> {
    let mut runs: Vec<(&str, u64)> = Vec::new();
    for queue in queues {
        match runs.last_mut() {
            Some((same, count)) if *same == queue => *count += 1,
            _ => runs.push((queue, 1)),
        }
    }
    runs
}

/// Counts an open event stream until dropped.
pub struct StreamGuard(std::sync::Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.sse_streams.dec();
    }
}

/// Gauges read from the database at scrape time; each read that fails (or takes more than
/// two seconds) is left out, and `sluice_scrape_errors` says how many did.
async fn sample(registry: &mut Registry, pool: &PgPool) {
    let errors = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let limit = Duration::from_secs(2);
    let timed = |what: &'static str, err: String| {
        tracing::warn!(what, error = %err, "metrics: a sample could not be read");
        errors.inc();
    };

    match tokio::time::timeout(limit, store::jobs::count_by_queue_and_state(pool)).await {
        Ok(Ok(rows)) => {
            let jobs = Family::<Labels, Gauge>::default();
            let mut named = std::collections::HashSet::new();
            for (queue, state, count) in rows {
                // The first MAX_QUEUE_LABELS queues by name, the rest together.
                let queue = if named.contains(&queue) || named.len() < MAX_QUEUE_LABELS {
                    named.insert(queue.clone());
                    queue
                } else {
                    OTHER_QUEUES.to_string()
                };
                jobs.get_or_create(&vec![("queue", queue), ("state", state)])
                    .inc_by(count);
            }
            registry.register("jobs", "Jobs by queue and state", jobs);
        }
        Ok(Err(err)) => timed("jobs", err.to_string()),
        Err(_) => timed("jobs", "timed out".into()),
    }
    match tokio::time::timeout(limit, store::runners::count_by_state(pool)).await {
        Ok(Ok(rows)) => {
            let runners = Family::<Labels, Gauge>::default();
            // Every state, zero included, so that a panel shows 0 rather than nothing.
            for state in ["starting", "idle", "busy", "draining", "gone"] {
                runners
                    .get_or_create(&vec![("state", state.to_string())])
                    .set(0);
            }
            for (state, count) in rows {
                runners.get_or_create(&vec![("state", state)]).set(count);
            }
            registry.register("runners", "Runners by state", runners);
        }
        Ok(Err(err)) => timed("runners", err.to_string()),
        Err(_) => timed("runners", "timed out".into()),
    }
    match tokio::time::timeout(limit, store::oldest_transaction(pool)).await {
        Ok(Ok((xact_age, xmin_age))) => {
            let oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            oldest.set(xact_age);
            registry.register(
                "db_oldest_transaction_seconds",
                "Age of the oldest open transaction in the database",
                oldest,
            );
            let xmin: Gauge = Gauge::default();
            xmin.set(xmin_age);
            registry.register(
                "db_oldest_xmin_age",
                "Transactions since the oldest snapshot still held (what keeps vacuum from cleaning up)",
                xmin,
            );
        }
        Ok(Err(err)) => timed("oldest transaction", err.to_string()),
        Err(_) => timed("oldest transaction", "timed out".into()),
    }
    let size: Gauge = Gauge::default();
    size.set(i64::from(pool.size()));
    registry.register(
        "db_pool_connections",
        "Connections this scheduler's pool holds",
        size,
    );
    let idle: Gauge = Gauge::default();
    idle.set(pool.num_idle() as i64);
    registry.register("db_pool_idle_connections", "Of which idle", idle);
    registry.register(
        "scrape_errors",
        "Samples of this scrape that could not be read",
        errors,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_count_consecutive_queues_once_each() {
        let queues = ["a", "a", "b", "a", "a", "a"];
        assert_eq!(runs(queues.into_iter()), vec![("a", 2), ("b", 1), ("a", 3)]);
        assert!(runs(std::iter::empty()).is_empty());
    }

    #[test]
    fn queue_labels_stop_at_the_cap() {
        let metrics = Metrics::new();
        for n in 0..MAX_QUEUE_LABELS {
            assert_eq!(metrics.queue_label(&format!("q{n}")), format!("q{n}"));
        }
        assert_eq!(metrics.queue_label("one-too-many"), OTHER_QUEUES);
        assert_eq!(
            metrics.queue_label("q7"),
            "q7",
            "a known queue keeps its label"
        );
    }
}
