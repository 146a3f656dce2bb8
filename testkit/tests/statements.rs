//! Every statement of the job store is parsed and planned by Postgres against the migrated
//! schema, whether or not a test happens to run it: a statement that runs only after an
//! outage or on a timeout must not carry a syntax error until that day (one did).

use sluice::store::{artifacts, jobs, runners, runs, schedules, sessions, workflows};
use sluice_testkit::TestDb;
use sqlx::{Executor, SqlSafeStr};

#[tokio::test]
async fn every_store_statement_is_valid_against_the_schema() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, statement) in jobs::statements()
        .chain(workflows::statements())
        .chain(runs::statements())
        .chain(schedules::statements())
        .chain(artifacts::statements())
        .chain(sessions::statements())
        .chain(runners::statements())
    {
        // `describe` prepares the statement: parse, name resolution and type checks, the
        // same as its first execution would do.
        match (&mut *conn).describe(statement.into_sql_str()).await {
            Ok(_) => checked += 1,
            Err(err) => failures.push(format!("{name}: {err}")),
        }
    }
    assert!(
        failures.is_empty(),
        "invalid statements:\n{}",
        failures.join("\n")
    );
    assert!(checked >= 20, "only {checked} statements were checked");
}
