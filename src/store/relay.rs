//! Reads one partition's streams and delivers what other instances wrote.
//!
//! At start it warms the broker's history: the registry gives the
//! partition's types, each stream is read over the warm window, and the
//! entries are delivered in stream-id order. Then it follows every stream
//! with one blocking `XREAD` from the last id it read of each, so a
//! reconnect after an outage resumes exactly where it stopped. New types
//! appear in the registry, which the same `XREAD` follows. Every
//! [`TRIM_EVERY`] it trims its streams by age (`XTRIM MINID ~`); the count
//! cap is applied by each `XADD`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamRangeReply};

use super::{Conn, FIELD_EVENT, FIELD_ORIGIN, FIELD_TYPE, Status, StoreConfig, Target};
use super::{parse_entry_id, registry_key, stream_key};
use crate::broker::Broker;
use crate::clock::unix_millis;
use crate::event::Event;

/// How long one `XREAD` blocks when nothing is written.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries per read.
const COUNT: usize = 1000;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
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
    warmed: bool,
}

pub(super) async fn run(
    partition: u32,
    target: Target,
    config: Arc<StoreConfig>,
    broker: Broker,
    status: Arc<Status>,
) {
    let mut relay = Relay {
        partition,
        config,
        broker,
        status,
        positions: BTreeMap::new(),
        registry_position: "0-0".into(),
        warmed: false,
    };
    let mut conn: Option<Conn> = None;
    let mut backoff = MIN_BACKOFF;
    let mut trimmed = Instant::now();
    loop {
        let c = match &mut conn {
            Some(c) => c,
            None => match target.dedicated(BLOCK + Duration::from_secs(2)).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    relay.status.mark_down(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
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
        match round.await {
            Ok(()) => backoff = MIN_BACKOFF,
            Err(e) => {
                relay.status.mark_down(&e);
                conn = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl Relay {
    /// Reads the registry and each stream's recent entries into history,
    /// and sets every stream's position to its newest entry.
    async fn warm(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let registry: StreamRangeReply = redis::cmd("XRANGE")
            .arg(registry_key(self.partition))
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await?;
        for entry in &registry.ids {
            if let Some(t) = field(entry, FIELD_TYPE) {
                self.learn_type(&t, "0-0");
            }
        }
        if let Some(last) = registry.ids.last() {
            self.registry_position = last.id.clone();
        }
        let since_ms = unix_millis().saturating_sub(self.config.warm_window.as_millis() as u64);
        let mut entries: Vec<(String, StreamId)> = Vec::new();
        let keys: Vec<String> = self.positions.keys().cloned().collect();
        for key in keys {
            // Position at the newest entry, so entries older than the
            // window are never delivered as if new.
            let newest: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            if let Some(last) = newest.ids.first() {
                self.positions.insert(key.clone(), last.id.clone());
            }
            let mut start = format!("{since_ms}-0");
            loop {
                let page: StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(COUNT)
                    .query_async(conn)
                    .await?;
                let n = page.ids.len();
                if let Some(last) = page.ids.last() {
                    start = format!("({}", last.id);
                }
                entries.extend(page.ids.into_iter().map(|e| (key.clone(), e)));
                if n < COUNT {
                    break;
                }
            }
        }
        // One order across the partition's streams: append order.
        entries.sort_by_key(|(_, e)| parse_entry_id(&e.id));
        let n = entries.len();
        for (_, entry) in entries {
            self.deliver(&entry);
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
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&registry);
        for key in self.positions.keys() {
            cmd.arg(key);
        }
        cmd.arg(&self.registry_position);
        for id in self.positions.values() {
            cmd.arg(id);
        }
        // Parsed by hand from the raw reply: most entries are this
        // instance's own, skipped on their origin field without building
        // maps or strings for them.
        let reply: redis::Value = cmd.query_async(conn).await?;
        self.status.mark_up();
        for (key, entries) in raw_streams(reply) {
            if key == registry {
                for (id, fields) in &entries {
                    if let Some(t) =
                        raw_field(fields, FIELD_TYPE).and_then(|t| std::str::from_utf8(t).ok())
                    {
                        self.learn_type(t, "0-0");
                    }
                    self.registry_position = id.clone();
                }
                continue;
            }
            for (id, fields) in &entries {
                self.deliver_raw(id, fields);
            }
            if let Some((last, _)) = entries.last() {
                self.positions.insert(key, last.clone());
            }
        }
        Ok(())
    }

    /// Delivers a raw entry written by another instance.
    fn deliver_raw(&self, id: &str, fields: &[(Vec<u8>, Vec<u8>)]) {
        let metrics = &self.status.metrics;
        let (ms, _) = parse_entry_id(id);
        metrics
            .relay_lag_ms
            .set(unix_millis().saturating_sub(ms) as i64);
        if raw_field(fields, FIELD_ORIGIN) == Some(self.config.instance_id.as_bytes()) {
            return;
        }
        let Some(json) = raw_field(fields, FIELD_EVENT) else {
            tracing::warn!(%id, "stream entry without an event; skipped");
            return;
        };
        match serde_json::from_slice::<Event>(json) {
            Ok(event) => {
                if self.broker.relay(event) {
                    metrics.relayed.inc();
                }
            }
            Err(e) => tracing::warn!(%id, "stream entry is not an event ({e}); skipped"),
        }
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
    /// from `from`.
    fn learn_type(&mut self, event_type: &str, from: &str) {
        let key = stream_key(event_type, self.config.partitions);
        self.positions
            .entry(key)
            .or_insert_with(|| from.to_string());
    }

    /// Delivers an entry written by another instance.
    fn deliver(&self, entry: &StreamId) {
        let metrics = &self.status.metrics;
        let (ms, _) = parse_entry_id(&entry.id);
        metrics
            .relay_lag_ms
            .set(unix_millis().saturating_sub(ms) as i64);
        if field(entry, FIELD_ORIGIN).as_deref() == Some(self.config.instance_id.as_str()) {
            return;
        }
        let Some(json) = field(entry, FIELD_EVENT) else {
            tracing::warn!(id = %entry.id, "stream entry without an event; skipped");
            return;
        };
        match serde_json::from_str::<Event>(&json) {
            Ok(event) => {
                if self.broker.relay(event) {
                    metrics.relayed.inc();
                }
            }
            Err(e) => tracing::warn!(id = %entry.id, "stream entry is not an event ({e}); skipped"),
        }
    }
}

/// Entries of one stream: (entry id, field/value pairs).
type RawEntries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// An `XREAD` reply as (stream key, entries), RESP2 arrays or RESP3 maps.
fn raw_streams(reply: redis::Value) -> Vec<(String, RawEntries)> {
    use redis::Value;
    fn text(v: Value) -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b).ok(),
            Value::SimpleString(s) => Some(s),
            _ => None,
        }
    }
    fn bytes(v: Value) -> Vec<u8> {
        match v {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.into_bytes(),
            _ => Vec::new(),
        }
    }
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| {
            let Value::Array(entries) = entries else {
                return None;
            };
            let entries = entries
                .into_iter()
                .filter_map(|entry| {
                    let Value::Array(mut parts) = entry else {
                        return None;
                    };
                    if parts.len() != 2 {
                        return None;
                    }
                    let fields = parts.pop()?;
                    let id = text(parts.pop()?)?;
                    let Value::Array(flat) = fields else {
                        return Some((id, Vec::new()));
                    };
                    let mut it = flat.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((bytes(k), bytes(v)));
                    }
                    Some((id, pairs))
                })
                .collect();
            Some((text(key)?, entries))
        })
        .collect()
}

fn raw_field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k.as_slice() == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
}
