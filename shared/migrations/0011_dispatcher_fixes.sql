-- A schedule the dispatcher cannot handle (a time zone the database no longer knows, a row
-- that no longer validates) is parked: next_run_at NULL and the reason here. An edit clears it.
ALTER TABLE schedules ADD COLUMN parked_reason text;

-- A webhook message being sent is leased, not locked: no transaction stays open over HTTP.
ALTER TABLE webhook_messages ADD COLUMN leased_until timestamptz;
