//! The Socket.IO edge at `/ws`: browsers and partner integrations receive
//! their tenant's events on channel `event`.
//!
//! A thin transport over [`App`]: the handshake (`auth: { token,
//! activeTenantId?, types?, lastEventId? }`) is checked by
//! [`App::open_socket`] from a connect middleware, so a refusal reaches the
//! client as `connect_error` with the message every surface uses for it.
//! The tenant comes from the verified token, never from the client; the
//! socket joins only that tenant's room ([`rooms`]), whose pump ([`pump`])
//! emits in per-type order under the tenant's rate limit ([`ratelimit`]);
//! each socket's backlog and leaving are its [`member`].
//!
//! Messages a client may send: `subscribe` (`{types}`: narrow or widen the
//! type filter) and `refresh_token` (`{token}`: extend the session without
//! reconnecting). Both answer through the Socket.IO acknowledgement, with
//! `{ok: false, error}` on refusal. Messages the server sends:
//! `session` (once, first), `event`, and `disconnect_reason` (just before
//! the server disconnects the socket).

mod member;
pub mod origin;
mod pump;
pub mod ratelimit;
pub mod rooms;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SocketIo, TransportType};

use crate::app::{App, SocketParams, SocketSession};
use crate::broker::Broker;
use crate::clock;
use crate::config::parse::{duration, positive, positive_u32};
use crate::error::{ApiError, Code};
use crate::event::check_identifier;
use crate::metrics::EdgeMetrics;
use origin::Origins;
use ratelimit::Limit;
use rooms::{Command, RateLimits, Rooms};

/// Where Socket.IO is mounted.
pub const PATH: &str = "/ws";

/// Initial websocket read buffer per socket, and the most read at once: a
/// client sends pongs and a few small messages, so a larger frame takes a
/// few more reads rather than every idle socket holding a larger buffer.
/// The buffer grows to fit the largest frame read (the `CONNECT` packet
/// with its token, usually) and keeps that size: starting at 128 rather
/// than 256, a socket whose `CONNECT` fits in about 300 bytes keeps a
/// buffer of about that size rather than 512 (about 0.3 KiB per idle
/// socket in scenario 5, docs/benchmarks.md). A 1 KiB token grows it to
/// fit either way.
const WS_READ_BUFFER: usize = 128;
/// Largest message (and websocket frame, and polling body) a client may
/// send.
const MAX_CLIENT_MESSAGE: usize = 32 << 10;
/// How long a connection that opened the transport has to send its
/// Socket.IO handshake before it is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The edge's settings as flags and `TC_*` variables of `serve`; each
/// default written once, here.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeSettings {
    /// Browser origins allowed to connect, comma separated, or `*`.
    /// Unset: localhost on any port.
    #[arg(long, env = "CORS_ORIGIN")]
    pub cors_origin: Option<String>,

    /// Events per second emitted to one tenant's sockets.
    #[arg(long, env = "TC_RATE_LIMIT_PER_TENANT", default_value_t = 100, value_parser = positive_u32)]
    pub rate_limit_per_tenant: u32,

    /// Per-tenant rate limits, e.g. `tenant-a=1000,tenant-b=5000`.
    #[arg(long, env = "TC_RATE_LIMIT_OVERRIDES", default_value = "", value_parser = overrides)]
    pub rate_limit_overrides: Overrides,

    /// Events waiting per tenant above its rate before the oldest is dropped.
    #[arg(long, env = "TC_RATE_LIMIT_QUEUE", default_value_t = 1000, value_parser = positive)]
    pub rate_limit_queue: usize,

    /// Socket.IO packets socketioxide buffers per socket; what does not
    /// fit waits in the socket's backlog.
    #[arg(long, env = "TC_SOCKET_BUFFER", default_value_t = 64, value_parser = positive)]
    pub socket_buffer: usize,

    /// Bytes of events that may wait in one socket's backlog; past it the
    /// socket is disconnected as too slow (it resumes with its last id).
    #[arg(long, env = "TC_SOCKET_BUFFER_BYTES", default_value_t = 1 << 20, value_parser = positive)]
    pub socket_buffer_bytes: usize,

    /// How often the server pings a socket (Engine.IO heartbeat). A socket
    /// whose buffer is still full at the next ping is closed.
    #[arg(long, env = "TC_SOCKET_PING_INTERVAL", default_value = "25s", value_parser = duration)]
    pub ping_interval: Duration,

    /// How long a socket has to answer a ping before it is closed.
    #[arg(long, env = "TC_SOCKET_PING_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub ping_timeout: Duration,
}

impl EdgeSettings {
    /// The edge's settings, parsed; `max_sockets_per_tenant` comes from the
    /// broker's subscription cap.
    pub fn config(&self, max_sockets_per_tenant: usize) -> EdgeConfig {
        EdgeConfig {
            origins: Origins::parse(self.cors_origin.as_deref()),
            limits: RateLimits {
                default: Limit {
                    per_second: self.rate_limit_per_tenant,
                    queue: self.rate_limit_queue,
                },
                overrides: self.rate_limit_overrides.0.clone(),
                live: Default::default(),
            },
            socket_buffer: self.socket_buffer,
            socket_buffer_bytes: self.socket_buffer_bytes,
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            max_sockets_per_tenant,
        }
    }
}

/// Per-tenant overrides of the emit rate limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides(pub HashMap<String, u32>);

/// Parses `tenant-a=1000,tenant-b=5000`.
fn overrides(s: &str) -> Result<Overrides, String> {
    let mut map = HashMap::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (tenant, rate) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not tenant=events_per_second"))?;
        check_identifier(tenant.trim()).map_err(|r| format!("tenant {tenant:?}: {r}"))?;
        let rate = positive_u32(rate).map_err(|r| format!("{entry:?}: {r}"))?;
        map.insert(tenant.trim().to_string(), rate);
    }
    Ok(Overrides(map))
}

/// The edge's settings, parsed.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub origins: Origins,
    pub limits: RateLimits,
    /// Packets socketioxide buffers per socket.
    pub socket_buffer: usize,
    /// Bytes of backlog per socket before it counts as too slow.
    pub socket_buffer_bytes: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Most sockets per tenant (`TC_MAX_SUBSCRIBERS_PER_TENANT`).
    pub max_sockets_per_tenant: usize,
}

/// Shared state of every socket handler. Cheap to clone.
#[derive(Clone)]
pub struct Edge {
    inner: Arc<EdgeInner>,
}

struct EdgeInner {
    app: App,
    origins: Origins,
    rooms: Arc<Rooms>,
    metrics: EdgeMetrics,
}

/// What a handshake's `auth` must be, for refusals.
const AUTH_SHAPE: &str = "auth must be an object: { token, activeTenantId?, types?, lastEventId? }";

/// Reads the `auth` object a client sends with its handshake: `{ token,
/// activeTenantId?, types?, lastEventId? }`, each refusal naming the field.
/// Unknown fields are ignored (socket.io-client adds its own).
pub(crate) fn socket_params(auth: serde_json::Value) -> Result<SocketParams, ApiError> {
    use serde_json::Value;
    let mut fields = match auth {
        Value::Object(fields) => fields,
        Value::Null => serde_json::Map::new(),
        _ => return Err(ApiError::invalid(AUTH_SHAPE)),
    };
    let mut text = |name: &str| match fields.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(format!("auth.{name} must be a string"))),
    };
    let token = text("token")?;
    let active_tenant = text("activeTenantId")?;
    let last_event_id = text("lastEventId")?;
    let types = match fields.remove("types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(ApiError::invalid(format!(
                        "auth.types[{i}] must be a string"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => {
            return Err(ApiError::invalid(
                "auth.types must be an array of strings, e.g. [\"cost.*\"]",
            ));
        }
    };
    Ok(SocketParams {
        token,
        active_tenant,
        types,
        last_event_id,
    })
}

/// A refused handshake. socketioxide's `connect_error` packet carries one
/// `message` and no `data`, so the client gets the message every surface
/// uses for this refusal; the code is in the broker's log and in
/// docs/socketio.md's table.
#[derive(Debug)]
struct Refusal(ApiError);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl Edge {
    /// Builds the edge: the Socket.IO layer to mount on the HTTP router,
    /// the handle that closes every socket at shutdown, and the edge itself.
    /// The rooms follow tenants through `broker` directly: a pump is the
    /// edge's own fan-out, after the door has let each socket in.
    pub fn layer(
        app: App,
        broker: Broker,
        config: EdgeConfig,
        metrics: EdgeMetrics,
    ) -> (SocketIoLayer, SocketIo, Edge) {
        let edge = Edge {
            inner: Arc::new(EdgeInner {
                rooms: Rooms::new(
                    broker,
                    config.limits,
                    config.socket_buffer_bytes,
                    config.max_sockets_per_tenant,
                    metrics.clone(),
                ),
                app,
                origins: config.origins,
                metrics,
            }),
        };
        let (layer, io) = SocketIo::builder()
            .req_path(PATH)
            .transports([TransportType::Polling, TransportType::Websocket])
            .max_buffer_size(config.socket_buffer.max(16))
            // What a client may send, before and after it authenticates:
            // the largest valid message (auth, subscribe with 64 filters,
            // refresh_token) is a few KiB.
            .max_payload(MAX_CLIENT_MESSAGE as u64)
            .ws_max_message_size(MAX_CLIENT_MESSAGE)
            .ws_max_frame_size(MAX_CLIENT_MESSAGE)
            .connect_timeout(CONNECT_TIMEOUT)
            .ping_interval(config.ping_interval)
            .ping_timeout(config.ping_timeout)
            // Incoming frames are small (pongs, subscribe, refresh_token);
            // the buffer grows for larger ones. 4 KiB per socket otherwise.
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(edge.clone())
            .build_layer();
        io.ns("/", on_connect.with(handshake));
        edge.inner.rooms.set_io(io.clone());
        (layer, io, edge)
    }

    /// Per-tenant rates from Redis, replacing the previous set.
    pub fn set_rate_overrides(&self, overrides: std::collections::HashMap<String, u32>) {
        self.inner.rooms.set_live_overrides(overrides);
    }

    /// Waits for every room's pump to end (after the broker closed).
    pub async fn closed(&self) {
        self.inner.rooms.closed().await;
    }
}

/// Checks origin and the handshake before the socket joins anything.
async fn handshake(
    socket: SocketRef,
    TryData(auth): TryData<serde_json::Value>,
    State(edge): State<Edge>,
) -> Result<(), Refusal> {
    let result = open(&socket, auth, &edge).await;
    match result {
        Ok(session) => {
            socket.extensions.insert(session);
            Ok(())
        }
        Err(refusal) => {
            edge.inner.metrics.handshakes_refused.inc();
            tracing::debug!(sid = %socket.id, code = refusal.code.as_str(), "handshake refused: {}", refusal.message);
            Err(Refusal(refusal))
        }
    }
}

async fn open(
    socket: &SocketRef,
    auth: Result<serde_json::Value, socketioxide::ParserError>,
    edge: &Edge,
) -> Result<SocketSession, ApiError> {
    if let Some(origin) = socket.req_parts().headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(not text)");
        if !edge.inner.origins.allows(origin) {
            return Err(ApiError::new(
                Code::PermissionDenied,
                format!(
                    "origin not allowed: {}",
                    origin.chars().take(200).collect::<String>()
                ),
            ));
        }
    }
    let auth = auth.map_err(|_| ApiError::invalid(AUTH_SHAPE))?;
    let session = edge.inner.app.open_socket(socket_params(auth)?).await?;
    if let Err(open) = edge.inner.rooms.has_room_for(&session.tenant) {
        return Err(ApiError::new(
            Code::ResourceExhausted,
            format!(
                "tenant {} has {open} sockets open, the most TC_MAX_SUBSCRIBERS_PER_TENANT allows",
                session.tenant
            ),
        ));
    }
    Ok(session)
}

async fn on_connect(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<SocketSession>,
) {
    edge.inner.metrics.sockets.inc();
    edge.inner.rooms.count_socket(&session.tenant, true);
    socket.on("subscribe", on_subscribe);
    socket.on("refresh_token", on_refresh_token);
    socket.on_disconnect(on_disconnect);
    socket.join(room_name(&session.tenant));
    edge.inner.rooms.send(
        &session.tenant,
        Command::Attach {
            socket: socket.clone(),
            filter: session.filter.clone(),
            since: session.last_event_id.clone(),
            expires_at: session.expires_at,
        },
    );
    tracing::debug!(sid = %socket.id, tenant = %session.tenant, kind = ?session.kind, "socket connected");
}

/// The socket.io room of a tenant's sockets.
pub fn room_name(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

async fn on_disconnect(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<SocketSession>,
) {
    edge.inner.metrics.sockets.dec();
    edge.inner.rooms.count_socket(&session.tenant, false);
    edge.inner
        .rooms
        .send(&session.tenant, Command::Detach { sid: socket.id });
}

/// An acknowledgement that refuses: `{ok: false, error}` with the message
/// of the refusal (the acknowledgement's documented shape).
fn refused(e: &ApiError) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": e.message})
}

#[derive(Debug, Deserialize)]
struct SubscribeMessage {
    types: Vec<String>,
}

/// `subscribe` `{types}`: replaces the socket's type filter.
async fn on_subscribe(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<SocketSession>,
    TryData(message): TryData<SubscribeMessage>,
    ack: AckSender,
) {
    let filter = message
        .map_err(|_| ApiError::invalid("subscribe expects { types: [\"cost.*\", …] }"))
        .and_then(|m| edge.inner.app.type_filter(&m.types));
    let answer = match filter {
        Err(e) => refused(&e),
        Ok(filter) => {
            let types = filter.patterns();
            edge.inner.rooms.send(
                &session.tenant,
                Command::SetFilter {
                    sid: socket.id,
                    filter,
                },
            );
            serde_json::json!({"ok": true, "types": types})
        }
    };
    let _ = ack.send(&answer);
}

#[derive(Debug, Deserialize)]
struct RefreshMessage {
    token: String,
}

/// `refresh_token` `{token}`: a fresh token for the same user and tenant
/// extends the session without reconnecting.
async fn on_refresh_token(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<SocketSession>,
    TryData(message): TryData<RefreshMessage>,
    ack: AckSender,
) {
    let refreshed = match message {
        Err(_) => Err(ApiError::invalid("refresh_token expects { token }")),
        Ok(m) => edge.inner.app.refresh_socket(&session, &m.token).await,
    };
    let answer = match refreshed {
        Ok(expires_at) => {
            edge.inner.metrics.token_refreshes.inc();
            edge.inner.rooms.send(
                &session.tenant,
                Command::SetExpiry {
                    sid: socket.id,
                    expires_at,
                },
            );
            socket.extensions.insert(SocketSession {
                expires_at,
                ..session
            });
            serde_json::json!({
                "ok": true,
                "token_expires_at": clock::format_unix_secs(expires_at),
            })
        }
        Err(e) => refused(&e),
    };
    let _ = ack.send(&answer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_fields_are_refused_by_name() {
        let ok = socket_params(serde_json::json!({
            "token": "t", "activeTenantId": "tenant-a", "types": ["cost.*"], "lastEventId": "e1", "extra": 1
        }))
        .expect("valid");
        assert_eq!(ok.active_tenant.as_deref(), Some("tenant-a"));
        assert_eq!(ok.types, Some(vec!["cost.*".to_string()]));
        assert!(
            socket_params(serde_json::Value::Null).is_ok(),
            "no auth: the token check says why"
        );
        let refusal = |v| socket_params(v).err().map(|e| e.message);
        assert_eq!(refusal(serde_json::json!("x")).as_deref(), Some(AUTH_SHAPE));
        assert_eq!(
            refusal(serde_json::json!({"token": "t", "activeTenantId": 7})).as_deref(),
            Some("auth.activeTenantId must be a string")
        );
        assert_eq!(
            refusal(serde_json::json!({"token": "t", "types": "cost.*"})).as_deref(),
            Some("auth.types must be an array of strings, e.g. [\"cost.*\"]")
        );
        assert_eq!(
            refusal(serde_json::json!({"token": "t", "types": ["a.b", 1]})).as_deref(),
            Some("auth.types[1] must be a string")
        );
    }
}
