//! The warm runner pool (issue 21): keeps at least `min_warm` idle runners, never more than
//! `max_warm` in all, starts more while ready jobs outnumber free slots, ends runners idle
//! longer than `idle_timeout` above the minimum (through the heartbeat's `drain`: the runner
//! claims no more, finishes its tasks and exits), and replaces runners that die (their leases
//! end at once, so their jobs are handed out again on the reaper's next pass).
//!
//! Runners come from a [`RunnerBackend`]: [`LocalBackend`] starts `sluice-runner` child
//! processes (`SLUICE_POOL_BACKEND=local`); [`KubernetesBackend`] creates gVisor pods from a
//! template and watches them (`kubernetes`). A local pool runs in the scheduler process that
//! owns its children; a Kubernetes pool is shared by the replicas, so one of them leads it at a
//! time (a session advisory lock on a connection of its own), and a new leader adopts the
//! pool's pods and collects the orphans. The pool looks every 100 ms: one indexed read of its
//! own runners and a bounded backlog count.
//!
//! A runner is `starting` from its start until it registers (a row the pool writes); one that
//! does not register within `start_timeout` is stopped. A start that fails, and a runner that
//! crashes, back off further starts (1 s doubling to a minute, reset once every runner is
//! registered), logged once each and written to the pool's row (`GET /api/runners`), never a
//! hot loop.

pub mod kubernetes;
pub mod local;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;

pub use kubernetes::{KubernetesBackend, KubernetesSettings};
pub use local::{LocalBackend, LocalSettings};

use crate::store::runners;

/// What the pool keeps.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The pool's name: its row in `GET /api/runners`, its pods' label, its leadership lock.
    pub name: String,
    pub min_warm: u32,
    pub max_warm: u32,
    pub idle_timeout: Duration,
    /// A runner that has not registered this long after its start is stopped.
    pub start_timeout: Duration,
    /// Slots of each runner the pool starts.
    pub slots: u32,
    /// How often the pool looks.
    pub interval: Duration,
    pub backend: BackendSettings,
}

/// Where the pool's runners come from.
#[derive(Debug, Clone)]
pub enum BackendSettings {
    Local(LocalSettings),
    Kubernetes(Box<KubernetesSettings>),
}

/// What a backend needs to start one runner.
pub struct StartSpec<'a> {
    pub name: &'a str,
    /// The scheduler's internal listener as this process sees it.
    pub internal_url: &'a str,
    /// The registration secret (local runners get it in their environment; pods from their
    /// Secret, never in the pod spec).
    pub secret: &'a str,
    pub slots: u32,
}

/// A runner that ended: how, and whether cleanly (it exited 0: drained or recycled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub name: String,
    pub how: String,
    pub clean: bool,
}

/// Where runners come from.
pub trait RunnerBackend: Send + 'static {
    /// `local` or `kubernetes`.
    fn kind(&self) -> &'static str;
    /// Whether the runners outlive the process (pods): then one replica leads the pool at a
    /// time, and a new leader adopts what it finds.
    fn shared(&self) -> bool;
    /// Takes the pool over: the runners already there, with their ages (orphans that can
    /// never register are collected here or through the start timeout).
    fn adopt(&mut self) -> impl Future<Output = Result<Vec<(String, Duration)>, String>> + Send;
    /// Starts a runner.
    fn start(&mut self, spec: &StartSpec<'_>) -> impl Future<Output = Result<(), String>> + Send;
    /// Stops runner `name` (it drains within its own deadline).
    fn stop(&mut self, name: &str) -> impl Future<Output = ()> + Send;
    /// The runners that ended since the last call.
    fn reap(&mut self) -> Vec<Ended>;
    /// The runners started (or adopted) and not ended.
    fn running(&self) -> Vec<String>;
    /// Runners being terminated from outside (a pod being deleted or evicted) since the last
    /// call: the pool drains them so they claim nothing more.
    fn terminating(&mut self) -> Vec<String>;
    /// The scheduler is shutting down: local runners are stopped; pods stay for the next
    /// leader.
    fn shut_down(&mut self) -> impl Future<Output = ()> + Send;
    /// The leadership was lost: forget everything, touch nothing.
    fn release(&mut self);
}

/// What the pool decides on one tick.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: u32,
    pub stop: Vec<String>,
}

/// One runner of the pool as the tick sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub name: String,
    /// Registered (not gone) with this many slots, this many in use; `None`: starting.
    pub registered: Option<(u32, u32)>,
    /// Idle (registered, nothing in use) since.
    pub idle_since: Option<Instant>,
}

/// The pool's decision: grow to `min_warm` idle (or starting) runners and to cover the
/// backlog, never past `max_warm`; else end runners idle past `idle_timeout`, oldest idle
/// first, down to `min_warm`.
pub fn plan(settings: &PoolSettings, runners: &[Seen], backlog: u64, now: Instant) -> Plan {
    let total = runners.len() as u32;
    let starting = runners.iter().filter(|r| r.registered.is_none()).count() as u32;
    let idle = runners
        .iter()
        .filter(|r| matches!(r.registered, Some((_, 0))))
        .count() as u32;
    let free: u64 = runners
        .iter()
        .map(|r| match r.registered {
            Some((slots, used)) => u64::from(slots.saturating_sub(used)),
            None => u64::from(settings.slots),
        })
        .sum();
    let room = settings.max_warm.saturating_sub(total);
    let for_warmth = settings.min_warm.saturating_sub(idle + starting);
    let for_backlog = backlog
        .saturating_sub(free)
        .div_ceil(u64::from(settings.slots.max(1)))
        .min(u64::from(u32::MAX)) as u32;
    let start = for_warmth.max(for_backlog).min(room);
    if start > 0 || backlog > free {
        return Plan {
            start,
            stop: Vec::new(),
        };
    }
    let mut idle_long: Vec<&Seen> = runners
        .iter()
        .filter(|r| {
            r.idle_since
                .is_some_and(|since| now.duration_since(since) >= settings.idle_timeout)
        })
        .collect();
    idle_long.sort_by_key(|r| r.idle_since);
    let surplus = total.saturating_sub(settings.min_warm) as usize;
    Plan {
        start: 0,
        stop: idle_long
            .into_iter()
            .take(surplus)
            .map(|r| r.name.clone())
            .collect(),
    }
}

/// Runs the pool until `shutdown`: leads it when its backend is shared, then looks every
/// `interval`.
pub async fn run<B: RunnerBackend>(
    pool: PgPool,
    settings: PoolSettings,
    backend: B,
    internal_url: String,
    secret: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = settings.interval;
    let mut manager = Manager::new(pool.clone(), settings, backend, internal_url, secret);
    let mut leadership: Option<sqlx::PgConnection> = None;
    let mut next_try = Instant::now();
    loop {
        if !manager.backend.shared() {
            if !manager.leading {
                manager.take_over().await;
            }
        } else if let Some(conn) = leadership.as_mut() {
            let alive = tokio::time::timeout(Duration::from_secs(2), runners::still_leading(conn))
                .await
                .unwrap_or(false);
            if !alive {
                tracing::warn!(pool = %manager.settings.name, "lost the pool's leadership (its database connection); another replica takes over");
                leadership = None;
                manager.lose();
            } else if !manager.leading && Instant::now() >= next_try {
                // Leading, but the backend could not list its runners yet: again.
                next_try = Instant::now() + Duration::from_secs(1);
                manager.take_over().await;
            }
        } else if Instant::now() >= next_try {
            next_try = Instant::now() + Duration::from_secs(1);
            match runners::lead_pool(&pool, &manager.settings.name).await {
                Ok(Some(conn)) => {
                    leadership = Some(conn);
                    manager.take_over().await;
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "cannot ask for the pool's leadership"),
            }
        }
        if manager.leading {
            manager.tick().await;
        }
        if wait(&mut shutdown, interval).await {
            break;
        }
    }
    manager.shut_down().await;
}

/// The pool's memory between ticks.
struct Manager<B> {
    pool: PgPool,
    settings: PoolSettings,
    backend: B,
    internal_url: String,
    secret: String,
    /// This process's runner names start with it.
    prefix: String,
    /// The pool's row (the pool's name; a local pool's is its own, one per process).
    row_name: String,
    holder: String,
    leading: bool,
    next: u64,
    idle_since: HashMap<String, Instant>,
    /// Not registered yet, since.
    started_at: HashMap<String, Instant>,
    /// Ordered to end (drained, stopped, or being terminated from outside).
    stopping: HashSet<String>,
    backoff: Duration,
    not_before: Instant,
    error: Option<String>,
    written_at: Option<Instant>,
}

impl<B: RunnerBackend> Manager<B> {
    fn new(
        pool: PgPool,
        settings: PoolSettings,
        backend: B,
        internal_url: String,
        secret: String,
    ) -> Manager<B> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let row_name = if backend.shared() {
            settings.name.clone()
        } else {
            format!("{}-{tag}", settings.name)
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Manager {
            pool,
            prefix: format!("pool-{tag}"),
            row_name,
            holder: format!("{host}/{}", std::process::id()),
            settings,
            backend,
            internal_url,
            secret,
            leading: false,
            next: 0,
            idle_since: HashMap::new(),
            started_at: HashMap::new(),
            stopping: HashSet::new(),
            backoff: Duration::ZERO,
            not_before: Instant::now(),
            error: None,
            written_at: None,
        }
    }

    /// Becomes the pool's runner: adopts what the backend finds.
    async fn take_over(&mut self) {
        let now = Instant::now();
        match self.backend.adopt().await {
            Ok(found) => {
                for (name, age) in &found {
                    self.started_at
                        .insert(name.clone(), now.checked_sub(*age).unwrap_or(now));
                }
                tracing::info!(
                    pool = %self.settings.name,
                    backend = self.backend.kind(),
                    adopted = found.len(),
                    min_warm = self.settings.min_warm,
                    max_warm = self.settings.max_warm,
                    idle_timeout_ms = self.settings.idle_timeout.as_millis() as u64,
                    "runner pool started"
                );
                self.leading = true;
                self.write_row(false).await;
            }
            Err(err) => {
                // Not leading until it can see its runners; asked again on the next tick.
                self.failure(format!("cannot list the pool's runners: {err}"))
                    .await;
                self.backend.release();
            }
        }
    }

    /// The leadership was lost: another replica runs the pool from now on.
    fn lose(&mut self) {
        self.backend.release();
        self.leading = false;
        self.idle_since.clear();
        self.started_at.clear();
        self.stopping.clear();
    }

    /// Records a start that failed or a runner that died: starts back off, the pool's row
    /// says why.
    async fn failure(&mut self, why: String) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.not_before = Instant::now() + self.backoff;
        tracing::warn!(pool = %self.settings.name, error = %why, retry_in_ms = self.backoff.as_millis() as u64, "runner pool trouble");
        self.error = Some(why);
        self.write_row(false).await;
    }

    /// Writes the pool's row; `healthy` clears its last error.
    async fn write_row(&mut self, healthy: bool) {
        let now = Instant::now();
        let retry_at = (self.not_before > now).then(|| {
            chrono::Utc::now()
                + chrono::Duration::from_std(self.not_before - now).unwrap_or_default()
        });
        let row = runners::PoolRow {
            name: &self.row_name,
            backend: self.backend.kind(),
            holder: &self.holder,
            min_warm: self.settings.min_warm as i32,
            max_warm: self.settings.max_warm as i32,
            healthy,
            error: if healthy { None } else { self.error.as_deref() },
            retry_at,
        };
        match runners::write_pool(&self.pool, &row).await {
            Ok(()) => self.written_at = Some(now),
            Err(err) => tracing::warn!(error = %err, "cannot write the pool's row"),
        }
    }

    /// Ends what ended: retires the runners the backend saw end (their leases end now, so
    /// their jobs are handed out again on the reaper's next pass); whether one crashed.
    async fn reap(&mut self) -> bool {
        let mut died = false;
        for ended in self.backend.reap() {
            self.idle_since.remove(&ended.name);
            let never_registered = self.started_at.remove(&ended.name).is_some();
            let expected = self.stopping.remove(&ended.name);
            if expected || ended.clean {
                // Drained on our order, or exited by itself after its last task
                // (SLUICE_RUNNER_RECYCLE_AFTER): replaced as needed, at once.
                tracing::info!(runner = %ended.name, status = %ended.how, "pool runner ended");
            } else {
                // A crash: replaced, but starts back off so a runner that cannot live is
                // not restarted in a hot loop.
                died = true;
                let what = if never_registered {
                    "could not start"
                } else {
                    "died"
                };
                self.failure(format!("runner {} {what}: {}", ended.name, ended.how))
                    .await;
            }
            if let Err(err) = runners::retire(&self.pool, &ended.name).await {
                tracing::warn!(runner = %ended.name, error = %err, "cannot retire a pool runner");
            }
        }
        for name in self.backend.terminating() {
            // Deleted or evicted from outside: it claims nothing more while it terminates;
            // its leases end when it is gone.
            let _ = runners::drain(&self.pool, &name).await;
            self.stopping.insert(name);
        }
        died
    }

    async fn tick(&mut self) {
        let died = self.reap().await;
        let names = self.backend.running();
        let registered: HashMap<String, (u32, u32)> =
            match runners::live_by_names(&self.pool, &names).await {
                Ok(rows) => rows
                    .into_iter()
                    .map(|(name, slots, in_use)| {
                        (name, (slots.max(0) as u32, in_use.max(0) as u32))
                    })
                    .collect(),
                Err(err) => {
                    tracing::warn!(error = %err, "the pool cannot read the runners");
                    return;
                }
            };
        let now = Instant::now();
        let mut late = Vec::new();
        for name in &names {
            if registered.contains_key(name) {
                self.started_at.remove(name);
            } else if self
                .started_at
                .get(name)
                .is_some_and(|since| now.duration_since(*since) >= self.settings.start_timeout)
                && !self.stopping.contains(name)
            {
                late.push(name.clone());
            }
        }
        for name in late {
            self.stopping.insert(name.clone());
            self.backend.stop(&name).await;
            self.failure(format!(
                "runner {name} did not register within {} s; stopped",
                self.settings.start_timeout.as_secs()
            ))
            .await;
        }
        let cap = i64::from(self.settings.max_warm) * i64::from(self.settings.slots) * 2 + 1;
        let backlog = runners::ready_backlog(&self.pool, cap)
            .await
            .unwrap_or(0)
            .max(0) as u64;
        let seen: Vec<Seen> = names
            .iter()
            .filter(|name| !self.stopping.contains(*name))
            .map(|name| {
                let state = registered.get(name).copied();
                let since = match state {
                    Some((_, 0)) => Some(*self.idle_since.entry(name.clone()).or_insert(now)),
                    _ => {
                        self.idle_since.remove(name);
                        None
                    }
                };
                Seen {
                    name: name.clone(),
                    registered: state,
                    idle_since: since,
                }
            })
            .collect();
        // Every runner registered and none died: the back-off starts over, the error clears.
        if !died && !seen.is_empty() && seen.iter().all(|r| r.registered.is_some()) {
            self.backoff = Duration::ZERO;
            if self.error.take().is_some() {
                tracing::info!(pool = %self.settings.name, "runner pool healthy again");
                self.write_row(true).await;
            }
        }
        let decided = plan(&self.settings, &seen, backlog, now);
        for name in decided.stop {
            // Through its heartbeat: it claims no more, finishes what it may have claimed
            // meanwhile, and exits by itself.
            match runners::drain(&self.pool, &name).await {
                Ok(_) => {
                    tracing::info!(runner = %name, "pool runner idle past the timeout; draining it");
                    self.stopping.insert(name);
                }
                Err(err) => {
                    tracing::warn!(runner = %name, error = %err, "cannot drain a pool runner")
                }
            }
        }
        if decided.start > 0 && now >= self.not_before {
            self.start(decided.start, now).await;
        }
        if self
            .written_at
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.write_row(false).await;
        }
    }

    /// Starts `count` runners; the first failure backs off the rest.
    async fn start(&mut self, count: u32, now: Instant) {
        for _ in 0..count {
            self.next += 1;
            let name = format!("{}-{}", self.prefix, self.next);
            let spec = StartSpec {
                name: &name,
                internal_url: &self.internal_url,
                secret: &self.secret,
                slots: self.settings.slots,
            };
            // Listed before it starts, so that its registration always finds the row.
            let labels = serde_json::json!({
                "pool": self.settings.name,
                "backend": self.backend.kind(),
            });
            if let Err(err) =
                runners::starting(&self.pool, &name, labels, self.settings.slots as i32).await
            {
                tracing::warn!(runner = %name, error = %err, "cannot list a starting runner");
                return;
            }
            match self.backend.start(&spec).await {
                Ok(()) => {
                    tracing::info!(runner = %name, "pool runner starting");
                    self.started_at.insert(name.clone(), now);
                }
                Err(err) => {
                    let _ = runners::forget_starting(&self.pool, &name).await;
                    self.failure(format!("cannot start a runner: {err}")).await;
                    break;
                }
            }
        }
    }

    /// Shutdown: a local pool's runners drain and exit (they die with the process anyway);
    /// a shared pool's pods stay for the next leader.
    async fn shut_down(&mut self) {
        self.backend.shut_down().await;
        if self.backend.shared() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.backend.running().is_empty() && Instant::now() < deadline {
            for ended in self.backend.reap() {
                let _ = runners::retire(&self.pool, &ended.name).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits `interval`; whether shutdown came first.
async fn wait(shutdown: &mut watch::Receiver<bool>, interval: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(interval) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            min_warm: 2,
            max_warm: 5,
            idle_timeout: Duration::from_secs(10),
            slots: 2,
            interval: Duration::from_secs(1),
            name: "test".into(),
            start_timeout: Duration::from_secs(60),
            backend: BackendSettings::Local(LocalSettings {
                binary: std::path::PathBuf::new(),
                workdir: std::path::PathBuf::new(),
                env: Vec::new(),
            }),
        }
    }

    fn runner(
        name: &str,
        registered: Option<(u32, u32)>,
        idle_for: Option<u64>,
        now: Instant,
    ) -> Seen {
        Seen {
            name: name.into(),
            registered,
            idle_since: idle_for.map(|s| now - Duration::from_secs(s)),
        }
    }

    #[test]
    fn an_empty_pool_warms_to_the_minimum() {
        let now = Instant::now();
        assert_eq!(plan(&settings(), &[], 0, now).start, 2);
        // A starting runner counts as warm: no second start for it.
        let one = [runner("a", None, None, now)];
        assert_eq!(plan(&settings(), &one, 0, now).start, 1);
    }

    #[test]
    fn a_backlog_grows_the_pool_up_to_the_maximum() {
        let now = Instant::now();
        let busy = [
            runner("a", Some((2, 2)), None, now),
            runner("b", Some((2, 2)), None, now),
        ];
        // 3 ready jobs, no free slot: two more runners of 2 slots (and the minimum of idle).
        assert_eq!(plan(&settings(), &busy, 3, now).start, 2);
        // 100 ready jobs: only up to max_warm (5) in all.
        assert_eq!(plan(&settings(), &busy, 100, now).start, 3);
    }

    #[test]
    fn idle_runners_past_the_timeout_end_down_to_the_minimum() {
        let now = Instant::now();
        let runners = [
            runner("a", Some((2, 0)), Some(60), now),
            runner("b", Some((2, 0)), Some(30), now),
            runner("c", Some((2, 0)), Some(1), now),
            runner("d", Some((2, 1)), None, now),
        ];
        let decided = plan(&settings(), &runners, 0, now);
        assert_eq!(decided.start, 0);
        // Four runners, minimum two: the two idle longest go (c is not past the timeout).
        assert_eq!(decided.stop, vec!["a".to_string(), "b".to_string()]);
        // With a backlog beyond the free slots nothing is ended.
        assert!(plan(&settings(), &runners, 10, now).stop.is_empty());
    }
}
