CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    source      text NOT NULL DEFAULT 'cli' CHECK (source IN ('cli', 'env')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

ALTER TABLE scans
    ADD COLUMN api_key_id       uuid REFERENCES api_keys (id),
    ADD COLUMN idempotency_key  text,
    ADD COLUMN request_hash     bytea,
    ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;

CREATE UNIQUE INDEX scans_idempotency_idx ON scans (api_key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX scans_owner_idx ON scans (api_key_id, created_at DESC, id DESC);
