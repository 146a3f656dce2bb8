-- Live events (issue 22): the SSE streams of `GET /api/jobs/:id/events` and
-- `GET /api/runs/:id/events` are fed by one `LISTEN sluice_events` connection per scheduler.
--
-- Payload: '<job id> <run id>' (either may be empty). An event append notifies in its own
-- statement (store::events::APPEND); a run that ends notifies from the trigger below. A job
-- that ends does not notify (a trigger on every completion cost 13 % of the end-to-end
-- throughput): the scheduler that applied the completion or the cancel wakes its own
-- streams at once, and every scheduler looks up the jobs its streams follow four times a
-- second (service::events::watch_ends).

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
