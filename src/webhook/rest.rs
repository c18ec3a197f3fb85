//! The webhooks REST surface on the HTTP listener: extract, authenticate
//! (before reading a body), call [`App::webhooks`], render. Errors are the
//! API's `{code, message}`.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::app::{Access, App};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::http::HttpState;

/// Largest request body of these routes.
const MAX_BODY: usize = 64 * 1024;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/webhooks", post(create).get(list))
        .route("/v1/webhooks/{id}", get(read).patch(update).delete(remove))
        .route("/v1/webhooks/{id}/rotate-secret", post(rotate))
        .route("/v1/webhooks/{id}/test", post(test))
        .route("/v1/webhooks/{id}/deliveries", get(deliveries))
        .route("/v1/webhooks/{id}/replay", post(replay))
}

async fn identity(app: &App, headers: &HeaderMap) -> Result<Identity, ApiError> {
    crate::http::authenticated(app, headers).await
}

/// Reads a JSON body (after authentication); an empty body is `{}`.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::invalid(format!("body: larger than {MAX_BODY} bytes")))?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    let view = hooks.create(&tenant, json_body(body).await?).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(State(s): State<HttpState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Read)?;
    let webhooks = hooks.list(&tenant).await?;
    Ok(Json(serde_json::json!({ "webhooks": webhooks })).into_response())
}

async fn read(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Read)?;
    Ok(Json(hooks.get(&tenant, &wh).await?).into_response())
}

async fn update(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    Ok(Json(hooks.update(&tenant, &wh, json_body(body).await?).await?).into_response())
}

async fn remove(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    hooks.delete(&tenant, &wh).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rotate(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    Ok(Json(hooks.rotate(&tenant, &wh, json_body(body).await?).await?).into_response())
}

async fn test(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    Ok(Json(hooks.test(&tenant, &wh).await?).into_response())
}

#[derive(Deserialize)]
struct DeliveriesQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn deliveries(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
    query: Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Read)?;
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
    let list = hooks
        .deliveries(&tenant, &wh, q.status.as_deref(), q.limit.unwrap_or(50))
        .await?;
    Ok(Json(serde_json::json!({ "deliveries": list })).into_response())
}

async fn replay(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(wh): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = identity(&s.app, &headers).await?;
    let (tenant, hooks) = s.app.webhooks(&id, Access::Write)?;
    let replayed = hooks.replay(&tenant, &wh, json_body(body).await?).await?;
    Ok((StatusCode::ACCEPTED, Json(replayed)).into_response())
}
