//! The live event console at `/console`: a page, its script and style, and
//! the vendored socket.io-client browser bundle (MIT, its license served
//! beside it), all embedded in the binary: nothing to build or install.
//! The page connects to `/ws` with the token pasted into it, as any
//! Socket.IO client does; in development mode the broker hands it the
//! development token, to loopback callers only.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::{ApiError, Code};
use crate::http::{HttpState, Peer};

const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/console/console.css"),
    ),
    (
        "socket.io.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/console/socket.io.min.js"),
    ),
    (
        "socket.io-client.LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../assets/console/socket.io-client.LICENSE"),
    ),
];

const INDEX: &[u8] = include_bytes!("../assets/console/index.html");

/// Scripts, styles and connections from this origin only; no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/dev-token", get(dev_token))
        .route("/console/{file}", get(asset))
}

fn served(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn index() -> Response {
    served("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .map(|(_, content_type, body)| served(content_type, body))
        .ok_or_else(|| ApiError::new(Code::NotFound, format!("/console/{file}: no such file")))
}

/// The development token, in development mode, to a caller on this host.
async fn dev_token(
    State(s): State<HttpState>,
    peer: Option<axum::Extension<Peer>>,
) -> Result<Response, ApiError> {
    let loopback = peer.is_some_and(|p| p.0.0.ip().is_loopback());
    match (&s.dev_token, loopback) {
        (Some(token), true) => {
            Ok(axum::Json(serde_json::json!({ "token": token })).into_response())
        }
        _ => Err(ApiError::new(
            Code::NotFound,
            "no development token: paste a token (development mode only, from this host)",
        )),
    }
}
