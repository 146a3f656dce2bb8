//! Runner registration and identity. Tokens are stored as SHA-256 hashes; the plain token
//! exists only in the register response and the runner's memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// Ordered to drain (read with the token, so a heartbeat needs no second lookup).
    pub draining: bool,
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

/// Marks every instance of pod $1 `gone` and ends its leases now (rows being completed are
/// skipped, not waited for; their leases run out as they would anyway); stops it never
/// confirmed are dropped and the retries that waited for them released: its tools died with
/// it.
pub const RETIRE_POD: &str = "WITH gone AS (
             UPDATE sluice.runners SET state = 'gone'
             WHERE pod_name = $1 AND state <> 'gone'
             RETURNING id
         ), leased AS (
             -- A row the old instance is completing right now is skipped, not waited for
             -- (no lock cycle with its completion); its lease runs out as it would anyway.
             SELECT j.id FROM sluice.jobs j
             WHERE j.state = 'running' AND j.runner_id IN (SELECT id FROM gone)
             FOR UPDATE OF j SKIP LOCKED
         ), released AS (
             -- Stops the old instance never confirmed: its tools died with it.
             DELETE FROM sluice.attempt_stops s USING gone g WHERE s.runner_id = g.id
             RETURNING s.job_id, s.attempt
         ), retried AS (
             UPDATE sluice.jobs j SET state = 'available', run_at = now()
             FROM released r
             WHERE j.id = r.job_id AND j.attempt = r.attempt AND j.state = 'scheduled'
         )
         UPDATE sluice.jobs j SET lease_expires_at = now()
         FROM leased l WHERE j.id = l.id";

/// Retires pod `pod_name` (see [`RETIRE_POD`]): the runner process is known to be dead.
pub async fn retire(pool: &PgPool, pod_name: &str) -> Result<()> {
    sqlx::query(RETIRE_POD).bind(pod_name).execute(pool).await?;
    Ok(())
}

/// Drops pod $1's `starting` row (the pool's placeholder): it registers now.
pub const FORGET_STARTING: &str =
    "DELETE FROM sluice.runners WHERE pod_name = $1 AND state = 'starting'";

/// A pool started pod $1 with $3 slots and pool labels $2: listed as `starting` until it
/// registers. The token hash is random, so no token is ever this row's.
pub const INSERT_STARTING: &str =
    "INSERT INTO sluice.runners (id, pod_name, token_hash, labels, slots, state)
    VALUES ($4, $1, $5, $2, $3, 'starting')";

/// Lists pod `pod_name`, just started by a pool, as `starting`.
pub async fn starting(pool: &PgPool, pod_name: &str, labels: Value, slots: i32) -> Result<()> {
    let id = Uuid::new_v4();
    sqlx::query(INSERT_STARTING)
        .bind(pod_name)
        .bind(labels)
        .bind(slots.max(1))
        .bind(id)
        .bind(token_hash(&Uuid::new_v4().to_string()))
        .execute(pool)
        .await?;
    Ok(())
}

/// Drops pod `pod_name`'s `starting` row: its start failed.
pub async fn forget_starting(pool: &PgPool, pod_name: &str) -> Result<()> {
    sqlx::query(FORGET_STARTING)
        .bind(pod_name)
        .execute(pool)
        .await?;
    Ok(())
}

/// Registers a new runner instance with a fresh id and token. Earlier instances with the same
/// pod name are marked `gone` and their leases end now, so the reaper hands their jobs out
/// again on its next pass (a restarted pod's old attempts are dead by definition).
pub async fn register(pool: &PgPool, params: RegisterParams<'_>) -> Result<(RunnerId, Secret)> {
    let id = Uuid::new_v4();
    let token = Secret::generate("slr_");
    let mut tx = pool.begin().await?;
    // The row the pool wrote when it started this pod becomes this registration.
    sqlx::query(FORGET_STARTING)
        .bind(params.pod_name)
        .execute(&mut *tx)
        .await?;
    sqlx::query(RETIRE_POD)
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
    get_by_hash(pool, &token_hash(token)).await
}

async fn get_by_hash(pool: &PgPool, hash: &[u8]) -> Result<Option<RunnerIdentity>> {
    let row: Option<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, pod_name, state = 'draining' FROM sluice.runners
         WHERE token_hash = $1 AND state <> 'gone'",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, pod_name, draining)| RunnerIdentity {
        id: RunnerId(id),
        pod_name,
        draining,
    }))
}

/// How long a token lookup is reused.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(2);
/// Most tokens remembered; past it, expired entries are dropped first, then everything.
const TOKEN_CACHE_MAX: usize = 10_000;

/// Recent successful token lookups, by token hash (the token itself is never kept).
///
/// Only calls whose every write is fenced anyway use it: claims (the claim statement checks
/// that the runner is not `gone`), event streams and completions (guarded by the lease).
/// Heartbeats always look the token up, so a replaced runner hears 401 within one
/// heartbeat; a refused or unknown token is never cached.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Vec<u8>, (RunnerIdentity, Instant)>>,
}

impl TokenCache {
    /// The live runner holding `token`, from the cache when looked up less than
    /// [`TOKEN_CACHE_TTL`] ago.
    pub async fn get(&self, pool: &PgPool, token: &str) -> Result<Option<RunnerIdentity>> {
        let hash = token_hash(token);
        let now = Instant::now();
        if let Some((runner, at)) = self.entries.lock().expect("lock").get(&hash) {
            if now.duration_since(*at) < TOKEN_CACHE_TTL {
                return Ok(Some(runner.clone()));
            }
        }
        let found = get_by_hash(pool, &hash).await?;
        let mut entries = self.entries.lock().expect("lock");
        match &found {
            Some(runner) => {
                if entries.len() >= TOKEN_CACHE_MAX {
                    entries.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_CACHE_TTL);
                    if entries.len() >= TOKEN_CACHE_MAX {
                        entries.clear();
                    }
                }
                entries.insert(hash, (runner.clone(), now));
            }
            None => {
                entries.remove(&hash);
            }
        }
        Ok(found)
    }

    /// Forgets the cached tokens of `pod_name`'s instances: called when the pod registers
    /// anew, so that this scheduler refuses the old instance's token at once (another
    /// replica may serve it from its cache for up to [`TOKEN_CACHE_TTL`], where every write
    /// it allows is still fenced by the lease).
    pub fn forget_pod(&self, pod_name: &str) {
        self.entries
            .lock()
            .expect("lock")
            .retain(|_, (runner, _)| runner.pod_name != pod_name);
    }
}

/// Runners not gone, and those gone within the last hour, newest first, each with the
/// attempts it holds now.
pub const LIST: &str = "SELECT r.id, r.pod_name, r.state, r.slots, r.version, r.labels,
        r.registered_at, r.last_seen_at,
        (SELECT count(*) FROM sluice.jobs j
         WHERE j.runner_id = r.id AND j.state = 'running') AS slots_in_use
    FROM sluice.runners r
    WHERE r.state <> 'gone' OR r.last_seen_at > now() - interval '1 hour'
    ORDER BY r.registered_at DESC, r.id
    LIMIT 1000";

/// A runner as listed.
#[derive(Debug, sqlx::FromRow)]
pub struct RunnerRow {
    pub id: Uuid,
    pub pod_name: String,
    pub state: String,
    pub slots: i32,
    pub version: String,
    pub labels: Value,
    pub registered_at: chrono::DateTime<chrono::Utc>,
    pub last_seen_at: chrono::DateTime<chrono::Utc>,
    pub slots_in_use: i64,
}

/// The runners [`LIST`] shows.
pub async fn list(pool: &PgPool) -> Result<Vec<RunnerRow>> {
    Ok(sqlx::query_as(LIST).fetch_all(pool).await?)
}

/// Runners by state (for metrics): a registered runner with a running job counts as `busy`;
/// gone ones are those of the last hour, as [`LIST`] shows them.
pub const COUNT_BY_STATE: &str = "SELECT CASE
            WHEN r.state = 'idle' AND EXISTS (SELECT 1 FROM sluice.jobs j
                WHERE j.runner_id = r.id AND j.state = 'running') THEN 'busy'
            ELSE r.state END AS state,
        count(*)
    FROM sluice.runners r
    WHERE r.state <> 'gone' OR r.last_seen_at > now() - interval '1 hour'
    GROUP BY 1";

/// [`COUNT_BY_STATE`].
pub async fn count_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(COUNT_BY_STATE).fetch_all(pool).await?)
}

/// Jobs ready to be claimed now, counted up to $1 (the pool only asks whether the backlog
/// exceeds the free slots).
pub const READY_BACKLOG: &str = "SELECT count(*) FROM (
        SELECT 1 FROM sluice.jobs WHERE state = 'available' AND run_at <= now() LIMIT $1
    ) ready";

/// Jobs ready now, up to `cap`.
pub async fn ready_backlog(pool: &PgPool, cap: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(READY_BACKLOG)
        .bind(cap)
        .fetch_one(pool)
        .await?)
}

/// The runners named in $1 that registered and are not gone: `(pod_name, slots, slots_in_use)`, for the pool
/// (by the partial pod-name index, however many gone runners the table holds).
pub const LIVE_BY_NAMES: &str = "SELECT r.pod_name, r.slots,
        (SELECT count(*) FROM sluice.jobs j
         WHERE j.runner_id = r.id AND j.state = 'running') AS slots_in_use
    FROM sluice.runners r
    WHERE r.pod_name = ANY ($1::text[]) AND r.state <> 'gone' AND r.state <> 'starting'";

/// The live runners of `names`.
pub async fn live_by_names(pool: &PgPool, names: &[String]) -> Result<Vec<(String, i32, i64)>> {
    Ok(sqlx::query_as(LIVE_BY_NAMES)
        .bind(names)
        .fetch_all(pool)
        .await?)
}

/// Forgets up to $1 runners gone for more than a day (a pool recycling a runner per task
/// leaves one per task). Attempts keep the runner's id; it names no row after this.
pub const PRUNE_GONE: &str = "DELETE FROM sluice.runners WHERE id IN (
        SELECT id FROM sluice.runners
        WHERE state = 'gone' AND last_seen_at < now() - interval '1 day'
        LIMIT $1
        FOR UPDATE SKIP LOCKED)";

/// Marks gone up to $1 `starting` rows older than two hours: the pool that wrote them died
/// before their runners registered (a pool stops a runner that has not registered within
/// its start timeout, at most an hour).
pub const EXPIRE_STARTING: &str = "UPDATE sluice.runners SET state = 'gone' WHERE id IN (
        SELECT id FROM sluice.runners
        WHERE state = 'starting' AND registered_at < now() - interval '2 hours'
        LIMIT $1
        FOR UPDATE SKIP LOCKED)";

/// Forgets long-gone runners and gives up on long-`starting` ones, at most `batch` each;
/// how many.
pub async fn prune_gone(tx: &mut sqlx::PgConnection, batch: i64) -> Result<u64> {
    let expired = sqlx::query(EXPIRE_STARTING)
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    Ok(expired
        + sqlx::query(PRUNE_GONE)
            .bind(batch)
            .execute(tx)
            .await?
            .rows_affected())
}

/// Orders the live instance of pod $1 to drain: its next heartbeat says so, it claims no
/// more, finishes its tasks and exits. One row when ordered.
pub const DRAIN_POD: &str = "UPDATE sluice.runners SET state = 'draining'
    WHERE pod_name = $1 AND state NOT IN ('gone', 'draining', 'starting')
    RETURNING 1";

/// Whether runner $1 was ordered to drain.
pub const IS_DRAINING: &str = "SELECT state = 'draining' FROM sluice.runners WHERE id = $1";

/// Orders pod `pod_name` to drain; whether a live instance was there to order.
pub async fn drain(pool: &PgPool, pod_name: &str) -> Result<bool> {
    Ok(sqlx::query(DRAIN_POD)
        .bind(pod_name)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// Whether `runner` was ordered to drain.
pub async fn is_draining(pool: &PgPool, runner: RunnerId) -> Result<bool> {
    Ok(sqlx::query_scalar(IS_DRAINING)
        .bind(runner.0)
        .fetch_optional(pool)
        .await?
        .unwrap_or(false))
}

/// Takes the leadership of pool $1 for the session (two-key advisory lock, apart from the
/// maintenance lock's key space): the replica holding it runs the pool.
pub const LEAD_POOL: &str = "SELECT pg_try_advisory_lock(hashtext('sluice.pool'), hashtext($1))";

/// The leadership of pool `name`: a connection of its own holding the lock, or `None` when
/// another replica holds it. Dropping the connection (or losing it) gives the lock up.
pub async fn lead_pool(pool: &PgPool, name: &str) -> Result<Option<sqlx::PgConnection>> {
    let mut conn = pool.acquire().await?.detach();
    let led: bool = sqlx::query_scalar(LEAD_POOL)
        .bind(name)
        .fetch_one(&mut conn)
        .await?;
    Ok(led.then_some(conn))
}

/// Whether the leadership connection still answers (a lost connection lost the lock).
pub async fn still_leading(conn: &mut sqlx::PgConnection) -> bool {
    sqlx::query("SELECT 1").execute(conn).await.is_ok()
}

/// Writes pool $1's row: backend, holder, sizes, and its last error (kept until a write
/// with `$6 = true` clears it).
pub const UPSERT_POOL: &str = "INSERT INTO sluice.pools
        (name, backend, holder, min_warm, max_warm, last_error, last_error_at, retry_at)
    VALUES ($1, $2, $3, $4, $5, $7, CASE WHEN $7::text IS NULL THEN NULL ELSE now() END, $8)
    ON CONFLICT (name) DO UPDATE SET
        backend = excluded.backend, holder = excluded.holder,
        min_warm = excluded.min_warm, max_warm = excluded.max_warm,
        last_error = CASE WHEN $6 THEN NULL
                          ELSE coalesce(excluded.last_error, sluice.pools.last_error) END,
        last_error_at = CASE WHEN $6 THEN NULL
                             ELSE coalesce(excluded.last_error_at, sluice.pools.last_error_at) END,
        retry_at = excluded.retry_at,
        started_at = CASE WHEN sluice.pools.holder = excluded.holder
                          THEN sluice.pools.started_at ELSE now() END,
        updated_at = now()";

/// A pool's row as [`write_pool`] writes it.
pub struct PoolRow<'a> {
    pub name: &'a str,
    pub backend: &'a str,
    pub holder: &'a str,
    pub min_warm: i32,
    pub max_warm: i32,
    /// Clear the last error (the pool is healthy again).
    pub healthy: bool,
    pub error: Option<&'a str>,
    pub retry_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Writes a pool's row.
pub async fn write_pool(pool: &PgPool, row: &PoolRow<'_>) -> Result<()> {
    sqlx::query(UPSERT_POOL)
        .bind(row.name)
        .bind(row.backend)
        .bind(row.holder)
        .bind(row.min_warm)
        .bind(row.max_warm)
        .bind(row.healthy)
        .bind(row.error)
        .bind(row.retry_at)
        .execute(pool)
        .await?;
    Ok(())
}

/// Pools written within the last hour.
pub const LIST_POOLS: &str = "SELECT name, backend, holder, min_warm, max_warm, last_error,
        last_error_at, retry_at, started_at, updated_at
    FROM sluice.pools WHERE updated_at > now() - interval '1 hour'
    ORDER BY name LIMIT 100";

/// A pool as listed.
#[derive(Debug, sqlx::FromRow)]
pub struct PoolListRow {
    pub name: String,
    pub backend: String,
    pub holder: String,
    pub min_warm: i32,
    pub max_warm: i32,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    pub retry_at: Option<chrono::DateTime<chrono::Utc>>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// The pools [`LIST_POOLS`] shows.
pub async fn list_pools(pool: &PgPool) -> Result<Vec<PoolListRow>> {
    Ok(sqlx::query_as(LIST_POOLS).fetch_all(pool).await?)
}

/// Forgets up to $1 pools not written for a day.
pub const PRUNE_POOLS: &str = "DELETE FROM sluice.pools WHERE name IN (
        SELECT name FROM sluice.pools WHERE updated_at < now() - interval '1 day'
        LIMIT $1 FOR UPDATE SKIP LOCKED)";

/// Forgets long-silent pools, at most `batch`; how many.
pub async fn prune_pools(tx: &mut sqlx::PgConnection, batch: i64) -> Result<u64> {
    Ok(sqlx::query(PRUNE_POOLS)
        .bind(batch)
        .execute(tx)
        .await?
        .rows_affected())
}

/// This module's named statements, for the test that prepares them all.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("RETIRE_POD", RETIRE_POD),
        ("LIST", LIST),
        ("READY_BACKLOG", READY_BACKLOG),
        ("LIVE_BY_NAMES", LIVE_BY_NAMES),
        ("PRUNE_GONE", PRUNE_GONE),
        ("DRAIN_POD", DRAIN_POD),
        ("IS_DRAINING", IS_DRAINING),
        ("FORGET_STARTING", FORGET_STARTING),
        ("EXPIRE_STARTING", EXPIRE_STARTING),
        ("INSERT_STARTING", INSERT_STARTING),
        ("LEAD_POOL", LEAD_POOL),
        ("UPSERT_POOL", UPSERT_POOL),
        ("LIST_POOLS", LIST_POOLS),
        ("PRUNE_POOLS", PRUNE_POOLS),
    ]
    .into_iter()
}
