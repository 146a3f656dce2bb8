//! Workflows: definitions registered by name and versioned by content, and (to come) the runs
//! that start every step as a job and release each step's children when it completes.
//!
//! - [`definition`] — reading and checking a definition (YAML or JSON), no I/O.

pub mod definition;

use sha2::{Digest, Sha256};
use sluice_protocol::api::{Workflow, WorkflowSummary};

use super::Context;
use crate::store::workflows::{self, WorkflowRow};
use crate::{Error, Result};

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
    let (created, created_at, registered_at) =
        workflows::register(&ctx.pool, name, &version, &parsed.canonical, steps).await?;
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
        let hex = version.len() == 64
            && version
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex {
            return Err(Error::invalid(
                "version",
                "must be a version hash (64 hex digits)",
            ));
        }
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

/// Workflow names follow queue names: 1-128 letters, digits, `_.:-`.
fn check_name(name: &str) -> Result<()> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
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
