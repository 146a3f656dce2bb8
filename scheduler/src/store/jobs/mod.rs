//! The job lifecycle in SQL, one file per operation family:
//!
//! - [`insert`] — enqueue (one statement per batch, idempotency keys).
//! - [`claim`] — leasing available jobs (uncapped, and capped queues under a lock).
//! - [`complete`] — completions, alone or with a claim in one statement.
//! - [`lease`] — heartbeats: renewals, why a lease ended, confirmed stops.
//! - [`control`] — cancel and retry of one job.
//! - [`maintain`] — reclaim, outage extension, timeouts, promotion, pruning.
//! - [`read`] — a job and its attempts for the public API.
//!
//! Every statement is a `const` string, whole: a reader can copy it into `psql` (with
//! `PREPARE` for its bind parameters). Every transition is one guarded statement whose guard
//! is in its function's name: `complete_if_leased` applies only while the named attempt holds
//! the lease, `reclaim_expired` only touches `running` rows whose lease ran out, so a stale
//! runner can never write, and a finished job changes only through an operator's retry. Lease
//! maths uses `now()` of the database, never a scheduler's clock.

pub mod claim;
pub mod complete;
pub mod control;
pub mod insert;
pub mod lease;
pub mod maintain;
pub mod read;

pub use claim::*;
pub use complete::*;
pub use control::*;
pub use insert::*;
pub use lease::*;
pub use maintain::*;
pub use read::*;

use sluice_protocol::JobState;

use crate::{Error, Result};

/// Every statement of this module, by name: for the test that has Postgres parse and plan
/// each one, so a statement that runs rarely (after an outage, say) cannot hide a syntax
/// error until then.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        insert::STATEMENTS,
        claim::STATEMENTS,
        complete::STATEMENTS,
        lease::STATEMENTS,
        control::STATEMENTS,
        maintain::STATEMENTS,
        read::STATEMENTS,
    ]
    .into_iter()
    .flatten()
    .copied()
}

fn parse_state(name: &str) -> Result<JobState> {
    JobState::parse(name).ok_or_else(|| Error::Internal(format!("unknown job state {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of the CTE `name` in `statement`: from `name AS (` to its closing parenthesis.
    fn cte<'a>(statement: &'a str, name: &str) -> &'a str {
        let open = format!("{name} AS (");
        let start = statement
            .find(&open)
            .unwrap_or_else(|| panic!("no CTE {name}"));
        let mut depth = 0;
        for (i, c) in statement[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return &statement[start..start + i + 1];
                    }
                }
                _ => {}
            }
        }
        panic!("CTE {name} is not closed")
    }

    #[test]
    fn the_claims_start_attempts_alike() {
        // Written out whole in each statement; this keeps the copies from drifting apart.
        let claimed = cte(CLAIM, "claimed");
        assert_eq!(cte(CLAIM_CAPPED, "claimed"), claimed);
        assert_eq!(cte(COMPLETE_AND_CLAIM, "claimed"), claimed);
        assert_eq!(cte(COMPLETE_AND_CLAIM, "picked"), cte(CLAIM, "picked"));
    }

    #[test]
    fn every_statement_has_a_unique_name() {
        let mut names: Vec<&str> = statements().map(|(name, _)| name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}
