//! The claim stays an index scan on the partial claim index however many finished jobs the
//! table holds (the bloat that made River and Oban add reindexers).

use sluice::store::jobs;
use sluice_testkit::TestDb;

#[tokio::test]
async fn the_claim_is_an_index_scan_with_a_million_finished_jobs() {
    let db = TestDb::new().await;
    // Bulk-load history without the per-row trigger (a superuser-only switch, fine in a test).
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(
        // With triggers off (replica role), the queue's defaults are not filled in.
        "INSERT INTO sluice.jobs (spec, state, attempt, started_at, finished_at, priority,
                                  max_attempts)
         SELECT '{\"kind\":\"noop\"}', 'succeeded', 1, now(), now(), 0, 3
         FROM generate_series(1, 1000000)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("SET session_replication_role = origin")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    sqlx::query(
        "INSERT INTO sluice.jobs (spec) SELECT '{\"kind\":\"noop\"}' FROM generate_series(1, 1000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE sluice.jobs")
        .execute(&db.pool)
        .await
        .unwrap();

    let plan = jobs::explain_claim(&db.pool).await.unwrap().join("\n");
    assert!(
        plan.contains("jobs_claim_idx"),
        "the claim must use the partial index:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on jobs"),
        "no sequential scan of jobs:\n{plan}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'available'")
            .await,
        1000
    );
}
