//! A fake Kubernetes API server on loopback, with a fake kubelet, for the Kubernetes runner
//! pool's tests: the scheduler's real kube client (pointed at it by a kubeconfig) creates,
//! lists, watches and deletes pods; the kubelet starts a real `sluice-runner` process for each
//! pod created and reports its phase as the process lives and ends. Only the API server and
//! the kubelet are fake; the scheduler, its watch and the runners are the real ones.
//!
//! What it serves: `GET /version`; pods in a namespace — create (`409` on a taken name),
//! get, list with equality label selectors, delete (graceful: `deletionTimestamp`, SIGTERM,
//! SIGKILL after the grace period; `gracePeriodSeconds=0`: at once) and watch from a
//! `resourceVersion`, with bookmarks and `410 Gone` for a version older than the last
//! [`FakeKube::expire_watches`]. Faults are injected per operation
//! ([`FakeKube::fail`]); every request is counted ([`FakeKube::requests`]).
//!
//! The kubelet runs each pod's runner container as a process with the container's
//! environment resolved — literal values, `secretKeyRef` from [`FakeKube::set_secret`]
//! (missing: `CreateContainerConfigError`), `fieldRef: metadata.name` — and, standing in for
//! its `emptyDir` volumes, a fresh workspace and temporary directory of its own. An image
//! named in [`FakeKube::set_unpullable`] stays `ErrImagePull`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::TempDir;

/// The bearer token the fake expects (and the kubeconfig carries).
pub const TOKEN: &str = "fake-kube-token";

/// Watch events kept for resuming watches.
const HISTORY: usize = 10_000;

/// An injected failure: the next `times` requests of `op` get `code`.
#[derive(Debug, Clone)]
struct Fault {
    op: String,
    code: u16,
    times: u32,
}

/// An open watch: its namespace, its label selector, and where its events go.
type Watcher = (String, Vec<(String, String)>, mpsc::UnboundedSender<Value>);

#[derive(Default)]
struct Cluster {
    rv: u64,
    /// `(namespace, name)` → pod.
    pods: BTreeMap<(String, String), Value>,
    /// `(rv, type, pod)`.
    history: VecDeque<(u64, &'static str, Value)>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    secrets: HashMap<(String, String), HashMap<String, String>>,
    unpullable: HashSet<String>,
    faults: Vec<Fault>,
    requests: HashMap<String, usize>,
    /// Open watches: namespace, selector, and where their events go.
    watchers: Vec<Watcher>,
    /// Runner processes by `(namespace, name)`.
    processes: HashMap<(String, String), u32>,
    /// Requests without the right token.
    unauthorized: usize,
}

impl Cluster {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a change of `pod` (`ADDED`, `MODIFIED`, `DELETED`) and tells the watches.
    fn changed(&mut self, kind: &'static str, mut pod: Value) -> Value {
        let rv = self.next_rv();
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
        if kind == "DELETED" {
            self.pods.remove(&(ns.clone(), name));
        } else {
            self.pods.insert((ns.clone(), name), pod.clone());
        }
        self.history.push_back((rv, kind, pod.clone()));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let event = json!({"type": kind, "object": pod});
        self.watchers.retain(|(wns, selector, tx)| {
            if *wns != ns || !matches(selector, &event["object"]) {
                return !tx.is_closed();
            }
            tx.send(event.clone()).is_ok()
        });
        pod
    }

    /// The injected failure for `op`, if one is due.
    fn fault(&mut self, op: &str) -> Option<u16> {
        *self.requests.entry(op.to_string()).or_default() += 1;
        let fault = self.faults.iter_mut().find(|f| f.op == op && f.times > 0)?;
        fault.times -= 1;
        Some(fault.code)
    }

    fn pod_mut(&mut self, ns: &str, name: &str) -> Option<Value> {
        self.pods.get(&(ns.to_string(), name.to_string())).cloned()
    }
}

/// Equality label selectors, `a=b,c=d`.
fn parse_selector(text: Option<&String>) -> Vec<(String, String)> {
    text.map(|t| {
        t.split(',')
            .filter_map(|part| {
                let (k, v) = part.split_once('=')?;
                Some((k.trim_end_matches('=').to_string(), v.to_string()))
            })
            .collect()
    })
    .unwrap_or_default()
}

fn matches(selector: &[(String, String)], pod: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| pod["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": reason, "code": code,
            })
            .to_string(),
        ))
        .expect("response")
}

fn injected(code: u16, op: &str) -> Response {
    let (reason, message) = match code {
        403 => (
            "Forbidden",
            "pods is forbidden: exceeded quota: compute-resources, requested: pods=1, used: pods=10, limited: pods=10".to_string(),
        ),
        409 => ("AlreadyExists", "pods already exists".to_string()),
        410 => ("Expired", "too old resource version".to_string()),
        _ => ("InternalError", format!("fake failure of {op}")),
    };
    status(code, reason, &message)
}

fn ok(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[derive(Clone)]
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    runner_bin: PathBuf,
    root: PathBuf,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("fake cluster")
    }
}

/// The fake API server and kubelet.
pub struct FakeKube {
    pub url: String,
    shared: Shared,
    kubeconfig: PathBuf,
    server: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.server.abort();
        let processes: Vec<u32> = self.shared.lock().processes.values().copied().collect();
        for pid in processes {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

impl FakeKube {
    /// Starts the fake on a free loopback port, with a kubeconfig whose context's namespace
    /// is `namespace`.
    pub async fn start(namespace: &str) -> FakeKube {
        let dir = TempDir::new("fake-kube");
        let shared = Shared {
            cluster: Arc::default(),
            runner_bin: crate::bin("sluice-runner"),
            root: dir.path().to_path_buf(),
        };
        let app = Router::new()
            .route("/version", get(version))
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_or_watch).post(create),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).delete(delete),
            )
            .fallback(|| async { status(404, "NotFound", "the fake serves pods only") })
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n"
            ),
        )
        .expect("write the kubeconfig");
        FakeKube {
            url,
            shared,
            kubeconfig,
            server,
            _dir: dir,
        }
    }

    /// A kubeconfig pointing at the fake.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Stores key `key` of Secret `name` in `namespace`.
    pub fn set_secret(&self, namespace: &str, name: &str, key: &str, value: &str) {
        self.shared
            .lock()
            .secrets
            .entry((namespace.into(), name.into()))
            .or_default()
            .insert(key.into(), value.into());
    }

    /// Pods with this image never start (`ErrImagePull`).
    pub fn set_unpullable(&self, image: &str) {
        self.shared.lock().unpullable.insert(image.into());
    }

    /// The next `times` requests of `op` (`create`, `list`, `watch`, `get`, `delete`) fail
    /// with `code` (403 is a quota refusal, 409 a taken name).
    pub fn fail(&self, op: &str, code: u16, times: u32) {
        self.shared.lock().faults.push(Fault {
            op: op.into(),
            code,
            times,
        });
    }

    /// Drops every injected failure not yet used.
    pub fn heal(&self) {
        self.shared.lock().faults.clear();
    }

    /// Ends every open watch, and makes every version seen so far too old: a watch resumed
    /// from one gets `410 Gone` and must list again.
    pub fn expire_watches(&self) {
        let mut cluster = self.shared.lock();
        cluster.compacted = cluster.rv + 1;
        cluster.watchers.clear();
    }

    /// Requests of `op` so far (failed ones included).
    pub fn requests(&self, op: &str) -> usize {
        self.shared.lock().requests.get(op).copied().unwrap_or(0)
    }

    /// Requests refused for a missing or wrong token.
    pub fn unauthorized(&self) -> usize {
        self.shared.lock().unauthorized
    }

    /// The pods there now.
    pub fn pods(&self) -> Vec<Value> {
        self.shared.lock().pods.values().cloned().collect()
    }

    /// The pid of pod `name`'s runner process, while it runs.
    pub fn process(&self, namespace: &str, name: &str) -> Option<u32> {
        self.shared
            .lock()
            .processes
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
    }

    /// Puts a pod straight into the store (as another client would have), for the kubelet to
    /// run like any other.
    pub fn insert_pod(&self, namespace: &str, pod: Value) {
        let pod = stamp(namespace, pod);
        let created = self.shared.lock().changed("ADDED", pod.clone());
        run_pod(self.shared.clone(), created);
    }
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    if !ok {
        shared.lock().unauthorized += 1;
    }
    ok
}

async fn version(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    ok(
        StatusCode::OK,
        &json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "fake",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        }),
    )
}

async fn list_or_watch(
    State(shared): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let selector = parse_selector(query.get("labelSelector"));
    if query.get("watch").map(String::as_str) == Some("true") {
        return watch(shared, ns, selector, &query);
    }
    let mut cluster = shared.lock();
    if let Some(code) = cluster.fault("list") {
        return injected(code, "list");
    }
    let items: Vec<Value> = cluster
        .pods
        .iter()
        .filter(|((pns, _), pod)| *pns == ns && matches(&selector, pod))
        .map(|(_, pod)| pod.clone())
        .collect();
    ok(
        StatusCode::OK,
        &json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": cluster.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    shared: Shared,
    ns: String,
    selector: Vec<(String, String)>,
    query: &HashMap<String, String>,
) -> Response {
    let mut cluster = shared.lock();
    if let Some(code) = cluster.fault("watch") {
        return injected(code, "watch");
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    if from != 0 && from < cluster.compacted {
        // As the API server does: 200, one ERROR event with the 410 status, the end.
        let _ = tx.send(json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", cluster.compacted),
            "reason": "Expired", "code": 410,
        }}));
        drop(tx);
    } else {
        for (rv, kind, pod) in &cluster.history {
            let pns = pod["metadata"]["namespace"].as_str().unwrap_or("");
            if *rv > from && pns == ns && matches(&selector, pod) {
                let _ = tx.send(json!({"type": kind, "object": pod}));
            }
        }
        cluster.watchers.push((ns, selector, tx));
    }
    drop(cluster);
    let cluster = shared.cluster.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let lines = futures_util::stream::unfold(rx, move |mut rx| {
        let cluster = cluster.clone();
        async move {
            let bookmark = tokio::time::sleep(Duration::from_millis(500));
            tokio::select! {
                event = rx.recv() => event.map(|e| (Ok::<_, std::io::Error>(Bytes::from(format!("{e}\n"))), rx)),
                _ = bookmark, if bookmarks => {
                    let rv = cluster.lock().expect("fake cluster").rv;
                    let mark = json!({"type": "BOOKMARK", "object": {
                        "kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    Some((Ok(Bytes::from(format!("{mark}\n"))), rx))
                }
                _ = tokio::time::sleep_until(deadline) => None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .expect("response")
}

/// Fills in what the API server sets on a new pod.
fn stamp(ns: &str, mut pod: Value) -> Value {
    pod["metadata"]["namespace"] = json!(ns);
    pod["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    pod["metadata"]["creationTimestamp"] = json!(now());
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    if pod["status"]["phase"].is_null() {
        pod["status"] = json!({"phase": "Pending"});
    }
    pod
}

async fn create(
    State(shared): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let Ok(pod) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let Some(name) = pod["metadata"]["name"].as_str().map(String::from) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    let created = {
        let mut cluster = shared.lock();
        if let Some(code) = cluster.fault("create") {
            return injected(code, "create");
        }
        if cluster.pods.contains_key(&(ns.clone(), name.clone())) {
            return status(
                409,
                "AlreadyExists",
                &format!("pods \"{name}\" already exists"),
            );
        }
        cluster.changed("ADDED", stamp(&ns, pod))
    };
    run_pod(shared, created.clone());
    ok(StatusCode::CREATED, &created)
}

async fn get_pod(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let mut cluster = shared.lock();
    if let Some(code) = cluster.fault("get") {
        return injected(code, "get");
    }
    match cluster.pod_mut(&ns, &name) {
        Some(pod) => ok(StatusCode::OK, &pod),
        None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
    }
}

async fn delete(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut cluster = shared.lock();
    if let Some(code) = cluster.fault("delete") {
        return injected(code, "delete");
    }
    let Some(mut pod) = cluster.pod_mut(&ns, &name) else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    let grace = options["gracePeriodSeconds"]
        .as_u64()
        .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()))
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_u64())
        .unwrap_or(30);
    let process = cluster.processes.get(&(ns.clone(), name.clone())).copied();
    match process {
        Some(pid) if grace > 0 => {
            if pod["metadata"]["deletionTimestamp"].is_null() {
                pod["metadata"]["deletionTimestamp"] = json!(now());
                pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                pod = cluster.changed("MODIFIED", pod);
                signal(pid, nix::sys::signal::Signal::SIGTERM);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(grace)).await;
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                });
            }
            // The pod goes when its process has ended (see `run_pod`).
            ok(StatusCode::OK, &pod)
        }
        _ => {
            if let Some(pid) = process {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                cluster.processes.remove(&(ns.clone(), name.clone()));
            }
            let gone = cluster.changed("DELETED", pod);
            ok(StatusCode::OK, &gone)
        }
    }
}

/// The fake kubelet: runs pod `pod`'s runner container and reports its phase.
fn run_pod(shared: Shared, pod: Value) {
    tokio::spawn(async move {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
        let key = (ns.clone(), name.clone());
        let container = pod["spec"]["containers"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|c| c["name"] == "runner")
                    .or_else(|| c.first())
            })
            .cloned()
            .unwrap_or(Value::Null);
        let image = container["image"].as_str().unwrap_or("").to_string();
        let waiting = |reason: &str, message: &str| {
            json!([{"name": container["name"], "image": image, "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}])
        };
        if shared.lock().unpullable.contains(&image) {
            update(&shared, &key, |pod| {
                pod["status"]["containerStatuses"] = waiting(
                    "ErrImagePull",
                    &format!("failed to pull image \"{image}\": not found"),
                );
            });
            return;
        }
        let env = match resolve_env(&shared, &ns, &name, &container) {
            Ok(env) => env,
            Err(why) => {
                update(&shared, &key, |pod| {
                    pod["status"]["containerStatuses"] =
                        waiting("CreateContainerConfigError", &why);
                });
                return;
            }
        };
        let dir = shared.root.join(&ns).join(&name);
        let (workspace, tmp) = (dir.join("workspace"), dir.join("tmp"));
        let _ = std::fs::create_dir_all(&workspace);
        let _ = std::fs::create_dir_all(&tmp);
        let mut command = tokio::process::Command::new(&shared.runner_bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env)
            // The pod's emptyDir volumes.
            .env("SLUICE_RUNNER_WORKDIR", &workspace)
            .env("TMPDIR", &tmp)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("runner.log"))
                    .map(std::process::Stdio::from)
                    .unwrap_or_else(|_| std::process::Stdio::null()),
            )
            .kill_on_drop(true);
        sluice_sandbox::die_with_parent(command.as_std_mut(), nix::sys::signal::Signal::SIGKILL);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                update(&shared, &key, |pod| {
                    pod["status"]["containerStatuses"] =
                        waiting("RunContainerError", &err.to_string());
                });
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        {
            let mut cluster = shared.lock();
            if cluster.pods.contains_key(&key) {
                cluster.processes.insert(key.clone(), pid);
            } else {
                // Deleted while it was being started.
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        update(&shared, &key, |pod| {
            pod["status"]["phase"] = json!("Running");
            pod["status"]["containerStatuses"] = json!([{"name": container["name"], "image": image,
                "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": now()}}}]);
        });
        let status = child.wait().await;
        let code = status
            .as_ref()
            .ok()
            .and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().or_else(|| s.signal().map(|n| 128 + n))
            })
            .unwrap_or(255);
        let mut cluster = shared.lock();
        cluster.processes.remove(&key);
        let Some(mut pod) = cluster.pod_mut(&ns, &name) else {
            return;
        };
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            cluster.changed("DELETED", pod);
            return;
        }
        pod["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
        pod["status"]["containerStatuses"] = json!([{"name": container["name"], "image": image,
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}}}]);
        cluster.changed("MODIFIED", pod);
    });
}

/// Changes pod `key` with `change`, if it is still there.
fn update(shared: &Shared, key: &(String, String), change: impl FnOnce(&mut Value)) {
    let mut cluster = shared.lock();
    if let Some(mut pod) = cluster.pod_mut(&key.0, &key.1) {
        change(&mut pod);
        cluster.changed("MODIFIED", pod);
    }
}

/// The container's environment as the kubelet would give it.
fn resolve_env(
    shared: &Shared,
    ns: &str,
    name: &str,
    container: &Value,
) -> Result<Vec<(String, String)>, String> {
    let cluster = shared.lock();
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().unwrap_or("").to_string();
        if let Some(value) = var["value"].as_str() {
            env.push((key, value.to_string()));
        } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_object() {
            let secret_name = secret["name"].as_str().unwrap_or("");
            let secret_key = secret["key"].as_str().unwrap_or("");
            let value = cluster
                .secrets
                .get(&(ns.to_string(), secret_name.to_string()))
                .and_then(|s| s.get(secret_key))
                .ok_or_else(|| format!("secret \"{secret_name}\" not found"))?;
            env.push((key, value.clone()));
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            env.push((key, name.to_string()));
        }
    }
    Ok(env)
}
