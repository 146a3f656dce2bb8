//! An attempt's workspace: a fresh, empty directory `<workdir>/<job>-<attempt>`, mode 0700
//! and owned by the slot's user — the tool's own workspace, and nothing else of the
//! sidecar's or another slot's, is reachable for it — wiped when the attempt ends. The
//! filesystem work runs on the blocking pool, off the async worker threads.

use std::path::{Path, PathBuf};

use sluice_protocol::Task;
use sluice_sandbox::ToolUser;

/// A prepared workspace; [`Workspace::wipe`] removes it.
#[derive(Debug)]
pub struct Workspace(PathBuf);

impl Workspace {
    /// Creates the attempt's workspace under `workdir`, emptied first (a retried attempt
    /// starts clean).
    pub async fn prepare(
        workdir: &Path,
        task: &Task,
        user: Option<ToolUser>,
    ) -> std::io::Result<Workspace> {
        let path = workdir.join(format!("{}-{}", task.job_id, task.attempt));
        blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
            if let Some(user) = user {
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
            }
            Ok(Workspace(path))
        })
        .await
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` in the workspace (before the tool starts: nothing else is in it), mode
    /// 0600, owned by the slot's user.
    pub async fn write_file(
        &self,
        name: &str,
        bytes: Vec<u8>,
        user: Option<ToolUser>,
    ) -> std::io::Result<()> {
        let path = self.0.join(name);
        blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&bytes)?;
            if let Some(user) = user {
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
            }
            Ok(())
        })
        .await
    }

    /// Removes the workspace and everything the tool left in it.
    pub async fn wipe(self) {
        let path = self.0;
        let _ = blocking(move || std::fs::remove_dir_all(&path)).await;
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
