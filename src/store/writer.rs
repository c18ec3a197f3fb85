//! Appends locally accepted events to their type's stream, in order,
//! pipelined: each round takes everything waiting (up to [`MAX_BATCH`]) and
//! sends one pipeline per partition. A failed round is retried whole
//! ([`super::retry`]); meanwhile new events wait in the bounded channel. A
//! retry can append an entry twice; readers drop the second by event id.
//!
//! On stop, the writer writes what is still waiting (the round in flight
//! and the channel), retrying, for at most [`super::FLUSH_TIMEOUT`]; what
//! is left then is logged.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::entry;
use super::keys::{StreamKeys, registry_key};
use super::retry::Retry;
use super::{Conn, FLUSH_TIMEOUT, Status, StoreConfig, Target};
use crate::event::SharedEvent;

/// Most events per round.
const MAX_BATCH: usize = 8192;
/// Most entries kept in a partition's type registry.
const REGISTRY_MAX_LEN: usize = 100_000;

struct Writer {
    target: Target,
    config: Arc<StoreConfig>,
    status: Arc<Status>,
    conn: Option<Conn>,
    /// Types this instance has put in the registry since it (or Redis)
    /// started.
    registered: HashSet<String>,
    keys: StreamKeys,
    /// The round being written; kept here so that a round cut short by
    /// stop is written by the flush.
    batch: Vec<SharedEvent>,
    retry: Retry,
}

pub(super) async fn run(
    mut rx: mpsc::Receiver<SharedEvent>,
    target: Target,
    config: Arc<StoreConfig>,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let mut writer = Writer {
        target,
        config,
        status,
        conn: None,
        registered: HashSet::new(),
        keys: StreamKeys::default(),
        batch: Vec::with_capacity(MAX_BATCH),
        retry: Retry::new(),
    };
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            first = rx.recv() => match first {
                Some(e) => e,
                None => return,
            },
        };
        writer.batch.push(first);
        writer.fill(&mut rx);
        tokio::select! {
            () = writer.write_round() => {}
            () = stop.cancelled() => break,
        }
    }
    flush(writer, rx).await;
}

/// Writes what waits, until it is all written or [`FLUSH_TIMEOUT`] passed.
async fn flush(mut writer: Writer, mut rx: mpsc::Receiver<SharedEvent>) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    loop {
        writer.fill(&mut rx);
        if writer.batch.is_empty() {
            return;
        }
        if tokio::time::timeout_at(deadline, writer.write_round())
            .await
            .is_err()
        {
            let left = writer.batch.len() + rx.len();
            tracing::warn!(left, "Redis unreachable at shutdown: events not written");
            return;
        }
    }
}

impl Writer {
    /// Adds what is waiting to the round, up to [`MAX_BATCH`].
    fn fill(&mut self, rx: &mut mpsc::Receiver<SharedEvent>) {
        while self.batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => self.batch.push(e),
                Err(_) => break,
            }
        }
    }

    /// Writes the round, retrying until it succeeds; empties it.
    async fn write_round(&mut self) {
        let metrics = self.status.metrics.clone();
        loop {
            let conn = match &mut self.conn {
                Some(c) => c,
                None => match self.target.managed().await {
                    Ok(c) => self.conn.insert(c),
                    Err(e) => {
                        self.status.mark_down(&e);
                        self.retry.wait().await;
                        continue;
                    }
                },
            };
            match write(
                conn,
                &self.batch,
                &self.registered,
                &self.config,
                &mut self.keys,
            )
            .await
            {
                Ok(()) => {
                    self.status.mark_up();
                    self.retry.reset();
                    metrics.written.inc_by(self.batch.len() as u64);
                    metrics.buffered.dec_by(self.batch.len() as i64);
                    self.registered
                        .extend(self.batch.iter().map(|e| e.event_type.clone()));
                    self.batch.clear();
                    return;
                }
                Err(e) => {
                    metrics.write_errors.inc();
                    self.status.mark_down(&e);
                    // Redis may have restarted empty: register types again.
                    self.registered.clear();
                    // A cluster connection is rebuilt; a managed one heals.
                    if matches!(self.conn, Some(Conn::Cluster(_))) {
                        self.conn = None;
                    }
                    self.retry.wait().await;
                }
            }
        }
    }
}

/// One round: a pipeline per partition (a cluster pipeline must stay in
/// one slot), sent concurrently.
async fn write(
    conn: &mut Conn,
    batch: &[SharedEvent],
    registered: &HashSet<String>,
    config: &StoreConfig,
    keys: &mut StreamKeys,
) -> redis::RedisResult<()> {
    let mut pipes: BTreeMap<u32, redis::Pipeline> = BTreeMap::new();
    let mut new_types: HashSet<&str> = HashSet::new();
    for event in batch {
        let (partition, key) = keys.of(&event.event_type, config.partitions);
        let partition = *partition;
        let pipe = pipes.entry(partition).or_insert_with(redis::pipe);
        if !registered.contains(&event.event_type) && new_types.insert(&event.event_type) {
            entry::add_type(
                pipe,
                &registry_key(partition),
                REGISTRY_MAX_LEN,
                &event.event_type,
            );
        }
        entry::add_event(pipe, key, config.stream_max_len, &config.instance_id, event);
    }
    let rounds = pipes.into_values().map(|pipe| {
        let mut conn = conn.clone();
        async move { pipe.query_async::<()>(&mut conn).await }
    });
    for result in futures_util::future::join_all(rounds).await {
        result?;
    }
    Ok(())
}
