-- Workflow definitions, by name and content: every version a definition ever had is kept
-- (a run pins the version it started with); the latest registration is the current one.

CREATE TABLE sluice.workflows (
    name          text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    -- SHA-256 of the canonical JSON definition, hex.
    version       text NOT NULL CHECK (version ~ '^[0-9a-f]{64}$'),
    definition    jsonb NOT NULL,
    steps         integer NOT NULL CHECK (steps BETWEEN 1 AND 10000),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The last time this version was registered (again): the newest is the current one.
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE INDEX workflows_current_idx ON sluice.workflows (name, registered_at DESC);
