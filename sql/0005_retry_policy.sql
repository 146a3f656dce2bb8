-- Retry policies: how long a failed attempt waits before the next, per job and per queue.
--
-- A policy is a JSON object `{initial_ms, max_ms, factor}` (each optional): the n-th retry
-- waits initial_ms × factor^(n-1), at most max_ms, with ±25 % jitter drawn by the scheduler.
-- A job's own policy (`jobs.retry`) wins; a job without one takes its queue's
-- (`queues.default_retry`) when it fails — so changing a queue's default reaches the jobs
-- that did not name their own — and without either the built-in one (1 s, doubling, at most
-- one hour). `max_attempts` stays its own column.

CREATE FUNCTION sluice.retry_problem(policy jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN policy IS NULL THEN NULL
        WHEN jsonb_typeof(policy) <> 'object' THEN 'retry must be an object'
        WHEN EXISTS (SELECT 1 FROM jsonb_object_keys(policy) k
                     WHERE k NOT IN ('initial_ms', 'max_ms', 'factor'))
            THEN 'retry takes initial_ms, max_ms and factor only'
        WHEN policy ? 'initial_ms' AND NOT (jsonb_typeof(policy -> 'initial_ms') = 'number'
                 AND (policy ->> 'initial_ms')::numeric BETWEEN 0 AND 86400000)
            THEN 'retry.initial_ms must be between 0 and 86400000 (one day)'
        WHEN policy ? 'max_ms' AND NOT (jsonb_typeof(policy -> 'max_ms') = 'number'
                 AND (policy ->> 'max_ms')::numeric BETWEEN 0 AND 31622400000)
            THEN 'retry.max_ms must be between 0 and 31622400000 (366 days)'
        WHEN policy ? 'factor' AND NOT (jsonb_typeof(policy -> 'factor') = 'number'
                 AND (policy ->> 'factor')::numeric BETWEEN 1 AND 100)
            THEN 'retry.factor must be between 1 and 100'
    END
$$;

-- The wait before retry number `attempt` (the attempt that failed) under `policy`, jittered
-- by `jitter` (the scheduler draws 0.75–1.25), in milliseconds. Never overflows: the exponent
-- is capped, and the result is at most max_ms × jitter.
CREATE FUNCTION sluice.retry_delay_ms(attempt integer, policy jsonb, jitter float8)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT (least(
               coalesce((policy ->> 'max_ms')::float8, 3600000),
               coalesce((policy ->> 'initial_ms')::float8, 1000)
                   * power(coalesce((policy ->> 'factor')::float8, 2),
                           least(greatest(attempt, 1) - 1, 64))
           ) * least(greatest(coalesce(jitter, 1), 0), 2))::bigint
$$;

-- A CHECK is evaluated on every UPDATE of a row, claims and completions included: the common
-- case (no policy of its own) must not call the function.
ALTER TABLE sluice.jobs ADD COLUMN retry jsonb
    CONSTRAINT jobs_retry_valid CHECK (retry IS NULL OR sluice.retry_problem(retry) IS NULL);
ALTER TABLE sluice.queues ADD COLUMN default_retry jsonb
    CONSTRAINT queues_default_retry_valid
    CHECK (default_retry IS NULL OR sluice.retry_problem(default_retry) IS NULL);

-- `sluice.enqueue` takes a policy too (a new trailing parameter; calls without it are as
-- before).
DROP FUNCTION sluice.enqueue(text, jsonb, timestamptz, integer, integer, bigint, text);
CREATE FUNCTION sluice.enqueue(
    queue           text,
    spec            jsonb,
    run_at          timestamptz DEFAULT NULL,
    priority        integer DEFAULT NULL,
    max_attempts    integer DEFAULT NULL,
    timeout_ms      bigint DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    retry           jsonb DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
    q sluice.queues%ROWTYPE;
BEGIN
    SELECT * INTO q FROM sluice.queues WHERE name = enqueue.queue;
    INSERT INTO sluice.jobs AS j
        (queue, spec, run_at, priority, max_attempts, timeout_ms, idempotency_key, retry)
    VALUES (
        enqueue.queue,
        enqueue.spec,
        coalesce(enqueue.run_at, now()),
        coalesce(enqueue.priority, q.default_priority, 0),
        coalesce(enqueue.max_attempts, q.default_max_attempts, 3),
        coalesce(enqueue.timeout_ms, q.default_timeout_ms),
        enqueue.idempotency_key,
        enqueue.retry
    )
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT j.id INTO new_id FROM sluice.jobs j WHERE j.idempotency_key = enqueue.idempotency_key;
    END IF;
    RETURN new_id;
END;
$$;
