-- The warm runner pools (issue 21): what each pool is, who runs it, and its last trouble.
--
-- A pool writes its row when it starts, when its state of health changes (a runner that
-- cannot be started or keeps dying, and its recovery) and every few seconds while it runs;
-- `GET /api/runners` shows the rows written within the last hour, so a pod that cannot be
-- created (quota, image pull) shows there as well as in the logs.
CREATE TABLE sluice.pools (
    name          text PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 63),
    backend       text NOT NULL,
    -- The replica running it (host and process).
    holder        text NOT NULL,
    min_warm      integer NOT NULL,
    max_warm      integer NOT NULL,
    last_error    text,
    last_error_at timestamptz,
    -- Until when starts are backed off after the last error.
    retry_at      timestamptz,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
