//! Redis: durable history and delivery between instances.
//!
//! Local dispatch never waits on Redis. After it, each accepted event is
//! offered to the [`writer`], which appends it to its type's stream
//! (`XADD … MAXLEN ~`), pipelined. Every instance runs one [`relay`] reader
//! per partition that reads what the others wrote, in each stream's order,
//! and hands it to its broker, whose dedupe window drops the instance's own
//! events and anything already delivered.
//!
//! Keys. Each event type has one stream, `tc:{p<N>}:ev:<type>`, in
//! partition `N = fnv1a(type) % partitions`. The `{p<N>}` hash tag puts a
//! partition's streams in one Redis Cluster slot, so one `XREAD` covers
//! them. `tc:{p<N>}:types` is the partition's registry: writers append a
//! type the first time they write it, readers learn new streams from it.
//!
//! Failure. While Redis is down the writer keeps what it has not written in
//! a bounded buffer and retries with backoff; past the bound new events
//! are delivered locally but lost to other instances, counted and logged.
//! Readers keep their stream positions across reconnects, so nothing
//! written before or after an outage is skipped.
//!
//! History. The broker's in-memory history is the resume source; with
//! Redis it is warmed from the streams at start (the last
//! `TC_HISTORY_MAX_AGE`) and kept current by the relay, so a client
//! resumes on any instance.

pub mod conn;
mod relay;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::broker::{Broker, Persist};
use crate::event::SharedEvent;
pub use conn::{Conn, Target};

/// Settings of the Redis store.
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
}

/// What `/readyz` shows of Redis.
pub struct Status {
    up: AtomicBool,
    warmed: AtomicU32,
    partitions: u32,
    last_error: Mutex<Option<String>>,
    metrics: StoreMetrics,
}

impl Status {
    fn new(partitions: u32, metrics: StoreMetrics) -> Self {
        Self {
            up: AtomicBool::new(false),
            warmed: AtomicU32::new(0),
            partitions,
            last_error: Mutex::new(None),
            metrics,
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis is reachable");
        }
        self.metrics.up.set(1);
    }

    fn mark_down(&self, error: &redis::RedisError) {
        let message = redis_error(error);
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!("Redis unreachable: {message}; delivering locally and buffering");
        }
        self.metrics.up.set(0);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let up = self.up.load(Ordering::Acquire);
        serde_json::json!({
            "state": if up { "up" } else { "down" },
            "warm": self.warmed.load(Ordering::Acquire) >= self.partitions,
            "buffered": self.metrics.buffered.get(),
            "lost": self.metrics.lost.get(),
            "relay_lag_ms": self.metrics.relay_lag_ms.get(),
            "last_error": if up { None } else {
                self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
            },
        })
    }
}

/// A Redis error in words, without anything from the URL.
fn redis_error(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection lost".into()
    } else {
        format!("{:?}", e.kind())
    }
}

/// The running store.
pub struct Store {
    status: Arc<Status>,
    target: Target,
}

impl Store {
    /// Starts the writer and one relay reader per partition, and hooks the
    /// writer into the broker's publish path. Returns at once: Redis being
    /// down at start is an outage like any other.
    pub fn start(
        target: Target,
        config: StoreConfig,
        broker: &Broker,
        metrics: StoreMetrics,
    ) -> Self {
        let status = Arc::new(Status::new(config.partitions, metrics.clone()));
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        broker.set_persist(Box::new(Sink {
            tx,
            metrics: metrics.clone(),
            last_warning: AtomicU64::new(0),
            lost_since_warning: AtomicU64::new(0),
        }));
        let config = Arc::new(config);
        tokio::spawn(writer::run(
            rx,
            target.clone(),
            Arc::clone(&config),
            Arc::clone(&status),
        ));
        for partition in 0..config.partitions {
            tokio::spawn(relay::run(
                partition,
                target.clone(),
                Arc::clone(&config),
                broker.clone(),
                Arc::clone(&status),
            ));
        }
        Self { status, target }
    }

    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

/// Hands locally accepted events to the writer without ever waiting.
struct Sink {
    tx: mpsc::Sender<SharedEvent>,
    metrics: StoreMetrics,
    last_warning: AtomicU64,
    lost_since_warning: AtomicU64,
}

impl Persist for Sink {
    fn offer(&self, event: &SharedEvent) {
        match self.tx.try_send(Arc::clone(event)) {
            Ok(()) => {
                self.metrics.buffered.inc();
            }
            Err(_) => {
                // Delivered locally, but other instances will never see it.
                self.metrics.lost.inc();
                let lost = self.lost_since_warning.fetch_add(1, Ordering::Relaxed) + 1;
                let now = crate::clock::unix_secs();
                let last = self.last_warning.load(Ordering::Relaxed);
                if now > last
                    && self
                        .last_warning
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.lost_since_warning.store(0, Ordering::Relaxed);
                    tracing::error!(
                        lost,
                        last_id = %event.id,
                        tenant = %event.tenant_id,
                        "Redis write buffer full (TC_REDIS_BUFFER): events delivered locally but lost to other instances"
                    );
                }
            }
        }
    }
}

/// The partition of an event type: FNV-1a, stable across instances and
/// releases.
pub fn partition_of(event_type: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in event_type.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// The stream of an event type.
pub fn stream_key(event_type: &str, partitions: u32) -> String {
    format!(
        "tc:{{p{}}}:ev:{event_type}",
        partition_of(event_type, partitions)
    )
}

/// A partition's registry of event types.
pub fn registry_key(partition: u32) -> String {
    format!("tc:{{p{partition}}}:types")
}

/// A connection made on first use and remade after an error, for lookups
/// that must not hold up start-up when Redis is down.
pub struct Lazy {
    target: Target,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl Lazy {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `cmd`; on error the connection is dropped and made again next time.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.target.managed().await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let result = cmd.query_async(&mut conn).await;
        if result.is_err() {
            *self.conn.lock().await = None;
        }
        result
    }
}

/// Cognito memberships in Redis: field `cognito_sub`, value a JSON array of
/// tenant ids (or a comma-separated list).
pub const MEMBERSHIPS_KEY: &str = "tc:memberships";
/// Per-tenant Socket.IO rate limits in Redis: field tenant, value events/s.
pub const RATE_LIMITS_KEY: &str = "tc:ratelimits";

/// Stream entry fields.
const FIELD_ORIGIN: &str = "o";
const FIELD_EVENT: &str = "e";
const FIELD_TYPE: &str = "t";

/// Milliseconds and sequence of a stream entry id (`1700000000000-3`).
fn parse_entry_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_per_partition() {
        let key = stream_key("cost.updated", 4);
        let p = partition_of("cost.updated", 4);
        assert_eq!(key, format!("tc:{{p{p}}}:ev:cost.updated"));
        assert!(registry_key(p).starts_with(&format!("tc:{{p{p}}}:")));
        // Stable: the same everywhere, forever.
        assert_eq!(partition_of("cost.updated", 1), 0);
        assert_eq!(partition_of("", 7), 0x811c_9dc5 % 7);
        let spread: std::collections::HashSet<u32> = [
            "a.b",
            "cost.updated",
            "alert.created",
            "instance.created",
            "ml.training.started",
        ]
        .iter()
        .map(|t| partition_of(t, 4))
        .collect();
        assert!(spread.len() > 1);
    }

    #[test]
    fn entry_ids_order_numerically() {
        assert!(parse_entry_id("1700000000000-10") > parse_entry_id("1700000000000-9"));
        assert_eq!(parse_entry_id("5-0"), (5, 0));
    }
}
