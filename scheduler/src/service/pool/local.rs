//! [`LocalBackend`]: runners as child processes of the scheduler (`sluice dev`, most tests,
//! a single machine). They drain on SIGTERM and die with the scheduler.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;

use super::{Ended, RunnerBackend, StartSpec};

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

/// Runners as child processes of the scheduler.
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

    fn signal(&self, name: &str) {
        if let Some(pid) = self.children.get(name).and_then(|c| c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

impl RunnerBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn shared(&self) -> bool {
        false
    }

    async fn adopt(&mut self) -> Result<Vec<(String, std::time::Duration)>, String> {
        // Children of an earlier process died with it: nothing to adopt.
        Ok(Vec::new())
    }

    fn start(&mut self, spec: &StartSpec<'_>) -> impl Future<Output = Result<(), String>> + Send {
        let started = self.spawn(spec);
        async move { started }
    }

    async fn stop(&mut self, name: &str) {
        self.signal(name);
    }

    fn reap(&mut self) -> Vec<Ended> {
        let mut ended = Vec::new();
        self.children.retain(|name, child| match child.try_wait() {
            Ok(Some(status)) => {
                ended.push(Ended {
                    name: name.clone(),
                    how: status.to_string(),
                    clean: status.success(),
                });
                false
            }
            Ok(None) => true,
            Err(err) => {
                ended.push(Ended {
                    name: name.clone(),
                    how: err.to_string(),
                    clean: false,
                });
                false
            }
        });
        ended
    }

    fn running(&self) -> Vec<String> {
        self.children.keys().cloned().collect()
    }

    fn terminating(&mut self) -> Vec<String> {
        Vec::new()
    }

    async fn shut_down(&mut self) {
        let names = self.running();
        for name in names {
            self.signal(&name);
        }
    }

    fn release(&mut self) {}
}

impl LocalBackend {
    fn spawn(&mut self, spec: &StartSpec<'_>) -> Result<(), String> {
        let workdir = self.settings.workdir.join(spec.name);
        let mut command = tokio::process::Command::new(&self.settings.binary);
        command.env_clear();
        for (key, value) in &self.settings.env {
            command.env(key, value);
        }
        command
            .env("SLUICE_API_URL", spec.internal_url)
            .env("RUNNER_POD_NAME", spec.name)
            .env("SLUICE_RUNNER_SECRET", spec.secret)
            .env("SLUICE_RUNNER_SLOTS", spec.slots.to_string())
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
        self.children.insert(spec.name.to_string(), child);
        Ok(())
    }
}
