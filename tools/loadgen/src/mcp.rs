//! Scenario 8: the MCP server. `cost.summary` latency with a million cost
//! events held for one tenant, tool calls per second over Streamable HTTP,
//! and the projections' memory per million events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use tensorcost_events::proto;

use super::clients;
use super::procs;
use super::scenarios::{Row, Scenario, Target, broker_env};
use super::{Config, Size};

const SOURCES: [&str; 6] = ["aws", "gcp", "azure", "bedrock", "azure_openai", "vertex"];
const ENVIRONMENTS: [&str; 3] = ["prod", "staging", "dev"];
/// Concurrent MCP clients for calls per second.
const CLIENTS: usize = 8;

/// Cost event `i`: spread over the last 7 days (168 hours), 6 sources, 10
/// services, 20 teams, 50 applications, 3 environments, 100 agents and 200
/// workflows;
/// amounts of 1 to 100 cents, so the total is known exactly.
fn cost_event(i: u64, now: SystemTime) -> proto::Event {
    let hour = i % 168;
    // The names vary with the event's turn within its hour, so every hour
    // sees every name (no name is tied to an hour).
    let k = i / 168;
    let at = now - Duration::from_secs(hour * 3600 + 60);
    let data = serde_json::json!({
        "source": SOURCES[(k % 6) as usize],
        "amount_usd": cents(i) as f64 / 100.0,
        "period_start": humantime::format_rfc3339_millis(at).to_string(),
        "tags": {
            "team": format!("team-{}", k % 20),
            "application": format!("app-{}", (k / 3) % 50),
            "environment": ENVIRONMENTS[((k / 7) % 3) as usize],
        },
        "service": format!("model-{}", (k / 11) % 10),
        "agent_id": format!("agent-{}", (k / 13) % 100),
        "workflow_id": format!("wf-{}", (k / 17) % 200),
    });
    proto::Event {
        r#type: "cost.updated".into(),
        data: data.to_string(),
        ..Default::default()
    }
}

fn cents(i: u64) -> u64 {
    1 + i % 100
}

/// One `tools/call` over Streamable HTTP; the structured answer.
async fn call(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    tool: &str,
    args: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args}
    });
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .body(body.to_string())
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "{tool}: {status} {text}");
    let value: serde_json::Value = serde_json::from_str(&text)?;
    anyhow::ensure!(
        value["result"]["isError"] != serde_json::Value::Bool(true),
        "{tool} refused: {value}"
    );
    Ok(value["result"]["structuredContent"].clone())
}

pub async fn mcp(config: &Config) -> anyhow::Result<Scenario> {
    let (n, calls, secs) = match config.size {
        Size::Small => (20_000u64, 200u64, 2u64),
        Size::Full => (1_000_000, 2_000, 10),
    };
    let env = broker_env(&[("TC_PROJECTION_QUEUE", "2000000".to_string())]);
    let broker = procs::broker(&config.broker, &env)?;
    let token = clients::token(Some("tenant-0"), "events:publish cost:read agent:read");
    let url = format!("http://{}/mcp", broker.http);
    let client = reqwest::Client::new();
    let mut rows = Vec::new();
    let mut targets = Vec::new();

    // 1. A million cost events; the projections' memory for them.
    call(&client, &url, &token, "cost.summary", serde_json::json!({})).await?;
    let rss_before = procs::rss_kib(&broker.process);
    let now = SystemTime::now();
    let published =
        clients::grpc_stream_events(&broker.grpc, &token, n, move |i| cost_event(i, now)).await?;
    let expected_cents: u64 = (0..n).map(cents).sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut applied = 0;
    let mut folded = false;
    while Instant::now() < deadline {
        let s = call(
            &client,
            &url,
            &token,
            "cost.summary",
            serde_json::json!({"window": "8d"}),
        )
        .await?;
        applied = s["events"].as_u64().unwrap_or(0);
        if applied >= n {
            folded = s["folded_into_other"].as_bool().unwrap_or(false);
            let total = s["total_usd"].as_f64().unwrap_or(0.0);
            targets.push(Target {
                what: "cost.summary's total is every published cent".into(),
                measured: format!("{total:.2} USD of {:.2}", expected_cents as f64 / 100.0),
                met: (total * 100.0).round() as u64 == expected_cents,
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied_secs = published.as_secs_f64();
    let rss_after = procs::rss_kib(&broker.process);
    let per_million = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 * 1e6 / n as f64;
    rows.push(Row {
        system: format!("{n} cost.updated events published, applied to the projections"),
        published_per_s: n as f64 / applied_secs,
        delivered_ratio: applied as f64 / n as f64,
        rss_mib: rss_after as f64 / 1024.0,
        note: Some(format!(
            "RSS grew {:.1} MiB: {per_million:.1} MiB per million events (history is capped at TC_HISTORY_MAX_EVENTS, so this is mostly the projections); folded_into_other: {folded}",
            (rss_after.saturating_sub(rss_before)) as f64 / 1024.0
        )),
        ..Default::default()
    });

    // 2. cost.summary latency, one call at a time.
    for (tool, args, label) in [
        (
            "cost.summary",
            serde_json::json!({}),
            "cost.summary (7 days)",
        ),
        (
            "cost.summary",
            serde_json::json!({"window": "90d"}),
            "cost.summary (90 days)",
        ),
        ("agent.cost", serde_json::json!({}), "agent.cost (7 days)"),
    ] {
        let mut hist = Histogram::<u64>::new(3)?;
        let cpu = procs::CpuWindow::start(&broker.process);
        let start = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            call(&client, &url, &token, tool, args.clone()).await?;
            hist.record(t.elapsed().as_micros() as u64)?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let ms = |q| hist.value_at_quantile(q) as f64 / 1000.0;
        rows.push(Row {
            system: format!("{label}, one call at a time"),
            delivered_per_s: calls as f64 / elapsed,
            delivered_ratio: 1.0,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            cpu_percent: cpu.percent(&broker.process),
            note: Some(format!(
                "{calls} calls over HTTP/1.1 keep-alive, answers in tool calls/s"
            )),
            ..Default::default()
        });
    }

    // 3. Tool calls per second with CLIENTS callers at once.
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu = procs::CpuWindow::start(&broker.process);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, token, done, failed) = (
            reqwest::Client::new(),
            url.clone(),
            token.clone(),
            done.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                match call(&client, &url, &token, "cost.summary", serde_json::json!({})).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    // A broken run stops, rather than spin on its errors.
                    Err(_) => return failed.fetch_add(1, Ordering::Relaxed),
                };
            }
            0
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(
        failed == 0,
        "{failed} of {CLIENTS} callers stopped on an error"
    );
    let rate = done.load(Ordering::Relaxed) as f64 / secs as f64;
    rows.push(Row {
        system: format!("cost.summary (7 days), {CLIENTS} callers at once"),
        delivered_per_s: rate,
        delivered_ratio: 1.0,
        cpu_percent: cpu.percent(&broker.process),
        note: Some("tool calls/s over Streamable HTTP (stateless, JSON answers)".into()),
        ..Default::default()
    });
    Ok(Scenario {
        id: 8,
        name: "MCP".into(),
        shape: format!(
            "{n} cost.updated events for one tenant over 7 days (6 sources with 10 services each, 73 tag values, 100 agents, 200 workflows) published by gRPC streaming; then {calls} sequential calls of each tool; then {CLIENTS} callers of cost.summary for {secs} s"
        ),
        rows,
        targets,
    })
}
