//! A minimal Socket.IO v5 / Engine.IO v4 client over websocket, enough to
//! receive a tenant's events in Rust tests the way socket.io-client does:
//! open packet, `40{auth}`, `session`, then `42["event",…]`, answering
//! pings.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

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

/// Connects to `http` (host:port) with `auth`; `Err` carries the
/// `connect_error` message.
pub async fn connect(http: &str, auth: Value) -> Result<Sio, String> {
    let url = format!("ws://{http}/ws/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
        other => return Err(format!("expected the open packet, got {other:?}")),
    }
    ws.send(Message::text(format!("40{auth}")))
        .await
        .map_err(|e| e.to_string())?;
    let session = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let t = t.as_str();
                if t == "2" {
                    let _ = ws.send(Message::text("3")).await;
                } else if let Some(err) = t.strip_prefix("44") {
                    let v: Value = serde_json::from_str(err).unwrap_or(Value::Null);
                    return Err(v["message"].as_str().unwrap_or(err).to_string());
                } else if let Some((name, payload)) = event(t)
                    && name == "session"
                {
                    break payload;
                }
            }
            other => return Err(format!("handshake ended: {other:?}")),
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(t) = message else { continue };
            if t.as_str() == "2" {
                if ws.send(Message::text("3")).await.is_err() {
                    break;
                }
            } else if let Some(e) = event(t.as_str())
                && tx.send(e).is_err()
            {
                break;
            }
        }
    });
    Ok(Sio { session, rx, task })
}

/// `42["name",payload]` → (name, payload).
fn event(packet: &str) -> Option<(String, Value)> {
    let body = packet.strip_prefix("42")?;
    let mut array: Vec<Value> = serde_json::from_str(body).ok()?;
    if array.len() < 2 {
        return None;
    }
    let payload = array.remove(1);
    Some((array.remove(0).as_str()?.to_string(), payload))
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
