//! Current state per entity, per tenant: alerts and recommendations, each
//! kept as the events about it say it is now (docs/events.md has the
//! payloads). Bounded per tenant; past the bound the entity settled the
//! longest (resolved, dismissed, accepted) goes first, then the oldest.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// A kind of entity a projection keeps.
pub trait Entity: Serialize + DeserializeOwned + Clone {
    /// Its state table, and its name in messages.
    const TABLE: &'static str;
    /// Kept per tenant, at most.
    const MAX_PER_TENANT: usize;
    /// Nothing more is expected of it (resolved, dismissed, accepted):
    /// it goes first when the tenant is over its bound.
    fn settled(&self) -> bool;
}

/// Entities of one kind for every tenant, each with the number of its
/// last change (its order of change, kept across restarts).
#[derive(Debug)]
pub struct Entities<T> {
    tenants: HashMap<String, HashMap<String, (u64, T)>>,
    last: u64,
}

impl<T> Default for Entities<T> {
    fn default() -> Self {
        Self {
            tenants: HashMap::new(),
            last: 0,
        }
    }
}

/// An entity as kept in the state store.
#[derive(Serialize, Deserialize)]
struct Record<T> {
    seq: u64,
    entity: T,
}

impl<T: Entity> Entities<T> {
    /// Changes (or creates) `id` of `tenant` with `change`; returns the
    /// ids evicted to stay within the bound.
    pub fn upsert(
        &mut self,
        tenant: &str,
        id: &str,
        change: impl FnOnce(&mut Option<T>),
    ) -> Vec<String> {
        self.last += 1;
        self.put(tenant, id, self.last, change)
    }

    fn put(
        &mut self,
        tenant: &str,
        id: &str,
        seq: u64,
        change: impl FnOnce(&mut Option<T>),
    ) -> Vec<String> {
        let entities = self.tenants.entry(tenant.to_string()).or_default();
        let mut current = entities.remove(id).map(|(_, e)| e);
        change(&mut current);
        let Some(entity) = current else {
            return Vec::new();
        };
        entities.insert(id.to_string(), (seq, entity));
        let mut evicted = Vec::new();
        while entities.len() > T::MAX_PER_TENANT {
            let Some(first) = entities
                .iter()
                .filter(|(k, _)| k.as_str() != id)
                .min_by_key(|(_, (seq, e))| (!e.settled(), *seq))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            entities.remove(&first);
            evicted.push(first);
        }
        evicted
    }

    /// A tenant's entities, most recently changed first.
    pub fn latest_first(&self, tenant: &str) -> Vec<&T> {
        let mut list: Vec<&(u64, T)> = self
            .tenants
            .get(tenant)
            .into_iter()
            .flat_map(HashMap::values)
            .collect();
        list.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        list.into_iter().map(|(_, e)| e).collect()
    }

    /// How many of `tenant`'s entities `keep` says yes to.
    pub fn count(&self, tenant: &str, keep: impl Fn(&T) -> bool) -> usize {
        self.tenants
            .get(tenant)
            .map_or(0, |all| all.values().filter(|(_, e)| keep(e)).count())
    }

    pub fn get(&self, tenant: &str, id: &str) -> Option<&T> {
        self.tenants.get(tenant)?.get(id).map(|(_, e)| e)
    }

    /// As kept in the state store.
    pub fn record(&self, tenant: &str, id: &str) -> Option<String> {
        let (seq, entity) = self.tenants.get(tenant)?.get(id)?;
        serde_json::to_string(&Record { seq: *seq, entity }).ok()
    }

    /// Puts back an entity read from its record; false when it is not one.
    pub fn restore(&mut self, tenant: &str, id: &str, text: &str) -> bool {
        match serde_json::from_str::<Record<T>>(text) {
            Ok(Record { seq, entity }) => {
                self.last = self.last.max(seq);
                self.put(tenant, id, seq, |slot| *slot = Some(entity));
                true
            }
            Err(_) => false,
        }
    }
}

/// A string field of an event's `data`, if it is one.
fn text(data: &serde_json::Value, field: &str) -> Option<String> {
    data.get(field)?.as_str().map(str::to_string)
}

/// `data` as JSON, and its `field` id: present, a string of 1 to 128
/// characters, or why not.
pub fn read_id(event: &Event, field: &str) -> Result<(serde_json::Value, String), String> {
    let data: serde_json::Value =
        serde_json::from_str(event.data.get()).map_err(|e| format!("data: {e}"))?;
    match data.get(field) {
        Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= 128 => {
            let id = id.clone();
            Ok((data, id))
        }
        Some(_) => Err(format!("{field}: not a string of 1 to 128 characters")),
        None => Err(format!("{field}: missing")),
    }
}

/// An alert as it stands now.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Alert {
    pub alert_id: String,
    /// `open`, `escalated`, `suppressed` or `resolved`.
    pub state: String,
    /// `critical`, `high`, `medium`, `low` or `info` (as published).
    pub severity: Option<String>,
    pub title: Option<String>,
    /// What raised it (a budget, a detector, a provider).
    pub source: Option<String>,
    /// What it is about (an instance, an account, an agent).
    pub resource: Option<String>,
    /// When it was created, and when it last changed (RFC 3339).
    pub created_at: String,
    pub updated_at: String,
    /// The id of the event that last changed it.
    pub last_event_id: String,
}

pub const ALERT_TYPES: [&str; 4] = [
    "alert.created",
    "alert.escalated",
    "alert.suppressed",
    "alert.resolved",
];

impl Entity for Alert {
    const TABLE: &'static str = "alerts";
    const MAX_PER_TENANT: usize = 5_000;
    fn settled(&self) -> bool {
        self.state == "resolved"
    }
}

impl Alert {
    /// Applies one `alert.*` event to the alert it names.
    pub fn apply(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let alert = slot.get_or_insert_with(|| Alert {
            alert_id: id.to_string(),
            state: "open".into(),
            severity: None,
            title: None,
            source: None,
            resource: None,
            created_at: event.timestamp.clone(),
            updated_at: event.timestamp.clone(),
            last_event_id: String::new(),
        });
        alert.state = match event.event_type.as_str() {
            "alert.escalated" => "escalated",
            "alert.suppressed" => "suppressed",
            "alert.resolved" => "resolved",
            _ => alert.state.as_str(),
        }
        .to_string();
        if event.event_type == "alert.created" {
            alert.created_at = event.timestamp.clone();
            alert.state = "open".into();
        }
        for (field, value) in [
            (&mut alert.severity, text(data, "severity")),
            (&mut alert.title, text(data, "title")),
            (&mut alert.source, text(data, "source")),
            (&mut alert.resource, text(data, "resource")),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        alert.updated_at = event.timestamp.clone();
        alert.last_event_id = event.id.clone();
    }

    /// Applies an `inference.spike_detected` event: an open alert (id
    /// `spike:<spike_id>`) about the provider's model, severity `medium`
    /// unless the event says.
    pub fn apply_spike(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let provider = text(data, "provider");
        let model = text(data, "model");
        let what = [provider.as_deref(), model.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let title = match data.get("increase_pct").and_then(serde_json::Value::as_f64) {
            Some(pct) => format!("inference spend spike: {what} up {pct:.0}%"),
            None => format!("inference spend spike: {what}"),
        };
        Self::derived(slot, event, data, id, ("medium", title), provider, model);
    }

    /// Applies a `cost.threshold_exceeded` event: an open alert (id
    /// `budget:<budget_id>`) about the budget, severity `high` unless the
    /// event says.
    pub fn apply_threshold(
        slot: &mut Option<Self>,
        event: &Event,
        data: &serde_json::Value,
        id: &str,
    ) {
        let budget = text(data, "budget_id").unwrap_or_default();
        let name = text(data, "budget_name").unwrap_or_else(|| budget.clone());
        let usd = |field| data.get(field).and_then(serde_json::Value::as_f64);
        let title = match (usd("current_usd"), usd("threshold_usd")) {
            (Some(current), Some(threshold)) => {
                format!("cost threshold exceeded: {name} at {current:.2} of {threshold:.2} USD")
            }
            _ => format!("cost threshold exceeded: {name}"),
        };
        let source = text(data, "source");
        Self::derived(slot, event, data, id, ("high", title), source, Some(budget));
    }

    /// An open alert that another event type stands for; the event's own
    /// `severity` and `title` win over the defaults.
    fn derived(
        slot: &mut Option<Self>,
        event: &Event,
        data: &serde_json::Value,
        id: &str,
        (severity, title): (&str, String),
        source: Option<String>,
        resource: Option<String>,
    ) {
        let created_at = slot
            .as_ref()
            .map_or_else(|| event.timestamp.clone(), |a| a.created_at.clone());
        *slot = Some(Alert {
            alert_id: id.to_string(),
            state: "open".into(),
            severity: text(data, "severity").or_else(|| Some(severity.into())),
            title: text(data, "title").or(Some(title)),
            source,
            resource,
            created_at,
            updated_at: event.timestamp.clone(),
            last_event_id: event.id.clone(),
        });
    }
}

/// Whether an alert id is one of those other events stand for.
pub fn is_derived_alert_id(id: &str) -> bool {
    id.starts_with("spike:") || id.starts_with("budget:")
}

pub const SPIKE_DETECTED: &str = "inference.spike_detected";
pub const THRESHOLD_EXCEEDED: &str = "cost.threshold_exceeded";

/// The alert id prefix of an event type that stands for an alert, so its
/// ids never meet `alert_id`s.
pub fn alert_prefix(event_type: &str) -> &'static str {
    match event_type {
        SPIKE_DETECTED => "spike:",
        THRESHOLD_EXCEEDED => "budget:",
        _ => "",
    }
}

/// A recommendation as it stands now.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Recommendation {
    pub recommendation_id: String,
    /// `open`, `accepted` or `dismissed`.
    pub state: String,
    /// `inference` for managed inference (Bedrock, Azure OpenAI, ...);
    /// `compute`, `storage`, ... for others.
    pub category: Option<String>,
    pub title: Option<String>,
    /// `bedrock`, `azure_openai`, `aws`, ...
    pub provider: Option<String>,
    /// The model or service it is about.
    pub service: Option<String>,
    pub estimated_monthly_savings_usd: Option<f64>,
    pub details: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_event_id: String,
}

pub const RECOMMENDATION_TYPES: [&str; 3] = [
    "recommendation.created",
    "recommendation.accepted",
    "recommendation.dismissed",
];

impl Entity for Recommendation {
    const TABLE: &'static str = "recommendations";
    const MAX_PER_TENANT: usize = 5_000;
    fn settled(&self) -> bool {
        self.state != "open"
    }
}

impl Recommendation {
    /// Applies one `recommendation.*` event to the recommendation it names.
    pub fn apply(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let r = slot.get_or_insert_with(|| Recommendation {
            recommendation_id: id.to_string(),
            state: "open".into(),
            category: None,
            title: None,
            provider: None,
            service: None,
            estimated_monthly_savings_usd: None,
            details: None,
            created_at: event.timestamp.clone(),
            updated_at: event.timestamp.clone(),
            last_event_id: String::new(),
        });
        match event.event_type.as_str() {
            "recommendation.accepted" => r.state = "accepted".into(),
            "recommendation.dismissed" => r.state = "dismissed".into(),
            _ => {
                r.state = "open".into();
                r.created_at = event.timestamp.clone();
            }
        }
        for (field, value) in [
            (&mut r.category, text(data, "category")),
            (&mut r.title, text(data, "title")),
            (&mut r.provider, text(data, "provider")),
            (&mut r.service, text(data, "service")),
            (&mut r.details, text(data, "details")),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if let Some(savings) = data
            .get("estimated_monthly_savings_usd")
            .and_then(serde_json::Value::as_f64)
            .filter(|s| s.is_finite())
        {
            r.estimated_monthly_savings_usd = Some(savings);
        }
        r.updated_at = event.timestamp.clone();
        r.last_event_id = event.id.clone();
    }
}

/// A GPU instance as it stands now.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Instance {
    pub instance_id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `terminated`, ... as
    /// published; `running` when created without one.
    pub state: String,
    /// `aws`, `gcp`, `azure`, ...
    pub provider: Option<String>,
    pub region: Option<String>,
    /// The provider's instance type (`p5.48xlarge`).
    pub instance_type: Option<String>,
    /// `H100`, `A100`, `L4`, ...
    pub gpu_type: Option<String>,
    pub gpu_count: Option<u32>,
    pub hourly_cost_usd: Option<f64>,
    pub created_at: String,
    pub updated_at: String,
    pub last_event_id: String,
}

pub const INSTANCE_TYPES: [&str; 3] = [
    "instance.created",
    "instance.state_changed",
    "instance.stopped",
];

impl Entity for Instance {
    const TABLE: &'static str = "instances";
    const MAX_PER_TENANT: usize = 20_000;
    fn settled(&self) -> bool {
        matches!(self.state.as_str(), "stopped" | "terminated")
    }
}

impl Instance {
    /// Applies one `instance.*` event to the instance it names.
    pub fn apply(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let i = slot.get_or_insert_with(|| Instance {
            instance_id: id.to_string(),
            state: "running".into(),
            provider: None,
            region: None,
            instance_type: None,
            gpu_type: None,
            gpu_count: None,
            hourly_cost_usd: None,
            created_at: event.timestamp.clone(),
            updated_at: event.timestamp.clone(),
            last_event_id: String::new(),
        });
        match event.event_type.as_str() {
            "instance.stopped" => i.state = "stopped".into(),
            "instance.created" => {
                i.created_at = event.timestamp.clone();
                i.state = text(data, "state").unwrap_or_else(|| "running".into());
            }
            _ => {
                if let Some(state) = text(data, "state") {
                    i.state = state;
                }
            }
        }
        for (field, value) in [
            (&mut i.provider, text(data, "provider")),
            (&mut i.region, text(data, "region")),
            (&mut i.instance_type, text(data, "instance_type")),
            (&mut i.gpu_type, text(data, "gpu_type")),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if let Some(n) = data
            .get("gpu_count")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
        {
            i.gpu_count = Some(n);
        }
        if let Some(cost) = data
            .get("hourly_cost_usd")
            .and_then(serde_json::Value::as_f64)
            .filter(|c| c.is_finite() && *c >= 0.0)
        {
            i.hourly_cost_usd = Some(cost);
        }
        i.updated_at = event.timestamp.clone();
        i.last_event_id = event.id.clone();
    }
}

/// A cloud or inference provider connection's sync health.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Connection {
    pub connection_id: String,
    /// `ok` after a sync, `failing` after a failed one.
    pub status: String,
    /// `aws`, `gcp`, `azure`, `bedrock`, `azure_openai`, ...
    pub provider: Option<String>,
    /// When it last synced successfully (RFC 3339), if ever.
    pub last_sync_at: Option<String>,
    /// When it was last tried, successfully or not.
    pub last_attempt_at: String,
    /// The error of the last failed sync (kept until a sync succeeds).
    pub last_error: Option<String>,
    /// Failed syncs since the last success.
    pub consecutive_failures: u32,
    pub last_event_id: String,
}

pub const CONNECTION_TYPES: [&str; 2] = ["system.connection_synced", "system.connection_failed"];

impl Entity for Connection {
    const TABLE: &'static str = "connections";
    const MAX_PER_TENANT: usize = 1_000;
    fn settled(&self) -> bool {
        false
    }
}

impl Connection {
    /// Applies one `system.connection_*` event to the connection it names.
    pub fn apply(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let c = slot.get_or_insert_with(|| Connection {
            connection_id: id.to_string(),
            status: "ok".into(),
            provider: None,
            last_sync_at: None,
            last_attempt_at: event.timestamp.clone(),
            last_error: None,
            consecutive_failures: 0,
            last_event_id: String::new(),
        });
        // When the sync happened, if the event says; else when published.
        let at = text(data, "synced_at")
            .or_else(|| text(data, "attempted_at"))
            .filter(|t| crate::clock::parse_timestamp(t).is_some())
            .unwrap_or_else(|| event.timestamp.clone());
        if event.event_type == "system.connection_synced" {
            c.status = "ok".into();
            c.last_sync_at = Some(at.clone());
            c.last_error = None;
            c.consecutive_failures = 0;
        } else {
            c.status = "failing".into();
            c.last_error = Some(
                text(data, "error")
                    .map(|mut e| {
                        e.truncate(e.floor_char_boundary(500));
                        e
                    })
                    .unwrap_or_else(|| "sync failed (no error given)".into()),
            );
            c.consecutive_failures = c.consecutive_failures.saturating_add(1);
        }
        if let Some(p) = text(data, "provider") {
            c.provider = Some(p);
        }
        c.last_attempt_at = at;
        c.last_event_id = event.id.clone();
    }
}

/// An agent as its `agent.*` events leave it: presence (published by
/// the broker from the agent's gRPC streams), health and errors (published
/// by the agent or its platform).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Agent {
    pub agent_id: String,
    /// `connected` while an instance says it has a stream of the agent
    /// open, then `disconnected` (from presence events); `unknown` until
    /// one arrives.
    pub status: String,
    /// The instances with a stream of the agent open (their presence
    /// events' `instance`), at most 64.
    #[serde(default)]
    pub instances: Vec<String>,
    /// When it last connected (RFC 3339).
    pub connected_at: Option<String>,
    /// When it last disconnected, and why (`closed`, `token_expired`,
    /// `shutdown`, `broken_connection`, `too_slow`).
    pub disconnected_at: Option<String>,
    pub disconnect_reason: Option<String>,
    /// The `status` of its last `agent.health_check` (`healthy`, ...).
    pub health: Option<String>,
    /// The message of its last `agent.error`, and how many it reported.
    pub last_error: Option<String>,
    pub errors: u64,
    /// Its last event of any of these kinds.
    pub last_seen_at: String,
    pub last_event_id: String,
}

/// Instances an agent is listed as connected on, at most.
const MAX_INSTANCES: usize = 64;

pub const AGENT_TYPES: [&str; 4] = [
    "agent.connected",
    "agent.disconnected",
    "agent.error",
    "agent.health_check",
];

impl Entity for Agent {
    const TABLE: &'static str = "agents";
    const MAX_PER_TENANT: usize = 10_000;
    fn settled(&self) -> bool {
        self.status != "connected"
    }
}

impl Agent {
    /// Applies one `agent.*` event to the agent it names.
    pub fn apply(slot: &mut Option<Self>, event: &Event, data: &serde_json::Value, id: &str) {
        let a = slot.get_or_insert_with(|| Agent {
            agent_id: id.to_string(),
            status: "unknown".into(),
            instances: Vec::new(),
            connected_at: None,
            disconnected_at: None,
            disconnect_reason: None,
            health: None,
            last_error: None,
            errors: 0,
            last_seen_at: event.timestamp.clone(),
            last_event_id: String::new(),
        });
        let instance = text(data, "instance").unwrap_or_default();
        match event.event_type.as_str() {
            "agent.connected" => {
                if a.status != "connected" {
                    a.connected_at = Some(event.timestamp.clone());
                }
                if !a.instances.contains(&instance) && a.instances.len() < MAX_INSTANCES {
                    a.instances.push(instance);
                }
                a.status = "connected".into();
            }
            "agent.disconnected" => {
                a.instances.retain(|i| *i != instance);
                if a.instances.is_empty() {
                    a.status = "disconnected".into();
                }
                a.disconnected_at = Some(event.timestamp.clone());
                a.disconnect_reason = text(data, "reason");
            }
            "agent.error" => {
                a.errors = a.errors.saturating_add(1);
                a.last_error = Some(
                    text(data, "error")
                        .map(|mut e| {
                            e.truncate(e.floor_char_boundary(500));
                            e
                        })
                        .unwrap_or_else(|| "error (no message given)".into()),
                );
            }
            _ => {
                if let Some(status) = text(data, "status") {
                    a.health = Some(status);
                }
            }
        }
        a.last_seen_at = event.timestamp.clone();
        a.last_event_id = event.id.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_connected_while_any_instance_says_so() {
        let mut slot = None;
        let mut at = |kind: &str, instance: &str| {
            let mut e = crate::broker::tests::event("t", "e", kind);
            e.timestamp = "2026-11-29T00:00:00.000Z".into();
            let data =
                serde_json::json!({"agent_id": "a", "instance": instance, "reason": "closed"});
            Agent::apply(&mut slot, &e, &data, "a");
            slot.as_ref().map(|a: &Agent| a.status.clone()).unwrap()
        };
        assert_eq!(at("agent.connected", "i1"), "connected");
        assert_eq!(at("agent.connected", "i2"), "connected");
        assert_eq!(at("agent.disconnected", "i1"), "connected", "still on i2");
        assert_eq!(at("agent.disconnected", "i2"), "disconnected");
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        done: bool,
    }

    impl Entity for Thing {
        const TABLE: &'static str = "things";
        const MAX_PER_TENANT: usize = 3;
        fn settled(&self) -> bool {
            self.done
        }
    }

    fn put(e: &mut Entities<Thing>, id: &str, done: bool) -> Vec<String> {
        e.upsert("t", id, |slot| *slot = Some(Thing { done }))
    }

    #[test]
    fn past_the_bound_the_settled_go_first_then_the_least_recently_changed() {
        let mut e = Entities::default();
        assert!(put(&mut e, "a", false).is_empty());
        put(&mut e, "b", false);
        put(&mut e, "c", true);
        assert_eq!(put(&mut e, "d", false), vec!["c".to_string()]);
        put(&mut e, "a", false);
        assert_eq!(put(&mut e, "e", false), vec!["b".to_string()]);
        assert_eq!(e.latest_first("t").len(), 3);
        assert!(e.latest_first("other").is_empty());
        // The order of change survives a trip through the records.
        let mut back: Entities<Thing> = Entities::default();
        for id in ["a", "d", "e"] {
            assert!(back.restore("t", id, &e.record("t", id).unwrap()));
        }
        assert_eq!(back.latest_first("t"), e.latest_first("t"));
        put(&mut back, "f", true);
        assert_eq!(back.latest_first("t")[0], &Thing { done: true });
    }

    #[test]
    fn an_alert_follows_its_events_and_comes_back_from_its_record() {
        let mut ev = crate::broker::tests::event("t", "e1", "alert.created");
        ev.timestamp = "2026-11-28T10:00:00.000Z".into();
        ev.data = serde_json::value::RawValue::from_string(
            r#"{"alert_id":"a1","severity":"high","title":"Budget 80%"}"#.into(),
        )
        .unwrap();
        let mut alerts: Entities<Alert> = Entities::default();
        let (data, id) = read_id(&ev, "alert_id").unwrap();
        alerts.upsert("t", &id, |s| Alert::apply(s, &ev, &data, &id));
        ev.event_type = "alert.escalated".into();
        ev.id = "e2".into();
        ev.data = serde_json::value::RawValue::from_string(
            r#"{"alert_id":"a1","severity":"critical"}"#.into(),
        )
        .unwrap();
        let (data, id) = read_id(&ev, "alert_id").unwrap();
        alerts.upsert("t", &id, |s| Alert::apply(s, &ev, &data, &id));
        let a = alerts.get("t", "a1").unwrap();
        assert_eq!(
            (a.state.as_str(), a.severity.as_deref(), a.title.as_deref()),
            ("escalated", Some("critical"), Some("Budget 80%"))
        );
        let record = alerts.record("t", "a1").unwrap();
        let mut back: Entities<Alert> = Entities::default();
        assert!(back.restore("t", "a1", &record));
        assert_eq!(back.get("t", "a1").unwrap().last_event_id, "e2");
        assert!(!back.restore("t", "a2", "{}"));
        ev.data = serde_json::value::RawValue::from_string(r#"{"severity":"low"}"#.into()).unwrap();
        assert!(read_id(&ev, "alert_id").unwrap_err().contains("alert_id"));
    }
}
