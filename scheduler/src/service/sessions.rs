//! Agent sessions: the conversation an agent step with `session` continues (the seed's
//! `Agent(session_id, …)`).
//!
//! - A claimed agent job with a session gets it only when no other running attempt holds it
//!   and no older agent job of the session waits ([`hand_over`]); otherwise its claim is
//!   undone and it is claimable again [`POSTPONE_MS`] later, so one job of a session runs at
//!   a time, oldest first.
//! - The holder sends its new turns before its completion ([`keep_turns`]); they are kept
//!   aside, appended to the history it started from and capped (`cap_history`), and become
//!   the history in the statement that records the job's success (`sql/0010`).
//! - `GET /api/sessions/:name` reads a session, `DELETE` forgets it ([`get`], [`delete`]).

use serde_json::Value;
use sluice_protocol::{
    api::AgentSession, bounds, cap_history, Attempt, JobId, LeaseToken, SessionTurns,
    SessionTurnsResponse, TaskSession,
};

use super::Context;
use crate::store::runners::RunnerIdentity;
use crate::store::sessions;
use crate::{Error, Result};

/// How long a job whose session is busy waits before it is claimable again.
pub const POSTPONE_MS: i64 = 500;

/// What a claimed agent job's session says.
pub enum HandOver {
    /// The attempt holds the session: here is its history.
    Held(TaskSession),
    /// Another attempt holds it, or an older job of it waits: the claim was undone.
    Postponed,
}

/// Hands `name` to the claimed attempt, or undoes the claim while the session is busy.
pub async fn hand_over(
    ctx: &Context,
    name: &str,
    job: JobId,
    attempt: Attempt,
    lease_token: LeaseToken,
) -> Result<HandOver> {
    match sessions::acquire(&ctx.pool, name, job, attempt).await? {
        Some(history) => Ok(HandOver::Held(TaskSession {
            name: name.to_string(),
            messages: match history {
                Value::Array(messages) => messages,
                _ => Vec::new(),
            },
        })),
        None => {
            sessions::postpone(&ctx.pool, job, attempt, lease_token, POSTPONE_MS).await?;
            tracing::debug!(job_id = %job, session = name, "session busy; the job waits");
            Ok(HandOver::Postponed)
        }
    }
}

/// Undoes the claim of `job` (best effort), as when its session is busy.
pub async fn put_back(ctx: &Context, job: &crate::store::jobs::ClaimedJob) -> Result<bool> {
    sessions::postpone(&ctx.pool, job.id, job.attempt, job.lease_token, POSTPONE_MS).await
}

/// `POST /internal/tasks/:id/session`: keeps the attempt's new turns, to become the session's
/// history when the job succeeds.
pub async fn keep_turns(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    turns: SessionTurns,
) -> Result<SessionTurnsResponse> {
    let new = Value::Array(turns.messages);
    if let Some(path) = bounds::nul_path(&new) {
        return Err(Error::invalid(
            bounds::field_path("messages", &path),
            "must not contain NUL characters",
        ));
    }
    if !new
        .as_array()
        .into_iter()
        .flatten()
        .all(|m| m.get("role").and_then(Value::as_str).is_some() && m.get("content").is_some())
    {
        return Err(Error::invalid(
            "messages",
            "every message needs a \"role\" and \"content\"",
        ));
    }
    let lease = (job, turns.attempt, turns.lease_token, runner.id);
    let Some(history) =
        sessions::held_history(&ctx.pool, lease.0, lease.1, lease.2, lease.3).await?
    else {
        return Err(Error::LeaseLost);
    };
    let mut messages = match history {
        Value::Array(messages) => messages,
        _ => Vec::new(),
    };
    messages.extend(new.as_array().cloned().unwrap_or_default());
    cap_history(&mut messages, ctx.config.session_max_bytes);
    let kept = sessions::keep_pending(
        &ctx.pool,
        lease.0,
        lease.1,
        lease.2,
        lease.3,
        &Value::Array(messages),
    )
    .await?;
    if !kept {
        return Err(Error::LeaseLost);
    }
    Ok(SessionTurnsResponse { stored: true })
}

/// `GET /api/sessions/:name`.
pub async fn get(ctx: &Context, name: &str) -> Result<AgentSession> {
    check_name(name)?;
    let row = sessions::get(&ctx.pool, name)
        .await?
        .ok_or(Error::NotFound("session"))?;
    Ok(AgentSession {
        name: row.name,
        messages: match row.messages {
            Value::Array(messages) => messages,
            _ => Vec::new(),
        },
        jobs: row.jobs,
        held_by: row.held_by.map(JobId),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// `DELETE /api/sessions/:name`: forgets the history; refused (409) while an attempt holds
/// the session, which would otherwise run beside the next job of a new session.
pub async fn delete(ctx: &Context, name: &str) -> Result<()> {
    check_name(name)?;
    match sessions::delete(&ctx.pool, name).await? {
        (false, _) => Err(Error::NotFound("session")),
        (true, false) => Err(Error::Conflict(
            "an agent job holds the session; cancel it or wait for it to end".into(),
        )),
        (true, true) => Ok(()),
    }
}

fn check_name(name: &str) -> Result<()> {
    bounds::check_session_name(name).map_err(|reason| Error::invalid("name", reason))
}
