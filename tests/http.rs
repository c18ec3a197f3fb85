//! The HTTP listener: health, readiness, and REST publish with the same
//! checks and answers as gRPC.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn post(server: &TestServer, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/events", server.http))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"));
    (status, json)
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::start().await;
    let health = reqwest::get(format!("{}/healthz", server.http))
        .await
        .expect("request");
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{}/readyz", server.http))
        .await
        .expect("request");
    assert_eq!(ready.status(), 200);
    let body: Value = serde_json::from_str(&ready.text().await.expect("body")).expect("json");
    assert_eq!(body["status"], "ready");
    let metrics = reqwest::get(format!("{}/metrics", server.http))
        .await
        .expect("request");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("body");
    for name in [
        "tc_events_published_total",
        "tc_socketio_sockets",
        "tc_socketio_handshakes_refused_total",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
    let missing = reqwest::get(format!("{}/nope", server.http))
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
    let body: Value = serde_json::from_str(&missing.text().await.expect("body")).expect("json");
    assert_eq!(body["code"], "not_found");
}

#[tokio::test]
async fn rest_publish_reaches_grpc_subscribers_exactly() {
    let server = TestServer::start().await;
    let token = full("tenant-a");
    let mut client = server.client().await;
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let body =
        r#"{"type":"cost.updated","data":{"amount":42,"f":1.50,"z":{"b":1,"a":2}},"id":"rest-1"}"#;
    let (status, reply) = post(&server, Some(&token), body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["id"], "rest-1");
    assert_eq!(reply["results"][0]["duplicate"], false);
    let event = sub.next().await.expect("event");
    assert_eq!(event.data, r#"{"amount":42,"f":1.50,"z":{"b":1,"a":2}}"#);
    assert_eq!(event.tenant_id, "tenant-a");

    // A batch, with null as a valid payload; the retried id is a duplicate.
    let batch = r#"{"events":[{"type":"alert.created","data":null},{"type":"cost.updated","data":1,"id":"rest-1"}]}"#;
    let (status, reply) = post(&server, Some(&token), batch).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["duplicate"], false);
    assert_eq!(reply["results"][1]["duplicate"], true);
    let event = sub.next().await.expect("event");
    assert_eq!(
        (event.r#type.as_str(), event.data.as_str()),
        ("alert.created", "null")
    );
    sub.assert_quiet(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn rest_refusals_have_stable_codes_and_messages() {
    let server = TestServer::with(|s| {
        s.limits.max_event_bytes = 64;
        s.limits.max_batch = 2;
    })
    .await;
    let token = full("tenant-a");
    let long_data = format!(r#"{{"type":"a.b","data":"{}"}}"#, "x".repeat(100));
    let cases: Vec<(Option<String>, &str, u16, &str, &str)> = vec![
        (
            None,
            r#"{"type":"a.b","data":{}}"#,
            401,
            "unauthenticated",
            "missing token",
        ),
        (
            Some("garbage".into()),
            r#"{"type":"a.b","data":{}}"#,
            401,
            "unauthenticated",
            "malformed token",
        ),
        (
            Some(common::token("tenant-a", "events:subscribe")),
            r#"{"type":"a.b","data":{}}"#,
            403,
            "permission_denied",
            "token lacks scope events:publish",
        ),
        (
            Some(full("tenant-a")),
            r#"{"type":"a.b","data":{},"tenant_id":"tenant-b"}"#,
            403,
            "permission_denied",
            "tenant_id: this token is for tenant tenant-a",
        ),
        (
            Some(full("tenant-a")),
            "",
            400,
            "invalid_argument",
            "body: empty",
        ),
        (
            Some(full("tenant-a")),
            "{",
            400,
            "invalid_argument",
            "body: EOF while parsing",
        ),
        (
            Some(full("tenant-a")),
            "[1]",
            400,
            "invalid_argument",
            "body: invalid type",
        ),
        (
            Some(full("tenant-a")),
            r#"{"type":"a.b","dta":{}}"#,
            400,
            "invalid_argument",
            "body: unknown field `dta`",
        ),
        (
            Some(full("tenant-a")),
            r#"{"type":"a.b"}"#,
            400,
            "invalid_argument",
            "events[0].data: required",
        ),
        (
            Some(full("tenant-a")),
            r#"{"type":"A","data":{}}"#,
            400,
            "invalid_argument",
            "events[0].type:",
        ),
        (
            Some(full("tenant-a")),
            &long_data,
            400,
            "invalid_argument",
            "events[0].data: 102 bytes is larger than the limit of 64 bytes",
        ),
        (
            Some(full("tenant-a")),
            r#"{"events":[{"type":"a.b","data":1},{"type":"a.b","data":2},{"type":"a.b","data":3}]}"#,
            400,
            "invalid_argument",
            "events: 3 events is more than the batch limit of 2",
        ),
        (
            Some(full("tenant-a")),
            r#"{"events":[{"type":"a.b","data":1}],"type":"a.b"}"#,
            400,
            "invalid_argument",
            "body: send either one event",
        ),
    ];
    let mut client = server.client().await;
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    for (auth, body, status, code, message) in cases {
        let (got_status, reply) = post(&server, auth.as_deref(), body).await;
        assert_eq!(got_status, status, "{message}: {reply}");
        assert_eq!(reply["code"], code, "{reply}");
        let text = reply["message"].as_str().expect("message");
        assert!(
            text.starts_with(message) || text.contains(message),
            "{text:?} should say {message:?}"
        );
    }
    // An oversized body is refused without reading it all.
    let huge = format!(r#"{{"type":"a.b","data":"{}"}}"#, "x".repeat(1 << 20));
    let (status, reply) = post(&server, Some(&token), &huge).await;
    assert_eq!(status, 400);
    assert!(
        reply["message"]
            .as_str()
            .expect("message")
            .starts_with("body: larger than the limit")
    );
    // Nothing refused was delivered.
    sub.assert_quiet(Duration::from_millis(100)).await;
}

/// The `tc_*` names in `text`, with a histogram's or counter's suffix
/// (`_bucket`, `_count`, `_sum`, `_total`) kept as written.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tc_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary && end > start + 3 {
            names.insert(text[start..end].to_string());
        }
        i = end.max(start + 3);
    }
    names
}

/// The family a sample name belongs to.
fn family(name: &str) -> &str {
    ["_bucket", "_count", "_sum", "_total", "_created"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[tokio::test]
async fn every_metric_is_documented_and_the_dashboard_uses_only_real_ones() {
    let server = TestServer::start().await;
    let text = reqwest::get(format!("{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/operations.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = metric_names(&docs)
        .iter()
        .map(|n| family(n).to_string())
        .collect();
    // Every family this broker exposes (TLS and Redis ones only appear
    // with TLS or Redis on; the docs name them too).
    let exposed: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| family(n).to_string())
        .collect();
    assert!(exposed.len() > 30, "{text}");
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/operations.md: {undocumented:?}"
    );
    // The dashboard reads only documented metrics.
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/tensorcost-events.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(used.len() > 20, "{used:?}");
    let unknown: Vec<_> = used
        .iter()
        .filter(|n| !documented.contains(family(n)))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard reads unknown metrics: {unknown:?}"
    );
    // And a counter is read as a rate of its `_total`, never bare.
    for name in &used {
        let f = family(name);
        if text.contains(&format!("# TYPE {f} counter")) {
            assert!(
                name.ends_with("_total"),
                "{name}: a counter is read as {f}_total"
            );
        }
    }
}
