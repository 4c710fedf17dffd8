-- A sharded scan's merge: the task id of the one merge message that may run it (a second merge
-- message, published by a repeated shard write, finds the row claimed and does nothing), and
-- its deliveries that ended in order (retries, requeues, a stopping worker), so the poison
-- guard counts only lost ones: merge_attempts - 1 - merge_released.
ALTER TABLE scans
    ADD COLUMN merge_task text,
    ADD COLUMN merge_released integer NOT NULL DEFAULT 0;
