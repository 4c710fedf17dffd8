-- The key that signs the dashboard's session cookies: made by the first API process that
-- needs it, then shared by every replica.
CREATE TABLE dashboard_secret (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
