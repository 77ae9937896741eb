//! The runner control channel: one WebSocket per runner, dialled *out* by the runner to
//! `/internal/runner/connect` with `Authorization: Bearer <runner token>`. Frames are JSON text messages.
//!
//! The gateway pushes assignments (after the claim is committed in the store), cancels and pings; the runner sends
//! hello, acks, heartbeats, logs, progress, partial outputs and completions. Every job frame carries the fencing
//! `token` of its attempt; the gateway refuses frames whose token is not the job's current one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version, checked at hello.
pub const PROTOCOL_VERSION: u32 = 1;

/// Runner → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunnerFrame {
    /// First frame: which app this runner serves and the most jobs it accepts at once (the app's
    /// `max_multiplexing` applies below that).
    Hello {
        protocol: u32,
        app_id: String,
        max_multiplexing: u32,
        /// The fleet slot of a runner the gateway started itself (`DARKROOM_RUNNER_SLOT`).
        #[serde(default)]
        slot: Option<String>,
        /// `pull`, `setup` or `ready` (the default): whether it takes work yet.
        #[serde(default)]
        state: Option<String>,
        /// Not the process's first channel (it reconnected): being ready is then no cold start.
        #[serde(default)]
        reconnect: bool,
        pid: u32,
        #[serde(default)]
        hints: Vec<String>,
        #[serde(default)]
        version: String,
    },
    /// The runner's state changed: `pull` (fetching weights), `setup` (loading), `ready`, or `draining` (finishing
    /// its jobs before it exits; it takes no new ones).
    State {
        state: String,
        #[serde(default)]
        message: Option<String>,
    },
    /// The runner accepted an assignment and is starting it.
    Ack { job_id: String, token: i64 },
    /// Keeps the runner's leases alive.
    Heartbeat { running: Vec<String> },
    /// A log line of a job.
    Log { job_id: String, token: i64, level: String, message: String, timestamp: i64 },
    /// Progress of a job, 0..1.
    Progress {
        job_id: String,
        token: i64,
        fraction: f64,
        #[serde(default)]
        message: Option<String>,
    },
    /// A partial output (streamed to `/stream` clients).
    Partial { job_id: String, token: i64, data: Value },
    /// The job finished: success (`status` 200) or failure (the app's status and body).
    Complete {
        job_id: String,
        token: i64,
        status: u16,
        body: Value,
        #[serde(default)]
        error_type: Option<String>,
        #[serde(default)]
        inference_ms: Option<i64>,
        /// Billable units of a success, as the app reported them (None: the app's default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        units: Option<f64>,
    },
    /// A frame for a realtime session's client.
    RealtimeOutput { session_id: String, binary: bool, data: String },
    /// The runner ended a realtime session (its app failed to open it, or closed it); `error` and `reason` go to
    /// the client as fal's `x-fal-error` frame.
    RealtimeClosed {
        session_id: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Gateway → runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayFrame {
    /// Reply to hello.
    Welcome { runner_id: String, heartbeat_ms: u64, lease_ms: u64 },
    /// Run this job. `token` is the fencing token of this attempt.
    Assign {
        job_id: String,
        token: i64,
        attempt: i64,
        app_id: String,
        path: String,
        mode: String,
        input: Value,
        /// Return output files as data URIs (`sync_mode`, or `X-Fal-Store-IO: 0`) instead of storing them.
        #[serde(default)]
        inline_outputs: bool,
        /// Bearer token for uploading this job's outputs (`POST /cdn/files/upload`), filed under its owner.
        #[serde(default)]
        upload_token: Option<String>,
    },
    /// Stop this job.
    Cancel { job_id: String, token: i64 },
    /// A frame from the runner was refused (stale token, unknown job).
    Refused { job_id: String, token: i64, reason: String },
    /// The gateway is going away; finish or drop work and reconnect later.
    Shutdown { reason: String },
    /// A realtime session pinned to this runner opened, for the app's endpoint `path`.
    RealtimeOpen { session_id: String, path: String },
    /// A client frame of a realtime session: a binary frame as base64 (`binary`), or a text frame as is.
    RealtimeInput { session_id: String, binary: bool, data: String },
    /// The client went away or the session ended: stop it.
    RealtimeClose { session_id: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = RunnerFrame::Complete {
            job_id: "j".into(),
            token: 3,
            status: 200,
            body: serde_json::json!({"a": 1}),
            error_type: None,
            inference_ms: Some(5),
            units: Some(2.5),
        };
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.contains("\"type\":\"complete\""));
        assert_eq!(serde_json::from_str::<RunnerFrame>(&s).unwrap(), f);
        let g: GatewayFrame = serde_json::from_str(r#"{"type":"cancel","job_id":"j","token":1}"#).unwrap();
        assert_eq!(g, GatewayFrame::Cancel { job_id: "j".into(), token: 1 });
    }
}
