//! The deployment of deploy/: two instances on one Redis behind HAProxy
//! with deploy/haproxy/haproxy.cfg, all real processes. One instance is
//! restarted (SIGTERM, then started again) while a publisher runs at a
//! steady rate through the balancer; every subscriber, gRPC and Socket.IO,
//! reconnecting through the balancer with its last id, ends with every
//! event.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, SECRET, authed, full, sio};
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{self, PublishRequest, SubscribeRequest, subscribe_response};
use tensorcost_testkit::RedisServer;
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess};
use tensorcost_testkit::process::{Process, Stop, free_port, require};
use tokio_stream::StreamExt;

type Ids = Arc<Mutex<Vec<String>>>;
type Connections = Arc<std::sync::atomic::AtomicUsize>;

fn broker(redis: &str, grpc: u16, http: u16) -> BrokerProcess {
    let mut options = BrokerOptions::new(SECRET)
        .env("TC_REDIS_URL", redis)
        .env("TC_SHUTDOWN_TIMEOUT", "3s")
        .env("TC_RATE_LIMIT_PER_TENANT", "100000");
    options.grpc_addr = format!("127.0.0.1:{grpc}");
    options.http_addr = format!("127.0.0.1:{http}");
    options.stop = Stop::Term(Duration::from_secs(10));
    BrokerProcess::start(Path::new(BIN), options).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Follows the tenant over gRPC through the balancer, resubscribing with
/// its last id whenever the stream ends, until `stop`.
fn grpc_follower(
    lb: String,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Ids, Connections) {
    let ids: Ids = Arc::default();
    let connections: Connections = Arc::default();
    let (seen, connected) = (Arc::clone(&ids), Arc::clone(&connections));
    tokio::spawn(async move {
        let mut last = String::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(mut client) = EventBrokerClient::connect(lb.clone()).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let request = SubscribeRequest {
                since_id: last.clone(),
                ..Default::default()
            };
            let Ok(response) = client.subscribe(authed(request, &token)).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut stream = response.into_inner();
            while let Some(Ok(m)) = stream.next().await {
                let events = match m.message {
                    Some(subscribe_response::Message::Event(e)) => vec![e],
                    Some(subscribe_response::Message::Events(b)) => b.events,
                    _ => continue,
                };
                for e in events {
                    last = e.id.clone();
                    seen.lock().unwrap().push(e.id);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (ids, connections)
}

/// Follows the tenant over Socket.IO (websocket) through the balancer,
/// reconnecting with `lastEventId` whenever the connection ends.
fn sio_follower(
    lb: String,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Ids, Connections) {
    let ids: Ids = Arc::default();
    let connections: Connections = Arc::default();
    let (seen, connected) = (Arc::clone(&ids), Arc::clone(&connections));
    tokio::spawn(async move {
        let mut last: Option<String> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut auth = serde_json::json!({ "token": token });
            if let Some(last) = &last {
                auth["lastEventId"] = last.clone().into();
            }
            let Ok(mut socket) = sio::connect(&lb, auth).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            while let Some(e) = socket.next_event(Duration::from_secs(3)).await {
                let Some(id) = e["id"].as_str() else { continue };
                if e["type"].as_str().is_some_and(|t| t.starts_with("system.")) {
                    continue;
                }
                last = Some(id.to_string());
                seen.lock().unwrap().push(id.to_string());
            }
        }
    });
    (ids, connections)
}

/// Two gRPC and two Socket.IO followers of `token`'s tenant through the balancer
/// at `lb_http` (host:port) and `lb_grpc` (URL), a publisher of 800 events
/// at 100/s through it, and `restart` of one instance two seconds in:
/// every follower must end with every event, and both kinds must have
/// reconnected. Returns what `restart` returned.
async fn rolling_restart<T>(
    lb_http_url: &str,
    lb_grpc_url: &str,
    token: &str,
    restart: impl AsyncFnOnce() -> T,
) -> T {
    let (lb_http_url, lb_grpc_url) = (lb_http_url.to_string(), lb_grpc_url.to_string());
    let token = token.to_string();
    let began = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two of each: round robin puts one of each on each instance.
    let followers: Vec<(&str, (Ids, Connections))> = vec![
        (
            "gRPC 1",
            grpc_follower(lb_grpc_url.clone(), token.clone(), Arc::clone(&stop)),
        ),
        (
            "gRPC 2",
            grpc_follower(lb_grpc_url.clone(), token.clone(), Arc::clone(&stop)),
        ),
        (
            "Socket.IO 1",
            sio_follower(lb_http_url.clone(), token.clone(), Arc::clone(&stop)),
        ),
        (
            "Socket.IO 2",
            sio_follower(lb_http_url.clone(), token.clone(), Arc::clone(&stop)),
        ),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 100 events/s for 8 s through the balancer, each with its own id and
    // retried until accepted.
    // Ids of this run: a deployment tried twice must not take them as
    // duplicates of the first run's.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let publisher = {
        let lb = lb_grpc_url.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut client: Option<EventBrokerClient<tonic::transport::Channel>> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut retries = 0;
            for i in 0..800 {
                tick.tick().await;
                let id = format!("rolling-{run}-{i:04}");
                loop {
                    if client.is_none() {
                        client = EventBrokerClient::connect(lb.clone()).await.ok();
                    }
                    let Some(c) = client.as_mut() else {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let event = proto::Event {
                        id: id.clone(),
                        r#type: "cost.updated".into(),
                        data: format!(r#"{{"i":{i}}}"#),
                        ..Default::default()
                    };
                    match c
                        .publish(authed(
                            PublishRequest {
                                events: vec![event],
                            },
                            &token,
                        ))
                        .await
                    {
                        Ok(_) => break,
                        Err(_) => {
                            retries += 1;
                            client = None;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                ids.push(id);
            }
            (ids, retries)
        })
    };

    // Restart one instance two seconds in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted_at = Instant::now();
    let restarted = restart().await;
    let restart_took = restarted_at.elapsed();

    let (published, retries) = publisher.await.unwrap();
    let published_in = restarted_at.elapsed();
    eprintln!(
        "published {} events by {:?} (restart took {restart_took:?}, {retries} retries)",
        published.len(),
        began.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, (ids, _)) in &followers {
        loop {
            let seen: HashSet<String> = ids.lock().unwrap().iter().cloned().collect();
            let missing: Vec<&String> = published.iter().filter(|id| !seen.contains(*id)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} misses {} of {} events (first {:?}); restart took {restart_took:?}, publishing ended {published_in:?} after it began, the publisher retried {retries} times",
                missing.len(),
                published.len(),
                missing.first()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("every follower had every event by {:?}", began.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The restart moved followers: at least one of each kind reconnected.
    let connections = |kind: &str| -> usize {
        followers
            .iter()
            .filter(|(name, _)| name.starts_with(kind))
            .map(|(_, (_, c))| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    assert!(connections("gRPC") > 2, "no gRPC follower reconnected");
    assert!(
        connections("Socket.IO") > 2,
        "no Socket.IO follower reconnected"
    );
    assert!(retries < 800, "the publisher retried {retries} times");
    restarted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_restarted_behind_haproxy_loses_no_event() {
    require(
        "haproxy",
        "the load balancer of deploy/ (scripts/test installs it)",
    )
    .unwrap();
    let redis = RedisServer::start();
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let (a_grpc, a_http, b_grpc, b_http, lb_http, lb_grpc) =
        (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]);
    let _a = broker(&redis.url(), a_grpc, a_http);
    let b = broker(&redis.url(), b_grpc, b_http);

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/haproxy.cfg");
    let mut haproxy = std::process::Command::new("haproxy");
    haproxy
        .args(["-db", "-f", config])
        .env("LB_HTTP_BIND", format!("127.0.0.1:{lb_http}"))
        .env("LB_GRPC_BIND", format!("127.0.0.1:{lb_grpc}"))
        .env("BROKER1_HTTP", format!("127.0.0.1:{a_http}"))
        .env("BROKER2_HTTP", format!("127.0.0.1:{b_http}"))
        .env("BROKER1_GRPC", format!("127.0.0.1:{a_grpc}"))
        .env("BROKER2_GRPC", format!("127.0.0.1:{b_grpc}"))
        .env("BROKER1_HTTP_PORT", a_http.to_string())
        .env("BROKER2_HTTP_PORT", b_http.to_string())
        .stdout(std::process::Stdio::null());
    let _haproxy = Process::spawn(&mut haproxy, Stop::Kill).expect("haproxy starts");
    let lb_http_url = format!("127.0.0.1:{lb_http}");
    let lb_grpc_url = format!("http://127.0.0.1:{lb_grpc}");
    // Both instances healthy behind it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = reqwest::get(format!("http://{lb_http_url}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "HAProxy never answered /readyz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Restart instance B: SIGTERM (it ends its streams with their last ids
    // and drains), then start it again on the same ports.
    let token = full("tenant-rolling");
    // The URL only: Redis itself must outlive the restart.
    let url = redis.url();
    let restarted = rolling_restart(&lb_http_url, &lb_grpc_url, &token, async move || {
        let stopped = tokio::task::spawn_blocking(move || drop(b));
        stopped.await.unwrap();
        tokio::task::spawn_blocking(move || broker(&url, b_grpc, b_http))
            .await
            .unwrap()
    })
    .await;
    assert!(
        !restarted.stderr().contains("panicked"),
        "{}",
        restarted.stderr()
    );
}

/// deploy/test: the same against deploy/compose.yaml run by podman-compose
/// (two broker containers, Redis and HAProxy), restarting one broker
/// container with `TC_DEPLOY_RESTART`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "deploy/test runs it against the containers of deploy/compose.yaml"]
async fn the_compose_deployment_restarted_loses_no_event() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: deploy/test sets it"))
    };
    let (lb_http, lb_grpc, token, restart) = (
        var("TC_DEPLOY_LB_HTTP"),
        var("TC_DEPLOY_LB_GRPC"),
        var("TC_DEPLOY_TOKEN"),
        var("TC_DEPLOY_RESTART"),
    );
    let lb_grpc = format!("http://{lb_grpc}");
    rolling_restart(&lb_http, &lb_grpc, &token, async move || {
        let out = tokio::process::Command::new("sh")
            .args(["-c", &restart])
            .output()
            .await
            .expect("run TC_DEPLOY_RESTART");
        assert!(
            out.status.success(),
            "{restart}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}

/// A GET to Prometheus's HTTP API: its `data`, or why not.
async fn prometheus_api(
    base: &str,
    path: &str,
    query: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    let url =
        url::Url::parse_with_params(&format!("{base}{path}"), query).map_err(|e| e.to_string())?;
    let body: serde_json::Value = reqwest::get(url.as_str())
        .await
        .map_err(|e| e.to_string())?
        .json_or_text()
        .await?;
    if body["status"] == "success" {
        Ok(body["data"].clone())
    } else {
        Err(body.to_string())
    }
}

trait JsonOrText {
    async fn json_or_text(self) -> Result<serde_json::Value, String>;
}

impl JsonOrText for reqwest::Response {
    async fn json_or_text(self) -> Result<serde_json::Value, String> {
        let text = self.text().await.map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|_| text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_broker_with_the_alerts_and_the_dashboard_queries_of_deploy() {
    require(
        "prometheus",
        "deploy/prometheus is tried against it (scripts/test installs it)",
    )
    .unwrap();
    require("promtool", "it checks deploy/prometheus/alerts.yml").unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let alerts = format!("{root}/deploy/prometheus/alerts.yml");
    for args in [
        vec!["check", "rules", alerts.as_str()],
        vec![
            "check",
            "config",
            &format!("{root}/deploy/prometheus/prometheus.yml"),
        ],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let broker = BrokerProcess::start(Path::new(BIN), BrokerOptions::new(SECRET)).unwrap();
    let token = full("tenant-prometheus");
    let mut client = EventBrokerClient::connect(broker.grpc.clone())
        .await
        .unwrap();
    for i in 0..5 {
        client
            .publish(authed(
                PublishRequest {
                    events: vec![common::draft("cost.updated", &format!(r#"{{"i":{i}}}"#))],
                },
                &token,
            ))
            .await
            .unwrap();
    }

    let scratch = tensorcost_testkit::Scratch::new("prometheus").unwrap();
    let config = scratch.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{alerts:?}]\nscrape_configs:\n  - job_name: tensorcost-events\n    static_configs:\n      - targets: [{:?}]\n",
            broker.http
        ),
    )
    .unwrap();
    let port = free_port();
    let mut command = std::process::Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            scratch.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.join("prometheus.log")).unwrap());
    let _prometheus = Process::spawn(&mut command, Stop::Kill).expect("prometheus starts");
    let base = format!("http://127.0.0.1:{port}");

    // The broker's counters, scraped.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = prometheus_api(
            &base,
            "/api/v1/query",
            &[("query", "sum(tc_events_published_total)")],
        )
        .await
        .ok()
        .and_then(|d| {
            d["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
        });
        if published.is_some_and(|n| n >= 5.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the broker: {}",
            std::fs::read_to_string(scratch.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every alert of the file loaded and evaluated without error.
    let expected = std::fs::read_to_string(&alerts)
        .unwrap()
        .matches("- alert:")
        .count();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = prometheus_api(&base, "/api/v1/rules", &[]).await.unwrap();
        let rules: Vec<serde_json::Value> = rules["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(rules.len(), expected, "{rules:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all healthy: {rules:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every query of the Grafana dashboard is valid PromQL here.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/tensorcost-events.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*");
            if let Err(e) = prometheus_api(&base, "/api/v1/query", &[("query", &expr)]).await {
                panic!("dashboard query {expr}: {e}");
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "{checked}");
}
