//! The ids of the entries this instance wrote, by stream, for its relays.
//!
//! A relay follows every stream of its partition, and most of what it reads
//! back is its own instance's entries, which it drops. Parsing them is most
//! of a relay's cost when one instance writes hard. The writer therefore
//! records the id Redis gave each of its entries, and the relay passes over
//! a run of them without reading it back: stream ids only grow, so the
//! relay asks Redis only for what lies *between* two of its own entries
//! (an `XRANGE` of the gap, usually empty; none at all when the two ids are
//! consecutive). Whatever another instance wrote in a gap is read and
//! delivered in stream order, as before.
//!
//! Missing ids only cost speed: an own entry that is not recorded (a round
//! that failed after Redis took part of it, an id dropped at the bound)
//! falls in a gap, is read back and dropped by its origin, as before.
//!
//! Bound: at most [`MAX_IDS`] ids (16 bytes each, plus one key per stream)
//! wait for the relays; past it, new ids are not recorded and the relays
//! read those entries back.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Most ids waiting for the relays, over every stream.
pub(super) const MAX_IDS: usize = 65_536;

/// A stream entry id: milliseconds, sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Id(pub u64, pub u64);

impl Id {
    /// Parses `1700000000000-3`.
    pub(crate) fn parse(text: &[u8]) -> Option<Id> {
        let text = std::str::from_utf8(text).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some(Id(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The smallest id after this one.
    pub(super) fn next(self) -> Option<Id> {
        match self.1.checked_add(1) {
            Some(seq) => Some(Id(self.0, seq)),
            None => self.0.checked_add(1).map(|ms| Id(ms, 0)),
        }
    }

    /// The largest id before this one.
    pub(super) fn prev(self) -> Option<Id> {
        match self.1.checked_sub(1) {
            Some(seq) => Some(Id(self.0, seq)),
            None => self.0.checked_sub(1).map(|ms| Id(ms, u64::MAX)),
        }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Shared by the writer (which records) and the relays (which take).
pub(super) struct OwnEntries {
    ids: Mutex<Ids>,
    /// True while the writer has a round in flight: its entries are in
    /// Redis, or about to be, before their ids are here.
    writing: AtomicBool,
    /// Bumped when a round in flight ends, written or not.
    rounds: watch::Sender<u64>,
}

#[derive(Default)]
struct Ids {
    by_stream: HashMap<String, VecDeque<Id>>,
    len: usize,
}

impl OwnEntries {
    pub(super) fn new() -> Self {
        Self {
            ids: Mutex::default(),
            writing: AtomicBool::new(false),
            rounds: watch::Sender::new(0),
        }
    }

    /// The writer sends a round.
    pub(super) fn start_writing(&self) {
        self.writing.store(true, Ordering::Release);
    }

    /// The writer has nothing in flight.
    pub(super) fn stop_writing(&self) {
        self.writing.store(false, Ordering::Release);
        self.rounds.send_modify(|n| *n += 1);
    }

    pub(super) fn writing(&self) -> bool {
        self.writing.load(Ordering::Acquire)
    }

    /// A round in flight ended (its ids, if any, are recorded).
    pub(super) fn round_ended(&self) {
        self.rounds.send_modify(|n| *n += 1);
    }

    /// For waiting on [`Self::round_ended`].
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    /// Records what a round wrote: `(stream, id)`, in each stream's
    /// order. Past [`MAX_IDS`], the rest is not recorded.
    pub(super) fn record<'a>(&self, written: impl IntoIterator<Item = (&'a str, Id)>) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let ids = &mut *ids;
        let mut current: Option<(&str, &mut VecDeque<Id>)> = None;
        for (stream, id) in written {
            if ids.len >= MAX_IDS {
                return;
            }
            let queue = match current.take() {
                Some((s, q)) if s == stream => q,
                _ => {
                    if !ids.by_stream.contains_key(stream) {
                        ids.by_stream.insert(stream.to_string(), VecDeque::new());
                    }
                    ids.by_stream.get_mut(stream).expect("inserted above")
                }
            };
            queue.push_back(id);
            ids.len += 1;
            current = Some((stream, queue));
        }
    }

    /// The recorded ids of `stream` after `after`, at most `max`, in
    /// order; the ones up to `after` are forgotten.
    pub(super) fn take_after(&self, stream: &str, after: Id, max: usize) -> Vec<Id> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = ids.by_stream.get_mut(stream) else {
            return Vec::new();
        };
        let before = queue.len();
        while queue.front().is_some_and(|id| *id <= after) {
            queue.pop_front();
        }
        let taken: Vec<Id> = queue.iter().take(max).copied().collect();
        let (left, dropped) = (queue.len(), before - queue.len());
        if left == 0 {
            ids.by_stream.remove(stream);
        }
        ids.len -= dropped;
        taken
    }

    /// Forgets a stream's ids (a stream no relay follows).
    pub(super) fn forget(&self, stream: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = ids.by_stream.remove(stream) {
            ids.len -= queue.len();
        }
    }

    /// Ids waiting, over every stream.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).len
    }
}

/// A run of own entries a relay can pass over: the gaps between them to
/// ask Redis about, then the last of them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Walk {
    /// `(first, last)` inclusive id ranges that may hold other entries,
    /// each followed by the own entry `until`.
    pub gaps: Vec<Gap>,
    /// The last own entry: where the stream's position goes when every
    /// gap is empty.
    pub last: Id,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Gap {
    pub first: Id,
    pub last: Id,
    /// The own entry right after the gap.
    pub until: Id,
}

/// Plans passing over `own` (increasing, all after `position`): a gap
/// before each own entry that does not directly follow the one before, at
/// most `max_gaps` of them (the walk stops before the next).
pub(super) fn walk(position: Id, own: &[Id], max_gaps: usize) -> Option<Walk> {
    let mut gaps = Vec::new();
    let mut cursor = position;
    for &id in own {
        if let (Some(first), Some(last)) = (cursor.next(), id.prev())
            && first <= last
        {
            if gaps.len() == max_gaps {
                break;
            }
            gaps.push(Gap {
                first,
                last,
                until: id,
            });
        }
        cursor = id;
    }
    (cursor != position).then_some(Walk { gaps, last: cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_order_and_neighbours() {
        assert_eq!(
            Id::parse(b"1700000000000-3"),
            Some(Id(1_700_000_000_000, 3))
        );
        assert_eq!(Id::parse(b"17-x"), None);
        assert_eq!(Id::parse(b"17"), None);
        assert!(Id(1, 9) < Id(1, 10) && Id(1, 10) < Id(2, 0));
        assert_eq!(Id(5, 0).prev(), Some(Id(4, u64::MAX)));
        assert_eq!(Id(4, u64::MAX).next(), Some(Id(5, 0)));
        assert_eq!(Id(0, 0).prev(), None);
        assert_eq!(Id(7, 2).to_string(), "7-2");
    }

    #[test]
    fn a_walk_asks_only_about_gaps() {
        // 10-0 read; own 10-1, 10-2 (consecutive: no gap), 12-0 (a gap
        // from 10-3 to 11-max), 12-1.
        let own = [Id(10, 1), Id(10, 2), Id(12, 0), Id(12, 1)];
        let walk = walk(Id(10, 0), &own, 8).unwrap();
        assert_eq!(
            walk.gaps,
            vec![Gap {
                first: Id(10, 3),
                last: Id(11, u64::MAX),
                until: Id(12, 0)
            }]
        );
        assert_eq!(walk.last, Id(12, 1));
        // From the start of a stream, the first own entry has a gap
        // before it.
        let walk2 = super::walk(Id(0, 0), &[Id(3, 0)], 8).unwrap();
        assert_eq!(walk2.gaps[0].first, Id(0, 1));
        assert_eq!(walk2.gaps[0].last, Id(2, u64::MAX));
        assert!(super::walk(Id(0, 0), &[], 8).is_none());
        // At most `max_gaps`: the walk stops before the next gap.
        let bounded = super::walk(Id(10, 0), &own, 0).unwrap();
        assert!(bounded.gaps.is_empty());
        assert_eq!(bounded.last, Id(10, 2));
        assert!(super::walk(Id(0, 0), &[Id(3, 0)], 0).is_none());
    }

    #[test]
    fn recorded_ids_are_bounded_and_taken_in_order() {
        let own = OwnEntries::new();
        own.record([
            ("a", Id(1, 0)),
            ("a", Id(1, 1)),
            ("b", Id(1, 2)),
            ("a", Id(2, 0)),
        ]);
        assert_eq!(own.len(), 4);
        assert_eq!(own.take_after("a", Id(1, 0), 10), vec![Id(1, 1), Id(2, 0)]);
        assert_eq!(own.len(), 3, "the id up to the position is forgotten");
        assert_eq!(own.take_after("a", Id(1, 1), 1), vec![Id(2, 0)]);
        assert_eq!(own.take_after("a", Id(2, 0), 10), vec![]);
        assert_eq!(own.len(), 1);
        own.forget("b");
        assert_eq!(own.len(), 0);
        let many = (0..MAX_IDS as u64 + 10).map(|n| ("c", Id(n, 0)));
        own.record(many);
        assert_eq!(own.len(), MAX_IDS, "past the bound nothing is recorded");
        own.record([("d", Id(1, 0))]);
        assert!(own.take_after("d", Id(0, 0), 10).is_empty());
    }
}
