-- Live events (issue 22): the SSE streams of `GET /api/jobs/:id/events` and
-- `GET /api/runs/:id/events` are fed by one `LISTEN sluice_events` connection per scheduler.
--
-- Payload: '<job id> <run id>' (either may be empty). An event append notifies in its own
-- statement (store::events::append_if_leased); the triggers below notify when a job or a
-- run reaches a terminal state, whatever statement takes it there (a completion, a cancel,
-- a reclaim, a timeout, a run's failure cancelling its steps), so that a stream sends its
-- terminal event and ends without polling.

CREATE FUNCTION sluice.jobs_ended_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_events', NEW.id::text || ' ' || coalesce(NEW.workflow_run_id::text, ''));
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_ended_notify AFTER UPDATE OF state ON sluice.jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice.jobs_ended_notify();

CREATE FUNCTION sluice.runs_ended_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_events', ' ' || NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_ended_notify AFTER UPDATE OF state ON sluice.workflow_runs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state <> 'running')
    EXECUTE FUNCTION sluice.runs_ended_notify();

