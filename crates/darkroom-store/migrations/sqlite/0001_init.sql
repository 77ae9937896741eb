CREATE TABLE boots (
    id TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scope TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX api_keys_owner ON api_keys(owner_id);

CREATE TABLE runner_tokens (
    token_hash TEXT PRIMARY KEY,
    boot_id TEXT NOT NULL,
    app_id TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    path TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    no_retry INTEGER NOT NULL DEFAULT 0,
    lease_runner TEXT,
    lease_expires_at INTEGER,
    start_deadline INTEGER,
    runner_hint TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT,
    store_io INTEGER NOT NULL DEFAULT 1,
    boot_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    result_status INTEGER,
    result_body TEXT,
    error TEXT,
    error_type TEXT,
    inference_ms INTEGER
);
CREATE INDEX jobs_queue ON jobs(app_id, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs(lease_runner) WHERE state = 'running';
CREATE INDEX jobs_owner ON jobs(owner_id, seq);
CREATE INDEX jobs_app ON jobs(app_id, seq);

CREATE TABLE job_logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX job_logs_job ON job_logs(job_id, seq);
