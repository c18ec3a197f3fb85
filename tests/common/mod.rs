//! Shared test harness: the real server, in-process on ephemeral loopback
//! ports, and real gRPC clients generated from `proto/`. Real processes
//! (the binary, redis-server), tokens and the Socket.IO client come from
//! the workspace's test kit (`crates/testkit`).
#![allow(dead_code)]

use std::time::Duration;

use tensorcost_events::config::Settings;
use tensorcost_events::proto::event_broker_client::EventBrokerClient;
use tensorcost_events::proto::{
    self, PublishRequest, SubscribeRequest, SubscribeResponse, SubscribeStatus, subscribe_response,
};
use tensorcost_events::server::{self, Running};
#[allow(unused_imports)]
pub use tensorcost_testkit::sio;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub running: Option<Running>,
    pub grpc: String,
    pub http: String,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings::ephemeral(SECRET);
        adjust(&mut settings);
        let running = server::start(&settings, SECRET.as_bytes())
            .await
            .expect("server starts");
        Self {
            grpc: format!("http://{}", running.grpc_addr),
            http: format!("http://{}", running.http_addr),
            running: Some(running),
        }
    }

    pub async fn client(&self) -> EventBrokerClient<Channel> {
        EventBrokerClient::connect(self.grpc.clone())
            .await
            .expect("connect")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }
}

pub fn token(tenant: &str, scopes: &str) -> String {
    token_opt(Some(tenant), scopes)
}

pub fn token_opt(tenant: Option<&str>, scopes: &str) -> String {
    tensorcost_testkit::token::mint(SECRET, tenant, scopes, "test", Duration::from_secs(600))
}

/// The broker binary these tests were built with.
pub const BIN: &str = env!("CARGO_BIN_EXE_tensorcost-events");

pub fn full(tenant: &str) -> String {
    token(tenant, "events:publish events:subscribe")
}

pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

pub fn draft(event_type: &str, data: &str) -> proto::Event {
    proto::Event {
        r#type: event_type.into(),
        data: data.into(),
        ..Default::default()
    }
}

pub async fn publish(
    client: &mut EventBrokerClient<Channel>,
    token: &str,
    events: Vec<proto::Event>,
) -> Result<Vec<proto::PublishResult>, Status> {
    client
        .publish(authed(PublishRequest { events }, token))
        .await
        .map(|r| r.into_inner().results)
}

/// An open Subscribe stream, past its status message.
#[derive(Debug)]
pub struct Sub {
    pub status: SubscribeStatus,
    pub stream: Streaming<SubscribeResponse>,
}

pub async fn subscribe(
    client: &mut EventBrokerClient<Channel>,
    token: &str,
    types: &[&str],
    since_id: &str,
) -> Result<Sub, Status> {
    let request = SubscribeRequest {
        types: types.iter().map(|t| t.to_string()).collect(),
        since_id: since_id.into(),
        tenant_id: String::new(),
        max_batch: 0,
    };
    subscribe_req(client, token, request).await
}

pub async fn subscribe_req(
    client: &mut EventBrokerClient<Channel>,
    token: &str,
    request: SubscribeRequest,
) -> Result<Sub, Status> {
    let mut stream = client.subscribe(authed(request, token)).await?.into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("status in time")?
        .expect("a status message");
    match first.message {
        Some(subscribe_response::Message::Status(status)) => Ok(Sub { status, stream }),
        other => panic!("first message must be the status, got {other:?}"),
    }
}

impl Sub {
    /// The next event, failing the test if none arrives in time.
    pub async fn next(&mut self) -> Result<proto::Event, Status> {
        let message = tokio::time::timeout(PATIENCE, self.stream.message())
            .await
            .expect("an event in time")?
            .expect("stream still open");
        match message.message {
            Some(subscribe_response::Message::Event(e)) => Ok(e),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<proto::Event> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.expect("event"));
        }
        out
    }

    /// Asserts nothing more arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.stream.message()).await {
            panic!("expected nothing, got {message:?}");
        }
    }
}
