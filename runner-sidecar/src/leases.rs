//! The leases this runner holds: one entry per running attempt, by `(job, attempt)` — never
//! by job alone, or a retried job's new attempt landing here while the old one's tool still
//! dies would overwrite or remove the old one's entry, and with it its cancel orders, its
//! heartbeats and its fence.
//!
//! The session adds an entry when it starts an attempt and hands the attempt its
//! [`LeaseGuard`]; the attempt drops the guard once its completion is delivered (or it is
//! abandoned). Meanwhile the heartbeat lists the lease, applies the scheduler's orders to its
//! [`Stop`], and the fence stops it when renewals stop coming.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use sluice_protocol::{Attempt, JobId, LeaseRef};

use crate::exec::{Stop, StopReason};

/// A held lease, as the heartbeat and the fence see it.
#[derive(Debug)]
pub struct Held {
    pub lease: LeaseRef,
    pub stop: Stop,
    /// When the scheduler last confirmed the lease (claim time, then each good heartbeat).
    pub renewed_at: Instant,
}

/// The running attempts' leases, by `(job, attempt)`.
#[derive(Debug, Clone, Default)]
pub struct Leases(Arc<Mutex<HashMap<(JobId, Attempt), Held>>>);

impl Leases {
    /// Holds `lease` from now on, with `stop` as the attempt's stop signal, until the
    /// returned guard is dropped.
    pub fn hold(&self, lease: LeaseRef, stop: Stop) -> LeaseGuard {
        let key = (lease.job_id, lease.attempt);
        self.lock().insert(
            key,
            Held {
                lease,
                stop,
                renewed_at: Instant::now(),
            },
        );
        LeaseGuard {
            leases: self.clone(),
            key,
        }
    }

    /// The held leases, by `(job, attempt)`.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<(JobId, Attempt), Held>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The leases to list in a heartbeat.
    pub fn listed(&self) -> Vec<LeaseRef> {
        self.lock().values().map(|held| held.lease).collect()
    }

    /// Stops every running attempt for `reason`.
    pub fn stop_all(&self, reason: StopReason) {
        for held in self.lock().values() {
            held.stop.order(reason);
        }
    }

    /// How many leases are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An attempt's hold on its lease; dropping it stops listing the lease in heartbeats (the
/// scheduler then knows the attempt's tool is gone).
#[derive(Debug)]
pub struct LeaseGuard {
    leases: Leases,
    key: (JobId, Attempt),
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.leases.lock().remove(&self.key);
    }
}
