-- Runner fleet: run-time scaling overrides per app, and how long a request waited for a cold start.
CREATE TABLE app_scaling (
    app_id TEXT PRIMARY KEY,
    patch TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
ALTER TABLE jobs ADD COLUMN cold_start_ms BIGINT;
