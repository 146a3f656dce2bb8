-- Agent sessions (issue 20): the conversation an agent step with `spec.session` continues.
--
-- One agent job of a session runs at a time: the scheduler hands a claimed attempt the
-- session (`holder_*`, kept after it ends as the last holder) only when the last holder is
-- neither running nor still being stopped and no older agent job of the session is ready to
-- run; otherwise the claim is undone and the job waits (see `store/sessions.rs`). The holder's new turns are kept aside (`pending_*`) and become the
-- history only when its job succeeds, in the statement that records the success (the
-- trigger below), so a failed, cancelled or reclaimed attempt never adds turns.
CREATE TABLE sluice.agent_sessions (
    name             text PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 128),
    messages         jsonb NOT NULL DEFAULT '[]'::jsonb,
    -- Agent jobs whose turns were kept.
    jobs             bigint NOT NULL DEFAULT 0,
    holder_job       bigint,
    holder_attempt   integer,
    pending_attempt  integer,
    pending_messages jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agent_sessions_holder CHECK ((holder_job IS NULL) = (holder_attempt IS NULL))
);

CREATE INDEX agent_sessions_holder_idx ON sluice.agent_sessions (holder_job)
    WHERE holder_job IS NOT NULL;

-- Agent jobs of a session that have not finished, oldest first: the FIFO check of the
-- hand-over. Partial, so other jobs are not in it; on the name's first 129 characters, so
-- that a huge `session` written with plain SQL cannot make an index row too large (names
-- are at most 128, so equality on the prefix is equality on the name).
CREATE INDEX jobs_agent_session_idx ON sluice.jobs ((left(spec ->> 'session', 129)), id)
    WHERE spec ->> 'kind' = 'agent' AND state IN ('available', 'scheduled', 'running');

-- An agent job's attempt ended (any way out of `running`): on success the turns it sent are
-- the history. The holder columns stay as the last holder: the next hand-over waits until
-- that attempt is not running and, when it was stopped (cancel, timeout), until its runner
-- confirmed the stop (`sluice.attempt_stops`), so its tool and model request are gone.
CREATE FUNCTION sluice.jobs_agent_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kept boolean := NEW.state = 'succeeded';
BEGIN
    UPDATE sluice.agent_sessions s
    SET messages = CASE WHEN kept AND s.pending_attempt = NEW.attempt
                        THEN s.pending_messages ELSE s.messages END,
        jobs = s.jobs + CASE WHEN kept AND s.pending_attempt = NEW.attempt THEN 1 ELSE 0 END,
        updated_at = now(),
        pending_attempt = NULL, pending_messages = NULL
    WHERE s.holder_job = NEW.id AND s.holder_attempt = OLD.attempt;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_agent_ended AFTER UPDATE OF state ON sluice.jobs
    FOR EACH ROW
    WHEN (OLD.state = 'running' AND NEW.state IS DISTINCT FROM 'running'
          AND NEW.spec ->> 'kind' = 'agent')
    EXECUTE FUNCTION sluice.jobs_agent_ended();
