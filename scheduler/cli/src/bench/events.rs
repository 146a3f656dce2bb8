//! `sluice bench --only events`: live event delivery over SSE. A scheduler runs as its own
//! process (`sluice serve`), so that its RSS is its own; this process is the runner posting
//! events and the clients following them.
//!
//! - Delivery latency: from an event's insert (its `at`, the database clock, which is this
//!   machine's) to a client reading it off its stream, p50/p99 over every (client, event),
//!   with 1 and with 1,000 clients following the same job.
//! - The scheduler's RSS with no stream and with 1,000 idle streams (each following a job of
//!   its own that stays queued).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::{Error, Result};
use sluice_protocol::api::{paths as api_paths, EnqueueRequest};
use sluice_protocol::{paths, Secret};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{percentile, summarize, Bench, Measurement};
use crate::client::ApiClient;

/// A `sluice serve` child and what it listens on.
struct Child {
    process: tokio::process::Child,
    api: String,
    internal: String,
}

async fn start_scheduler(bench: &Bench<'_>) -> Result<Child> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(e.to_string()))?;
    let mut process = tokio::process::Command::new(exe)
        .args(["serve", "--no-migrate"])
        .env("DATABASE_URL", bench.url.expose())
        .env("SLUICE_API_TOKEN", bench.serve.api_token.expose())
        .env("SLUICE_RUNNER_SECRET", bench.serve.runner_secret.expose())
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .env("SLUICE_INTERNAL_LISTEN", "127.0.0.1:0")
        .env("SLUICE_CRON_INTERVAL_MS", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Internal(format!("starting sluice serve: {e}")))?;
    let stdout = process.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| Error::Internal("sluice serve did not listen within 30 s".into()))?
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| Error::Internal("sluice serve exited before listening".into()))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|p| p.strip_prefix(name))
            .map(str::to_string)
            .ok_or_else(|| Error::Internal(format!("unexpected line from sluice serve: {line}")))
    };
    Ok(Child {
        api: field("api=")?,
        internal: field("internal=")?,
        process,
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A runner of this process: registered over HTTP, holding one claimed task.
struct Poster {
    http: reqwest::Client,
    internal: String,
    token: String,
    job: i64,
    attempt: i32,
    lease_token: String,
    seq: i64,
}

impl Poster {
    async fn start(child: &Child, secret: &Secret) -> Result<Poster> {
        let http = reqwest::Client::new();
        let post = |path: String, token: String, body: serde_json::Value| {
            let http = http.clone();
            let url = format!("{}{path}", child.internal);
            async move {
                let answer = http
                    .post(&url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| Error::Internal(format!("POST {url}: {e}")))?;
                answer
                    .json::<serde_json::Value>()
                    .await
                    .map_err(|e| Error::Internal(format!("POST {url}: {e}")))
            }
        };
        let registered = post(
            paths::REGISTER.to_string(),
            secret.expose().to_string(),
            json!({"pod_name": "bench-events", "slots": 1, "version": "bench", "protocol": 2}),
        )
        .await?;
        let token = registered["token"]
            .as_str()
            .ok_or_else(|| Error::Internal(format!("register: {registered}")))?
            .to_string();
        let claimed = post(
            paths::claim("bench-events"),
            token.clone(),
            json!({"max": 1, "wait_ms": 10_000}),
        )
        .await?;
        let task = &claimed["tasks"][0];
        Ok(Poster {
            job: task["job_id"]
                .as_i64()
                .ok_or_else(|| Error::Internal(format!("claim: {claimed}")))?,
            attempt: task["attempt"].as_i64().unwrap_or(1) as i32,
            lease_token: task["lease_token"].as_str().unwrap_or_default().to_string(),
            http,
            internal: child.internal.clone(),
            token,
            seq: 0,
        })
    }

    async fn post_one(&mut self) -> Result<()> {
        self.seq += 1;
        let url = format!(
            "{}{}",
            self.internal,
            paths::stream(sluice_protocol::JobId(self.job))
        );
        let answer = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(
                &json!({"attempt": self.attempt, "lease_token": self.lease_token,
                          "events": [{"seq": self.seq, "kind": "stdout",
                                      "data": {"text": format!("event {}\n", self.seq)}}]}),
            )
            .send()
            .await
            .map_err(|e| Error::Internal(format!("POST {url}: {e}")))?;
        if !answer.status().is_success() {
            return Err(Error::Internal(format!(
                "stream POST answered {}",
                answer.status()
            )));
        }
        Ok(())
    }
}

/// Opens `count` streams of `path` after position `after` and returns, per stream, a task
/// collecting the delivery latency (ms) of each of the next `events` events.
async fn follow(
    api: &ApiClient,
    path: &str,
    after: i64,
    count: usize,
    events: usize,
) -> Result<Vec<tokio::task::JoinHandle<Vec<f64>>>> {
    let mut followers = Vec::with_capacity(count);
    for _ in 0..count {
        // The answer's head comes once the stream is subscribed: nothing posted after this
        // returns can be missed.
        let mut stream = api
            .events(path, Some(after))
            .await
            .map_err(|e| Error::Internal(format!("opening a stream: {e}")))?;
        followers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events);
            while latencies.len() < events {
                let Ok(Some(event)) = stream.next().await else {
                    break;
                };
                let Some(at) = event.data["at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                else {
                    continue;
                };
                let late = chrono::Utc::now() - at.with_timezone(&chrono::Utc);
                latencies.push(late.num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
            latencies
        }));
    }
    Ok(followers)
}

pub(super) async fn delivery(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    super::sql::truncate_jobs(&bench.pool).await?;
    let child = start_scheduler(bench).await?;
    let measured = measure(bench, &child).await;
    let mut process = child.process;
    let _ = process.start_kill();
    let _ = process.wait().await;
    measured
}

async fn measure(bench: &Bench<'_>, child: &Child) -> Result<Vec<Measurement>> {
    let api = ApiClient::new(&child.api, bench.serve.api_token.clone());
    let pid = child.process.id().unwrap_or(0);
    let events = if bench.config.quick { 20 } else { 100 };
    api.enqueue(&EnqueueRequest {
        queue: Some("bench-events".into()),
        spec: json!({"kind": "noop"}),
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    let mut poster = Poster::start(child, &bench.serve.runner_secret).await?;
    let path = api_paths::job_events(sluice_protocol::JobId(poster.job));
    let mut results = Vec::new();
    for clients in [1usize, 1000] {
        let after = super::sql::last_event_position(&bench.pool, poster.job).await?;
        let followers = follow(&api, &path, after, clients, events).await?;
        for _ in 0..events {
            poster.post_one().await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut latencies = Vec::new();
        for follower in followers {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(got)) = tokio::time::timeout(left, follower).await {
                latencies.extend(got);
            }
        }
        latencies.sort_by(f64::total_cmp);
        let note = format!(
            "{} deliveries ({events} events × {clients} client(s) of one job); event insert (`at`, database clock) → read by the client",
            latencies.len()
        );
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let mut m = summarize(
                &format!("event delivery {label}, {clients} client(s)"),
                "ms",
                vec![percentile(&latencies, p)],
                &note,
            );
            m.min = latencies.first().copied().unwrap_or(f64::NAN);
            m.max = latencies.last().copied().unwrap_or(f64::NAN);
            results.push(m);
        }
    }
    // Idle streams, each following a queued job of its own.
    let queued = api
        .enqueue_batch(
            (0..1000)
                .map(|_| EnqueueRequest {
                    queue: Some("bench-events-idle".into()),
                    spec: json!({"kind": "noop"}),
                    delay_ms: Some(3_600_000),
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let before = rss_mib(pid);
    let mut idle = Vec::with_capacity(queued.len());
    for job in &queued {
        idle.push(
            api.events(&api_paths::job_events(job.id), None)
                .await
                .map_err(|e| Error::Internal(format!("opening a stream: {e}")))?,
        );
    }
    // Every stream answered (its head is in): the server holds them all now. A moment for
    // the allocator to settle is part of the reading, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_mib(pid);
    drop(idle);
    let note = "VmRSS of the `sluice serve` process".to_string();
    results.push(summarize(
        "scheduler RSS, no event stream",
        "MiB",
        vec![before],
        &note,
    ));
    results.push(summarize(
        "scheduler RSS, 1,000 idle event streams",
        "MiB",
        vec![with],
        &format!("{note}; 1,000 SSE clients, each of its own queued job"),
    ));
    Ok(results)
}
