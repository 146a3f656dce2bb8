//! Heartbeats and the fence. Every heartbeat lists the held leases; the answer renews them,
//! orders attempts to stop (and says why), or asks the runner to drain. Apart from it the
//! fence stops any attempt whose lease was not confirmed for [`fence_after`], whatever the
//! reason (scheduler unreachable, answers lost), before the scheduler can hand it out again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_protocol::{
    paths, Attempt, CancelReason, ErrorCode, HeartbeatRequest, HeartbeatResponse, JobId,
    BATCHED_COMPLETIONS,
};
use tokio::sync::watch;

use super::{Registration, SessionState, OUTAGE_RIDE_THROUGH_LEASES};
use crate::client::{CallError, Client};
use crate::config::Config;
use crate::exec::StopReason;
use crate::leases::Leases;

/// How long before the lease's end the sidecar stops a tool whose lease it could not renew,
/// so that the old attempt is dead before the scheduler hands the job to someone else.
pub fn fence_after(lease: Duration, heartbeat: Duration) -> Duration {
    let margin = (lease / 5).max(Duration::from_secs(1)).min(lease / 2);
    lease.saturating_sub(margin).max(heartbeat)
}

/// Heartbeats and fences until the session ends; moves the session to `Draining` or `Lost`
/// when the scheduler says so.
pub async fn run(
    client: Client,
    config: Arc<Config>,
    registration: Arc<Registration>,
    leases: Leases,
    state: watch::Sender<SessionState>,
) {
    let database_outage = Arc::new(AtomicBool::new(false));
    let fence = tokio::spawn(fence(
        registration.clone(),
        leases.clone(),
        database_outage.clone(),
        state.subscribe(),
    ));
    heartbeats(
        &client,
        &config,
        &registration,
        &leases,
        &state,
        &database_outage,
    )
    .await;
    fence.abort();
}

/// The fence, apart from the heartbeats so that a heartbeat stuck in flight cannot delay it.
/// A scheduler that answers "database unavailable" proves only that nobody can reclaim right
/// now, so that case is ridden through longer; silence or refusal is not.
async fn fence(
    registration: Arc<Registration>,
    leases: Leases,
    database_outage: Arc<AtomicBool>,
    mut state: watch::Receiver<SessionState>,
) {
    let fence = fence_after(registration.lease, registration.heartbeat);
    let outage_fence = registration.lease * OUTAGE_RIDE_THROUGH_LEASES;
    let mut ticker =
        tokio::time::interval((registration.heartbeat / 4).max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = state.wait_for(|s| *s == SessionState::Ended) => return,
        }
        let limit = if database_outage.load(Ordering::Relaxed) {
            outage_fence
        } else {
            fence
        };
        for held in leases.lock().values() {
            if held.renewed_at.elapsed() > limit && held.stop.reason().is_none() {
                tracing::warn!(job_id = %held.lease.job_id, attempt = %held.lease.attempt, "lease not renewed in time; stopping the tool");
                held.stop.order(StopReason::LeaseLost);
            }
        }
    }
}

async fn heartbeats(
    client: &Client,
    config: &Config,
    registration: &Registration,
    leases: &Leases,
    state: &watch::Sender<SessionState>,
    database_outage: &AtomicBool,
) {
    let mut ended = state.subscribe();
    let mut ticker = tokio::time::interval(registration.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = paths::heartbeat(&config.pod_name);
    // Numbered heartbeats came with version 2; an older scheduler is sent none.
    let numbered = registration.protocol >= BATCHED_COMPLETIONS;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ended.wait_for(|s| *s == SessionState::Ended) => return,
        }
        let listed = leases.listed();
        let sent_at = Instant::now();
        seq += 1;
        let request = HeartbeatRequest {
            running: listed.clone(),
            seq: numbered.then_some(seq),
        };
        // Longer than the scheduler's 1 s wait for a database connection, so that an outage
        // is heard as a 503 rather than as silence.
        let timeout = registration.heartbeat.max(Duration::from_secs(2));
        let answer: Result<HeartbeatResponse, CallError> = tokio::select! {
            answer = client.post(&path, &registration.token, &request, timeout) => answer,
            _ = ended.wait_for(|s| *s == SessionState::Ended) => return,
        };
        // Whether this heartbeat was answered "database unavailable" (as opposed to no answer
        // at all, or a refusal).
        let outage = match answer {
            Ok(response) => {
                apply(&response, &listed, leases, sent_at);
                if response.drain {
                    state.send_if_modified(|s| s.advance(SessionState::Draining));
                }
                false
            }
            Err(err) if err.is_unauthorized() => {
                state.send_if_modified(|s| s.advance(SessionState::Lost));
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

/// Applies a heartbeat's answer: the stop orders, and the renewal of every listed lease that
/// was neither stopped nor left unrenewed (a busy row).
fn apply(
    response: &HeartbeatResponse,
    listed: &[sluice_protocol::LeaseRef],
    leases: &Leases,
    sent_at: Instant,
) {
    let mut held = leases.lock();
    for order in &response.cancel {
        if let Some(attempt) = held.get(&(order.job_id, order.attempt)) {
            let reason = match order.reason {
                CancelReason::Cancelled => StopReason::Cancelled,
                CancelReason::TimedOut => StopReason::TimedOut,
                // A reason this version does not know still ends the lease.
                CancelReason::LeaseLost | CancelReason::Other(_) => StopReason::LeaseLost,
            };
            tracing::info!(job_id = %order.job_id, attempt = %order.attempt, reason = %order.reason, "stopping the attempt on the scheduler's order");
            attempt.stop.order(reason);
        }
    }
    for lease in listed {
        let same =
            |job_id: JobId, attempt: Attempt| job_id == lease.job_id && attempt == lease.attempt;
        let cancelled = response.cancel.iter().any(|o| same(o.job_id, o.attempt));
        let unrenewed = response.unrenewed.iter().any(|u| same(u.job_id, u.attempt));
        if let Some(attempt) = held.get_mut(&(lease.job_id, lease.attempt)) {
            if !cancelled && !unrenewed {
                attempt.renewed_at = attempt.renewed_at.max(sent_at);
            }
        }
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
