//! deploy/ (issue 21), statically: the kustomize base and the kind overlay rendered (with
//! `kubectl kustomize` where kubectl exists, else their resources and generators read
//! directly), and every promise of deploy/README.md asserted on the result — Pod Security
//! labels, the admission policy fencing the runners' namespace and that the runner template
//! passes it, the capabilities the README lists, the scheduler's `restricted` fields, RBAC,
//! NetworkPolicies, the Dockerfiles.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The deploy tree copied to a temporary directory, with the kind overlay's generated
/// Secret sources written as `secrets.sh` would.
fn staged() -> sluice_testkit::TempDir {
    let dir = sluice_testkit::TempDir::new("deploy");
    copy_tree(&deploy_dir(), dir.path());
    let kind = dir.path().join("overlays/kind");
    std::fs::write(
        kind.join("postgres.env"),
        "POSTGRES_USER=sluice\nPOSTGRES_PASSWORD=pw-test\nPOSTGRES_DB=sluice\n",
    )
    .unwrap();
    std::fs::write(
        kind.join("sluice.env"),
        "api-token=token-test\nrunner-secret=runner-test\ndatabase-url=postgres://sluice:pw-test@postgres.sluice.svc:5432/sluice\n",
    )
    .unwrap();
    std::fs::write(kind.join("runner.env"), "secret=runner-test\n").unwrap();
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else if !entry.file_name().to_string_lossy().ends_with(".env") {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn kubectl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubectl"))
            .find(|path| path.is_file())
    })
}

/// The objects of kustomization `dir`.
fn render(dir: &Path) -> Vec<Value> {
    if let Some(kubectl) = kubectl() {
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        return documents(&String::from_utf8(out.stdout).unwrap());
    }
    eprintln!("kubectl not found: reading the kustomizations' resources directly");
    read_kustomization(dir)
}

/// What `kubectl kustomize` would give for the kustomizations here (resources, files and
/// directories; ConfigMap and Secret generators without name suffixes): no patches are used.
fn read_kustomization(dir: &Path) -> Vec<Value> {
    use base64::Engine;
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let kustomization = &documents(&text)[0];
    assert!(
        kustomization.get("patches").is_none(),
        "the fallback renderer knows no patches"
    );
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().into_iter().flatten() {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            objects.extend(read_kustomization(&path));
        } else {
            objects.extend(documents(&std::fs::read_to_string(path).unwrap()));
        }
    }
    for generator in kustomization["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let mut data = serde_json::Map::new();
        for file in generator["files"].as_array().into_iter().flatten() {
            let file = file.as_str().unwrap();
            data.insert(
                file.to_string(),
                Value::String(std::fs::read_to_string(dir.join(file)).unwrap()),
            );
        }
        objects.push(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "namespace": generator["namespace"]},
            "data": data}));
    }
    for generator in kustomization["secretGenerator"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let mut data = serde_json::Map::new();
        for file in generator["envs"].as_array().into_iter().flatten() {
            let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let (key, value) = line.split_once('=').unwrap();
                data.insert(
                    key.to_string(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(value)),
                );
            }
        }
        objects.push(
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": generator["name"], "namespace": generator["namespace"]},
            "data": data}),
        );
    }
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, namespace: Option<&str>, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"].as_str() == namespace
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace:?}/{name}"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The capabilities deploy/README.md lists for the runner (its `- \`CAP\`...` bullets in
/// the Pod Security section).
fn readme_capabilities() -> BTreeSet<String> {
    let text = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    let section = text
        .split("## Pod Security: the decision")
        .nth(1)
        .unwrap()
        .split("Both `restricted`")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("- `"))
        .flat_map(|l| {
            let names = l.split(" — ").next().unwrap();
            names
                .split(", ")
                .map(|n| n.trim_start_matches("- ").trim_matches('`').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The rules of Pod Security `restricted` that apply to a pod spec (the subset our pods
/// could break): non-root, no privilege escalation, capabilities dropped, RuntimeDefault
/// seccomp, no host namespaces or host paths, allowed volume kinds only.
fn assert_restricted(what: &str, spec: &Value) {
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_ne!(spec["securityContext"]["runAsUser"], 0, "{what}");
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(spec[host], true, "{what}: {host}");
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&String> = volume
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        assert!(
            kinds.iter().all(|k| matches!(
                k.as_str(),
                "configMap" | "emptyDir" | "secret" | "projected" | "downwardAPI"
            )),
            "{what}: volume {volume}"
        );
    }
    for container in spec["containers"].as_array().unwrap() {
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
        assert_ne!(security["privileged"], true, "{what}");
        assert!(
            strings(&security["capabilities"]["drop"]).contains("ALL"),
            "{what}"
        );
        assert!(
            strings(&security["capabilities"]["add"])
                .iter()
                .all(|c| c == "NET_BIND_SERVICE"),
            "{what}"
        );
        assert_eq!(
            container["resources"]["limits"]["memory"],
            container["resources"]["requests"]["memory"],
            "{what}: memory limit = request"
        );
    }
}

/// The admission policy's rules, evaluated in Rust on a pod spec: the template must pass
/// each, and the policy must state each.
fn admission_failures(spec: &Value, allowed: &BTreeSet<String>) -> Vec<&'static str> {
    let mut failed = Vec::new();
    if spec["runtimeClassName"] != "gvisor" {
        failed.push("runtimeClassName");
    }
    if spec["automountServiceAccountToken"] != false {
        failed.push("automountServiceAccountToken");
    }
    if ["hostNetwork", "hostPID", "hostIPC"]
        .iter()
        .any(|h| spec[*h] == true)
    {
        failed.push("host namespaces");
    }
    if spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| !v["hostPath"].is_null())
    {
        failed.push("hostPath");
    }
    if spec["securityContext"]["seccompProfile"]["type"] != "RuntimeDefault" {
        failed.push("seccomp");
    }
    let containers = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["initContainers"].as_array().into_iter().flatten());
    for c in containers {
        let s = &c["securityContext"];
        if s["privileged"] == true {
            failed.push("privileged");
        }
        if s["allowPrivilegeEscalation"] != false {
            failed.push("allowPrivilegeEscalation");
        }
        if s["readOnlyRootFilesystem"] != true {
            failed.push("readOnlyRootFilesystem");
        }
        if !strings(&s["capabilities"]["drop"]).contains("ALL") {
            failed.push("drop ALL");
        }
        if !strings(&s["capabilities"]["add"]).is_subset(allowed) {
            failed.push("capabilities added");
        }
        if c["resources"]["limits"]["memory"].is_null() {
            failed.push("memory limit");
        }
    }
    failed
}

#[test]
fn the_base_keeps_every_promise_of_the_readme() {
    let dir = staged();
    let objects = render(&dir.path().join("base"));

    // Namespaces: the scheduler's restricted; the runners' privileged, seen at baseline.
    let labels = |name: &str| find(&objects, "Namespace", None, name)["metadata"]["labels"].clone();
    let sluice = labels("sluice");
    assert_eq!(sluice["pod-security.kubernetes.io/enforce"], "restricted");
    let runners = labels("sluice-runners");
    assert_eq!(runners["pod-security.kubernetes.io/enforce"], "privileged");
    assert_eq!(runners["pod-security.kubernetes.io/warn"], "baseline");
    assert_eq!(runners["pod-security.kubernetes.io/audit"], "baseline");

    let runtime = find(&objects, "RuntimeClass", None, "gvisor");
    assert_eq!(runtime["handler"], "runsc");

    // The admission policy, bound to the runners' namespace, denying.
    let policy = find(
        &objects,
        "ValidatingAdmissionPolicy",
        None,
        "sluice-runner-pods",
    );
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let rules = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(
        strings(&rules["operations"]),
        ["CREATE", "UPDATE"].map(String::from).into()
    );
    assert!(strings(&rules["resources"]).contains("pods"));
    assert!(strings(&rules["resources"]).contains("pods/ephemeralcontainers"));
    let expressions: Vec<String> = policy["spec"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["expression"].as_str().unwrap().to_string())
        .collect();
    let all = expressions.join("\n");
    for needle in [
        "runtimeClassName == 'gvisor'",
        "automountServiceAccountToken == false",
        "hostNetwork",
        "hostPID",
        "hostIPC",
        "hostPath",
        "ephemeralContainers",
        "seccompProfile.type == 'RuntimeDefault'",
        "c.securityContext.privileged",
        "allowPrivilegeEscalation == false",
        "readOnlyRootFilesystem == true",
        "'ALL' in c.securityContext.capabilities.drop",
        "resources.limits.memory",
    ] {
        assert!(all.contains(needle), "the policy does not check {needle}");
    }
    let add_rule = expressions
        .iter()
        .find(|e| e.contains("capabilities.add"))
        .expect("a rule on added capabilities");
    let allowed: BTreeSet<String> = add_rule
        .split('[')
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap()
        .split(',')
        .map(|c| c.trim().trim_matches('\'').to_string())
        .collect();
    assert_eq!(allowed, readme_capabilities(), "policy vs README");
    let binding = find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        None,
        "sluice-runner-pods",
    );
    assert_eq!(binding["spec"]["policyName"], "sluice-runner-pods");
    assert_eq!(
        strings(&binding["spec"]["validationActions"]),
        ["Deny".to_string()].into()
    );
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"],
        "sluice-runners"
    );

    // The runner template: in the ConfigMap the scheduler mounts, the same as the default
    // built into the scheduler, passing the policy, hardened as the README says.
    let config = find(
        &objects,
        "ConfigMap",
        Some("sluice"),
        "sluice-runner-pod-template",
    );
    let text = config["data"]["runner-pod.yaml"].as_str().unwrap();
    assert_eq!(text, sluice::service::pool::kubernetes::DEFAULT_TEMPLATE);
    let template = &documents(text)[0];
    assert_eq!(template["kind"], "Pod");
    let spec = &template["spec"];
    assert_eq!(admission_failures(spec, &allowed), Vec::<&str>::new());
    let runner = &spec["containers"][0];
    assert_eq!(runner["name"], "runner");
    assert_eq!(
        strings(&runner["securityContext"]["capabilities"]["add"]),
        readme_capabilities(),
        "template vs README"
    );
    assert_eq!(
        strings(&runner["securityContext"]["capabilities"]["drop"]),
        ["ALL".to_string()].into()
    );
    assert_eq!(
        runner["resources"]["limits"]["memory"],
        runner["resources"]["requests"]["memory"]
    );
    let workspace = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "workspace")
        .unwrap();
    assert!(
        workspace["emptyDir"]["sizeLimit"].is_string(),
        "{workspace}"
    );
    assert!(
        runner["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "SLUICE_RUNNER_SECRET"),
        "the secret is added by the pool, by reference"
    );
    // And the pool's pod from it still passes (the pool forces its own fields on top).
    let pod = serde_json::to_value(sluice::service::pool::kubernetes::pod_for(
        &kube_settings(),
        &sluice::service::pool::StartSpec {
            name: "pool-test-1",
            internal_url: "http://127.0.0.1:1",
            secret: "s",
            slots: 2,
        },
    ))
    .unwrap();
    assert_eq!(
        admission_failures(&pod["spec"], &allowed),
        Vec::<&str>::new()
    );

    // The scheduler: two replicas, probes, restricted in every field, secrets by reference.
    let deployment = find(&objects, "Deployment", Some("sluice"), "sluice-scheduler");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_restricted("scheduler", pod);
    assert_eq!(pod["serviceAccountName"], "sluice-scheduler");
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for secret in ["DATABASE_URL", "SLUICE_API_TOKEN", "SLUICE_RUNNER_SECRET"] {
        let var = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == secret)
            .unwrap();
        assert!(var["value"].is_null(), "{secret} is a literal");
        assert_eq!(var["valueFrom"]["secretKeyRef"]["name"], "sluice");
    }
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["value"]
            .clone()
    };
    assert_eq!(env("SLUICE_POOL_BACKEND"), "kubernetes");
    assert_eq!(env("SLUICE_POOL_NAMESPACE"), "sluice-runners");
    let ports = |name: &str| {
        find(&objects, "Service", Some("sluice"), name)["spec"]["ports"][0]["port"].clone()
    };
    assert_eq!(ports("sluice"), 7070);
    assert_eq!(ports("sluice-internal"), 7071);

    // RBAC: pods in the runners' namespace, these verbs, nothing else.
    let role = find(
        &objects,
        "Role",
        Some("sluice-runners"),
        "sluice-runner-pool",
    );
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0]["resources"]), ["pods".to_string()].into());
    assert_eq!(
        strings(&rules[0]["verbs"]),
        ["create", "delete", "get", "list", "watch"]
            .map(String::from)
            .into()
    );
    let binding = find(
        &objects,
        "RoleBinding",
        Some("sluice-runners"),
        "sluice-runner-pool",
    );
    assert_eq!(binding["subjects"][0]["name"], "sluice-scheduler");
    assert_eq!(binding["subjects"][0]["namespace"], "sluice");
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding"),
        "no cluster-wide rights"
    );

    assert_network_policies(&objects);
}

fn kube_settings() -> sluice::service::pool::KubernetesSettings {
    sluice::service::pool::KubernetesSettings {
        config: sluice::service::pool::kubernetes::KubeConfig::new(
            "http://127.0.0.1:1".parse().unwrap(),
        ),
        namespace: "sluice-runners".into(),
        pool: "default".into(),
        template: sluice::service::pool::kubernetes::template(
            sluice::service::pool::kubernetes::DEFAULT_TEMPLATE,
        )
        .unwrap(),
        secret_name: "sluice-runner".into(),
        secret_key: "secret".into(),
        runtime_class: "gvisor".into(),
        internal_url: None,
    }
}

/// Default deny in both namespaces; runners reach only the scheduler's internal port and
/// DNS; schedulers take 7070 from anywhere and 7071 from runners, reach Postgres, DNS and
/// the API server; Postgres takes only schedulers.
fn assert_network_policies(objects: &[Value]) {
    for ns in ["sluice", "sluice-runners"] {
        let deny = find(objects, "NetworkPolicy", Some(ns), "default-deny");
        assert_eq!(deny["spec"]["podSelector"], serde_json::json!({}));
        assert_eq!(
            strings(&deny["spec"]["policyTypes"]),
            ["Egress", "Ingress"].map(String::from).into()
        );
        assert!(deny["spec"]["ingress"].is_null() && deny["spec"]["egress"].is_null());
    }
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["namespace"] == "sluice-runners")
        .collect();
    assert_eq!(policies.len(), 2, "default deny and runner egress only");
    let runner = find(
        objects,
        "NetworkPolicy",
        Some("sluice-runners"),
        "runner-egress",
    );
    assert_eq!(
        strings(&runner["spec"]["policyTypes"]),
        ["Egress".to_string()].into()
    );
    let egress = runner["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 2, "{egress:?}");
    let to_scheduler = &egress[0];
    assert_eq!(
        to_scheduler["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "sluice"
    );
    assert_eq!(
        to_scheduler["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "sluice-scheduler"
    );
    assert_eq!(
        to_scheduler["ports"],
        serde_json::json!([{"protocol": "TCP", "port": 7071}])
    );
    let dns = &egress[1];
    assert_eq!(
        dns["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    let dns_ports: BTreeSet<String> = dns["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}/{}", p["protocol"].as_str().unwrap(), p["port"]))
        .collect();
    assert_eq!(dns_ports, ["TCP/53", "UDP/53"].map(String::from).into());
    assert!(
        !runner.to_string().contains("ipBlock"),
        "runners reach no address range"
    );

    let scheduler = find(objects, "NetworkPolicy", Some("sluice"), "scheduler");
    let ingress = scheduler["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2);
    assert!(ingress[0]["from"].is_null());
    assert_eq!(ingress[0]["ports"][0]["port"], 7070);
    assert_eq!(ingress[1]["ports"][0]["port"], 7071);
    assert_eq!(
        ingress[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "sluice-runner"
    );
    let egress = scheduler["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress[0]["ports"][0]["port"], 5432);
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "postgres"
    );
    let postgres = find(objects, "NetworkPolicy", Some("sluice"), "postgres");
    let from = &postgres["spec"]["ingress"][0];
    assert_eq!(
        postgres["spec"]["ingress"].as_array().unwrap().len(),
        1,
        "Postgres takes schedulers only"
    );
    assert_eq!(
        from["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "sluice-scheduler"
    );
    assert!(
        from["from"][0]["namespaceSelector"].is_null(),
        "its own namespace only"
    );
    assert_eq!(from["ports"][0]["port"], 5432);
}

#[test]
fn the_kind_overlay_adds_postgres_and_one_runner_secret_for_both_namespaces() {
    use base64::Engine;
    let dir = staged();
    let objects = render(&dir.path().join("overlays/kind"));
    let base = render(&dir.path().join("base"));
    for object in &base {
        assert!(
            objects.iter().any(|o| o["kind"] == object["kind"]
                && o["metadata"]["name"] == object["metadata"]["name"]
                && o["metadata"]["namespace"] == object["metadata"]["namespace"]),
            "the overlay lost {} {}",
            object["kind"],
            object["metadata"]["name"]
        );
    }
    let postgres = find(&objects, "Deployment", Some("sluice"), "postgres");
    assert_restricted("postgres", &postgres["spec"]["template"]["spec"]);
    assert_eq!(
        postgres["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "postgres"
    );
    let secret = |ns: &str, name: &str, key: &str| {
        let object = find(&objects, "Secret", Some(ns), name);
        // Long values may come folded over lines.
        let encoded: String = object["data"][key]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        secret("sluice", "sluice", "runner-secret"),
        secret("sluice-runners", "sluice-runner", "secret"),
        "the scheduler and its pods share one registration secret"
    );
    assert!(secret("sluice", "sluice", "database-url").contains("postgres.sluice.svc:5432"));
    // The cluster config gives containerd the runsc runtime the RuntimeClass names.
    let cluster = std::fs::read_to_string(deploy_dir().join("overlays/kind/cluster.yaml")).unwrap();
    assert!(cluster.contains("containerd.runtimes.runsc"));
    assert!(cluster.contains("io.containerd.runsc.v1"));
    // The generated sources are never committed.
    let ignore = std::fs::read_to_string(deploy_dir().join("../.gitignore")).unwrap();
    assert!(ignore.contains("/deploy/overlays/kind/*.env"));
}

#[test]
fn internet_egress_is_opt_in_and_never_reaches_cluster_ranges_or_metadata() {
    let text = std::fs::read_to_string(
        deploy_dir().join("components/runner-internet/runner-internet.yaml"),
    )
    .unwrap();
    let policy = &documents(&text)[0];
    let block = &policy["spec"]["egress"][0]["to"][0]["ipBlock"];
    assert_eq!(block["cidr"], "0.0.0.0/0");
    let except = strings(&block["except"]);
    for range in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
    ] {
        assert!(except.contains(range), "{range} is reachable");
    }
    let base = std::fs::read_to_string(deploy_dir().join("base/kustomization.yaml")).unwrap();
    assert!(!base.contains("runner-internet"), "opt-in, not in the base");
}

#[test]
fn the_images_are_multi_stage_and_the_scheduler_runs_as_non_root() {
    let read =
        |name: &str| std::fs::read_to_string(deploy_dir().join("docker").join(name)).unwrap();
    let scheduler = read("scheduler.Dockerfile");
    let runner = read("runner.Dockerfile");
    for (name, text) in [("scheduler", &scheduler), ("runner", &runner)] {
        let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
        assert!(stages >= 2, "{name}: {stages} stages");
        assert!(text.contains("cargo build --release --locked"), "{name}");
    }
    let user = |text: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap()
            .to_string()
    };
    assert_eq!(user(&scheduler), "65532:65532");
    assert!(scheduler.contains("distroless"), "a small runtime image");
    // The runner is root only inside gVisor, as the README argues.
    assert_eq!(user(&runner), "0:0");
    assert!(runner.contains("gVisor"));
}
