//! Executors: one piece of an attempt's work run in the sandbox — a bash script ([`bash`]),
//! a confined tool call ([`tool`]) or an agent's tool-use loop ([`agent`], which runs each
//! of its tool calls through the other two). They share one shape: an executor takes an [`Exec`] (where and as whom to run, the
//! attempt's event sink and its stop signal) and returns [`Ended`] — finished, with an output
//! and the failure if it failed, or stopped from outside.
//!
//! - [`policy`] — what a runner allows a tool: environment, limits, timeout, network.
//! - [`output`] — bounded output: the per-attempt cap, the tails, bytes to event data.
//! - [`events`] — the attempt's event sink, in `seq` order.

pub mod agent;
pub mod bash;
pub mod events;
pub mod output;
pub mod policy;
pub mod tool;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::{Failure, Network, Task};
use sluice_sandbox::{Sandbox, ToolUser};
use tokio::sync::watch;

use crate::config::Config;
use events::Events;

/// Why a running attempt is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The lease is gone (409, a heartbeat's order, or no renewal for too long).
    LeaseLost,
    /// The scheduler cancelled the job.
    Cancelled,
    /// The scheduler's deadline for the job passed.
    TimedOut,
    /// The sidecar is shutting down and the drain deadline passed.
    Shutdown,
    /// The scheduler refused the attempt's events, or could not take them within the
    /// delivery budget: the attempt ends with that error instead of running unheard.
    StreamFailed,
}

impl StopReason {
    /// How long the tool gets between SIGTERM and SIGKILL: none when the lease is lost (the
    /// job may already be running elsewhere, and the self-fence's margin must cover the
    /// kill), the runner's grace otherwise.
    pub fn kill_grace(self, grace: Duration) -> Duration {
        match self {
            StopReason::LeaseLost => Duration::ZERO,
            _ => grace,
        }
    }

    /// Stops after which the attempt is abandoned: the scheduler has moved on, and nothing
    /// this attempt sends would be accepted.
    pub fn abandons(self) -> bool {
        matches!(
            self,
            StopReason::LeaseLost | StopReason::Cancelled | StopReason::TimedOut
        )
    }
}

/// The stop signal of one attempt, shared by whoever may stop it (the heartbeat's orders,
/// the fence, the drain, the event stream) and the executor that watches it.
#[derive(Debug, Clone)]
pub struct Stop(Arc<watch::Sender<Option<StopReason>>>);

impl Default for Stop {
    fn default() -> Stop {
        Stop(Arc::new(watch::channel(None).0))
    }
}

impl Stop {
    /// Stops the attempt for `reason`, replacing an earlier reason (the scheduler's order is
    /// the last word).
    pub fn order(&self, reason: StopReason) {
        self.0.send_replace(Some(reason));
    }

    /// Stops the attempt for `reason` unless it is being stopped already; whether it was.
    pub fn request(&self, reason: StopReason) -> bool {
        self.0.send_if_modified(|current| {
            let unset = current.is_none();
            if unset {
                *current = Some(reason);
            }
            unset
        })
    }

    /// Why the attempt is being stopped, if it is.
    pub fn reason(&self) -> Option<StopReason> {
        *self.0.borrow()
    }

    /// A receiver that sees every change — and a reason set before it was made: its first
    /// `changed()` returns at once, so an executor that starts watching late still hears a
    /// stop ordered while its attempt was being prepared.
    pub fn watch(&self) -> watch::Receiver<Option<StopReason>> {
        let mut receiver = self.0.subscribe();
        receiver.mark_changed();
        receiver
    }
}

/// Waits until `stop` carries a reason, and returns it.
pub async fn stopped(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(reason) = *stop.borrow_and_update() {
            return reason;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// What every executor gets from its attempt.
pub struct Exec<'a> {
    pub sandbox: &'a Sandbox,
    pub config: &'a Config,
    pub task: &'a Task,
    /// The attempt's workspace: the tool's working directory and `HOME`.
    pub workspace: &'a Path,
    /// The slot's user (none when the sidecar cannot switch users).
    pub user: Option<ToolUser>,
    pub network: Network,
    pub events: &'a mut Events,
    pub stop: &'a Stop,
}

/// How an executor ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// It ran to its end: the result's output, and why it failed if it did (with whether
    /// another attempt may do better).
    Finished {
        output: Value,
        failure: Option<Failure>,
        retryable: bool,
    },
    /// It was stopped from outside before it ended (`output` holds what it had so far).
    Stopped { reason: StopReason, output: Value },
}

impl Ended {
    /// A success with `output`.
    pub fn succeeded(output: Value) -> Ended {
        Ended::Finished {
            output,
            failure: None,
            retryable: true,
        }
    }

    /// A failure with `code` and `message`.
    pub fn failed(
        output: Value,
        code: sluice_protocol::FailureCode,
        message: impl Into<String>,
        retryable: bool,
    ) -> Ended {
        Ended::Finished {
            output,
            failure: Some(Failure {
                code,
                message: message.into(),
            }),
            retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_executor_that_starts_watching_late_still_hears_the_stop() {
        let stop = Stop::default();
        stop.order(StopReason::LeaseLost);
        // Made after the order, as an executor's is while its attempt is prepared.
        let mut watching = stop.watch();
        tokio::time::timeout(Duration::from_secs(1), watching.changed())
            .await
            .expect("the first changed() returns at once")
            .unwrap();
        assert_eq!(*watching.borrow(), Some(StopReason::LeaseLost));
        // The first reason wins for requests; an order replaces it.
        assert!(!stop.request(StopReason::StreamFailed));
        stop.order(StopReason::Shutdown);
        assert_eq!(stop.reason(), Some(StopReason::Shutdown));
    }
}
