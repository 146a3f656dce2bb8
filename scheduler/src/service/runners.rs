//! A runner's session: registration with the pool's secret (and the wire version both sides
//! speak), the runner's identity from its token, heartbeats and the orders they answer with,
//! and the attempt's event stream.
//!
//! A runner's identity comes from its token alone, never from a body or a URL; every task
//! write names its `(job, attempt, lease_token)`.

use std::collections::HashSet;

use sluice_protocol::{
    bounds, AttemptRef, CancelOrder, CancelReason, HeartbeatRequest, HeartbeatResponse, JobId,
    RegisterRequest, RegisterResponse, StreamRequest, StreamResponse, OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

use super::Context;
use crate::store::runners::{self, RegisterParams, RunnerIdentity};
use crate::store::{events, jobs};
use crate::{Error, Result};

/// Most leases one heartbeat may list.
pub const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// Most events one stream POST may carry.
pub const MAX_EVENTS_PER_POST: usize = 10_000;
/// Most labels a runner may register with.
pub const MAX_LABELS: usize = 64;

/// The runner holding `token`; `fresh` looks it up even when a lookup of the last two seconds
/// could serve (heartbeats, which must tell a replaced runner at once).
pub async fn identify(ctx: &Context, token: Option<&str>, fresh: bool) -> Result<RunnerIdentity> {
    let token = token.ok_or(Error::Unauthorized("missing bearer token"))?;
    let runner = if fresh {
        runners::get_by_token(&ctx.pool, token).await?
    } else {
        ctx.runner_tokens.get(&ctx.pool, token).await?
    };
    runner.ok_or(Error::Unauthorized("unknown or revoked runner token"))
}

/// A runner may only use its own pod's paths.
pub fn check_pod(runner: &RunnerIdentity, pod: &str) -> Result<()> {
    if runner.pod_name == pod {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "the token belongs to another runner than the one in the path".into(),
        ))
    }
}

/// Registers a new runner instance (its earlier instances of the same pod are gone, their
/// leases ended) after checking the pool's secret and every field, and answers with the wire
/// version both sides speak.
pub async fn register(
    ctx: &Context,
    secret: Option<&str>,
    request: RegisterRequest,
) -> Result<RegisterResponse> {
    match secret {
        None => return Err(Error::Unauthorized("missing registration secret")),
        Some(secret) if !ctx.config.runner_secret.matches(secret) => {
            return Err(Error::Unauthorized("invalid registration secret"))
        }
        Some(_) => {}
    }
    let protocol = agreed_protocol(request.protocol)?;
    if request.pod_name.is_empty() || request.pod_name.len() > 253 {
        return Err(Error::invalid("pod_name", "must be 1-253 bytes"));
    }
    Error::if_nul_str("pod_name", &request.pod_name)?;
    Error::if_nul_str("version", &request.version)?;
    if request.version.len() > 128 {
        return Err(Error::invalid("version", "must be at most 128 bytes"));
    }
    if request.labels.len() > MAX_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in &request.labels {
        if key.is_empty() || key.len() > 253 || value.len() > 255 {
            return Err(Error::invalid(
                "labels",
                "keys must be 1-253 bytes and values at most 255",
            ));
        }
        Error::if_nul_str("labels", key)?;
        Error::if_nul_str(&format!("labels.{key}"), value)?;
    }
    if request.slots == 0 || request.slots > 10_000 {
        return Err(Error::invalid("slots", "must be between 1 and 10000"));
    }
    let labels = serde_json::to_value(&request.labels)
        .map_err(|e| Error::invalid("labels", e.to_string()))?;
    let (runner_id, token) = runners::register(
        &ctx.pool,
        RegisterParams {
            pod_name: &request.pod_name,
            labels,
            slots: request.slots as i32,
            version: &request.version,
        },
    )
    .await?;
    ctx.runner_tokens.forget_pod(&request.pod_name);
    tracing::info!(%runner_id, pod = %request.pod_name, slots = request.slots, protocol, "runner registered");
    let timings = ctx.config.timings;
    Ok(RegisterResponse {
        runner_id,
        token: token.expose().to_string(),
        heartbeat_ms: timings.heartbeat.as_millis() as u64,
        lease_ms: timings.lease.as_millis() as u64,
        protocol,
    })
}

/// The wire version to use with a runner that sent `runner` (none: it predates versions, and
/// gets every form this scheduler has). A version this scheduler does not serve is refused,
/// naming both sides' versions.
fn agreed_protocol(runner: Option<u32>) -> Result<u32> {
    match runner {
        None => Ok(PROTOCOL_VERSION),
        Some(version) if (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) => {
            Ok(version)
        }
        Some(version) => Err(Error::ProtocolMismatch(format!(
            "this runner speaks wire protocol {version}; this scheduler speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        ))),
    }
}

/// `GET /api/runners`: the runners, with their states and the attempts each holds.
pub async fn list(ctx: &Context) -> Result<sluice_protocol::api::RunnerList> {
    let runners = runners::list(&ctx.pool)
        .await?
        .into_iter()
        .map(|r| sluice_protocol::api::RunnerInfo {
            id: r.id,
            pod_name: r.pod_name,
            state: r.state,
            slots: r.slots,
            slots_in_use: r.slots_in_use,
            version: r.version,
            labels: r.labels,
            registered_at: r.registered_at,
            last_seen_at: r.last_seen_at,
        })
        .collect();
    let pools = runners::list_pools(&ctx.pool)
        .await?
        .into_iter()
        .map(|p| sluice_protocol::api::PoolInfo {
            name: p.name,
            backend: p.backend,
            holder: p.holder,
            min_warm: p.min_warm,
            max_warm: p.max_warm,
            last_error: p.last_error,
            last_error_at: p.last_error_at,
            retry_at: p.retry_at,
            started_at: p.started_at,
            updated_at: p.updated_at,
        })
        .collect();
    Ok(sluice_protocol::api::RunnerList { runners, pools })
}

/// Renews the listed leases the runner still holds and answers with its orders: attempts to
/// stop (and why), and those not renewed this time because their rows were busy.
pub async fn heartbeat(
    ctx: &Context,
    runner: &RunnerIdentity,
    request: HeartbeatRequest,
) -> Result<HeartbeatResponse> {
    ctx.metrics.heartbeat(runner.id);
    if request.running.len() > MAX_HEARTBEAT_LEASES {
        return Err(Error::invalid(
            "running",
            format!("at most {MAX_HEARTBEAT_LEASES} leases per heartbeat"),
        ));
    }
    let mut seen = HashSet::with_capacity(request.running.len());
    if let Some(twice) = request
        .running
        .iter()
        .find(|l| !seen.insert((l.job_id, l.attempt)))
    {
        return Err(Error::invalid(
            "running",
            format!(
                "attempt {} of job {} is listed more than once",
                twice.attempt, twice.job_id
            ),
        ));
    }
    let seq = match request.seq.map(i64::try_from) {
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => return Err(Error::invalid("seq", "must be below 2^63")),
        None => None,
    };
    let ends = jobs::renew_leases_if_held(
        &ctx.pool,
        runner.id,
        &request.running,
        seq,
        ctx.config.timings.lease,
    )
    .await?;
    let mut response = HeartbeatResponse {
        // Ordered by the pool (an idle runner above the minimum): claim no more, finish,
        // exit.
        drain: runner.draining,
        ..HeartbeatResponse::default()
    };
    for (lease, end) in request.running.iter().zip(ends) {
        let attempt = AttemptRef {
            job_id: lease.job_id,
            attempt: lease.attempt,
        };
        let reason = match end {
            jobs::LeaseEnd::Renewed => continue,
            jobs::LeaseEnd::Busy => {
                response.unrenewed.push(attempt);
                continue;
            }
            jobs::LeaseEnd::Lost => CancelReason::LeaseLost,
            jobs::LeaseEnd::Cancelled => CancelReason::Cancelled,
            jobs::LeaseEnd::TimedOut => CancelReason::TimedOut,
        };
        response.cancel.push(CancelOrder {
            job_id: attempt.job_id,
            attempt: attempt.attempt,
            reason,
        });
    }
    Ok(response)
}

/// Stores an attempt's events (idempotent on `(job, attempt, seq)`), after checking each.
pub async fn stream(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    request: StreamRequest,
) -> Result<StreamResponse> {
    if request.events.len() > MAX_EVENTS_PER_POST {
        return Err(Error::invalid(
            "events",
            format!("at most {MAX_EVENTS_PER_POST} events per request"),
        ));
    }
    for (index, event) in request.events.iter().enumerate() {
        let field = format!("events[{index}]");
        if event.seq < 1 {
            return Err(Error::invalid(
                format!("{field}.seq"),
                format!("must be >= 1, got {}", event.seq),
            ));
        }
        let kind = event.kind.as_str();
        if kind.is_empty() || kind.len() > bounds::MAX_EVENT_KIND_BYTES {
            return Err(Error::invalid(
                format!("{field}.kind"),
                format!("must be 1-{} bytes", bounds::MAX_EVENT_KIND_BYTES),
            ));
        }
        Error::if_nul_str(&format!("{field}.kind"), kind)?;
        Error::if_nul(&format!("{field}.data"), &event.data)?;
    }
    let stored = events::append_if_leased(
        &ctx.pool,
        runner.id,
        job,
        request.attempt,
        request.lease_token,
        &request.events,
    )
    .await?;
    Ok(StreamResponse { stored })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_version_is_the_newest_both_speak() {
        assert_eq!(agreed_protocol(None).unwrap(), PROTOCOL_VERSION);
        assert_eq!(agreed_protocol(Some(1)).unwrap(), 1);
        assert_eq!(agreed_protocol(Some(2)).unwrap(), 2);
        for unknown in [0, 3, 99] {
            let err = agreed_protocol(Some(unknown)).unwrap_err();
            assert_eq!(err.code(), sluice_protocol::ErrorCode::ProtocolMismatch);
            let text = err.to_string();
            assert!(
                text.contains(&format!("protocol {unknown};")) && text.contains("1 to 2"),
                "{text}"
            );
        }
    }
}
