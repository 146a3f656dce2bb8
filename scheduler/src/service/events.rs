//! Live events: `GET /api/jobs/:id/events` and `GET /api/runs/:id/events` as Server-Sent
//! Events, fanned out from the scheduler's one LISTEN connection ([`crate::wake::listen`]).
//!
//! A stream is history first (read from the store after the client's position, a page at a
//! time as the client takes it), then live events, then the terminal event, then the end.
//! Every event's `id:` is its global position; a client resumes after one with the
//! `Last-Event-ID` header or `?after=`. The store appends a stream's events in position order
//! (`store::events::APPEND` locks the stream), so "after P" never skips a late commit.
//!
//! The fan-out: one [`Hub`] per scheduler holds a *topic* per followed job or run. A topic
//! has one task, which reads new events once per notification and broadcasts them (a bounded
//! [`broadcast`] ring shared by its subscribers), and sends the terminal event when the job
//! or run has ended. A thousand clients of one job cost one read per notification; a
//! thousand clients of different jobs cost no connection while they wait. A client that
//! falls behind the ring by more than its size is dropped, and resumes by position.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, watch, Notify};

use super::metrics::{Metrics, StreamGuard};
use crate::store::events::{self, Topic, TopicEvent};
use crate::{Error, Result};
use sluice_protocol::JobId;

/// Events read per page (a topic broadcasts a page at once, so its ring holds at least two).
const PAGE: i64 = 100;
/// A client whose socket takes nothing for this long is dropped (it resumes by position).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A topic re-checks its job or run this often even without a notification (a lost LISTEN
/// is also covered by [`Hub::wake_all`] on reconnect).
const TOPIC_RECHECK: Duration = Duration::from_secs(30);
/// How often the followed jobs and runs are looked up for their ends.
const END_POLL: Duration = Duration::from_millis(250);
/// While a job or run has ended but its final events are still on their way.
const END_RECHECK: Duration = Duration::from_millis(250);
/// How long a new client waits for its topic to learn where its stream stands.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The live streams' settings (`SLUICE_SSE_*`).
#[derive(Debug, Clone, Copy)]
pub struct EventSettings {
    /// A comment line is sent after this long without an event (15 s).
    pub keepalive: Duration,
    /// Events a topic keeps for its slowest subscriber before dropping it (256; at least
    /// 200, two pages). The ring is allocated whole: about 48 bytes an event per followed
    /// job or run.
    pub topic_buffer: usize,
    /// Encoded events waiting for one client's socket (64).
    pub client_buffer: usize,
    /// Streams open at once on this scheduler (5,000); past it, 503 with Retry-After.
    pub max_streams: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            keepalive: Duration::from_secs(15),
            topic_buffer: 256,
            client_buffer: 64,
            max_streams: 5000,
        }
    }
}

/// One thing a topic broadcasts.
#[derive(Debug)]
enum Frame {
    Event { position: i64, bytes: Bytes },
    End { bytes: Bytes },
}

struct TopicState {
    tx: broadcast::Sender<Arc<Frame>>,
    wake: Notify,
    /// Set once the topic knows its head; subscribers read history only after that.
    ready: watch::Sender<bool>,
}

struct Inner {
    pool: PgPool,
    metrics: Arc<Metrics>,
    settings: EventSettings,
    topics: Mutex<HashMap<Topic, Arc<TopicState>>>,
    shutdown: watch::Receiver<bool>,
}

/// The scheduler's event fan-out; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    pub fn new(
        pool: PgPool,
        settings: EventSettings,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Hub {
            inner: Arc::new(Inner {
                pool,
                metrics,
                settings,
                topics: Mutex::default(),
                shutdown,
            }),
        }
    }

    /// A `sluice_events` notification: `'<job> <run>'`, either part possibly empty.
    pub fn notify(&self, payload: &str) {
        let mut parts = payload.splitn(2, ' ');
        let job = parts.next().and_then(|p| p.trim().parse::<i64>().ok());
        let run = parts.next().and_then(|p| p.trim().parse::<i64>().ok());
        let topics = self.inner.lock();
        for topic in job
            .map(|j| Topic::Job(sluice_protocol::JobId(j)))
            .into_iter()
            .chain(run.map(Topic::Run))
        {
            if let Some(state) = topics.get(&topic) {
                state.wake.notify_one();
            }
        }
    }

    /// Wakes the streams of these jobs (they ended here: a completion or a cancel this
    /// scheduler applied), so that their terminal events go out at once.
    pub fn jobs_ended(&self, jobs: impl IntoIterator<Item = JobId>) {
        let topics = self.inner.lock();
        if topics.is_empty() {
            return;
        }
        for job in jobs {
            if let Some(state) = topics.get(&Topic::Job(job)) {
                state.wake.notify_one();
            }
        }
    }

    /// Looks up, every [`END_POLL`], which followed jobs and runs have ended, and wakes their
    /// topics: how a stream learns of an end applied by another scheduler, a reclaim or a
    /// timeout (ends do not notify; see `sql/0012_live_events.sql`). Costs nothing while no
    /// stream is open. Runs until shutdown.
    pub async fn watch_ends(self) {
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(END_POLL) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let (jobs, runs): (Vec<i64>, Vec<i64>) = {
                let topics = self.inner.lock();
                let jobs = topics
                    .keys()
                    .filter_map(|t| match t {
                        Topic::Job(job) => Some(job.0),
                        Topic::Run(_) => None,
                    })
                    .collect();
                let runs = topics
                    .keys()
                    .filter_map(|t| match t {
                        Topic::Run(run) => Some(*run),
                        Topic::Job(_) => None,
                    })
                    .collect();
                (jobs, runs)
            };
            if jobs.is_empty() && runs.is_empty() {
                continue;
            }
            match events::ended_among(&self.inner.pool, &jobs, &runs).await {
                Ok(ended) => {
                    let topics = self.inner.lock();
                    for topic in ended {
                        if let Some(state) = topics.get(&topic) {
                            state.wake.notify_one();
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "event streams: cannot look up ends"),
            }
        }
    }

    /// Every topic re-reads: after the LISTEN connection was lost, anything may have changed.
    pub fn wake_all(&self) {
        for state in self.inner.lock().values() {
            state.wake.notify_one();
        }
    }

    /// Topics followed now (for metrics and tests).
    pub fn topics(&self) -> usize {
        self.inner.lock().len()
    }

    /// Opens a stream of `topic` after position `after`: `NotFound` when the job or run does
    /// not exist. The returned receiver yields the encoded SSE body, ending after the
    /// terminal event, when the client falls too far behind, or at shutdown.
    pub async fn open(&self, topic: Topic, after: i64) -> Result<mpsc::Receiver<Bytes>> {
        // Counted from here, so that many opening at once cannot all slip under the cap.
        let open = self.inner.metrics.stream_opened();
        let count = self.inner.metrics.event_streams();
        if count > self.inner.settings.max_streams as i64 {
            return Err(Error::Overloaded(format!(
                "{} event streams are open, the most this scheduler serves; try again later",
                count - 1
            )));
        }
        // Before any topic is made for it: an unknown id costs one lookup, nothing more.
        if events::topic_head(&self.inner.pool, topic).await?.is_none() {
            return Err(Error::NotFound(match topic {
                Topic::Job(_) => "job",
                Topic::Run(_) => "run",
            }));
        }
        // Subscribe before anything is read: every event past the history read below then
        // reaches this subscriber through the topic.
        let (state, rx) = self.subscribe(topic);
        let mut ready = state.ready.subscribe();
        // Whether it got ready, gave up or timed out is read off the flag below.
        let _ = tokio::time::timeout(TOPIC_READY_TIMEOUT, ready.wait_for(|r| *r)).await;
        if !*state.ready.borrow() {
            drop(rx);
            state.wake.notify_one();
            return Err(Error::Unavailable(
                "the event stream could not read where it stands".into(),
            ));
        }
        let (tx, out) = mpsc::channel(self.inner.settings.client_buffer);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            serve_client(inner, topic, after, rx, tx, open).await;
            // Its receiver is gone: the topic may be followed by nobody now.
            state.wake.notify_one();
        });
        Ok(out)
    }

    fn subscribe(&self, topic: Topic) -> (Arc<TopicState>, broadcast::Receiver<Arc<Frame>>) {
        let mut topics = self.inner.lock();
        let state = topics
            .entry(topic)
            .or_insert_with(|| {
                let ring = self.inner.settings.topic_buffer.max(2 * PAGE as usize);
                let (tx, _) = broadcast::channel(ring);
                let state = Arc::new(TopicState {
                    tx,
                    wake: Notify::new(),
                    ready: watch::channel(false).0,
                });
                tokio::spawn(run_topic(self.inner.clone(), topic, state.clone()));
                state
            })
            .clone();
        let rx = state.tx.subscribe();
        (state, rx)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, Arc<TopicState>>> {
        // A panic while holding this lock cannot leave the map half-changed (single
        // inserts and removes), so a poisoned lock is still usable.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the topic if nobody follows it any more; true when it did.
    fn retire_if_unfollowed(&self, topic: Topic, state: &Arc<TopicState>) -> bool {
        let mut topics = self.lock();
        if state.tx.receiver_count() == 0 {
            if topics.get(&topic).is_some_and(|s| Arc::ptr_eq(s, state)) {
                topics.remove(&topic);
            }
            return true;
        }
        false
    }
}

/// A topic's task: learns the head, then per wake-up reads what is new, broadcasts it, and
/// ends the topic (terminal event, removal) once its job or run has ended and settled.
async fn run_topic(inner: Arc<Inner>, topic: Topic, state: Arc<TopicState>) {
    let mut shutdown = inner.shutdown.clone();
    let mut last = loop {
        match events::topic_head(&inner.pool, topic).await {
            Ok(head) => break head.unwrap_or(0),
            Err(err) => {
                tracing::warn!(error = %err, ?topic, "event stream: cannot read its head");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() || inner.retire_if_unfollowed(topic, &state) {
                    return;
                }
            }
        }
    };
    state.ready.send_replace(true);
    loop {
        let mut wait = TOPIC_RECHECK;
        // The end is looked at before the read: every event committed before the job or run
        // was seen ended is then in the read, and the terminal event comes after all of them.
        let end = events::topic_end(&inner.pool, topic).await;
        match (
            read_new(&inner.pool, topic, &mut last, &state.tx).await,
            end,
        ) {
            (Ok(()), Ok(Some(end))) if end.settled => {
                tracing::debug!(?topic, state = end.state, "topic ended");
                let bytes = end_frame(&end.state, &end.summary);
                // Under the map's lock: a new subscriber either got this frame or finds no
                // topic and starts a fresh one.
                let mut topics = inner.lock();
                let _ = state.tx.send(Arc::new(Frame::End { bytes }));
                if topics.get(&topic).is_some_and(|s| Arc::ptr_eq(s, &state)) {
                    topics.remove(&topic);
                }
                return;
            }
            (Ok(()), Ok(Some(_))) => wait = END_RECHECK,
            (Ok(()), Ok(None)) => {}
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, ?topic, "event stream: cannot read it");
                wait = END_RECHECK;
            }
        }
        tokio::select! {
            _ = state.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        // At shutdown every client ends on its own (it watches the same signal).
        if *shutdown.borrow() || inner.retire_if_unfollowed(topic, &state) {
            tracing::debug!(?topic, "topic retired");
            return;
        }
    }
}

/// Reads and broadcasts the topic's events after `last`, advancing it.
async fn read_new(
    pool: &PgPool,
    topic: Topic,
    last: &mut i64,
    tx: &broadcast::Sender<Arc<Frame>>,
) -> Result<()> {
    loop {
        let page = events::topic_after(pool, topic, *last, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        for event in &page {
            *last = event.position;
            let _ = tx.send(Arc::new(Frame::Event {
                position: event.position,
                bytes: event_frame(topic, event),
            }));
        }
        if !full {
            return Ok(());
        }
    }
}

/// One client: its history, then the topic's frames, then the end. Ends early when the
/// client goes away (the body, and with it `out`, is dropped), takes nothing for a minute,
/// falls behind the topic's ring, or the scheduler shuts down. `_open` counts it as open
/// until then.
async fn serve_client(
    inner: Arc<Inner>,
    topic: Topic,
    after: i64,
    mut rx: broadcast::Receiver<Arc<Frame>>,
    out: mpsc::Sender<Bytes>,
    _open: StreamGuard,
) {
    let mut shutdown = inner.shutdown.clone();
    // Browsers reconnect after a second when the stream ends before its terminal event.
    if !send(&out, Bytes::from_static(b"retry: 1000\n\n")).await {
        return;
    }
    let mut cursor = after;
    loop {
        let page = match events::topic_after(&inner.pool, topic, cursor, PAGE).await {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(error = %err, ?topic, "event stream: cannot read history");
                return;
            }
        };
        for event in &page {
            cursor = event.position;
            if !send(&out, event_frame(topic, event)).await {
                return;
            }
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    loop {
        let received = tokio::select! {
            received = tokio::time::timeout(inner.settings.keepalive, rx.recv()) => received,
            // The body was dropped (the connection is gone); a client that vanished without
            // a word is found out by the next event or keep-alive.
            _ = out.closed() => return,
            _ = shutdown.changed() => return,
        };
        let bytes = match received {
            Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            Ok(Ok(frame)) => match &*frame {
                Frame::Event { position, .. } if *position <= cursor => continue,
                Frame::Event { position, bytes } => {
                    cursor = *position;
                    bytes.clone()
                }
                Frame::End { bytes } => {
                    send(&out, bytes.clone()).await;
                    return;
                }
            },
            // Too far behind: the client reconnects with its last id and reads the gap
            // from history.
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                tracing::debug!(?topic, "event stream: a slow client was dropped");
                inner.metrics.stream_client_dropped();
                return;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return,
        };
        if !send(&out, bytes).await {
            return;
        }
    }
}

/// Hands `bytes` to the client's socket; false when it is gone or took nothing for
/// [`CLIENT_WRITE_TIMEOUT`] (it is let go, and resumes by position).
async fn send(out: &mpsc::Sender<Bytes>, bytes: Bytes) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_WRITE_TIMEOUT, out.send(bytes)).await,
        Ok(Ok(()))
    )
}

/// `id: <position>`, `event: <kind>`, `data: {"job_id", "attempt", "seq", "at", "data"}`
/// (a workflow step's events also carry `step`, and `index`: the item of a `for_each` step,
/// 0 otherwise).
fn event_frame(topic: Topic, event: &TopicEvent) -> Bytes {
    let mut data = json!({
        "job_id": event.job_id,
        "attempt": event.attempt,
        "seq": event.seq,
        "at": event.at,
        "data": event.data,
    });
    if matches!(topic, Topic::Run(_)) || event.step_id.is_some() {
        data["step"] = event.step_id.clone().map_or(Value::Null, Value::String);
        if let Some(index) = event.step_index {
            data["index"] = index.into();
        }
    }
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.position,
        field(&event.kind),
        data
    ))
}

/// The terminal event: named by the final state (`succeeded`, `failed`, `cancelled`), with
/// the job's or run's summary; it has no `id:`, so a client's last id stays its last event.
fn end_frame(state: &str, summary: &Value) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {}\n\n", field(state), summary))
}

/// A value safe on one SSE line (kinds are checked names; this is the last guard).
fn field(value: &str) -> String {
    value.replace(['\r', '\n'], " ")
}

/// A stream's starting point: `Last-Event-ID` wins over `?after=`; both must be a position
/// (0 ≤ n ≤ 2^63 − 1).
pub fn start_position(last_event_id: Option<&str>, after: Option<&str>) -> Result<i64> {
    let (field, value) = match (last_event_id, after) {
        (Some(v), _) => ("Last-Event-ID", v),
        (None, Some(v)) => ("after", v),
        (None, None) => return Ok(0),
    };
    let value = value.trim();
    if value.is_empty() {
        return Ok(0);
    }
    value
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            Error::invalid(
                field,
                "must be an event position: an integer from 0 to 9223372036854775807",
            )
        })
}

/// The SSE body of an opened stream.
pub fn body(out: mpsc::Receiver<Bytes>) -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::unfold(out, |mut out| async move {
        out.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), out))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_position_takes_the_header_first_and_refuses_junk() {
        assert_eq!(start_position(None, None).unwrap(), 0);
        assert_eq!(start_position(Some("42"), Some("7")).unwrap(), 42);
        assert_eq!(start_position(None, Some("7")).unwrap(), 7);
        assert_eq!(start_position(Some(""), None).unwrap(), 0);
        for bad in ["-1", "x", "1e3", "99999999999999999999", "4\u{0}2"] {
            assert!(start_position(Some(bad), None).is_err(), "{bad:?}");
            assert!(start_position(None, Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_are_one_event_each_whatever_the_kind() {
        let event = TopicEvent {
            position: 9,
            job_id: 3,
            step_id: Some("build".into()),
            step_index: Some(2),
            attempt: 1,
            seq: 4,
            kind: "std\nout".into(),
            data: json!({"text": "a\nb"}),
            at: chrono::Utc::now(),
        };
        let frame = String::from_utf8(event_frame(Topic::Run(1), &event).to_vec()).unwrap();
        let lines: Vec<&str> = frame.trim_end().split('\n').collect();
        assert_eq!(lines.len(), 3, "{frame:?}");
        assert_eq!(lines[0], "id: 9");
        assert_eq!(lines[1], "event: std out");
        let data: Value = serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["step"], "build");
        assert_eq!(data["index"], 2);
        assert_eq!(data["data"]["text"], "a\nb");
        assert!(frame.ends_with("\n\n"));
    }
}
