-- Serverless: apps deployed at run time (their spec, resolved manifest and code bundle), and secrets.
CREATE TABLE deployments (
    app_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    spec TEXT NOT NULL,
    manifest TEXT NOT NULL,
    bundle_digest TEXT NOT NULL,
    bundle_size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);
