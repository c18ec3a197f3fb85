//! The per-tenant emit rate limit: a token bucket in front of a bounded
//! queue. Above the rate, events wait in the queue (delayed, not lost);
//! past the queue's bound the oldest waiting event is dropped and counted
//! by type, so the tenant's sockets can be told what they missed.
//!
//! Pure logic with an explicit clock, so it is tested without sleeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{SharedEvent, check_identifier};

/// A tenant's limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained events per second.
    pub per_second: u32,
    /// Most events waiting for their turn; past it the oldest is dropped.
    pub queue: usize,
}

impl Limit {
    /// The bucket holds one second of events: a burst up to the rate is
    /// emitted at once.
    fn burst(&self) -> f64 {
        f64::from(self.per_second.max(1))
    }
}

/// What happened to a pushed event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// It could not go out at once.
    pub delayed: bool,
    /// The queue was full: this older event was dropped to make room.
    pub dropped: Option<String>,
}

pub struct RateLimiter {
    limit: Limit,
    tokens: f64,
    refilled: Instant,
    queue: VecDeque<SharedEvent>,
    /// Dropped since the last [`RateLimiter::take_dropped`], by type.
    dropped: BTreeMap<String, u64>,
}

impl RateLimiter {
    pub fn new(limit: Limit, now: Instant) -> Self {
        Self {
            limit,
            tokens: limit.burst(),
            refilled: now,
            queue: VecDeque::new(),
            dropped: BTreeMap::new(),
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Changes the limit from now on (tokens already earned are capped by
    /// the new burst).
    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
        self.tokens = self.tokens.min(limit.burst());
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens =
            (self.tokens + elapsed * f64::from(self.limit.per_second)).min(self.limit.burst());
    }

    /// Queues an event; call [`RateLimiter::pop_ready`] to take what may go
    /// out now.
    pub fn push(&mut self, event: SharedEvent, now: Instant) -> Pushed {
        self.refill(now);
        let delayed = !self.queue.is_empty() || self.tokens < 1.0;
        let mut dropped = None;
        if self.queue.len() >= self.limit.queue.max(1)
            && let Some(old) = self.queue.pop_front()
        {
            *self.dropped.entry(old.event_type.clone()).or_default() += 1;
            dropped = Some(old.event_type.clone());
        }
        self.queue.push_back(event);
        Pushed { delayed, dropped }
    }

    /// The next event that may go out now, if any.
    pub fn pop_ready(&mut self, now: Instant) -> Option<SharedEvent> {
        if self.queue.is_empty() {
            return None;
        }
        self.refill(now);
        if self.tokens < 1.0 {
            return None;
        }
        self.tokens -= 1.0;
        self.queue.pop_front()
    }

    /// When the next waiting event may go out; `None` with nothing waiting.
    pub fn next_ready_at(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let missing = (1.0 - self.tokens).max(0.0);
        Some(
            self.refilled
                + Duration::from_secs_f64(missing / f64::from(self.limit.per_second.max(1))),
        )
    }

    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Drop counts by type since the last call.
    pub fn take_dropped(&mut self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.dropped)
    }
}

/// Per-tenant rates as Redis holds them (hash `tc:ratelimits`: field a
/// tenant id, value events per second). Returns the rates that apply and,
/// for each entry that does not, its field (lossily as text) and why; one
/// bad entry never hides the others.
pub fn rates_from_redis(
    pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> (HashMap<String, u32>, Vec<(String, String)>) {
    let mut rates = HashMap::new();
    let mut refused = Vec::new();
    for (field, value) in pairs {
        let shown: String = String::from_utf8_lossy(&field).chars().take(140).collect();
        let tenant = match String::from_utf8(field) {
            Ok(t) => t,
            Err(_) => {
                refused.push((shown, "the tenant is not UTF-8 text".into()));
                continue;
            }
        };
        if let Err(why) = check_identifier(&tenant) {
            refused.push((shown, format!("tenant: {why}")));
            continue;
        }
        let rate = std::str::from_utf8(&value)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|r| *r > 0);
        match rate {
            Some(r) => {
                rates.insert(tenant, r);
            }
            None => refused.push((
                shown,
                format!(
                    "the rate {:?} is not a whole number of events per second from 1 to {}",
                    String::from_utf8_lossy(&value)
                        .chars()
                        .take(40)
                        .collect::<String>(),
                    u32::MAX
                ),
            )),
        }
    }
    (rates, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use std::sync::Arc;

    fn event(event_type: &str, id: u32) -> SharedEvent {
        Arc::new(Event {
            id: id.to_string(),
            event_type: event_type.into(),
            tenant_id: "t".into(),
            data: serde_json::value::RawValue::from_string("{}".into()).expect("json"),
            timestamp: String::new(),
            trace_id: String::new(),
        })
    }

    fn drain(l: &mut RateLimiter, now: Instant) -> Vec<String> {
        std::iter::from_fn(|| l.pop_ready(now))
            .map(|e| e.id.clone())
            .collect()
    }

    #[test]
    fn bursts_up_to_the_rate_then_paces() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            Limit {
                per_second: 10,
                queue: 100,
            },
            t0,
        );
        let mut out = 0;
        for i in 0..15 {
            // As the pump does: push, then take what may go out now.
            let pushed = l.push(event("a.b", i), t0);
            assert_eq!(pushed.delayed, i >= 10, "{i}");
            out += drain(&mut l, t0).len();
        }
        assert_eq!(out, 10, "one second of burst");
        assert_eq!(l.waiting(), 5);
        let next = l.next_ready_at().expect("waiting");
        assert_eq!(next, t0 + Duration::from_millis(100));
        assert!(l.pop_ready(next - Duration::from_millis(1)).is_none());
        assert_eq!(drain(&mut l, next), ["10"]);
        assert_eq!(drain(&mut l, t0 + Duration::from_secs(1)).len(), 4);
        assert!(l.next_ready_at().is_none());
    }

    #[test]
    fn past_the_queue_bound_the_oldest_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            Limit {
                per_second: 1,
                queue: 3,
            },
            t0,
        );
        assert_eq!(drain(&mut l, t0).len(), 0);
        l.push(event("a.b", 0), t0);
        assert_eq!(drain(&mut l, t0), ["0"]);
        for (i, t) in ["cost.x", "cost.x", "alert.y", "cost.z", "cost.z"]
            .iter()
            .enumerate()
        {
            l.push(event(t, i as u32 + 1), t0);
        }
        let dropped = l.take_dropped();
        assert_eq!(dropped.get("cost.x"), Some(&2));
        assert_eq!(dropped.len(), 1);
        assert!(l.take_dropped().is_empty(), "counts reset");
        let later = |s| t0 + Duration::from_secs(s);
        let out: Vec<String> = (1..=3).flat_map(|s| drain(&mut l, later(s))).collect();
        assert_eq!(out, ["3", "4", "5"], "in order, one a second");
    }

    #[test]
    fn one_bad_rate_limit_entry_does_not_hide_the_others() {
        let pairs = vec![
            (b"tenant-a".to_vec(), b"1000".to_vec()),
            (vec![0xff, 0xfe], b"10".to_vec()),
            (b"tenant-b".to_vec(), vec![0xc3, 0x28]),
            (b"tenant c".to_vec(), b"5".to_vec()),
            (b"tenant-d".to_vec(), b"0".to_vec()),
            (b"tenant-e".to_vec(), b" 7 ".to_vec()),
        ];
        let (rates, refused) = rates_from_redis(pairs);
        assert_eq!(rates.len(), 2);
        assert_eq!(rates.get("tenant-a"), Some(&1000));
        assert_eq!(rates.get("tenant-e"), Some(&7));
        let fields: Vec<&str> = refused.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            ["\u{fffd}\u{fffd}", "tenant-b", "tenant c", "tenant-d"]
        );
    }
}
