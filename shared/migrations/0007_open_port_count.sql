-- The list of a key's scans shows how many open ports each found. Reading that from the
-- result meant loading and validating every full result of the page (up to 200 of them, each
-- as large as its open ports); a stored generated column keeps the count beside the row.
-- PostgreSQL computes it on every write of ``result``, so no writer has to know of it; adding
-- it rewrites ``scans`` once (apply it when few scans are submitted).
ALTER TABLE scans ADD COLUMN IF NOT EXISTS open_port_count integer
    GENERATED ALWAYS AS (
        jsonb_array_length(result -> 'open_ports')
        + COALESCE((result ->> 'open_ports_omitted')::integer, 0)
    ) STORED;
