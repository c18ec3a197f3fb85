//! A policy as users write it: what it watches, when it fires and what it
//! does. Read from JSON with errors that name the field
//! (`condition.window: ...`); checked once, then compiled for the
//! evaluator ([`Compiled`]).

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::broker::TypeFilter;
use crate::error::ApiError;

/// Longest sliding window a policy may measure over.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest: below it a window's twentieth is under 50 ms.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
/// Longest cooldown and resolve delay.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most equality conditions in `match.where`.
pub const MAX_WHERE: usize = 16;
/// Most type patterns in `match.types`.
pub const MAX_TYPES: usize = 32;
/// Longest id, name and field path.
pub const MAX_ID: usize = 64;
pub const MAX_NAME: usize = 200;
pub const MAX_PATH: usize = 128;

/// A policy, as stored and as `GET /v1/policies/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Letters, digits, `-` and `_`, up to 64 (`runaway-agents`).
    pub id: String,
    /// What people call it (up to 200 characters).
    pub name: String,
    /// Evaluated at all (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Which events count.
    #[serde(rename = "match")]
    pub matcher: Match,
    /// The payload field naming what is watched (`agent_id`; a dotted path
    /// such as `tags.team` reaches into objects). Events without it do not
    /// count.
    pub subject: String,
    pub condition: Condition,
    pub action: Action,
    /// `enforce` (default): act when it fires. `dry_run`: publish only
    /// `runaway_loop.detected` (and `.resolved`) marked `dry_run`.
    #[serde(default)]
    pub mode: Mode,
    /// Set by the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

fn yes() -> bool {
    true
}

/// Which events a policy counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Event types (`cost.updated`) and prefixes (`agent.*`), as
    /// subscriptions take them; `*` is every type.
    pub types: Vec<String>,
    /// Payload fields (dotted paths) that must equal these values
    /// (strings, numbers or booleans).
    #[serde(default, rename = "where", skip_serializing_if = "BTreeMap::is_empty")]
    pub conditions: BTreeMap<String, serde_json::Value>,
}

/// The measure over a sliding window per subject, and its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// `count` of matching events, or `sum` of a numeric payload field.
    pub measure: Measure,
    /// The field `sum` adds up (`cost_usd`); not for `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The sliding window (`5m`, `1h`), 1 s to 7 days.
    pub window: String,
    /// The policy fires when the measure reaches this (≥), above zero.
    pub threshold: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Count,
    Sum,
}

/// What a firing does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// `pause` (the action sequence and `runaway_loop.paused`), `alert`
    /// (`alert.created`) or `notify` (`notification.requested`).
    pub kind: ActionKind,
    /// No new firing for a subject this long after its last (default
    /// `10m`).
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
    /// A firing subject is resolved once it stays under the threshold
    /// this long (default `1m`).
    #[serde(default = "default_resolve_after")]
    pub resolve_after: String,
    /// Of the alert (`critical`, `high`, `medium`, `low`, `info`; default
    /// `high`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

fn default_cooldown() -> String {
    "10m".into()
}

fn default_resolve_after() -> String {
    "1m".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Alert,
    Pause,
    Notify,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Alert => "alert",
            ActionKind::Pause => "pause",
            ActionKind::Notify => "notify",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::DryRun => "dry_run",
        }
    }
}

const SEVERITIES: [&str; 5] = ["critical", "high", "medium", "low", "info"];

/// A policy checked and ready for the evaluator.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub policy: Policy,
    pub filter: TypeFilter,
    pub conditions: Vec<(Path, serde_json::Value)>,
    pub subject: Path,
    pub measure: Measure,
    pub field: Option<Path>,
    pub window: Duration,
    pub threshold: f64,
    pub cooldown: Duration,
    pub resolve_after: Duration,
    pub severity: String,
}

/// A dotted payload path, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<String>);

impl Path {
    pub(crate) fn parse(field: &str, text: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::invalid(format!("{field}: {text:?} {why}"));
        if text.is_empty() || text.len() > MAX_PATH {
            return Err(bad(&format!(
                "is not a payload field (1 to {MAX_PATH} characters, like agent_id or tags.team)"
            )));
        }
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(bad(
                "is not a payload field: words of letters, digits, _ and - joined by dots (agent_id, tags.team)",
            ));
        }
        Ok(Self(parts))
    }

    pub fn text(&self) -> String {
        self.0.join(".")
    }

    /// The value at the rest of this path (after its first word) under
    /// `top`, the value of that first word.
    pub fn get_under<'a>(&self, top: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        self.0.iter().skip(1).try_fold(top, |v, key| v.get(key))
    }

    /// A top-level field: one word.
    pub fn is_top(&self) -> bool {
        self.0.len() == 1
    }

    /// Its first word: the top-level payload field it starts from.
    pub fn first(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }
}

/// Reads a policy from JSON: unknown fields and values of the wrong type
/// are refused naming their path (`condition.threshold`), then
/// [`check`] names any rule broken.
pub fn read(body: &[u8]) -> Result<Policy, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let policy: Policy = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = inner.to_string();
        // serde_json appends " at line L column C": keep the message
        // short and about the field.
        let what = what.split(" at line ").next().unwrap_or(&what).to_string();
        if path == "." || path.is_empty() {
            ApiError::invalid(format!("policy: {what}"))
        } else {
            ApiError::invalid(format!("{path}: {what}"))
        }
    })?;
    Ok(policy)
}

/// `text` as a duration between `min` and `max`, named `field`.
fn duration(field: &str, text: &str, min: Duration, max: Duration) -> Result<Duration, ApiError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        ApiError::invalid(format!(
            "{field}: {text:?} is not a duration like 30s, 5m or 1h ({e})"
        ))
    })?;
    if d < min || d > max {
        return Err(ApiError::invalid(format!(
            "{field}: {text:?} is out of range ({} to {})",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )));
    }
    Ok(d)
}

/// Checks every rule of a policy read by [`read`], naming the field that
/// breaks one, and compiles it.
pub fn check(policy: Policy) -> Result<Compiled, ApiError> {
    check_id(&policy.id)?;
    let name = policy.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(ApiError::invalid(format!(
            "name: 1 to {MAX_NAME} characters"
        )));
    }
    let types = &policy.matcher.types;
    if types.is_empty() || types.len() > MAX_TYPES {
        return Err(ApiError::invalid(format!(
            "match.types: 1 to {MAX_TYPES} event types or prefixes (cost.updated, agent.*)"
        )));
    }
    let filter = TypeFilter::parse(types).map_err(|e| ApiError::invalid(format!("match.{e}")))?;
    if policy.matcher.conditions.len() > MAX_WHERE {
        return Err(ApiError::invalid(format!(
            "match.where: at most {MAX_WHERE} fields"
        )));
    }
    let mut conditions = Vec::new();
    for (key, value) in &policy.matcher.conditions {
        let field = format!("match.where.{key}");
        let path = Path::parse(&field, key)?;
        if !(value.is_string() || value.is_number() || value.is_boolean()) {
            return Err(ApiError::invalid(format!(
                "{field}: must equal a string, a number or a boolean"
            )));
        }
        conditions.push((path, value.clone()));
    }
    let subject = Path::parse("subject", &policy.subject)?;
    let c = &policy.condition;
    let field = match (c.measure, &c.field) {
        (Measure::Sum, Some(f)) => Some(Path::parse("condition.field", f)?),
        (Measure::Sum, None) => {
            return Err(ApiError::invalid(
                "condition.field: sum needs the numeric payload field it adds up (cost_usd)",
            ));
        }
        (Measure::Count, Some(_)) => {
            return Err(ApiError::invalid(
                "condition.field: count counts events and takes no field (use measure sum)",
            ));
        }
        (Measure::Count, None) => None,
    };
    let window = duration("condition.window", &c.window, MIN_WINDOW, MAX_WINDOW)?;
    if !c.threshold.is_finite() || c.threshold <= 0.0 {
        return Err(ApiError::invalid(format!(
            "condition.threshold: {} is not a number above zero",
            c.threshold
        )));
    }
    let a = &policy.action;
    let cooldown = duration("action.cooldown", &a.cooldown, Duration::ZERO, MAX_DELAY)?;
    let resolve_after = duration(
        "action.resolve_after",
        &a.resolve_after,
        Duration::ZERO,
        MAX_DELAY,
    )?;
    let severity = match (&a.severity, a.kind) {
        (None, _) => "high".to_string(),
        (Some(s), ActionKind::Alert) if SEVERITIES.contains(&s.as_str()) => s.clone(),
        (Some(s), ActionKind::Alert) => {
            return Err(ApiError::invalid(format!(
                "action.severity: {s:?} is not one of {}",
                SEVERITIES.join(", ")
            )));
        }
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "action.severity: only an alert has a severity",
            ));
        }
    };
    Ok(Compiled {
        filter,
        conditions,
        subject,
        measure: c.measure,
        field,
        window,
        threshold: c.threshold,
        cooldown,
        resolve_after,
        severity,
        policy,
    })
}

/// A policy id: letters, digits, `-` and `_`, 1 to [`MAX_ID`].
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        let shown: String = id.chars().take(80).collect();
        return Err(ApiError::invalid(format!(
            "id: {shown:?} is not a policy id (1 to {MAX_ID} letters, digits, - and _)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runaway() -> serde_json::Value {
        serde_json::json!({
            "id": "runaway-agents",
            "name": "Pause agents that loop",
            "match": {"types": ["agent.*", "cost.updated"], "where": {"workflow_id": "nightly"}},
            "subject": "agent_id",
            "condition": {"measure": "count", "window": "5m", "threshold": 50},
            "action": {"kind": "pause", "cooldown": "15m", "resolve_after": "2m"},
        })
    }

    fn compile(v: &serde_json::Value) -> Result<Compiled, String> {
        read(v.to_string().as_bytes())
            .and_then(check)
            .map_err(|e| e.message)
    }

    #[test]
    fn a_good_policy_compiles_with_its_defaults() {
        let c = compile(&runaway()).unwrap();
        assert!(c.policy.enabled);
        assert_eq!(c.policy.mode, Mode::Enforce);
        assert_eq!(c.window, Duration::from_secs(300));
        assert_eq!(c.cooldown, Duration::from_secs(900));
        assert_eq!(c.resolve_after, Duration::from_secs(120));
        assert!(c.filter.matches("agent.error") && !c.filter.matches("alert.created"));
        assert_eq!(c.conditions[0].0.text(), "workflow_id");
        // Written back the same way (where in order, no empty fields).
        let back = serde_json::to_value(&c.policy).unwrap();
        assert_eq!(
            back["match"]["where"],
            serde_json::json!({"workflow_id": "nightly"})
        );
        assert!(back.get("created_at").is_none());
    }

    #[test]
    fn bad_policies_are_refused_naming_the_field() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "/surprise",
                serde_json::json!(1),
                "unknown field `surprise`",
            ),
            (
                "/condition/extra",
                serde_json::json!(1),
                "condition.extra: unknown field `extra`",
            ),
            (
                "/condition/window",
                serde_json::json!("-5m"),
                "condition.window",
            ),
            (
                "/condition/window",
                serde_json::json!("0s"),
                "condition.window",
            ),
            (
                "/condition/threshold",
                serde_json::json!("fifty"),
                "condition.threshold: invalid type",
            ),
            (
                "/condition/threshold",
                serde_json::json!(-1),
                "condition.threshold",
            ),
            (
                "/condition/measure",
                serde_json::json!("avg"),
                "condition.measure",
            ),
            (
                "/match/types",
                serde_json::json!(["Agent.*"]),
                "match.types[0]",
            ),
            ("/match/types", serde_json::json!([]), "match.types"),
            (
                "/match/where",
                serde_json::json!({"a..b": 1}),
                "match.where.a..b",
            ),
            (
                "/match/where",
                serde_json::json!({"x": [1]}),
                "match.where.x",
            ),
            ("/subject", serde_json::json!(""), "subject"),
            ("/action/kind", serde_json::json!("explode"), "action.kind"),
            (
                "/action/cooldown",
                serde_json::json!("soon"),
                "action.cooldown",
            ),
            (
                "/action/severity",
                serde_json::json!("high"),
                "action.severity: only an alert",
            ),
            ("/id", serde_json::json!("no spaces"), "id:"),
            ("/name", serde_json::json!(""), "name:"),
            ("/mode", serde_json::json!("maybe"), "mode"),
        ];
        for (pointer, value, expected) in cases {
            let mut p = runaway();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            p.pointer_mut(if parent.is_empty() { "" } else { parent })
                .unwrap()
                .as_object_mut()
                .unwrap()
                .insert(key.to_string(), value.clone());
            let message = compile(&p).expect_err(pointer);
            assert!(
                message.contains(expected),
                "{pointer} = {value}: {message:?} does not name {expected:?}"
            );
        }
        // Sum needs a field; count refuses one.
        let mut p = runaway();
        p["condition"] = serde_json::json!({"measure": "sum", "window": "1h", "threshold": 100});
        assert!(compile(&p).unwrap_err().contains("condition.field"));
        p["condition"]["field"] = "cost_usd".into();
        assert!(compile(&p).is_ok());
        p["condition"]["measure"] = "count".into();
        assert!(compile(&p).unwrap_err().contains("condition.field"));
    }

    #[test]
    fn paths_reach_into_objects() {
        let p = Path::parse("subject", "tags.team").unwrap();
        let data = serde_json::json!({"tags": {"team": "ml"}});
        let at = |data: &serde_json::Value| {
            crate::policy::eval::Payload::of(data)
                .at(&p)
                .map(|f| f.to_json())
        };
        assert_eq!(at(&data), Some(serde_json::json!("ml")));
        assert_eq!(at(&serde_json::json!({"tags": 1})), None);
        assert_eq!(at(&serde_json::json!({"team": "ml"})), None);
    }
}
