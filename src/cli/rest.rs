//! The REST client of the commands that read or change kept state on a
//! running broker (`settings mcp`, `policy`): its HTTP address, the
//! bearer token and the active tenant, and answers read as the API's
//! `{code, message}` on failure.

use anyhow::{Context, bail};
use clap::Args;
use reqwest::{Method, Url};

/// Where the broker's HTTP listener is, and who asks.
#[derive(Debug, Clone, Args)]
pub struct RestArgs {
    /// The broker's HTTP address.
    #[arg(long, env = "TC_HTTP_SERVER", default_value = "http://127.0.0.1:8080")]
    pub http_server: String,
    /// Bearer token.
    #[arg(long, env = "TC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant to act for, for a Cognito user of several tenants.
    #[arg(long, env = "TC_ACTIVE_TENANT")]
    pub active_tenant: Option<String>,
    #[command(flatten)]
    pub ca: crate::tls::CaArgs,
}

/// `text` as one path segment: letters, digits, `-` and `_` as they are,
/// every other byte percent-encoded.
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub struct Rest {
    client: reqwest::Client,
    base: Url,
}

impl Rest {
    /// `scopes`: what the token needs, for the message when there is none.
    pub fn new(args: &RestArgs, scopes: &str) -> anyhow::Result<Self> {
        let token = args
            .token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .with_context(|| format!("no token: pass --token or set TC_TOKEN ({scopes})"))?;
        let base = Url::parse(args.http_server.trim()).with_context(|| {
            format!(
                "--http-server {:?} is not a URL like http://127.0.0.1:8080",
                args.http_server
            )
        })?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", token.trim())
                .parse()
                .context("token: contains characters that cannot go in a header")?,
        );
        if let Some(tenant) = args.active_tenant.as_deref().filter(|t| !t.is_empty()) {
            headers.insert(
                crate::app::ACTIVE_TENANT_HEADER,
                tenant
                    .parse()
                    .context("--active-tenant: not a header value")?,
            );
        }
        let client = crate::tls::http_client(&args.ca)?
            .default_headers(headers)
            .build()
            .context("HTTP client")?;
        Ok(Self { client, base })
    }

    /// `path` below any path the address has (a broker behind a prefix).
    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        url
    }

    /// One call; its JSON answer (`null` for 204), or the API's error as
    /// `code: message`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = self.url(path);
        let mut request = self.client.request(method, url.clone());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}: is the broker running?"))?;
        let status = response.status();
        let text = response.text().await.context("reading the answer")?;
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(serde_json::Value::Null);
        }
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{url} answered {status}, not JSON"))?;
        if !status.is_success() {
            let code = value["code"].as_str().unwrap_or("error");
            let message = value["message"].as_str().unwrap_or(text.as_str());
            bail!("{code}: {message}");
        }
        Ok(value)
    }
}
