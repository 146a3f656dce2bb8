-- Cron schedules that start workflow runs. Each due tick is a unique (schedule, tick_at) row
-- inserted in the same transaction as the run it starts, so any number of scheduler replicas
-- fire it exactly once; the database's clock decides what is due, and a schedule's
-- next_tick_at only moves forward, so a clock going backwards fires nothing twice.

CREATE TABLE sluice.schedules (
    name               text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    cron               text NOT NULL CHECK (length(cron) BETWEEN 1 AND 256),
    -- An IANA zone; the cron fields are read in its wall-clock time.
    timezone           text NOT NULL DEFAULT 'UTC' CHECK (length(timezone) BETWEEN 1 AND 64),
    workflow           text NOT NULL,
    input              jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- What a tick does while the schedule's last run still runs.
    overlap            text NOT NULL DEFAULT 'allow'
                       CHECK (overlap IN ('allow', 'skip', 'queue_one', 'replace')),
    -- What ticks missed while no scheduler ran do when one runs again.
    catch_up           text NOT NULL DEFAULT 'none' CHECK (catch_up IN ('none', 'latest', 'all')),
    catch_up_window_ms bigint NOT NULL DEFAULT 86400000
                       CHECK (catch_up_window_ms BETWEEN 0 AND 31622400000),
    paused             boolean NOT NULL DEFAULT false,
    next_tick_at       timestamptz NOT NULL,
    last_tick_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due_idx ON sluice.schedules (next_tick_at) WHERE NOT paused;

CREATE TABLE sluice.schedule_ticks (
    schedule text NOT NULL REFERENCES sluice.schedules (name) ON DELETE CASCADE,
    tick_at  timestamptz NOT NULL,
    -- started: a run began; skipped: overlap skip (or a second tick while one is queued);
    -- queued: waits for the running run (queue_one); replaced: the running run was cancelled
    -- and this one started.
    -- failed: the run could not start (the workflow is gone); `error` says why.
    outcome  text NOT NULL
             CHECK (outcome IN ('started', 'skipped', 'queued', 'replaced', 'failed')),
    run_id   bigint,
    error    text,
    fired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick_at)
);

CREATE INDEX schedule_ticks_queued_idx ON sluice.schedule_ticks (schedule) WHERE outcome = 'queued';
