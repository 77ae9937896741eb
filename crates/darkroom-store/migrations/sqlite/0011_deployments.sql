-- Serverless: apps deployed at run time (their spec, resolved manifest and code bundle), and secrets.
CREATE TABLE deployments (
    app_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    manifest TEXT NOT NULL,
    bundle_digest TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
