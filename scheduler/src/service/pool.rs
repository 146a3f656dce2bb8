//! The warm runner pool (issue 21): keeps at least `min_warm` idle runners, never more than
//! `max_warm` in all, starts more while ready jobs outnumber free slots, ends runners idle
//! longer than `idle_timeout` above the minimum (through the heartbeat's `drain`: the runner
//! claims no more, finishes its tasks and exits), and replaces runners that die (their leases
//! end at once, so their jobs are handed out again on the reaper's next pass).
//!
//! Runners come from a [`RunnerBackend`]: [`LocalBackend`] starts `sluice-runner` child
//! processes (`SLUICE_POOL_BACKEND=local`). The pool runs in the scheduler process whose
//! backend owns the runners: local children belong to the process that started them. It
//! looks every 100 ms: one indexed read of its own runners and a bounded backlog count.
//!
//! Each tick reads what the database knows of the pool's runners (`GET /api/runners`' view)
//! and the ready backlog; a runner counts as `starting` until it registers. A start that
//! fails, and a runner that crashes, back off further starts (1 s doubling to a minute, reset
//! once every runner is registered), logged once each, never a hot loop.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::runners;

/// What the pool keeps.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub min_warm: u32,
    pub max_warm: u32,
    pub idle_timeout: Duration,
    /// Slots of each runner the pool starts.
    pub slots: u32,
    /// How often the pool looks.
    pub interval: Duration,
    pub backend: LocalSettings,
}

/// How [`LocalBackend`] starts runners.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The `sluice-runner` binary.
    pub binary: PathBuf,
    /// Where each runner's workspace directory goes (`<dir>/<name>`).
    pub workdir: PathBuf,
    /// Variables passed on to every runner (the scheduler's `PATH`, `ANTHROPIC_*`,
    /// `SLUICE_RUNNER_*` settings), on top of the cleared environment.
    pub env: Vec<(String, String)>,
}

/// Where runners come from.
pub trait RunnerBackend: Send {
    /// Starts runner `name` registering at `internal_url` with `secret`.
    fn start(
        &mut self,
        name: &str,
        internal_url: &str,
        secret: &str,
        slots: u32,
    ) -> Result<(), String>;
    /// Stops runner `name` at once (it drains within its own deadline): for shutdown; an
    /// idle runner is drained through its heartbeat instead.
    fn stop(&mut self, name: &str);
    /// The runners that ended since the last call: name, how, and whether cleanly (exit 0).
    fn reap(&mut self) -> Vec<(String, String, bool)>;
    /// The runners started and not ended.
    fn running(&self) -> Vec<String>;
    /// Stops every runner (the scheduler is shutting down).
    fn stop_all(&mut self);
}

/// Runners as child processes of the scheduler: they drain on SIGTERM and die with it.
pub struct LocalBackend {
    settings: LocalSettings,
    children: HashMap<String, tokio::process::Child>,
}

impl LocalBackend {
    pub fn new(settings: LocalSettings) -> LocalBackend {
        LocalBackend {
            settings,
            children: HashMap::new(),
        }
    }
}

impl RunnerBackend for LocalBackend {
    fn start(
        &mut self,
        name: &str,
        internal_url: &str,
        secret: &str,
        slots: u32,
    ) -> Result<(), String> {
        let workdir = self.settings.workdir.join(name);
        let mut command = tokio::process::Command::new(&self.settings.binary);
        command.env_clear();
        for (key, value) in &self.settings.env {
            command.env(key, value);
        }
        command
            .env("SLUICE_API_URL", internal_url)
            .env("RUNNER_POD_NAME", name)
            .env("SLUICE_RUNNER_SECRET", secret)
            .env("SLUICE_RUNNER_SLOTS", slots.to_string())
            .env("SLUICE_RUNNER_WORKDIR", &workdir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        // SIGTERM if the scheduler dies: the runner drains and exits.
        sluice_sandbox::die_with_parent(command.as_std_mut(), nix::sys::signal::Signal::SIGTERM);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.settings.binary.display()))?;
        self.children.insert(name.to_string(), child);
        Ok(())
    }

    fn stop(&mut self, name: &str) {
        if let Some(pid) = self.children.get(name).and_then(|c| c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    fn reap(&mut self) -> Vec<(String, String, bool)> {
        let mut ended = Vec::new();
        self.children.retain(|name, child| match child.try_wait() {
            Ok(Some(status)) => {
                ended.push((name.clone(), status.to_string(), status.success()));
                false
            }
            Ok(None) => true,
            Err(err) => {
                ended.push((name.clone(), err.to_string(), false));
                false
            }
        });
        ended
    }

    fn running(&self) -> Vec<String> {
        self.children.keys().cloned().collect()
    }

    fn stop_all(&mut self) {
        let names = self.running();
        for name in names {
            self.stop(&name);
        }
    }
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

/// Runs the pool until `shutdown`, then stops its runners.
pub async fn run(
    pool: PgPool,
    settings: PoolSettings,
    mut backend: Box<dyn RunnerBackend>,
    internal_url: String,
    secret: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let prefix = format!("pool-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut next = 0u64;
    let mut idle_since: HashMap<String, Instant> = HashMap::new();
    let mut stopping: HashSet<String> = HashSet::new();
    let mut backoff = Duration::ZERO;
    let mut not_before = Instant::now();
    tracing::info!(
        min_warm = settings.min_warm,
        max_warm = settings.max_warm,
        idle_timeout_ms = settings.idle_timeout.as_millis() as u64,
        "runner pool started (local backend)"
    );
    loop {
        let mut died = false;
        for (name, how, clean) in backend.reap() {
            idle_since.remove(&name);
            let expected = stopping.remove(&name);
            if expected || clean {
                // Drained on our order, or exited by itself after its last task
                // (SLUICE_RUNNER_RECYCLE_AFTER): replaced as needed, at once.
                tracing::info!(runner = %name, status = %how, "pool runner ended");
            } else {
                // A crash: replaced, but starts back off so a runner that cannot live is
                // not restarted in a hot loop.
                died = true;
                backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                not_before = Instant::now() + backoff;
                tracing::warn!(runner = %name, status = %how, retry_in_ms = backoff.as_millis() as u64, "pool runner died; replacing it");
            }
            // Its leases end now: its jobs are handed out again on the reaper's next pass.
            if let Err(err) = runners::retire(&pool, &name).await {
                tracing::warn!(runner = %name, error = %err, "cannot retire a pool runner");
            }
        }
        let names = backend.running();
        let registered: HashMap<String, (u32, u32)> = match runners::live_by_names(&pool, &names)
            .await
        {
            Ok(rows) => rows
                .into_iter()
                .map(|(name, slots, in_use)| (name, (slots.max(0) as u32, in_use.max(0) as u32)))
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "the pool cannot read the runners");
                if wait(&mut shutdown, settings.interval).await {
                    break;
                }
                continue;
            }
        };
        let cap = i64::from(settings.max_warm) * i64::from(settings.slots) * 2 + 1;
        let backlog = runners::ready_backlog(&pool, cap).await.unwrap_or(0).max(0) as u64;
        let now = Instant::now();
        let seen: Vec<Seen> = names
            .iter()
            .filter(|name| !stopping.contains(*name))
            .map(|name| {
                let state = registered.get(name).copied();
                let since = match state {
                    Some((_, 0)) => Some(*idle_since.entry(name.clone()).or_insert(now)),
                    _ => {
                        idle_since.remove(name);
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
        // Every runner registered and none died: the back-off starts over.
        if !died && !seen.is_empty() && seen.iter().all(|r| r.registered.is_some()) {
            backoff = Duration::ZERO;
        }
        let decided = plan(&settings, &seen, backlog, now);
        for name in decided.stop {
            // Through its heartbeat: it claims no more, finishes what it may have claimed
            // meanwhile, and exits by itself.
            match runners::drain(&pool, &name).await {
                Ok(_) => {
                    tracing::info!(runner = %name, "pool runner idle past the timeout; draining it");
                    stopping.insert(name);
                }
                Err(err) => {
                    tracing::warn!(runner = %name, error = %err, "cannot drain a pool runner")
                }
            }
        }
        if decided.start > 0 && now >= not_before {
            for _ in 0..decided.start {
                next += 1;
                let name = format!("{prefix}-{next}");
                match backend.start(&name, &internal_url, &secret, settings.slots) {
                    Ok(()) => tracing::info!(runner = %name, "pool runner starting"),
                    Err(err) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                        not_before = now + backoff;
                        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "the pool cannot start a runner");
                        break;
                    }
                }
            }
        }
        if wait(&mut shutdown, settings.interval).await {
            break;
        }
    }
    backend.stop_all();
    // The runners drain (each within its own drain timeout); they die with the process.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.running().is_empty() && Instant::now() < deadline {
        for (name, _, _) in backend.reap() {
            let _ = runners::retire(&pool, &name).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
            backend: LocalSettings {
                binary: PathBuf::new(),
                workdir: PathBuf::new(),
                env: Vec::new(),
            },
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
