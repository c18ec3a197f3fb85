//! The five scenarios, each against the broker and the peer users would
//! pick instead, in the same run with the same payloads and shapes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::clients::{self, Recorder};
use tensorcost_testkit::broker::BrokerProcess;
use tensorcost_testkit::process::Process;

use super::procs::{self, CpuWindow};
use super::{Config, Size};

/// One system's figures in one scenario.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Row {
    pub system: String,
    /// Events (or messages) per second the publisher sent.
    pub published_per_s: f64,
    /// Events per second received, summed over receivers.
    pub delivered_per_s: f64,
    /// Delivered over expected (every receiver should get its share).
    pub delivered_ratio: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Server CPU over the measured window, percent of one core.
    pub cpu_percent: f64,
    pub rss_mib: f64,
    /// For idle connections: server memory per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kib_per_connection: Option<f64>,
    /// Below saturation (scenario 10): server CPU time per 1,000
    /// deliveries, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms_per_1000: Option<f64>,
    /// Anything else worth a column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A target of the issue, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub id: u32,
    pub name: String,
    pub shape: String,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
}

pub fn broker_env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("TC_SUBSCRIBER_BUFFER", "1000000".to_string()),
        ("TC_RATE_LIMIT_PER_TENANT", "10000000".to_string()),
        ("TC_RATE_LIMIT_QUEUE", "1000000".to_string()),
        ("TC_SOCKET_BUFFER", "4096".to_string()),
        ("TC_HISTORY_MAX_EVENTS", "10000".to_string()),
        // Every client is on 127.0.0.1, and a benchmark socket that falls
        // behind is measured, not dropped.
        ("TC_MAX_CONNECTIONS_PER_IP", "0".to_string()),
        ("TC_SOCKET_BUFFER_BYTES", (256u64 << 20).to_string()),
    ];
    env.extend(extra.iter().cloned());
    env
}

fn tenants(n: u32) -> Vec<String> {
    (0..n).map(|t| format!("tenant-{t}")).collect()
}

/// Lets receivers catch up, then stops them and waits for their counts.
async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
}

fn row(
    system: &str,
    recorder: &Recorder,
    published: u64,
    expected: u64,
    secs: f64,
    cpu: f64,
    rss_kib: u64,
) -> Row {
    let delivered = recorder.delivered.load(Ordering::Relaxed);
    let (p50, p99, p999) = recorder.percentiles();
    Row {
        system: system.into(),
        published_per_s: published as f64 / secs,
        delivered_per_s: delivered as f64 / secs,
        delivered_ratio: delivered as f64 / expected.max(1) as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_percent: cpu,
        rss_mib: rss_kib as f64 / 1024.0,
        ..Default::default()
    }
}

/// Scenario 1: one publisher, one subscriber, 256-byte events, maximum rate.
pub async fn one_to_one(config: &Config) -> anyhow::Result<Scenario> {
    let n: u64 = match config.size {
        Size::Small => 20_000,
        Size::Full => 1_000_000,
    };
    let mut rows = Vec::new();

    let broker = procs::broker(&config.broker, &broker_env(&[]))?;
    let token = clients::token(Some("tenant-0"), "events:publish events:subscribe");
    for (label, streaming, count) in [
        ("tensorcost-events, streaming publish", true, n),
        (
            "tensorcost-events, unary publish",
            false,
            (n / 20).max(1000),
        ),
    ] {
        let recorder = Recorder::new();
        recorder.measuring.store(true, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let sub = clients::grpc_subscriber(
            &broker.grpc,
            &token,
            Arc::clone(&recorder),
            Arc::clone(&stop),
        )
        .await?;
        let cpu = CpuWindow::start(&broker.process);
        let start = Instant::now();
        if streaming {
            clients::grpc_stream_max(&broker.grpc, &token, count).await?;
        } else {
            clients::grpc_unary_max(&broker.grpc, &token, count).await?;
        }
        wait_delivered(&recorder, count, Duration::from_secs(60)).await;
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu.percent(&broker.process);
        finish(&stop, vec![sub]).await;
        rows.push(row(
            label,
            &recorder,
            count,
            count,
            secs,
            cpu,
            procs::rss_kib(&broker.process),
        ));
    }
    drop(broker);

    rows.push(nats_one_to_one("nats-server (core NATS)", false, n).await?);
    // JetStream: what keeps messages and deduplicates them as the broker
    // does.
    rows.push(
        nats_one_to_one(
            "nats-server JetStream (memory, Nats-Msg-Id dedupe, acknowledged)",
            true,
            n,
        )
        .await?,
    );

    let ours = rows[0].delivered_per_s;
    let nats_rate = rows[2].delivered_per_s;
    let js_rate = rows[3].published_per_s;
    let ours_published = rows[0].published_per_s;
    Ok(Scenario {
        id: 1,
        name: "One publisher to one subscriber".into(),
        shape: format!(
            "{n} events of 256 bytes at maximum rate (unary: {} calls)",
            (n / 20).max(1000)
        ),
        targets: vec![
            Target {
                what: "streaming publish ≥ 70% of core NATS msgs/s".into(),
                measured: format!(
                    "{:.0}% ({ours:.0} vs {nats_rate:.0})",
                    100.0 * ours / nats_rate.max(1.0)
                ),
                met: ours >= 0.7 * nats_rate,
            },
            Target {
                what: "streaming publish ≥ 2× JetStream's acknowledged publish rate".into(),
                measured: format!(
                    "{:.2}× ({ours_published:.0} vs {js_rate:.0})",
                    ours_published / js_rate.max(1.0)
                ),
                met: ours_published >= 2.0 * js_rate,
            },
        ],
        rows,
    })
}

/// Scenario 1 against nats-server: one subscriber, `n` messages published
/// at maximum rate, timed until delivered. With `jetstream`, into a memory
/// stream that keeps the last 10,000 (as the broker's history in these
/// runs) and deduplicates on `Nats-Msg-Id`, published as a JetStream
/// client's asynchronous publish does (4,000 unacknowledged at most,
/// nats.go's default); its published rate is of acknowledged messages.
async fn nats_one_to_one(label: &str, jetstream: bool, n: u64) -> anyhow::Result<Row> {
    let (nats, port) = procs::nats_server(jetstream)?;
    if jetstream {
        clients::jetstream_create_stream(port, "BENCH", "bench", 10_000).await?;
    }
    let recorder = Recorder::new();
    recorder.measuring.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let sub =
        clients::nats_subscriber(port, "bench", Arc::clone(&recorder), Arc::clone(&stop)).await?;
    let cpu = CpuWindow::start(&nats);
    let start = Instant::now();
    let acknowledged = if jetstream {
        Some(clients::jetstream_publish_max(port, "bench", n, 4000).await?)
    } else {
        clients::nats_publish_max(port, "bench", n).await?;
        None
    };
    wait_delivered(&recorder, n, Duration::from_secs(60)).await;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.percent(&nats);
    finish(&stop, vec![sub]).await;
    let mut r = row(label, &recorder, n, n, secs, cpu, procs::rss_kib(&nats));
    if let Some(took) = acknowledged {
        r.published_per_s = n as f64 / took.as_secs_f64();
    }
    drop(nats);
    if jetstream {
        let _ = std::fs::remove_dir_all(procs::jetstream_store(port));
    }
    Ok(r)
}

async fn wait_delivered(recorder: &Recorder, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    // Receivers flush their counts in chunks; the last chunk lands when
    // they stop, so wait until nearly all are counted or time runs out.
    while recorder.delivered.load(Ordering::Relaxed) + 4096 < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Fanout {
    clients: u32,
    tenants: u32,
    rate: u64,
    warmup: Duration,
    measure: Duration,
}

fn fanout_shape(size: Size) -> Fanout {
    match size {
        Size::Small => Fanout {
            clients: 100,
            tenants: 10,
            rate: 1000,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(3),
        },
        Size::Full => Fanout {
            clients: 1000,
            tenants: 10,
            rate: 5000,
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(10),
        },
    }
}

/// Connects the clients, publishes at the steady rate, measures after the
/// warm-up. `publish` is the system's publisher.
async fn run_fanout<P, Fut>(
    system: &str,
    server: &Process,
    host: &str,
    shape: &Fanout,
    auth: impl Fn(&str) -> serde_json::Value,
    publish: P,
) -> anyhow::Result<Row>
where
    P: FnOnce(Arc<Recorder>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let names = tenants(shape.tenants);
    let mut tasks = Vec::new();
    for c in 0..shape.clients {
        let tenant = &names[(c % shape.tenants) as usize];
        let ws = clients::sio_connect(host, &auth(tenant)).await?;
        tasks.push(tokio::spawn(clients::sio_receive(
            ws,
            Arc::clone(&recorder),
            Arc::clone(&stop),
        )));
    }
    let (published, secs, cpu) = measured(server, &recorder, shape.warmup, publish).await?;
    finish(&stop, tasks).await;
    let expected = published * u64::from(shape.clients / shape.tenants);
    Ok(row(
        system,
        &recorder,
        published,
        expected,
        secs,
        cpu,
        procs::rss_kib(server),
    ))
}

/// Runs a publisher; after `warmup` turns measuring on and starts the CPU
/// window. Returns (published while measuring, measured seconds, CPU %).
async fn measured<P, Fut>(
    server: &Process,
    recorder: &Arc<Recorder>,
    warmup: Duration,
    publish: P,
) -> anyhow::Result<(u64, f64, f64)>
where
    P: FnOnce(Arc<Recorder>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let publishing = tokio::spawn(publish(Arc::clone(recorder)));
    tokio::time::sleep(warmup).await;
    recorder.measuring.store(true, Ordering::Relaxed);
    let window = CpuWindow::start(server);
    let start = Instant::now();
    let published = publishing.await??;
    Ok((
        published,
        start.elapsed().as_secs_f64(),
        window.percent(server),
    ))
}

/// A fan-out run against the broker: subscribers with their tenant's
/// token, and a gRPC streaming publisher at `shape.rate` for every tenant.
async fn broker_fanout(
    system: &str,
    broker: &BrokerProcess,
    shape: &Fanout,
    names: &[String],
) -> anyhow::Result<Row> {
    let grpc = broker.grpc.clone();
    let service = clients::token(None, "events:all_tenants events:publish");
    let (rate, duration, names) = (shape.rate, shape.warmup + shape.measure, names.to_vec());
    run_fanout(
        system,
        &broker.process,
        &broker.http,
        shape,
        |tenant| serde_json::json!({ "token": clients::token(Some(tenant), "events:subscribe") }),
        move |recorder| async move {
            clients::grpc_stream_steady(&grpc, &service, rate, &names, &recorder, duration).await
        },
    )
    .await
}

/// The same fan-out against the Node peer: its publisher is a Socket.IO
/// socket emitting `publish`.
async fn node_fanout(
    system: &str,
    peer: &Process,
    host: &str,
    shape: &Fanout,
    names: &[String],
) -> anyhow::Result<Row> {
    let peer_host = host.to_string();
    let (rate, duration, names) = (shape.rate, shape.warmup + shape.measure, names.to_vec());
    run_fanout(
        system,
        peer,
        host,
        shape,
        |tenant| serde_json::json!({ "tenant": tenant }),
        move |recorder| async move {
            clients::sio_publish_steady(&peer_host, rate, &names, &recorder, duration).await
        },
    )
    .await
}

/// Scenario 2 (and 3 with Redis): fan-out to websocket clients in tenants.
pub async fn fanout(config: &Config, with_redis: bool) -> anyhow::Result<(Scenario, Option<Row>)> {
    let shape = fanout_shape(config.size);
    let mut rows = Vec::new();
    let names = tenants(shape.tenants);

    let redis = if with_redis {
        Some(procs::redis_server()?)
    } else {
        None
    };
    let mut extra = Vec::new();
    if let Some(redis) = &redis {
        extra.push(("TC_REDIS_URL", redis.url()));
    }
    let broker = procs::broker(&config.broker, &broker_env(&extra))?;
    let label = if with_redis {
        "tensorcost-events + Redis persistence"
    } else {
        "tensorcost-events"
    };
    rows.push(broker_fanout(label, &broker, &shape, &names).await?);
    drop(broker);

    let mut ceiling = None;
    if let Some(redis) = &redis {
        // The persistence ceiling: streaming publish at maximum rate, and
        // how fast the writer gets it into Redis.
        let broker = procs::broker(
            &config.broker,
            &broker_env(&[
                ("TC_REDIS_URL", redis.url()),
                ("TC_REDIS_BUFFER", "2000000".into()),
            ]),
        )?;
        let n: u64 = match config.size {
            Size::Small => 20_000,
            Size::Full => 1_000_000,
        };
        let token = clients::token(Some("tenant-ceiling"), "events:publish");
        let start = Instant::now();
        let publish = clients::grpc_stream_max(&broker.grpc, &token, n).await?;
        // From here the publisher is done and the writer drains its
        // backlog alone: the writer's own rate, what redis-benchmark's
        // figure compares with (it has the machine to itself).
        let drain_start = Instant::now();
        let backlog_written = broker.metric("tc_redis_written_total").await as u64;
        let written = wait_written(&broker, n, Duration::from_secs(120)).await;
        let drain_secs = drain_start.elapsed().as_secs_f64();
        let secs = start.elapsed().as_secs_f64();
        let drained = written.saturating_sub(backlog_written);
        let requests = match config.size {
            Size::Small => 100_000,
            Size::Full => 2_000_000,
        };
        // The same entry size as the broker writes: one event as JSON.
        let entry_bytes = sample_entry_bytes();
        let xadd = procs::redis_benchmark_xadd(redis.port, requests, 1, 256, entry_bytes)?;
        // Too small a backlog to time: the end-to-end rate stands in.
        let (drain_per_s, drain_text) = if drained >= n / 10 && drain_secs > 0.05 {
            let rate = drained as f64 / drain_secs;
            (
                rate,
                format!("the writer drained a backlog of {drained} at {rate:.0}/s"),
            )
        } else {
            let rate = written as f64 / secs;
            (
                rate,
                format!(
                    "the backlog ({drained}) was too small to time: the writer's figure is the end-to-end rate"
                ),
            )
        };
        ceiling = Some(Row {
            system: "tensorcost-events writer, streaming publish at maximum rate".into(),
            published_per_s: n as f64 / publish.as_secs_f64(),
            delivered_per_s: drain_per_s,
            delivered_ratio: written as f64 / n as f64,
            note: Some(format!(
                "end to end (publish and write, sharing the machine) {:.0}/s; {drain_text}; redis-benchmark pipelined XADD of the same entry shape ({entry_bytes}-byte event), 1 connection, pipeline 256: {xadd:.0}/s",
                written as f64 / secs
            )),
            ..Default::default()
        });
    } else {
        let (peer, host) = procs::node_peer(&config.node_peer)?;
        rows.push(node_fanout("Node.js socket.io 4.8", &peer, &host, &shape, &names).await?);
    }
    let shape_text = format!(
        "{} websocket clients in {} tenants, a steady {} events/s published (round robin over tenants), {} s measured after {} s warm-up",
        shape.clients,
        shape.tenants,
        shape.rate,
        shape.measure.as_secs(),
        shape.warmup.as_secs()
    );
    let mut targets = Vec::new();
    if !with_redis && rows.len() == 2 {
        let (ours, peer) = (&rows[0], &rows[1]);
        targets.push(Target {
            what: "delivered events/s ≥ 3× Node's, at equal or lower p99".into(),
            measured: format!(
                "{:.1}× ({:.0} vs {:.0}); p99 {:.1} ms vs {:.1} ms",
                ours.delivered_per_s / peer.delivered_per_s.max(1.0),
                ours.delivered_per_s,
                peer.delivered_per_s,
                ours.p99_ms,
                peer.p99_ms
            ),
            met: ours.delivered_per_s >= 3.0 * peer.delivered_per_s && ours.p99_ms <= peer.p99_ms,
        });
    }
    Ok((
        Scenario {
            id: if with_redis { 3 } else { 2 },
            name: if with_redis {
                "Fan-out with Redis persistence".into()
            } else {
                "Fan-out to websocket clients".into()
            },
            shape: shape_text,
            rows,
            targets,
        },
        ceiling,
    ))
}

/// Scenario 10: the fan-out of scenario 2 at rates both systems sustain,
/// where what a delivery costs in CPU is what a user pays for. For each
/// rate, the broker and then the Node peer: server CPU per 1,000
/// deliveries, and RSS per connection with the traffic flowing.
pub async fn below_saturation(config: &Config) -> anyhow::Result<Scenario> {
    let (clients, tenant_count, rates, warmup, measure) = match config.size {
        Size::Small => (
            100u32,
            10u32,
            [1_000u64, 5_000],
            Duration::from_secs(1),
            Duration::from_secs(3),
        ),
        Size::Full => (
            1000,
            10,
            [10_000, 50_000],
            Duration::from_secs(2),
            Duration::from_secs(10),
        ),
    };
    let per_tenant = u64::from(clients / tenant_count);
    let names = tenants(tenant_count);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for deliveries in rates {
        let shape = Fanout {
            clients,
            tenants: tenant_count,
            rate: deliveries / per_tenant,
            warmup,
            measure,
        };

        let broker = procs::broker(&config.broker, &broker_env(&[]))?;
        let before = settled_rss_kib(&broker.process).await;
        let label = format!("tensorcost-events, {deliveries} deliveries/s");
        let ours = broker_fanout(&label, &broker, &shape, &names).await?;
        let ours = with_costs(ours, before, clients);
        drop(broker);

        let (peer, host) = procs::node_peer(&config.node_peer)?;
        let before = settled_rss_kib(&peer).await;
        let label = format!("Node.js socket.io 4.8, {deliveries} deliveries/s");
        let theirs = node_fanout(&label, &peer, &host, &shape, &names).await?;
        let theirs = with_costs(theirs, before, clients);
        drop(peer);

        let (a, b) = (
            ours.cpu_ms_per_1000.unwrap_or(f64::MAX),
            theirs.cpu_ms_per_1000.unwrap_or(0.0),
        );
        targets.push(Target {
            what: format!("at {deliveries} deliveries/s, CPU per delivery ≤ 1/3 of Node's"),
            measured: format!(
                "{:.2} of Node's ({a:.2} vs {b:.2} ms per 1,000; delivered {:.1}% vs {:.1}%)",
                a / b.max(0.001),
                100.0 * ours.delivered_ratio,
                100.0 * theirs.delivered_ratio
            ),
            met: a * 3.0 <= b && ours.delivered_ratio >= 0.99,
        });
        if deliveries == rates[rates.len() - 1] {
            let (a, b) = (
                ours.kib_per_connection.unwrap_or(f64::MAX),
                theirs.kib_per_connection.unwrap_or(0.0),
            );
            targets.push(Target {
                what: format!(
                    "at {deliveries} deliveries/s, memory per connection ≤ 1/2 of Node's"
                ),
                measured: format!("{:.2} of Node's ({a:.1} vs {b:.1} KiB)", a / b.max(0.01)),
                met: a * 2.0 <= b,
            });
        }
        rows.push(ours);
        rows.push(theirs);
    }
    Ok(Scenario {
        id: 10,
        name: "Fan-out below saturation: CPU per delivery".into(),
        shape: format!(
            "{clients} websocket clients in {tenant_count} tenants; {} and {} deliveries/s ({} and {} events/s published round robin over the tenants), {} s measured after {} s warm-up; CPU per 1,000 deliveries over the measured window, RSS per connection at its end",
            rates[0],
            rates[1],
            rates[0] / per_tenant,
            rates[1] / per_tenant,
            measure.as_secs(),
            warmup.as_secs()
        ),
        rows,
        targets,
    })
}

/// A server's RSS once it has settled after starting.
async fn settled_rss_kib(server: &Process) -> u64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    procs::rss_kib(server)
}

/// Adds CPU per 1,000 deliveries and RSS per connection to a fan-out row.
fn with_costs(mut row: Row, rss_before_kib: u64, clients: u32) -> Row {
    if row.delivered_per_s > 0.0 {
        // cpu_percent of one core = cpu_percent * 10 ms of CPU per second.
        row.cpu_ms_per_1000 = Some(row.cpu_percent * 10.0 / (row.delivered_per_s / 1000.0));
    }
    let after_kib = row.rss_mib * 1024.0;
    row.kib_per_connection =
        Some((after_kib - rss_before_kib as f64).max(0.0) / f64::from(clients));
    row
}

/// Bytes of one event as the writer stores it: the envelope as JSON.
fn sample_entry_bytes() -> usize {
    let envelope = serde_json::json!({
        "id": "01a21c6d-173d-7725-b7ab-5a7ea6cdb72f",
        "type": clients::EVENT_TYPE,
        "tenant_id": "tenant-ceiling",
        "data": serde_json::value::RawValue::from_string(clients::data_now()).ok(),
        "timestamp": "2026-11-27T09:54:01.149Z",
        "trace_id": "6de021f17c1f438d9f784743275c5272",
    });
    envelope.to_string().len()
}

async fn wait_written(broker: &BrokerProcess, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let written = broker.metric("tc_redis_written_total").await as u64;
        if written >= n || Instant::now() > deadline {
            return written;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Scenario 4: two instances and Redis; publish on one, receive on the other.
pub async fn cross_instance(config: &Config) -> anyhow::Result<Scenario> {
    let (rate, warmup, measure) = match config.size {
        Size::Small => (2000, Duration::from_secs(1), Duration::from_secs(2)),
        Size::Full => (10_000, Duration::from_secs(2), Duration::from_secs(10)),
    };
    let redis = procs::redis_server()?;
    let env = broker_env(&[("TC_REDIS_URL", redis.url())]);
    let a = procs::broker(&config.broker, &env)?;
    let b = procs::broker(&config.broker, &env)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = clients::token(Some("tenant-0"), "events:publish events:subscribe");
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sub =
        clients::grpc_subscriber(&b.grpc, &token, Arc::clone(&recorder), Arc::clone(&stop)).await?;
    let cpu_b = CpuWindow::start(&b.process);
    let grpc = a.grpc.clone();
    let publisher_token = token.clone();
    let (published, secs, cpu_a) =
        measured(&a.process, &recorder, warmup, move |recorder| async move {
            clients::grpc_stream_steady(
                &grpc,
                &publisher_token,
                rate,
                &[],
                &recorder,
                warmup + measure,
            )
            .await
        })
        .await?;
    let cpu = cpu_a + cpu_b.percent(&b.process);
    finish(&stop, vec![sub]).await;
    let mut r = row(
        "tensorcost-events ×2 + Redis",
        &recorder,
        published,
        published,
        secs,
        cpu,
        procs::rss_kib(&a.process) + procs::rss_kib(&b.process),
    );
    r.note = Some("CPU and RSS: both instances".into());
    let p99 = r.p99_ms;
    Ok(Scenario {
        id: 4,
        name: "Across instances through Redis".into(),
        shape: format!(
            "instance A receives a steady {rate} events/s (streaming publish); a gRPC subscriber on instance B; {} s measured",
            measure.as_secs()
        ),
        targets: vec![Target {
            what: "p99 < 5 ms on loopback".into(),
            measured: format!("p99 {p99:.2} ms"),
            met: p99 < 5.0,
        }],
        rows: vec![r],
    })
}

/// Scenario 5: idle websocket connections, memory per connection.
pub async fn idle(config: &Config) -> anyhow::Result<Scenario> {
    let n: u32 = match config.size {
        Size::Small => 500,
        Size::Full => 10_000,
    };
    let mut rows = Vec::new();
    let broker = procs::broker(&config.broker, &broker_env(&[]))?;
    rows.push(
        idle_memory(
            "tensorcost-events",
            &broker.process,
            &broker.http,
            n,
            |t| serde_json::json!({ "token": clients::token(Some(t), "events:subscribe") }),
        )
        .await?,
    );
    drop(broker);
    let (peer, host) = procs::node_peer(&config.node_peer)?;
    rows.push(
        idle_memory(
            "Node.js socket.io 4.8",
            &peer,
            &host,
            n,
            |t| serde_json::json!({ "tenant": t }),
        )
        .await?,
    );
    let (ours, theirs) = (
        rows[0].kib_per_connection.unwrap_or(0.0),
        rows[1].kib_per_connection.unwrap_or(0.0),
    );
    Ok(Scenario {
        id: 5,
        name: "Idle websocket connections".into(),
        shape: format!(
            "{n} idle websocket clients in 10 tenants; server RSS before and after, 1 s after the last connected"
        ),
        targets: vec![Target {
            what: "memory per connection ≤ 1/2 of Node's".into(),
            measured: format!(
                "{:.2} of Node's ({ours:.1} vs {theirs:.1} KiB)",
                ours / theirs.max(0.01)
            ),
            met: ours * 2.0 <= theirs,
        }],
        rows,
    })
}

async fn idle_memory(
    system: &str,
    server: &Process,
    host: &str,
    n: u32,
    auth: impl Fn(&str) -> serde_json::Value,
) -> anyhow::Result<Row> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = procs::rss_kib(server);
    let names = tenants(10);
    let auths: Vec<serde_json::Value> = names.iter().map(|t| auth(t)).collect();
    let mut sockets = Vec::with_capacity(n as usize);
    for c in 0..n {
        sockets.push(clients::sio_connect(host, &auths[(c % 10) as usize]).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procs::rss_kib(server);
    drop(sockets);
    Ok(Row {
        system: system.into(),
        rss_mib: after as f64 / 1024.0,
        kib_per_connection: Some(after.saturating_sub(before) as f64 / f64::from(n)),
        note: Some(format!("RSS before {:.1} MiB", before as f64 / 1024.0)),
        ..Default::default()
    })
}

struct Soak {
    duration: Duration,
    sample_every: Duration,
    sockets: u32,
    /// Each socket reconnects (resuming from its last id) this often.
    lifetime: Duration,
    rate: u64,
}

fn soak_shape(size: Size) -> Soak {
    match size {
        Size::Small => Soak {
            duration: Duration::from_secs(20),
            sample_every: Duration::from_secs(2),
            sockets: 40,
            lifetime: Duration::from_secs(5),
            rate: 500,
        },
        Size::Full => Soak {
            duration: Duration::from_secs(600),
            sample_every: Duration::from_secs(10),
            sockets: 200,
            lifetime: Duration::from_secs(10),
            rate: 2000,
        },
    }
}

/// Scenario 6: a soak run. Steady publishing over gRPC to 10 tenants while
/// their sockets keep connecting, leaving and resuming with their last
/// event id; the broker's RSS and open descriptors are sampled all along.
/// Flat is the target: nothing grows with time or with churn.
pub async fn soak(config: &Config) -> anyhow::Result<Scenario> {
    let shape = soak_shape(config.size);
    let broker = procs::broker(&config.broker, &broker_env(&[]))?;
    let names = tenants(10);
    let recorder = Recorder::new();
    recorder.measuring.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let resumes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..shape.sockets {
        let tenant = names[(c % 10) as usize].clone();
        let token = clients::token(Some(&tenant), "events:subscribe");
        // Staggered, so that churn is steady rather than in waves.
        let offset = shape.lifetime * c / shape.sockets;
        tasks.push(tokio::spawn(clients::sio_churning(
            broker.http.clone(),
            token,
            offset,
            shape.lifetime,
            Arc::clone(&recorder),
            Arc::clone(&resumes),
            Arc::clone(&stop),
        )));
    }
    let service = clients::token(None, "events:all_tenants events:publish");
    let grpc = broker.grpc.clone();
    let publisher = {
        let recorder = Arc::clone(&recorder);
        let names = names.clone();
        let (rate, duration) = (shape.rate, shape.duration);
        tokio::spawn(async move {
            clients::grpc_stream_steady(&grpc, &service, rate, &names, &recorder, duration).await
        })
    };
    let start = Instant::now();
    let mut rows = Vec::new();
    let mut last_delivered = 0;
    let mut last_at = start;
    while start.elapsed() < shape.duration {
        tokio::time::sleep(shape.sample_every).await;
        let delivered = recorder.delivered.load(Ordering::Relaxed);
        let window = last_at.elapsed().as_secs_f64();
        rows.push(Row {
            system: format!("t={}s", start.elapsed().as_secs()),
            delivered_per_s: (delivered - last_delivered) as f64 / window,
            rss_mib: procs::rss_kib(&broker.process) as f64 / 1024.0,
            note: Some(format!(
                "{} fds, {} resumes",
                broker.process.open_fds(),
                resumes.load(Ordering::Relaxed)
            )),
            ..Default::default()
        });
        last_delivered = delivered;
        last_at = Instant::now();
    }
    let published = publisher.await??;
    finish(&stop, tasks).await;
    let fds = |r: &Row| -> f64 {
        r.note
            .as_deref()
            .and_then(|n| n.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0)
    };
    // Flat: from a fifth of the run (after warm-up) to the end, RSS grows
    // by less than 20% (or 16 MiB) and descriptors by less than 10%.
    let settled = rows.get(rows.len() / 5).cloned().unwrap_or_default();
    let last = rows.last().cloned().unwrap_or_default();
    let rss_ok = last.rss_mib <= (settled.rss_mib * 1.2).max(settled.rss_mib + 16.0);
    let fds_ok = fds(&last) <= fds(&settled) * 1.1 + 8.0;
    Ok(Scenario {
        id: 6,
        name: "Soak: publish and churning sockets".into(),
        shape: format!(
            "{} s, {} events/s over gRPC to 10 tenants ({} published), {} sockets each reconnecting every {} s with lastEventId, sampled every {} s",
            shape.duration.as_secs(),
            shape.rate,
            published,
            shape.sockets,
            shape.lifetime.as_secs(),
            shape.sample_every.as_secs()
        ),
        targets: vec![
            Target {
                what: "RSS flat: the last sample within 20% (or 16 MiB) of the one at a fifth of the run".into(),
                measured: format!("{:.1} MiB then {:.1} MiB", settled.rss_mib, last.rss_mib),
                met: rss_ok,
            },
            Target {
                what: "open descriptors flat: the last sample within 10% (or 8) of the one at a fifth of the run".into(),
                measured: format!("{} then {}", fds(&settled), fds(&last)),
                met: fds_ok,
            },
        ],
        rows,
    })
}
