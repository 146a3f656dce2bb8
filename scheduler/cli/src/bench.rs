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
use sluice::config::ServeConfig;
use sluice::server::Server;
use sluice::service::lifecycle::LeaseTimings;
use sluice::store::{self, jobs};
use sluice::{Error, Result};
use sluice_protocol::api::EnqueueRequest;
use sluice_protocol::{RunnerId, Secret};
use sqlx::PgPool;

use crate::client::{ApiClient, ClientError};
use crate::cluster::{self, Cluster, ClusterConfig};
use crate::dev;
use crate::provision::{provision_app_database, APP_DATABASE, APP_ROLE};
use crate::store::bench as sql;

mod events;

/// Options of `sluice bench`.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// A small version of everything, in well under a minute.
    pub quick: bool,
    /// Also write the results as JSON here.
    pub json: Option<PathBuf>,
    /// Measure against this server instead of a private durable cluster.
    pub database_url: Option<Secret>,
    /// Only these sections ([`SECTIONS`]); all when empty.
    pub only: Vec<String>,
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
    chain_steps: usize,
    fan_out_steps: usize,
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
                chain_steps: 20,
                fan_out_steps: 200,
            }
        } else {
            Sizes {
                runs: 5,
                one_by_one: 3_000,
                bulk_calls: 20,
                drain_jobs: 20_000,
                pickup_jobs: 1_000,
                history_rows: 1_000_000,
                chain_steps: 100,
                fan_out_steps: 1_000,
            }
        }
    }
}

/// Runs the benchmark; call from the main thread before any runtime exists (the private
/// cluster and the sidecars use it as their parent).
pub fn run(config: BenchConfig) -> Result<Vec<Measurement>> {
    let base = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", base.display())))?;
    let mut cluster = None;
    let mut provision = None;
    let url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            let superuser_password = Secret::generate("pgsu_");
            let started = Cluster::start(&ClusterConfig {
                data_dir: base.join("data"),
                port: 0,
                durable: true,
                // Pickup latency is measured from the INSERT's commit on the server's clock.
                settings: vec![("track_commit_timestamp".into(), "on".into())],
                superuser_password,
                reset_password: false,
            })?;
            // Measured as `sluice dev` runs it: the scheduler's own role, not the superuser.
            let password = Secret::generate("pg_");
            let url = Secret::new(started.role_url(APP_ROLE, &password, APP_DATABASE));
            provision = Some((
                Secret::new(started.url("postgres")),
                Secret::new(started.url(APP_DATABASE)),
                password,
            ));
            cluster = Some(started);
            url
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    if let Some((superuser, superuser_in_app_db, password)) = &provision {
        runtime.block_on(provision_app_database(
            superuser,
            superuser_in_app_db,
            password,
        ))?;
    }
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

/// The parts of the benchmark, for `--only`.
pub const SECTIONS: [&str; 9] = [
    "enqueue", "bulk", "core", "e2e", "workflow", "spawn", "claim", "pool", "events",
];

/// What every section shares: the server under test, a pool, and the run's sizes.
struct Bench<'a> {
    config: &'a BenchConfig,
    sizes: Sizes,
    url: Secret,
    base: &'a std::path::Path,
    serve: ServeConfig,
    server: Server,
    pool: PgPool,
    /// The public API of the scheduler under test.
    api: ApiClient,
    /// 1,000 noop specs, the unit of every bulk insert.
    specs: Vec<Value>,
    pgbench: Option<PathBuf>,
}

impl Bench<'_> {
    fn wants(&self, section: &str) -> bool {
        self.config.only.is_empty() || self.config.only.iter().any(|s| s == section)
    }
}

async fn measure_all(
    config: &BenchConfig,
    url: Secret,
    base: &std::path::Path,
) -> Result<Vec<Measurement>> {
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
    let api = ApiClient::new(
        &format!("http://{}", server.api_addr),
        serve.api_token.clone(),
    );
    let bench = Bench {
        config,
        sizes: Sizes::new(config.quick),
        url,
        base,
        serve,
        server,
        pool,
        api,
        specs: (0..1000).map(|_| json!({"kind": "noop"})).collect(),
        pgbench: cluster::find_tool("pgbench"),
    };
    let mut results = Vec::new();
    if bench.wants("enqueue") {
        results.extend(enqueue_one_by_one(&bench).await?);
    }
    if bench.wants("bulk") {
        results.extend(enqueue_bulk(&bench).await?);
    }
    if bench.wants("core") {
        results.extend(queue_core(&bench).await?);
    }
    if bench.wants("e2e") {
        results.extend(end_to_end(&bench).await?);
    }
    if bench.wants("workflow") {
        results.extend(workflows(&bench).await?);
    }
    if bench.wants("spawn") {
        results.extend(spawn_overhead(
            &dev::find_runner_binary()?,
            bench.sizes.pickup_jobs,
        )?);
    }
    if bench.wants("claim") {
        results.extend(claim_with_history(&bench).await?);
    }
    if bench.wants("pool") {
        results.extend(pool_start_latency(&bench).await?);
    }
    if bench.wants("events") {
        results.extend(events::delivery(&bench).await?);
    }
    bench.pool.close().await;
    bench.server.shutdown().await;
    Ok(results)
}

/// Enqueue one by one: the bare INSERT (and pgbench's), the README's SQL INSERT, HTTP.
async fn enqueue_one_by_one(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let (pool, sizes) = (&bench.pool, &bench.sizes);
    let spec = &bench.specs[0];
    let settings = sql::durability_settings(pool).await?;
    let settings_note = settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let request = EnqueueRequest {
        spec: spec.clone(),
        ..Default::default()
    };
    let mut bare = Vec::new();
    let mut via_sql = Vec::new();
    let mut via_http = Vec::new();
    for _ in 0..sizes.runs {
        sql::reset_reference_table(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            sql::insert_reference_one(pool, spec).await?;
        }
        bare.push(sizes.one_by_one as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            sql::insert_job_plain(pool, spec).await?;
        }
        via_sql.push(sizes.one_by_one as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.one_by_one {
            let (_, created) = bench
                .api
                .enqueue(&request)
                .await
                .map_err(|e| refused("enqueue", e))?;
            if !created {
                return Err(Error::Internal("enqueue answered 200 OK".into()));
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
    let mut results = vec![
        with_reference(
            summarize(
                "enqueue one by one (SQL INSERT)",
                "jobs/s",
                via_sql,
                "one client, autocommit",
            ),
            &bare,
        ),
        with_reference(
            summarize(
                "enqueue one by one (HTTP POST /api/jobs)",
                "jobs/s",
                via_http,
                "one client, keep-alive",
            ),
            &bare,
        ),
    ];
    if let Some(pgbench) = &bench.pgbench {
        let script = sql::PGBENCH_INSERT_ONE;
        let mut rates = Vec::new();
        for _ in 0..sizes.runs {
            sql::reset_reference_table(pool).await?;
            let tps = run_pgbench(pgbench, &bench.url, bench.base, script, 1, sizes.one_by_one)?;
            rates.push(tps);
        }
        let reference = summarize(
            "pgbench: single-row INSERT",
            "rows/s",
            rates,
            "pgbench -n -M prepared -c 1, the bare INSERT",
        );
        results.push(with_reference(results[0].clone(), &reference));
        results[2].name = "enqueue one by one (SQL INSERT) vs pgbench".into();
        results.insert(0, reference);
    }
    sql::drop_reference_table(pool).await?;
    results.insert(0, bare);
    Ok(results)
}

/// `what` failed: the scheduler's refusal (`enqueue answered 503: …`), or why it was not reached.
fn refused(what: &str, err: ClientError) -> Error {
    match err {
        ClientError::Api { .. } => Error::Internal(format!("{what} answered {err}")),
        other => Error::Internal(other.to_string()),
    }
}

/// Bulk enqueue, 1,000 per call: bare multi-row INSERT (and pgbench's), SQL, the batch API.
async fn enqueue_bulk(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let (pool, sizes, specs) = (&bench.pool, &bench.sizes, &bench.specs);
    let batch: Vec<EnqueueRequest> = specs
        .iter()
        .map(|spec| EnqueueRequest {
            spec: spec.clone(),
            ..Default::default()
        })
        .collect();
    let mut bare_bulk = Vec::new();
    let mut sql_bulk = Vec::new();
    let mut named_bulk = Vec::new();
    let mut http_bulk = Vec::new();
    for _ in 0..sizes.runs {
        sql::reset_reference_table(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            sql::insert_reference_many(pool, specs).await?;
        }
        bare_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            sql::insert_jobs_plain_many(pool, specs).await?;
        }
        sql_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            sql::insert_jobs_named_many(pool, specs).await?;
        }
        named_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());

        sql::truncate_jobs(pool).await?;
        let started = Instant::now();
        for _ in 0..sizes.bulk_calls {
            bench
                .api
                .enqueue_batch(batch.clone())
                .await
                .map_err(|e| refused("batch", e))?;
        }
        http_bulk.push((sizes.bulk_calls * 1000) as f64 / started.elapsed().as_secs_f64());
    }
    let bare_bulk = summarize("reference: bare 1,000-row INSERT", "rows/s", bare_bulk, "");
    let mut results = vec![
        bare_bulk.clone(),
        with_reference(
            summarize(
                "bulk enqueue (SQL, 1,000 per INSERT)",
                "jobs/s",
                sql_bulk,
                "",
            ),
            &bare_bulk,
        ),
        with_reference(
            summarize(
                "bulk enqueue (SQL, options named)",
                "jobs/s",
                named_bulk,
                "",
            ),
            &bare_bulk,
        ),
        with_reference(
            summarize(
                "bulk enqueue (HTTP batch, 1,000 per call)",
                "jobs/s",
                http_bulk,
                "",
            ),
            &bare_bulk,
        ),
    ];
    if let Some(pgbench) = &bench.pgbench {
        let script = sql::PGBENCH_INSERT_THOUSAND;
        let mut rates = Vec::new();
        for _ in 0..sizes.runs {
            sql::reset_reference_table(pool).await?;
            let tps = run_pgbench(pgbench, &bench.url, bench.base, script, 1, sizes.bulk_calls)?;
            rates.push(tps * 1000.0);
        }
        let reference = summarize(
            "pgbench: 1,000-row INSERT",
            "rows/s",
            rates,
            "pgbench -n -M prepared -c 1",
        );
        let mut vs = with_reference(results[1].clone(), &reference);
        vs.name = "bulk enqueue (SQL) vs pgbench".into();
        results.insert(1, reference);
        results.push(vs);
    }
    sql::drop_reference_table(pool).await?;
    Ok(results)
}

/// Queue-core drain through the store layer, and the bare-SQL drain limit beside it.
async fn queue_core(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let (pool, sizes, specs) = (&bench.pool, &bench.sizes, &bench.specs);
    let mut core = Vec::new();
    let runner = bench_runner(pool).await?;
    for _ in 0..sizes.runs {
        sql::truncate_jobs(pool).await?;
        for _ in 0..sizes.drain_jobs / 1000 {
            sql::insert_jobs_plain_many(pool, specs).await?;
        }
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let pool = pool.clone();
            workers.spawn(async move {
                let output = json!({});
                let mut finished: Vec<jobs::ClaimedJob> = Vec::new();
                loop {
                    // Complete the last batch and claim the next in one transaction.
                    let completions: Vec<jobs::Completion> = finished
                        .iter()
                        .map(|c| jobs::Completion {
                            runner,
                            job: c.id,
                            attempt: c.attempt,
                            lease_token: c.lease_token,
                            outcome: sluice_protocol::Outcome::Succeeded,
                            output: &output,
                            error: None,
                            retryable: true,
                            final_seq: None,
                            retry_jitter: 0.0,
                        })
                        .collect();
                    // A deadlock between the two workers' statements is rolled back whole
                    // and tried again, as a sidecar does with a 503 `busy`: a row one
                    // worker's claim skipped stays locked until its statement ends.
                    let claimed = loop {
                        match jobs::complete_and_claim(
                            &pool,
                            runner,
                            &completions,
                            CORE_BATCH,
                            Duration::from_secs(30),
                        )
                        .await
                        {
                            Err(Error::Busy(_)) => continue,
                            result => break result?.1,
                        }
                    };
                    if claimed.is_empty() {
                        return Ok::<_, Error>(());
                    }
                    finished = claimed;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| Error::Internal(e.to_string()))??;
        }
        core.push(sizes.drain_jobs as f64 / started.elapsed().as_secs_f64());
        expect_succeeded(pool, sizes.drain_jobs).await?;
    }
    let core = summarize(
        "queue-core drain (complete + claim 500, 2 workers)",
        "jobs/s",
        core,
        "store layer only, no HTTP; one transaction per batch",
    );
    let mut results = vec![core.clone()];
    if let Some(pgbench) = &bench.pgbench {
        // The limit of any SKIP LOCKED queue on this server: claim 100 and delete them.
        let script = sql::PGBENCH_CLAIM_AND_DELETE;
        let mut rates = Vec::new();
        for _ in 0..sizes.runs {
            sql::reset_reference_table(pool).await?;
            for _ in 0..sizes.drain_jobs / 1000 {
                sql::insert_reference_many(pool, specs).await?;
            }
            let tps = run_pgbench(
                pgbench,
                &bench.url,
                bench.base,
                script,
                2,
                sizes.drain_jobs / 100 / 2,
            )?;
            rates.push(tps * 100.0);
        }
        sql::drop_reference_table(pool).await?;
        let reference = summarize(
            "pgbench: claim 100 + DELETE (2 clients)",
            "rows/s",
            rates,
            "bare SKIP LOCKED drain, no attempts, no results",
        );
        results[0] = with_reference(core, &reference);
        results.insert(0, reference);
    }
    Ok(results)
}

/// A registered runner for the store-level measurements (claims lease only to live runners).
async fn bench_runner(pool: &PgPool) -> Result<RunnerId> {
    let name = format!("bench-store-{}", uuid::Uuid::new_v4());
    let (runner, _token) = store::runners::register(
        pool,
        store::runners::RegisterParams {
            pod_name: &name,
            labels: json!({}),
            slots: 1,
            version: env!("CARGO_PKG_VERSION"),
        },
    )
    .await?;
    Ok(runner)
}

/// Jobs per transaction in the queue-core drain.
const CORE_BATCH: i32 = 500;

/// Pickup latency, idle RSS and the drains through real sidecars and the HTTP protocol.
async fn end_to_end(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let runner_binary = dev::find_runner_binary()?;
    let mut results = Vec::new();
    // The contract's setting (10 in flight), then the best one found on this machine.
    for (sidecars, slots) in [(1u32, 10u32), (2, 5), (2, BEST_SLOTS)] {
        let mut children = start_sidecars(bench, &runner_binary, sidecars, slots).await?;
        let outcome = async {
            let mut out = Vec::new();
            if sidecars == 2 && slots == 5 {
                out.push(idle_rss(&children).await?);
                out.extend(pickup_latency(bench).await?);
            }
            out.push(drain_through_sidecars(bench, sidecars, slots).await?);
            Ok::<_, Error>(out)
        }
        .await;
        dev::stop_runners(&mut children).await;
        results.extend(outcome?);
    }
    Ok(results)
}

/// Enqueue → claim through the warm pool (local backend, one-slot runners, two warm), under
/// a steady stream of jobs (one every 200 ms): runners that stay, and runners recycled after
/// every task (`SLUICE_RUNNER_RECYCLE_AFTER=1`, a fresh runner per task).
async fn pool_start_latency(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let binary = dev::find_runner_binary()?;
    let jobs = if bench.config.quick { 15 } else { 60 };
    let mut results = Vec::new();
    for recycle in [false, true] {
        sql::truncate_jobs(&bench.pool).await?;
        let mut env: Vec<(String, String)> = ["PATH", "HOME", "TMPDIR", "LANG"]
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|v| (name.to_string(), v)))
            .collect();
        // The runners log to the bench's stderr: only what goes wrong.
        env.push(("RUST_LOG".into(), "warn".into()));
        if recycle {
            env.push(("SLUICE_RUNNER_RECYCLE_AFTER".into(), "1".into()));
        }
        let mut serve = bench.serve.clone();
        serve.listen = "127.0.0.1:0".parse().expect("static address");
        serve.internal_listen = "127.0.0.1:0".parse().expect("static address");
        serve.cron_interval = None;
        serve.pool = Some(sluice::service::pool::PoolSettings {
            name: "bench".into(),
            min_warm: 2,
            max_warm: 6,
            idle_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(60),
            slots: 1,
            interval: Duration::from_millis(100),
            backend: sluice::service::pool::BackendSettings::Local(
                sluice::service::pool::LocalSettings {
                    binary: binary.clone(),
                    workdir: bench.base.join(if recycle {
                        "pool-recycled"
                    } else {
                        "pool-warm"
                    }),
                    env,
                },
            ),
        });
        let server = Server::start(serve).await?;
        let measured = async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sql::live_runners(&bench.pool, "pool-").await? < 2 {
                if Instant::now() > deadline {
                    return Err(Error::Internal(
                        "the pool did not warm two runners within 30 s".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let spec = json!({"kind": "bash", "script": "true"});
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            for _ in 0..jobs {
                ticker.tick().await;
                sql::insert_job_plain_returning_xid(&bench.pool, &spec).await?;
            }
            wait_drained(&bench.pool, jobs as i64, Duration::from_secs(120)).await?;
            let mut claims = sql::claim_delays_ms(&bench.pool).await?;
            claims.sort_by(f64::total_cmp);
            let mut starts = sql::tool_start_delays_ms(&bench.pool).await?;
            starts.sort_by(f64::total_cmp);
            Ok((claims, starts))
        }
        .await;
        server.shutdown().await;
        let (claims, starts) = measured?;
        let mode = if recycle {
            "fresh runner per task (RECYCLE_AFTER=1)"
        } else {
            "warm runners kept"
        };
        for (what, delays, until) in [
            ("pool start latency", &claims, "insert → claim"),
            (
                "pool tool start latency",
                &starts,
                "insert → the tool's `started` event stored (spawn and event delivery included)",
            ),
        ] {
            let note = format!(
                "{} jobs, one every 200 ms; local pool, 1-slot runners, 2 warm; database clock, {until}",
                delays.len()
            );
            for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
                let mut m = summarize(
                    &format!("{what} {label}, {mode}"),
                    "ms",
                    vec![percentile(delays, p)],
                    &note,
                );
                m.min = delays.first().copied().unwrap_or(f64::NAN);
                m.max = delays.last().copied().unwrap_or(f64::NAN);
                results.push(m);
            }
        }
    }
    Ok(results)
}

/// Slots per sidecar in the best-setting drain.
const BEST_SLOTS: u32 = 500;

async fn start_sidecars(
    bench: &Bench<'_>,
    binary: &std::path::Path,
    count: u32,
    slots: u32,
) -> Result<Vec<Child>> {
    let internal = format!("http://{}", bench.server.internal_addr);
    let work = bench.base.join("runners");
    let prefix = format!("bench-{count}x{slots}-");
    let mut children = Vec::new();
    for n in 1..=count {
        let launched = dev::spawn_runner(&dev::RunnerLaunch {
            binary,
            name: format!("{prefix}{n}"),
            workdir: work.join(n.to_string()),
            log: bench.base.join(format!("runner-{count}x{slots}-{n}.log")),
            internal_url: &internal,
            secret: &bench.serve.runner_secret,
            slots,
        });
        match launched {
            Ok(child) => children.push(child),
            Err(err) => {
                dev::stop_runners(&mut children).await;
                return Err(err);
            }
        }
    }
    // Every sidecar of this set registered (earlier sets' rows stay, so count by name).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql::live_runners(&bench.pool, &prefix).await? < count as i64 {
        if Instant::now() > deadline {
            dev::stop_runners(&mut children).await;
            return Err(Error::Internal(
                "the sidecars did not register within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(children)
}

async fn pickup_latency(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let pool = &bench.pool;
    let spec = &bench.specs[0];
    sql::truncate_jobs(pool).await?;
    // Warm up: both sidecars registered and waiting.
    sql::insert_jobs_plain_many(pool, &bench.specs[..10]).await?;
    wait_drained(pool, 10, Duration::from_secs(60)).await?;
    sql::truncate_jobs(pool).await?;
    let mut latencies = Vec::new();
    let mut clock = "database clock: commit timestamp to the claim's now()";
    for _ in 0..bench.sizes.pickup_jobs {
        let (id, xid) = sql::insert_job_plain_returning_xid(pool, spec).await?;
        let committed = SystemTime::now();
        let started_at = wait_started(pool, id).await?;
        let ms = match sql::commit_timestamp(pool, &xid).await? {
            Some(commit) => (started_at - commit).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            None => {
                // track_commit_timestamp is off on this server: the client's clock right
                // after the commit returned (an under-estimate by the reply's latency).
                clock = "client clock after the commit returned (track_commit_timestamp is off)";
                let started: SystemTime = started_at.into();
                started
                    .duration_since(committed)
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .unwrap_or(0.0)
            }
        };
        latencies.push(ms);
        // The next job goes into an idle queue again.
        wait_drained(pool, latencies.len() as i64, Duration::from_secs(30)).await?;
    }
    latencies.sort_by(f64::total_cmp);
    let mut pickup = summarize(
        "pickup latency p50 (INSERT commit → claimed)",
        "ms",
        vec![percentile(&latencies, 0.5)],
        &format!("{} jobs, idle queue, 2 sidecars; {clock}", latencies.len()),
    );
    pickup.min = latencies.first().copied().unwrap_or(f64::NAN);
    pickup.max = latencies.last().copied().unwrap_or(f64::NAN);
    let mut pickup99 = pickup.clone();
    pickup99.name = "pickup latency p99 (INSERT commit → claimed)".into();
    pickup99.median = percentile(&latencies, 0.99);
    Ok(vec![pickup, pickup99])
}

async fn drain_through_sidecars(
    bench: &Bench<'_>,
    sidecars: u32,
    slots: u32,
) -> Result<Measurement> {
    let (pool, sizes) = (&bench.pool, &bench.sizes);
    // Both sidecars registered and claiming before the clock starts.
    sql::truncate_jobs(pool).await?;
    sql::insert_jobs_plain_many(pool, &bench.specs[..10]).await?;
    wait_drained(pool, 10, Duration::from_secs(60)).await?;
    let mut drain = Vec::new();
    for _ in 0..sizes.runs.min(3) {
        sql::truncate_jobs(pool).await?;
        // Load the backlog in one transaction, so the sidecars start on all of it at once.
        let xid =
            sql::insert_jobs_plain_repeated(pool, &bench.specs[0], sizes.drain_jobs as i64).await?;
        // On the server's clock, from the backlog's commit to the last completion's (commit
        // timestamps; where those are off, from just after the commit to the last
        // `finished_at`): the poll's period then bounds no precision, and a slow poll keeps
        // the harness off the two cores it measures (a 2 ms poll cost a tenth of a core).
        let started = match sql::commit_timestamp(pool, &xid).await? {
            Some(at) => at,
            None => sql::server_clock(pool).await?,
        };
        wait_drained_every(
            pool,
            sizes.drain_jobs as i64,
            Duration::from_secs(600),
            DRAIN_POLL,
        )
        .await?;
        let finished = sql::last_finished_at(pool).await?;
        let seconds = (finished - started).num_microseconds().unwrap_or(0) as f64 / 1e6;
        if seconds <= 0.0 {
            return Err(Error::Internal(format!(
                "the drain finished before it started ({started} → {finished}): is the server's clock stepping?"
            )));
        }
        drain.push(sizes.drain_jobs as f64 / seconds);
    }
    let in_flight = sidecars * slots;
    Ok(summarize(
        &format!("end-to-end drain (noop, {sidecars} sidecars × {slots} slots)"),
        "jobs/s",
        drain,
        &format!("real HTTP protocol, {in_flight} in flight"),
    ))
}

/// Workflows through real sidecars: the step-to-step latency of a chain (with a plain job's
/// pickup measured in the same setting beside it), and a fan-out's makespan against the same
/// jobs enqueued directly.
async fn workflows(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let runner_binary = dev::find_runner_binary()?;
    let sizes = &bench.sizes;
    let noop = |id: String, parent: Option<String>| {
        let mut step = json!({"id": id, "kind": "noop"});
        if let Some(parent) = parent {
            step["depends_on"] = json!([parent]);
        }
        step
    };
    let chain: Vec<Value> = (0..sizes.chain_steps)
        .map(|n| noop(format!("s{n}"), n.checked_sub(1).map(|p| format!("s{p}"))))
        .collect();
    let fan_out: Vec<Value> = (0..sizes.fan_out_steps)
        .map(|n| noop(format!("s{n}"), None))
        .collect();
    for (name, steps) in [("bench-chain", &chain), ("bench-fan-out", &fan_out)] {
        bench
            .api
            .put_workflow(name, json!({ "steps": steps }).to_string())
            .await
            .map_err(|e| refused("registering a bench workflow", e))?;
    }
    let mut results = Vec::new();
    // The chain, beside a plain job's pickup, with the pickup's setting (2 × 5 slots).
    let mut children = start_sidecars(bench, &runner_binary, 2, 5).await?;
    let outcome = async {
        let mut out = pickup_latency(bench).await?;
        for m in &mut out {
            m.name = m.name.replace("pickup latency", "plain-job pickup");
        }
        let mut edges = Vec::new();
        for _ in 0..sizes.runs.min(3) {
            let run = finish_run(bench, "bench-chain").await?.0;
            edges.extend(sql::step_to_step_ms(&bench.pool, run).await?);
        }
        if edges.len() != sizes.runs.min(3) * (sizes.chain_steps - 1) {
            return Err(Error::Internal(format!(
                "{} step edges measured in the chains",
                edges.len()
            )));
        }
        edges.sort_by(f64::total_cmp);
        let note = format!(
            "{} edges of {}-step noop chains, 2 sidecars × 5 slots; parent's completion commit → child's claim, server clock",
            edges.len(),
            sizes.chain_steps
        );
        let mut p50 = summarize(
            "step-to-step latency p50 (chain)",
            "ms",
            vec![percentile(&edges, 0.5)],
            &note,
        );
        p50.min = edges.first().copied().unwrap_or(f64::NAN);
        p50.max = edges.last().copied().unwrap_or(f64::NAN);
        let mut p99 = p50.clone();
        p99.name = "step-to-step latency p99 (chain)".into();
        p99.median = percentile(&edges, 0.99);
        out.insert(0, p50);
        out.insert(1, p99);
        Ok::<_, Error>(out)
    }
    .await;
    dev::stop_runners(&mut children).await;
    results.extend(outcome?);
    // The fan-out against the same jobs enqueued directly, in the best setting.
    let mut children = start_sidecars(bench, &runner_binary, 2, BEST_SLOTS).await?;
    let outcome = async {
        let (mut workflow, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..sizes.runs.min(3) {
            let (_, seconds) = finish_run(bench, "bench-fan-out").await?;
            workflow.push(seconds * 1000.0);
            sql::truncate_jobs(&bench.pool).await?;
            let xid = sql::insert_jobs_plain_repeated(
                &bench.pool,
                &bench.specs[0],
                sizes.fan_out_steps as i64,
            )
            .await?;
            let started = match sql::commit_timestamp(&bench.pool, &xid).await? {
                Some(at) => at,
                None => sql::server_clock(&bench.pool).await?,
            };
            wait_drained_every(
                &bench.pool,
                sizes.fan_out_steps as i64,
                Duration::from_secs(120),
                Duration::from_millis(2),
            )
            .await?;
            let finished = sql::last_finished_at(&bench.pool).await?;
            direct.push((finished - started).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
        let note = format!(
            "{} noop steps without parents, one run; 2 sidecars × {BEST_SLOTS} slots; run's commit → last step's completion commit",
            sizes.fan_out_steps
        );
        let fan_out = summarize(
            &format!("fan-out makespan ({} steps, one run)", sizes.fan_out_steps),
            "ms",
            workflow,
            &note,
        );
        let plain = summarize(
            &format!("the same {} jobs enqueued directly", sizes.fan_out_steps),
            "ms",
            direct,
            "one INSERT of noop jobs; its commit → the last completion's commit",
        );
        let fan_out = with_reference(fan_out, &plain);
        Ok::<_, Error>(vec![fan_out, plain])
    }
    .await;
    dev::stop_runners(&mut children).await;
    results.extend(outcome?);
    sql::truncate_runs(&bench.pool).await?;
    sql::truncate_jobs(&bench.pool).await?;
    Ok(results)
}

/// Starts a run of `workflow` on empty tables and waits until it succeeded; its id and its
/// makespan in seconds (its commit to its last job's completion commit).
async fn finish_run(bench: &Bench<'_>, workflow: &str) -> Result<(i64, f64)> {
    let pool = &bench.pool;
    sql::truncate_jobs(pool).await?;
    sql::truncate_runs(pool).await?;
    let (run, xid) = sql::start_run_returning_xid(pool, workflow).await?;
    let started = match sql::commit_timestamp(pool, &xid).await? {
        Some(at) => at,
        None => sql::server_clock(pool).await?,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match sql::run_state(pool, run).await?.as_str() {
            "running" => {}
            "succeeded" => break,
            other => {
                return Err(Error::Internal(format!(
                    "bench run of {workflow} ended {other}"
                )))
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "bench run of {workflow} did not finish in 300 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let finished = sql::last_finished_at(pool).await?;
    Ok((
        run,
        (finished - started).num_microseconds().unwrap_or(0) as f64 / 1e6,
    ))
}

/// Claim latency with history: 1,000 vs many finished rows.
async fn claim_with_history(bench: &Bench<'_>) -> Result<Vec<Measurement>> {
    let pool = &bench.pool;
    let runner = bench_runner(pool).await?;
    let mut claim_latency = Vec::new();
    for history in [1_000, bench.sizes.history_rows] {
        sql::truncate_jobs(pool).await?;
        sql::insert_finished_jobs(pool, history).await?;
        sql::insert_jobs_plain_many(pool, &bench.specs).await?;
        let mut samples = Vec::new();
        for _ in 0..100 {
            let started = Instant::now();
            let claimed = jobs::claim_available(pool, runner, 10, Duration::from_secs(30)).await?;
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
    Ok(vec![with_reference(large, &small), small])
}

/// Runs one pgbench script against the server: `clients` connections, `transactions` each;
/// returns its transactions per second. The password (if any) goes through the environment,
/// never the command line.
fn run_pgbench(
    pgbench: &std::path::Path,
    url: &Secret,
    base: &std::path::Path,
    script: &str,
    clients: usize,
    transactions: usize,
) -> Result<f64> {
    let parsed = url::Url::parse(url.expose())
        .map_err(|e| Error::Internal(format!("DATABASE_URL is not a URL: {e}")))?;
    let password = parsed.password().map(|p| {
        url::form_urlencoded::parse(format!("p={p}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    });
    let mut conninfo = parsed.clone();
    let _ = conninfo.set_password(None);
    std::fs::create_dir_all(base).map_err(|e| Error::Internal(e.to_string()))?;
    let script_path = base.join(format!("pgbench-{}.sql", fastrand::u64(..)));
    std::fs::write(&script_path, script).map_err(|e| Error::Internal(e.to_string()))?;
    let mut command = std::process::Command::new(pgbench);
    command
        .args(["-n", "-M", "prepared", "-f"])
        .arg(&script_path)
        .args(["-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-t", &transactions.to_string()])
        .arg(conninfo.as_str())
        .stdin(std::process::Stdio::null());
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command
        .output()
        .map_err(|e| Error::Internal(format!("running {}: {e}", pgbench.display())));
    let _ = std::fs::remove_file(&script_path);
    let output = output?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    stdout
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| Error::Internal(format!("pgbench printed no tps: {stdout}")))
}

/// Resident memory of the registered, idle sidecars, in MiB.
async fn idle_rss(sidecars: &[Child]) -> Result<Measurement> {
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
    let exec_note = format!(
        "{runs} runs of /bin/true: fork, PID and mount namespaces, private tmp, uid drop, \
         rlimits, until the exec succeeded"
    );
    let exit_note = format!("{runs} runs of /bin/true: the same, until its exit is reaped");
    Ok(vec![
        summarize(
            "tool spawn p50 (fork … exec)",
            "ms",
            vec![ms("exec_p50_us")],
            &exec_note,
        ),
        summarize(
            "tool spawn p99 (fork … exec)",
            "ms",
            vec![ms("exec_p99_us")],
            &exec_note,
        ),
        summarize(
            "tool spawn round trip p50 (… exit reaped)",
            "ms",
            vec![ms("spawn_p50_us")],
            &exit_note,
        ),
        summarize(
            "tool spawn round trip p99 (… exit reaped)",
            "ms",
            vec![ms("spawn_p99_us")],
            &exit_note,
        ),
    ])
}

async fn wait_started(pool: &PgPool, id: i64) -> Result<chrono::DateTime<chrono::Utc>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(started_at) = sql::first_attempt_started_at(pool, id).await? {
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

/// Waits until `count` jobs have finished and none is left to run (polling the claim and
/// running indexes, which stay small, rather than counting the whole table).
async fn wait_drained(pool: &PgPool, count: i64, timeout: Duration) -> Result<()> {
    wait_drained_every(pool, count, timeout, Duration::from_millis(2)).await
}

/// How often a timed drain is polled for its end (which is read from the jobs afterwards).
const DRAIN_POLL: Duration = Duration::from_millis(20);

async fn wait_drained_every(
    pool: &PgPool,
    count: i64,
    timeout: Duration,
    poll: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if !sql::any_unfinished(pool).await? {
            return expect_succeeded(pool, count as usize).await;
        }
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{count} jobs did not finish in {timeout:?}"
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// Every job of a drain succeeded, exactly once.
async fn expect_succeeded(pool: &PgPool, count: usize) -> Result<()> {
    let (succeeded, attempts) = sql::succeeded_and_attempts(pool).await?;
    if succeeded != count as i64 || attempts != count as i64 {
        return Err(Error::Internal(format!(
            "drain of {count} jobs ended with {succeeded} succeeded and {attempts} attempts"
        )));
    }
    Ok(())
}
