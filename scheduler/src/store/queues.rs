//! Queues: created on first use by the jobs trigger; paused queues are skipped by the claim.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::PgPool;

use crate::Result;

/// A queue with its settings and how many jobs it holds per state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueRow {
    pub name: String,
    pub paused: bool,
    pub max_running: Option<i32>,
    pub default_priority: i32,
    pub default_max_attempts: i32,
    pub default_timeout_ms: Option<i64>,
    pub default_retry: Option<serde_json::Value>,
    pub retention_seconds: f64,
    /// `{"available": n, "running": n, …}` over the jobs stored now.
    pub jobs: Json<BTreeMap<String, i64>>,
}

/// Every queue, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<QueueRow>> {
    Ok(sqlx::query_as(
        "SELECT q.name, q.paused, q.max_running, q.default_priority, q.default_max_attempts,
                q.default_timeout_ms, q.default_retry,
                extract(epoch FROM q.retention)::float8 AS retention_seconds,
                coalesce((SELECT jsonb_object_agg(state, n) FROM (
                    SELECT state::text AS state, count(*) AS n FROM sluice.jobs j
                    WHERE j.queue = q.name GROUP BY state) counts), '{}') AS jobs
         FROM sluice.queues q ORDER BY q.name",
    )
    .fetch_all(pool)
    .await?)
}

/// Pauses or resumes a queue, creating it if it does not exist yet (so a queue can be paused
/// before its first job). Resuming wakes waiting claims.
pub async fn set_paused(pool: &PgPool, name: &str, paused: bool) -> Result<()> {
    sqlx::query(
        "WITH upserted AS (
             INSERT INTO sluice.queues (name, paused) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused
             RETURNING name
         )
         SELECT pg_notify('sluice_jobs', name) FROM upserted WHERE NOT $2",
    )
    .bind(name)
    .bind(paused)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether any queue has a `max_running` cap (claims then also take the capped path).
pub async fn any_capped(pool: &PgPool) -> Result<bool> {
    let (capped,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM sluice.queues WHERE max_running IS NOT NULL AND NOT paused)",
    )
    .fetch_one(pool)
    .await?;
    Ok(capped)
}
