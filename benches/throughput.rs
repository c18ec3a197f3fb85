//! Throughput harness: events/s from one publisher to one subscriber over
//! real gRPC on loopback, for unary publish (one event per call, and
//! batches) and streaming publish. Not a timed test: run it with
//!
//!     cargo bench --bench throughput
//!
//! Sizes come from `BENCH_EVENTS` (default 20,000 per unary run; streaming
//! and batched runs send 5x as many). The server runs in this process on
//! its own runtime threads; client and server share the machine's cores.

use std::time::{Duration, Instant};

use tensorcost_events::config::Settings;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{
    self, PublishRequest, PublishStreamRequest, SubscribeRequest, subscribe_response,
};
use tensorcost_events::{auth, server};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

fn payload() -> String {
    // 256 bytes of JSON data, as in the benchmark scenarios.
    let pad = 256 - r#"{"seq":0,"pad":""}"#.len();
    format!(r#"{{"seq":0,"pad":"{}"}}"#, "x".repeat(pad))
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// Subscribes and returns a task that resolves when `n` events arrived.
async fn subscriber(
    client: &mut EventBrokerClient<Channel>,
    token: &str,
    n: usize,
) -> tokio::task::JoinHandle<Instant> {
    let mut stream = client
        .subscribe(authed(SubscribeRequest::default(), token))
        .await
        .expect("subscribe")
        .into_inner();
    // Wait for the status message so the subscription is live.
    let first = stream.next().await.expect("status").expect("ok");
    assert!(matches!(
        first.message,
        Some(subscribe_response::Message::Status(_))
    ));
    tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            match stream.next().await {
                Some(Ok(_)) => seen += 1,
                other => panic!("subscriber ended early: {other:?}"),
            }
        }
        Instant::now()
    })
}

struct Row {
    mode: String,
    events: usize,
    elapsed: Duration,
}

async fn unary(grpc: &str, token: &str, n: usize, batch: usize) -> Row {
    let mut client = EventBrokerClient::connect(grpc.to_string())
        .await
        .expect("connect");
    let done = subscriber(&mut client, token, n).await;
    let data = payload();
    let start = Instant::now();
    for _ in 0..n / batch {
        let events = (0..batch)
            .map(|_| proto::Event {
                r#type: "metrics.collected".into(),
                data: data.clone(),
                ..Default::default()
            })
            .collect();
        client
            .publish(authed(PublishRequest { events }, token))
            .await
            .expect("publish");
    }
    let end = done.await.expect("subscriber");
    Row {
        mode: if batch == 1 {
            "unary, 1 event per call".into()
        } else {
            format!("unary, batches of {batch}")
        },
        events: n,
        elapsed: end - start,
    }
}

async fn streaming(grpc: &str, token: &str, n: usize) -> Row {
    let mut client = EventBrokerClient::connect(grpc.to_string())
        .await
        .expect("connect");
    let done = subscriber(&mut client, token, n).await;
    let data = payload();
    let messages = tokio_stream::iter((0..n).map(move |_| PublishStreamRequest {
        event: Some(proto::Event {
            r#type: "metrics.collected".into(),
            data: data.clone(),
            ..Default::default()
        }),
    }));
    let start = Instant::now();
    let mut acks = client
        .publish_stream(authed(messages, token))
        .await
        .expect("stream")
        .into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.next().await {
        ack.expect("ack");
        acked += 1;
    }
    assert_eq!(acked, n);
    let end = done.await.expect("subscriber");
    Row {
        mode: "streaming publish".into(),
        events: n,
        elapsed: end - start,
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut settings = Settings::ephemeral(SECRET);
        // Room for a whole run, so the subscriber is never dropped as slow.
        settings.subscriber_buffer = 5 * n + 1;
        settings.history_max_events = 1000;
        let running = server::start(&settings, SECRET.as_bytes())
            .await
            .expect("server");
        let grpc = format!("http://{}", running.grpc_addr);
        let token = auth::mint_hs256(
            SECRET.as_bytes(),
            Some("tenant-bench"),
            None,
            None,
            Duration::from_secs(3600),
        )
        .expect("token");

        // Warm up connections and allocators.
        unary(&grpc, &token, 1000, 1).await;
        let rows = vec![
            unary(&grpc, &token, n, 1).await,
            unary(&grpc, &token, 5 * n, 100).await,
            streaming(&grpc, &token, 5 * n).await,
        ];
        println!("| publish mode | events | seconds | events/s |");
        println!("|---|---:|---:|---:|");
        for row in rows {
            let secs = row.elapsed.as_secs_f64();
            println!(
                "| {} | {} | {:.2} | {:.0} |",
                row.mode,
                row.events,
                secs,
                row.events as f64 / secs
            );
        }
        running.stop().await.expect("stop");
    });
}
