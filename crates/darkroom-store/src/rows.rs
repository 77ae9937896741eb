//! Row decoding shared by the SQLite and PostgreSQL stores (the same column names on both; each store's row type
//! decodes its own column types).

/// A `JobRecord` from a row holding `JOB_COLUMNS`.
macro_rules! job_from_row {
    ($r:expr) => {{
        let r = $r;
        let mode: String = r.try_get("mode")?;
        let state: String = r.try_get("state")?;
        Ok::<_, $crate::StoreError>(darkroom_core::job::JobRecord {
            id: r.try_get("id")?,
            seq: r.try_get("seq")?,
            app_id: r.try_get("app_id")?,
            path: r.try_get("path")?,
            owner_id: r.try_get("owner_id")?,
            key_id: r.try_get("key_id")?,
            mode: darkroom_core::job::JobMode::parse(&mode)
                .ok_or_else(|| $crate::StoreError::Corrupt(format!("mode {mode}")))?,
            priority: r.try_get("priority")?,
            state: darkroom_core::job::JobState::parse(&state)
                .ok_or_else(|| $crate::StoreError::Corrupt(format!("state {state}")))?,
            input: r.try_get("input")?,
            attempts: r.try_get("attempts")?,
            max_attempts: r.try_get("max_attempts")?,
            no_retry: r.try_get("no_retry")?,
            lease_runner: r.try_get("lease_runner")?,
            lease_expires_at: r.try_get("lease_expires_at")?,
            start_deadline: r.try_get("start_deadline")?,
            runner_hint: r.try_get("runner_hint")?,
            cancel_requested: r.try_get("cancel_requested")?,
            webhook_url: r.try_get("webhook_url")?,
            webhook_dialect: r.try_get("webhook_dialect")?,
            traceparent: r.try_get("traceparent")?,
            store_io: r.try_get("store_io")?,
            boot_id: r.try_get("boot_id")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            completed_at: r.try_get("completed_at")?,
            result_status: r.try_get("result_status")?,
            result_body: r.try_get("result_body")?,
            error: r.try_get("error")?,
            error_type: r.try_get("error_type")?,
            inference_ms: r.try_get("inference_ms")?,
            payload_deleted_at: r.try_get("payload_deleted_at")?,
            cold_start_ms: r.try_get("cold_start_ms")?,
        })
    }};
}

macro_rules! key_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::KeyRecord {
            key_id: r.try_get("key_id")?,
            owner_id: r.try_get("owner_id")?,
            secret_hash: r.try_get("secret_hash")?,
            scope: r.try_get("scope")?,
            name: r.try_get("name")?,
            created_at: r.try_get("created_at")?,
            revoked_at: r.try_get("revoked_at")?,
            webhook_dialect: r.try_get("webhook_dialect")?,
        })
    }};
}

macro_rules! delivery_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::WebhookDelivery {
            id: r.try_get("id")?,
            job_id: r.try_get("job_id")?,
            owner_id: r.try_get("owner_id")?,
            url: r.try_get("url")?,
            body: r.try_get("body")?,
            dialect: r.try_get("dialect")?,
            state: r.try_get("state")?,
            attempts: r.try_get("attempts")?,
            round_start: r.try_get("round_start")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            last_status: r.try_get("last_status")?,
            last_error: r.try_get("last_error")?,
            traceparent: r.try_get("traceparent")?,
            created_at: r.try_get("created_at")?,
            delivered_at: r.try_get("delivered_at")?,
        })
    }};
}

macro_rules! token_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::RunnerTokenRecord {
            token_hash: r.try_get("token_hash")?,
            boot_id: r.try_get("boot_id")?,
            app_id: r.try_get("app_id")?,
            created_at: r.try_get("created_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }};
}

macro_rules! attempt_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::WebhookAttempt {
            attempt: r.try_get("attempt")?,
            started_at: r.try_get("started_at")?,
            duration_ms: r.try_get("duration_ms")?,
            status: r.try_get("status")?,
            error: r.try_get("error")?,
        })
    }};
}

macro_rules! signing_key_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::SigningKeyRecord {
            kid: r.try_get("kid")?,
            secret: r.try_get("secret")?,
            created_at: r.try_get("created_at")?,
            retired_at: r.try_get("retired_at")?,
        })
    }};
}

macro_rules! boot_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::BootRecord {
            id: r.try_get("id")?,
            url: r.try_get("url")?,
            started_at: r.try_get("started_at")?,
            heartbeat_at: r.try_get("heartbeat_at")?,
            reaped_at: r.try_get("reaped_at")?,
        })
    }};
}

macro_rules! log_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>(darkroom_core::job::LogEntry {
            timestamp: r.try_get("ts")?,
            level: r.try_get("level")?,
            message: r.try_get("message")?,
        })
    }};
}

macro_rules! depth_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::AppDepth {
            app_id: r.try_get("app_id")?,
            queued: r.try_get("queued")?,
            running: r.try_get("running")?,
            oldest_queued_at: r.try_get("oldest_queued_at")?,
        })
    }};
}

macro_rules! file_from_row {
    ($r:expr) => {{
        let r = $r;
        Ok::<_, $crate::StoreError>($crate::FileRecord {
            id: r.try_get("id")?,
            owner_id: r.try_get("owner_id")?,
            file_name: r.try_get("file_name")?,
            content_type: r.try_get("content_type")?,
            size: r.try_get("size")?,
            state: r.try_get("state")?,
            public: r.try_get("public")?,
            job_id: r.try_get("job_id")?,
            created_at: r.try_get("created_at")?,
            completed_at: r.try_get("completed_at")?,
            expires_at: r.try_get("expires_at")?,
        })
    }};
}
