//! Redis: durable history and delivery between instances.
//!
//! Local dispatch never waits on Redis. After it, each accepted event is
//! offered to the [`sink`], which hands it to the [`writer`]; the writer
//! appends it to its type's stream (`XADD … MAXLEN ~`), pipelined. Every
//! instance runs one [`relay`] reader per partition that reads what the
//! others wrote, in each stream's order, and hands it to its broker, whose
//! dedupe window drops the instance's own events and anything already
//! delivered. Keys are in [`keys`], the entry format in [`entry`].
//!
//! Failure. While Redis is down the writer keeps what it has not written in
//! a bounded buffer and retries ([`retry`]); past the bound new events are
//! delivered locally but lost to other instances, counted and logged.
//! Readers keep their stream positions across reconnects, so nothing
//! written before or after an outage is skipped.
//!
//! History. The broker's in-memory history is the resume source; with
//! Redis it is warmed from the streams at start (the last
//! `TC_HISTORY_MAX_AGE`) and kept current by the relay, so a client
//! resumes on any instance.
//!
//! Shutdown. [`Store::stop`] stops the relays and gives the writer up to
//! [`FLUSH_TIMEOUT`] to write what is still waiting; it returns when every
//! task of the store has ended.

pub mod conn;
pub(crate) mod entry;
pub mod keys;
mod own;
mod relay;
mod retry;
mod sink;
mod status;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::parse::{duration, duration_or_zero, positive, positive_u32};
use crate::event::check_identifier;
pub use conn::{Conn, Lazy, Target};
pub use status::Status;

/// How long the writer gets at shutdown to write what is still waiting.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Redis settings as flags and `TC_*` variables of `serve`; each default
/// written once, here. docs/redis.md explains them.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreSettings {
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
}

impl StoreSettings {
    /// The Redis target and store settings, if Redis is configured.
    /// `history_max_age` bounds how far back history is warmed at start.
    pub fn config(
        &self,
        history_max_age: Duration,
        max_event_bytes: usize,
    ) -> Result<Option<(Target, StoreConfig)>, String> {
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
                warm_window: history_max_age.min(self.redis_stream_max_age),
                instance_id,
                max_event_bytes,
            },
        )))
    }

    /// The broker's resume margin: this setting with Redis, zero without.
    pub fn resume_margin(&self) -> Duration {
        if self
            .redis_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
        {
            self.resume_margin
        } else {
            Duration::ZERO
        }
    }
}

/// The store's settings, parsed.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub partitions: u32,
    pub stream_max_len: usize,
    pub stream_max_age: Duration,
    /// Events waiting to be written before new ones are lost to replay.
    pub buffer: usize,
    /// How far back the in-memory history is warmed at start.
    pub warm_window: Duration,
    /// This instance's id, written with each event.
    pub instance_id: String,
    /// Largest `data` of an event read from Redis (`TC_MAX_EVENT_BYTES`).
    pub max_event_bytes: usize,
}

/// Counters and gauges of the store.
#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    /// 1 while the last Redis operation succeeded.
    pub up: Gauge,
    /// Events accepted here and waiting to be written.
    pub buffered: Gauge,
    pub written: Counter,
    /// Events delivered locally but never written: lost to other instances.
    pub lost: Counter,
    pub write_errors: Counter,
    /// Events read back from other instances and delivered here.
    pub relayed: Counter,
    /// Milliseconds between an entry's append and its relay here (last seen).
    pub relay_lag_ms: Gauge,
    /// Stream entries skipped because they are not an event that follows
    /// the rules.
    pub invalid: Counter,
    /// This instance's own entries a relay passed over without reading
    /// them back.
    pub own_passed: Counter,
    /// Keys skipped because they are not streams where streams should be.
    pub skipped_keys: Counter,
}

/// The running store: the writer and one relay per partition.
pub struct Store {
    status: Arc<Status>,
    target: Target,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Store {
    /// Starts the writer and one relay reader per partition. Returns the
    /// store and the writer's sink, for the broker's publish path
    /// ([`Broker::set_persist`]). Returns at once: Redis being down at start
    /// is an outage like any other.
    pub fn start(
        target: Target,
        config: StoreConfig,
        broker: &Broker,
        metrics: StoreMetrics,
    ) -> (Self, Box<dyn crate::broker::Persist>) {
        let status = Arc::new(Status::new(config.partitions, metrics.clone()));
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        let sink = Box::new(sink::Sink::new(tx, metrics));
        let config = Arc::new(config);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let own = Arc::new(own::OwnEntries::new());
        tasks.spawn(writer::run(
            rx,
            target.clone(),
            Arc::clone(&config),
            Arc::clone(&status),
            Arc::clone(&own),
            stop.clone(),
        ));
        for partition in 0..config.partitions {
            tasks.spawn(relay::run(
                partition,
                target.clone(),
                Arc::clone(&config),
                broker.clone(),
                Arc::clone(&status),
                Arc::clone(&own),
                stop.clone(),
            ));
        }
        tasks.close();
        let store = Self {
            status,
            target,
            stop,
            tasks,
        };
        (store, sink)
    }

    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Stops the relays, lets the writer write what waits (at most
    /// [`FLUSH_TIMEOUT`]) and returns when every task has ended. Call it
    /// once nothing publishes any more.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}
