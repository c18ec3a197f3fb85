//! Costs per tenant: hourly buckets of `cost.updated` amounts, by source,
//! by service within a source, by tag, by agent and by workflow
//! (docs/events.md has the payload).
//!
//! Amounts are kept as whole micro-dollars, so sums are exact. Bounds: 90
//! days of hours per tenant, and at most [`MAX_KEYS`] (source, tag, agent
//! or workflow) entries over all of a tenant's hours; past it a new name
//! is counted under `(other)`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::event::Event;

pub const COST_UPDATED: &str = "cost.updated";
/// Hours kept per tenant.
pub const RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Named entries (a source, a source's service, a tag value, an agent or a
/// workflow in an hour) per tenant, at most, by default
/// (`TC_COST_MAX_ENTRIES`).
pub const MAX_KEYS: usize = 50_000;
/// What a name past the bound is counted as.
pub const OTHER: &str = "(other)";
/// Tags read per event, and the longest tag key or value kept.
const MAX_TAGS: usize = 32;
const MAX_NAME: usize = 128;
/// An amount larger than this (USD) is not a cost but a mistake.
const MAX_AMOUNT_USD: f64 = 1e12;
const HOUR_MS: u64 = 3_600_000;

/// What the projection reads of one `cost.updated`.
#[derive(Debug, Clone, PartialEq)]
pub struct CostEvent {
    pub source: String,
    pub micros: i64,
    /// When the cost was incurred, Unix ms.
    pub at_ms: u64,
    pub tags: Vec<(String, String)>,
    pub agent_id: Option<String>,
    pub workflow_id: Option<String>,
    /// The model or service billed (`anthropic.claude-3-5-sonnet`, `EC2`).
    pub service: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    source: Option<serde_json::Value>,
    amount_usd: Option<serde_json::Value>,
    period_start: Option<String>,
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    agent_id: Option<String>,
    workflow_id: Option<String>,
    service: Option<String>,
}

impl CostEvent {
    /// The fields of a `cost.updated`, or why they cannot be read.
    pub fn read(event: &Event) -> Result<Self, String> {
        let p: Payload = serde_json::from_str(event.data.get())
            .map_err(|e| format!("data is not the cost.updated payload: {e}"))?;
        let source = match p.source {
            Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_NAME => s,
            Some(_) => return Err("source: not a name of 1 to 128 characters".into()),
            None => return Err("source: missing".into()),
        };
        let amount = match p.amount_usd {
            Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(_) => return Err("amount_usd: not a number".into()),
            None => return Err("amount_usd: missing".into()),
        };
        if !(0.0..=MAX_AMOUNT_USD).contains(&amount) {
            return Err(format!("amount_usd: {amount} is not between 0 and 1e12"));
        }
        let at = match &p.period_start {
            Some(text) => clock::parse_timestamp(text)
                .ok_or_else(|| format!("period_start: {text:?} is not an RFC 3339 time"))?,
            None => clock::parse_timestamp(&event.timestamp)
                .ok_or_else(|| "the event has no readable timestamp".to_string())?,
        };
        let at_ms = at
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "period_start: before 1970".to_string())?
            .as_millis() as u64;
        let tags = p
            .tags
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(v) => Some((k, v)),
                _ => None,
            })
            .filter(|(k, v)| !k.is_empty() && k.len() <= MAX_NAME && v.len() <= MAX_NAME)
            .take(MAX_TAGS)
            .collect();
        Ok(Self {
            source,
            micros: (amount * 1e6).round() as i64,
            at_ms,
            tags,
            agent_id: p.agent_id.filter(|a| !a.is_empty() && a.len() <= MAX_NAME),
            workflow_id: p
                .workflow_id
                .filter(|w| !w.is_empty() && w.len() <= MAX_NAME),
            service: p.service.filter(|s| !s.is_empty() && s.len() <= MAX_NAME),
        })
    }
}

/// One hour of a tenant's costs.
#[derive(Debug, Default, Clone)]
struct Hour {
    micros: i64,
    events: u64,
    by_source: HashMap<String, i64>,
    /// (tag key, tag value)
    by_tag: HashMap<(String, String), i64>,
    by_agent: HashMap<String, i64>,
    by_workflow: HashMap<String, i64>,
    /// (source, service)
    by_service: HashMap<(String, String), i64>,
}

impl Hour {
    fn keys(&self) -> usize {
        self.by_source.len()
            + self.by_tag.len()
            + self.by_agent.len()
            + self.by_workflow.len()
            + self.by_service.len()
    }

    fn folded(&self) -> bool {
        self.by_source.contains_key(OTHER)
            || self.by_agent.contains_key(OTHER)
            || self.by_workflow.contains_key(OTHER)
            || self.by_tag.keys().any(|(_, v)| v == OTHER)
            || self.by_service.keys().any(|(_, v)| v == OTHER)
    }

    /// As kept in the state store.
    fn record(&self) -> String {
        let pairs = |m: &HashMap<String, i64>| -> Vec<(String, i64)> {
            m.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        let record = HourRecord {
            micros: self.micros,
            events: self.events,
            sources: pairs(&self.by_source),
            tags: self
                .by_tag
                .iter()
                .map(|((k, v), m)| (k.clone(), v.clone(), *m))
                .collect(),
            agents: pairs(&self.by_agent),
            workflows: pairs(&self.by_workflow),
            services: self
                .by_service
                .iter()
                .map(|((s, v), m)| (s.clone(), v.clone(), *m))
                .collect(),
        };
        serde_json::to_string(&record).unwrap_or_default()
    }

    fn from_record(text: &str) -> Option<Self> {
        let r: HourRecord = serde_json::from_str(text).ok()?;
        Some(Self {
            micros: r.micros,
            events: r.events,
            by_source: r.sources.into_iter().collect(),
            by_tag: r.tags.into_iter().map(|(k, v, m)| ((k, v), m)).collect(),
            by_agent: r.agents.into_iter().collect(),
            by_workflow: r.workflows.into_iter().collect(),
            by_service: r
                .services
                .into_iter()
                .map(|(s, v, m)| ((s, v), m))
                .collect(),
        })
    }
}

/// One hour as a state record (`cost_hours`, tenant, hour number).
#[derive(Serialize, Deserialize)]
struct HourRecord {
    micros: i64,
    events: u64,
    sources: Vec<(String, i64)>,
    tags: Vec<(String, String, i64)>,
    agents: Vec<(String, i64)>,
    workflows: Vec<(String, i64)>,
    /// (source, service, micros); absent from hours saved before it was.
    #[serde(default)]
    services: Vec<(String, String, i64)>,
}

/// One tenant's costs, by hour (Unix ms / 1 h).
#[derive(Debug, Default)]
pub struct TenantCosts {
    hours: BTreeMap<u64, Hour>,
    keys: usize,
    /// A name was counted under `(other)`.
    folded: bool,
}

/// Adds `micros` under `name`, or under `(other)` when the tenant holds
/// `max` names already.
fn add_named<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, i64>,
    name: K,
    other: impl FnOnce() -> K,
    micros: i64,
    (keys, max): (&mut usize, usize),
    folded: &mut bool,
) {
    if let Some(v) = map.get_mut(&name) {
        *v += micros;
        return;
    }
    if *keys >= max {
        *folded = true;
        let other = other();
        if !map.contains_key(&other) {
            *keys += 1;
        }
        *map.entry(other).or_default() += micros;
        return;
    }
    *keys += 1;
    map.insert(name, micros);
}

impl TenantCosts {
    /// Adds one cost; a cost older than [`RETENTION`] or more than a day
    /// ahead of `now_ms` is not kept. Returns the hour it changed, and
    /// adds the hours that aged out to `removed`.
    /// At most `max_keys` named entries are kept; past it, new names are
    /// counted under `(other)`.
    pub fn add(
        &mut self,
        c: &CostEvent,
        now_ms: u64,
        max_keys: usize,
        removed: &mut Vec<u64>,
    ) -> Option<u64> {
        let oldest = now_ms.saturating_sub(RETENTION.as_millis() as u64);
        if c.at_ms < oldest || c.at_ms > now_ms + 24 * HOUR_MS {
            return None;
        }
        removed.extend(self.trim(oldest / HOUR_MS));
        let (keys, folded) = (&mut self.keys, &mut self.folded);
        let hour = self.hours.entry(c.at_ms / HOUR_MS).or_default();
        hour.micros += c.micros;
        hour.events += 1;
        add_named(
            &mut hour.by_source,
            c.source.clone(),
            || OTHER.to_string(),
            c.micros,
            (keys, max_keys),
            folded,
        );
        // Past the bound a name folds into an `(other)` of a bounded set:
        // a workload tag's own, else one for every tag key.
        for (k, v) in &c.tags {
            add_named(
                &mut hour.by_tag,
                (k.clone(), v.clone()),
                || {
                    if WORKLOAD_TAGS.contains(&k.as_str()) {
                        (k.clone(), OTHER.to_string())
                    } else {
                        (OTHER.to_string(), OTHER.to_string())
                    }
                },
                c.micros,
                (keys, max_keys),
                folded,
            );
        }
        if let Some(a) = &c.agent_id {
            add_named(
                &mut hour.by_agent,
                a.clone(),
                || OTHER.to_string(),
                c.micros,
                (keys, max_keys),
                folded,
            );
        }
        if let Some(service) = &c.service {
            // Folds under its source when that is named, else under
            // `(other)` as the source was.
            let source = if hour.by_source.contains_key(&c.source) {
                c.source.clone()
            } else {
                OTHER.to_string()
            };
            add_named(
                &mut hour.by_service,
                (c.source.clone(), service.clone()),
                || (source, OTHER.to_string()),
                c.micros,
                (keys, max_keys),
                folded,
            );
        }
        if let Some(w) = &c.workflow_id {
            add_named(
                &mut hour.by_workflow,
                w.clone(),
                || OTHER.to_string(),
                c.micros,
                (keys, max_keys),
                folded,
            );
        }
        Some(c.at_ms / HOUR_MS)
    }

    /// Drops hours before `first_hour`; returns them.
    fn trim(&mut self, first_hour: u64) -> Vec<u64> {
        let mut removed = Vec::new();
        while let Some(entry) = self.hours.first_entry() {
            if *entry.key() >= first_hour {
                break;
            }
            removed.push(*entry.key());
            self.keys -= entry.get().keys();
            entry.remove();
        }
        removed
    }

    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// An hour as its state record.
    pub fn hour_record(&self, hour: u64) -> Option<String> {
        self.hours.get(&hour).map(Hour::record)
    }

    /// Puts back an hour read from its state record; false when the text
    /// is not one, or the hour is older than [`RETENTION`] at `now_ms`.
    pub fn restore(&mut self, hour: u64, text: &str, now_ms: u64) -> bool {
        let oldest = now_ms.saturating_sub(RETENTION.as_millis() as u64) / HOUR_MS;
        if hour < oldest {
            return false;
        }
        let Some(h) = Hour::from_record(text) else {
            return false;
        };
        self.folded |= h.folded();
        self.keys += h.keys();
        if let Some(old) = self.hours.insert(hour, h) {
            self.keys -= old.keys();
        }
        true
    }

    /// The first and last hour of `query`'s window.
    fn hours_of(query: &SummaryQuery) -> (u64, u64) {
        let until_ms = query
            .until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let from_ms = until_ms.saturating_sub(query.window.as_millis() as u64);
        (from_ms / HOUR_MS, until_ms / HOUR_MS)
    }

    fn window(&self, first: u64, last: u64) -> impl Iterator<Item = &Hour> {
        self.hours.range(first..=last).map(|(_, h)| h)
    }

    /// Costs by the `application`, `team` and `environment` tags.
    pub fn workloads(&self, query: &SummaryQuery) -> WorkloadCosts {
        let (first, last) = Self::hours_of(query);
        let mut total = 0i64;
        let mut dims: [HashMap<&str, i64>; 3] = Default::default();
        for hour in self.window(first, last) {
            total += hour.micros;
            for ((k, v), m) in &hour.by_tag {
                if let Some(i) = WORKLOAD_TAGS.iter().position(|t| t == k) {
                    *dims[i].entry(v.as_str()).or_default() += m;
                }
            }
        }
        let mut truncated = false;
        let [application, team, environment] = dims.map(|d| {
            let tagged: i64 = d.values().sum();
            let (list, cut) = ranked(d, query.top);
            truncated |= cut;
            TagBreakdown {
                values: list,
                untagged_usd: usd(total - tagged),
            }
        });
        WorkloadCosts {
            from: hour_start(first),
            to: clock::format_timestamp(query.until),
            total_usd: usd(total),
            application,
            team,
            environment,
            truncated,
        }
    }

    /// Costs by `agent_id` and by `workflow_id`.
    pub fn agents(&self, query: &SummaryQuery, agent: Option<&str>) -> AgentCosts {
        let (first, last) = Self::hours_of(query);
        let mut agents: HashMap<&str, i64> = HashMap::new();
        let mut workflows: HashMap<&str, i64> = HashMap::new();
        for hour in self.window(first, last) {
            for (a, m) in &hour.by_agent {
                if agent.is_none_or(|want| want == a) {
                    *agents.entry(a.as_str()).or_default() += m;
                }
            }
            if agent.is_none() {
                for (w, m) in &hour.by_workflow {
                    *workflows.entry(w.as_str()).or_default() += m;
                }
            }
        }
        let attributed: i64 = agents.values().sum();
        let (by_agent, cut_a) = ranked(agents, query.top);
        let (by_workflow, cut_w) = ranked(workflows, query.top);
        AgentCosts {
            from: hour_start(first),
            to: clock::format_timestamp(query.until),
            agents_usd: usd(attributed),
            by_agent,
            by_workflow,
            truncated: cut_a || cut_w,
            presence: Vec::new(),
            connected: 0,
        }
    }

    /// Totals over the hours of `query`'s window.
    pub fn summary(&self, query: &SummaryQuery) -> CostSummary {
        let (first, last) = Self::hours_of(query);
        let mut total = 0i64;
        let mut events = 0u64;
        let mut sources: HashMap<&str, i64> = HashMap::new();
        let mut tags: HashMap<(&str, &str), i64> = HashMap::new();
        let mut services: HashMap<(&str, &str), i64> = HashMap::new();
        for hour in self.window(first, last) {
            for ((s, v), m) in &hour.by_service {
                if query.source.as_ref().is_none_or(|want| want == s) {
                    *services.entry((s.as_str(), v.as_str())).or_default() += m;
                }
            }
            if let Some(source) = &query.source {
                let Some(m) = hour.by_source.get(source) else {
                    continue;
                };
                // Only the source's own amount; tags are not split by
                // source, so they are left out when filtering by one.
                total += m;
                *sources.entry(source.as_str()).or_default() += m;
                continue;
            }
            total += hour.micros;
            events += hour.events;
            for (s, m) in &hour.by_source {
                *sources.entry(s.as_str()).or_default() += m;
            }
            for ((k, v), m) in &hour.by_tag {
                *tags.entry((k.as_str(), v.as_str())).or_default() += m;
            }
        }
        let mut by_source: Vec<SourceAmount> = sources
            .into_iter()
            .map(|(s, m)| SourceAmount {
                source: s.to_string(),
                usd: usd(m),
            })
            .collect();
        by_source.sort_by(|a, b| b.usd.total_cmp(&a.usd).then(a.source.cmp(&b.source)));
        let mut by_tag: Vec<TagAmount> = tags
            .into_iter()
            .map(|((k, v), m)| TagAmount {
                tag: k.to_string(),
                value: v.to_string(),
                usd: usd(m),
            })
            .collect();
        by_tag.sort_by(|a, b| {
            b.usd
                .total_cmp(&a.usd)
                .then(a.tag.cmp(&b.tag))
                .then(a.value.cmp(&b.value))
        });
        let mut by_service: Vec<ServiceAmount> = services
            .into_iter()
            .map(|((s, v), m)| ServiceAmount {
                source: s.to_string(),
                service: v.to_string(),
                usd: usd(m),
            })
            .collect();
        by_service.sort_by(|a, b| {
            b.usd
                .total_cmp(&a.usd)
                .then(a.source.cmp(&b.source))
                .then(a.service.cmp(&b.service))
        });
        let truncated =
            by_tag.len() > query.top || by_source.len() > query.top || by_service.len() > query.top;
        by_tag.truncate(query.top);
        by_source.truncate(query.top);
        by_service.truncate(query.top);
        CostSummary {
            from: hour_start(first),
            to: clock::format_timestamp(query.until),
            currency: "USD".into(),
            total_usd: usd(total),
            events: if query.source.is_some() {
                None
            } else {
                Some(events)
            },
            by_source,
            by_tag,
            by_service,
            truncated,
            folded_into_other: self.folded,
        }
    }
}

fn usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

fn hour_start(hour: u64) -> String {
    clock::format_timestamp(UNIX_EPOCH + Duration::from_millis(hour * HOUR_MS))
}

/// The tags `workload.cost` breaks costs down by.
pub const WORKLOAD_TAGS: [&str; 3] = ["application", "team", "environment"];

/// Named amounts, largest first, at most `top`; and whether some were cut.
fn ranked(amounts: HashMap<&str, i64>, top: usize) -> (Vec<Named>, bool) {
    let mut list: Vec<Named> = amounts
        .into_iter()
        .map(|(name, m)| Named {
            name: name.to_string(),
            usd: usd(m),
        })
        .collect();
    list.sort_by(|a, b| b.usd.total_cmp(&a.usd).then(a.name.cmp(&b.name)));
    let cut = list.len() > top;
    list.truncate(top);
    (list, cut)
}

/// An amount under a name (a tag value, an agent, a workflow).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Named {
    pub name: String,
    pub usd: f64,
}

/// One tag's values.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TagBreakdown {
    /// Largest first.
    pub values: Vec<Named>,
    /// Costs without this tag.
    pub untagged_usd: f64,
}

/// `workload.cost`'s answer.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct WorkloadCosts {
    /// Start of the window, widened to the hour.
    pub from: String,
    pub to: String,
    pub total_usd: f64,
    pub application: TagBreakdown,
    pub team: TagBreakdown,
    pub environment: TagBreakdown,
    /// More values than `top` exist: only the largest are listed.
    pub truncated: bool,
}

/// `agent.cost`'s answer.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct AgentCosts {
    /// Start of the window, widened to the hour.
    pub from: String,
    pub to: String,
    /// Costs attributed to an agent (`agent_id`) in the window.
    pub agents_usd: f64,
    /// Largest first.
    pub by_agent: Vec<Named>,
    /// Largest first (empty when asked about one agent).
    pub by_workflow: Vec<Named>,
    /// More agents or workflows than `top` exist.
    pub truncated: bool,
    /// Presence and health of the agents listed and of those connected
    /// now (from `agent.*` events), most recently seen first, at most `top`.
    pub presence: Vec<super::Agent>,
    /// Agents connected now.
    pub connected: usize,
}

/// What `cost.summary` asks.
#[derive(Debug, Clone)]
pub struct SummaryQuery {
    pub window: Duration,
    pub until: SystemTime,
    pub source: Option<String>,
    /// Sources and tag values listed, at most (the largest).
    pub top: usize,
}

/// `cost.summary`'s answer.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CostSummary {
    /// Start of the window, widened to the hour.
    pub from: String,
    pub to: String,
    pub currency: String,
    pub total_usd: f64,
    /// `cost.updated` events counted (omitted when filtered by source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// Largest first.
    pub by_source: Vec<SourceAmount>,
    /// Per tag key and value, largest first (empty when filtered by source).
    pub by_tag: Vec<TagAmount>,
    /// Per source and service (the model or cloud service billed: the
    /// `service` of `cost.updated`), largest first; with a source filter,
    /// that source's services: what drove its bill.
    pub by_service: Vec<ServiceAmount>,
    /// More sources or tag values than `top` exist: only the largest are
    /// listed.
    pub truncated: bool,
    /// The tenant reached its bound of named entries: some amounts are
    /// counted under `(other)`.
    pub folded_into_other: bool,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SourceAmount {
    pub source: String,
    pub usd: f64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ServiceAmount {
    pub source: String,
    pub service: String,
    pub usd: f64,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TagAmount {
    pub tag: String,
    pub value: String,
    pub usd: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(source: &str, micros: i64, at_ms: u64, tags: &[(&str, &str)]) -> CostEvent {
        CostEvent {
            source: source.into(),
            micros,
            at_ms,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_id: None,
            workflow_id: None,
            service: None,
        }
    }

    fn add(t: &mut TenantCosts, c: &CostEvent, now_ms: u64) -> bool {
        t.add(c, now_ms, MAX_KEYS, &mut Vec::new()).is_some()
    }

    #[test]
    fn an_hour_comes_back_from_its_record_as_it_was() {
        let now = 100_000 * HOUR_MS;
        let mut t = TenantCosts::default();
        let mut c = cost("bedrock", 1_250_000, now, &[("team", "ml")]);
        c.agent_id = Some("bot".into());
        c.workflow_id = Some("triage".into());
        add(&mut t, &c, now);
        add(&mut t, &cost("aws", 500_000, now, &[]), now);
        let record = t.hour_record(now / HOUR_MS).unwrap();
        let mut back = TenantCosts::default();
        assert!(back.restore(now / HOUR_MS, &record, now));
        assert_eq!(back.keys, t.keys);
        let q = query(now, Duration::from_secs(3600));
        assert_eq!(
            serde_json::to_value(back.summary(&q)).unwrap(),
            serde_json::to_value(t.summary(&q)).unwrap()
        );
        assert_eq!(back.agents(&q, None).agents_usd, 1.25);
        assert!(!back.restore(1, &record, now), "older than 90 days");
        assert!(!back.restore(now / HOUR_MS, "not a record", now));
    }

    fn query(until_ms: u64, window: Duration) -> SummaryQuery {
        SummaryQuery {
            window,
            until: UNIX_EPOCH + Duration::from_millis(until_ms),
            source: None,
            top: 20,
        }
    }

    #[test]
    fn sums_are_exact_by_source_and_tag_within_the_window() {
        let now = 1_000 * HOUR_MS;
        let mut t = TenantCosts::default();
        add(
            &mut t,
            &cost("bedrock", 1_100_000, now - 10, &[("team", "ml")]),
            now,
        );
        add(
            &mut t,
            &cost("bedrock", 2_200_000, now - HOUR_MS, &[("team", "ml")]),
            now,
        );
        add(
            &mut t,
            &cost("aws", 300_000, now - 2 * HOUR_MS, &[("team", "web")]),
            now,
        );
        // Outside a 2-hour window.
        add(&mut t, &cost("aws", 9_000_000, now - 5 * HOUR_MS, &[]), now);
        let s = t.summary(&query(now, Duration::from_millis(2 * HOUR_MS)));
        assert_eq!(s.total_usd, 3.6);
        assert_eq!(s.events, Some(3));
        assert_eq!(s.by_source[0].source, "bedrock");
        assert_eq!(s.by_source[0].usd, 3.3);
        assert_eq!(s.by_source[1].usd, 0.3);
        assert_eq!((s.by_tag[0].value.as_str(), s.by_tag[0].usd), ("ml", 3.3));
        let all = t.summary(&query(now, Duration::from_millis(10 * HOUR_MS)));
        assert_eq!(all.total_usd, 12.6);
    }

    #[test]
    fn old_and_far_future_costs_are_not_kept_and_hours_age_out() {
        let now = 100_000 * HOUR_MS;
        let mut t = TenantCosts::default();
        assert!(!add(
            &mut t,
            &cost("aws", 1, now - RETENTION.as_millis() as u64 - 1, &[]),
            now
        ));
        assert!(!add(&mut t, &cost("aws", 1, now + 25 * HOUR_MS, &[]), now));
        assert!(add(&mut t, &cost("aws", 1, now - 10 * HOUR_MS, &[]), now));
        // Ninety days on, that hour is dropped with its keys.
        let later = now + RETENTION.as_millis() as u64;
        assert!(add(&mut t, &cost("gcp", 1, later, &[]), later));
        assert_eq!(t.hours.len(), 1);
        assert_eq!(t.keys, 1);
    }

    #[test]
    fn names_past_the_bound_are_counted_under_other() {
        let now = 1_000 * HOUR_MS;
        let mut t = TenantCosts::default();
        for i in 0..MAX_KEYS + 10 {
            add(&mut t, &cost(&format!("s{i}"), 1, now, &[]), now);
        }
        assert!(t.keys <= MAX_KEYS + 1, "{}", t.keys);
        let s = t.summary(&SummaryQuery {
            top: 1,
            ..query(now, Duration::from_secs(3600))
        });
        assert!(s.folded_into_other);
        assert_eq!(s.total_usd, (MAX_KEYS + 10) as f64 / 1e6);
        let other = s.by_source.iter().find(|a| a.source == OTHER).unwrap();
        assert_eq!(other.usd, 10.0 / 1e6);
    }

    #[test]
    fn past_the_bound_new_sources_and_tag_keys_add_no_entries() {
        let now = 1_000 * HOUR_MS;
        let mut t = TenantCosts::default();
        let max = 4;
        let mut c = cost("aws", 1, now, &[("team", "a")]);
        c.service = Some("EC2".into());
        t.add(&c, now, max, &mut Vec::new());
        for i in 0..200 {
            let mut c = cost(
                &format!("src{i}"),
                1,
                now,
                &[(&format!("key{i}"), "v"), ("team", &format!("t{i}"))],
            );
            c.service = Some(format!("svc{i}"));
            t.add(&c, now, max, &mut Vec::new());
        }
        // The named ones, and one (other) per folded kind: never one per name.
        assert!(t.keys <= max + 5, "{} entries", t.keys);
        let s = t.summary(&query(now, Duration::from_secs(3600)));
        assert_eq!(s.total_usd, 201.0 / 1e6);
        let services: f64 = s.by_service.iter().map(|x| x.usd).sum();
        assert!(services <= s.total_usd + 1e-12);
    }

    #[test]
    fn unreadable_payloads_say_which_field() {
        let mut e = crate::broker::tests::event("t", "e1", COST_UPDATED);
        let read = |e: &Event| CostEvent::read(e).unwrap_err();
        e.data = serde_json::value::RawValue::from_string(r#"{"amount_usd": 1}"#.into()).unwrap();
        assert!(read(&e).contains("source"), "{}", read(&e));
        e.data =
            serde_json::value::RawValue::from_string(r#"{"source":"aws","amount_usd":"1"}"#.into())
                .unwrap();
        assert!(read(&e).contains("amount_usd"));
        e.data =
            serde_json::value::RawValue::from_string(r#"{"source":"aws","amount_usd":-1}"#.into())
                .unwrap();
        assert!(read(&e).contains("amount_usd"));
        e.data = serde_json::value::RawValue::from_string(
            r#"{"source":"aws","amount_usd":1,"period_start":"yesterday"}"#.into(),
        )
        .unwrap();
        assert!(read(&e).contains("period_start"));
    }
}
