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
