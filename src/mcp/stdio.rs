//! `tensorcost-events mcp`: the MCP server over standard input and output,
//! for Claude Desktop and local agents, in one of two ways:
//!
//! - **Relay** (`TC_SERVER` set to a running broker's HTTP address): each
//!   JSON-RPC line read is POSTed to that broker's `/mcp` with
//!   `TC_TOKEN` as the bearer token, and each answer (JSON, or the events
//!   of an SSE stream) is written back as a line. The broker does all the
//!   work; this process holds nothing but the requests in flight.
//! - **In-process** (no `TC_SERVER`): this process runs a broker with the
//!   same settings as `serve` (listeners, Redis or `TC_DATA_DIR`) and
//!   serves the tools on stdio to the identity of `TC_TOKEN`, which it
//!   verifies itself.
//!
//! Standard output carries only MCP messages; logs go to standard error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rmcp::ServiceExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::{MAX_REQUEST_BYTES, Tools};
use crate::config::Settings;
use crate::server;

/// Largest answer the relay passes on (one JSON answer, or one event of a
/// stream); a longer one is replaced by an error naming the limit.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Requests the relay keeps waiting for at once; past it a request is
/// answered with an error at once.
const MAX_IN_FLIGHT: usize = 64;
/// Lines waiting to be written to standard output.
const OUT_QUEUE: usize = 256;
/// The header a stateless Streamable HTTP request carries its revision in.
const VERSION_HEADER: &str = "mcp-protocol-version";
/// The revision without sessions, whose `subscriptions/listen` the relay
/// follows resources with.
const MODERN: &str = "2026-07-28";
/// Where 2026-07-28 requests carry their revision.
const VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";

/// Runs a broker in this process and serves MCP on stdio to the identity
/// of `token`, until standard input ends or a signal arrives.
pub async fn in_process(
    settings: &Settings,
    token: &str,
    active_tenant: Option<&str>,
) -> anyhow::Result<()> {
    let given = settings
        .auth
        .jwt_secret
        .as_deref()
        .filter(|s| !s.is_empty());
    // Without a secret only Cognito ID tokens can verify: HS256 ones were
    // minted with a secret this process does not have.
    let secret = given.map_or_else(crate::auth::generate_secret, str::to_string);
    let running = server::start(settings, secret.as_bytes()).await?;
    let app = running.app();
    let identity = match app
        .authenticate(Some(&format!("Bearer {}", token.trim())), active_tenant)
        .await
    {
        Ok(identity) => identity,
        Err(e) => {
            running.stop().await?;
            let hint = if given.is_none() {
                " (running in-process, this process verifies TC_TOKEN: set TC_JWT_SECRET to \
                 the secret it was minted with, or TC_SERVER to use a running broker)"
            } else {
                ""
            };
            anyhow::bail!("TC_TOKEN refused: {}{hint}", e.message);
        }
    };
    tracing::info!(
        tenant = identity.tenant.as_deref().unwrap_or("(all)"),
        "MCP on standard input and output"
    );
    let service = Tools::for_identity(app, identity)
        .serve(rmcp::transport::stdio())
        .await
        .context("MCP over stdio did not start")?;
    let cancel = service.cancellation_token();
    tokio::select! {
        _ = service.waiting() => {}
        () = server::signal() => cancel.cancel(),
    }
    running.stop().await
}

/// Relays MCP between stdio and the `/mcp` of the broker at `server`.
pub async fn relay(
    server: &str,
    token: &str,
    active_tenant: Option<&str>,
    ca: &crate::tls::CaArgs,
) -> anyhow::Result<()> {
    let endpoint = endpoint(server)?;
    let client = crate::tls::http_client(ca)?
        .user_agent(concat!("tensorcost-events-mcp/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("HTTP client")?;
    let relay = Relay {
        client,
        endpoint,
        authorization: format!("Bearer {}", token.trim()),
        active_tenant: active_tenant.map(str::to_string),
        version: Arc::default(),
        in_flight: Arc::default(),
        followed: Arc::default(),
    };
    let (out, lines) = mpsc::channel::<String>(OUT_QUEUE);
    let writer = tokio::spawn(write_lines(lines));
    let mut input = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut input)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .context("reading standard input")?;
        if read == 0 {
            break;
        }
        if line.len() > MAX_REQUEST_BYTES && line.last() != Some(&b'\n') {
            skip_line(&mut input).await?;
            let e = error(
                Value::Null,
                -32600,
                format!("request larger than {MAX_REQUEST_BYTES} bytes: not sent"),
            );
            let _ = out.send(e).await;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(message) => {
                // Written before reading on: a client that floods waits.
                if let Some(refusal) = relay.forward(message, text.to_string(), out.clone()) {
                    let _ = out.send(refusal).await;
                }
            }
            Err(e) => {
                let _ = out
                    .send(error(Value::Null, -32700, format!("not JSON: {e}")))
                    .await;
            }
        }
    }
    // Standard input ended: the client is gone, and so is what it waits for.
    for tasks in [&relay.in_flight, &relay.followed] {
        for (_, task) in tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            task.abort();
        }
    }
    drop(out);
    let _ = writer.await;
    Ok(())
}

/// The `/mcp` URL of a broker given as its HTTP address or that URL.
fn endpoint(server: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(server.trim()).with_context(|| {
        format!("TC_SERVER {server:?} is not a URL like http://127.0.0.1:8080 (the broker's HTTP address)")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!(
            "TC_SERVER {server:?}: the broker's HTTP address starts with http:// or https://"
        );
    }
    let path = url.path().trim_end_matches('/').to_string();
    if path.ends_with("/mcp") {
        url.set_path(&path);
    } else {
        url.set_path(&format!("{path}/mcp"));
    }
    Ok(url)
}

struct Relay {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    authorization: String,
    /// `x-active-tenant-id` on every request (Cognito users of several
    /// tenants).
    active_tenant: Option<String>,
    /// The revision the session negotiated (from `initialize`).
    version: Arc<Mutex<Option<String>>>,
    /// Requests waiting for their answer, by JSON-RPC id.
    in_flight: Arc<Mutex<HashMap<String, AbortHandle>>>,
    /// `resources/subscribe` at a revision before 2026-07-28, served here
    /// with one `subscriptions/listen` to the broker each, by URI.
    followed: Arc<Mutex<HashMap<String, AbortHandle>>>,
}

impl Relay {
    /// Sends `message` on its way; returns the refusal to write back when
    /// it is not sent.
    fn forward(&self, message: Value, body: String, out: mpsc::Sender<String>) -> Option<String> {
        let method = message.get("method").and_then(Value::as_str);
        let id = message.get("id").cloned().filter(|_| method.is_some());
        // A stateless broker cannot act on a cancellation: end the request
        // here instead, which ends it there.
        if method == Some("notifications/cancelled") {
            if let Some(request) = message.pointer("/params/requestId") {
                let task = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&request.to_string());
                if let Some(task) = task {
                    task.abort();
                }
            }
            return None;
        }
        let legacy = self
            .version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .is_some_and(|v| v != MODERN);
        if legacy && let Some(id) = &id {
            match method {
                Some("resources/subscribe") => return self.follow(id, &message, out),
                Some("resources/unsubscribe") => {
                    if let Some(uri) = message.pointer("/params/uri").and_then(Value::as_str)
                        && let Some(task) = lock(&self.followed).remove(uri)
                    {
                        task.abort();
                    }
                    return Some(answer(id.clone(), json!({})));
                }
                _ => {}
            }
        }
        let version = message
            .pointer("/params/_meta")
            .and_then(|meta| meta.get(VERSION_META))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                self.version
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            });
        let request = self.post(&message, body, version.as_deref());
        let initialize = method == Some("initialize");
        let negotiated = Arc::clone(&self.version);
        let in_flight = Arc::clone(&self.in_flight);
        let key = id.as_ref().map(Value::to_string);
        let endpoint = self.endpoint.clone();
        let mut in_flight_now = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(key), Some(id)) = (&key, &id) {
            if in_flight_now.contains_key(key) {
                let text = format!("id {key} is already waiting for its answer: not sent");
                return Some(error(id.clone(), -32600, text));
            }
            if in_flight_now.len() >= MAX_IN_FLIGHT {
                let text = format!("more than {MAX_IN_FLIGHT} requests waiting: not sent");
                return Some(error(id.clone(), -32000, text));
            }
        }
        // Registered before the task can end, which unregisters it.
        let task = tokio::spawn({
            let key = key.clone();
            async move {
                let answered = exchange(request, &out, initialize.then_some(&negotiated)).await;
                if let (Err(message), Some(id)) = (answered, id) {
                    let text = format!("{endpoint}: {message}");
                    let _ = out.send(error(id, -32000, text)).await;
                }
                if let Some(key) = key {
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
            }
        });
        if let Some(key) = key {
            in_flight_now.insert(key, task.abort_handle());
        }
        None
    }
}

impl Relay {
    /// The POST of `message` (its text `body`) to the broker's `/mcp`, with
    /// the token, the revision, the headers 2026-07-28 wants and the active
    /// tenant.
    fn post(
        &self,
        message: &Value,
        body: String,
        version: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/event-stream",
            )
            .body(body);
        if let Some(version) = version {
            request = request.header(VERSION_HEADER, version);
        }
        for (name, value) in standard_headers(message) {
            request = request.header(name, value);
        }
        if let Some(tenant) = &self.active_tenant {
            request = request.header(crate::app::ACTIVE_TENANT_HEADER, tenant);
        }
        request
    }

    /// `resources/subscribe` of a client at a revision before 2026-07-28:
    /// `/mcp` keeps no session for it, so the relay follows the URI with a
    /// `subscriptions/listen` of its own and passes each update on as that
    /// revision's `notifications/resources/updated`. The subscribe is
    /// answered once the broker follows (its first notification), or with
    /// the broker's refusal.
    fn follow(&self, id: &Value, message: &Value, out: mpsc::Sender<String>) -> Option<String> {
        let Some(uri) = message.pointer("/params/uri").and_then(Value::as_str) else {
            return Some(error(id.clone(), -32602, "params.uri: required".into()));
        };
        let mut followed = lock(&self.followed);
        followed.retain(|_, task| !task.is_finished());
        if followed.contains_key(uri) {
            return Some(answer(id.clone(), json!({})));
        }
        if followed.len() >= super::resources::MAX_URIS {
            let text = format!(
                "uri: this connection already follows {} event resources, the limit; unsubscribe from one first",
                super::resources::MAX_URIS
            );
            return Some(error(id.clone(), -32602, text));
        }
        let listen = json!({
            "jsonrpc": "2.0",
            "id": format!("relay-follow-{uri}"),
            "method": "subscriptions/listen",
            "params": {
                "_meta": {
                    VERSION_META: MODERN,
                    "io.modelcontextprotocol/clientInfo": {
                        "name": "tensorcost-events-mcp",
                        "version": env!("CARGO_PKG_VERSION"),
                    },
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
                "notifications": {"resourceSubscriptions": [uri]},
            }
        });
        let request = self.post(&listen, listen.to_string(), Some(MODERN));
        let (id, uri_owned, endpoint) = (id.clone(), uri.to_string(), self.endpoint.clone());
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel::<String>(OUT_QUEUE);
            // One task for the stream and its reading: aborting it (an
            // unsubscribe) ends the listen at the broker too.
            let stream = async move { exchange(request, &tx, None).await };
            let updated = json!({
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": {"uri": uri_owned},
            })
            .to_string();
            let read = async {
                let mut answered = false;
                while let Some(line) = rx.recv().await {
                    let Ok(message) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if message.get("method").and_then(Value::as_str)
                        == Some("notifications/resources/updated")
                    {
                        if !answered {
                            answered = true;
                            let _ = out.send(answer(id.clone(), json!({}))).await;
                        }
                        if out.send(updated.clone()).await.is_err() {
                            break;
                        }
                    } else if let Some(e) = message.get("error") {
                        let text = e["message"].as_str().unwrap_or("refused").to_string();
                        if answered {
                            tracing::warn!(uri = %uri_owned, "no longer following: {text}");
                        } else {
                            answered = true;
                            let code = e["code"].as_i64().unwrap_or(-32000);
                            let _ = out.send(error(id.clone(), code, text)).await;
                        }
                    }
                }
                answered
            };
            let (streamed, answered) = tokio::join!(stream, read);
            if let (Err(why), false) = (streamed, answered) {
                let _ = out
                    .send(error(id.clone(), -32000, format!("{endpoint}: {why}")))
                    .await;
            }
        });
        followed.insert(uri.to_string(), task.abort_handle());
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A JSON-RPC answer to `id`.
fn answer(id: Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

/// The headers 2026-07-28 requires of a request over HTTP (SEP-2243):
/// `Mcp-Method`, and `Mcp-Name` for the methods that name something, as
/// rmcp's own client sends them (earlier revisions ignore them).
fn standard_headers(message: &Value) -> Vec<(&'static str, String)> {
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return Vec::new();
    };
    let mut headers = vec![("mcp-method", method.to_string())];
    let key = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    };
    if let Some(name) = key
        .and_then(|k| message.pointer(&format!("/params/{k}")))
        .and_then(Value::as_str)
    {
        // Plain when it can travel as a header value as it is.
        let needs_base64 = name.starts_with([' ', '\t'])
            || name.ends_with([' ', '\t'])
            || !name.chars().all(|c| (' '..='~').contains(&c))
            || (name.starts_with("=?base64?") && name.ends_with("?="));
        let value = if needs_base64 {
            use base64::Engine;
            format!(
                "=?base64?{}?=",
                base64::engine::general_purpose::STANDARD.encode(name)
            )
        } else {
            name.to_string()
        };
        headers.push(("mcp-name", value));
    }
    headers
}

/// Sends one message and writes what comes back; `Err` says why nothing
/// (or not everything) came back.
async fn exchange(
    request: reqwest::RequestBuilder,
    out: &mpsc::Sender<String>,
    negotiated: Option<&Arc<Mutex<Option<String>>>>,
) -> Result<(), String> {
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach the broker: {e}"))?;
    let status = response.status();
    let sse = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if status == reqwest::StatusCode::ACCEPTED {
        return Ok(());
    }
    if !status.is_success() {
        let body = read_some(&mut response, 1024).await;
        return Err(format!("the broker answered {status}: {}", body.trim()));
    }
    let encode = |message: Value| {
        if let Some(version) = negotiated
            && let Some(v) = message
                .pointer("/result/protocolVersion")
                .and_then(Value::as_str)
        {
            *version.lock().unwrap_or_else(|e| e.into_inner()) = Some(v.to_string());
        }
        message.to_string()
    };
    if !sse {
        let body = read_some(&mut response, MAX_ANSWER_BYTES + 1).await;
        if body.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the broker's answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        let message: Value = serde_json::from_str(&body)
            .map_err(|e| format!("the broker's answer is not JSON: {e}"))?;
        let _ = out.send(encode(message)).await;
        return Ok(());
    }
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| format!("the broker's stream broke: {e}"))?;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end.0).collect();
            buffer.drain(..end.1);
            if let Some(message) = event_data(&event)
                && out.send(encode(message)).await.is_err()
            {
                return Ok(());
            }
        }
        if buffer.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "an event of the broker's stream is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
    }
}

/// Where the first SSE event of `buffer` ends: its length and the length
/// of the blank line after it.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The JSON message of one SSE event, if it carries one (keep-alives and
/// priming events do not).
fn event_data(event: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}

async fn read_some(response: &mut reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            body.truncate(limit);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// A JSON-RPC error answer to `id`.
fn error(id: Value, code: i64, message: String) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

/// Reads and drops the rest of an over-long line.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(input: &mut R) -> anyhow::Result<()> {
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

async fn write_lines(mut lines: mpsc::Receiver<String>) {
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.recv().await {
        let written = async {
            stdout.write_all(line.as_bytes()).await?;
            stdout.write_all(b"\n").await?;
            stdout.flush().await
        };
        if written.await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_stream_events() {
        assert_eq!(
            endpoint("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/mcp"
        );
        assert_eq!(
            endpoint("https://events.example.com/mcp").unwrap().as_str(),
            "https://events.example.com/mcp"
        );
        assert_eq!(
            endpoint("http://h:1/base/mcp/").unwrap().as_str(),
            "http://h:1/base/mcp"
        );
        assert!(endpoint("127.0.0.1:8080").is_err());
        let call = json!({"method": "resources/read", "params": {"uri": "events://cost.*"}});
        assert_eq!(
            standard_headers(&call),
            vec![
                ("mcp-method", "resources/read".into()),
                ("mcp-name", "events://cost.*".into())
            ]
        );
        let odd = json!({"method": "tools/call", "params": {"name": "caf\u{e9}"}});
        assert_eq!(standard_headers(&odd)[1].1, "=?base64?Y2Fmw6k=?=");
        assert!(endpoint("ftp://x").is_err());
        let stream = b"id: 1\ndata: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\ndata: 2}\r\n\r\n";
        let mut buffer = stream.to_vec();
        let mut messages = Vec::new();
        while let Some(end) = event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end.0).collect();
            buffer.drain(..end.1);
            messages.extend(event_data(&event));
        }
        assert_eq!(messages, vec![json!({"a": 1}), json!({"b": 2})]);
        assert!(buffer.is_empty());
    }
}
