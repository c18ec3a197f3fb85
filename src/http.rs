//! The HTTP listener: health, readiness, metrics and REST publish; the
//! Socket.IO edge (`/ws`) is mounted on the same router. Handlers extract,
//! call [`App`], and render the result or the [`ApiError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::admission::{self, Admission, Admitted};
use crate::app::{ACTIVE_TENANT_HEADER, App};
use crate::error::{ApiError, Code};
use crate::event::json::drafts_from_body;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub app: App,
    /// False once shutdown has begun, so load balancers stop sending work.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Redis state, when Redis is configured.
    pub redis: Option<Arc<crate::store::Status>>,
    /// In development mode, the token `/console` is handed (loopback only).
    pub dev_token: Option<String>,
}

/// The address a request's connection came from (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Serves `router` on `listener` until `shutdown`, then waits for open
/// requests. This is what `axum::serve` does, with one difference that
/// matters at 10,000 sockets: hyper's read buffer is capped at 8 KiB per
/// connection (`max_buf_size`), where it would otherwise grow to 16 KiB
/// while reading a request head and stay allocated for a websocket's life.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::Tls>>,
    router: Router,
    admission: Arc<Admission>,
    header_read_timeout: Duration,
    write_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer, permit) = tokio::select! {
            accepted = admission::accept(&listener, &admission, "HTTP") => accepted,
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone().map_request(
            move |r: axum::http::Request<hyper::body::Incoming>| {
                let mut r = r.map(Body::new);
                r.extensions_mut().insert(Peer(peer));
                if r.uri().path().starts_with(crate::edge::PATH) {
                    own_head(&mut r);
                }
                r
            },
        ));
        // hyper enforces the header-read timeout only with a timer; it
        // also bounds how long an idle keep-alive connection waits for its
        // next request.
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(8192)
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(
                TokioIo::new(Admitted::http(
                    match &tls {
                        Some(tls) => tls.accept(crate::tls::Listener::Http, stream),
                        None => crate::tls::Transport::Plain(stream),
                    },
                    permit,
                    header_read_timeout,
                    write_timeout,
                )),
                service,
            )
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

/// Copies the request's URI and header values out of hyper's read buffer.
/// hyper hands them out as slices of its 8 KiB read buffer, and
/// engineioxide keeps a Socket.IO request's parts (and axum's
/// `OriginalUri`, a clone of the URI) for the socket's life: one kept slice
/// keeps the whole buffer, 8 KiB per socket. The copies are the request
/// head's size (under 1 KiB for a browser's). This runs before the router,
/// so axum's `OriginalUri` clones the copy.
fn own_head(request: &mut axum::http::Request<Body>) {
    if let Ok(uri) = Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    for value in request.headers_mut().values_mut() {
        if let Ok(owned) = header::HeaderValue::from_bytes(value.as_bytes()) {
            let sensitive = value.is_sensitive();
            *value = owned;
            value.set_sensitive(sensitive);
        }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/events", post(publish).get(recent))
        .route("/metrics", get(metrics))
        .merge(crate::webhook::rest::routes())
        .merge(crate::policy::rest::routes())
        .merge(crate::admin::rest::routes())
        .merge(crate::console::routes())
        .route("/v1/settings/mcp", get(mcp_settings).put(set_mcp_settings))
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
        "subscribers": state.app.subscriber_count(),
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

/// `GET /v1/events` parameters: `types` comma separated.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecentQuery {
    types: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/events?types=cost.*,alert.created&since=<id>&limit=100`: the
/// tenant's held events, oldest first, as
/// `{"events": [...], "recovered": bool, "more": bool}`.
async fn recent(
    State(state): State<HttpState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<RecentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let app = &state.app;
    let identity = authenticated(app, &headers).await?;
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
    let params = crate::app::RecentParams {
        types: q
            .types
            .map(|t| t.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default(),
        since: q.since,
        limit: q.limit,
    };
    let page = app.recent_events(&identity, &params)?;
    // The envelopes as they were published, not re-encoded.
    let mut body = String::from("{\"events\":[");
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.to_json());
    }
    body.push_str(&format!(
        "],\"recovered\":{},\"more\":{}}}",
        page.recovered, page.more
    ));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /v1/settings/mcp`: the tenant's MCP settings.
async fn mcp_settings(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let identity = authenticated(&state.app, &headers).await?;
    Ok(Json(state.app.mcp_settings(&identity).await?).into_response())
}

/// `PUT /v1/settings/mcp`: replaces them; fields left out take their
/// defaults, unknown fields are refused.
async fn set_mcp_settings(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let identity = authenticated(&state.app, &headers).await?;
    let bytes = axum::body::to_bytes(body, SETTINGS_BODY)
        .await
        .map_err(|_| ApiError::invalid(format!("body: larger than {SETTINGS_BODY} bytes")))?;
    let settings =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body: {e}")))?;
    Ok(Json(state.app.set_mcp_settings(&identity, settings).await?).into_response())
}

/// Largest settings body.
const SETTINGS_BODY: usize = 16 * 1024;

/// The caller, from the `authorization` and `x-active-tenant-id` headers.
pub(crate) async fn authenticated(
    app: &App,
    headers: &HeaderMap,
) -> Result<crate::auth::Identity, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    app.authenticate(
        header(header::AUTHORIZATION.as_str()),
        header(ACTIVE_TENANT_HEADER),
    )
    .await
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
) -> Result<Json<PublishReply>, ApiError> {
    let app = &state.app;
    let identity = authenticated(app, &headers).await?;
    let limit = app.max_request_bytes();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::invalid(format!(
            "body: larger than the limit of {limit} bytes (max batch x max event size)"
        ))
    })?;
    let drafts = drafts_from_body(&bytes)?;
    let stamp = app.stamp(headers.get("traceparent").and_then(|v| v.to_str().ok()));
    let outcomes = app.publish(&identity, drafts, &stamp)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The head's URI and values no longer point into the buffer they were
    /// parsed from (as hyper's do), and keep their text and sensitivity.
    #[test]
    fn own_head_copies_out_of_the_read_buffer() {
        let buffer =
            bytes::Bytes::from(b"/ws/?EIO=4&transport=websocket origin-value secret".to_vec());
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let uri = Uri::from_maybe_shared(buffer.slice(0..30)).expect("uri");
        let mut origin = header::HeaderValue::from_maybe_shared(buffer.slice(31..43)).expect("v");
        let mut secret = header::HeaderValue::from_maybe_shared(buffer.slice(44..50)).expect("v");
        secret.set_sensitive(true);
        origin.set_sensitive(false);
        let mut request = axum::http::Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        request.headers_mut().insert(header::ORIGIN, origin);
        request.headers_mut().insert(header::AUTHORIZATION, secret);
        let inside = |p: *const u8| range.contains(&(p as usize));
        assert!(inside(
            request.headers()[header::ORIGIN].as_bytes().as_ptr()
        ));
        assert!(inside(request.uri().path().as_ptr()));

        own_head(&mut request);

        assert_eq!(request.uri(), "/ws/?EIO=4&transport=websocket");
        assert!(!inside(request.uri().path().as_ptr()));
        let origin = &request.headers()[header::ORIGIN];
        assert_eq!(origin, "origin-value");
        assert!(!inside(origin.as_bytes().as_ptr()));
        assert!(!origin.is_sensitive());
        let secret = &request.headers()[header::AUTHORIZATION];
        assert_eq!(secret, "secret");
        assert!(!inside(secret.as_bytes().as_ptr()));
        assert!(secret.is_sensitive());
    }
}
