//! Webhooks against the real binary and real HTTP receivers: delivery and
//! retries, Retry-After, 410, outages, kill -9 with the embedded store and
//! with Redis, three instances on one Redis, the destination guard,
//! redirects, tenant isolation, replay and the limits.
//!
//! Signatures are verified here with the receiver's own HMAC (from
//! aws-lc-rs, as any receiver would); `tests/python/test_webhooks.py`
//! verifies them with Stripe's library and `tests/js/webhooks.test.mjs`
//! with Node's crypto.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess};
use tensorcost_testkit::redis::RedisServer;
use tensorcost_testkit::token;

const BIN: &str = env!("CARGO_BIN_EXE_tensorcost-events");
const SECRET: &str = common::SECRET;
const PATIENCE: Duration = Duration::from_secs(15);

// ---- a real HTTP receiver ----------------------------------------------

/// What a receiver answers: a status, optional headers, optional delay.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

fn status(code: u16) -> Answer {
    Answer {
        status: code,
        headers: Vec::new(),
        delay: Duration::ZERO,
    }
}

/// A 200 after `delay`.
fn slow(delay: Duration) -> Answer {
    Answer {
        delay,
        ..status(200)
    }
}

#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Default)]
struct ReceiverState {
    script: VecDeque<Answer>,
    default: Option<Answer>,
    got: Vec<Received>,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut s = state.lock().unwrap();
        s.got.push(Received {
            headers,
            body,
            at: Instant::now(),
        });
        let default = s.default.clone().unwrap_or(status(200));
        s.script.pop_front().unwrap_or(default)
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let mut response = StatusCode::from_u16(answer.status).unwrap().into_response();
    for (k, v) in answer.headers {
        response.headers_mut().insert(k, v.parse().unwrap());
    }
    response
}

impl Receiver {
    async fn start() -> Self {
        Self::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    async fn on(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        // Serves until the test's runtime ends.
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    fn answer_by_default(&self, answer: Answer) {
        self.state.lock().unwrap().default = Some(answer);
    }

    fn got(&self) -> Vec<Received> {
        self.state.lock().unwrap().got.clone()
    }

    /// Waits until `n` requests have arrived.
    async fn wait_for(&self, n: usize, patience: Duration) -> Vec<Received> {
        let deadline = Instant::now() + patience;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver got {} of {n} requests in {patience:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---- the broker's REST API ---------------------------------------------

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn of(b: &BrokerProcess) -> Self {
        Self {
            base: format!("http://{}", b.http),
            client: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn create(&self, token: &str, url: &str, types: &[&str]) -> Value {
        let (code, body) = self
            .call(
                "POST",
                "/v1/webhooks",
                Some(token),
                Some(json!({"url": url, "types": types})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        body
    }

    async fn publish(&self, token: &str, event_type: &str, data: Value) -> String {
        self.publish_raw(token, event_type, &data.to_string()).await
    }

    /// `data` as exact JSON text.
    async fn publish_raw(&self, token: &str, event_type: &str, data: &str) -> String {
        let body = format!("{{\"type\":\"{event_type}\",\"data\":{data}}}");
        let resp = self
            .client
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("publish");
        assert_eq!(resp.status().as_u16(), 200);
        let reply: Value = serde_json::from_str(&resp.text().await.unwrap()).expect("JSON");
        reply["results"][0]["id"].as_str().unwrap().to_string()
    }

    /// The attempts listed once there are `n` of them (each is recorded
    /// just after its answer arrives).
    async fn deliveries_when(&self, token: &str, id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let list = self.deliveries(token, id, "").await;
            if list.len() >= n || Instant::now() > deadline {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn deliveries(&self, token: &str, id: &str, query: &str) -> Vec<Value> {
        let (code, body) = self
            .call(
                "GET",
                &format!("/v1/webhooks/{id}/deliveries{query}"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(code, 200, "{body}");
        body["deliveries"].as_array().unwrap().clone()
    }
}

fn admin(tenant: &str) -> String {
    token::mint(
        SECRET,
        Some(tenant),
        "integration:write events:publish events:subscribe",
        "admin",
        Duration::from_secs(3600),
    )
}

fn start(env: &[(&str, &str)]) -> BrokerProcess {
    let mut options = BrokerOptions::new(SECRET).env("TC_WEBHOOK_ALLOW_HOSTS", "127.0.0.1");
    for (k, v) in env {
        options = options.env(k, *v);
    }
    BrokerProcess::start(Path::new(BIN), options).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One delivery answered at once: the endpoint claims ahead from then on.
async fn warm_up(api: &Api, token: &str, receiver: &Receiver) {
    api.publish(token, "cost.updated", json!({"warm": true}))
        .await;
    receiver.wait_for(1, PATIENCE).await;
}

/// Checks `t=…,v1=…` against `secret` with a receiver's own HMAC.
fn verifies(received: &Received, secret: &str) -> bool {
    use aws_lc_rs::hmac;
    let header = received.header("x-tensorcost-signature");
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => sigs.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&received.body);
    let expected: String = hmac::sign(&key, &message)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sigs.contains(&expected)
}

// ---- tests -----------------------------------------------------------------

#[tokio::test]
async fn delivers_signed_events_a_receiver_can_verify() {
    let receiver = Receiver::start().await;
    let b = start(&[]);
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api
        .create(&t, &receiver.url("/hook"), &["cost.*", "alert.created"])
        .await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    // Types the endpoint does not want are not delivered.
    api.publish(&t, "instance.created", json!({})).await;
    let id = api
        .publish_raw(
            &t,
            "cost.updated",
            r#"{"usd":1.50,"n":12345678901234567890123}"#,
        )
        .await;
    let got = receiver.wait_for(1, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 1, "only the wanted type");
    let r = &got[0];
    assert!(
        verifies(r, &secret),
        "signature verifies: {}",
        r.header("x-tensorcost-signature")
    );
    assert!(!verifies(r, "whsec_wrong"));
    let body = r.json();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["type"], "cost.updated");
    assert_eq!(body["tenant_id"], "acme");
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("\"usd\":1.50") && text.contains("12345678901234567890123"),
        "{text}"
    );
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.header("user-agent").starts_with("tensorcost-events/"));
    assert_eq!(r.header("x-tensorcost-event-id"), id);
    // The secret is never shown again.
    let (_, list) = api.call("GET", "/v1/webhooks", Some(&t), None).await;
    assert!(!list.to_string().contains("whsec_"), "{list}");
    let (_, one) = api
        .call(
            "GET",
            &format!("/v1/webhooks/{}", hook["id"].as_str().unwrap()),
            Some(&t),
            None,
        )
        .await;
    assert!(!one.to_string().contains("whsec_"), "{one}");
    assert!(!b.stderr().contains(&secret), "secret in the log");
}

#[tokio::test]
async fn retries_on_the_schedule_honours_retry_after_and_410_disables() {
    let receiver = Receiver::start().await;
    let watcher = Receiver::start().await;
    let b = start(&[("TC_WEBHOOK_RETRY_SCHEDULE", "200ms,200ms,3s")]);
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api.create(&t, &receiver.url("/hook"), &["cost.*"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    // A second endpoint hears about disabling.
    api.create(&t, &watcher.url("/sys"), &["system.*"]).await;

    // 500, 500, then 200: three attempts of the same event.
    receiver.script([status(500), status(500), status(200)]);
    let event = api.publish(&t, "cost.updated", json!({"n": 1})).await;
    let got = receiver.wait_for(3, PATIENCE).await;
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.header("x-tensorcost-event-id"), event);
        assert_eq!(
            r.header("x-tensorcost-delivery-attempt"),
            (i + 1).to_string()
        );
    }
    // Each attempt is recorded once its answer is in.
    let list = api.deliveries_when(&t, &id, 3).await;
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0]["status"], "succeeded");
    assert_eq!(list[1]["status_code"], 500);
    assert!(list[1]["next_attempt_at"].is_string());
    let failed = api.deliveries(&t, &id, "?status=failed&limit=1").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["status"], "failed");

    // 503 with Retry-After: 2 waits 2 s, not the 200 ms of the schedule.
    let mut busy = status(503);
    busy.headers.push(("retry-after", "2".into()));
    receiver.script([busy]);
    api.publish(&t, "cost.updated", json!({"n": 2})).await;
    let got = receiver.wait_for(5, PATIENCE).await;
    let gap = got[4].at - got[3].at;
    assert!(
        gap >= Duration::from_millis(1800),
        "Retry-After honoured: {gap:?}"
    );

    // 410 disables the endpoint at once and stops attempts.
    receiver.script([status(410)]);
    api.publish(&t, "cost.updated", json!({"n": 3})).await;
    receiver.wait_for(6, PATIENCE).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, e) = api
            .call("GET", &format!("/v1/webhooks/{id}"), Some(&t), None)
            .await;
        if e["enabled"] == false {
            assert!(
                e["disabled_reason"].as_str().unwrap().contains("410"),
                "{e}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not disabled: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.publish(&t, "cost.updated", json!({"n": 4})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.got().len(), 6, "no attempt after 410");
    let sys = watcher.wait_for(1, PATIENCE).await;
    let notice = sys[0].json();
    assert_eq!(notice["type"], "system.webhook_disabled");
    assert_eq!(notice["data"]["webhook_id"], id.as_str());
    // Given up and replayable: enable it again and replay the event.
    let (code, _) = api
        .call(
            "PATCH",
            &format!("/v1/webhooks/{id}"),
            Some(&t),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(code, 200);
    let list = api.deliveries(&t, &id, "?limit=1").await;
    let gone_event = list[0]["event_id"].as_str().unwrap().to_string();
    let (code, body) = api
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/replay"),
            Some(&t),
            Some(json!({"event_id": gone_event})),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let got = receiver.wait_for(7, PATIENCE).await;
    assert_eq!(got[6].header("x-tensorcost-event-id"), gone_event);
}

#[tokio::test]
async fn exhausted_deliveries_stay_listed_and_replayable() {
    let receiver = Receiver::start().await;
    receiver.answer_by_default(status(500));
    let b = start(&[("TC_WEBHOOK_RETRY_SCHEDULE", "100ms,100ms")]);
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api.create(&t, &receiver.url("/x"), &["*"]).await;
    let id = hook["id"].as_str().unwrap();
    let event = api.publish(&t, "cost.updated", json!({})).await;
    receiver.wait_for(3, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.got().len(),
        3,
        "1 attempt + 2 retries, then given up"
    );
    let list = api.deliveries(&t, id, "").await;
    assert!(
        list[0]["error"].as_str().unwrap().contains("HTTP 500"),
        "{list:?}"
    );
    assert!(list[0]["next_attempt_at"].is_null());
    receiver.answer_by_default(status(204));
    let (code, body) = api
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/replay"),
            Some(&t),
            Some(json!({"event_id": event})),
        )
        .await;
    assert_eq!((code, body["replayed"].as_u64()), (202, Some(1)), "{body}");
    let got = receiver.wait_for(4, PATIENCE).await;
    assert_eq!(got[3].header("x-tensorcost-event-id"), event);
    // Replay since: everything history holds after an event.
    api.publish(&t, "cost.updated", json!({"k": 1})).await;
    api.publish(&t, "alert.created", json!({"k": 2})).await;
    receiver.wait_for(6, PATIENCE).await;
    let (code, body) = api
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/replay"),
            Some(&t),
            Some(json!({"since": event})),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    assert!(body["replayed"].as_u64().unwrap() >= 2, "{body}");
    let (code, body) = api
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/replay"),
            Some(&t),
            Some(json!({"event_id": "nope"})),
        )
        .await;
    assert_eq!(code, 404, "{body}");
}

#[tokio::test]
async fn a_receiver_down_for_a_while_loses_nothing() {
    // Reserve a port, then leave it closed: connections are refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let b = start(&[(
        "TC_WEBHOOK_RETRY_SCHEDULE",
        "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms",
    )]);
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api
        .create(&t, &format!("http://{addr}/hook"), &["cost.*"])
        .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(api.publish(&t, "cost.updated", json!({"i": i})).await);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let failed = api
        .deliveries(&t, hook["id"].as_str().unwrap(), "?status=failed")
        .await;
    assert!(!failed.is_empty());
    assert!(
        failed[0]["error"].as_str().unwrap().contains("connect"),
        "{failed:?}"
    );
    let receiver = Receiver::on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let got = receiver.wait_for(20, PATIENCE).await;
    let mut seen: Vec<String> = got
        .iter()
        .map(|r| r.header("x-tensorcost-event-id"))
        .collect();
    seen.sort();
    seen.dedup();
    ids.sort();
    assert_eq!(seen, ids, "every event, once the receiver is back");
}

/// Publishes while the receiver is down, kills the broker with SIGKILL,
/// restarts it on the same state, and expects every delivery.
async fn survives_kill9(env: Vec<(String, String)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut b = start(&env_ref);
    let api = Api::of(&b);
    let t = admin("acme");
    api.create(&t, &format!("http://{addr}/hook"), &["cost.*"])
        .await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(api.publish(&t, "cost.updated", json!({"i": i})).await);
    }
    // The writer's commit interval is milliseconds; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.kill9();
    let receiver = Receiver::on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let _b2 = start(&env_ref);
    let got = receiver.wait_for(10, Duration::from_secs(30)).await;
    let mut seen: Vec<String> = got
        .iter()
        .map(|r| r.header("x-tensorcost-event-id"))
        .collect();
    seen.sort();
    seen.dedup();
    ids.sort();
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn pending_deliveries_survive_kill9_with_the_embedded_store() {
    let dir = tensorcost_testkit::process::Scratch::new("wh-state").unwrap();
    let data: PathBuf = dir.join("data");
    survives_kill9(vec![
        ("TC_DATA_DIR".into(), data.display().to_string()),
        (
            "TC_WEBHOOK_RETRY_SCHEDULE".into(),
            "500ms,500ms,500ms,500ms,500ms,500ms".into(),
        ),
    ])
    .await;
}

#[tokio::test]
async fn pending_deliveries_survive_kill9_with_redis() {
    let redis = RedisServer::start();
    survives_kill9(vec![
        ("TC_REDIS_URL".into(), redis.url()),
        (
            "TC_WEBHOOK_RETRY_SCHEDULE".into(),
            "500ms,500ms,500ms,500ms,500ms,500ms".into(),
        ),
        // The killed instance's leased jobs come back when the lease ends.
        ("TC_WEBHOOK_TIMEOUT".into(), "1s".into()),
    ])
    .await;
}

/// An endpoint whose receiver answers quickly claims deliveries ahead; when
/// the receiver slows down and the instance is stopped (SIGTERM), what it
/// claimed and had not attempted goes back to the queue at once, not when
/// the leases end (35 s with the default timeout).
#[tokio::test]
async fn a_stopped_instance_gives_back_the_deliveries_it_claimed_ahead() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = [("TC_REDIS_URL", url.as_str())];
    let mut b = start(&env);
    let receiver = Receiver::start().await;
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api.create(&t, &receiver.url("/a"), &["cost.*"]).await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    // A quick answer: the endpoint claims ahead from now on.
    warm_up(&api, &t, &receiver).await;
    receiver.answer_by_default(slow(Duration::from_secs(2)));
    let mut ids = Vec::new();
    let claimed_by = Instant::now();
    for i in 0..40 {
        ids.push(api.publish(&t, "cost.updated", json!({"i": i})).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Leased: scored at the lease's end (about 35 s ahead), not due.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let queue = format!("tc:{{tc-state}}:q:{hook_id}");
    let leased: usize = redis
        .cli(&["ZCOUNT", &queue, &format!("({}", now_ms + 20_000), "+inf"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        leased > 8,
        "more jobs leased than the 4 in flight (claimed ahead): {leased}"
    );
    // The receiver (on this runtime) must answer while the broker stops.
    tokio::task::spawn_blocking(move || b.process.terminate(Duration::from_secs(20)))
        .await
        .unwrap();
    receiver.answer_by_default(status(200));
    let _b2 = start(&env);
    // Well before the leases taken while publishing end (35 s).
    let deadline = claimed_by + Duration::from_secs(25);
    loop {
        let got = receiver.got();
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !got.iter()
                    .any(|r| r.header("x-tensorcost-event-id") == **id)
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} deliveries claimed by the stopped instance were not given back: {missing:?}",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jobs claimed ahead that wait so long that their attempt could outlast
/// the lease are left alone: another instance claims them when the lease
/// ends, and no event is delivered twice.
#[tokio::test]
async fn jobs_claimed_ahead_past_their_lease_are_left_to_another_instance() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Lease 2 × 3 s + 5 s = 11 s; a claimed job is left alone after 7 s.
    let env = [("TC_REDIS_URL", url.as_str()), ("TC_WEBHOOK_TIMEOUT", "3s")];
    let a = start(&env);
    let receiver = Receiver::start().await;
    let api = Api::of(&a);
    let t = admin("acme");
    api.create(&t, &receiver.url("/a"), &["cost.*"]).await;
    let _b = start(&env);
    // Both instances know the endpoint; a quick answer makes it fast here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    warm_up(&api, &t, &receiver).await;
    // Then 1 s per answer: 4 at a time per instance, the rest waits.
    receiver.answer_by_default(slow(Duration::from_secs(1)));
    let mut ids = Vec::new();
    // More than one instance delivers before the leases end (about 44).
    for i in 0..80 {
        ids.push(api.publish(&t, "cost.updated", json!({"i": i})).await);
    }
    receiver.wait_for(81, Duration::from_secs(60)).await;
    // Late duplicates would come after the last first delivery.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got: Vec<String> = receiver.got()[1..]
        .iter()
        .map(|r| r.header("x-tensorcost-event-id"))
        .collect();
    assert!(got.len() >= ids.len(), "{} of {}", got.len(), ids.len());
    let mut seen = got.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        got.len(),
        "an event was delivered twice: {} deliveries of {} events",
        got.len(),
        seen.len()
    );
    ids.sort();
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn three_instances_deliver_each_event_once_and_take_over_a_dead_ones_work() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = [("TC_REDIS_URL", url.as_str()), ("TC_WEBHOOK_TIMEOUT", "1s")];
    let mut brokers: Vec<BrokerProcess> = (0..3).map(|_| start(&env)).collect();
    let receiver = Receiver::start().await;
    let t = admin("acme");
    let api0 = Api::of(&brokers[0]);
    api0.create(&t, &receiver.url("/a"), &["cost.*"]).await;
    // Every instance learns of the endpoint within its refresh (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let api = Api::of(&brokers[i % 3]);
        ids.push(api.publish(&t, "cost.updated", json!({"i": i})).await);
    }
    receiver.wait_for(30, PATIENCE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.got();
    assert_eq!(got.len(), 30, "each event once, not once per instance");

    // Instances die holding deliveries in flight: a new one finishes them.
    brokers[0].kill9();
    receiver.answer_by_default(slow(Duration::from_secs(3)));
    let api1 = Api::of(&brokers[1]);
    let mut late = Vec::new();
    for i in 0..4 {
        late.push(api1.publish(&t, "cost.updated", json!({"late": i})).await);
    }
    // Claimed by instance 1 or 2, and in flight (the receiver is slow);
    // every late event written as a delivery (the enqueuer's commit takes
    // milliseconds: an event accepted within them of a SIGKILL is lost to
    // webhooks, as docs/webhooks.md says).
    receiver.wait_for(31, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    brokers[1].kill9();
    brokers[2].kill9();
    receiver.answer_by_default(status(200));
    let before = receiver.got().len();
    let fresh = start(&env);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = receiver.got();
        let done = late.iter().all(|id| {
            got[before..]
                .iter()
                .any(|r| r.header("x-tensorcost-event-id") == *id)
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead instances' deliveries were not taken over: late {late:?}, got {:?}: {}",
            got[before..]
                .iter()
                .map(|r| r.header("x-tensorcost-event-id"))
                .collect::<Vec<_>>(),
            fresh.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(brokers);
}

#[tokio::test]
async fn the_destination_guard_refuses_private_addresses_and_redirects_are_not_followed() {
    let receiver = Receiver::start().await;
    // No allow-list: loopback and metadata addresses are refused.
    let b = BrokerProcess::start(Path::new(BIN), BrokerOptions::new(SECRET)).unwrap();
    let api = Api::of(&b);
    let t = admin("acme");
    for url in [
        receiver.url("/x"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]:80/".to_string(),
        "http://localhost:9/".to_string(),
    ] {
        let (code, body) = api
            .call(
                "POST",
                "/v1/webhooks",
                Some(&t),
                Some(json!({"url": url, "types": ["*"]})),
            )
            .await;
        assert_eq!(code, 400, "{url}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("destination refused"),
            "{body}"
        );
    }
    drop(b);
    // With the allow-list: a redirect to another receiver is not followed.
    let other = Receiver::start().await;
    receiver.answer_by_default(Answer {
        status: 302,
        headers: vec![("location", other.url("/stolen"))],
        delay: Duration::ZERO,
    });
    let b = start(&[("TC_WEBHOOK_RETRY_SCHEDULE", "10s")]);
    let api = Api::of(&b);
    let hook = api.create(&t, &receiver.url("/x"), &["*"]).await;
    api.publish(&t, "cost.updated", json!({})).await;
    receiver.wait_for(1, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(other.got().is_empty(), "redirect followed");
    let list = api.deliveries(&t, hook["id"].as_str().unwrap(), "").await;
    assert!(
        list[0]["error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed"),
        "{list:?}"
    );
}

#[tokio::test]
async fn tenants_never_see_each_others_webhooks_or_events() {
    let receiver_a = Receiver::start().await;
    let b = start(&[]);
    let api = Api::of(&b);
    let (ta, tb) = (admin("tenant-a"), admin("tenant-b"));
    let hook = api.create(&ta, &receiver_a.url("/a"), &["*"]).await;
    let id = hook["id"].as_str().unwrap();
    for (method, path, body) in [
        ("GET", format!("/v1/webhooks/{id}"), None),
        (
            "PATCH",
            format!("/v1/webhooks/{id}"),
            Some(json!({"enabled": false})),
        ),
        ("DELETE", format!("/v1/webhooks/{id}"), None),
        (
            "POST",
            format!("/v1/webhooks/{id}/rotate-secret"),
            Some(json!({})),
        ),
        ("POST", format!("/v1/webhooks/{id}/test"), None),
        ("GET", format!("/v1/webhooks/{id}/deliveries"), None),
        (
            "POST",
            format!("/v1/webhooks/{id}/replay"),
            Some(json!({"since": "x"})),
        ),
    ] {
        let (code, reply) = api.call(method, &path, Some(&tb), body).await;
        assert_eq!(code, 404, "{method} {path}: {reply}");
        assert_eq!(reply["code"], "not_found");
    }
    let (_, list) = api.call("GET", "/v1/webhooks", Some(&tb), None).await;
    assert_eq!(list["webhooks"], json!([]));
    api.publish(&tb, "cost.updated", json!({"b": true})).await;
    let a_event = api.publish(&ta, "cost.updated", json!({"a": true})).await;
    let got = receiver_a.wait_for(1, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_ids: Vec<String> = receiver_a
        .got()
        .iter()
        .map(|r| r.header("x-tensorcost-event-id"))
        .collect();
    assert_eq!(got_ids, vec![a_event], "only A's event");
    assert_eq!(got[0].json()["tenant_id"], "tenant-a");
    // A is untouched by B's attempts.
    let (code, e) = api
        .call("GET", &format!("/v1/webhooks/{id}"), Some(&ta), None)
        .await;
    assert_eq!((code, &e["enabled"]), (200, &json!(true)));
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_limits_hold() {
    let b = start(&[("TC_WEBHOOK_MAX_ENDPOINTS", "2")]);
    let api = Api::of(&b);
    let t = admin("acme");
    let reader = token::mint(
        SECRET,
        Some("acme"),
        "integration:read",
        "r",
        Duration::from_secs(600),
    );
    let cases: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (
            None,
            json!({"url": "http://127.0.0.1/x", "types": ["*"]}),
            401,
            "unauthenticated",
        ),
        (
            Some(&reader),
            json!({"url": "http://127.0.0.1/x", "types": ["*"]}),
            403,
            "integration:write",
        ),
        (Some(&t), json!({"types": ["*"]}), 400, "url: required"),
        (
            Some(&t),
            json!({"url": "http://127.0.0.1/x"}),
            400,
            "types: required",
        ),
        (
            Some(&t),
            json!({"url": "http://127.0.0.1/x", "types": []}),
            400,
            "types: empty",
        ),
        (
            Some(&t),
            json!({"url": "http://127.0.0.1/x", "types": ["NOPE"]}),
            400,
            "types[0]",
        ),
        (
            Some(&t),
            json!({"url": "gopher://127.0.0.1/x", "types": ["*"]}),
            400,
            "scheme",
        ),
        (
            Some(&t),
            json!({"url": "http://u:hunter2@127.0.0.1/x", "types": ["*"]}),
            400,
            "credentials",
        ),
        (
            Some(&t),
            json!({"url": "http://127.0.0.1/x", "types": ["*"], "extra": 1}),
            400,
            "unknown field",
        ),
    ];
    for (token, body, code, needle) in cases {
        let (got, reply) = api
            .call("POST", "/v1/webhooks", token, Some(body.clone()))
            .await;
        assert_eq!(got, code, "{body}: {reply}");
        let message = reply.to_string();
        assert!(message.contains(needle), "{body}: {reply}");
        assert!(!message.contains("hunter2"), "password echoed: {reply}");
    }
    // Reading needs integration:read; reading with it works.
    let publisher = token::mint(
        SECRET,
        Some("acme"),
        "events:publish",
        "p",
        Duration::from_secs(600),
    );
    let (code, reply) = api
        .call("GET", "/v1/webhooks", Some(&publisher), None)
        .await;
    assert_eq!(code, 403, "{reply}");
    let (code, _) = api.call("GET", "/v1/webhooks", Some(&reader), None).await;
    assert_eq!(code, 200);
    // The endpoint limit.
    api.create(&t, "http://127.0.0.1:9/a", &["*"]).await;
    api.create(&t, "http://127.0.0.1:9/b", &["*"]).await;
    let (code, reply) = api
        .call(
            "POST",
            "/v1/webhooks",
            Some(&t),
            Some(json!({"url": "http://127.0.0.1:9/c", "types": ["*"]})),
        )
        .await;
    assert_eq!(code, 429, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("TC_WEBHOOK_MAX_ENDPOINTS")
    );
    // Unknown ids, bad queries.
    let (code, _) = api
        .call("GET", "/v1/webhooks/we_0000", Some(&t), None)
        .await;
    assert_eq!(code, 404);
    let (code, _) = api
        .call("GET", "/v1/webhooks/../../etc", Some(&t), None)
        .await;
    assert_eq!(code, 404);
    let (_, list) = api.call("GET", "/v1/webhooks", Some(&t), None).await;
    let id = list["webhooks"][0]["id"].as_str().unwrap().to_string();
    let (code, reply) = api
        .call(
            "GET",
            &format!("/v1/webhooks/{id}/deliveries?status=maybe"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(code, 400, "{reply}");
    let (code, reply) = api
        .call(
            "GET",
            &format!("/v1/webhooks/{id}/deliveries?limit=abc"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(code, 400, "{reply}");
    let (code, reply) = api
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/rotate-secret"),
            Some(&t),
            Some(json!({"overlap": "30d"})),
        )
        .await;
    assert_eq!(code, 400, "{reply}");
}

#[tokio::test]
async fn unauthenticated_bodies_are_not_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = start(&[]);
    let before = b.process.rss_kib();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&b.http).await.unwrap();
        // Announce 50 MB; send the head only: refused from the headers.
        s.write_all(
            b"POST /v1/webhooks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n",
        )
        .await
        .unwrap();
        s.write_all(&vec![b' '; 256 * 1024]).await.ok();
        streams.push(s);
    }
    for s in &mut streams {
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("an answer before the body")
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    let grown = b.process.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew {grown} KiB for 20 unauthenticated 50 MB bodies"
    );
}

// ---- the client: TLS, private CAs, kept connections --------------------

/// A receiver over TLS, with a certificate for `localhost` issued by a CA
/// made here; counts the TLS connections it accepts.
struct TlsReceiver {
    receiver: Receiver,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    ca_pem: String,
}

impl TlsReceiver {
    async fn start() -> Self {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tensorcost test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        // Serves until the test's runtime ends.
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app, counted) =
                    (acceptor.clone(), app.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tls),
                            hyper_util::service::TowerToHyperService::new(app),
                        )
                        .await;
                });
            }
        });
        Self {
            receiver: Receiver { addr, state },
            connections,
            ca_pem: ca_cert.pem(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.receiver.addr.port())
    }
}

#[tokio::test]
async fn delivers_over_https_to_a_receiver_behind_a_private_ca_on_kept_connections() {
    let tls = TlsReceiver::start().await;
    let dir = tensorcost_testkit::process::Scratch::new("ca").unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &tls.ca_pem).unwrap();
    let t = admin("acme");

    // Without the CA the certificate is refused, and the attempt says so.
    let b = start(&[("TC_WEBHOOK_ALLOW_HOSTS", "localhost")]);
    let api = Api::of(&b);
    let hook = api.create(&t, &tls.url("/hook"), &["*"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    api.publish(&t, "cost.updated", json!({})).await;
    let deadline = Instant::now() + PATIENCE;
    let failed = loop {
        let list = api.deliveries(&t, &id, "").await;
        if let Some(first) = list.first() {
            break first.clone();
        }
        assert!(Instant::now() < deadline, "no attempt listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert!(tls.receiver.got().is_empty());
    drop(b);

    // A CA file that is not there: the broker says which setting is wrong.
    let missing = BrokerProcess::start(
        Path::new(BIN),
        BrokerOptions::new(SECRET).env("TC_WEBHOOK_CA_FILE", "/nonexistent/ca.pem"),
    );
    let Err(e) = missing else {
        panic!("started with a CA file that does not exist")
    };
    assert!(format!("{e:#}").contains("TC_WEBHOOK_CA_FILE"), "{e:#}");
    // One that holds no certificate: the same.
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let Err(e) = BrokerProcess::start(
        Path::new(BIN),
        BrokerOptions::new(SECRET).env("TC_WEBHOOK_CA_FILE", empty.to_str().unwrap()),
    ) else {
        panic!("started with a CA file that holds no certificate")
    };
    let e = format!("{e:#}");
    assert!(
        e.contains("TC_WEBHOOK_CA_FILE") && e.contains("no PEM certificate"),
        "{e}"
    );

    // With it: every delivery arrives, verified, over at most as many
    // connections as deliveries in flight (4), each kept for the next.
    let b = start(&[
        ("TC_WEBHOOK_ALLOW_HOSTS", "localhost"),
        ("TC_WEBHOOK_CA_FILE", ca_file.to_str().unwrap()),
    ]);
    let api = Api::of(&b);
    let hook = api.create(&t, &tls.url("/hook"), &["*"]).await;
    let secret = hook["secret"].as_str().unwrap();
    // A burst, then one at a time: each worker's connection waits idle
    // for the next.
    let burst = 20;
    for i in 0..burst {
        api.publish(&t, "cost.updated", json!({ "i": i })).await;
    }
    tls.receiver.wait_for(burst, PATIENCE).await;
    let n = burst + 10;
    for i in burst..n {
        api.publish(&t, "cost.updated", json!({ "i": i })).await;
        tls.receiver.wait_for(i + 1, PATIENCE).await;
    }
    let got = tls.receiver.got();
    assert_eq!(got.len(), n);
    for r in &got {
        assert!(verifies(r, secret));
        assert_eq!(r.header("x-tensorcost-delivery-attempt"), "1");
        assert_eq!(
            r.header("host"),
            format!("localhost:{}", tls.receiver.addr.port())
        );
    }
    let connections = tls.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=4).contains(&connections),
        "{connections} TLS connections for {n} deliveries"
    );
}

#[tokio::test]
async fn a_receiver_that_closes_every_connection_still_gets_each_delivery_once() {
    let receiver = Receiver::start().await;
    receiver.answer_by_default(Answer {
        status: 200,
        headers: vec![("connection", "close".to_string())],
        delay: Duration::ZERO,
    });
    let b = start(&[]);
    let api = Api::of(&b);
    let t = admin("acme");
    api.create(&t, &receiver.url("/hook"), &["*"]).await;
    let n = 20;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(api.publish(&t, "cost.updated", json!({ "i": i })).await);
    }
    receiver.wait_for(n, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.got();
    let mut seen: Vec<String> = got
        .iter()
        .map(|r| r.header("x-tensorcost-event-id"))
        .collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "each event once");
    assert!(
        got.iter()
            .all(|r| r.header("x-tensorcost-delivery-attempt") == "1"),
        "no attempt failed"
    );
}

/// A receiver over plain TCP that closes a connection once it has been
/// idle for `idle` after an answer, without a `connection: close` header
/// (as servers with a short keep-alive timeout do). Records each request
/// as (connection number, event id, attempt).
struct ClosingReceiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(usize, String, String)>>>,
}

impl ClosingReceiver {
    async fn start(idle: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut number = 0;
            while let Ok((mut socket, _)) = listener.accept().await {
                number += 1;
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // A request: headers, then content-length bytes.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            let wait = if buf.is_empty() { idle } else { PATIENCE };
                            match tokio::time::timeout(wait, socket.read(&mut chunk)).await {
                                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                // Idle past the keep-alive time, or closed.
                                _ => return,
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let header = |name: &str| {
                            head.lines()
                                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                                .unwrap_or_default()
                                .trim()
                                .to_string()
                        };
                        let length: usize = header("content-length").parse().unwrap_or(0);
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match socket.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        record.lock().unwrap().push((
                            number,
                            header("x-tensorcost-event-id"),
                            header("x-tensorcost-delivery-attempt"),
                        ));
                        buf.drain(..head_end + length);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<(usize, String, String)> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.seen().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests arrived",
                self.seen().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The client has two defences: it notices the close when it takes the
/// idle connection, and it replaces a reused connection whose request did
/// not go out. Either keeps the attempt from failing; with neither (checked
/// by disabling both), the second and third events arrive at attempt 2.
#[tokio::test]
async fn a_kept_connection_the_receiver_closed_while_idle_is_replaced_without_a_failed_attempt() {
    let receiver = ClosingReceiver::start(Duration::from_millis(100)).await;
    // A failed attempt would be retried after 1 s: the test would see
    // attempt 2, not a lost event.
    let b = start(&[("TC_WEBHOOK_RETRY_SCHEDULE", "1s,1s")]);
    let api = Api::of(&b);
    let t = admin("acme");
    let hook = api
        .create(&t, &format!("http://{}/hook", receiver.addr), &["*"])
        .await;
    let mut ids = Vec::new();
    for round in 0..3 {
        ids.push(
            api.publish(&t, "cost.updated", json!({ "round": round }))
                .await,
        );
        receiver.wait_for(round + 1).await;
        // Past the receiver's keep-alive: the broker's kept connection is
        // closed at the other end, unknown to it until it is used again.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let seen = receiver.seen();
    let got: Vec<&str> = seen.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(got, ids, "each event once, in order: {seen:?}");
    assert!(
        seen.iter().all(|(_, _, attempt)| attempt == "1"),
        "no attempt failed: {seen:?}"
    );
    let connections: std::collections::HashSet<usize> = seen.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(connections.len(), 3, "a new connection each time: {seen:?}");
    let listed = api
        .deliveries_when(&t, hook["id"].as_str().unwrap(), 3)
        .await;
    assert!(
        listed.iter().all(|d| d["status"] == "succeeded"),
        "{listed:?}"
    );
}
