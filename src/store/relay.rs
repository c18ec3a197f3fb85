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
//! Its own instance's entries it passes over rather than reading them back
//! ([`super::own`]): before each read, a run of them is skipped after an
//! `XRANGE` of each gap between them. While the writer has a round in
//! flight, whose entries would otherwise be read back before their ids are
//! known, the relay waits for the round to end, for at most
//! [`MAX_READ_DELAY`] since its last read: the most that other instances'
//! entries wait because this one is writing.
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

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::entry::{self, Decoded, RawEntry};
use super::keys::{registry_key, stream_key};
use super::own::{self, Id, OwnEntries};
use super::retry::Retry;
use super::{Conn, Status, StoreConfig, Target};
use crate::broker::Broker;
use crate::clock::unix_millis;

/// How long one `XREAD` blocks when nothing is written.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries per read.
const COUNT: usize = 1000;
/// Most own entries passed over per stream and round.
const MAX_PASS: usize = 16_384;
/// Most gaps between own entries asked about per stream and round, and
/// most entries read from each: a round reads at most `COUNT` entries of
/// a stream, as a read does.
const MAX_GAPS: usize = 64;
const GAP_COUNT: usize = COUNT / MAX_GAPS;
/// Longest wait for the writer's round before reading anyway.
const MAX_READ_DELAY: Duration = Duration::from_millis(20);
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
    own: Arc<OwnEntries>,
    rounds: watch::Receiver<u64>,
    last_read: Instant,
}

pub(super) async fn run(
    partition: u32,
    target: Target,
    config: Arc<StoreConfig>,
    broker: Broker,
    status: Arc<Status>,
    own: Arc<OwnEntries>,
    stop: CancellationToken,
) {
    let rounds = own.subscribe();
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
        own,
        rounds,
        last_read: Instant::now(),
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
            // Up to that entry only: what is written meanwhile is new, for
            // `follow`, and a stream written fast is not chased.
            let Some(newest) = newest.first().map(|e| e.id.clone()) else {
                continue;
            };
            self.positions.insert(key.clone(), newest.clone());
            let mut start = format!("{since_ms}-0");
            loop {
                let page = entry::parse_entries(
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(&start)
                        .arg(&newest)
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

    /// Passes over own entries, then, unless it waits for the writer's
    /// round, one blocking read of the registry and every known stream.
    async fn follow(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        self.rounds.borrow_and_update();
        self.pass_own(conn).await?;
        let since_read = self.last_read.elapsed();
        if self.own.writing() && since_read < MAX_READ_DELAY {
            // Its entries' ids come with the round's end: then they are
            // passed over rather than read.
            let _ = tokio::time::timeout(MAX_READ_DELAY - since_read, self.rounds.changed()).await;
            return Ok(());
        }
        self.last_read = Instant::now();
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

    /// Passes over the run of own entries after each stream's position: a
    /// pipeline of one `XRANGE` per gap between them; what another
    /// instance wrote in a gap is delivered, in order.
    async fn pass_own(&mut self, conn: &mut Conn) -> redis::RedisResult<()> {
        let mut walks = Vec::new();
        for (key, position) in &self.positions {
            let Some(position) = Id::parse(position.as_bytes()) else {
                continue;
            };
            let ids = self.own.take_after(key, position, MAX_PASS);
            if let Some(walk) = own::walk(position, &ids, MAX_GAPS) {
                walks.push((key.clone(), ids, walk));
            }
        }
        if walks.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, _, walk) in &walks {
            for gap in &walk.gaps {
                pipe.cmd("XRANGE")
                    .arg(key)
                    .arg(gap.first.to_string())
                    .arg(gap.last.to_string())
                    .arg("COUNT")
                    .arg(GAP_COUNT);
            }
        }
        let replies: Vec<redis::Value> = if pipe.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(conn).await?
        };
        let mut replies = replies.into_iter();
        for (key, ids, walk) in walks {
            let mut position = walk.last;
            let mut full = false;
            for _ in &walk.gaps {
                let reply = replies.next().unwrap_or(redis::Value::Nil);
                if full {
                    continue;
                }
                let entries = entry::parse_entries(reply);
                for e in &entries {
                    self.deliver(e);
                }
                if entries.len() >= GAP_COUNT {
                    // A full page: the rest of the gap, and what follows
                    // it, is read next time.
                    if let Some(last) = entries.last() {
                        position = last.position();
                    }
                    full = true;
                }
            }
            let passed = ids.iter().take_while(|id| **id <= position).count();
            self.status.metrics.own_passed.inc_by(passed as u64);
            self.positions.insert(key, position.to_string());
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
                self.own.forget(&key);
                self.skipped.insert(key.clone());
                tracing::error!(%key, %kind, "skipping a key that is not a stream; the rest of the partition goes on");
            }
        }
        found
    }

    /// Delivers an entry another instance wrote; skips this instance's own.
    fn deliver(&self, e: &RawEntry) {
        let metrics = &self.status.metrics;
        let ms = e.position().0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerConfig, Delivery, TypeFilter};
    use crate::tenant::TenantScope;
    use tensorcost_testkit::redis::RedisServer;
    use tokio_stream::StreamExt;

    fn event_json(id: &str) -> String {
        format!(
            r#"{{"id":"{id}","type":"a.b","tenant_id":"t","data":{{}},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}}"#
        )
    }

    fn relay_for(own: &Arc<OwnEntries>, broker: &Broker, key: &str) -> (Relay, Arc<Status>) {
        let config = StoreConfig {
            partitions: 1,
            stream_max_len: 10_000,
            stream_max_age: Duration::from_secs(3600),
            buffer: 10,
            warm_window: Duration::from_secs(60),
            instance_id: "me".into(),
            max_event_bytes: 1024,
        };
        let status = Arc::new(Status::new(1, Default::default()));
        let relay = Relay {
            partition: 0,
            config: Arc::new(config),
            broker: broker.clone(),
            status: Arc::clone(&status),
            positions: BTreeMap::from([(key.to_string(), "0-0".to_string())]),
            registry_position: "0-0".into(),
            registry_usable: true,
            skipped: BTreeSet::new(),
            warmed: true,
            rounds: own.subscribe(),
            own: Arc::clone(own),
            last_read: Instant::now(),
        };
        (relay, status)
    }

    /// A Redis of its own, a connection to it, and the key of a stream.
    async fn redis_with_stream() -> (RedisServer, Conn, String) {
        let redis = RedisServer::start();
        let target = Target::parse(&redis.url(), false).expect("url");
        let conn = target
            .dedicated(Duration::from_secs(5))
            .await
            .expect("connect");
        (redis, conn, stream_key("a.b", 1))
    }

    async fn add(conn: &mut Conn, key: &str, entries: &[(String, &str, String)]) {
        let mut pipe = redis::pipe();
        for (id, origin, event_id) in entries {
            pipe.cmd("XADD")
                .arg(key)
                .arg(id)
                .arg("o")
                .arg(*origin)
                .arg("e")
                .arg(event_json(event_id))
                .ignore();
        }
        pipe.query_async::<()>(conn).await.expect("XADD");
    }

    /// A relay passes over its own recorded entries, reads only the gaps
    /// between them, and delivers what another instance wrote there, in
    /// order; an own entry missing from the record is read and dropped.
    #[tokio::test]
    async fn own_entries_are_passed_over_and_others_in_the_gaps_delivered() {
        let (_redis, mut conn, key) = redis_with_stream().await;
        // Own entries 5-0, 5-1, 5-3, 7-0 (not recorded), 9-0; another
        // instance's at 5-2 and 8-0, and 10-0 after the run.
        let entries = [
            ("5-0", "me", "own-1"),
            ("5-1", "me", "own-2"),
            ("5-2", "other", "theirs-1"),
            ("5-3", "me", "own-3"),
            ("7-0", "me", "own-4"),
            ("8-0", "other", "theirs-2"),
            ("9-0", "me", "own-5"),
            ("10-0", "other", "theirs-3"),
        ]
        .map(|(id, origin, event)| (id.to_string(), origin, event.to_string()));
        add(&mut conn, &key, &entries).await;
        let own = Arc::new(OwnEntries::new());
        own.record([
            (key.as_str(), Id(5, 0)),
            (key.as_str(), Id(5, 1)),
            (key.as_str(), Id(5, 3)),
            (key.as_str(), Id(9, 0)),
        ]);
        let broker = Broker::new(BrokerConfig::default());
        let mut sub = broker
            .subscribe(TenantScope::One("t".into()), TypeFilter::all(), None)
            .expect("under the cap");
        let (mut relay, status) = relay_for(&own, &broker, &key);
        relay.pass_own(&mut conn).await.expect("pass");
        assert_eq!(relay.positions[&key], "9-0", "up to the last own entry");
        assert_eq!(status.metrics.own_passed.get(), 4);
        assert_eq!(status.metrics.relayed.get(), 2);
        for expected in ["theirs-1", "theirs-2"] {
            match sub.next().await {
                Some(Delivery::Event(e)) => assert_eq!(e.id, expected),
                other => panic!("expected {expected}, got {other:?}"),
            }
        }
        // Nothing recorded past the position: a second pass asks nothing,
        // and the entry after the run is left to the read.
        relay.pass_own(&mut conn).await.expect("pass");
        assert_eq!(relay.positions[&key], "9-0");
        assert_eq!(status.metrics.relayed.get(), 2);
    }

    /// A gap holding more than a page is read a page at a time: the
    /// position stops in the gap, and the next pass goes on from there.
    #[tokio::test]
    async fn a_gap_longer_than_a_page_is_read_over_two_passes() {
        let (_redis, mut conn, key) = redis_with_stream().await;
        let mut entries = vec![("1-0".to_string(), "me", "own-1".to_string())];
        entries.extend((0..=GAP_COUNT).map(|i| (format!("2-{i}"), "other", format!("theirs-{i}"))));
        entries.push(("3-0".to_string(), "me", "own-2".to_string()));
        add(&mut conn, &key, &entries).await;
        let own = Arc::new(OwnEntries::new());
        own.record([(key.as_str(), Id(1, 0)), (key.as_str(), Id(3, 0))]);
        let broker = Broker::new(BrokerConfig::default());
        let (mut relay, status) = relay_for(&own, &broker, &key);
        relay.pass_own(&mut conn).await.expect("pass");
        assert_eq!(relay.positions[&key], format!("2-{}", GAP_COUNT - 1));
        assert_eq!(status.metrics.relayed.get(), GAP_COUNT as u64);
        assert_eq!(status.metrics.own_passed.get(), 1);
        relay.pass_own(&mut conn).await.expect("pass");
        assert_eq!(relay.positions[&key], "3-0");
        assert_eq!(status.metrics.relayed.get(), GAP_COUNT as u64 + 1);
        assert_eq!(status.metrics.own_passed.get(), 2);
    }
}
