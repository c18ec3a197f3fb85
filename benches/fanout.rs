//! Socket.IO fan-out harness: events/s delivered and publish-to-receipt
//! latency to many websocket clients across tenants, and the broker's memory
//! per idle connection. Not a timed test: run it with
//!
//!     cargo bench --bench fanout
//!
//! The broker is the real release binary in its own process (so its memory
//! is measured alone); the clients speak Socket.IO v5 / Engine.IO v4 over
//! websocket from this process, like socket.io-client does.
//!
//! Settings (environment): `BENCH_CLIENTS` (1000), `BENCH_TENANTS` (10),
//! `BENCH_RATE` total events/s published (5000), `BENCH_SECONDS` measured
//! (10), `BENCH_IDLE` idle connections for the memory figure (10000).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tensorcost_events::auth;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{self, PublishStreamRequest};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Broker {
    child: Child,
    http: String,
    grpc: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(rate_per_tenant: u64) -> Broker {
    let dir = std::env::temp_dir().join(format!("tc-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(env!("CARGO_BIN_EXE_tensorcost-events"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("TC_JWT_SECRET", SECRET)
        .env("TC_READY_FILE", &ready)
        .env("TC_RATE_LIMIT_PER_TENANT", rate_per_tenant.to_string())
        .env("TC_RATE_LIMIT_QUEUE", "100000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn broker");
    let deadline = Instant::now() + Duration::from_secs(20);
    let addrs: serde_json::Value = loop {
        if let Ok(body) = std::fs::read_to_string(&ready) {
            break serde_json::from_str(&body).expect("ready json");
        }
        assert!(Instant::now() < deadline, "broker not ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    Broker {
        child,
        http: addrs["http"].as_str().expect("http").to_string(),
        grpc: format!("http://{}", addrs["grpc"].as_str().expect("grpc")),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn token(tenant: Option<&str>, scopes: &str) -> String {
    let scopes = scopes.split_whitespace().map(String::from).collect();
    auth::mint_hs256(
        SECRET.as_bytes(),
        tenant,
        Some("bench"),
        Some(&scopes),
        Duration::from_secs(3600),
    )
    .expect("token")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a Socket.IO connection over websocket and waits for `session`.
async fn connect(http: &str, token: &str) -> Ws {
    let url = format!("ws://{http}/ws/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connect");
    // Engine.IO open packet.
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
        other => panic!("expected the open packet, got {other:?}"),
    }
    let auth = serde_json::json!({ "token": token });
    ws.send(Message::text(format!("40{auth}")))
        .await
        .expect("send connect");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.starts_with("40") => {}
            Some(Ok(Message::Text(t))) if t.starts_with("44") => panic!("refused: {t}"),
            Some(Ok(Message::Text(t))) if t.starts_with("42[\"session\"") => return ws,
            Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                ws.send(Message::text("3")).await.expect("pong");
            }
            other => panic!("unexpected during handshake: {other:?}"),
        }
    }
}

/// The publish time (Unix nanoseconds) the harness put in `data.t`.
fn sent_at(packet: &str) -> Option<u64> {
    let start = packet.find("\"data\":{\"t\":")? + "\"data\":{\"t\":".len();
    let digits: String = packet[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

struct Shared {
    measuring: AtomicBool,
    delivered: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
}

async fn client(mut ws: Ws, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut local = Histogram::<u64>::new(3).expect("histogram");
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let message = tokio::select! {
            m = ws.next() => m,
            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let Some(Ok(Message::Text(text))) = message else {
            break;
        };
        if text.as_str() == "2" {
            let _ = ws.send(Message::text("3")).await;
            continue;
        }
        if shared.measuring.load(Ordering::Relaxed)
            && let Some(t) = sent_at(&text)
        {
            count += 1;
            let _ = local.record(unix_nanos().saturating_sub(t) / 1000);
        }
    }
    shared.delivered.fetch_add(count, Ordering::Relaxed);
    let _ = shared.latencies.lock().await.add(&local);
}

async fn fanout(clients: u64, tenants: u64, rate: u64, seconds: u64) {
    let broker = start_broker(1_000_000);
    let pid = broker.child.id();
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        delivered: AtomicU64::new(0),
        latencies: Mutex::new(Histogram::new(3).expect("histogram")),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let tenant = format!("tenant-{}", c % tenants);
        let ws = connect(&broker.http, &token(Some(&tenant), "events:subscribe")).await;
        tasks.push(tokio::spawn(client(
            ws,
            Arc::clone(&shared),
            Arc::clone(&stop),
        )));
    }

    // One streaming publisher at a steady total rate, round robin over tenants.
    let service = token(None, "events:all_tenants events:publish");
    let mut grpc = EventBrokerClient::connect(broker.grpc.clone())
        .await
        .expect("grpc");
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishStreamRequest>(10_000);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {service}").parse().expect("ascii"),
    );
    let acks = tokio::spawn(async move {
        let mut acks = grpc
            .publish_stream(request)
            .await
            .expect("stream")
            .into_inner();
        let mut n = 0u64;
        while let Some(Ok(_)) = acks.next().await {
            n += 1;
        }
        n
    });
    let warmup = Duration::from_secs(2);
    let total = warmup + Duration::from_secs(seconds);
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let start = Instant::now();
    let mut published = 0u64;
    let mut measured_published = 0u64;
    let mut cpu_start = 0;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut measure_start = start;
    while start.elapsed() < total {
        interval.tick().await;
        if !shared.measuring.load(Ordering::Relaxed) && start.elapsed() >= warmup {
            shared.measuring.store(true, Ordering::Relaxed);
            cpu_start = cpu_ticks(pid);
            measure_start = Instant::now();
        }
        for _ in 0..per_tick {
            let event = proto::Event {
                r#type: "metrics.collected".into(),
                tenant_id: format!("tenant-{}", published % tenants),
                data: format!(r#"{{"t":{}}}"#, unix_nanos()),
                ..Default::default()
            };
            tx.send(PublishStreamRequest { event: Some(event) })
                .await
                .expect("publish");
            published += 1;
            if shared.measuring.load(Ordering::Relaxed) {
                measured_published += 1;
            }
        }
    }
    let publish_secs = measure_start.elapsed().as_secs_f64();
    let cpu = cpu_ticks(pid) - cpu_start;
    drop(tx);
    // Let the last events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let rss = rss_kib(pid);
    for t in tasks {
        let _ = t.await;
    }
    let _ = acks.await;
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let expected = measured_published * clients / tenants;
    let h = shared.latencies.lock().await;
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    println!(
        "| clients | tenants | published/s | delivered/s | delivered of expected | p50 ms | p99 ms | p99.9 ms | broker CPU | broker RSS MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {clients} | {tenants} | {:.0} | {:.0} | {:.1}% | {:.2} | {:.2} | {:.2} | {:.0}% | {:.0} |",
        measured_published as f64 / publish_secs,
        delivered as f64 / publish_secs,
        100.0 * delivered as f64 / expected.max(1) as f64,
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        100.0 * cpu as f64 / ticks_per_sec / publish_secs,
        rss as f64 / 1024.0,
    );
}

async fn idle_memory(connections: u64) {
    let broker = start_broker(100);
    let pid = broker.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let mut sockets = Vec::new();
    let tokens: Vec<String> = (0..10)
        .map(|t| token(Some(&format!("tenant-{t}")), "events:subscribe"))
        .collect();
    for c in 0..connections {
        sockets.push(connect(&broker.http, &tokens[(c % 10) as usize]).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    println!("| idle connections | broker RSS before MiB | after MiB | KiB per connection |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {connections} | {:.1} | {:.1} | {:.1} |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / connections as f64
    );
    drop(sockets);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        fanout(
            env("BENCH_CLIENTS", 1000),
            env("BENCH_TENANTS", 10),
            env("BENCH_RATE", 5000),
            env("BENCH_SECONDS", 10),
        )
        .await;
        println!();
        idle_memory(env("BENCH_IDLE", 10_000)).await;
    });
}
