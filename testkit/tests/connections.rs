//! L-11 and the idle-connection flood: stalled and idle connections cannot take the API down.

use std::time::Duration;

use serde_json::json;
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{FakeRunner, Scheduler, TestDb, Timings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Lets this test process open thousands of sockets.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// Opens `count` connections to `url`'s host that send half a request head and stop.
async fn stalled_connections(url: &str, count: usize) -> Vec<TcpStream> {
    let addr = url.trim_start_matches("http://").to_string();
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        stream
            .write_all(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Len")
            .await
            .expect("write half a head");
        streams.push(stream);
    }
    streams
}

/// Whether the server has closed `stream` (EOF or reset), waiting at most `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar may come first; the close follows.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Fails the test unless `call` answers within `limit`: "promptly", as a liveness bound.
async fn promptly<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within 5 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_stalled_connections_leave_health_enqueue_and_claims_working() {
    raise_descriptor_limit();
    let db = TestDb::new().await;
    let scheduler =
        Scheduler::start_with(&db, Timings::TEST, &[("SLUICE_HEADER_TIMEOUT_MS", "1500")]).await;
    let api = scheduler.api();
    let runner = FakeRunner::register(&scheduler, "flooded").await;

    let mut public = stalled_connections(&scheduler.api_url, 3000).await;
    let _internal = stalled_connections(&scheduler.internal_url, 500).await;

    let (status, _) = promptly("/healthz", api.get("/healthz")).await;
    assert_eq!(status, 200);
    let (status, body) = promptly(
        "an enqueue",
        api.post(api_paths::JOBS, &json!({"spec": {"kind": "noop"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let tasks = promptly("a runner's claim", runner.claim(1, 2000)).await;
    assert_eq!(tasks.len(), 1, "the runner claimed the job");

    // The stalled public connections are closed once the header timeout has passed.
    let mut closed = 0;
    for stream in public.iter_mut().take(50) {
        if closed_by_server(stream, Duration::from_secs(5)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 50,
        "stalled connections outlived the header timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_public_listener_refuses_new_connections_but_runners_keep_theirs() {
    raise_descriptor_limit();
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(
        &db,
        Timings::TEST,
        &[
            ("SLUICE_MAX_CONNECTIONS", "100"),
            ("SLUICE_HEADER_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let runner = FakeRunner::register(&scheduler, "roomy").await;
    let _held = stalled_connections(&scheduler.api_url, 100).await;

    // A connection past the cap is closed at once, not left hanging.
    let mut extra = TcpStream::connect(scheduler.api_url.trim_start_matches("http://"))
        .await
        .unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(5)).await,
        "a connection past the cap was not closed"
    );
    // The internal listener counts apart.
    let (status, _) = promptly("a heartbeat", runner.heartbeat(&[], None)).await;
    assert_eq!(status, 200);
}
