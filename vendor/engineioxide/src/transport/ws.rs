//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to handle the websocket connection through tasks and channels
//! and to handle upgrade from polling to ws

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};
use tokio_util::future::FutureExt as _;

use engineioxide_core::{Packet, ProtocolVersion, Sid, Str, TransportType};

use crate::{
    DisconnectReason, Socket,
    body::ResponseBody,
    config::EngineIoConfig,
    engine::EngineIo,
    errors::Error,
    handler::EngineIoHandler,
    socket::{InternalRx, PacketBuf},
    transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts.clone(), body);

    let ws_key = parts
        .headers
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();

    tokio::spawn(async move {
        let conn = hyper::upgrade::on(req)
            .await
            .map(hyper_util::rt::TokioIo::new);

        let res = match conn {
            Ok(conn) => on_init(engine.clone(), conn, protocol, sid, parts).await,
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return;
            }
        };

        match res {
            Ok(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed")
            }
            Err(Error::MultipleWebsocketRequests) => {}
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
            }
        }
    });

    Ok(ws_response(&ws_key))
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// Read packets from the websocket and handle them, it will block until the connection is closed
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
pub async fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    let mut heartbeat = None;
    let (socket, ws) = if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => return Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => return Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                match tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut)
                    .with_cancellation_token(&socket.cancellation_token)
                    .await
                {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                (socket, ws)
            }
        }
    } else {
        let socket = engine.create_session(
            protocol,
            TransportType::Websocket,
            session_parts(req_data),
            false,
        );

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        init_handshake(socket.id, &mut ws, &engine.config).await?;
        // tensorcost-events patch: the heartbeat of a session opened on this
        // websocket runs in the websocket's own task (`read_write`), not in
        // a task of its own.
        heartbeat = Some((engine.config.ping_interval, engine.config.ping_timeout));
        (socket, ws)
    };

    // tensorcost-events patch: one task reads, writes and (for a session
    // opened here) runs the heartbeat, where upstream spawns a writer task
    // beside this reader and a heartbeat task: two task allocations and a
    // split (BiLock) stream less per connection. It is a task of its own,
    // spawned here, and this one ends: a task's future is sized for its
    // largest state, and the handshake's states are larger than the
    // connection's (5,728 bytes against 2,264 here).
    tokio::spawn(connection(engine, ws, socket, heartbeat));
    Ok(())
}

/// The request's head as a session opened on a websocket keeps it, for its
/// life: without the handshake's own headers (`Connection`, `Upgrade`,
/// `Sec-WebSocket-*`), which mean nothing once the connection is upgraded
/// and which a session opened by polling never has (tensorcost-events
/// patch: about 0.5 KiB per websocket). Other headers, the URI and the
/// extensions are kept as they came.
fn session_parts(mut parts: Parts) -> Parts {
    fn handshake(name: &http::HeaderName) -> bool {
        *name == http::header::CONNECTION
            || *name == http::header::UPGRADE
            || name.as_str().starts_with("sec-websocket-")
    }
    let kept = parts.headers.keys().filter(|name| !handshake(name)).count();
    if kept < parts.headers.keys_len() {
        let mut headers = http::HeaderMap::with_capacity(kept);
        for (name, value) in &parts.headers {
            if !handshake(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        parts.headers = headers;
    }
    parts
}

/// A websocket connection's life after its handshake (tensorcost-events
/// patch): [`read_write`], then the session's end. The session's end is a
/// `map` on [`read_write`]'s future, not an async fn awaiting it, so that
/// the task's future holds its arguments once.
fn connection<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    ws: WebSocketStream<S>,
    socket: Arc<Socket<H::Data>>,
    heartbeat: Option<(std::time::Duration, std::time::Duration)>,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let end = (engine.clone(), socket.clone());
    futures_util::FutureExt::map(read_write(engine, ws, socket, heartbeat), move |result| {
        let (engine, socket) = end;
        match result {
            Some(Err(ref e)) => {
                let reason =
                    Option::<DisconnectReason>::from(e).unwrap_or(DisconnectReason::TransportError);

                #[cfg(feature = "tracing")]
                tracing::debug!("error when handling packet: {:?}", e);
                engine.close_session(socket.id, reason);
            }
            Some(Ok(())) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "ws transport was closed");
                engine.close_session(socket.id, DisconnectReason::TransportClose);
            }
            None => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "socket is closing");
            }
        }
    })
}

/// What a websocket message from the client means for the connection.
enum Received {
    Continue,
    Pong,
    Closed,
}

/// Handles one websocket message from the client.
fn on_message<H: EngineIoHandler>(
    engine: &Arc<EngineIo<H>>,
    socket: &Arc<Socket<H::Data>>,
    msg: Message,
) -> Result<Received, Error> {
    match msg {
        Message::Text(msg) => match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
            Packet::Close => {
                #[cfg(feature = "tracing")]
                tracing::debug!("[sid={}] closing session", socket.id);
                engine.close_session(socket.id, DisconnectReason::TransportClose);
                Ok(Received::Closed)
            }
            Packet::Pong | Packet::Ping => {
                // A permit already stored means that the client is already known to be alive.
                socket.heartbeat.notify_one();
                Ok(Received::Pong)
            }
            Packet::Message(msg) => {
                engine.handler.on_message(msg, socket.clone());
                Ok(Received::Continue)
            }
            p => Err(Error::BadPacket(p)),
        },
        Message::Binary(mut data) => {
            if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                // The first byte is the message type, which we don't need.
                data = data.split_off(1);
            }
            engine.handler.on_binary(data, socket.clone());
            Ok(Received::Continue)
        }
        Message::Close(_) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("websocket closed, closing session");
            engine.close_session(socket.id, DisconnectReason::TransportClose);
            Ok(Received::Closed)
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = ?socket.id, "unexpected ws message");
            Ok(Received::Continue)
        }
    }
}

/// Maps a packet to a websocket message (`None` for a Noop packet, which
/// only releases a polling request).
fn ws_message(protocol: ProtocolVersion, item: Packet) -> Option<Message> {
    match item {
        Packet::Binary(bin) | Packet::BinaryV3(bin) => {
            if protocol == ProtocolVersion::V3 {
                // v3 protocol requires packet type as the first byte.
                let mut buff = Vec::with_capacity(bin.len() + 1);
                buff.push(0x04);
                buff.extend(bin);
                Some(Message::Binary(buff.into()))
            } else {
                Some(Message::Binary(bin))
            }
        }
        // A Noop Packet maybe sent by the server to upgrade from a polling connection
        // In the case that the packet was not poll in time it will remain in the buffer and therefore
        // it should be discarded here
        Packet::Noop => None,
        item => {
            let packet: String = item.into();
            Some(Message::Text(packet.into()))
        }
    }
}

/// Writes what waits in the socket's channel (the first batch, `first`,
/// already taken), then flushes once.
async fn write_buffered<S>(
    ws: &mut WebSocketStream<S>,
    protocol: ProtocolVersion,
    first: PacketBuf,
    buffered_rx: &mut tokio::sync::mpsc::Receiver<PacketBuf>,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    for item in *first {
        if let Some(msg) = ws_message(protocol, item) {
            ws.feed(msg).await?;
        }
    }
    while let Ok(packets) = buffered_rx.try_recv() {
        for item in *packets {
            if let Some(msg) = ws_message(protocol, item) {
                ws.feed(msg).await?;
            }
        }
    }
    ws.flush().await
}

/// Reads packets from the websocket and hands them to the handler, writes
/// the packets waiting in the socket's channel (flushing once the channel
/// is drained), and, with `heartbeat` (interval, timeout), pings the client
/// and closes the session when it does not answer in time: upstream's
/// `forward_to_handler`, `forward_to_socket` and heartbeat job in one task
/// (tensorcost-events patch).
///
/// A write that cannot complete (a client that stopped reading) gives up at
/// the heartbeat's deadline, or at the session's cancellation, rather than
/// holding the connection. Returns `None` when the session was cancelled.
fn read_write<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    mut ws: WebSocketStream<S>,
    socket: Arc<Socket<H::Data>>,
    heartbeat: Option<(std::time::Duration, std::time::Duration)>,
) -> impl std::future::Future<Output = Option<Result<(), Error>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // An async block rather than an async fn: the block uses what it
    // captures in place, where an async fn keeps its arguments and a
    // moved copy of each (the websocket, 328 bytes, twice) for the
    // connection's life (tensorcost-events patch).
    async move {
        let (engine, socket) = (&engine, &socket);
        // A polling request that was in progress during the upgrade may still hold the lock.
        let mut internal_rx = socket
            .internal_rx
            .lock()
            .with_cancellation_token(&socket.cancellation_token)
            .await?;
        let InternalRx { buffered_rx, .. } = &mut *internal_rx;

        // The heartbeat, as upstream's v4 job: a ping at once, then every
        // `interval`; each must be answered within `timeout`.
        let start = tokio::time::Instant::now();
        let mut next_ping = start;
        let mut pong_due: Option<tokio::time::Instant> = None;
        let deadline = |next_ping: tokio::time::Instant, pong_due: Option<tokio::time::Instant>| {
            heartbeat.map(|(_, timeout)| pong_due.unwrap_or(next_ping + timeout))
        };
        let heartbeat_sleep = tokio::time::sleep_until(start);
        tokio::pin!(heartbeat_sleep);
        // The wait for the session's cancellation stays registered across
        // the loop's turns (tensorcost-events patch), rather than being
        // registered and removed again with every packet written.
        let cancelled = socket.cancellation_token.cancelled();
        tokio::pin!(cancelled);

        let result = loop {
            let ping_or_deadline = match (heartbeat, pong_due) {
                (None, _) => None,
                (Some(_), None) => Some(next_ping),
                (Some(_), Some(due)) => Some(due),
            };
            if let Some(at) = ping_or_deadline
                && heartbeat_sleep.deadline() != at
            {
                heartbeat_sleep.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                items = buffered_rx.recv() => {
                    let Some(packets) = items else { break None };
                    let mut write =
                        std::pin::pin!(write_buffered(&mut ws, socket.protocol, packets, buffered_rx));
                    // Most writes complete at once: no timer is armed for them.
                    let first = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(write.as_mut().poll(cx))
                    })
                    .await;
                    if let std::task::Poll::Ready(res) = first {
                        if let Err(_e) = res {
                            #[cfg(feature = "tracing")]
                            tracing::debug!("[sid={}] error sending packet: {}", socket.id, _e);
                        }
                        continue;
                    }
                    let give_up = deadline(next_ping, pong_due);
                    let timed_out = async {
                        match give_up {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        res = &mut write => {
                            if let Err(_e) = res {
                                #[cfg(feature = "tracing")]
                                tracing::debug!("[sid={}] error sending packet: {}", socket.id, _e);
                            }
                        }
                        _ = cancelled.as_mut() => break None,
                        () = timed_out => {
                            #[cfg(feature = "tracing")]
                            tracing::debug!(sid = ?socket.id, "ws write did not complete before the heartbeat deadline");
                            socket.close(DisconnectReason::HeartbeatTimeout);
                            break None;
                        }
                    }
                }
                _ = cancelled.as_mut() => break None,
                packets = std::future::poll_fn(|cx| socket.volatile.poll_take(cx)) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(sid = ?socket.id, "ws volatile flush: {} packets", packets.len());
                    for item in *packets {
                        if let Some(msg) = ws_message(socket.protocol, item) {
                            ws.feed(msg).await.ok();
                        }
                    }
                    ws.flush().await.ok();
                },
                msg = ws.next() => match msg {
                    None => break Some(Ok(())),
                    Some(Err(e)) => break Some(Err(e.into())),
                    Some(Ok(msg)) => match on_message(engine, socket, msg) {
                        Ok(Received::Continue) => {}
                        Ok(Received::Pong) => pong_due = None,
                        Ok(Received::Closed) => break Some(Ok(())),
                        Err(e) => break Some(Err(e)),
                    },
                },
                () = &mut heartbeat_sleep, if heartbeat.is_some() => {
                    if pong_due.is_some() {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(sid = ?socket.id, "heartbeat timeout");
                        socket.close(DisconnectReason::HeartbeatTimeout);
                        break None;
                    }
                    let Some((interval, timeout)) = heartbeat else { continue };
                    #[cfg(feature = "tracing")]
                    tracing::trace!(sid = ?socket.id, "emitting ping");
                    let ping: String = Packet::Ping.into();
                    let sent = ws.send(Message::Text(ping.into()));
                    let sent = tokio::time::timeout(timeout, sent).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        socket.close(DisconnectReason::HeartbeatTimeout);
                        break None;
                    }
                    pong_due = Some(tokio::time::Instant::now() + timeout);
                    next_ping += interval;
                }
            }
        };

        #[cfg(feature = "tracing")]
        tracing::trace!(sid = %socket.id, "ws closing flush");
        // Bounded like the writes above: a client that stopped reading does not
        // hold the connection open.
        let closing = async {
            ws.flush().await.ok();
            SinkExt::close(&mut ws).await.ok();
        };
        let limit = heartbeat.map_or(std::time::Duration::from_secs(5), |(_, timeout)| timeout);
        tokio::time::timeout(limit, closing).await.ok();
        result
    }
}

/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(Box::new(make_open_packet(
        TransportType::Websocket,
        sid,
        config,
    )));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    socket
        .internal_tx
        .send(Box::new(smallvec![Packet::Noop]))
        .await
        .map_err(|_| Error::Upgrade)?;

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::Request;
    use tokio::io::DuplexStream;

    use super::*;

    /// tensorcost-events patch 9: the session keeps the head without the
    /// handshake's headers; the others, repeated ones included, in order.
    #[test]
    fn session_parts_drop_the_handshake_headers() {
        let parts = Request::builder()
            .method("GET")
            .header("Host", "127.0.0.1")
            .header("Origin", "https://app.example")
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Extensions", "permessage-deflate")
            .header("X-Forwarded-For", "10.0.0.1")
            .header("X-Forwarded-For", "10.0.0.2")
            .uri("/engine.io/?EIO=4&transport=websocket")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let kept = session_parts(parts);
        let names: Vec<&str> = kept.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "origin", "x-forwarded-for"]);
        assert_eq!(kept.headers["origin"], "https://app.example");
        let forwarded: Vec<_> = kept.headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(forwarded, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(kept.uri, "/engine.io/?EIO=4&transport=websocket");

        // Nothing to drop (a request without the handshake's headers): the
        // head is kept as it came.
        let plain = Request::builder()
            .header("Host", "127.0.0.1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let kept = session_parts(plain);
        assert_eq!(kept.headers.len(), 1);
        assert_eq!(kept.headers["host"], "127.0.0.1");
    }

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[derive(Debug)]
    struct StubHandler;
    impl EngineIoHandler for StubHandler {
        type Data = ();
        fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
        fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
        fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {}
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    fn socket() -> Arc<Socket<()>> {
        Arc::new(Socket::new(
            ProtocolVersion::V4,
            TransportType::Websocket,
            &EngineIoConfig::default(),
            Request::<()>::default().into_parts().0,
            Box::new(|_, _| ()),
            false,
        ))
    }

    async fn ws_pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    fn engine() -> Arc<EngineIo<StubHandler>> {
        Arc::new(EngineIo::new(Arc::new(StubHandler), EngineIoConfig::default()))
    }

    // tensorcost-events patch: upstream's two tests of `forward_to_socket`,
    // run against `read_write`, which took its place.

    /// A polling request can still hold the lock at the end of an upgrade.
    #[tokio::test]
    async fn writer_waits_for_the_lock_of_a_polling_request() {
        let socket = socket();
        let (server, mut client) = ws_pair().await;

        let polling = socket.internal_rx.lock().await;
        let writer = tokio::spawn({
            let socket = socket.clone();
            async move { read_write(engine(), server, socket, None).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished(), "the writer should wait for the lock");

        drop(polling);
        socket.emit(Str::from("hello")).unwrap();
        let msg = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the writer should send the packet")
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::text("4hello"));
    }

    #[tokio::test]
    async fn writer_waiting_for_the_lock_stops_with_the_session() {
        let socket = socket();
        let (server, _client) = ws_pair().await;

        let _polling = socket.internal_rx.lock().await;
        let writer = tokio::spawn({
            let socket = socket.clone();
            async move { read_write(engine(), server, socket, None).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;

        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, writer)
            .await
            .expect("the writer should stop")
            .unwrap();
    }

    /// The heartbeat runs in the websocket's task: a ping at once, and a
    /// client that does not answer is closed after `timeout`.
    #[tokio::test]
    async fn heartbeat_pings_and_closes_a_silent_client() {
        let socket = socket();
        let (server, mut client) = ws_pair().await;
        let task = tokio::spawn({
            let socket = socket.clone();
            let heartbeat = Some((Duration::from_secs(60), Duration::from_millis(100)));
            async move { read_write(engine(), server, socket, heartbeat).await }
        });
        let msg = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("a ping at once")
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::text("2"));
        // No pong: the session closes.
        let ended = tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("the task should end at the heartbeat timeout")
            .unwrap();
        assert!(ended.is_none(), "closed by the heartbeat, not by the client");
    }

    /// A pong keeps the session: the next ping comes an interval later.
    #[tokio::test]
    async fn heartbeat_answered_keeps_the_session() {
        let socket = socket();
        let (server, mut client) = ws_pair().await;
        let task = tokio::spawn({
            let socket = socket.clone();
            let heartbeat = Some((Duration::from_millis(150), Duration::from_millis(100)));
            async move { read_write(engine(), server, socket, heartbeat).await }
        });
        for _ in 0..3 {
            let msg = tokio::time::timeout(TIMEOUT, client.next())
                .await
                .expect("a ping")
                .unwrap()
                .unwrap();
            assert_eq!(msg, Message::text("2"));
            client.send(Message::text("3")).await.unwrap();
        }
        assert!(!task.is_finished(), "an answered heartbeat keeps the session");
        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, task).await.expect("stops when cancelled").unwrap();
    }

    /// A client that stops reading: the write blocks on the full stream and
    /// gives up at the heartbeat's deadline instead of holding the
    /// connection (upstream's writer stayed blocked).
    #[tokio::test]
    async fn a_write_never_drained_gives_up_at_the_heartbeat_deadline() {
        let socket = socket();
        let (server, _client_never_reads) = ws_pair().await;
        let task = tokio::spawn({
            let socket = socket.clone();
            let heartbeat = Some((Duration::from_secs(60), Duration::from_millis(200)));
            async move { read_write(engine(), server, socket, heartbeat).await }
        });
        // Far more than the 1 KiB duplex buffer.
        let big = "x".repeat(64 * 1024);
        socket.emit(Str::from(big)).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the blocked write should give up")
            .unwrap();
        assert!(ended.is_none());
    }
}
