//! The operator commands over the typed client: `sluice jobs`, `sluice queues`, `sluice tail`.
//! Each returns the process's exit code; errors become one line and exit 1 in `main`.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sluice_protocol::api::{paths, Job, RetryManyRequest};
use sluice_protocol::{JobId, JobState};

use crate::client::{ApiClient, ClientError, StreamEvent};
use crate::output::{Output, Progress, Style};

/// `sluice jobs ls` filters.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub queue: Option<String>,
    pub state: Option<String>,
    pub since: Option<String>,
    pub limit: Option<u32>,
}

/// A span written `250ms`, `90s`, `15m`, `2h` or `7d`, in milliseconds.
pub fn parse_span_ms(text: &str) -> Option<u64> {
    let at = text
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&at| at > 0)?;
    let n: u64 = text[..at].parse().ok()?;
    let unit: u64 = match &text[at..] {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// `--since`: an RFC 3339 time, or an age (`90s`, `15m`, `2h`, `7d`) before now.
pub fn parse_since(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let age = parse_span_ms(text)
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(chrono::Duration::try_milliseconds);
    match age.and_then(|age| Utc::now().checked_sub_signed(age)) {
        Some(at) => Ok(at),
        None => anyhow::bail!(
            "--since must be an RFC 3339 time (2026-12-01T00:00:00Z) or an age such as 90s, 15m, 2h, 7d; got {text:?}"
        ),
    }
}

fn when(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_string(),
        |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// `sluice jobs ls`: newest first, up to `--limit` (following the pages).
pub async fn list(
    client: &ApiClient,
    output: Output,
    filter: ListFilter,
) -> anyhow::Result<ExitCode> {
    let since = filter.since.as_deref().map(parse_since).transpose()?;
    let want = filter.limit.unwrap_or(50).clamp(1, 100_000) as usize;
    let mut jobs = Vec::new();
    let mut before = None;
    while jobs.len() < want {
        let mut query = Vec::new();
        if let Some(queue) = &filter.queue {
            query.push(("queue", queue.clone()));
        }
        if let Some(state) = &filter.state {
            query.push(("state", state.clone()));
        }
        if let Some(since) = since {
            query.push(("since", since.to_rfc3339()));
        }
        if let Some(before) = before {
            query.push(("before", format!("{before}")));
        }
        query.push(("limit", (want - jobs.len()).min(1000).to_string()));
        let page = client.list_jobs(&query).await?;
        jobs.extend(page.jobs);
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    if output.is_json() {
        Output::json(&json!({ "jobs": jobs }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let style = Style::stdout();
    println!("ID\tSTATE\tQUEUE\tKIND\tATTEMPT\tCREATED\tFINISHED");
    for job in jobs {
        println!(
            "{}\t{}\t{}\t{}\t{}/{}\t{}\t{}",
            job.id,
            paint_state(style, job.state),
            job.queue,
            job.kind.as_deref().unwrap_or("-"),
            job.attempt,
            job.max_attempts,
            when(Some(job.created_at)),
            when(job.finished_at),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn paint_state(style: Style, state: JobState) -> String {
    match state {
        JobState::Succeeded => style.green(state.as_str()),
        JobState::Failed => style.red(state.as_str()),
        JobState::Cancelled => style.dim(state.as_str()),
        _ => state.as_str().to_string(),
    }
}

/// `sluice jobs show ID`.
pub async fn show(client: &ApiClient, output: Output, id: JobId) -> anyhow::Result<ExitCode> {
    let job = client.get_job(id).await?;
    if output.is_json() {
        Output::json(&job)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_job(&job);
    Ok(ExitCode::SUCCESS)
}

fn print_job(job: &Job) {
    let style = Style::stdout();
    println!("job {}  {}", job.id, paint_state(style, job.state));
    println!("  queue       {}", job.queue);
    println!(
        "  kind        {}",
        job.spec.get("kind").and_then(Value::as_str).unwrap_or("-")
    );
    println!("  priority    {}", job.priority);
    println!("  attempts    {}/{}", job.attempt, job.max_attempts);
    println!("  created     {}", when(Some(job.created_at)));
    println!("  run at      {}", when(Some(job.run_at)));
    println!("  started     {}", when(job.started_at));
    println!("  finished    {}", when(job.finished_at));
    if let Some(key) = &job.idempotency_key {
        println!("  idempotency {key}");
    }
    for attempt in &job.attempts {
        println!(
            "  attempt {}: {} on {} from {} to {}{}",
            attempt.attempt,
            attempt.outcome.as_deref().unwrap_or("running"),
            attempt
                .runner_id
                .map_or_else(|| "-".to_string(), |r| r.to_string()),
            when(Some(attempt.started_at)),
            when(attempt.finished_at),
            attempt
                .error
                .as_ref()
                .map_or_else(String::new, |e| format!(" ({e})"))
        );
    }
    if let Some(error) = &job.error {
        println!("  error       {error}");
    }
    if let Some(result) = &job.result {
        println!("  result      {result}");
    }
}

/// `sluice jobs cancel ID` / `sluice jobs retry ID`.
pub async fn change(
    client: &ApiClient,
    output: Output,
    id: JobId,
    cancel: bool,
) -> anyhow::Result<ExitCode> {
    let changed = if cancel {
        client.cancel(id).await?
    } else {
        client.retry(id).await?
    };
    if output.is_json() {
        Output::json(&changed)?;
    } else {
        println!("job {} {}", changed.id, changed.state);
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice jobs retry --queue Q --state failed --since T`: a bulk redrive, in batches until
/// nothing more matches (or `limit` jobs were retried).
pub async fn retry_many(
    client: &ApiClient,
    output: Output,
    queue: Option<String>,
    state: Option<JobState>,
    since: Option<String>,
    limit: Option<u64>,
    all: bool,
) -> anyhow::Result<ExitCode> {
    let since = since.as_deref().map(parse_since).transpose()?;
    let mut left = limit.unwrap_or(u64::MAX);
    let mut retried = Vec::new();
    let progress = (!output.is_json()).then(|| Progress::start("retrying".into()));
    while left > 0 {
        let batch = client
            .retry_many(&RetryManyRequest {
                queue: queue.clone(),
                state,
                since,
                limit: Some(left.min(1000) as u32),
                all,
            })
            .await?;
        let got = batch.retried.len() as u64;
        retried.extend(batch.retried);
        left = left.saturating_sub(got);
        // Nothing retried in a batch that matched: jobs changed meanwhile; stop rather than
        // spin.
        if !batch.more || got == 0 {
            break;
        }
    }
    drop(progress);
    if output.is_json() {
        Output::json(&json!({ "retried": retried }))?;
    } else {
        println!("retried {} job(s)", retried.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice queues ls`.
pub async fn queues(client: &ApiClient, output: Output) -> anyhow::Result<ExitCode> {
    let list = client.queues().await?;
    if output.is_json() {
        Output::json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("QUEUE\tPAUSED\tMAX RUNNING\tAVAILABLE\tRUNNING\tSCHEDULED\tFAILED\tSUCCEEDED");
    for queue in list.queues {
        let count = |state: &str| queue.jobs.get(state).copied().unwrap_or(0);
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            queue.name,
            if queue.paused { "yes" } else { "no" },
            queue
                .max_running
                .map_or_else(|| "-".to_string(), |m| m.to_string()),
            count("available"),
            count("running"),
            count("scheduled"),
            count("failed"),
            count("succeeded"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice queues pause|resume NAME`.
pub async fn pause(
    client: &ApiClient,
    output: Output,
    name: &str,
    paused: bool,
) -> anyhow::Result<ExitCode> {
    let result = client.set_paused(name, paused).await?;
    if output.is_json() {
        Output::json(&result)?;
    } else {
        println!(
            "queue {} {}",
            result.name,
            if result.paused { "paused" } else { "resumed" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What `sluice tail` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Job(JobId),
    Run(i64),
}

impl Target {
    /// `42` or `job:42` (a job), `run:42` (a workflow run).
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        let (kind, id) = match text.split_once(':') {
            Some((kind, id)) => (kind, id),
            None => ("job", text),
        };
        let id: i64 = id.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            anyhow::anyhow!("{text:?} names no job or run: give 42, job:42 or run:42")
        })?;
        match kind {
            "job" => Ok(Target::Job(JobId(id))),
            "run" => Ok(Target::Run(id)),
            _ => anyhow::bail!("{text:?} names no job or run: give 42, job:42 or run:42"),
        }
    }

    fn path(self) -> String {
        match self {
            Target::Job(id) => paths::job_events(id),
            Target::Run(id) => paths::run_events(id),
        }
    }
}

/// Most reconnections in a row that bring nothing new before `tail` gives up.
const MAX_IDLE_RECONNECTS: u32 = 10;

/// `sluice tail JOB|run:RUN`: prints the events as they come (resuming after a dropped
/// connection from the last one seen), and exits with the job's status: 0 when it succeeded,
/// the tool's exit code (or 1) when it failed, 1 when it was cancelled.
pub async fn tail(client: &ApiClient, output: Output, target: Target) -> anyhow::Result<ExitCode> {
    let style = Style::stdout();
    let mut last = None;
    let mut idle_reconnects = 0;
    loop {
        let mut stream = match client.events(&target.path(), last).await {
            Ok(stream) => stream,
            // Not there (404), refused (4xx): say so. Unreachable: try again a few times.
            Err(err @ ClientError::Api { .. }) => return Err(err.into()),
            Err(err) => {
                idle_reconnects += 1;
                if idle_reconnects > MAX_IDLE_RECONNECTS {
                    return Err(err.into());
                }
                tokio::time::sleep(Duration::from_millis(250 * u64::from(idle_reconnects))).await;
                continue;
            }
        };
        // Until it ends or breaks before the terminal event: then resume from the last id.
        while let Ok(Some(event)) = stream.next().await {
            idle_reconnects = 0;
            if event.id.is_some() {
                last = event.id;
            }
            if output.is_json() {
                println!("{}", serde_json::to_string(&event)?);
            } else {
                print_event(style, target, &event);
            }
            if event.id.is_none() && is_terminal(&event.event) {
                return Ok(exit_code(&event));
            }
        }
        idle_reconnects += 1;
        if idle_reconnects > MAX_IDLE_RECONNECTS {
            anyhow::bail!("the event stream keeps ending before the job does; giving up");
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(idle_reconnects))).await;
    }
}

fn is_terminal(kind: &str) -> bool {
    matches!(kind, "succeeded" | "failed" | "cancelled")
}

fn exit_code(end: &StreamEvent) -> ExitCode {
    match end.event.as_str() {
        "succeeded" => ExitCode::SUCCESS,
        "failed" => match end.data["result"]["exit_code"].as_i64() {
            Some(code) if (1..=255).contains(&code) => ExitCode::from(code as u8),
            _ => ExitCode::FAILURE,
        },
        _ => ExitCode::FAILURE,
    }
}

/// One event for people: output text as it was written (stderr in red), the rest as a dim
/// line; a run's events prefixed with their step.
fn print_event(style: Style, target: Target, event: &StreamEvent) {
    let prefix = match (target, event.data.get("step").and_then(Value::as_str)) {
        (Target::Run(_), Some(step)) => style.cyan(&format!("[{step}] ")),
        _ => String::new(),
    };
    let inner = &event.data["data"];
    match (
        event.event.as_str(),
        inner.get("text").and_then(Value::as_str),
    ) {
        ("stdout", Some(text)) => {
            for line in text.lines() {
                println!("{prefix}{line}");
            }
        }
        ("stderr", Some(text)) => {
            for line in text.lines() {
                println!("{prefix}{}", style.red(line));
            }
        }
        ("text", Some(text)) => println!("{prefix}{text}"),
        (kind, _) if is_terminal(kind) && event.id.is_none() => {
            let line = format!("{kind}: {}", event.data);
            println!(
                "{prefix}{}",
                if kind == "succeeded" {
                    style.green(&line)
                } else {
                    style.red(&line)
                }
            );
        }
        (kind, _) => println!("{prefix}{}", style.dim(&format!("{kind} {inner}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_an_age_and_refuses_the_rest() {
        assert_eq!(
            parse_since("2026-12-01T00:00:00Z").unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        let hour_ago = parse_since("1h").unwrap();
        let age = Utc::now() - hour_ago;
        assert!((3599..=3601).contains(&age.num_seconds()), "{age}");
        for bad in [
            "",
            "h",
            "1",
            "1w",
            "-1h",
            "99999999999999999999d",
            "1h\0",
            "9223372036854775807d",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets_are_jobs_by_default_and_runs_by_prefix() {
        assert_eq!(Target::parse("42").unwrap(), Target::Job(JobId(42)));
        assert_eq!(Target::parse("job:7").unwrap(), Target::Job(JobId(7)));
        assert_eq!(Target::parse("run:3").unwrap(), Target::Run(3));
        for bad in ["", "0", "-1", "run:", "step:1", "x", "99999999999999999999"] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }
}
