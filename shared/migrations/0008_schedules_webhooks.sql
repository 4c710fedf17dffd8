-- Recurring scans and change alerts (issue 17). PostgreSQL is the truth: dispatchers claim
-- due schedules, unpublished scans and pending webhook messages with FOR UPDATE SKIP LOCKED.

CREATE TABLE schedules (
    id                    uuid PRIMARY KEY,
    api_key_id            uuid NOT NULL REFERENCES api_keys (id),
    name                  text,
    target                text NOT NULL,
    ports                 text NOT NULL,
    config                jsonb NOT NULL,
    priority              text NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    cron                  text,
    timezone              text NOT NULL DEFAULT 'UTC',
    interval_seconds      integer CHECK (interval_seconds > 0),
    enabled               boolean NOT NULL DEFAULT true,
    misfire_policy        text NOT NULL DEFAULT 'skip' CHECK (misfire_policy IN ('skip', 'run_once')),
    misfire_grace_seconds integer NOT NULL DEFAULT 300,
    exclude               text[] NOT NULL DEFAULT '{}',
    anchor_at             timestamptz NOT NULL DEFAULT now(),
    next_run_at           timestamptz,
    last_run_at           timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (interval_seconds IS NULL))
);
CREATE INDEX schedules_owner_idx ON schedules (api_key_id, created_at DESC);
CREATE INDEX schedules_due_idx ON schedules (next_run_at) WHERE enabled;

-- A schedule's scans are ordinary scans; one run of a schedule can exist only once.
ALTER TABLE scans
    ADD COLUMN schedule_id   uuid REFERENCES schedules (id) ON DELETE SET NULL,
    ADD COLUMN scheduled_for timestamptz;
CREATE UNIQUE INDEX scans_schedule_run_idx ON scans (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;

-- Scans recorded by a dispatcher (or run-now) whose message is not confirmed by the broker yet.
CREATE TABLE scan_publish_outbox (
    scan_id    uuid PRIMARY KEY REFERENCES scans (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhooks (
    id              uuid PRIMARY KEY,
    api_key_id      uuid NOT NULL REFERENCES api_keys (id),
    url             text NOT NULL,
    events          text[] NOT NULL,
    schedule_id     uuid REFERENCES schedules (id) ON DELETE CASCADE,
    target          text,
    secret          text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_owner_idx ON webhooks (api_key_id) WHERE enabled;

-- A scan reaching a final state leaves a row here in the same transaction, when its key has
-- an enabled webhook; a dispatcher turns it into webhook messages. Workers know nothing of it.
CREATE TABLE scan_event_outbox (
    id         bigserial PRIMARY KEY,
    scan_id    uuid NOT NULL,
    state      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION scans_final_state_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('completed', 'failed') AND NEW.state IS DISTINCT FROM OLD.state
       AND EXISTS (SELECT 1 FROM webhooks WHERE api_key_id = NEW.api_key_id AND enabled) THEN
        INSERT INTO scan_event_outbox (scan_id, state) VALUES (NEW.id, NEW.state);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER scans_final_state AFTER UPDATE OF state ON scans
    FOR EACH ROW EXECUTE FUNCTION scans_final_state_outbox();

-- One message per (webhook, event); one attempt row per delivery attempt.
CREATE TABLE webhook_messages (
    id              text PRIMARY KEY,
    webhook_id      uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_type      text NOT NULL,
    scan_id         uuid,
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (webhook_id, event_type, scan_id)
);
CREATE INDEX webhook_messages_due_idx ON webhook_messages (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_messages_hook_idx ON webhook_messages (webhook_id, created_at DESC);

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    message_id   text NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX webhook_attempts_message_idx ON webhook_attempts (message_id, id);
