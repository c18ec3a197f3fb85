//! The rooms: every tenant's pump ([`super::pump`]), started on a tenant's
//! first socket and retired when its last socket has gone and nothing is
//! waiting. Sockets talk to their tenant's pump through [`Command`]s, so
//! one task does all of a tenant's emitting. The pump tasks are tracked:
//! shutdown waits for them. A pump is supervised: if it panics, its
//! tenant's sockets are told why (`internal_error`) and disconnected, so
//! they reconnect with their last event id instead of staying connected
//! and silent, and the next socket of the tenant starts a new pump.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures_util::FutureExt;
use socketioxide::SocketIo;
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
    /// `TC_RATE_LIMIT_OVERRIDES`.
    pub overrides: HashMap<String, u32>,
    /// Set at run time (the admin API, Redis `tc:ratelimits`): they win
    /// over the configured overrides.
    pub live: crate::admin::LiveRates,
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
    /// Each socket's backlog cap (`TC_SOCKET_BUFFER_BYTES`).
    socket_buffer_bytes: usize,
    metrics: EdgeMetrics,
    pumps: Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>,
    tasks: TaskTracker,
    /// The Socket.IO handle, to disconnect a failed pump's sockets.
    io: OnceLock<SocketIo>,
    /// Sockets connected per tenant, and the cap.
    sockets: Mutex<HashMap<String, usize>>,
    max_sockets_per_tenant: usize,
}

impl Rooms {
    pub fn new(
        broker: Broker,
        limits: RateLimits,
        socket_buffer_bytes: usize,
        max_sockets_per_tenant: usize,
        metrics: EdgeMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            broker,
            limits,
            socket_buffer_bytes,
            metrics,
            pumps: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            io: OnceLock::new(),
            sockets: Mutex::new(HashMap::new()),
            max_sockets_per_tenant,
        })
    }

    /// Whether `tenant` may open one more socket (checked at handshake;
    /// concurrent handshakes may pass it by a few).
    pub fn has_room_for(&self, tenant: &str) -> Result<(), usize> {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        match sockets.get(tenant) {
            Some(&n) if n >= self.max_sockets_per_tenant => Err(n),
            _ => Ok(()),
        }
    }

    /// A socket of `tenant` connected (`+1`) or left (`-1`).
    pub fn count_socket(&self, tenant: &str, joined: bool) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if joined {
            *sockets.entry(tenant.to_string()).or_default() += 1;
        } else if let Some(n) = sockets.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sockets.remove(tenant);
            }
        }
    }

    /// Gives the rooms the Socket.IO handle (once, when it is built).
    pub fn set_io(&self, io: SocketIo) {
        let _ = self.io.set(io);
    }

    pub fn limit_for(&self, tenant: &str) -> Limit {
        match self.limits.live.get(tenant) {
            Some(per_second) => Limit {
                per_second,
                ..self.limits.default
            },
            None => self.limits.for_tenant(tenant),
        }
    }

    /// Replaces the per-tenant rates read from Redis; running pumps pick
    /// them up within a tick.
    pub fn set_live_overrides(&self, overrides: HashMap<String, u32>) {
        self.limits.live.replace(overrides);
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
            self.socket_buffer_bytes,
            subscription.history_tail.clone(),
            Instant::now(),
        );
        let rooms = Arc::clone(self);
        let tenant = tenant.to_string();
        self.tasks.spawn(async move {
            let run = pump::run(pump, subscription, rx, Arc::clone(&rooms));
            if let Err(what) = supervised(run).await {
                rooms.pump_failed(&tenant, what).await;
            }
        });
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

    /// A pump panicked: forget it and disconnect its tenant's sockets with
    /// a reason, so that they resume elsewhere or on the next pump.
    async fn pump_failed(&self, tenant: &str, what: String) {
        tracing::error!(%tenant, "Socket.IO pump failed ({what}); disconnecting the tenant's sockets");
        self.metrics.pump_failures.inc();
        self.pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        let Some(io) = self.io.get() else {
            return;
        };
        let reason = serde_json::json!({
            "code": "internal_error",
            "message": "the server failed to deliver to this socket: reconnect with lastEventId to recover what it missed",
            "last_event_id": null,
        });
        let room = super::room_name(tenant);
        let _ = io.to(room.clone()).emit("disconnect_reason", &reason).await;
        let _ = io.to(room).disconnect().await;
    }

    /// Waits for every pump to end (they end when the broker closes).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Runs `task`; a panic in it becomes an error with what the panic said.
async fn supervised(task: impl Future<Output = ()>) -> Result<(), String> {
    AssertUnwindSafe(task)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_reported_not_lost() {
        assert_eq!(supervised(async {}).await, Ok(()));
        let n = 3;
        let failed = supervised(async move {
            if n > 2 {
                panic!("pump broke at {n}");
            }
        })
        .await;
        assert_eq!(failed, Err("pump broke at 3".into()));
    }
}
