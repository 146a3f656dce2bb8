//! The maintenance loop: every `maintenance_interval`, one replica (the holder of a
//! transaction-scoped advisory lock) reclaims expired leases, fails jobs past their deadline,
//! promotes due scheduled jobs, prunes finished jobs past their queue's retention and
//! finished workflow runs (with their artifacts) past `SLUICE_RUN_RETENTION_SECONDS`.
//!
//! After a pass failed because Postgres was unreachable, the first good pass gives every lease
//! that expired meanwhile one more lease term before anything is reclaimed: runners could not
//! heartbeat during the outage, and mass-reclaiming their live work would run it twice.
//!
//! The lock is taken per pass, not held: a replica that dies mid-pass releases it with its
//! connection, and the next pass of any replica takes over. Each statement guards itself with
//! `SKIP LOCKED` and a state check, so even two concurrent passes could not double-reclaim.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::watch;

use crate::store::jobs;
use crate::wake::Wake;
use crate::Result;

/// Rows one statement touches at most, so that a pass never holds many locks for long.
const BATCH: i64 = 1000;
/// Runs deleted per statement at most (their artifacts gone before).
const RUN_BATCH: i64 = 100;
/// Artifact chunks (1 MiB each) deleted per statement at most, so no pass holds a long
/// transaction over a run's gigabytes.
const CHUNK_BATCH: i64 = 64;

/// What the maintenance loop is told.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub interval: Duration,
    pub lease: Duration,
    /// How long finished runs are kept; zero: for ever.
    pub run_retention: Duration,
}
/// Passes in a row whose reclaim with the outage extension may fail (other than for the
/// database being away) before reclaims go on without it.
const MAX_EXTENSION_TRIES: u32 = 5;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// This replica held the leadership for at least one step.
    pub led: bool,
    pub extended: u64,
    pub requeued: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub promoted: u64,
    pub pruned: u64,
    pub pruned_runs: u64,
    pub pruned_chunks: u64,
    /// The steps that failed this pass (each is logged; the others ran regardless).
    pub failed_steps: Vec<&'static str>,
    /// A step failed because Postgres was unreachable.
    pub unavailable: bool,
    /// The outage extension ran (and committed with the reclaim) in this pass.
    pub extension_ran: bool,
}

impl PassReport {
    /// Keeps a step's outcome: its count (`None` when another replica led it), or its error,
    /// which is logged with the step's name and does not stop the others.
    fn record(&mut self, step: &'static str, outcome: Result<Option<u64>>) -> u64 {
        match outcome {
            Ok(Some(count)) => {
                self.led = true;
                count
            }
            Ok(None) => 0,
            Err(err) => {
                tracing::warn!(step, error = %err, "maintenance step failed; the others still ran");
                self.unavailable |= matches!(err, crate::Error::Unavailable(_));
                self.failed_steps.push(step);
                0
            }
        }
    }

    /// Some step touched a full batch: run the next pass at once.
    fn full(&self) -> bool {
        let batch = BATCH as u64;
        self.requeued + self.failed >= batch
            || self.timed_out >= batch
            || self.promoted >= batch
            || self.pruned >= batch
            || self.pruned_runs >= RUN_BATCH as u64
            || self.pruned_chunks >= CHUNK_BATCH as u64
    }
}

/// A transaction holding the maintenance leadership, or `None` when another replica has it.
async fn lead(pool: &PgPool) -> Result<Option<Transaction<'static, Postgres>>> {
    let mut tx = pool.begin().await?;
    if jobs::try_lead_maintenance(&mut tx).await? {
        Ok(Some(tx))
    } else {
        Ok(None)
    }
}

/// Runs one maintenance pass, if no other replica is running one. `after_outage` extends
/// the leases that expired while the database was away instead of reclaiming them.
///
/// Each step is its own short transaction that takes the leadership lock again, so the pass
/// never holds row locks of one step while it works on the next, and a step that fails (a
/// statement error, a row no statement can handle) is logged and retried on the next pass
/// while the other steps still run: one bad row in one queue never stops reclaims,
/// promotions, timeouts or pruning for all of them.
pub async fn run_pass(
    pool: &PgPool,
    wake: &Wake,
    settings: Settings,
    after_outage: bool,
) -> PassReport {
    let lease = settings.lease;
    let mut report = PassReport::default();

    // After an outage, the leases that expired meanwhile first get one more term, in the
    // reclaim's own transaction (one `now()`), so the reclaim spares runners that kept
    // working but could not heartbeat. Should the extension fail, nothing is reclaimed.
    let reclaimed = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let extended = if after_outage {
            Some(jobs::extend_expired_leases(&mut tx, lease).await?)
        } else {
            None
        };
        let reclaimed = jobs::reclaim_expired(&mut tx, BATCH).await?;
        if reclaimed.requeued > 0 {
            jobs::notify_available(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(Some((extended, reclaimed)))
    }
    .await;
    match reclaimed {
        Ok(Some((extended, reclaimed))) => {
            report.led = true;
            report.extension_ran = extended.is_some();
            report.extended = extended.unwrap_or(0);
            report.requeued = reclaimed.requeued;
            report.failed = reclaimed.failed;
        }
        Ok(None) => {}
        Err(err) => {
            report.record("reclaim", Err(err));
        }
    }

    let timed_out = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let count = jobs::fail_overdue(&mut tx, BATCH).await?;
        tx.commit().await?;
        Ok(Some(count))
    }
    .await;
    report.timed_out = report.record("timeouts", timed_out);

    let promoted = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let count = jobs::promote_due(&mut tx, BATCH).await?;
        if count > 0 {
            jobs::notify_available(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(Some(count))
    }
    .await;
    report.promoted = report.record("promote", promoted);

    let pruned = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let count = jobs::prune_finished(&mut tx, BATCH).await?;
        tx.commit().await?;
        Ok(Some(count))
    }
    .await;
    report.pruned = report.record("prune", pruned);

    if !settings.run_retention.is_zero() {
        let pruned_chunks = async {
            let Some(mut tx) = lead(pool).await? else {
                return Ok(None);
            };
            let count = crate::store::artifacts::prune_expired_chunks(
                &mut tx,
                settings.run_retention.as_secs_f64(),
                CHUNK_BATCH,
            )
            .await?;
            tx.commit().await?;
            Ok(Some(count))
        }
        .await;
        report.pruned_chunks = report.record("prune artifacts", pruned_chunks);
        let pruned_runs = async {
            let Some(mut tx) = lead(pool).await? else {
                return Ok(None);
            };
            let count = crate::store::runs::prune_runs(
                &mut tx,
                settings.run_retention.as_secs_f64(),
                RUN_BATCH,
            )
            .await?;
            tx.commit().await?;
            Ok(Some(count))
        }
        .await;
        report.pruned_runs = report.record("prune runs", pruned_runs);
    }

    let forgotten = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let count = jobs::forget_past_stops(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(count))
    }
    .await;
    report.record("stops", forgotten);

    let forgotten_runners = async {
        let Some(mut tx) = lead(pool).await? else {
            return Ok(None);
        };
        let count = crate::store::runners::prune_gone(&mut tx, BATCH).await?
            + crate::store::runners::prune_pools(&mut tx, BATCH).await?;
        tx.commit().await?;
        Ok(Some(count))
    }
    .await;
    report.record("prune runners", forgotten_runners);

    if report.requeued > 0 || report.promoted > 0 {
        wake.notify();
    }
    if report.extended > 0 {
        tracing::warn!(
            extended = report.extended,
            "database was unreachable; gave expired leases one more term"
        );
    }
    if report.requeued > 0 || report.failed > 0 {
        tracing::info!(
            requeued = report.requeued,
            failed = report.failed,
            "reclaimed expired leases"
        );
    }
    if report.timed_out > 0 {
        tracing::info!(
            timed_out = report.timed_out,
            "failed jobs past their timeout"
        );
    }
    report
}

/// Runs passes every `interval` until `shutdown` fires. A full batch runs the next pass at
/// once; errors (Postgres away) are logged and retried on the next tick.
pub async fn run(
    pool: PgPool,
    wake: Wake,
    settings: Settings,
    capped_queues: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: std::sync::Arc<super::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(settings.interval);
    let mut after_outage = false;
    let mut failed_extensions = 0;
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Every replica, leader or not, keeps its claim path in step with the queue caps.
        if let Ok(capped) = crate::store::queues::any_capped(&pool).await {
            capped_queues.store(capped, std::sync::atomic::Ordering::Relaxed);
        }
        loop {
            let report = run_pass(&pool, &wake, settings, after_outage).await;
            metrics.reclaimed("lease_expired", "requeued", report.requeued);
            metrics.reclaimed("lease_expired", "failed", report.failed);
            metrics.reclaimed("timed_out", "failed", report.timed_out);
            // The outage extension is done once this replica ran it as leader after the
            // database came back (it is repeated while the database stays away). A reclaim
            // step that keeps failing with it for another reason is retried without it after
            // a few passes, with an error: it must never hold reclaims off for good.
            if report.unavailable {
                after_outage = true;
                failed_extensions = 0;
            } else if report.extension_ran {
                after_outage = false;
            } else if after_outage && report.failed_steps.contains(&"reclaim") {
                failed_extensions += 1;
                if failed_extensions >= MAX_EXTENSION_TRIES {
                    tracing::error!(
                        tries = failed_extensions,
                        "the reclaim keeps failing with the outage extension; reclaiming without it"
                    );
                    after_outage = false;
                }
            }
            if !report.full() || !report.failed_steps.is_empty() {
                break;
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}
