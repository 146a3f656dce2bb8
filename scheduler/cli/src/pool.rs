//! `sluice serve`'s warm pool settings (`SLUICE_POOL_*`), checked, with the backend chosen:
//! `local`, `kubernetes`, or `auto` (Kubernetes when a cluster answers, else local, said once).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sluice::service::pool::{
    kubernetes, BackendSettings, KubernetesSettings, LocalSettings, PoolSettings,
};

/// The warm runner pool.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Keep a warm pool of runners: `none` (runners are started elsewhere), `local`
    /// (sluice-runner child processes of this scheduler), `kubernetes` (gVisor pods from a
    /// template; one replica leads the pool), `auto` (Kubernetes when in-cluster
    /// configuration or a kubeconfig reaches a cluster, else local).
    #[arg(long, env = "SLUICE_POOL_BACKEND", default_value = "none", value_parser = ["none", "local", "auto", "kubernetes"])]
    pub pool_backend: String,
    /// The pool's name: its pods' `sluice.dev/pool` label and its row in `GET /api/runners`.
    #[arg(long, env = "SLUICE_POOL_NAME", default_value = "default")]
    pub pool_name: String,
    /// Idle runners the pool keeps at least.
    #[arg(long, env = "SLUICE_POOL_MIN_WARM", default_value_t = 2)]
    pub pool_min_warm: u32,
    /// Runners the pool keeps at most, idle or busy.
    #[arg(long, env = "SLUICE_POOL_MAX_WARM", default_value_t = 10)]
    pub pool_max_warm: u32,
    /// How long a runner above the minimum may stay idle before the pool ends it.
    #[arg(long, env = "SLUICE_POOL_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub pool_idle_timeout_ms: u64,
    /// How long a started runner may take to register before the pool stops it (a pod
    /// pulling its image counts).
    #[arg(long, env = "SLUICE_POOL_START_TIMEOUT_MS", default_value_t = 180_000)]
    pub pool_start_timeout_ms: u64,
    /// Slots of each pool runner.
    #[arg(long, env = "SLUICE_POOL_RUNNER_SLOTS", default_value_t = 4)]
    pub pool_runner_slots: u32,
    /// The sluice-runner binary of the local backend (default: beside this one).
    #[arg(long, env = "SLUICE_POOL_RUNNER_BIN")]
    pub pool_runner_bin: Option<PathBuf>,
    /// Where the local backend's runners keep their workspaces.
    #[arg(long, env = "SLUICE_POOL_WORKDIR")]
    pub pool_workdir: Option<PathBuf>,
    /// The namespace of the pool's pods (default: the kubeconfig context's, or in a pod its
    /// own).
    #[arg(long, env = "SLUICE_POOL_NAMESPACE")]
    pub pool_namespace: Option<String>,
    /// The runner pod template, a Pod manifest in YAML (default: the built-in
    /// deploy/base/runner-pod.yaml).
    #[arg(long, env = "SLUICE_POOL_POD_TEMPLATE")]
    pub pool_pod_template: Option<PathBuf>,
    /// The Secret, in the pods' namespace, holding the registration secret.
    #[arg(long, env = "SLUICE_POOL_SECRET_NAME", default_value = "sluice-runner")]
    pub pool_secret_name: String,
    /// The key of that Secret.
    #[arg(long, env = "SLUICE_POOL_SECRET_KEY", default_value = "secret")]
    pub pool_secret_key: String,
    /// `runtimeClassName` of every pod; empty keeps the template's.
    #[arg(long, env = "SLUICE_POOL_RUNTIME_CLASS", default_value = "gvisor")]
    pub pool_runtime_class: String,
    /// The scheduler's internal address as runner pods reach it (its Service); default: the
    /// template's SLUICE_API_URL.
    #[arg(long, env = "SLUICE_POOL_INTERNAL_URL")]
    pub pool_internal_url: Option<String>,
}

/// Whether `name` is a DNS-1123 label of at most `max` characters (pool names end up in
/// label values and pod names).
fn dns_label(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The pool this scheduler keeps, if any.
pub async fn settings(args: &PoolArgs) -> anyhow::Result<Option<PoolSettings>> {
    if args.pool_backend == "none" {
        return Ok(None);
    }
    anyhow::ensure!(
        (1..=1000).contains(&args.pool_max_warm) && args.pool_min_warm <= args.pool_max_warm,
        "SLUICE_POOL_MAX_WARM must be 1-1000 and SLUICE_POOL_MIN_WARM at most SLUICE_POOL_MAX_WARM"
    );
    anyhow::ensure!(
        (1..=1000).contains(&args.pool_runner_slots),
        "SLUICE_POOL_RUNNER_SLOTS must be 1-1000"
    );
    anyhow::ensure!(
        (1000..=7 * 24 * 3600 * 1000).contains(&args.pool_idle_timeout_ms),
        "SLUICE_POOL_IDLE_TIMEOUT_MS must be between 1000 and 604800000"
    );
    anyhow::ensure!(
        (1000..=3600 * 1000).contains(&args.pool_start_timeout_ms),
        "SLUICE_POOL_START_TIMEOUT_MS must be between 1000 and 3600000"
    );
    anyhow::ensure!(
        dns_label(&args.pool_name, 40),
        "SLUICE_POOL_NAME must be 1-40 lowercase letters, digits and '-', not starting or ending with '-'"
    );
    let backend = match args.pool_backend.as_str() {
        "kubernetes" => {
            let config = kubernetes::configured().await.map_err(|e| {
                anyhow::anyhow!(
                    "SLUICE_POOL_BACKEND=kubernetes: {e} (set KUBECONFIG, or run in a pod)"
                )
            })?;
            BackendSettings::Kubernetes(Box::new(kube_settings(args, config)?))
        }
        "auto" => match kubernetes::reachable(Duration::from_secs(5)).await {
            Ok(config) => {
                let settings = kube_settings(args, config)?;
                eprintln!(
                    "sluice: pool backend auto: Kubernetes at {}, namespace {}",
                    settings.config.cluster_url, settings.namespace
                );
                BackendSettings::Kubernetes(Box::new(settings))
            }
            Err(why) => {
                eprintln!("sluice: pool backend auto: using local runners ({why})");
                BackendSettings::Local(local_settings(args)?)
            }
        },
        _ => BackendSettings::Local(local_settings(args)?),
    };
    Ok(Some(PoolSettings {
        name: args.pool_name.clone(),
        min_warm: args.pool_min_warm,
        max_warm: args.pool_max_warm,
        idle_timeout: Duration::from_millis(args.pool_idle_timeout_ms),
        start_timeout: Duration::from_millis(args.pool_start_timeout_ms),
        slots: args.pool_runner_slots,
        interval: Duration::from_millis(100),
        backend,
    }))
}

fn kube_settings(
    args: &PoolArgs,
    config: kubernetes::KubeConfig,
) -> anyhow::Result<KubernetesSettings> {
    let text = match &args.pool_pod_template {
        Some(path) => read_template(path)
            .map_err(|e| anyhow::anyhow!("SLUICE_POOL_POD_TEMPLATE: {}: {e}", path.display()))?,
        None => kubernetes::DEFAULT_TEMPLATE.to_string(),
    };
    let template = kubernetes::template(&text)
        .map_err(|e| anyhow::anyhow!("SLUICE_POOL_POD_TEMPLATE: {e}"))?;
    let namespace = args
        .pool_namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    anyhow::ensure!(
        dns_label(&namespace, 63),
        "SLUICE_POOL_NAMESPACE must be a DNS label (lowercase letters, digits and '-', at most 63)"
    );
    anyhow::ensure!(
        !args.pool_secret_name.is_empty() && !args.pool_secret_key.is_empty(),
        "SLUICE_POOL_SECRET_NAME and SLUICE_POOL_SECRET_KEY must not be empty"
    );
    if let Some(url) = &args.pool_internal_url {
        let parsed = url::Url::parse(url)
            .map_err(|e| anyhow::anyhow!("SLUICE_POOL_INTERNAL_URL: not a URL: {e}"))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
            "SLUICE_POOL_INTERNAL_URL must be an http(s) URL with a host"
        );
    }
    Ok(KubernetesSettings {
        config,
        namespace,
        pool: args.pool_name.clone(),
        template,
        secret_name: args.pool_secret_name.clone(),
        secret_key: args.pool_secret_key.clone(),
        runtime_class: args.pool_runtime_class.clone(),
        internal_url: args.pool_internal_url.clone(),
    })
}

/// Largest pod template read.
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// A template file's text: a regular file of at most [`MAX_TEMPLATE_BYTES`] (not a device or a
/// pipe that would never end).
fn read_template(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    anyhow::ensure!(meta.is_file(), "not a regular file");
    anyhow::ensure!(
        meta.len() <= MAX_TEMPLATE_BYTES,
        "larger than {MAX_TEMPLATE_BYTES} bytes"
    );
    let mut text = String::new();
    file.take(MAX_TEMPLATE_BYTES + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}

fn local_settings(args: &PoolArgs) -> anyhow::Result<LocalSettings> {
    let binary = match &args.pool_runner_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("sluice-runner"))
            .unwrap_or_else(|| PathBuf::from("sluice-runner")),
    };
    anyhow::ensure!(
        binary.is_file(),
        "SLUICE_POOL_RUNNER_BIN: {} is not a file (build sluice-runner, or set the variable)",
        binary.display()
    );
    let workdir = args.pool_workdir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sluice-pool-{}", std::process::id()))
    });
    // What the runners get from this environment: the basics, the agent's key and endpoint,
    // and the runner settings (never the scheduler's own secrets but the runner secret,
    // which the pool passes itself).
    let env = std::env::vars()
        .filter(|(name, _)| {
            matches!(
                name.as_str(),
                "PATH"
                    | "HOME"
                    | "TMPDIR"
                    | "RUST_LOG"
                    | "LANG"
                    | "ANTHROPIC_API_KEY"
                    | "ANTHROPIC_BASE_URL"
            ) || (name.starts_with("SLUICE_RUNNER_")
                && !matches!(
                    name.as_str(),
                    "SLUICE_RUNNER_SECRET" | "SLUICE_RUNNER_SLOTS" | "SLUICE_RUNNER_WORKDIR"
                ))
                || name.starts_with("SLUICE_AGENT_")
                || name == "SLUICE_ARTIFACT_MAX_BYTES"
        })
        .collect();
    Ok(LocalSettings {
        binary,
        workdir,
        env,
    })
}
