//! What applications and operators do with jobs and queues: enqueue (one or a batch), read,
//! cancel, retry; list, pause and resume queues. Every input is checked here against its
//! documented range ([`bounds`]) with an error naming the field; the insert trigger checks the
//! same for plain SQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_protocol::api::{
    AttemptInfo, EnqueueRequest, EnqueueResponse, Job, JobList, JobStateChange, JobSummary, Queue,
    QueuePaused, RetryManyRequest, RetryManyResponse, RetryPolicy,
};
use sluice_protocol::{bounds, parse_spec, JobId, JobState};

use super::Context;
use crate::store::jobs::{self, CancelOutcome, Enqueued, NewJob, Retried};
use crate::store::queues;
use crate::{Error, Result};

/// Most jobs one batch request may carry.
pub const MAX_BATCH: usize = 10_000;

/// Enqueues one job: its id and state, and whether this call created it (`false` when its
/// idempotency key names a stored job, which is answered instead).
pub async fn enqueue(ctx: &Context, request: EnqueueRequest) -> Result<(EnqueueResponse, bool)> {
    let job = validate(request)?;
    let enqueued = jobs::insert_many(&ctx.pool, std::slice::from_ref(&job)).await?;
    let first = enqueued
        .first()
        .ok_or_else(|| Error::Internal("enqueue returned nothing".into()))?;
    if first.created {
        ctx.metrics.enqueued(std::iter::once(job.queue.as_str()));
    }
    Ok((response_of(first), first.created))
}

/// Enqueues many jobs in one transaction, in order: all or none. A problem names the member
/// (`jobs[3].priority`).
pub async fn enqueue_batch(
    ctx: &Context,
    requests: Vec<EnqueueRequest>,
) -> Result<Vec<EnqueueResponse>> {
    if requests.is_empty() {
        return Err(Error::invalid("jobs", "must hold at least one job"));
    }
    if requests.len() > MAX_BATCH {
        return Err(Error::invalid(
            "jobs",
            format!("at most {MAX_BATCH} jobs per batch"),
        ));
    }
    let mut new_jobs = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let job = validate(request).map_err(|err| match err {
            Error::InvalidSpec(message) => Error::InvalidSpec(format!("jobs[{index}]: {message}")),
            Error::Invalid { field, reason } => {
                Error::invalid(format!("jobs[{index}].{field}"), reason)
            }
            other => other,
        })?;
        new_jobs.push(job);
    }
    let enqueued = jobs::insert_many(&ctx.pool, &new_jobs).await?;
    ctx.metrics.enqueued(
        new_jobs
            .iter()
            .zip(&enqueued)
            .filter(|(_, result)| result.created)
            .map(|(job, _)| job.queue.as_str()),
    );
    Ok(enqueued.iter().map(response_of).collect())
}

/// A job with its attempts.
pub async fn get(ctx: &Context, id: JobId) -> Result<Job> {
    let row = jobs::get(&ctx.pool, id)
        .await?
        .ok_or(Error::NotFound("job"))?;
    let attempts = jobs::list_attempts(&ctx.pool, id).await?;
    let state = JobState::parse(&row.state)
        .ok_or_else(|| Error::Internal(format!("unknown job state {:?}", row.state)))?;
    Ok(Job {
        id: JobId(row.id),
        queue: row.queue,
        state,
        spec: row.spec,
        priority: row.priority,
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        timeout_ms: row.timeout_ms,
        idempotency_key: row.idempotency_key,
        retry: stored_policy(row.retry),
        result: row.result,
        error: row.error,
        run_at: row.run_at,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        attempts: attempts
            .into_iter()
            .map(|a| AttemptInfo {
                attempt: a.attempt,
                runner_id: a.runner_id,
                started_at: a.started_at,
                finished_at: a.finished_at,
                outcome: a.outcome,
                error: a.error,
            })
            .collect(),
    })
}

/// Cancels a job that has not finished (a running attempt's tool is killed at its runner's
/// next heartbeat). Cancelling a cancelled job answers the same; a finished one is a conflict.
pub async fn cancel(ctx: &Context, id: JobId) -> Result<JobStateChange> {
    let outcome = jobs::cancel(&ctx.pool, id).await?;
    if outcome.is_some() {
        ctx.events.jobs_ended([id]);
    }
    match outcome {
        None => Err(Error::NotFound("job")),
        Some(CancelOutcome::Cancelled)
        | Some(CancelOutcome::AlreadyFinished(JobState::Cancelled)) => Ok(JobStateChange {
            id,
            state: JobState::Cancelled,
        }),
        Some(CancelOutcome::AlreadyFinished(done)) => Err(Error::Conflict(format!(
            "job {id} already {done}; it cannot be cancelled"
        ))),
    }
}

/// Runs a failed or cancelled job again: `available`, or `scheduled` until its stopped last
/// attempt is confirmed gone. Any other state is a conflict.
pub async fn retry(ctx: &Context, id: JobId) -> Result<JobStateChange> {
    match jobs::retry_if_finished_unsuccessfully(&ctx.pool, id).await? {
        None => Err(Error::NotFound("job")),
        Some(Retried {
            before: JobState::Failed | JobState::Cancelled,
            after,
        }) => Ok(JobStateChange { id, state: after }),
        Some(Retried { before, .. }) => Err(Error::Conflict(format!(
            "job {id} is {before}; only failed or cancelled jobs can be retried"
        ))),
    }
}

/// Most jobs one list page may hold.
pub const MAX_LIST: i64 = 1000;
/// Most jobs one bulk retry may retry.
pub const MAX_RETRY_MANY: u32 = 10_000;

/// `GET /api/jobs`: jobs newest first, filtered.
pub async fn list(
    ctx: &Context,
    queue: Option<&str>,
    state: Option<&str>,
    since: Option<&str>,
    before: Option<i64>,
    limit: Option<i64>,
) -> Result<JobList> {
    if let Some(queue) = queue {
        if !valid_queue_name(queue) {
            return Err(Error::invalid("queue", "not a valid queue name"));
        }
    }
    let state = state
        .map(|s| {
            JobState::parse(s).ok_or_else(|| {
                Error::invalid(
                    "state",
                    "must be blocked, scheduled, available, running, succeeded, failed or cancelled",
                )
            })
        })
        .transpose()?;
    let since = since
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    Error::invalid("since", "must be an RFC 3339 time (2026-12-01T00:00:00Z)")
                })
        })
        .transpose()?;
    if before.is_some_and(|b| b < 1) {
        return Err(Error::invalid("before", "must be a job id (at least 1)"));
    }
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIST}"),
        ));
    }
    let filter = jobs::JobFilter {
        queue,
        state,
        since,
        before,
    };
    let rows = jobs::list(&ctx.pool, &filter, limit).await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| JobId(r.id)))
        .flatten();
    let jobs = rows
        .into_iter()
        .map(|row| {
            Ok(JobSummary {
                id: JobId(row.id),
                queue: row.queue,
                state: JobState::parse(&row.state)
                    .ok_or_else(|| Error::Internal(format!("unknown job state {:?}", row.state)))?,
                kind: row.kind,
                priority: row.priority,
                attempt: row.attempt,
                max_attempts: row.max_attempts,
                run_id: row.workflow_run_id,
                run_at: row.run_at,
                created_at: row.created_at,
                finished_at: row.finished_at,
            })
        })
        .collect::<Result<_>>()?;
    Ok(JobList { jobs, next_before })
}

/// `POST /api/jobs/retry`: a bulk redrive, each job retried as [`retry`] would (its own
/// short transaction, the same fencing against a cancelled attempt still stopping).
pub async fn retry_many(ctx: &Context, request: RetryManyRequest) -> Result<RetryManyResponse> {
    if let Some(queue) = &request.queue {
        if !valid_queue_name(queue) {
            return Err(Error::invalid("queue", "not a valid queue name"));
        }
    }
    if request.queue.is_none() && request.state.is_none() && request.since.is_none() && !request.all
    {
        return Err(Error::invalid(
            "all",
            "name a queue, a state or a time to retry, or set \"all\": true",
        ));
    }
    let state = request.state.unwrap_or(JobState::Failed);
    if !matches!(state, JobState::Failed | JobState::Cancelled) {
        return Err(Error::invalid("state", "must be failed or cancelled"));
    }
    let limit = request.limit.unwrap_or(1000);
    if !(1..=MAX_RETRY_MANY).contains(&limit) {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and {MAX_RETRY_MANY}"),
        ));
    }
    // One more than asked: whether more match.
    let mut ids = jobs::to_retry(
        &ctx.pool,
        state,
        request.queue.as_deref(),
        request.since,
        i64::from(limit) + 1,
    )
    .await?;
    let more = ids.len() > limit as usize;
    ids.truncate(limit as usize);
    let mut retried = Vec::with_capacity(ids.len());
    for id in ids {
        // A job changed meanwhile (retried, or deleted) is skipped.
        if let Some(Retried {
            before: JobState::Failed | JobState::Cancelled,
            after,
        }) = jobs::retry_if_finished_unsuccessfully(&ctx.pool, id).await?
        {
            retried.push(JobStateChange { id, state: after });
        }
    }
    if !retried.is_empty() {
        tracing::info!(retried = retried.len(), %state, queue = request.queue.as_deref().unwrap_or("*"), "bulk retry");
    }
    Ok(RetryManyResponse { retried, more })
}

/// Every queue with its settings and job counts, by name.
pub async fn list_queues(ctx: &Context) -> Result<Vec<Queue>> {
    let rows = queues::list(&ctx.pool).await?;
    Ok(rows
        .into_iter()
        .map(|q| Queue {
            name: q.name,
            paused: q.paused,
            max_running: q.max_running,
            default_priority: q.default_priority,
            default_max_attempts: q.default_max_attempts,
            default_timeout_ms: q.default_timeout_ms,
            default_retry: stored_policy(q.default_retry),
            retention_seconds: q.retention_seconds,
            jobs: q.jobs.0,
        })
        .collect())
}

/// Pauses or resumes a queue (creating it, so a queue can be paused before its first job).
pub async fn set_queue_paused(ctx: &Context, name: String, paused: bool) -> Result<QueuePaused> {
    if !valid_queue_name(&name) {
        return Err(Error::invalid("queue", "not a valid queue name"));
    }
    queues::set_paused(&ctx.pool, &name, paused).await?;
    Ok(QueuePaused { name, paused })
}

/// A stored policy (checked by the schema) as the API shows it.
fn stored_policy(stored: Option<serde_json::Value>) -> Option<RetryPolicy> {
    stored.and_then(|value| serde_json::from_value(value).ok())
}

/// Checks a retry policy's ranges; returns it as stored (without `max_attempts`, which is the
/// job's column) and the `max_attempts` it names.
pub(crate) fn check_retry(policy: &RetryPolicy) -> Result<(serde_json::Value, Option<i32>)> {
    check_range(
        "retry.max_attempts",
        policy.max_attempts,
        bounds::MIN_ATTEMPTS,
        bounds::MAX_ATTEMPTS,
        "",
    )?;
    check_range(
        "retry.initial_ms",
        policy.initial_ms,
        0,
        bounds::MAX_RETRY_INITIAL_MS,
        " (one day)",
    )?;
    check_range(
        "retry.max_ms",
        policy.max_ms,
        0,
        bounds::MAX_RETRY_MAX_MS,
        " (366 days)",
    )?;
    if let Some(factor) = policy.factor {
        if !(bounds::MIN_RETRY_FACTOR..=bounds::MAX_RETRY_FACTOR).contains(&factor) {
            return Err(Error::invalid(
                "retry.factor",
                format!(
                    "must be between {} and {}",
                    bounds::MIN_RETRY_FACTOR,
                    bounds::MAX_RETRY_FACTOR
                ),
            ));
        }
    }
    let stored = RetryPolicy {
        max_attempts: None,
        ..*policy
    };
    Ok((
        serde_json::to_value(stored).unwrap_or_default(),
        policy.max_attempts,
    ))
}

fn response_of(enqueued: &Enqueued) -> EnqueueResponse {
    EnqueueResponse {
        id: enqueued.id,
        state: enqueued.state,
    }
}

pub(crate) fn valid_queue_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    low: T,
    high: T,
    note: &str,
) -> Result<()> {
    match value {
        Some(v) if !(low..=high).contains(&v) => Err(Error::invalid(
            field,
            format!("must be between {low} and {high}{note}"),
        )),
        _ => Ok(()),
    }
}

/// Checks a request and turns it into a [`NewJob`]; every message names the field, and every
/// number and time is held to its documented range ([`bounds`]).
pub fn validate(request: EnqueueRequest) -> Result<NewJob> {
    let queue = request.queue.unwrap_or_else(|| "default".to_string());
    if !valid_queue_name(&queue) {
        return Err(Error::invalid(
            "queue",
            "must be 1-128 characters of letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
        ));
    }
    let spec_bytes = serde_json::to_vec(&request.spec).map_or(0, |v| v.len());
    if spec_bytes > bounds::MAX_SPEC_BYTES {
        return Err(Error::TooLarge {
            what: "spec",
            limit_bytes: bounds::MAX_SPEC_BYTES,
        });
    }
    parse_spec(&request.spec).map_err(|e| Error::InvalidSpec(e.0))?;
    if request.run_at.is_some() && request.delay_ms.is_some() {
        return Err(Error::invalid(
            "run_at",
            "give run_at or delay_ms, not both",
        ));
    }
    check_range(
        "priority",
        request.priority,
        bounds::MIN_PRIORITY,
        bounds::MAX_PRIORITY,
        "",
    )?;
    check_range(
        "max_attempts",
        request.max_attempts,
        bounds::MIN_ATTEMPTS,
        bounds::MAX_ATTEMPTS,
        "",
    )?;
    check_range(
        "timeout_ms",
        request.timeout_ms,
        1,
        bounds::MAX_TIMEOUT_MS,
        " (30 days)",
    )?;
    check_range(
        "delay_ms",
        request.delay_ms,
        0,
        bounds::MAX_DELAY_MS,
        " (366 days)",
    )?;
    if let Some(run_at) = request.run_at {
        let latest = Utc::now() + chrono::Duration::milliseconds(bounds::MAX_DELAY_MS as i64);
        if run_at < DateTime::<Utc>::UNIX_EPOCH || run_at > latest {
            return Err(Error::invalid(
                "run_at",
                "must be between 1970-01-01T00:00:00Z and 366 days from now",
            ));
        }
    }
    if let Some(key) = &request.idempotency_key {
        if key.is_empty() || key.len() > bounds::MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Error::invalid("idempotency_key", "must be 1-255 bytes"));
        }
        Error::if_nul_str("idempotency_key", key)?;
    }
    let mut max_attempts = request.max_attempts;
    let retry = match &request.retry {
        None => None,
        Some(policy) => {
            let (stored, attempts) = check_retry(policy)?;
            if let Some(attempts) = attempts {
                if max_attempts.is_some_and(|given| given != attempts) {
                    return Err(Error::invalid(
                        "retry.max_attempts",
                        "differs from max_attempts; give it once",
                    ));
                }
                max_attempts = Some(attempts);
            }
            Some(stored)
        }
    };
    Ok(NewJob {
        queue,
        spec: request.spec,
        priority: request.priority,
        run_at: request.run_at,
        delay: request.delay_ms.map(Duration::from_millis),
        max_attempts,
        // In range above, so it fits an i64.
        timeout_ms: request.timeout_ms.map(|ms| ms as i64),
        idempotency_key: request.idempotency_key,
        retry,
    })
}
