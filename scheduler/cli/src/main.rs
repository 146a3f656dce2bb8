//! The `sluice` binary: parses the command line and calls the libraries — the server library
//! (`sluice`) for `migrate` and `serve`, the tooling (`sluice_cli`) for `enqueue`, `dev` and
//! `bench`.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use sluice::config::ServeConfig;
use sluice::service::lifecycle::LeaseTimings;
use sluice_cli::client::{ApiClient, ClientError};
use sluice_cli::commands;
use sluice_cli::dev::DevConfig;
use sluice_cli::output::{Output, Progress};
use sluice_protocol::api::{EnqueueRequest, RunRequest, RunState, ScheduleRequest, WorkflowRef};
use sluice_protocol::{JobId, JobState, Secret};

/// sluice: a Postgres-backed job system whose runners execute tools in sandboxes.
#[derive(Parser)]
// `about` is the text `sluice --help` has always opened with (the server crate's description
// when the binary lived there), kept as it was when the binary moved to sluice-cli.
#[command(
    name = "sluice",
    version,
    about = "The sluice scheduler: public API, queue, reaper, runner protocol, and the `sluice` CLI."
)]
struct Cli {
    /// `text` for people, `json` for scripts (JSON on stdout and nothing else there).
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        env = "SLUICE_OUTPUT",
        default_value = "text"
    )]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Secret,
    },
    /// Run a scheduler: the public API, the internal runner API and the reaper.
    Serve(Box<ServeArgs>),
    /// Enqueue a job through the public API; `--wait` prints its output and exits with its status.
    Enqueue(EnqueueArgs),
    /// Start a private Postgres, the scheduler and two local runners; run an example job.
    Dev(DevArgs),
    /// Measure throughput and latency against the bare-SQL limit (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Register and list workflow definitions.
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start a workflow run; `--wait` follows its steps and exits non-zero when it fails.
    Run(RunArgs),
    /// Download a workflow step's artifacts (a tar archive).
    Artifacts(ArtifactsArgs),
    /// The runners the scheduler knows: state, slots in use, version, last heartbeat.
    Runners {
        #[command(subcommand)]
        command: RunnersCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create, list, pause, resume and delete cron schedules that start workflow runs.
    Schedules {
        #[command(subcommand)]
        command: SchedulesCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List, show, cancel and retry jobs (`retry` with filters: a bulk redrive).
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List queues with their job counts; pause and resume them.
    Queues {
        #[command(subcommand)]
        command: QueuesCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow a job's (or `run:ID`, a workflow run's) events live until it ends; exit with its
    /// status (0 succeeded, the tool's exit code or 1 failed, 1 cancelled).
    Tail {
        /// `42` or `job:42` for a job, `run:42` (or `42 --run`) for a workflow run.
        target: String,
        /// TARGET is a workflow run's id.
        #[arg(long, env = "SLUICE_TAIL_RUN")]
        run: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a shell completion script: `sluice completions bash > /etc/bash_completion.d/sluice`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Jobs, newest first.
    Ls {
        #[arg(long, env = "SLUICE_QUEUE")]
        queue: Option<String>,
        /// blocked, scheduled, available, running, succeeded, failed or cancelled.
        #[arg(long, env = "SLUICE_STATE")]
        state: Option<String>,
        /// Created at or after: an RFC 3339 time or an age (90s, 15m, 2h, 7d).
        #[arg(long, env = "SLUICE_SINCE")]
        since: Option<String>,
        /// How many to list (50 by default).
        #[arg(long, env = "SLUICE_LIMIT")]
        limit: Option<u32>,
    },
    /// One job: its state, attempts, result and error.
    Show { id: i64 },
    /// Cancel a job; a running one's tool is killed within a heartbeat.
    Cancel { id: i64 },
    /// Retry a failed or cancelled job; without ID, every job matching the filters (at least
    /// one filter, or --all).
    Retry {
        id: Option<i64>,
        #[arg(long, env = "SLUICE_QUEUE")]
        queue: Option<String>,
        /// failed (the default) or cancelled.
        #[arg(long, env = "SLUICE_STATE")]
        state: Option<String>,
        /// Finished at or after: an RFC 3339 time or an age (90s, 15m, 2h, 7d).
        #[arg(long, env = "SLUICE_SINCE")]
        since: Option<String>,
        /// Retry at most this many. (With an ID, the filters are not used.)
        #[arg(long, env = "SLUICE_LIMIT")]
        limit: Option<u64>,
        /// Every failed (or --state) job, with no other filter.
        #[arg(long, env = "SLUICE_ALL")]
        all: bool,
    },
}

#[derive(Subcommand)]
enum QueuesCommand {
    /// Every queue: paused or not, its cap, its jobs by state.
    Ls,
    /// Stop handing out the queue's jobs (running ones go on).
    Pause { name: String },
    /// Hand out its jobs again.
    Resume { name: String },
}

#[derive(Subcommand)]
enum RunnersCommand {
    /// One line per runner: pod, state, slots in use of slots, version, last seen.
    Ls,
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Create or replace schedule NAME.
    Set(ScheduleSetArgs),
    /// Every schedule and when it fires next.
    List,
    /// One schedule: its next fire times and its latest ticks.
    Get { name: String },
    /// Stop firing NAME until it is resumed.
    Pause { name: String },
    /// Fire NAME again, from its next time on (missed ticks are not caught up).
    Resume { name: String },
    /// Delete NAME and its tick history; the runs it started stay.
    Delete { name: String },
}

#[derive(Args)]
struct ScheduleSetArgs {
    name: String,
    /// 5 fields (`*/15 * * * *`), 6 (seconds first) or `@hourly`, `@daily`, ….
    #[arg(long, env = "SLUICE_CRON")]
    cron: String,
    /// The workflow each tick runs.
    #[arg(long, env = "SLUICE_WORKFLOW")]
    workflow: String,
    /// The IANA zone the fields are read in (UTC by default).
    #[arg(long, env = "SLUICE_TIMEZONE")]
    timezone: Option<String>,
    /// The runs' input, JSON; `-` reads it from stdin, `@file` from a file.
    #[arg(long, env = "SLUICE_INPUT")]
    input: Option<String>,
    /// While the last run still runs: allow (default), skip, queue_one, replace.
    #[arg(long, env = "SLUICE_OVERLAP")]
    overlap: Option<String>,
    /// Ticks missed while no scheduler ran: none (default), latest, all.
    #[arg(long, env = "SLUICE_CATCH_UP")]
    catch_up: Option<String>,
    /// How far back `--catch-up all` reaches (one day by default).
    #[arg(long, env = "SLUICE_CATCH_UP_WINDOW_MS")]
    catch_up_window_ms: Option<u64>,
    /// Create it paused.
    #[arg(long, env = "SLUICE_PAUSED")]
    paused: bool,
}

#[derive(Subcommand)]
enum WorkflowsCommand {
    /// Register a definition (YAML or JSON) from FILE, under its file name or `--name`.
    Apply {
        file: PathBuf,
        #[arg(long, env = "SLUICE_WORKFLOW_NAME")]
        name: Option<String>,
    },
    /// List the workflows and their current versions.
    List,
}

/// Where the public API is.
#[derive(Args)]
struct ApiArgs {
    /// Public API URL; defaults to the one in `.sluice/dev.env`.
    #[arg(long, env = "SLUICE_API_URL", global = true)]
    api_url: Option<String>,
    /// API token; defaults to the one in `.sluice/dev.env`.
    #[arg(long, env = "SLUICE_API_TOKEN", hide_env_values = true, global = true)]
    api_token: Option<Secret>,
}

impl ApiArgs {
    fn client(self) -> anyhow::Result<ApiClient> {
        let url = self
            .api_url
            .or_else(|| dev_env_value("SLUICE_API_URL"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "set SLUICE_API_URL (or run `sluice dev` here, which writes .sluice/dev.env)"
                )
            })?;
        let token = self
            .api_token
            .or_else(|| dev_env_value("SLUICE_API_TOKEN").map(Secret::new))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "set SLUICE_API_TOKEN (or run `sluice dev` here, which writes .sluice/dev.env)"
                )
            })?;
        Ok(ApiClient::new(&url, token))
    }
}

#[derive(Args)]
struct RunArgs {
    /// The workflow's name.
    workflow: String,
    /// The run's input, JSON; `-` reads it from stdin, `@file` from a file.
    #[arg(long, env = "SLUICE_INPUT")]
    input: Option<String>,
    /// A stored version (its hash) instead of the current one.
    #[arg(long, env = "SLUICE_WORKFLOW_VERSION")]
    version: Option<String>,
    /// Follow the run's steps until it ends; exit 1 unless it succeeded.
    #[arg(long, env = "SLUICE_WAIT")]
    wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
struct ArtifactsArgs {
    /// The run's id.
    run: i64,
    /// The step whose artifacts to download.
    step: String,
    /// Where to write the archive (default: `<step>.tar`); `-` writes it to stdout. (Was
    /// `-o`, which is now `--output text|json` on every command.)
    #[arg(short = 'f', long = "file", env = "SLUICE_ARTIFACTS_FILE")]
    file: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// A small version of everything (under a minute).
    #[arg(long, env = "SLUICE_BENCH_QUICK")]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, env = "SLUICE_BENCH_JSON")]
    json: Option<PathBuf>,
    /// Measure against this server instead of a private durable cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<Secret>,
    /// Run only these parts (comma-separated): enqueue, bulk, core, e2e, workflow, spawn, claim, pool, events.
    #[arg(long, env = "SLUICE_BENCH_ONLY", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(sluice_cli::bench::SECTIONS))]
    only: Vec<String>,
}

#[derive(Args)]
struct TimingArgs {
    /// How often runners heartbeat.
    #[arg(long, env = "SLUICE_HEARTBEAT_MS", default_value_t = 5000)]
    heartbeat_ms: u64,
    /// How long a lease lasts without a renewal.
    #[arg(long, env = "SLUICE_LEASE_MS", default_value_t = 30000)]
    lease_ms: u64,
    /// How often expired leases are reclaimed and due jobs promoted.
    #[arg(long, env = "SLUICE_REAPER_INTERVAL_MS", default_value_t = 1000)]
    reaper_interval_ms: u64,
}

impl TimingArgs {
    fn timings(&self) -> anyhow::Result<LeaseTimings> {
        const DAY_MS: u64 = 24 * 3_600_000;
        if !(1..=DAY_MS).contains(&self.heartbeat_ms)
            || !(1..=DAY_MS).contains(&self.reaper_interval_ms)
            || self.lease_ms > DAY_MS
        {
            anyhow::bail!(
                "SLUICE_HEARTBEAT_MS, SLUICE_LEASE_MS and SLUICE_REAPER_INTERVAL_MS must be between 1 and 86400000"
            );
        }
        if self.lease_ms < 2 * self.heartbeat_ms {
            anyhow::bail!(
                "SLUICE_LEASE_MS ({}) must be at least twice SLUICE_HEARTBEAT_MS ({}), so one lost heartbeat does not lose the lease",
                self.lease_ms,
                self.heartbeat_ms
            );
        }
        Ok(LeaseTimings {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            lease: Duration::from_millis(self.lease_ms),
            maintenance_interval: Duration::from_millis(self.reaper_interval_ms),
        })
    }
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Secret,
    /// Public API address.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Internal runner API address.
    #[arg(long, env = "SLUICE_INTERNAL_LISTEN", default_value = "127.0.0.1:7071")]
    internal_listen: SocketAddr,
    /// Bearer token for the public API.
    #[arg(long, env = "SLUICE_API_TOKEN", hide_env_values = true)]
    api_token: Secret,
    /// Secret runners present to register.
    #[arg(long, env = "SLUICE_RUNNER_SECRET", hide_env_values = true)]
    runner_secret: Secret,
    #[command(flatten)]
    timings: TimingArgs,
    /// Database connections in the pool.
    #[arg(long, env = "SLUICE_DB_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: u32,
    /// Client connections open at once on the public listener; by default two thirds of
    /// the descriptors left after a reserve, at most 10,000.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    max_client_connections: Option<usize>,
    /// The same for the internal (runner) listener; by default one third, at most 10,000.
    #[arg(long, env = "SLUICE_INTERNAL_MAX_CONNECTIONS")]
    internal_max_connections: Option<usize>,
    /// Time a public client has to send a request's headers, and that an idle kept-alive
    /// connection stays open.
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// How often a waiting claim looks again without a notification (a fallback for a lost
    /// LISTEN connection; jobs normally wake claims through NOTIFY at once).
    #[arg(long, env = "SLUICE_CLAIM_POLL_MS", default_value_t = 1000)]
    claim_poll_ms: u64,
    /// How often this replica fires due cron ticks (every replica may: each tick fires
    /// once); 0: this replica fires none.
    #[arg(long, env = "SLUICE_CRON_INTERVAL_MS", default_value_t = 1000)]
    cron_interval_ms: u64,
    /// How long a finished workflow run — its steps, outputs and artifacts — is kept;
    /// 0 keeps them for ever.
    #[arg(long, env = "SLUICE_RUN_RETENTION_SECONDS", default_value_t = 7 * 24 * 3600)]
    run_retention_seconds: u64,
    /// Largest stored agent session (its messages as JSON): past it, the oldest tool
    /// results are elided, then the oldest exchanges dropped. The default, 384 KiB, stays
    /// well inside a 200k-token context even at 3 bytes a token.
    #[arg(long, env = "SLUICE_SESSION_MAX_BYTES", default_value_t = 384 << 10)]
    session_max_bytes: u64,
    /// A live event stream (SSE) sends a comment line after this long without an event.
    #[arg(long, env = "SLUICE_SSE_KEEPALIVE_MS", default_value_t = 15_000)]
    sse_keepalive_ms: u64,
    /// Events a followed job or run keeps for its slowest client; a client further behind
    /// is dropped and resumes by position.
    #[arg(long, env = "SLUICE_SSE_TOPIC_BUFFER", default_value_t = 256)]
    sse_topic_buffer: u64,
    /// Encoded events waiting for one client's socket.
    #[arg(long, env = "SLUICE_SSE_CLIENT_BUFFER", default_value_t = 64)]
    sse_client_buffer: u64,
    /// Event streams open at once; past it, new ones are answered 503 with Retry-After.
    #[arg(long, env = "SLUICE_SSE_MAX_STREAMS", default_value_t = 5000)]
    sse_max_streams: u64,
    #[command(flatten)]
    pool: sluice_cli::pool::PoolArgs,
    /// Do not apply migrations at start.
    #[arg(long, env = "SLUICE_NO_MIGRATE")]
    no_migrate: bool,
}

#[derive(Args)]
struct EnqueueArgs {
    /// The job spec (`{"kind":"bash","script":"…"}`) or a full request (`{"spec":{…},"queue":…}`);
    /// `-` reads it from stdin, `@file` from a file.
    spec: String,
    /// Wait for the job to end, print its output, and exit with its status.
    #[arg(long, env = "SLUICE_WAIT")]
    wait: bool,
    #[arg(long, env = "SLUICE_QUEUE")]
    queue: Option<String>,
    #[arg(long, env = "SLUICE_PRIORITY")]
    priority: Option<i32>,
    #[arg(long, env = "SLUICE_MAX_ATTEMPTS")]
    max_attempts: Option<i32>,
    #[arg(long, env = "SLUICE_TIMEOUT_MS")]
    timeout_ms: Option<u64>,
    #[arg(long, env = "SLUICE_DELAY_MS", conflicts_with = "delay")]
    delay_ms: Option<u64>,
    /// Run it no earlier than this from now: 250ms, 90s, 15m, 2h, 7d.
    #[arg(long, env = "SLUICE_DELAY")]
    delay: Option<String>,
    /// A repeated key answers with the first job instead of enqueuing another.
    #[arg(long, env = "SLUICE_IDEMPOTENCY_KEY")]
    idempotency_key: Option<String>,
    /// Public API URL; defaults to the one in `.sluice/dev.env`.
    #[arg(long, env = "SLUICE_API_URL")]
    api_url: Option<String>,
    /// API token; defaults to the one in `.sluice/dev.env`.
    #[arg(long, env = "SLUICE_API_TOKEN", hide_env_values = true)]
    api_token: Option<Secret>,
}

#[derive(Args)]
struct DevArgs {
    /// State directory: the cluster, dev.env, runner workspaces and logs.
    #[arg(long, env = "SLUICE_DEV_DIR", default_value = ".sluice")]
    dir: PathBuf,
    /// Use this Postgres instead of a private cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<Secret>,
    /// Public API address.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Internal runner API address.
    #[arg(long, env = "SLUICE_INTERNAL_LISTEN", default_value = "127.0.0.1:7071")]
    internal_listen: SocketAddr,
    /// Local runners to start.
    #[arg(long, env = "SLUICE_DEV_RUNNERS", default_value_t = 2)]
    runners: u32,
    /// Do not run the example job.
    #[arg(long, env = "SLUICE_NO_EXAMPLE")]
    no_example: bool,
    #[command(flatten)]
    timings: TimingArgs,
}

/// Logs on stderr: `RUST_LOG` picks what (`default` without it); `SLUICE_LOG_FORMAT=json`
/// writes one JSON object per line (with the current span's fields: a job attempt's
/// `job_id`, `attempt`, `runner_id`), anything else the human format.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them.
        Err(err) if !err.use_stderr() => err.exit(),
        // A mistake on the command line: its one line, and where to look (exit 2, as clap).
        Err(err) => {
            eprintln!(
                "{} (see `sluice --help`)",
                one_line(&err.render().to_string())
            );
            return ExitCode::from(2);
        }
    };
    let output = cli.output;
    let result = match cli.command {
        Command::Dev(args) => {
            init_tracing("warn");
            dev(args)
        }
        Command::Bench(args) => {
            init_tracing("warn");
            sluice_cli::bench::run(sluice_cli::bench::BenchConfig {
                quick: args.quick,
                json: args.json,
                database_url: args.database_url,
                only: args.only,
            })
            .map(|_| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from)
        }
        Command::Migrate { database_url } => {
            init_tracing("info");
            block_on(migrate(database_url))
        }
        Command::Serve(args) => {
            init_tracing("info");
            block_on(serve(*args))
        }
        Command::Enqueue(args) => {
            init_tracing("warn");
            block_on(enqueue(args, output))
        }
        Command::Workflows { command, api } => {
            init_tracing("warn");
            block_on(workflows(command, api, output))
        }
        Command::Run(args) => {
            init_tracing("warn");
            block_on(run(args, output))
        }
        Command::Schedules { command, api } => {
            init_tracing("warn");
            block_on(schedules(command, api, output))
        }
        Command::Artifacts(args) => {
            init_tracing("warn");
            block_on(artifacts(args, output))
        }
        Command::Runners { command, api } => {
            init_tracing("warn");
            block_on(runners(command, api, output))
        }
        Command::Jobs { command, api } => {
            init_tracing("warn");
            block_on(jobs(command, api, output))
        }
        Command::Queues { command, api } => {
            init_tracing("warn");
            block_on(queues(command, api, output))
        }
        Command::Tail { target, run, api } => {
            init_tracing("warn");
            block_on(async move {
                let target = match run {
                    true if !target.contains(':') => {
                        commands::Target::parse(&format!("run:{target}"))?
                    }
                    _ => commands::Target::parse(&target)?,
                };
                commands::tail(&api.client()?, output, target).await
            })
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "sluice",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Clap's message on one line: what is wrong, with the names and values it lists, without
/// the usage that follows.
fn one_line(text: &str) -> String {
    text.lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    future: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    sluice_cli::dev::run(DevConfig {
        dir: args.dir,
        database_url: args.database_url,
        listen: args.listen,
        internal_listen: args.internal_listen,
        runners: args.runners,
        run_example: !args.no_example,
        timings: args.timings.timings()?,
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(database_url: Secret) -> anyhow::Result<ExitCode> {
    let pool = sluice::store::pool(
        sluice::store::connect_options(database_url.expose())?,
        &Default::default(),
    );
    sluice::store::migrate(&pool).await?;
    println!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let pool = sluice_cli::pool::settings(&args.pool).await?;
    let mut config = ServeConfig::new(args.database_url, args.api_token, args.runner_secret);
    config.pool = pool;
    if config.api_token.expose().is_empty() || config.runner_secret.expose().is_empty() {
        anyhow::bail!("SLUICE_API_TOKEN and SLUICE_RUNNER_SECRET must not be empty");
    }
    config.listen = args.listen;
    config.internal_listen = args.internal_listen;
    config.timings = args.timings.timings()?;
    config.max_connections = args.max_connections;
    config.migrate = !args.no_migrate;
    if let Some(max) = args.max_client_connections {
        anyhow::ensure!(max > 0, "SLUICE_MAX_CONNECTIONS must be positive");
        config.public_limits.max_connections = max;
    }
    if let Some(max) = args.internal_max_connections {
        anyhow::ensure!(max > 0, "SLUICE_INTERNAL_MAX_CONNECTIONS must be positive");
        config.internal_limits.max_connections = max;
    }
    anyhow::ensure!(
        (100..=3_600_000).contains(&args.header_timeout_ms),
        "SLUICE_HEADER_TIMEOUT_MS must be between 100 and 3600000"
    );
    config.public_limits.header_timeout = Duration::from_millis(args.header_timeout_ms);
    anyhow::ensure!(
        (10..=3_600_000).contains(&args.claim_poll_ms),
        "SLUICE_CLAIM_POLL_MS must be between 10 and 3600000"
    );
    config.claim_poll_interval = Duration::from_millis(args.claim_poll_ms);
    anyhow::ensure!(
        args.cron_interval_ms == 0 || (10..=60_000).contains(&args.cron_interval_ms),
        "SLUICE_CRON_INTERVAL_MS must be 0 (fire no ticks here) or between 10 and 60000"
    );
    config.cron_interval =
        (args.cron_interval_ms > 0).then(|| Duration::from_millis(args.cron_interval_ms));
    anyhow::ensure!(
        args.run_retention_seconds <= 100 * 366 * 24 * 3600,
        "SLUICE_RUN_RETENTION_SECONDS must be between 0 (keep for ever) and 3162240000 (100 years)"
    );
    config.run_retention = Duration::from_secs(args.run_retention_seconds);
    anyhow::ensure!(
        (4096..=64 << 20).contains(&args.session_max_bytes),
        "SLUICE_SESSION_MAX_BYTES must be between 4096 and 67108864"
    );
    config.session_max_bytes = args.session_max_bytes as usize;
    anyhow::ensure!(
        (100..=3_600_000).contains(&args.sse_keepalive_ms),
        "SLUICE_SSE_KEEPALIVE_MS must be between 100 and 3600000"
    );
    anyhow::ensure!(
        (1..=1 << 20).contains(&args.sse_topic_buffer),
        "SLUICE_SSE_TOPIC_BUFFER must be between 1 and 1048576"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.sse_max_streams),
        "SLUICE_SSE_MAX_STREAMS must be between 1 and 1000000"
    );
    anyhow::ensure!(
        (1..=1 << 16).contains(&args.sse_client_buffer),
        "SLUICE_SSE_CLIENT_BUFFER must be between 1 and 65536"
    );
    config.events = sluice::service::events::EventSettings {
        keepalive: Duration::from_millis(args.sse_keepalive_ms),
        topic_buffer: args.sse_topic_buffer as usize,
        client_buffer: args.sse_client_buffer as usize,
        max_streams: args.sse_max_streams as usize,
    };
    let server = sluice::server::Server::start(config).await?;
    // One line on stdout that scripts (and the testkit) can wait for.
    println!(
        "sluice listening api=http://{} internal=http://{}",
        server.api_addr, server.internal_addr
    );
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// `SLUICE_API_URL`/`SLUICE_API_TOKEN` from `.sluice/dev.env`, for whichever is unset.
fn dev_env_value(name: &str) -> Option<String> {
    let text = std::fs::read_to_string(".sluice/dev.env").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

fn read_spec_argument(spec: &str) -> anyhow::Result<String> {
    if spec == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else if let Some(path) = spec.strip_prefix('@') {
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {path}: {e}"))
    } else {
        Ok(spec.to_string())
    }
}

async fn enqueue(args: EnqueueArgs, output: Output) -> anyhow::Result<ExitCode> {
    let delay_ms = match &args.delay {
        Some(text) => Some(commands::parse_span_ms(text).ok_or_else(|| {
            anyhow::anyhow!(
                "--delay must be a span such as 250ms, 90s, 15m, 2h or 7d; got {text:?}"
            )
        })?),
        None => args.delay_ms,
    };
    let text = read_spec_argument(&args.spec)?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the spec is not valid JSON: {e}"))?;
    let mut request = match &value {
        Value::Object(map) if map.contains_key("spec") => value.clone(),
        Value::Object(_) => json!({ "spec": value }),
        _ => anyhow::bail!(
            "the spec must be a JSON object such as {{\"kind\":\"bash\",\"script\":\"echo hi\"}}"
        ),
    };
    let fields = [
        ("queue", args.queue.map(Value::from)),
        ("priority", args.priority.map(Value::from)),
        ("max_attempts", args.max_attempts.map(Value::from)),
        ("timeout_ms", args.timeout_ms.map(Value::from)),
        ("delay_ms", delay_ms.map(Value::from)),
        ("idempotency_key", args.idempotency_key.map(Value::from)),
    ];
    for (name, field) in fields {
        if let Some(field) = field {
            request[name] = field;
        }
    }
    let api_url = args
        .api_url
        .or_else(|| dev_env_value("SLUICE_API_URL"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "set SLUICE_API_URL (or run `sluice dev` here, which writes .sluice/dev.env)"
            )
        })?;
    let token = args
        .api_token
        .or_else(|| dev_env_value("SLUICE_API_TOKEN").map(Secret::new))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "set SLUICE_API_TOKEN (or run `sluice dev` here, which writes .sluice/dev.env)"
            )
        })?;
    let request: EnqueueRequest = serde_json::from_value(request)
        .map_err(|e| anyhow::anyhow!("the request is not a valid enqueue request: {e}"))?;
    let client = ApiClient::new(&api_url, token);
    let (created, _) = client.enqueue(&request).await.map_err(describe)?;
    if !args.wait {
        println!("{}", serde_json::to_string(&created)?);
        return Ok(ExitCode::SUCCESS);
    }
    let id = created.id;
    let progress = (!output.is_json()).then(|| Progress::start(format!("waiting for job {id}")));
    let job = client.wait_terminal(id).await.map_err(describe)?;
    drop(progress);
    let result = job.result.clone().unwrap_or(Value::Null);
    let exit_code = result.get("exit_code").and_then(Value::as_i64);
    let status = match (job.state, exit_code) {
        (JobState::Succeeded, _) => ExitCode::SUCCESS,
        (_, Some(code)) if (1..=255).contains(&code) => ExitCode::from(code as u8),
        _ => ExitCode::FAILURE,
    };
    if output.is_json() {
        Output::json(&job)?;
        return Ok(status);
    }
    if let Some(out) = result.get("stdout_tail").and_then(Value::as_str) {
        print!("{out}");
    }
    if let Some(err) = result.get("stderr_tail").and_then(Value::as_str) {
        eprint!("{err}");
    }
    if job.state != JobState::Succeeded {
        let error = job.error.clone().unwrap_or(Value::Null);
        eprintln!(
            "job {id} {} after {} attempt(s): {error}",
            job.state, job.attempt
        );
    }
    Ok(status)
}

fn describe(err: ClientError) -> anyhow::Error {
    // A definition's problems, one per line.
    if let ClientError::Api {
        details: Some(Value::Array(problems)),
        code,
        ..
    } = &err
    {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| {
                format!(
                    "  {}: {}",
                    p["at"].as_str().unwrap_or("?"),
                    p["message"].as_str().unwrap_or("?")
                )
            })
            .collect();
        return anyhow::anyhow!("{code}:\n{}", lines.join("\n"));
    }
    anyhow::anyhow!("{err}")
}

async fn workflows(
    command: WorkflowsCommand,
    api: ApiArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match command {
        WorkflowsCommand::Apply { file, name } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            let name = match name {
                Some(name) => name,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .ok_or_else(|| anyhow::anyhow!("name the workflow with --name"))?,
            };
            let (workflow, created) = client.put_workflow(&name, text).await.map_err(describe)?;
            if output.is_json() {
                Output::json(&workflow)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "workflow {} version {} ({} steps){}",
                workflow.name,
                workflow.version,
                workflow.steps,
                if created { "" } else { ", unchanged" }
            );
        }
        WorkflowsCommand::List => {
            let list = client.workflows().await.map_err(describe)?;
            if output.is_json() {
                Output::json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            for workflow in list.workflows {
                println!(
                    "{}\t{}\t{} steps\t{}",
                    workflow.name, workflow.version, workflow.steps, workflow.registered_at
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn jobs(command: JobsCommand, api: ApiArgs, output: Output) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    let result = match command {
        JobsCommand::Ls {
            queue,
            state,
            since,
            limit,
        } => {
            let filter = commands::ListFilter {
                queue,
                state,
                since,
                limit,
            };
            commands::list(&client, output, filter).await
        }
        JobsCommand::Show { id } => commands::show(&client, output, JobId(id)).await,
        JobsCommand::Cancel { id } => commands::change(&client, output, JobId(id), true).await,
        JobsCommand::Retry { id: Some(id), .. } => {
            commands::change(&client, output, JobId(id), false).await
        }
        JobsCommand::Retry {
            id: None,
            queue,
            state,
            since,
            limit,
            all,
        } => {
            if queue.is_none() && state.is_none() && since.is_none() && !all {
                anyhow::bail!(
                    "name a job to retry, or filters for many (--queue, --state, --since), or --all"
                );
            }
            let state = state
                .map(|s| {
                    JobState::parse(&s)
                        .filter(|s| matches!(s, JobState::Failed | JobState::Cancelled))
                        .ok_or_else(|| anyhow::anyhow!("--state must be failed or cancelled"))
                })
                .transpose()?;
            commands::retry_many(&client, output, queue, state, since, limit, all).await
        }
    };
    result.map_err(describe_any)
}

async fn queues(command: QueuesCommand, api: ApiArgs, output: Output) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    let result = match command {
        QueuesCommand::Ls => commands::queues(&client, output).await,
        QueuesCommand::Pause { name } => commands::pause(&client, output, &name, true).await,
        QueuesCommand::Resume { name } => commands::pause(&client, output, &name, false).await,
    };
    result.map_err(describe_any)
}

/// [`describe`] for errors that may hold a client error.
fn describe_any(err: anyhow::Error) -> anyhow::Error {
    match err.downcast::<ClientError>() {
        Ok(err) => describe(err),
        Err(err) => err,
    }
}

/// `sluice runners ls`: a table of the runners.
async fn runners(
    command: RunnersCommand,
    api: ApiArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match command {
        RunnersCommand::Ls => {
            let list = client.runners().await.map_err(describe)?;
            if output.is_json() {
                Output::json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("POD\tSTATE\tSLOTS\tVERSION\tLAST SEEN\tID");
            for runner in list.runners {
                println!(
                    "{}\t{}\t{}/{}\t{}\t{}\t{}",
                    runner.pod_name,
                    runner.state,
                    runner.slots_in_use,
                    runner.slots,
                    if runner.version.is_empty() {
                        "-"
                    } else {
                        &runner.version
                    },
                    runner
                        .last_seen_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    runner.id
                );
            }
            for pool in list.pools {
                println!(
                    "pool {}: {} backend, {}-{} runners, run by {}{}",
                    pool.name,
                    pool.backend,
                    pool.min_warm,
                    pool.max_warm,
                    pool.holder,
                    match (&pool.last_error, pool.retry_at) {
                        (Some(error), Some(at)) => format!(
                            "; last error: {error} (starts retried from {})",
                            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                        (Some(error), None) => format!("; last error: {error}"),
                        _ => String::new(),
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice artifacts RUN STEP [-o FILE]`: the archive streamed to a file (removed again when
/// the download fails) or to stdout.
async fn artifacts(args: ArtifactsArgs, output: Output) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let to_stdout = args.file.as_deref() == Some(std::path::Path::new("-"));
    if to_stdout {
        let mut out = std::io::stdout().lock();
        client
            .download_artifacts(args.run, &args.step, &mut out)
            .await
            .map_err(describe)?;
        return Ok(ExitCode::SUCCESS);
    }
    let path = args
        .file
        .unwrap_or_else(|| PathBuf::from(format!("{}.tar", args.step)));
    let file = std::fs::File::create(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let downloaded = client
        .download_artifacts(args.run, &args.step, &mut out)
        .await
        .map_err(describe)
        .and_then(|done| {
            use std::io::Write;
            out.flush()?;
            Ok(done)
        });
    match downloaded {
        Ok((bytes, sha256)) if output.is_json() => {
            Output::json(&json!({"file": path, "bytes": bytes, "sha256": sha256}))?;
            Ok(ExitCode::SUCCESS)
        }
        Ok((bytes, sha256)) => {
            println!("{}: {bytes} bytes, sha256 {sha256}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            drop(out);
            let _ = std::fs::remove_file(&path);
            Err(err)
        }
    }
}

async fn schedules(
    command: SchedulesCommand,
    api: ApiArgs,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    let schedule = match command {
        SchedulesCommand::Set(args) => {
            let request = ScheduleRequest {
                input: args.input.as_deref().map(read_json_argument).transpose()?,
                cron: args.cron,
                timezone: args.timezone,
                workflow: args.workflow,
                overlap: args.overlap,
                catch_up: args.catch_up,
                catch_up_window_ms: args.catch_up_window_ms,
                paused: args.paused.then_some(true),
            };
            let (schedule, created) = client
                .put_schedule(&args.name, &request)
                .await
                .map_err(describe)?;
            if output.is_json() {
                Output::json(&schedule)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "schedule {} {}",
                schedule.name,
                if created { "created" } else { "replaced" }
            );
            schedule
        }
        SchedulesCommand::List => {
            let list = client.schedules().await.map_err(describe)?;
            if output.is_json() {
                Output::json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            for schedule in list.schedules {
                let next = match schedule.next_ticks.first() {
                    Some(next) => next.to_rfc3339(),
                    None if schedule.paused => "paused".to_string(),
                    None => "never".to_string(),
                };
                println!(
                    "{}\t{}\t{}\t{}\tnext {next}",
                    schedule.name, schedule.cron, schedule.timezone, schedule.workflow
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        SchedulesCommand::Get { name } => client.get_schedule(&name).await.map_err(describe)?,
        SchedulesCommand::Pause { name } => client
            .set_schedule_paused(&name, true)
            .await
            .map_err(describe)?,
        SchedulesCommand::Resume { name } => client
            .set_schedule_paused(&name, false)
            .await
            .map_err(describe)?,
        SchedulesCommand::Delete { name } => {
            client.delete_schedule(&name).await.map_err(describe)?;
            if output.is_json() {
                Output::json(&json!({ "name": name, "deleted": true }))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("schedule {name} deleted");
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{}", serde_json::to_string_pretty(&schedule)?);
    Ok(ExitCode::SUCCESS)
}

/// A JSON argument given inline, as `-` (stdin) or as `@file`.
fn read_json_argument(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(&read_spec_argument(text)?)
        .map_err(|e| anyhow::anyhow!("the input is not valid JSON: {e}"))
}

async fn run(args: RunArgs, output: Output) -> anyhow::Result<ExitCode> {
    let input = args.input.as_deref().map(read_json_argument).transpose()?;
    let client = args.api.client()?;
    let request = RunRequest {
        workflow: WorkflowRef::Name(args.workflow),
        input,
        version: args.version,
    };
    let started = client.start_run(&request).await.map_err(describe)?;
    if !args.wait {
        println!("{}", serde_json::to_string(&started)?);
        return Ok(ExitCode::SUCCESS);
    }
    let run = if output.is_json() {
        let run = sluice_cli::runs::follow(&client, started.run_id, |_| {})
            .await
            .map_err(describe)?;
        Output::json(&run)?;
        run
    } else {
        println!(
            "[run {}] {} version {}",
            started.run_id, started.workflow, started.version
        );
        sluice_cli::runs::follow(&client, started.run_id, |line| println!("{line}"))
            .await
            .map_err(describe)?
    };
    Ok(if run.state == RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks (a global flag clashing with a command's, say), which
    /// otherwise fire only when the clashing command runs.
    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
