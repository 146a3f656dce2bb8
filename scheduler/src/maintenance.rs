//! The maintenance loop: every `maintenance_interval`, one replica (the holder of a
//! transaction-scoped advisory lock) reclaims expired leases, fails jobs past their deadline,
//! promotes due scheduled jobs and prunes finished jobs past their queue's retention.
//!
//! After a pass failed because Postgres was unreachable, the first good pass gives every lease
//! that expired meanwhile one more lease term before anything is reclaimed: runners could not
//! heartbeat during the outage, and mass-reclaiming their live work would run it twice.
//!
//! The lock is taken per pass, not held: a replica that dies mid-pass releases it with its
//! connection, and the next pass of any replica takes over. Each statement guards itself with
//! `SKIP LOCKED` and a state check, so even two concurrent passes could not double-reclaim.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::store::jobs;
use crate::wake::Wake;
use crate::Result;

/// Rows one statement touches at most, so that a pass never holds many locks for long.
const BATCH: i64 = 1000;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub led: bool,
    pub extended: u64,
    pub requeued: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub promoted: u64,
    pub pruned: u64,
}

/// Runs one maintenance pass, if no other replica is running one. `after_outage` extends
/// the leases that expired while the database was away instead of reclaiming them.
///
/// Each step is its own short transaction that takes the leadership lock again, so the pass
/// never holds row locks of one step while it works on the next.
pub async fn run_pass(
    pool: &PgPool,
    wake: &Wake,
    lease: Duration,
    after_outage: bool,
) -> Result<PassReport> {
    let mut report = PassReport::default();

    let mut tx = pool.begin().await?;
    if !jobs::try_lead_maintenance(&mut tx).await? {
        return Ok(report);
    }
    report.led = true;
    if after_outage {
        report.extended = jobs::extend_expired_leases(&mut tx, lease).await?;
    }
    let reclaimed = jobs::reclaim_expired(&mut tx, BATCH).await?;
    report.requeued = reclaimed.requeued;
    report.failed = reclaimed.failed;
    if reclaimed.requeued > 0 {
        jobs::notify_available(&mut tx).await?;
    }
    tx.commit().await?;

    let mut tx = pool.begin().await?;
    if jobs::try_lead_maintenance(&mut tx).await? {
        report.timed_out = jobs::fail_overdue(&mut tx, BATCH).await?;
        report.promoted = jobs::promote_due(&mut tx, BATCH).await?;
        if report.promoted > 0 {
            jobs::notify_available(&mut tx).await?;
        }
    }
    tx.commit().await?;

    let mut tx = pool.begin().await?;
    if jobs::try_lead_maintenance(&mut tx).await? {
        report.pruned = jobs::prune_finished(&mut tx, BATCH).await?;
    }
    tx.commit().await?;

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
    Ok(report)
}

/// Runs passes every `interval` until `shutdown` fires. A full batch runs the next pass at
/// once; errors (Postgres away) are logged and retried on the next tick.
pub async fn run(
    pool: PgPool,
    wake: Wake,
    interval: Duration,
    lease: Duration,
    capped_queues: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut after_outage = false;
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
            match run_pass(&pool, &wake, lease, after_outage).await {
                Ok(report) => {
                    if report.led {
                        after_outage = false;
                    }
                    let full = report.requeued + report.failed >= BATCH as u64
                        || report.timed_out >= BATCH as u64
                        || report.promoted >= BATCH as u64
                        || report.pruned >= BATCH as u64;
                    if !full {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "maintenance pass failed");
                    after_outage |= matches!(err, crate::Error::Unavailable(_));
                    break;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}
