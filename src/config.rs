//! Settings of `serve`, from flags or `TC_*` environment variables (flags
//! win). Every setting and its default is in the README's configuration
//! table.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::app::Limits;
use crate::auth::Scopes;
use crate::broker::BrokerConfig;

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// gRPC listen address.
    #[arg(long, env = "TC_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address (health, readiness, REST publish).
    #[arg(long, env = "TC_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Shared secret for HS256 tokens. Unset: development mode with a
    /// generated secret. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "TC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Scopes of a token that has no `scope`/`scopes` claim.
    #[arg(
        long,
        env = "TC_DEFAULT_SCOPES",
        default_value = "events:publish events:subscribe"
    )]
    pub default_scopes: String,

    /// Largest event `data`, in bytes of JSON text.
    #[arg(long, env = "TC_MAX_EVENT_BYTES", default_value_t = 65_536, value_parser = positive)]
    pub max_event_bytes: usize,

    /// Most events in one publish call.
    #[arg(long, env = "TC_MAX_BATCH", default_value_t = 256, value_parser = positive)]
    pub max_batch: usize,

    /// Most events kept per tenant for resume (`since_id`).
    #[arg(long, env = "TC_HISTORY_MAX_EVENTS", default_value_t = 10_000, value_parser = positive)]
    pub history_max_events: usize,

    /// Oldest event kept per tenant for resume, e.g. `1h`, `15m`.
    #[arg(long, env = "TC_HISTORY_MAX_AGE", default_value = "1h", value_parser = duration)]
    pub history_max_age: Duration,

    /// Most bytes of events kept per tenant for resume.
    #[arg(long, env = "TC_HISTORY_MAX_BYTES", default_value_t = 64 << 20, value_parser = positive)]
    pub history_max_bytes: usize,

    /// Most recently dispatched ids remembered to drop retried publishes.
    #[arg(long, env = "TC_DEDUPE_MAX_IDS", default_value_t = 100_000, value_parser = positive)]
    pub dedupe_max_ids: usize,

    /// How long a dispatched id is remembered, e.g. `10m`.
    #[arg(long, env = "TC_DEDUPE_MAX_AGE", default_value = "10m", value_parser = duration)]
    pub dedupe_max_age: Duration,

    /// Events buffered per subscriber before it is dropped as too slow.
    #[arg(long, env = "TC_SUBSCRIBER_BUFFER", default_value_t = 1024, value_parser = positive)]
    pub subscriber_buffer: usize,

    /// Once listening, write the bound addresses here as JSON
    /// (`{"grpc":"127.0.0.1:50051","http":"127.0.0.1:8080"}`): for
    /// supervisors and tests that bind port 0.
    #[arg(long, env = "TC_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?} is not a duration like 30s, 10m or 1h: {e}")),
    }
}

impl Settings {
    /// Defaults with both listeners on ephemeral loopback ports: for tests
    /// and benchmarks that start the server in-process.
    pub fn ephemeral(secret: &str) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        // Parsing an empty command line cannot fail: every field has a default.
        let mut settings = Wrapper::try_parse_from(["serve"])
            .map(|w| w.settings)
            .unwrap_or_else(|e| panic!("defaults must parse: {e}"));
        settings.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.jwt_secret = Some(secret.to_string());
        settings
    }

    pub fn broker(&self) -> BrokerConfig {
        BrokerConfig {
            history_max_events: self.history_max_events,
            history_max_age: self.history_max_age,
            history_max_bytes: self.history_max_bytes,
            dedupe_max_ids: self.dedupe_max_ids,
            dedupe_max_age: self.dedupe_max_age,
            subscriber_buffer: self.subscriber_buffer,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.max_event_bytes,
            max_batch: self.max_batch,
        }
    }

    pub fn default_scopes(&self) -> Scopes {
        Scopes::parse(&self.default_scopes.replace(',', " "))
    }
}
