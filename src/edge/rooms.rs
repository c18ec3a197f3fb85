//! The rooms: every tenant's pump ([`super::pump`]), started on a tenant's
//! first socket and retired when its last socket has gone and nothing is
//! waiting. Sockets talk to their tenant's pump through [`Command`]s, so
//! one task does all of a tenant's emitting. The pump tasks are tracked:
//! shutdown waits for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::pump::{self, Pump};
use super::ratelimit::Limit;
use crate::broker::{Broker, Subscription, TypeFilter};
use crate::metrics::EdgeMetrics;

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
    tasks: TaskTracker,
}

impl Rooms {
    pub fn new(broker: Broker, limits: RateLimits, metrics: EdgeMetrics) -> Arc<Self> {
        Arc::new(Self {
            broker,
            limits,
            live_overrides: std::sync::RwLock::new(HashMap::new()),
            metrics,
            pumps: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
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
        let subscription = self.follow(tenant, None);
        let pump = Pump::new(
            tenant,
            self.broker.clone(),
            self.metrics.clone(),
            self.limit_for(tenant),
            subscription.history_tail.clone(),
            Instant::now(),
        );
        self.tasks
            .spawn(pump::run(pump, subscription, rx, Arc::clone(self)));
    }

    /// A subscription to every event of `tenant`, after `since`.
    pub(super) fn follow(&self, tenant: &str, since: Option<&str>) -> Subscription {
        pump::follow(&self.broker, tenant, since)
    }

    /// Removes an idle pump's entry, unless a command reached it meanwhile.
    pub(super) fn retire(&self, tenant: &str, commands: &mpsc::UnboundedReceiver<Command>) -> bool {
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        if !commands.is_empty() {
            return false;
        }
        pumps.remove(tenant);
        true
    }

    /// Waits for every pump to end (they end when the broker closes).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
