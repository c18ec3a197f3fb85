//! One socket in its tenant's room: what it follows, what waits for room
//! in its send buffer (the backlog), and leaving (told why, then
//! disconnected).
//!
//! Emits never wait. A socket whose send buffer (`TC_SOCKET_BUFFER`
//! packets, held by socketioxide) is full queues events in its backlog, in
//! order, retried by the pump; past `TC_SOCKET_BUFFER_BYTES` of backlog it
//! is too slow: it receives nothing more, is told `too_slow` and
//! disconnected as soon as its buffer has room (or closed by the engine's
//! heartbeat if it never reads again), and recovers what it missed by
//! reconnecting with its last event id. A backlog entry shares the
//! tenant's encoded payload; it is counted at its full size all the same.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};

use crate::broker::TypeFilter;
use crate::event::socketio::Payload;
use crate::metrics::EdgeMetrics;

/// What a backlog entry costs beyond its payload and id (queue slot,
/// `Arc`, `String`), for the byte count.
const ENTRY_OVERHEAD: usize = 64;

/// Why an emit did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// The socket's send buffer is full: try again later.
    Full,
    /// The socket is gone.
    Gone,
}

/// Where a member's messages go: a Socket.IO socket (or, in the pump's
/// unit tests, a recording double).
pub trait Outlet: Send + 'static {
    fn sid(&self) -> Sid;
    fn connected(&self) -> bool;
    /// Emits message `name` with a pre-serialised payload.
    fn emit(&self, name: &str, data: &RawValue) -> Result<(), Emit>;
    /// Closes the socket (a Socket.IO disconnect).
    fn disconnect(&self) -> Result<(), Emit>;
}

impl Outlet for SocketRef {
    fn sid(&self) -> Sid {
        self.id
    }

    fn connected(&self) -> bool {
        // The socket's own method, not this trait's.
        (**self).connected()
    }

    fn emit(&self, name: &str, data: &RawValue) -> Result<(), Emit> {
        match (**self).emit(name, data) {
            Ok(()) => Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => Err(Emit::Full),
            Err(_) => Err(Emit::Gone),
        }
    }

    fn disconnect(&self) -> Result<(), Emit> {
        match self.clone().disconnect() {
            Ok(()) => Ok(()),
            Err(SocketError::InternalChannelFull) => Err(Emit::Full),
            Err(_) => Err(Emit::Gone),
        }
    }
}

pub(super) struct Member<O> {
    pub(super) socket: O,
    pub(super) filter: TypeFilter,
    /// `exp` of the socket's token, Unix seconds.
    pub(super) expires_at: u64,
    last_sent: Option<String>,
    /// Events waiting for room in the socket's send buffer (a replay larger
    /// than the buffer, or a burst), in order. While it is not empty, new
    /// events queue behind it.
    backlog: VecDeque<(String, Payload)>,
    /// Bytes of the backlog, as counted against `max_backlog_bytes`.
    backlog_bytes: usize,
    max_backlog_bytes: usize,
    /// Set when the socket must go (too slow, token expired): it receives
    /// nothing more and is disconnected as soon as it has been told why.
    /// Boxed: few members ever leave, and every member carries the field.
    leaving: Option<Box<Leaving>>,
}

struct Leaving {
    code: &'static str,
    message: String,
    told: bool,
}

/// What the server says before disconnecting a socket, on channel
/// `disconnect_reason`.
#[derive(Serialize)]
struct Reason<'a> {
    code: &'a str,
    message: &'a str,
    last_event_id: Option<&'a str>,
}

impl<O: Outlet> Member<O> {
    pub(super) fn new(
        socket: O,
        filter: TypeFilter,
        expires_at: u64,
        max_backlog_bytes: usize,
    ) -> Self {
        Self {
            socket,
            filter,
            expires_at,
            last_sent: None,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            max_backlog_bytes,
            leaving: None,
        }
    }

    pub(super) fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }

    pub(super) fn is_backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Marks the socket to go with `code` and `message` (the first reason
    /// wins).
    pub(super) fn leave(&mut self, code: &'static str, message: String) {
        if self.leaving.is_none() {
            self.leaving = Some(Box::new(Leaving {
                code,
                message,
                told: false,
            }));
        }
    }

    fn too_slow(&mut self, metrics: &EdgeMetrics) {
        if self.leaving.is_none() {
            metrics.slow_sockets.inc();
        }
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.leave(
            "too_slow",
            format!(
                "socket too slow: more than {} bytes of events waited for it; reconnect with lastEventId to recover what it missed",
                self.max_backlog_bytes
            ),
        );
    }

    /// Sends one event, or queues it behind those already waiting. Returns
    /// false when the socket is gone.
    pub(super) fn send(&mut self, id: &str, payload: &Payload, metrics: &EdgeMetrics) -> bool {
        if self.leaving.is_some() {
            return true;
        }
        if self.backlog.is_empty() {
            match self.socket.emit("event", payload) {
                Ok(()) => {
                    self.last_sent = Some(id.to_string());
                    metrics.events_sent.inc();
                    return true;
                }
                Err(Emit::Full) => {}
                Err(Emit::Gone) => return false,
            }
        }
        let cost = payload.get().len() + id.len() + ENTRY_OVERHEAD;
        if self.backlog_bytes + cost > self.max_backlog_bytes {
            self.too_slow(metrics);
        } else {
            self.backlog_bytes += cost;
            self.backlog
                .push_back((id.to_string(), Arc::clone(payload)));
        }
        true
    }

    /// Sends what waits, as far as the socket's buffer allows. Returns
    /// false when the socket is gone.
    pub(super) fn flush(&mut self, metrics: &EdgeMetrics) -> bool {
        while let Some((id, payload)) = self.backlog.front() {
            match self.socket.emit("event", payload) {
                Ok(()) => {
                    metrics.events_sent.inc();
                    self.last_sent = Some(id.clone());
                    self.backlog_bytes -= payload.get().len() + id.len() + ENTRY_OVERHEAD;
                    self.backlog.pop_front();
                }
                Err(Emit::Full) => return true,
                Err(Emit::Gone) => return false,
            }
        }
        true
    }

    /// Tells the socket why, then disconnects it; both need room in its
    /// buffer, so this is retried each tick. True once it is gone.
    pub(super) fn try_leave(&mut self) -> bool {
        if !self.socket.connected() {
            return true;
        }
        let Some(leaving) = &mut self.leaving else {
            return false;
        };
        if !leaving.told {
            let reason = serde_json::value::to_raw_value(&Reason {
                code: leaving.code,
                message: &leaving.message,
                last_event_id: self.last_sent.as_deref(),
            });
            let Ok(reason) = reason else {
                return true;
            };
            match self.socket.emit("disconnect_reason", &reason) {
                Ok(()) => leaving.told = true,
                Err(Emit::Full) => return false,
                Err(Emit::Gone) => return true,
            }
        }
        self.socket.disconnect() != Err(Emit::Full)
    }
}
