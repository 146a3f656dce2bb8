//! A private Postgres cluster from the system's server binaries, for `sluice dev`, `sluice
//! bench` and the testkit.
//!
//! The postmaster runs as a direct child (not daemonised by `pg_ctl`) with
//! `PR_SET_PDEATHSIG = SIGINT`, so it shuts down fast when its owner dies, even by `kill -9`.
//!
//! The cluster trusts nobody: it listens on 127.0.0.1 only (no socket file), every login
//! needs a SCRAM password, and the superuser's is set at `initdb` (or reset in single-user
//! mode for a cluster made before, which also turns its `trust` lines into SCRAM). A tool
//! running on the same machine cannot log in, let alone as a superuser (S-13); the
//! scheduler logs in as a role that owns its database and nothing more
//! ([`crate::provision`]).
//! As root, initdb and the server run as the `postgres` user (Postgres refuses root), and the
//! data directory must be reachable by that user; [`data_dir_for`] falls back to a temp dir
//! when the requested one is not.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use sluice::{Error, Result};
use sluice_protocol::Secret;

use crate::provision::scram_verifier;
use crate::store::provision::superuser_password_statement;

/// Where the server binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
}

/// What a user must do when no binaries are found.
pub const INSTALL_HINT: &str = "no PostgreSQL server binaries (initdb, postgres) were found on PATH or under /usr/lib/postgresql/*/bin.\n  Install them (Debian/Ubuntu: `apt-get install -y postgresql`; macOS: `brew install postgresql@15`),\n  or point sluice at a server with DATABASE_URL=postgres://user:pass@host:5432/db";

impl Binaries {
    /// Finds `initdb` and `postgres` on PATH, else in the newest `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<Binaries> {
        for dir in search_dirs() {
            let initdb = dir.join("initdb");
            let postgres = dir.join("postgres");
            if is_executable(&initdb) && is_executable(&postgres) {
                return Ok(Binaries { initdb, postgres });
            }
        }
        Err(Error::Setup(INSTALL_HINT.to_string()))
    }
}

/// Another Postgres program (`pgbench`, …), looked up like the server binaries.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    search_dirs()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

/// PATH, then `/usr/lib/postgresql/*/bin` newest first.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        dirs.extend(versions.into_iter().map(|(_, dir)| dir));
    }
    dirs
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The data directory; created with initdb when it holds no cluster yet.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// `fsync` and `synchronous_commit` on (dev, bench) or off (tests: faster, and nothing
    /// to keep after the test).
    pub durable: bool,
    /// Extra `name=value` server settings.
    pub settings: Vec<(String, String)>,
    /// The superuser's (`postgres`) password; set at initdb.
    pub superuser_password: Secret,
    /// Set the superuser's password again before starting (the caller lost or replaced it);
    /// a cluster that still trusts local logins is secured this way whatever this says.
    pub reset_password: bool,
}

/// A running private cluster. Dropping it stops the server (fast shutdown).
pub struct Cluster {
    child: Option<Child>,
    data_dir: PathBuf,
    port: u16,
    log_path: PathBuf,
    superuser_password: Secret,
}

/// The user the server runs as when we are root.
fn server_user() -> Result<Option<User>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .map_err(|e| Error::Internal(format!("looking up the postgres user: {e}")))?
        .ok_or_else(|| {
            Error::Setup(
                "running as root, but there is no `postgres` user to run the server as \
                 (it comes with the postgresql package)"
                    .into(),
            )
        })?;
    Ok(Some(user))
}

/// Whether `user` can reach `path` (every ancestor searchable).
fn reachable_by(user: &User, path: &Path) -> bool {
    let mut current = Some(path);
    while let Some(dir) = current {
        if let Ok(meta) = fs::metadata(dir) {
            let mode = meta.mode();
            let ok = if meta.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return false;
            }
        }
        current = dir.parent();
    }
    true
}

/// The data directory to use for `wanted`: itself when the server's user can reach it, else a
/// stable `…/data` directory under the system temp dir (named after `wanted`, so it is reused).
/// The server log is written next to the data directory.
pub fn data_dir_for(wanted: &Path) -> Result<PathBuf> {
    let Some(user) = server_user()? else {
        return Ok(wanted.to_path_buf());
    };
    let parent = wanted.parent().unwrap_or(Path::new("/"));
    if reachable_by(&user, parent) {
        return Ok(wanted.to_path_buf());
    }
    let absolute = std::path::absolute(wanted).unwrap_or_else(|_| wanted.to_path_buf());
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in absolute.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3);
    }
    Ok(std::env::temp_dir()
        .join(format!("sluice-pg-{hash:016x}"))
        .join("data"))
}

/// A free TCP port on 127.0.0.1 (there is a small window before the server binds it).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Internal(format!("bind: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Internal(e.to_string()))
}

fn run_as(command: &mut Command, user: &Option<User>) {
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}

fn chown_to(path: &Path, user: &Option<User>) -> Result<()> {
    if let Some(user) = user {
        nix::unistd::chown(path, Some(user.uid), Some(Gid::from_raw(user.gid.as_raw())))
            .map_err(|e| Error::Internal(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

impl Cluster {
    /// Creates the cluster if needed and starts the server; returns once it accepts
    /// connections (or fails with the tail of its log). A stale server of an earlier run that
    /// still holds the data directory is stopped first.
    ///
    /// The caller's thread becomes the server's "parent" for `PR_SET_PDEATHSIG`: start it from
    /// a thread that lives as long as the cluster should.
    pub fn start(config: &ClusterConfig) -> Result<Cluster> {
        let binaries = Binaries::find()?;
        let user = server_user()?;
        let data_dir = &config.data_dir;
        let base = data_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        fs::create_dir_all(&base)
            .map_err(|e| Error::Internal(format!("creating {}: {e}", base.display())))?;
        let log_path = base.join("postgres.log");

        if !data_dir.join("PG_VERSION").exists() {
            fs::create_dir_all(data_dir)
                .map_err(|e| Error::Internal(format!("creating {}: {e}", data_dir.display())))?;
            fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::Internal(e.to_string()))?;
            chown_to(data_dir, &user)?;
            // The password reaches initdb in a file only its user can read, from the first byte
            // (created new: an existing file or a link there is refused), for an instant.
            let pwfile = base.join(format!(".pw-{}", uuid::Uuid::new_v4().simple()));
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&pwfile)
                    .and_then(|mut file| {
                        file.write_all(config.superuser_password.expose().as_bytes())
                    })
                    .map_err(|e| Error::Internal(format!("writing {}: {e}", pwfile.display())))?;
            }
            chown_to(&pwfile, &user)?;
            let mut initdb = Command::new(&binaries.initdb);
            initdb
                .arg("-D")
                .arg(data_dir)
                .args(["-U", "postgres", "-E", "UTF8"])
                .args(["--auth-host=scram-sha-256", "--auth-local=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["--locale=C.UTF-8", "--no-instructions"])
                .stdin(Stdio::null());
            if !config.durable {
                initdb.arg("--no-sync");
            }
            run_as(&mut initdb, &user);
            let output = initdb
                .output()
                .map_err(|e| Error::Internal(format!("running initdb: {e}")));
            let _ = fs::remove_file(&pwfile);
            let output = output?;
            if !output.status.success() {
                let _ = fs::remove_dir_all(data_dir);
                return Err(Error::Internal(format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
        }
        stop_stale_server(data_dir);
        let trusting = trusts_logins(data_dir);
        if trusting || config.reset_password {
            set_superuser_password(&binaries, &user, data_dir, &config.superuser_password)?;
        }
        if trusting {
            require_passwords(data_dir)?;
        }

        let port = if config.port == 0 {
            free_port()?
        } else {
            config.port
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::Internal(format!("opening {}: {e}", log_path.display())))?;
        chown_to(&log_path, &user)?;
        let durable = if config.durable { "on" } else { "off" };
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), port.to_string()),
            // TCP only: no socket file whose path length or directory rights could bite.
            ("unix_socket_directories".into(), String::new()),
            ("fsync".into(), durable.into()),
            ("synchronous_commit".into(), durable.into()),
            ("full_page_writes".into(), durable.into()),
            ("max_connections".into(), "200".into()),
            ("log_lock_waits".into(), "on".into()),
            ("idle_in_transaction_session_timeout".into(), "10s".into()),
            ("log_parameter_max_length".into(), "0".into()),
            ("log_parameter_max_length_on_error".into(), "0".into()),
        ];
        settings.extend(config.settings.iter().cloned());
        let mut command = Command::new(&binaries.postgres);
        command.arg("-D").arg(data_dir);
        for (name, value) in &settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| Error::Internal(e.to_string()))?,
            )
            .stderr(log);
        run_as(&mut command, &user);
        // Postgres shuts down fast when the process that started it dies.
        sluice_sandbox::die_with_parent(&mut command, Signal::SIGINT);
        let child = command
            .spawn()
            .map_err(|e| Error::Internal(format!("starting postgres: {e}")))?;
        let mut cluster = Cluster {
            child: Some(child),
            data_dir: data_dir.clone(),
            port,
            log_path,
            superuser_password: config.superuser_password.clone(),
        };
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::Internal(format!(
                        "postgres exited with {status} during start-up:\n{}",
                        self.log_tail()
                    )));
                }
            }
            // The pid file's status line turns "ready" once connections are accepted.
            let ready = fs::read_to_string(self.data_dir.join("postmaster.pid"))
                .map(|pid_file| pid_file.lines().nth(7).map(str::trim) == Some("ready"))
                .unwrap_or(false);
            if ready && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "postgres did not become ready within {timeout:?}:\n{}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A connection URL for `database` as the superuser `postgres` (with its password).
    pub fn url(&self, database: &str) -> String {
        self.role_url("postgres", &self.superuser_password, database)
    }

    /// A connection URL for `database` as `role` with `password` (generated passwords only:
    /// they need no escaping).
    pub fn role_url(&self, role: &str, password: &Secret, database: &str) -> String {
        format!(
            "postgres://{role}:{}@127.0.0.1:{}/{database}",
            password.expose(),
            self.port
        )
    }

    /// Fast shutdown: disconnects clients, writes a checkpoint, waits for the server to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the cluster's `pg_hba.conf` lets anyone log in without a password (clusters made
/// by sluice before it required passwords).
fn trusts_logins(data_dir: &Path) -> bool {
    fs::read_to_string(data_dir.join("pg_hba.conf"))
        .map(|hba| {
            hba.lines()
                .map(|line| line.split('#').next().unwrap_or_default())
                .any(|line| line.split_whitespace().any(|word| word == "trust"))
        })
        .unwrap_or(false)
}

/// Every `trust` line of `pg_hba.conf` asks for a SCRAM password instead.
fn require_passwords(data_dir: &Path) -> Result<()> {
    let path = data_dir.join("pg_hba.conf");
    let hba = fs::read_to_string(&path)
        .map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
    let secured: String = hba
        .lines()
        .map(|line| {
            let (rule, comment) = line.split_once('#').unwrap_or((line, ""));
            let rule = rule
                .split_whitespace()
                .map(|word| {
                    if word == "trust" {
                        "scram-sha-256"
                    } else {
                        word
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            match (rule.is_empty(), comment.is_empty()) {
                (true, true) => String::new(),
                (true, false) => format!("#{comment}"),
                (false, true) => rule,
                (false, false) => format!("{rule} #{comment}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    // Rewritten in place: the file keeps its owner and mode.
    fs::write(&path, secured + "\n")
        .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
}

/// Sets the superuser's password with the server stopped, in single-user mode (which needs no
/// login): the statement reaches the backend on stdin, never in argv or a log.
fn set_superuser_password(
    binaries: &Binaries,
    user: &Option<User>,
    data_dir: &Path,
    password: &Secret,
) -> Result<()> {
    use std::io::Write;
    if !password
        .expose()
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Error::Internal(
            "the generated superuser password holds unexpected characters".into(),
        ));
    }
    let mut command = Command::new(&binaries.postgres);
    command
        .args(["--single", "-D"])
        .arg(data_dir)
        .args(["-c", "listen_addresses=", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    run_as(&mut command, user);
    let mut child = command
        .spawn()
        .map_err(|e| Error::Internal(format!("starting postgres --single: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // The verifier, not the password (see store::provision): the statement holds no
        // secret even where a server logs statements.
        let statement = superuser_password_statement(&scram_verifier(password.expose()));
        let _ = stdin.write_all(statement.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Internal(format!("waiting for postgres --single: {e}")))?;
    if !output.status.success() {
        return Err(Error::Internal(format!(
            "setting the superuser password failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// A server from an earlier run whose owner died before it did still holds the data dir.
fn stop_stale_server(data_dir: &Path) {
    let Ok(pid_file) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let pid = Pid::from_raw(pid);
    let is_postgres = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "postgres")
        .unwrap_or(false);
    if !is_postgres {
        return; // A stale pid file; postgres itself cleans it up at start.
    }
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
