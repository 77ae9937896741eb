-- Usage and billing: each request's prices, fixed when it is accepted; one usage line per finished request (none
-- for 5xx), written in the transaction that completes it; per-owner budgets.
ALTER TABLE jobs ADD COLUMN bill_unit TEXT NOT NULL DEFAULT 'request';
ALTER TABLE jobs ADD COLUMN unit_price DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN runner_second_price DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE TABLE usage_lines (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    owner_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    unit TEXT NOT NULL,
    units DOUBLE PRECISION NOT NULL,
    unit_price DOUBLE PRECISION NOT NULL,
    runner_second_price DOUBLE PRECISION NOT NULL,
    runner_ms BIGINT NOT NULL,
    cold_start_ms BIGINT,
    cost_nanos BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX usage_lines_owner_time ON usage_lines (owner_id, created_at);
CREATE INDEX usage_lines_time ON usage_lines (created_at);
CREATE TABLE budgets (
    owner_id TEXT PRIMARY KEY,
    limit_nanos BIGINT NOT NULL,
    period TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
