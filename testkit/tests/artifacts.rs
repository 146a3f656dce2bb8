//! Workflow artifacts (issue 19): files written by a step are packed by its sidecar, stored
//! in Postgres under the step's lease, and unpacked beneath the workspace of each dependent
//! step — on another runner — before its tool starts; downloadable from the public API; and
//! a hostile archive (uploaded by a runner that lies) is refused by the dependent's sidecar
//! with nothing written outside its workspace.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_protocol::api::paths as api_paths;
use sluice_protocol::{paths, ArtifactSeal, Task};
use sluice_testkit::{run_step as step, wait_until, Api, FakeRunner, Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(60);

async fn register(api: &Api, name: &str, definition: &str) {
    api.register_workflow(name, definition).await;
}

async fn start(api: &Api, workflow: &str) -> i64 {
    api.start_run(json!({ "workflow": workflow })).await
}

async fn finished(api: &Api, id: i64) -> Value {
    api.run_finished(id, DEADLINE).await
}

/// The names in a tar archive.
fn names(archive: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = tar::Archive::new(archive)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn artifacts_flow_from_steps_to_their_dependents_on_other_runners() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _a = scheduler.runner("artifacts-a", 1).await;
    let _b = scheduler.runner("artifacts-b", 1).await;
    let api = scheduler.api();
    register(
        &api,
        "files",
        r#"
steps:
  - id: seed
    kind: bash
    script: "mkdir -p data && printf 'seed-42' > data/seed.txt"
    artifacts: ["data/**"]
  - id: left
    depends_on: [seed]
    kind: bash
    script: |
      sleep 1.5
      mkdir -p out/nested bin
      printf "left read $(cat data/seed.txt)" > out/nested/left.txt
      printf '#!/bin/sh\necho tool-ran\n' > bin/tool.sh && chmod +x bin/tool.sh
      printf 'not packed' > scratch.txt
    artifacts: ["out/**", "bin"]
  - id: right
    depends_on: [seed]
    kind: bash
    script: |
      sleep 1.5
      mkdir -p out && printf right > out/right.txt
      ln -s /etc/passwd out/link
      ln -s /etc/passwd "out/l$(printf '\303\257')nk"
    artifacts: ["out"]
  - id: join
    depends_on: [left, right]
    kind: bash
    script: |
      set -e
      cat out/nested/left.txt; echo
      cat out/right.txt; echo
      ./bin/tool.sh
      test ! -e out/link && echo no-link
      test ! -e scratch.txt && echo no-scratch
      test ! -e data/seed.txt && echo only-parents
"#,
    )
    .await;
    let id = start(&api, "files").await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        step(&done, "join")["output"]["stdout_tail"],
        "left read seed-42\nright\ntool-ran\nno-link\nno-scratch\nonly-parents\n"
    );
    // The two producers ran at once on different runners, so the join read at least one
    // archive packed on the other runner.
    let runners: Vec<(String, uuid::Uuid)> = sqlx::query_as(
        "SELECT j.step_id, a.runner_id FROM sluice.jobs j
         JOIN sluice.job_attempts a ON a.job_id = j.id
         WHERE j.workflow_run_id = $1 AND j.step_id IN ('left', 'right') ORDER BY 1",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(runners.len(), 2);
    assert_ne!(
        runners[0].1, runners[1].1,
        "both producers ran on one runner"
    );

    // Downloaded from the public API: the archive the step packed, with its digest.
    let (status, headers, body) = api.get_raw(&api_paths::run_artifacts(id, "right")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-tar");
    let digest: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(headers["x-sluice-sha256"].to_str().unwrap(), digest);
    assert_eq!(names(&body), ["out", "out/right.txt"]);
    // Listed in ASCII (JSON escapes), so every path fits in a header.
    let header = headers["x-sluice-skipped"].to_str().unwrap();
    assert!(header.contains("out/l\\u00efnk"), "{header}");
    let skipped: Value = serde_json::from_str(header).unwrap();
    assert_eq!(
        skipped,
        json!(["out/link (a link)", "out/l\u{ef}nk (a link)"])
    );
    let (_, _, left) = api.get_raw(&api_paths::run_artifacts(id, "left")).await;
    assert_eq!(
        names(&left),
        ["bin", "bin/tool.sh", "out/nested", "out/nested/left.txt"]
    );
    // A step without artifacts, a run that does not exist: JSON 404s.
    for path in [
        api_paths::run_artifacts(id, "join"),
        api_paths::run_artifacts(id + 1000, "left"),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn finished_runs_and_their_artifacts_are_pruned_after_their_retention() {
    let db = TestDb::new().await;
    let scheduler =
        Scheduler::start_with(&db, Timings::TEST, &[("SLUICE_RUN_RETENTION_SECONDS", "2")]).await;
    let _runner = scheduler.runner("retention", 1).await;
    let api = scheduler.api();
    register(
        &api,
        "kept",
        "steps: [{id: make, kind: bash, script: 'head -c 3000000 /dev/urandom > blob', artifacts: [blob]}]",
    )
    .await;
    let id = start(&api, "kept").await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Three chunks, downloadable until the retention passes.
    let (status, headers, body) = api.get_raw(&api_paths::run_artifacts(id, "make")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert_eq!(names(&body), ["blob"]);
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.artifact_chunks")
            .await,
        3
    );
    wait_until("the run to be pruned", DEADLINE, || async {
        let (status, _) = api.get(&api_paths::run(id)).await;
        Ok::<_, String>((status == 404).then_some(()))
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.artifact_chunks")
            .await
            + db.count("SELECT count(*) FROM sluice.step_artifacts").await
            + db.count("SELECT count(*) FROM sluice.run_steps").await,
        0
    );
}

/// A tar header block with any name and type.
fn raw_header(name: &str, kind: tar::EntryType, size: u64, link: &str) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    let bytes = header.as_mut_bytes();
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    bytes[157..157 + link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    header.as_bytes().to_vec()
}

/// The headers naming `task`'s lease; with `source`, an input download's source attempt.
fn lease(task: &Task, source: Option<i32>) -> Vec<(&'static str, String)> {
    use sluice_protocol::lease_headers as names;
    let mut headers = vec![
        (names::ATTEMPT, task.attempt.0.to_string()),
        (names::LEASE_TOKEN, task.lease_token.0.to_string()),
    ];
    if let Some(source) = source {
        headers.push((names::SOURCE_ATTEMPT, source.to_string()));
    }
    headers
}

/// Claims the one task of `step` as the fake runner.
async fn claim_step(runner: &FakeRunner, step: &str) -> Task {
    wait_until(
        &format!("{step} to be claimable"),
        DEADLINE,
        || async move {
            let tasks = runner.claim(1, 200).await;
            Ok::<_, String>(tasks.into_iter().next())
        },
    )
    .await
    .tap(|task: &Task| assert!(task.context.is_some(), "{step} is a step"))
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl<T> Tap for T {}

#[tokio::test]
async fn a_hostile_archive_is_refused_by_the_dependent_with_nothing_written_outside() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    register(
        &api,
        "hostile",
        r#"
steps:
  - {id: evil, kind: bash, script: "true", artifacts: ["x"]}
  - {id: victim, depends_on: [evil], kind: bash, script: "echo the tool ran"}
"#,
    )
    .await;
    let id = start(&api, "hostile").await;
    let liar = FakeRunner::register(&scheduler, "liar").await;
    let task = claim_step(&liar, "evil").await;
    assert_eq!(task.artifacts.as_ref().unwrap().collect, ["x"]);

    // A traversal after a harmless file, a link, and a file claiming 10 GB.
    let mut archive = raw_header("ok.txt", tar::EntryType::Regular, 2, "");
    archive.extend(b"ok");
    archive.resize(1024, 0);
    archive.extend(raw_header("../escaped", tar::EntryType::Regular, 5, ""));
    archive.extend(b"owned");
    archive.resize(2048, 0);
    archive.extend(raw_header("link", tar::EntryType::Symlink, 0, "/"));
    archive.extend(raw_header("huge", tar::EntryType::Regular, 10 << 30, ""));
    archive.extend([0u8; 1024]);
    let digest: String = Sha256::digest(&archive)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // The fence: another lease, a chunk past the bound, a seal that does not match.
    let stranger = vec![
        (
            sluice_protocol::lease_headers::ATTEMPT,
            task.attempt.0.to_string(),
        ),
        (
            sluice_protocol::lease_headers::LEASE_TOKEN,
            uuid::Uuid::new_v4().to_string(),
        ),
    ];
    let (status, body) = liar
        .put_bytes(
            &paths::artifact_chunk(task.job_id, 0),
            &stranger,
            archive.clone(),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = liar
        .put_bytes(
            &paths::artifact_chunk(task.job_id, 5000),
            &lease(&task, None),
            vec![1],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("seq"),
        "{body}"
    );
    let (status, body) = liar
        .put_bytes(
            &paths::artifact_chunk(task.job_id, 0),
            &lease(&task, None),
            archive.clone(),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let seal = |bytes: u64| ArtifactSeal {
        attempt: task.attempt,
        lease_token: task.lease_token,
        chunks: 1,
        bytes,
        sha256: digest.clone(),
        entries: 4,
        skipped: vec!["a\0b".into()],
    };
    let (status, body) = liar
        .send(
            &paths::artifact_seal(task.job_id),
            &seal(archive.len() as u64 - 1),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chunks of"),
        "{body}"
    );
    let (status, body) = liar
        .send(
            &paths::artifact_seal(task.job_id),
            &seal(archive.len() as u64),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = liar.complete(&task, json!({})).await;
    assert_eq!(status, 200, "{body}");

    // The victim's sidecar downloads it, refuses it, and never runs the tool.
    let victim = scheduler.runner("victim", 1).await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    let job = &step(&done, "victim")["jobs"][0];
    let (_, job) = api.get(&format!("/api/jobs/{}", job["id"])).await;
    assert_eq!(job["error"]["code"], "artifact_refused", "{job}");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("'..'"),
        "{job}"
    );
    assert_eq!(
        job["attempts"].as_array().unwrap().len(),
        1,
        "refused for good, not retried: {job}"
    );
    assert_eq!(job["result"], json!({}), "the tool never ran: {job}");
    // Nothing beside the workspaces but what the sidecar keeps there.
    let workdir = victim.workdir.path();
    let left: Vec<String> = std::fs::read_dir(workdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|name| name.contains("escaped")),
        "{left:?}"
    );
    assert!(!workdir.parent().unwrap().join("escaped").exists());
    assert!(left.iter().all(|name| !name.ends_with(".tar")), "{left:?}");

    // A stranger's lease reads nothing; the liar's finished lease neither.
    let (status, _) = liar
        .get_raw(
            &paths::artifact_input(task.job_id, task.job_id, 0),
            &lease(&task, Some(task.attempt.0)),
        )
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn a_runner_killed_mid_upload_leaves_nothing_half_sealed_and_the_retry_hands_on_the_whole_file(
) {
    let db = TestDb::new().await;
    // Leases of 5 s: 60 MB through a debug build on two cores must not cost the retry its
    // lease as well.
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let mut first = scheduler.runner("upload-killed", 1).await;
    let api = scheduler.api();
    register(
        &api,
        "handover",
        r#"
steps:
  - id: produce
    kind: bash
    script: "head -c 60000000 /dev/urandom > blob && sha256sum blob | cut -c1-64"
    artifacts: [blob]
  - id: consume
    depends_on: [produce]
    kind: bash
    script: "sha256sum blob | cut -c1-64"
"#,
    )
    .await;
    let id = start(&api, "handover").await;
    // Killed once the first chunks of its upload are stored, long before the seal.
    wait_until("the upload to begin", DEADLINE, || async {
        let chunks = db
            .count("SELECT count(*) FROM sluice.artifact_chunks")
            .await;
        Ok::<_, String>((chunks > 0).then_some(()))
    })
    .await;
    first.kill().await;
    let stored = db
        .count("SELECT count(*) FROM sluice.artifact_chunks")
        .await;
    assert!(
        stored < 58,
        "the whole upload was done before the kill ({stored} chunks)"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.step_artifacts").await,
        0
    );

    let _second = scheduler.runner("upload-retried", 1).await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let made = step(&done, "produce")["output"]["stdout_tail"].clone();
    assert_eq!(step(&done, "consume")["output"]["stdout_tail"], made);
    // The killed attempt's chunks went with the retry's seal; one sealed set remains.
    let (attempts, sealed_attempt, chunks): (i32, i32, i64) = sqlx::query_as(
        "SELECT j.attempt, a.attempt,
                (SELECT count(*) FROM sluice.artifact_chunks c WHERE c.job_id = j.id)
         FROM sluice.jobs j JOIN sluice.step_artifacts a ON a.job_id = j.id
         WHERE j.workflow_run_id = $1 AND j.step_id = 'produce'",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (_, job) = api
        .get(&format!(
            "/api/jobs/{}",
            step(&done, "produce")["jobs"][0]["id"]
        ))
        .await;
    // (A loaded machine may cost the second attempt its lease too: the last one sealed.)
    assert!(attempts >= 2 && sealed_attempt == attempts, "{job}");
    assert_eq!(
        chunks, 58,
        "60,000,000 bytes and the tar headers in 1 MiB chunks"
    );
}

/// Uploads `archive` as one chunk and seals it, as the fake runner holding `task`.
async fn upload(runner: &FakeRunner, task: &Task, archive: &[u8]) {
    let (status, body) = runner
        .put_bytes(
            &paths::artifact_chunk(task.job_id, 0),
            &lease(task, None),
            archive.to_vec(),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let seal = ArtifactSeal {
        attempt: task.attempt,
        lease_token: task.lease_token,
        chunks: 1,
        bytes: archive.len() as u64,
        sha256: Sha256::digest(archive)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        entries: 1,
        skipped: vec![],
    };
    let (status, body) = runner.send(&paths::artifact_seal(task.job_id), &seal).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn each_for_each_job_gets_its_parents_set_once_and_a_step_that_never_seals_fails_its_run() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    register(
        &api,
        "fan",
        r#"
steps:
  - {id: make, kind: bash, script: "true", artifacts: [data]}
  - {id: each, depends_on: [make], kind: bash, script: "true",
     for_each: steps.make.output.items}
"#,
    )
    .await;
    let id = start(&api, "fan").await;
    let runner = FakeRunner::register(&scheduler, "fan").await;
    let make = claim_step(&runner, "make").await;
    let mut archive = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_mode(0o600);
    archive
        .append_data(&mut header, "data", &b"42"[..])
        .unwrap();
    let archive = archive.into_inner().unwrap();
    upload(&runner, &make, &archive).await;
    // A sealed set is final: its chunks cannot be overwritten.
    let (status, _) = runner
        .put_bytes(
            &paths::artifact_chunk(make.job_id, 0),
            &lease(&make, None),
            vec![0u8; 10],
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = runner
        .complete(&make, json!({"items": [1, 2, 3, 4, 5]}))
        .await;
    assert_eq!(status, 200, "{body}");
    // All five jobs of the for_each step in one claim, each with the parent's set once.
    let tasks = wait_until("the five jobs", DEADLINE, || async {
        let tasks = runner.claim(10, 200).await;
        Ok::<_, String>((!tasks.is_empty()).then_some(tasks))
    })
    .await;
    assert_eq!(tasks.len(), 5);
    for task in &tasks {
        let inputs = &task.artifacts.as_ref().unwrap().inputs;
        assert_eq!(inputs.len(), 1, "{inputs:?}");
        assert_eq!(
            (inputs[0].step.as_str(), inputs[0].bytes),
            ("make", archive.len() as u64)
        );
        // A dependent reads its parent's set, chunk by chunk.
        let (status, chunk) = runner
            .get_raw(
                &paths::artifact_input(task.job_id, inputs[0].job_id, 0),
                &lease(task, Some(inputs[0].attempt.0)),
            )
            .await;
        assert_eq!((status, chunk.len()), (200, archive.len()));
    }
    for task in &tasks {
        runner.complete(task, json!({})).await;
    }
    assert_eq!(finished(&api, id).await["state"], "succeeded");

    // A step that declares artifacts and succeeds without sealing them fails its run.
    let id = start(&api, "fan").await;
    let make = claim_step(&runner, "make").await;
    let (status, body) = runner.complete(&make, json!({"items": [1]})).await;
    assert_eq!(status, 200, "{body}");
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(
        done["error"]["error"]["code"], "artifacts_missing",
        "{done}"
    );
    assert_eq!(step(&done, "make")["state"], "failed");
    assert_eq!(step(&done, "each")["state"], "cancelled");
}
