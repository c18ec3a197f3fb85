//! Enforcement policies, evaluated live over the event stream: the
//! runaway-loop detector behind `policies.simulate` and `policies.create`.
//!
//! - [`spec`]: the policy document and its checks.
//! - [`eval`]: the evaluator, one code path for live evaluation and
//!   [`Policies::simulate`].
//! - Here: the service. The broker hands every dispatched event (local or
//!   relayed) of a type some policy of its tenant counts to [`Observer`],
//!   which only queues it (bounded, never blocking the publish path); one
//!   task evaluates the queue, publishes what fires through the normal
//!   publish path, settles resolutions once a second and saves the window
//!   state.
//!
//! With several instances every one evaluates every event (the same events
//! reach each), so each holds the windows; one of them, the holder of a
//! lease in the state store, decides and publishes firings. The others
//! learn them from the `runaway_loop.detected` and `.resolved` events it
//! publishes, so an instance taking the lease over neither fires again
//! for what already fired nor misses what has not.
//!
//! The events policies publish carry `"generated_by": "policy"` in their
//! data and are never counted by a policy, so a policy cannot feed itself.

pub mod eval;
pub mod rest;
pub mod spec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Persist};
use crate::clock;
use crate::error::{ApiError, Code};
use crate::event::{self, SharedEvent};
use crate::state::State;
use eval::{Outcome, Seen, SubjectState, TenantEval};
use spec::{ActionKind, Compiled, Mode, Policy};

/// State tables: policies (tenant, id) and subject windows (tenant,
/// `<policy id>:<subject>`); the version other instances watch; the lease
/// of the instance that acts.
const TABLE: &str = "policies";
const WINDOWS: &str = "policy_windows";
const VERSION: &str = "policies";
const LEASE: &str = "policy-leader";

/// What the events policies publish carry in `generated_by`.
pub const GENERATED_BY: &str = "policy";

/// How often resolutions are settled, the lease renewed and other
/// instances' changes looked for.
const TICK: Duration = Duration::from_secs(1);

/// Events evaluated per taking of the queue, at most.
const EVALUATION_BATCH: usize = 256;

/// After catching up, the evaluator waits this long for events to gather
/// before it takes the queue again: under load it then wakes about once
/// a millisecond rather than once per event, and a firing is at most this
/// much later.
const GATHER: Duration = Duration::from_millis(1);
/// Resolutions are settled up to this long before now: events stamped
/// earlier may still be on their way (in another thread, or relayed from
/// another instance), and one of them may keep a subject firing.
const SETTLE_LAG: Duration = Duration::from_secs(1);

/// Settings of policies: flags and `TC_*` variables of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicySettings {
    /// Dispatched events waiting for policy evaluation, at most; past it
    /// an event is not evaluated (counted in
    /// `tc_policy_dropped_events_total` and logged).
    #[arg(long, env = "TC_POLICY_QUEUE", default_value_t = 65_536, value_parser = crate::config::parse::positive)]
    pub policy_queue: usize,

    /// Policies one tenant may have.
    #[arg(long, env = "TC_POLICY_MAX_PER_TENANT", default_value_t = 200, value_parser = crate::config::parse::positive)]
    pub policy_max_per_tenant: usize,

    /// Subjects (agents, workflows, ... one per policy) whose windows one
    /// tenant's policies follow at once, about 300 bytes each; past it a
    /// new subject is not followed until idle ones are forgotten (counted
    /// in `tc_policy_refused_subjects_total`).
    #[arg(long, env = "TC_POLICY_MAX_SUBJECTS", default_value_t = 10_000, value_parser = crate::config::parse::positive)]
    pub policy_max_subjects: usize,

    /// With Redis: how long the instance that acts on policies holds its
    /// lease without renewing it (it renews every second); another takes
    /// over within this after it dies.
    #[arg(long, env = "TC_POLICY_LEASE", default_value = "5s", value_parser = crate::config::parse::duration)]
    pub policy_lease: Duration,

    /// How often the acting instance saves the windows that changed (a
    /// firing is saved at once, everything at a graceful stop): what a
    /// `kill -9` can lose of the counting. Each save writes every changed
    /// subject, so a short interval costs store writes under load.
    #[arg(long, env = "TC_POLICY_SAVE_INTERVAL", default_value = "10s", value_parser = crate::config::parse::duration)]
    pub policy_save_interval: Duration,
}

impl Default for PolicySettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

#[derive(Default)]
struct Metrics {
    evaluated: Counter,
    dropped: Counter,
    fired: Counter,
    resolved: Counter,
    refused_subjects: Counter,
    subjects: Gauge,
    leader: Gauge,
}

/// The policy service. Cheap to clone.
#[derive(Clone)]
pub struct Policies {
    inner: Arc<Inner>,
}

struct Inner {
    state: State,
    broker: Broker,
    settings: PolicySettings,
    /// This instance, in the events it publishes and its lease.
    instance: String,
    /// Each tenant's evaluator. A `std` mutex: held for evaluation only,
    /// never across an await.
    tenants: Mutex<HashMap<String, TenantEval>>,
    gate: Arc<Gate>,
    /// This instance holds the lease: it decides and publishes firings.
    acting: AtomicBool,
    /// The first tick has run.
    started: AtomicBool,
    version: AtomicU64,
    /// Window writes, done in order by the saver task ([`Policies::run`]
    /// starts it): evaluation never waits for the store.
    saves: Mutex<Option<mpsc::Sender<Vec<Saving>>>>,
}

/// A write of a subject's window (table `policy_windows`, key
/// `<policy id>:<subject>`).
enum Saving {
    Put(String, String, Box<SubjectState>),
    Delete(String, String),
}

/// Batches of window writes waiting for the saver, at most. A firing's
/// batch is its subject alone; a periodic save (every subject changed
/// since the last) is skipped while more than [`PERIODIC_QUEUED`] wait, so
/// at most a few large batches are ever queued.
const SAVES_QUEUED: usize = 64;
const PERIODIC_QUEUED: usize = 2;

/// What the publish path reads (the types each tenant's policies count)
/// and the counters: made before the broker relays anything, so that the
/// observer is in place from the start.
#[derive(Default)]
pub struct Gate {
    /// Per tenant (foldhash: asked for every event dispatched).
    wanted: RwLock<HashMap<String, Arc<eval::Wants>, foldhash::quality::RandomState>>,
    metrics: Metrics,
}

impl Gate {
    /// The broker's hook, the queue [`Policies::run`] reads, and the gate
    /// to give [`Policies::new`].
    pub fn observer(settings: &PolicySettings) -> (Box<dyn Persist>, Queue, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        let (tx, rx) = mpsc::channel(settings.policy_queue);
        let observer = Observer {
            tx,
            gate: Arc::clone(&gate),
            warning: clock::OncePerSecond::default(),
        };
        (Box::new(observer), Queue(rx), gate)
    }
}

/// What `policies.simulate` answers.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Simulation {
    pub policy_id: String,
    /// The span evaluated (RFC 3339).
    pub from: String,
    pub until: String,
    /// Events of the tenant held in the span.
    pub events: usize,
    /// Whether history reached back to `from` (TC_HISTORY_MAX_AGE,
    /// TC_HISTORY_MAX_EVENTS, TC_HISTORY_MAX_BYTES); when false the first
    /// part of the span is missing and firings may be missing or late.
    pub complete: bool,
    /// What would have fired, in order.
    pub firings: Vec<SimulatedFiring>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SimulatedFiring {
    pub subject: String,
    /// When it fired (RFC 3339) and the measure then.
    pub at: String,
    pub value: f64,
    pub threshold: f64,
    /// `pause`, `alert` or `notify`.
    pub action: String,
    /// The event that brought the measure to the threshold.
    pub event_id: String,
    /// When it would have been resolved, if within the span.
    pub resolved_at: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unavailable(e: crate::state::StateError) -> ApiError {
    ApiError::new(Code::Unavailable, format!("{e}; try again"))
}

/// Whether a payload is one a policy published.
fn generated(generated_by: Option<eval::Found>) -> bool {
    generated_by.and_then(eval::Found::as_str) == Some(GENERATED_BY)
}

/// Offers `event` to `eval`, live or simulated: only the payload fields its
/// policies read, and never a policy's own event (no policy feeds itself).
fn observe_event(
    eval: &mut TenantEval,
    event: &crate::event::Event,
    acting: bool,
    max_subjects: usize,
    out: &mut Vec<Outcome>,
) {
    let Some(at) = clock::parse_timestamp(&event.timestamp) else {
        return;
    };
    let Some(data) = eval.needed().parse(event.data.get(), &["generated_by"]) else {
        return;
    };
    if generated(data.get("generated_by")) {
        return;
    }
    eval.observe(
        &Seen {
            event_type: &event.event_type,
            id: &event.id,
            trace_id: &event.trace_id,
            at_ms: to_ms(at),
            data: &data,
        },
        acting,
        max_subjects,
        out,
    );
}

fn format_ms(ms: u64) -> String {
    clock::format_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Policies {
    pub fn new(
        state: State,
        broker: Broker,
        settings: PolicySettings,
        instance: String,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                acting: AtomicBool::new(matches!(state, State::Embedded(_))),
                state,
                broker,
                settings,
                instance,
                tenants: Mutex::new(HashMap::new()),
                gate,
                version: AtomicU64::new(u64::MAX),
                started: AtomicBool::new(false),
                saves: Mutex::new(None),
            }),
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.inner.gate.metrics;
        registry.register(
            "policy_evaluated_events",
            "Events offered to policies",
            m.evaluated.clone(),
        );
        registry.register(
            "policy_dropped_events",
            "Events not evaluated because the policy queue was full (TC_POLICY_QUEUE)",
            m.dropped.clone(),
        );
        registry.register(
            "policy_firings",
            "Policy firings published",
            m.fired.clone(),
        );
        registry.register(
            "policy_resolutions",
            "Policy firings resolved",
            m.resolved.clone(),
        );
        registry.register(
            "policy_refused_subjects",
            "Subjects not followed because a tenant's policies followed TC_POLICY_MAX_SUBJECTS",
            m.refused_subjects.clone(),
        );
        registry.register(
            "policy_subjects",
            "Subjects whose windows policies follow",
            m.subjects.clone(),
        );
        registry.register(
            "policy_acting",
            "1 when this instance decides and publishes policy firings (holds the lease)",
            m.leader.clone(),
        );
    }

    /// Loads every tenant's policies and their windows (at start, before
    /// events are evaluated).
    pub async fn load(&self) -> anyhow::Result<usize> {
        let inner = &self.inner;
        let version = inner
            .state
            .version(VERSION)
            .await
            .map_err(|e| anyhow::anyhow!("policies not loaded: {e}"))?;
        let rows = inner
            .state
            .list_all(TABLE)
            .await
            .map_err(|e| anyhow::anyhow!("policies not loaded: {e}"))?;
        let mut by_tenant: HashMap<String, Vec<Arc<Compiled>>> = HashMap::new();
        for (tenant, id, text) in rows {
            match spec::read(text.as_bytes()).and_then(spec::check) {
                Ok(c) => by_tenant.entry(tenant).or_default().push(Arc::new(c)),
                Err(e) => tracing::warn!(
                    tenant,
                    policy = id,
                    "skipped a stored policy: {}",
                    e.message
                ),
            }
        }
        let count = by_tenant.values().map(Vec::len).sum();
        for (tenant, policies) in by_tenant {
            self.install(&tenant, policies);
        }
        let windows = inner
            .state
            .list_all(WINDOWS)
            .await
            .map_err(|e| anyhow::anyhow!("policy windows not loaded: {e}"))?;
        let max = inner.settings.policy_max_subjects;
        let mut stale = Vec::new();
        {
            let mut tenants = lock(&inner.tenants);
            for (tenant, key, text) in windows {
                let restored = key.split_once(':').is_some_and(|(policy, subject)| {
                    let state = serde_json::from_str::<SubjectState>(&text).ok();
                    match (tenants.get_mut(&tenant), state) {
                        (Some(eval), Some(state)) => eval.restore(policy, subject, state, max),
                        _ => false,
                    }
                });
                if !restored {
                    stale.push((tenant, key));
                }
            }
        }
        for (tenant, key) in stale {
            let _ = inner.state.delete(WINDOWS, &tenant, &key).await;
        }
        inner.version.store(version, Ordering::Release);
        Ok(count)
    }

    /// Puts a tenant's policies in place, carrying over the windows of
    /// the unchanged ones.
    /// Returns the saved-window keys of the subjects not carried over.
    fn install(&self, tenant: &str, policies: Vec<Arc<Compiled>>) -> Vec<String> {
        let inner = &self.inner;
        let mut tenants = lock(&inner.tenants);
        let old = tenants.remove(tenant);
        let mut eval = TenantEval::new(policies, old);
        let dropped = std::mem::take(&mut eval.dropped);
        let wants = Arc::new(eval.wants_index());
        if eval.is_empty() {
            write(&inner.gate.wanted).remove(tenant);
        } else {
            write(&inner.gate.wanted).insert(tenant.to_string(), wants);
            tenants.insert(tenant.to_string(), eval);
        }
        dropped
    }

    /// Reads a tenant's policies from the state store again.
    async fn reload(&self, tenant: &str) {
        match self.inner.state.list(TABLE, tenant).await {
            Ok(rows) => {
                let policies = rows
                    .into_iter()
                    .filter_map(|(_, text)| spec::read(text.as_bytes()).and_then(spec::check).ok())
                    .map(Arc::new)
                    .collect();
                let dropped = self.install(tenant, policies);
                // A replaced or deleted policy's windows are not restored
                // after a restart: its saved ones go.
                if !dropped.is_empty() && self.inner.acting.load(Ordering::Acquire) {
                    let tenant = tenant.to_string();
                    let deletes = dropped
                        .into_iter()
                        .map(|key| Saving::Delete(tenant.clone(), key))
                        .collect();
                    self.queue_saving(deletes).await;
                }
            }
            Err(e) => tracing::warn!(tenant, "policies not reloaded: {e}"),
        }
    }

    /// Evaluates the queue's events; every second settles resolutions,
    /// renews the lease and looks for other instances' changes; saves
    /// changed windows. Until `stop`, then gives the lease up.
    pub async fn run(self, queue: Queue, stop: CancellationToken) {
        let Queue(mut rx) = queue;
        let (saves, saving) = mpsc::channel(SAVES_QUEUED);
        *lock(&self.inner.saves) = Some(saves);
        let saver = tokio::spawn(saver(Arc::clone(&self.inner), saving));
        let mut batch = Vec::with_capacity(EVALUATION_BATCH);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_save = tokio::time::Instant::now();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, EVALUATION_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.evaluate_all(&batch).await;
                    batch.clear();
                    if n < EVALUATION_BATCH {
                        // Caught up: let events gather for a moment rather
                        // than be woken for each (a wake-up costs more than
                        // evaluating an event).
                        tokio::time::sleep(GATHER).await;
                    }
                }
                _ = tick.tick() => {
                    // What is queued first: a resolution is settled only
                    // after the events before it were counted.
                    while rx.try_recv().map(|e| batch.push(e)).is_ok() {}
                    self.evaluate_all(&batch).await;
                    batch.clear();
                    self.tick().await;
                    if last_save.elapsed() >= self.inner.settings.policy_save_interval {
                        last_save = tokio::time::Instant::now();
                        self.save(false).await;
                    }
                }
                () = stop.cancelled() => break,
            }
        }
        rx.close();
        while rx.try_recv().map(|e| batch.push(e)).is_ok() {}
        self.evaluate_all(&batch).await;
        self.save(true).await;
        let inner = &self.inner;
        // Every write queued is done before the lease is given up.
        lock(&inner.saves).take();
        let _ = saver.await;
        if let Err(e) = inner.state.release(LEASE, &inner.instance).await {
            tracing::debug!("policy lease not given up (it lapses): {e}");
        }
    }

    /// Dispatched events, in order: runs of tenants' events are evaluated
    /// under one taking of the lock.
    async fn evaluate_all(&self, events: &[SharedEvent]) {
        let own = |e: &SharedEvent| {
            e.event_type.starts_with("policy.") || e.event_type.starts_with("runaway_loop.")
        };
        let mut rest = events;
        while let Some(first) = rest.first() {
            let n = if own(first) {
                self.evaluate_own(first).await;
                1
            } else {
                let n = rest.iter().position(own).unwrap_or(rest.len());
                self.evaluate_run(&rest[..n]).await;
                n
            };
            rest = &rest[n..];
        }
    }

    /// A `policy.*` or `runaway_loop.*` event: another instance's change
    /// or firing to learn from, this one's own (already known), or one a
    /// tenant published, evaluated as any other.
    async fn evaluate_own(&self, event: &SharedEvent) {
        let inner = &self.inner;
        if let Ok(data) = serde_json::from_str::<serde_json::Value>(event.data.get())
            && generated(data.get("generated_by").map(eval::Found::Json))
        {
            inner.gate.metrics.evaluated.inc();
            if data.get("instance").and_then(|v| v.as_str()) != Some(&inner.instance) {
                self.learn(event, &data).await;
            }
            return;
        }
        self.evaluate_run(std::slice::from_ref(event)).await;
    }

    /// Tenants' events, none a policy's own.
    async fn evaluate_run(&self, events: &[SharedEvent]) {
        let inner = &self.inner;
        inner.gate.metrics.evaluated.inc_by(events.len() as u64);
        let acting = inner.acting.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut outcomes: Vec<(&str, Arc<Compiled>, Outcome)> = Vec::new();
        let mut firings = Vec::new();
        {
            let mut tenants = lock(&inner.tenants);
            // The tenant last looked up: a run is mostly one tenant's.
            let mut current: Option<(&str, &mut TenantEval)> = None;
            for event in events {
                let tenant = event.tenant_id.as_str();
                if !matches!(&current, Some((t, _)) if *t == tenant) {
                    current = None;
                    let Some(eval) = tenants.get_mut(tenant) else {
                        continue;
                    };
                    current = Some((tenant, eval));
                }
                let Some((_, eval)) = current.as_mut() else {
                    continue;
                };
                let before = eval.refused;
                observe_event(
                    eval,
                    event,
                    acting,
                    inner.settings.policy_max_subjects,
                    &mut out,
                );
                if eval.refused > before {
                    inner
                        .gate
                        .metrics
                        .refused_subjects
                        .inc_by(eval.refused - before);
                }
                for o in out.drain(..) {
                    let id = match &o {
                        Outcome::Fired(f) => {
                            // A firing is saved at once (its subject alone):
                            // a restart must not fire it again.
                            if let Some(state) = eval.subject(&f.policy_id, &f.subject) {
                                firings.push(Saving::Put(
                                    event.tenant_id.clone(),
                                    format!("{}:{}", f.policy_id, f.subject),
                                    Box::new(state.clone()),
                                ));
                            }
                            &f.policy_id
                        }
                        Outcome::Resolved(r) => &r.policy_id,
                    };
                    if let Some(p) = eval.policies().iter().find(|p| &p.policy.id == id) {
                        outcomes.push((tenant, Arc::clone(p), o));
                    }
                }
            }
        }
        for (tenant, policy, outcome) in outcomes {
            self.publish_outcome(tenant, &policy, outcome);
        }
        if !firings.is_empty() && inner.acting.load(Ordering::Acquire) {
            self.queue_saving(firings).await;
        }
    }

    /// Another instance's policy event: its change of policies, or its
    /// firing or resolution.
    async fn learn(&self, event: &SharedEvent, data: &serde_json::Value) {
        let tenant = &event.tenant_id;
        if event.event_type.starts_with("policy.") {
            self.reload(tenant).await;
            return;
        }
        let (Some(policy), Some(subject)) = (
            data.get("policy_id").and_then(|v| v.as_str()),
            data.get("subject").and_then(|v| v.as_str()),
        ) else {
            return;
        };
        let fired = match event.event_type.as_str() {
            "runaway_loop.detected" => Some(
                data.get("detected_at")
                    .and_then(|v| v.as_str())
                    .and_then(clock::parse_timestamp)
                    .map_or_else(clock::unix_millis, to_ms),
            ),
            "runaway_loop.resolved" => None,
            _ => return,
        };
        if let Some(eval) = lock(&self.inner.tenants).get_mut(tenant) {
            eval.sync(policy, subject, fired);
        }
    }

    /// Renews the lease; when held, settles what is due; forgets idle
    /// subjects; reloads policies another instance changed.
    async fn tick(&self) {
        let inner = &self.inner;
        let acting = match inner
            .state
            .lease(LEASE, &inner.instance, inner.settings.policy_lease)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::debug!("policy lease not renewed: {e}");
                false
            }
        };
        let was = inner.acting.swap(acting, Ordering::AcqRel);
        if was != acting {
            tracing::info!(
                acting,
                "policy evaluation: this instance {} firings",
                if acting {
                    "decides and publishes"
                } else {
                    "follows the acting instance's"
                }
            );
        }
        // At start every instance takes over: a breach a crashed acting
        // instance left unfired fires once.
        let took_over = acting && (!was || !inner.started.swap(true, Ordering::AcqRel));
        inner.gate.metrics.leader.set(i64::from(acting));
        if let Ok(version) = inner.state.version(VERSION).await
            && version != inner.version.swap(version, Ordering::AcqRel)
        {
            let tenants: Vec<String> = lock(&inner.tenants).keys().cloned().collect();
            let stored: std::collections::HashSet<String> = inner
                .state
                .list_all(TABLE)
                .await
                .map(|rows| rows.into_iter().map(|(t, _, _)| t).collect())
                .unwrap_or_default();
            for tenant in stored
                .iter()
                .chain(tenants.iter().filter(|t| !stored.contains(*t)))
            {
                self.reload(tenant).await;
            }
        }
        let now = clock::unix_millis().saturating_sub(SETTLE_LAG.as_millis() as u64);
        let mut due: Vec<(String, Arc<Compiled>, Outcome)> = Vec::new();
        let mut forgotten = Vec::new();
        let mut held = 0;
        {
            let mut tenants = lock(&inner.tenants);
            for (tenant, eval) in tenants.iter_mut() {
                let mut out = Vec::new();
                if took_over {
                    eval.take_over(&mut out);
                }
                if acting {
                    eval.settle(now, &mut out);
                }
                for o in out {
                    let id = match &o {
                        Outcome::Fired(f) => &f.policy_id,
                        Outcome::Resolved(r) => &r.policy_id,
                    };
                    if let Some(p) = eval.policies().iter().find(|p| &p.policy.id == id) {
                        due.push((tenant.clone(), Arc::clone(p), o));
                    }
                }
                for (policy, subject) in eval.forget_idle(now) {
                    forgotten.push((tenant.clone(), format!("{policy}:{subject}")));
                }
                held += eval.held();
            }
        }
        inner.gate.metrics.subjects.set(held as i64);
        for (tenant, policy, outcome) in due {
            self.publish_outcome(&tenant, &policy, outcome);
        }
        if acting && !forgotten.is_empty() {
            let deletes = forgotten
                .into_iter()
                .map(|(tenant, key)| Saving::Delete(tenant, key))
                .collect();
            self.queue_saving(deletes).await;
        }
    }

    /// Hands writes to the saver, waiting only when [`SAVES_QUEUED`]
    /// batches already are.
    async fn queue_saving(&self, writes: Vec<Saving>) {
        let saves = lock(&self.inner.saves).clone();
        if let Some(saves) = saves {
            let _ = saves.send(writes).await;
        }
    }

    /// Queues the windows changed since the last save for the saver (the
    /// acting instance only: the others hold the same). Unless `last`
    /// (at shutdown), skipped while the saver is behind by more than
    /// [`PERIODIC_QUEUED`] batches: what changed stays marked for the next.
    async fn save(&self, last: bool) {
        let inner = &self.inner;
        if !inner.acting.load(Ordering::Acquire) {
            return;
        }
        let Some(saves) = lock(&inner.saves).clone() else {
            return;
        };
        if !last && saves.max_capacity() - saves.capacity() > PERIODIC_QUEUED {
            return;
        }
        let writes: Vec<Saving> = {
            let mut tenants = lock(&inner.tenants);
            tenants
                .iter_mut()
                .flat_map(|(tenant, eval)| {
                    eval.take_changed()
                        .into_iter()
                        .map(move |(key, state)| Saving::Put(tenant.clone(), key, Box::new(state)))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        if !writes.is_empty() {
            let _ = saves.send(writes).await;
        }
    }

    /// Publishes what a firing or resolution does, with the triggering
    /// event's trace id.
    fn publish_outcome(&self, tenant: &str, p: &Compiled, outcome: Outcome) {
        let inner = &self.inner;
        let policy = &p.policy;
        let base = serde_json::json!({
            "policy_id": policy.id,
            "policy_name": policy.name,
            "subject_field": p.subject.text(),
            "mode": policy.mode.as_str(),
            "action": policy.action.kind.as_str(),
            "generated_by": GENERATED_BY,
            "instance": inner.instance,
        });
        let with = |extra: serde_json::Value| {
            let mut data = base.clone();
            if let (Some(d), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
                d.extend(extra);
            }
            data
        };
        let mut events: Vec<(&str, serde_json::Value)> = Vec::new();
        let trace;
        match outcome {
            Outcome::Fired(f) => {
                inner.gate.metrics.fired.inc();
                trace = f.trace_id.clone();
                tracing::info!(tenant, policy = %policy.id, subject = %f.subject, value = f.value, mode = policy.mode.as_str(), "policy fired");
                let alert_id = format!("policy:{}:{}:{}", policy.id, f.subject, f.at_ms);
                events.push((
                    "runaway_loop.detected",
                    with(serde_json::json!({
                        "subject": f.subject,
                        "measure": match p.measure { spec::Measure::Count => "count", spec::Measure::Sum => "sum" },
                        "value": f.value,
                        "threshold": p.threshold,
                        "window": policy.condition.window,
                        "detected_at": format_ms(f.at_ms),
                        "trigger_event_id": f.event_id,
                    })),
                ));
                if let (Some(field), Some((_, detected))) = (&p.field, events.last_mut())
                    && let Some(d) = detected.as_object_mut()
                {
                    d.insert("field".into(), field.text().into());
                }
                if policy.mode == Mode::Enforce {
                    let action_id = format!("act_{}", uuid::Uuid::now_v7().simple());
                    let action = |state: &str| {
                        with(serde_json::json!({
                            "action_id": action_id,
                            "kind": "pause",
                            "state": state,
                            "subject": f.subject,
                            "reason": format!("{} reached {} (threshold {}) over {}", p.subject.text(), f.value, p.threshold, policy.condition.window),
                        }))
                    };
                    match policy.action.kind {
                        ActionKind::Pause => {
                            events.push(("action.queued", action("queued")));
                            events.push(("action.executing", action("executing")));
                            events.push(("action.completed", action("completed")));
                            events.push((
                                "runaway_loop.paused",
                                with(serde_json::json!({
                                    "subject": f.subject,
                                    "action_id": action_id,
                                    "paused_at": format_ms(f.at_ms),
                                })),
                            ));
                        }
                        ActionKind::Alert => events.push((
                            "alert.created",
                            with(serde_json::json!({
                                "alert_id": alert_id,
                                "severity": p.severity,
                                "title": format!("{}: {} {}", policy.name, p.subject.text(), f.subject),
                                "subject": f.subject,
                                "value": f.value,
                                "threshold": p.threshold,
                            })),
                        )),
                        ActionKind::Notify => events.push((
                            "notification.requested",
                            with(serde_json::json!({
                                "channel": "policy",
                                "subject": f.subject,
                                "message": format!("{}: {} {} reached {} (threshold {})", policy.name, p.subject.text(), f.subject, f.value, p.threshold),
                            })),
                        )),
                    }
                }
            }
            Outcome::Resolved(r) => {
                inner.gate.metrics.resolved.inc();
                trace = String::new();
                tracing::info!(tenant, policy = %policy.id, subject = %r.subject, "policy firing resolved");
                events.push((
                    "runaway_loop.resolved",
                    with(serde_json::json!({
                        "subject": r.subject,
                        "detected_at": format_ms(r.fired_ms),
                        "resolved_at": format_ms(r.at_ms),
                    })),
                ));
                if policy.mode == Mode::Enforce && policy.action.kind == ActionKind::Alert {
                    events.push((
                        "alert.resolved",
                        with(serde_json::json!({
                            "alert_id": format!("policy:{}:{}:{}", policy.id, r.subject, r.fired_ms),
                            "subject": r.subject,
                        })),
                    ));
                }
            }
        }
        let now = SystemTime::now();
        let events: Vec<event::Event> = events
            .into_iter()
            .filter_map(|(kind, data)| {
                event::internal(tenant, kind, &data, &trace, now)
                    .inspect_err(|e| tracing::warn!(tenant, kind, "not published: {e}"))
                    .ok()
            })
            .collect();
        inner.broker.publish_minted_many(events);
    }

    // ---- the operations App calls ----------------------------------------

    pub async fn list(&self, tenant: &str) -> Result<Vec<Policy>, ApiError> {
        let rows = self
            .inner
            .state
            .list(TABLE, tenant)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, text)| serde_json::from_str(&text).ok())
            .collect())
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<Policy, ApiError> {
        spec::check_id(id)?;
        let text = self
            .inner
            .state
            .get(TABLE, tenant, id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApiError::new(Code::NotFound, format!("policy {id} not found")))?;
        serde_json::from_str(&text)
            .map_err(|e| ApiError::new(Code::Internal, format!("policy {id} unreadable: {e}")))
    }

    /// Creates or replaces a policy; whether it was created. Publishes
    /// `policy.created` or `policy.updated`; it counts from the next event.
    pub async fn put(&self, tenant: &str, policy: Policy) -> Result<(Policy, bool), ApiError> {
        let mut compiled = spec::check(policy)?;
        let inner = &self.inner;
        let existing = inner
            .state
            .get(TABLE, tenant, &compiled.policy.id)
            .await
            .map_err(unavailable)?;
        let created = existing.is_none();
        if created {
            let count = inner
                .state
                .list(TABLE, tenant)
                .await
                .map_err(unavailable)?
                .len();
            if count >= inner.settings.policy_max_per_tenant {
                return Err(ApiError::new(
                    Code::ResourceExhausted,
                    format!(
                        "this tenant has {count} policies, the most TC_POLICY_MAX_PER_TENANT allows: delete one first"
                    ),
                ));
            }
        }
        let now = clock::timestamp_now(SystemTime::now());
        let p = &mut compiled.policy;
        p.created_at = existing
            .as_deref()
            .and_then(|t| serde_json::from_str::<Policy>(t).ok())
            .and_then(|old| old.created_at)
            .or_else(|| Some(now.clone()));
        p.updated_at = Some(now);
        let policy = compiled.policy.clone();
        let text = serde_json::to_string(&policy)
            .map_err(|e| ApiError::new(Code::Internal, format!("policy: {e}")))?;
        inner
            .state
            .put(TABLE, tenant, &policy.id, text)
            .await
            .map_err(unavailable)?;
        self.changed(tenant).await;
        self.announce(
            tenant,
            if created {
                "policy.created"
            } else {
                "policy.updated"
            },
            &policy,
        );
        Ok((policy, created))
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let policy = self.get(tenant, id).await?;
        let inner = &self.inner;
        inner
            .state
            .delete(TABLE, tenant, id)
            .await
            .map_err(unavailable)?;
        self.changed(tenant).await;
        // Its windows go with it.
        let prefix = format!("{id}:");
        if let Ok(rows) = inner.state.list(WINDOWS, tenant).await {
            for (key, _) in rows.into_iter().filter(|(k, _)| k.starts_with(&prefix)) {
                let _ = inner.state.delete(WINDOWS, tenant, &key).await;
            }
        }
        self.announce(tenant, "policy.deleted", &policy);
        Ok(())
    }

    /// After a change: this instance at once, the others through the
    /// version and the announcement.
    async fn changed(&self, tenant: &str) {
        let inner = &self.inner;
        match inner.state.bump(VERSION).await {
            Ok(v) => inner.version.store(v, Ordering::Release),
            Err(e) => tracing::warn!("policies changed but other instances were not told: {e}"),
        }
        self.reload(tenant).await;
    }

    fn announce(&self, tenant: &str, kind: &str, policy: &Policy) {
        let data = serde_json::json!({
            "policy_id": policy.id,
            "name": policy.name,
            "enabled": policy.enabled,
            "mode": policy.mode.as_str(),
            "action": policy.action.kind.as_str(),
            "generated_by": GENERATED_BY,
            "instance": self.inner.instance,
        });
        match event::internal(tenant, kind, &data, "", SystemTime::now()) {
            Ok(e) => self.inner.broker.publish_minted(e),
            Err(e) => tracing::warn!(tenant, kind, "not published: {e}"),
        }
    }

    /// Runs `policy` over `tenant`'s held events stamped from `from` to
    /// `until` with the live evaluator, publishing nothing.
    pub fn simulate(
        &self,
        tenant: &str,
        policy: Policy,
        from: SystemTime,
        until: SystemTime,
    ) -> Result<Simulation, ApiError> {
        let mut compiled = spec::check(policy)?;
        // Disabled or not, a dry run evaluates it.
        compiled.policy.enabled = true;
        let compiled = Arc::new(compiled);
        let span = self.inner.broker.history_span(tenant, from, until);
        let mut eval = TenantEval::new(vec![Arc::clone(&compiled)], None);
        let mut out = Vec::new();
        let events = span.events.len();
        for event in &span.events {
            if !eval.wants(&event.event_type) {
                continue;
            }
            observe_event(
                &mut eval,
                event,
                true,
                self.inner.settings.policy_max_subjects,
                &mut out,
            );
        }
        eval.settle(to_ms(until), &mut out);
        let mut firings: Vec<SimulatedFiring> = Vec::new();
        for o in out {
            match o {
                Outcome::Fired(f) => firings.push(SimulatedFiring {
                    subject: f.subject,
                    at: format_ms(f.at_ms),
                    value: f.value,
                    threshold: compiled.threshold,
                    action: compiled.policy.action.kind.as_str().into(),
                    event_id: f.event_id,
                    resolved_at: None,
                }),
                Outcome::Resolved(r) => {
                    let fired = format_ms(r.fired_ms);
                    if let Some(f) = firings
                        .iter_mut()
                        .rev()
                        .find(|f| f.subject == r.subject && f.at == fired)
                    {
                        f.resolved_at = Some(format_ms(r.at_ms));
                    }
                }
            }
        }
        Ok(Simulation {
            policy_id: compiled.policy.id.clone(),
            from: clock::format_timestamp(from),
            until: clock::format_timestamp(until),
            events,
            complete: span.complete,
            firings,
        })
    }
}

/// Writes window states in the order they were queued, 128 at a time,
/// until every sender is gone.
async fn saver(inner: Arc<Inner>, mut saving: mpsc::Receiver<Vec<Saving>>) {
    while let Some(writes) = saving.recv().await {
        for chunk in writes.chunks(128) {
            let results = futures_util::future::join_all(chunk.iter().map(|w| {
                let state = &inner.state;
                async move {
                    match w {
                        Saving::Put(tenant, key, window) => match serde_json::to_string(window) {
                            Ok(text) => state.put(WINDOWS, tenant, key, text).await,
                            Err(_) => Ok(()),
                        },
                        Saving::Delete(tenant, key) => {
                            state.delete(WINDOWS, tenant, key).await.map(|_| ())
                        }
                    }
                }
            }))
            .await;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                tracing::warn!("policy windows not all saved: {e}");
            }
        }
    }
}

/// Events waiting for policy evaluation.
pub struct Queue(mpsc::Receiver<SharedEvent>);

/// Queues the events some policy of their tenant counts, and the policy
/// events other instances publish; never blocks.
struct Observer {
    tx: mpsc::Sender<SharedEvent>,
    gate: Arc<Gate>,
    warning: clock::OncePerSecond,
}

impl Persist for Observer {
    fn offer(&self, event: &SharedEvent) {
        let kind = event.event_type.as_str();
        let wanted = kind.starts_with("policy.")
            || kind == "runaway_loop.detected"
            || kind == "runaway_loop.resolved"
            || read(&self.gate.wanted)
                .get(&event.tenant_id)
                .is_some_and(|w| w.wants(kind));
        if !wanted {
            return;
        }
        if self.tx.try_send(Arc::clone(event)).is_err() {
            self.gate.metrics.dropped.inc();
            if self.warning.due() {
                tracing::error!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    trace_id = %event.trace_id,
                    "policy queue full (TC_POLICY_QUEUE): event not evaluated by policies"
                );
            }
        }
    }
}
