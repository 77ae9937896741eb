ALTER TABLE jobs ADD COLUMN payload_deleted_at INTEGER;
CREATE INDEX jobs_completed ON jobs(completed_at) WHERE state = 'completed' AND payload_deleted_at IS NULL;
