//! Agent sessions: the conversation an agent step with `session` continues (the seed's
//! `Agent(session_id, …)`).
//!
//! - A claimed agent job with a session gets it only when no other running attempt holds it
//!   and no older agent job of the session waits ([`hand_over`]); otherwise its claim is
//!   undone and it is claimable again [`POSTPONE_MS`] later, so one job of a session runs at
//!   a time, oldest first.
//! - The holder sends its new turns before its completion ([`keep_turns`]); they are kept
//!   aside, appended to the history it started from and capped ([`cap_history`]), and become
//!   the history in the statement that records the job's success (`sql/0010`).
//! - `GET /api/sessions/:name` reads a session, `DELETE` forgets it ([`get`], [`delete`]).

use serde_json::{json, Value};
use sluice_protocol::{
    api::AgentSession, bounds, Attempt, JobId, LeaseToken, SessionTurns, SessionTurnsResponse,
    TaskSession,
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

/// What an elided tool result or input says instead.
const ELIDED: &str = "[elided: an older tool result, to keep the session under its size cap]";

/// Keeps `messages` under `max` bytes of JSON: the oldest tool results are elided first,
/// then the oldest tool inputs, then whole exchanges (a user prompt and everything up to the
/// next prompt) are dropped from the front, the last exchange always kept. The history
/// stays one the Messages API accepts: it starts with a prompt, and every `tool_use` keeps
/// its `tool_result`.
pub fn cap_history(messages: &mut Vec<Value>, max: usize) {
    let size = |messages: &Vec<Value>| serde_json::to_vec(messages).map_or(0, |v| v.len());
    let mut current = size(messages);
    if current <= max {
        return;
    }
    // Tool results, oldest first; then tool inputs.
    for (kind, field, replacement) in [
        ("tool_result", "content", json!(ELIDED)),
        ("tool_use", "input", json!({ "elided": ELIDED })),
    ] {
        for message in messages.iter_mut() {
            let Some(blocks) = message.get_mut("content").and_then(Value::as_array_mut) else {
                continue;
            };
            for block in blocks.iter_mut() {
                if block.get("type").and_then(Value::as_str) != Some(kind) {
                    continue;
                }
                let Some(slot) = block.get_mut(field) else {
                    continue;
                };
                if *slot == replacement {
                    continue;
                }
                let before = serde_json::to_vec(slot).map_or(0, |v| v.len());
                let after = serde_json::to_vec(&replacement).map_or(0, |v| v.len());
                if before <= after {
                    continue;
                }
                *slot = replacement.clone();
                current -= before - after;
                if current <= max {
                    return;
                }
            }
        }
    }
    // Whole exchanges, oldest first.
    loop {
        let next_prompt = messages
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, m)| is_prompt(m))
            .map(|(i, _)| i);
        let Some(next) = next_prompt else { return };
        messages.drain(..next);
        current = size(messages);
        if current <= max {
            return;
        }
    }
}

/// A user message that starts an exchange (not one carrying tool results).
fn is_prompt(message: &Value) -> bool {
    if message.get("role").and_then(Value::as_str) != Some("user") {
        return false;
    }
    match message.get("content") {
        Some(Value::Array(blocks)) => !blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(prompt: &str, result: &str) -> Vec<Value> {
        vec![
            json!({"role": "user", "content": prompt}),
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": format!("t-{prompt}"), "name": "bash", "input": {"command": "x".repeat(100)}}
            ]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": format!("t-{prompt}"), "content": result}
            ]}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "done"}]}),
        ]
    }

    fn bytes(messages: &Vec<Value>) -> usize {
        serde_json::to_vec(messages).unwrap().len()
    }

    #[test]
    fn a_history_under_the_cap_is_untouched() {
        let mut messages = exchange("a", "small");
        let before = messages.clone();
        cap_history(&mut messages, 1 << 20);
        assert_eq!(messages, before);
    }

    #[test]
    fn the_oldest_tool_results_are_elided_first() {
        let big = "r".repeat(10_000);
        let mut messages = exchange("a", &big);
        messages.extend(exchange("b", &big));
        let max = bytes(&messages) - 5_000;
        cap_history(&mut messages, max);
        assert!(bytes(&messages) <= max);
        assert_eq!(messages.len(), 8, "no exchange dropped");
        assert_eq!(messages[2]["content"][0]["content"], ELIDED);
        assert_eq!(
            messages[6]["content"][0]["content"], big,
            "the newest result is kept"
        );
        // The pairing the API needs is intact.
        assert_eq!(messages[2]["content"][0]["tool_use_id"], "t-a");
    }

    #[test]
    fn whole_exchanges_go_when_elision_is_not_enough() {
        let mut messages = Vec::new();
        for prompt in ["a", "b", "c"] {
            messages.extend(exchange(prompt, "ok"));
        }
        let last = exchange("c", "ok");
        cap_history(&mut messages, bytes(&last) + 10);
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[0]["content"], "c", "starts with a prompt");
        assert!(is_prompt(&messages[0]));
    }

    #[test]
    fn the_last_exchange_is_kept_even_over_the_cap() {
        let mut messages = exchange("only", &"r".repeat(1000));
        cap_history(&mut messages, 10);
        assert_eq!(messages.len(), 4);
        assert_eq!(messages[0]["content"], "only");
    }
}
