//! gRPC publish/subscribe against the real server on ephemeral ports.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tensorcost_events::proto::{self, PublishStreamRequest, SubscribeRequest, publish_ack};
use tokio_stream::StreamExt;

#[tokio::test]
async fn round_trip_keeps_data_exact_and_stamps_the_envelope() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    assert_eq!(sub.status.tenant_id, "tenant-a");
    assert!(!sub.status.resumed);

    let data = r#"{"n":42,"f":1.50,"big":123456789012345678901234567890,"e":1e400,"nested":{"z":1,"a":[true,null,-0]},"s":"é\u0000\ud83d\ude00"}"#;
    let results = publish(
        &mut client,
        &token,
        vec![draft("ml.training.completed", data)],
    )
    .await
    .expect("publish");
    assert_eq!(results.len(), 1);
    assert!(!results[0].duplicate);

    let event = sub.next().await.expect("event");
    assert_eq!(event.data, data, "data must round-trip byte for byte");
    assert_eq!(event.id, results[0].id);
    assert_eq!(event.r#type, "ml.training.completed");
    assert_eq!(event.tenant_id, "tenant-a");
    let uuid = uuid::Uuid::parse_str(&event.id).expect("a UUID");
    assert_eq!(uuid.get_version_num(), 7, "time-ordered id");
    // 2026-04-29T16:41:38.412Z
    let ts = event.timestamp.as_bytes();
    assert_eq!(ts.len(), 24, "{}", event.timestamp);
    assert!(event.timestamp.ends_with('Z') && ts[10] == b'T' && ts[19] == b'.');
    assert!(humantime::parse_rfc3339(&event.timestamp).is_ok());
    assert_eq!(event.trace_id.len(), 32);
    assert!(event.trace_id.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn trace_id_comes_from_traceparent_or_the_event() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let mut request = authed(
        proto::PublishRequest {
            events: vec![draft("cost.updated", "{}")],
        },
        &token,
    );
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .expect("ascii"),
    );
    client.publish(request).await.expect("publish");
    assert_eq!(
        sub.next().await.expect("event").trace_id,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );

    let own = proto::Event {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        ..draft("cost.updated", "{}")
    };
    publish(&mut client, &token, vec![own])
        .await
        .expect("publish");
    assert_eq!(
        sub.next().await.expect("event").trace_id,
        "0af7651916cd43dd8448eb211c80319c"
    );
}

#[tokio::test]
async fn per_type_order_holds_under_concurrent_publishers() {
    const PUBLISHERS: usize = 4;
    const PER_TYPE: usize = 150;
    const TYPES: [&str; 3] = ["cost.updated", "alert.created", "instance.state_changed"];
    let server = TestServer::with(|s| s.broker.subscriber_buffer = 100_000).await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut first = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    let mut second = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (mut client, token) = (server.client().await, token.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TYPE {
                for t in TYPES {
                    let data = format!(r#"{{"p":{p},"i":{i}}}"#);
                    publish(&mut client, &token, vec![draft(t, &data)])
                        .await
                        .expect("publish");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let total = PUBLISHERS * PER_TYPE * TYPES.len();
    let a = first.take(total).await;
    let b = second.take(total).await;
    // Every subscriber sees the same order...
    let ids = |v: &[proto::Event]| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    // ...and within a type, each publisher's events in the order it sent them.
    let mut last: HashMap<(String, u64), i64> = HashMap::new();
    for e in &a {
        let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        let key = (e.r#type.clone(), v["p"].as_u64().expect("p"));
        let i = v["i"].as_i64().expect("i");
        let prev = last.insert(key.clone(), i).unwrap_or(-1);
        assert_eq!(i, prev + 1, "{key:?}: {i} after {prev}");
    }
    first.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn prefix_and_exact_filters() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(
        &mut client,
        &token,
        &["cost.*", "alert.created", "ml.training.*"],
        "",
    )
    .await
    .expect("subscribe");
    let types = [
        "cost.updated",
        "costs.updated",
        "alert.created",
        "alert.resolved",
        "cost.forecast.generated",
        "instance.created",
        "ml.training.started",
        "ml.inference.done",
        "cost.threshold_exceeded",
    ];
    let events = types.iter().map(|t| draft(t, "{}")).collect();
    publish(&mut client, &token, events).await.expect("publish");
    let got: Vec<String> = sub.take(5).await.into_iter().map(|e| e.r#type).collect();
    assert_eq!(
        got,
        [
            "cost.updated",
            "alert.created",
            "cost.forecast.generated",
            "ml.training.started",
            "cost.threshold_exceeded"
        ]
    );
    sub.assert_quiet(Duration::from_millis(200)).await;

    let status = subscribe(&mut client, &token, &["Cost.*"], "")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("types[0]"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn resume_with_since_id_has_no_gap_and_no_duplicate() {
    let server = TestServer::with(|s| s.broker.subscriber_buffer = 100_000).await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut reference = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let batch = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| draft("cost.updated", &format!(r#"{{"i":{i}}}"#)))
            .collect::<Vec<_>>()
    };
    publish(&mut client, &token, batch(0, 50))
        .await
        .expect("publish");
    let mut early = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    publish(&mut client, &token, batch(50, 20))
        .await
        .expect("publish");
    let seen = early.take(20).await;
    drop(early);
    let last_seen = seen.last().expect("some").id.clone();

    // Keep publishing while the subscriber resumes: the seam must be exact.
    let publisher = {
        let (mut client, token) = (server.client().await, token.clone());
        tokio::spawn(async move {
            for i in 70..400 {
                publish(&mut client, &token, batch(i, 1))
                    .await
                    .expect("publish");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut resumed = subscribe(&mut client, &token, &[], &last_seen)
        .await
        .expect("resume");
    assert!(resumed.status.resumed);
    assert!(resumed.status.recovered, "history reaches back");
    publisher.await.expect("publisher");

    let all = reference.take(400).await;
    let pos = all.iter().position(|e| e.id == last_seen).expect("seen id");
    assert_eq!(pos, 69);
    let expected: Vec<String> = all[pos + 1..].iter().map(|e| e.id.clone()).collect();
    let got: Vec<String> = resumed
        .take(expected.len())
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, expected);
    resumed.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn resume_beyond_history_says_not_recovered() {
    let server = TestServer::with(|s| s.broker.history_max_events = 5).await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let events = (0..10)
        .map(|i| draft("cost.updated", &format!("{i}")))
        .collect();
    let ids = publish(&mut client, &token, events).await.expect("publish");

    let mut sub = subscribe(&mut client, &token, &[], &ids[2].id)
        .await
        .expect("subscribe");
    assert!(sub.status.resumed && !sub.status.recovered);
    assert_eq!(sub.status.replayed, 5, "everything held is replayed");
    let got: Vec<String> = sub.take(5).await.into_iter().map(|e| e.data).collect();
    assert_eq!(got, ["5", "6", "7", "8", "9"]);

    let sub = subscribe(&mut client, &token, &[], &ids[7].id)
        .await
        .expect("subscribe");
    assert!(sub.status.recovered);
    assert_eq!(sub.status.replayed, 2);

    let sub = subscribe(&mut client, &token, &[], "never-seen")
        .await
        .expect("subscribe");
    assert!(!sub.status.recovered);

    let bad = subscribe(&mut client, &token, &[], "bad id!")
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("since_id:"), "{}", bad.message());
}

#[tokio::test]
async fn republishing_an_id_is_acknowledged_but_not_delivered_twice() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (a, b) = (full("tenant-a"), full("tenant-b"));
    let mut sub_a = subscribe(&mut client, &a, &[], "")
        .await
        .expect("subscribe");
    let mut sub_b = subscribe(&mut client, &b, &[], "")
        .await
        .expect("subscribe");
    let with_id = |id: &str| proto::Event {
        id: id.into(),
        ..draft("action.queued", "{}")
    };

    let first = publish(&mut client, &a, vec![with_id("order-1")])
        .await
        .expect("publish");
    assert_eq!(first[0].id, "order-1");
    assert!(!first[0].duplicate);
    let retry = publish(
        &mut client,
        &a,
        vec![with_id("order-1"), with_id("order-2"), with_id("order-2")],
    )
    .await
    .expect("publish");
    let dup: Vec<bool> = retry.iter().map(|r| r.duplicate).collect();
    assert_eq!(dup, [true, false, true]);
    // The same id from another tenant is that tenant's own event.
    let other = publish(&mut client, &b, vec![with_id("order-1")])
        .await
        .expect("publish");
    assert!(!other[0].duplicate);

    publish(&mut client, &a, vec![draft("action.completed", "{}")])
        .await
        .expect("publish");
    let got: Vec<String> = sub_a
        .take(3)
        .await
        .into_iter()
        .map(|e| e.r#type + ":" + &e.id)
        .collect();
    assert_eq!(got[0], "action.queued:order-1");
    assert_eq!(got[1], "action.queued:order-2");
    assert!(got[2].starts_with("action.completed:"));
    assert_eq!(sub_b.next().await.expect("event").id, "order-1");
    sub_b.assert_quiet(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_slow_subscriber_is_dropped_with_its_last_id_and_slows_nobody() {
    const TOTAL: usize = 6_000;
    let server = TestServer::with(|s| s.broker.subscriber_buffer = 64).await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000));

    // The slow subscriber does not read while everything is published.
    let mut slow = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    // The fast one reads all along; if it ever falls behind it resumes the
    // documented way, so it must still end with every event exactly once.
    let fast = {
        let (mut client, token) = (server.client().await, token.clone());
        tokio::spawn(async move {
            let mut ids: Vec<String> = Vec::new();
            let mut sub = subscribe(&mut client, &token, &[], "")
                .await
                .expect("subscribe");
            while ids.len() < TOTAL {
                match sub.next().await {
                    Ok(e) => ids.push(e.id),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        let last = ids.last().cloned().unwrap_or_default();
                        sub = subscribe(&mut client, &token, &[], &last)
                            .await
                            .expect("resume");
                    }
                    Err(s) => panic!("{s:?}"),
                }
            }
            ids
        })
    };
    let mut published = Vec::new();
    for chunk in 0..TOTAL / 100 {
        let events = (0..100)
            .map(|i| proto::Event {
                id: format!("e{:05}", chunk * 100 + i),
                ..draft("metrics.collected", &payload)
            })
            .collect();
        let r = tokio::time::timeout(PATIENCE, publish(&mut client, &token, events))
            .await
            .expect("publishing is never held up by a slow subscriber")
            .expect("publish");
        published.extend(r.into_iter().map(|r| r.id));
    }
    let fast_ids = tokio::time::timeout(Duration::from_secs(60), fast)
        .await
        .expect("fast subscriber finishes")
        .expect("fast task");
    assert_eq!(fast_ids, published);

    // Now the slow one reads: what was buffered, then RESOURCE_EXHAUSTED
    // naming the last id it was sent.
    let mut received = Vec::new();
    let status = loop {
        match slow.next().await {
            Ok(e) => received.push(e.id),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(received.len() < TOTAL, "it must have been dropped");
    let last = received.last().expect("got some first").clone();
    assert_eq!(
        status
            .metadata()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok()),
        Some(last.as_str())
    );
    assert!(
        status.message().contains(&format!("since_id={last}")),
        "{}",
        status.message()
    );
    assert_eq!(
        received,
        published[..received.len()],
        "no gap before the drop"
    );

    // Resuming from the last id gets the rest, in order.
    let mut resumed = subscribe(&mut client, &token, &[], &last)
        .await
        .expect("resume");
    assert!(resumed.status.recovered);
    let rest: Vec<String> = resumed
        .take(TOTAL - received.len())
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(rest, published[received.len()..]);
}

#[tokio::test]
async fn tenants_never_see_each_others_events_under_load() {
    const TENANTS: usize = 8;
    const EACH: usize = 200;
    let server = TestServer::with(|s| s.broker.subscriber_buffer = 100_000).await;
    let mut client = server.client().await;
    let mut subs = Vec::new();
    for t in 0..TENANTS {
        let token = full(&format!("tenant-{t}"));
        subs.push(
            subscribe(&mut client, &token, &[], "")
                .await
                .expect("subscribe"),
        );
    }
    let mut tasks = Vec::new();
    for t in 0..TENANTS {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let token = full(&format!("tenant-{t}"));
            for i in 0..EACH / 10 {
                let events = (0..10)
                    .map(|j| {
                        draft(
                            "cost.updated",
                            &format!(r#"{{"owner":"tenant-{t}","i":{}}}"#, i * 10 + j),
                        )
                    })
                    .collect();
                publish(&mut client, &token, events).await.expect("publish");
            }
            // Naming another tenant without the all-tenants scope is refused.
            let other = proto::Event {
                tenant_id: format!("tenant-{}", (t + 1) % TENANTS),
                ..draft("cost.updated", r#"{"owner":"intruder"}"#)
            };
            let refused = publish(&mut client, &token, vec![other])
                .await
                .expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
            assert!(
                refused.message().contains("events:all_tenants"),
                "{}",
                refused.message()
            );
        }));
    }
    for task in tasks {
        task.await.expect("publisher");
    }
    for (t, sub) in subs.iter_mut().enumerate() {
        let owner = format!("tenant-{t}");
        for e in sub.take(EACH).await {
            assert_eq!(e.tenant_id, owner);
            let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
            assert_eq!(v["owner"], owner.as_str());
        }
        sub.assert_quiet(Duration::from_millis(100)).await;
    }

    // Subscribing to another tenant is refused too.
    let refused = subscribe_req(
        &mut client,
        &full("tenant-0"),
        SubscribeRequest {
            tenant_id: "tenant-1".into(),
            ..Default::default()
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn an_all_tenants_service_token_publishes_for_and_follows_named_tenants() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let service = token_opt(None, "events:all_tenants events:publish events:subscribe");
    let mut everyone = subscribe(&mut client, &service, &[], "")
        .await
        .expect("subscribe");
    assert_eq!(everyone.status.tenant_id, "*");
    let mut only_b = subscribe_req(
        &mut client,
        &service,
        SubscribeRequest {
            tenant_id: "tenant-b".into(),
            ..Default::default()
        },
    )
    .await
    .expect("subscribe");
    let mut b = subscribe(&mut client, &full("tenant-b"), &[], "")
        .await
        .expect("subscribe");

    let for_b = proto::Event {
        tenant_id: "tenant-b".into(),
        ..draft("policy.updated", "{}")
    };
    publish(&mut client, &service, vec![for_b])
        .await
        .expect("publish");
    publish(
        &mut client,
        &full("tenant-a"),
        vec![draft("policy.updated", "{}")],
    )
    .await
    .expect("publish");
    assert_eq!(b.next().await.expect("event").tenant_id, "tenant-b");
    b.assert_quiet(Duration::from_millis(100)).await;
    assert_eq!(only_b.next().await.expect("event").tenant_id, "tenant-b");
    let seen: Vec<String> = everyone
        .take(2)
        .await
        .into_iter()
        .map(|e| e.tenant_id)
        .collect();
    assert_eq!(seen, ["tenant-b", "tenant-a"]);

    // A service token must name the tenant it publishes for.
    let unnamed = publish(&mut client, &service, vec![draft("policy.updated", "{}")])
        .await
        .expect_err("refused");
    assert_eq!(unnamed.code(), tonic::Code::InvalidArgument);
    assert!(
        unnamed.message().contains("tenant_id: required"),
        "{}",
        unnamed.message()
    );
    // Resume needs one tenant.
    let resume_all = subscribe(&mut client, &service, &[], "some-id")
        .await
        .expect_err("refused");
    assert_eq!(resume_all.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn every_invalid_event_is_refused_naming_the_field_and_nothing_half_accepted() {
    let server = TestServer::with(|s| {
        s.limits.max_event_bytes = 1024;
        s.limits.max_batch = 10;
    })
    .await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let cases: Vec<(proto::Event, &str)> = vec![
        (draft("", "{}"), "events[0].type: required"),
        (
            draft("Cost.Updated", "{}"),
            "events[0].type: \"Cost.Updated\" is not a lowercase dotted name",
        ),
        (
            draft("cost", "{}"),
            "events[0].type: \"cost\" is not a lowercase dotted name",
        ),
        (
            draft(&format!("a.{}", "b".repeat(130)), "{}"),
            "events[0].type: 132 characters is longer than the limit of 128",
        ),
        (draft("cost.updated", ""), "events[0].data: required"),
        (
            draft("cost.updated", "{\"a\":"),
            "events[0].data: not valid JSON",
        ),
        (
            draft("cost.updated", "{} trailing"),
            "events[0].data: not valid JSON",
        ),
        (
            draft("cost.updated", &format!("\"{}\"", "x".repeat(1100))),
            "events[0].data: 1102 bytes is larger than the limit of 1024 bytes",
        ),
        (
            proto::Event {
                id: "has space".into(),
                ..draft("cost.updated", "{}")
            },
            "events[0].id: ' ' is not allowed",
        ),
        (
            proto::Event {
                trace_id: "xyz".into(),
                ..draft("cost.updated", "{}")
            },
            "events[0].trace_id: \"xyz\" is not a W3C trace id",
        ),
        (
            proto::Event {
                tenant_id: "a/b".into(),
                ..draft("cost.updated", "{}")
            },
            "events[0].tenant_id: '/' is not allowed",
        ),
    ];
    for (event, expected) in cases {
        let status = publish(&mut client, &token, vec![event])
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{expected}");
        assert!(
            status.message().starts_with(expected),
            "{:?} should start with {expected:?}",
            status.message()
        );
    }

    let empty = publish(&mut client, &token, vec![])
        .await
        .expect_err("refused");
    assert_eq!(
        empty.message(),
        "events: empty: a publish needs at least one event"
    );
    let many = (0..11).map(|_| draft("cost.updated", "{}")).collect();
    let too_many = publish(&mut client, &token, many)
        .await
        .expect_err("refused");
    assert_eq!(
        too_many.message(),
        "events: 11 events is more than the batch limit of 10"
    );

    // One bad event refuses the whole batch.
    let batch = vec![
        draft("cost.updated", "1"),
        draft("cost.updated", "2"),
        draft("cost.UPDATED", "3"),
    ];
    let status = publish(&mut client, &token, batch)
        .await
        .expect_err("refused");
    assert!(
        status.message().starts_with("events[2].type:"),
        "{}",
        status.message()
    );

    // A request larger than any valid batch is refused before decoding.
    let huge = draft("cost.updated", &format!("\"{}\"", "x".repeat(200_000)));
    let status = publish(&mut client, &token, vec![huge])
        .await
        .expect_err("refused");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );

    publish(&mut client, &token, vec![draft("cost.sentinel", "{}")])
        .await
        .expect("publish");
    assert_eq!(sub.next().await.expect("event").r#type, "cost.sentinel");
    sub.assert_quiet(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn every_auth_refusal_says_why() {
    use base64::Engine;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let sign = |claims: serde_json::Value, alg, secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("sign")
    };
    use jsonwebtoken::Algorithm::{HS256, HS384};
    let secret = SECRET.as_bytes();
    let cases: Vec<(Option<String>, tonic::Code, &str)> = vec![
        (None, tonic::Code::Unauthenticated, "missing token"),
        (
            Some("Basic dXNlcjpwYXNz".into()),
            tonic::Code::Unauthenticated,
            "malformed authorization header",
        ),
        (
            Some("Bearer not-a-jwt".into()),
            tonic::Code::Unauthenticated,
            "malformed token",
        ),
        (
            Some(format!(
                "Bearer {}.{}.",
                b64(r#"{"alg":"none"}"#),
                b64(&format!(r#"{{"tenantId":"a","exp":{}}}"#, now + 60))
            )),
            tonic::Code::Unauthenticated,
            "token algorithm \"none\" is not accepted",
        ),
        (
            Some(format!(
                "Bearer {}",
                sign(
                    serde_json::json!({"tenantId":"a","exp":now+60}),
                    HS384,
                    secret
                )
            )),
            tonic::Code::Unauthenticated,
            "token algorithm HS384 is not accepted",
        ),
        (
            Some(format!(
                "Bearer {}",
                sign(
                    serde_json::json!({"tenantId":"a","exp":now+60}),
                    HS256,
                    b"wrong-secret-wrong-secret-wrong-secret"
                )
            )),
            tonic::Code::Unauthenticated,
            "invalid signature",
        ),
        (
            Some(format!(
                "Bearer {}",
                sign(
                    serde_json::json!({"tenantId":"a","exp":now-120}),
                    HS256,
                    secret
                )
            )),
            tonic::Code::Unauthenticated,
            "token expired at",
        ),
        (
            Some(format!(
                "Bearer {}",
                sign(serde_json::json!({"tenantId":"a"}), HS256, secret)
            )),
            tonic::Code::Unauthenticated,
            "token has no exp claim",
        ),
        (
            Some(format!(
                "Bearer {}",
                sign(serde_json::json!({"exp":now+60}), HS256, secret)
            )),
            tonic::Code::Unauthenticated,
            "token has no tenant",
        ),
        (
            Some(format!("Bearer {}", token("tenant-a", "events:subscribe"))),
            tonic::Code::PermissionDenied,
            "token lacks scope events:publish",
        ),
    ];
    for (header, code, expected) in cases {
        let mut request = tonic::Request::new(proto::PublishRequest {
            events: vec![draft("cost.updated", "{}")],
        });
        if let Some(h) = &header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("ascii"));
        }
        let status = client.publish(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{expected}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{:?} should contain {expected:?}",
            status.message()
        );
        if let Some(h) = header {
            assert!(
                !status.message().contains(h.trim_start_matches("Bearer ")),
                "token echoed"
            );
        }
        assert!(!status.message().contains(SECRET), "secret leaked");
    }

    let no_sub = subscribe(&mut client, &token("tenant-a", "events:publish"), &[], "")
        .await
        .expect_err("refused");
    assert_eq!(no_sub.code(), tonic::Code::PermissionDenied);
    assert!(
        no_sub
            .message()
            .contains("token lacks scope events:subscribe")
    );
    let no_token = client
        .subscribe(SubscribeRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(no_token.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn publish_stream_acknowledges_every_event_on_its_own() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");

    let messages: Vec<PublishStreamRequest> = (0..100)
        .map(|i| PublishStreamRequest {
            events: Vec::new(),
            event: Some(if i % 10 == 3 {
                draft("Bad.Type", "{}")
            } else {
                draft("agent.health_check", &format!(r#"{{"i":{i}}}"#))
            }),
        })
        .chain(std::iter::once(PublishStreamRequest::default()))
        .collect();
    let acks: Vec<proto::PublishAck> = client
        .publish_stream(authed(tokio_stream::iter(messages), &token))
        .await
        .expect("stream")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("acks");
    assert_eq!(acks.len(), 101);
    let mut accepted = Vec::new();
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.sequence, i as u64);
        match &ack.outcome {
            Some(publish_ack::Outcome::Accepted(r)) => accepted.push(r.id.clone()),
            Some(publish_ack::Outcome::Error(e)) => {
                assert!(i % 10 == 3 || i == 100, "unexpected error at {i}: {e:?}");
                assert_eq!(e.code, "invalid_argument");
                let field = if i == 100 { "event: required" } else { "type:" };
                assert!(e.message.starts_with(field), "{}", e.message);
            }
            None => panic!("ack without outcome"),
        }
    }
    assert_eq!(accepted.len(), 90);
    let got: Vec<String> = sub.take(90).await.into_iter().map(|e| e.id).collect();
    assert_eq!(got, accepted);

    // A stream without a valid token is refused before anything is read.
    let refused = client
        .publish_stream(tokio_stream::iter(Vec::<PublishStreamRequest>::new()))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn health_and_reflection_answer_generic_tools() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };

    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tensorcost.events.v1.EventBroker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tensorcost.events.v1.EventBroker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_the_last_id_sent() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut sub = subscribe(&mut client, &token, &[], "")
        .await
        .expect("subscribe");
    let ids = publish(&mut client, &token, vec![draft("system.ping", "{}")])
        .await
        .expect("publish");
    assert_eq!(sub.next().await.expect("event").id, ids[0].id);
    let stop = tokio::spawn(async move { server.stop().await });
    let status = sub.next().await.expect_err("ended");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status
            .metadata()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok()),
        Some(ids[0].id.as_str())
    );
    tokio::time::timeout(PATIENCE, stop)
        .await
        .expect("stops promptly")
        .expect("stop task");
}

#[tokio::test]
async fn a_subscription_ends_when_its_token_expires() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Expired 28 s ago: still inside the 30 s leeway, so accepted, and the
    // stream must end about 2 s from now.
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"tenantId": "tenant-a", "exp": now - 28}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let mut sub = subscribe(&mut client, &short, &[], "")
        .await
        .expect("subscribe");
    let ids = publish(
        &mut client,
        &full("tenant-a"),
        vec![draft("cost.updated", "{}")],
    )
    .await
    .expect("publish");
    assert_eq!(sub.next().await.expect("event").id, ids[0].id);
    let status = sub.next().await.expect_err("ended at expiry");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().starts_with("token expired"),
        "{}",
        status.message()
    );
    assert_eq!(
        status
            .metadata()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok()),
        Some(ids[0].id.as_str())
    );
}

#[tokio::test]
async fn batches_on_publish_stream_and_subscribe() {
    let server = TestServer::with(|s| s.limits.max_batch = 10).await;
    let mut client = server.client().await;
    let token = full("tenant-a");
    let mut stream = client
        .subscribe(authed(
            SubscribeRequest {
                max_batch: 100,
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("subscribe")
        .into_inner();
    let status = stream.message().await.expect("ok").expect("status");
    assert!(matches!(
        status.message,
        Some(tensorcost_events::proto::subscribe_response::Message::Status(_))
    ));

    let batch = |types: &[&str]| PublishStreamRequest {
        events: types.iter().map(|t| draft(t, "{}")).collect(),
        ..Default::default()
    };
    let messages = vec![
        batch(&["cost.a", "cost.b", "Bad", "cost.c", "cost.d"]),
        batch(&["cost.x"; 11]),
        PublishStreamRequest {
            event: Some(draft("cost.e", "{}")),
            events: vec![draft("cost.f", "{}")],
        },
    ];
    let acks: Vec<proto::PublishAck> = client
        .publish_stream(authed(tokio_stream::iter(messages), &token))
        .await
        .expect("stream")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("acks");
    assert_eq!(acks.len(), 3, "one ack per message");
    let first = &acks[0];
    assert!(first.outcome.is_none());
    assert_eq!(first.outcomes.len(), 5, "one outcome per event");
    let mut accepted = Vec::new();
    for (i, o) in first.outcomes.iter().enumerate() {
        match &o.outcome {
            Some(proto::publish_outcome::Outcome::Accepted(r)) => accepted.push(r.id.clone()),
            Some(proto::publish_outcome::Outcome::Error(e)) => {
                assert_eq!(i, 2);
                assert!(e.message.starts_with("type:"), "{}", e.message);
            }
            None => panic!("empty outcome"),
        }
    }
    assert!(matches!(
        &acks[1].outcome,
        Some(publish_ack::Outcome::Error(e)) if e.message == "events: 11 events is more than the batch limit of 10"
    ));
    assert!(matches!(
        &acks[2].outcome,
        Some(publish_ack::Outcome::Error(e)) if e.message.starts_with("event and events")
    ));

    // The four accepted events arrive in order, batched as they were waiting.
    let mut got = Vec::new();
    while got.len() < 4 {
        let message = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("open");
        match message.message {
            Some(tensorcost_events::proto::subscribe_response::Message::Events(b)) => {
                got.extend(b.events.into_iter().map(|e| e.id));
            }
            other => panic!("with max_batch every event message is a batch: {other:?}"),
        }
    }
    assert_eq!(got, accepted);
}

#[tokio::test]
async fn publish_to_emit_latency_is_measured_for_live_events_not_replays() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let token = full("tenant-latency");
    let count = |text: &str| {
        tensorcost_testkit::broker::metric_value(
            text,
            "tc_publish_to_emit_seconds_count{transport=\"grpc\"}",
        )
    };
    let metrics = async || {
        reqwest::get(format!("{}/metrics", server.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Three events in history, replayed to a subscriber resuming before them.
    let first = publish(&mut client, &token, vec![draft("cost.marker", "{}")])
        .await
        .unwrap();
    publish(
        &mut client,
        &token,
        (0..3)
            .map(|i| draft("cost.updated", &format!("{{\"i\":{i}}}")))
            .collect(),
    )
    .await
    .unwrap();
    let before = count(&metrics().await);
    let mut sub = subscribe(&mut client, &token, &[], &first[0].id)
        .await
        .unwrap();
    assert_eq!(sub.take(3).await.len(), 3);
    assert_eq!(count(&metrics().await), before, "replays are not measured");
    publish(&mut client, &token, vec![draft("cost.updated", "{}")])
        .await
        .unwrap();
    sub.next().await.unwrap();
    let text = metrics().await;
    assert_eq!(count(&text), before + 1.0, "{text}");
    // No per-tenant series anywhere.
    assert!(!text.contains("tenant=\""), "{text}");
}
