//! The embedded backend: one `redb` file (`state.redb` under
//! `TC_DATA_DIR`), for a broker without Redis.
//!
//! Writes go to one writer thread, which applies every write waiting at
//! that moment in one transaction and commits it: concurrent writers share
//! a commit. Records (webhook endpoints and their secrets) are committed
//! durably (fsync) before their caller's future resolves. Queue and log
//! writes are committed without fsync and made durable at the next durable
//! commit, at most [`FLUSH`] later: a crash or `kill -9` loses at most the
//! last [`FLUSH`] of them (a delivery is then made again, or its event not
//! handed to webhooks). Reads use redb's snapshots beside the writer.
//!
//! Queues are indexed in memory (queue → due time → job id; about 100
//! bytes a job, bodies stay on disk), rebuilt from the file at start. This
//! process is the file's only user (redb locks it), so a lease is only
//! kept in memory: after a crash every job is due at its stored time again.
//!
//! New jobs are written behind: they wait in memory (with their bodies,
//! at most [`MAX_UNWRITTEN`] bytes; a flush of that much holds a few times
//! it while redb writes it) and go into the file at the next durable
//! flush, at most [`FLUSH`] later, the same bound as a non-durable commit.
//! A job finished before that flush never touches the file: a delivery
//! that succeeds at once costs no job write at all.
//!
//! A flush writes the jobs waiting as batches, one row of up to
//! [`BATCH_JOBS`] jobs each (a job's place in it is its slot). A job
//! finished later, or written again in a newer version (a retry), marks
//! its slot done with a small row of its own instead of deleting a row;
//! once every slot of a batch is done, the batch and its marks are
//! deleted. Per delivery of a backlog that is one small insert, where a
//! row per job written and then deleted made the writer a quarter of the
//! broker's CPU (docs/benchmarks.md, scenario 7).
//!
//! Logs are kept in groups: the entries one write appends to one log (the
//! attempts a batch of deliveries recorded) are one row, and the oldest
//! groups are dropped while the rest still hold `keep` entries, so a log
//! keeps between `keep` and `keep` plus one group's entries.
//!
//! Files of earlier versions (a row per job, a row per log entry) are
//! moved to this layout when opened.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Capacity, Finished, Job, Result, StateError};

const RECORDS: TableDefinition<(&str, &str, &str), &str> = TableDefinition::new("records");
/// (log key, group number) → the group's entries, oldest first.
const LOGS: TableDefinition<(&str, u64), Vec<&str>> = TableDefinition::new("log_groups");
/// Batch number → (job id, queue, due ms, body) in each slot.
const BATCHES: TableDefinition<u64, Vec<(&str, &str, u64, &str)>> =
    TableDefinition::new("job_batches");
/// (batch, slot) of jobs finished or written again since.
const DONE: TableDefinition<(u64, u32), ()> = TableDefinition::new("job_slots_done");
/// The layout of earlier versions, moved at open.
const OLD_LOGS: TableDefinition<(&str, u64), &str> = TableDefinition::new("logs");
const OLD_JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");

/// A job row of the batch layout: id, queue, due ms, body.
type Row<'a> = (&'a str, &'a str, u64, &'a str);

/// Writes waiting for the writer thread at most; callers wait beyond it.
const WRITE_QUEUE: usize = 4096;

/// How long the writer waits for more writes when nobody waits for the
/// ones it has (jobs done, attempts logged): under load, one commit then
/// carries many of them. They are durable only at the next flush anyway;
/// at 10 ms a burst of deliveries costs 5 commits in a flush interval
/// rather than 25 (commits were about a third of the writer's time).
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Queue and log writes are durable (fsync) at most this long after their
/// commit: the writer's flush interval.
pub const FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// Bytes of new jobs waiting in memory for the next flush at most; an
/// enqueue past it waits for a flush.
const MAX_UNWRITTEN: usize = 4 << 20;

/// Jobs in one batch row at most, and their bodies' bytes: a claim reads
/// the whole row of each job it takes from the file.
const BATCH_JOBS: usize = 256;
const BATCH_BYTES: usize = 256 << 10;

/// Where a job's version is in the file: a batch and its place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Slot {
    batch: u64,
    slot: u32,
}

/// One write for the writer thread.
enum Write {
    Record {
        key: (String, String, String),
        value: Option<String>,
    },
    LogPush {
        key: String,
        value: String,
        keep: usize,
    },
    LogClear {
        key: String,
    },
    /// Jobs finished or dropped: their slots marked done.
    Done {
        slots: Vec<Slot>,
    },
    /// Jobs done (their slots, when in the file) and a log entry for each:
    /// (log key, value).
    Finished {
        slots: Vec<Slot>,
        entries: Vec<(String, String)>,
        keep: usize,
    },
    /// A durable commit of everything before it, and of the new jobs
    /// waiting in memory.
    Flush,
}

/// A write and, when its caller waits for it, where its answer goes.
struct Op {
    write: Write,
    reply: Option<oneshot::Sender<Result<bool>>>,
}

impl Op {
    /// A write nobody waits for.
    fn detached(write: Write) -> Self {
        Op { write, reply: None }
    }

    /// Whether it must be on disk when its commit returns.
    fn durable(&self) -> bool {
        matches!(self.write, Write::Record { .. } | Write::Flush)
    }

    fn awaited(&self) -> bool {
        self.reply.is_some()
    }

    fn answer(self, result: Result<bool>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(result);
        }
    }
}

/// A job id or queue name in the index: shared between its maps, so that
/// filing a job again allocates nothing.
type Name = Arc<str>;

/// What the index knows of a job.
struct Meta {
    queue: Name,
    due: u64,
    /// Its order among jobs due at the same time (filing order).
    seq: u64,
    /// Its latest version written to the file.
    stored: Option<Slot>,
}

#[derive(Default)]
struct Index {
    /// queue → (due, seq) → id, leased jobs at their lease's end. Keyed by
    /// numbers: filing a job compares no strings.
    queues: HashMap<Name, BTreeMap<(u64, u64), Name>>,
    /// The seq of the next job filed.
    next_seq: u64,
    /// id → its queue, due time and place in the file.
    jobs: HashMap<Name, Meta>,
    /// Jobs whose latest version is not in the file yet.
    unwritten: HashMap<String, Unwritten>,
    /// Bytes of their bodies.
    unwritten_bytes: usize,
    /// Generation of the next unwritten version.
    generation: u64,
    /// Number of the next batch written.
    next_batch: u64,
}

/// A job's latest version, waiting for the next flush.
struct Unwritten {
    job: Job,
    generation: u64,
    /// The slot the writer is writing this version to now.
    writing: Option<Slot>,
}

impl Unwritten {
    fn bytes(&self) -> usize {
        self.job.body.len() + self.job.id.len() + self.job.queue.len() + 64
    }
}

impl Index {
    /// Files `id` under `queue` at `due` (moved when it was filed).
    fn place(&mut self, id: &str, queue: &str, due: u64) {
        let (id, stored) = match self.unfile(id) {
            Some((id, meta)) => (id, meta.stored),
            None => (Name::from(id), None),
        };
        let queue = match self.queues.get_key_value(queue) {
            Some((name, _)) => Arc::clone(name),
            None => Name::from(queue),
        };
        self.next_seq += 1;
        let seq = self.next_seq;
        self.queues
            .entry(Arc::clone(&queue))
            .or_default()
            .insert((due, seq), Arc::clone(&id));
        self.jobs.insert(
            id,
            Meta {
                queue,
                due,
                seq,
                stored,
            },
        );
    }

    /// Takes `id` out of its queue; what was known of it.
    fn unfile(&mut self, id: &str) -> Option<(Name, Meta)> {
        let (id, meta) = self.jobs.remove_entry(id)?;
        if let Some(set) = self.queues.get_mut(&meta.queue) {
            set.remove(&(meta.due, meta.seq));
            if set.is_empty() {
                self.queues.remove(&meta.queue);
            }
        }
        Some((id, meta))
    }

    /// A new version of `job`, to be written at the next flush.
    fn hold(&mut self, job: Job) {
        self.place(&job.id, &job.queue, job.due_ms);
        self.generation += 1;
        let entry = Unwritten {
            job,
            generation: self.generation,
            writing: None,
        };
        self.unwritten_bytes += entry.bytes();
        if let Some(old) = self.unwritten.insert(entry.job.id.clone(), entry) {
            self.unwritten_bytes -= old.bytes();
            // A version being written now: its slot is superseded.
            if let (Some(slot), Some(meta)) = (old.writing, self.jobs.get_mut(old.job.id.as_str()))
            {
                meta.stored = Some(slot);
            }
        }
    }

    /// Forgets a job; the slots of the file that held it, to mark done.
    fn finish(&mut self, id: &str, done: &mut Vec<Slot>) {
        let stored = self.unfile(id).and_then(|(_, m)| m.stored);
        let writing = match self.unwritten.remove(id) {
            Some(old) => {
                self.unwritten_bytes -= old.bytes();
                old.writing
            }
            None => None,
        };
        done.extend(stored);
        done.extend(writing);
    }
}

pub struct Embedded {
    path: PathBuf,
    db: Arc<Database>,
    tx: mpsc::Sender<Op>,
    index: Arc<Mutex<Index>>,
    versions: Mutex<HashMap<String, u64>>,
    next_version: AtomicU64,
}

fn err(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Embedded {
    /// The store in `dir`, keeping at most `cache_bytes` of the file in
    /// memory (`TC_DATA_CACHE_BYTES`).
    pub fn open(dir: PathBuf, cache_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(&format!("cannot create TC_DATA_DIR {}", dir.display()), e))?;
        let path = dir.join("state.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError(format!(
                "{} is in use by another process: give each broker its own TC_DATA_DIR, or use Redis (TC_REDIS_URL) to share state",
                path.display()
            )),
            e => err(&format!("cannot open {}", path.display()), e),
        })?;
        Self::with_database(db, path)
    }

    /// A store in memory only: for servers started in-process by tests.
    pub fn in_memory() -> Result<Self> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| err("in-memory store", e))?;
        Self::with_database(db, PathBuf::from("(memory)"))
    }

    fn with_database(db: Database, path: PathBuf) -> Result<Self> {
        upgrade(&db)?;
        let (index, live) = load(&db)?;
        let db = Arc::new(db);
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_db = Arc::clone(&db);
        let writer_index = Arc::clone(&index);
        let dirty = Arc::new(AtomicBool::new(false));
        let writer_dirty = Arc::clone(&dirty);
        std::thread::Builder::new()
            .name("tc-state-writer".into())
            .spawn(move || writer(&writer_db, &writer_index, live, rx, &writer_dirty))
            .map_err(|e| err("cannot start the state writer", e))?;
        // Asks for a durable commit every FLUSH while there is something
        // not yet durable; ends with the writer.
        let flush_tx = tx.downgrade();
        let flush_index = Arc::clone(&index);
        std::thread::Builder::new()
            .name("tc-state-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH);
                    let Some(tx) = flush_tx.upgrade() else { return };
                    let waiting =
                        dirty.load(Ordering::Acquire) || !lock(&flush_index).unwritten.is_empty();
                    if waiting && tx.blocking_send(Op::detached(Write::Flush)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| err("cannot start the state flusher", e))?;
        Ok(Self {
            path,
            db,
            tx,
            index,
            versions: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, write: Write) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op {
                write,
                reply: Some(reply),
            })
            .await
            .map_err(|_| StateError("the state writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StateError("the state writer has stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| err("read task", e))?
    }

    pub async fn get(&self, table: &str, tenant: &str, id: &str) -> Result<Option<String>> {
        let key = (table.to_string(), tenant.to_string(), id.to_string());
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(RECORDS).map_err(|e| err("records", e))?;
            Ok(t.get((key.0.as_str(), key.1.as_str(), key.2.as_str()))
                .map_err(|e| err("records", e))?
                .map(|v| v.value().to_string()))
        })
        .await
    }

    pub async fn put(&self, table: &str, tenant: &str, id: &str, value: String) -> Result<()> {
        let key = (table.to_string(), tenant.to_string(), id.to_string());
        self.write(Write::Record {
            key,
            value: Some(value),
        })
        .await
        .map(|_| ())
    }

    pub async fn delete(&self, table: &str, tenant: &str, id: &str) -> Result<bool> {
        let key = (table.to_string(), tenant.to_string(), id.to_string());
        self.write(Write::Record { key, value: None }).await
    }

    pub async fn list(&self, table: &str, tenant: &str) -> Result<Vec<(String, String)>> {
        let (table, tenant) = (table.to_string(), tenant.to_string());
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(RECORDS).map_err(|e| err("records", e))?;
            let end = format!("{tenant}\0");
            let rows = t
                .range((table.as_str(), tenant.as_str(), "")..(table.as_str(), end.as_str(), ""))
                .map_err(|e| err("records", e))?;
            let mut out = Vec::new();
            for row in rows {
                let (k, v) = row.map_err(|e| err("records", e))?;
                out.push((k.value().2.to_string(), v.value().to_string()));
            }
            Ok(out)
        })
        .await
    }

    pub async fn list_all(&self, table: &str) -> Result<Vec<(String, String, String)>> {
        let table = table.to_string();
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(RECORDS).map_err(|e| err("records", e))?;
            let end = format!("{table}\0");
            let rows = t
                .range((table.as_str(), "", "")..(end.as_str(), "", ""))
                .map_err(|e| err("records", e))?;
            let mut out = Vec::new();
            for row in rows {
                let (k, v) = row.map_err(|e| err("records", e))?;
                let (_, tenant, id) = k.value();
                out.push((tenant.to_string(), id.to_string(), v.value().to_string()));
            }
            Ok(out)
        })
        .await
    }

    pub async fn push_log(&self, log: &str, key: &str, value: String, keep: usize) -> Result<()> {
        let key = log_key(log, key);
        self.write(Write::LogPush {
            key,
            value,
            keep: keep.max(1),
        })
        .await
        .map(|_| ())
    }

    pub async fn read_log(&self, log: &str, key: &str, limit: usize) -> Result<Vec<String>> {
        let key = log_key(log, key);
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(LOGS).map_err(|e| err("logs", e))?;
            let rows = t
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))
                .map_err(|e| err("logs", e))?;
            let mut out = Vec::new();
            for row in rows.rev() {
                if out.len() >= limit {
                    break;
                }
                let (_, group) = row.map_err(|e| err("logs", e))?;
                let group = group.value();
                let room = limit - out.len();
                out.extend(group.iter().rev().take(room).map(|v| v.to_string()));
            }
            Ok(out)
        })
        .await
    }

    pub async fn delete_log(&self, log: &str, key: &str) -> Result<()> {
        let key = log_key(log, key);
        self.write(Write::LogClear { key }).await.map(|_| ())
    }

    /// Held in memory and written at the next flush (see the module's
    /// doc); past [`MAX_UNWRITTEN`] bytes it waits for that flush.
    pub async fn enqueue(&self, jobs: Vec<Job>) -> Result<()> {
        let full = {
            let mut index = lock(&self.index);
            for job in jobs {
                index.hold(job);
            }
            index.unwritten_bytes > MAX_UNWRITTEN
        };
        if full {
            self.write(Write::Flush).await?;
        }
        Ok(())
    }

    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        capacity: &Capacity,
        max: usize,
    ) -> Result<Vec<Job>> {
        let mut out = Vec::new();
        // Jobs whose body is in the file: (slot, id, queue).
        let mut stored: Vec<(Slot, String, String)> = Vec::new();
        {
            let mut index = lock(&self.index);
            let limited: HashMap<&str, usize> = capacity
                .limited
                .iter()
                .map(|(q, n)| (q.as_str(), *n))
                .collect();
            let queues: Vec<Name> = index.queues.keys().cloned().collect();
            let lease_end = now_ms.saturating_add(lease_ms);
            for queue in queues {
                if out.len() + stored.len() >= max {
                    break;
                }
                let cap = limited.get(&*queue).copied().unwrap_or(capacity.default);
                let room = cap.min(max - out.len() - stored.len());
                let due: Vec<Name> = index.queues[&queue]
                    .iter()
                    .take_while(|((d, _), _)| *d <= now_ms)
                    .take(room)
                    .map(|(_, id)| Arc::clone(id))
                    .collect();
                for id in due {
                    index.place(&id, &queue, lease_end);
                    // Its body from memory when it is not in the file yet.
                    if let Some(u) = index.unwritten.get(&*id) {
                        out.push(u.job.clone());
                    } else if let Some(slot) = index.jobs.get(&*id).and_then(|m| m.stored) {
                        stored.push((slot, id.to_string(), queue.to_string()));
                    }
                }
            }
        }
        if stored.is_empty() {
            return Ok(out);
        }
        stored.sort();
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(BATCHES).map_err(|e| err("jobs", e))?;
            let mut i = 0;
            while i < stored.len() {
                let batch = stored[i].0.batch;
                let row = t.get(batch).map_err(|e| err("jobs", e))?;
                let rows = row.as_ref().map(|r| r.value()).unwrap_or_default();
                while i < stored.len() && stored[i].0.batch == batch {
                    let (slot, id, queue) = &stored[i];
                    match rows.get(slot.slot as usize) {
                        Some((row_id, _, due, body)) if row_id == id => out.push(Job {
                            id: id.clone(),
                            queue: queue.clone(),
                            due_ms: *due,
                            body: body.to_string(),
                        }),
                        _ => tracing::warn!(job = %id, "skipped a job missing from the file"),
                    }
                    i += 1;
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn finish(&self, _queue: &str, id: &str) -> Result<()> {
        let mut slots = Vec::new();
        lock(&self.index).finish(id, &mut slots);
        if slots.is_empty() {
            return Ok(());
        }
        self.write(Write::Done { slots }).await.map(|_| ())
    }

    /// Jobs done and their log entries, as one write not waited for: the
    /// caller goes on at once (a crash within [`FLUSH`] loses it, and the
    /// jobs are done again).
    pub async fn finish_logged(&self, log: &str, done: Vec<Finished>, keep: usize) -> Result<()> {
        let mut slots = Vec::new();
        {
            let mut index = lock(&self.index);
            for d in &done {
                index.finish(&d.id, &mut slots);
            }
        }
        let entries = done
            .into_iter()
            .map(|d| (log_key(log, &d.key), d.value))
            .collect();
        self.tx
            .send(Op::detached(Write::Finished {
                slots,
                entries,
                keep: keep.max(1),
            }))
            .await
            .map_err(|_| StateError("the state writer has stopped".into()))
    }

    pub async fn drop_queue(&self, queue: &str) -> Result<()> {
        let mut slots = Vec::new();
        {
            let mut index = lock(&self.index);
            let ids: Vec<String> = index
                .queues
                .get(queue)
                .map(|s| s.values().map(|id| id.to_string()).collect())
                .unwrap_or_default();
            for id in &ids {
                index.finish(id, &mut slots);
            }
        }
        self.write(Write::Done { slots }).await.map(|_| ())
    }

    pub fn queue_len(&self, queue: &str) -> usize {
        lock(&self.index).queues.get(queue).map_or(0, BTreeMap::len)
    }

    pub fn queued(&self) -> u64 {
        lock(&self.index).jobs.len() as u64
    }

    pub fn version(&self, name: &str) -> u64 {
        lock(&self.versions).get(name).copied().unwrap_or(0)
    }

    pub fn bump(&self, name: &str) -> u64 {
        let v = self.next_version.fetch_add(1, Ordering::Relaxed);
        lock(&self.versions).insert(name.to_string(), v);
        v
    }

    /// Commits everything written so far durably.
    pub async fn close(&self) {
        let _ = self.write(Write::Flush).await;
    }
}

fn log_key(log: &str, key: &str) -> String {
    format!("{log}\0{key}")
}

/// Moves a file of an earlier version to this layout: each log entry a
/// group of its own, the jobs into batches. One durable transaction.
fn upgrade(db: &Database) -> Result<()> {
    let txn = db.begin_write().map_err(|e| err("begin", e))?;
    {
        txn.open_table(RECORDS).map_err(|e| err("records", e))?;
        let mut logs = txn.open_table(LOGS).map_err(|e| err("logs", e))?;
        let mut batches = txn.open_table(BATCHES).map_err(|e| err("jobs", e))?;
        txn.open_table(DONE).map_err(|e| err("jobs", e))?;
        let old_logs = txn.open_table(OLD_LOGS).map_err(|e| err("logs", e))?;
        for row in old_logs.iter().map_err(|e| err("logs", e))? {
            let (k, v) = row.map_err(|e| err("logs", e))?;
            let (key, seq) = k.value();
            logs.insert((key, seq), vec![v.value()])
                .map_err(|e| err("logs", e))?;
        }
        let old_jobs = txn.open_table(OLD_JOBS).map_err(|e| err("jobs", e))?;
        let mut jobs = Vec::new();
        for row in old_jobs.iter().map_err(|e| err("jobs", e))? {
            let (_, v) = row.map_err(|e| err("jobs", e))?;
            match serde_json::from_str::<Job>(v.value()) {
                Ok(job) => jobs.push(job),
                Err(e) => tracing::warn!("skipped an unreadable job: {e}"),
            }
        }
        let first = batches
            .last()
            .map_err(|e| err("jobs", e))?
            .map_or(0, |(k, _)| k.value() + 1);
        for (number, chunk) in (first..).zip(jobs.chunks(BATCH_JOBS)) {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|j| (j.id.as_str(), j.queue.as_str(), j.due_ms, j.body.as_str()))
                .collect();
            batches.insert(number, rows).map_err(|e| err("jobs", e))?;
        }
    }
    txn.delete_table(OLD_LOGS).map_err(|e| err("logs", e))?;
    txn.delete_table(OLD_JOBS).map_err(|e| err("jobs", e))?;
    txn.commit().map_err(|e| err("commit", e))
}

/// The index of the jobs in the file, and each batch's slots not done.
/// A job found in several batches (a crash between writing a newer version
/// and marking the older one) is the newest.
fn load(db: &Database) -> Result<(Index, HashMap<u64, u32>)> {
    let read = db.begin_read().map_err(|e| err("read", e))?;
    let batches = read.open_table(BATCHES).map_err(|e| err("jobs", e))?;
    let done_table = read.open_table(DONE).map_err(|e| err("jobs", e))?;
    let mut done = std::collections::HashSet::new();
    for row in done_table.iter().map_err(|e| err("jobs", e))? {
        let (k, _) = row.map_err(|e| err("jobs", e))?;
        let (batch, slot) = k.value();
        done.insert(Slot { batch, slot });
    }
    let mut index = Index::default();
    let mut live: HashMap<u64, u32> = HashMap::new();
    for row in batches.iter().map_err(|e| err("jobs", e))? {
        let (k, v) = row.map_err(|e| err("jobs", e))?;
        let batch = k.value();
        index.next_batch = batch + 1;
        let mut left = 0;
        for (n, (id, queue, due, _)) in v.value().into_iter().enumerate() {
            let slot = Slot {
                batch,
                slot: n as u32,
            };
            if done.contains(&slot) {
                continue;
            }
            // Batches are read oldest first: a newer version replaces.
            if let Some(older) = index.jobs.get(id).and_then(|m| m.stored)
                && let Some(n) = live.get_mut(&older.batch)
            {
                *n -= 1;
            }
            index.place(id, queue, due);
            if let Some(meta) = index.jobs.get_mut(id) {
                meta.stored = Some(slot);
            }
            left += 1;
        }
        live.insert(batch, left);
    }
    Ok((index, live))
}

/// The writer thread: every write waiting, one transaction, one commit;
/// durable when a write in it asks for it (records, flushes), else
/// durable at the next flush (`dirty` tells the flusher). `live`: the
/// slots not done of each batch in the file.
fn writer(
    db: &Database,
    index: &Mutex<Index>,
    mut live: HashMap<u64, u32>,
    mut rx: mpsc::Receiver<Op>,
    dirty: &AtomicBool,
) {
    // Per log key: its groups and entries, learned on first use.
    let mut logs: HashMap<String, LogSpan> = HashMap::new();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        let mut lingered = false;
        while batch.len() < WRITE_QUEUE {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) if !lingered && !batch.iter().any(Op::awaited) => {
                    lingered = true;
                    std::thread::sleep(LINGER);
                }
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(Op::durable);
        let flush = batch.iter().any(|op| matches!(op.write, Write::Flush));
        let new_jobs = if flush {
            take_unwritten(index)
        } else {
            NewJobs::default()
        };
        let mut tx_logs = logs.clone();
        let mut tx_live = live.clone();
        let result = apply(db, &batch, &mut tx_logs, &mut tx_live, durable, &new_jobs);
        written(index, new_jobs, result.is_ok());
        match result {
            Ok(results) => {
                logs = tx_logs;
                live = tx_live;
                dirty.store(!durable, Ordering::Release);
                for (op, existed) in batch.into_iter().zip(results) {
                    op.answer(Ok(existed));
                }
            }
            Err(e) => {
                tracing::error!("state store write failed: {e}");
                for op in batch {
                    op.answer(Err(e.clone()));
                }
            }
        }
    }
}

/// A log as stored: its oldest and next group numbers, the entries it
/// holds, and the entries of each group from the oldest.
#[derive(Clone, Default)]
struct LogSpan {
    next: u64,
    entries: usize,
    groups: std::collections::VecDeque<(u64, usize)>,
}

fn apply(
    db: &Database,
    batch: &[Op],
    logs: &mut HashMap<String, LogSpan>,
    live: &mut HashMap<u64, u32>,
    durable: bool,
    new_jobs: &NewJobs,
) -> Result<Vec<bool>> {
    let mut txn = db.begin_write().map_err(|e| err("begin", e))?;
    if !durable {
        txn.set_durability(redb::Durability::None)
            .map_err(|e| err("durability", e))?;
    }
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut records = txn.open_table(RECORDS).map_err(|e| err("records", e))?;
        let mut log_table = txn.open_table(LOGS).map_err(|e| err("logs", e))?;
        let mut jobs = Jobs {
            batches: txn.open_table(BATCHES).map_err(|e| err("jobs", e))?,
            done: txn.open_table(DONE).map_err(|e| err("jobs", e))?,
            live,
        };
        // The new jobs first: a job finished while they were written marks
        // its new slot done in this same transaction or a later one.
        for (number, rows) in &new_jobs.batches {
            let rows: Vec<Row> = rows
                .iter()
                .map(|(id, queue, due, body)| (id.as_str(), queue.as_str(), *due, body.as_str()))
                .collect();
            let count = rows.len() as u32;
            jobs.batches
                .insert(*number, rows)
                .map_err(|e| err("jobs", e))?;
            jobs.live.insert(*number, count);
        }
        jobs.done(&new_jobs.superseded)?;
        for op in batch {
            let existed = match &op.write {
                Write::Record { key, value, .. } => {
                    let k = (key.0.as_str(), key.1.as_str(), key.2.as_str());
                    match value {
                        Some(v) => records
                            .insert(k, v.as_str())
                            .map_err(|e| err("records", e))?
                            .is_some(),
                        None => records.remove(k).map_err(|e| err("records", e))?.is_some(),
                    }
                }
                Write::LogPush { key, value, keep } => {
                    log_append(&mut log_table, logs, key, &[value.as_str()], *keep)?;
                    true
                }
                Write::Finished {
                    slots,
                    entries,
                    keep,
                } => {
                    jobs.done(slots)?;
                    // One group per log: the entries in order, per key.
                    let mut by_key: Vec<(&str, Vec<&str>)> = Vec::new();
                    for (key, value) in entries {
                        match by_key.iter_mut().find(|(k, _)| k == key) {
                            Some((_, values)) => values.push(value),
                            None => by_key.push((key, vec![value])),
                        }
                    }
                    for (key, values) in by_key {
                        log_append(&mut log_table, logs, key, &values, *keep)?;
                    }
                    true
                }
                Write::LogClear { key } => {
                    log_table
                        .retain_in((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| false)
                        .map_err(|e| err("logs", e))?;
                    let next = logs.get(key).map_or(0, |span| span.next);
                    logs.insert(
                        key.clone(),
                        LogSpan {
                            next,
                            ..LogSpan::default()
                        },
                    );
                    true
                }
                Write::Flush => true,
                Write::Done { slots } => {
                    jobs.done(slots)?;
                    true
                }
            };
            results.push(existed);
        }
    }
    txn.commit().map_err(|e| err("commit", e))?;
    Ok(results)
}

/// The job tables within a write transaction.
struct Jobs<'t, 'l> {
    batches: redb::Table<'t, u64, Vec<Row<'static>>>,
    done: redb::Table<'t, (u64, u32), ()>,
    live: &'l mut HashMap<u64, u32>,
}

impl Jobs<'_, '_> {
    /// Marks slots done; a batch whose every slot is done goes, with its
    /// marks. Slots of batches not in the file (a flush that failed) are
    /// ignored.
    fn done(&mut self, slots: &[Slot]) -> Result<()> {
        for slot in slots {
            let Some(left) = self.live.get_mut(&slot.batch) else {
                continue;
            };
            let fresh = self
                .done
                .insert((slot.batch, slot.slot), ())
                .map_err(|e| err("jobs", e))?
                .is_none();
            if !fresh {
                continue;
            }
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.live.remove(&slot.batch);
                self.batches
                    .remove(slot.batch)
                    .map_err(|e| err("jobs", e))?;
                self.done
                    .retain_in((slot.batch, 0)..=(slot.batch, u32::MAX), |_, _| false)
                    .map_err(|e| err("jobs", e))?;
            }
        }
        Ok(())
    }
}

/// Appends a group of entries to a log and drops its oldest groups while
/// the rest hold `keep` entries.
fn log_append(
    table: &mut redb::Table<(&str, u64), Vec<&str>>,
    logs: &mut HashMap<String, LogSpan>,
    key: &str,
    values: &[&str],
    keep: usize,
) -> Result<()> {
    if !logs.contains_key(key) {
        let span = log_span(table, key)?;
        logs.insert(key.to_string(), span);
    }
    let Some(span) = logs.get_mut(key) else {
        return Ok(());
    };
    table
        .insert((key, span.next), values.to_vec())
        .map_err(|e| err("logs", e))?;
    span.groups.push_back((span.next, values.len()));
    span.entries += values.len();
    span.next += 1;
    while let Some(&(oldest, len)) = span.groups.front() {
        if span.entries - len < keep {
            break;
        }
        table.remove((key, oldest)).map_err(|e| err("logs", e))?;
        span.groups.pop_front();
        span.entries -= len;
    }
    Ok(())
}

/// A log as stored.
fn log_span(table: &redb::Table<(&str, u64), Vec<&str>>, key: &str) -> Result<LogSpan> {
    let mut span = LogSpan::default();
    for row in table
        .range((key, 0)..=(key, u64::MAX))
        .map_err(|e| err("logs", e))?
    {
        let (k, v) = row.map_err(|e| err("logs", e))?;
        let (_, seq) = k.value();
        let len = v.value().len();
        span.groups.push_back((seq, len));
        span.entries += len;
        span.next = seq + 1;
    }
    Ok(span)
}

/// A job row to write: id, queue, due ms, body.
type NewRow = (String, String, u64, String);

/// What a flush writes: the new jobs in numbered batches, and the slots
/// their older versions held (marked done in the same transaction).
#[derive(Default)]
struct NewJobs {
    batches: Vec<(u64, Vec<NewRow>)>,
    superseded: Vec<Slot>,
    /// (id, generation, the slot it supersedes) of each version written.
    versions: Vec<(String, u64, Option<Slot>)>,
}

/// At a flush: the new jobs waiting in memory, each given its slot and
/// marked as being written.
fn take_unwritten(index: &Mutex<Index>) -> NewJobs {
    let mut index = lock(index);
    let index = &mut *index;
    // In queue and due order, so that a claim of a queue's next jobs
    // reads few batches.
    let mut waiting: Vec<(&String, &mut Unwritten)> = index
        .unwritten
        .iter_mut()
        .filter(|(_, u)| u.writing.is_none())
        .collect();
    waiting.sort_unstable_by(|a, b| {
        (&a.1.job.queue, a.1.job.due_ms, a.0).cmp(&(&b.1.job.queue, b.1.job.due_ms, b.0))
    });
    let mut out = NewJobs::default();
    let mut rows: Vec<NewRow> = Vec::new();
    let mut bytes = 0;
    let mut number = index.next_batch;
    for (id, u) in waiting {
        if rows.len() >= BATCH_JOBS || bytes >= BATCH_BYTES {
            out.batches.push((number, std::mem::take(&mut rows)));
            number += 1;
            bytes = 0;
        }
        let slot = Slot {
            batch: number,
            slot: rows.len() as u32,
        };
        u.writing = Some(slot);
        let older = index.jobs.get(id.as_str()).and_then(|m| m.stored);
        out.superseded.extend(older);
        bytes += u.job.body.len();
        rows.push((
            id.clone(),
            u.job.queue.clone(),
            u.job.due_ms,
            u.job.body.clone(),
        ));
        out.versions.push((id.clone(), u.generation, older));
    }
    if !rows.is_empty() {
        out.batches.push((number, rows));
        number += 1;
    }
    index.next_batch = number;
    out
}

/// After the commit that wrote them: versions still the latest are in the
/// file now and leave memory; when it failed, they wait for the next
/// flush (their slots are never used: batch numbers are not reused).
fn written(index: &Mutex<Index>, new_jobs: NewJobs, ok: bool) {
    let mut index = lock(index);
    let index = &mut *index;
    for (id, generation, older) in new_jobs.versions {
        let Some(u) = index.unwritten.get_mut(&id) else {
            // Finished meanwhile: its slots were marked done.
            continue;
        };
        if u.generation != generation {
            // Enqueued again meanwhile: `hold` took the written slot as
            // the stored one; that version waits for the next flush. Had
            // the write failed, the older slot is still the stored one.
            if !ok && let Some(meta) = index.jobs.get_mut(id.as_str()) {
                meta.stored = older;
            }
            continue;
        }
        let slot = u.writing.take();
        if ok {
            if let Some(u) = index.unwritten.remove(&id) {
                index.unwritten_bytes -= u.bytes();
            }
            if let Some(meta) = index.jobs.get_mut(id.as_str()) {
                meta.stored = slot;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DEFAULT_CACHE_BYTES, State, contract};

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tc-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn job(id: &str, body: &str) -> Job {
        Job {
            id: id.into(),
            queue: "q".into(),
            due_ms: 1,
            body: body.into(),
        }
    }

    /// Opens the store in `dir` again once the previous one let go of it.
    async fn reopen(dir: &Path) -> Embedded {
        for _ in 0..50 {
            if let Ok(s) = Embedded::open(dir.to_path_buf(), DEFAULT_CACHE_BYTES) {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("not reopened")
    }

    fn all() -> Capacity {
        Capacity {
            default: 100,
            limited: Vec::new(),
        }
    }

    #[tokio::test]
    async fn jobs_are_written_behind_and_finished_ones_leave_no_row() {
        let dir = scratch();
        {
            let store = Embedded::open(dir.clone(), DEFAULT_CACHE_BYTES).unwrap();
            // Finished before any flush: never in the file.
            store
                .enqueue(vec![job("quick", "{\"a\":1}")])
                .await
                .unwrap();
            let claimed = store.claim(10, 1000, &all(), 10).await.unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].body, "{\"a\":1}", "body from memory");
            store.finish("q", "quick").await.unwrap();
            // Flushed, then retried with a new body, then finished: the
            // old version is deleted from the file too.
            store
                .enqueue(vec![job("retried", "{\"v\":1}")])
                .await
                .unwrap();
            store.close().await;
            store
                .enqueue(vec![job("retried", "{\"v\":2}")])
                .await
                .unwrap();
            store.finish("q", "retried").await.unwrap();
            // Flushed and still pending: kept, latest version.
            store.enqueue(vec![job("kept", "{\"v\":1}")]).await.unwrap();
            store.close().await;
            store.enqueue(vec![job("kept", "{\"v\":2}")]).await.unwrap();
            store.close().await;
            assert!(lock(&store.index).unwritten.is_empty());
            assert_eq!(lock(&store.index).unwritten_bytes, 0);
        }
        let store = reopen(&dir).await;
        let left = store.claim(10, 1000, &all(), 10).await.unwrap();
        let rows: Vec<(String, String)> = left.into_iter().map(|j| (j.id, j.body)).collect();
        assert_eq!(rows, vec![("kept".to_string(), "{\"v\":2}".to_string())]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_enqueue_past_the_memory_bound_waits_for_the_flush() {
        let dir = scratch();
        let store = Embedded::open(dir.clone(), DEFAULT_CACHE_BYTES).unwrap();
        let body = format!("\"{}\"", "x".repeat(1 << 20));
        let jobs: Vec<Job> = (0..5).map(|i| job(&format!("big{i}"), &body)).collect();
        // 5 MiB held past the 4 MiB bound: the call returns once written.
        store.enqueue(jobs).await.unwrap();
        let rows: usize = {
            let read = store.db.begin_read().unwrap();
            let t = read.open_table(BATCHES).unwrap();
            t.iter().unwrap().map(|r| r.unwrap().1.value().len()).sum()
        };
        assert_eq!(rows, 5, "in the file when enqueue returned");
        assert!(lock(&store.index).unwritten_bytes <= MAX_UNWRITTEN);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn keeps_the_contract_and_survives_reopening() {
        let dir = scratch();
        {
            let state = State::embedded(dir.clone(), DEFAULT_CACHE_BYTES).unwrap();
            contract::records(&state).await;
            contract::logs(&state).await;
            contract::queues(&state).await;
            let again = State::embedded(dir.clone(), DEFAULT_CACHE_BYTES);
            assert!(
                matches!(&again, Err(e) if e.0.contains("in use by another process")),
                "a second opener is refused"
            );
            state
                .enqueue(vec![Job {
                    id: "kept".into(),
                    queue: "q".into(),
                    due_ms: 1,
                    body: "{}".into(),
                }])
                .await
                .unwrap();
            state.close().await;
        }
        // The writer thread exits when the last sender is dropped; redb
        // releases the file lock with the database.
        let mut reopened = None;
        for _ in 0..50 {
            match State::embedded(dir.clone(), DEFAULT_CACHE_BYTES) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        let state = reopened.expect("reopened");
        assert_eq!(state.list("t", "a").await.unwrap().len(), 1);
        assert_eq!(state.read_log("l", "other", 10).await.unwrap(), vec!["x"]);
        let cap = Capacity {
            default: 10,
            limited: Vec::new(),
        };
        let ids: Vec<String> = state
            .claim(u64::MAX / 2, 10, &cap, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert!(ids.contains(&"kept".to_string()), "{ids:?}");
        // Logs keep counting after a restart.
        state.push_log("l", "other", "y".into(), 1).await.unwrap();
        assert_eq!(state.read_log("l", "other", 10).await.unwrap(), vec!["y"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn finished(id: &str, value: &str) -> Finished {
        Finished {
            queue: "q".into(),
            id: id.into(),
            key: "ep".into(),
            value: value.into(),
        }
    }

    /// Rows of the batch and done tables.
    fn job_rows(store: &Embedded) -> (usize, usize) {
        let read = store.db.begin_read().unwrap();
        let batches = read.open_table(BATCHES).unwrap();
        let done = read.open_table(DONE).unwrap();
        (
            batches.iter().unwrap().count(),
            done.iter().unwrap().count(),
        )
    }

    #[tokio::test]
    async fn batches_go_once_every_job_in_them_is_done() {
        let dir = scratch();
        let store = Embedded::open(dir.clone(), DEFAULT_CACHE_BYTES).unwrap();
        let jobs: Vec<Job> = (0..300)
            .map(|i| job(&format!("j{i:03}"), &format!("{{\"n\":{i}}}")))
            .collect();
        store.enqueue(jobs).await.unwrap();
        store.close().await;
        assert_eq!(job_rows(&store), (2, 0), "300 jobs in two batches");
        let every = Capacity {
            default: 300,
            limited: Vec::new(),
        };
        let claimed = store.claim(10, 1000, &every, 300).await.unwrap();
        assert_eq!(claimed.len(), 300);
        for j in &claimed {
            let n: u32 = j.id[1..].parse().unwrap();
            assert_eq!(j.body, format!("{{\"n\":{n}}}"), "read back from its batch");
        }
        // A retry writes a newer version: the older slot is done.
        let mut retried = job("j007", "{\"attempt\":2}");
        retried.due_ms = 5;
        store.enqueue(vec![retried]).await.unwrap();
        store.close().await;
        assert_eq!(job_rows(&store), (3, 1));
        let done: Vec<Finished> = claimed
            .iter()
            .filter(|j| j.id != "j007")
            .map(|j| finished(&j.id, &j.id))
            .collect();
        store.finish_logged("log", done, 1000).await.unwrap();
        store.close().await;
        assert_eq!(
            job_rows(&store),
            (1, 0),
            "only the retried version's batch is left"
        );
        drop(store);
        let store = reopen(&dir).await;
        let left = store.claim(10, 1000, &all(), 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].body, "{\"attempt\":2}");
        store.finish("q", "j007").await.unwrap();
        store.close().await;
        assert_eq!(job_rows(&store), (0, 0), "nothing left in the file");
        assert_eq!(store.read_log("log", "ep", 1000).await.unwrap().len(), 299);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_log_keeps_between_keep_and_keep_plus_a_group() {
        let store = Embedded::in_memory().unwrap();
        for g in 0..3 {
            let group: Vec<Finished> = (0..3)
                .map(|i| finished(&format!("none{g}{i}"), &format!("v{}", g * 3 + i)))
                .collect();
            store.finish_logged("log", group, 5).await.unwrap();
        }
        store.close().await;
        // 9 entries in groups of 3, keep 5: the oldest group goes (6 left,
        // still at least 5), the next would leave 3.
        assert_eq!(
            store.read_log("log", "ep", 100).await.unwrap(),
            vec!["v8", "v7", "v6", "v5", "v4", "v3"]
        );
        assert_eq!(
            store.read_log("log", "ep", 4).await.unwrap(),
            vec!["v8", "v7", "v6", "v5"],
            "the limit cuts within a group"
        );
        store.delete_log("log", "ep").await.unwrap();
        assert!(store.read_log("log", "ep", 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_of_the_earlier_layout_is_moved_when_opened() {
        let dir = scratch();
        {
            let db = Database::create(dir.join("state.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut jobs = txn.open_table(OLD_JOBS).unwrap();
                for (id, due) in [("old1", 1u64), ("old2", 2)] {
                    let row = serde_json::to_string(&Job {
                        id: id.into(),
                        queue: "q".into(),
                        due_ms: due,
                        body: format!("{{\"id\":\"{id}\"}}"),
                    })
                    .unwrap();
                    jobs.insert(id, row.as_str()).unwrap();
                }
                let mut logs = txn.open_table(OLD_LOGS).unwrap();
                let key = log_key("log", "ep");
                for seq in 4..7u64 {
                    logs.insert((key.as_str(), seq), format!("e{seq}").as_str())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = reopen(&dir).await;
        let mut claimed = store.claim(10, 1000, &all(), 10).await.unwrap();
        claimed.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            claimed
                .iter()
                .map(|j| (j.id.as_str(), j.body.as_str()))
                .collect::<Vec<_>>(),
            vec![("old1", "{\"id\":\"old1\"}"), ("old2", "{\"id\":\"old2\"}")]
        );
        assert_eq!(
            store.read_log("log", "ep", 10).await.unwrap(),
            vec!["e6", "e5", "e4"]
        );
        // Logs go on counting after the moved entries.
        store.push_log("log", "ep", "e7".into(), 3).await.unwrap();
        assert_eq!(
            store.read_log("log", "ep", 10).await.unwrap(),
            vec!["e7", "e6", "e5"]
        );
        {
            let read = store.db.begin_read().unwrap();
            let names: Vec<String> = read
                .list_tables()
                .unwrap()
                .map(|t| redb::TableHandle::name(&t).to_string())
                .collect();
            assert!(
                !names.contains(&"jobs".to_string()) && !names.contains(&"logs".to_string()),
                "the old tables are gone: {names:?}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
