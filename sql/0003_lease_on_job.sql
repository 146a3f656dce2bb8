-- The live lease moves onto the job row; an attempt's row is written once, when it ends
-- (issue 10).
--
-- Before, a claim inserted a `job_attempts` row holding the lease's expiry and every way of
-- ending the attempt updated it: two more row writes (and their index entries and WAL) per job
-- on the hot path, a third of the row work of a drain. Now the running attempt is described by
-- the job row alone (`attempt`, `lease_token`, `runner_id`, `started_at` and, as DESIGN.md has
-- it, `lease_expires_at`), and the statement that ends an attempt (completion, reclaim,
-- timeout, cancel) inserts its finished row into `job_attempts`. So `job_attempts` is the
-- history of finished attempts; the running one is read from `jobs` (the API's attempt list
-- joins both).

ALTER TABLE sluice.jobs ADD COLUMN lease_expires_at timestamptz;

-- Running jobs take their lease's expiry from their live attempt row, which then goes: its
-- attempt is recorded when it ends, like every attempt from now on.
UPDATE sluice.jobs j SET lease_expires_at = a.lease_expires_at
FROM sluice.job_attempts a
WHERE a.job_id = j.id AND a.attempt = j.attempt AND a.outcome IS NULL AND j.state = 'running';

DELETE FROM sluice.job_attempts WHERE outcome IS NULL;

-- Every running job holds a lease with an expiry (NOT VALID would skip the check of the rows
-- above, which the UPDATE just filled).
ALTER TABLE sluice.jobs DROP CONSTRAINT jobs_running_has_lease;
ALTER TABLE sluice.jobs ADD CONSTRAINT jobs_running_has_lease
    CHECK (state <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL));

DROP INDEX sluice.job_attempts_live_idx;
ALTER TABLE sluice.job_attempts DROP COLUMN lease_expires_at;
ALTER TABLE sluice.job_attempts ALTER COLUMN finished_at SET NOT NULL;
ALTER TABLE sluice.job_attempts ALTER COLUMN outcome SET NOT NULL;
-- Rows are inserted once and never updated: no room to leave for HOT updates.
ALTER TABLE sluice.job_attempts SET (fillfactor = 100);

-- Attempt rows are history now: nothing updates them. A scheduler from before this migration
-- still would (its completion, cancel, timeout and reclaim statements end the live row with an
-- UPDATE that would now match nothing and so lose the attempt's record): make those statements
-- fail whole instead, so the runner's retry reaches an upgraded replica. Stop or upgrade every
-- replica before this migration runs; the reaper of an old one fails the same way.
CREATE FUNCTION sluice.job_attempts_are_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sluice: job_attempts rows are written once, when an attempt ends (migration 0003); this scheduler predates it and must be upgraded'
        USING ERRCODE = 'object_not_in_prerequisite_state';
END;
$$;

CREATE TRIGGER job_attempts_are_history BEFORE UPDATE ON sluice.job_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION sluice.job_attempts_are_history();
