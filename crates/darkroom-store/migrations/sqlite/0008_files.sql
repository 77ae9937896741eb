-- Files in object storage: uploads and outputs. The object's key is made from the id (objects/{id}).
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    file_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER
);
CREATE INDEX files_owner ON files(owner_id, id);
CREATE INDEX files_expiry ON files(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX files_pending ON files(created_at) WHERE state = 'pending';
