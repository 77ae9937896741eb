//! Darkroom's domain core: ids, endpoint routing, jobs, apps, the error catalog, key hashing and the
//! runner control-channel protocol. It knows no HTTP and no SQL; the gateway, store and runner build on it.

pub mod app;
pub mod auth;
pub mod error;
pub mod ids;
pub mod job;
pub mod json;
pub mod protocol;
pub mod route;
pub mod scaling;
pub mod tls;
pub mod webhook;

pub use error::{ApiError, ErrorType};

/// Milliseconds since the Unix epoch, the store's time unit.
pub type Millis = i64;

/// A source of time, so code that waits on time can be driven by tests.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        chrono::Utc::now().timestamp_millis()
    }
}

/// Formats store milliseconds as an RFC 3339 UTC timestamp.
pub fn iso8601(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
