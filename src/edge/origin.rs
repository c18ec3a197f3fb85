//! Which browser origins may connect (`CORS_ORIGIN`). The handshake check
//! is what enforces it (a WebSocket upgrade is not subject to CORS); the
//! CORS layer makes the same answer visible to browsers' XHR polling.
//! A request without an `Origin` header is not from a browser and is
//! allowed.

use axum::http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// `CORS_ORIGIN=*`.
    Any,
    /// Unset: `http(s)://localhost`, `127.0.0.1` and `[::1]` on any port.
    Localhost,
    /// Exact origins, e.g. `https://app.example.com`.
    List(Vec<String>),
}

impl Origins {
    /// Parses `CORS_ORIGIN`: comma-separated origins, `*`, or unset.
    pub fn parse(setting: Option<&str>) -> Self {
        let list: Vec<String> = setting
            .unwrap_or_default()
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        if list.is_empty() {
            Origins::Localhost
        } else if list.iter().any(|o| o == "*") {
            Origins::Any
        } else {
            Origins::List(list)
        }
    }

    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        match self {
            Origins::Any => true,
            Origins::List(list) => list.contains(&origin),
            Origins::Localhost => is_localhost(&origin),
        }
    }

    /// The CORS layer for the HTTP router.
    pub fn cors_layer(&self) -> CorsLayer {
        let origins = self.clone();
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
                origin.to_str().is_ok_and(|o| origins.allows(o))
            }))
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("traceparent"),
                header::HeaderName::from_static("x-active-tenant-id"),
            ])
            .allow_credentials(true)
    }
}

fn is_localhost(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || is_port(port) => return h == "::1",
            _ => return false,
        }
    } else {
        match rest.split_once(':') {
            Some((h, port)) if is_port(&format!(":{port}")) => h,
            Some(_) => return false,
            None => rest,
        }
    };
    matches!(host, "localhost" | "127.0.0.1")
}

fn is_port(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_by_default() {
        let o = Origins::parse(None);
        for ok in [
            "http://localhost:5173",
            "https://localhost",
            "http://127.0.0.1:3000",
            "http://[::1]:8080",
        ] {
            assert!(o.allows(ok), "{ok}");
        }
        for bad in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://localhost:80/x",
            "file://localhost",
            "http://127.0.0.1.nip.io",
            "null",
        ] {
            assert!(!o.allows(bad), "{bad}");
        }
    }

    #[test]
    fn explicit_lists_and_any() {
        let o = Origins::parse(Some("https://app.example.com, https://admin.example.com/"));
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("https://ADMIN.example.com"));
        assert!(!o.allows("http://localhost:3000"));
        assert!(!o.allows("https://app.example.com.evil"));
        assert_eq!(Origins::parse(Some("*")), Origins::Any);
        assert!(Origins::parse(Some(" ")).allows("http://localhost"));
    }
}
