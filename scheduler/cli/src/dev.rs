//! `sluice dev`: everything on one machine with one command.
//!
//! Starts (or reuses) a private Postgres cluster under `.sluice/`, applies the migrations, runs
//! the scheduler in-process and two `sluice-runner` child processes, writes `.sluice/dev.env`,
//! enqueues the example job and prints its events, then serves until Ctrl-C or SIGTERM, when
//! it stops the runners, the scheduler and Postgres, in that order.
//!
//! The cluster and the runners are started from the main thread with a parent-death signal,
//! so even a `kill -9` of `sluice dev` leaves nothing running.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sluice_protocol::{JobId, JobState};

use sluice::config::ServeConfig;
use sluice::server::Server;
use sluice::service::lifecycle::LeaseTimings;
use sluice::store::{self, events, jobs};
use sluice::{Error, Result};
use sluice_protocol::api::{RunRequest, WorkflowRef};
use sluice_protocol::Secret;

use crate::client::{ApiClient, ClientError};
use crate::cluster::{data_dir_for, Cluster, ClusterConfig};
use crate::provision::{provision_app_database, APP_DATABASE, APP_ROLE};

/// The example job `sluice dev` runs first.
pub const EXAMPLE_JOB: &str = include_str!("../../../examples/hello.json");
/// The example workflow it runs next.
pub const EXAMPLE_WORKFLOW: &str = include_str!("../../../examples/pipeline.yaml");

/// Options of `sluice dev`.
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// State directory (`.sluice`): cluster, `dev.env`, runner workspaces, logs.
    pub dir: PathBuf,
    /// Use this server instead of a private cluster.
    pub database_url: Option<Secret>,
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    pub runners: u32,
    /// Enqueue the example job and print its events.
    pub run_example: bool,
    pub timings: LeaseTimings,
}

/// Runs `sluice dev` to completion (until a signal). Call from the main thread, before any
/// async runtime exists: the cluster and the runners use this thread as their parent.
pub fn run(config: DevConfig) -> Result<()> {
    fs::create_dir_all(&config.dir)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", config.dir.display())))?;
    let dir = std::path::absolute(&config.dir).unwrap_or_else(|_| config.dir.clone());
    let started = Instant::now();

    let mut cluster = None;
    // With a private cluster: the superuser's URL, to set up the scheduler's role.
    let mut provision = None;
    let database_url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            let data_dir = data_dir_for(&dir.join("pg").join("data"))?;
            let credentials = ClusterCredentials::load_or_create(&dir.join("postgres.env"))?;
            println!("starting Postgres in {}", data_dir.display());
            let started_cluster = Cluster::start(&ClusterConfig {
                data_dir,
                port: 0,
                durable: true,
                settings: Vec::new(),
                superuser_password: credentials.superuser.clone(),
                reset_password: credentials.created,
            })?;
            let url =
                Secret::new(started_cluster.role_url(APP_ROLE, &credentials.app, APP_DATABASE));
            provision = Some((
                Secret::new(started_cluster.url("postgres")),
                Secret::new(started_cluster.url(APP_DATABASE)),
                credentials.app,
            ));
            cluster = Some(started_cluster);
            url
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let outcome = runtime.block_on(async {
        if let Some((superuser, superuser_in_app_db, password)) = &provision {
            provision_app_database(superuser, superuser_in_app_db, password).await?;
        }
        serve_dev(&config, &dir, database_url, started).await
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Some(mut cluster) = cluster {
        cluster.stop();
        println!("Postgres stopped");
    }
    outcome
}

async fn serve_dev(
    config: &DevConfig,
    dir: &Path,
    database_url: Secret,
    started: Instant,
) -> Result<()> {
    let env_path = dir.join("dev.env");
    let api_token = previous_token(&env_path).unwrap_or_else(|| Secret::generate("sk_"));
    let runner_secret = Secret::generate("srs_");

    let mut serve = ServeConfig::new(
        database_url.clone(),
        api_token.clone(),
        runner_secret.clone(),
    );
    serve.listen = config.listen;
    serve.internal_listen = config.internal_listen;
    serve.timings = config.timings;
    let server = match Server::start(serve.clone()).await {
        Ok(server) => server,
        Err(Error::Invalid { field, reason }) if field.ends_with("LISTEN") => {
            println!("note: {reason}; using free ports instead");
            serve.listen.set_port(0);
            serve.internal_listen.set_port(0);
            Server::start(serve).await?
        }
        Err(err) => return Err(err),
    };
    let api_url = format!("http://{}", server.api_addr);
    let internal_url = format!("http://{}", server.internal_addr);

    write_env_file(&env_path, database_url.expose(), &api_url, &api_token)?;

    let runner_binary = match find_runner_binary() {
        Ok(path) => path,
        Err(err) => {
            server.shutdown().await;
            return Err(err);
        }
    };
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| Error::Internal(e.to_string()))?;
    let mut runners = Vec::new();
    for n in 1..=config.runners {
        let launch = RunnerLaunch {
            binary: &runner_binary,
            name: format!("dev-runner-{n}"),
            workdir: dir.join("runners").join(n.to_string()),
            log: logs.join(format!("runner-{n}.log")),
            internal_url: &internal_url,
            secret: &runner_secret,
            slots: 4,
        };
        match spawn_runner(&launch) {
            Ok(child) => {
                println!(
                    "runner dev-runner-{n} pid {} (log: {})",
                    child.id(),
                    logs.join(format!("runner-{n}.log")).display()
                );
                runners.push(child);
            }
            Err(err) => {
                stop_runners(&mut runners).await;
                server.shutdown().await;
                return Err(err);
            }
        }
    }

    print_banner(
        &api_url,
        &api_token,
        &masked_password(database_url.expose()),
        &env_path,
    );
    println!("{}", agent_steps_note());

    let pool = store::pool(
        store::connect_options(database_url.expose())?,
        &store::PoolConfig::default(),
    );
    let example = async {
        if config.run_example {
            if let Err(err) = run_example(&pool, started).await {
                println!("example job: {err}");
            }
            let client = ApiClient::new(&api_url, api_token.clone());
            if let Err(err) = run_example_workflow(&client).await {
                println!("example workflow: {err}");
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = example => {}
        signal = shutdown_signal() => println!("\n{signal}: shutting down"),
    }

    stop_runners(&mut runners).await;
    println!("runners stopped");
    pool.close().await;
    server.shutdown().await;
    println!("scheduler stopped");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// The private cluster's passwords, kept in `.sluice/postgres.env` (mode 0600): the
/// superuser's (never used by the scheduler) and the scheduler role's.
struct ClusterCredentials {
    superuser: Secret,
    app: Secret,
    /// Made just now: the cluster may hold another superuser password, set it again.
    created: bool,
}

impl ClusterCredentials {
    fn load_or_create(path: &Path) -> Result<ClusterCredentials> {
        let text = fs::read_to_string(path).unwrap_or_default();
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|v| Secret::new(v.trim()))
                .filter(|v| !v.expose().is_empty())
        };
        if let (Some(superuser), Some(app)) = (
            value("SLUICE_PG_SUPERUSER_PASSWORD="),
            value("SLUICE_PG_PASSWORD="),
        ) {
            return Ok(ClusterCredentials {
                superuser,
                app,
                created: false,
            });
        }
        let credentials = ClusterCredentials {
            superuser: Secret::generate("pgsu_"),
            app: Secret::generate("pg_"),
            created: true,
        };
        let text = format!(
            "# The private cluster's passwords (sluice dev); keep this file to yourself.\nSLUICE_PG_SUPERUSER_PASSWORD={}\nSLUICE_PG_PASSWORD={}\n",
            credentials.superuser.expose(),
            credentials.app.expose()
        );
        write_private_file(path, &text)?;
        Ok(credentials)
    }
}

/// Writes `text` to `path`, readable by its owner only from the first byte on.
fn write_private_file(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(text.as_bytes()))
        .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
}

/// Keeps the API token stable across restarts, so a saved `dev.env` stays valid.
fn previous_token(env_path: &Path) -> Option<Secret> {
    let text = fs::read_to_string(env_path).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("SLUICE_API_TOKEN="))
        .map(|token| Secret::new(token.trim()))
        .filter(|token| !token.expose().is_empty())
}

fn write_env_file(path: &Path, database_url: &str, api_url: &str, token: &Secret) -> Result<()> {
    let text = format!(
        "DATABASE_URL={database_url}\nSLUICE_API_URL={api_url}\nSLUICE_API_TOKEN={}\n",
        token.expose()
    );
    write_private_file(path, &text)
}

/// `sluice-runner` next to this executable, else on PATH. Started through `cargo run`, which
/// builds only this binary, build the runner first with the same profile.
pub fn find_runner_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(e.to_string()))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = dir.join("sluice-runner");
    if let Some(cargo) = std::env::var_os("CARGO") {
        if dir.ends_with("target/release") || dir.ends_with("target/debug") {
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "sluice-runner"]);
            if dir.ends_with("target/release") {
                build.arg("--release");
            }
            println!("building sluice-runner …");
            let status = build
                .status()
                .map_err(|e| Error::Internal(format!("running cargo build: {e}")))?;
            if !status.success() {
                return Err(Error::Internal(
                    "`cargo build -p sluice-runner` failed".into(),
                ));
            }
        }
    }
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("sluice-runner");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(Error::Setup(format!(
        "sluice-runner was not found next to {} or on PATH; build it with `cargo build --release -p sluice-runner`",
        exe.display()
    )))
}

/// How to start one local `sluice-runner`.
pub struct RunnerLaunch<'a> {
    pub binary: &'a Path,
    pub name: String,
    pub workdir: PathBuf,
    pub log: PathBuf,
    pub internal_url: &'a str,
    pub secret: &'a Secret,
    pub slots: u32,
}

/// Starts a local sidecar with a parent-death signal. Call from a thread that outlives it.
pub fn spawn_runner(launch: &RunnerLaunch<'_>) -> Result<Child> {
    let log = fs::File::create(&launch.log).map_err(|e| Error::Internal(e.to_string()))?;
    let mut command = Command::new(launch.binary);
    // The sidecar gets what it needs and nothing else: no DATABASE_URL, no API token.
    command.env_clear();
    // The Anthropic variables enable agent steps; the sidecar keeps them from its tools.
    for name in [
        "PATH",
        "HOME",
        "TMPDIR",
        "RUST_LOG",
        "LANG",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "SLUICE_AGENT_MODEL",
    ] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
        .env("SLUICE_API_URL", launch.internal_url)
        .env("RUNNER_POD_NAME", &launch.name)
        .env("SLUICE_RUNNER_SECRET", launch.secret.expose())
        .env("SLUICE_RUNNER_WORKDIR", &launch.workdir)
        .env("SLUICE_RUNNER_SLOTS", launch.slots.to_string())
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Error::Internal(e.to_string()))?,
        )
        .stderr(log);
    // The runners drain when `sluice dev` dies (the spawning thread is its main thread).
    sluice_sandbox::die_with_parent(&mut command, Signal::SIGTERM);
    command
        .spawn()
        .map_err(|e| Error::Internal(format!("starting {}: {e}", launch.binary.display())))
}

/// SIGTERM (the runners drain), then SIGKILL whatever is left after 10 s.
pub async fn stop_runners(runners: &mut Vec<Child>) {
    for child in runners.iter() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in runners.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    runners.clear();
}

/// Whether the runners can run agent steps, and how to enable them when they cannot.
pub fn agent_steps_note() -> String {
    match std::env::var("ANTHROPIC_API_KEY") {
        Ok(key) if !key.trim().is_empty() => {
            "  agent steps: enabled (ANTHROPIC_API_KEY is set; try examples/coding.yaml)".into()
        }
        _ => "  agent steps: not enabled; start `sluice dev` with ANTHROPIC_API_KEY set (and \
              ANTHROPIC_BASE_URL for another endpoint) to run {\"kind\":\"agent\"} jobs; \
              without it they fail with error code \"configuration\""
            .into(),
    }
}

/// `url` with its password shown as `***` (the whole URL is in `dev.env`).
fn masked_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn print_banner(api_url: &str, token: &Secret, database_url: &str, env_path: &Path) {
    let token = token.expose();
    println!(
        "\nsluice dev is running\n\
         \n  API:      {api_url}\
         \n  token:    {token}\
         \n  database: {database_url} (the password is in the env file)\
         \n  env file: {env} (source it: set -a; . {env}; set +a)\
         \n\
         \n  curl -H \"Authorization: Bearer {token}\" -d '{{\"spec\":{{\"kind\":\"bash\",\"script\":\"echo hi\"}}}}' {api_url}/api/jobs\
         \n  psql \"$DATABASE_URL\" -c \"INSERT INTO sluice.jobs (queue, spec) VALUES ('default', '{{\\\"kind\\\":\\\"bash\\\",\\\"script\\\":\\\"echo hello\\\"}}')\"\
         \n\nCtrl-C stops everything.\n",
        env = env_path.display(),
    );
}

/// Enqueues the example job and prints its events until it ends.
async fn run_example(pool: &sqlx::PgPool, started: Instant) -> Result<()> {
    let spec: Value = serde_json::from_str(EXAMPLE_JOB)
        .map_err(|e| Error::Internal(format!("examples/hello.json: {e}")))?;
    let job = jobs::NewJob {
        queue: "default".into(),
        spec,
        ..Default::default()
    };
    let enqueued = jobs::insert_many(pool, std::slice::from_ref(&job)).await?;
    let id = enqueued[0].id;
    println!("example job {id} enqueued");
    let mut position = 0;
    let mut pause = Duration::from_millis(10);
    loop {
        let batch = events::list_after(pool, id, position, 500).await?;
        for event in &batch {
            position = position.max(event.position);
            print_event(id, event);
        }
        let view = jobs::get(pool, id).await?.ok_or(Error::NotFound("job"))?;
        let state = JobState::parse(&view.state).unwrap_or(JobState::Running);
        if state.is_terminal() && batch.is_empty() {
            println!(
                "example job {id} {state} after {:.2?} from start; result: {}",
                started.elapsed(),
                view.result.unwrap_or(Value::Null)
            );
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Registers `examples/pipeline.yaml` and follows one run of it.
async fn run_example_workflow(client: &ApiClient) -> std::result::Result<(), ClientError> {
    let started = Instant::now();
    let (workflow, _) = client
        .put_workflow("pipeline", EXAMPLE_WORKFLOW.to_string())
        .await?;
    let run = client
        .start_run(&RunRequest {
            workflow: WorkflowRef::Name(workflow.name),
            input: None,
            version: None,
        })
        .await?;
    println!(
        "example workflow run {} started (examples/pipeline.yaml)",
        run.run_id
    );
    let finished = crate::runs::follow(client, run.run_id, |line| println!("{line}")).await?;
    println!(
        "example workflow run {} {} after {:.2?}",
        run.run_id,
        format!("{:?}", finished.state).to_lowercase(),
        started.elapsed()
    );
    Ok(())
}

fn print_event(id: JobId, event: &events::StoredEvent) {
    match event.data.get("text").and_then(Value::as_str) {
        Some(text) => {
            for line in text.lines() {
                println!("[job {id} #{} {}] {line}", event.attempt, event.kind);
            }
        }
        None => println!(
            "[job {id} #{} {}] {}",
            event.attempt, event.kind, event.data
        ),
    }
}
