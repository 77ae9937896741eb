CREATE INDEX jobs_key_active ON jobs(key_id) WHERE state != 'completed';
