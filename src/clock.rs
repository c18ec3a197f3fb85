//! Wall-clock time as the broker writes and compares it, in one place:
//! Unix seconds and milliseconds, RFC 3339 text with milliseconds (event
//! timestamps, token expiry in messages), and the monotonic instant at which
//! a Unix time is reached (stream deadlines).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 9999-12-31T23:59:59Z: the last second [`format_timestamp`] can write.
pub const MAX_UNIX_SECS: u64 = 253_402_300_799;

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
    // humantime cannot write a year past 9999: clamp rather than fail.
    let last = UNIX_EPOCH + Duration::from_millis(MAX_UNIX_SECS * 1000 + 999);
    humantime::format_rfc3339_millis(at.min(last)).to_string()
}

/// [`format_timestamp`] of a Unix time in seconds (a token's `exp`).
pub fn format_unix_secs(secs: u64) -> String {
    format_timestamp(UNIX_EPOCH + Duration::from_secs(secs.min(MAX_UNIX_SECS)))
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

/// The monotonic instant at which the wall clock reads `unix_secs` (now,
/// if that has passed; a century from now, if it is further than that).
pub fn instant_at(unix_secs: u64) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = since_epoch(SystemTime::now());
    let wait = Duration::from_secs(unix_secs)
        .saturating_sub(now)
        .min(CENTURY);
    let start = tokio::time::Instant::now();
    start.checked_add(wait).unwrap_or(start)
}

/// True at most once per wall-clock second: for a warning that would
/// otherwise be logged for every event (a queue that stays full).
#[derive(Debug, Default)]
pub struct OncePerSecond(std::sync::atomic::AtomicU64);

impl OncePerSecond {
    pub fn due(&self) -> bool {
        let now = unix_secs();
        self.0.swap(now, std::sync::atomic::Ordering::Relaxed) != now
    }
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

    #[test]
    fn the_far_future_saturates() {
        assert_eq!(format_unix_secs(MAX_UNIX_SECS), "9999-12-31T23:59:59.000Z");
        assert_eq!(format_unix_secs(u64::MAX), "9999-12-31T23:59:59.000Z");
        let far = UNIX_EPOCH + Duration::from_secs(MAX_UNIX_SECS * 2);
        assert_eq!(format_timestamp(far), "9999-12-31T23:59:59.999Z");
    }

    #[tokio::test]
    async fn deadlines_never_overflow() {
        let now = tokio::time::Instant::now();
        for secs in [0, unix_secs(), MAX_UNIX_SECS, u64::MAX - 31, u64::MAX] {
            let at = instant_at(secs);
            assert!(at >= now, "{secs}");
        }
        assert!(instant_at(u64::MAX) > now + Duration::from_secs(50 * 365 * 24 * 3600));
    }
}
