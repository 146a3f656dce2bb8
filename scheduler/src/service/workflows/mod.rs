//! Workflows: definitions registered by name and versioned by content, and their runs.
//!
//! A run is advanced by the schema, not by this service: starting one inserts its steps and
//! starts those without parents; every step job's end — whatever statement applies it — then
//! releases the children that became ready in the same transaction (see
//! `sql/0007_workflow_runs.sql`). What is left here: registration (with the run plan), starting
//! a run (a definition may come inline), reading, listing, cancelling, and rendering a step's
//! `{{ templates }}` when its job is claimed ([`template`]).
//!
//! - [`definition`] — reading and checking a definition (YAML or JSON), no I/O.
//! - [`template`] — `{{ reference }}` in a step's spec, filled from its context.

pub mod artifacts;
pub mod definition;
pub mod template;

use sha2::{Digest, Sha256};
use sluice_protocol::api::{
    Run, RunList, RunRequest, RunStarted, RunState, RunStateChange, RunStep, RunSummary, StepJob,
    Workflow, WorkflowRef, WorkflowSummary,
};

use super::Context;
use crate::store::runs;
use crate::store::workflows::{self, WorkflowRow};
use crate::{Error, Result};

/// Most runs one list answers.
pub const MAX_LIST: i64 = 1000;

/// Largest definition body accepted (YAML or JSON): room for 10,000 steps.
pub const MAX_DEFINITION_BYTES: usize = 8 << 20;

/// Registers `text` (YAML or JSON) as workflow `name`: checked whole, stored by content hash,
/// made current. Returns the version and whether it was new (the same content registered
/// again is the same version).
pub async fn register(ctx: &Context, name: &str, text: &str) -> Result<(Workflow, bool)> {
    check_name(name)?;
    let parsed = definition::parse(text, name).map_err(|problems| {
        Error::InvalidDefinition(problems.into_iter().map(|p| (p.at, p.message)).collect())
    })?;
    let canonical = serde_json::to_vec(&parsed.canonical)
        .map_err(|e| Error::Internal(format!("encoding a definition: {e}")))?;
    let version = hex(&Sha256::digest(&canonical));
    let steps = parsed.steps.len() as i32;
    let (created, created_at, registered_at) = workflows::register(
        &ctx.pool,
        name,
        &version,
        &parsed.canonical,
        steps,
        &parsed.plan(),
    )
    .await?;
    if created {
        tracing::info!(workflow = name, %version, steps, "workflow registered");
    }
    Ok((
        Workflow {
            name: name.to_string(),
            version,
            steps,
            definition: parsed.canonical,
            created_at,
            registered_at,
        },
        created,
    ))
}

/// The current version of `name`, or the version named.
pub async fn get(ctx: &Context, name: &str, version: Option<&str>) -> Result<Workflow> {
    check_name(name)?;
    if let Some(version) = version {
        check_version(version)?;
    }
    workflows::get(&ctx.pool, name, version)
        .await?
        .map(workflow_of)
        .ok_or(Error::NotFound("workflow"))
}

/// Every workflow's current version.
pub async fn list(ctx: &Context) -> Result<Vec<WorkflowSummary>> {
    Ok(workflows::list(&ctx.pool)
        .await?
        .into_iter()
        .map(|row| WorkflowSummary {
            name: row.name,
            version: row.version,
            steps: row.steps,
            registered_at: row.registered_at,
        })
        .collect())
}

fn workflow_of(row: WorkflowRow) -> Workflow {
    Workflow {
        name: row.name,
        version: row.version,
        steps: row.steps,
        definition: row.definition,
        created_at: row.created_at,
        registered_at: row.registered_at,
    }
}

/// Starts a run: of a registered workflow (its current version, or the one named), or of a
/// definition given inline, registered first under its own `name` (`inline` without one).
pub async fn start_run(ctx: &Context, request: RunRequest) -> Result<RunStarted> {
    let input = request.input.unwrap_or_else(|| serde_json::json!({}));
    Error::if_nul("input", &input)?;
    let (name, version) = match request.workflow {
        WorkflowRef::Name(name) => {
            check_name(&name)?;
            if let Some(version) = &request.version {
                check_version(version)?;
            }
            (name, request.version)
        }
        WorkflowRef::Inline(definition) => {
            if request.version.is_some() {
                return Err(Error::invalid(
                    "version",
                    "an inline definition is run as it is given",
                ));
            }
            let text = match &definition {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let name = match &definition {
                serde_json::Value::Object(map) => map
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("inline")
                    .to_string(),
                _ => "inline".to_string(),
            };
            let (workflow, _) = register(ctx, &name, &text).await?;
            (workflow.name, Some(workflow.version))
        }
    };
    let (run_id, version) = runs::start(&ctx.pool, &name, &input, version.as_deref()).await?;
    tracing::info!(run_id, workflow = %name, %version, "workflow run started");
    Ok(RunStarted {
        run_id,
        workflow: name,
        version,
    })
}

/// A run with each of its steps and their jobs.
pub async fn get_run(ctx: &Context, id: i64) -> Result<Run> {
    let (run, steps) = runs::get(&ctx.pool, id)
        .await?
        .ok_or(Error::NotFound("run"))?;
    Ok(Run {
        id: run.id,
        workflow: run.workflow,
        version: run.version,
        state: run_state(&run.state)?,
        input: run.input,
        error: run.error,
        created_at: run.created_at,
        finished_at: run.finished_at,
        steps: steps
            .into_iter()
            .map(|step| RunStep {
                id: step.step_id,
                state: step.state,
                output: step.output,
                on_failure: step.position < 0,
                started_at: step.started_at,
                finished_at: step.finished_at,
                jobs: serde_json::from_value::<Vec<StepJob>>(step.jobs).unwrap_or_default(),
            })
            .collect(),
    })
}

/// Runs newest first: of one workflow and in one state when given, below `before`, at most
/// `limit` (1-1000, default 100).
pub async fn list_runs(
    ctx: &Context,
    workflow: Option<&str>,
    state: Option<&str>,
    before: Option<i64>,
    limit: Option<i64>,
) -> Result<RunList> {
    if let Some(workflow) = workflow {
        check_name(workflow)?;
    }
    if let Some(state) = state {
        run_state(state).map_err(|_| {
            Error::invalid("state", "must be running, succeeded, failed or cancelled")
        })?;
    }
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIST}"),
        ));
    }
    let rows = runs::list(&ctx.pool, workflow, state, before, limit).await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let runs = rows
        .into_iter()
        .map(|row| {
            Ok(RunSummary {
                id: row.id,
                workflow: row.workflow,
                version: row.version,
                state: run_state(&row.state)?,
                created_at: row.created_at,
                finished_at: row.finished_at,
            })
        })
        .collect::<Result<_>>()?;
    Ok(RunList { runs, next_before })
}

/// Cancels a running run (its queued steps, and its running jobs within a heartbeat); a
/// finished run answers as it is.
pub async fn cancel_run(ctx: &Context, id: i64) -> Result<RunStateChange> {
    let state = runs::cancel(&ctx.pool, id)
        .await?
        .ok_or(Error::NotFound("run"))?;
    Ok(RunStateChange {
        id,
        state: run_state(&state)?,
    })
}

fn run_state(name: &str) -> Result<RunState> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| Error::Internal(format!("unknown run state {name:?}")))
}

fn check_version(version: &str) -> Result<()> {
    let hex = version.len() == 64
        && version
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex {
        Ok(())
    } else {
        Err(Error::invalid(
            "version",
            "must be a version hash (64 hex digits)",
        ))
    }
}

/// Workflow names follow queue names: 1-128 letters, digits, `_.:-` (and not `run`, which is
/// `POST /api/workflows/run`).
fn check_name(name: &str) -> Result<()> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && name != "run";
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            "must be 1-128 characters of letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
