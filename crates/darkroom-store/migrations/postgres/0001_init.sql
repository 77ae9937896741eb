-- Darkroom on PostgreSQL: the same tables as the SQLite store (times are Unix milliseconds).
CREATE TABLE boots (
    id TEXT PRIMARY KEY,
    url TEXT,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL DEFAULT 0,
    reaped_at BIGINT
);

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scope TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    webhook_dialect TEXT
);
CREATE INDEX api_keys_owner ON api_keys(owner_id);

CREATE TABLE runner_tokens (
    token_hash TEXT PRIMARY KEY,
    boot_id TEXT NOT NULL,
    app_id TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX runner_tokens_boot ON runner_tokens(boot_id) WHERE revoked_at IS NULL;

CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    path TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    priority BIGINT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    no_retry BOOLEAN NOT NULL DEFAULT FALSE,
    lease_runner TEXT,
    lease_boot TEXT,
    lease_expires_at BIGINT,
    start_deadline BIGINT,
    runner_hint TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    webhook_url TEXT,
    webhook_dialect TEXT,
    traceparent TEXT,
    store_io BOOLEAN NOT NULL DEFAULT TRUE,
    boot_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    completed_at BIGINT,
    result_status BIGINT,
    result_body TEXT,
    error TEXT,
    error_type TEXT,
    inference_ms BIGINT,
    payload_deleted_at BIGINT
);
CREATE INDEX jobs_queue ON jobs(app_id, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs(lease_runner) WHERE state = 'running';
CREATE INDEX jobs_lease_expiry ON jobs(lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_lease_boot ON jobs(lease_boot) WHERE state = 'running';
CREATE INDEX jobs_open_boot ON jobs(boot_id) WHERE state != 'completed';
CREATE INDEX jobs_deadline ON jobs(start_deadline) WHERE state = 'queued' AND start_deadline IS NOT NULL;
CREATE INDEX jobs_owner ON jobs(owner_id, seq);
CREATE INDEX jobs_app ON jobs(app_id, seq);
CREATE INDEX jobs_completed ON jobs(completed_at) WHERE state = 'completed' AND payload_deleted_at IS NULL;
CREATE INDEX jobs_key_active ON jobs(key_id) WHERE state != 'completed';

CREATE TABLE job_logs (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    ts BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX job_logs_job ON job_logs(job_id, seq);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    dialect TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    round_start BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    lease_until BIGINT,
    last_status BIGINT,
    last_error TEXT,
    traceparent TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX webhook_due ON webhook_deliveries(next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_job ON webhook_deliveries(job_id);
CREATE INDEX webhook_owner ON webhook_deliveries(owner_id, created_at);

CREATE TABLE webhook_attempts (
    seq BIGSERIAL PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status BIGINT,
    error TEXT
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts(delivery_id, seq);

CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

CREATE TABLE idempotency_keys (
    owner_id TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    input_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (owner_id, key)
);
