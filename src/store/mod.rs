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
mod entry;
pub mod keys;
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
pub use conn::{Conn, Lazy, Target};
pub use status::Status;

/// How long the writer gets at shutdown to write what is still waiting.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The running store: the writer and one relay per partition.
pub struct Store {
    status: Arc<Status>,
    target: Target,
    stop: CancellationToken,
    tasks: TaskTracker,
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
        broker.set_persist(Box::new(sink::Sink::new(tx, metrics)));
        let config = Arc::new(config);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(writer::run(
            rx,
            target.clone(),
            Arc::clone(&config),
            Arc::clone(&status),
            stop.clone(),
        ));
        for partition in 0..config.partitions {
            tasks.spawn(relay::run(
                partition,
                target.clone(),
                Arc::clone(&config),
                broker.clone(),
                Arc::clone(&status),
                stop.clone(),
            ));
        }
        tasks.close();
        Self {
            status,
            target,
            stop,
            tasks,
        }
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
