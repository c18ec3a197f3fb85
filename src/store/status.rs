//! What `/readyz` shows of Redis, and Redis errors in words.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::StoreMetrics;

/// What `/readyz` shows of Redis.
pub struct Status {
    up: AtomicBool,
    pub(super) warmed: AtomicU32,
    partitions: u32,
    last_error: Mutex<Option<String>>,
    /// Partitions whose relay's last rounds failed: how many in a row, and
    /// the last error. Redis may answer the writer and still fail a relay
    /// (a key of the wrong type it could not skip, a slot moving).
    relays_failing: Mutex<BTreeMap<u32, (u64, String)>>,
    pub(super) metrics: StoreMetrics,
}

impl Status {
    pub(super) fn new(partitions: u32, metrics: StoreMetrics) -> Self {
        Self {
            up: AtomicBool::new(false),
            warmed: AtomicU32::new(0),
            partitions,
            last_error: Mutex::new(None),
            relays_failing: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// A relay round of `partition` succeeded.
    pub(super) fn relay_ok(&self, partition: u32) {
        let mut failing = self
            .relays_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if failing.remove(&partition).is_some() {
            tracing::info!(partition, "Redis relay recovered");
        }
    }

    /// A relay round of `partition` failed.
    pub(super) fn relay_failed(&self, partition: u32, error: &redis::RedisError) {
        let mut failing = self
            .relays_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = failing.entry(partition).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = redis_error(error);
    }

    pub(super) fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis is reachable");
        }
        self.metrics.up.set(1);
    }

    pub(super) fn mark_down(&self, error: &redis::RedisError) {
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
            "relays_failing": self
                .relays_failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(partition, (rounds, error))| serde_json::json!({
                    "partition": partition, "failed_rounds": rounds, "last_error": error,
                }))
                .collect::<Vec<_>>(),
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
    } else if let Some(code) = e.code() {
        format!("Redis answered {code}")
    } else {
        format!("{:?}", e.kind())
    }
}
