//! Wall-clock time as the broker writes and compares it, in one place:
//! Unix seconds and milliseconds, RFC 3339 text with milliseconds (event
//! timestamps, token expiry in messages), and the monotonic instant at which
//! a Unix time is reached (stream deadlines).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    since_epoch(SystemTime::now()).as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    since_epoch(SystemTime::now()).as_millis() as u64
}

fn since_epoch(at: SystemTime) -> Duration {
    at.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-04-29T16:41:38.412Z`. Every
/// timestamp the broker writes has this one fixed form, so timestamps
/// compare as text.
pub fn format_timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// [`format_timestamp`] of a Unix time in seconds (a token's `exp`).
pub fn format_unix_secs(secs: u64) -> String {
    format_timestamp(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Parses what [`format_timestamp`] wrote.
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

/// [`format_timestamp`] of `now`, formatted once per millisecond per thread:
/// under load many events share a millisecond, and formatting a date is
/// the costliest part of stamping one.
pub fn timestamp_now(now: SystemTime) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(u128, String)> = const { std::cell::RefCell::new((u128::MAX, String::new())) };
    }
    let ms = since_epoch(now).as_millis();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms {
            *last = (ms, format_timestamp(now));
        }
        last.1.clone()
    })
}

/// The monotonic instant at which the wall clock reads `unix_secs`
/// (now, if that has passed).
pub fn instant_at(unix_secs: u64) -> tokio::time::Instant {
    let now = since_epoch(SystemTime::now());
    tokio::time::Instant::now() + Duration::from_secs(unix_secs).saturating_sub(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_format() {
        let at = UNIX_EPOCH + Duration::from_millis(1_777_480_898_412);
        assert_eq!(format_timestamp(at), "2026-04-29T16:41:38.412Z");
        assert_eq!(timestamp_now(at), "2026-04-29T16:41:38.412Z");
        assert_eq!(format_unix_secs(1_700_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(parse_timestamp("2026-04-29T16:41:38.412Z"), Some(at));
    }
}
