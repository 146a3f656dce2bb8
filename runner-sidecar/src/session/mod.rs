//! The runner's life: register, claim work for free slots and start an attempt for each
//! task, heartbeat the held leases ([`heartbeat`]), and on shutdown drain.
//!
//! A registration is a session: its token, its lease terms, the wire version the scheduler
//! answered with, and one [`SessionState`] that only moves forward — live, draining (the
//! scheduler asked), lost (the token was refused: its leases are void), ended. A lost
//! session stops its attempts and registers anew; shutdown drains and stops.

pub mod heartbeat;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_protocol::{
    paths, ClaimResponse, Completion, ErrorCode, RegisterRequest, RegisterResponse, RunnerId,
    BATCHED_COMPLETIONS, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use sluice_sandbox::Sandbox;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::attempt::{self, AttemptContext};
use crate::client::{Backoff, CallError, Client};
use crate::config::{Config, Secret};
use crate::exec::{Stop, StopReason};
use crate::leases::Leases;
use crate::outbox::{self, Outbox};
use crate::slots::Slots;
use crate::Result;

/// How long a database outage reported by the scheduler (503 to heartbeats) is ridden
/// through, in leases: while Postgres is away no scheduler can reclaim anything, and after it
/// returns the schedulers give expired leases one more term (F-07, F-20).
const OUTAGE_RIDE_THROUGH_LEASES: u32 = 5;
/// Longest a claim waits for the attempts of the last claim to have been polled once.
const GATHER_LIMIT: Duration = Duration::from_millis(1);

/// One registration with the scheduler.
pub struct Registration {
    pub runner_id: RunnerId,
    pub token: Secret,
    pub heartbeat: Duration,
    pub lease: Duration,
    /// The wire version the scheduler answered with: the request forms this session uses.
    pub protocol: u32,
}

impl Registration {
    /// How long an event batch or a completion is retried while the scheduler answers with
    /// errors a retry may fix (no answer, 5xx, 429): as long as a database outage is ridden
    /// through. Past it the attempt ends with a clear error and frees its slot.
    fn delivery_budget(&self) -> Duration {
        self.lease * OUTAGE_RIDE_THROUGH_LEASES
    }
}

/// Where a session is; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SessionState {
    /// Claiming.
    Live,
    /// The scheduler asked this runner to drain: no more claims.
    Draining,
    /// The scheduler no longer knows this runner's token: its leases are void.
    Lost,
    /// Over: heartbeats and deliveries stop.
    Ended,
}

impl SessionState {
    /// Moves to `next` if that is forward; whether it moved.
    pub fn advance(&mut self, next: SessionState) -> bool {
        let forward = next > *self;
        if forward {
            *self = next;
        }
        forward
    }
}

/// The attempts this process runs, and how many tasks it has taken in all (for
/// SLUICE_RUNNER_RECYCLE_AFTER).
#[derive(Default)]
struct Attempts {
    set: JoinSet<()>,
    taken: u64,
}

/// How a session's claiming ended.
enum Claiming {
    /// The sidecar is shutting down.
    Shutdown,
    /// The runner took its `SLUICE_RUNNER_RECYCLE_AFTER` tasks: it lets them finish, then
    /// exits.
    Recycled,
    /// The scheduler ordered a drain: the same.
    Drained,
    /// The registration is gone.
    Lost,
}

/// Runs the sidecar until `shutdown` turns true, then drains.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    crate::exec::tool::prepare();
    // Probes the host before anything else forks; owns the orphan reaper when PID 1.
    let sandbox = Arc::new(Sandbox::start());
    if config.slots > 1 && !sandbox.can_isolate_mounts() {
        tracing::warn!(
            slots = config.slots,
            "tools cannot get a private /proc, /tmp and /run here (no private mount namespace, as under gVisor): tasks sharing this runner can see each other's processes and environments; run untrusted tasks with SLUICE_RUNNER_SLOTS=1 or one runner per task"
        );
    }
    let config = Arc::new(config);
    prepare_workdir(&config)?;
    if let Some(addr) = config.metrics_listen {
        let listener = crate::metrics::bind(addr).await.map_err(|e| {
            crate::Error::Config(format!("SLUICE_RUNNER_METRICS_LISTEN {addr}: {e}"))
        })?;
        tokio::spawn(crate::metrics::serve(listener, shutdown.clone()));
    }
    // The slots and their uids live as long as the process: no other runner on this host
    // gets those uids meanwhile.
    let slots =
        Slots::new(config.slots, config.tool_uids.as_ref()).map_err(crate::Error::Config)?;
    let client = Client::new(&config.api_url);
    let leases = Leases::default();
    let (hard_stop_tx, hard_stop) = watch::channel(false);
    let mut attempts = Attempts::default();

    while let Some(registration) = register(&client, &config, &mut shutdown).await? {
        tracing::info!(
            "sluice-runner {} registered as {} (wire protocol {})",
            config.pod_name,
            registration.runner_id,
            registration.protocol
        );
        let registration = Arc::new(registration);
        let (state, state_rx) = watch::channel(SessionState::Live);
        let heartbeat = tokio::spawn(heartbeat::run(
            client.clone(),
            config.clone(),
            registration.clone(),
            leases.clone(),
            state.clone(),
        ));
        let outbox = Arc::new(Outbox::new(registration.protocol >= BATCHED_COMPLETIONS));
        let flusher = tokio::spawn({
            let outbox = outbox.clone();
            let client = client.clone();
            let path = paths::complete_many(&config.pod_name);
            let token = registration.token.clone();
            let budget = registration.delivery_budget();
            let hard_stop = hard_stop.clone();
            async move { outbox.flusher(client, path, token, budget, hard_stop).await }
        });
        let ctx = Arc::new(AttemptContext {
            config: config.clone(),
            sandbox: sandbox.clone(),
            client: client.clone(),
            token: registration.token.clone(),
            hard_stop: hard_stop.clone(),
            outbox: outbox.clone(),
            delivery_budget: registration.delivery_budget(),
        });
        let claiming = claim_until_done(
            &ctx,
            &registration,
            &slots,
            &leases,
            &mut attempts,
            state_rx,
            &mut shutdown,
        )
        .await;
        // No more claims in this registration: the flusher sends every completion.
        outbox.release_carrier();
        match claiming {
            Claiming::Shutdown | Claiming::Recycled | Claiming::Drained => {
                if !matches!(claiming, Claiming::Shutdown) {
                    // Its tasks run to their ends (each has its own timeout); a SIGTERM
                    // meanwhile still drains with the deadline.
                    tracing::info!(
                        taken = attempts.taken,
                        drained = matches!(claiming, Claiming::Drained),
                        "recycled or ordered to drain; exiting when the running tasks end"
                    );
                    loop {
                        tokio::select! {
                            next = attempts.set.join_next() => if next.is_none() { break },
                            _ = shutdown.changed() => break,
                        }
                    }
                }
                drain(&config, &leases, &mut attempts.set, &hard_stop_tx).await;
                let _ = hard_stop_tx.send(true);
                state.send_replace(SessionState::Ended);
                outbox.end();
                let _ = heartbeat.await;
                let _ = flusher.await;
                break;
            }
            Claiming::Lost => {
                // The registration is gone: its leases are void. Stop every tool, then
                // register anew.
                leases.stop_all(StopReason::LeaseLost);
                state.send_replace(SessionState::Ended);
                outbox.end();
                while attempts.set.join_next().await.is_some() {}
                let _ = heartbeat.await;
                let _ = flusher.await;
            }
        }
    }
    let _ = hard_stop_tx.send(true);
    while attempts.set.join_next().await.is_some() {}
    tracing::info!("sluice-runner stopped");
    Ok(())
}

/// The claim request, borrowing the completions it carries (`ClaimRequest` on the wire).
#[derive(Serialize)]
struct ClaimBody<'a> {
    max: u32,
    wait_ms: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    complete: Vec<&'a Completion>,
}

/// Claims work for free slots, starting an attempt per task, until shutdown or until the
/// registration is lost. While the scheduler asks the runner to drain it claims nothing.
async fn claim_until_done(
    ctx: &Arc<AttemptContext>,
    registration: &Registration,
    slots: &Arc<Slots>,
    leases: &Leases,
    attempts: &mut Attempts,
    mut state: watch::Receiver<SessionState>,
    shutdown: &mut watch::Receiver<bool>,
) -> Claiming {
    let config = &ctx.config;
    let outbox = &ctx.outbox;
    let client = &ctx.client;
    // Attempts spawned but not polled yet (see the gathering of free slots below).
    let unpolled = Arc::new(Unpolled::default());
    let claim_path = paths::claim(&config.pod_name);
    loop {
        let now = *state.borrow_and_update();
        if *shutdown.borrow() {
            return Claiming::Shutdown;
        }
        if now >= SessionState::Lost {
            return Claiming::Lost;
        }
        let room = config
            .recycle_after
            .map(|limit| limit.saturating_sub(attempts.taken));
        if room == Some(0) {
            return Claiming::Recycled;
        }
        if now == SessionState::Draining {
            // The scheduler ordered a drain (a pool ending an idle runner): claim no more,
            // let the running tasks end, then exit.
            outbox.release_carrier();
            return Claiming::Drained;
        }
        // Wait for a free slot, then take every free one. An attempt frees its slot right
        // after queueing its completion, so the claim for that slot carries it.
        outbox.await_carrier();
        let first = tokio::select! {
            slot = slots.acquire() => slot,
            _ = shutdown.changed() => continue,
            _ = state.changed() => continue,
        };
        // Let the attempts that are finishing now free their slots too, so one claim carries
        // their completions and refills them all: wait (without spinning) until every
        // attempt of the last claim has been polled once — a quick job, such as `noop`, ends
        // within its first poll, possibly on the other worker thread — at most
        // GATHER_LIMIT, then take every free slot. A running tool is not waited for.
        unpolled.all_polled(GATHER_LIMIT).await;
        tokio::task::yield_now().await;
        let mut permits = vec![first];
        while let Some(slot) = slots.try_acquire() {
            permits.push(slot);
        }
        // Never more tasks than the recycle limit leaves.
        if let Some(room) = room {
            permits.truncate(room.min(permits.len() as u64) as usize);
        }
        let carried = outbox.carry(outbox.carry_limit());
        let request = ClaimBody {
            max: permits.len() as u32,
            wait_ms: config.claim_wait.as_millis() as u64,
            complete: carried.iter().map(|queued| &queued.completion).collect(),
        };
        let claim = client.post::<_, ClaimResponse>(
            &claim_path,
            &registration.token,
            &request,
            config.claim_wait + Duration::from_secs(10),
        );
        let answer = tokio::select! {
            answer = claim => Some(answer),
            // Stop claiming at once on shutdown; a job claimed in this instant is
            // reclaimed when its lease expires.
            _ = shutdown.changed() => None,
            _ = state.wait_for(|s| *s >= SessionState::Lost) => None,
        };
        drop(request);
        let Some(answer) = answer else {
            // The carried completions may or may not have landed: send them again.
            outbox.release_carrier();
            outbox.put_back(carried);
            continue;
        };
        match answer {
            Ok(response) => {
                outbox.answered_by_claim(carried, response.completed);
                attempts.taken += response.tasks.len() as u64;
                for task in response.tasks {
                    let Some(slot) = permits.pop() else {
                        tracing::error!(job_id = %task.job_id, "the scheduler sent more tasks than asked for");
                        break;
                    };
                    let stop = Stop::default();
                    let lease = leases.hold(task.lease(), stop.clone());
                    let unpolled = Unpolled::spawned(&unpolled);
                    // Everything the attempt logs carries which attempt it is.
                    let span = tracing::info_span!(
                        "attempt",
                        job_id = %task.job_id,
                        attempt = %task.attempt,
                        runner_id = %registration.runner_id,
                    );
                    attempts.set.spawn(first_poll_counted(
                        unpolled,
                        tracing::Instrument::instrument(
                            attempt::run(ctx.clone(), task, stop, slot, lease),
                            span,
                        ),
                    ));
                }
            }
            Err(err) if err.is_unauthorized() => {
                outbox::fail(carried, &err);
                tracing::warn!("the scheduler no longer knows this runner; registering again");
                return Claiming::Lost;
            }
            Err(err) => {
                outbox.release_carrier();
                outbox.put_back(carried);
                tracing::warn!(error = %err, "claim failed");
                let pause = Backoff::default().pause() * 20;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        // Reap finished attempts without waiting.
        while attempts.set.try_join_next().is_some() {}
    }
}

/// Creates the workdir, mode 0711 when the tools run as other users: each slot's user can
/// reach its own workspace (0700, its own) by name, and list nothing.
fn prepare_workdir(config: &Config) -> crate::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        crate::Error::Config(format!(
            "SLUICE_RUNNER_WORKDIR {}: {e}",
            config.workdir.display()
        ))
    };
    std::fs::create_dir_all(&config.workdir).map_err(fail)?;
    if config.tool_uids.is_some() {
        std::fs::set_permissions(&config.workdir, std::fs::Permissions::from_mode(0o711))
            .map_err(fail)?;
    }
    crate::attempt::artifacts::prepare_archive_dir(&config.workdir).map_err(fail)?;
    Ok(())
}

/// Attempts spawned by the claim loop that have not been polled yet.
#[derive(Default)]
struct Unpolled {
    count: AtomicUsize,
    none_left: Notify,
}

impl Unpolled {
    /// Counts an attempt in until the returned guard is dropped (after its first poll, or
    /// unpolled if the attempt is dropped first).
    fn spawned(this: &Arc<Unpolled>) -> NotPolledYet {
        this.count.fetch_add(1, Ordering::AcqRel);
        NotPolledYet(this.clone())
    }

    /// Waits until every spawned attempt has been polled once, or `limit` has passed.
    async fn all_polled(&self, limit: Duration) {
        let waited = tokio::time::timeout(limit, async {
            loop {
                let notified = self.none_left.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        });
        let _ = waited.await;
    }
}

/// An attempt counted in [`Unpolled`].
struct NotPolledYet(Arc<Unpolled>);

impl Drop for NotPolledYet {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// Runs `attempt`, counting it out once its first poll has returned (a quick job has freed
/// its slot by then).
async fn first_poll_counted<F: Future>(counted: NotPolledYet, attempt: F) -> F::Output {
    let mut attempt = std::pin::pin!(attempt);
    let mut counted = Some(counted);
    std::future::poll_fn(move |cx| {
        let poll = attempt.as_mut().poll(cx);
        counted.take();
        poll
    })
    .await
}

/// Lets running attempts finish (heartbeats continue) until the drain deadline, then stops
/// them and gives up on undelivered POSTs.
async fn drain(
    config: &Config,
    leases: &Leases,
    attempts: &mut JoinSet<()>,
    hard_stop: &watch::Sender<bool>,
) {
    if !leases.is_empty() {
        tracing::info!(running = leases.len(), "draining");
    }
    let deadline = tokio::time::sleep(config.drain_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = attempts.join_next() => if next.is_none() { return },
            _ = &mut deadline => break,
        }
    }
    leases.stop_all(StopReason::Shutdown);
    let _ = hard_stop.send(true);
    while attempts.join_next().await.is_some() {}
}

/// Registers with back-off until it works; `None` if shutdown came first. The newest wire
/// version is offered first; a scheduler that does not speak it (400 `protocol_mismatch`) is
/// offered the next older one, down to the oldest this runner speaks. A registration the
/// scheduler refuses as malformed (a pod name or label it cannot take), or one no common
/// version exists for, is a configuration error, not retried; a refused secret is retried
/// (secrets are rotated).
async fn register(
    client: &Client,
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Registration>> {
    let mut request = RegisterRequest {
        pod_name: config.pod_name.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: Some(PROTOCOL_VERSION),
    };
    let mut backoff = Backoff::default();
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let answer: std::result::Result<RegisterResponse, CallError> = client
            .post(
                paths::REGISTER,
                &config.secret,
                &request,
                Duration::from_secs(10),
            )
            .await;
        match answer {
            Ok(response) => {
                return Ok(Some(Registration {
                    runner_id: response.runner_id,
                    token: Secret::new(response.token),
                    heartbeat: Duration::from_millis(response.heartbeat_ms.max(50)),
                    lease: Duration::from_millis(response.lease_ms.max(100)),
                    protocol: response.protocol,
                }))
            }
            Err(CallError::Status {
                status: 400,
                code: ErrorCode::ProtocolMismatch,
                message,
            }) => match request.protocol {
                Some(offered) if offered > OLDEST_PROTOCOL_VERSION => {
                    tracing::warn!(offered, scheduler = %message, "the scheduler does not speak this wire version; offering the previous one");
                    request.protocol = Some(offered - 1);
                    continue;
                }
                _ => {
                    return Err(crate::Error::Config(format!(
                        "the scheduler speaks no wire protocol version this runner does ({OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}): {message}; upgrade the older of the two"
                    )))
                }
            },
            Err(CallError::Status {
                status: 400 | 413,
                message,
                ..
            }) => {
                return Err(crate::Error::Config(format!(
                    "the scheduler refused this runner's registration: {message} (check RUNNER_POD_NAME and SLUICE_RUNNER_LABELS)"
                )))
            }
            Err(err) => tracing::warn!(error = %err, "registration failed; retrying"),
        }
        let pause = backoff.pause();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A scheduler that serves wire versions up to `newest`: answers each registration with
    /// 400 `protocol_mismatch` or 201, and records the versions offered.
    async fn scheduler_speaking(
        newest: u32,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<u32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (offered_tx, offered) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then a body of Content-Length bytes.
                let body = loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break body.to_string();
                        }
                    }
                };
                let offered: serde_json::Value = serde_json::from_str(&body).unwrap();
                let version = offered["protocol"].as_u64().unwrap() as u32;
                offered_tx.send(version).unwrap();
                let (status, answer) = if version <= newest {
                    (
                        "201 Created",
                        serde_json::json!({"runner_id": uuid::Uuid::nil(), "token": "t", "heartbeat_ms": 100, "lease_ms": 1000, "protocol": version}),
                    )
                } else {
                    (
                        "400 Bad Request",
                        serde_json::json!({"error": {"code": "protocol_mismatch", "message": format!("this runner speaks wire protocol {version}; this scheduler speaks 1 to {newest}")}}),
                    )
                };
                let answer = answer.to_string();
                let reply = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}", answer.len());
                socket.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        (url, offered)
    }

    fn config_for(url: &str) -> Config {
        let args = <crate::config::Args as clap::Parser>::parse_from([
            "sluice-runner",
            "--api-url",
            url,
            "--secret",
            "s",
            "--pod-name",
            "versions",
        ]);
        Config::from_args(args, None).unwrap()
    }

    #[tokio::test]
    async fn registration_offers_older_wire_versions_until_the_scheduler_speaks_one() {
        let (url, mut offered) = scheduler_speaking(1).await;
        let (_stop, mut shutdown) = watch::channel(false);
        let registration = register(&Client::new(&url), &config_for(&url), &mut shutdown)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(registration.protocol, 1);
        assert_eq!(offered.recv().await, Some(PROTOCOL_VERSION));
        assert_eq!(offered.recv().await, Some(1));

        // A scheduler that speaks none of this runner's versions is a configuration error.
        let (url, _offered) = scheduler_speaking(0).await;
        let err = register(&Client::new(&url), &config_for(&url), &mut shutdown)
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("speaks no wire protocol version"),
            "{err}"
        );
    }

    #[test]
    fn a_session_only_moves_forward() {
        let mut state = SessionState::Live;
        assert!(state.advance(SessionState::Draining));
        assert!(state.advance(SessionState::Lost));
        assert!(
            !state.advance(SessionState::Draining),
            "a lost session stays lost"
        );
        assert_eq!(state, SessionState::Lost);
        assert!(state.advance(SessionState::Ended));
        assert!(!state.advance(SessionState::Live));
    }
}
