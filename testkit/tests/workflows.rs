//! Workflow definitions over the API (issue 19): registered as YAML or JSON, versioned by
//! content, every problem named in a 422 (B-04).

use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{Scheduler, TestDb, Timings};

const DIAMOND: &str = r#"
steps:
  - {id: fetch, kind: bash, script: "echo '{\"items\": [1, 2]}' > $SLUICE_OUTPUT"}
  - id: left
    depends_on: [fetch]
    kind: bash
    script: "echo left {{ steps.fetch.output.value.items }}"
  - {id: right, depends_on: [fetch], kind: noop}
  - {id: join, depends_on: [left, right], kind: noop, retry: {max_attempts: 2}}
"#;

#[tokio::test]
async fn a_definition_is_versioned_by_content_and_the_latest_registration_is_current() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let path = api_paths::workflow("diamond");

    let (status, first) = api.put_text(&path, DIAMOND).await;
    assert_eq!(status, 201, "{first}");
    let version = first["version"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 64);
    assert_eq!(first["steps"], 4);
    assert_eq!(first["definition"]["name"], "diamond");

    // The same content as JSON is the same version.
    let as_json = first["definition"].to_string();
    let (status, again) = api.put_text(&path, as_json).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["version"], version.as_str());

    let changed = DIAMOND.replace("max_attempts: 2", "max_attempts: 3");
    let (status, second) = api.put_text(&path, changed).await;
    assert_eq!(status, 201, "{second}");
    assert_ne!(second["version"], version.as_str());
    let (_, current) = api.get(&path).await;
    assert_eq!(current["version"], second["version"]);
    let (status, old) = api.get(&format!("{path}?version={version}")).await;
    assert_eq!(status, 200, "{old}");
    assert_eq!(old["definition"], first["definition"]);
    // Registering the old content again makes it current again.
    api.put_text(&path, DIAMOND).await;
    let (_, current) = api.get(&path).await;
    assert_eq!(current["version"], version.as_str());

    let (_, list) = api.get(api_paths::WORKFLOWS).await;
    let listed: Vec<(&str, &str)> = list["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap(), w["version"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("diamond", version.as_str())]);
}

#[tokio::test]
async fn every_problem_of_a_definition_is_named_in_a_422() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let path = api_paths::workflow("broken");
    let problems = |body: &Value| -> Vec<String> {
        body["error"]["details"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|p| {
                        format!(
                            "{}: {}",
                            p["at"].as_str().unwrap(),
                            p["message"].as_str().unwrap()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let big_cycle: Vec<Value> = (0..1000)
        .map(|i| json!({"id": format!("s{i}"), "kind": "noop", "depends_on": [format!("s{}", (i + 1) % 1000)]}))
        .collect();
    let cases: Vec<(String, &str)> = vec![
        (
            "steps: [{id: a, kind: noop, depends_on: [a]}]".into(),
            "cannot depend on itself",
        ),
        (
            "steps: [{id: a, kind: noop, depends_on: [b]}, {id: b, kind: noop, depends_on: [a]}]"
                .into(),
            "a cycle runs through a, b",
        ),
        (
            json!({"steps": big_cycle}).to_string(),
            "a cycle runs through s0, s1",
        ),
        (
            "steps: [{id: a, kind: noop}, {id: a, kind: noop}]".into(),
            "is used by 2 steps",
        ),
        (
            "steps: [{id: a, kind: noop, depends_on: [nope]}]".into(),
            "\"nope\", which is not a step",
        ),
        (
            "steps: [{id: a, kind: noop}, {id: b, kind: bash, script: '{{ steps.a.output }}'}]"
                .into(),
            "not among this step's ancestors",
        ),
        ("steps:\n  - id: a\n  kind: [".into(), "line "),
        ("steps: [{id: a, kind: rocket}]".into(), "steps[0] (a).spec"),
        (
            "name: other\nsteps: [{id: a, kind: noop}]".into(),
            "registered as \"broken\"",
        ),
        // YAML itself refuses control characters, NUL included, with a position.
        (
            "steps: [{id: 'a\u{0}b', kind: noop}]".into(),
            "control characters",
        ),
        (
            r#"{"steps": [{"id": "a b", "kind": "noop"}]}"#.into(),
            "(a b).id",
        ),
    ];
    for (text, expected) in cases {
        let (status, body) = api.put_text(&path, text.clone()).await;
        assert_eq!(status, 422, "{text:.80}: {body}");
        assert_eq!(body["error"]["code"], "invalid_definition", "{body}");
        let found = problems(&body);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "{text:.80}: no problem mentions {expected:?}: {found:?}"
        );
    }
    // Several problems at once are all named.
    let (_, body) = api
        .put_text(
            &path,
            "steps: [{id: a, kind: noop, depends_on: [x]}, {id: b, kind: rocket}]",
        )
        .await;
    assert_eq!(problems(&body).len(), 2, "{body}");
    // Bad names, versions and bodies.
    let (status, _) = api.put_text(&api_paths::workflow("-bad"), DIAMOND).await;
    assert_eq!(status, 400);
    let (status, _) = api.put_text(&path, vec![0xffu8, 0xfe]).await;
    assert_eq!(status, 400);
    let (status, body) = api.put_text(&path, vec![b' '; 9 << 20]).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = api.get(&format!("{path}?version=zz")).await;
    assert_eq!(status, 400);
    let (status, _) = api.get(&format!("{path}?colour=red")).await;
    assert_eq!(status, 400);
    let (status, body) = api.get(&path).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(db.count("SELECT count(*) FROM sluice.workflows").await, 0);
}
