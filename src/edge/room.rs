//! A tenant's room: the one task that emits a tenant's events to its
//! sockets.
//!
//! Each tenant with connected sockets has a pump: a single task that
//! follows the tenant through one broker subscription, applies the
//! tenant's rate limit, and emits each event to every member whose filter
//! matches. Because one task does all of a tenant's emitting, joining is
//! exact: a joining socket gets from history what the pump already emitted
//! after its `lastEventId`, then the session message and replay, then
//! joins, all between two emits. Tenants have separate pumps, so a noisy
//! tenant delays nobody else.
//!
//! Emits never wait: a socket whose send buffer is full stops receiving,
//! is told `too_slow` and disconnected as soon as its buffer has room, and
//! recovers what it missed by reconnecting with its last event id.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::value::RawValue;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::ratelimit::{Limit, RateLimiter};
use crate::auth::LEEWAY_SECS;
use crate::broker::{Broker, Delivery, Subscription, TypeFilter};
use crate::clock;
use crate::event::{self, Event, SharedEvent};
use crate::metrics::{EdgeMetrics, TenantLabel};
use crate::tenant::TenantScope;

/// How often a pump checks token expiry, slow sockets and drop notices.
const TICK: Duration = Duration::from_millis(250);
/// Least time between two `system.events_dropped` notices.
const NOTICE_EVERY: Duration = Duration::from_secs(1);
/// How soon waiting events are retried on a socket whose buffer was full.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Most events that may wait for one socket before it counts as too slow.
pub const MAX_BACKLOG: usize = 10_000;

/// Rate limits: a default and per-tenant overrides.
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub default: Limit,
    pub overrides: HashMap<String, u32>,
}

impl RateLimits {
    pub fn for_tenant(&self, tenant: &str) -> Limit {
        match self.overrides.get(tenant) {
            Some(&per_second) => Limit {
                per_second,
                ..self.default
            },
            None => self.default,
        }
    }
}

/// What a socket asks of its tenant's pump.
pub enum Command {
    Attach {
        socket: SocketRef,
        filter: TypeFilter,
        since: Option<String>,
        expires_at: u64,
    },
    Detach {
        sid: Sid,
    },
    SetFilter {
        sid: Sid,
        filter: TypeFilter,
    },
    SetExpiry {
        sid: Sid,
        expires_at: u64,
    },
}

impl Command {
    fn sid(&self) -> Sid {
        match self {
            Command::Attach { socket, .. } => socket.id,
            Command::Detach { sid }
            | Command::SetFilter { sid, .. }
            | Command::SetExpiry { sid, .. } => *sid,
        }
    }
}

/// Every tenant's pump, started on a tenant's first socket and retired
/// when its last socket has gone and nothing is waiting.
pub struct Rooms {
    broker: Broker,
    limits: RateLimits,
    /// Per-tenant rates from Redis (`tc:ratelimits`); they win over
    /// configured overrides.
    live_overrides: std::sync::RwLock<HashMap<String, u32>>,
    metrics: EdgeMetrics,
    pumps: Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>,
}

impl Rooms {
    pub fn new(broker: Broker, limits: RateLimits, metrics: EdgeMetrics) -> Arc<Self> {
        Arc::new(Self {
            broker,
            limits,
            live_overrides: std::sync::RwLock::new(HashMap::new()),
            metrics,
            pumps: Mutex::new(HashMap::new()),
        })
    }

    pub fn limit_for(&self, tenant: &str) -> Limit {
        let live = self
            .live_overrides
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match live.get(tenant) {
            Some(&per_second) => Limit {
                per_second,
                ..self.limits.default
            },
            None => self.limits.for_tenant(tenant),
        }
    }

    /// Replaces the per-tenant rates read from Redis; running pumps pick
    /// them up within a tick.
    pub fn set_live_overrides(&self, overrides: HashMap<String, u32>) {
        *self
            .live_overrides
            .write()
            .unwrap_or_else(|p| p.into_inner()) = overrides;
    }

    /// Hands a command to the tenant's pump, starting one if needed.
    /// Commands are sent under the map lock, the same lock under which an
    /// idle pump retires, so none is ever sent to a pump that is gone.
    pub fn send(self: &Arc<Self>, tenant: &str, command: Command) {
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = pumps.get(tenant) {
            // The pump ended (broker closing): a Detach then needs nobody.
            if let Err(mpsc::error::SendError(command)) = tx.send(command) {
                pumps.remove(tenant);
                if matches!(command, Command::Attach { .. }) {
                    self.start(&mut pumps, tenant, command);
                }
            }
        } else if matches!(command, Command::Attach { .. }) {
            self.start(&mut pumps, tenant, command);
        } else {
            tracing::debug!(sid = %command.sid(), "command for a tenant without a pump");
        }
    }

    fn start(
        self: &Arc<Self>,
        pumps: &mut HashMap<String, mpsc::UnboundedSender<Command>>,
        tenant: &str,
        first: Command,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Sending into a channel whose receiver we still hold cannot fail.
        let _ = tx.send(first);
        pumps.insert(tenant.to_string(), tx);
        let subscription = self.broker.subscribe(
            TenantScope::One(tenant.to_string()),
            TypeFilter::all(),
            None,
        );
        let pump = Pump {
            tenant: tenant.to_string(),
            label: TenantLabel::new(tenant),
            rooms: Arc::clone(self),
            emitted_upto: subscription.history_tail.clone(),
            last_received: subscription.history_tail.clone(),
            subscription,
            commands: rx,
            members: HashMap::new(),
            limiter: RateLimiter::new(self.limit_for(tenant), Instant::now()),
            last_notice: Instant::now(),
            backlogged: false,
        };
        tokio::spawn(pump.run());
    }

    /// Removes an idle pump's entry, unless a command reached it meanwhile.
    fn retire(&self, tenant: &str, commands: &mpsc::UnboundedReceiver<Command>) -> bool {
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        if !commands.is_empty() {
            return false;
        }
        pumps.remove(tenant);
        true
    }

    /// Number of tenants with a running pump.
    pub fn active_tenants(&self) -> usize {
        self.pumps.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

struct Member {
    socket: SocketRef,
    filter: TypeFilter,
    /// `exp` of the socket's token, Unix seconds.
    expires_at: u64,
    last_sent: Option<String>,
    /// Events waiting for room in the socket's send buffer (a replay larger
    /// than the buffer, or a burst), in order. While it is not empty, new
    /// events queue behind it.
    backlog: VecDeque<(String, Payload)>,
    /// Set when the socket must go (too slow, token expired): it receives
    /// nothing more and is disconnected as soon as it has been told why.
    leaving: Option<Leaving>,
}

/// A pre-serialised envelope, shared by every socket it goes to.
type Payload = Arc<RawValue>;

struct Leaving {
    code: &'static str,
    message: String,
    told: bool,
}

impl Member {
    fn leave(&mut self, code: &'static str, message: String) {
        if self.leaving.is_none() {
            self.leaving = Some(Leaving {
                code,
                message,
                told: false,
            });
        }
    }

    fn too_slow(&mut self, metrics: &EdgeMetrics) {
        if self.leaving.is_none() {
            metrics.slow_sockets.inc();
        }
        self.backlog.clear();
        self.leave(
            "too_slow",
            format!(
                "socket too slow: more than {MAX_BACKLOG} events waited for it; reconnect with lastEventId to recover what it missed"
            ),
        );
    }

    /// Sends one event, or queues it behind those already waiting. Returns
    /// false when the socket is gone.
    fn send(&mut self, id: &str, payload: &Payload, metrics: &EdgeMetrics) -> bool {
        if self.leaving.is_some() {
            return true;
        }
        if self.backlog.is_empty() {
            match self.socket.emit("event", &**payload) {
                Ok(()) => {
                    self.last_sent = Some(id.to_string());
                    metrics.events_sent.inc();
                    return true;
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {}
                Err(_) => return false,
            }
        }
        if self.backlog.len() >= MAX_BACKLOG {
            self.too_slow(metrics);
        } else {
            self.backlog
                .push_back((id.to_string(), Arc::clone(payload)));
        }
        true
    }

    /// Sends what waits, as far as the socket's buffer allows. Returns
    /// false when the socket is gone.
    fn flush(&mut self, metrics: &EdgeMetrics) -> bool {
        while let Some((id, payload)) = self.backlog.front() {
            match self.socket.emit("event", &**payload) {
                Ok(()) => {
                    metrics.events_sent.inc();
                    self.last_sent = Some(id.clone());
                    self.backlog.pop_front();
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => return true,
                Err(_) => return false,
            }
        }
        true
    }

    /// Tells the socket why, then disconnects it; both need room in its
    /// buffer, so this is retried each tick. True once it is gone.
    fn try_leave(&mut self) -> bool {
        if !self.socket.connected() {
            return true;
        }
        let Some(leaving) = &mut self.leaving else {
            return false;
        };
        if !leaving.told {
            let reason = Reason {
                code: leaving.code,
                message: leaving.message.clone(),
                last_event_id: self.last_sent.as_deref(),
            };
            match self.socket.emit("disconnect_reason", &reason) {
                Ok(()) => leaving.told = true,
                Err(SendError::Socket(SocketError::InternalChannelFull)) => return false,
                Err(_) => return true,
            }
        }
        !matches!(
            self.socket.clone().disconnect(),
            Err(SocketError::InternalChannelFull)
        )
    }
}

struct Pump {
    tenant: String,
    label: TenantLabel,
    rooms: Arc<Rooms>,
    subscription: Subscription,
    commands: mpsc::UnboundedReceiver<Command>,
    members: HashMap<Sid, Member>,
    limiter: RateLimiter,
    /// The last event handed to members (or already in history when the
    /// pump started): a joiner's replay ends here.
    emitted_upto: Option<String>,
    last_received: Option<String>,
    last_notice: Instant,
    /// Some member has events waiting for room in its buffer.
    backlogged: bool,
}

/// The envelope a socket receives on channel `event`.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    data: &'a RawValue,
    timestamp: &'a str,
    trace_id: &'a str,
}

/// The envelope as pre-serialised JSON: emitting it to each socket copies
/// bytes instead of serialising the event again.
fn payload(e: &Event) -> Option<Payload> {
    serde_json::value::to_raw_value(&Envelope {
        id: &e.id,
        event_type: &e.event_type,
        data: &e.data,
        timestamp: &e.timestamp,
        trace_id: &e.trace_id,
    })
    .ok()
    .map(Payload::from)
}

/// What the server says before disconnecting a socket, on channel
/// `disconnect_reason`.
#[derive(Serialize)]
struct Reason<'a> {
    code: &'a str,
    message: String,
    last_event_id: Option<&'a str>,
}

impl Pump {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let ready_at = self.limiter.next_ready_at();
            let paced = async {
                match ready_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let backlogged = self.backlogged;
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(c) => self.handle(c),
                    None => break,
                },
                delivery = self.subscription.next() => match delivery {
                    Some(Delivery::Event(e)) => self.arrived(e),
                    Some(Delivery::Lagged { last_id }) => self.resubscribe(last_id),
                    // The broker is closing: the server closes the sockets.
                    Some(Delivery::Closed { .. } | Delivery::Expired { .. }) | None => break,
                },
                () = paced => self.emit_ready(),
                () = tokio::time::sleep(FLUSH_EVERY), if backlogged => self.flush(),
                _ = tick.tick() => {
                    self.housekeeping();
                    if self.members.is_empty()
                        && self.limiter.waiting() == 0
                        && self.rooms.retire(&self.tenant, &self.commands)
                    {
                        break;
                    }
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Attach {
                socket,
                filter,
                since,
                expires_at,
            } => self.attach(socket, filter, since, expires_at),
            Command::Detach { sid } => {
                self.members.remove(&sid);
            }
            Command::SetFilter { sid, filter } => {
                if let Some(m) = self.members.get_mut(&sid) {
                    m.filter = filter;
                }
            }
            Command::SetExpiry { sid, expires_at } => {
                if let Some(m) = self.members.get_mut(&sid) {
                    m.expires_at = expires_at;
                }
            }
        }
    }

    /// Session message, then what the socket missed of what was already
    /// emitted, then membership: all before the next live emit.
    fn attach(
        &mut self,
        socket: SocketRef,
        filter: TypeFilter,
        since: Option<String>,
        expires_at: u64,
    ) {
        if !socket.connected() {
            return;
        }
        let replay = since.as_deref().map(|since| {
            self.rooms.broker.history_between(
                &self.tenant,
                since,
                self.emitted_upto.as_deref(),
                &filter,
            )
        });
        let limit = self.limiter.limit();
        let session = serde_json::json!({
            "socket_id": socket.id.to_string(),
            "tenant_id": self.tenant,
            "resumed": replay.is_some(),
            "recovered": replay.as_ref().is_some_and(|r| r.recovered),
            "replayed": replay.as_ref().map_or(0, |r| r.events.len()),
            "token_expires_at": clock::format_unix_secs(expires_at),
            "rate_limit": { "events_per_second": limit.per_second, "queue": limit.queue },
            "types": filter.patterns(),
        });
        let mut member = Member {
            socket,
            filter,
            expires_at,
            last_sent: None,
            backlog: VecDeque::new(),
            leaving: None,
        };
        if member.socket.emit("session", &session).is_err() {
            return;
        }
        for e in replay.map(|r| r.events).unwrap_or_default() {
            if let Some(p) = payload(&e) {
                self.rooms.metrics.events_replayed.inc();
                member.send(&e.id, &p, &self.rooms.metrics);
            }
        }
        self.backlogged |= !member.backlog.is_empty();
        self.members.insert(member.socket.id, member);
    }

    fn arrived(&mut self, event: SharedEvent) {
        self.last_received = Some(event.id.clone());
        if self.members.is_empty() && self.limiter.waiting() == 0 {
            // Nobody to pace for: count it as emitted so a joiner's replay
            // includes it.
            self.emitted_upto = Some(event.id.clone());
            return;
        }
        let pushed = self.limiter.push(event, Instant::now());
        if pushed.delayed {
            self.rooms
                .metrics
                .rate_delayed
                .get_or_create(&self.label)
                .inc();
        }
        if pushed.dropped.is_some() {
            self.rooms
                .metrics
                .rate_dropped
                .get_or_create(&self.label)
                .inc();
        }
        self.emit_ready();
    }

    fn emit_ready(&mut self) {
        let now = Instant::now();
        while let Some(event) = self.limiter.pop_ready(now) {
            self.deliver(&event);
        }
    }

    fn deliver(&mut self, event: &Event) {
        self.emitted_upto = Some(event.id.clone());
        let Some(p) = payload(event) else {
            return;
        };
        let metrics = &self.rooms.metrics;
        let mut backlogged = false;
        self.members.retain(|_, m| {
            if m.leaving.is_some() || !m.filter.matches(&event.event_type) {
                return true;
            }
            let alive = m.send(&event.id, &p, metrics);
            backlogged |= !m.backlog.is_empty();
            alive
        });
        self.backlogged |= backlogged;
    }

    /// Retries events waiting for sockets whose buffers were full.
    fn flush(&mut self) {
        let metrics = &self.rooms.metrics;
        let mut backlogged = false;
        self.members.retain(|_, m| {
            let alive = m.flush(metrics);
            backlogged |= !m.backlog.is_empty();
            alive
        });
        self.backlogged = backlogged;
    }

    /// The pump itself fell behind the broker: pick up where it left off.
    fn resubscribe(&mut self, last_id: Option<String>) {
        let since = last_id.or_else(|| self.last_received.clone());
        tracing::warn!(tenant = %self.tenant, "Socket.IO pump fell behind; resuming from history");
        self.subscription = self.rooms.broker.subscribe(
            TenantScope::One(self.tenant.clone()),
            TypeFilter::all(),
            since.as_deref(),
        );
        if self.subscription.recovered == Some(false) {
            tracing::error!(tenant = %self.tenant, "history did not reach back: sockets missed events");
        }
    }

    fn housekeeping(&mut self) {
        let limit = self.rooms.limit_for(&self.tenant);
        if limit != self.limiter.limit() {
            tracing::info!(tenant = %self.tenant, per_second = limit.per_second, "rate limit changed");
            self.limiter.set_limit(limit);
        }
        if self.last_notice.elapsed() >= NOTICE_EVERY {
            let dropped = self.limiter.take_dropped();
            if !dropped.is_empty() {
                self.last_notice = Instant::now();
                self.notify_dropped(&dropped);
            }
        }
        let now = clock::unix_secs();
        let metrics = &self.rooms.metrics;
        self.members.retain(|_, m| {
            if m.leaving.is_none() && m.expires_at + LEEWAY_SECS < now {
                let at = clock::format_unix_secs(m.expires_at);
                metrics.expired_sockets.inc();
                m.leave(
                    "token_expired",
                    format!("token expired at {at}: reconnect with a fresh token"),
                );
            }
            m.leaving.is_none() || !m.try_leave()
        });
    }

    /// One `system.events_dropped` notice per member, with the counts of the
    /// types its filter covers.
    fn notify_dropped(&mut self, dropped: &BTreeMap<String, u64>) {
        let now = SystemTime::now();
        // A notice is not an event of the history: its id is the stream
        // position it was sent at (the last event emitted before it), so a
        // client that resumes from the id it saw last misses nothing.
        let id = self
            .emitted_upto
            .clone()
            .unwrap_or_else(event::new_event_id);
        let (timestamp, trace_id) = (clock::format_timestamp(now), event::new_trace_id());
        let metrics = &self.rooms.metrics;
        for m in self.members.values_mut() {
            if m.leaving.is_some() {
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
            let total: u64 = counts.values().sum();
            let notice = serde_json::json!({
                "id": id,
                "type": "system.events_dropped",
                "data": { "dropped": counts, "total": total, "reason": "rate_limit" },
                "timestamp": timestamp,
                "trace_id": trace_id,
            });
            if let Ok(p) = serde_json::value::to_raw_value(&notice) {
                m.send(&id, &Payload::from(p), metrics);
                self.backlogged |= !m.backlog.is_empty();
            }
        }
    }
}
