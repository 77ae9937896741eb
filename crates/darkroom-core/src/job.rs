//! Jobs (requests) and their life cycle: queued → running → completed, with leases and attempts.

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::error::{ApiError, ErrorType};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Completed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(JobState::Queued),
            "running" => Some(JobState::Running),
            "completed" => Some(JobState::Completed),
            _ => None,
        }
    }
    /// The fal status value.
    pub fn fal_status(self) -> &'static str {
        match self {
            JobState::Queued => "IN_QUEUE",
            JobState::Running => "IN_PROGRESS",
            JobState::Completed => "COMPLETED",
        }
    }
}

/// How the client waits for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// Queue submit: durable, retried, survives gateway restarts.
    Queue,
    /// Sync run: ephemeral, the client waits on the connection.
    Sync,
    /// Streaming run: ephemeral, partial outputs go to the client as SSE events.
    Stream,
}

impl JobMode {
    pub fn as_str(self) -> &'static str {
        match self {
            JobMode::Queue => "queue",
            JobMode::Sync => "sync",
            JobMode::Stream => "stream",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queue" => Some(JobMode::Queue),
            "sync" => Some(JobMode::Sync),
            "stream" => Some(JobMode::Stream),
            _ => None,
        }
    }
    pub fn is_ephemeral(self) -> bool {
        !matches!(self, JobMode::Queue)
    }
}

/// Queue priorities: higher runs first; FIFO within a priority.
pub mod priority {
    /// `X-Fal-Queue-Priority: low`.
    pub const LOW: i64 = 0;
    /// The default for queue submits.
    pub const NORMAL: i64 = 1;
    /// Sync runs and streams, while the key has fewer than the cap of them queued.
    pub const INTERACTIVE: i64 = 2;
}

/// Parses `X-Fal-Queue-Priority`.
pub fn parse_priority(v: &str) -> Result<i64, ApiError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "normal" | "" => Ok(priority::NORMAL),
        "low" => Ok(priority::LOW),
        other => Err(ApiError::new(
            ErrorType::InvalidRequest,
            format!("X-Fal-Queue-Priority must be 'normal' or 'low', not '{}'", other.escape_default()),
        )),
    }
}

/// Parses `X-Fal-Request-Timeout` (seconds, float, > 0) into milliseconds.
pub fn parse_request_timeout(v: &str) -> Result<Millis, ApiError> {
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok((s * 1000.0).round() as Millis),
        _ => Err(ApiError::new(
            ErrorType::InvalidRequest,
            format!(
                "X-Fal-Request-Timeout must be a number of seconds between 0 and 86400, not '{}'",
                v.escape_default()
            ),
        )),
    }
}

/// Parses a boolean-ish header (`1`, `true`, `yes`).
pub fn parse_flag(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// A fingerprint of what a request asks for, to tell a replayed `Idempotency-Key` from a reused one.
pub fn input_fingerprint(app_id: &str, path: &str, input: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [app_id, path, input] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub app_id: String,
    pub path: String,
    pub owner_id: String,
    pub key_id: String,
    pub mode: JobMode,
    pub priority: i64,
    pub input: String,
    pub max_attempts: i64,
    pub no_retry: bool,
    pub start_deadline: Option<Millis>,
    pub runner_hint: Option<String>,
    pub webhook_url: Option<String>,
    /// `fal` or `standard`; None means the server's default.
    pub webhook_dialect: Option<String>,
    /// W3C trace context, passed on to the webhook receiver.
    pub traceparent: Option<String>,
    pub store_io: bool,
    pub boot_id: String,
    pub created_at: Millis,
    /// The prices in force when the request was accepted: its usage line is costed with them.
    pub prices: JobPrices,
}

/// What a request is billed by and at what prices, fixed when it is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobPrices {
    pub unit: crate::billing::BillingUnit,
    pub unit_price: f64,
    pub runner_second_price: f64,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub seq: i64,
    pub app_id: String,
    pub path: String,
    pub owner_id: String,
    pub key_id: String,
    pub mode: JobMode,
    pub priority: i64,
    pub state: JobState,
    pub input: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub no_retry: bool,
    pub lease_runner: Option<String>,
    pub lease_expires_at: Option<Millis>,
    pub start_deadline: Option<Millis>,
    pub runner_hint: Option<String>,
    pub cancel_requested: bool,
    pub webhook_url: Option<String>,
    pub webhook_dialect: Option<String>,
    pub traceparent: Option<String>,
    pub store_io: bool,
    pub boot_id: String,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub result_status: Option<i64>,
    pub result_body: Option<String>,
    pub error: Option<String>,
    pub error_type: Option<String>,
    pub inference_ms: Option<i64>,
    /// When the input, result and logs were deleted (by their owner or by retention).
    pub payload_deleted_at: Option<Millis>,
    /// How long the request waited for a runner to start (a cold start); None if a runner was ready.
    pub cold_start_ms: Option<i64>,
}

impl JobRecord {
    pub fn succeeded(&self) -> bool {
        self.state == JobState::Completed && self.error_type.is_none()
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// HTTP status of the result (200 for success, the app's or platform's code otherwise).
    pub status: u16,
    /// The JSON body served as the result.
    pub body: String,
    pub error: Option<String>,
    pub error_type: Option<String>,
    pub inference_ms: Option<i64>,
    /// Billable units the app reported (fal's `x-fal-billable-units`); None: the app's default.
    pub units: Option<f64>,
}

impl Outcome {
    pub fn success(body: String, inference_ms: Option<i64>) -> Outcome {
        Outcome { status: 200, body, error: None, error_type: None, inference_ms, units: None }
    }
    /// With the billable units the app reported.
    pub fn with_units(mut self, units: Option<f64>) -> Outcome {
        self.units = units.filter(|u| u.is_finite() && *u >= 0.0);
        self
    }
    /// A platform error (cancel, timeout, runner lost).
    pub fn platform(err: &ApiError) -> Outcome {
        Outcome {
            status: err.status,
            body: err.body().to_string(),
            error: Some(err.message.clone()),
            error_type: Some(err.error_type.as_str().to_string()),
            inference_ms: None,
            units: None,
        }
    }
    pub fn cancelled() -> Outcome {
        Outcome::platform(&ApiError::new(ErrorType::RequestCancelled, "Request was cancelled"))
    }
}

/// A log line of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub timestamp: Millis,
    /// STDOUT, STDERR, ERROR, INFO, WARN or DEBUG.
    pub level: String,
    pub message: String,
}

/// Normalises a log level to one of fal's.
pub fn normalize_level(level: &str) -> &'static str {
    match level.to_ascii_uppercase().as_str() {
        "STDOUT" => "STDOUT",
        "STDERR" => "STDERR",
        "ERROR" => "ERROR",
        "WARN" | "WARNING" => "WARN",
        "DEBUG" | "TRACE" => "DEBUG",
        _ => "INFO",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(parse_priority("low").unwrap(), priority::LOW);
        assert_eq!(parse_priority("Normal").unwrap(), priority::NORMAL);
        assert!(parse_priority("urgent").is_err());
        assert_eq!(parse_request_timeout("30.0").unwrap(), 30_000);
        assert_eq!(parse_request_timeout("2").unwrap(), 2_000);
        for bad in ["-1", "0", "abc", "NaN", "inf", "1e9"] {
            assert!(parse_request_timeout(bad).is_err(), "{bad}");
        }
        assert!(parse_flag("YES") && parse_flag("1") && !parse_flag("0"));
    }

    #[test]
    fn levels() {
        assert_eq!(normalize_level("warning"), "WARN");
        assert_eq!(normalize_level("whatever"), "INFO");
    }
}
