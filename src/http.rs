//! The HTTP listener: health, readiness and REST publish. Later surfaces
//! (`/ws`, `/mcp`, `/metrics`) mount on this same router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::app::App;
use crate::error::{ApiError, Code};
use crate::event::EventDraft;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub app: App,
    /// False once shutdown has begun, so load balancers stop sending work.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Redis state, when Redis is configured.
    pub redis: Option<Arc<crate::store::Status>>,
}

/// Serves `router` on `listener` until `shutdown`, then waits for open
/// requests. This is what `axum::serve` does, with one difference that
/// matters at 10,000 sockets: hyper's read buffer is capped at 8 KiB per
/// connection (`max_buf_size`), where it would otherwise grow to 16 KiB
/// while reading a request head and stay allocated for a websocket's life.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    use tower::ServiceExt;
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .map_request(|r: axum::http::Request<hyper::body::Incoming>| r.map(Body::new)),
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(8192)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = shutdown.cancelled() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("HTTP connection ended: {e}");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/events", post(publish))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let ready = state.ready.load(Ordering::Acquire);
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "shutting_down" },
        "subscribers": state.app.broker.subscriber_count(),
    });
    if let Some(redis) = &state.redis {
        body["redis"] = redis.snapshot();
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        Code::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

/// `data` is kept as raw JSON text, so it round-trips exactly; `null` is a
/// valid payload, distinct from a missing field.
fn raw_present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// One event in a REST publish body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    #[serde(default)]
    id: String,
    #[serde(rename = "type", default)]
    event_type: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default, deserialize_with = "raw_present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    trace_id: String,
    /// Accepted so that a delivered envelope can be posted back; the broker
    /// stamps its own.
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<String>,
}

/// A REST publish body: one event (`{"type":…,"data":…}`) or a batch
/// (`{"events":[…]}`), parsed in one pass. (`#[serde(flatten)]` would be
/// shorter but cannot carry a `RawValue`.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    events: Option<Vec<JsonEvent>>,
    #[serde(default)]
    id: String,
    #[serde(rename = "type", default)]
    event_type: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default, deserialize_with = "raw_present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    trace_id: String,
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<String>,
}

impl PublishBody {
    fn into_drafts(self) -> Result<Vec<EventDraft>, ApiError> {
        let single_set = !(self.id.is_empty()
            && self.event_type.is_empty()
            && self.tenant_id.is_empty()
            && self.data.is_none()
            && self.trace_id.is_empty());
        match self.events {
            Some(_) if single_set => Err(ApiError::invalid(
                "body: send either one event ({\"type\":…,\"data\":…}) or {\"events\":[…]}, not both",
            )),
            Some(events) => Ok(events.into_iter().map(Into::into).collect()),
            None => Ok(vec![
                JsonEvent {
                    id: self.id,
                    event_type: self.event_type,
                    tenant_id: self.tenant_id,
                    data: self.data,
                    trace_id: self.trace_id,
                    _timestamp: None,
                }
                .into(),
            ]),
        }
    }
}

impl From<JsonEvent> for EventDraft {
    fn from(e: JsonEvent) -> Self {
        EventDraft {
            id: e.id,
            event_type: e.event_type,
            tenant_id: e.tenant_id,
            data: e.data.map(|d| d.get().to_string()).unwrap_or_default(),
            trace_id: e.trace_id,
        }
    }
}

#[derive(Serialize)]
struct PublishReply {
    results: Vec<PublishResultJson>,
}

#[derive(Serialize)]
struct PublishResultJson {
    id: String,
    duplicate: bool,
}

/// `POST /v1/events`: the same checks and answers as gRPC `Publish`.
async fn publish(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PublishReply>, Response> {
    let app = &state.app;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let identity = app
        .authenticate(
            header(header::AUTHORIZATION.as_str()),
            header(crate::grpc::ACTIVE_TENANT),
        )
        .await
        .map_err(unauthorized)?;
    let limit = app.limits.max_request_bytes();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::invalid(format!(
            "body: larger than the limit of {limit} bytes (max batch x max event size)"
        ))
        .into_response()
    })?;
    let drafts = parse_body(&bytes).map_err(IntoResponse::into_response)?;
    let stamp = app.stamp(header("traceparent"));
    let outcomes = app
        .publish(&identity, drafts, &stamp)
        .map_err(IntoResponse::into_response)?;
    Ok(Json(PublishReply {
        results: outcomes
            .into_iter()
            .map(|o| PublishResultJson {
                id: o.id,
                duplicate: o.duplicate,
            })
            .collect(),
    }))
}

fn parse_body(bytes: &[u8]) -> Result<Vec<EventDraft>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "body: empty: send {\"type\":…,\"data\":…} or {\"events\":[…]}",
        ));
    }
    serde_json::from_slice::<PublishBody>(bytes)
        .map_err(|e| ApiError::invalid(format!("body: {e}")))?
        .into_drafts()
}

fn unauthorized(e: ApiError) -> Response {
    let mut response = e.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}
