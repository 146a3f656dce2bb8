-- Workflow runs, driven by the database: a run inserts a row per step, starts the steps
-- without parents as jobs, and every step job's end — applied by whatever statement ends it
-- (a completion, a reclaim, a timeout, a cancel) — advances the run in the same transaction,
-- under the same lease fence: a step's success releases the children whose parents are all
-- done (their `if` evaluated, their `for_each` fanned out), a failure fails the run, cancels
-- what can no longer run and starts the failure step.
--
-- A registered version carries its `plan`, compiled by the scheduler from the definition:
-- {"steps": [{"id", "position", "parents": [...], "children": [...], "reads": [...],
--             "job": {"spec", "queue"?, "timeout_ms"?, "max_attempts"?, "retry"?},
--             "condition"?: {"path": [...], "op": "truthy|falsy|eq|ne", "value"?},
--             "for_each"?: [...path], "artifacts"?: [...]}],
--  "on_failure"?: {same, without parents}}
-- Paths are text arrays into a step's context: {"input", "run": {"id", "workflow"},
-- "steps": {"<id>": {"output"}}, "item"?, "index"?, "failure"?}. A step's context holds the
-- outputs of the steps it `reads` (its parents, and the ancestors its templates, `if` and
-- `for_each` name), so it stays as small as the step's view of the graph. It is stored once
-- per step (`run_steps.context`); a job of a `for_each` step carries only its `item` and
-- `index` (`jobs.context`), merged in when the job is claimed.

ALTER TABLE sluice.workflows ADD COLUMN plan jsonb;

CREATE TYPE sluice.run_state AS ENUM ('running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE sluice.workflow_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow    text NOT NULL,
    version     text NOT NULL,
    state       sluice.run_state NOT NULL DEFAULT 'running',
    input       jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Steps of the graph not yet succeeded or skipped (the failure step is not counted).
    steps_left  integer NOT NULL CHECK (steps_left >= 0),
    -- Why it failed: {"step", "error"}.
    error       jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    FOREIGN KEY (workflow, version) REFERENCES sluice.workflows (name, version)
);

CREATE INDEX workflow_runs_workflow_idx ON sluice.workflow_runs (workflow, id DESC);
CREATE INDEX workflow_runs_state_idx ON sluice.workflow_runs (state, id DESC);

CREATE TABLE sluice.run_steps (
    run_id       bigint NOT NULL REFERENCES sluice.workflow_runs (id) ON DELETE CASCADE,
    step_id      text NOT NULL,
    -- Its place in the definition; -1 for the failure step.
    position     integer NOT NULL,
    parents_left integer NOT NULL CHECK (parents_left >= 0),
    state        text NOT NULL DEFAULT 'waiting' CHECK (state IN
                     ('waiting', 'running', 'succeeded', 'skipped', 'failed', 'cancelled')),
    plan         jsonb NOT NULL,
    -- Jobs started for it (a for_each step: one per element), and how many are not done.
    items        integer,
    items_left   integer,
    output       jsonb,
    -- What its job(s) see (see above), from the moment it is released.
    context      jsonb,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, step_id)
);

ALTER TABLE sluice.jobs ADD COLUMN step_index integer, ADD COLUMN context jsonb;
CREATE INDEX jobs_workflow_run_idx ON sluice.jobs (workflow_run_id, step_id)
    WHERE workflow_run_id IS NOT NULL;

-- `if` truthiness: null, false, 0, "", [] and {} are false (a missing path reads as null).
CREATE FUNCTION sluice.json_truthy(value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT NOT (value IS NULL OR value IN ('null', 'false', '0', '""', '[]', '{}'))
$$;

CREATE FUNCTION sluice.condition_holds(condition jsonb, context jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE condition ->> 'op'
        WHEN 'truthy' THEN sluice.json_truthy(read)
        WHEN 'falsy' THEN NOT sluice.json_truthy(read)
        WHEN 'eq' THEN coalesce(read, 'null') = condition -> 'value'
        WHEN 'ne' THEN coalesce(read, 'null') <> condition -> 'value'
    END
    FROM (SELECT context #> ARRAY(SELECT jsonb_array_elements_text(condition -> 'path'))
          AS read) r
$$;

-- What a step's job sees: the run's input, and the outputs of the finished steps in `reads`.
CREATE FUNCTION sluice.run_context(run bigint, reads jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'input', r.input,
        'run', jsonb_build_object('id', r.id, 'workflow', r.workflow),
        'steps', coalesce((
            SELECT jsonb_object_agg(s.step_id, jsonb_build_object('output', s.output))
            FROM sluice.run_steps s
            WHERE s.run_id = r.id
              AND s.step_id IN (SELECT jsonb_array_elements_text(coalesce(reads, '[]')))
              AND s.state IN ('succeeded', 'skipped')), '{}'::jsonb))
    FROM sluice.workflow_runs r WHERE r.id = run
$$;

-- Most jobs one for_each step may start.
CREATE FUNCTION sluice.max_for_each() RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 10000';

-- Counts `step` done for each of its children; returns the children it made ready.
CREATE FUNCTION sluice.children_ready(run bigint, step text) RETURNS text[]
LANGUAGE sql AS $$
    WITH children AS (
        SELECT jsonb_array_elements_text(plan -> 'children') AS id
        FROM sluice.run_steps WHERE run_id = run AND step_id = step
    ), counted AS (
        UPDATE sluice.run_steps s SET parents_left = s.parents_left - 1
        FROM children c
        WHERE s.run_id = run AND s.step_id = c.id
        RETURNING s.step_id, s.parents_left, s.position, s.state
    )
    SELECT coalesce(array_agg(step_id ORDER BY position), '{}')
    FROM counted WHERE parents_left = 0 AND state = 'waiting'
$$;

-- Starts `step`'s job(s) with `context` (a for_each step: one per element of its list).
-- Returns how many (0: an empty list, the step is done at once); NULL when its list is not a
-- list, -1 when it is longer than sluice.max_for_each().
CREATE FUNCTION sluice.start_step(run bigint, step text, context jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    plan jsonb;
    list jsonb;
    total integer;
BEGIN
    SELECT s.plan INTO plan FROM sluice.run_steps s
    WHERE s.run_id = run AND s.step_id = step FOR UPDATE;
    IF plan ? 'for_each' THEN
        list := context #> ARRAY(SELECT jsonb_array_elements_text(plan -> 'for_each'));
        IF list IS NULL OR jsonb_typeof(list) <> 'array' THEN
            RETURN NULL;
        END IF;
        IF jsonb_array_length(list) > sluice.max_for_each() THEN
            RETURN -1;
        END IF;
    ELSE
        list := jsonb_build_array(NULL);
    END IF;
    total := jsonb_array_length(list);
    INSERT INTO sluice.jobs
        (queue, spec, max_attempts, timeout_ms, retry, workflow_run_id, step_id, step_index,
         context)
    SELECT coalesce(plan #>> '{job,queue}', 'default'),
           plan #> '{job,spec}',
           (plan #>> '{job,max_attempts}')::integer,
           (plan #>> '{job,timeout_ms}')::bigint,
           plan #> '{job,retry}',
           run, step, e.ordinality - 1,
           CASE WHEN plan ? 'for_each'
                THEN jsonb_build_object('item', e.value, 'index', e.ordinality - 1) END
    FROM jsonb_array_elements(list) WITH ORDINALITY AS e;
    UPDATE sluice.run_steps
    SET state = CASE WHEN total = 0 THEN 'succeeded' ELSE 'running' END,
        items = total, items_left = total, started_at = now(), context = start_step.context,
        output = CASE WHEN total = 0 THEN '[]'::jsonb END,
        finished_at = CASE WHEN total = 0 THEN now() END
    WHERE run_id = run AND step_id = step;
    RETURN total;
END;
$$;

-- Fails (or, with `cancelled`, cancels) a running run: waiting steps are cancelled, the
-- run's unfinished jobs too (a running one as a cancel does: its attempt recorded, its stop
-- kept for the retry fence), and a failed run starts its failure step.
CREATE FUNCTION sluice.end_run(run bigint, step text, problem jsonb, cancelled boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    context jsonb;
    failure_step text;
BEGIN
    UPDATE sluice.workflow_runs
    SET state = CASE WHEN cancelled THEN 'cancelled' ELSE 'failed' END::sluice.run_state,
        error = CASE WHEN step IS NULL THEN problem
                     ELSE jsonb_build_object('step', step, 'error', problem) END,
        finished_at = now()
    WHERE id = run AND state = 'running';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE sluice.run_steps SET state = 'cancelled', finished_at = now()
    WHERE run_id = run AND state = 'waiting' AND position >= 0;
    WITH target AS (
        SELECT id, attempt, state, runner_id, lease_token, started_at, lease_expires_at
        FROM sluice.jobs
        WHERE workflow_run_id = run AND state IN ('blocked', 'scheduled', 'available', 'running')
        FOR UPDATE
    ), ended AS (
        UPDATE sluice.jobs j
        SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
            error = jsonb_build_object(
                'code', CASE WHEN cancelled THEN 'cancelled' ELSE 'run_failed' END,
                'message', CASE WHEN cancelled THEN 'the workflow run was cancelled'
                                ELSE 'the workflow run failed at step ' || step END)
        FROM target t WHERE j.id = t.id
        RETURNING j.id
    ), recorded AS (
        INSERT INTO sluice.job_attempts
            (job_id, attempt, runner_id, lease_token, started_at, finished_at, outcome)
        SELECT t.id, t.attempt, t.runner_id, t.lease_token, t.started_at, now(), 'cancelled'
        FROM target t JOIN ended e ON e.id = t.id
        WHERE t.state = 'running'
    )
    INSERT INTO sluice.attempt_stops (job_id, attempt, runner_id, stop_by)
    SELECT t.id, t.attempt, t.runner_id, t.lease_expires_at
    FROM target t JOIN ended e ON e.id = t.id
    WHERE t.state = 'running'
    ON CONFLICT DO NOTHING;
    IF NOT cancelled AND EXISTS (SELECT 1 FROM sluice.run_steps
                                 WHERE run_id = run AND position = -1 AND state = 'waiting') THEN
        SELECT s.step_id, sluice.run_context(run, s.plan -> 'reads') || jsonb_build_object(
                   'failure', jsonb_build_object('step', step, 'error', problem))
        INTO failure_step, context
        FROM sluice.run_steps s WHERE s.run_id = run AND s.position = -1;
        PERFORM sluice.start_step(run, failure_step, context);
    END IF;
END;
$$;

-- Releases what became ready: `done` just succeeded (NULL: the run starts, and the steps
-- without parents are ready). A worklist, not recursion: a chain of skipped steps of any
-- length is one loop.
CREATE FUNCTION sluice.advance_run(run bigint, done text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    ready text[];
    ready_step text;
    plan jsonb;
    context jsonb;
    started integer;
BEGIN
    IF done IS NULL THEN
        ready := ARRAY(SELECT s.step_id FROM sluice.run_steps s
                       WHERE s.run_id = run AND s.parents_left = 0 AND s.state = 'waiting'
                         AND s.position >= 0
                       ORDER BY s.position);
    ELSE
        ready := sluice.children_ready(run, done);
    END IF;
    WHILE cardinality(ready) > 0 LOOP
        ready_step := ready[1];
        ready := ready[2:];
        SELECT s.plan INTO plan FROM sluice.run_steps s
        WHERE s.run_id = run AND s.step_id = ready_step;
        context := sluice.run_context(run, plan -> 'reads');
        IF plan ? 'condition' AND NOT sluice.condition_holds(plan -> 'condition', context) THEN
            UPDATE sluice.run_steps s
            SET state = 'skipped', output = NULL, started_at = now(), finished_at = now()
            WHERE s.run_id = run AND s.step_id = ready_step;
            started := 0;
        ELSE
            started := sluice.start_step(run, ready_step, context);
            IF started IS NULL OR started < 0 THEN
                UPDATE sluice.run_steps s SET state = 'failed', started_at = now(),
                                              finished_at = now()
                WHERE s.run_id = run AND s.step_id = ready_step;
                PERFORM sluice.end_run(run, ready_step, jsonb_build_object(
                    'code', 'template_error',
                    'message', 'for_each of step ' || ready_step || ' reads '
                               || array_to_string(ARRAY(SELECT jsonb_array_elements_text(
                                      plan -> 'for_each')), '.')
                               || CASE WHEN started IS NULL THEN ', which is not a list'
                                       ELSE ', a list longer than ' || sluice.max_for_each()
                                       END), false);
                RETURN;
            END IF;
        END IF;
        IF started = 0 THEN
            -- Skipped, or an empty list: done at once, and its children may be ready.
            UPDATE sluice.workflow_runs SET steps_left = steps_left - 1 WHERE id = run;
            ready := ready || sluice.children_ready(run, ready_step);
        END IF;
    END LOOP;
    UPDATE sluice.workflow_runs SET state = 'succeeded', finished_at = now()
    WHERE id = run AND state = 'running' AND steps_left = 0;
END;
$$;

-- A step job ended (row trigger, only for jobs of runs, only on a change to a final state).
CREATE FUNCTION sluice.jobs_step_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    run_state sluice.run_state;
    left_items integer;
    step_position integer;
BEGIN
    -- One advancement of a run at a time: concurrent ends of its steps queue here, so the
    -- last one sees the others' work.
    SELECT state INTO run_state FROM sluice.workflow_runs
    WHERE id = NEW.workflow_run_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NEW.state = 'succeeded' THEN
        UPDATE sluice.run_steps s SET items_left = s.items_left - 1
        WHERE s.run_id = NEW.workflow_run_id AND s.step_id = NEW.step_id AND s.state = 'running'
        RETURNING s.items_left, s.position INTO left_items, step_position;
        IF left_items IS NULL OR left_items > 0 THEN
            RETURN NULL;
        END IF;
        UPDATE sluice.run_steps s
        SET state = 'succeeded', finished_at = now(),
            output = CASE WHEN s.plan ? 'for_each'
                THEN (SELECT jsonb_agg(j.result ORDER BY j.step_index) FROM sluice.jobs j
                      WHERE j.workflow_run_id = NEW.workflow_run_id AND j.step_id = NEW.step_id)
                ELSE NEW.result END
        WHERE s.run_id = NEW.workflow_run_id AND s.step_id = NEW.step_id;
        IF run_state = 'running' AND step_position >= 0 THEN
            UPDATE sluice.workflow_runs SET steps_left = steps_left - 1
            WHERE id = NEW.workflow_run_id;
            PERFORM sluice.advance_run(NEW.workflow_run_id, NEW.step_id);
        END IF;
    ELSE
        UPDATE sluice.run_steps s
        SET state = CASE WHEN NEW.state = 'failed' THEN 'failed' ELSE 'cancelled' END,
            finished_at = now()
        WHERE s.run_id = NEW.workflow_run_id AND s.step_id = NEW.step_id AND s.state = 'running';
        IF run_state = 'running' THEN
            PERFORM sluice.end_run(NEW.workflow_run_id, NEW.step_id,
                coalesce(NEW.error, jsonb_build_object('code', NEW.state::text)), false);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_step_ended AFTER UPDATE OF state ON sluice.jobs
    FOR EACH ROW
    WHEN (NEW.workflow_run_id IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state
          AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice.jobs_step_ended();

-- Starts a run of workflow `name` (its current version, or `version`) with `input`, in the
-- caller's transaction: `SELECT sluice.run_workflow('etl', '{"day": "2026-11-30"}')`.
CREATE FUNCTION sluice.run_workflow(name text, input jsonb DEFAULT '{}'::jsonb,
                                    version text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    w sluice.workflows%ROWTYPE;
    run bigint;
BEGIN
    SELECT * INTO w FROM sluice.workflows x
    WHERE x.name = run_workflow.name
      AND (run_workflow.version IS NULL OR x.version = run_workflow.version)
    ORDER BY x.registered_at DESC, x.created_at DESC
    LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sluice: no workflow %', name USING ERRCODE = 'no_data_found';
    END IF;
    IF w.plan IS NULL THEN
        RAISE EXCEPTION 'sluice: workflow % was registered before runs existed; register it again',
            name USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    INSERT INTO sluice.workflow_runs (workflow, version, input, steps_left)
    VALUES (w.name, w.version, coalesce(input, '{}'::jsonb),
            jsonb_array_length(w.plan -> 'steps'))
    RETURNING id INTO run;
    INSERT INTO sluice.run_steps (run_id, step_id, position, parents_left, plan)
    SELECT run, s ->> 'id', (s ->> 'position')::integer, jsonb_array_length(s -> 'parents'), s
    FROM jsonb_array_elements(w.plan -> 'steps') s;
    IF jsonb_typeof(w.plan -> 'on_failure') = 'object' THEN
        INSERT INTO sluice.run_steps (run_id, step_id, position, parents_left, plan)
        VALUES (run, w.plan #>> '{on_failure,id}', -1, 0, w.plan -> 'on_failure');
    END IF;
    PERFORM sluice.advance_run(run, NULL);
    RETURN run;
END;
$$;

-- Cancels a running run: its waiting steps, its queued and running jobs (no failure step).
-- Answers the run's state now (NULL: no such run).
CREATE FUNCTION sluice.cancel_run(run bigint) RETURNS sluice.run_state
LANGUAGE plpgsql AS $$
DECLARE
    now_state sluice.run_state;
BEGIN
    SELECT state INTO now_state FROM sluice.workflow_runs WHERE id = run FOR UPDATE;
    IF now_state = 'running' THEN
        PERFORM sluice.end_run(run, NULL, jsonb_build_object(
            'code', 'cancelled', 'message', 'cancelled through the API'), true);
        now_state := 'cancelled';
    END IF;
    RETURN now_state;
END;
$$;
