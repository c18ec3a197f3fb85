//! What `/readyz` shows of Redis, and Redis errors in words.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::StoreMetrics;

/// What `/readyz` shows of Redis.
pub struct Status {
    up: AtomicBool,
    pub(super) warmed: AtomicU32,
    partitions: u32,
    last_error: Mutex<Option<String>>,
    pub(super) metrics: StoreMetrics,
}

impl Status {
    pub(super) fn new(partitions: u32, metrics: StoreMetrics) -> Self {
        Self {
            up: AtomicBool::new(false),
            warmed: AtomicU32::new(0),
            partitions,
            last_error: Mutex::new(None),
            metrics,
        }
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
