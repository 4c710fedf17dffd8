ALTER TABLE scans ADD COLUMN cache_key bytea;

CREATE INDEX scans_cache_idx ON scans (api_key_id, cache_key, finished_at DESC)
    WHERE state = 'completed' AND cache_key IS NOT NULL;
