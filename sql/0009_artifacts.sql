-- Workflow artifacts: a step's files, packed by its sidecar as a tar stream when the step
-- succeeds, uploaded in chunks under the attempt's lease, sealed (`step_artifacts`) before the
-- attempt completes, and unpacked by the sidecars of its dependents. Both tables belong to
-- the run: deleting a run (its retention) deletes its artifacts.
--
-- Chunks are stored as uploaded, one row each (at most 1 MiB), so neither side ever holds a
-- whole archive in memory. A set is sealed per (job, attempt); a step's artifacts are the
-- set of its latest sealed attempt (its succeeded one: a step only succeeds after sealing).

CREATE TABLE sluice.artifact_chunks (
    job_id   bigint NOT NULL,
    attempt  integer NOT NULL,
    seq      integer NOT NULL CHECK (seq >= 0),
    run_id   bigint NOT NULL REFERENCES sluice.workflow_runs (id) ON DELETE CASCADE,
    data     bytea NOT NULL,
    PRIMARY KEY (job_id, attempt, seq)
);
CREATE INDEX artifact_chunks_run_idx ON sluice.artifact_chunks (run_id);
ALTER TABLE sluice.artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE sluice.step_artifacts (
    run_id    bigint NOT NULL REFERENCES sluice.workflow_runs (id) ON DELETE CASCADE,
    step_id   text NOT NULL,
    job_id    bigint NOT NULL,
    attempt   integer NOT NULL,
    chunks    integer NOT NULL CHECK (chunks >= 0),
    bytes     bigint NOT NULL CHECK (bytes >= 0),
    sha256    text NOT NULL,
    entries   bigint NOT NULL CHECK (entries >= 0),
    skipped   jsonb NOT NULL DEFAULT '[]'::jsonb,
    sealed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX step_artifacts_step_idx ON sluice.step_artifacts (run_id, step_id, attempt DESC);

-- Finished runs by age, for their retention.
CREATE INDEX workflow_runs_finished_idx ON sluice.workflow_runs (finished_at)
    WHERE finished_at IS NOT NULL;

-- A step job's end, after `jobs_step_ended` (triggers fire in name order): chunks of its
-- attempts that were never sealed are dropped; and a step that declares artifacts but
-- succeeded without sealing them (a runner too old for artifacts, or one that lies) fails
-- its run with `artifacts_missing` instead of handing its dependents nothing.
CREATE FUNCTION sluice.jobs_step_sealed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.artifact_chunks c
    WHERE c.job_id = NEW.id
      AND NOT EXISTS (SELECT 1 FROM sluice.step_artifacts a
                      WHERE a.job_id = c.job_id AND a.attempt = c.attempt);
    IF NEW.state = 'succeeded'
       AND EXISTS (SELECT 1 FROM sluice.run_steps s
                   WHERE s.run_id = NEW.workflow_run_id AND s.step_id = NEW.step_id
                     AND s.plan ? 'artifacts')
       AND NOT EXISTS (SELECT 1 FROM sluice.step_artifacts a
                       WHERE a.job_id = NEW.id AND a.attempt = NEW.attempt)
       -- The run's last step has no dependents to starve: its run stays succeeded.
       AND EXISTS (SELECT 1 FROM sluice.workflow_runs r
                   WHERE r.id = NEW.workflow_run_id AND r.state = 'running') THEN
        UPDATE sluice.run_steps s SET state = 'failed'
        WHERE s.run_id = NEW.workflow_run_id AND s.step_id = NEW.step_id;
        PERFORM sluice.end_run(NEW.workflow_run_id, NEW.step_id, jsonb_build_object(
            'code', 'artifacts_missing',
            'message', 'step ' || NEW.step_id || ' succeeded without sealing its artifacts '
                       || '(its runner is too old for artifacts, or did not upload them)'),
            false);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_step_sealed AFTER UPDATE OF state ON sluice.jobs
    FOR EACH ROW
    WHEN (NEW.workflow_run_id IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state
          AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice.jobs_step_sealed();
