-- Sharded scans join in PostgreSQL (issue 14): each shard's typed outcome is a row here; the
-- shard that records the last one, in the same transaction that counts them, hands the scan to
-- its merge. Losing Redis then loses no sharded scan.
CREATE TABLE scan_shards (
    scan_id     uuid NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    index       integer NOT NULL,
    addresses   text[] NOT NULL,
    ports       text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    released    integer NOT NULL DEFAULT 0,
    outcome     text CHECK (outcome IN ('completed', 'cancelled', 'failed')),
    result      jsonb,
    error       text,
    finished_at timestamptz,
    PRIMARY KEY (scan_id, index)
);

ALTER TABLE scans
    -- A sharded scan's plan: its addresses in order, its shard count, when it started.
    ADD COLUMN addresses     text[],
    ADD COLUMN shards_total  integer,
    ADD COLUMN shards_done   integer NOT NULL DEFAULT 0,
    -- The merge's own delivery count, for its poison guard.
    ADD COLUMN merge_attempts integer NOT NULL DEFAULT 0,
    -- Deliveries that ended in order without finishing (a retry, a requeue): the poison guard
    -- counts only the others as lost.
    ADD COLUMN released      integer NOT NULL DEFAULT 0,
    -- Past this a scan still 'running' has no live delivery left: the reaper fails it.
    ADD COLUMN reap_after    timestamptz;

-- No index on it: an index on reap_after or state would end the HOT updates of 0004 (every
-- running/completed write would add entries to all of the table's indexes); the reaper's scan
-- of the table once a minute costs less than that on every scan.
