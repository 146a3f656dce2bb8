-- sluice core schema: queues, jobs, attempts, events, runners.
--
-- Applications enqueue with a plain INSERT into sluice.jobs (every column but spec has a
-- default) or with sluice.enqueue(...). A trigger validates the spec's kind and NOTIFYs the
-- schedulers once per statement. All lease maths uses the database clock (now()).

CREATE SCHEMA IF NOT EXISTS sluice;

CREATE TYPE sluice.job_state AS ENUM (
    'blocked', 'scheduled', 'available', 'running', 'succeeded', 'failed', 'cancelled'
);

CREATE TABLE sluice.queues (
    name                 text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    paused               boolean NOT NULL DEFAULT false,
    max_running          integer CHECK (max_running IS NULL OR max_running > 0),
    default_priority     integer NOT NULL DEFAULT 0,
    default_max_attempts integer NOT NULL DEFAULT 3 CHECK (default_max_attempts > 0),
    default_timeout_ms   bigint CHECK (default_timeout_ms IS NULL OR default_timeout_ms > 0),
    retention            interval NOT NULL DEFAULT interval '7 days',
    created_at           timestamptz NOT NULL DEFAULT now()
);

INSERT INTO sluice.queues (name) VALUES ('default');

CREATE TABLE sluice.runners (
    id            uuid PRIMARY KEY,
    pod_name      text NOT NULL,
    token_hash    bytea NOT NULL UNIQUE,
    labels        jsonb NOT NULL DEFAULT '{}',
    slots         integer NOT NULL CHECK (slots > 0),
    version       text NOT NULL DEFAULT '',
    state         text NOT NULL DEFAULT 'idle'
                  CHECK (state IN ('starting', 'idle', 'busy', 'draining', 'gone')),
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX runners_pod_name_idx ON sluice.runners (pod_name) WHERE state <> 'gone';

CREATE TABLE sluice.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The name is checked once per new queue (sluice.queues' CHECK, via the insert
    -- trigger), not with a regex per job row.
    queue            text NOT NULL DEFAULT 'default',
    spec             jsonb NOT NULL,
    state            sluice.job_state NOT NULL DEFAULT 'available',
    priority         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    timeout_ms       bigint CHECK (timeout_ms IS NULL OR timeout_ms > 0),
    -- The current attempt's lease token; its expiry lives in job_attempts (renewed by
    -- heartbeats there, so heartbeats never rewrite the wide, hot job rows).
    lease_token      uuid,
    runner_id        uuid,
    idempotency_key  text CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 255),
    result           jsonb,
    error            jsonb,
    workflow_run_id  bigint,
    step_id          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT jobs_running_has_lease CHECK (state <> 'running' OR lease_token IS NOT NULL)
);

-- The claim: available jobs in (priority, run_at, id) order. Partial, so finished rows (the
-- vast majority of a busy table) are not in it and the claim stays an index scan.
CREATE INDEX jobs_claim_idx ON sluice.jobs (priority, run_at, id) WHERE state = 'available';
-- Server-side deadlines: running jobs by start.
CREATE INDEX jobs_running_idx ON sluice.jobs (started_at) WHERE state = 'running';
-- Promotion of delayed jobs and retry back-offs.
CREATE INDEX jobs_scheduled_idx ON sluice.jobs (run_at) WHERE state = 'scheduled';
-- Retention pruning of finished jobs.
CREATE INDEX jobs_finished_idx ON sluice.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
-- Idempotency keys are unique among the jobs still stored.
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON sluice.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One row per attempt. The row whose outcome IS NULL is the live lease of a running job:
-- every transition that ends an attempt sets its outcome in the same statement.
CREATE TABLE sluice.job_attempts (
    job_id           bigint NOT NULL REFERENCES sluice.jobs (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    runner_id        uuid,
    lease_token      uuid NOT NULL,
    lease_expires_at timestamptz NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    outcome          text CHECK (outcome IN ('succeeded', 'failed', 'lease_expired',
                                              'cancelled', 'timed_out')),
    error            jsonb,
    final_seq        bigint,
    PRIMARY KEY (job_id, attempt)
) WITH (fillfactor = 70);

-- The live leases (one per running job). lease_expires_at is deliberately in no index, so a
-- heartbeat's renewal is a HOT update (fillfactor leaves the room for it); the reaper scans
-- this small partial index and filters on expiry.
CREATE INDEX job_attempts_live_idx ON sluice.job_attempts (job_id) WHERE outcome IS NULL;

CREATE TABLE sluice.job_events (
    position bigint GENERATED ALWAYS AS IDENTITY,
    job_id   bigint NOT NULL REFERENCES sluice.jobs (id) ON DELETE CASCADE,
    attempt  integer NOT NULL,
    seq      bigint NOT NULL CHECK (seq > 0),
    kind     text NOT NULL,
    data     jsonb NOT NULL DEFAULT '{}',
    at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, seq)
);

CREATE INDEX job_events_position_idx ON sluice.job_events (job_id, position);

-- The claim's queue filter (paused and capped queues are skipped), as a function the planner
-- cannot see into: it then estimates a default selectivity and keeps its ordered scan of the
-- claim index, instead of trusting an estimate made from a column with one distinct value
-- (every job in 'default'), which made it sort the whole backlog.
CREATE FUNCTION sluice.queue_open(queue text, closed text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN NOT (queue = ANY (closed));
END;
$$;

-- Validation of the minimum every enqueue path must meet, so that a plain INSERT cannot
-- create a job no runner understands. The full spec is validated again by the runner.
CREATE FUNCTION sluice.jobs_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(NEW.spec) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'sluice: spec must be a JSON object'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (NEW.spec ? 'kind') OR jsonb_typeof(NEW.spec -> 'kind') <> 'string' THEN
        RAISE EXCEPTION 'sluice: spec has no "kind"; expected one of bash, tool, agent, noop'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (NEW.spec ->> 'kind' = ANY (ARRAY['bash', 'tool', 'agent', 'noop'])) THEN
        RAISE EXCEPTION 'sluice: unknown spec kind "%"; expected one of bash, tool, agent, noop',
            left(NEW.spec ->> 'kind', 64)
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.spec ->> 'kind' = 'bash' AND jsonb_typeof(NEW.spec -> 'script') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'sluice: a bash spec needs a string "script"'
            USING ERRCODE = 'check_violation';
    END IF;
    -- A job inserted to run later waits as 'scheduled' until the scheduler promotes it.
    IF NEW.state = 'available' AND NEW.run_at > now() THEN
        NEW.state := 'scheduled';
    END IF;
    RETURN NEW;
END;
$$;

-- The function runs only for rows that need it (an invalid spec, to raise its message; a
-- future run_at, to make the job 'scheduled'): the WHEN clause is evaluated by the executor
-- without a PL/pgSQL call, so valid jobs due now cost no trigger invocation at all.
CREATE TRIGGER jobs_before_insert BEFORE INSERT ON sluice.jobs
    FOR EACH ROW
    WHEN (NOT coalesce(
              jsonb_typeof(NEW.spec) = 'object'
              AND jsonb_typeof(NEW.spec -> 'kind') = 'string'
              AND NEW.spec ->> 'kind' IN ('bash', 'tool', 'agent', 'noop')
              AND (NEW.spec ->> 'kind' <> 'bash' OR jsonb_typeof(NEW.spec -> 'script') = 'string'),
              false)
          OR (NEW.state = 'available' AND NEW.run_at > now()))
    EXECUTE FUNCTION sluice.jobs_before_insert();

-- Once per statement: create unknown queues and wake the schedulers. A bulk INSERT of 1,000
-- rows sends one notification per queue, not 1,000.
CREATE FUNCTION sluice.jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    woke text;
BEGIN
    -- One pass over the new rows: create unknown queues, and wake the schedulers once if
    -- anything is claimable now (scheduled jobs are announced when they are promoted).
    WITH inserted AS (
        SELECT queue, bool_or(state = 'available') AS ready FROM new_jobs GROUP BY queue
    ), created AS (
        INSERT INTO sluice.queues (name)
        SELECT queue FROM inserted i
        WHERE NOT EXISTS (SELECT 1 FROM sluice.queues q WHERE q.name = i.queue)
        ON CONFLICT DO NOTHING
    )
    SELECT pg_notify('sluice_jobs', '') INTO woke FROM inserted WHERE ready LIMIT 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_insert AFTER INSERT ON sluice.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION sluice.jobs_after_insert();

-- The richer SQL enqueue. Returns the job id; with an idempotency key already stored it
-- returns that job's id and inserts nothing.
CREATE FUNCTION sluice.enqueue(
    queue           text,
    spec            jsonb,
    run_at          timestamptz DEFAULT NULL,
    priority        integer DEFAULT NULL,
    max_attempts    integer DEFAULT NULL,
    timeout_ms      bigint DEFAULT NULL,
    idempotency_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
    q sluice.queues%ROWTYPE;
BEGIN
    SELECT * INTO q FROM sluice.queues WHERE name = enqueue.queue;
    INSERT INTO sluice.jobs AS j (queue, spec, run_at, priority, max_attempts, timeout_ms, idempotency_key)
    VALUES (
        enqueue.queue,
        enqueue.spec,
        coalesce(enqueue.run_at, now()),
        coalesce(enqueue.priority, q.default_priority, 0),
        coalesce(enqueue.max_attempts, q.default_max_attempts, 3),
        coalesce(enqueue.timeout_ms, q.default_timeout_ms),
        enqueue.idempotency_key
    )
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT j.id INTO new_id FROM sluice.jobs j WHERE j.idempotency_key = enqueue.idempotency_key;
    END IF;
    RETURN new_id;
END;
$$;
