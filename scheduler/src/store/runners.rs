//! Runner registration and identity. Tokens are stored as SHA-256 hashes; the plain token
//! exists only in the register response and the runner's memory.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_protocol::RunnerId;
use sqlx::PgPool;
use uuid::Uuid;

use crate::secret::Secret;
use crate::Result;

/// A runner as authenticated from its token.
#[derive(Debug, Clone)]
pub struct RunnerIdentity {
    pub id: RunnerId,
    pub pod_name: String,
}

/// The stored form of a runner token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Parameters of [`register`].
pub struct RegisterParams<'a> {
    pub pod_name: &'a str,
    pub labels: Value,
    pub slots: i32,
    pub version: &'a str,
}

/// Registers a new runner instance with a fresh id and token. Earlier instances with the same
/// pod name are marked `gone` and their leases end now, so the reaper hands their jobs out
/// again on its next pass (a restarted pod's old attempts are dead by definition).
pub async fn register(pool: &PgPool, params: RegisterParams<'_>) -> Result<(RunnerId, Secret)> {
    let id = Uuid::new_v4();
    let token = Secret::generate("slr_");
    let mut tx = pool.begin().await?;
    sqlx::query(
        "WITH gone AS (
             UPDATE sluice.runners SET state = 'gone'
             WHERE pod_name = $1 AND state <> 'gone'
             RETURNING id
         )
         UPDATE sluice.job_attempts SET lease_expires_at = now()
         WHERE outcome IS NULL AND runner_id IN (SELECT id FROM gone)",
    )
    .bind(params.pod_name)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO sluice.runners (id, pod_name, token_hash, labels, slots, version, state)
         VALUES ($1, $2, $3, $4, $5, $6, 'idle')",
    )
    .bind(id)
    .bind(params.pod_name)
    .bind(token_hash(token.expose()))
    .bind(params.labels)
    .bind(params.slots)
    .bind(params.version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((RunnerId(id), token))
}

/// The live runner holding `token`, if any.
pub async fn get_by_token(pool: &PgPool, token: &str) -> Result<Option<RunnerIdentity>> {
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT id, pod_name FROM sluice.runners WHERE token_hash = $1 AND state <> 'gone'",
    )
    .bind(token_hash(token))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, pod_name)| RunnerIdentity {
        id: RunnerId(id),
        pod_name,
    }))
}
