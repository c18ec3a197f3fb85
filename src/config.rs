//! Settings of `serve`, from flags or `TC_*` environment variables (flags
//! win). Every setting and its default is in the README's configuration
//! table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::app::Limits;
use crate::auth::Scopes;
use crate::auth::cognito::CognitoConfig;
use crate::broker::BrokerConfig;
use crate::edge::EdgeConfig;
use crate::edge::origin::Origins;
use crate::edge::ratelimit::Limit;
use crate::edge::rooms::RateLimits;
use crate::event::check_identifier;
use crate::store::{StoreConfig, Target};

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
    #[arg(long, env = "TC_DEFAULT_SCOPES", default_value = crate::auth::rbac::DEFAULT_SCOPES)]
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

    /// Cognito user pool issuer, e.g.
    /// `https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123`.
    /// Setting it (or region and pool id) turns Cognito RS256 tokens on.
    #[arg(long, env = "TC_COGNITO_ISSUER")]
    pub cognito_issuer: Option<String>,

    /// Cognito region (with `TC_COGNITO_USER_POOL_ID`, instead of the issuer).
    #[arg(long, env = "TC_COGNITO_REGION")]
    pub cognito_region: Option<String>,

    /// Cognito user pool id (with `TC_COGNITO_REGION`).
    #[arg(long, env = "TC_COGNITO_USER_POOL_ID")]
    pub cognito_user_pool_id: Option<String>,

    /// JWKS URL (default: `<issuer>/.well-known/jwks.json`).
    #[arg(long, env = "TC_COGNITO_JWKS_URL")]
    pub cognito_jwks_url: Option<String>,

    /// The app client id Cognito ID tokens must carry as `aud`.
    #[arg(long, env = "TC_COGNITO_CLIENT_ID")]
    pub cognito_client_id: Option<String>,

    /// Scopes of every Cognito user.
    #[arg(long, env = "TC_COGNITO_SCOPES", default_value = "events:subscribe")]
    pub cognito_scopes: String,

    /// Least time between JWKS re-fetches caused by unknown key ids.
    #[arg(long, env = "TC_JWKS_MIN_REFETCH", default_value = "30s", value_parser = duration)]
    pub jwks_min_refetch: Duration,

    /// Timeout of one JWKS fetch.
    #[arg(long, env = "TC_JWKS_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub jwks_timeout: Duration,

    /// JSON file of Cognito users' tenant memberships
    /// (`{"<cognito_sub>": ["tenant-a", …]}`), re-read when it changes.
    #[arg(long, env = "TC_MEMBERSHIPS_FILE")]
    pub memberships_file: Option<PathBuf>,

    /// Browser origins allowed to connect, comma separated, or `*`.
    /// Unset: localhost on any port.
    #[arg(long, env = "CORS_ORIGIN")]
    pub cors_origin: Option<String>,

    /// Events per second emitted to one tenant's sockets.
    #[arg(long, env = "TC_RATE_LIMIT_PER_TENANT", default_value_t = 100, value_parser = positive_u32)]
    pub rate_limit_per_tenant: u32,

    /// Per-tenant rate limits, e.g. `tenant-a=1000,tenant-b=5000`.
    #[arg(long, env = "TC_RATE_LIMIT_OVERRIDES", default_value = "", value_parser = overrides)]
    pub rate_limit_overrides: Overrides,

    /// Events waiting per tenant above its rate before the oldest is dropped.
    #[arg(long, env = "TC_RATE_LIMIT_QUEUE", default_value_t = 1000, value_parser = positive)]
    pub rate_limit_queue: usize,

    /// Socket.IO packets buffered per socket before it counts as too slow.
    #[arg(long, env = "TC_SOCKET_BUFFER", default_value_t = 1024, value_parser = positive)]
    pub socket_buffer: usize,

    /// Redis: `redis://[:password@]host:port[/db]`, `rediss://` for TLS, or
    /// several node URLs separated by commas for Redis Cluster. Unset: a
    /// single instance with in-memory history only.
    #[arg(long, env = "TC_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Treat a single `TC_REDIS_URL` as a Redis Cluster seed node.
    #[arg(long, env = "TC_REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,

    /// Stream partitions (each a Redis Cluster hash tag, and one relay
    /// reader per instance). Every instance must use the same number.
    #[arg(long, env = "TC_REDIS_PARTITIONS", default_value_t = 4, value_parser = positive_u32)]
    pub redis_partitions: u32,

    /// Most entries kept per event-type stream (approximate, `MAXLEN ~`).
    #[arg(long, env = "TC_REDIS_STREAM_MAX_LEN", default_value_t = 100_000, value_parser = positive)]
    pub redis_stream_max_len: usize,

    /// Oldest entry kept per event-type stream (approximate, `MINID ~`).
    #[arg(long, env = "TC_REDIS_STREAM_MAX_AGE", default_value = "24h", value_parser = duration)]
    pub redis_stream_max_age: Duration,

    /// Events waiting to be written while Redis is slow or down; past it,
    /// events are still delivered locally but lost to other instances.
    #[arg(long, env = "TC_REDIS_BUFFER", default_value_t = 100_000, value_parser = positive)]
    pub redis_buffer: usize,

    /// With Redis: a resume also replays events accepted up to this long
    /// before the resume point (instances see events in different orders).
    #[arg(long, env = "TC_RESUME_MARGIN", default_value = "2s", value_parser = duration_or_zero)]
    pub resume_margin: Duration,

    /// How often per-tenant rate limits are re-read from Redis
    /// (`tc:ratelimits`).
    #[arg(long, env = "TC_RATE_LIMITS_REFRESH", default_value = "5s", value_parser = duration)]
    pub rate_limits_refresh: Duration,

    /// This instance's id in Redis entries (default: random at start).
    #[arg(long, env = "TC_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Development mode (no `TC_JWT_SECRET`) keeps its generated secret in
    /// this file for `token` and `check-token` (default:
    /// `$XDG_STATE_HOME` or `~/.local/state`, then
    /// `tensorcost-events/dev-secret`).
    #[arg(long, env = "TC_DEV_SECRET_FILE")]
    pub dev_secret_file: Option<PathBuf>,

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

fn positive_u32(s: &str) -> Result<u32, String> {
    let n = positive(s)?;
    u32::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// Per-tenant overrides of the emit rate limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides(pub HashMap<String, u32>);

fn overrides(s: &str) -> Result<Overrides, String> {
    let mut map = HashMap::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (tenant, rate) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not tenant=events_per_second"))?;
        check_identifier(tenant.trim()).map_err(|r| format!("tenant {tenant:?}: {r}"))?;
        let rate = positive_u32(rate).map_err(|r| format!("{entry:?}: {r}"))?;
        map.insert(tenant.trim().to_string(), rate);
    }
    Ok(Overrides(map))
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 0, 500ms or 2s: {e}"))
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
            resume_margin: if self.redis_url.is_some() {
                self.resume_margin
            } else {
                Duration::ZERO
            },
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.max_event_bytes,
            max_batch: self.max_batch,
        }
    }

    /// The Redis target and store settings, if Redis is configured.
    pub fn store(&self) -> Result<Option<(Target, StoreConfig)>, String> {
        let Some(url) = self.redis_url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let target = Target::parse(url, self.redis_cluster)?;
        let instance_id = match &self.instance_id {
            Some(id) => {
                check_identifier(id).map_err(|r| format!("TC_INSTANCE_ID: {r}"))?;
                id.clone()
            }
            None => uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        };
        Ok(Some((
            target,
            StoreConfig {
                partitions: self.redis_partitions,
                stream_max_len: self.redis_stream_max_len,
                stream_max_age: self.redis_stream_max_age,
                buffer: self.redis_buffer,
                warm_window: self.history_max_age.min(self.redis_stream_max_age),
                instance_id,
            },
        )))
    }

    pub fn default_scopes(&self) -> Scopes {
        Scopes::parse(&self.default_scopes.replace(',', " "))
    }

    pub fn cognito_scopes(&self) -> Scopes {
        Scopes::parse(&self.cognito_scopes.replace(',', " "))
    }

    /// The Cognito settings, if Cognito is configured; an error names what
    /// is missing.
    pub fn cognito(&self) -> Result<Option<CognitoConfig>, String> {
        let nonempty = |o: &Option<String>| {
            o.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        let issuer = match (
            nonempty(&self.cognito_issuer),
            nonempty(&self.cognito_region),
            nonempty(&self.cognito_user_pool_id),
        ) {
            (Some(issuer), _, _) => issuer,
            (None, Some(region), Some(pool)) => CognitoConfig::issuer_for(&region, &pool),
            (None, Some(_), None) => {
                return Err("TC_COGNITO_REGION is set but TC_COGNITO_USER_POOL_ID is not".into());
            }
            (None, None, Some(_)) => {
                return Err("TC_COGNITO_USER_POOL_ID is set but TC_COGNITO_REGION is not".into());
            }
            (None, None, None) => return Ok(None),
        };
        let client_id = nonempty(&self.cognito_client_id).ok_or(
            "TC_COGNITO_CLIENT_ID is required with Cognito: ID tokens are checked against it",
        )?;
        Ok(Some(CognitoConfig {
            jwks_url: nonempty(&self.cognito_jwks_url)
                .unwrap_or_else(|| CognitoConfig::jwks_url_for(&issuer)),
            issuer,
            client_id,
            min_refetch: self.jwks_min_refetch,
            fetch_timeout: self.jwks_timeout,
        }))
    }

    pub fn edge(&self) -> EdgeConfig {
        EdgeConfig {
            origins: Origins::parse(self.cors_origin.as_deref()),
            limits: RateLimits {
                default: Limit {
                    per_second: self.rate_limit_per_tenant,
                    queue: self.rate_limit_queue,
                },
                overrides: self.rate_limit_overrides.0.clone(),
            },
            socket_buffer: self.socket_buffer,
        }
    }
}
