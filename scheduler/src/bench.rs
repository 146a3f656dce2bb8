//! `sluice bench`: throughput and latency of the queue, each reported next to the bare-SQL
//! limit measured in the same run on the same server.
//!
//! Every figure is the median of several runs with min and max. The server is a private
//! cluster with durable settings (`fsync`, `synchronous_commit` on) unless `DATABASE_URL`
//! names another. Results go to stdout as a table and, with `--json FILE`, as JSON.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};
use sluice_protocol::RunnerId;
use sqlx::PgPool;

use crate::config::ServeConfig;
use crate::lifecycle::LeaseTimings;
use crate::postgres::{Cluster, ClusterConfig};
use crate::secret::Secret;
use crate::server::Server;
use crate::store::{self, bench as sql, jobs};
use crate::{dev, Error, Result};

/// Options of `sluice bench`.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// A small version of everything, in well under a minute.
    pub quick: bool,
    /// Also write the results as JSON here.
    pub json: Option<PathBuf>,
    /// Measure against this server instead of a private durable cluster.
    pub database_url: Option<Secret>,
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub name: String,
    pub unit: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
    /// The bare-SQL figure this one is compared with, and the ratio to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    pub note: String,
}

fn summarize(name: &str, unit: &'static str, mut samples: Vec<f64>, note: &str) -> Measurement {
    samples.sort_by(f64::total_cmp);
    let median = if samples.is_empty() {
        f64::NAN
    } else {
        samples[samples.len() / 2]
    };
    Measurement {
        name: name.into(),
        unit,
        median,
        min: samples.first().copied().unwrap_or(f64::NAN),
        max: samples.last().copied().unwrap_or(f64::NAN),
        runs: samples.len(),
        reference: None,
        ratio: None,
        note: note.into(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

struct Sizes {
    runs: usize,
    one_by_one: usize,
    bulk_calls: usize,
    drain_jobs: usize,
    pickup_jobs: usize,
    history_rows: i64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                runs: 3,
                one_by_one: 300,
                bulk_calls: 5,
                drain_jobs: 2_000,
                pickup_jobs: 100,
                history_rows: 100_000,
            }
        } else {
            Sizes {
                runs: 5,
                one_by_one: 3_000,
                bulk_calls: 20,
                drain_jobs: 20_000,
                pickup_jobs: 1_000,
                history_rows: 1_000_000,
            }
        }
    }
}

/// Runs the benchmark; call from the main thread before any runtime exists (the private
/// cluster and the sidecars use it as their parent).
pub fn run(config: BenchConfig) -> Result<Vec<Measurement>> {
    let base = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let mut cluster = None;
    let url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            let started = Cluster::start(&ClusterConfig {
                data_dir: base.join("data"),
                port: 0,
                durable: true,
                settings: Vec::new(),
            })?;
            let url = Secret::new(started.url("postgres"));
            cluster = Some(started);
            url
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let result = runtime.block_on(measure_all(&config, url, &base));
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(cluster);
    let _ = std::fs::remove_dir_all(&base);
    let measurements = result?;
    print_table(&measurements);
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&json!({
            "quick": config.quick,
            "machine": machine(),
            "results": measurements,
        }))
        .map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(path, text)
            .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))?;
    }
    Ok(measurements)
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({"cpus": cpus, "kernel": kernel.trim()})
}

fn print_table(measurements: &[Measurement]) {
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>8}  unit",
        "measurement", "median", "min", "max", "ratio"
    );
    for m in measurements {
        let ratio = m.ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
        println!(
            "{:<44} {:>12.2} {:>12.2} {:>12.2} {:>8}  {}",
            m.name, m.median, m.min, m.max, ratio, m.unit
        );
    }
}

fn with_reference(mut m: Measurement, reference: &Measurement) -> Measurement {
    m.reference = Some(reference.name.clone());
    m.ratio = Some(m.median / reference.median);
    m
}

async fn measure_all(
    config: &BenchConfig,
    url: Secret,
    base: &std::path::Path,
) -> Result<Vec<Measurement>> {
    let sizes = Sizes::new(config.quick);
    let mut serve = ServeConfig::new(
        url.clone(),
        Secret::generate("sk_"),
        Secret::generate("srs_"),
    );
    serve.listen = "127.0.0.1:0".parse().expect("static address");
    serve.internal_listen = "127.0.0.1:0".parse().expect("static address");
    serve.timings = LeaseTimings {
        heartbeat: Duration::from_secs(5),
        lease: Duration::from_secs(30),
        maintenance_interval: Duration::from_secs(1),
    };
    serve.max_connections = 32;
    let server = Server::start(serve.clone()).await?;
    let pool = store::pool(
        store::connect_options(url.expose())?,
        &store::PoolConfig {
            max_connections: 8,
            ..Default::default()
        },
    );
    let api = format!("http://{}", server.api_addr);
    let internal = format!("http://{}", server.internal_addr);
    let http = reqwest::Client::new();
    let token = serve.api_token.expose().to_string();
    let spec = json!({"kind": "noop"});
    let mut results = Vec::new();

    let settings = sql::durability_settings(&pool).await?;
    let settings_note = settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");

    // Enqueue one by one.
    let mut bare = Vec::new();
    let mut via_sql = Vec::new();
    let mut via_http = Vec::new();
    for _ in 0..sizes.runs {
        sql::reset_reference_table(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            sql::insert_reference_one(&pool, &spec).await?;
        }
        bare.push(sizes.one_by_one as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            sql::insert_job_plain(&pool, &spec).await?;
        }
        via_sql.push(sizes.one_by_one as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            let response = http
                .post(format!("{api}/api/jobs"))
                .bearer_auth(&token)
                .json(&json!({"spec": spec}))
                .send()
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            if response.status().as_u16() != 201 {
                return Err(Error::Internal(format!(
                    "enqueue answered {}",
                    response.status()
                )));
            }
        }
        via_http.push(sizes.one_by_one as f64 / started.elapsed().as_secs_f64());
    }
    let bare = summarize(
        "reference: bare single-row INSERT",
        "rows/s",
        bare,
        &settings_note,
    );
    results.push(with_reference(
        summarize(
            "enqueue one by one (SQL INSERT)",
            "jobs/s",
            via_sql,
            "one client, autocommit",
        ),
        &bare,
    ));
    results.push(with_reference(
        summarize(
            "enqueue one by one (HTTP POST /api/jobs)",
            "jobs/s",
            via_http,
            "one client, keep-alive",
        ),
        &bare,
    ));
    results.insert(0, bare);

    // Bulk enqueue, 1,000 per call.
    let specs: Vec<Value> = (0..1000).map(|_| spec.clone()).collect();
    let batch_body = json!({"jobs": specs.iter().map(|s| json!({"spec": s})).collect::<Vec<_>>()});
    let mut bare_bulk = Vec::new();
    let mut sql_bulk = Vec::new();
    let mut http_bulk = Vec::new();
    for _ in 0..sizes.runs {
        sql::reset_reference_table(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            sql::insert_reference_many(&pool, &specs).await?;
        }
        bare_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            sql::insert_jobs_plain_many(&pool, &specs).await?;
        }
        sql_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(&pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            let response = http
                .post(format!("{api}/api/jobs/batch"))
                .bearer_auth(&token)
                .json(&batch_body)
                .send()
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            if response.status().as_u16() != 201 {
                return Err(Error::Internal(format!(
                    "batch answered {}",
                    response.status()
                )));
            }
        }
        http_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());
    }
    let bare_bulk = summarize("reference: bare 1,000-row INSERT", "rows/s", bare_bulk, "");
    results.push(with_reference(
        summarize(
            "bulk enqueue (SQL, 1,000 per INSERT)",
            "jobs/s",
            sql_bulk,
            "",
        ),
        &bare_bulk,
    ));
    results.push(with_reference(
        summarize(
            "bulk enqueue (HTTP batch, 1,000 per call)",
            "jobs/s",
            http_bulk,
            "",
        ),
        &bare_bulk,
    ));
    results.push(bare_bulk);
    sql::drop_reference_table(&pool).await?;

    // Queue-core drain: claim and complete in batches through the store, no HTTP.
    let mut core = Vec::new();
    let runner = RunnerId(uuid::Uuid::new_v4());
    for _ in 0..sizes.runs {
        sql::truncate_jobs(&pool).await?;
        for _ in 0..sizes.drain_jobs / 1000 {
            sql::insert_jobs_plain_many(&pool, &specs).await?;
        }
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let pool = pool.clone();
            workers.spawn(async move {
                let output = json!({});
                loop {
                    let claimed =
                        jobs::claim_available(&pool, runner, 500, Duration::from_secs(30)).await?;
                    if claimed.is_empty() {
                        return Ok::<_, Error>(());
                    }
                    let successes: Vec<jobs::Success> = claimed
                        .iter()
                        .map(|c| jobs::Success {
                            job: c.id,
                            attempt: c.attempt,
                            lease_token: c.lease_token,
                            output: &output,
                        })
                        .collect();
                    jobs::complete_many_succeeded_if_leased(&pool, runner, &successes).await?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| Error::Internal(e.to_string()))??;
        }
        core.push(sizes.drain_jobs as f64 / started.elapsed().as_secs_f64());
    }
    results.push(summarize(
        "queue-core drain (claim 500 + complete 500, 2 workers)",
        "jobs/s",
        core,
        "store layer only, no HTTP",
    ));

    // End to end through real sidecars: pickup latency, then drain with 10 in flight.
    let runner_binary = dev::find_runner_binary()?;
    let work = base.join("runners");
    let mut sidecars: Vec<Child> = Vec::new();
    for n in 1..=2u32 {
        sidecars.push(dev::spawn_runner(&dev::RunnerLaunch {
            binary: &runner_binary,
            name: format!("bench-runner-{n}"),
            workdir: work.join(n.to_string()),
            log: base.join(format!("runner-{n}.log")),
            internal_url: &internal,
            secret: &serve.runner_secret,
            slots: 5,
        })?);
    }
    let idle = idle_rss(&pool, &sidecars).await;
    let outcome = end_to_end(&pool, &sizes, &specs).await;
    dev::stop_runners(&mut sidecars).await;
    results.push(idle?);
    results.extend(outcome?);
    results.extend(spawn_overhead(&runner_binary, sizes.pickup_jobs)?);

    // Claim latency with history: 1,000 vs many finished rows.
    let mut claim_latency = Vec::new();
    for history in [1_000, sizes.history_rows] {
        sql::truncate_jobs(&pool).await?;
        sql::insert_finished_jobs(&pool, history).await?;
        sql::insert_jobs_plain_many(&pool, &specs).await?;
        let mut samples = Vec::new();
        for _ in 0..100 {
            let started = Instant::now();
            let claimed = jobs::claim_available(&pool, runner, 10, Duration::from_secs(30)).await?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            if claimed.is_empty() {
                break;
            }
        }
        claim_latency.push(summarize(
            &format!("claim 10 with {history} finished jobs"),
            "ms",
            samples,
            "median of 100 claims",
        ));
    }
    let small = claim_latency.remove(0);
    let large = claim_latency.remove(0);
    results.push(with_reference(large, &small));
    results.push(small);

    pool.close().await;
    server.shutdown().await;
    Ok(results)
}

async fn end_to_end(pool: &PgPool, sizes: &Sizes, specs: &[Value]) -> Result<Vec<Measurement>> {
    let spec = json!({"kind": "noop"});
    sql::truncate_jobs(pool).await?;
    // Warm up: both sidecars registered and waiting.
    sql::insert_jobs_plain_many(pool, &specs[..10]).await?;
    wait_for_state(pool, "succeeded", 10, Duration::from_secs(60)).await?;

    sql::truncate_jobs(pool).await?;
    let mut latencies = Vec::new();
    for _ in 0..sizes.pickup_jobs {
        sql::insert_job_plain(pool, &spec).await?;
        let committed = SystemTime::now();
        let started_at = wait_started(pool).await?;
        let started: SystemTime = started_at.into();
        let ms = started
            .duration_since(committed)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        latencies.push(ms);
        sql::truncate_jobs(pool).await?;
    }
    latencies.sort_by(f64::total_cmp);
    let mut pickup = summarize(
        "pickup latency p50 (INSERT commit → claimed)",
        "ms",
        vec![percentile(&latencies, 0.5)],
        &format!("{} jobs, idle queue, 2 sidecars", latencies.len()),
    );
    pickup.min = latencies.first().copied().unwrap_or(f64::NAN);
    pickup.max = latencies.last().copied().unwrap_or(f64::NAN);
    let mut pickup99 = pickup.clone();
    pickup99.name = "pickup latency p99 (INSERT commit → claimed)".into();
    pickup99.median = percentile(&latencies, 0.99);

    let mut drain = Vec::new();
    for _ in 0..sizes.runs.min(3) {
        sql::truncate_jobs(pool).await?;
        for _ in 0..sizes.drain_jobs / 1000 {
            sql::insert_jobs_plain_many(pool, specs).await?;
        }
        let started = Instant::now();
        wait_for_state(
            pool,
            "succeeded",
            sizes.drain_jobs as i64,
            Duration::from_secs(600),
        )
        .await?;
        drain.push(sizes.drain_jobs as f64 / started.elapsed().as_secs_f64());
    }
    Ok(vec![
        pickup,
        pickup99,
        summarize(
            "end-to-end drain (noop, 2 sidecars × 5 slots)",
            "jobs/s",
            drain,
            "real HTTP protocol, 10 in flight",
        ),
    ])
}

/// Resident memory of the registered, idle sidecars, in MiB.
async fn idle_rss(pool: &PgPool, sidecars: &[Child]) -> Result<Measurement> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql::live_runners(pool).await? < sidecars.len() as i64 {
        if Instant::now() > deadline {
            return Err(Error::Internal(
                "the sidecars did not register within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples: Vec<f64> = sidecars
        .iter()
        .filter_map(|child| std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .collect();
    Ok(summarize(
        "sidecar idle RSS (registered, long-polling)",
        "MiB",
        samples,
        "VmRSS of each sidecar",
    ))
}

/// The sidecar's own measurement of its spawn path (`sluice-runner --bench-spawn N`).
fn spawn_overhead(runner_binary: &std::path::Path, runs: usize) -> Result<Vec<Measurement>> {
    let output = std::process::Command::new(runner_binary)
        .arg("--bench-spawn")
        .arg(runs.to_string())
        .output()
        .map_err(|e| Error::Internal(format!("running {}: {e}", runner_binary.display())))?;
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "sluice-runner --bench-spawn failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let report: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Internal(format!("sluice-runner --bench-spawn: {e}")))?;
    let ms = |field: &str| report[field].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let note =
        format!("{runs} runs of /bin/true: fork, namespace helpers, uid drop, rlimits, exec, exit");
    Ok(vec![
        summarize(
            "tool spawn p50 (sidecar spawn path)",
            "ms",
            vec![ms("spawn_p50_us")],
            &note,
        ),
        summarize(
            "tool spawn p99 (sidecar spawn path)",
            "ms",
            vec![ms("spawn_p99_us")],
            &note,
        ),
    ])
}

async fn wait_started(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(started_at) = sql::first_attempt_started_at(pool).await? {
            return Ok(started_at);
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(
                "a job was not picked up within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn wait_for_state(pool: &PgPool, state: &str, count: i64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if sql::count_in_state(pool, state).await? >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{count} jobs did not reach {state} in {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
