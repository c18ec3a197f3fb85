//! Scenario 7: webhooks. Deliveries per second to a fast local receiver,
//! next to that receiver's ceiling under `wrk` posting the same signed body
//! at the same concurrency; then isolation: the p99 of one endpoint while
//! another of the same tenant answers only after 10 s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;

use super::clients::{self, Recorder};
use super::procs::{self, CpuWindow};
use super::scenarios::{Row, Scenario, Target, broker_env};
use super::{Config, Size};

/// Deliveries in flight per endpoint: the broker's default, and wrk's
/// connection count for the ceiling.
const CONCURRENCY: u32 = 4;

#[derive(Clone)]
struct Receiver {
    fast: Arc<Recorder>,
    steady: Arc<Recorder>,
    isolated: Arc<Recorder>,
    slow_seen: Arc<AtomicU64>,
    /// wrk's requests: recorded as the broker's are, so that both cost the
    /// receiver the same.
    ceiling: Arc<Recorder>,
}

fn record(recorder: &Recorder, body: &Bytes) {
    let sent = std::str::from_utf8(body).ok().and_then(clients::sent_at);
    recorder.record(sent.map(|t| clients::unix_nanos().saturating_sub(t) / 1000));
}

async fn start_receiver() -> anyhow::Result<(String, Receiver)> {
    let state = Receiver {
        fast: Recorder::new(),
        steady: Recorder::new(),
        isolated: Recorder::new(),
        slow_seen: Arc::new(AtomicU64::new(0)),
        ceiling: Recorder::new(),
    };
    let app = axum::Router::new()
        .route(
            "/fast",
            post(|State(s): State<Receiver>, body: Bytes| async move { record(&s.fast, &body) }),
        )
        .route(
            "/steady",
            post(|State(s): State<Receiver>, body: Bytes| async move { record(&s.steady, &body) }),
        )
        .route(
            "/isolated",
            post(
                |State(s): State<Receiver>, body: Bytes| async move { record(&s.isolated, &body) },
            ),
        )
        .route(
            "/slow",
            post(|State(s): State<Receiver>| async move {
                s.slow_seen.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(10)).await;
            }),
        )
        .route(
            "/ceiling",
            post(|State(s): State<Receiver>, body: Bytes| async move { record(&s.ceiling, &body) }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    Ok((format!("http://{addr}"), state))
}

async fn register(http: &str, token: &str, url: &str) -> anyhow::Result<String> {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/v1/webhooks"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(serde_json::json!({"url": url, "types": ["*"]}).to_string())
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_str(&resp.text().await?)?;
    anyhow::ensure!(status.as_u16() == 201, "registering {url}: {status} {body}");
    Ok(body["id"].as_str().unwrap_or_default().to_string())
}

async fn remove(http: &str, token: &str, id: &str) -> anyhow::Result<()> {
    reqwest::Client::new()
        .delete(format!("http://{http}/v1/webhooks/{id}"))
        .bearer_auth(token)
        .send()
        .await?;
    Ok(())
}

async fn wait_for(recorder: &Recorder, n: u64, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while recorder.delivered.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// `wrk` posting one signed 256-byte envelope to `/ceiling` with
/// `CONCURRENCY` connections: requests per second.
fn wrk_ceiling(base: &str, secs: u64) -> anyhow::Result<f64> {
    let dir = tensorcost_testkit::process::Scratch::new("wrk")?;
    let script = dir.join("post.lua");
    let body = format!(
        r#"{{"id":"01a2230a-7d5d-703f-b1a4-dac3a703b816","type":"metrics.collected","tenant_id":"tenant-0","data":{},"timestamp":"2026-11-28T16:43:46.853Z","trace_id":"0872d41599044b32bf8386ab5d6cca16"}}"#,
        clients::data_now()
    );
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = [[{body}]]\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"X-TensorCost-Signature\"] = \"t=1795883273,v1=28fe857ad2d6ccceb5e446ecc710455dfb9da8fd8e6945c5d57605b1a82ba9c1\"\nwrk.headers[\"X-TensorCost-Event-Id\"] = \"01a2230a-7d5d-703f-b1a4-dac3a703b816\"\n"
        ),
    )?;
    let out = std::process::Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &CONCURRENCY.to_string(),
            "-d",
            &format!("{secs}s"),
            "-s",
        ])
        .arg(&script)
        .arg(format!("{base}/ceiling"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("wrk printed no Requests/sec: {text}"))
}

pub async fn webhooks(config: &Config) -> anyhow::Result<Scenario> {
    let (n, iso_rate, iso_secs, wrk_secs) = match config.size {
        Size::Small => (2_000u64, 100u64, Duration::from_secs(3), 2u64),
        Size::Full => (50_000, 200, Duration::from_secs(20), 10),
    };
    let (steady_rate, steady_secs) = match config.size {
        Size::Small => (2_000u64, Duration::from_secs(2)),
        Size::Full => (10_000, Duration::from_secs(10)),
    };
    let (base, receiver) = start_receiver().await?;
    let env = broker_env(&[
        ("TC_WEBHOOK_ALLOW_HOSTS", "127.0.0.1".to_string()),
        ("TC_WEBHOOK_MAX_PENDING", "10000000".to_string()),
        ("TC_WEBHOOK_QUEUE", "10000000".to_string()),
    ]);
    let broker = procs::broker(&config.broker, &env)?;
    let token = clients::token(Some("tenant-0"), "integration:write events:publish");
    let mut rows = Vec::new();
    let mut targets = Vec::new();

    // 1. Throughput: n events as fast as the publisher goes; deliveries/s
    //    from the first publish to the last delivery.
    let fast = register(&broker.http, &token, &format!("{base}/fast")).await?;
    receiver.fast.measuring.store(true, Ordering::Relaxed);
    let cpu = CpuWindow::start(&broker.process);
    let start = Instant::now();
    clients::grpc_stream_max(&broker.grpc, &token, n).await?;
    let all = wait_for(&receiver.fast, n, Duration::from_secs(300)).await;
    let secs = start.elapsed().as_secs_f64();
    let delivered = receiver.fast.delivered.load(Ordering::Relaxed);
    let (p50, p99, p999) = receiver.fast.percentiles();
    let rate = delivered as f64 / secs;
    rows.push(Row {
        system: "tensorcost-events webhooks (embedded store)".into(),
        published_per_s: n as f64 / secs,
        delivered_per_s: rate,
        delivered_ratio: delivered as f64 / n as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_percent: cpu.percent(&broker.process),
        rss_mib: procs::rss_kib(&broker.process) as f64 / 1024.0,
        note: Some(format!(
            "{n} events, one endpoint, {CONCURRENCY} in flight; signed, durable, traced{}",
            if all { "" } else { "; NOT ALL DELIVERED" }
        )),
        ..Default::default()
    });
    remove(&broker.http, &token, &fast).await?;

    // 2. CPU per delivery below saturation: a steady rate the broker keeps
    //    up with; the broker's CPU time from the first publish to the last
    //    delivery, per delivery.
    let steady = register(&broker.http, &token, &format!("{base}/steady")).await?;
    receiver.steady.measuring.store(true, Ordering::Relaxed);
    let ticks = broker.process.cpu_ticks();
    let start = Instant::now();
    let paced = Recorder::new();
    paced.measuring.store(true, Ordering::Relaxed);
    let published =
        clients::grpc_stream_steady(&broker.grpc, &token, steady_rate, &[], &paced, steady_secs)
            .await?;
    let all = wait_for(&receiver.steady, published, Duration::from_secs(60)).await;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = broker.process.cpu_ticks().saturating_sub(ticks) as f64 / 100.0;
    let delivered = receiver.steady.delivered.load(Ordering::Relaxed);
    let (p50, p99, p999) = receiver.steady.percentiles();
    rows.push(Row {
        system: format!("at a steady {steady_rate} events/s"),
        published_per_s: published as f64 / steady_secs.as_secs_f64(),
        delivered_per_s: delivered as f64 / secs,
        delivered_ratio: delivered as f64 / published.max(1) as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_percent: 100.0 * cpu_secs / secs,
        note: Some(format!(
            "broker CPU per delivery {:.1} µs{}",
            cpu_secs * 1e6 / delivered.max(1) as f64,
            if all { "" } else { "; NOT ALL DELIVERED" }
        )),
        ..Default::default()
    });
    remove(&broker.http, &token, &steady).await?;

    // 3. The receiver's ceiling under wrk, same body, same concurrency.
    match wrk_ceiling(&base, wrk_secs) {
        Ok(ceiling) => {
            rows.push(Row {
                system: format!("wrk -c {CONCURRENCY}, same receiver and body"),
                delivered_per_s: ceiling,
                delivered_ratio: 1.0,
                note: Some("the receiver's ceiling at this concurrency".into()),
                ..Default::default()
            });
            targets.push(Target {
                what: "deliveries/s ≥ 50% of the receiver's ceiling under wrk".into(),
                measured: format!(
                    "{:.0}% ({rate:.0} vs {ceiling:.0})",
                    100.0 * rate / ceiling.max(1.0)
                ),
                met: rate >= 0.5 * ceiling,
            });
        }
        Err(e) => targets.push(Target {
            what: "deliveries/s ≥ 50% of the receiver's ceiling under wrk".into(),
            measured: format!("not measured: {e}"),
            met: false,
        }),
    }

    // 4. Isolation: a steady rate to two endpoints of one tenant, one of
    //    which answers after 10 s.
    register(&broker.http, &token, &format!("{base}/slow")).await?;
    register(&broker.http, &token, &format!("{base}/isolated")).await?;
    receiver.isolated.measuring.store(true, Ordering::Relaxed);
    let idle = Recorder::new();
    idle.measuring.store(true, Ordering::Relaxed);
    let published =
        clients::grpc_stream_steady(&broker.grpc, &token, iso_rate, &[], &idle, iso_secs).await?;
    wait_for(&receiver.isolated, published, Duration::from_secs(30)).await;
    let got = receiver.isolated.delivered.load(Ordering::Relaxed);
    let (p50, p99, p999) = receiver.isolated.percentiles();
    rows.push(Row {
        system: "beside an endpoint answering after 10 s".into(),
        published_per_s: iso_rate as f64,
        delivered_per_s: got as f64 / iso_secs.as_secs_f64(),
        delivered_ratio: got as f64 / published.max(1) as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        note: Some(format!(
            "the slow endpoint received {} in that time",
            receiver.slow_seen.load(Ordering::Relaxed)
        )),
        ..Default::default()
    });
    targets.push(Target {
        what: "p99 of an endpoint beside one answering after 10 s < 100 ms".into(),
        measured: format!("p99 {p99:.1} ms"),
        met: p99 < 100.0 && got >= published,
    });
    Ok(Scenario {
        id: 7,
        name: "Webhooks".into(),
        shape: format!(
            "{n} events published as fast as gRPC streaming goes to one endpoint of a local receiver; then {steady_rate} events/s for {} s (CPU per delivery below saturation); wrk at {CONCURRENCY} connections against the same receiver; then {iso_rate} events/s for {} s to two endpoints, one answering after 10 s",
            steady_secs.as_secs(),
            iso_secs.as_secs()
        ),
        rows,
        targets,
    })
}
