//! Appends locally accepted events to their type's stream, in order,
//! pipelined: each round takes everything waiting (up to [`MAX_BATCH`]) and
//! sends one pipeline per partition. A failed round is retried whole with
//! backoff; meanwhile new events wait in the bounded channel. A retry can
//! append an entry twice; readers drop the second by event id.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Conn, FIELD_EVENT, FIELD_ORIGIN, FIELD_TYPE, Status, StoreConfig, Target};
use super::{partition_of, registry_key, stream_key};
use crate::event::SharedEvent;

/// Most events per round.
const MAX_BATCH: usize = 8192;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most entries kept in a partition's type registry.
const REGISTRY_MAX_LEN: usize = 100_000;

pub(super) async fn run(
    mut rx: mpsc::Receiver<SharedEvent>,
    target: Target,
    config: Arc<StoreConfig>,
    status: Arc<Status>,
) {
    let metrics = status.metrics.clone();
    let mut conn: Option<Conn> = None;
    // Types this instance has put in the registry since it started.
    let mut registered: HashSet<String> = HashSet::new();
    let mut batch: Vec<SharedEvent> = Vec::with_capacity(MAX_BATCH);
    let mut keys = StreamKeys::default();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut backoff = MIN_BACKOFF;
        loop {
            let c = match &mut conn {
                Some(c) => c,
                None => match target.managed().await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        status.mark_down(&e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            match write(c, &batch, &registered, &config, &mut keys).await {
                Ok(()) => {
                    status.mark_up();
                    metrics.written.inc_by(batch.len() as u64);
                    metrics.buffered.dec_by(batch.len() as i64);
                    registered.extend(batch.iter().map(|e| e.event_type.clone()));
                    break;
                }
                Err(e) => {
                    metrics.write_errors.inc();
                    status.mark_down(&e);
                    // Redis may have restarted empty: register types again.
                    registered.clear();
                    // A cluster connection is rebuilt; a managed one heals.
                    if matches!(conn, Some(Conn::Cluster(_))) {
                        conn = None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        batch.clear();
    }
}

/// One round: a pipeline per partition (a cluster pipeline must stay in
/// one slot), sent concurrently.
/// Partition and stream key of each type, computed once.
#[derive(Default)]
struct StreamKeys(std::collections::HashMap<String, (u32, String)>);

impl StreamKeys {
    fn of(&mut self, event_type: &str, partitions: u32) -> &(u32, String) {
        if !self.0.contains_key(event_type) {
            let entry = (
                partition_of(event_type, partitions),
                stream_key(event_type, partitions),
            );
            self.0.insert(event_type.to_string(), entry);
        }
        &self.0[event_type]
    }
}

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
            pipe.cmd("XADD")
                .arg(registry_key(partition))
                .arg("MAXLEN")
                .arg("~")
                .arg(REGISTRY_MAX_LEN)
                .arg("*")
                .arg(FIELD_TYPE)
                .arg(&event.event_type)
                .ignore();
        }
        pipe.cmd("XADD")
            .arg(key.as_str())
            .arg("MAXLEN")
            .arg("~")
            .arg(config.stream_max_len)
            .arg("*")
            .arg(FIELD_ORIGIN)
            .arg(&config.instance_id)
            .arg(FIELD_EVENT)
            .arg(event.to_json())
            .ignore();
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
