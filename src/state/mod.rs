//! Kept state other than the event streams (webhook endpoints, their
//! delivery queues and logs; later projections, policies and settings):
//! one small interface, two backends. Without Redis an embedded store
//! ([`embedded`], one `redb` file under `TC_DATA_DIR`); with Redis the
//! same operations on Redis keys ([`redis`]), shared by every instance.
//!
//! Three kinds of thing are kept:
//! - **records**: a value per (table, tenant, id), listed per tenant or for
//!   every tenant;
//! - **logs**: the newest `keep` values per (log, key), read newest first
//!   (the embedded store drops whole groups of entries written together, so
//!   it may keep up to one group more);
//! - **queues**: jobs with a due time in named queues (one per webhook
//!   endpoint). [`State::claim`] takes due jobs fairly across queues, at
//!   most a given number per queue, and leases them: a claimed job that is
//!   neither finished nor rescheduled before its lease ends is due again,
//!   which is how another instance takes over a crashed one's work.
//!
//! Every write has been committed when its future resolves (except
//! [`State::finish_logged`] on the embedded store); the embedded store
//! groups concurrent writes into one transaction, and makes queue and log
//! writes durable within its flush interval ([`embedded::FLUSH`]).

pub mod embedded;
pub mod redis;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The embedded store's page cache unless `TC_DATA_CACHE_BYTES` says
/// otherwise: room for the interior pages of a backlog of millions of jobs.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// Where the embedded store keeps its file, and how much of it is cached.
#[derive(Debug, Clone, clap::Args)]
pub struct StateSettings {
    /// Directory of the embedded store (`state.redb`: webhook endpoints and
    /// deliveries), used when Redis is not configured. Default:
    /// `$XDG_STATE_HOME/tensorcost-events`, else
    /// `~/.local/state/tensorcost-events`. One broker per directory.
    #[arg(long, env = "TC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Bytes of the embedded store's file kept in memory as its page cache
    /// (redb's own default is 1 GiB, reached as a large backlog of
    /// deliveries is written and read).
    #[arg(long, env = "TC_DATA_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES, value_parser = crate::config::parse::positive)]
    pub data_cache_bytes: usize,

    /// Keep the embedded store in memory (servers started in-process by
    /// tests and benchmarks; nothing survives them).
    #[arg(skip)]
    pub in_memory: bool,
}

impl StateSettings {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
            })
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("tensorcost-events")
    }
}

/// A job in a queue. `body` is the feature's own JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub queue: String,
    /// When it is due, Unix milliseconds.
    pub due_ms: u64,
    /// Stored as JSON, not as an escaped string.
    #[serde(with = "raw_json")]
    pub body: String,
}

/// A job done, and what its log gets: see [`State::finish_logged`].
#[derive(Debug, Clone)]
pub struct Finished {
    pub queue: String,
    pub id: String,
    /// The log's key (for webhooks, the endpoint).
    pub key: String,
    pub value: String,
}

/// A `String` field holding JSON text, written into the enclosing JSON as
/// is (not escaped as a string) and read back as text: a payload kept
/// inside a job is neither escaped nor unescaped on its way through.
pub mod raw_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Box::<RawValue>::deserialize(d).map(|raw| raw.get().to_string())
    }
}

/// A backend failed; the message names what and never holds a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(pub String);

pub type Result<T> = std::result::Result<T, StateError>;

/// How many jobs a claim may take from each queue: `default` from any
/// queue, fewer from the queues listed (those already busy here).
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    pub default: usize,
    pub limited: Vec<(String, usize)>,
}

/// The state store. Cheap to clone.
#[derive(Clone)]
pub enum State {
    Embedded(Arc<embedded::Embedded>),
    Redis(Arc<redis::RedisState>),
}

impl State {
    /// The embedded store in `dir` (created if missing), with a page
    /// cache of `cache_bytes`. Fails with a message naming the file when
    /// another process holds it.
    pub fn embedded(dir: PathBuf, cache_bytes: usize) -> Result<Self> {
        Ok(State::Embedded(Arc::new(embedded::Embedded::open(
            dir,
            cache_bytes,
        )?)))
    }

    /// The embedded store as `settings` say: a file, or memory.
    pub fn embedded_from(settings: &StateSettings) -> Result<Self> {
        if settings.in_memory {
            return Ok(State::Embedded(Arc::new(embedded::Embedded::in_memory()?)));
        }
        Self::embedded(settings.data_dir(), settings.data_cache_bytes)
    }

    pub fn redis(target: crate::store::Target) -> Self {
        State::Redis(Arc::new(redis::RedisState::new(target)))
    }

    /// What `/readyz` and the logs call it.
    pub fn describe(&self) -> String {
        match self {
            State::Embedded(e) => format!("embedded ({})", e.path().display()),
            State::Redis(_) => "redis".into(),
        }
    }

    pub async fn get(&self, table: &str, tenant: &str, id: &str) -> Result<Option<String>> {
        match self {
            State::Embedded(e) => e.get(table, tenant, id).await,
            State::Redis(r) => r.get(table, tenant, id).await,
        }
    }

    pub async fn put(&self, table: &str, tenant: &str, id: &str, value: String) -> Result<()> {
        match self {
            State::Embedded(e) => e.put(table, tenant, id, value).await,
            State::Redis(r) => r.put(table, tenant, id, value).await,
        }
    }

    /// Whether it was there.
    pub async fn delete(&self, table: &str, tenant: &str, id: &str) -> Result<bool> {
        match self {
            State::Embedded(e) => e.delete(table, tenant, id).await,
            State::Redis(r) => r.delete(table, tenant, id).await,
        }
    }

    /// A tenant's records of `table`: (id, value), in id order.
    pub async fn list(&self, table: &str, tenant: &str) -> Result<Vec<(String, String)>> {
        match self {
            State::Embedded(e) => e.list(table, tenant).await,
            State::Redis(r) => r.list(table, tenant).await,
        }
    }

    /// Every tenant's records of `table`: (tenant, id, value).
    pub async fn list_all(&self, table: &str) -> Result<Vec<(String, String, String)>> {
        match self {
            State::Embedded(e) => e.list_all(table).await,
            State::Redis(r) => r.list_all(table).await,
        }
    }

    /// Appends to a log, keeping its newest `keep` values.
    pub async fn push_log(&self, log: &str, key: &str, value: String, keep: usize) -> Result<()> {
        match self {
            State::Embedded(e) => e.push_log(log, key, value, keep).await,
            State::Redis(r) => r.push_log(log, key, value, keep).await,
        }
    }

    /// A log's newest `limit` values, newest first.
    pub async fn read_log(&self, log: &str, key: &str, limit: usize) -> Result<Vec<String>> {
        match self {
            State::Embedded(e) => e.read_log(log, key, limit).await,
            State::Redis(r) => r.read_log(log, key, limit).await,
        }
    }

    pub async fn delete_log(&self, log: &str, key: &str) -> Result<()> {
        match self {
            State::Embedded(e) => e.delete_log(log, key).await,
            State::Redis(r) => r.delete_log(log, key).await,
        }
    }

    /// Adds jobs (or replaces jobs with the same id).
    pub async fn enqueue(&self, jobs: Vec<Job>) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        match self {
            State::Embedded(e) => e.enqueue(jobs).await,
            State::Redis(r) => r.enqueue(jobs).await,
        }
    }

    /// Takes at most `max` jobs due at `now_ms`, at most `capacity.of(q)`
    /// from each queue `q`, oldest due first within a queue, and leases
    /// them until `now_ms + lease_ms`.
    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        capacity: &Capacity,
        max: usize,
    ) -> Result<Vec<Job>> {
        match self {
            State::Embedded(e) => e.claim(now_ms, lease_ms, capacity, max).await,
            State::Redis(r) => r.claim(now_ms, lease_ms, capacity, max).await,
        }
    }

    /// Removes a job (done, or given up).
    pub async fn finish(&self, queue: &str, id: &str) -> Result<()> {
        match self {
            State::Embedded(e) => e.finish(queue, id).await,
            State::Redis(r) => r.finish(queue, id).await,
        }
    }

    /// Jobs done, each with a value appended to its log (`log`, its
    /// `key`), as one write: the deliveries a batch recorded. The embedded
    /// store does not wait for the commit (lost only with a crash within
    /// its flush interval, and those jobs are then done again).
    pub async fn finish_logged(&self, log: &str, done: Vec<Finished>, keep: usize) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        match self {
            State::Embedded(e) => e.finish_logged(log, done, keep).await,
            State::Redis(r) => r.finish_logged(log, done, keep).await,
        }
    }

    /// Every job of a queue (its endpoint was deleted).
    pub async fn drop_queue(&self, queue: &str) -> Result<()> {
        match self {
            State::Embedded(e) => e.drop_queue(queue).await,
            State::Redis(r) => r.drop_queue(queue).await,
        }
    }

    /// Jobs waiting in one queue, counting leased ones.
    pub async fn queue_len(&self, queue: &str) -> Result<usize> {
        match self {
            State::Embedded(e) => Ok(e.queue_len(queue)),
            State::Redis(r) => r.queue_len(queue).await,
        }
    }

    /// Jobs waiting in every queue (pending depth), counting leased ones.
    pub async fn queued(&self) -> Result<u64> {
        match self {
            State::Embedded(e) => Ok(e.queued()),
            State::Redis(r) => r.queued().await,
        }
    }

    /// A counter that changes whenever `bump` is called, here or (with
    /// Redis) on any instance: cached copies of records compare it.
    pub async fn version(&self, name: &str) -> Result<u64> {
        match self {
            State::Embedded(e) => Ok(e.version(name)),
            State::Redis(r) => r.version(name).await,
        }
    }

    pub async fn bump(&self, name: &str) -> Result<u64> {
        match self {
            State::Embedded(e) => Ok(e.bump(name)),
            State::Redis(r) => r.bump(name).await,
        }
    }

    /// Takes or renews the lease `name` for `holder` for `ttl`: whether
    /// `holder` has it now. With Redis one instance at a time holds it
    /// (until it lapses, or [`State::release`]); the embedded store has one
    /// process, which always holds it.
    pub async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        match self {
            State::Embedded(_) => Ok(true),
            State::Redis(r) => r.lease(name, holder, ttl).await,
        }
    }

    /// Gives the lease `name` up, if `holder` has it.
    pub async fn release(&self, name: &str, holder: &str) -> Result<()> {
        match self {
            State::Embedded(_) => Ok(()),
            State::Redis(r) => r.release(name, holder).await,
        }
    }

    /// Commits what is pending and closes (embedded); nothing for Redis.
    pub async fn close(&self) {
        if let State::Embedded(e) = self {
            e.close().await;
        }
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour both backends must show; run against each.
    use super::*;

    fn job(id: &str, queue: &str, due_ms: u64) -> Job {
        Job {
            id: id.into(),
            queue: queue.into(),
            due_ms,
            body: format!("{{\"id\":\"{id}\"}}"),
        }
    }

    pub(crate) async fn records(state: &State) {
        state.put("t", "a", "1", "one".into()).await.unwrap();
        state.put("t", "a", "2", "two".into()).await.unwrap();
        state.put("t", "b", "1", "b-one".into()).await.unwrap();
        state
            .put("u", "a", "1", "other table".into())
            .await
            .unwrap();
        assert_eq!(
            state.get("t", "a", "1").await.unwrap().as_deref(),
            Some("one")
        );
        assert_eq!(state.get("t", "c", "1").await.unwrap(), None);
        assert_eq!(
            state.list("t", "a").await.unwrap(),
            vec![("1".into(), "one".into()), ("2".into(), "two".into())]
        );
        let mut all = state.list_all("t").await.unwrap();
        all.sort();
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(state.delete("t", "a", "1").await.unwrap());
        assert!(!state.delete("t", "a", "1").await.unwrap());
        assert_eq!(state.list("t", "a").await.unwrap().len(), 1);
    }

    pub(crate) async fn logs(state: &State) {
        for i in 0..7 {
            state.push_log("l", "k", format!("v{i}"), 5).await.unwrap();
        }
        state.push_log("l", "other", "x".into(), 5).await.unwrap();
        assert_eq!(
            state.read_log("l", "k", 3).await.unwrap(),
            vec!["v6", "v5", "v4"]
        );
        assert_eq!(state.read_log("l", "k", 100).await.unwrap().len(), 5);
        state.delete_log("l", "k").await.unwrap();
        assert!(state.read_log("l", "k", 100).await.unwrap().is_empty());
        assert_eq!(state.read_log("l", "other", 10).await.unwrap(), vec!["x"]);
    }

    pub(crate) async fn queues(state: &State) {
        let cap = |n| Capacity {
            default: n,
            limited: Vec::new(),
        };
        state
            .enqueue(vec![
                job("a1", "qa", 100),
                job("a2", "qa", 101),
                job("a3", "qa", 102),
                job("b1", "qb", 150),
                job("later", "qb", 10_000),
            ])
            .await
            .unwrap();
        assert_eq!(state.queued().await.unwrap(), 5);
        // At most one per queue: one of each.
        let mut got: Vec<String> = state
            .claim(200, 1_000, &cap(1), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        got.sort();
        assert_eq!(got, vec!["a1", "b1"]);
        // Leased: not claimed again before the lease ends.
        let limited = Capacity {
            default: 10,
            limited: vec![("qa".into(), 1)],
        };
        let got = state.claim(300, 1_000, &limited, 10).await.unwrap();
        assert_eq!(
            got.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            vec!["a2"]
        );
        assert_eq!(got[0].body, "{\"id\":\"a2\"}");
        let finished = |id: &str, value: &str| Finished {
            queue: "qa".into(),
            id: id.into(),
            key: "qa".into(),
            value: value.into(),
        };
        state
            .finish_logged("done", vec![finished("a1", "a1 delivered")], 10)
            .await
            .unwrap();
        // A rescheduled job keeps its id and takes its new body and time.
        let mut again = job("b1", "qb", 5_000);
        again.body = "{\"attempt\":2}".into();
        state.enqueue(vec![again]).await.unwrap();
        // a2's lease ended at 1,300: due again (a crashed claimer's job).
        let mut got: Vec<String> = state
            .claim(1_500, 1_000, &cap(10), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        got.sort();
        assert_eq!(got, vec!["a2", "a3"]);
        state.finish("qa", "a2").await.unwrap();
        let mut got = state.claim(6_000, 1_000, &cap(10), 10).await.unwrap();
        got.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(got.len(), 2, "a3 (lease ended) and b1 (rescheduled)");
        assert_eq!(got[1].id, "b1");
        assert_eq!(got[1].body, "{\"attempt\":2}");
        state.drop_queue("qa").await.unwrap();
        assert_eq!(
            state.queued().await.unwrap(),
            2,
            "a3 dropped, b1 and later remain"
        );
        assert!(
            state
                .claim(20_000, 1_000, &cap(10), 0)
                .await
                .unwrap()
                .is_empty()
        );
        let got = state.claim(20_000, 1_000, &cap(10), 10).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            state.read_log("done", "qa", 10).await.unwrap(),
            vec!["a1 delivered"],
            "finish_logged wrote its log entry"
        );
        let v = state.version("w").await.unwrap();
        assert!(state.bump("w").await.unwrap() > v);
    }
}
