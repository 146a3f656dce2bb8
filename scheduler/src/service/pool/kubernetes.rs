//! [`KubernetesBackend`]: runners as pods made from a template (`runtimeClassName: gvisor`,
//! the registration secret from a Secret, no service-account token), labelled with the pool
//! and watched: a pod that is deleted, evicted or fails ends at once (its leases end on the
//! pool's next tick, not when they run out), a pod being deleted is drained first, and pods
//! that finished or cannot start (an image that cannot be pulled, a missing Secret) are
//! deleted. The watch is kube-runtime's watcher: it lists, then watches from the list's
//! resourceVersion with bookmarks, lists again after `410 Gone`, and backs off on errors.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, Pod, SecretKeySelector};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;

use super::{Ended, RunnerBackend, StartSpec};

/// How to reach an API server (re-exported for the CLI).
pub use kube::Config as KubeConfig;

/// The label every pool pod carries, valued with the pool's name.
pub const POOL_LABEL: &str = "sluice.dev/pool";
/// The label saying who made the pod.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The built-in pod template (`deploy/base/runner-pod.yaml`).
pub const DEFAULT_TEMPLATE: &str = include_str!("../../../../deploy/base/runner-pod.yaml");
/// The container of the template that runs `sluice-runner` (else the first).
pub const RUNNER_CONTAINER: &str = "runner";

/// Waiting reasons of a container that will not start by waiting longer.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// How [`KubernetesBackend`] makes pods.
#[derive(Clone)]
pub struct KubernetesSettings {
    /// How to reach the API server (kubeconfig or in-cluster).
    pub config: kube::Config,
    pub namespace: String,
    /// The pool's name, its pods' [`POOL_LABEL`] value.
    pub pool: String,
    /// The pod template; see [`template`].
    pub template: Pod,
    /// The Secret and key holding the registration secret.
    pub secret_name: String,
    pub secret_key: String,
    /// `runtimeClassName` of every pod (empty: the template's).
    pub runtime_class: String,
    /// What runners call the scheduler's internal listener (its Service); unset: the
    /// template's `SLUICE_API_URL`, else this process's internal listener.
    pub internal_url: Option<String>,
}

impl fmt::Debug for KubernetesSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config may carry credentials: only where it points.
        f.debug_struct("KubernetesSettings")
            .field("cluster_url", &self.config.cluster_url.to_string())
            .field("namespace", &self.namespace)
            .field("pool", &self.pool)
            .field("secret_name", &self.secret_name)
            .field("runtime_class", &self.runtime_class)
            .finish_non_exhaustive()
    }
}

/// Parses a pod template (a Pod manifest in YAML), checking that it has a container to run
/// the runner in.
pub fn template(text: &str) -> Result<Pod, String> {
    // The error names the kind of fault and where, never the file's content (the path could
    // name a file of secrets).
    let pod: Pod = serde_norway::from_str(text).map_err(|e| {
        let what = e.to_string();
        let what = what.split(':').next().unwrap_or("").trim().to_string();
        match e.location() {
            Some(at) => format!(
                "not a Pod manifest ({what}, line {} column {})",
                at.line(),
                at.column()
            ),
            None => format!("not a Pod manifest ({what})"),
        }
    })?;
    let containers = pod.spec.as_ref().map(|s| s.containers.len()).unwrap_or(0);
    if containers == 0 {
        return Err("the pod template has no container".into());
    }
    Ok(pod)
}

/// The pod for runner `spec.name`: the template with the pool's labels, the runner's
/// variables (the secret by reference only), no service-account token, no restarts (a
/// runner that ends is replaced by the pool), and the runtime class.
pub fn pod_for(settings: &KubernetesSettings, spec: &StartSpec<'_>) -> Pod {
    let mut pod = settings.template.clone();
    let meta = &mut pod.metadata;
    meta.name = Some(spec.name.to_string());
    meta.generate_name = None;
    meta.namespace = None;
    meta.resource_version = None;
    meta.uid = None;
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(POOL_LABEL.into(), settings.pool.clone());
    labels.insert(MANAGED_BY_LABEL.into(), "sluice".into());
    pod.status = None;
    let pod_spec = pod.spec.get_or_insert_with(Default::default);
    pod_spec.automount_service_account_token = Some(false);
    pod_spec.restart_policy = Some("Never".into());
    if !settings.runtime_class.is_empty() {
        pod_spec.runtime_class_name = Some(settings.runtime_class.clone());
    }
    let index = pod_spec
        .containers
        .iter()
        .position(|c| c.name == RUNNER_CONTAINER)
        .unwrap_or(0);
    if let Some(container) = pod_spec.containers.get_mut(index) {
        let env = container.env.get_or_insert_with(Vec::new);
        let templated_url = env
            .iter()
            .find(|v| v.name == "SLUICE_API_URL")
            .and_then(|v| v.value.clone());
        env.retain(|v| {
            !matches!(
                v.name.as_str(),
                "SLUICE_API_URL"
                    | "RUNNER_POD_NAME"
                    | "SLUICE_RUNNER_SECRET"
                    | "SLUICE_RUNNER_SLOTS"
            )
        });
        let url = settings
            .internal_url
            .clone()
            .or(templated_url)
            .unwrap_or_else(|| spec.internal_url.to_string());
        let literal = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            value_from: None,
        };
        env.push(literal("SLUICE_API_URL", url));
        env.push(literal("RUNNER_POD_NAME", spec.name.to_string()));
        env.push(literal("SLUICE_RUNNER_SLOTS", spec.slots.to_string()));
        env.push(EnvVar {
            name: "SLUICE_RUNNER_SECRET".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: settings.secret_name.clone(),
                    key: settings.secret_key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        });
    }
    pod
}

/// What the watch saw, shared with the backend.
#[derive(Default)]
struct Watched {
    /// Pods alive, with their creation times.
    pods: HashMap<String, Option<std::time::SystemTime>>,
    /// Pods whose end was reported (and not yet seen deleted).
    ended_names: HashSet<String>,
    ended: Vec<Ended>,
    terminating: Vec<String>,
    /// Reported as terminating already.
    terminating_names: HashSet<String>,
    /// The names of the list under way (between `Init` and `InitDone`).
    listing: Option<HashSet<String>>,
    /// A full list arrived.
    synced: bool,
    /// The last watch error, while the watch is failing.
    error: Option<String>,
}

impl Watched {
    fn end(&mut self, name: &str, how: String, clean: bool) {
        self.pods.remove(name);
        if self.ended_names.insert(name.to_string()) {
            self.ended.push(Ended {
                name: name.to_string(),
                how,
                clean,
            });
        }
    }

    /// Takes in a pod as listed or changed; whether it should be deleted (it finished, or it
    /// cannot start).
    fn observe(&mut self, pod: &Pod) -> bool {
        let Some(name) = pod.metadata.name.as_deref() else {
            return false;
        };
        if let Some(listing) = self.listing.as_mut() {
            listing.insert(name.to_string());
        }
        if self.ended_names.contains(name) {
            // Ended already: delete it if it is still there and not being deleted.
            return pod.metadata.deletion_timestamp.is_none();
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let reason = status.and_then(|s| s.reason.clone()).unwrap_or_default();
        let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
        match phase {
            "Succeeded" => {
                self.end(name, "pod succeeded".into(), true);
                return true;
            }
            "Failed" => {
                let exit = exit_of(pod);
                // Evicted (node pressure, preemption) is not the runner's fault.
                let clean = reason == "Evicted";
                self.end(
                    name,
                    format!("pod failed: {reason} {message}{exit}")
                        .trim()
                        .into(),
                    clean,
                );
                return true;
            }
            _ => {}
        }
        if let Some((why, detail)) = fatal_waiting(pod) {
            self.end(name, format!("{why}: {detail}"), false);
            return true;
        }
        self.pods.insert(
            name.to_string(),
            pod.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| std::time::SystemTime::from(t.0)),
        );
        if pod.metadata.deletion_timestamp.is_some() && self.terminating_names.insert(name.into()) {
            self.terminating.push(name.to_string());
        }
        false
    }

    fn deleted(&mut self, pod: &Pod) {
        let Some(name) = pod.metadata.name.as_deref() else {
            return;
        };
        // Deleted from outside, or after it ended: not the runner's fault either way.
        self.end(name, "pod deleted".into(), true);
        self.ended_names.remove(name);
        self.terminating_names.remove(name);
    }

    /// A full list arrived: pods not in it are gone (deleted while the watch was down).
    fn listed(&mut self) {
        let Some(listed) = self.listing.take() else {
            return;
        };
        let vanished: Vec<String> = self
            .pods
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        for name in vanished {
            self.end(&name, "pod deleted while the watch was down".into(), true);
        }
        self.ended_names.retain(|name| listed.contains(name));
        self.terminating_names.retain(|name| listed.contains(name));
        self.synced = true;
    }
}

/// `(reason, message)` of a container that will not start by waiting.
fn fatal_waiting(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?;
    let all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    for container in all {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(reason) = waiting.and_then(|w| w.reason.as_deref()) {
            if FATAL_WAITING.contains(&reason) {
                let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
                return Some((reason.to_string(), message));
            }
        }
    }
    None
}

/// `; exit N` of the first terminated container, if any.
fn exit_of(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| format!("; exit {}", t.exit_code))
        .next()
        .unwrap_or_default()
}

/// Runners as pods.
pub struct KubernetesBackend {
    settings: KubernetesSettings,
    api: Api<Pod>,
    watched: Arc<Mutex<Watched>>,
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl KubernetesBackend {
    pub fn new(settings: KubernetesSettings) -> Result<KubernetesBackend, String> {
        let client = kube::Client::try_from(settings.config.clone())
            .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
        let api = Api::namespaced(client, &settings.namespace);
        Ok(KubernetesBackend {
            settings,
            api,
            watched: Arc::default(),
            watch: None,
        })
    }

    fn selector(&self) -> String {
        format!("{POOL_LABEL}={}", self.settings.pool)
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.watched.lock().expect("pool watch state")
    }

    /// Starts the watch of the pool's pods.
    fn watch(&mut self) {
        if self.watch.is_some() {
            return;
        }
        *self.watched() = Watched::default();
        let watched = self.watched.clone();
        let api = self.api.clone();
        let config = watcher::Config::default().labels(&self.selector());
        self.watch = Some(tokio::spawn(async move {
            let mut events = watcher(api.clone(), config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                let delete = {
                    let mut seen = watched.lock().expect("pool watch state");
                    match event {
                        Ok(event) => {
                            if let Some(was) = seen.error.take() {
                                tracing::info!(after = %was, "watching the pool's pods again");
                            }
                            match event {
                                watcher::Event::Init => {
                                    seen.listing = Some(HashSet::new());
                                    None
                                }
                                watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => seen
                                    .observe(&pod)
                                    .then(|| pod.metadata.name.clone())
                                    .flatten(),
                                watcher::Event::Delete(pod) => {
                                    seen.deleted(&pod);
                                    None
                                }
                                watcher::Event::InitDone => {
                                    seen.listed();
                                    None
                                }
                            }
                        }
                        Err(err) => {
                            // kube-runtime backs off before trying again (and lists anew
                            // after 410 Gone); said once per run of errors.
                            if seen.error.is_none() {
                                tracing::warn!(error = %err, "the watch of the pool's pods failed; retrying with back-off");
                            }
                            seen.error = Some(err.to_string());
                            None
                        }
                    }
                };
                if let Some(name) = delete {
                    delete_pod(&api, &name).await;
                }
            }
        }));
    }
}

/// Deletes pod `name`; one already gone is fine.
async fn delete_pod(api: &Api<Pod>, name: &str) {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(err) => tracing::warn!(pod = %name, error = %err, "cannot delete a pool pod"),
    }
}

impl RunnerBackend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn adopt(&mut self) -> Result<Vec<(String, Duration)>, String> {
        self.watch();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            {
                let seen = self.watched();
                if seen.synced {
                    let now = std::time::SystemTime::now();
                    return Ok(seen
                        .pods
                        .iter()
                        .map(|(name, created)| {
                            let age = created
                                .and_then(|c| now.duration_since(c).ok())
                                .unwrap_or_default();
                            (name.clone(), age)
                        })
                        .collect());
                }
                if tokio::time::Instant::now() >= deadline {
                    let why = seen.error.clone().unwrap_or_else(|| "no answer".into());
                    drop(seen);
                    self.release();
                    return Err(format!("cannot list the pool's pods: {why}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start(&mut self, spec: &StartSpec<'_>) -> Result<(), String> {
        let pod = pod_for(&self.settings, spec);
        match self.api.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                let created_at = created
                    .metadata
                    .creation_timestamp
                    .map(|t| std::time::SystemTime::from(t.0));
                let mut seen = self.watched();
                // Unless the watch saw it end already.
                if !seen.ended_names.contains(spec.name) {
                    seen.pods.entry(spec.name.to_string()).or_insert(created_at);
                }
                Ok(())
            }
            Err(kube::Error::Api(status)) => Err(format!(
                "pod creation refused: {} {}: {}",
                status.code, status.reason, status.message
            )),
            Err(err) => Err(format!("pod creation failed: {err}")),
        }
    }

    async fn stop(&mut self, name: &str) {
        delete_pod(&self.api, name).await;
    }

    fn reap(&mut self) -> Vec<Ended> {
        std::mem::take(&mut self.watched().ended)
    }

    fn running(&self) -> Vec<String> {
        self.watched().pods.keys().cloned().collect()
    }

    fn terminating(&mut self) -> Vec<String> {
        std::mem::take(&mut self.watched().terminating)
    }

    async fn shut_down(&mut self) {
        // The pods stay: the next leader adopts them.
        self.release();
    }

    fn release(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.abort();
        }
        *self.watched() = Watched::default();
    }
}

/// The cluster this process can reach, if any: in-cluster configuration or a kubeconfig
/// (`KUBECONFIG`, `~/.kube/config`), checked by asking the API server its version within
/// `within`. `Err` says why not.
pub async fn reachable(within: Duration) -> Result<kube::Config, String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let client = kube::Client::try_from(config.clone())
        .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
    match tokio::time::timeout(within, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(config),
        Ok(Err(err)) => Err(format!(
            "the API server at {} does not answer: {err}",
            config.cluster_url
        )),
        Err(_) => Err(format!(
            "the API server at {} did not answer within {} s",
            config.cluster_url,
            within.as_secs()
        )),
    }
}

/// The configuration this process would use, without asking the cluster (for
/// `SLUICE_POOL_BACKEND=kubernetes`, which keeps trying, with back-off, until it answers).
pub async fn configured() -> Result<kube::Config, String> {
    kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KubernetesSettings {
        KubernetesSettings {
            config: kube::Config::new("http://127.0.0.1:1".parse().unwrap()),
            namespace: "sluice".into(),
            pool: "default".into(),
            template: template(DEFAULT_TEMPLATE).unwrap(),
            secret_name: "sluice-runner".into(),
            secret_key: "secret".into(),
            runtime_class: "gvisor".into(),
            internal_url: None,
        }
    }

    #[test]
    fn a_pod_carries_the_pool_label_and_the_secret_only_by_reference() {
        let spec = StartSpec {
            name: "pool-1234abcd-1",
            internal_url: "http://127.0.0.1:9",
            secret: "never-in-the-pod",
            slots: 3,
        };
        let pod = pod_for(&settings(), &spec);
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains("never-in-the-pod"), "{text}");
        assert_eq!(pod.metadata.name.as_deref(), Some("pool-1234abcd-1"));
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[POOL_LABEL], "default");
        assert_eq!(labels[MANAGED_BY_LABEL], "sluice");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let runner = spec
            .containers
            .iter()
            .find(|c| c.name == RUNNER_CONTAINER)
            .unwrap();
        let env = runner.env.clone().unwrap();
        let var = |name: &str| env.iter().find(|v| v.name == name).cloned().unwrap();
        assert_eq!(
            var("RUNNER_POD_NAME").value.as_deref(),
            Some("pool-1234abcd-1")
        );
        assert_eq!(var("SLUICE_RUNNER_SLOTS").value.as_deref(), Some("3"));
        let secret = var("SLUICE_RUNNER_SECRET");
        assert_eq!(secret.value, None);
        let by_ref = secret.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!(
            (by_ref.name.as_str(), by_ref.key.as_str()),
            ("sluice-runner", "secret")
        );
        // The template's own Service address wins over this process's listener.
        assert!(var("SLUICE_API_URL")
            .value
            .unwrap()
            .starts_with("http://sluice-internal"));
    }

    #[test]
    fn a_template_without_a_container_is_refused() {
        let err =
            template("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n")
                .unwrap_err();
        assert!(err.contains("no container"), "{err}");
        assert!(template("{{{").is_err());
        // The content of a wrong file is not echoed.
        let err = template("password: hunter2-secret\n").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let err = template("just a secret line").unwrap_err();
        assert!(!err.contains("secret line"), "{err}");
    }

    fn pod(name: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn the_watch_ends_finished_failed_and_vanished_pods_once() {
        let mut seen = Watched::default();
        assert!(!seen.observe(&pod("a", "Running")));
        assert!(!seen.observe(&pod("b", "Pending")));
        assert!(
            seen.observe(&pod("a", "Succeeded")),
            "a finished pod is deleted"
        );
        assert!(
            seen.observe(&pod("a", "Succeeded")),
            "still there: deleted again"
        );
        assert_eq!(
            std::mem::take(&mut seen.ended),
            vec![Ended {
                name: "a".into(),
                how: "pod succeeded".into(),
                clean: true
            }]
        );
        let mut pulled: Pod = pod("c", "Pending");
        pulled.status = Some(
            serde_json::from_value(serde_json::json!({
                "phase": "Pending",
                "containerStatuses": [{"name": "runner", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}],
            }))
            .unwrap(),
        );
        assert!(seen.observe(&pulled));
        let ended = std::mem::take(&mut seen.ended);
        assert_eq!(ended.len(), 1);
        assert!(
            !ended[0].clean && ended[0].how.contains("ImagePullBackOff"),
            "{ended:?}"
        );
        // A relist without b: b was deleted while the watch was down.
        seen.listing = Some(HashSet::new());
        seen.listed();
        assert_eq!(seen.ended.len(), 1);
        assert_eq!(seen.ended[0].name, "b");
        assert!(seen.pods.is_empty());
    }
}
