//! Darkroom's domain core: ids, endpoint routing, jobs, apps, the error catalog, key hashing and the
//! runner control-channel protocol. It knows no HTTP and no SQL; the gateway, store and runner build on it.

pub mod app;
pub mod auth;
pub mod billing;
pub mod error;
pub mod ids;
pub mod job;
pub mod json;
pub mod protocol;
pub mod route;
pub mod scaling;
pub mod tls;
pub mod token;
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

/// Parses a point in time for filters: an RFC 3339 timestamp, milliseconds since the epoch, or a duration before
/// `now` such as `90s`, `30m`, `2h`, `7d`.
pub fn parse_time(s: &str, now: Millis) -> Result<Millis, String> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| format!("'{s}' is not a time (RFC 3339, epoch ms, or a duration like 2h)"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{s}': a duration ends in s, m, h or d")),
    };
    Ok(now.saturating_sub(n.saturating_mul(unit_ms)))
}

/// Formats store milliseconds as an RFC 3339 UTC timestamp.
pub fn iso8601(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn times_parse() {
        let now = 10_000_000;
        assert_eq!(super::parse_time("2h", now), Ok(now - 7_200_000));
        assert_eq!(super::parse_time("90s", now), Ok(now - 90_000));
        assert_eq!(super::parse_time("1700000000000", now), Ok(1_700_000_000_000));
        assert_eq!(super::parse_time("2026-11-21T10:00:00Z", now), Ok(1_795_255_200_000));
        assert!(super::parse_time("yesterday", now).is_err());
        assert!(super::parse_time("3w", now).is_err());
    }
}
