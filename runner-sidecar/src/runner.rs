//! The runner's life: register, claim for free slots, heartbeat the running leases, fence
//! itself when renewals stop, and drain on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_protocol::{
    paths, Attempt, CancelReason, ClaimResponse, Completion, ErrorCode, HeartbeatRequest,
    HeartbeatResponse, JobId, LeaseRef, RegisterRequest, RegisterResponse, RunnerId,
    BATCHED_COMPLETIONS, PROTOCOL_VERSION,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::client::{Backoff, CallError, Client};
use crate::config::{Config, Secret};
use crate::outbox::{self, Outbox};
use crate::slots::Slots;
use crate::task::{self, StopReason, TaskContext};
use crate::Result;

/// A running task as the heartbeat and the watchdog see it.
struct Running {
    lease: LeaseRef,
    stop: Arc<watch::Sender<Option<StopReason>>>,
    /// When the scheduler last confirmed the lease (claim time, then each good heartbeat).
    renewed_at: Instant,
}

/// The running attempts, by `(job, attempt)`: never by job alone, or a retried job's new
/// attempt landing here while the old one's tool still dies would overwrite or remove the
/// old one's entry, and with it its cancel orders, its heartbeats and its fence.
type RunningTasks = Arc<Mutex<HashMap<(JobId, Attempt), Running>>>;

/// The claim request, borrowing the completions it carries (`ClaimRequest` on the wire).
#[derive(serde::Serialize)]
struct ClaimBody<'a> {
    max: u32,
    wait_ms: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    complete: Vec<&'a Completion>,
}

/// One registration of this sidecar.
struct Session {
    runner_id: RunnerId,
    token: Secret,
    heartbeat: Duration,
    lease: Duration,
    /// The wire version the scheduler answered with: the request forms this session uses.
    protocol: u32,
}

impl Session {
    /// How long an event batch or a completion is retried while the scheduler answers with
    /// errors a retry may fix (no answer, 5xx, 429): as long as a database outage is ridden
    /// through. Past it the attempt ends with a clear error and frees its slot.
    fn delivery_budget(&self) -> Duration {
        self.lease * OUTAGE_RIDE_THROUGH_LEASES
    }
}

/// How long a database outage reported by the scheduler (503 to heartbeats) is ridden
/// through, in leases: while Postgres is away no scheduler can reclaim anything, and after it
/// returns the schedulers give expired leases one more term (F-07, F-20).
const OUTAGE_RIDE_THROUGH_LEASES: u32 = 5;
/// Longest a claim waits for the tasks of the last claim to have been polled once.
const GATHER_LIMIT: Duration = Duration::from_millis(1);

/// How long before the lease's end the sidecar stops a tool whose lease it could not renew,
/// so that the old attempt is dead before the scheduler hands the job to someone else.
fn fence_after(lease: Duration, heartbeat: Duration) -> Duration {
    let margin = (lease / 5).max(Duration::from_secs(1)).min(lease / 2);
    lease.saturating_sub(margin).max(heartbeat)
}

/// Runs the sidecar until `shutdown` turns true, then drains.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    crate::tools::exec::prepare();
    // Probed before the orphan reaper below starts, which would reap the probe's child.
    let _ = crate::process::can_isolate_network();
    if config.slots > 1 && !crate::process::can_isolate_mounts() {
        tracing::warn!(
            slots = config.slots,
            "tools cannot get a private /proc, /tmp and /run here (no private mount namespace, as under gVisor): tasks sharing this runner can see each other's processes and environments; run untrusted tasks with SLUICE_RUNNER_SLOTS=1 or one runner per task"
        );
    }
    if std::process::id() == 1 {
        // PID 1 of a container: orphans come to us, and their zombies must be reaped (B-13).
        tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let reaped = crate::process::reap_orphans();
                if reaped > 0 {
                    tracing::debug!(reaped, "reaped orphaned processes");
                }
            }
        });
    }
    let config = Arc::new(config);
    prepare_workdir(&config)?;
    // The slots and their uids live as long as the process: no other runner on this host
    // gets those uids meanwhile.
    let slots =
        Slots::new(config.slots, config.tool_uids.as_ref()).map_err(crate::Error::Config)?;
    let client = Client::new(&config.api_url);
    let running: RunningTasks = Arc::default();
    let (hard_stop_tx, hard_stop) = watch::channel(false);
    let mut tasks = JoinSet::new();

    'registrations: loop {
        let Some(session) = register(&client, &config, &mut shutdown).await? else {
            break;
        };
        tracing::info!(
            "sluice-runner {} registered as {} (wire protocol {})",
            config.pod_name,
            session.runner_id,
            session.protocol
        );
        let session = Arc::new(session);
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let (drain_tx, mut drain_rx) = watch::channel(false);
        let (session_end_tx, session_end) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            config.clone(),
            session.clone(),
            running.clone(),
            lost_tx,
            drain_tx,
            session_end.clone(),
        ));
        // Tasks spawned but not polled yet (see the gathering of free slots below).
        let unpolled = Arc::new(Unpolled::default());
        let outbox = Arc::new(Outbox::new(session.protocol >= BATCHED_COMPLETIONS));
        let flusher = tokio::spawn({
            let outbox = outbox.clone();
            let client = client.clone();
            let path = paths::complete_many(&config.pod_name);
            let token = session.token.clone();
            let hard_stop = hard_stop.clone();
            let session_end = session_end.clone();
            let budget = session.delivery_budget();
            async move {
                outbox
                    .flusher(client, path, token, budget, hard_stop, session_end)
                    .await
            }
        });
        let ctx = TaskContext {
            config: config.clone(),
            client: client.clone(),
            token: session.token.clone(),
            hard_stop: hard_stop.clone(),
            outbox: outbox.clone(),
            delivery_budget: session.delivery_budget(),
        };

        loop {
            if *shutdown.borrow() || *lost_rx.borrow() {
                break;
            }
            if *drain_rx.borrow() {
                outbox.release_carrier();
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = lost_rx.changed() => {}
                }
                continue;
            }
            // Wait for a free slot, then take every free one. A task frees its slot right
            // after queueing its completion, so the claim for that slot carries it.
            outbox.await_carrier();
            let first = tokio::select! {
                slot = slots.acquire() => slot,
                _ = shutdown.changed() => continue,
                _ = lost_rx.changed() => continue,
                _ = drain_rx.changed() => continue,
            };
            // Let the tasks that are finishing now free their slots too, so one claim carries
            // their completions and refills them all: wait (without spinning) until every task
            // of the last claim has been polled once — a quick job, such as `noop`, ends
            // within its first poll, possibly on the other worker thread — at most
            // GATHER_LIMIT, then take every free slot. A running tool is not waited for.
            unpolled.all_polled(GATHER_LIMIT).await;
            tokio::task::yield_now().await;
            let mut permits = vec![first];
            while let Some(slot) = slots.try_acquire() {
                permits.push(slot);
            }
            let carried = outbox.carry(outbox.carry_limit());
            let request = ClaimBody {
                max: permits.len() as u32,
                wait_ms: config.claim_wait.as_millis() as u64,
                complete: carried.iter().map(|p| &p.completion).collect(),
            };
            let claim_path = paths::claim(&config.pod_name);
            let claim = client.post::<_, ClaimResponse>(
                &claim_path,
                &session.token,
                &request,
                config.claim_wait + Duration::from_secs(10),
            );
            let answer = tokio::select! {
                answer = claim => Some(answer),
                // Stop claiming at once on shutdown; a job claimed in this instant is
                // reclaimed when its lease expires.
                _ = shutdown.changed() => None,
                _ = lost_rx.changed() => None,
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
                    for task in response.tasks {
                        let Some(permit) = permits.pop() else {
                            tracing::error!(job_id = %task.job_id, "the scheduler sent more tasks than asked for");
                            break;
                        };
                        let (stop_tx, _) = watch::channel(None);
                        let stop = Arc::new(stop_tx);
                        running.lock().expect("lock").insert(
                            (task.job_id, task.attempt),
                            Running {
                                lease: task.lease(),
                                stop: stop.clone(),
                                renewed_at: Instant::now(),
                            },
                        );
                        let ctx = ctx.clone();
                        let running = running.clone();
                        let unpolled = Unpolled::spawned(&unpolled);
                        tasks.spawn(first_poll_counted(unpolled, async move {
                            let key = (task.job_id, task.attempt);
                            let slot = permit.slot();
                            let completing = task::run(ctx, task, stop, slot).await;
                            // The tool has ended: the slot is free. The lease is kept (in
                            // the heartbeat) until the completion is delivered; the next
                            // heartbeat without it tells the scheduler the tool is gone.
                            drop(permit);
                            if let Some(completing) = completing {
                                completing.delivered().await;
                            }
                            running.lock().expect("lock").remove(&key);
                        }));
                    }
                }
                Err(err) if err.is_unauthorized() => {
                    outbox::fail(carried, &err);
                    tracing::warn!("the scheduler no longer knows this runner; registering again");
                    break;
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
            // Reap finished task futures without waiting.
            while tasks.try_join_next().is_some() {}
        }
        // No more claims in this registration: the flusher sends every completion.
        outbox.release_carrier();

        if *shutdown.borrow() {
            drain(&config, &running, &mut tasks, &hard_stop_tx).await;
            let _ = hard_stop_tx.send(true);
            let _ = session_end_tx.send(true);
            let _ = heartbeat.await;
            let _ = flusher.await;
            break 'registrations;
        }
        // The registration is gone: its leases are void. Stop every tool, then register anew.
        stop_all(&running, StopReason::LeaseLost);
        let _ = session_end_tx.send(true);
        while tasks.join_next().await.is_some() {}
        let _ = heartbeat.await;
        let _ = flusher.await;
    }
    let _ = hard_stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    tracing::info!("sluice-runner stopped");
    Ok(())
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
    Ok(())
}

/// Tasks spawned by the claim loop that have not been polled yet.
#[derive(Default)]
struct Unpolled {
    count: AtomicUsize,
    none_left: Notify,
}

impl Unpolled {
    /// Counts a task in until the returned guard is dropped (after its first poll, or
    /// unpolled if the task is dropped first).
    fn spawned(this: &Arc<Unpolled>) -> NotPolledYet {
        this.count.fetch_add(1, Ordering::AcqRel);
        NotPolledYet(this.clone())
    }

    /// Waits until every spawned task has been polled once, or `limit` has passed.
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

/// A task counted in [`Unpolled`].
struct NotPolledYet(Arc<Unpolled>);

impl Drop for NotPolledYet {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// Runs `task`, counting it out once its first poll has returned (a quick job has freed its
/// slot by then).
async fn first_poll_counted<F: Future>(counted: NotPolledYet, task: F) -> F::Output {
    let mut task = std::pin::pin!(task);
    let mut counted = Some(counted);
    std::future::poll_fn(move |cx| {
        let poll = task.as_mut().poll(cx);
        counted.take();
        poll
    })
    .await
}

fn stop_all(running: &RunningTasks, reason: StopReason) {
    for task in running.lock().expect("lock").values() {
        task.stop.send_replace(Some(reason));
    }
}

/// Lets running tasks finish (heartbeats continue) until the drain deadline, then stops them
/// and gives up on undelivered POSTs.
async fn drain(
    config: &Config,
    running: &RunningTasks,
    tasks: &mut JoinSet<()>,
    hard_stop: &watch::Sender<bool>,
) {
    let count = running.lock().expect("lock").len();
    if count > 0 {
        tracing::info!(running = count, "draining");
    }
    let deadline = tokio::time::sleep(config.drain_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut deadline => break,
        }
    }
    stop_all(running, StopReason::Shutdown);
    let _ = hard_stop.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Registers with back-off until it works; `None` if shutdown came first. A registration the
/// scheduler refuses as malformed (a pod name or label it cannot take) is a configuration
/// error, not retried; a refused secret is retried (secrets are rotated).
async fn register(
    client: &Client,
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Session>> {
    let request = RegisterRequest {
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
                return Ok(Some(Session {
                    runner_id: response.runner_id,
                    token: Secret::new(response.token),
                    heartbeat: Duration::from_millis(response.heartbeat_ms.max(50)),
                    lease: Duration::from_millis(response.lease_ms.max(100)),
                    protocol: response.protocol,
                }))
            }
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

/// Renews the running leases every heartbeat, applies the scheduler's orders, and fences: a
/// task whose lease was not confirmed for [`fence_after`] is stopped, whatever the reason
/// (scheduler unreachable, responses lost), before the scheduler can hand it out again.
async fn heartbeat_loop(
    client: Client,
    config: Arc<Config>,
    session: Arc<Session>,
    running: RunningTasks,
    lost: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    mut session_end: watch::Receiver<bool>,
) {
    let database_outage = Arc::new(AtomicBool::new(false));
    let watchdog = tokio::spawn(watchdog(
        session.clone(),
        running.clone(),
        database_outage.clone(),
        session_end.clone(),
    ));
    heartbeats(
        &client,
        &config,
        &session,
        &running,
        &lost,
        &drain,
        &database_outage,
        &mut session_end,
    )
    .await;
    watchdog.abort();
}

/// Self-fencing, apart from the heartbeat loop so that a heartbeat stuck in flight cannot
/// delay it: a task whose lease was not confirmed for [`fence_after`] is stopped. A scheduler
/// that answers "database unavailable" proves only that nobody can reclaim right now, so that
/// case is ridden through longer; silence or refusal is not.
async fn watchdog(
    session: Arc<Session>,
    running: RunningTasks,
    database_outage: Arc<AtomicBool>,
    mut session_end: watch::Receiver<bool>,
) {
    let fence = fence_after(session.lease, session.heartbeat);
    let outage_fence = session.lease * OUTAGE_RIDE_THROUGH_LEASES;
    let mut ticker = tokio::time::interval((session.heartbeat / 4).max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = session_end.changed() => return,
        }
        let limit = if database_outage.load(Ordering::Relaxed) {
            outage_fence
        } else {
            fence
        };
        for task in running.lock().expect("lock").values() {
            if task.renewed_at.elapsed() > limit && task.stop.borrow().is_none() {
                tracing::warn!(job_id = %task.lease.job_id, attempt = %task.lease.attempt, "lease not renewed in time; stopping the tool");
                task.stop.send_replace(Some(StopReason::LeaseLost));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    client: &Client,
    config: &Config,
    session: &Session,
    running: &RunningTasks,
    lost: &watch::Sender<bool>,
    drain: &watch::Sender<bool>,
    database_outage: &AtomicBool,
    session_end: &mut watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(session.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = paths::heartbeat(&config.pod_name);
    // Numbered heartbeats came with version 2; an older scheduler is sent none.
    let numbered = session.protocol >= BATCHED_COMPLETIONS;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = session_end.changed() => return,
        }
        let leases: Vec<LeaseRef> = running
            .lock()
            .expect("lock")
            .values()
            .map(|t| t.lease)
            .collect();
        let sent_at = Instant::now();
        seq += 1;
        let request = HeartbeatRequest {
            running: leases.clone(),
            seq: numbered.then_some(seq),
        };
        // Longer than the scheduler's 1 s wait for a database connection, so that an outage
        // is heard as a 503 rather than as silence.
        let timeout = session.heartbeat.max(Duration::from_secs(2));
        let answer: std::result::Result<HeartbeatResponse, CallError> = tokio::select! {
            answer = client.post(&path, &session.token, &request, timeout) => answer,
            _ = session_end.changed() => return,
        };
        // Whether this heartbeat was answered "database unavailable" (as opposed to no answer
        // at all, or a refusal).
        let outage = match answer {
            Ok(response) => {
                let mut tasks = running.lock().expect("lock");
                for order in &response.cancel {
                    if let Some(task) = tasks.get(&(order.job_id, order.attempt)) {
                        let reason = match order.reason {
                            CancelReason::Cancelled => StopReason::Cancelled,
                            CancelReason::TimedOut => StopReason::TimedOut,
                            // A reason this version does not know still ends the lease.
                            CancelReason::LeaseLost | CancelReason::Other(_) => {
                                StopReason::LeaseLost
                            }
                        };
                        tracing::info!(job_id = %order.job_id, attempt = %order.attempt, reason = %order.reason, "stopping task on the scheduler's order");
                        task.stop.send_replace(Some(reason));
                    }
                }
                for lease in &leases {
                    let same = |job_id: JobId, attempt: Attempt| {
                        job_id == lease.job_id && attempt == lease.attempt
                    };
                    let cancelled = response.cancel.iter().any(|o| same(o.job_id, o.attempt));
                    let unrenewed = response.unrenewed.iter().any(|u| same(u.job_id, u.attempt));
                    if let Some(task) = tasks.get_mut(&(lease.job_id, lease.attempt)) {
                        if !cancelled && !unrenewed {
                            task.renewed_at = task.renewed_at.max(sent_at);
                        }
                    }
                }
                if response.drain {
                    drain.send_replace(true);
                }
                false
            }
            Err(err) if err.is_unauthorized() => {
                lost.send_replace(true);
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "heartbeat failed");
                // Only "the database is unreachable" proves nobody can reclaim meanwhile; a
                // busy database (a lost deadlock) or a full pool is no outage.
                matches!(
                    &err,
                    CallError::Status {
                        status: 503,
                        code: ErrorCode::Unavailable,
                        ..
                    }
                )
            }
        };
        database_outage.store(outage, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_falls_before_the_lease_ends() {
        let fence = fence_after(Duration::from_secs(30), Duration::from_secs(5));
        assert_eq!(fence, Duration::from_secs(24));
        let fence = fence_after(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(fence, Duration::from_secs(4));
        let fence = fence_after(Duration::from_millis(1000), Duration::from_millis(200));
        assert_eq!(fence, Duration::from_millis(500));
    }
}
