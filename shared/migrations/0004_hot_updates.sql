-- A worker writes each scan twice (running, then completed). Those writes change state,
-- started_at, finished_at, progress and result; while any index covered one of them, every
-- write added an entry to each of the table's seven indexes. With no index on an updated
-- column, and room left on each page, PostgreSQL makes them HOT updates: no index entries.
-- Like every migration it runs in one transaction: on a large table, apply it when few scans
-- are submitted, as ``scans`` is locked while the new index is built.

-- No query reads these two: listings go by owner (scans_owner_idx).
DROP INDEX IF EXISTS scans_state_idx;
DROP INDEX IF EXISTS scans_created_at_idx;

-- The result cache looks for the owner's newest completed scan of the same request; the
-- creation time orders it, as it never changes.
DROP INDEX IF EXISTS scans_cache_idx;
CREATE INDEX scans_cache_idx ON scans (api_key_id, cache_key, created_at DESC)
    WHERE cache_key IS NOT NULL;

-- Room on each page for the updated versions of its rows (applies to pages written from now).
ALTER TABLE scans SET (fillfactor = 80);
