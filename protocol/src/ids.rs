//! Identities and the fencing triple: [`JobId`], [`Attempt`], [`LeaseToken`], [`RunnerId`],
//! [`LeaseRef`], [`AttemptRef`]; the job states; and [`Secret`], the redacting wrapper both
//! sides keep tokens in.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A secret string — an API token, a runner token, the registration secret — whose `Debug`
/// and `Display` print `***`, so that a log line or a panic message cannot leak it. Shared by
/// both sides because both hold such tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh random token (256 bits from the OS generator) with a readable prefix, so that
    /// leaked tokens are easy to find with grep.
    pub fn generate(prefix: &str) -> Self {
        let a = Uuid::new_v4().simple().to_string();
        let b = Uuid::new_v4().simple().to_string();
        Secret(format!("{prefix}{a}{b}"))
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A job's id: the `bigint` primary key of `sluice.jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct JobId(pub i64);

/// The attempt number of a job; the first run is attempt 1. Part of every fencing check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Attempt(pub i32);

/// A fresh random token minted with each claim; a runner write is applied only while the
/// job's current lease carries this token, so a reclaimed attempt cannot write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct LeaseToken(pub Uuid);

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lease tokens are capabilities for one attempt; logs get only a prefix.
        let text = self.0.simple().to_string();
        write!(f, "LeaseToken({}…)", &text[..8])
    }
}

/// A runner instance's id; a new one is minted on every registration, even for a known pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct RunnerId(pub Uuid);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The fencing triple that names one attempt's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
}

/// The states of a job, mirrored by the Postgres enum `sluice.job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waits on workflow parents.
    Blocked,
    /// `run_at` is in the future (a delay or a retry back-off).
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Leased to a runner.
    Running,
    Succeeded,
    /// Attempts exhausted, or the failure was not retryable.
    Failed,
    Cancelled,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Blocked,
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name used in SQL, JSON and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Blocked => "blocked",
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses the SQL/JSON name.
    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Finished: nothing runs it again unless an operator retries it (failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt of a job, without its lease token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub job_id: JobId,
    pub attempt: Attempt,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, json!(state.as_str()));
        }
        assert!(JobState::Failed.is_terminal());
        assert!(!JobState::Running.is_terminal());
    }

    #[test]
    fn secrets_do_not_print_and_compare_exactly() {
        let s = Secret::new("CANARY-1");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert!(s.matches("CANARY-1"));
        assert!(!s.matches("CANARY-2"));
        assert!(!s.matches("CANARY-1x"));
        let a = Secret::generate("sk_");
        assert!(a.expose().starts_with("sk_"));
        assert_eq!(a.expose().len(), 3 + 64);
        assert_ne!(a, Secret::generate("sk_"));
    }
}
