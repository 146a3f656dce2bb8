//! Workflow definitions (`sluice.workflows`): every version kept by content hash, the latest
//! registration current.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::Result;

/// Registers version $2 of workflow $1 (definition $3, $4 steps, run plan $5), or
/// re-registers it when that content is stored already (it becomes current again, and gets
/// this scheduler's plan). Answers whether it was new.
pub const REGISTER_WORKFLOW: &str =
    "INSERT INTO sluice.workflows AS w (name, version, definition, steps, plan)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (name, version) DO UPDATE SET registered_at = now(), plan = EXCLUDED.plan
    RETURNING (xmax = 0) AS created, w.created_at, w.registered_at";

/// The current version of workflow $1.
pub const CURRENT_WORKFLOW: &str =
    "SELECT name, version, definition, steps, created_at, registered_at
    FROM sluice.workflows WHERE name = $1
    ORDER BY registered_at DESC, created_at DESC
    LIMIT 1";

/// Version $2 of workflow $1.
pub const WORKFLOW_VERSION: &str =
    "SELECT name, version, definition, steps, created_at, registered_at
    FROM sluice.workflows WHERE name = $1 AND version = $2";

/// The current version of every workflow, by name.
pub const LIST_WORKFLOWS: &str = "SELECT DISTINCT ON (name)
           name, version, definition, steps, created_at, registered_at
    FROM sluice.workflows
    ORDER BY name, registered_at DESC, created_at DESC";

/// A stored version.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkflowRow {
    pub name: String,
    pub version: String,
    pub definition: Value,
    pub steps: i32,
    pub created_at: DateTime<Utc>,
    pub registered_at: DateTime<Utc>,
}

/// Stores a version (or makes it current again); whether it was new, and its times.
pub async fn register(
    pool: &PgPool,
    name: &str,
    version: &str,
    definition: &Value,
    steps: i32,
    plan: &Value,
) -> Result<(bool, DateTime<Utc>, DateTime<Utc>)> {
    Ok(sqlx::query_as(REGISTER_WORKFLOW)
        .bind(name)
        .bind(version)
        .bind(definition)
        .bind(steps)
        .bind(plan)
        .fetch_one(pool)
        .await?)
}

/// The current version of `name`, or the version named.
pub async fn get(pool: &PgPool, name: &str, version: Option<&str>) -> Result<Option<WorkflowRow>> {
    Ok(match version {
        None => {
            sqlx::query_as(CURRENT_WORKFLOW)
                .bind(name)
                .fetch_optional(pool)
                .await?
        }
        Some(version) => {
            sqlx::query_as(WORKFLOW_VERSION)
                .bind(name)
                .bind(version)
                .fetch_optional(pool)
                .await?
        }
    })
}

/// Every workflow's current version.
pub async fn list(pool: &PgPool) -> Result<Vec<WorkflowRow>> {
    Ok(sqlx::query_as(LIST_WORKFLOWS).fetch_all(pool).await?)
}

/// Every statement of this module, for the test that prepares them all.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("REGISTER_WORKFLOW", REGISTER_WORKFLOW),
        ("CURRENT_WORKFLOW", CURRENT_WORKFLOW),
        ("WORKFLOW_VERSION", WORKFLOW_VERSION),
        ("LIST_WORKFLOWS", LIST_WORKFLOWS),
    ]
    .into_iter()
}
