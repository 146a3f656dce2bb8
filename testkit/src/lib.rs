//! sluice's integration harness: real parts, started per test.
//!
//! # Layout
//!
//! - [`TestDb`] — a fresh database per test, created from a migrated template in one private
//!   Postgres cluster per test process (the system's binaries; as root, run as `postgres`).
//! - [`Scheduler`] / [`Runner`] — `sluice serve` and `sluice-runner` as real child processes,
//!   killed when dropped; their logs are printed when a test fails.
//! - [`FakeRunner`] — the test itself speaking the runner protocol over HTTP, to create exact
//!   interleavings (a stale complete, many concurrent claimers).
//! - [`wait_until`] — poll a condition with a deadline instead of sleeping.
//! - [`proxy`] — a TCP fault proxy (cut, or drop responses) between sidecars and scheduler.
//! - [`anthropic`] — a fake Anthropic Messages API for the agent step.
//! - [`kube`] — a fake Kubernetes API server whose fake kubelet runs real `sluice-runner`s.
//!
//! Binaries are found next to the test executable's `target/<profile>/` (override with
//! `SLUICE_BIN_DIR`); `cargo test --workspace` builds them.

#![forbid(unsafe_code)]

pub mod anthropic;
pub mod kube;
pub mod procs;
pub mod proxy;
pub mod sse;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_cli::cluster::{Cluster, ClusterConfig};
use sluice_protocol as protocol;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Polls `check` every 10 ms until it returns `Some`, or panics after `timeout` naming `what`
/// and the last value seen.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    match poll_until(timeout, check).await {
        Ok(value) => value,
        Err(last) => panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}"),
    }
}

/// Polls `check` every 10 ms until it returns `Some`; after `timeout`, the last thing it
/// reported (for tests where "never happened" is an outcome, not a failure).
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let mut last = String::from("nothing yet");
    loop {
        ticks.tick().await;
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(seen) => last = seen,
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
    }
}

struct SharedCluster {
    port: u16,
    /// The superuser's password (tests poke at the database as the superuser).
    superuser_password: String,
    /// The password of the role schedulers log in as (`sluice`, owner of each test database).
    app_password: String,
    /// The server's log.
    log_path: PathBuf,
    control: std::sync::Mutex<std::sync::mpsc::Sender<ClusterCommand>>,
}

/// The role schedulers under test log in as: it owns the test databases and nothing more.
pub const APP_ROLE: &str = "sluice";

/// Orders for the thread that owns the cluster (the postmaster's parent).
enum ClusterCommand {
    Stop(std::sync::mpsc::Sender<Result<(), String>>),
    Start(std::sync::mpsc::Sender<Result<(), String>>),
}

static CLUSTER: OnceLock<Result<SharedCluster, String>> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The process's private cluster, started on first use from a thread that lives until the
/// process exits (the postmaster's parent-death signal is tied to that thread).
fn shared_cluster() -> &'static SharedCluster {
    let result = CLUSTER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sluice-testkit-postgres".into())
            .spawn(move || {
                let (control, commands) = std::sync::mpsc::channel();
                match start_cluster() {
                    Ok((cluster, config, app_password)) => {
                        let shared = SharedCluster {
                            port: cluster.port(),
                            superuser_password: config.superuser_password.expose().to_string(),
                            app_password,
                            log_path: cluster.log_path().to_path_buf(),
                            control: std::sync::Mutex::new(control),
                        };
                        let _ = tx.send(Ok(shared));
                        // This thread owns the cluster (and is its parent) until exit.
                        let mut cluster = Some(cluster);
                        for command in commands {
                            match command {
                                ClusterCommand::Stop(done) => {
                                    if let Some(mut running) = cluster.take() {
                                        running.stop();
                                    }
                                    let _ = done.send(Ok(()));
                                }
                                ClusterCommand::Start(done) => {
                                    let result = match &cluster {
                                        Some(_) => Ok(()),
                                        None => Cluster::start(&config)
                                            .map(|started| cluster = Some(started))
                                            .map_err(|e| e.to_string()),
                                    };
                                    let _ = done.send(result);
                                }
                            }
                        }
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err));
                    }
                }
            })
            .expect("spawn the postgres thread");
        rx.recv()
            .unwrap_or_else(|_| Err("the postgres thread died".into()))
    });
    match result {
        Ok(shared) => shared,
        Err(err) => panic!("cannot start the test Postgres cluster: {err}"),
    }
}

fn sweep_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("sluice-testkit-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if procs::Process::read(pid).is_none() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn control_cluster(make: fn(std::sync::mpsc::Sender<Result<(), String>>) -> ClusterCommand) {
    let (done, result) = std::sync::mpsc::channel();
    shared_cluster()
        .control
        .lock()
        .expect("cluster control")
        .send(make(done))
        .expect("the postgres thread is alive");
    result
        .recv()
        .expect("the postgres thread answers")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// This test process's Postgres log from byte `from` on (lossy UTF-8), and its length: read
/// the length before a scenario, the text after it.
pub fn postgres_log(from: u64) -> (String, u64) {
    let bytes = std::fs::read(&shared_cluster().log_path).unwrap_or_default();
    let start = (from as usize).min(bytes.len());
    (
        String::from_utf8_lossy(&bytes[start..]).into_owned(),
        bytes.len() as u64,
    )
}

/// Stops this test process's Postgres (fast shutdown), for outage tests. Every test in the
/// same binary shares the cluster: keep outage tests in a test file of their own.
pub fn stop_postgres() {
    control_cluster(ClusterCommand::Stop);
}

/// Starts this test process's Postgres again on the same port and data; returns once it
/// accepts connections.
pub fn start_postgres() {
    control_cluster(ClusterCommand::Start);
}

fn start_cluster() -> Result<(Cluster, ClusterConfig, String), String> {
    let tmp = std::env::temp_dir();
    sweep_stale_dirs(&tmp);
    let base_dir = tmp.join(format!(
        "sluice-testkit-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&base_dir).map_err(|e| e.to_string())?;
    let mut config = ClusterConfig {
        data_dir: base_dir.join("data"),
        port: 0,
        durable: false,
        // RELIABILITY.md's lab settings (lock waits are logged by default, see Cluster).
        settings: vec![
            ("max_connections".into(), "400".into()),
            ("deadlock_timeout".into(), "1s".into()),
        ],
        superuser_password: sluice::secret::Secret::generate("pgsu_"),
        reset_password: false,
    };
    let cluster = Cluster::start(&config).map_err(|e| e.to_string())?;
    config.port = cluster.port();
    let app_password = sluice::secret::Secret::generate("pg_");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let admin = PgPool::connect(&cluster.url("postgres"))
            .await
            .map_err(|e| e.to_string())?;
        sluice_cli::store::provision::ensure_role(&admin, APP_ROLE, &app_password)
            .await
            .map_err(|e| e.to_string())?;
        sluice_cli::store::provision::ensure_database(&admin, "sluice_template", APP_ROLE)
            .await
            .map_err(|e| e.to_string())?;
        admin.close().await;
        // Migrated by the role that will own every test database's objects.
        let template =
            PgPool::connect(&cluster.role_url(APP_ROLE, &app_password, "sluice_template"))
                .await
                .map_err(|e| e.to_string())?;
        sluice::store::migrate(&template)
            .await
            .map_err(|e| e.to_string())?;
        template.close().await;
        Ok::<_, String>(())
    })?;
    Ok((cluster, config, app_password.expose().to_string()))
}

/// A fresh, migrated database of its own for one test.
pub struct TestDb {
    pub name: String,
    /// The URL schedulers under test get: the database's owner, not a superuser.
    pub url: String,
    /// The same database as the superuser, for a test's own checks and pokes.
    pub superuser_url: String,
    /// A pool of superuser connections to it.
    pub pool: PgPool,
}

impl TestDb {
    /// Creates the database from the migrated template (a file copy: milliseconds).
    pub async fn new() -> TestDb {
        TestDb::create("sluice_template").await
    }

    /// An empty database without sluice's schema, for tests of the migrations themselves.
    pub async fn unmigrated() -> TestDb {
        TestDb::create("template0").await
    }

    async fn create(template: &str) -> TestDb {
        let cluster = shared_cluster();
        let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t_{}_{n}", std::process::id());
        let superuser = |database: &str| {
            format!(
                "postgres://postgres:{}@127.0.0.1:{}/{database}",
                cluster.superuser_password, cluster.port
            )
        };
        let admin = PgPool::connect(&superuser("postgres"))
            .await
            .expect("connect to the test cluster");
        // Identifiers cannot be bound; this name is built from two integers above, and the
        // template is one of two constants.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {template} OWNER {APP_ROLE}"
        )))
        .execute(&admin)
        .await
        .expect("create the test database");
        admin.close().await;
        let url = format!(
            "postgres://{APP_ROLE}:{}@127.0.0.1:{}/{name}",
            cluster.app_password, cluster.port
        );
        let superuser_url = superuser(&name);
        let pool = PgPool::connect(&superuser_url)
            .await
            .expect("connect to the test database");
        TestDb {
            name,
            url,
            superuser_url,
            pool,
        }
    }

    /// The cluster's port.
    pub fn port(&self) -> u16 {
        shared_cluster().port
    }

    /// Counts rows of a query returning one bigint.
    pub async fn count(&self, sql: &'static str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        n
    }
}

/// The path of one of the workspace's binaries (`sluice`, `sluice-runner`): next to the test
/// executable's `target/<profile>/`, or in `SLUICE_BIN_DIR`.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("SLUICE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            // target/<profile>/deps/<test> → target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("test executable in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo test --workspace` does), or set SLUICE_BIN_DIR",
        path.display()
    );
    path
}

/// Live processes that have `name` in their environment (see [`procs`]).
pub fn processes_with_env(name: &str) -> Vec<i32> {
    procs::with_env(name)
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "sluice-test-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// A new directory every user may write in (sticky, like /tmp): for ledgers that tools,
    /// which run as unprivileged per-slot users under a root sidecar, append to. Create the
    /// files they share with [`TempDir::shared_file`].
    pub fn shared(label: &str) -> TempDir {
        // Tools get a private /tmp, /var/tmp, /dev/shm and /run (when the sidecar may create
        // mount namespaces, i.e. as root), so a directory both the test and its tools see
        // lives elsewhere: under /var/lib when root.
        let base = Path::new("/var/lib/sluice-testkit");
        let dir =
            if nix::unistd::Uid::effective().is_root() && std::fs::create_dir_all(base).is_ok() {
                let path = base.join(format!("{label}-{}", uuid::Uuid::new_v4().simple()));
                std::fs::create_dir_all(&path).expect("create shared dir");
                TempDir(path)
            } else {
                TempDir::new(label)
            };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod shared temp dir");
        dir
    }

    /// An empty file in this directory that every user may append to (tools of different
    /// slots run as different users).
    pub fn shared_file(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(name);
        std::fs::File::create(&path).expect("create shared file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .expect("chmod shared file");
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lease timings for a scheduler under test.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub reaper_interval_ms: u64,
}

impl Timings {
    /// RELIABILITY.md's test profile: heartbeat 1 s, lease 5 s, reaper 1 s.
    pub const TEST: Timings = Timings {
        heartbeat_ms: 1000,
        lease_ms: 5000,
        reaper_interval_ms: 1000,
    };
    /// Short leases for tests that wait for a reclaim.
    pub const FAST: Timings = Timings {
        heartbeat_ms: 200,
        lease_ms: 1000,
        reaper_interval_ms: 100,
    };
}

/// Kills the child when the thread that started it (the test's) ends, even if the test
/// process itself is killed before `Drop` runs.
fn die_with_test(command: &mut Command) {
    sluice_sandbox::die_with_parent(command.as_std_mut(), nix::sys::signal::Signal::SIGKILL);
}

/// A child process whose stderr goes to a log file, printed if the test fails.
struct Proc {
    child: Child,
    label: String,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("---- {} log (last lines) ----", self.label);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `sluice serve` as a child process.
pub struct Scheduler {
    proc: Proc,
    pub api_url: String,
    pub internal_url: String,
    pub api_token: String,
    pub runner_secret: String,
    pub timings: Timings,
    /// What it was started with, to start it again the same way.
    settings: ServeSettings,
    _logs: TempDir,
}

struct ServeSettings {
    api_token: String,
    runner_secret: String,
    timings: Timings,
    database_url: String,
    extra_env: Vec<(String, String)>,
    log: PathBuf,
}

impl ServeSettings {
    /// Starts `sluice serve` on these addresses and waits until it listens.
    async fn spawn(&self, listen: &str, internal_listen: &str) -> (Proc, String, String) {
        let timings = self.timings;
        let mut command = Command::new(bin("sluice"));
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,sqlx=warn")
            .env("DATABASE_URL", &self.database_url)
            .env("SLUICE_LISTEN", listen)
            .env("SLUICE_INTERNAL_LISTEN", internal_listen)
            .env("SLUICE_API_TOKEN", &self.api_token)
            .env("SLUICE_RUNNER_SECRET", &self.runner_secret)
            .env("SLUICE_HEARTBEAT_MS", timings.heartbeat_ms.to_string())
            .env("SLUICE_LEASE_MS", timings.lease_ms.to_string())
            .env(
                "SLUICE_REAPER_INTERVAL_MS",
                timings.reaper_interval_ms.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("log file"),
            )
            .kill_on_drop(true);
        for (name, value) in &self.extra_env {
            command.env(name, value);
        }
        die_with_test(&mut command);
        let mut child = command.spawn().expect("start sluice serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let proc = Proc {
            child,
            label: "scheduler".into(),
            log: self.log.clone(),
        };
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("scheduler did not start listening within 30 s")
            .expect("read scheduler stdout")
            .expect("scheduler exited before listening");
        // Keep draining stdout so the scheduler never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (mut api_url, mut internal_url) = (String::new(), String::new());
        for part in line.split_whitespace() {
            if let Some(url) = part.strip_prefix("api=") {
                api_url = url.to_string();
            } else if let Some(url) = part.strip_prefix("internal=") {
                internal_url = url.to_string();
            }
        }
        assert!(
            api_url.starts_with("http://") && internal_url.starts_with("http://"),
            "unexpected first line from sluice serve: {line}"
        );
        (proc, api_url, internal_url)
    }
}

impl Scheduler {
    /// Starts a scheduler on free ports against `db` and waits until it listens.
    pub async fn start(db: &TestDb, timings: Timings) -> Scheduler {
        Scheduler::start_with(db, timings, &[]).await
    }

    /// [`Scheduler::start`] with `extra_env` on top of the test settings.
    pub async fn start_with(
        db: &TestDb,
        timings: Timings,
        extra_env: &[(&str, &str)],
    ) -> Scheduler {
        let logs = TempDir::new("scheduler");
        let settings = ServeSettings {
            api_token: format!("test-api-{}", uuid::Uuid::new_v4().simple()),
            runner_secret: format!("test-runner-{}", uuid::Uuid::new_v4().simple()),
            timings,
            database_url: db.url.clone(),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: logs.path().join("scheduler.log"),
        };
        let (proc, api_url, internal_url) = settings.spawn("127.0.0.1:0", "127.0.0.1:0").await;
        // A secret given in `extra_env` is the one it runs with.
        let runner_secret = extra_env
            .iter()
            .find(|(k, _)| *k == "SLUICE_RUNNER_SECRET")
            .map_or(settings.runner_secret.clone(), |(_, v)| v.to_string());
        Scheduler {
            proc,
            api_url,
            internal_url,
            api_token: settings.api_token.clone(),
            runner_secret,
            timings,
            settings,
            _logs: logs,
        }
    }

    /// SIGKILL: no shutdown of any kind.
    pub async fn kill(&mut self) {
        let _ = self.proc.child.kill().await;
    }

    /// SIGKILL (no shutdown of any kind), then the same scheduler again: the same ports,
    /// token and secret, so its runners and clients carry on against it.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.proc.child.kill().await;
        let api = self.api_url.trim_start_matches("http://");
        let internal = self.internal_url.trim_start_matches("http://");
        let (proc, api_url, internal_url) = self.settings.spawn(api, internal).await;
        (self.proc, self.api_url, self.internal_url) = (proc, api_url, internal_url);
    }

    /// A client of the public API with this scheduler's token.
    pub fn api(&self) -> Api {
        Api {
            base: self.api_url.clone(),
            token: self.api_token.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// Starts a `sluice-runner` against this scheduler.
    pub async fn runner(&self, pod_name: &str, slots: u32) -> Runner {
        Runner::start(self, pod_name, slots, &[]).await
    }

    /// The scheduler's process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.child.id()
    }

    /// What the scheduler has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }
}

/// `sluice-runner` as a child process.
pub struct Runner {
    proc: Proc,
    pub pod_name: String,
    pub workdir: TempDir,
    _logs: TempDir,
}

impl Runner {
    /// Starts a sidecar with `extra_env` on top of the scheduler's settings.
    pub async fn start(
        scheduler: &Scheduler,
        pod_name: &str,
        slots: u32,
        extra_env: &[(&str, &str)],
    ) -> Runner {
        Runner::start_wrapped(scheduler, pod_name, slots, extra_env, &[]).await
    }

    /// Starts the sidecar under a wrapper command, e.g. `["unshare", "-pf", "--kill-child",
    /// "--"]` (the sidecar as PID 1, killed with the wrapper) or `["runsc", "--rootless",
    /// "--network=host", "do"]` (under gVisor). The wrapper's environment is the sidecar's.
    pub async fn start_wrapped(
        scheduler: &Scheduler,
        pod_name: &str,
        slots: u32,
        extra_env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Runner {
        let logs = TempDir::new("runner-log");
        let workdir = TempDir::new("runner-work");
        let log = logs.path().join("runner.log");
        let sidecar = bin("sluice-runner");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&sidecar);
                command
            }
            None => Command::new(&sidecar),
        };
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("SLUICE_API_URL", &scheduler.internal_url)
            .env("RUNNER_POD_NAME", pod_name)
            .env("SLUICE_RUNNER_SECRET", &scheduler.runner_secret)
            .env("SLUICE_RUNNER_SLOTS", slots.to_string())
            .env("SLUICE_RUNNER_WORKDIR", workdir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        for (name, value) in extra_env {
            command.env(name, value);
        }
        die_with_test(&mut command);
        let child = command.spawn().expect("start sluice-runner");
        Runner {
            proc: Proc {
                child,
                label: format!("runner {pod_name}"),
                log,
            },
            pod_name: pod_name.to_string(),
            workdir,
            _logs: logs,
        }
    }

    /// The sidecar's process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.child.id()
    }

    /// What the sidecar has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.proc.child.kill().await;
    }

    /// Sends `signal` to the sidecar process only (not to its tools).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
                .expect("signal the sidecar");
        }
    }

    /// Waits for the sidecar to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.proc.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.pod_name))
            .expect("wait for the sidecar")
    }
}

/// A raw client of the public API that keeps status codes visible.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    /// POSTs `body` as JSON to `path` with the API token; returns status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(
            &self.http,
            &format!("{}{path}", self.base),
            &self.token,
            body,
        )
        .await
    }

    /// PUTs `body` as text (a YAML or JSON definition) to `path` with the API token.
    pub async fn put_text(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await
            .expect("PUT to the scheduler");
        decode(response).await
    }

    /// GETs `path` with the API token.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET from the scheduler");
        decode(response).await
    }

    /// GETs `path` with the API token; the raw answer (for downloads).
    pub async fn get_raw(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET from the scheduler");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("the body").to_vec();
        (status, headers, body)
    }

    /// DELETEs `path` with the API token.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("DELETE on the scheduler");
        decode(response).await
    }

    /// Registers workflow `name` from `definition` (YAML or JSON); panics unless 200 or 201.
    pub async fn register_workflow(&self, name: &str, definition: &str) {
        let (status, body) = self
            .put_text(
                &protocol::api::paths::workflow(name),
                definition.to_string(),
            )
            .await;
        assert!(
            status == 201 || status == 200,
            "register {name}: {status} {body}"
        );
    }

    /// Starts a run (`{"workflow": …, "input": …}`); panics unless 201. Returns its id.
    pub async fn start_run(&self, request: Value) -> i64 {
        let (status, body) = self
            .post(protocol::api::paths::WORKFLOWS_RUN, &request)
            .await;
        assert_eq!(status, 201, "start run: {body}");
        body["run_id"].as_i64().expect("run id")
    }

    /// Waits until run `id` has ended (at most `timeout`) and returns it.
    pub async fn run_finished(&self, id: i64, timeout: Duration) -> Value {
        wait_until(&format!("run {id} to finish"), timeout, || async move {
            let (status, run) = self.get(&protocol::api::paths::run(id)).await;
            if status != 200 {
                return Err(format!("{status}: {run}"));
            }
            match run["state"].as_str() {
                Some("running") | None => Err(run["state"].to_string()),
                Some(_) => Ok(Some(run)),
            }
        })
        .await
    }

    /// Enqueues a spec with extra request fields; panics unless the answer is 201.
    pub async fn enqueue(&self, request: Value) -> i64 {
        let (status, body) = self.post(protocol::api::paths::JOBS, &request).await;
        assert_eq!(status, 201, "enqueue answered {status}: {body}");
        body["id"].as_i64().expect("job id")
    }

    /// The pool's runners now (`GET /api/runners`): `(pod_name, state)` of those not gone
    /// whose names start with `pool-`.
    pub async fn pool_runners(&self) -> Vec<(String, String)> {
        let (status, body) = self.get(sluice_protocol::api::paths::RUNNERS).await;
        assert_eq!(status, 200, "{body}");
        body["runners"]
            .as_array()
            .expect("runners")
            .iter()
            .filter(|r| {
                r["pod_name"].as_str().unwrap_or("").starts_with("pool-") && r["state"] != "gone"
            })
            .map(|r| {
                (
                    r["pod_name"].as_str().unwrap_or("").to_string(),
                    r["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Waits until the pool has exactly one runner, idle, and not named `except`; its name.
    pub async fn one_idle_pool_runner(&self, what: &str, except: Option<&str>) -> String {
        wait_until(what, Duration::from_secs(30), || async {
            match self.pool_runners().await.as_slice() {
                [(name, state)] if state == "idle" && Some(name.as_str()) != except => {
                    Ok(Some(name.clone()))
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// Opens an event stream (`GET path`, SSE) with the API token.
    pub async fn events(
        &self,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<sse::SseStream, (u16, Value)> {
        sse::SseStream::open(
            &self.http,
            &format!("{}{path}", self.base),
            &self.token,
            last_event_id,
        )
        .await
    }

    /// Waits until the job is terminal and returns it.
    pub async fn wait_terminal(&self, id: i64, timeout: Duration) -> Value {
        wait_until(&format!("job {id} to end"), timeout, || async move {
            let (status, job) = self
                .get(&protocol::api::paths::job(protocol::JobId(id)))
                .await;
            if status != 200 {
                return Err(format!("{status}: {job}"));
            }
            let state = job["state"].as_str().unwrap_or_default().to_string();
            match protocol::JobState::parse(&state) {
                Some(s) if s.is_terminal() => Ok(Some(job)),
                _ => Err(format!("state {state}")),
            }
        })
        .await
    }
}

/// POSTs JSON with a bearer token; returns the status and the JSON body.
async fn post_json(http: &reqwest::Client, url: &str, token: &str, body: &Value) -> (u16, Value) {
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    decode(response).await
}

async fn decode(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("read body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"non_json": String::from_utf8_lossy(&bytes)}))
    };
    (status, body)
}

/// Step `id` of a run as `GET /api/runs/:id` shows it.
pub fn run_step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .expect("a run's steps")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

/// The test acting as a runner over the real internal HTTP protocol.
pub struct FakeRunner {
    pub base: String,
    pub pod_name: String,
    pub token: String,
    pub runner_id: protocol::RunnerId,
    pub http: reqwest::Client,
}

impl FakeRunner {
    /// Registers `pod_name` with the scheduler's secret.
    pub async fn register(scheduler: &Scheduler, pod_name: &str) -> FakeRunner {
        let http = reqwest::Client::new();
        let response = http
            .post(format!(
                "{}{}",
                scheduler.internal_url,
                protocol::paths::REGISTER
            ))
            .bearer_auth(&scheduler.runner_secret)
            .json(&protocol::RegisterRequest {
                pod_name: pod_name.into(),
                labels: Default::default(),
                slots: 4,
                version: "test".into(),
                protocol: Some(protocol::PROTOCOL_VERSION),
            })
            .send()
            .await
            .expect("register");
        let (status, body) = decode(response).await;
        assert_eq!(status, 201, "register answered {status}: {body}");
        let registered: protocol::RegisterResponse =
            serde_json::from_value(body).expect("register response");
        FakeRunner {
            base: scheduler.internal_url.clone(),
            pod_name: pod_name.into(),
            token: registered.token,
            runner_id: registered.runner_id,
            http,
        }
    }

    /// POSTs to an internal path with this runner's token.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(
            &self.http,
            &format!("{}{path}", self.base),
            &self.token,
            body,
        )
        .await
    }

    /// POSTs a typed request body to an internal path with this runner's token.
    pub async fn send<B: serde::Serialize>(&self, path: &str, body: &B) -> (u16, Value) {
        let body = serde_json::to_value(body).expect("a wire type serialises");
        self.post(path, &body).await
    }

    /// PUTs raw bytes with `headers` to an internal path with this runner's token.
    pub async fn put_bytes(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        decode(request.send().await.expect("PUT to the scheduler")).await
    }

    /// GETs an internal path with `headers` and this runner's token: status and raw body.
    pub async fn get_raw(&self, path: &str, headers: &[(&str, String)]) -> (u16, Vec<u8>) {
        let mut request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("GET from the scheduler");
        let status = response.status().as_u16();
        (status, response.bytes().await.expect("the body").to_vec())
    }

    /// Claims up to `max` tasks, waiting up to `wait_ms`.
    pub async fn claim(&self, max: u32, wait_ms: u64) -> Vec<protocol::Task> {
        let request = protocol::ClaimRequest {
            max,
            wait_ms,
            complete: Vec::new(),
        };
        // A 503 (no database connection within the scheduler's acquire timeout, on a loaded
        // machine) says "retry later": a runner retries, and so does this one, for a while.
        let answered = poll_until(Duration::from_secs(15), || async {
            let (status, body) = self
                .send(&protocol::paths::claim(&self.pod_name), &request)
                .await;
            if status == 503 {
                return Err(body.to_string());
            }
            Ok(Some((status, body)))
        })
        .await;
        let (status, body) = answered.unwrap_or_else(|last| (503, json!({ "last": last })));
        assert_eq!(status, 200, "claim answered {status}: {body}");
        serde_json::from_value::<protocol::ClaimResponse>(body)
            .expect("claim response")
            .tasks
    }

    /// Completes a task as succeeded with `output`; returns status and body.
    pub async fn complete(&self, task: &protocol::Task, output: Value) -> (u16, Value) {
        let completion = protocol::Completion {
            job_id: None,
            attempt: task.attempt,
            lease_token: task.lease_token,
            outcome: protocol::Outcome::Succeeded,
            output,
            error: None,
            retryable: true,
            final_seq: None,
        };
        self.send(&protocol::paths::complete(task.job_id), &completion)
            .await
    }

    /// Sends a heartbeat listing `running`; returns status and body.
    pub async fn heartbeat(
        &self,
        running: &[protocol::LeaseRef],
        seq: Option<u64>,
    ) -> (u16, Value) {
        let request = protocol::HeartbeatRequest {
            running: running.to_vec(),
            seq,
        };
        self.send(&protocol::paths::heartbeat(&self.pod_name), &request)
            .await
    }
}
