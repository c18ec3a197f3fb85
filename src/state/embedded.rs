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
//! it while redb writes it) and go into the file at the next
//! durable flush, at most [`FLUSH`] later, the same bound as a
//! non-durable commit. A job finished before that flush never touches
//! the file: a delivery that succeeds at once costs no job write at all.
//! Job ids are never enqueued again once finished (a retry re-enqueues an
//! unfinished job; a replay is a new job).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{Capacity, Job, Result, StateError};

const RECORDS: TableDefinition<(&str, &str, &str), &str> = TableDefinition::new("records");
const LOGS: TableDefinition<(&str, u64), &str> = TableDefinition::new("logs");
const JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");

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
    /// Jobs finished or dropped, deleted from the file.
    DeleteJobs {
        ids: Vec<String>,
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

#[derive(Default)]
struct Index {
    /// queue → (due, id), leased jobs at their lease's end.
    queues: HashMap<String, BTreeSet<(u64, String)>>,
    /// id → (queue, due) for every job.
    jobs: HashMap<String, (String, u64)>,
    /// Jobs whose latest version is not in the file yet.
    unwritten: HashMap<String, Unwritten>,
    /// Bytes of their bodies.
    unwritten_bytes: usize,
    /// Generation of the next unwritten version.
    generation: u64,
}

/// A job's latest version, waiting for the next flush.
struct Unwritten {
    job: Job,
    generation: u64,
    /// An older version is in the file (or being written): finishing it
    /// must delete it there.
    stored: bool,
    /// The writer is writing this version now.
    writing: bool,
}

impl Unwritten {
    fn bytes(&self) -> usize {
        self.job.body.len() + self.job.id.len() + self.job.queue.len() + 64
    }
}

impl Index {
    fn insert(&mut self, job: &Job) {
        self.remove(&job.id);
        self.queues
            .entry(job.queue.clone())
            .or_default()
            .insert((job.due_ms, job.id.clone()));
        self.jobs
            .insert(job.id.clone(), (job.queue.clone(), job.due_ms));
    }

    fn remove(&mut self, id: &str) {
        if let Some((queue, due)) = self.jobs.remove(id)
            && let Some(set) = self.queues.get_mut(&queue)
        {
            set.remove(&(due, id.to_string()));
            if set.is_empty() {
                self.queues.remove(&queue);
            }
        }
    }

    /// A new version of `job`, to be written at the next flush.
    fn hold(&mut self, job: Job) {
        let stored = match self.unwritten.get(&job.id) {
            Some(old) => old.stored || old.writing,
            None => self.jobs.contains_key(&job.id),
        };
        self.insert(&Job {
            id: job.id.clone(),
            queue: job.queue.clone(),
            due_ms: job.due_ms,
            body: String::new(),
        });
        self.generation += 1;
        let entry = Unwritten {
            job,
            generation: self.generation,
            stored,
            writing: false,
        };
        self.unwritten_bytes += entry.bytes();
        if let Some(old) = self.unwritten.insert(entry.job.id.clone(), entry) {
            self.unwritten_bytes -= old.bytes();
        }
    }

    /// Forgets a job; whether the file may hold a version of it (then it
    /// must be deleted there).
    fn finish(&mut self, id: &str) -> bool {
        self.remove(id);
        match self.unwritten.remove(id) {
            Some(old) => {
                self.unwritten_bytes -= old.bytes();
                old.stored || old.writing
            }
            None => true,
        }
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
        // Create the tables, so that reads find them.
        let txn = db.begin_write().map_err(|e| err("begin", e))?;
        {
            txn.open_table(RECORDS).map_err(|e| err("records", e))?;
            txn.open_table(LOGS).map_err(|e| err("logs", e))?;
            txn.open_table(JOBS).map_err(|e| err("jobs", e))?;
        }
        txn.commit().map_err(|e| err("commit", e))?;
        let mut index = Index::default();
        {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let jobs = read.open_table(JOBS).map_err(|e| err("jobs", e))?;
            for row in jobs.iter().map_err(|e| err("jobs", e))? {
                let (_, value) = row.map_err(|e| err("jobs", e))?;
                match serde_json::from_str::<Job>(value.value()) {
                    Ok(job) => index.insert(&job),
                    Err(e) => {
                        tracing::warn!("skipped an unreadable job in {}: {e}", path.display())
                    }
                }
            }
        }
        let db = Arc::new(db);
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_db = Arc::clone(&db);
        let writer_index = Arc::clone(&index);
        let dirty = Arc::new(AtomicBool::new(false));
        let writer_dirty = Arc::clone(&dirty);
        std::thread::Builder::new()
            .name("tc-state-writer".into())
            .spawn(move || writer(&writer_db, &writer_index, rx, &writer_dirty))
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
            for row in rows.rev().take(limit) {
                let (_, v) = row.map_err(|e| err("logs", e))?;
                out.push(v.value().to_string());
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
        let claimed: Vec<(String, String)> = {
            let mut index = lock(&self.index);
            let mut picked = Vec::new();
            let limited: HashMap<&str, usize> = capacity
                .limited
                .iter()
                .map(|(q, n)| (q.as_str(), *n))
                .collect();
            let queues: Vec<String> = index.queues.keys().cloned().collect();
            for queue in queues {
                if picked.len() >= max {
                    break;
                }
                let cap = limited
                    .get(queue.as_str())
                    .copied()
                    .unwrap_or(capacity.default);
                let room = cap.min(max - picked.len());
                let due: Vec<(u64, String)> = index.queues[&queue]
                    .iter()
                    .take_while(|(d, _)| *d <= now_ms)
                    .take(room)
                    .cloned()
                    .collect();
                for (_, id) in due {
                    let due_ms = now_ms.saturating_add(lease_ms);
                    index.insert(&Job {
                        id: id.clone(),
                        queue: queue.clone(),
                        due_ms,
                        body: String::new(),
                    });
                    // Its body from memory when it is not in the file yet.
                    match index.unwritten.get(&id) {
                        Some(u) => out.push(u.job.clone()),
                        None => picked.push((queue.clone(), id)),
                    }
                }
            }
            picked
        };
        if claimed.is_empty() {
            return Ok(out);
        }
        self.read(move |db| {
            let read = db.begin_read().map_err(|e| err("read", e))?;
            let t = read.open_table(JOBS).map_err(|e| err("jobs", e))?;
            for (_, id) in claimed {
                if let Some(v) = t.get(id.as_str()).map_err(|e| err("jobs", e))? {
                    match serde_json::from_str::<Job>(v.value()) {
                        Ok(job) => out.push(job),
                        Err(e) => tracing::warn!(job = %id, "skipped an unreadable job: {e}"),
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn finish(&self, _queue: &str, id: &str) -> Result<()> {
        if !lock(&self.index).finish(id) {
            return Ok(());
        }
        self.write(Write::DeleteJobs {
            ids: vec![id.to_string()],
        })
        .await
        .map(|_| ())
    }

    /// A job done and its log entry, as one write not waited for: the
    /// caller goes on at once (a crash within [`FLUSH`] loses it, and the
    /// job is done again).
    pub async fn finish_logged(
        &self,
        id: &str,
        log: &str,
        key: &str,
        value: String,
        keep: usize,
    ) -> Result<()> {
        let stored = lock(&self.index).finish(id);
        let done = stored.then(|| {
            Op::detached(Write::DeleteJobs {
                ids: vec![id.to_string()],
            })
        });
        let logged = Op::detached(Write::LogPush {
            key: log_key(log, key),
            value,
            keep: keep.max(1),
        });
        for op in done.into_iter().chain([logged]) {
            self.tx
                .send(op)
                .await
                .map_err(|_| StateError("the state writer has stopped".into()))?;
        }
        Ok(())
    }

    pub async fn drop_queue(&self, queue: &str) -> Result<()> {
        let ids: Vec<String> = {
            let mut index = lock(&self.index);
            let ids: Vec<String> = index
                .queues
                .get(queue)
                .map(|s| s.iter().map(|(_, id)| id.clone()).collect())
                .unwrap_or_default();
            for id in &ids {
                index.finish(id);
            }
            ids
        };
        self.write(Write::DeleteJobs { ids }).await.map(|_| ())
    }

    pub fn queue_len(&self, queue: &str) -> usize {
        lock(&self.index).queues.get(queue).map_or(0, BTreeSet::len)
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

/// The writer thread: every write waiting, one transaction, one commit;
/// durable when a write in it asks for it (records, flushes), else
/// durable at the next flush (`dirty` tells the flusher).
fn writer(db: &Database, index: &Mutex<Index>, mut rx: mpsc::Receiver<Op>, dirty: &AtomicBool) {
    // Per log key: (oldest seq, next seq), learned on first use.
    let mut logs: HashMap<String, (u64, u64)> = HashMap::new();
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
        let (versions, rows) = if flush {
            take_unwritten(index)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut log_seen = logs.clone();
        let result = apply(db, &batch, &mut log_seen, durable, rows);
        written(index, versions, result.is_ok());
        match result {
            Ok(results) => {
                logs = log_seen;
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

fn apply(
    db: &Database,
    batch: &[Op],
    logs: &mut HashMap<String, (u64, u64)>,
    durable: bool,
    new_jobs: Rows,
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
        let mut jobs = txn.open_table(JOBS).map_err(|e| err("jobs", e))?;
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
                Write::LogPush {
                    key, value, keep, ..
                } => {
                    let (oldest, next) = match logs.get(key) {
                        Some(span) => *span,
                        None => log_span(&log_table, key)?,
                    };
                    log_table
                        .insert((key.as_str(), next), value.as_str())
                        .map_err(|e| err("logs", e))?;
                    let next = next + 1;
                    let mut oldest = oldest;
                    while next - oldest > *keep as u64 {
                        log_table
                            .remove((key.as_str(), oldest))
                            .map_err(|e| err("logs", e))?;
                        oldest += 1;
                    }
                    logs.insert(key.clone(), (oldest, next));
                    true
                }
                Write::LogClear { key, .. } => {
                    let (oldest, next) = match logs.get(key) {
                        Some(span) => *span,
                        None => log_span(&log_table, key)?,
                    };
                    for seq in oldest..next {
                        log_table
                            .remove((key.as_str(), seq))
                            .map_err(|e| err("logs", e))?;
                    }
                    logs.insert(key.clone(), (next, next));
                    true
                }
                Write::Flush => true,
                Write::DeleteJobs { ids } => {
                    for id in ids {
                        jobs.remove(id.as_str()).map_err(|e| err("jobs", e))?;
                    }
                    true
                }
            };
            results.push(existed);
        }
        // After every delete before it: the new jobs waiting in memory.
        for (id, text) in new_jobs {
            jobs.insert(id.as_str(), text.as_str())
                .map_err(|e| err("jobs", e))?;
        }
    }
    txn.commit().map_err(|e| err("commit", e))?;
    Ok(results)
}

/// Job ids and the generations written.
type Versions = Vec<(String, u64)>;
/// Job ids and their rows.
type Rows = Vec<(String, String)>;

/// At a flush: the new jobs waiting in memory, marked as being written,
/// with their generations and their rows.
fn take_unwritten(index: &Mutex<Index>) -> (Versions, Rows) {
    let mut index = lock(index);
    let mut written = Vec::new();
    let mut rows = Vec::new();
    for (id, u) in index.unwritten.iter_mut() {
        if u.writing {
            continue;
        }
        match serde_json::to_string(&u.job) {
            Ok(text) => {
                u.writing = true;
                written.push((id.clone(), u.generation));
                rows.push((id.clone(), text));
            }
            Err(e) => tracing::warn!(job = %id, "job not written: {e}"),
        }
    }
    (written, rows)
}

/// After the commit that wrote them: versions still the latest are in the
/// file now; when it failed, they wait for the next flush.
fn written(index: &Mutex<Index>, versions: Versions, ok: bool) {
    let mut index = lock(index);
    let index = &mut *index;
    for (id, generation) in versions {
        let Some(u) = index.unwritten.get_mut(&id) else {
            continue;
        };
        if u.generation != generation {
            // Enqueued again meanwhile: that version waits.
            continue;
        }
        if ok {
            if let Some(u) = index.unwritten.remove(&id) {
                index.unwritten_bytes -= u.bytes();
            }
        } else {
            u.writing = false;
        }
    }
}

/// A log's (oldest seq, next seq) as stored.
fn log_span(table: &redb::Table<(&str, u64), &str>, key: &str) -> Result<(u64, u64)> {
    let mut rows = table
        .range((key, 0)..=(key, u64::MAX))
        .map_err(|e| err("logs", e))?;
    let first = rows.next().transpose().map_err(|e| err("logs", e))?;
    let last = rows.next_back().transpose().map_err(|e| err("logs", e))?;
    Ok(match (first, last) {
        (None, _) => (0, 0),
        (Some(f), None) => (f.0.value().1, f.0.value().1 + 1),
        (Some(f), Some(l)) => (f.0.value().1, l.0.value().1 + 1),
    })
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
        let rows = {
            let read = store.db.begin_read().unwrap();
            redb::ReadableTableMetadata::len(&read.open_table(JOBS).unwrap()).unwrap()
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
}
