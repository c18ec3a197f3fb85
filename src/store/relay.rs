//! Reads one partition's streams and delivers what other instances wrote.
//!
//! At start it warms the broker's history: the registry gives the
//! partition's types, each stream is read over the warm window, and the
//! entries are delivered in stream-id order. Then it follows every stream
//! with one blocking `XREAD` from the last id it read of each, so a
//! reconnect after an outage resumes exactly where it stopped. New types
//! appear in the registry, which the same `XREAD` follows. Every quarter of
//! the age cap (`trim_every`) it trims its streams by age (`XTRIM MINID ~`);
//! the count cap is applied by each `XADD`. It stops when told to.
//!
//! Redis is a peer, not an oracle. A key of the wrong type where a stream
//! or the registry should be (Redis answers `WRONGTYPE` for the whole
//! `XREAD`) is found with `TYPE`, skipped and logged once, and the rest of
//! the partition keeps relaying. Every event read passes the rules of a
//! published one ([`super::entry`]); a bad entry is skipped and counted in
//! `tc_redis_invalid_total`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::entry::{self, Decoded, RawEntry};
use super::keys::{registry_key, stream_key};
use super::retry::Retry;
use super::{Conn, Status, StoreConfig, Target};
use crate::broker::Broker;
use crate::clock::unix_millis;

/// How long one `XREAD` blocks when nothing is written.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries per read.
const COUNT: usize = 1000;
/// How often streams are trimmed by age: a quarter of the age cap,
/// between 1 and 60 seconds.
fn trim_every(max_age: Duration) -> Duration {
    (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

struct Relay {
    partition: u32,
    config: Arc<StoreConfig>,
    broker: Broker,
    status: Arc<Status>,
    /// Last entry id read, per stream key.
    positions: BTreeMap<String, String>,
    registry_position: String,
    /// False when the registry key holds something other than a stream.
    registry_usable: bool,
    /// Keys skipped because they are not streams.
    skipped: BTreeSet<String>,
    warmed: bool,
}

pub(super) async fn run(
    partition: u32,
    target: Target,
    config: Arc<StoreConfig>,
    broker: Broker,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let mut relay = Relay {
        partition,
        config,
        broker,
        status,
        positions: BTreeMap::new(),
        registry_position: "0-0".into(),
        registry_usable: true,
        skipped: BTreeSet::new(),
        warmed: false,
    };
    let mut conn: Option<Conn> = None;
    let mut retry = Retry::new();
    let mut trimmed = Instant::now();
    loop {
        let c = match &mut conn {
            Some(c) => c,
            None => {
                let connected = tokio::select! {
                    () = stop.cancelled() => return,
                    c = target.dedicated(BLOCK + Duration::from_secs(2)) => c,
                };
                match connected {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        relay.status.mark_down(&e);
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = retry.wait() => continue,
                        }
                    }
                }
            }
        };
        let round = async {
            if !relay.warmed {
                relay.warm(c).await?;
            }
            relay.follow(c).await?;
            if trimmed.elapsed() >= trim_every(relay.config.stream_max_age) {
                trimmed = Instant::now();
                relay.trim(c).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = round => r,
        };
        match result {
            Ok(()) => {
                relay.status.relay_ok(relay.partition);
                retry.reset();
            }
            // A key that is not a stream: skip it and go on at once.
            Err(e) if e.code() == Some("WRONGTYPE") && relay.skip_wrong_types(c).await => {}
            Err(e) => {
                relay.status.relay_failed(relay.partition, &e);
                relay.status.mark_down(&e);
                conn = None;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = retry.wait() => {}
                }
            }
        }
    }
}

impl Relay {
    /// Reads the registry and each stream's recent entries into history,
    /// and sets every stream's position to its newest entry.
    async fn warm(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let registry = if self.registry_usable {
            entry::parse_entries(
                redis::cmd("XRANGE")
                    .arg(registry_key(self.partition))
                    .arg("-")
                    .arg("+")
                    .query_async(conn)
                    .await?,
            )
        } else {
            Vec::new()
        };
        for e in &registry {
            if let Some(t) = e.registered_type() {
                self.learn_type(t);
            }
        }
        if let Some(last) = registry.last() {
            self.registry_position = last.id.clone();
        }
        let since_ms = unix_millis().saturating_sub(self.config.warm_window.as_millis() as u64);
        let mut entries: Vec<RawEntry> = Vec::new();
        let keys: Vec<String> = self.positions.keys().cloned().collect();
        for key in keys {
            // Position at the newest entry, so entries older than the
            // window are never delivered as if new.
            let newest = entry::parse_entries(
                redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(conn)
                    .await?,
            );
            if let Some(last) = newest.first() {
                self.positions.insert(key.clone(), last.id.clone());
            }
            let mut start = format!("{since_ms}-0");
            loop {
                let page = entry::parse_entries(
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(COUNT)
                        .query_async(conn)
                        .await?,
                );
                let n = page.len();
                if let Some(last) = page.last() {
                    start = format!("({}", last.id);
                }
                entries.extend(page);
                if n < COUNT {
                    break;
                }
            }
        }
        // One order across the partition's streams: append order.
        entries.sort_by_key(RawEntry::position);
        let n = entries.len();
        for e in &entries {
            self.deliver(e);
        }
        self.warmed = true;
        self.status.warmed.fetch_add(1, Ordering::AcqRel);
        self.status.mark_up();
        tracing::info!(
            partition = self.partition,
            entries = n,
            streams = self.positions.len(),
            "history warmed from Redis"
        );
        Ok(())
    }

    /// One blocking read of the registry and every known stream.
    async fn follow(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let registry = registry_key(self.partition);
        if !self.registry_usable && self.positions.is_empty() {
            // Nothing to follow: wait as a blocking read would.
            tokio::time::sleep(BLOCK).await;
            return Ok(());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        if self.registry_usable {
            cmd.arg(&registry);
        }
        for key in self.positions.keys() {
            cmd.arg(key);
        }
        if self.registry_usable {
            cmd.arg(&self.registry_position);
        }
        for id in self.positions.values() {
            cmd.arg(id);
        }
        let reply: redis::Value = cmd.query_async(conn).await?;
        self.status.mark_up();
        for (key, entries) in entry::parse_streams(reply) {
            if key == registry {
                for e in &entries {
                    if let Some(t) = e.registered_type() {
                        self.learn_type(t);
                    }
                    self.registry_position = e.id.clone();
                }
                continue;
            }
            for e in &entries {
                self.deliver(e);
            }
            if let Some(last) = entries.last() {
                self.positions.insert(key, last.id.clone());
            }
        }
        Ok(())
    }

    /// Trims every stream by age.
    async fn trim(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let min_ms = unix_millis().saturating_sub(self.config.stream_max_age.as_millis() as u64);
        for key in self.positions.keys() {
            redis::cmd("XTRIM")
                .arg(key)
                .arg("MINID")
                .arg("~")
                .arg(format!("{min_ms}-0"))
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }

    /// A registry entry names a type; a stream not yet followed is read
    /// from its start.
    fn learn_type(&mut self, event_type: &str) {
        let key = stream_key(event_type, self.config.partitions);
        if !self.skipped.contains(&key) {
            self.positions
                .entry(key)
                .or_insert_with(|| "0-0".to_string());
        }
    }

    /// After a `WRONGTYPE`: asks the type of the registry and of every
    /// followed key, and stops reading those that hold something else than
    /// a stream (a missing key is fine: `XREAD` waits for it). True when
    /// one was found, so the round can be tried again at once.
    async fn skip_wrong_types(&mut self, conn: &mut Conn) -> bool {
        let registry = registry_key(self.partition);
        let mut keys: Vec<String> = self.positions.keys().cloned().collect();
        if self.registry_usable {
            keys.push(registry.clone());
        }
        let mut found = false;
        for key in keys {
            let kind: String = match redis::cmd("TYPE").arg(&key).query_async(conn).await {
                Ok(kind) => kind,
                Err(_) => return found,
            };
            if kind == "stream" || kind == "none" {
                continue;
            }
            found = true;
            self.status.metrics.skipped_keys.inc();
            if key == registry {
                self.registry_usable = false;
                tracing::error!(%key, %kind, "the partition's type registry is not a stream: new types of this partition are not learned until it is deleted");
            } else {
                self.positions.remove(&key);
                self.skipped.insert(key.clone());
                tracing::error!(%key, %kind, "skipping a key that is not a stream; the rest of the partition goes on");
            }
        }
        found
    }

    /// Delivers an entry another instance wrote; skips this instance's own.
    fn deliver(&self, e: &RawEntry) {
        let metrics = &self.status.metrics;
        let (ms, _) = e.position();
        metrics
            .relay_lag_ms
            .set(unix_millis().saturating_sub(ms) as i64);
        match e.decode(&self.config.instance_id, self.config.max_event_bytes) {
            Decoded::Own => {}
            Decoded::Event(event) => {
                // Warming fills history only: the projections restored
                // their figures, which already count these events.
                let relayed = if self.warmed {
                    self.broker.relay(event)
                } else {
                    self.broker.relay_unobserved(event)
                };
                if relayed {
                    metrics.relayed.inc();
                }
            }
            Decoded::Invalid(reason) => {
                metrics.invalid.inc();
                tracing::warn!(entry = %e.id, "stream entry skipped: {reason}");
            }
        }
    }
}
