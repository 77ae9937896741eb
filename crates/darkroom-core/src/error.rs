//! The error catalog: every error a client can see has a stable snake_case `error_type`.

use serde_json::{Value, json};

macro_rules! catalog {
    ($( $(#[doc = $doc:literal])* $variant:ident = ($status:literal, $name:literal), )*) => {
        /// Stable error types, sent as `error_type` in bodies and `X-Fal-Error-Type` in headers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorType { $( $(#[doc = $doc])* $variant, )* }

        impl ErrorType {
            /// Every error type, in catalog order.
            pub const ALL: &'static [ErrorType] = &[$(ErrorType::$variant,)*];
            /// The stable wire name.
            pub fn as_str(self) -> &'static str { match self { $(ErrorType::$variant => $name,)* } }
            /// The HTTP status this error is answered with.
            pub fn status(self) -> u16 { match self { $(ErrorType::$variant => $status,)* } }
            /// What it means, for the generated error catalog.
            pub fn description(self) -> &'static str {
                match self { $(ErrorType::$variant => concat!($($doc, " "),*).trim_ascii(),)* }
            }
            /// Looks a wire name up.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($name => Some(ErrorType::$variant),)* _ => None }
            }
        }
    };
}

catalog! {
    /// The input failed validation; `detail` lists each failing field (FastAPI shape).
    ValidationError = (422, "validation_error"),
    /// The request is malformed: a bad header value, id or query parameter.
    InvalidRequest = (400, "invalid_request"),
    /// No credentials, or credentials that are malformed, unknown or revoked.
    Unauthorized = (401, "unauthorized"),
    /// The key is valid but its scope does not allow this operation.
    Forbidden = (403, "forbidden"),
    /// No app is registered under this id.
    AppNotFound = (404, "app_not_found"),
    /// The app exists but has no endpoint at this path.
    EndpointNotFound = (404, "endpoint_not_found"),
    /// No request with this id is visible to the caller.
    RequestNotFound = (404, "request_not_found"),
    /// No route matches this method and path.
    NotFound = (404, "not_found"),
    /// The route exists but not for this method.
    MethodNotAllowed = (405, "method_not_allowed"),
    /// The body is larger than the server accepts.
    PayloadTooLarge = (413, "payload_too_large"),
    /// The file does not exist, was deleted, or expired.
    FileNotFound = (404, "file_not_found"),
    /// The file URL's signature does not match (tampered, or signed by another server).
    FileUrlInvalid = (403, "file_url_invalid"),
    /// The file URL (or upload URL) is past its expiry: ask for a new one.
    FileUrlExpired = (403, "file_url_expired"),
    /// The file is larger than the server's `--max-file-size`.
    FileTooLarge = (413, "file_too_large"),
    /// The `Range` header asks for bytes the file does not have.
    RangeNotSatisfiable = (416, "range_not_satisfiable"),
    /// A multipart upload's parts are missing or do not match the parts listed at completion.
    UploadIncomplete = (400, "upload_incomplete"),
    /// The object store failed or could not be reached.
    StorageUnavailable = (503, "storage_unavailable"),
    /// The result was asked for before the request completed.
    RequestNotCompleted = (400, "request_not_completed"),
    /// The request's input, result and logs were deleted (by its owner, or by retention).
    RequestPayloadDeleted = (410, "request_payload_deleted"),
    /// The request was cancelled by its owner or because its client went away.
    RequestCancelled = (499, "request_cancelled"),
    /// The request did not start before its `X-Fal-Request-Timeout` deadline, or ran longer than its app's
    /// `request_timeout`.
    RequestTimeout = (504, "request_timeout"),
    /// The runner serving the request was lost and the retry limit was reached (or retries were disabled).
    RunnerDisconnected = (503, "runner_disconnected"),
    /// The gateway restarted while this synchronous or streaming request was open; such requests are never retried.
    GatewayRestarted = (503, "gateway_restarted"),
    /// The app failed the request; the body is the app's own.
    AppError = (500, "app_error"),
    /// The app's runner could not get ready (its setup failed); queued requests fail with this rather than wait.
    AppSetupFailed = (503, "app_setup_failed"),
    /// The app's model weights could not be had from any of their sources; the detail names each failure.
    ModelWeightsUnavailable = (503, "model_weights_unavailable"),
    /// The app's model weights are not cached and the model store is offline; the detail names the
    /// `darkroom models pull` command that fetches them.
    ModelWeightsOffline = (503, "model_weights_offline"),
    /// The app's model weights do not match their manifest's sha256 or size.
    ModelWeightsCorrupt = (503, "model_weights_corrupt"),
    /// The runner token is unknown, revoked, or from a previous server boot.
    RunnerTokenInvalid = (401, "runner_token_invalid"),
    /// The proxy target URL is missing or not a fal or Darkroom URL.
    ProxyTargetInvalid = (400, "proxy_target_invalid"),
    /// The app's queue is at its limit (`fal_max_queue_length` or the server's); retry after `Retry-After`.
    QueueFull = (429, "queue_full"),
    /// The key has as many requests queued or running as it may; retry after `Retry-After`.
    ConcurrencyLimit = (429, "concurrency_limit"),
    /// The key sends requests faster than its rate limit; retry after `Retry-After`.
    RateLimited = (429, "rate_limited"),
    /// The owner's budget for the current period is spent; retry after `Retry-After` (the period's end), or ask an
    /// admin to raise it.
    BudgetExhausted = (429, "budget_exhausted"),
    /// This `Idempotency-Key` was already used, within its window, for a different request.
    IdempotencyKeyReused = (422, "idempotency_key_reused"),
    /// The operation conflicts with the current state.
    Conflict = (409, "conflict"),
    /// The server is shutting down or cannot serve right now; retry after `Retry-After`.
    ServiceUnavailable = (503, "service_unavailable"),
    /// An unexpected server error; details are in the server log under the request id.
    InternalError = (500, "internal_error"),
}

/// A platform error as clients see it. The gateway renders it as JSON with `detail` and `error_type`, plus the
/// `X-Fal-Error-Type` header.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub error_type: ErrorType,
    pub status: u16,
    pub message: String,
    /// Overrides the `detail` field (e.g. the FastAPI validation list).
    pub detail: Option<Value>,
    /// Seconds for `Retry-After` (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        ApiError { error_type, status: error_type.status(), message: message.into(), detail: None, retry_after: None }
    }
    pub fn with_detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    pub fn internal() -> Self {
        ApiError::new(ErrorType::InternalError, "Internal server error")
    }
    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({
            "detail": self.detail.clone().unwrap_or_else(|| Value::String(self.message.clone())),
            "error_type": self.error_type.as_str(),
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.error_type.as_str(), self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The error catalog as Markdown, generated from the code (docs/errors.md is checked against it).
pub fn catalog_markdown() -> String {
    let mut s = String::from(
        "# Error catalog\n\nGenerated from `darkroom-core` (`darkroom errors`). Every platform error carries \
         `error_type` in its JSON body and the `X-Fal-Error-Type` header.\n\n| error_type | HTTP status | meaning |\n|---|---|---|\n",
    );
    for t in ErrorType::ALL {
        s.push_str(&format!("| `{}` | {} | {} |\n", t.as_str(), t.status(), t.description()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for t in ErrorType::ALL {
            assert!(seen.insert(t.as_str()), "duplicate {}", t.as_str());
            assert!(t.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert_eq!(ErrorType::from_name(t.as_str()), Some(*t));
            assert!(!t.description().is_empty());
        }
    }

    #[test]
    fn body_has_detail_and_type() {
        let e = ApiError::new(ErrorType::AppNotFound, "no app");
        assert_eq!(e.status, 404);
        assert_eq!(e.body(), json!({"detail": "no app", "error_type": "app_not_found"}));
    }
}

#[cfg(test)]
mod catalog_doc {
    /// docs/errors.md is generated by `darkroom errors`; it must not drift from the code.
    #[test]
    fn docs_errors_md_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md");
        let on_disk = std::fs::read_to_string(path).expect("docs/errors.md exists");
        assert_eq!(
            on_disk,
            super::catalog_markdown(),
            "regenerate with: cargo run -p darkroom -- errors > docs/errors.md"
        );
    }
}
