//! A tenant's pump: the one task that emits a tenant's events to its
//! sockets.
//!
//! The pump follows the tenant through one broker subscription, applies
//! the tenant's rate limit, and emits each event to every member whose
//! filter matches. Because one task does all of a tenant's emitting,
//! joining is exact: a joining socket gets from history what the pump
//! already emitted after its `lastEventId`, then the session message and
//! replay, then joins, all between two emits. Tenants have separate pumps,
//! so a noisy tenant delays nobody else.
//!
//! [`Pump`] is the logic, driven with an explicit clock (tested without
//! sleeping or sockets); [`run`] is the task that drives it with timers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::member::{Member, Outlet};
use super::ratelimit::{Limit, RateLimiter};
use super::rooms::{Command, Rooms};
use crate::auth;
use crate::broker::{Broker, Delivery, Subscription, TypeFilter};
use crate::clock;
use crate::event::socketio;
use crate::event::{self, Event, SharedEvent};
use crate::metrics::EdgeMetrics;
use crate::otlp::Transport;

/// How often a pump checks token expiry, slow sockets and drop notices.
const TICK: Duration = Duration::from_millis(250);
/// Least time between two `system.events_dropped` notices.
const NOTICE_EVERY: Duration = Duration::from_secs(1);
/// How soon waiting events are retried on a socket whose buffer was full.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Least time between two log lines about one tenant's rate-limit drops.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// One tenant's emitting state.
pub(super) struct Pump<O> {
    tenant: String,
    broker: Broker,
    metrics: EdgeMetrics,
    /// Boxed: a tenant's table keeps a pointer per slot, and a hash table
    /// has up to twice as many slots as members (a member is about 180
    /// bytes; about 0.4 KiB a socket inline at 1,000 sockets a tenant).
    members: HashMap<Sid, Box<Member<O>>>,
    limiter: RateLimiter,
    /// Each member's backlog cap (`TC_SOCKET_BUFFER_BYTES`).
    max_backlog_bytes: usize,
    /// The last event handed to members (or already in history when the
    /// pump started): a joiner's replay ends here.
    emitted_upto: Option<String>,
    /// The last event received from the broker.
    last_received: Option<String>,
    last_notice: Instant,
    /// Some member has events waiting for room in its buffer.
    backlogged: bool,
    /// Rate-limit drops not yet logged, and when they last were.
    dropped_unlogged: u64,
    dropped_logged_at: Option<Instant>,
}

impl<O: Outlet> Pump<O> {
    /// A pump for `tenant` whose subscription started after `history_tail`.
    pub(super) fn new(
        tenant: &str,
        broker: Broker,
        metrics: EdgeMetrics,
        limit: Limit,
        max_backlog_bytes: usize,
        history_tail: Option<String>,
        now: Instant,
    ) -> Self {
        Self {
            tenant: tenant.to_string(),
            broker,
            metrics,
            members: HashMap::new(),
            limiter: RateLimiter::new(limit, now),
            max_backlog_bytes,
            emitted_upto: history_tail.clone(),
            last_received: history_tail,
            last_notice: now,
            backlogged: false,
            dropped_unlogged: 0,
            dropped_logged_at: None,
        }
    }

    /// Nobody left and nothing waiting: the pump may retire.
    pub(super) fn is_idle(&self) -> bool {
        self.members.is_empty() && self.limiter.waiting() == 0
    }

    /// When the next event held back by the rate limit may go out.
    pub(super) fn next_ready_at(&self) -> Option<Instant> {
        self.limiter.next_ready_at()
    }

    pub(super) fn backlogged(&self) -> bool {
        self.backlogged
    }

    /// Session message, then what the socket missed of what was already
    /// emitted, then membership: all before the next live emit.
    pub(super) fn attach(
        &mut self,
        socket: O,
        filter: TypeFilter,
        since: Option<String>,
        expires_at: u64,
    ) {
        if !socket.connected() {
            return;
        }
        let replay = since.as_deref().map(|since| {
            self.broker
                .history_between(&self.tenant, since, self.emitted_upto.as_deref(), &filter)
        });
        let limit = self.limiter.limit();
        let session = serde_json::json!({
            "socket_id": socket.sid().to_string(),
            "tenant_id": self.tenant,
            "resumed": replay.is_some(),
            "recovered": replay.as_ref().is_some_and(|r| r.recovered),
            "replayed": replay.as_ref().map_or(0, |r| r.events.len()),
            "token_expires_at": clock::format_unix_secs(expires_at),
            "rate_limit": { "events_per_second": limit.per_second, "queue": limit.queue },
            "types": filter.patterns(),
        });
        let Ok(session) = serde_json::value::to_raw_value(&session) else {
            return;
        };
        let mut member = Member::new(socket, filter, expires_at, self.max_backlog_bytes);
        if member.socket.emit("session", &session).is_err() {
            return;
        }
        for e in replay.map(|r| r.events).unwrap_or_default() {
            if let Some(p) = socketio::payload(&e) {
                self.metrics.events_replayed.inc();
                member.send(&e.id, &p, &self.metrics);
            }
        }
        self.backlogged |= member.is_backlogged();
        self.members.insert(member.socket.sid(), Box::new(member));
    }

    pub(super) fn detach(&mut self, sid: Sid) {
        self.members.remove(&sid);
    }

    pub(super) fn set_filter(&mut self, sid: Sid, filter: TypeFilter) {
        if let Some(m) = self.members.get_mut(&sid) {
            m.filter = filter;
        }
    }

    pub(super) fn set_expiry(&mut self, sid: Sid, expires_at: u64) {
        if let Some(m) = self.members.get_mut(&sid) {
            m.expires_at = expires_at;
        }
    }

    /// An event from the broker: paced by the rate limit, then emitted.
    pub(super) fn arrived(&mut self, event: SharedEvent, now: Instant) {
        self.last_received = Some(event.id.clone());
        if self.is_idle() {
            // Nobody to pace for: count it as emitted so a joiner's replay
            // includes it.
            self.emitted_upto = Some(event.id.clone());
            return;
        }
        let pushed = self.limiter.push(event, now);
        if pushed.delayed {
            self.metrics.rate_delayed.inc();
        }
        if pushed.dropped.is_some() {
            self.metrics.rate_dropped.inc();
            self.dropped_unlogged += 1;
            // The metric has no tenant label (bounded cardinality): the
            // tenant is named here, at most once per DROP_LOG_EVERY.
            if self
                .dropped_logged_at
                .is_none_or(|at| now.duration_since(at) >= DROP_LOG_EVERY)
            {
                tracing::warn!(
                    tenant = %self.tenant,
                    dropped = self.dropped_unlogged,
                    "rate limit: events dropped for this tenant's sockets (TC_RATE_LIMIT_PER_TENANT, TC_RATE_LIMIT_QUEUE)"
                );
                self.dropped_unlogged = 0;
                self.dropped_logged_at = Some(now);
            }
        }
        self.emit_ready(now);
    }

    /// Emits what the rate limit lets out by `now`.
    pub(super) fn emit_ready(&mut self, now: Instant) {
        while let Some(event) = self.limiter.pop_ready(now) {
            self.deliver(&event);
        }
    }

    fn deliver(&mut self, event: &Event) {
        self.emitted_upto = Some(event.id.clone());
        let Some(p) = socketio::payload(event) else {
            return;
        };
        self.metrics.emit_latency.socketio(&event.timestamp);
        let started = self.metrics.tracer.is_on().then(SystemTime::now);
        let metrics = &self.metrics;
        let mut backlogged = false;
        let mut recipients = 0;
        self.members.retain(|_, m| {
            if m.is_leaving() || !m.filter.matches(&event.event_type) {
                return true;
            }
            recipients += 1;
            let alive = m.send(&event.id, &p, metrics);
            backlogged |= m.is_backlogged();
            alive
        });
        self.backlogged |= backlogged;
        if let Some(started) = started {
            self.metrics
                .tracer
                .delivered(Transport::Socketio, [event], recipients, started);
        }
    }

    /// Retries events waiting for sockets whose buffers were full.
    pub(super) fn flush(&mut self) {
        let metrics = &self.metrics;
        let mut backlogged = false;
        self.members.retain(|_, m| {
            let alive = m.flush(metrics);
            backlogged |= m.is_backlogged();
            alive
        });
        self.backlogged = backlogged;
    }

    /// Every tick: the current rate limit, drop notices, token expiry, and
    /// sockets that must leave. `unix_now` is the wall clock in seconds.
    pub(super) fn housekeeping(&mut self, limit: Limit, now: Instant, unix_now: u64) {
        if limit != self.limiter.limit() {
            tracing::info!(tenant = %self.tenant, per_second = limit.per_second, "rate limit changed");
            self.limiter.set_limit(limit);
        }
        if now.saturating_duration_since(self.last_notice) >= NOTICE_EVERY {
            let dropped = self.limiter.take_dropped();
            if !dropped.is_empty() {
                self.last_notice = now;
                self.notify_dropped(&dropped);
            }
        }
        let metrics = &self.metrics;
        self.members.retain(|_, m| {
            if !m.is_leaving() && auth::valid_until(m.expires_at) < unix_now {
                metrics.expired_sockets.inc();
                m.leave(
                    "token_expired",
                    format!(
                        "token expired at {}: reconnect with a fresh token",
                        clock::format_unix_secs(m.expires_at)
                    ),
                );
            }
            !m.is_leaving() || !m.try_leave()
        });
    }

    /// One `system.events_dropped` notice per member, with the counts of the
    /// types its filter covers.
    fn notify_dropped(&mut self, dropped: &BTreeMap<String, u64>) {
        // A notice is not an event of the history: its id is the stream
        // position it was sent at, so resuming from it misses nothing.
        let id = self
            .emitted_upto
            .clone()
            .unwrap_or_else(event::new_event_id);
        let timestamp = clock::format_timestamp(SystemTime::now());
        let trace_id = event::new_trace_id();
        for m in self.members.values_mut() {
            if m.is_leaving() {
                continue;
            }
            let counts: BTreeMap<&str, u64> = dropped
                .iter()
                .filter(|(t, _)| m.filter.matches(t))
                .map(|(t, n)| (t.as_str(), *n))
                .collect();
            if counts.is_empty() {
                continue;
            }
            if let Some(p) = socketio::dropped_notice(&id, &counts, &timestamp, &trace_id) {
                m.send(&id, &p, &self.metrics);
                self.backlogged |= m.is_backlogged();
            }
        }
    }

    /// Where to resubscribe from after the pump itself fell behind.
    fn resume_point(&self, last_id: Option<String>) -> Option<String> {
        last_id.or_else(|| self.last_received.clone())
    }
}

/// Drives a tenant's pump until the broker closes or the room retires it.
pub(super) async fn run(
    mut pump: Pump<SocketRef>,
    mut subscription: Subscription,
    mut commands: mpsc::UnboundedReceiver<Command>,
    rooms: Arc<Rooms>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let ready_at = pump.next_ready_at();
        let paced = async {
            match ready_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let backlogged = pump.backlogged();
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(Command::Attach { socket, filter, since, expires_at }) => {
                    pump.attach(socket, filter, since, expires_at);
                }
                Some(Command::Detach { sid }) => pump.detach(sid),
                Some(Command::SetFilter { sid, filter }) => pump.set_filter(sid, filter),
                Some(Command::SetExpiry { sid, expires_at }) => pump.set_expiry(sid, expires_at),
                None => break,
            },
            delivery = subscription.next() => match delivery {
                Some(Delivery::Event(e)) => pump.arrived(e, Instant::now()),
                Some(Delivery::Lagged { last_id }) => {
                    // The pump itself fell behind the broker: pick up where
                    // it left off.
                    let since = pump.resume_point(last_id);
                    tracing::warn!(tenant = %pump.tenant, "Socket.IO pump fell behind; resuming from history");
                    subscription = rooms.follow(&pump.tenant, since.as_deref());
                    if subscription.recovered == Some(false) {
                        tracing::error!(tenant = %pump.tenant, "history did not reach back: sockets missed events");
                    }
                }
                // The broker is closing: the server closes the sockets.
                Some(Delivery::Closed { .. } | Delivery::Expired { .. }) | None => break,
            },
            () = paced => pump.emit_ready(Instant::now()),
            () = tokio::time::sleep(FLUSH_EVERY), if backlogged => pump.flush(),
            _ = tick.tick() => {
                pump.housekeeping(rooms.limit_for(&pump.tenant), Instant::now(), clock::unix_secs());
                if pump.is_idle() && rooms.retire(&pump.tenant, &commands) {
                    break;
                }
            }
        }
    }
}

/// The broker subscription a pump follows: every event of the tenant.
pub(super) fn follow(broker: &Broker, tenant: &str, since: Option<&str>) -> Subscription {
    broker.follow(tenant, since)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use serde_json::value::RawValue;

    use super::*;
    use crate::broker::BrokerConfig;
    use crate::edge::member::Emit;

    /// A socket that records what it is sent. `room` is how many more
    /// messages its buffer takes (`usize::MAX`: always room).
    #[derive(Clone)]
    struct Recorder {
        sid: Sid,
        sent: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
        room: Arc<AtomicUsize>,
        connected: Arc<AtomicBool>,
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                sid: Sid::new(),
                sent: Arc::default(),
                room: Arc::new(AtomicUsize::new(usize::MAX)),
                connected: Arc::new(AtomicBool::new(true)),
            }
        }

        /// The ids of the `event` messages received, in order.
        fn event_ids(&self) -> Vec<String> {
            self.messages("event")
                .iter()
                .map(|v| v["id"].as_str().unwrap_or_default().to_string())
                .collect()
        }

        fn messages(&self, name: &str) -> Vec<serde_json::Value> {
            self.sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        }

        fn names(&self) -> Vec<String> {
            let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            sent.iter().map(|(n, _)| n.clone()).collect()
        }
    }

    impl Outlet for Recorder {
        fn sid(&self) -> Sid {
            self.sid
        }
        fn connected(&self) -> bool {
            self.connected.load(Ordering::SeqCst)
        }
        fn emit(&self, name: &str, data: &RawValue) -> Result<(), Emit> {
            if !self.connected() {
                return Err(Emit::Gone);
            }
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(Emit::Full);
            }
            if room != usize::MAX {
                self.room.store(room - 1, Ordering::SeqCst);
            }
            let value = serde_json::from_str(data.get()).unwrap_or_default();
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            sent.push((name.to_string(), value));
            Ok(())
        }
        fn disconnect(&self) -> Result<(), Emit> {
            if self.room.load(Ordering::SeqCst) == 0 {
                return Err(Emit::Full);
            }
            self.connected.store(false, Ordering::SeqCst);
            Ok(())
        }
    }

    const TENANT: &str = "tenant-a";
    /// Each test member's backlog cap: a few thousand small events.
    const BACKLOG_BYTES: usize = 1 << 20;

    fn event(id: &str, event_type: &str) -> Event {
        crate::broker::tests::event(TENANT, id, event_type)
    }

    /// A broker, a pump that follows it, and a way to publish into both
    /// the way the driver would (publish, then hand the event to the pump).
    struct Setup {
        broker: Broker,
        pump: Pump<Recorder>,
        subscription: Subscription,
        t0: Instant,
    }

    impl Setup {
        fn new(per_second: u32) -> Self {
            let broker = Broker::new(BrokerConfig::default());
            let subscription = follow(&broker, TENANT, None);
            let t0 = Instant::now();
            let pump = Pump::new(
                TENANT,
                broker.clone(),
                EdgeMetrics::default(),
                Limit {
                    per_second,
                    queue: 100,
                },
                BACKLOG_BYTES,
                subscription.history_tail.clone(),
                t0,
            );
            Self {
                broker,
                pump,
                subscription,
                t0,
            }
        }

        /// Publishes `ids` (type from the id's prefix before `-`) and lets
        /// the pump receive them at `at`.
        fn publish(&mut self, ids: &[&str], at: Instant) {
            for id in ids {
                let event_type = format!("{}.x", id.split('-').next().unwrap_or("a"));
                self.broker.publish_one(event(id, &event_type));
                while let Some(Delivery::Event(e)) = self.next_now() {
                    self.pump.arrived(e, at);
                }
            }
        }

        fn next_now(&mut self) -> Option<Delivery> {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            match tokio_stream::Stream::poll_next(
                std::pin::Pin::new(&mut self.subscription),
                &mut cx,
            ) {
                std::task::Poll::Ready(d) => d,
                std::task::Poll::Pending => None,
            }
        }

        fn join(&mut self, types: &[&str], since: Option<&str>) -> Recorder {
            let socket = Recorder::new();
            let filter = TypeFilter::parse(types).expect("filter");
            self.pump.attach(
                socket.clone(),
                filter,
                since.map(String::from),
                clock::unix_secs() + 3600,
            );
            socket
        }
    }

    #[test]
    fn members_get_their_types_in_publish_order() {
        let mut s = Setup::new(1000);
        let all = s.join(&[], None);
        let costs = s.join(&["cost.*"], None);
        s.publish(&["cost-1", "alert-2", "cost-3", "ml-4", "cost-5"], s.t0);
        assert_eq!(
            all.event_ids(),
            ["cost-1", "alert-2", "cost-3", "ml-4", "cost-5"]
        );
        assert_eq!(costs.event_ids(), ["cost-1", "cost-3", "cost-5"]);
        assert_eq!(all.names()[0], "session", "the session message comes first");
    }

    #[test]
    fn the_rate_limit_paces_without_losing_order() {
        let mut s = Setup::new(10);
        let socket = s.join(&[], None);
        let ids: Vec<String> = (0..15).map(|i| format!("a-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        s.publish(&refs, s.t0);
        assert_eq!(socket.event_ids().len(), 10, "one second of burst at once");
        let next = s.pump.next_ready_at().expect("five wait");
        assert_eq!(next, s.t0 + Duration::from_millis(100));
        s.pump.emit_ready(next - Duration::from_millis(1));
        assert_eq!(socket.event_ids().len(), 10, "not before its time");
        s.pump.emit_ready(next);
        assert_eq!(socket.event_ids().len(), 11);
        s.pump.emit_ready(s.t0 + Duration::from_secs(1));
        assert_eq!(socket.event_ids(), ids, "all of them, in order");
        assert!(s.pump.next_ready_at().is_none());
    }

    #[test]
    fn a_joiner_gets_what_was_emitted_since_its_id_then_live_without_gap_or_duplicate() {
        let mut s = Setup::new(2);
        let first = s.join(&[], None);
        // e1 and e2 go out at once (burst of 2); e3 and e4 wait for the rate.
        s.publish(&["a-1", "a-2", "a-3", "a-4"], s.t0);
        assert_eq!(first.event_ids(), ["a-1", "a-2"]);
        // A socket that saw a-1 joins while a-3 and a-4 wait: history gives
        // it a-2 (emitted, missed); a-3 and a-4 come live, once.
        let joiner = s.join(&[], Some("a-1"));
        let session = &joiner.messages("session")[0];
        assert_eq!(session["resumed"], true);
        assert_eq!(session["recovered"], true);
        assert_eq!(session["replayed"], 1);
        assert_eq!(joiner.event_ids(), ["a-2"]);
        s.pump.emit_ready(s.t0 + Duration::from_secs(1));
        s.publish(&["a-5"], s.t0 + Duration::from_secs(2));
        assert_eq!(joiner.event_ids(), ["a-2", "a-3", "a-4", "a-5"]);
        assert_eq!(first.event_ids(), ["a-1", "a-2", "a-3", "a-4", "a-5"]);
        // An id no longer (or never) held: everything emitted, recovered false.
        let lost = s.join(&[], Some("unknown"));
        assert_eq!(lost.messages("session")[0]["recovered"], false);
        assert_eq!(lost.event_ids(), ["a-1", "a-2", "a-3", "a-4", "a-5"]);
    }

    #[test]
    fn events_before_anyone_joined_count_as_emitted() {
        let mut s = Setup::new(1000);
        s.publish(&["a-1", "a-2"], s.t0);
        let joiner = s.join(&[], Some("a-1"));
        assert_eq!(joiner.event_ids(), ["a-2"]);
    }

    #[test]
    fn a_full_buffer_holds_events_back_in_order_and_too_many_disconnect() {
        let mut s = Setup::new(1_000_000);
        let slow = s.join(&[], None);
        slow.room.store(2, Ordering::SeqCst);
        s.publish(&["a-1", "a-2", "a-3", "a-4"], s.t0);
        assert_eq!(slow.event_ids(), ["a-1", "a-2"]);
        assert!(s.pump.backlogged());
        slow.room.store(usize::MAX, Ordering::SeqCst);
        s.pump.flush();
        assert_eq!(slow.event_ids(), ["a-1", "a-2", "a-3", "a-4"]);
        assert!(!s.pump.backlogged());

        slow.room.store(0, Ordering::SeqCst);
        // Small events cost about 250 bytes each in a backlog: 10,000 of
        // them are well past the cap.
        let ids: Vec<String> = (0..10_000).map(|i| format!("b-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        s.publish(&refs, s.t0);
        slow.room.store(usize::MAX, Ordering::SeqCst);
        s.pump
            .housekeeping(s.pump.limiter.limit(), s.t0, clock::unix_secs());
        let reason = &slow.messages("disconnect_reason")[0];
        assert_eq!(reason["code"], "too_slow");
        assert_eq!(reason["last_event_id"], "a-4");
        assert!(!slow.connected(), "disconnected after being told");
        assert!(s.pump.is_idle(), "and gone from the room");
    }

    #[test]
    fn an_expired_token_is_told_and_disconnected() {
        let mut s = Setup::new(1000);
        let socket = Recorder::new();
        let exp = clock::unix_secs() + 60;
        s.pump.attach(socket.clone(), TypeFilter::all(), None, exp);
        let limit = s.pump.limiter.limit();
        s.pump.housekeeping(limit, s.t0, auth::valid_until(exp));
        assert!(socket.connected(), "not before exp + leeway");
        s.pump.housekeeping(limit, s.t0, auth::valid_until(exp) + 1);
        assert_eq!(
            socket.messages("disconnect_reason")[0]["code"],
            "token_expired"
        );
        assert!(!socket.connected());
    }

    #[test]
    fn rate_limited_drops_are_noticed_per_member_filter() {
        let mut s = Setup::new(1);
        s.pump.limiter.set_limit(Limit {
            per_second: 1,
            queue: 1,
        });
        let costs = s.join(&["cost.*"], None);
        let alerts = s.join(&["alert.*"], None);
        s.publish(&["cost-1", "cost-2", "cost-3", "alert-4"], s.t0);
        let limit = s.pump.limiter.limit();
        s.pump
            .housekeeping(limit, s.t0 + NOTICE_EVERY, clock::unix_secs());
        let notice = costs
            .messages("event")
            .into_iter()
            .find(|e| e["type"] == "system.events_dropped")
            .expect("a notice for the cost socket");
        assert_eq!(notice["data"]["dropped"]["cost.x"], 2);
        assert_eq!(notice["id"], "cost-1", "the position it was sent at");
        assert!(
            alerts
                .messages("event")
                .iter()
                .all(|e| e["type"] != "system.events_dropped"),
            "nothing of its types was dropped"
        );
    }
}
