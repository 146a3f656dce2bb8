//! The sidecar's configuration, from flags and environment variables (one place).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::{Error, Result};

pub use sluice_protocol::Secret;

/// Command line of `sluice-runner`; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "sluice-runner", version, about = "The sluice runner sidecar")]
pub struct Args {
    /// The scheduler's internal API, e.g. http://127.0.0.1:7071 (PLUE_API_URL is accepted).
    #[arg(long, env = "SLUICE_API_URL")]
    pub api_url: Option<String>,
    /// This runner's name (the pod name on Kubernetes); default `<hostname>-<pid>`.
    #[arg(long, env = "RUNNER_POD_NAME")]
    pub pod_name: Option<String>,
    /// The pool's registration secret.
    #[arg(long, env = "SLUICE_RUNNER_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; off when unset. Keep it
    /// off addresses tools can reach when they are untrusted.
    #[arg(long, env = "SLUICE_RUNNER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Tasks run at once.
    #[arg(long, env = "SLUICE_RUNNER_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Parent of the per-task workspaces; default `$TMPDIR/sluice-runner-<pod>`.
    #[arg(long, env = "SLUICE_RUNNER_WORKDIR")]
    pub workdir: Option<PathBuf>,
    /// Output kept per attempt (stdout and stderr together); the rest is dropped.
    #[arg(long, env = "SLUICE_RUNNER_MAX_OUTPUT_BYTES", default_value_t = 10 << 20)]
    pub max_output_bytes: u64,
    /// Time between SIGTERM and SIGKILL when a tool is stopped.
    #[arg(long, env = "SLUICE_RUNNER_KILL_GRACE_MS", default_value_t = 2000)]
    pub kill_grace_ms: u64,
    /// Wall timeout of a task that names none.
    #[arg(
        long,
        env = "SLUICE_RUNNER_DEFAULT_TIMEOUT_MS",
        default_value_t = 3_600_000
    )]
    pub default_timeout_ms: u64,
    /// How long a SIGTERM waits for running tasks before killing them.
    #[arg(long, env = "SLUICE_RUNNER_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// Labels, `k=v,k2=v2`.
    #[arg(long, env = "SLUICE_RUNNER_LABELS", default_value = "")]
    pub labels: String,
    /// Most processes the tool user may have (RLIMIT_NPROC; enforced for non-root users only).
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_PROCESSES", default_value_t = 512)]
    pub limit_processes: u64,
    /// Most open files per tool process (RLIMIT_NOFILE).
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_OPEN_FILES", default_value_t = 4096)]
    pub limit_open_files: u64,
    /// Largest file a tool may write (RLIMIT_FSIZE).
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_FILE_SIZE_BYTES", default_value_t = 1 << 30)]
    pub limit_file_size_bytes: u64,
    /// CPU seconds per tool process (RLIMIT_CPU); none by default.
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_CPU_SECONDS")]
    pub limit_cpu_seconds: Option<u64>,
    /// Heap and private memory per tool process (RLIMIT_DATA); 0 for none. Runtimes that
    /// reserve large virtual ranges still start under it.
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_MEMORY_BYTES", default_value_t = 4 << 30)]
    pub limit_memory_bytes: u64,
    /// Address space per tool process (RLIMIT_AS), which also bounds shared mappings; none
    /// by default (runtimes that reserve large virtual ranges break under a small one).
    #[arg(long, env = "SLUICE_RUNNER_LIMIT_ADDRESS_SPACE_BYTES")]
    pub limit_address_space_bytes: Option<u64>,
    /// The user `--bench-spawn` runs its tools as when the sidecar runs as root (tasks run as
    /// their slot's uid, see SLUICE_RUNNER_TOOL_UIDS).
    #[arg(long, env = "SLUICE_RUNNER_TOOL_USER", default_value = "nobody")]
    pub tool_user: String,
    /// The uids slots run their tools as when the sidecar runs as root, `first-last`: one per
    /// slot, never shared with another slot or another runner on this host.
    #[arg(long, env = "SLUICE_RUNNER_TOOL_UIDS", default_value = "200000-299999")]
    pub tool_uids: String,
    /// Where runners on one host lock the uids they use (must be the same for all of them).
    #[arg(
        long,
        env = "SLUICE_RUNNER_UID_LOCK_DIR",
        default_value = "/run/sluice-runner/uids"
    )]
    pub uid_lock_dir: PathBuf,
    /// The network of a tool whose spec names none: `full` (the runner's) or `none` (a
    /// namespace of its own with only loopback).
    #[arg(long, env = "SLUICE_RUNNER_NETWORK", default_value = "full", value_parser = ["full", "none"])]
    pub network: String,
    /// File tools resolve paths with the component walk even where the kernel has openat2
    /// (the path gVisor takes; for tests).
    #[arg(long, env = "SLUICE_RUNNER_FORCE_PATH_WALK", default_value_t = false)]
    pub force_path_walk: bool,
    /// Most bytes `read_file` returns (and `grep`'s matches).
    #[arg(long, env = "SLUICE_RUNNER_MAX_READ_BYTES", default_value_t = 1 << 20)]
    pub max_read_bytes: u64,
    /// Most bytes of a `web_fetch` body.
    #[arg(long, env = "SLUICE_RUNNER_FETCH_MAX_BYTES", default_value_t = 5 << 20)]
    pub fetch_max_bytes: u64,
    /// Longest `web_fetch`, redirects included.
    #[arg(long, env = "SLUICE_RUNNER_FETCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub fetch_timeout_ms: u64,
    /// Networks `web_fetch` may reach although they are private, loopback or link-local:
    /// comma-separated addresses or CIDRs, e.g. `10.1.0.0/16,127.0.0.1`.
    #[arg(long, env = "SLUICE_RUNNER_FETCH_ALLOW", default_value = "")]
    pub fetch_allow: String,
    /// Measure the tool spawn path N times (`/bin/true`), print JSON and exit; used by
    /// `sluice bench`. Needs no scheduler.
    #[arg(long, hide = true)]
    pub bench_spawn: Option<usize>,
    /// Largest artifact archive a workflow step may pack (its tar stream, headers included);
    /// a step over it fails with `artifacts_too_large`. Also the cap on each parent's
    /// archive unpacked.
    #[arg(long, env = "SLUICE_ARTIFACT_MAX_BYTES", default_value_t = 64 << 20)]
    pub artifact_max_bytes: u64,
    /// How long one claim long-poll waits.
    #[arg(long, env = "SLUICE_RUNNER_CLAIM_WAIT_MS", default_value_t = 30_000)]
    pub claim_wait_ms: u64,
    /// Tasks this runner takes before it drains and exits (0: no limit). `1` gives every task
    /// a fresh runner when a pool replaces the ones that exit.
    #[arg(long, env = "SLUICE_RUNNER_RECYCLE_AFTER", default_value_t = 0)]
    pub recycle_after: u64,
    /// The Anthropic API key agent steps use; without it they fail with `configuration`.
    /// Held by the sidecar only: never in a tool's environment, an event, a log or an error.
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true, value_parser = secret)]
    pub anthropic_api_key: Option<Secret>,
    /// The Messages API's base URL.
    #[arg(
        long,
        env = "ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,
    /// The model of agent steps that name none.
    #[arg(long, env = "SLUICE_AGENT_MODEL", default_value = "claude-sonnet-4-5")]
    pub agent_model: String,
    /// Most model responses of an agent step that names no `max_turns`.
    #[arg(long, env = "SLUICE_AGENT_MAX_TURNS", default_value_t = 50)]
    pub agent_max_turns: u32,
    /// `max_tokens` of each response of an agent step that names none.
    #[arg(long, env = "SLUICE_AGENT_MAX_TOKENS", default_value_t = 8192)]
    pub agent_max_tokens: u32,
    /// Tokens (input and output over all turns) of an agent step that names no
    /// `token_budget`.
    #[arg(long, env = "SLUICE_AGENT_TOKEN_BUDGET", default_value_t = 2_000_000)]
    pub agent_token_budget: u64,
    /// Retries of one model request (429, 529, 5xx, a cut stream) before the step fails.
    #[arg(long, env = "SLUICE_AGENT_MAX_RETRIES", default_value_t = 6)]
    pub agent_max_retries: u32,
    /// First back-off between model retries (doubled each time, at most 60 s) when the
    /// answer names no `retry-after`.
    #[arg(long, env = "SLUICE_AGENT_RETRY_BASE_MS", default_value_t = 1000)]
    pub agent_retry_base_ms: u64,
    /// Largest tool result sent back to the model; longer ones are cut with a marker.
    #[arg(
        long,
        env = "SLUICE_AGENT_TOOL_RESULT_MAX_BYTES",
        default_value_t = 100_000
    )]
    pub agent_tool_result_max_bytes: u64,
}

/// A secret flag's value, wrapped at once so that `Args`' `Debug` cannot show it.
fn secret(value: &str) -> std::result::Result<Secret, String> {
    Ok(Secret::new(value))
}

/// What agent steps need from the runner's configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `None`: agent steps fail with `configuration`.
    pub api_key: Option<Secret>,
    pub base_url: String,
    pub model: String,
    pub max_turns: u32,
    pub max_tokens: u32,
    pub token_budget: u64,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub tool_result_max_bytes: usize,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_url: String,
    pub pod_name: String,
    pub secret: Secret,
    pub slots: u32,
    pub workdir: PathBuf,
    pub max_output_bytes: u64,
    pub kill_grace: Duration,
    pub default_timeout: Duration,
    pub drain_timeout: Duration,
    pub labels: BTreeMap<String, String>,
    pub claim_wait: Duration,
    /// The runner's default limits; a job's own can only lower them.
    pub limits: sluice_protocol::Limits,
    /// The slots' uids (`None` when the sidecar is not root and cannot switch users).
    pub tool_uids: Option<crate::slots::UidRange>,
    /// The network of tools whose spec names none.
    pub network: sluice_protocol::Network,
    /// Caps and the address allow-list of the confined tools.
    pub tool_policy: crate::tools::Policy,
    /// Largest artifact archive packed or unpacked.
    pub artifact_max_bytes: u64,
    /// Agent steps: the API key and endpoint, defaults and caps.
    pub agent: AgentConfig,
    /// Tasks taken before the runner drains and exits; `None`: no limit.
    pub recycle_after: Option<u64>,
    /// Where the sidecar's own metrics are served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// Parses the command line and environment, and validates the result with messages that
    /// name the variable to fix.
    pub fn load() -> Result<Config> {
        Config::from_args(Args::parse(), std::env::var("PLUE_API_URL").ok())
    }

    /// The legacy `PLUE_API_URL`, read here so that no other module reads the environment.
    pub fn plue_api_url() -> Option<String> {
        std::env::var("PLUE_API_URL").ok()
    }

    /// Validates parsed arguments; `plue_api_url` is the legacy variable's value.
    pub fn from_args(args: Args, plue_api_url: Option<String>) -> Result<Config> {
        let api_url = args
            .api_url
            .or(plue_api_url)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::Config("SLUICE_API_URL is not set (the scheduler's internal URL, e.g. http://127.0.0.1:7071)".into()))?;
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "SLUICE_API_URL must start with http:// or https://, got {api_url:?}"
            )));
        }
        let secret = args
            .secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Config("SLUICE_RUNNER_SECRET is not set".into()))?;
        if args.slots == 0 || args.slots > 1000 {
            return Err(Error::Config(
                "SLUICE_RUNNER_SLOTS must be between 1 and 1000".into(),
            ));
        }
        let pod_name = match args.pod_name.filter(|p| !p.is_empty()) {
            Some(name) => name,
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "runner".into());
                format!("{host}-{}", std::process::id())
            }
        };
        let mut labels = BTreeMap::new();
        for pair in args.labels.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                Error::Config(format!("SLUICE_RUNNER_LABELS: {pair:?} is not key=value"))
            })?;
            labels.insert(key.trim().to_string(), value.trim().to_string());
        }
        let fetch_allow: Vec<String> = args
            .fetch_allow
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        for network in &fetch_allow {
            crate::tools::fetch::Network::parse(network)
                .map_err(|e| Error::Config(format!("SLUICE_RUNNER_FETCH_ALLOW: {e}")))?;
        }
        let chunk_cap = sluice_protocol::bounds::MAX_ARTIFACT_CHUNKS as u64
            * sluice_protocol::bounds::ARTIFACT_CHUNK_BYTES as u64;
        if args.artifact_max_bytes == 0 || args.artifact_max_bytes > chunk_cap {
            return Err(Error::Config(format!(
                "SLUICE_ARTIFACT_MAX_BYTES must be between 1 and {chunk_cap}"
            )));
        }
        if args.max_read_bytes == 0 || args.fetch_max_bytes == 0 || args.fetch_timeout_ms == 0 {
            return Err(Error::Config(
                "SLUICE_RUNNER_MAX_READ_BYTES, SLUICE_RUNNER_FETCH_MAX_BYTES and SLUICE_RUNNER_FETCH_TIMEOUT_MS must be above 0".into(),
            ));
        }
        let tool_policy = crate::tools::Policy {
            force_path_walk: args.force_path_walk,
            max_read_bytes: args.max_read_bytes,
            fetch_max_bytes: args.fetch_max_bytes,
            fetch_timeout_ms: args.fetch_timeout_ms,
            fetch_allow,
        };
        let base_url = args.anthropic_base_url.trim_end_matches('/').to_string();
        let loopback = url::Url::parse(&base_url)
            .ok()
            .and_then(|u| u.host().map(|h| h.to_owned()))
            .is_some_and(|host| match host {
                url::Host::Domain(name) => name == "localhost",
                url::Host::Ipv4(ip) => ip.is_loopback(),
                url::Host::Ipv6(ip) => ip.is_loopback(),
            });
        // The key travels in a header: plain http only to this machine.
        if !(base_url.starts_with("https://") || (base_url.starts_with("http://") && loopback)) {
            return Err(Error::Config(format!(
                "ANTHROPIC_BASE_URL must be an https:// URL (http:// only for a loopback address, since the API key travels in a header), got {base_url:?}"
            )));
        }
        if args.agent_max_turns == 0
            || u64::from(args.agent_max_turns) > sluice_protocol::bounds::MAX_AGENT_TURNS
            || args.agent_max_tokens == 0
            || args.agent_token_budget == 0
            || args.agent_tool_result_max_bytes < 1024
            || args.agent_max_retries > 100
        {
            return Err(Error::Config(
                "SLUICE_AGENT_MAX_TURNS must be 1-1000, SLUICE_AGENT_MAX_TOKENS and SLUICE_AGENT_TOKEN_BUDGET above 0, SLUICE_AGENT_TOOL_RESULT_MAX_BYTES at least 1024 and SLUICE_AGENT_MAX_RETRIES at most 100".into(),
            ));
        }
        let agent = AgentConfig {
            api_key: args
                .anthropic_api_key
                .filter(|key| !key.expose().trim().is_empty())
                .map(|key| Secret::new(key.expose().trim())),
            base_url,
            model: args.agent_model,
            max_turns: args.agent_max_turns,
            max_tokens: args.agent_max_tokens,
            token_budget: args.agent_token_budget,
            max_retries: args.agent_max_retries,
            retry_base: Duration::from_millis(args.agent_retry_base_ms.clamp(1, 60_000)),
            tool_result_max_bytes: args.agent_tool_result_max_bytes.min(16 << 20) as usize,
        };
        let workdir = args
            .workdir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("sluice-runner-{pod_name}")));
        Ok(Config {
            api_url: api_url.trim_end_matches('/').to_string(),
            pod_name,
            secret: Secret::new(secret),
            slots: args.slots,
            workdir,
            max_output_bytes: args.max_output_bytes,
            kill_grace: Duration::from_millis(args.kill_grace_ms),
            default_timeout: Duration::from_millis(args.default_timeout_ms.max(1)),
            drain_timeout: Duration::from_millis(args.drain_timeout_ms),
            labels,
            claim_wait: Duration::from_millis(args.claim_wait_ms),
            limits: sluice_protocol::Limits {
                cpu_seconds: args.limit_cpu_seconds,
                memory_bytes: Some(args.limit_memory_bytes).filter(|&bytes| bytes > 0),
                address_space_bytes: args.limit_address_space_bytes,
                open_files: Some(args.limit_open_files),
                processes: Some(args.limit_processes),
                file_size_bytes: Some(args.limit_file_size_bytes),
            },
            tool_uids: if nix::unistd::Uid::effective().is_root() {
                Some(
                    crate::slots::UidRange::parse(&args.tool_uids, &args.uid_lock_dir)
                        .map_err(|e| Error::Config(format!("SLUICE_RUNNER_TOOL_UIDS: {e}")))?,
                )
            } else {
                None
            },
            network: if args.network == "none" {
                sluice_protocol::Network::None
            } else {
                sluice_protocol::Network::Full
            },
            tool_policy,
            artifact_max_bytes: args.artifact_max_bytes,
            agent,
            recycle_after: (args.recycle_after > 0).then_some(args.recycle_after),
            metrics_listen: args.metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_base_url(url: &str) -> Result<Config> {
        let args = Args::try_parse_from([
            "sluice-runner",
            "--api-url",
            "http://127.0.0.1:7071",
            "--secret",
            "s",
            "--anthropic-base-url",
            url,
        ])
        .expect("flags parse");
        Config::from_args(args, None)
    }

    #[test]
    fn the_api_key_goes_over_plain_http_only_to_this_machine() {
        for ok in [
            "https://api.anthropic.com",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert!(with_base_url(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://api.anthropic.com",
            "http://10.0.0.1",
            "ftp://x",
            "x",
        ] {
            let err = with_base_url(refused).unwrap_err().to_string();
            assert!(err.contains("ANTHROPIC_BASE_URL"), "{refused}: {err}");
        }
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let args = Args::try_parse_from([
            "sluice-runner",
            "--api-url",
            "http://127.0.0.1:7071",
            "--secret",
            "s",
            "--anthropic-api-key",
            "sk-ant-canary-debug",
        ])
        .expect("flags parse");
        assert!(!format!("{args:?}").contains("sk-ant-canary-debug"));
        let config = Config::from_args(args, None).unwrap();
        assert!(!format!("{config:?}").contains("sk-ant-canary-debug"));
        assert_eq!(
            config.agent.api_key.as_ref().map(|k| k.expose()),
            Some("sk-ant-canary-debug")
        );
    }
}
