//! Cron schedules (issue 19): every tick starts one run however many replicas fire, a clock
//! going backwards fires nothing twice (F-22), the overlap and catch-up policies, and the
//! schedules API with its bad input.
//!
//! Most tests drive the ticks themselves with `cron::fire_due(pool, Some(at))` on a
//! scheduler whose own cron loop is off (`SLUICE_CRON_INTERVAL_MS=0`), so an hour of ticks
//! takes a second; one test runs two real replicas on the wall clock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, Utc};
use serde_json::{json, Value};
use sluice::service::cron::{self, FireReport};
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{wait_until, Api, Scheduler, TestDb, Timings};

const NO_CRON_LOOP: &[(&str, &str)] = &[("SLUICE_CRON_INTERVAL_MS", "0")];

/// A one-step workflow; with no runner its runs stay `running`, which the overlap tests use.
async fn register_workflow(api: &Api, name: &str) {
    let (status, body) = api
        .put_text(
            &api_paths::workflow(name),
            "steps:\n  - {id: only, kind: bash, script: \"true\"}\n",
        )
        .await;
    assert!(status == 201 || status == 200, "{body}");
}

async fn put_schedule(api: &Api, name: &str, body: Value) -> Value {
    let (status, schedule) = api
        .put_text(&api_paths::schedule(name), body.to_string())
        .await;
    assert!(status == 201 || status == 200, "{status}: {schedule}");
    schedule
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a timestamp: {value}"))
}

async fn fire(db: &TestDb, at: DateTime<Utc>) -> FireReport {
    cron::fire_due(&db.pool, Some(at))
        .await
        .unwrap_or_else(|e| panic!("fire_due at {at}: {e}"))
}

#[derive(Debug, Clone, PartialEq)]
struct Tick {
    at: DateTime<Utc>,
    outcome: String,
    run_id: Option<i64>,
}

async fn ticks(db: &TestDb, schedule: &str) -> Vec<Tick> {
    let rows: Vec<(DateTime<Utc>, String, Option<i64>)> = sqlx::query_as(
        "SELECT tick_at, outcome, run_id FROM sluice.schedule_ticks
         WHERE schedule = $1 ORDER BY tick_at",
    )
    .bind(schedule)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(at, outcome, run_id)| Tick {
            at,
            outcome,
            run_id,
        })
        .collect()
}

async fn run_state(api: &Api, id: i64) -> String {
    let (status, run) = api.get(&api_paths::run(id)).await;
    assert_eq!(status, 200, "{run}");
    run["state"].as_str().unwrap().to_string()
}

async fn cancel_run(api: &Api, id: i64) {
    let (status, body) = api.post(&api_paths::cancel_run(id), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

/// The first tick of a fresh schedule (from its `next_ticks`).
fn first_tick(schedule: &Value) -> DateTime<Utc> {
    time(&schedule["next_ticks"][0])
}

#[tokio::test]
async fn two_replicas_on_the_wall_clock_start_one_run_per_second_tick() {
    let db = TestDb::new().await;
    let a = Scheduler::start(&db, Timings::TEST).await;
    let _b = Scheduler::start(&db, Timings::TEST).await;
    let api = a.api();
    register_workflow(&api, "every-second").await;
    put_schedule(
        &api,
        "every-second",
        json!({"cron": "* * * * * *", "workflow": "every-second"}),
    )
    .await;
    wait_until("six ticks", Duration::from_secs(30), || async {
        let n = ticks(&db, "every-second").await.len();
        if n >= 6 {
            Ok(Some(()))
        } else {
            Err(format!("{n} ticks"))
        }
    })
    .await;
    // One snapshot: the ticks and the runs are written in the same transactions.
    let (ticks_n, started, runs, first, last): (i64, i64, i64, DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM sluice.schedule_ticks),
                    (SELECT count(DISTINCT run_id) FROM sluice.schedule_ticks
                      WHERE outcome = 'started'),
                    (SELECT count(*) FROM sluice.workflow_runs WHERE workflow = 'every-second'),
                    (SELECT min(tick_at) FROM sluice.schedule_ticks),
                    (SELECT max(tick_at) FROM sluice.schedule_ticks)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(started, ticks_n, "every tick started its own run");
    assert_eq!(runs, ticks_n, "one run per tick, none twice");
    assert_eq!(
        (last - first).num_seconds() + 1,
        ticks_n,
        "a tick every second from {first} to {last}, none missed"
    );
    let (status, schedule) = api.get(&api_paths::schedule("every-second")).await;
    assert_eq!(status, 200);
    assert!(!schedule["recent_ticks"].as_array().unwrap().is_empty());
    assert!(schedule["last_tick_at"].is_string(), "{schedule}");
}

#[tokio::test]
async fn a_hundred_per_second_schedules_over_a_simulated_minute_fire_every_tick_once() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "tick").await;
    let mut firsts = BTreeMap::new();
    for i in 0..100 {
        let name = format!("s{i:03}");
        let schedule = put_schedule(
            &api,
            &name,
            json!({"cron": "* * * * * *", "workflow": "tick"}),
        )
        .await;
        firsts.insert(name, first_tick(&schedule));
    }
    let start = *firsts.values().max().unwrap();
    let end = start + Span::seconds(60);
    // Three passes race through each simulated second (two at the same time, one behind).
    let pass = |offset: i64| {
        let pool = db.pool.clone();
        async move {
            let mut report = FireReport::default();
            let mut at = start - Span::seconds(offset);
            while at <= end {
                let r = cron::fire_due(&pool, Some(at)).await.expect("fire_due");
                report.started += r.started;
                at += Span::milliseconds(500);
            }
            report
        }
    };
    let (one, two, three) = tokio::join!(pass(0), pass(0), pass(2));
    let total = one.started + two.started + three.started;
    let mut expected = 0;
    for (name, first) in &firsts {
        let got = ticks(&db, name).await;
        let want: Vec<DateTime<Utc>> = (0..)
            .map(|s| *first + Span::seconds(s))
            .take_while(|t| *t <= end)
            .collect();
        let at: Vec<DateTime<Utc>> = got.iter().map(|t| t.at).collect();
        assert_eq!(
            at, want,
            "{name}: every second from its first tick to the end, once"
        );
        assert!(got
            .iter()
            .all(|t| t.outcome == "started" && t.run_id.is_some()));
        expected += want.len() as u64;
    }
    assert_eq!(total, expected, "the passes report each start once");
    let runs = db
        .count("SELECT count(*) FROM sluice.workflow_runs WHERE workflow = 'tick'")
        .await;
    assert_eq!(runs as u64, expected, "one run per tick");
}

#[tokio::test]
async fn a_clock_going_backwards_fires_nothing_twice() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "back").await;
    let schedule = put_schedule(
        &api,
        "back",
        json!({"cron": "* * * * * *", "workflow": "back"}),
    )
    .await;
    let t0 = first_tick(&schedule);
    assert_eq!(fire(&db, t0 + Span::seconds(9)).await.started, 10);
    // The clock steps back five seconds, then forward again over the same seconds.
    for back in [5, 9, 1] {
        let report = fire(&db, t0 + Span::seconds(9 - back)).await;
        assert_eq!(report, FireReport::default(), "{back} s back");
    }
    assert_eq!(
        fire(&db, t0 + Span::seconds(9)).await,
        FireReport::default()
    );
    assert_eq!(fire(&db, t0 + Span::seconds(10)).await.started, 1);
    let got = ticks(&db, "back").await;
    assert_eq!(got.len(), 11);
    let runs = db
        .count("SELECT count(*) FROM sluice.workflow_runs WHERE workflow = 'back'")
        .await;
    assert_eq!(runs, 11);
}

#[tokio::test]
async fn overlap_skip_queue_one_and_replace_decide_what_a_tick_does_while_a_run_runs() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "slow").await;
    let mut t0 = BTreeMap::new();
    for overlap in ["skip", "queue_one", "replace", "allow"] {
        let schedule = put_schedule(
            &api,
            overlap,
            json!({"cron": "* * * * * *", "workflow": "slow", "overlap": overlap}),
        )
        .await;
        assert_eq!(schedule["overlap"], overlap);
        t0.insert(overlap, first_tick(&schedule));
    }
    let start = *t0.values().max().unwrap();
    let second = |n: i64| start + Span::seconds(n);
    // Each schedule gets its ticks up to `start` (at least one), then three more.
    fire(&db, second(0)).await;
    for n in 1..=3 {
        fire(&db, second(n)).await;
    }
    let outcomes = |ticks: &[Tick]| -> Vec<String> {
        ticks
            .iter()
            .filter(|t| t.at >= start)
            .map(|t| t.outcome.clone())
            .collect()
    };

    // skip: the first run runs; later ticks are skipped and start nothing.
    let skip = ticks(&db, "skip").await;
    assert_eq!(skip[0].outcome, "started");
    assert!(skip[1..]
        .iter()
        .all(|t| t.outcome == "skipped" && t.run_id.is_none()));
    let skip_run = skip[0].run_id.unwrap();
    cancel_run(&api, skip_run).await;
    fire(&db, second(4)).await;
    let skip = ticks(&db, "skip").await;
    assert_eq!(
        skip.last().unwrap().outcome,
        "started",
        "runs again once the run ended"
    );

    // queue_one: one tick waits for the run, the ones after it are skipped.
    let queue = ticks(&db, "queue_one").await;
    assert_eq!(queue[0].outcome, "started");
    assert_eq!(queue[1].outcome, "queued");
    assert!(
        queue[2..].iter().all(|t| t.outcome == "skipped"),
        "{queue:?}"
    );
    assert_eq!(
        ticks(&db, "queue_one")
            .await
            .iter()
            .filter(|t| t.outcome == "queued")
            .count(),
        1
    );
    cancel_run(&api, queue[0].run_id.unwrap()).await;
    // The queued tick starts on the next pass (no new tick needed: the same instant).
    let report = fire(&db, second(4) - Span::milliseconds(1)).await;
    assert!(report.started >= 1, "{report:?}");
    let queue = ticks(&db, "queue_one").await;
    let waited = &queue[1];
    assert_eq!(waited.outcome, "started", "{queue:?}");
    assert_eq!(run_state(&api, waited.run_id.unwrap()).await, "running");

    // replace: each tick cancels the running run and starts its own.
    let replace = ticks(&db, "replace").await;
    assert_eq!(replace[0].outcome, "started");
    assert!(
        replace[1..].iter().all(|t| t.outcome == "replaced"),
        "{replace:?}"
    );
    let (last, earlier) = replace.split_last().unwrap();
    for tick in earlier {
        assert_eq!(run_state(&api, tick.run_id.unwrap()).await, "cancelled");
    }
    assert_eq!(run_state(&api, last.run_id.unwrap()).await, "running");

    // allow: every tick starts a run, side by side.
    let allow = ticks(&db, "allow").await;
    assert!(allow.len() >= 4);
    assert!(allow.iter().all(|t| t.outcome == "started"));
    for tick in &allow {
        assert_eq!(run_state(&api, tick.run_id.unwrap()).await, "running");
    }
    assert!(outcomes(&allow).len() >= 4);
}

#[tokio::test]
async fn catch_up_policies_decide_what_ticks_missed_while_down_do() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "minutely").await;
    let policies = [
        ("none", json!({})),
        ("latest", json!({"catch_up": "latest"})),
        ("all", json!({"catch_up": "all"})),
        (
            "window",
            json!({"catch_up": "all", "catch_up_window_ms": 300_000}),
        ),
    ];
    let mut first = BTreeMap::new();
    for (name, extra) in &policies {
        let mut body = json!({"cron": "* * * * *", "workflow": "minutely"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        first.insert(*name, first_tick(&put_schedule(&api, name, body).await));
    }
    // Every schedule's first tick is the same next minute; nothing fired for 10 minutes.
    let minute = *first.values().next().unwrap();
    assert!(first.values().all(|t| *t == minute));
    assert_eq!(minute, minute.duration_trunc(Span::minutes(1)).unwrap());
    let at = minute + Span::minutes(10) + Span::seconds(30);
    fire(&db, at).await;
    let fired = |ticks: Vec<Tick>| ticks.into_iter().map(|t| t.at).collect::<Vec<_>>();
    let last = minute + Span::minutes(10);
    // none: only a tick at most a minute late.
    assert_eq!(fired(ticks(&db, "none").await), vec![last]);
    // latest: the one latest tick.
    assert_eq!(fired(ticks(&db, "latest").await), vec![last]);
    // all: every missed tick (11, one per minute).
    let all: Vec<_> = (0..=10).map(|m| minute + Span::minutes(m)).collect();
    assert_eq!(fired(ticks(&db, "all").await), all);
    // all within five minutes.
    let window: Vec<_> = (6..=10).map(|m| minute + Span::minutes(m)).collect();
    assert_eq!(fired(ticks(&db, "window").await), window);
    // Each schedule goes on from the next minute after `at`, whatever it caught up.
    for name in first.keys() {
        let (status, schedule) = api.get(&api_paths::schedule(name)).await;
        assert_eq!(status, 200);
        assert_eq!(first_tick(&schedule), last + Span::minutes(1), "{name}");
        assert_eq!(time(&schedule["last_tick_at"]), last, "{name}");
    }
}

#[tokio::test]
async fn the_schedules_api_creates_lists_pauses_resumes_and_deletes() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "nightly").await;
    let body = json!({
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "workflow": "nightly",
        "input": {"env": "prod"},
        "overlap": "skip",
    });
    let (status, created) = api
        .put_text(&api_paths::schedule("nightly"), body.to_string())
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["timezone"], "Europe/Berlin");
    assert_eq!(created["input"], json!({"env": "prod"}));
    assert_eq!(created["catch_up"], "none");
    let next: Vec<DateTime<Utc>> = created["next_ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(time)
        .collect();
    assert_eq!(next.len(), 5);
    assert!(next.windows(2).all(|w| w[0] < w[1]));
    for tick in &next {
        let local = tick.with_timezone(&chrono_tz::Europe::Berlin);
        assert_eq!(local.format("%H:%M:%S").to_string(), "02:30:00", "{tick}");
    }
    let (status, replaced) = api
        .put_text(&api_paths::schedule("nightly"), body.to_string())
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["created_at"], created["created_at"]);

    let (status, list) = api.get(api_paths::SCHEDULES).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);

    // A fired tick shows in recent_ticks with its run.
    fire(&db, next[0]).await;
    let (_, got) = api.get(&api_paths::schedule("nightly")).await;
    let recent = got["recent_ticks"].as_array().unwrap();
    assert_eq!(recent.len(), 1, "{got}");
    assert_eq!(recent[0]["outcome"], "started");
    assert_eq!(time(&recent[0]["tick_at"]), next[0]);
    let run_id = recent[0]["run_id"].as_i64().unwrap();
    let (_, run) = api.get(&api_paths::run(run_id)).await;
    assert_eq!(run["input"], json!({"env": "prod"}), "{run}");

    // Paused: no next ticks, and nothing fires.
    let (status, paused) = api
        .post(&api_paths::pause_schedule("nightly"), &json!({}))
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["next_ticks"], json!([]));
    assert_eq!(fire(&db, next[3]).await, FireReport::default());
    let (status, resumed) = api
        .post(&api_paths::resume_schedule("nightly"), &json!({}))
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["next_ticks"].as_array().unwrap().len(), 5);

    let (status, _) = api.delete(&api_paths::schedule("nightly")).await;
    assert_eq!(status, 204);
    let (status, body) = api.get(&api_paths::schedule("nightly")).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = api.delete(&api_paths::schedule("nightly")).await;
    assert_eq!(status, 404);
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.schedule_ticks").await,
        0,
        "a deleted schedule's ticks go with it"
    );
    // The run it started stays.
    assert_eq!(api.get(&api_paths::run(run_id)).await.0, 200);
}

#[tokio::test]
async fn bad_schedules_get_422_with_the_field_and_store_nothing() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, NO_CRON_LOOP).await;
    let api = scheduler.api();
    register_workflow(&api, "w").await;
    let huge = "*".repeat(1 << 20);
    let cases = [
        (json!({"cron": "61 * * * *", "workflow": "w"}), "cron"),
        (json!({"cron": "* * *", "workflow": "w"}), "cron"),
        (json!({"cron": "0 0 30 2 *", "workflow": "w"}), "cron"),
        (json!({"cron": "* * * * *\u{0}", "workflow": "w"}), "cron"),
        (json!({"cron": huge, "workflow": "w"}), "cron"),
        (
            json!({"cron": "* * * * *", "workflow": "w", "timezone": "Mars/Olympus"}),
            "timezone",
        ),
        (
            json!({"cron": "* * * * *", "workflow": "w", "timezone": "UTC\u{0}"}),
            "timezone",
        ),
        (json!({"cron": "* * * * *", "workflow": "nope"}), "workflow"),
        (
            json!({"cron": "* * * * *", "workflow": "w\u{0}"}),
            "workflow",
        ),
        (
            json!({"cron": "* * * * *", "workflow": "w", "overlap": "sometimes"}),
            "overlap",
        ),
        (
            json!({"cron": "* * * * *", "workflow": "w", "catch_up": "most"}),
            "catch_up",
        ),
        (
            json!({"cron": "* * * * *", "workflow": "w", "catch_up": "all",
                   "catch_up_window_ms": 9_000_000_000_000_000u64}),
            "catch_up_window_ms",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = api
            .put_text(&api_paths::schedule("bad"), body.to_string())
            .await;
        let text = answer.to_string();
        assert!(
            status == 422 || status == 400 || status == 413,
            "{field}: {status} {}",
            &text[..text.len().min(300)]
        );
        if status == 422 {
            assert!(
                text.contains(field),
                "{field}: {}",
                &text[..text.len().min(300)]
            );
        }
    }
    for body in [
        json!({"cron": "* * * * *", "workflow": "w", "catch_up_window_ms": -1}),
        json!({"cron": "* * * * *", "workflow": "w", "catch_up_window_ms": 1e30}),
        json!({"cron": 5, "workflow": "w"}),
        json!({"workflow": "w"}),
        json!({"cron": "* * * * *", "workflow": "w", "input": {"k": "v\u{0}"}}),
    ] {
        let (status, answer) = api
            .put_text(&api_paths::schedule("bad"), body.to_string())
            .await;
        assert!(status == 400 || status == 422, "{body}: {status} {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    for name in ["bad\u{0}name", &"n".repeat(200), "-lead"] {
        let path = format!("{}/{}", api_paths::SCHEDULES, name.replace('\u{0}', "%00"));
        let body = json!({"cron": "* * * * *", "workflow": "w"}).to_string();
        let (status, answer) = api.put_text(&path, body).await;
        assert!(
            status == 400 || status == 422,
            "{name:?}: {status} {answer}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.schedules").await, 0);
    let (status, _) = api
        .post(&api_paths::pause_schedule("ghost"), &json!({}))
        .await;
    assert_eq!(status, 404);
}
