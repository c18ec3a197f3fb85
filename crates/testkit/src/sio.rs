//! A minimal Socket.IO v5 / Engine.IO v4 client over websocket, enough to
//! receive a tenant's events the way socket.io-client does: the open
//! packet, `40{auth}`, then `42["name",payload]` messages, answering pings.
//! The Socket.IO suite itself runs the real `socket.io-client` (tests/js);
//! this is for Rust tests and the load generator.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What ends a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The server's `session` message (the broker, and the Node peer of the
    /// benchmarks, send one first).
    Session,
    /// The namespace's connect acknowledgement (`40…`).
    Connected,
}

/// How a handshake failed.
#[derive(Debug)]
pub enum Refused {
    /// The server answered `connect_error` with this message.
    ConnectError(String),
    /// Anything else: the websocket failed, the connection ended, a timeout.
    Failed(anyhow::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::ConnectError(m) => f.write_str(m),
            Refused::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// Opens `ws://<host>/ws/` and connects to the default namespace with
/// `auth`. Returns the websocket and, with [`Until::Session`], the
/// `session` payload (`Null` otherwise).
pub async fn handshake(host: &str, auth: &Value, until: Until) -> Result<(Ws, Value), Refused> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake_inner(host, auth, until))
        .await
        .unwrap_or_else(|_| {
            Err(Refused::Failed(anyhow::anyhow!(
                "no answer within {HANDSHAKE_TIMEOUT:?}"
            )))
        })
}

async fn handshake_inner(host: &str, auth: &Value, until: Until) -> Result<(Ws, Value), Refused> {
    let failed = |e: anyhow::Error| Refused::Failed(e);
    let url = format!("ws://{host}/ws/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| failed(anyhow::anyhow!("websocket: {e}")))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
        other => {
            return Err(failed(anyhow::anyhow!(
                "expected the Engine.IO open packet, got {other:?}"
            )));
        }
    }
    ws.send(Message::text(format!("40{auth}")))
        .await
        .map_err(|e| failed(e.into()))?;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            other => return Err(failed(anyhow::anyhow!("handshake ended: {other:?}"))),
        };
        let text = text.as_str();
        if text == "2" {
            ws.send(Message::text("3"))
                .await
                .map_err(|e| failed(e.into()))?;
        } else if let Some(err) = text.strip_prefix("44") {
            let v: Value = serde_json::from_str(err).unwrap_or(Value::Null);
            let message = v["message"].as_str().unwrap_or(err).to_string();
            return Err(Refused::ConnectError(message));
        } else if until == Until::Connected && text.starts_with("40") {
            return Ok((ws, Value::Null));
        } else if let Some((name, payload)) = parse_event(text)
            && until == Until::Session
            && name == "session"
        {
            return Ok((ws, payload));
        }
    }
}

/// `42["name",payload]` → (name, payload).
pub fn parse_event(packet: &str) -> Option<(String, Value)> {
    let body = packet.strip_prefix("42")?;
    let mut array: Vec<Value> = serde_json::from_str(body).ok()?;
    if array.len() < 2 {
        return None;
    }
    let payload = array.remove(1);
    Some((array.remove(0).as_str()?.to_string(), payload))
}

/// A connected client whose messages are read by a task of its own, which
/// also answers pings; dropped, it closes.
pub struct Sio {
    pub session: Value,
    rx: mpsc::UnboundedReceiver<(String, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sio {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `host` (host:port) with `auth` and waits for the `session`
/// message; `Err` carries the `connect_error` message or what failed.
pub async fn connect(host: &str, auth: Value) -> Result<Sio, String> {
    let (mut ws, session) = handshake(host, &auth, Until::Session)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(t) = message else { continue };
            if t.as_str() == "2" {
                if ws.send(Message::text("3")).await.is_err() {
                    break;
                }
            } else if let Some(e) = parse_event(t.as_str())
                && tx.send(e).is_err()
            {
                break;
            }
        }
    });
    Ok(Sio { session, rx, task })
}

impl Sio {
    /// The next message, or `None` when the connection ended or nothing
    /// came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<(String, Value)> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next `event` payload (other messages are skipped).
    pub async fn next_event(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                (name, payload) if name == "event" => return Some(payload),
                _ => continue,
            }
        }
    }
}

/// True when `text` is the Socket.IO packet of an `event` message.
pub fn is_event_packet(text: &str) -> bool {
    text.starts_with("42[\"event\"")
}

/// A refusal as a plain error, for callers that do not tell them apart.
pub fn into_anyhow(r: Refused) -> anyhow::Error {
    match r {
        Refused::ConnectError(m) => anyhow::anyhow!("refused: {m}"),
        Refused::Failed(e) => e,
    }
}
