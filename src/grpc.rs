//! The gRPC surface (`tensorcost.events.v1.EventBroker`): translates
//! messages to [`App`] calls and back. No broker logic lives here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

use crate::app::{ACTIVE_TENANT_HEADER, AgentStream, App, SubscribeParams};
use crate::auth::Identity;
use crate::broker::{Delivery, Outcome};
use crate::error::ApiError;
use crate::presence::Reason;
use crate::proto::event_broker_server::EventBroker;
use crate::proto::{
    self, EventBatch, PublishAck, PublishError, PublishOutcome, PublishRequest, PublishResponse,
    PublishResult, PublishStreamRequest, SubscribeRequest, SubscribeResponse, SubscribeStatus,
    publish_ack, publish_outcome, subscribe_response,
};

/// Metadata key carrying the last event id a subscriber was sent, on a
/// stream that ends early (too slow, or server shutting down).
pub const LAST_EVENT_ID: &str = "last-event-id";

pub struct GrpcService {
    app: App,
    latency: crate::metrics::EmitLatency,
}

impl GrpcService {
    pub fn new(app: App, latency: crate::metrics::EmitLatency) -> Self {
        Self { app, latency }
    }
}

/// The caller, as [`Authenticated`] verified it before the request's body
/// was read.
fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::internal("request was not authenticated"))
}

/// The broker's gRPC service behind the door: every call is authenticated
/// from its headers (`authorization`, `x-active-tenant-id`) before its body
/// is read, so a caller without a valid token costs at most its headers
/// and what flow control lets it send before the refusal. The verified
/// [`Identity`] travels to the handler in the request's extensions.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    app: App,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, app: App) -> Self {
        Self { inner, app }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Authenticated<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let app = self.app.clone();
        Box::pin(async move {
            let headers = request.headers();
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let verified = app
                .authenticate(header("authorization"), header(ACTIVE_TENANT_HEADER))
                .await;
            match verified {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(refused) => Ok(Status::from(refused).into_http()),
            }
        })
    }
}

/// A stream that holds an agent's presence ([`App::agent_stream`]) and
/// records why it ends: from an item (`reason`), or from its end
/// (`at_end`). Dropped without either, the presence decides.
struct Presenced<S: Stream> {
    inner: S,
    presence: Option<Arc<AgentStream>>,
    reason: fn(&S::Item) -> Option<Reason>,
    at_end: Option<Reason>,
}

impl<S: Stream + Unpin> Stream for Presenced<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let (std::task::Poll::Ready(item), Some(presence)) = (&polled, &self.presence) {
            let reason = match item {
                Some(item) => (self.reason)(item),
                None => self.at_end,
            };
            if let Some(reason) = reason {
                presence.ended(reason);
            }
        }
        polled
    }
}

fn traceparent(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("traceparent").and_then(|v| v.to_str().ok())
}

impl From<ApiError> for PublishError {
    fn from(e: ApiError) -> Self {
        PublishError {
            code: e.code.as_str().to_string(),
            message: e.message,
        }
    }
}

impl From<Outcome> for PublishResult {
    fn from(o: Outcome) -> Self {
        PublishResult {
            id: o.id,
            duplicate: o.duplicate,
        }
    }
}

/// A stream that ended early: the status names the reason and carries the
/// last id sent, in the message and as `last-event-id` metadata.
fn ended_early(code: tonic::Code, reason: &str, last_id: Option<String>) -> Status {
    let resume = match &last_id {
        Some(id) => format!("resume with since_id={id}"),
        None => "resume with the since_id you last used".to_string(),
    };
    let mut status = Status::new(code, format!("{reason}; {resume}"));
    if let Some(value) = last_id.and_then(|id| MetadataValue::try_from(id).ok()) {
        status.metadata_mut().insert(LAST_EVENT_ID, value);
    }
    status
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Most events in one Subscribe message.
pub const MAX_SUBSCRIBE_BATCH: usize = 1024;

/// Turns deliveries that were waiting together into messages: the events
/// as one batch (or one message each), then the end of the stream if it
/// ended.
fn batch_messages(chunk: Vec<Delivery>, batched: bool) -> Vec<Result<SubscribeResponse, Status>> {
    let mut out = Vec::new();
    let mut events = Vec::new();
    let flush = |events: &mut Vec<proto::Event>,
                 out: &mut Vec<Result<SubscribeResponse, Status>>| {
        if events.is_empty() {
            return;
        }
        let message = if batched {
            subscribe_response::Message::Events(EventBatch {
                events: std::mem::take(events),
            })
        } else {
            subscribe_response::Message::Event(events.remove(0))
        };
        out.push(Ok(SubscribeResponse {
            message: Some(message),
        }));
    };
    for delivery in chunk {
        let end = match delivery {
            Delivery::Event(e) => {
                events.push(e.as_ref().into());
                if !batched {
                    flush(&mut events, &mut out);
                }
                continue;
            }
            Delivery::Lagged { last_id } => ended_early(
                tonic::Code::ResourceExhausted,
                "subscriber too slow: its buffer of events overflowed and it was dropped",
                last_id,
            ),
            Delivery::Closed { last_id } => {
                ended_early(tonic::Code::Unavailable, "broker is shutting down", last_id)
            }
            Delivery::Expired { last_id } => ended_early(
                tonic::Code::Unauthenticated,
                "token expired: subscribe again with a fresh token",
                last_id,
            ),
        };
        flush(&mut events, &mut out);
        out.push(Err(end));
        return out;
    }
    flush(&mut events, &mut out);
    out
}

#[tonic::async_trait]
impl EventBroker for GrpcService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let identity = identity(&request)?;
        let stamp = self.app.stamp(traceparent(request.metadata()));
        let drafts = request
            .into_inner()
            .events
            .into_iter()
            .map(Into::into)
            .collect();
        let outcomes = self.app.publish(&identity, drafts, &stamp)?;
        Ok(Response::new(PublishResponse {
            results: outcomes.into_iter().map(Into::into).collect(),
        }))
    }

    type PublishStreamStream = BoxStream<PublishAck>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let identity = identity(&request)?;
        let stamp = self.app.stamp(traceparent(request.metadata()));
        let app = self.app.clone();
        let mut next_sequence = 0u64;
        // An agent's presence lasts as long as its stream of publishes.
        let messages = Presenced {
            inner: request.into_inner(),
            // Only a caller that may publish is announced by publishing.
            presence: identity
                .require(crate::auth::rbac::PUBLISH)
                .ok()
                .and_then(|()| self.app.agent_stream(&identity, "publish")),
            reason: |message: &Result<PublishStreamRequest, Status>| {
                message.is_err().then_some(Reason::BrokenConnection)
            },
            at_end: Some(Reason::Closed),
        };
        let acks = messages.map(move |message| {
            let sequence = next_sequence;
            next_sequence += 1;
            let message = message?;
            let mut ack = PublishAck {
                sequence,
                ..Default::default()
            };
            match (message.event, message.events.is_empty()) {
                (Some(event), true) => {
                    ack.outcome = Some(match app.publish_one(&identity, event.into(), &stamp) {
                        Ok(o) => publish_ack::Outcome::Accepted(o.into()),
                        Err(e) => publish_ack::Outcome::Error(e.into()),
                    });
                }
                (None, false) => {
                    let drafts = message.events.into_iter().map(Into::into).collect();
                    match app.publish_each(&identity, drafts, &stamp) {
                        Ok(outcomes) => {
                            ack.outcomes = outcomes
                                .into_iter()
                                .map(|o| PublishOutcome {
                                    outcome: Some(match o {
                                        Ok(o) => publish_outcome::Outcome::Accepted(o.into()),
                                        Err(e) => publish_outcome::Outcome::Error(e.into()),
                                    }),
                                })
                                .collect();
                        }
                        Err(e) => ack.outcome = Some(publish_ack::Outcome::Error(e.into())),
                    }
                }
                (Some(_), false) => {
                    let e = ApiError::invalid("event and events: send one or the other");
                    ack.outcome = Some(publish_ack::Outcome::Error(e.into()));
                }
                (None, true) => {
                    let e = ApiError::invalid("event: required in every message (or events)");
                    ack.outcome = Some(publish_ack::Outcome::Error(e.into()));
                }
            }
            Ok(ack)
        });
        Ok(Response::new(Box::pin(acks)))
    }

    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let identity = identity(&request)?;
        let request = request.into_inner();
        let request_batch = request.max_batch;
        let params = SubscribeParams {
            types: request.types,
            since_id: request.since_id,
            tenant_id: request.tenant_id,
        };
        let (scope, subscription) = self.app.subscribe(&identity, &params)?;
        let status = SubscribeStatus {
            tenant_id: scope.label().to_string(),
            resumed: subscription.recovered.is_some(),
            recovered: subscription.recovered.unwrap_or(false),
            replayed: subscription.replay_len() as u64,
        };
        let subscription = Presenced {
            inner: subscription,
            presence: self.app.agent_stream(&identity, "subscribe"),
            reason: |delivery: &Delivery| match delivery {
                Delivery::Event(_) => None,
                Delivery::Lagged { .. } => Some(Reason::TooSlow),
                Delivery::Closed { .. } => Some(Reason::Shutdown),
                Delivery::Expired { .. } => Some(Reason::TokenExpired),
            },
            at_end: None,
        };
        let mut replayed = status.replayed as usize;
        let first = tokio_stream::once(Ok(SubscribeResponse {
            message: Some(subscribe_response::Message::Status(status)),
        }));
        let max_batch = (request_batch as usize).clamp(1, MAX_SUBSCRIBE_BATCH);
        // Replayed events are old by design: the latency is of live ones.
        let latency = self.latency.clone();
        let tracer = self.app.tracer().clone();
        // Whatever is already waiting, up to max_batch, goes in one message;
        // nothing waits to fill a batch.
        let events = futures_util::StreamExt::flat_map(
            futures_util::StreamExt::ready_chunks(subscription, max_batch),
            move |chunk| {
                let live = chunk.iter().skip(replayed).find_map(|d| match d {
                    Delivery::Event(e) => Some(e),
                    _ => None,
                });
                if let Some(event) = live {
                    latency.grpc(&event.timestamp);
                }
                replayed = replayed.saturating_sub(chunk.len());
                if !tracer.is_on() {
                    return futures_util::stream::iter(batch_messages(chunk, max_batch > 1));
                }
                let started = std::time::SystemTime::now();
                let events: Vec<_> = chunk
                    .iter()
                    .filter_map(|d| match d {
                        Delivery::Event(e) => Some(Arc::clone(e)),
                        _ => None,
                    })
                    .collect();
                let messages = batch_messages(chunk, max_batch > 1);
                tracer.delivered(
                    crate::otlp::Transport::Grpc,
                    events.iter().map(|e| &**e),
                    1,
                    started,
                );
                futures_util::stream::iter(messages)
            },
        );
        Ok(Response::new(Box::pin(first.chain(events))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Authenticator, Scopes, TokenKind};
    use crate::broker::{Broker, TypeFilter};
    use crate::config::Settings;
    use crate::tenant::TenantScope;

    fn app() -> (App, Broker) {
        let mut settings = Settings::ephemeral("presence-test-secret");
        settings.broker.subscriber_buffer = 4;
        let broker = Broker::new(settings.broker());
        let auth = Arc::new(Authenticator::new(b"s", Scopes::parse("")));
        (
            App::new(broker.clone(), auth, settings.limits.clone()),
            broker,
        )
    }

    /// The service, its broker, and a subscription to tenant `t`'s
    /// presence events.
    fn watched() -> (GrpcService, Broker, crate::broker::Subscription) {
        let (app, broker) = app();
        let filter = TypeFilter::parse(&["agent.*"]).unwrap();
        let watcher = broker
            .subscribe(TenantScope::One("t".into()), filter, None)
            .unwrap();
        (
            GrpcService::new(app, crate::metrics::EmitLatency::default()),
            broker,
            watcher,
        )
    }

    fn agent(expires_at: u64) -> Identity {
        Identity {
            kind: TokenKind::Backend,
            subject: None,
            tenant: Some("t".into()),
            scopes: Scopes::parse("events:subscribe"),
            expires_at,
            agent_id: Some("gpu-7".into()),
        }
    }

    async fn presence(watcher: &mut crate::broker::Subscription) -> (String, serde_json::Value) {
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), watcher.next())
            .await
            .expect("a presence event");
        match next {
            Some(Delivery::Event(e)) => (
                e.event_type.clone(),
                serde_json::from_str(e.data.get()).expect("json"),
            ),
            other => panic!("not an event: {other:?}"),
        }
    }

    async fn subscribe(service: &GrpcService, identity: Identity) -> BoxStream<SubscribeResponse> {
        let mut request = Request::new(SubscribeRequest {
            types: vec!["cost.*".into()],
            ..Default::default()
        });
        request.extensions_mut().insert(identity);
        service
            .subscribe(request)
            .await
            .expect("subscribed")
            .into_inner()
    }

    #[tokio::test]
    async fn a_subscription_ended_by_token_expiry_or_shutdown_says_so() {
        let (service, broker, mut watcher) = watched();

        // A token already past its exp and leeway: the stream ends at once.
        let mut stream = subscribe(&service, agent(1)).await;
        assert_eq!(presence(&mut watcher).await.0, "agent.connected");
        while stream.next().await.is_some() {}
        drop(stream);
        let (kind, data) = presence(&mut watcher).await;
        assert_eq!(kind, "agent.disconnected");
        assert_eq!(data["reason"], "token_expired");

        // A live token, and the broker shutting down.
        let mut stream = subscribe(&service, agent(crate::clock::unix_secs() + 600)).await;
        let (kind, data) = presence(&mut watcher).await;
        assert_eq!(
            (kind.as_str(), &data["stream"]),
            ("agent.connected", &serde_json::json!("subscribe"))
        );
        let first = stream.next().await;
        assert!(matches!(
            first,
            Some(Ok(SubscribeResponse {
                message: Some(subscribe_response::Message::Status(_))
            }))
        ));
        broker.close();
        while stream.next().await.is_some() {}
        drop(stream);
        // The watcher was closed too; the event is in history.
        let page = broker.history_page("t", None, &TypeFilter::parse(&["agent.*"]).unwrap(), 10);
        let last = page.events.last().expect("presence events in history");
        assert_eq!(last.event_type, "agent.disconnected");
        let data: serde_json::Value = serde_json::from_str(last.data.get()).unwrap();
        assert_eq!(data["reason"], "shutdown");
    }

    #[tokio::test]
    async fn a_subscription_dropped_as_too_slow_says_so() {
        let (service, broker, mut watcher) = watched();
        let mut stream = subscribe(&service, agent(crate::clock::unix_secs() + 600)).await;
        assert_eq!(presence(&mut watcher).await.0, "agent.connected");
        stream.next().await.expect("status").expect("status");
        // More cost events than its buffer of 4, unread: it is dropped.
        for i in 0..10 {
            broker.publish_one(crate::broker::tests::event(
                "t",
                &format!("c{i}"),
                "cost.updated",
            ));
        }
        while stream.next().await.is_some() {}
        drop(stream);
        let (kind, data) = presence(&mut watcher).await;
        assert_eq!(kind, "agent.disconnected");
        assert_eq!(data["reason"], "too_slow");
    }
}
