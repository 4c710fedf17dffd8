CREATE TABLE scans (
    id           uuid PRIMARY KEY,
    task_id      uuid NOT NULL UNIQUE,
    target       text NOT NULL,
    ports        text NOT NULL,
    config       jsonb NOT NULL,
    priority     text NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    state        text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'completed', 'failed', 'revoked')),
    progress     smallint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    result       jsonb,
    error        text,
    attempts     integer NOT NULL DEFAULT 0
);

CREATE INDEX scans_created_at_idx ON scans (created_at DESC);
CREATE INDEX scans_state_idx ON scans (state) WHERE state IN ('queued', 'running');
