//! Hostile clients against the real binary, each attack at a bounded size,
//! asserting the bound the documented settings promise (docs/security.md):
//! memory, connections and descriptors stay bounded, `/healthz` keeps
//! answering, and other tenants and sockets keep receiving.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{BIN, SECRET, authed, draft, full, sio, token};
use futures_util::SinkExt;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{PublishRequest, SubscribeRequest};
use tensorcost_testkit::broker::{BrokerOptions, BrokerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The broker with a short header-read timeout, so that idle and slow
/// connections are seen closed within a test.
fn broker(extra: &[(&str, &str)]) -> BrokerProcess {
    let mut options = BrokerOptions::new(SECRET)
        .env("TC_HEADER_READ_TIMEOUT", "1s")
        .env("RUST_LOG", "error");
    for (k, v) in extra {
        options = options.env(k, *v);
    }
    BrokerProcess::start(Path::new(BIN), options).unwrap_or_else(|e| panic!("{e:#}"))
}

fn grpc_addr(b: &BrokerProcess) -> SocketAddr {
    b.grpc
        .trim_start_matches("http://")
        .parse()
        .expect("grpc address")
}

fn http_addr(b: &BrokerProcess) -> SocketAddr {
    b.http.parse().expect("http address")
}

fn rss_mib(b: &BrokerProcess) -> f64 {
    b.process.rss_kib() as f64 / 1024.0
}

/// A TCP connection from `source` (any 127/8 address is loopback here).
async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// `GET /healthz` from 127.0.0.2, so that per-IP caps on 127.0.0.1 do not
/// apply to the probe.
async fn healthz(b: &BrokerProcess) -> bool {
    let probe = async {
        let mut s = connect_from([127, 0, 0, 2], http_addr(b)).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<bool, std::io::Error>(out.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), probe).await,
        Ok(Ok(true))
    )
}

/// One line of the broker's `/metrics`, fetched from 127.0.0.2.
async fn metric(b: &BrokerProcess, name: &str) -> f64 {
    let fetch = async {
        let mut s = connect_from([127, 0, 0, 2], http_addr(b)).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    tensorcost_testkit::broker::metric_value(&text, name)
}

/// Whether the server closes `s` within `within` (reads until EOF or error).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_grpc_bodies_are_refused_before_they_are_buffered() {
    let b = broker(&[]);
    let tcp = TcpStream::connect(grpc_addr(&b)).await.expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.expect("ready");
    // The server's SETTINGS arrive just after the handshake.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h2.current_max_send_streams() == usize::MAX && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h2.current_max_send_streams(),
        100,
        "the server advertises TC_GRPC_MAX_STREAMS"
    );
    let before = rss_mib(&b);
    // 90 streams, each announcing a 16 MiB message and sending 2 MiB of it
    // without ending: 180 MiB offered, none of it with a token.
    let mut responses = Vec::new();
    let chunk = Bytes::from(vec![b'x'; 256 << 10]);
    for _ in 0..90 {
        let request = http::Request::post(format!(
            "http://{}/tensorcost.events.v1.EventBroker/Publish",
            b.grpc.trim_start_matches("http://")
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        h2 = h2.ready().await.expect("ready");
        let (response, mut body) = h2.send_request(request, false).expect("send");
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(16u32 << 20).to_be_bytes());
        let _ = body.send_data(Bytes::from(prefix), false);
        for _ in 0..8 {
            let _ = body.send_data(chunk.clone(), false);
        }
        responses.push((response, body));
    }
    for (response, _body) in responses {
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer without waiting for the body")
            .expect("response");
        let status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(status.as_deref(), Some("16"), "UNAUTHENTICATED at once");
    }
    let grew = rss_mib(&b) - before;
    eprintln!("unauthenticated gRPC: RSS grew {grew:.1} MiB for 180 MiB offered");
    assert!(grew < 48.0, "RSS grew {grew:.1} MiB for 180 MiB offered");
    assert!(healthz(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slowloris_connections_are_closed_and_capped() {
    let b = broker(&[("TC_MAX_CONNECTIONS_PER_IP", "40")]);
    // HTTP/1: nothing sent; half a request head.
    let mut idle = TcpStream::connect(http_addr(&b)).await.expect("connect");
    let mut slow = TcpStream::connect(http_addr(&b)).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    // gRPC: no HTTP/2 preface, or half of it.
    let mut silent = TcpStream::connect(grpc_addr(&b)).await.expect("connect");
    let mut half = TcpStream::connect(grpc_addr(&b)).await.expect("connect");
    half.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    let started = Instant::now();
    for (name, s) in [
        ("idle HTTP/1", &mut idle),
        ("slowloris HTTP/1", &mut slow),
        ("gRPC without preface", &mut silent),
        ("gRPC with half a preface", &mut half),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(6)).await,
            "{name} still open after {:?}",
            started.elapsed()
        );
    }

    // 60 connections from one address: 40 are held (until the timeout),
    // the rest closed at once; /healthz from another address answers.
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(http_addr(&b)).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        healthz(&b).await,
        "/healthz while one address is at its cap"
    );
    let refused = metric(&b, "tc_connections_refused_total").await;
    assert!(refused >= 20.0, "{refused} refused");
    let mut closed_at_once = 0;
    for s in &mut held {
        if closed_within(s, Duration::from_millis(50)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 20,
        "{closed_at_once} of 60 closed at once"
    );
    drop(held);
    let fds = b.process.open_fds();
    assert!(
        fds < 100,
        "{fds} descriptors open after the connections left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_frames_larger_than_any_client_message_are_refused_before_auth() {
    let b = broker(&[]);
    let before = rss_mib(&b);
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let url = format!("ws://{}/ws/?EIO=4&transport=websocket", b.http);
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket");
        // Four 8 MiB fragments-worth of text, never authenticating.
        let big = "x".repeat(8 << 20);
        let _ = ws.send(Message::text(big)).await;
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grew = rss_mib(&b) - before;
    eprintln!("oversized websocket frames: RSS grew {grew:.1} MiB for 160 MiB offered");
    assert!(grew < 64.0, "RSS grew {grew:.1} MiB for 160 MiB offered");
    for mut ws in sockets {
        // The open packet and a ping may come first; then the end.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match futures_util::StreamExt::next(&mut ws).await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "an oversized frame closes the connection");
    }
    assert!(healthz(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockets_that_never_read_are_dropped_and_others_keep_receiving() {
    let b = broker(&[
        ("TC_SOCKET_PING_INTERVAL", "1s"),
        ("TC_SOCKET_PING_TIMEOUT", "1s"),
        ("TC_WRITE_TIMEOUT", "2s"),
        ("TC_RATE_LIMIT_PER_TENANT", "100000"),
    ]);
    let reader_token = token("tenant-slow", "events:subscribe");
    // 20 sockets that answer nothing and read nothing after the handshake.
    let mut stuck = Vec::new();
    for _ in 0..20 {
        let (ws, _) = sio::handshake(
            &b.http,
            &serde_json::json!({ "token": reader_token }),
            sio::Until::Session,
        )
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}"));
        stuck.push(ws);
    }
    // One socket that reads.
    let mut reader = sio::connect(&b.http, serde_json::json!({ "token": reader_token }))
        .await
        .expect("reader connects");
    let before = rss_mib(&b);
    // 400 events of 60 KB (24 MB) to 21 sockets, in batches the reading
    // socket keeps up with.
    let mut client = EventBrokerClient::connect(b.grpc.clone())
        .await
        .expect("connect");
    let publisher = full("tenant-slow");
    let data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(60_000));
    let mut received = 0;
    for batch in 1..=40 {
        let events = (0..10).map(|_| draft("metrics.collected", &data)).collect();
        client
            .publish(authed(PublishRequest { events }, &publisher))
            .await
            .expect("publish");
        while received < batch * 10 {
            match reader.next_event(Duration::from_secs(10)).await {
                Some(_) => received += 1,
                None => break,
            }
        }
    }
    assert_eq!(received, 400, "the reading socket got every event");
    // The stuck sockets are disconnected (too slow, or by the heartbeat).
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&b, "tc_socketio_sockets").await > 1.0 {
        assert!(
            Instant::now() < deadline,
            "stuck sockets still connected: {}",
            metric(&b, "tc_socketio_sockets").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grew = rss_mib(&b) - before;
    eprintln!("sockets that never read: RSS grew {grew:.1} MiB, all dropped");
    // Each stuck socket may hold TC_SOCKET_BUFFER (64) packets of 60 KB
    // plus 1 MiB of backlog while it lasts: about 4.8 MiB, 96 MiB for 20.
    // With the former 1,024 packets and no byte cap, 1,470 MiB.
    assert!(grew < 160.0, "RSS grew {grew:.1} MiB");
    drop(stuck);
    assert!(healthz(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_far_future_exp_is_refused_everywhere_and_breaks_nobody() {
    let b = broker(&[]);
    let good = token("tenant-far", "events:subscribe");
    let mut reader = sio::connect(&b.http, serde_json::json!({ "token": good }))
        .await
        .expect("reader connects");
    let far = |exp: u64| {
        tensorcost_testkit::token::sign(
            SECRET,
            &serde_json::json!({"tenantId": "tenant-far", "exp": exp, "scope": "events:subscribe events:publish"}),
        )
    };
    for exp in [253_402_300_800u64, u64::MAX - 31, u64::MAX] {
        let refused = sio::connect(&b.http, serde_json::json!({ "token": far(exp) }))
            .await
            .err()
            .expect("refused");
        assert!(refused.contains("beyond the year 9999"), "{refused}");
        let mut client = EventBrokerClient::connect(b.grpc.clone())
            .await
            .expect("connect");
        let Err(status) = client
            .subscribe(authed(SubscribeRequest::default(), &far(exp)))
            .await
        else {
            panic!("a token with exp {exp} was accepted");
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let out = std::process::Command::new(BIN)
            .args(["check-token", &far(exp)])
            .env_clear()
            .env("TC_JWT_SECRET", SECRET)
            .output()
            .expect("check-token");
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(said.starts_with("refused: token exp"), "{said}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    // The tenant's stream goes on.
    let mut client = EventBrokerClient::connect(b.grpc.clone())
        .await
        .expect("connect");
    client
        .publish(authed(
            PublishRequest {
                events: vec![draft("cost.updated", "{}")],
            },
            &full("tenant-far"),
        ))
        .await
        .expect("publish");
    assert!(
        reader.next_event(Duration::from_secs(5)).await.is_some(),
        "the tenant's other socket still receives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_descriptors_one_address_cannot_take_every_place() {
    // The broker under a descriptor limit of 256: 128 connections at most,
    // 64 from one address.
    let mut options = BrokerOptions::new(SECRET)
        .env("TC_HEADER_READ_TIMEOUT", "5s")
        .env("RUST_LOG", "error");
    options.prefix = vec!["prlimit".into(), "--nofile=256:256".into()];
    let b = BrokerProcess::start(Path::new(BIN), options).unwrap_or_else(|e| panic!("{e:#}"));
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(http_addr(&b)).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(healthz(&b).await, "/healthz from another address answers");
    let refused = metric(&b, "tc_connections_refused_total").await;
    assert!(refused >= 236.0, "{refused} of 300 refused (64 held)");
    assert_eq!(
        metric(&b, "tc_accept_errors_total").await,
        0.0,
        "never out of descriptors"
    );
    assert!(b.process.open_fds() < 256);
}

/// `/mcp`, `/v1/settings/mcp` and the policy routes refuse a request
/// without a token from its headers: 20 connections announcing 50 MB
/// bodies each get 401 before any body is read, and the broker holds no
/// more than a few MiB for them.
#[tokio::test]
async fn mcp_settings_and_policies_refuse_unauthenticated_bodies_from_their_headers() {
    let b = broker(&[]);
    let before = b.process.rss_kib();
    let mut streams = Vec::new();
    for i in 0..20 {
        let head = match i % 4 {
            0 => {
                "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: 50000000\r\n\r\n"
            }
            1 => {
                "PUT /v1/settings/mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
            }
            2 => {
                "PUT /v1/policies/p HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
            }
            _ => {
                "POST /v1/policy-simulations HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
            }
        };
        let mut s = TcpStream::connect(http_addr(&b)).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&vec![b' '; 256 * 1024]).await.ok();
        streams.push(s);
    }
    for s in &mut streams {
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer before the body")
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
    }
    let grown = b.process.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew {grown} KiB for 20 unauthenticated 50 MB bodies"
    );
}
