//! A fake of the Anthropic Messages API (`POST /v1/messages`, streamed) on loopback, for the
//! agent step's tests: it answers each request from a script — streamed text, tool calls,
//! malformed tool input, error statuses with `retry-after`, a stream cut in the middle, an
//! answer held until the test releases it — and records every request (headers and body), so
//! tests can assert what the sidecar sent. Only the API is fake; the sidecar, its tools and
//! the scheduler are the real processes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200` and these events, streamed one per chunk.
    Stream(Vec<Value>),
    /// `200`, these events, then the connection is broken before the response ends.
    Cut(Vec<Value>),
    /// An error status with a JSON error body and, if given, a `retry-after` header.
    Status {
        status: u16,
        kind: String,
        message: String,
        retry_after: Option<String>,
    },
    /// The reply, sent only once the test calls [`FakeAnthropic::release`].
    Held(Box<Reply>),
}

impl Reply {
    /// A message of `text` (streamed in small deltas) that ends the turn.
    pub fn text(text: &str) -> Reply {
        Reply::Stream(message(text, &[], "end_turn"))
    }

    /// A message calling tools: `(id, name, input as JSON text)` each (the text is streamed
    /// as `input_json_delta` pieces, so malformed JSON goes out as it is).
    pub fn tools(text: &str, calls: &[(&str, &str, &str)]) -> Reply {
        Reply::Stream(message(text, calls, "tool_use"))
    }

    /// An error status.
    pub fn status(status: u16, kind: &str, retry_after: Option<&str>) -> Reply {
        Reply::Status {
            status,
            kind: kind.into(),
            message: format!("fake {kind}"),
            retry_after: retry_after.map(String::from),
        }
    }

    /// The start of a text message, then a broken connection.
    pub fn cut(text: &str) -> Reply {
        let mut events = message(text, &[], "end_turn");
        events.truncate(4);
        Reply::Cut(events)
    }
}

/// The events of one message: `text` as a text block, then each tool call.
pub fn message(text: &str, calls: &[(&str, &str, &str)], stop_reason: &str) -> Vec<Value> {
    let mut events = vec![json!({"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake-model",
        "content": [], "stop_reason": null,
        "usage": {"input_tokens": 100, "output_tokens": 1}}})];
    let mut index = 0;
    if !text.is_empty() {
        events.push(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}));
        events.push(json!({"type": "ping"}));
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(3) {
            events.push(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": piece.iter().collect::<String>()}}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    for (id, name, input) in calls {
        events.push(json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}));
        let split = input.len() / 2;
        let split = (0..=split)
            .rev()
            .find(|&i| input.is_char_boundary(i))
            .unwrap_or(0);
        for piece in [&input[..split], &input[split..]] {
            events.push(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
        index += 1;
    }
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": 50}}));
    events.push(json!({"type": "message_stop"}));
    events
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

type Script = Arc<dyn Fn(usize, &Value) -> Reply + Send + Sync>;

struct Shared {
    script: Script,
    received: Mutex<Vec<Received>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    released: watch::Sender<bool>,
}

/// A running fake; dropping it stops the server.
pub struct FakeAnthropic {
    /// `http://127.0.0.1:PORT`, to give sidecars as `ANTHROPIC_BASE_URL`.
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeAnthropic {
    /// Answers the n-th request (from 0) with `replies[n]`, and a 500 past the end.
    pub async fn replay(replies: Vec<Reply>) -> FakeAnthropic {
        FakeAnthropic::start(move |n, _| {
            replies
                .get(n)
                .cloned()
                .unwrap_or_else(|| Reply::status(500, "api_error", None))
        })
        .await
    }

    /// Answers each request with `script(n, body)`.
    pub async fn start(
        script: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static,
    ) -> FakeAnthropic {
        let shared = Arc::new(Shared {
            script: Arc::new(script),
            received: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            released: watch::channel(false).0,
        });
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeAnthropic {
            url,
            shared,
            server,
        }
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    /// The most requests that were being answered at once.
    pub fn most_in_flight(&self) -> usize {
        self.shared.most_in_flight.load(Ordering::SeqCst)
    }

    /// Lets every [`Reply::Held`] answer go, now and later.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let guard = InFlight(shared.clone());
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let n = {
        let mut received = shared.received.lock().expect("lock");
        received.push(Received {
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
        received.len() - 1
    };
    let mut reply = (shared.script)(n, &body);
    while let Reply::Held(inner) = reply {
        let mut released = shared.released.subscribe();
        let _ = released.wait_for(|r| *r).await;
        reply = *inner;
    }
    let sse = |events: &[Value]| -> Vec<Result<String, std::io::Error>> {
        events
            .iter()
            .map(|e| {
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("message");
                Ok(format!("event: {kind}\ndata: {e}\n\n"))
            })
            .collect()
    };
    let response = match reply {
        Reply::Stream(events) => {
            let chunks = sse(&events);
            streamed(futures_util::stream::iter(chunks), guard)
        }
        Reply::Cut(events) => {
            let mut chunks = sse(&events);
            chunks.push(Err(std::io::Error::other("cut by the fake")));
            streamed(futures_util::stream::iter(chunks), guard)
        }
        Reply::Status {
            status,
            kind,
            message,
            retry_after,
        } => {
            let mut response = Response::builder()
                .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("content-type", "application/json");
            if let Some(after) = retry_after {
                response = response.header("retry-after", after);
            }
            drop(guard);
            response
                .body(Body::from(
                    json!({"type": "error", "error": {"type": kind, "message": message}})
                        .to_string(),
                ))
                .expect("response")
        }
        Reply::Held(_) => unreachable!("unwrapped above"),
    };
    response
}

/// A streamed `text/event-stream` response; the request counts as in flight until its last
/// chunk is sent.
fn streamed(
    chunks: impl futures_util::Stream<Item = Result<String, std::io::Error>> + Send + 'static,
    guard: InFlight,
) -> Response {
    use futures_util::StreamExt;
    let mut guard = Some(guard);
    let chunks = chunks.chain(futures_util::stream::poll_fn(move |_| {
        guard.take();
        std::task::Poll::Ready(None)
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .expect("response")
}
