//! Clients that drive the systems like real ones: gRPC publishers and
//! subscribers, Socket.IO over websocket, and a NATS client speaking the
//! text protocol. Every event carries its publish time (`"t"`, Unix
//! nanoseconds) at the start of its JSON data, padded to 256 bytes, so any
//! receiver can record publish-to-receipt latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{
    self, PublishRequest, PublishStreamRequest, SubscribeRequest, subscribe_response,
};
use tensorcost_testkit::sio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

pub const EVENT_TYPE: &str = "metrics.collected";
pub const DATA_BYTES: usize = 256;

pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// 256 bytes of JSON: `{"t":<now>,"pad":"xxx…"}`.
pub fn data_now() -> String {
    let head = format!(r#"{{"t":{},"pad":""#, unix_nanos());
    let pad = DATA_BYTES.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(DATA_BYTES);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// The publish time in a received payload: the digits after the first `"t":`.
pub fn sent_at(text: &str) -> Option<u64> {
    let start = text.find("\"t\":")? + 4;
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    text[start..start + digits].parse().ok()
}

/// What receivers record: a count and latencies (µs), from when
/// `measuring` is set.
pub struct Recorder {
    pub measuring: AtomicBool,
    pub delivered: AtomicU64,
    hist: std::sync::Mutex<Histogram<u64>>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            measuring: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            hist: std::sync::Mutex::new(Histogram::new(3).expect("histogram")),
        })
    }

    pub fn merge(&self, local: &Histogram<u64>, count: u64) {
        self.delivered.fetch_add(count, Ordering::Relaxed);
        let _ = self
            .hist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(local);
    }

    /// Records one delivery's latency in µs (receivers that see one event
    /// per request: no histogram of their own to allocate).
    pub fn record(&self, micros: Option<u64>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(us) = micros {
            let _ = self
                .hist
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(us);
        }
    }

    /// (p50, p99, p99.9) in milliseconds.
    pub fn percentiles(&self) -> (f64, f64, f64) {
        let h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |q| h.value_at_quantile(q) as f64 / 1000.0;
        (ms(0.5), ms(0.99), ms(0.999))
    }
}

/// Records into a local histogram, merged into the recorder every
/// `FLUSH` events and at the end (keeps the shared lock cold).
struct Local {
    hist: Histogram<u64>,
    count: u64,
}

impl Local {
    fn new() -> Self {
        Self {
            hist: Histogram::new(3).expect("histogram"),
            count: 0,
        }
    }

    fn record(&mut self, recorder: &Recorder, sent: Option<u64>) {
        if !recorder.measuring.load(Ordering::Relaxed) {
            return;
        }
        if let Some(t) = sent {
            let _ = self.hist.record(unix_nanos().saturating_sub(t) / 1000);
        }
        self.count += 1;
        if self.count >= 4096 {
            self.flush(recorder);
        }
    }

    fn flush(&mut self, recorder: &Recorder) {
        recorder.merge(&self.hist, self.count);
        self.hist.reset();
        self.count = 0;
    }
}

pub fn token(tenant: Option<&str>, scopes: &str) -> String {
    tensorcost_testkit::token::mint(
        super::procs::SECRET,
        tenant,
        scopes,
        "loadgen",
        Duration::from_secs(6 * 3600),
    )
}

fn authed<T>(m: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

pub fn event(tenant: Option<&str>) -> proto::Event {
    proto::Event {
        r#type: EVENT_TYPE.into(),
        data: data_now(),
        tenant_id: tenant.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

// ---------- gRPC ----------

/// A gRPC subscriber recording into `recorder` until `stop`.
pub async fn grpc_subscriber(
    grpc: &str,
    token: &str,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut client = EventBrokerClient::connect(grpc.to_string()).await?;
    let mut stream = client
        .subscribe(authed(
            SubscribeRequest {
                max_batch: 256,
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    match stream.next().await {
        Some(Ok(m)) if matches!(m.message, Some(subscribe_response::Message::Status(_))) => {}
        other => bail!("subscribe did not start: {other:?}"),
    }
    Ok(tokio::spawn(async move {
        let mut local = Local::new();
        while !stop.load(Ordering::Relaxed) {
            let next = tokio::select! {
                m = stream.next() => m,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            match next {
                Some(Ok(m)) => match m.message {
                    Some(subscribe_response::Message::Event(e)) => {
                        local.record(&recorder, sent_at(&e.data));
                    }
                    Some(subscribe_response::Message::Events(batch)) => {
                        for e in &batch.events {
                            local.record(&recorder, sent_at(&e.data));
                        }
                    }
                    _ => {}
                },
                _ => break,
            }
        }
        local.flush(&recorder);
    }))
}

/// Events per streaming-publish message when publishing at maximum rate.
pub const STREAM_BATCH: u64 = 100;

/// Publishes `n` events over one stream as fast as the stream allows, in
/// messages of [`STREAM_BATCH`] events (each acknowledged on its own).
pub async fn grpc_stream_max(grpc: &str, token: &str, n: u64) -> anyhow::Result<Duration> {
    grpc_stream_events(grpc, token, n, |_| event(None)).await
}

/// [`grpc_stream_max`] with event `i` made by `make(i)`.
pub async fn grpc_stream_events(
    grpc: &str,
    token: &str,
    n: u64,
    make: impl Fn(u64) -> proto::Event + Send + Sync + 'static,
) -> anyhow::Result<Duration> {
    let mut client = EventBrokerClient::connect(grpc.to_string()).await?;
    let messages = tokio_stream::iter((0..n.div_ceil(STREAM_BATCH)).map(move |m| {
        let len = STREAM_BATCH.min(n - m * STREAM_BATCH);
        PublishStreamRequest {
            events: (0..len).map(|i| make(m * STREAM_BATCH + i)).collect(),
            ..Default::default()
        }
    }));
    let start = Instant::now();
    let mut acks = client
        .publish_stream(authed(messages, token))
        .await?
        .into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.next().await {
        let ack = ack?;
        if ack.outcome.is_some() {
            bail!("a batch was refused: {:?}", ack.outcome);
        }
        acked += ack.outcomes.len() as u64;
    }
    if acked != n {
        bail!("{acked} of {n} acknowledged");
    }
    Ok(start.elapsed())
}

/// Publishes `n` events one unary call at a time.
pub async fn grpc_unary_max(grpc: &str, token: &str, n: u64) -> anyhow::Result<Duration> {
    let mut client = EventBrokerClient::connect(grpc.to_string()).await?;
    let start = Instant::now();
    for _ in 0..n {
        client
            .publish(authed(
                PublishRequest {
                    events: vec![event(None)],
                },
                token,
            ))
            .await?;
    }
    Ok(start.elapsed())
}

/// Publishes at a steady total `rate` over one stream until `until`
/// returns true, round robin over `tenants` (with an all-tenants token).
/// Returns the count published while `measuring` was set.
pub async fn grpc_stream_steady(
    grpc: &str,
    token: &str,
    rate: u64,
    tenants: &[String],
    recorder: &Recorder,
    duration: Duration,
) -> anyhow::Result<u64> {
    let make = |i: u64| {
        let tenant = (!tenants.is_empty()).then(|| tenants[i as usize % tenants.len()].as_str());
        event(tenant)
    };
    let (measured, _acked) = stream_paced(grpc, token, rate, duration, recorder, make).await?;
    Ok(measured)
}

/// Publishes event `i` made by `make(i)` at a steady `rate` over one
/// stream for `duration`; returns the count acknowledged once every one
/// was.
pub async fn grpc_stream_paced(
    grpc: &str,
    token: &str,
    rate: u64,
    duration: Duration,
    make: impl Fn(u64) -> proto::Event,
) -> anyhow::Result<u64> {
    let recorder = Recorder::new();
    recorder.measuring.store(true, Ordering::Relaxed);
    let (_, acked) = stream_paced(grpc, token, rate, duration, &recorder, make).await?;
    acked
}

/// One stream publishing `make(i)` at `rate` for `duration`: the count
/// sent while `recorder` measured, and the count acknowledged (or why
/// the stream ended early).
async fn stream_paced(
    grpc: &str,
    token: &str,
    rate: u64,
    duration: Duration,
    recorder: &Recorder,
    make: impl Fn(u64) -> proto::Event,
) -> anyhow::Result<(u64, anyhow::Result<u64>)> {
    let mut client = EventBrokerClient::connect(grpc.to_string()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishStreamRequest>(65_536);
    let mut acks = client
        .publish_stream(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        ))
        .await?
        .into_inner();
    let drain = tokio::spawn(async move {
        let mut acked = 0u64;
        while let Some(ack) = acks.next().await {
            match ack {
                Ok(ack) => acked += ack.outcomes.len() as u64,
                Err(e) => anyhow::bail!("the publish stream ended: {e}"),
            }
        }
        Ok(acked)
    });
    // What is due in a 1 ms tick goes in one message, as a producer that
    // buffers briefly would send it.
    let measured = pace(rate, duration, recorder, |first, count| {
        let events = (first..first + count).map(&make).collect();
        let tx = tx.clone();
        async move {
            tx.send(PublishStreamRequest {
                events,
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
    drop(tx);
    Ok((measured, drain.await?))
}

/// Every 1 ms, calls `send(first, count)` with the events due by then, so
/// that `rate` per second go out for `duration`; counts what was sent while
/// the recorder measured.
async fn pace<F, Fut>(rate: u64, duration: Duration, recorder: &Recorder, mut send: F) -> u64
where
    F: FnMut(u64, u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut measured = 0u64;
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if due > sent {
            if !send(sent, due - sent).await {
                return measured;
            }
            if recorder.measuring.load(Ordering::Relaxed) {
                measured += due - sent;
            }
            sent = due;
        }
    }
    measured
}

// ---------- Socket.IO over websocket ----------

pub use sio::Ws;

/// Opens a Socket.IO v5 connection at `/ws` with `auth`, and waits for the
/// `session` message (the broker's, or the peer's).
pub async fn sio_connect(host: &str, auth: &serde_json::Value) -> anyhow::Result<Ws> {
    let (ws, _session) = sio::handshake(host, auth, sio::Until::Session)
        .await
        .map_err(sio::into_anyhow)?;
    Ok(ws)
}

/// Reads events until `stop`, recording them; answers pings.
pub async fn sio_receive(mut ws: Ws, recorder: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut local = Local::new();
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::select! {
            m = ws.next() => m,
            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Some(Ok(Message::Text(text))) = next else {
            break;
        };
        if text.as_str() == "2" {
            let _ = ws.send(Message::text("3")).await;
        } else if sio::is_event_packet(&text) {
            local.record(&recorder, sent_at(&text));
        }
    }
    local.flush(&recorder);
}

/// A socket that lives `lifetime`, leaves, and comes back resuming from the
/// last event id it saw, until `stop`; it first waits `offset`. Counts
/// events into `recorder` and reconnections into `resumes`.
pub async fn sio_churning(
    host: String,
    token: String,
    offset: Duration,
    lifetime: Duration,
    recorder: Arc<Recorder>,
    resumes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    tokio::time::sleep(offset).await;
    let mut last_id: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut auth = serde_json::json!({ "token": token });
        if let Some(id) = &last_id {
            auth["lastEventId"] = id.clone().into();
            resumes.fetch_add(1, Ordering::Relaxed);
        }
        let Ok(mut ws) = sio_connect(&host, &auth).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let until = Instant::now() + lifetime;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            let next = tokio::select! {
                m = ws.next() => m,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            let Some(Ok(Message::Text(text))) = next else {
                break;
            };
            if text.as_str() == "2" {
                let _ = ws.send(Message::text("3")).await;
            } else if sio::is_event_packet(&text) {
                if let Some(id) = event_id(&text) {
                    last_id = Some(id.to_string());
                }
                // Counted at once: the soak samples the rate as it goes.
                recorder.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = ws.close(None).await;
    }
}

/// The `id` of an `event` packet: the envelope starts with it.
fn event_id(packet: &str) -> Option<&str> {
    let start = packet.find("{\"id\":\"")? + 7;
    let len = packet[start..].find('"')?;
    Some(&packet[start..start + len])
}

/// Publishes to the Node peer: `42["publish",{tenant,type,data}]` at a
/// steady rate, round robin over tenants.
pub async fn sio_publish_steady(
    host: &str,
    rate: u64,
    tenants: &[String],
    recorder: &Recorder,
    duration: Duration,
) -> anyhow::Result<u64> {
    let ws = sio_connect_publisher(host).await?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(65_536);
    // Writes batched frames; a reader answers pings.
    let (pong_tx, mut pong_rx) = tokio::sync::mpsc::channel::<()>(16);
    let reader = tokio::spawn(async move {
        while let Some(Ok(Message::Text(t))) = stream.next().await {
            if t.as_str() == "2" && pong_tx.send(()).await.is_err() {
                break;
            }
        }
    });
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(text) => if sink.send(Message::text(text)).await.is_err() { break },
                    None => break,
                },
                Some(()) = pong_rx.recv() => { let _ = sink.send(Message::text("3")).await; }
            }
        }
    });
    let measured = pace(rate, duration, recorder, |first, count| {
        let frames: Vec<String> = (first..first + count)
            .map(|i| {
                let tenant = &tenants[i as usize % tenants.len()];
                format!(
                    r#"42["publish",{{"tenant":"{tenant}","type":"{EVENT_TYPE}","data":{}}}]"#,
                    data_now()
                )
            })
            .collect();
        let tx = tx.clone();
        async move {
            for frame in frames {
                if tx.send(frame).await.is_err() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    drop(tx);
    let _ = writer.await;
    reader.abort();
    Ok(measured)
}

async fn sio_connect_publisher(host: &str) -> anyhow::Result<Ws> {
    let auth = serde_json::json!({ "role": "publisher" });
    let (ws, _) = sio::handshake(host, &auth, sio::Until::Connected)
        .await
        .map_err(sio::into_anyhow)?;
    Ok(ws)
}

// ---------- NATS (text protocol) ----------

/// The length of a NATS `MSG`/`HMSG` payload: the last field of its line
/// (for `HMSG`, headers and payload together).
fn nats_payload_len(rest: &str) -> usize {
    rest.split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn nats_connect(
    port: u16,
) -> anyhow::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    BufWriter<tokio::net::tcp::OwnedWriteHalf>,
)> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    let mut info = String::new();
    r.read_line(&mut info).await?;
    if !info.starts_with("INFO") {
        bail!("not a NATS server: {info:?}");
    }
    w.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"headers\":true}\r\nPING\r\n",
    )
        .await?;
    w.flush().await?;
    let mut pong = String::new();
    r.read_line(&mut pong).await?;
    if pong.trim() != "PONG" {
        bail!("NATS handshake: {pong:?}");
    }
    Ok((r, w))
}

/// A NATS subscriber on `subject`, recording until it has `n` messages or `stop`.
pub async fn nats_subscriber(
    port: u16,
    subject: &str,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (mut r, mut w) = nats_connect(port).await?;
    w.write_all(format!("SUB {subject} 1\r\nPING\r\n").as_bytes())
        .await?;
    w.flush().await?;
    let mut pong = String::new();
    r.read_line(&mut pong).await?;
    Ok(tokio::spawn(async move {
        let mut local = Local::new();
        let mut line = String::new();
        let mut payload = Vec::with_capacity(DATA_BYTES + 2);
        while !stop.load(Ordering::Relaxed) {
            line.clear();
            let read = tokio::select! {
                r = r.read_line(&mut line) => r,
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            };
            if !matches!(read, Ok(n) if n > 0) {
                break;
            }
            // HMSG: a message with headers (JetStream's Nats-Msg-Id); its
            // last field is the length of headers and payload together.
            if let Some(rest) = line
                .strip_prefix("MSG ")
                .or_else(|| line.strip_prefix("HMSG "))
            {
                let len = nats_payload_len(rest);
                payload.resize(len + 2, 0);
                if r.read_exact(&mut payload).await.is_err() {
                    break;
                }
                local.record(
                    &recorder,
                    sent_at(&String::from_utf8_lossy(&payload[..len])),
                );
            } else if line.starts_with("PING") {
                let _ = w.write_all(b"PONG\r\n").await;
                let _ = w.flush().await;
            }
        }
        local.flush(&recorder);
    }))
}

/// Creates a JetStream stream `name` on `subject` as the broker keeps
/// events: in memory, the last `max_msgs`, deduplicated on `Nats-Msg-Id`
/// over two minutes (JetStream's default window).
pub async fn jetstream_create_stream(
    port: u16,
    name: &str,
    subject: &str,
    max_msgs: u64,
) -> anyhow::Result<()> {
    let (mut r, mut w) = nats_connect(port).await?;
    let config = serde_json::json!({
        "name": name,
        "subjects": [subject],
        "storage": "memory",
        "retention": "limits",
        "discard": "old",
        "max_msgs": max_msgs,
        "duplicate_window": 120_000_000_000u64,
        "num_replicas": 1,
    })
    .to_string();
    w.write_all(
        format!(
            "SUB _INBOX.create 1\r\nPUB $JS.API.STREAM.CREATE.{name} _INBOX.create {}\r\n{config}\r\n",
            config.len()
        )
        .as_bytes(),
    )
    .await?;
    w.flush().await?;
    let mut line = String::new();
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            if let Some(rest) = line.strip_prefix("MSG ") {
                let len = nats_payload_len(rest);
                let mut payload = vec![0; len + 2];
                r.read_exact(&mut payload).await?;
                return anyhow::Ok(String::from_utf8_lossy(&payload[..len]).into_owned());
            }
            if line.starts_with("-ERR") {
                bail!("nats-server: {}", line.trim());
            }
        }
    })
    .await
    .context("no reply to the JetStream stream creation (is JetStream enabled?)")??;
    if reply.contains("\"error\"") {
        bail!("JetStream refused the stream: {reply}");
    }
    Ok(())
}

/// Publishes `n` messages to a JetStream subject as a JetStream client's
/// asynchronous publish does: each with its own `Nats-Msg-Id` header (the
/// stream deduplicates on it) and a reply subject for its acknowledgement,
/// at most `window` unacknowledged. Returns once all are acknowledged.
pub async fn jetstream_publish_max(
    port: u16,
    subject: &str,
    n: u64,
    window: u64,
) -> anyhow::Result<Duration> {
    let (mut r, mut w) = nats_connect(port).await?;
    w.write_all(b"SUB _INBOX.acks.* 1\r\nPING\r\n").await?;
    w.flush().await?;
    let mut pong = String::new();
    r.read_line(&mut pong).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (acked, refused, progress) = (acked.clone(), refused.clone(), progress.clone());
        tokio::spawn(async move {
            let mut line = String::new();
            let mut payload = Vec::new();
            while acked.load(Ordering::Relaxed) < n {
                line.clear();
                if !matches!(r.read_line(&mut line).await, Ok(n) if n > 0) {
                    break;
                }
                let Some(rest) = line.strip_prefix("MSG ") else {
                    continue;
                };
                let len = nats_payload_len(rest);
                payload.resize(len + 2, 0);
                if r.read_exact(&mut payload).await.is_err() {
                    break;
                }
                if payload.windows(7).any(|w| w == b"\"error\"") {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                acked.fetch_add(1, Ordering::Relaxed);
                progress.notify_one();
            }
            progress.notify_one();
        })
    };
    let start = Instant::now();
    for i in 0..n {
        while i.saturating_sub(acked.load(Ordering::Relaxed)) >= window {
            w.flush().await?;
            if reader.is_finished() {
                bail!(
                    "the JetStream connection closed after {} acknowledgements",
                    acked.load(Ordering::Relaxed)
                );
            }
            progress.notified().await;
        }
        let data = data_now();
        let headers = format!("NATS/1.0\r\nNats-Msg-Id: bench-{i}\r\n\r\n");
        w.write_all(
            format!(
                "HPUB {subject} _INBOX.acks.{i} {} {}\r\n",
                headers.len(),
                headers.len() + data.len()
            )
            .as_bytes(),
        )
        .await?;
        w.write_all(headers.as_bytes()).await?;
        w.write_all(data.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
    }
    w.flush().await?;
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .context("JetStream acknowledgements did not all arrive in 60 s")??;
    let elapsed = start.elapsed();
    let (acked, refused) = (
        acked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    if acked < n || refused > 0 {
        bail!("JetStream acknowledged {acked} of {n}, {refused} of them with an error");
    }
    Ok(elapsed)
}

/// Publishes `n` messages as fast as the connection takes them, then waits
/// for the server to have processed them all (PING/PONG).
pub async fn nats_publish_max(port: u16, subject: &str, n: u64) -> anyhow::Result<Duration> {
    let (mut r, mut w) = nats_connect(port).await?;
    let start = Instant::now();
    for _ in 0..n {
        let data = data_now();
        w.write_all(format!("PUB {subject} {}\r\n", data.len()).as_bytes())
            .await?;
        w.write_all(data.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
    }
    w.write_all(b"PING\r\n").await?;
    w.flush().await?;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.context("NATS connection")?;
        if line.trim() == "PONG" {
            break;
        }
    }
    Ok(start.elapsed())
}
