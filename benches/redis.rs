//! Redis harness: publish throughput with and without Redis persistence in
//! the same run, cross-instance latency at a steady rate, and the raw
//! ceiling of `redis-benchmark` pipelined XADD on the same Redis. Not a
//! timed test: run it with
//!
//!     cargo bench --bench redis
//!
//! Settings (environment): `BENCH_EVENTS` (200000) for the throughput runs,
//! `BENCH_RATE` (10000) and `BENCH_SECONDS` (10) for the latency run.

#[path = "../tests/common/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use procs::{Instance, RedisServer};
use tensorcost_events::auth;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{self, PublishStreamRequest, SubscribeRequest, subscribe_response};
use tokio_stream::StreamExt;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token() -> String {
    auth::mint_hs256(
        SECRET.as_bytes(),
        Some("tenant-bench"),
        None,
        None,
        Duration::from_secs(3600),
    )
    .expect("token")
}

fn authed<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token()).parse().expect("ascii"),
    );
    r
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn payload(t: u64) -> String {
    let head = format!(r#"{{"t":{t},"pad":""#);
    format!(
        "{head}{}\"}}",
        "x".repeat(256usize.saturating_sub(head.len() + 2))
    )
}

/// Subscribes on `grpc` and records, until `n` events arrived, the
/// latency from `data.t`. Resolves to (histogram, time of last event).
async fn receiver(grpc: &str, n: u64) -> tokio::task::JoinHandle<(Histogram<u64>, Instant)> {
    let mut client = EventBrokerClient::connect(grpc.to_string())
        .await
        .expect("connect");
    let mut stream = client
        .subscribe(authed(SubscribeRequest::default()))
        .await
        .expect("subscribe")
        .into_inner();
    let first = stream.next().await.expect("status").expect("ok");
    assert!(matches!(
        first.message,
        Some(subscribe_response::Message::Status(_))
    ));
    tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        let mut seen = 0;
        while seen < n {
            match stream.next().await {
                Some(Ok(m)) => {
                    if let Some(subscribe_response::Message::Event(e)) = m.message {
                        seen += 1;
                        let t: u64 = e.data[5..e.data.find(',').unwrap_or(5)]
                            .parse()
                            .unwrap_or(0);
                        let _ = h.record(unix_nanos().saturating_sub(t) / 1000);
                    }
                }
                other => panic!("subscriber ended: {other:?}"),
            }
        }
        (h, Instant::now())
    })
}

/// Streams `n` events as fast as acks allow; returns the publish duration.
async fn blast(grpc: &str, n: u64) -> Duration {
    let mut client = EventBrokerClient::connect(grpc.to_string())
        .await
        .expect("connect");
    let messages = tokio_stream::iter((0..n).map(|_| PublishStreamRequest {
        event: Some(proto::Event {
            r#type: "metrics.collected".into(),
            data: payload(unix_nanos()),
            ..Default::default()
        }),
    }));
    let start = Instant::now();
    let mut acks = client
        .publish_stream(authed(messages))
        .await
        .expect("stream")
        .into_inner();
    while let Some(ack) = acks.next().await {
        ack.expect("ack");
    }
    start.elapsed()
}

async fn throughput(label: &str, instance: &Instance, n: u64, redis: bool) {
    let done = receiver(&instance.grpc, n).await;
    let start = Instant::now();
    let publish = blast(&instance.grpc, n).await;
    let (_, last) = done.await.expect("receiver");
    let delivered = last - start;
    let written = if redis {
        let deadline = Instant::now() + Duration::from_secs(60);
        while instance.metric("tc_redis_written_total").await < n as f64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        format!("{:.0}", n as f64 / start.elapsed().as_secs_f64())
    } else {
        "-".into()
    };
    println!(
        "| {label} | {n} | {:.0} | {:.0} | {written} |",
        n as f64 / publish.as_secs_f64(),
        n as f64 / delivered.as_secs_f64(),
    );
}

async fn cross_instance_latency(a: &Instance, b: &Instance, rate: u64, seconds: u64) {
    let n = rate * seconds;
    let done = receiver(&b.grpc, n).await;
    let mut client = EventBrokerClient::connect(a.grpc.clone())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishStreamRequest>(10_000);
    let acks = tokio::spawn(async move {
        let mut acks = client
            .publish_stream(authed(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .expect("stream")
            .into_inner();
        while let Some(Ok(_)) = acks.next().await {}
    });
    let per_tick = rate / 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    for _ in 0..n / per_tick {
        tick.tick().await;
        for _ in 0..per_tick {
            let event = proto::Event {
                r#type: "metrics.collected".into(),
                data: payload(unix_nanos()),
                ..Default::default()
            };
            tx.send(PublishStreamRequest { event: Some(event) })
                .await
                .expect("send");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(tx);
    let (h, _) = done.await.expect("receiver");
    let _ = acks.await;
    println!(
        "| {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        n as f64 / secs,
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

fn redis_benchmark(port: u16, clients: u32, pipeline: u32) -> String {
    let value = "x".repeat(300);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-n",
            "1000000",
            "-c",
            &clients.to_string(),
            "-P",
            &pipeline.to_string(),
            "-q",
        ])
        .args([
            "XADD", "tc:bench", "MAXLEN", "~", "100000", "*", "o", "bench", "e", &value,
        ])
        .output();
    match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.split('\r')
                .filter_map(|l| l.split(": ").nth(1))
                .rfind(|l| l.contains("requests per second"))
                .map(|l| l.split_whitespace().next().unwrap_or("?").to_string())
                .unwrap_or_else(|| format!("? ({})", text.trim()))
        }
        Err(e) => format!("redis-benchmark not available: {e}"),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let n = env("BENCH_EVENTS", 200_000);
        let redis = RedisServer::start();
        let buffer = (2 * n).to_string();
        let plain = Instance::spawn(SECRET, &[("TC_SUBSCRIBER_BUFFER", buffer.as_str())]);
        let persisted = Instance::spawn(
            SECRET,
            &[
                ("TC_SUBSCRIBER_BUFFER", buffer.as_str()),
                ("TC_REDIS_URL", redis.url().as_str()),
                ("TC_REDIS_BUFFER", buffer.as_str()),
            ],
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("| run | events | published/s (acked) | delivered/s (local subscriber) | written to Redis/s |");
        println!("|---|---:|---:|---:|---:|");
        blast(&plain.grpc, 1000).await;
        throughput("no Redis", &plain, n, false).await;
        throughput("with Redis persistence", &persisted, n, true).await;
        drop(plain);
        drop(persisted);

        let url = redis.url();
        let vars = [("TC_REDIS_URL", url.as_str()), ("TC_SUBSCRIBER_BUFFER", "1000000")];
        let a = Instance::spawn(SECRET, &vars);
        let b = Instance::spawn(SECRET, &vars);
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!();
        println!("| published/s (on A) | received on B | p50 ms | p99 ms | p99.9 ms | max ms |");
        println!("|---:|---:|---:|---:|---:|---:|");
        let rate = env("BENCH_RATE", 10_000).max(1000);
        cross_instance_latency(&a, &b, rate, env("BENCH_SECONDS", 10)).await;
        drop(a);
        drop(b);

        println!();
        println!("| redis-benchmark XADD (300-byte field) | requests/s |");
        println!("|---|---:|");
        println!("| 1 connection, pipeline 256 | {} |", redis_benchmark(redis.port, 1, 256));
        println!("| 50 connections, pipeline 16 | {} |", redis_benchmark(redis.port, 50, 16));
    });
}
