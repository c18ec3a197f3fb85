//! Appends locally accepted events to their type's stream, in order,
//! pipelined: each round takes everything waiting (up to [`MAX_BATCH`]) and
//! sends one pipeline per partition. Two rounds are in flight at once: while
//! Redis works on one, the writer takes the next from the channel, encodes
//! it and sends it behind the first on the same connection (standalone
//! Redis; a cluster gets one round at a time). A connection carries its
//! commands in order, and after any failure the writer drops it: the failed
//! round, then the one behind it, are retried whole on a new connection
//! ([`super::retry`]), so each stream stays in order. Meanwhile new events
//! wait in the bounded channel. A retry can append an entry twice (readers
//! drop the second by event id); where Redis refused some commands of a
//! round and took others, the refused events land after the ones it took,
//! and after the round behind.
//!
//! Each written entry's id goes to [`OwnEntries`], so that the relays pass
//! over this instance's entries instead of reading them back.
//!
//! On stop, the writer writes what is still waiting (the rounds in flight
//! and the channel), retrying, for at most [`super::FLUSH_TIMEOUT`]; what
//! is left then is logged.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::entry;
use super::keys::{StreamKeys, registry_key};
use super::own::{Id, OwnEntries};
use super::retry::Retry;
use super::{Conn, FLUSH_TIMEOUT, Status, StoreConfig, Target};
use crate::event::SharedEvent;

/// Most events per round.
const MAX_BATCH: usize = 8192;
/// How long a round's replies may take before the round is retried.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most entries kept in a partition's type registry.
const REGISTRY_MAX_LEN: usize = 100_000;

/// Events taken from the channel, and their commands.
#[derive(Default)]
struct Round {
    events: Vec<SharedEvent>,
    /// One pipeline per partition, encoded from `events`; empty until
    /// encoded, and emptied when a failure makes it stale.
    pipes: Arc<Vec<Pipe>>,
}

/// A partition's commands in a round, and the stream of each event's
/// `XADD` in them (runs of one stream: `(stream, count)`).
struct Pipe {
    pipe: redis::Pipeline,
    streams: Vec<(Arc<str>, usize)>,
}

impl Pipe {
    /// `(stream, id)` of each event written, from the pipeline's replies
    /// (the events' `XADD`s; the registry's are ignored). Nothing when the
    /// replies do not match: ids only save the relays work.
    fn written<'a>(&'a self, ids: &'a [Id]) -> impl Iterator<Item = (&'a str, Id)> + 'a {
        let events: usize = self.streams.iter().map(|(_, n)| n).sum();
        let runs = if events == ids.len() {
            &self.streams[..]
        } else {
            &[]
        };
        runs.iter()
            .flat_map(|(stream, n)| std::iter::repeat_n(&**stream, *n))
            .zip(ids.iter().copied())
    }
}

impl Round {
    fn with_capacity(n: usize) -> Self {
        Self {
            events: Vec::with_capacity(n),
            pipes: Arc::default(),
        }
    }

    /// Adds what is waiting, up to [`MAX_BATCH`] events.
    fn fill(&mut self, rx: &mut mpsc::Receiver<SharedEvent>) {
        while self.events.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(e) => self.events.push(e),
                Err(_) => break,
            }
        }
    }
}

/// What encoding a round needs, apart from the round.
struct Encoder {
    config: Arc<StoreConfig>,
    /// Types put in the registry (by a written round, or by a round in
    /// flight) since this instance, or Redis, started.
    registered: HashSet<String>,
    keys: StreamKeys,
}

impl Encoder {
    /// Encodes `round` unless it is encoded: a pipeline per partition (a
    /// cluster pipeline must stay in one slot), with the registry entry of
    /// each type not registered yet.
    fn encode(&mut self, round: &mut Round) {
        if !round.pipes.is_empty() {
            return;
        }
        let mut pipes: BTreeMap<u32, Pipe> = BTreeMap::new();
        for event in &round.events {
            let (partition, key) = self.keys.of(&event.event_type, self.config.partitions);
            let partition = *partition;
            let pipe = pipes.entry(partition).or_insert_with(|| Pipe {
                pipe: redis::pipe(),
                streams: Vec::new(),
            });
            if !self.registered.contains(&event.event_type) {
                self.registered.insert(event.event_type.clone());
                entry::add_type(
                    &mut pipe.pipe,
                    &registry_key(partition),
                    REGISTRY_MAX_LEN,
                    &event.event_type,
                );
            }
            entry::add_event(
                &mut pipe.pipe,
                key,
                self.config.stream_max_len,
                &self.config.instance_id,
                event,
            );
            match pipe.streams.last_mut() {
                Some((stream, n)) if Arc::ptr_eq(stream, key) => *n += 1,
                _ => pipe.streams.push((Arc::clone(key), 1)),
            }
        }
        round.pipes = Arc::new(pipes.into_values().collect());
    }
}

struct Writer {
    target: Target,
    status: Arc<Status>,
    conn: Option<Conn>,
    encoder: Encoder,
    /// The round being written; kept here so that a round cut short by
    /// stop is written by the flush.
    round: Round,
    /// The round behind it: taken, encoded and sent while `round` is in
    /// flight.
    next: Round,
    retry: Retry,
    own: Arc<OwnEntries>,
}

pub(super) async fn run(
    mut rx: mpsc::Receiver<SharedEvent>,
    target: Target,
    config: Arc<StoreConfig>,
    status: Arc<Status>,
    own: Arc<OwnEntries>,
    stop: CancellationToken,
) {
    let mut writer = Writer {
        target,
        status,
        conn: None,
        encoder: Encoder {
            config,
            registered: HashSet::new(),
            keys: StreamKeys::default(),
        },
        round: Round::with_capacity(MAX_BATCH),
        next: Round::with_capacity(MAX_BATCH),
        retry: Retry::new(),
        own,
    };
    loop {
        if writer.round.events.is_empty() {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                first = rx.recv() => match first {
                    Some(e) => e,
                    None => return,
                },
            };
            writer.round.events.push(first);
            writer.round.fill(&mut rx);
        }
        tokio::select! {
            () = writer.write(&mut rx) => {}
            () = stop.cancelled() => break,
        }
    }
    flush(writer, rx).await;
}

/// Writes what waits, until it is all written or [`FLUSH_TIMEOUT`] passed.
async fn flush(mut writer: Writer, mut rx: mpsc::Receiver<SharedEvent>) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    loop {
        if writer.round.events.is_empty() {
            writer.round.fill(&mut rx);
        }
        if writer.round.events.is_empty() {
            return;
        }
        if tokio::time::timeout_at(deadline, writer.write(&mut rx))
            .await
            .is_err()
        {
            let left = writer.round.events.len() + writer.next.events.len() + rx.len();
            tracing::warn!(left, "Redis unreachable at shutdown: events not written");
            return;
        }
    }
}

impl Writer {
    /// Writes the round, and the rounds behind it while the channel has
    /// events, two in flight at a time. Returns when it wrote everything it
    /// took, or after a failure and the wait before retrying (the rounds
    /// not written stay in `round` and `next`).
    async fn write(&mut self, rx: &mut mpsc::Receiver<SharedEvent>) {
        let metrics = self.status.metrics.clone();
        let conn = match &self.conn {
            Some(c) => c.clone(),
            None => match self.target.dedicated(RESPONSE_TIMEOUT).await {
                Ok(c) => self.conn.insert(c).clone(),
                Err(e) => {
                    self.status.mark_down(&e);
                    self.retry.wait().await;
                    return;
                }
            },
        };
        self.encoder.encode(&mut self.round);
        let writing = Writing::start(&self.own);
        let mut current = Flight::launch(&conn, &self.round.pipes).await;
        loop {
            if self.next.events.is_empty() {
                self.next.fill(rx);
            }
            // Behind the round only on one plain connection: it fails as a
            // whole, so a round behind a failed one cannot be written
            // before the failed one's retry. A cluster connection
            // reconnects by itself, and writes one round at a time.
            let behind = if self.next.events.is_empty() || !matches!(conn, Conn::Plain(_)) {
                None
            } else {
                self.encoder.encode(&mut self.next);
                Some(Flight::launch(&conn, &self.next.pipes).await)
            };
            let pipes = Arc::clone(&self.round.pipes);
            let result = current.result().await;
            if let Ok(ids) = &result {
                self.own.record(
                    pipes
                        .iter()
                        .zip(ids)
                        .flat_map(|(pipe, ids)| pipe.written(ids)),
                );
            }
            self.own.round_ended();
            match result {
                Ok(_) => {
                    self.status.mark_up();
                    self.retry.reset();
                    let written = self.round.events.len();
                    metrics.written.inc_by(written as u64);
                    metrics.buffered.dec_by(written as i64);
                    self.round.events.clear();
                    self.round.pipes = Arc::default();
                    std::mem::swap(&mut self.round, &mut self.next);
                    match behind {
                        Some(flight) => current = flight,
                        None => return,
                    }
                }
                Err(e) => {
                    // The round behind is written again after this one,
                    // whatever became of it.
                    if let Some(flight) = behind {
                        flight.result().await.ok();
                    }
                    metrics.write_errors.inc();
                    self.status.mark_down(&e);
                    // Redis may have restarted empty: register types
                    // again, in both rounds.
                    self.encoder.registered.clear();
                    self.round.pipes = Arc::default();
                    self.next.pipes = Arc::default();
                    // The retry goes over a new connection: on this one, a
                    // round that timed out may still be ahead of anything
                    // sent after it.
                    self.conn = None;
                    drop(writing);
                    self.retry.wait().await;
                    return;
                }
            }
        }
    }
}

/// Marks the writer as writing while it lives.
struct Writing<'a>(&'a OwnEntries);

impl<'a> Writing<'a> {
    fn start(own: &'a OwnEntries) -> Self {
        own.start_writing();
        Self(own)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.stop_writing();
    }
}

/// What a round wrote: the ids of each pipeline's events.
type Written = redis::RedisResult<Vec<Vec<Id>>>;

/// A round sent to Redis, or its outcome.
enum Flight {
    Done(Written),
    Sending(Pin<Box<dyn Future<Output = Written> + Send>>),
}

impl Flight {
    /// Sends a round's pipelines (concurrently: one per partition), polling
    /// once so that they are queued on the connection before anything sent
    /// after them.
    async fn launch(conn: &Conn, pipes: &Arc<Vec<Pipe>>) -> Self {
        let (conn, pipes) = (conn.clone(), pipes.clone());
        let mut sending: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let rounds = pipes.iter().map(|pipe| {
                let mut conn = conn.clone();
                async move {
                    let replies: Vec<redis::Value> = pipe.pipe.query_async(&mut conn).await?;
                    Ok::<_, redis::RedisError>(
                        replies
                            .iter()
                            .map_while(|reply| match reply {
                                redis::Value::BulkString(id) => Id::parse(id),
                                _ => None,
                            })
                            .collect::<Vec<Id>>(),
                    )
                }
            });
            futures_util::future::join_all(rounds)
                .await
                .into_iter()
                .collect()
        });
        match std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await {
            Poll::Ready(result) => Flight::Done(result),
            Poll::Pending => Flight::Sending(sending),
        }
    }

    async fn result(self) -> Written {
        match self {
            Flight::Done(result) => result,
            Flight::Sending(sending) => sending.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies pair with the events' streams in order; replies that do not
    /// match the events (a count off) record nothing rather than wrong ids.
    #[test]
    fn written_ids_pair_with_their_streams_or_not_at_all() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let pipe = Pipe {
            pipe: redis::pipe(),
            streams: vec![(a, 2), (b, 1)],
        };
        let ids = [Id(1, 0), Id(1, 1), Id(1, 2)];
        let written: Vec<(&str, Id)> = pipe.written(&ids).collect();
        assert_eq!(
            written,
            vec![("a", Id(1, 0)), ("a", Id(1, 1)), ("b", Id(1, 2))]
        );
        assert_eq!(pipe.written(&ids[..2]).count(), 0);
    }
}
