//! Scenario 9: enforcement policies. Scenario 1's shape (one publisher,
//! one subscriber, 256-byte events at maximum rate) with and without 100
//! enabled policies on the tenant, in one sitting; then the time from a
//! breaching event to `runaway_loop.detected` reaching a subscriber.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{self, SubscribeRequest, subscribe_response};
use tokio_stream::StreamExt;

use super::clients::{self, Recorder};
use super::procs::{self, CpuWindow};
use super::scenarios::{Row, Scenario, Target, broker_env};
use super::{Config, Size};

const TENANT: &str = "tenant-0";
/// Agents the published events name.
const AGENTS: u64 = 1000;

/// `agent.health_check` of `agent-<i % AGENTS>`, 256 bytes with the
/// publish time (`"t"`) the subscriber measures from.
fn agent_event(i: u64) -> proto::Event {
    let head = format!(
        r#"{{"t":{},"agent_id":"agent-{}","status":"healthy","pad":""#,
        clients::unix_nanos(),
        i % AGENTS
    );
    let pad = clients::DATA_BYTES.saturating_sub(head.len() + 2);
    let mut data = head;
    data.extend(std::iter::repeat_n('x', pad));
    data.push_str("\"}");
    proto::Event {
        r#type: "agent.health_check".into(),
        data,
        ..Default::default()
    }
}

/// The 100 policies: 10 count every published event (per agent, over
/// windows from 1 to 10 minutes, thresholds they do not reach), the other
/// 90 watch other types (costs per workflow, alerts per severity,
/// instances), as a tenant's policies would.
fn hundred_policies() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for i in 0..10 {
        out.push(serde_json::json!({
            "id": format!("agents-{i}"), "name": format!("agent loop {i}"),
            "match": {"types": ["agent.*"]},
            "subject": "agent_id",
            "condition": {"measure": "count", "window": format!("{}m", i + 1), "threshold": 1_000_000_000u64},
            "action": {"kind": "pause"},
        }));
    }
    for i in 0..30 {
        out.push(serde_json::json!({
            "id": format!("budget-{i}"), "name": format!("budget {i}"),
            "match": {"types": ["cost.updated"], "where": {"source": format!("source-{i}")}},
            "subject": "workflow_id",
            "condition": {"measure": "sum", "field": "cost_usd", "window": "1h", "threshold": 100},
            "action": {"kind": "alert", "severity": "high"},
        }));
        out.push(serde_json::json!({
            "id": format!("alerts-{i}"), "name": format!("alert storm {i}"),
            "match": {"types": ["alert.created"], "where": {"team": format!("team-{i}")}},
            "subject": "severity",
            "condition": {"measure": "count", "window": "10m", "threshold": 50},
            "action": {"kind": "notify"},
        }));
        out.push(serde_json::json!({
            "id": format!("fleet-{i}"), "name": format!("flapping instances {i}"),
            "match": {"types": ["instance.state_changed"], "where": {"region": format!("region-{i}")}},
            "subject": "instance_id",
            "condition": {"measure": "count", "window": "5m", "threshold": 20},
            "action": {"kind": "alert"},
        }));
    }
    out
}

async fn delete_policies(http: &str, token: &str) -> anyhow::Result<()> {
    for p in hundred_policies() {
        let id = p["id"].as_str().unwrap_or_default();
        reqwest::Client::new()
            .delete(format!("http://{http}/v1/policies/{id}"))
            .bearer_auth(token)
            .send()
            .await?;
    }
    Ok(())
}

async fn put_policy(http: &str, token: &str, policy: &serde_json::Value) -> anyhow::Result<()> {
    let id = policy["id"].as_str().unwrap_or_default();
    let resp = reqwest::Client::new()
        .put(format!("http://{http}/v1/policies/{id}"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(policy.to_string())
        .send()
        .await?;
    let status = resp.status();
    anyhow::ensure!(
        status.is_success(),
        "PUT policy {id}: {status} {}",
        resp.text().await.unwrap_or_default()
    );
    Ok(())
}

/// Publishes `n` agent events at maximum rate to one subscriber: a row.
async fn publish_run(
    broker: &tensorcost_testkit::broker::BrokerProcess,
    token: &str,
    label: &str,
    n: u64,
) -> anyhow::Result<Row> {
    let recorder = Recorder::new();
    recorder.measuring.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let sub = clients::grpc_subscriber(
        &broker.grpc,
        token,
        Arc::clone(&recorder),
        Arc::clone(&stop),
    )
    .await?;
    let cpu = CpuWindow::start(&broker.process);
    let start = Instant::now();
    clients::grpc_stream_events(&broker.grpc, token, n, agent_event).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while recorder.delivered.load(Ordering::Relaxed) + 4096 < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.percent(&broker.process);
    stop.store(true, Ordering::Relaxed);
    let _ = sub.await;
    let delivered = recorder.delivered.load(Ordering::Relaxed);
    let (p50, p99, p999) = recorder.percentiles();
    Ok(Row {
        system: label.into(),
        published_per_s: n as f64 / secs,
        delivered_per_s: delivered as f64 / secs,
        delivered_ratio: delivered as f64 / n as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_percent: cpu,
        rss_mib: procs::rss_kib(&broker.process) as f64 / 1024.0,
        ..Default::default()
    })
}

pub async fn policies(config: &Config) -> anyhow::Result<Scenario> {
    let (n, rounds, breaches, rate, paced_rates) = match config.size {
        Size::Small => (20_000u64, 1, 100u64, 100u64, vec![10_000u64]),
        Size::Full => (1_000_000, 3, 1_000, 200, vec![100_000]),
    };
    // 10 policies counting per agent over 1,000 agents, and the breaching
    // agents: past the default 10,000 subjects per tenant.
    let broker = procs::broker(
        &config.broker,
        &broker_env(&[("TC_POLICY_MAX_SUBJECTS", "50000".to_string())]),
    )?;
    let token = clients::token(
        Some(TENANT),
        "events:publish events:subscribe enforcement:write",
    );
    let mut rows = Vec::new();
    // Rounds of without and with, alternating: this machine's throughput
    // drifts by more than the cost measured, so each side is the median
    // of its rounds.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut evaluated_all = 0.0;
    for round in 1..=rounds {
        let mut row =
            publish_run(&broker, &token, &format!("no policies, round {round}"), n).await?;
        without.push(row.delivered_per_s);
        rows.push(row);
        for p in hundred_policies() {
            put_policy(&broker.http, &token, &p).await?;
        }
        let evaluated = broker.metric("tc_policy_evaluated_events_total").await;
        row = publish_run(
            &broker,
            &token,
            &format!("100 enabled policies, round {round}"),
            n,
        )
        .await?;
        let evaluated = broker.metric("tc_policy_evaluated_events_total").await - evaluated;
        evaluated_all += evaluated;
        let dropped = broker.metric("tc_policy_dropped_events_total").await;
        row.note = Some(format!(
            "{evaluated:.0} events evaluated by the 10 policies counting them, {dropped:.0} dropped from the policy queue so far"
        ));
        with.push(row.delivered_per_s);
        rows.push(row);
        delete_policies(&broker.http, &token).await?;
    }
    let dropped_all = broker.metric("tc_policy_dropped_events_total").await;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (without, with) = (median(&mut without), median(&mut with));
    let cost = 1.0 - with / without.max(1.0);

    // Below saturation: does evaluation keep up with every event?
    for p in hundred_policies() {
        put_policy(&broker.http, &token, &p).await?;
    }
    let mut paced = Vec::new();
    for &rate in &paced_rates {
        let evaluated = broker.metric("tc_policy_evaluated_events_total").await;
        let dropped = broker.metric("tc_policy_dropped_events_total").await;
        let cpu = CpuWindow::start(&broker.process);
        let start = Instant::now();
        let sent = clients::grpc_stream_paced(
            &broker.grpc,
            &token,
            rate,
            Duration::from_secs(5),
            agent_event,
        )
        .await?;
        let secs = start.elapsed().as_secs_f64();
        // What is still queued is evaluated within a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = cpu.percent(&broker.process);
        let evaluated = broker.metric("tc_policy_evaluated_events_total").await - evaluated;
        let dropped = broker.metric("tc_policy_dropped_events_total").await - dropped;
        paced.push((rate, sent, dropped));
        rows.push(Row {
            system: format!("100 enabled policies, paced at {rate}/s"),
            published_per_s: sent as f64 / secs,
            delivered_ratio: evaluated / sent.max(1) as f64,
            cpu_percent: cpu,
            rss_mib: procs::rss_kib(&broker.process) as f64 / 1024.0,
            note: Some(format!(
                "{evaluated:.0} of {sent} events evaluated, {dropped:.0} dropped from the policy queue (delivered of expected: evaluated of published)"
            )),
            ..Default::default()
        });
    }
    delete_policies(&broker.http, &token).await?;

    // Detection latency: the 100 policies again, and one that fires at an
    // agent's first error; `breaches` agents, one error each, paced.
    for p in hundred_policies() {
        put_policy(&broker.http, &token, &p).await?;
    }
    put_policy(
        &broker.http,
        &token,
        &serde_json::json!({
            "id": "first-error", "name": "first error",
            "match": {"types": ["agent.error"]},
            "subject": "agent_id",
            "condition": {"measure": "count", "window": "1m", "threshold": 1},
            "action": {"kind": "alert"},
        }),
    )
    .await?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut client = EventBrokerClient::connect(broker.grpc.clone()).await?;
    let mut stream = client
        .subscribe(clients_authed(
            SubscribeRequest {
                types: vec!["runaway_loop.detected".into()],
                ..Default::default()
            },
            &token,
        ))
        .await?
        .into_inner();
    let _ = stream.next().await; // the status message
    let reader = {
        let (sent, hist) = (Arc::clone(&sent), Arc::clone(&hist));
        tokio::spawn(async move {
            let mut seen = 0u64;
            while seen < breaches {
                let Ok(Some(Ok(m))) =
                    tokio::time::timeout(Duration::from_secs(10), stream.next()).await
                else {
                    break;
                };
                let events = match m.message {
                    Some(subscribe_response::Message::Event(e)) => vec![e],
                    Some(subscribe_response::Message::Events(b)) => b.events,
                    _ => continue,
                };
                for e in events {
                    let data: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
                    let subject = data["subject"].as_str().unwrap_or_default().to_string();
                    if let Some(at) = sent.lock().expect("lock").get(&subject) {
                        let _ = hist
                            .lock()
                            .expect("lock")
                            .record(at.elapsed().as_micros() as u64);
                        seen += 1;
                    }
                }
            }
            seen
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..breaches {
        tick.tick().await;
        let agent = format!("breach-{i}");
        sent.lock()
            .expect("lock")
            .insert(agent.clone(), Instant::now());
        client
            .publish(clients_authed(
                proto::PublishRequest {
                    events: vec![proto::Event {
                        r#type: "agent.error".into(),
                        data: format!(r#"{{"agent_id":"{agent}","error":"loop"}}"#),
                        ..Default::default()
                    }],
                },
                &token,
            ))
            .await?;
    }
    let detected = reader.await?;
    let (p50, p99, p999) = {
        let h = hist.lock().expect("lock");
        let ms = |q| h.value_at_quantile(q) as f64 / 1000.0;
        (ms(0.5), ms(0.99), ms(0.999))
    };
    rows.push(Row {
        system: "breaching event → runaway_loop.detected at a subscriber".into(),
        published_per_s: rate as f64,
        delivered_per_s: 0.0,
        delivered_ratio: detected as f64 / breaches as f64,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        note: Some(format!(
            "{breaches} agents' first errors at {rate}/s, beside the 100 policies"
        )),
        ..Default::default()
    });
    Ok(Scenario {
        id: 9,
        name: "Enforcement policies".into(),
        shape: format!(
            "scenario 1's shape with agent.health_check events of 1,000 agents: {rounds} rounds of {n} events at maximum rate with no policies, then with 100 enabled policies (10 counting these events per agent, 90 on other types); {} events/s paced with the 100 policies; then {breaches} breaching events at {rate}/s", paced_rates[0]
        ),
        targets: vec![
            Target {
                what: "publish throughput with 100 policies ≥ 85% of without (cost < 15%), medians of alternating rounds, every event evaluated".into(),
                measured: format!(
                    "{:.1}% cost ({with:.0}/s against {without:.0}/s); {evaluated_all:.0} of {} evaluated, {dropped_all:.0} dropped",
                    100.0 * cost,
                    n * rounds
                ),
                met: cost < 0.15 && dropped_all == 0.0,
            },
            Target {
                what: format!(
                    "below saturation ({}/s with the 100 policies), every event evaluated: none dropped",
                    paced_rates[0]
                ),
                measured: format!(
                    "{} dropped of {} published",
                    paced[0].2, paced[0].1
                ),
                met: paced[0].2 == 0.0,
            },
            Target {
                what: "breaching event to runaway_loop.detected at a subscriber: p99 < 10 ms".into(),
                measured: format!("p99 {p99:.2} ms ({detected} of {breaches} detected)"),
                met: p99 < 10.0 && detected == breaches,
            },
        ],
        rows,
    })
}

fn clients_authed<T>(m: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(m);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
