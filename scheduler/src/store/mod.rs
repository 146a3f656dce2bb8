//! The store layer: every SQL statement of the scheduler, as named operations.
//!
//! Following River's driver interface, each operation is one function named noun-first with
//! its guard in the name (`jobs::complete_if_leased`), taking plain typed parameters. Callers
//! never see a query string, and every value is a bind parameter.
//!
//! - [`jobs`] — the job lifecycle, a file per operation family (insert, claim, complete,
//!   lease, control, maintain, read), each statement a whole `const`.
//! - [`runners`] — registration and token lookup.
//! - [`events`] — the per-attempt event stream.
//! - [`queues`] — queue settings (pause/resume) and counts.

pub mod artifacts;
pub mod events;
pub mod jobs;
pub mod queues;
pub mod runners;
pub mod runs;
pub mod schedules;
pub mod sessions;
pub mod workflows;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::{Error, Result};

/// The embedded migrations from `sql/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../sql");

/// How the scheduler's pool connects.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_connections: u32,
    /// How long a request waits for a connection before answering 503. Short, so that runners
    /// hear "database unavailable" well within a heartbeat instead of timing out.
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(1),
        }
    }
}

/// Parses a `DATABASE_URL`, with a message that names the variable.
pub fn connect_options(database_url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(database_url)
        .map_err(|e| Error::invalid("DATABASE_URL", e.to_string()))?;
    use sqlx::ConnectOptions;
    Ok(options
        .application_name("sluice")
        // sqlx warns with the whole statement after 1 s by default; lock waits during an
        // outage or a TRUNCATE would flood the log. Five seconds is a real problem.
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
        // No statement of ours runs long; a stuck one must not hold a connection forever.
        .options([
            ("statement_timeout", "30s"),
            ("idle_in_transaction_session_timeout", "10s"),
        ]))
}

/// A lazily connecting pool: the scheduler starts (and answers 503) while Postgres is down.
///
/// A connection is pinged before use only when it sat idle for a while: sqlx's default ping
/// on every checkout is one more round trip on every request of a busy scheduler, while a
/// connection in steady use proves itself alive with each statement.
pub fn pool(options: PgConnectOptions, config: &PoolConfig) -> PgPool {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    use sqlx::Connection;
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

/// How long a pooled connection may sit unused before it is pinged at checkout.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Applies the embedded migrations (idempotent; safe to run from several replicas, which
/// serialise on sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// `SELECT 1`, for readiness.
/// The age of the oldest open transaction (seconds) and of the oldest snapshot held
/// (transactions), over the whole server: what keeps vacuum from cleaning up.
pub async fn oldest_transaction(pool: &PgPool) -> Result<(f64, i64)> {
    Ok(sqlx::query_as(
        "SELECT coalesce(extract(epoch FROM max(now() - xact_start)), 0)::float8,
                coalesce(max(age(backend_xmin)), 0)::bigint
         FROM pg_stat_activity
         WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
