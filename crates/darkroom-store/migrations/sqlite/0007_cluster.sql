ALTER TABLE boots ADD COLUMN url TEXT;
ALTER TABLE boots ADD COLUMN heartbeat_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE boots ADD COLUMN reaped_at INTEGER;
ALTER TABLE jobs ADD COLUMN lease_boot TEXT;
CREATE INDEX jobs_lease_boot ON jobs(lease_boot) WHERE state = 'running';
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
