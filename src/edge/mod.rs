//! The Socket.IO edge at `/ws`: browsers and partner integrations receive
//! their tenant's events on channel `event`.
//!
//! The handshake (`auth: { token, activeTenantId?, types?, lastEventId? }`)
//! is checked in a connect middleware, so a refusal reaches the client as
//! `connect_error` with a message that says why. The tenant comes from the
//! verified token, never from the client; the socket joins only that
//! tenant's room ([`room`]), which emits in per-type order under the
//! tenant's rate limit ([`ratelimit`]).
//!
//! Messages a client may send: `subscribe` (`{types}`: narrow or widen the
//! type filter) and `refresh_token` (`{token}`: extend the session without
//! reconnecting). Both answer through the Socket.IO acknowledgement.
//! Messages the server sends: `session` (once, first), `event`, and
//! `disconnect_reason` (just before the server disconnects the socket).

pub mod origin;
pub mod ratelimit;
pub mod room;

use std::sync::Arc;

use serde::Deserialize;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SocketIo, TransportType};

use crate::app::App;
use crate::auth::TokenKind;
use crate::auth::rbac::SUBSCRIBE;
use crate::broker::TypeFilter;
use crate::clock;
use crate::event::check_identifier;
use crate::metrics::EdgeMetrics;
use origin::Origins;
use room::{Command, RateLimits, Rooms};

/// Where Socket.IO is mounted.
pub const PATH: &str = "/ws";

/// Initial websocket read buffer per socket.
const WS_READ_BUFFER: usize = 1024;

/// Settings of the edge.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub origins: Origins,
    pub limits: RateLimits,
    /// Packets buffered per socket before it counts as too slow.
    pub socket_buffer: usize,
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

/// The socket's verified session, kept in its extensions.
#[derive(Debug, Clone)]
struct Session {
    tenant: String,
    subject: Option<String>,
    kind: TokenKind,
    expires_at: u64,
    filter: TypeFilter,
    last_event_id: Option<String>,
}

/// The `auth` object a client sends with its handshake.
#[derive(Debug, Default, Deserialize)]
struct Handshake {
    token: Option<String>,
    #[serde(rename = "activeTenantId")]
    active_tenant_id: Option<String>,
    /// Type filters (`cost.*`, `alert.created`); default: everything.
    types: Option<Vec<String>>,
    /// The last event id the client saw, to recover what it missed.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

/// A refused handshake: the message reaches the client as `connect_error`.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Edge {
    /// Builds the edge: the Socket.IO layer to mount on the HTTP router,
    /// the handle that closes every socket at shutdown, and the edge itself.
    pub fn layer(
        app: App,
        config: EdgeConfig,
        metrics: EdgeMetrics,
    ) -> (SocketIoLayer, SocketIo, Edge) {
        let edge = Edge {
            inner: Arc::new(EdgeInner {
                rooms: Rooms::new(app.broker.clone(), config.limits, metrics.clone()),
                app,
                origins: config.origins,
                metrics,
            }),
        };
        let (layer, io) = SocketIo::builder()
            .req_path(PATH)
            .transports([TransportType::Polling, TransportType::Websocket])
            .max_buffer_size(config.socket_buffer.max(16))
            // Incoming frames are small (pings, subscribe, refresh_token);
            // the buffer grows for larger ones. 4 KiB per socket otherwise.
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(edge.clone())
            .build_layer();
        io.ns("/", on_connect.with(handshake));
        (layer, io, edge)
    }

    /// Per-tenant rates from Redis, replacing the previous set.
    pub fn set_rate_overrides(&self, overrides: std::collections::HashMap<String, u32>) {
        self.inner.rooms.set_live_overrides(overrides);
    }
}

/// Checks origin, token and filters before the socket joins anything.
async fn handshake(
    socket: SocketRef,
    TryData(auth): TryData<Handshake>,
    State(edge): State<Edge>,
) -> Result<(), Refusal> {
    let result = verify_handshake(&socket, auth, &edge).await;
    if let Err(refusal) = &result {
        edge.inner.metrics.handshakes_refused.inc();
        tracing::debug!(sid = %socket.id, "handshake refused: {refusal}");
    }
    result
}

async fn verify_handshake(
    socket: &SocketRef,
    auth: Result<Handshake, socketioxide::ParserError>,
    edge: &Edge,
) -> Result<(), Refusal> {
    let refuse = |m: String| Refusal(m);
    if let Some(origin) = socket.req_parts().headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(not text)");
        if !edge.inner.origins.allows(origin) {
            return Err(refuse(format!(
                "origin not allowed: {}",
                origin.chars().take(200).collect::<String>()
            )));
        }
    }
    let auth = auth.map_err(|_| {
        refuse("auth must be an object: { token, activeTenantId?, types?, lastEventId? }".into())
    })?;
    let token = auth.token.as_deref().map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(refuse(
            "auth.token required: connect with io(url, { path: '/ws', auth: { token } })".into(),
        ));
    }
    let identity = edge
        .inner
        .app
        .auth
        .verify(token, auth.active_tenant_id.as_deref())
        .await
        .map_err(|e| refuse(e.to_string()))?;
    identity
        .require(SUBSCRIBE)
        .map_err(|e| refuse(e.to_string()))?;
    let tenant = identity.tenant.clone().ok_or_else(|| {
        refuse("activeTenantId required: this token may act for any tenant".into())
    })?;
    let filter = TypeFilter::parse(auth.types.as_deref().unwrap_or_default())
        .map_err(|e| refuse(format!("auth.{e}")))?;
    let last_event_id = match auth.last_event_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(id) => {
            check_identifier(id).map_err(|r| refuse(format!("auth.lastEventId: {r}")))?;
            Some(id.to_string())
        }
    };
    socket.extensions.insert(Session {
        tenant,
        subject: identity.subject,
        kind: identity.kind,
        expires_at: identity.expires_at,
        filter,
        last_event_id,
    });
    Ok(())
}

async fn on_connect(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<Session>,
) {
    edge.inner.metrics.sockets.inc();
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
    Extension(session): Extension<Session>,
) {
    edge.inner.metrics.sockets.dec();
    edge.inner
        .rooms
        .send(&session.tenant, Command::Detach { sid: socket.id });
}

#[derive(Debug, Deserialize)]
struct SubscribeMessage {
    types: Vec<String>,
}

/// `subscribe` `{types}`: replaces the socket's type filter.
async fn on_subscribe(
    socket: SocketRef,
    State(edge): State<Edge>,
    Extension(session): Extension<Session>,
    TryData(message): TryData<SubscribeMessage>,
    ack: AckSender,
) {
    let answer = match message {
        Err(_) => {
            serde_json::json!({"ok": false, "error": "subscribe expects { types: [\"cost.*\", …] }"})
        }
        Ok(m) => match TypeFilter::parse(&m.types) {
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
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
        },
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
    Extension(session): Extension<Session>,
    TryData(message): TryData<RefreshMessage>,
    ack: AckSender,
) {
    let answer = match refresh(&edge, &session, message).await {
        Ok(expires_at) => {
            edge.inner.metrics.token_refreshes.inc();
            edge.inner.rooms.send(
                &session.tenant,
                Command::SetExpiry {
                    sid: socket.id,
                    expires_at,
                },
            );
            socket.extensions.insert(Session {
                expires_at,
                ..session
            });
            serde_json::json!({
                "ok": true,
                "token_expires_at": clock::format_unix_secs(expires_at),
            })
        }
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    let _ = ack.send(&answer);
}

async fn refresh(
    edge: &Edge,
    session: &Session,
    message: Result<RefreshMessage, socketioxide::ParserError>,
) -> Result<u64, String> {
    let message = message.map_err(|_| "refresh_token expects { token }".to_string())?;
    let identity = edge
        .inner
        .app
        .auth
        .verify(message.token.trim(), Some(&session.tenant))
        .await
        .map_err(|e| e.to_string())?;
    identity.require(SUBSCRIBE).map_err(|e| e.to_string())?;
    // `verify` with the socket's tenant as the active tenant has already
    // refused a token of another tenant.
    if identity.subject != session.subject || identity.kind != session.kind {
        return Err("token is for another user: reconnect to switch users".into());
    }
    Ok(identity.expires_at)
}
