//! The settings of `serve`, assembled from each subsystem's own settings
//! (a configuration file, `TC_*` environment variables and flags, each
//! overriding the one before: [`file`]). Each subsystem owns
//! its settings struct and writes each default once: the listeners
//! ([`ListenSettings`]), authentication ([`AuthSettings`]), request limits
//! ([`Limits`]), the broker ([`BrokerConfig`]), the Socket.IO edge
//! ([`EdgeSettings`]) and Redis ([`StoreSettings`]). The README's
//! configuration table lists them all.

use std::net::SocketAddr;

pub use crate::app::Limits;
pub use crate::auth::settings::AuthSettings;
pub use crate::broker::BrokerConfig;
pub use crate::edge::{EdgeSettings, Overrides};
pub use crate::mcp::McpSettings;
pub use crate::otlp::OtlpSettings;
pub use crate::policy::PolicySettings;
pub use crate::projection::ProjectionSettings;
pub use crate::server::ListenSettings;
pub use crate::state::StateSettings;
pub use crate::store::StoreSettings;
pub use crate::telemetry::LogSettings;
pub use crate::tls::TlsSettings;
pub use crate::webhook::WebhookSettings;

pub mod file;

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// A configuration file (TOML; `config example` prints a complete one):
    /// its values are the defaults, the environment and flags override them.
    #[arg(long, env = "TC_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten, next_help_heading = "Listeners")]
    pub listen: ListenSettings,
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogSettings,
    #[command(flatten, next_help_heading = "TLS")]
    pub tls: TlsSettings,
    #[command(flatten, next_help_heading = "Tracing")]
    pub otlp: OtlpSettings,
    #[command(flatten, next_help_heading = "Authentication")]
    pub auth: AuthSettings,
    #[command(flatten, next_help_heading = "Requests")]
    pub limits: Limits,
    #[command(flatten, next_help_heading = "Broker")]
    pub broker: BrokerConfig,
    #[command(flatten, next_help_heading = "Socket.IO")]
    pub edge: EdgeSettings,
    #[command(flatten, next_help_heading = "Redis")]
    pub redis: StoreSettings,
    #[command(flatten, next_help_heading = "Kept state")]
    pub state: StateSettings,
    #[command(flatten, next_help_heading = "Webhooks")]
    pub webhooks: WebhookSettings,
    #[command(flatten, next_help_heading = "MCP")]
    pub mcp: McpSettings,
    #[command(flatten, next_help_heading = "MCP")]
    pub projections: ProjectionSettings,
    #[command(flatten, next_help_heading = "Policies")]
    pub policies: PolicySettings,
}

impl Settings {
    /// Defaults with both listeners on ephemeral loopback ports: for tests
    /// and benchmarks that start the server in-process.
    pub fn ephemeral(secret: &str) -> Self {
        let mut settings: Self = defaults();
        settings.listen.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.listen.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.auth.jwt_secret = Some(secret.to_string());
        settings.state.in_memory = true;
        settings
    }

    /// The broker's settings, with the resume margin Redis calls for.
    pub fn broker(&self) -> BrokerConfig {
        BrokerConfig {
            resume_margin: self.redis.resume_margin(),
            ..self.broker.clone()
        }
    }
}

/// A settings group at the defaults its flags declare (and what the
/// environment sets, as `serve` would read it).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"));
    // Every field has a default or is optional: an empty command line
    // parses unless the environment holds a bad value, which `serve`
    // would refuse the same way.
    command
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| panic!("settings defaults must parse: {e}"))
}

/// Value parsers shared by the settings of every subsystem: each error
/// says what was wrong with the value.
pub mod parse {
    use std::time::Duration;

    pub fn positive(s: &str) -> Result<usize, String> {
        match s.trim().parse::<usize>() {
            Ok(0) => Err("must be at least 1".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{s:?} is not a whole number")),
        }
    }

    pub fn positive_u32(s: &str) -> Result<u32, String> {
        let n = positive(s)?;
        u32::try_from(n).map_err(|_| format!("{n} is too large"))
    }

    pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
        if s.trim() == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like 0, 500ms or 2s: {e}"))
    }

    pub fn duration(s: &str) -> Result<Duration, String> {
        match humantime::parse_duration(s.trim()) {
            Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
            Ok(d) => Ok(d),
            Err(e) => Err(format!("{s:?} is not a duration like 30s, 10m or 1h: {e}")),
        }
    }
}
