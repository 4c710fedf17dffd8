-- A network scan is sharded after its host discovery (issue 15 follow-up): the shards probe
-- only the live hosts, and the merge lists every address up or down from what discovery found
-- here (a JSON list of {address, up, reason, srtt, rttvar}). NULL: no discovery before the split.
ALTER TABLE scans ADD COLUMN discovery jsonb;
