//! What the broker counts. Plain atomics: the broker does not know the
//! metrics library; `metrics` reads these at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub(super) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The broker's counts since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events accepted and dispatched.
    pub published: Count,
    /// Publishes acknowledged as duplicates and not delivered.
    pub duplicates: Count,
    /// Events handed to subscriber buffers.
    pub delivered: Count,
    /// Subscribers dropped because their buffer was full.
    pub slow_subscribers_dropped: Count,
    /// Events accepted by other instances and delivered here.
    pub relayed: Count,
}
