//! S-04 / S-05 and the OpenAPI document: `/openapi.json` describes the public API, every
//! route it documents exists, every one of them but the probes and the document itself
//! answers 401 without the token or with a wrong one (the table is the document, so a new
//! route cannot be missed), and no `/internal/*` route is served on the public listener.

use serde_json::Value;
use sluice_protocol::paths as internal;
use sluice_testkit::{FakeRunner, Scheduler, TestDb, Timings};

/// A documented path with sample values for its parameters.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{name}", "nightly")
        .replace("{step}", "build")
}

#[tokio::test]
async fn every_documented_route_exists_and_needs_the_token_and_internal_routes_are_not_public() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let http = reqwest::Client::new();
    let base = &scheduler.api_url;

    let answer = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the document needs no token");
    let doc: Value = answer.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 25, "{} paths", paths.len());

    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let url = format!("{base}{}", concrete(path));
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let open = operation.get("security").is_none();
            let send = |token: Option<&str>| {
                let mut request = http.request(method.clone(), &url);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                async move { request.send().await.unwrap() }
            };
            for token in [None, Some("wrong-token"), Some("")] {
                let answer = send(token).await;
                let status = answer.status().as_u16();
                if open {
                    assert_ne!(status, 401, "{method} {path} is documented as open");
                } else {
                    assert_eq!(status, 401, "{method} {path} with {token:?}");
                    let body: Value = answer.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
                }
            }
            // With the token the route is there: whatever it answers, it is not the
            // router's "no such route" nor "method not allowed".
            let answer = send(Some(&scheduler.api_token)).await;
            let status = answer.status().as_u16();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            if status == 404 {
                let body: Value = answer.json().await.unwrap();
                assert_ne!(
                    body["error"]["message"], "route not found",
                    "{method} {path} is documented but not routed"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked} operations");

    // S-05: the internal routes answer 404 on the public listener, whoever asks.
    let runner = FakeRunner::register(&scheduler, "s05").await;
    let job = sluice_protocol::JobId(1);
    for path in [
        internal::REGISTER.to_string(),
        internal::heartbeat("s05"),
        internal::claim("s05"),
        internal::complete_many("s05"),
        internal::stream(job),
        internal::complete(job),
        internal::SESSION_ROUTE.replace("{id}", "1"),
    ] {
        for token in [
            scheduler.runner_secret.as_str(),
            runner.token.as_str(),
            &scheduler.api_token,
        ] {
            let answer = http
                .post(format!("{base}{path}"))
                .bearer_auth(token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 404, "{path} on the public listener");
        }
    }
}
