//! One tenant's recent events, the source every resume replays from.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::BrokerConfig;
use super::filter::TypeFilter;
use crate::clock;
use crate::event::SharedEvent;

/// Oldest first, bounded by count, bytes and age (the `TC_HISTORY_MAX_*`
/// settings).
pub(super) struct History {
    events: VecDeque<(Instant, SharedEvent)>,
    bytes: usize,
    /// An event was dropped to keep within the bounds.
    trimmed: bool,
}

/// A tenant's held events within a span of time.
pub struct Span {
    /// Oldest first.
    pub events: Vec<SharedEvent>,
    /// Whether history reaches back to the span's start: nothing in the
    /// span was dropped, and this instance was already keeping events.
    pub complete: bool,
}

/// What the history holds after a given id.
pub struct Replay {
    pub events: Vec<SharedEvent>,
    /// True when the id was found, so `events` is everything after it.
    pub recovered: bool,
}

/// A page of a tenant's held events, oldest first.
pub struct Page {
    pub events: Vec<SharedEvent>,
    /// False when the `since` id asked for is no longer held (or never
    /// was): events between it and the oldest held may be missing.
    pub recovered: bool,
    /// More matching events are held after this page.
    pub more: bool,
}

impl History {
    pub(super) fn new() -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            trimmed: false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The id of the newest event held.
    pub(super) fn tail_id(&self) -> Option<String> {
        self.events.back().map(|(_, e)| e.id.clone())
    }

    pub(super) fn push(&mut self, event: SharedEvent, now: Instant, config: &BrokerConfig) {
        self.bytes += event.size_bytes();
        self.events.push_back((now, event));
        self.trim(now, config);
    }

    pub(super) fn trim(&mut self, now: Instant, config: &BrokerConfig) {
        while let Some((at, event)) = self.events.front() {
            let over = self.events.len() > config.history_max_events
                || self.bytes > config.history_max_bytes
                || now.duration_since(*at) > config.history_max_age;
            if !over {
                break;
            }
            self.bytes -= event.size_bytes();
            self.events.pop_front();
            self.trimmed = true;
        }
    }

    /// Events stamped from `from` to `until` (their `timestamp`). Complete
    /// when the oldest event held is older than `from`, or none was ever
    /// dropped and `since` (when this instance started keeping events) is
    /// not after `from`.
    pub(super) fn span(&self, from: SystemTime, until: SystemTime, since: SystemTime) -> Span {
        let stamped = |e: &SharedEvent| clock::parse_timestamp(&e.timestamp);
        let oldest = self.events.front().and_then(|(_, e)| stamped(e));
        let complete = oldest.is_some_and(|t| t < from) || (!self.trimmed && since <= from);
        let events = self
            .events
            .iter()
            .filter(|(_, e)| stamped(e).is_some_and(|t| t >= from && t <= until))
            .map(|(_, e)| Arc::clone(e))
            .collect();
        Span { events, complete }
    }

    /// Events after `since_id` that match `filter`. When `since_id` is not
    /// held (too old, or never seen here), everything held is returned and
    /// `recovered` is false: the subscriber should refetch its state.
    pub(super) fn after(&self, since_id: &str, filter: &TypeFilter, margin: Duration) -> Replay {
        match self.position(since_id) {
            Some(pos) => Replay {
                events: self.matching(self.resume_start(pos, margin)..self.events.len(), filter),
                recovered: true,
            },
            None => Replay {
                events: self.matching(0..self.events.len(), filter),
                recovered: false,
            },
        }
    }

    /// Events after `since_id` up to and including `until_id`. `until_id`
    /// `None`, or no longer held, means nothing up to now: every event held
    /// is newer than it.
    pub(super) fn between(
        &self,
        since_id: &str,
        until_id: Option<&str>,
        filter: &TypeFilter,
        margin: Duration,
    ) -> Replay {
        let since = self.position(since_id);
        let end = until_id
            .and_then(|id| self.position(id))
            .map_or(0, |p| p + 1);
        let start = since.map_or(0, |p| self.resume_start(p, margin));
        Replay {
            events: if start < end {
                self.matching(start..end, filter)
            } else {
                Vec::new()
            },
            recovered: since.is_some() || until_id == Some(since_id),
        }
    }

    /// Up to `limit` events matching `filter`: the first ones after
    /// `since_id` (a page to continue from), or without it the newest.
    pub(super) fn page(&self, since_id: Option<&str>, filter: &TypeFilter, limit: usize) -> Page {
        let matching = |(_, e): &&(Instant, SharedEvent)| filter.matches(&e.event_type);
        match since_id {
            None => {
                let mut events: Vec<SharedEvent> = self
                    .events
                    .iter()
                    .rev()
                    .filter(matching)
                    .take(limit)
                    .map(|(_, e)| Arc::clone(e))
                    .collect();
                events.reverse();
                Page {
                    events,
                    recovered: true,
                    more: false,
                }
            }
            Some(id) => {
                let position = self.position(id);
                let start = position.map_or(0, |p| p + 1);
                let mut events: Vec<SharedEvent> = self
                    .events
                    .range(start..)
                    .filter(matching)
                    .take(limit + 1)
                    .map(|(_, e)| Arc::clone(e))
                    .collect();
                let more = events.len() > limit;
                events.truncate(limit);
                Page {
                    events,
                    recovered: position.is_some(),
                    more,
                }
            }
        }
    }

    /// The held event with this id.
    pub(super) fn find(&self, id: &str) -> Option<SharedEvent> {
        self.position(id).map(|p| Arc::clone(&self.events[p].1))
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.events.iter().rposition(|(_, e)| e.id == id)
    }

    /// Where a replay after the event at `pos` starts: just after it, or
    /// earlier to include events accepted within `margin` before it.
    fn resume_start(&self, pos: usize, margin: Duration) -> usize {
        if margin.is_zero() {
            return pos + 1;
        }
        let Some(since) = self
            .events
            .get(pos)
            .and_then(|(_, e)| clock::parse_timestamp(&e.timestamp))
        else {
            return pos + 1;
        };
        // Timestamps share one fixed format, so they compare as text.
        let from = clock::format_timestamp(since - margin);
        let first = self
            .events
            .iter()
            .position(|(_, e)| e.timestamp >= from)
            .unwrap_or(pos + 1);
        first.min(pos + 1)
    }

    fn matching(&self, range: std::ops::Range<usize>, filter: &TypeFilter) -> Vec<SharedEvent> {
        self.events
            .range(range)
            .filter(|(_, e)| filter.matches(&e.event_type))
            .map(|(_, e)| Arc::clone(e))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::tests::event;

    #[test]
    fn history_bounds() {
        let config = BrokerConfig {
            history_max_events: 3,
            ..Default::default()
        };
        let mut h = History::new();
        let now = Instant::now();
        for i in 0..5 {
            h.push(Arc::new(event("t", &i.to_string(), "a.b")), now, &config);
        }
        let ids: Vec<_> = h.events.iter().map(|(_, e)| e.id.clone()).collect();
        assert_eq!(ids, ["2", "3", "4"]);
        let r = h.after("3", &TypeFilter::all(), Duration::ZERO);
        assert!(r.recovered);
        assert_eq!(r.events.len(), 1);
        let r = h.after("0", &TypeFilter::all(), Duration::ZERO);
        assert!(!r.recovered);
        assert_eq!(r.events.len(), 3);
        let b = |since, until| {
            let r = h.between(since, until, &TypeFilter::all(), Duration::ZERO);
            let ids: Vec<String> = r.events.iter().map(|e| e.id.clone()).collect();
            (ids, r.recovered)
        };
        assert_eq!(b("2", Some("4")), (vec!["3".into(), "4".into()], true));
        assert_eq!(b("4", Some("3")), (vec![], true), "since after until");
        assert_eq!(b("0", Some("3")), (vec!["2".into(), "3".into()], false));
        assert_eq!(b("0", None), (vec![], false), "nothing forwarded yet");
        assert_eq!(
            b("1", Some("1")),
            (vec![], true),
            "up to date, even if evicted"
        );
        assert_eq!(
            b("3", Some("gone")),
            (vec![], true),
            "until evicted: all held is newer"
        );
        let aged = BrokerConfig {
            history_max_age: Duration::from_secs(1),
            ..config
        };
        h.trim(now + Duration::from_secs(2), &aged);
        assert!(h.is_empty());
        assert_eq!(h.bytes, 0);
    }
}
