//! The policies REST surface on the HTTP listener: extract, authenticate
//! (before reading a body), call [`App`], render. Errors are the API's
//! `{code, message}`.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::app::SimulateParams;
use crate::error::ApiError;
use crate::http::{HttpState, authenticated};

/// Largest request body of these routes.
const MAX_BODY: usize = 64 * 1024;

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/policies", get(list))
        .route("/v1/policies/{id}", get(read).put(put).delete(remove))
        .route("/v1/policy-simulations", post(simulate))
}

async fn body_bytes(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::invalid(format!("body: larger than {MAX_BODY} bytes")))
}

async fn list(State(s): State<HttpState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = authenticated(&s.app, &headers).await?;
    let policies = s.app.list_policies(&id).await?;
    Ok(Json(serde_json::json!({ "policies": policies })).into_response())
}

async fn read(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(policy): Path<String>,
) -> Result<Response, ApiError> {
    let id = authenticated(&s.app, &headers).await?;
    Ok(Json(s.app.get_policy(&id, &policy).await?).into_response())
}

/// Creates (201) or replaces (200) the policy the path names.
async fn put(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(policy): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = authenticated(&s.app, &headers).await?;
    let bytes = body_bytes(body).await?;
    let written = s.app.put_policy(&id, Some(&policy), &bytes).await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(written.policy)).into_response())
}

async fn remove(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(policy): Path<String>,
) -> Result<Response, ApiError> {
    let id = authenticated(&s.app, &headers).await?;
    s.app.delete_policy(&id, &policy).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `{"policy": {...}}` or `{"policy_id": "..."}`, with `window` and
/// `until`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateBody {
    policy: Option<serde_json::Value>,
    policy_id: Option<String>,
    window: Option<String>,
    until: Option<String>,
}

async fn simulate(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = authenticated(&s.app, &headers).await?;
    let bytes = body_bytes(body).await?;
    let body: SimulateBody =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body: {e}")))?;
    let params = SimulateParams {
        policy: body.policy,
        policy_id: body.policy_id,
        window: body.window,
        until: body.until,
    };
    Ok(Json(s.app.simulate_policy(&id, &params).await?).into_response())
}
