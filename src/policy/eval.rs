//! The evaluator: one code path for live evaluation and
//! `policies.simulate`. Pure logic over events and an explicit clock, so
//! the same events give the same firings, at the same times, whenever the
//! clock is looked at in between.
//!
//! Per policy and subject, a sliding window is kept as
//! [`BUCKETS`] buckets of a twentieth of the window each: the measure at
//! a time is the sum of the buckets of the last window (so a window of
//! `5m` reaches back between 4m45s and 5m). Memory per subject is fixed,
//! whatever the rate of events.
//!
//! A subject **fires** at the event that brings its measure to the
//! threshold or above, unless it fired less than the cooldown before; it
//! stays firing while the measure stays there, and is **resolved** once
//! the measure has been under the threshold for `resolve_after`: at the
//! time that happened, which does not depend on when the clock is looked
//! at ([`TenantEval::settle`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::spec::{Compiled, Measure};

/// Buckets per window.
pub const BUCKETS: usize = 20;
const B: u64 = BUCKETS as u64;

/// Measures are kept in millionths (a count of one is 1,000,000; a sum
/// of USD is in micro-dollars): integers add up exactly in any order, so
/// a running total and a sum over buckets always agree.
const UNIT: f64 = 1_000_000.0;

fn units(value: f64) -> i64 {
    // `as` saturates at the bounds (a sum past 9 × 10^12 units stops there).
    (value * UNIT).round() as i64
}

fn value_of(units: i64) -> f64 {
    units as f64 / UNIT
}

/// One subject's window: the measure per bucket of the last window, and
/// their total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[repr(C)]
pub struct Window {
    /// The number of the newest bucket written.
    newest: u64,
    /// The sum of `values`: the measure at the newest bucket.
    total: i64,
    values: [i64; BUCKETS],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            newest: 0,
            values: [0; BUCKETS],
            total: 0,
        }
    }
}

impl Window {
    fn add(&mut self, bucket: u64, value: i64) {
        if bucket > self.newest {
            for k in 1..=(bucket - self.newest).min(B) {
                let slot = &mut self.values[((self.newest + k) % B) as usize];
                self.total -= *slot;
                *slot = 0;
            }
            self.newest = bucket;
        } else if self.newest - bucket >= B {
            // Older than the window: it no longer counts.
            return;
        }
        self.values[(bucket % B) as usize] += value;
        self.total += value;
    }

    /// The measure at bucket `at` (at or after the newest written): the
    /// total less the buckets that have left the window by then.
    fn measure(&self, at: u64) -> i64 {
        if at <= self.newest {
            return self.total;
        }
        if at >= self.newest + B {
            return 0;
        }
        // By bucket `b`, bucket `b - B` has left: it is in `b`'s slot.
        let left: i64 = (self.newest + 1..=at)
            .map(|b| self.values[(b % B) as usize])
            .sum();
        self.total - left
    }

    /// The first bucket from `from` on at which the measure is under
    /// `threshold`, with no more events.
    fn first_below(&self, from: u64, threshold: i64) -> u64 {
        (from..from + B)
            .find(|b| self.measure(*b) < threshold)
            .unwrap_or(from + B)
    }
}

/// A time in Unix ms, or none: 8 bytes where an `Option<u64>` takes 16
/// (a subject's state is read for every event counted). Saved as an
/// `Option<u64>`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "Option<u64>", into = "Option<u64>")]
struct At(u64);

impl At {
    const NONE: At = At(u64::MAX);

    fn some(t: u64) -> At {
        // `u64::MAX` ms is past any clock.
        At(t.min(u64::MAX - 1))
    }

    fn get(self) -> Option<u64> {
        (self != At::NONE).then_some(self.0)
    }

    fn is_some(self) -> bool {
        self != At::NONE
    }

    fn is_none(self) -> bool {
        self == At::NONE
    }
}

impl Default for At {
    fn default() -> Self {
        At::NONE
    }
}

impl From<Option<u64>> for At {
    fn from(t: Option<u64>) -> Self {
        t.map_or(At::NONE, At::some)
    }
}

impl From<At> for Option<u64> {
    fn from(t: At) -> Self {
        t.get()
    }
}

/// What is kept of one subject of one policy. In this order (`repr(C)`):
/// what every event reads shares a cache line with the window's head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[repr(C)]
pub struct SubjectState {
    /// The time of its latest event, Unix ms.
    last_ms: u64,
    /// Firing since (not resolved).
    fired_ms: At,
    /// While firing: under the threshold continuously since.
    below_ms: At,
    /// Its last firing, for the cooldown.
    last_fired_ms: At,
    /// Changed since it was last saved.
    #[serde(skip)]
    changed: bool,
    window: Window,
    /// Its latest event's id and trace id: what an instance taking over
    /// names when it fires for a breach the previous one left unfired.
    #[serde(default)]
    last_event: Option<Box<(String, String)>>,
}

// What every event reads (times, `changed`, the window's head) fits the
// first cache line; the whole state is 224 bytes.
const _: () = assert!(std::mem::size_of::<SubjectState>() == 224);

impl SubjectState {
    /// Within the cooldown of its last firing at `t`.
    fn cooling(&self, p: &Compiled, t: u64) -> bool {
        self.last_fired_ms
            .get()
            .is_some_and(|f| t.saturating_sub(f) < ms(p.cooldown))
    }

    fn fire(&mut self, t: u64) {
        self.fired_ms = At::some(t);
        self.last_fired_ms = At::some(t);
        self.below_ms = At::NONE;
    }

    /// Nothing left to remember: an empty window at `now`, not firing,
    /// past its cooldown.
    fn idle(&self, p: &Compiled, now_ms: u64) -> bool {
        let bucket = bucket_ms(p);
        self.fired_ms.is_none()
            && self.window.measure(now_ms / bucket) == 0
            && !self.cooling(p, now_ms)
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

fn bucket_ms(p: &Compiled) -> u64 {
    (ms(p.window) / B).max(1)
}

/// A subject firing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fired {
    pub policy_id: String,
    pub subject: String,
    pub at_ms: u64,
    /// The measure that reached the threshold.
    pub value: f64,
    /// The event that brought it there.
    pub event_id: String,
    pub trace_id: String,
}

/// A firing subject resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolved {
    pub policy_id: String,
    pub subject: String,
    pub at_ms: u64,
    pub fired_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Fired(Fired),
    Resolved(Resolved),
}

/// An event as the evaluator reads it.
pub struct Seen<'a> {
    pub event_type: &'a str,
    pub id: &'a str,
    pub trace_id: &'a str,
    pub at_ms: u64,
    pub data: &'a Payload<'a>,
}

/// A tenant's subjects: per subject value, the state of each policy
/// (by index) following it. One map for every policy, so an event counted
/// by ten policies with the same subject finds it once: with thousands of
/// subjects each lookup misses the cache, and one per policy was most of
/// the evaluator's time. Keys come from tenants' payloads, so a hash
/// seeded per process (foldhash), faster than SipHash.
type Subjects = HashMap<Key, Followed, foldhash::quality::RandomState>;

/// The policies following one subject and their states, in two arrays:
/// finding a policy reads only the first (a search through states would
/// touch a cache line per state).
#[derive(Default)]
struct Followed {
    policies: Vec<usize>,
    states: Vec<SubjectState>,
}

impl Followed {
    fn position(&self, index: usize) -> Option<usize> {
        self.policies.iter().position(|i| *i == index)
    }

    fn get(&self, index: usize) -> Option<&SubjectState> {
        self.position(index).map(|at| &self.states[at])
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut SubjectState> {
        self.position(index).map(|at| &mut self.states[at])
    }

    /// Adds a policy's state; returns where.
    fn push(&mut self, index: usize, state: SubjectState) -> usize {
        self.policies.push(index);
        self.states.push(state);
        self.states.len() - 1
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut SubjectState)> {
        self.policies.iter().copied().zip(self.states.iter_mut())
    }

    /// Keeps the states for which `keep(policy index, state)` holds.
    fn retain(&mut self, mut keep: impl FnMut(usize, &SubjectState) -> bool) {
        let mut at = 0;
        while at < self.states.len() {
            if keep(self.policies[at], &self.states[at]) {
                at += 1;
            } else {
                self.policies.swap_remove(at);
                self.states.swap_remove(at);
            }
        }
    }

    fn len(&self) -> usize {
        self.states.len()
    }

    fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// A subject as a map key: up to 22 bytes (agent ids and the like) kept in
/// the table itself, so comparing keys while finding one reads no other
/// memory (with thousands of subjects, that read missed the cache and was
/// most of a lookup); longer ones on the heap.
#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<str>),
}

const INLINE_KEY: usize = 22;

impl Key {
    fn new(text: &str) -> Self {
        if text.len() <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Key::Inline {
                len: text.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(text.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(text) => text.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        // Copied from a `&str` whole: always UTF-8.
        std::str::from_utf8(self.bytes()).unwrap_or("")
    }
}

/// Found by bytes: a lookup compares bytes without checking again that
/// they are UTF-8.
impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes: lookups by bytes find it.
        self.bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Key {}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Event types whose matching policies are remembered, at most (past it
/// the memory starts over).
const MATCHING_MEMO: usize = 1024;

/// One tenant's policies, and the state of each of their subjects.
#[derive(Default)]
pub struct TenantEval {
    policies: Vec<Arc<Compiled>>,
    /// Per policy, its subject path's slot: policies with the same path
    /// share one, so an event's subject is read once for all of them.
    slots: Vec<usize>,
    /// Policy index by exact type, by prefix (with its dot), and for `*`.
    by_type: HashMap<String, Vec<usize>>,
    by_prefix: HashMap<String, Vec<usize>>,
    every: Vec<usize>,
    /// The policies matching each event type seen.
    memo: HashMap<String, Arc<[usize]>, foldhash::quality::RandomState>,
    /// The payload fields (first words of paths) some policy reads: the
    /// rest of a payload is skipped unread ([`Needed::parse`]).
    needed: Needed,
    /// Every policy's subjects.
    subjects: Subjects,
    /// Subjects held over every policy.
    held: usize,
    /// Subjects not followed because `max_subjects` were held.
    pub refused: u64,
    /// The saved-window keys (`<policy id>:<subject>`) of subjects not
    /// carried over by [`Self::new`]: their policy changed or went.
    pub dropped: Vec<String>,
}

impl TenantEval {
    /// The enabled policies of `policies`; the subjects of a policy whose
    /// id is in `keep` with the same `updated_at` are carried over.
    pub fn new(policies: Vec<Arc<Compiled>>, keep: Option<TenantEval>) -> Self {
        let mut eval = TenantEval::default();
        for p in policies.into_iter().filter(|p| p.policy.enabled) {
            let index = eval.policies.len();
            for pattern in p.filter.patterns() {
                if pattern == "*" {
                    eval.every.push(index);
                } else if let Some(prefix) = pattern.strip_suffix('*') {
                    eval.by_prefix
                        .entry(prefix.to_string())
                        .or_default()
                        .push(index);
                } else {
                    eval.by_type.entry(pattern).or_default().push(index);
                }
            }
            eval.needed.add(&p);
            let slot = eval
                .policies
                .iter()
                .position(|o| o.subject == p.subject)
                .map_or(index, |o| eval.slots[o]);
            eval.slots.push(slot);
            eval.policies.push(p);
        }
        if let Some(old) = keep {
            // Old index → new index of each policy carried over.
            let remap: Vec<Option<usize>> = old
                .policies
                .iter()
                .map(|o| {
                    eval.policies.iter().position(|p| {
                        p.policy.id == o.policy.id && p.policy.updated_at == o.policy.updated_at
                    })
                })
                .collect();
            for (key, mut list) in old.subjects {
                list.retain(|index, _| {
                    let kept = remap[index].is_some();
                    if !kept {
                        let id = &old.policies[index].policy.id;
                        eval.dropped.push(format!("{id}:{key}"));
                    }
                    kept
                });
                for index in &mut list.policies {
                    *index = remap[*index].unwrap_or(*index);
                }
                if !list.is_empty() {
                    eval.held += list.len();
                    eval.subjects.insert(key, list);
                }
            }
        }
        eval
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether some policy counts events of this type.
    pub fn wants(&self, event_type: &str) -> bool {
        !self.every.is_empty()
            || self.by_type.contains_key(event_type)
            || prefixes(event_type).any(|p| self.by_prefix.contains_key(p))
    }

    /// The payload fields the policies read, to parse events with.
    pub fn needed(&self) -> &Needed {
        &self.needed
    }

    /// The policies counting events of this type, each once, in order;
    /// remembered per type.
    fn matching(&mut self, event_type: &str) -> Arc<[usize]> {
        if let Some(list) = self.memo.get(event_type) {
            return Arc::clone(list);
        }
        let list: Arc<[usize]> = self.match_type(event_type).into();
        if self.memo.len() >= MATCHING_MEMO {
            self.memo.clear();
        }
        self.memo.insert(event_type.to_string(), Arc::clone(&list));
        list
    }

    fn match_type(&self, event_type: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.every.clone();
        if let Some(list) = self.by_type.get(event_type) {
            out.extend(list);
        }
        for p in prefixes(event_type) {
            if let Some(list) = self.by_prefix.get(p) {
                out.extend(list);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn policies(&self) -> &[Arc<Compiled>] {
        &self.policies
    }

    /// Subjects held, over every policy.
    pub fn held(&self) -> usize {
        self.held
    }

    /// One event. `acting`: this evaluator decides firings (the leader,
    /// and `policies.simulate`); otherwise it only keeps the windows, and
    /// learns firings from the events the leader publishes ([`Self::sync`]).
    pub fn observe(
        &mut self,
        seen: &Seen,
        acting: bool,
        max_subjects: usize,
        out: &mut Vec<Outcome>,
    ) {
        let matching = self.matching(seen.event_type);
        let Self {
            policies,
            slots,
            subjects,
            held,
            refused,
            ..
        } = self;
        // The subject last found (its slot, its text) and its states:
        // policies watching the same subject share one reading of it and
        // one lookup.
        let mut current: Option<(usize, Cow<str>, &mut Followed)> = None;
        for &index in matching.iter() {
            let p = &policies[index];
            if !p
                .conditions
                .iter()
                .all(|(path, want)| seen.data.at(path).is_some_and(|v| same(v, want)))
            {
                continue;
            }
            let value = match (&p.measure, &p.field) {
                (Measure::Sum, Some(field)) => match seen.data.at(field).and_then(Found::as_f64) {
                    Some(v) if v.is_finite() => units(v),
                    _ => continue,
                },
                _ => units(1.0),
            };
            let slot = slots[index];
            if !matches!(&current, Some((s, ..)) if *s == slot) {
                let Some(subject) = seen.data.at(&p.subject).and_then(subject_text) else {
                    continue;
                };
                match &mut current {
                    Some((s, k, _)) if *k == subject => *s = slot,
                    _ => {
                        current = None;
                        let list = match subjects.get_mut(subject.as_bytes()) {
                            Some(list) => list,
                            None if *held >= max_subjects => {
                                *refused += 1;
                                continue;
                            }
                            None => subjects.entry(Key::new(&subject)).or_default(),
                        };
                        current = Some((slot, subject, list));
                    }
                }
            }
            let Some((_, subject, list)) = current.as_mut() else {
                continue;
            };
            let threshold = units(p.threshold);
            let at = match list.position(index) {
                Some(at) => at,
                None => {
                    if *held >= max_subjects {
                        *refused += 1;
                        continue;
                    }
                    *held += 1;
                    list.push(index, SubjectState::default())
                }
            };
            let state = &mut list.states[at];
            let t = seen.at_ms.max(state.last_ms);
            state.changed = true;
            if acting && let Some((at, fired)) = settle_one(p, state, t) {
                out.push(Outcome::Resolved(Resolved {
                    policy_id: p.policy.id.clone(),
                    subject: subject.to_string(),
                    at_ms: at,
                    fired_ms: fired,
                }));
            }
            let bucket = t / bucket_ms(p);
            state.window.add(bucket, value);
            state.last_ms = t;
            let measure = state.window.measure(bucket);
            if measure >= threshold && !acting && state.fired_ms.is_none() {
                // A breach the acting instance should be firing for: what
                // this one names if it takes over before learning of it.
                state.last_event = Some(Box::new((seen.id.to_string(), seen.trace_id.to_string())));
            }
            if measure >= threshold {
                if state.fired_ms.is_some() {
                    state.below_ms = At::NONE;
                } else if acting && !state.cooling(p, t) {
                    state.fire(t);
                    out.push(Outcome::Fired(Fired {
                        policy_id: p.policy.id.clone(),
                        subject: subject.to_string(),
                        at_ms: t,
                        value: value_of(measure),
                        event_id: seen.id.to_string(),
                        trace_id: seen.trace_id.to_string(),
                    }));
                }
            } else if state.fired_ms.is_some() && state.below_ms.is_none() {
                // A negative amount took it under at this event.
                state.below_ms = At::some(t);
            }
        }
    }

    /// Resolutions due by `now_ms`, each at the time it became due.
    pub fn settle(&mut self, now_ms: u64, out: &mut Vec<Outcome>) {
        for (subject, list) in self.subjects.iter_mut() {
            for (index, state) in list.iter_mut() {
                let p = &self.policies[index];
                if let Some((at, fired)) = settle_one(p, state, now_ms) {
                    state.changed = true;
                    out.push(Outcome::Resolved(Resolved {
                        policy_id: p.policy.id.clone(),
                        subject: subject.to_string(),
                        at_ms: at,
                        fired_ms: fired,
                    }));
                }
            }
        }
    }

    /// On becoming the evaluator that acts: a subject whose latest event
    /// brought it to the threshold but that did not fire (the acting
    /// instance died first) fires now, at that event's time.
    pub fn take_over(&mut self, out: &mut Vec<Outcome>) {
        for (subject, list) in self.subjects.iter_mut() {
            for (index, state) in list.iter_mut() {
                let p = &self.policies[index];
                let bucket = bucket_ms(p);
                let t = state.last_ms;
                let measure = state.window.measure(t / bucket);
                if state.fired_ms.is_some() || measure < units(p.threshold) || state.cooling(p, t) {
                    continue;
                }
                state.fire(t);
                state.changed = true;
                let last_event = state.last_event.as_deref().cloned().unwrap_or_default();
                out.push(Outcome::Fired(Fired {
                    policy_id: p.policy.id.clone(),
                    subject: subject.to_string(),
                    at_ms: t,
                    value: value_of(measure),
                    event_id: last_event.0.clone(),
                    trace_id: last_event.1.clone(),
                }));
            }
        }
    }

    /// A firing or resolution another evaluator decided (the leader's
    /// `runaway_loop.detected` and `.resolved`).
    pub fn sync(&mut self, policy_id: &str, subject: &str, fired_ms: Option<u64>) {
        let Some(index) = self.policies.iter().position(|p| p.policy.id == policy_id) else {
            return;
        };
        let Some(state) = self
            .subjects
            .get_mut(subject.as_bytes())
            .and_then(|list| list.get_mut(index))
        else {
            return;
        };
        state.changed = true;
        match fired_ms {
            Some(at) => state.fire(at),
            None => {
                state.fired_ms = At::NONE;
                state.below_ms = At::NONE;
            }
        }
    }

    /// Forgets subjects with nothing left to remember at `now_ms`;
    /// returns (policy id, subject) of each.
    pub fn forget_idle(&mut self, now_ms: u64) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        let policies = &self.policies;
        self.subjects.retain(|subject, list| {
            list.retain(|index, state| {
                let p = &policies[index];
                let idle = state.idle(p, now_ms);
                if idle {
                    gone.push((p.policy.id.clone(), subject.to_string()));
                }
                !idle
            });
            !list.is_empty()
        });
        self.held -= gone.len();
        gone
    }

    /// A subject's state under a policy.
    pub fn subject(&self, policy_id: &str, subject: &str) -> Option<&SubjectState> {
        let index = self
            .policies
            .iter()
            .position(|p| p.policy.id == policy_id)?;
        self.subjects.get(subject.as_bytes())?.get(index)
    }

    /// Puts a saved subject back (at start); false when its policy is not
    /// here or the bound is reached.
    pub fn restore(
        &mut self,
        policy_id: &str,
        subject: &str,
        state: SubjectState,
        max_subjects: usize,
    ) -> bool {
        let Some(index) = self.policies.iter().position(|p| p.policy.id == policy_id) else {
            return false;
        };
        if self.held >= max_subjects {
            return false;
        }
        let list = self.subjects.entry(Key::new(subject)).or_default();
        match list.get_mut(index) {
            Some(held) => *held = state,
            None => {
                list.push(index, state);
                self.held += 1;
            }
        }
        true
    }

    /// The subjects changed since the last call, as (`<policy id>:<subject>`,
    /// a copy of their state), marked saved. A copy, not JSON: writing it
    /// out is the saver's work, not the evaluator's.
    pub fn take_changed(&mut self) -> Vec<(String, SubjectState)> {
        let mut out = Vec::new();
        for (subject, list) in self.subjects.iter_mut() {
            for (index, state) in list.iter_mut().filter(|(_, s)| s.changed) {
                let p = &self.policies[index];
                state.changed = false;
                out.push((format!("{}:{subject}", p.policy.id), state.clone()));
            }
        }
        out
    }

    /// What the publish path asks before queueing an event: the types
    /// these policies count.
    pub fn wants_index(&self) -> Wants {
        Wants {
            every: !self.every.is_empty(),
            exact: self.by_type.keys().cloned().collect(),
            prefixes: self.by_prefix.keys().cloned().collect(),
        }
    }
}

/// Resolves `state` if its resolution is due by `now_ms`: (when, fired).
fn settle_one(p: &Compiled, state: &mut SubjectState, now_ms: u64) -> Option<(u64, u64)> {
    let fired = state.fired_ms.get()?;
    let below = match state.below_ms.get() {
        Some(below) => below,
        None => {
            let bucket = bucket_ms(p);
            let from = state.last_ms / bucket;
            let first = state.window.first_below(from, units(p.threshold));
            let at = if first == from {
                state.last_ms
            } else {
                first * bucket
            };
            if at > now_ms {
                return None;
            }
            state.below_ms = At::some(at);
            at
        }
    };
    let due = below.saturating_add(ms(p.resolve_after));
    if due > now_ms {
        return None;
    }
    state.fired_ms = At::NONE;
    state.below_ms = At::NONE;
    Some((due, fired))
}

/// The top-level payload fields policies read (the first word of each
/// subject, `where` and `sum` path), and those the service reads of its
/// own events. A short list: a tenant's policies read a handful of
/// fields, and comparing a key with each costs less than hashing it.
#[derive(Debug, Default)]
pub struct Needed(Vec<Box<str>>);

impl Needed {
    fn add(&mut self, p: &Compiled) {
        let paths = std::iter::once(&p.subject)
            .chain(p.field.iter())
            .chain(p.conditions.iter().map(|(path, _)| path));
        for path in paths {
            if !self.0.iter().any(|n| **n == *path.first()) {
                self.0.push(path.first().into());
            }
        }
    }

    /// An event's payload with only the fields some policy reads (and
    /// `also`); the others are skipped without being copied, and keys and
    /// strings without escapes are borrowed, not copied. `None` when it is
    /// not a JSON object.
    pub fn parse<'a>(&self, data: &'a str, also: &[&str]) -> Option<Payload<'a>> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_str(data);
        Select {
            needed: &self.0,
            also,
        }
        .deserialize(&mut de)
        .ok()
    }
}

struct Select<'a> {
    needed: &'a [Box<str>],
    also: &'a [&'a str],
}

impl<'de> serde::de::DeserializeSeed<'de> for Select<'_> {
    type Value = Payload<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Select<'_> {
    type Value = Payload<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(Field<'de>, Field<'de>)> = Vec::new();
        while let Some(key) = map.next_key_seed(Text)? {
            let name: &str = &key;
            if self.needed.iter().any(|n| **n == *name) || self.also.contains(&name) {
                let value = map.next_value_seed(Text)?;
                // As a JSON object: the last of a repeated key counts.
                out.retain(|(k, _)| **k != *name);
                out.push((key, value));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Payload(out))
    }
}

/// Reads a key as text, or a value as a [`Field`]: text is borrowed from
/// the payload when it has no escapes (serde's own `Cow<str>` always
/// copies).
struct Text;

impl<'de> serde::de::DeserializeSeed<'de> for Text {
    type Value = Field<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Text {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Json(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Json(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Json(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Json(v.into()))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Json(serde_json::Value::Null))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        use serde::Deserialize;
        serde_json::Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            .map(Field::Json)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        use serde::Deserialize;
        serde_json::Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
            .map(Field::Json)
    }
}

/// A payload field as read: text, or any other JSON value.
#[derive(Debug)]
pub enum Field<'a> {
    Text(Cow<'a, str>),
    Json(serde_json::Value),
}

impl std::ops::Deref for Field<'_> {
    type Target = str;

    /// The text of a key (a key is always text).
    fn deref(&self) -> &str {
        match self {
            Field::Text(t) => t,
            Field::Json(_) => "",
        }
    }
}

/// A value found at a path of a payload.
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    Text(&'a str),
    Json(&'a serde_json::Value),
}

impl<'a> Found<'a> {
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            Found::Text(t) => Some(t),
            Found::Json(v) => v.as_str(),
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            Found::Text(_) => None,
            Found::Json(v) => v.as_f64(),
        }
    }

    /// A copy as JSON.
    #[cfg(test)]
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Found::Text(t) => t.into(),
            Found::Json(v) => v.clone(),
        }
    }
}

/// The top-level fields of a payload that policies read, as a short list
/// (building a JSON object's map for them cost more than reading them).
#[derive(Debug, Default)]
pub struct Payload<'a>(Vec<(Field<'a>, Field<'a>)>);

impl Payload<'_> {
    /// A whole payload, copied.
    #[cfg(test)]
    pub fn of(value: &serde_json::Value) -> Payload<'static> {
        Payload(
            value
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let v = match v {
                                serde_json::Value::String(s) => Field::Text(Cow::Owned(s.clone())),
                                v => Field::Json(v.clone()),
                            };
                            (Field::Text(Cow::Owned(k.clone())), v)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// A top-level field.
    pub fn get(&self, key: &str) -> Option<Found<'_>> {
        self.0
            .iter()
            .find(|(k, _)| **k == *key)
            .map(|(_, v)| match v {
                Field::Text(t) => Found::Text(t),
                Field::Json(v) => Found::Json(v),
            })
    }

    /// The value at a path.
    pub fn at(&self, path: &super::spec::Path) -> Option<Found<'_>> {
        match self.get(path.first())? {
            Found::Json(top) => path.get_under(top).map(Found::Json),
            // Text has nothing under it.
            text => path.is_top().then_some(text),
        }
    }
}

/// The event types some policy of a tenant counts: exact types, prefixes
/// (with their dot) and `*`; a few hash lookups per event whatever the
/// number of policies.
#[derive(Debug, Default)]
pub struct Wants {
    every: bool,
    exact: std::collections::HashSet<String, foldhash::quality::RandomState>,
    prefixes: std::collections::HashSet<String, foldhash::quality::RandomState>,
}

impl Wants {
    pub fn wants(&self, event_type: &str) -> bool {
        self.every
            || self.exact.contains(event_type)
            || prefixes(event_type).any(|p| self.prefixes.contains(p))
    }
}

/// `a.b.c` → `a.`, `a.b.` (the prefixes a pattern `a.*` or `a.b.*` keeps).
fn prefixes(event_type: &str) -> impl Iterator<Item = &str> {
    event_type
        .match_indices('.')
        .map(move |(i, _)| &event_type[..=i])
}

/// Equal as JSON, numbers by value (`5` equals `5.0`).
fn same(have: Found, want: &serde_json::Value) -> bool {
    let have = match have {
        Found::Text(t) => return want.as_str() == Some(t),
        Found::Json(v) => v,
    };
    match (have.as_f64(), want.as_f64()) {
        (Some(a), Some(b)) if have.is_number() && want.is_number() => a == b,
        _ => have == want,
    }
}

/// Longest subject followed; longer values are not counted.
pub const MAX_SUBJECT: usize = 128;

/// A subject's text: a string (borrowed), a number or a boolean.
fn subject_text(v: Found<'_>) -> Option<Cow<'_, str>> {
    let text = match v {
        Found::Text(s) => Cow::Borrowed(s),
        Found::Json(serde_json::Value::String(s)) => Cow::Borrowed(s.as_str()),
        Found::Json(serde_json::Value::Number(n)) => Cow::Owned(n.to_string()),
        Found::Json(serde_json::Value::Bool(b)) => Cow::Owned(b.to_string()),
        _ => return None,
    };
    (!text.is_empty() && text.len() <= MAX_SUBJECT).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::spec;

    fn policy(json: serde_json::Value) -> Arc<Compiled> {
        Arc::new(spec::check(spec::read(json.to_string().as_bytes()).unwrap()).unwrap())
    }

    fn count_policy(window: &str, threshold: u32, cooldown: &str, resolve: &str) -> Arc<Compiled> {
        policy(serde_json::json!({
            "id": "p", "name": "p",
            "match": {"types": ["agent.*"]},
            "subject": "agent_id",
            "condition": {"measure": "count", "window": window, "threshold": threshold},
            "action": {"kind": "pause", "cooldown": cooldown, "resolve_after": resolve},
        }))
    }

    fn event(eval: &mut TenantEval, at_ms: u64, agent: &str, out: &mut Vec<Outcome>) {
        let data = serde_json::json!({"agent_id": agent});
        let id = format!("e{at_ms}");
        eval.observe(
            &Seen {
                event_type: "agent.health_check",
                id: &id,
                trace_id: "t",
                at_ms,
                data: &Payload::of(&data),
            },
            true,
            1000,
            out,
        );
    }

    #[test]
    fn a_payload_is_read_for_the_fields_policies_need_only() {
        let budget = policy(serde_json::json!({
            "id": "b", "name": "b",
            "match": {"types": ["cost.updated"], "where": {"tags.team": "ml", "n": 5}},
            "subject": "workflow_id",
            "condition": {"measure": "sum", "field": "cost_usd", "window": "5m", "threshold": 10},
            "action": {"kind": "alert"},
        }));
        let eval = TenantEval::new(vec![budget], None);
        let data = r#"{"workflow_id":"wf\u002d1","pad":"x","cost_usd":2.5,"tags":{"team":"ml"},
            "n":5.0,"workflow_id":"wf-2","generated_by":"policy","nested":{"workflow_id":"no"}}"#;
        let payload = eval.needed().parse(data, &["generated_by"]).unwrap();
        // The last of a repeated key counts, as in a JSON object; an
        // escaped string is decoded.
        let text = |key: &str| payload.get(key).and_then(Found::as_str);
        assert_eq!(text("workflow_id"), Some("wf-2"));
        assert_eq!(text("generated_by"), Some("policy"));
        // Fields no policy reads are not kept.
        assert!(payload.get("pad").is_none() && payload.get("nested").is_none());
        assert_eq!(payload.get("cost_usd").and_then(Found::as_f64), Some(2.5));
        let team = spec::Path::parse("where", "tags.team").unwrap();
        assert_eq!(payload.at(&team).and_then(Found::as_str), Some("ml"));
        assert!(same(payload.get("n").unwrap(), &serde_json::json!(5)));
        // Text has nothing under it.
        let under = spec::Path::parse("subject", "workflow_id.x").unwrap();
        assert!(payload.at(&under).is_none());
        let escaped = eval
            .needed()
            .parse(r#"{"workflow_id":"a\"b"}"#, &[])
            .unwrap();
        assert_eq!(
            escaped.get("workflow_id").and_then(Found::as_str),
            Some("a\"b")
        );
        for bad in ["[1]", "\"text\"", "{\"workflow_id\":", "not json"] {
            assert!(eval.needed().parse(bad, &[]).is_none(), "{bad}");
        }
    }

    #[test]
    fn saved_times_read_as_before() {
        // States saved before times took 8 bytes: `null` or a number.
        let mut state = SubjectState::default();
        state.fire(1_234);
        let saved = serde_json::to_value(&state).unwrap();
        assert_eq!(saved["fired_ms"], serde_json::json!(1_234));
        assert_eq!(saved["below_ms"], serde_json::Value::Null);
        let back: SubjectState = serde_json::from_value(saved).unwrap();
        assert_eq!(back.fired_ms.get(), Some(1_234));
        assert_eq!(back.below_ms.get(), None);
        let old = serde_json::json!({"last_ms": 5, "fired_ms": null, "below_ms": null,
            "last_fired_ms": 7, "window": serde_json::to_value(Window::default()).unwrap(),
            "last_event": ["e1", "t1"]});
        let old: SubjectState = serde_json::from_value(old).unwrap();
        assert_eq!(old.last_fired_ms.get(), Some(7));
        assert_eq!(
            old.last_event.as_deref(),
            Some(&("e1".to_string(), "t1".to_string()))
        );
    }

    #[test]
    fn a_replaced_or_removed_policy_leaves_its_windows_behind_by_key() {
        let stamped = |at: &str| {
            let mut p = (*count_policy("10s", 5, "1m", "2s")).clone();
            p.policy.updated_at = Some(at.into());
            Arc::new(p)
        };
        let mut eval = TenantEval::new(vec![stamped("t1")], None);
        let mut out = Vec::new();
        event(&mut eval, 1_000_000, "a1", &mut out);
        event(&mut eval, 1_000_000, "a2", &mut out);
        // The same version: carried over, nothing dropped.
        let eval = TenantEval::new(vec![stamped("t1")], Some(eval));
        assert!(eval.dropped.is_empty());
        assert_eq!(eval.held(), 2);
        // A new version: its subjects start over, their saved keys named.
        let eval = TenantEval::new(vec![stamped("t2")], Some(eval));
        let mut dropped = eval.dropped.clone();
        dropped.sort();
        assert_eq!(dropped, vec!["p:a1".to_string(), "p:a2".to_string()]);
        assert_eq!(eval.held(), 0);
        assert!(eval.subject("p", "a1").is_none());
    }

    #[test]
    fn fires_once_at_the_threshold_and_resolves_after_staying_under() {
        // 10 s window (buckets of 500 ms), 5 events, resolve after 2 s.
        let mut eval = TenantEval::new(vec![count_policy("10s", 5, "1m", "2s")], None);
        let mut out = Vec::new();
        for i in 0..8 {
            event(&mut eval, 1_000_000 + i * 100, "a1", &mut out);
        }
        let fired: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Fired(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(fired.len(), 1, "{out:?}");
        assert_eq!(fired[0].at_ms, 1_000_400, "the fifth event");
        assert_eq!(fired[0].value, 5.0);
        out.clear();
        // The window empties 10 s after the burst; resolved 2 s later,
        // whenever it is looked at.
        eval.settle(1_005_000, &mut out);
        assert!(out.is_empty());
        eval.settle(1_100_000, &mut out);
        assert_eq!(
            out,
            vec![Outcome::Resolved(Resolved {
                policy_id: "p".into(),
                subject: "a1".into(),
                // Bucket 2000 (five events) leaves the window at 1,010,000.
                at_ms: 1_010_000 + 2_000,
                fired_ms: 1_000_400,
            })]
        );
    }

    #[test]
    fn no_second_firing_within_the_cooldown() {
        let mut eval = TenantEval::new(vec![count_policy("1s", 2, "1m", "0s")], None);
        let mut out = Vec::new();
        for t in [0u64, 10, 5_000, 5_010, 70_000, 70_010] {
            event(&mut eval, 1_000_000 + t, "a", &mut out);
        }
        let fired: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Outcome::Fired(f) => Some(f.at_ms - 1_000_000),
                _ => None,
            })
            .collect();
        assert_eq!(fired, vec![10, 70_010], "{out:?}");
    }

    #[test]
    fn a_sum_counts_amounts_and_where_filters() {
        let p = policy(serde_json::json!({
            "id": "budget", "name": "b",
            "match": {"types": ["cost.updated"], "where": {"source": "bedrock"}},
            "subject": "workflow_id",
            "condition": {"measure": "sum", "field": "cost_usd", "window": "1h", "threshold": 100},
            "action": {"kind": "alert"},
        }));
        let mut eval = TenantEval::new(vec![p], None);
        let mut out = Vec::new();
        let mut send = |eval: &mut TenantEval, data: serde_json::Value, at: u64| {
            eval.observe(
                &Seen {
                    event_type: "cost.updated",
                    id: "x",
                    trace_id: "t",
                    at_ms: at,
                    data: &Payload::of(&data),
                },
                true,
                10,
                &mut out,
            );
        };
        send(
            &mut eval,
            serde_json::json!({"workflow_id": "w", "source": "aws", "cost_usd": 500}),
            1,
        );
        send(
            &mut eval,
            serde_json::json!({"workflow_id": "w", "source": "bedrock", "cost_usd": "60"}),
            2,
        );
        send(
            &mut eval,
            serde_json::json!({"workflow_id": "w", "source": "bedrock", "cost_usd": 60}),
            3,
        );
        send(
            &mut eval,
            serde_json::json!({"workflow_id": "w", "source": "bedrock", "cost_usd": 40.5}),
            4,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Outcome::Fired(f) if f.value == 100.5 && f.at_ms == 4));
    }

    #[test]
    fn subjects_are_bounded_and_idle_ones_forgotten() {
        let mut eval = TenantEval::new(vec![count_policy("1s", 100, "0s", "0s")], None);
        let mut out = Vec::new();
        for i in 0..5 {
            eval.observe(
                &Seen {
                    event_type: "agent.error",
                    id: "x",
                    trace_id: "t",
                    at_ms: 1_000,
                    data: &Payload::of(&serde_json::json!({"agent_id": format!("a{i}")})),
                },
                true,
                3,
                &mut out,
            );
        }
        assert_eq!(eval.held(), 3);
        assert_eq!(eval.refused, 2);
        assert!(eval.forget_idle(1_500).is_empty(), "windows not empty yet");
        assert_eq!(eval.forget_idle(10_000).len(), 3);
        assert_eq!(eval.held(), 0);
    }

    #[test]
    fn an_evaluator_taking_over_fires_what_the_previous_one_left_unfired() {
        let mut follower = TenantEval::new(vec![count_policy("10s", 2, "1m", "1s")], None);
        let mut out = Vec::new();
        let data = serde_json::json!({"agent_id": "a"});
        for (at, id) in [(1_000u64, "e1"), (1_100, "e2")] {
            follower.observe(
                &Seen {
                    event_type: "agent.error",
                    id,
                    trace_id: "trace-2",
                    at_ms: at,
                    data: &Payload::of(&data),
                },
                false,
                10,
                &mut out,
            );
        }
        follower.take_over(&mut out);
        assert_eq!(
            out,
            vec![Outcome::Fired(Fired {
                policy_id: "p".into(),
                subject: "a".into(),
                at_ms: 1_100,
                value: 2.0,
                event_id: "e2".into(),
                trace_id: "trace-2".into(),
            })]
        );
        out.clear();
        follower.take_over(&mut out);
        assert!(out.is_empty(), "once");
    }

    #[test]
    fn a_follower_keeps_windows_and_learns_firings_from_the_leader() {
        let p = count_policy("10s", 2, "1m", "1s");
        let mut follower = TenantEval::new(vec![p], None);
        let mut out = Vec::new();
        let data = serde_json::json!({"agent_id": "a"});
        for at in [1_000u64, 1_100] {
            follower.observe(
                &Seen {
                    event_type: "agent.error",
                    id: "x",
                    trace_id: "t",
                    at_ms: at,
                    data: &Payload::of(&data),
                },
                false,
                10,
                &mut out,
            );
        }
        assert!(out.is_empty(), "a follower decides nothing");
        follower.sync("p", "a", Some(1_100));
        assert_eq!(
            follower.subject("p", "a").unwrap().fired_ms.get(),
            Some(1_100)
        );
        // Taking over, nothing fires again; it resolves as the leader would
        // have.
        follower.take_over(&mut out);
        assert!(out.is_empty(), "{out:?}");
        follower.settle(60_000, &mut out);
        assert!(
            matches!(&out[0], Outcome::Resolved(r) if r.fired_ms == 1_100 && r.at_ms == 11_000 + 1_000)
        );
    }

    /// Live (events one at a time, the clock looked at in between, at
    /// arbitrary moments) and a simulation (the same events, the clock
    /// looked at once at the end) decide the same firings and resolutions,
    /// at the same times.
    mod live_and_simulate_agree {
        use super::*;
        use proptest::prelude::*;

        fn policies() -> Vec<Arc<Compiled>> {
            vec![
                policy(serde_json::json!({
                    "id": "count", "name": "c",
                    "match": {"types": ["agent.*"]},
                    "subject": "agent_id",
                    "condition": {"measure": "count", "window": "2s", "threshold": 4},
                    "action": {"kind": "pause", "cooldown": "3s", "resolve_after": "1500ms"},
                })),
                policy(serde_json::json!({
                    "id": "sum", "name": "s",
                    "match": {"types": ["agent.cost"]},
                    "subject": "agent_id",
                    "condition": {"measure": "sum", "field": "usd", "window": "5s", "threshold": 10},
                    "action": {"kind": "alert", "cooldown": "0s", "resolve_after": "0s"},
                })),
            ]
        }

        /// (gap before it in ms, agent, usd, look at the clock before it
        /// after this many ms of the gap).
        fn events() -> impl Strategy<Value = Vec<(u64, u8, i8, Option<u64>)>> {
            proptest::collection::vec(
                (
                    0u64..1500,
                    0u8..3,
                    -3i8..8,
                    proptest::option::of(0u64..1500),
                ),
                1..120,
            )
        }

        fn run(events: &[(u64, u8, i8, Option<u64>)], ticks: bool) -> Vec<String> {
            let mut eval = TenantEval::new(policies(), None);
            let mut out = Vec::new();
            let mut t = 1_000_000u64;
            for (gap, agent, usd, tick) in events {
                if ticks && let Some(after) = tick {
                    eval.settle(t + after.min(gap), &mut out);
                }
                t += gap;
                let data = serde_json::json!({"agent_id": format!("a{agent}"), "usd": usd});
                eval.observe(
                    &Seen {
                        event_type: "agent.cost",
                        id: &format!("e{t}"),
                        trace_id: "t",
                        at_ms: t,
                        data: &Payload::of(&data),
                    },
                    true,
                    100,
                    &mut out,
                );
            }
            eval.settle(t + 60_000, &mut out);
            let mut lines: Vec<String> = out
                .into_iter()
                .map(|o| match o {
                    Outcome::Fired(f) => format!(
                        "fired {} {} {} {}",
                        f.policy_id, f.subject, f.at_ms, f.value
                    ),
                    Outcome::Resolved(r) => format!(
                        "resolved {} {} {} {}",
                        r.policy_id, r.subject, r.fired_ms, r.at_ms
                    ),
                })
                .collect();
            lines.sort();
            lines
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn whenever_the_clock_is_looked_at(events in events()) {
                prop_assert_eq!(run(&events, true), run(&events, false));
            }
        }

        #[test]
        fn the_property_sees_firings_and_resolutions() {
            // Guards the property against passing on empty outputs.
            let burst: Vec<(u64, u8, i8, Option<u64>)> = (0..10)
                .map(|i| (100, 0, 5, (i % 3 == 0).then_some(50)))
                .collect();
            let lines = run(&burst, true);
            assert!(
                lines.iter().any(|l| l.starts_with("fired count")),
                "{lines:?}"
            );
            assert!(
                lines.iter().any(|l| l.starts_with("resolved sum")),
                "{lines:?}"
            );
        }
    }
}
