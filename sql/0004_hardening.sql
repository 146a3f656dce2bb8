-- Hardening after an adversarial review (issue 17): a stopped attempt fences its retry, replays
-- are compared whole, and every input has a range checked where it enters.

-- Attempts that were told to stop (cancelled, or past their timeout) while running, until their
-- runner has confirmed that the tool is gone, or until the attempt's lease would have run out
-- (by then the runner has fenced itself, or is dead). A retry of the job waits for it, so two
-- attempts of one job never run at once: the runner hears the order with its next heartbeat
-- (that heartbeat listed the attempt: `heard_seq` keeps its sequence number), kills the tool,
-- and a later heartbeat (a higher sequence number) no longer lists the attempt, which confirms
-- the stop and releases a retry waiting for it.
CREATE TABLE sluice.attempt_stops (
    job_id    bigint NOT NULL,
    attempt   integer NOT NULL,
    runner_id uuid NOT NULL,
    -- No retry starts before this unless the runner confirms the stop first: the stopped
    -- attempt's lease expiry, pushed on by every heartbeat that still lists it (its tool may
    -- still be dying) and by the first maintenance pass after a database outage.
    stop_by   timestamptz NOT NULL,
    heard_seq bigint,
    PRIMARY KEY (job_id, attempt)
);

CREATE INDEX attempt_stops_runner_idx ON sluice.attempt_stops (runner_id);

-- A completion's body, hashed (SHA-256 of its canonical JSON), so that a replay is recognised
-- as the same completion (200) or a different one for the same attempt (409).
ALTER TABLE sluice.job_attempts ADD COLUMN completion_hash bytea;

-- Deleting jobs deletes their pending stops as well.
CREATE OR REPLACE FUNCTION sluice.jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.job_attempts a USING old_jobs o WHERE a.job_id = o.id;
    DELETE FROM sluice.job_events e USING old_jobs o WHERE e.job_id = o.id;
    DELETE FROM sluice.attempt_stops s USING old_jobs o WHERE s.job_id = o.id;
    RETURN NULL;
END;
$$;

-- Ranges of the values no statement ever changes after the insert. max_attempts and run_at's
-- upper bound are held by the insert trigger, since a retry may raise the one and a back-off
-- moves the other. Rows written before this migration are brought into range first (a check
-- is enforced on every later UPDATE too, so one out-of-range row would make every statement
-- that touches it fail): a timeout beyond 30 days becomes 30 days, a priority or a queue
-- setting is clamped to its range, a run_at before 1970 becomes 1970.
UPDATE sluice.jobs SET priority = greatest(-32768, least(32767, priority))
WHERE priority NOT BETWEEN -32768 AND 32767;
UPDATE sluice.jobs SET timeout_ms = 2592000000 WHERE timeout_ms > 2592000000;
UPDATE sluice.jobs SET run_at = '1970-01-01 00:00:00+00' WHERE run_at < '1970-01-01 00:00:00+00';
UPDATE sluice.queues
SET default_priority = greatest(-32768, least(32767, default_priority)),
    default_max_attempts = least(1000, default_max_attempts),
    default_timeout_ms = least(2592000000, default_timeout_ms),
    max_running = least(1000000, max_running),
    retention = greatest(interval '0', least(interval '100 years', retention))
WHERE default_priority NOT BETWEEN -32768 AND 32767
   OR default_max_attempts > 1000
   OR default_timeout_ms > 2592000000
   OR max_running > 1000000
   OR retention NOT BETWEEN interval '0' AND interval '100 years';

ALTER TABLE sluice.jobs ADD CONSTRAINT jobs_priority_range
    CHECK (priority BETWEEN -32768 AND 32767);
ALTER TABLE sluice.jobs ADD CONSTRAINT jobs_timeout_ms_range
    CHECK (timeout_ms BETWEEN 1 AND 2592000000);
ALTER TABLE sluice.jobs ADD CONSTRAINT jobs_run_at_range
    CHECK (run_at >= '1970-01-01 00:00:00+00');

ALTER TABLE sluice.queues ADD CONSTRAINT queues_default_priority_range
    CHECK (default_priority BETWEEN -32768 AND 32767);
ALTER TABLE sluice.queues ADD CONSTRAINT queues_default_max_attempts_range
    CHECK (default_max_attempts BETWEEN 1 AND 1000);
ALTER TABLE sluice.queues ADD CONSTRAINT queues_default_timeout_ms_range
    CHECK (default_timeout_ms BETWEEN 1 AND 2592000000);
ALTER TABLE sluice.queues ADD CONSTRAINT queues_max_running_range
    CHECK (max_running <= 1000000);
ALTER TABLE sluice.queues ADD CONSTRAINT queues_retention_range
    CHECK (retention BETWEEN interval '0' AND interval '100 years');

-- A plain INSERT that leaves priority or max_attempts out takes the queue's defaults, as the API
-- and sluice.enqueue do: the columns default to NULL and the insert trigger fills them.
ALTER TABLE sluice.jobs ALTER COLUMN priority DROP DEFAULT;
ALTER TABLE sluice.jobs ALTER COLUMN max_attempts DROP DEFAULT;

-- What is wrong with a spec, in words a user can act on, or NULL. The same rules as the API's
-- (sluice_protocol::parse_spec and its bounds), for specs inserted with plain SQL.
CREATE FUNCTION sluice.spec_problem(spec jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    kind        text;
    entry_name  text;
    entry_value jsonb;
    bytes       bigint := 0;
    entries     integer := 0;
BEGIN
    IF jsonb_typeof(spec) IS DISTINCT FROM 'object' THEN
        RETURN 'spec must be a JSON object';
    END IF;
    IF jsonb_typeof(spec -> 'kind') IS DISTINCT FROM 'string' THEN
        RETURN 'spec has no "kind"; expected one of bash, tool, agent, noop';
    END IF;
    kind := spec ->> 'kind';
    IF kind NOT IN ('bash', 'tool', 'agent', 'noop') THEN
        RETURN format('unknown spec kind "%s"; expected one of bash, tool, agent, noop',
                      left(kind, 64));
    END IF;
    IF pg_column_size(spec) > 524288 THEN
        RETURN format('spec is %s bytes; at most 524288 are allowed', pg_column_size(spec));
    END IF;
    IF spec ? 'network' AND coalesce(spec ->> 'network', '') NOT IN ('full', 'none') THEN
        RETURN 'spec.network must be "full" or "none"';
    END IF;
    IF kind = 'bash' THEN
        IF jsonb_typeof(spec -> 'script') IS DISTINCT FROM 'string' THEN
            RETURN 'a bash spec needs a string "script"';
        END IF;
        IF spec ? 'timeout_ms' AND jsonb_typeof(spec -> 'timeout_ms') <> 'null' AND NOT (
            jsonb_typeof(spec -> 'timeout_ms') = 'number'
            AND (spec ->> 'timeout_ms')::numeric = trunc((spec ->> 'timeout_ms')::numeric)
            AND (spec ->> 'timeout_ms')::numeric BETWEEN 1 AND 2592000000)
        THEN
            RETURN 'spec.timeout_ms must be an integer between 1 and 2592000000';
        END IF;
        IF spec ? 'env' AND jsonb_typeof(spec -> 'env') <> 'null' THEN
            IF jsonb_typeof(spec -> 'env') <> 'object' THEN
                RETURN 'spec.env must be an object of strings';
            END IF;
            FOR entry_name, entry_value IN SELECT * FROM jsonb_each(spec -> 'env') LOOP
                entries := entries + 1;
                IF jsonb_typeof(entry_value) <> 'string' THEN
                    RETURN format('spec.env.%s must be a string', left(entry_name, 64));
                END IF;
                IF entry_name = '' OR octet_length(entry_name) > 255 OR position('=' IN entry_name) > 0 THEN
                    RETURN format('spec.env name "%s" must be 1-255 bytes without "="', left(entry_name, 64));
                END IF;
                bytes := bytes + octet_length(entry_name) + octet_length(entry_value #>> '{}') + 2;
            END LOOP;
            IF entries > 1000 THEN
                RETURN format('env has %s entries; at most 1000 are allowed', entries);
            END IF;
            IF bytes > 262144 THEN
                RETURN format('env holds %s bytes; at most 262144 are allowed', bytes);
            END IF;
        END IF;
        IF spec ? 'limits' AND jsonb_typeof(spec -> 'limits') <> 'null' THEN
            IF jsonb_typeof(spec -> 'limits') <> 'object' THEN
                RETURN 'spec.limits must be an object';
            END IF;
            FOR entry_name, entry_value IN SELECT * FROM jsonb_each(spec -> 'limits') LOOP
                IF entry_name NOT IN ('cpu_seconds', 'memory_bytes', 'address_space_bytes',
                                      'open_files', 'processes', 'file_size_bytes') THEN
                    RETURN format('spec.limits has an unknown field "%s"', left(entry_name, 64));
                END IF;
                IF jsonb_typeof(entry_value) <> 'null' AND NOT (
                    jsonb_typeof(entry_value) = 'number'
                    AND (entry_value #>> '{}')::numeric = trunc((entry_value #>> '{}')::numeric)
                    AND (entry_value #>> '{}')::numeric BETWEEN 1 AND 9007199254740992)
                THEN
                    RETURN format('spec.limits.%s must be an integer between 1 and 9007199254740992',
                                  entry_name);
                END IF;
            END LOOP;
        END IF;
    ELSIF kind = 'tool' THEN
        IF coalesce(spec ->> 'tool', '') NOT IN ('bash', 'read_file', 'write_file', 'grep',
                                                 'web_fetch') THEN
            RETURN 'spec.tool must be one of bash, read_file, write_file, grep, web_fetch';
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION sluice.jobs_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text;
    q sluice.queues%ROWTYPE;
BEGIN
    -- The full check only for specs that are not plainly valid (the same test as the
    -- trigger's WHEN): a plain INSERT of a simple spec pays for the queue lookup alone.
    IF NOT coalesce(
           jsonb_typeof(NEW.spec) = 'object'
           AND jsonb_typeof(NEW.spec -> 'kind') = 'string'
           AND NEW.spec ->> 'kind' IN ('bash', 'noop', 'agent')
           AND (NEW.spec ->> 'kind' <> 'bash' OR jsonb_typeof(NEW.spec -> 'script') = 'string'),
           false)
       OR NEW.spec ?| ARRAY['timeout_ms', 'env', 'limits', 'network']
       OR pg_column_size(NEW.spec) > 524288
    THEN
        problem := sluice.spec_problem(NEW.spec);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'sluice: %', problem USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF NEW.priority IS NULL OR NEW.max_attempts IS NULL THEN
        -- A plain INSERT: every option it left out comes from the queue (a queue this
        -- statement creates has the table's defaults).
        SELECT * INTO q FROM sluice.queues WHERE name = NEW.queue;
        NEW.priority := coalesce(NEW.priority, q.default_priority, 0);
        NEW.max_attempts := coalesce(NEW.max_attempts, q.default_max_attempts, 3);
        NEW.timeout_ms := coalesce(NEW.timeout_ms, q.default_timeout_ms);
    END IF;
    IF NEW.max_attempts NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'sluice: max_attempts must be between 1 and 1000, got %', NEW.max_attempts
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.run_at > now() + interval '366 days' THEN
        RAISE EXCEPTION 'sluice: run_at must be at most 366 days ahead'
            USING ERRCODE = 'check_violation';
    END IF;
    -- A job inserted to run later waits as 'scheduled' until the scheduler promotes it.
    IF NEW.state = 'available' AND NEW.run_at > now() THEN
        NEW.state := 'scheduled';
    END IF;
    RETURN NEW;
END;
$$;

-- The function runs only for rows that need it: a plain INSERT relying on the queue's
-- defaults, a spec with fields to check or one that is not plainly valid, a value out of
-- range, a future run_at. An API insert of a plain spec due now costs no PL/pgSQL call.
DROP TRIGGER jobs_before_insert ON sluice.jobs;
CREATE TRIGGER jobs_before_insert BEFORE INSERT ON sluice.jobs
    FOR EACH ROW
    WHEN (NEW.priority IS NULL OR NEW.max_attempts IS NULL
          OR NEW.max_attempts > 1000
          OR NOT coalesce(
              jsonb_typeof(NEW.spec) = 'object'
              AND jsonb_typeof(NEW.spec -> 'kind') = 'string'
              AND NEW.spec ->> 'kind' IN ('bash', 'noop', 'agent')
              AND (NEW.spec ->> 'kind' <> 'bash' OR jsonb_typeof(NEW.spec -> 'script') = 'string'),
              false)
          OR NEW.spec ?| ARRAY['timeout_ms', 'env', 'limits', 'network']
          OR pg_column_size(NEW.spec) > 524288
          OR NEW.run_at > now())
    EXECUTE FUNCTION sluice.jobs_before_insert();
