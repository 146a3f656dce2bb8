//! An attempt's event stream: the events its executor queues (see `exec::events`), sent in
//! ordered batches, one POST in flight, retried within the delivery budget. When the
//! scheduler refuses them, or they cannot be delivered in time, the stream stops the attempt
//! (it would run unheard) and says why.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::{paths, Event, EventKind, StreamRequest, StreamResponse, Task};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::AttemptContext;
use crate::client::CallError;
use crate::exec::events::Events;
use crate::exec::{Stop, StopReason};

/// Events queued at most before an executor waits for the stream.
const QUEUE: usize = 1024;
/// Events per stream POST, bytes per stream POST, and how long the first event may wait.
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 64 * 1024;
const BATCH_DELAY: Duration = Duration::from_millis(20);

/// The sending side of an attempt's stream, running until its [`Events`] are dropped.
pub struct EventStream(JoinHandle<Streamed>);

/// Starts the stream of `task`'s attempt: the sink for its executor, and the stream to
/// [`EventStream::finish`] once the executor is done.
pub fn start(ctx: &Arc<AttemptContext>, task: &Task, stop: &Stop) -> (Events, EventStream) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let sending = tokio::spawn(post_batches(ctx.clone(), task.clone(), rx, stop.clone()));
    (Events::new(tx), EventStream(sending))
}

impl EventStream {
    /// Sends what is left (the sink is dropped here) and tells how the stream ended.
    pub async fn finish(self, events: Events) -> Streamed {
        drop(events);
        self.0.await.unwrap_or(Streamed {
            last_seq: 0,
            error: Some(CallError::Shutdown),
        })
    }
}

/// How an attempt's stream ended.
pub struct Streamed {
    /// The last `seq` the scheduler stored (0: none).
    pub last_seq: i64,
    /// Why it ended early, if it did.
    pub error: Option<CallError>,
}

async fn post_batches(
    ctx: Arc<AttemptContext>,
    task: Task,
    mut rx: mpsc::Receiver<Event>,
    stop: Stop,
) -> Streamed {
    let mut last_seq = 0;
    let mut hard_stop = ctx.hard_stop.clone();
    let mut stopped = stop.watch();
    let path = paths::stream(task.job_id);
    loop {
        let Some(first) = rx.recv().await else {
            return Streamed {
                last_seq,
                error: None,
            };
        };
        let mut bytes = event_size(&first);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        let mut closed = false;
        while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(event) => {
                        bytes += event_size(&event);
                        batch.push(event);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let request = StreamRequest {
            attempt: task.attempt,
            lease_token: task.lease_token,
            events: batch,
        };
        let post = ctx.client.post_retrying::<_, StreamResponse>(
            &path,
            &ctx.token,
            &request,
            Duration::from_secs(30),
            ctx.delivery_budget,
            &mut hard_stop,
        );
        // An abandoned attempt stops sending at once: nothing of it would be accepted.
        let result = tokio::select! {
            result = post => result,
            _ = stopped.wait_for(|r| r.is_some_and(StopReason::abandons)) => Err(CallError::Shutdown),
        };
        if let Err(err) = result {
            let reason = if err.is_lease_lost() {
                StopReason::LeaseLost
            } else {
                StopReason::StreamFailed
            };
            stop.request(reason);
            return Streamed {
                last_seq,
                error: Some(err),
            };
        }
        last_seq = request.events.last().map_or(last_seq, |e| e.seq);
        if closed {
            return Streamed {
                last_seq,
                error: None,
            };
        }
    }
}

/// An event's share of a batch: output chunks by their text and bytes (the hot case, no
/// serialising), anything else (an agent's tool calls and results) by its JSON.
fn event_size(event: &Event) -> usize {
    let field = |name: &str| {
        event
            .data
            .get(name)
            .and_then(Value::as_str)
            .map_or(0, str::len)
    };
    match event.kind {
        EventKind::Stdout | EventKind::Stderr => field("text") + field("base64") + 64,
        _ => serde_json::to_vec(&event.data).map_or(0, |v| v.len()) + 64,
    }
}
