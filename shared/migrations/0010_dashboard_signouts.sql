-- Dashboard sessions ended by signing out, until the cookie would have expired anyway: a copy
-- of the cookie taken before sign-out no longer opens a page.
CREATE TABLE dashboard_signouts (
    sid        text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_signouts_expires_at ON dashboard_signouts (expires_at);
