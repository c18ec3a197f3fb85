//! Several broker instances sharing Redis, all real processes: delivery
//! across instances, Redis and instance crashes (SIGKILL), Redis Cluster,
//! and stream retention.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, SECRET, authed, draft, full, sio, token_opt};
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{self, PublishRequest, SubscribeRequest, subscribe_response};
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess};
use tensorcost_testkit::{RedisCluster, RedisServer};
use tokio_stream::StreamExt;

type Seen = Arc<Mutex<Vec<proto::Event>>>;

/// Follows a tenant over gRPC on `grpc`, collecting every event.
async fn grpc_follow(grpc: &str, token: &str) -> Seen {
    let seen: Seen = Arc::default();
    let mut client = EventBrokerClient::connect(grpc.to_string())
        .await
        .expect("connect");
    let mut stream = client
        .subscribe(authed(SubscribeRequest::default(), token))
        .await
        .expect("subscribe")
        .into_inner();
    // The status message: the subscription is live.
    let first = stream.next().await.expect("status").expect("ok");
    assert!(matches!(
        first.message,
        Some(subscribe_response::Message::Status(_))
    ));
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Some(subscribe_response::Message::Event(e)) = m.message {
                sink.lock().expect("lock").push(e);
            }
        }
    });
    seen
}

/// Follows a tenant over Socket.IO on `http`, collecting `event` payloads.
async fn sio_follow(http: &str, token: &str) -> Arc<Mutex<Vec<serde_json::Value>>> {
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let mut socket = sio::connect(http, serde_json::json!({ "token": token }))
        .await
        .expect("socket connects");
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(e) = socket.next_event(Duration::from_secs(3600)).await {
            sink.lock().expect("lock").push(e);
        }
    });
    seen
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TYPES: [&str; 3] = ["cost.updated", "alert.created", "instance.state_changed"];

/// Publishes `n` events for `tenant` through `grpc` in batches, round robin
/// over [`TYPES`], with data `{"p":publisher,"i":index}`. Returns the ids.
async fn publish_many(grpc: String, tenant: &str, publisher: usize, n: usize) -> Vec<String> {
    let token = full(tenant);
    let mut client = EventBrokerClient::connect(grpc).await.expect("connect");
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(25) {
        let events = chunk
            .iter()
            .map(|&i| draft(TYPES[i % 3], &format!(r#"{{"p":{publisher},"i":{i}}}"#)))
            .collect();
        let results = client
            .publish(authed(PublishRequest { events }, &token))
            .await
            .expect("publish")
            .into_inner()
            .results;
        ids.extend(results.into_iter().map(|r| r.id));
    }
    ids
}

/// Every id exactly once, and per publisher and type in publish order.
fn assert_exactly_once_in_order(
    name: &str,
    events: &[(String, String, String)],
    expected: &HashSet<String>,
) {
    let ids: Vec<&String> = events.iter().map(|(id, _, _)| id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "{name}: duplicates");
    assert_eq!(
        unique.len(),
        expected.len(),
        "{name}: got {} of {}",
        unique.len(),
        expected.len()
    );
    assert!(
        unique.iter().all(|id| expected.contains(*id)),
        "{name}: foreign ids"
    );
    let mut last: HashMap<(u64, String), i64> = HashMap::new();
    for (_, event_type, data) in events {
        let v: serde_json::Value = serde_json::from_str(data).expect("json");
        let key = (v["p"].as_u64().expect("p"), event_type.clone());
        let i = v["i"].as_i64().expect("i");
        let prev = last.insert(key.clone(), i).unwrap_or(-1);
        assert!(i > prev, "{name}: {key:?} out of order: {i} after {prev}");
    }
}

fn instance_env(redis_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TC_REDIS_URL", redis_url.to_string()),
        ("TC_RATE_LIMIT_PER_TENANT", "1000000".into()),
        ("TC_SUBSCRIBER_BUFFER", "100000".into()),
    ]
}

fn spawn(env: &[(&'static str, String)]) -> BrokerProcess {
    let mut options = BrokerOptions::new(SECRET);
    options.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    BrokerProcess::start(std::path::Path::new(BIN), options).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Three instances: each publishes, and each one's gRPC and Socket.IO
/// subscribers get every event of the tenant exactly once, in order.
async fn cross_instance(redis_url: &str, per_publisher: usize) {
    let env = instance_env(redis_url);
    let instances: Vec<BrokerProcess> = (0..3).map(|_| spawn(&env)).collect();
    // Let each relay warm up and start following.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = full("tenant-x");
    let mut grpc_seen = Vec::new();
    let mut sio_seen = Vec::new();
    for instance in &instances {
        grpc_seen.push(grpc_follow(&instance.grpc, &token).await);
        sio_seen.push(sio_follow(&instance.http, &token).await);
    }
    let other_tenant = grpc_follow(&instances[0].grpc, &full("tenant-other")).await;

    let publishers: Vec<_> = instances
        .iter()
        .enumerate()
        .map(|(p, instance)| {
            tokio::spawn(publish_many(
                instance.grpc.clone(),
                "tenant-x",
                p,
                per_publisher,
            ))
        })
        .collect();
    let mut expected = HashSet::new();
    for p in publishers {
        expected.extend(p.await.expect("publisher"));
    }
    let total = expected.len();
    assert_eq!(total, 3 * per_publisher);

    for (i, seen) in grpc_seen.iter().enumerate() {
        wait_for(
            &format!("gRPC subscriber {i}"),
            Duration::from_secs(30),
            || seen.lock().expect("lock").len() >= total,
        )
        .await;
    }
    for (i, seen) in sio_seen.iter().enumerate() {
        wait_for(
            &format!("Socket.IO client {i}"),
            Duration::from_secs(30),
            || seen.lock().expect("lock").len() >= total,
        )
        .await;
    }
    // Anything extra (a duplicate) would arrive right behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, seen) in grpc_seen.iter().enumerate() {
        let events: Vec<_> = seen
            .lock()
            .expect("lock")
            .iter()
            .map(|e| (e.id.clone(), e.r#type.clone(), e.data.clone()))
            .collect();
        assert_exactly_once_in_order(&format!("gRPC on instance {i}"), &events, &expected);
    }
    for (i, seen) in sio_seen.iter().enumerate() {
        let events: Vec<_> = seen
            .lock()
            .expect("lock")
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().expect("id").to_string(),
                    e["type"].as_str().expect("type").to_string(),
                    e["data"].to_string(),
                )
            })
            .collect();
        assert_exactly_once_in_order(&format!("Socket.IO on instance {i}"), &events, &expected);
    }
    assert!(
        other_tenant.lock().expect("lock").is_empty(),
        "another tenant saw events"
    );
    // Each relay passed over some of its own instance's entries instead of
    // reading them back, and still delivered the others' in between.
    let mut passed = 0.0;
    for instance in &instances {
        passed += instance.metric("tc_redis_own_passed_total").await;
        assert!(instance.metric("tc_redis_written_total").await >= per_publisher as f64);
        assert_eq!(instance.metric("tc_redis_lost_total").await, 0.0);
    }
    assert!(passed > 0.0, "no relay passed over its own entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_one_redis_deliver_everything_once_in_order() {
    let redis = RedisServer::start();
    cross_instance(&redis.url(), 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_a_redis_cluster_of_three_masters() {
    let cluster = RedisCluster::start();
    cross_instance(&cluster.url(), 400).await;
    // The streams really are spread over the masters.
    let holding: usize = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]).parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(holding >= 2, "streams on {holding} of 3 masters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_while_publishing_loses_nothing_in_process_and_catches_up_after() {
    let mut redis = RedisServer::start();
    let env = instance_env(&redis.url());
    let a = spawn(&env);
    let b = spawn(&env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = full("tenant-k");
    let on_a = grpc_follow(&a.grpc, &token).await;
    let on_b = grpc_follow(&b.grpc, &token).await;

    // A steady 200 events/s on instance A for 6 s; Redis dies at 1.5 s and
    // comes back (empty) at 3.5 s.
    let mut client = EventBrokerClient::connect(a.grpc.clone())
        .await
        .expect("connect");
    let start = Instant::now();
    let mut published = Vec::new();
    let mut killed = false;
    let mut restarted = false;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while start.elapsed() < Duration::from_secs(6) {
        tick.tick().await;
        if !killed && start.elapsed() >= Duration::from_millis(1500) {
            redis.kill9();
            killed = true;
        }
        if !restarted && start.elapsed() >= Duration::from_millis(3500) {
            redis.restart();
            restarted = true;
        }
        let i = published.len();
        let r = client
            .publish(authed(
                PublishRequest {
                    events: vec![draft(TYPES[i % 3], &format!(r#"{{"p":0,"i":{i}}}"#))],
                },
                &token,
            ))
            .await
            .expect("publishing never depends on Redis");
        published.push(r.into_inner().results[0].id.clone());
    }
    let expected: HashSet<String> = published.iter().cloned().collect();

    // In process: every event, at once, in order.
    wait_for(
        "instance A's own subscriber",
        Duration::from_secs(5),
        || on_a.lock().expect("lock").len() >= published.len(),
    )
    .await;
    let got_a: Vec<String> = on_a
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(
        got_a, published,
        "in-process delivery is complete and in order"
    );

    // Across instances: the buffered events arrive once Redis is back.
    wait_for("instance B to catch up", Duration::from_secs(30), || {
        on_b.lock().expect("lock").len() >= published.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events: Vec<_> = on_b
        .lock()
        .expect("lock")
        .iter()
        .map(|e| (e.id.clone(), e.r#type.clone(), e.data.clone()))
        .collect();
    assert_exactly_once_in_order("instance B", &events, &expected);
    assert!(
        a.metric("tc_redis_write_errors_total").await > 0.0,
        "the outage was seen"
    );
    assert_eq!(
        a.metric("tc_redis_lost_total").await,
        0.0,
        "within the buffer nothing is lost"
    );
    assert_eq!(
        a.metric("tc_redis_buffered").await,
        0.0,
        "everything written"
    );
    assert_eq!(a.metric("tc_redis_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instances_socket_clients_resume_on_another_and_miss_nothing() {
    let redis = RedisServer::start();
    let env = instance_env(&redis.url());
    let mut a = spawn(&env);
    let b = spawn(&env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = full("tenant-r");

    let mut socket = sio::connect(&a.http, serde_json::json!({ "token": token }))
        .await
        .expect("connect to A");
    // Events are published on B at a steady rate; the client is on A.
    let publisher = {
        let grpc = b.grpc.clone();
        tokio::spawn(async move {
            let token = full("tenant-r");
            let mut client = EventBrokerClient::connect(grpc).await.expect("connect");
            let mut ids = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..300 {
                tick.tick().await;
                let r = client
                    .publish(authed(
                        PublishRequest {
                            events: vec![draft(TYPES[i % 3], &format!(r#"{{"p":0,"i":{i}}}"#))],
                        },
                        &token,
                    ))
                    .await
                    .expect("publish");
                ids.push(r.into_inner().results[0].id.clone());
            }
            ids
        })
    };
    let mut received: Vec<String> = Vec::new();
    while received.len() < 50 {
        let e = socket
            .next_event(Duration::from_secs(10))
            .await
            .expect("events via A");
        received.push(e["id"].as_str().expect("id").to_string());
    }
    a.kill9();
    // Drain what A had already sent, then notice the connection is gone.
    while let Some(e) = socket.next_event(Duration::from_secs(2)).await {
        received.push(e["id"].as_str().expect("id").to_string());
    }
    let last = received.last().expect("some").clone();
    let mut resumed = sio::connect(
        &b.http,
        serde_json::json!({ "token": token, "lastEventId": last }),
    )
    .await
    .expect("reconnect to B");
    assert_eq!(resumed.session["resumed"], true);
    assert_eq!(resumed.session["recovered"], true, "{}", resumed.session);
    let published = publisher.await.expect("publisher");
    let mut all: HashSet<String> = received.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !published.iter().all(|id| all.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "missing {} events",
            published.iter().filter(|id| !all.contains(*id)).count()
        );
        if let Some(e) = resumed.next_event(Duration::from_millis(500)).await {
            all.insert(e["id"].as_str().expect("id").to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_stay_within_their_caps() {
    let redis = RedisServer::start();
    let env = vec![
        ("TC_REDIS_URL", redis.url()),
        ("TC_REDIS_STREAM_MAX_LEN", "500".to_string()),
        ("TC_REDIS_PARTITIONS", "1".to_string()),
    ];
    let instance = spawn(&env);
    let service = token_opt(Some("tenant-t"), "events:publish");
    let mut client = EventBrokerClient::connect(instance.grpc.clone())
        .await
        .expect("connect");
    for chunk in 0..40 {
        let events = (0..250)
            .map(|i| {
                draft(
                    "metrics.collected",
                    &format!(r#"{{"i":{}}}"#, chunk * 250 + i),
                )
            })
            .collect();
        client
            .publish(authed(PublishRequest { events }, &service))
            .await
            .expect("publish");
    }
    let key = "tc:{p0}:ev:metrics.collected";
    wait_for("all 10,000 written", Duration::from_secs(20), || {
        redis
            .cli(&["xinfo", "stream", key])
            .contains("entries-added\n10000")
    })
    .await;
    let len: u64 = redis.cli(&["xlen", key]).parse().expect("xlen");
    // MAXLEN ~ trims whole macro nodes (100 entries by default).
    assert!((500..=600).contains(&len), "count cap: {len} entries");
    drop(instance);

    // The age cap: entries older than it are trimmed (MINID ~, whole nodes).
    let env = vec![
        ("TC_REDIS_URL", redis.url()),
        ("TC_REDIS_STREAM_MAX_AGE", "2s".to_string()),
        ("TC_REDIS_PARTITIONS", "1".to_string()),
    ];
    let instance = spawn(&env);
    let mut client = EventBrokerClient::connect(instance.grpc.clone())
        .await
        .expect("connect");
    let key = "tc:{p0}:ev:metrics.aged";
    for chunk in 0..10 {
        let events = (0..100)
            .map(|i| draft("metrics.aged", &format!(r#"{{"i":{}}}"#, chunk * 100 + i)))
            .collect();
        client
            .publish(authed(PublishRequest { events }, &service))
            .await
            .expect("publish");
    }
    wait_for(
        "1,000 aged entries written",
        Duration::from_secs(10),
        || redis.cli(&["xlen", key]).parse::<u64>().unwrap_or(0) >= 1000,
    )
    .await;
    // Keep the stream growing so old macro nodes are complete and removable.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        client
            .publish(authed(
                PublishRequest {
                    events: vec![draft("metrics.aged", r#"{"late":true}"#)],
                },
                &service,
            ))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let len: u64 = redis.cli(&["xlen", key]).parse().expect("xlen");
    assert!(
        len < 200,
        "age cap: {len} entries left of 1,000 older than 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_writes_what_waited_for_redis_before_exiting() {
    let mut redis = RedisServer::start();
    let env = vec![
        ("TC_REDIS_URL", redis.url()),
        ("TC_REDIS_PARTITIONS", "1".to_string()),
    ];
    let mut instance = spawn(&env);
    let token = token_opt(Some("tenant-s"), "events:publish");
    let mut client = EventBrokerClient::connect(instance.grpc.clone())
        .await
        .expect("connect");
    // Redis goes away; what is published meanwhile waits in the writer.
    redis.kill9();
    let events = (0..20)
        .map(|i| draft("cost.updated", &format!(r#"{{"i":{i}}}"#)))
        .collect();
    client
        .publish(authed(PublishRequest { events }, &token))
        .await
        .expect("publishing never depends on Redis");
    // Let the writer fail and back off for a while, then bring Redis back
    // (empty) and stop the instance at once: the writer must not wait out
    // its backoff, and must not exit before writing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();
    let stopped = Instant::now();
    instance.process.terminate(Duration::from_secs(15));
    let took = stopped.elapsed();
    let key = "tc:{p0}:ev:cost.updated";
    let len: u64 = redis.cli(&["xlen", key]).parse().unwrap_or(0);
    assert_eq!(len, 20, "every waiting event written before exit");
    assert!(
        took < Duration::from_secs(15),
        "exited by itself within the drain and flush bounds ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_is_a_peer_not_an_oracle_poisoned_keys_and_bad_entries_are_skipped() {
    let redis = RedisServer::start();
    // One partition: the poisoned key shares its XREAD with every stream.
    let mut env = instance_env(&redis.url());
    env.push(("TC_REDIS_PARTITIONS", "1".to_string()));
    let a = spawn(&env);
    let b = spawn(&env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = full("tenant-p");
    let on_b = grpc_follow(&b.grpc, &token).await;
    let before = publish_many(a.grpc.clone(), "tenant-p", 0, 30).await;
    wait_for("b relays the first events", Duration::from_secs(10), || {
        on_b.lock().expect("lock").len() >= before.len()
    })
    .await;

    // A key that is not a stream where a stream should be, registered as a
    // type: Redis then answers WRONGTYPE for the whole partition's XREAD.
    assert_eq!(redis.cli(&["set", "tc:{p0}:ev:evil.poison0", "x"]), "OK");
    redis.cli(&["xadd", "tc:{p0}:types", "*", "t", "evil.poison0"]);
    // Entries that no published event could be, in a real stream.
    let valid = r#"{"id":"peer-1","type":"cost.updated","tenant_id":"tenant-p","data":{},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#;
    let stream = "tc:{p0}:ev:cost.updated";
    for bad in [
        valid.replace(r#""type":"cost.updated""#, r#""type":"NOT A TYPE""#),
        valid.replace(r#""id":"peer-1""#, r#""id":"../../x y""#),
        valid.replace(r#""tenant_id":"tenant-p""#, r#""tenant_id":"""#),
        "not json".to_string(),
    ] {
        redis.cli(&["xadd", stream, "*", "o", "elsewhere", "e", &bad]);
    }
    redis.cli(&["xadd", stream, "*", "o", "elsewhere", "e", valid]);

    // The rest of the partition keeps relaying.
    let after = publish_many(a.grpc.clone(), "tenant-p", 1, 30).await;
    wait_for("b relays past the poison", Duration::from_secs(10), || {
        let seen = on_b.lock().expect("lock");
        after.iter().all(|id| seen.iter().any(|e| &e.id == id))
    })
    .await;
    let seen: Vec<proto::Event> = on_b.lock().expect("lock").clone();
    assert!(
        seen.iter().any(|e| e.id == "peer-1"),
        "the valid entry written by hand is relayed"
    );
    for e in &seen {
        assert!(
            e.r#type != "NOT A TYPE" && e.id != "../../x y" && !e.tenant_id.is_empty(),
            "an invalid entry reached a subscriber: {e:?}"
        );
    }
    assert_eq!(b.metric("tc_redis_skipped_keys_total").await, 1.0);
    assert_eq!(b.metric("tc_redis_invalid_total").await, 4.0);
    let readyz = reqwest::get(format!("http://{}/readyz", b.http))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("text");
    let readyz: serde_json::Value = serde_json::from_str(&readyz).expect("json");
    assert_eq!(readyz["redis"]["state"], "up", "{readyz}");
    assert_eq!(
        readyz["redis"]["relays_failing"],
        serde_json::json!([]),
        "{readyz}"
    );
}

/// `cost.summary` over MCP (a JSON-RPC `tools/call` to the stateless
/// `/mcp`), asked until its total reaches `want` or 10 s pass.
/// One MCP tool call through an instance's `/mcp`: its structured answer.
async fn mcp_tool(
    http: &str,
    token: &str,
    name: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    let call = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": name, "arguments": args}
    });
    let text = reqwest::Client::new()
        .post(format!("http://{http}/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(call.to_string())
        .send()
        .await
        .expect("MCP request")
        .text()
        .await
        .expect("MCP answer");
    let answer: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("MCP answer is not JSON ({e}): {text}"));
    let structured = answer["result"]["structuredContent"].clone();
    assert!(structured.is_object(), "no structured answer: {answer}");
    structured
}

async fn cost_summary(http: &str, token: &str, want: f64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut summary = mcp_tool(
            http,
            token,
            "cost.summary",
            serde_json::json!({"window": "30d"}),
        )
        .await;
        if summary["total_usd"].as_f64() >= Some(want) || Instant::now() > deadline {
            // The window's ends move with the time of asking.
            if let Some(o) = summary.as_object_mut() {
                o.remove("to");
                o.remove("from");
            }
            return summary;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every instance sees every event, so every instance's MCP figures are the
/// same, including costs published through another; and the figures are
/// restored from Redis after every instance restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_answer_cost_summary_alike_and_after_both_restart() {
    let redis = RedisServer::start();
    let env = instance_env(&redis.url());
    let (mut a, mut b) = (spawn(&env), spawn(&env));
    let tenant = "tenant-mcp";
    let publisher = token_opt(Some(tenant), "events:publish");
    let reader = token_opt(Some(tenant), "cost:read");
    for (instance, costs) in [
        (&a, vec![("bedrock", "1.5", "ml"), ("aws", "2.25", "web")]),
        (&b, vec![("bedrock", "0.25", "ml")]),
    ] {
        let mut client = EventBrokerClient::connect(instance.grpc.clone())
            .await
            .expect("connect");
        let events = costs
            .iter()
            .map(|(source, usd, team)| {
                draft(
                    "cost.updated",
                    &format!(
                        r#"{{"source":"{source}","amount_usd":{usd},"tags":{{"team":"{team}"}}}}"#
                    ),
                )
            })
            .collect();
        client
            .publish(authed(PublishRequest { events }, &publisher))
            .await
            .expect("publish");
    }
    let on_a = cost_summary(&a.http, &reader, 4.0).await;
    let on_b = cost_summary(&b.http, &reader, 4.0).await;
    assert_eq!(on_a["total_usd"], 4.0, "{on_a}");
    assert_eq!(on_a["by_source"][1]["source"], "bedrock", "{on_a}");
    assert_eq!(on_a["by_source"][1]["usd"], 1.75, "{on_a}");
    assert_eq!(on_a, on_b, "both instances answer alike");
    // Another tenant sees none of it, on either instance.
    let other = token_opt(Some("tenant-other"), "cost:read");
    assert_eq!(cost_summary(&b.http, &other, 0.0).await["total_usd"], 0.0);

    a.process.terminate(Duration::from_secs(15));
    b.process.terminate(Duration::from_secs(15));
    let (a, b) = (spawn(&env), spawn(&env));
    assert_eq!(
        cost_summary(&a.http, &reader, 4.0).await,
        on_a,
        "after a restart"
    );
    assert_eq!(
        cost_summary(&b.http, &reader, 4.0).await,
        on_a,
        "after a restart"
    );
}

/// `agent.cost` through one instance's `/mcp`: the agent's presence entry,
/// asked again until its status is `want`.
async fn agent_presence(http: &str, token: &str, want: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let costs = mcp_tool(
            http,
            token,
            "agent.cost",
            serde_json::json!({"agent_id": "gpu-9"}),
        )
        .await;
        let presence = costs["presence"][0].clone();
        if presence["status"] == want || Instant::now() > deadline {
            return presence;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent with a stream on each of two instances is connected, on both
/// instances' answers, until both streams have ended: each instance
/// announces its own, and the projections count instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_on_two_instances_is_connected_until_both_streams_end() {
    let redis = RedisServer::start();
    let env = instance_env(&redis.url());
    let (a, b) = (spawn(&env), spawn(&env));
    let tenant = "tenant-agents";
    let now = tensorcost_testkit::token::unix_now();
    let agent = tensorcost_testkit::token::sign(
        SECRET,
        &serde_json::json!({
            "tenantId": tenant, "scope": "events:subscribe", "agent_id": "gpu-9",
            "iat": now, "exp": now + 600,
        }),
    );
    let reader = token_opt(Some(tenant), "agent:read");
    let open = |grpc: String, agent: String| async move {
        let mut client = EventBrokerClient::connect(grpc).await.expect("connect");
        let mut stream = client
            .subscribe(authed(SubscribeRequest::default(), &agent))
            .await
            .expect("subscribe")
            .into_inner();
        stream.next().await.expect("status").expect("status");
        stream
    };
    let on_a = open(a.grpc.clone(), agent.clone()).await;
    let on_b = open(b.grpc.clone(), agent.clone()).await;
    let both = agent_presence(&b.http, &reader, "connected").await;
    assert_eq!(both["status"], "connected", "{both}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = both.clone();
    while seen["instances"].as_array().map_or(0, Vec::len) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = agent_presence(&a.http, &reader, "connected").await;
    }
    assert_eq!(
        seen["instances"].as_array().map(Vec::len),
        Some(2),
        "{seen}"
    );

    drop(on_a);
    // A's disconnection arrives; B's stream keeps the agent connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after_a = seen.clone();
    while after_a["instances"].as_array().map_or(0, Vec::len) != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after_a = agent_presence(&b.http, &reader, "connected").await;
    }
    assert_eq!(after_a["status"], "connected", "{after_a}");
    assert_eq!(
        after_a["instances"].as_array().map(Vec::len),
        Some(1),
        "{after_a}"
    );
    assert_eq!(after_a["disconnect_reason"], "closed", "{after_a}");

    drop(on_b);
    for http in [&a.http, &b.http] {
        let gone = agent_presence(http, &reader, "disconnected").await;
        assert_eq!(gone["status"], "disconnected", "{gone}");
        assert_eq!(gone["instances"], serde_json::json!([]), "{gone}");
    }
}

/// A policy on two instances sharing Redis: every instance counts every
/// event, one (the lease holder) fires; each breach fires once across
/// both. Killing the acting instance mid-window: the other takes the lease
/// over and fires for the breach, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_fire_each_breach_once_and_survive_the_acting_ones_death() {
    let redis = RedisServer::start();
    let mut env = instance_env(&redis.url());
    env.push(("TC_POLICY_LEASE", "2s".into()));
    let mut instances = [spawn(&env), spawn(&env)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tenant = "tenant-policies";
    let writer = common::token(tenant, "enforcement:write events:publish events:subscribe");
    let policy = serde_json::json!({
        "id": "loops",
        "name": "Agents that loop",
        "match": {"types": ["agent.*"]},
        "subject": "agent_id",
        "condition": {"measure": "count", "window": "10m", "threshold": 6},
        "action": {"kind": "pause", "cooldown": "10m", "resolve_after": "1m"},
    });
    let created = reqwest::Client::new()
        .put(format!("http://{}/v1/policies/loops", instances[0].http))
        .bearer_auth(&writer)
        .header("content-type", "application/json")
        .body(policy.to_string())
        .send()
        .await
        .expect("PUT");
    assert_eq!(
        created.status(),
        201,
        "{}",
        created.text().await.unwrap_or_default()
    );
    let watch: Vec<Seen> = vec![
        grpc_follow(&instances[0].grpc, &full(tenant)).await,
        grpc_follow(&instances[1].grpc, &full(tenant)).await,
    ];
    // The other instance learns the policy from policy.created.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let detected = |seen: &Seen, subject: &str| -> Vec<serde_json::Value> {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|e| e.r#type == "runaway_loop.detected")
            .map(|e| serde_json::from_str::<serde_json::Value>(&e.data).expect("json"))
            .filter(|d| d["subject"] == subject)
            .collect()
    };
    let breach = |grpc: String, agent: &'static str, n: usize| {
        let token = full(tenant);
        async move {
            let mut client = EventBrokerClient::connect(grpc).await.expect("connect");
            for _ in 0..n {
                client
                    .publish(authed(
                        PublishRequest {
                            events: vec![draft(
                                "agent.error",
                                &format!(r#"{{"agent_id":"{agent}"}}"#),
                            )],
                        },
                        &token,
                    ))
                    .await
                    .expect("publish");
            }
        }
    };
    // Three events through each instance: one breach of six.
    breach(instances[0].grpc.clone(), "x", 3).await;
    breach(instances[1].grpc.clone(), "x", 3).await;
    for (i, seen) in watch.iter().enumerate() {
        wait_for(
            &format!("detected on instance {i}"),
            Duration::from_secs(15),
            || !detected(seen, "x").is_empty(),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, seen) in watch.iter().enumerate() {
        assert_eq!(
            detected(seen, "x").len(),
            1,
            "instance {i}: one firing for one breach"
        );
    }
    // The instance that acted.
    let acting_instance = detected(&watch[0], "x")[0]["instance"]
        .as_str()
        .expect("instance")
        .to_string();
    let mut acting = None;
    for (i, instance) in instances.iter().enumerate() {
        if instance.metric("tc_policy_acting").await == 1.0 {
            acting = Some(i);
        }
    }
    let acting = acting.expect("one instance acts");
    let survivor = 1 - acting;
    // Mid-window: five of y's six events, then the acting instance dies,
    // then the sixth, through the survivor.
    breach(instances[survivor].grpc.clone(), "y", 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    instances[acting].kill9();
    breach(instances[survivor].grpc.clone(), "y", 1).await;
    wait_for("the survivor fires for y", Duration::from_secs(20), || {
        !detected(&watch[survivor], "y").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let y = detected(&watch[survivor], "y");
    assert_eq!(y.len(), 1, "{y:?}");
    assert_ne!(
        y[0]["instance"],
        acting_instance.as_str(),
        "the survivor fired"
    );
    assert_eq!(y[0]["value"], 6.0);
    assert_eq!(
        detected(&watch[survivor], "x").len(),
        1,
        "x did not fire again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_changes_are_kept_in_redis_and_seen_by_every_instance() {
    let redis = RedisServer::start();
    let mut env = instance_env(&redis.url());
    env.push(("TC_RATE_LIMITS_REFRESH", "200ms".into()));
    let instances = [spawn(&env), spawn(&env)];
    let admin = common::token_opt(None, "admin events:all_tenants");
    let http = reqwest::Client::new();
    let call =
        async |method: reqwest::Method, at: &str, path: &str, body: Option<serde_json::Value>| {
            let mut request = http
                .request(method, format!("http://{at}{path}"))
                .bearer_auth(&admin);
            if let Some(body) = body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let response = request.send().await.expect("admin call");
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            (status, body)
        };
    let path = "/v1/admin/tenants/tenant-enterprise/rate-limit";
    let (status, body) = call(
        reqwest::Method::PUT,
        &instances[0].http,
        path,
        Some(serde_json::json!({"events_per_second": 25000})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Where operators already kept them: the hash tc:ratelimits.
    assert_eq!(
        redis
            .cli(&["HGET", "tc:ratelimits", "tenant-enterprise"])
            .trim(),
        "25000"
    );
    // The other instance reads it at its next refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = call(reqwest::Method::GET, &instances[1].http, path, None).await;
        if body["events_per_second"] == 25000 && body["source"] == "override" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "instance 2 still says {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = call(reqwest::Method::DELETE, &instances[1].http, path, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        redis
            .cli(&["HEXISTS", "tc:ratelimits", "tenant-enterprise"])
            .trim(),
        "0"
    );

    let member = "/v1/admin/memberships/0f9c2c1e-user";
    let (status, body) = call(
        reqwest::Method::PUT,
        &instances[0].http,
        member,
        Some(serde_json::json!({"tenants": ["tenant-a", "tenant-b"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        redis
            .cli(&["HGET", "tc:memberships", "0f9c2c1e-user"])
            .trim(),
        r#"["tenant-a","tenant-b"]"#
    );
    let (_, body) = call(reqwest::Method::GET, &instances[1].http, member, None).await;
    assert_eq!(body["tenants"], serde_json::json!(["tenant-a", "tenant-b"]));
}
