//! The runner pool's Kubernetes backend (issue 21), against the testkit's fake API server:
//! the scheduler's real kube client creates, watches and deletes pods; the fake kubelet runs a
//! real `sluice-runner` for each pod. The kind suite (`kind.rs`) runs the same pool on a real
//! cluster.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_testkit::kube::FakeKube;
use sluice_testkit::{wait_until, Scheduler, TempDir, TestDb, Timings};

const NS: &str = "sluice-runners";

/// A pod template as a user would write one (no `SLUICE_API_URL`: the pods reach this
/// scheduler's own internal listener), with `env` added to the runner container.
fn template(env: &[(&str, &str)]) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  labels:\n    app.kubernetes.io/name: sluice-runner\n\
         spec:\n  containers:\n    - name: runner\n      image: sluice-runner:dev\n      env:\n\
         \x20       - name: RUST_LOG\n          value: info\n",
    );
    for (name, value) in env {
        text.push_str(&format!(
            "        - name: {name}\n          value: \"{value}\"\n"
        ));
    }
    text
}

/// A scheduler whose pool (one-slot runners, at least one warm) makes pods through `kube`,
/// with `settings` on top; the pod template gets `runner_env`.
async fn pooled(
    db: &TestDb,
    kube: &FakeKube,
    settings: &[(&str, &str)],
    runner_env: &[(&str, &str)],
) -> (Scheduler, TempDir) {
    let dir = TempDir::new("kube-pool");
    let template_path = dir.path().join("runner-pod.yaml");
    std::fs::write(&template_path, template(runner_env)).unwrap();
    // A replica joining a pool shares its secret (given in `settings`).
    let secret = settings
        .iter()
        .find(|(k, _)| *k == "SLUICE_RUNNER_SECRET")
        .map_or(
            format!("kube-secret-{}", uuid::Uuid::new_v4().simple()),
            |(_, v)| v.to_string(),
        );
    kube.set_secret(NS, "sluice-runner", "secret", &secret);
    let mut env = vec![
        ("SLUICE_POOL_BACKEND", "kubernetes"),
        ("KUBECONFIG", kube.kubeconfig().to_str().unwrap()),
        ("SLUICE_POOL_POD_TEMPLATE", template_path.to_str().unwrap()),
        ("SLUICE_POOL_MIN_WARM", "1"),
        ("SLUICE_POOL_RUNNER_SLOTS", "1"),
        ("SLUICE_RUNNER_SECRET", secret.as_str()),
    ];
    env.extend_from_slice(settings);
    let scheduler = Scheduler::start_with(db, Timings::FAST, &env).await;
    (scheduler, dir)
}

/// The pool's pods in the fake, not being deleted.
fn live_pods(kube: &FakeKube) -> Vec<Value> {
    kube.pods()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap().to_string()
}

/// Deletes pod `name` through the API, as `kubectl delete pod --grace-period=N` would.
async fn kubectl_delete(kube: &FakeKube, name: &str, grace: u64) -> u16 {
    reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/namespaces/{NS}/pods/{name}?gracePeriodSeconds={grace}",
            kube.url
        ))
        .bearer_auth(sluice_testkit::kube::TOKEN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The pool in pods: warm to the minimum with hardened pods (gVisor, no service-account
/// token, the secret by reference only, the pool's label), grown under a backlog up to
/// `max_warm` and no further, shrunk after `idle_timeout` (the drained pod exits and is
/// deleted), and a pod whose runner dies is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_pool_warms_grows_shrinks_and_replaces_pods() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    let (scheduler, _dir) = pooled(
        &db,
        &kube,
        &[
            ("SLUICE_POOL_MAX_WARM", "3"),
            ("SLUICE_POOL_IDLE_TIMEOUT_MS", "2000"),
        ],
        &[],
    )
    .await;
    let api = scheduler.api();
    let first = api
        .one_idle_pool_runner("the pool to warm one pod", None)
        .await;
    let pods = live_pods(&kube);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod = &pods[0];
    assert_eq!(name_of(pod), first);
    assert_eq!(pod["metadata"]["labels"]["sluice.dev/pool"], "default");
    assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    let text = pod.to_string();
    let secret = kube_secret(&scheduler);
    assert!(
        !text.contains(&secret),
        "the secret is in the pod spec: {text}"
    );
    assert!(
        text.contains("secretKeyRef"),
        "the secret comes from the Secret: {text}"
    );
    assert_eq!(kube.unauthorized(), 0, "every request carried the token");

    // Six one-slot jobs of 2 s: three pods, never more.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            api.enqueue(json!({"spec": {"kind": "bash", "script": "sleep 2"}}))
                .await,
        );
    }
    let most = std::sync::atomic::AtomicUsize::new(0);
    wait_until("three pods", Duration::from_secs(30), || async {
        let now = kube.pods().len();
        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        if now == 3 {
            Ok(Some(()))
        } else {
            Err(format!("{now} pods"))
        }
    })
    .await;
    let mut most = most.into_inner();
    for id in &ids {
        let job = api.wait_terminal(*id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        most = most.max(kube.pods().len());
    }
    assert!(most <= 3, "the pool grew past max_warm: {most}");

    // Idle past the timeout: the drained pods exit, are deleted, one stays.
    let left = api
        .one_idle_pool_runner("the pool to shrink to one", None)
        .await;
    wait_until(
        "the drained pods to be deleted",
        Duration::from_secs(30),
        || async {
            match kube.pods().as_slice() {
                [pod] if name_of(pod) == left => Ok(Some(())),
                other => Err(format!("{} pods", other.len())),
            }
        },
    )
    .await;

    // The runner in the pod dies: the pod fails, is deleted, and a fresh one replaces it.
    let pid = kube.process(NS, &left).expect("the runner process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    api.one_idle_pool_runner("a fresh pod to replace it", Some(&left))
        .await;
    wait_until(
        "the failed pod to be deleted",
        Duration::from_secs(30),
        || async {
            match kube.pods().iter().any(|p| name_of(p) == left) {
                false => Ok(Some(())),
                true => Err("still there".to_string()),
            }
        },
    )
    .await;
}

/// The registration secret the test gave the scheduler and the Secret.
fn kube_secret(scheduler: &Scheduler) -> String {
    scheduler.runner_secret.clone()
}

/// A busy pod deleted at once (`--grace-period=0`: the runner is killed): its lease ends
/// within a second of the deletion, not when it would have run out, and the job runs again
/// on a fresh pod. A pod deleted gracefully is drained first: it claims nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_busy_pod_revokes_its_lease_within_a_second() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    // Leases of 30 s: a revocation within a second cannot be their running out.
    let (scheduler, _dir) = pooled(
        &db,
        &kube,
        &[("SLUICE_LEASE_MS", "30000"), ("SLUICE_POOL_MAX_WARM", "2")],
        &[],
    )
    .await;
    let api = scheduler.api();
    api.one_idle_pool_runner("a warm pod", None).await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo attempt; sleep 600"}}))
        .await;
    let busy: String = wait_until("the job to run", Duration::from_secs(30), || async {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT r.pod_name FROM sluice.jobs j JOIN sluice.runners r ON r.id = j.runner_id
             WHERE j.id = $1 AND j.state = 'running'",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        Ok(row.map(|(name,)| name))
    })
    .await;
    assert_eq!(kubectl_delete(&kube, &busy, 0).await, 200);
    let deleted_at = tokio::time::Instant::now();
    wait_until("the lease to end", Duration::from_secs(5), || async {
        let ended: bool = sqlx::query_scalar(
            "SELECT state <> 'running' OR attempt > 1 OR lease_expires_at <= now()
             FROM sluice.jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        Ok(ended.then_some(()))
    })
    .await;
    let took = deleted_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the lease ended {took:?} after the pod's deletion"
    );
    // The job runs again, on another pod.
    wait_until("the second attempt", Duration::from_secs(30), || async {
        let row: Option<(i32, String)> = sqlx::query_as(
            "SELECT j.attempt, r.pod_name FROM sluice.jobs j JOIN sluice.runners r ON r.id = j.runner_id
             WHERE j.id = $1 AND j.state = 'running'",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        Ok(row.filter(|(attempt, pod)| *attempt == 2 && *pod != busy))
    })
    .await;

    // A graceful deletion of the busy pod: it is drained at once (listed `draining`).
    let second: String = sqlx::query_scalar(
        "SELECT r.pod_name FROM sluice.jobs j JOIN sluice.runners r ON r.id = j.runner_id
         WHERE j.id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kubectl_delete(&kube, &second, 30).await, 200);
    wait_until("the pod to drain", Duration::from_secs(10), || async {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT state FROM sluice.runners WHERE pod_name = $1 ORDER BY registered_at DESC LIMIT 1",
        )
        .bind(&second)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        match state.as_deref() {
            Some("draining") | Some("gone") => Ok(Some(())),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (status, _) = api
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
}

/// API errors: pod creation refused by a quota backs off (1 s, 2 s, …: a handful of
/// attempts, not a hot loop) and shows in `GET /api/runners` with the API's message until it
/// heals; a taken name (409) is retried under a new one; failing lists and watches (500) and
/// a watch resumed from a version the server no longer has (410 Gone) are retried, and a pod
/// deleted meanwhile is still noticed and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_back_off_and_heal_without_a_hot_loop() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    kube.fail("create", 409, 1);
    kube.fail("create", 403, 1000);
    let (scheduler, _dir) = pooled(&db, &kube, &[], &[]).await;
    let api = scheduler.api();
    let error: String = wait_until(
        "the quota error to show",
        Duration::from_secs(20),
        || async {
            let (_, body) = api.get(sluice_protocol::api::paths::RUNNERS).await;
            let pool = body["pools"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == "default"))
                .cloned();
            // First the taken name, then the quota.
            Ok(pool
                .and_then(|p| p["last_error"].as_str().map(String::from))
                .filter(|e| e.contains("exceeded quota")))
        },
    )
    .await;
    assert!(error.contains("exceeded quota"), "{error}");
    assert!(error.contains("403"), "{error}");
    // Over the next 3 s: at most a few attempts (back-off 1 s, 2 s, 4 s …).
    let before = kube.requests("create");
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < window {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = kube.requests("create") - before;
    assert!(during <= 3, "{during} create attempts in 3 s");
    let listed = std::process::Command::new(sluice_testkit::bin("sluice"))
        .args(["runners", "ls"])
        .env("SLUICE_API_URL", &scheduler.api_url)
        .env("SLUICE_API_TOKEN", &scheduler.api_token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("pool default: kubernetes backend") && text.contains("exceeded quota"),
        "{text}"
    );

    // Healed: the pool warms (under a new name each attempt, so the taken one did not
    // stick), and the error clears.
    kube.heal();
    let warm = api.one_idle_pool_runner("the pool to warm", None).await;
    wait_until("the error to clear", Duration::from_secs(20), || async {
        let (_, body) = api.get(sluice_protocol::api::paths::RUNNERS).await;
        let pool = body["pools"][0].clone();
        Ok(pool["last_error"].is_null().then_some(()))
    })
    .await;

    // The watch fails (500 on list and watch), its versions expire (410 Gone), and the pod
    // is deleted meanwhile: once the watch is back it sees that, and the pool replaces it.
    kube.fail("watch", 500, 2);
    kube.fail("list", 500, 1);
    kube.expire_watches();
    assert_eq!(kubectl_delete(&kube, &warm, 0).await, 200);
    api.one_idle_pool_runner("a replacement after the watch recovered", Some(&warm))
        .await;
    let watches = kube.requests("watch");
    assert!(watches < 50, "{watches} watch requests: a hot loop");
}

/// Two replicas share one pool: only one leads it (the pool holds `min_warm` pods, not twice
/// as many), and a leader collects the orphans it finds when it starts: a finished pod of
/// the pool, and one that can never start (its image cannot be pulled). When the leader
/// dies, the other replica takes over and adopts the registered pods (no pod created for
/// them); they go on serving through the internal Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_adopts_the_pods_and_collects_orphans() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    kube.insert_pod(
        NS,
        json!({"metadata": {"name": "orphan-finished", "labels": {"sluice.dev/pool": "default"}},
               "spec": {"containers": [{"name": "runner", "image": "x"}]},
               "status": {"phase": "Succeeded"}}),
    );
    kube.set_unpullable("no-such-image:1");
    kube.insert_pod(
        NS,
        json!({"metadata": {"name": "orphan-unpullable", "labels": {"sluice.dev/pool": "default"}},
               "spec": {"containers": [{"name": "runner", "image": "no-such-image:1"}]}}),
    );
    // The internal Service in front of both replicas.
    let service = sluice_testkit::proxy::Balancer::start().await;
    let settings = [
        ("SLUICE_POOL_MIN_WARM", "2"),
        ("SLUICE_POOL_MAX_WARM", "4"),
        ("SLUICE_POOL_INTERNAL_URL", service.url.as_str()),
    ];
    let (mut first, _dir1) = pooled(&db, &kube, &settings, &[]).await;
    service.add(&first.internal_url);
    let secret = first.runner_secret.clone();
    let mut second_env = settings.to_vec();
    second_env.push(("SLUICE_RUNNER_SECRET", secret.as_str()));
    let (second, _dir2) = pooled(&db, &kube, &second_env, &[]).await;
    service.add(&second.internal_url);
    let api = first.api();
    wait_until("two warm pods", Duration::from_secs(30), || async {
        let idle = api
            .pool_runners()
            .await
            .into_iter()
            .filter(|(_, s)| s == "idle")
            .count();
        Ok((idle == 2).then_some(()))
    })
    .await;
    wait_until(
        "the orphans to be collected",
        Duration::from_secs(30),
        || async {
            let names: Vec<String> = kube.pods().iter().map(name_of).collect();
            if names.iter().any(|n| n.starts_with("orphan-")) {
                Err(format!("{names:?}"))
            } else {
                Ok(Some(()))
            }
        },
    )
    .await;
    let adopted: Vec<String> = live_pods(&kube).iter().map(name_of).collect();
    assert_eq!(adopted.len(), 2, "one leader, min_warm pods: {adopted:?}");
    let creates = kube.requests("create");

    first.kill().await;
    let api = second.api();
    let pool_row = || async {
        let (_, body) = api.get(sluice_protocol::api::paths::RUNNERS).await;
        let pool = &body["pools"][0];
        (
            pool["holder"].as_str().unwrap_or("").to_string(),
            pool["updated_at"].as_str().unwrap_or("").to_string(),
        )
    };
    let pid = second.pid().unwrap();
    let taken_at = wait_until(
        "the second replica to lead",
        Duration::from_secs(30),
        || async {
            let (holder, updated_at) = pool_row().await;
            Ok(holder.ends_with(&format!("/{pid}")).then_some(updated_at))
        },
    )
    .await;
    // The leader rewrites its row every 10 s at the end of a tick: once it has, it has planned
    // with the adopted pods many times over.
    wait_until(
        "the new leader to tick with the adopted pods",
        Duration::from_secs(30),
        || async {
            let (holder, updated_at) = pool_row().await;
            Ok((holder.ends_with(&format!("/{pid}")) && updated_at != taken_at).then_some(()))
        },
    )
    .await;
    assert_eq!(
        kube.requests("create"),
        creates,
        "the new leader created pods although two registered ones were there"
    );
    // The adopted pods serve. (A job makes one of them busy, and the pool may then start a
    // pod to keep two idle: that is min_warm, not the take-over, so creates are not compared
    // after it.)
    let id = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let job = api.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let now: Vec<String> = live_pods(&kube).iter().map(name_of).collect();
    for name in &adopted {
        assert!(now.contains(name), "adopted pod {name} is gone: {now:?}");
    }
}

/// `SLUICE_RUNNER_RECYCLE_AFTER=1` in the pod template: every task gets a fresh pod, and the
/// used pods are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_recycle_after_one_every_task_gets_a_fresh_pod() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    let (scheduler, _dir) = pooled(
        &db,
        &kube,
        &[("SLUICE_POOL_MAX_WARM", "2")],
        &[("SLUICE_RUNNER_RECYCLE_AFTER", "1")],
    )
    .await;
    let api = scheduler.api();
    let mut pods = std::collections::HashSet::new();
    for n in 0..4 {
        let id = api
            .enqueue(json!({"spec": {"kind": "bash", "script": format!("echo {n}")}}))
            .await;
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let runner = job["attempts"][0]["runner_id"]
            .as_str()
            .unwrap()
            .to_string();
        let pod: String =
            sqlx::query_scalar("SELECT pod_name FROM sluice.runners WHERE id = $1::uuid")
                .bind(&runner)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(pods.insert(pod), "two tasks shared a pod");
    }
    wait_until(
        "the used pods to be deleted",
        Duration::from_secs(30),
        || async {
            let left: Vec<String> = kube
                .pods()
                .iter()
                .map(name_of)
                .filter(|n| pods.contains(n))
                .collect();
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
}

/// `SLUICE_POOL_BACKEND=auto`: Kubernetes when the API server answers, local runners (said
/// in one clear line) when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_kubernetes_when_it_answers_and_local_runners_otherwise() {
    let db = TestDb::new().await;
    let kube = FakeKube::start(NS).await;
    let (scheduler, _dir) = pooled(&db, &kube, &[("SLUICE_POOL_BACKEND", "auto")], &[]).await;
    let name = scheduler.api().one_idle_pool_runner("a pod", None).await;
    assert!(kube.pods().iter().any(|p| name_of(p) == name));
    assert!(
        scheduler
            .log_text()
            .contains("pool backend auto: Kubernetes at"),
        "{}",
        scheduler.log_text()
    );
    drop(scheduler);

    // A kubeconfig whose server refuses connections.
    let dir = TempDir::new("kube-unreachable");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let text = std::fs::read_to_string(kube.kubeconfig())
        .unwrap()
        .replace(&kube.url, &format!("http://127.0.0.1:{port}"));
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, text).unwrap();
    let runner_bin = sluice_testkit::bin("sluice-runner");
    let local = Scheduler::start_with(
        &db,
        Timings::FAST,
        &[
            ("SLUICE_POOL_BACKEND", "auto"),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("SLUICE_POOL_MIN_WARM", "1"),
            ("SLUICE_POOL_RUNNER_BIN", runner_bin.to_str().unwrap()),
            ("SLUICE_POOL_WORKDIR", dir.path().to_str().unwrap()),
        ],
    )
    .await;
    let api = local.api();
    wait_until("a local runner", Duration::from_secs(30), || async {
        let runners = api.pool_runners().await;
        Ok(runners
            .iter()
            .any(|(n, s)| s == "idle" && *n != name)
            .then_some(()))
    })
    .await;
    let log = local.log_text();
    assert!(
        log.contains("pool backend auto: using local runners"),
        "{log}"
    );
}
