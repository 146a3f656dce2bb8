-- Leaner hot-path writes (issue 10).
--
-- The foreign keys from job_attempts and job_events to jobs cost a row lock and an index
-- probe of jobs for every attempt a claim starts and every event a runner streams, although
-- both tables are only ever written from a live job row in the same statement. What the keys
-- gave besides that, deleting a job's history with the job, is now a statement trigger: one
-- DELETE per table per statement, whoever deletes (retention, or an operator by hand).

ALTER TABLE sluice.job_attempts DROP CONSTRAINT job_attempts_job_id_fkey;
ALTER TABLE sluice.job_events DROP CONSTRAINT job_events_job_id_fkey;

CREATE FUNCTION sluice.jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.job_attempts a USING old_jobs o WHERE a.job_id = o.id;
    DELETE FROM sluice.job_events e USING old_jobs o WHERE e.job_id = o.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_delete AFTER DELETE ON sluice.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION sluice.jobs_after_delete();
