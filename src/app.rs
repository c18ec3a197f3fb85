//! The one door: every surface (gRPC, REST, Socket.IO) authenticates,
//! checks scopes, picks the tenant and parses type filters and resume ids
//! here, and nothing else does. Transports only translate their wire
//! formats to these calls and render the result, or the [`ApiError`], in
//! their dialect.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::auth::rbac::{
    AGENT_READ, AI_READ, ALERT_READ, COST_READ, ENFORCEMENT_READ, ENFORCEMENT_WRITE, GPU_READ,
    INTEGRATION_READ, INTEGRATION_WRITE, PUBLISH, RECOMMENDATION_WRITE, SETTINGS_READ,
    SETTINGS_WRITE, SUBSCRIBE, WORKLOAD_READ,
};
use crate::auth::{AuthError, Authenticator, Identity, TokenKind};
use crate::broker::{Broker, Outcome, Page, Subscription, TypeFilter};
use crate::clock;
use crate::config::parse::positive;
use crate::error::{ApiError, Code};
use crate::event::{self, EventDraft, EventError, Stamp, check_identifier};
use crate::policy::spec::Policy;
use crate::policy::{Policies, Simulation};
use crate::presence::{Presence, Reason};
use crate::projection::{
    AgentCosts, Alert, Connection, CostSummary, Fleet, FleetFilter, Projections, Recommendation,
    SummaryQuery, WorkloadCosts,
};
use crate::state::State;
use crate::tenant::TenantScope;
use crate::tenant_settings::{self, McpTenantSettings};
use crate::webhook::Webhooks;

/// Header (gRPC metadata key) with which a caller picks one of its
/// tenants: a Cognito user's `activeTenantId`, or the tenant an
/// all-tenants service token acts for.
pub const ACTIVE_TENANT_HEADER: &str = "x-active-tenant-id";

/// Request-size limits shared by every publishing surface: flags and
/// `TC_*` variables of `serve`, defaults written once, here.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Largest event `data`, in bytes of JSON text.
    #[arg(long, env = "TC_MAX_EVENT_BYTES", default_value_t = 65_536, value_parser = positive)]
    pub max_event_bytes: usize,

    /// Most events in one publish call.
    #[arg(long, env = "TC_MAX_BATCH", default_value_t = 256, value_parser = positive)]
    pub max_batch: usize,
}

impl Limits {
    /// Largest request body a publish may need: a full batch of full events
    /// plus room for the envelope fields.
    pub fn max_request_bytes(&self) -> usize {
        self.max_batch.max(1) * (self.max_event_bytes + 1024) + 64 * 1024
    }

    /// Refuses an empty batch or one larger than the limit.
    fn check_batch(&self, len: usize) -> Result<(), EventError> {
        if len == 0 {
            return Err(EventError::BatchEmpty);
        }
        if len > self.max_batch {
            return Err(EventError::BatchTooLarge {
                len,
                limit: self.max_batch,
            });
        }
        Ok(())
    }
}

/// The broker with its front door. Cheap to clone.
#[derive(Clone)]
pub struct App {
    broker: Broker,
    auth: Arc<Authenticator>,
    limits: Limits,
    webhooks: Option<Webhooks>,
    policies: Option<Policies>,
    projections: Projections,
    /// Kept state (per-tenant settings).
    state: Option<State>,
    /// Agents with a gRPC stream open here.
    presence: Presence,
    /// Rate-limit overrides and Cognito memberships (scope `admin`).
    admin: Option<crate::admin::Admin>,
    /// Each tenant's MCP `enabled`, read at most once a second.
    mcp_enabled: tenant_settings::EnabledCache,
    /// Publish spans (OTLP), when export is on.
    tracer: crate::otlp::Tracer,
}

/// What `recommendations.accept` did.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Accepted {
    pub recommendation_id: String,
    /// The `recommendation.accepted` event published.
    pub event_id: String,
}

/// `policies.simulate` parameters, as any surface receives them.
#[derive(Debug, Clone, Default)]
pub struct SimulateParams {
    /// A policy document (not stored), or
    pub policy: Option<serde_json::Value>,
    /// the id of a stored one.
    pub policy_id: Option<String>,
    /// How far back from `until` (`24h`, `90m`); none: 24 hours; at most
    /// 7 days (and only what history holds).
    pub window: Option<String>,
    /// RFC 3339 end; none: now.
    pub until: Option<String>,
}

/// What changing a policy did.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct PolicyWritten {
    pub policy: Policy,
    /// It did not exist before.
    pub created: bool,
}

/// Reading or changing a tenant's integrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The caller's tenant, for a service read with either of `(read, write)`
/// and changed with `write`.
fn tenant_service(
    identity: &Identity,
    access: Access,
    (read, write): (&'static str, &'static str),
) -> Result<String, ApiError> {
    match access {
        Access::Read => identity.require_any(&[read, write])?,
        Access::Write => identity.require(write)?,
    }
    Ok(identity.acting_tenant("")?)
}

/// A service this instance may not run (tests build `App` without it).
fn running<'a, T>(service: Option<&'a T>, what: &str) -> Result<&'a T, ApiError> {
    service.ok_or_else(|| {
        ApiError::new(
            Code::Unavailable,
            format!("{what} are not running on this instance"),
        )
    })
}

/// Parameters of a subscription, as any surface receives them.
#[derive(Debug, Clone, Default)]
pub struct SubscribeParams {
    pub types: Vec<String>,
    pub since_id: String,
    pub tenant_id: String,
}

/// Events one [`App::recent_events`] call returns by default, and at most.
pub const RECENT_DEFAULT: usize = 100;
pub const RECENT_MAX: usize = 1000;

/// Which of a tenant's held events to read, as any surface receives it.
#[derive(Debug, Clone, Default)]
pub struct RecentParams {
    /// Type filters (`cost.*`, `alert.created`); none: every type.
    pub types: Vec<String>,
    /// Continue after this event id; none: the newest events.
    pub since: Option<String>,
    /// 1 to [`RECENT_MAX`]; none: [`RECENT_DEFAULT`].
    pub limit: Option<usize>,
}

/// `cost.summary` parameters, as any surface receives them.
#[derive(Debug, Clone, Default)]
pub struct CostParams {
    /// A duration (`7d`, `24h`); none: 7 days. At most 90 days.
    pub window: Option<String>,
    /// RFC 3339 end of the window; none: now.
    pub until: Option<String>,
    /// Only this source (`bedrock`, `aws`, ...).
    pub source: Option<String>,
    /// Sources and tag values listed, 1 to 200; none: 20.
    pub top: Option<usize>,
}

/// `alerts.recent` parameters.
#[derive(Debug, Clone, Default)]
pub struct AlertParams {
    /// `open`, `escalated`, `suppressed`, `resolved`; none: all.
    pub states: Vec<String>,
    /// `critical`, `high`, `medium`, `low`, `info`; none: all.
    pub severities: Vec<String>,
    /// 1 to 500; none: 50.
    pub limit: Option<usize>,
}

const ALERT_STATES: [&str; 4] = ["open", "escalated", "suppressed", "resolved"];
const SEVERITIES: [&str; 5] = ["critical", "high", "medium", "low", "info"];

/// What a Socket.IO client sends with its handshake (`auth`).
#[derive(Debug, Clone, Default)]
pub struct SocketParams {
    pub token: Option<String>,
    /// `activeTenantId`: which of a user's tenants.
    pub active_tenant: Option<String>,
    /// Type filters (`cost.*`, `alert.created`); none: everything.
    pub types: Option<Vec<String>>,
    /// `lastEventId`: recover what was missed after it.
    pub last_event_id: Option<String>,
}

/// A verified Socket.IO session: who, which tenant, what it follows.
#[derive(Debug, Clone)]
pub struct SocketSession {
    pub tenant: String,
    pub subject: Option<String>,
    pub kind: TokenKind,
    /// The token's `exp`, Unix seconds.
    pub expires_at: u64,
    pub filter: TypeFilter,
    pub last_event_id: Option<String>,
}

impl App {
    pub fn new(broker: Broker, auth: Arc<Authenticator>, limits: Limits) -> Self {
        Self {
            broker,
            auth,
            limits,
            webhooks: None,
            policies: None,
            projections: Projections::default(),
            state: None,
            presence: Presence::default(),
            admin: None,
            mcp_enabled: tenant_settings::EnabledCache::default(),
            tracer: crate::otlp::Tracer::off(),
        }
    }

    /// A gRPC stream (`stream`: `subscribe` or `publish`) of `identity`
    /// opened. For an agent (a token with `agent_id`) this is its presence
    /// on the stream: `agent.connected` when it is the agent's first
    /// stream here, and when the last is dropped `agent.disconnected` with
    /// the reason recorded by [`AgentStream::ended`]. `None` for ordinary
    /// callers.
    pub fn agent_stream(
        &self,
        identity: &Identity,
        stream: &'static str,
    ) -> Option<Arc<AgentStream>> {
        let agent = identity.agent_id.clone()?;
        let tenant = identity.tenant.clone()?;
        self.presence
            .opened(&tenant, &agent, SystemTime::now(), || {
                self.announce(
                    identity,
                    "agent.connected",
                    serde_json::json!({
                        "agent_id": agent,
                        "transport": "grpc",
                        "stream": stream,
                        "instance": self.presence.instance(),
                    }),
                );
            });
        Some(Arc::new(AgentStream {
            app: self.clone(),
            identity: identity.clone(),
            tenant,
            agent,
            reason: Mutex::new(None),
        }))
    }

    /// Publishes an event the broker says about a caller (its id minted
    /// here, so past the dedupe window), whatever the caller's scopes.
    fn announce(&self, identity: &Identity, event_type: &str, data: serde_json::Value) {
        let draft = EventDraft {
            event_type: event_type.into(),
            data: data.to_string(),
            ..EventDraft::default()
        };
        match accept(identity, draft, &self.stamp(None), SystemTime::now()) {
            Ok(event) => self.broker.publish_minted(event),
            Err(e) => tracing::warn!(event_type, "not announced: {}", e.message),
        }
    }

    /// The state store per-tenant settings are kept in.
    pub fn with_state(mut self, state: State) -> Self {
        self.state = Some(state);
        self
    }

    pub fn with_tracer(mut self, tracer: crate::otlp::Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Spans of deliveries (OTLP), when export is on.
    pub fn tracer(&self) -> &crate::otlp::Tracer {
        &self.tracer
    }

    /// Dispatches accepted events, with their publish spans.
    fn dispatch(&self, events: Vec<event::Event>, stamp: &Stamp, now: SystemTime) -> Vec<Outcome> {
        if !self.tracer.is_on() {
            return self.broker.publish(events);
        }
        let spans = self.tracer.publishing(&events, stamp.parent(), now);
        let outcomes = self.broker.publish(events);
        self.tracer.published(spans, |i| outcomes[i].duplicate);
        outcomes
    }

    fn dispatch_one(&self, event: event::Event, stamp: &Stamp, now: SystemTime) -> Outcome {
        if !self.tracer.is_on() {
            return self.broker.publish_one(event);
        }
        let spans = self.tracer.publishing([&event], stamp.parent(), now);
        let outcome = self.broker.publish_one(event);
        self.tracer.published(spans, |_| outcome.duplicate);
        outcome
    }

    fn state(&self) -> Result<&State, ApiError> {
        self.state.as_ref().ok_or_else(|| {
            ApiError::new(Code::Unavailable, "settings are not kept on this instance")
        })
    }

    /// The caller's tenant's MCP settings (`settings:read` or `:write`).
    pub async fn mcp_settings(&self, identity: &Identity) -> Result<McpTenantSettings, ApiError> {
        identity.require_any(&[SETTINGS_READ, SETTINGS_WRITE])?;
        let tenant = identity.acting_tenant("")?;
        tenant_settings::mcp(self.state()?, &tenant).await
    }

    /// Replaces the caller's tenant's MCP settings (`settings:write`).
    pub async fn set_mcp_settings(
        &self,
        identity: &Identity,
        settings: McpTenantSettings,
    ) -> Result<McpTenantSettings, ApiError> {
        identity.require(SETTINGS_WRITE)?;
        let tenant = identity.acting_tenant("")?;
        tenant_settings::set_mcp(self.state()?, &tenant, &settings).await?;
        self.mcp_enabled.forget(&tenant);
        Ok(settings)
    }

    /// Refuses every MCP tool of a tenant whose MCP settings say
    /// `enabled: false`.
    pub async fn mcp_open(&self, identity: &Identity) -> Result<(), ApiError> {
        let tenant = identity.acting_tenant("")?;
        if self.mcp_enabled.enabled(self.state()?, &tenant).await? {
            Ok(())
        } else {
            Err(ApiError::new(
                Code::PermissionDenied,
                "MCP is disabled for this tenant (settings: enabled, PUT /v1/settings/mcp)",
            ))
        }
    }

    /// Marks an open recommendation accepted by publishing
    /// `recommendation.accepted` through the normal publish path. Needs
    /// `recommendation:write`, the tenant's `write_tools_enabled` and its
    /// grant of `recommendations.accept`; the refusal names what is
    /// missing.
    pub async fn accept_recommendation(
        &self,
        identity: &Identity,
        recommendation_id: &str,
    ) -> Result<Accepted, ApiError> {
        const TOOL: &str = "recommendations.accept";
        identity.require(RECOMMENDATION_WRITE)?;
        let tenant = identity.acting_tenant("")?;
        let settings = tenant_settings::mcp(self.state()?, &tenant).await?;
        if let Some(why) = settings.refuses_write(TOOL) {
            return Err(ApiError::new(Code::PermissionDenied, why));
        }
        match self.projections.recommendation(&tenant, recommendation_id) {
            Some(r) if r.state == "open" => {}
            Some(r) => {
                return Err(ApiError::invalid(format!(
                    "recommendation_id: {recommendation_id} is already {}",
                    r.state
                )));
            }
            None => {
                return Err(ApiError::new(
                    Code::NotFound,
                    format!(
                        "recommendation_id: no recommendation {recommendation_id:?} for this tenant"
                    ),
                ));
            }
        }
        let data = serde_json::json!({
            "recommendation_id": recommendation_id,
            "accepted_by": identity.subject.as_deref().unwrap_or("mcp"),
            "via": "mcp",
        });
        let draft = EventDraft {
            event_type: "recommendation.accepted".into(),
            data: data.to_string(),
            ..EventDraft::default()
        };
        let event = accept(identity, draft, &self.stamp(None), SystemTime::now())?;
        let outcome = self.broker.publish_one(event);
        Ok(Accepted {
            recommendation_id: recommendation_id.to_string(),
            event_id: outcome.id,
        })
    }

    /// This instance's presence (its id names the instance in the events
    /// it publishes).
    pub fn with_presence(mut self, presence: Presence) -> Self {
        self.presence = presence;
        self
    }

    pub fn with_admin(mut self, admin: crate::admin::Admin) -> Self {
        self.admin = Some(admin);
        self
    }

    fn admin(&self, identity: &Identity) -> Result<&crate::admin::Admin, ApiError> {
        crate::admin::authorize(identity)?;
        running(self.admin.as_ref(), "admin settings")
    }

    /// A tenant's emit rate limit and its source (scope `admin`).
    pub fn admin_rate_limit(
        &self,
        identity: &Identity,
        tenant: &str,
    ) -> Result<crate::admin::RateLimit, ApiError> {
        self.admin(identity)?.rate_limit(tenant)
    }

    /// Sets or (`None`) removes a tenant's rate-limit override (scope
    /// `admin`).
    pub async fn admin_set_rate_limit(
        &self,
        identity: &Identity,
        tenant: &str,
        events_per_second: Option<u32>,
    ) -> Result<crate::admin::RateLimit, ApiError> {
        self.admin(identity)?
            .set_rate_limit(tenant, events_per_second)
            .await
    }

    /// A Cognito user's tenants (scope `admin`).
    pub async fn admin_membership(
        &self,
        identity: &Identity,
        cognito_sub: &str,
    ) -> Result<crate::admin::Membership, ApiError> {
        self.admin(identity)?.membership(cognito_sub).await
    }

    /// Replaces or (`None`) removes a Cognito user's tenants (scope
    /// `admin`).
    pub async fn admin_set_membership(
        &self,
        identity: &Identity,
        cognito_sub: &str,
        tenants: Option<Vec<String>>,
    ) -> Result<Option<crate::admin::Membership>, ApiError> {
        self.admin(identity)?
            .set_membership(cognito_sub, tenants)
            .await
    }

    /// The policy service the policy surfaces reach.
    pub fn with_policies(mut self, policies: Policies) -> Self {
        self.policies = Some(policies);
        self
    }

    /// The policy service for `identity`'s tenant: `enforcement:read` (or
    /// `:write`) to read and simulate, `enforcement:write` to change.
    fn policies(
        &self,
        identity: &Identity,
        access: Access,
    ) -> Result<(String, &Policies), ApiError> {
        let scopes = (ENFORCEMENT_READ, ENFORCEMENT_WRITE);
        let tenant = tenant_service(identity, access, scopes)?;
        Ok((tenant, running(self.policies.as_ref(), "policies")?))
    }

    /// The caller's tenant's policies.
    pub async fn list_policies(&self, identity: &Identity) -> Result<Vec<Policy>, ApiError> {
        let (tenant, policies) = self.policies(identity, Access::Read)?;
        policies.list(&tenant).await
    }

    /// One of the caller's tenant's policies (another tenant's is not found).
    pub async fn get_policy(&self, identity: &Identity, id: &str) -> Result<Policy, ApiError> {
        let (tenant, policies) = self.policies(identity, Access::Read)?;
        policies.get(&tenant, id).await
    }

    /// Creates or replaces a policy from its JSON document; `path_id` is
    /// the id a REST path names (the document may leave its id out, or
    /// must say the same).
    pub async fn put_policy(
        &self,
        identity: &Identity,
        path_id: Option<&str>,
        document: &[u8],
    ) -> Result<PolicyWritten, ApiError> {
        let (tenant, policies) = self.policies(identity, Access::Write)?;
        let policy = read_policy(path_id, document)?;
        let (policy, created) = policies.put(&tenant, policy).await?;
        Ok(PolicyWritten { policy, created })
    }

    /// `policies.create` over MCP: [`App::put_policy`], and a write tool:
    /// the tenant's `write_tools_enabled` and its grant of the tool too.
    pub async fn create_policy_tool(
        &self,
        identity: &Identity,
        document: &serde_json::Value,
    ) -> Result<PolicyWritten, ApiError> {
        const TOOL: &str = "policies.create";
        identity.require(ENFORCEMENT_WRITE)?;
        let tenant = identity.acting_tenant("")?;
        let settings = tenant_settings::mcp(self.state()?, &tenant).await?;
        if let Some(why) = settings.refuses_write(TOOL) {
            return Err(ApiError::new(Code::PermissionDenied, why));
        }
        self.put_policy(identity, None, document.to_string().as_bytes())
            .await
    }

    pub async fn delete_policy(&self, identity: &Identity, id: &str) -> Result<(), ApiError> {
        let (tenant, policies) = self.policies(identity, Access::Write)?;
        policies.delete(&tenant, id).await
    }

    /// Runs a policy (a document, or a stored one by id) over the caller's
    /// tenant's history with the live evaluator; publishes nothing.
    pub async fn simulate_policy(
        &self,
        identity: &Identity,
        params: &SimulateParams,
    ) -> Result<Simulation, ApiError> {
        let (tenant, policies) = self.policies(identity, Access::Read)?;
        let policy = match (&params.policy, params.policy_id.as_deref()) {
            (Some(document), None) => read_policy(None, document.to_string().as_bytes())?,
            (None, Some(id)) => policies.get(&tenant, id).await?,
            _ => {
                return Err(ApiError::invalid(
                    "give either policy (a policy document) or policy_id (a stored policy)",
                ));
            }
        };
        let window = match params.window.as_deref().map(str::trim) {
            None | Some("") => Duration::from_secs(24 * 3600),
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                ApiError::invalid(format!(
                    "window: {text:?} is not a duration like 24h or 90m ({e})"
                ))
            })?,
        };
        if window.is_zero() || window > crate::policy::spec::MAX_WINDOW {
            return Err(ApiError::invalid(
                "window: out of range (up to 7d, and only what history holds)",
            ));
        }
        let until = match params.until.as_deref().map(str::trim) {
            None | Some("") => SystemTime::now(),
            Some(text) => clock::parse_timestamp(text).ok_or_else(|| {
                ApiError::invalid(format!(
                    "until: {text:?} is not an RFC 3339 time like 2026-11-28T12:00:00Z"
                ))
            })?,
        };
        let from = until.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        policies.simulate(&tenant, policy, from, until)
    }

    /// The read models the MCP tools answer from.
    pub fn with_projections(mut self, projections: Projections) -> Self {
        self.projections = projections;
        self
    }

    /// The webhook service the REST surface reaches through [`App::webhooks`].
    pub fn with_webhooks(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// The webhook service for `identity`'s tenant: `integration:read`
    /// (or `:write`) to read, `integration:write` to change. Another
    /// tenant's endpoints are simply not found by it.
    pub fn webhooks(
        &self,
        identity: &Identity,
        access: Access,
    ) -> Result<(String, &Webhooks), ApiError> {
        let scopes = (INTEGRATION_READ, INTEGRATION_WRITE);
        let tenant = tenant_service(identity, access, scopes)?;
        Ok((tenant, running(self.webhooks.as_ref(), "webhooks")?))
    }

    /// Verifies an `authorization` header value; `active_tenant` is the
    /// `x-active-tenant-id` header (a Cognito user's choice of tenant).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        active_tenant: Option<&str>,
    ) -> Result<Identity, ApiError> {
        Ok(self
            .auth
            .verify_header(authorization, active_tenant)
            .await?)
    }

    /// Largest request a publish may need (gRPC message, REST body).
    pub fn max_request_bytes(&self) -> usize {
        self.limits.max_request_bytes()
    }

    /// Live subscriptions, for readiness.
    pub fn subscriber_count(&self) -> usize {
        self.broker.subscriber_count()
    }

    /// Publish-wide context: limits and the caller's `traceparent`.
    pub fn stamp(&self, traceparent: Option<&str>) -> Stamp {
        let parent = traceparent.and_then(event::parse_traceparent);
        Stamp {
            max_data_bytes: self.limits.max_event_bytes,
            parent_span_id: parent.as_ref().map(|p| p.parent_id),
            trace_id: parent.map(|p| p.trace_id),
        }
    }

    /// Publishes a batch: every event is checked first, and one bad event
    /// refuses the whole batch (its message names the event's index), so
    /// nothing is half accepted.
    pub fn publish(
        &self,
        identity: &Identity,
        drafts: Vec<EventDraft>,
        stamp: &Stamp,
    ) -> Result<Vec<Outcome>, ApiError> {
        identity.require(PUBLISH)?;
        self.limits.check_batch(drafts.len())?;
        let now = SystemTime::now();
        let events = drafts
            .into_iter()
            .enumerate()
            .map(|(i, draft)| accept(identity, draft, stamp, now).map_err(|e| e.at_index(i)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.dispatch(events, stamp, now))
    }

    /// Publishes each event of a batch on its own (streaming publish): a
    /// bad event is refused alone. The batch itself may still be refused
    /// (empty, or over the limit).
    pub fn publish_each(
        &self,
        identity: &Identity,
        drafts: Vec<EventDraft>,
        stamp: &Stamp,
    ) -> Result<Vec<Result<Outcome, ApiError>>, ApiError> {
        self.limits.check_batch(drafts.len())?;
        if let Err(denied) = identity.require(PUBLISH) {
            let error = ApiError::from(denied);
            return Ok(drafts.iter().map(|_| Err(error.clone())).collect());
        }
        let now = SystemTime::now();
        Ok(drafts
            .into_iter()
            .map(|draft| {
                accept(identity, draft, stamp, now).map(|e| self.dispatch_one(e, stamp, now))
            })
            .collect())
    }

    /// Publishes one event (streaming publish acknowledges each on its own).
    pub fn publish_one(
        &self,
        identity: &Identity,
        draft: EventDraft,
        stamp: &Stamp,
    ) -> Result<Outcome, ApiError> {
        identity.require(PUBLISH)?;
        let now = SystemTime::now();
        let event = accept(identity, draft, stamp, now)?;
        Ok(self.dispatch_one(event, stamp, now))
    }

    /// Opens a subscription for `identity`; it ends when the token expires.
    pub fn subscribe(
        &self,
        identity: &Identity,
        params: &SubscribeParams,
    ) -> Result<(TenantScope, Subscription), ApiError> {
        let scope = identity.subscribe_scope(&params.tenant_id)?;
        let filter = TypeFilter::parse(&params.types)?;
        let since = resume_id("since_id", Some(params.since_id.as_str()))?;
        if since.is_some() && scope == TenantScope::All {
            return Err(ApiError::invalid(
                "since_id: resuming needs one tenant: set tenant_id (history is kept per tenant)",
            ));
        }
        let subscription = self
            .broker
            .subscribe(scope.clone(), filter, since.as_deref())?
            .with_deadline(clock::instant_at(identity.valid_until()));
        Ok((scope, subscription))
    }

    /// A page of the caller's tenant's held events (history), oldest
    /// first: the newest `limit`, or the first `limit` after `since`.
    /// Reading needs the subscribe scope, as following does.
    pub fn recent_events(
        &self,
        identity: &Identity,
        params: &RecentParams,
    ) -> Result<Page, ApiError> {
        identity.require(SUBSCRIBE)?;
        let tenant = identity.acting_tenant("")?;
        let filter = TypeFilter::parse(&params.types)?;
        let since = resume_id("since", params.since.as_deref())?;
        let limit = in_range("limit", params.limit, RECENT_DEFAULT, RECENT_MAX)?;
        Ok(self
            .broker
            .history_page(&tenant, since.as_deref(), &filter, limit))
    }

    /// The caller's tenant's costs over a window (`cost:read`).
    pub fn cost_summary(
        &self,
        identity: &Identity,
        params: &CostParams,
    ) -> Result<CostSummary, ApiError> {
        identity.require(COST_READ)?;
        let tenant = identity.acting_tenant("")?;
        let query = cost_query(params)?;
        Ok(self.projections.cost_summary(&tenant, &query))
    }

    /// The caller's tenant's costs by `application`, `team` and
    /// `environment` tag (`workload:read`).
    pub fn workload_costs(
        &self,
        identity: &Identity,
        params: &CostParams,
    ) -> Result<WorkloadCosts, ApiError> {
        identity.require(WORKLOAD_READ)?;
        let tenant = identity.acting_tenant("")?;
        let query = cost_query(params)?;
        Ok(self.projections.workload_costs(&tenant, &query))
    }

    /// The caller's tenant's costs by agent and workflow, or of one agent
    /// (`agent:read`).
    pub fn agent_costs(
        &self,
        identity: &Identity,
        params: &CostParams,
        agent: Option<&str>,
    ) -> Result<AgentCosts, ApiError> {
        identity.require(AGENT_READ)?;
        let tenant = identity.acting_tenant("")?;
        let query = cost_query(params)?;
        Ok(self
            .projections
            .agent_costs(&tenant, &query, agent.filter(|a| !a.is_empty())))
    }

    /// The caller's tenant's alerts as they stand, most recently changed
    /// first (`alert:read`).
    pub fn recent_alerts(
        &self,
        identity: &Identity,
        params: &AlertParams,
    ) -> Result<Vec<Alert>, ApiError> {
        identity.require(ALERT_READ)?;
        let tenant = identity.acting_tenant("")?;
        one_of("state", &params.states, &ALERT_STATES)?;
        one_of("severity", &params.severities, &SEVERITIES)?;
        let limit = in_range("limit", params.limit, 50, 500)?;
        Ok(self
            .projections
            .alerts(&tenant, &params.states, &params.severities, limit))
    }

    /// The caller's tenant's open managed-inference recommendations,
    /// largest estimated savings first (`ai:read`).
    pub fn inference_recommendations(
        &self,
        identity: &Identity,
        provider: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<Recommendation>, ApiError> {
        identity.require(AI_READ)?;
        let tenant = identity.acting_tenant("")?;
        let limit = in_range("limit", limit, 20, 200)?;
        Ok(self.projections.open_recommendations(
            &tenant,
            Some("inference"),
            provider.filter(|p| !p.is_empty()),
            limit,
        ))
    }

    /// The caller's tenant's GPU fleet (`gpu:read`): `limit` listed, 1 to
    /// 1,000, default 100.
    pub fn fleet(
        &self,
        identity: &Identity,
        mut filter: FleetFilter,
        limit: Option<usize>,
    ) -> Result<Fleet, ApiError> {
        identity.require(GPU_READ)?;
        let tenant = identity.acting_tenant("")?;
        filter.limit = in_range("limit", limit, 100, 1000)?;
        for f in [
            &mut filter.provider,
            &mut filter.region,
            &mut filter.gpu_type,
        ] {
            if f.as_deref() == Some("") {
                *f = None;
            }
        }
        Ok(self.projections.fleet(&tenant, &filter))
    }

    /// The caller's tenant's provider connections and their last sync
    /// (`integration:read`).
    pub fn connections_health(&self, identity: &Identity) -> Result<Vec<Connection>, ApiError> {
        identity.require_any(&[INTEGRATION_READ, INTEGRATION_WRITE])?;
        let tenant = identity.acting_tenant("")?;
        Ok(self.projections.connections(&tenant))
    }

    /// Checks a Socket.IO handshake: the token, the subscribe scope, one
    /// tenant, the filters and the resume id. The socket joins nothing
    /// before this says yes.
    pub async fn open_socket(&self, params: SocketParams) -> Result<SocketSession, ApiError> {
        let token = params.token.as_deref().map(str::trim).unwrap_or_default();
        if token.is_empty() {
            return Err(ApiError::new(
                Code::Unauthenticated,
                "auth.token required: connect with io(url, { path: '/ws', auth: { token } })",
            ));
        }
        let identity = self
            .auth
            .verify(token, params.active_tenant.as_deref())
            .await?;
        identity.require(SUBSCRIBE)?;
        let tenant = identity.tenant.clone().ok_or_else(|| {
            ApiError::invalid("activeTenantId required: this token may act for any tenant")
        })?;
        let filter = TypeFilter::parse(params.types.as_deref().unwrap_or_default())
            .map_err(|e| ApiError::invalid(format!("auth.{e}")))?;
        let last_event_id = resume_id(
            "auth.lastEventId",
            params.last_event_id.as_deref().map(str::trim),
        )?;
        Ok(SocketSession {
            tenant,
            subject: identity.subject,
            kind: identity.kind,
            expires_at: identity.expires_at,
            filter,
            last_event_id,
        })
    }

    /// `refresh_token` on an open socket: a fresh token of the same user
    /// for the same tenant. Returns the new `exp`.
    pub async fn refresh_socket(
        &self,
        session: &SocketSession,
        token: &str,
    ) -> Result<u64, ApiError> {
        // The socket's tenant as the active tenant refuses a token of
        // another tenant; the refusal names the socket's tenant as such.
        let identity = self
            .auth
            .verify(token.trim(), Some(&session.tenant))
            .await
            .map_err(|e| match e {
                AuthError::NoMembership { .. } => ApiError::new(
                    Code::PermissionDenied,
                    format!(
                        "this token does not give access to the socket's tenant {}: refresh with a token for it, or reconnect to switch tenants",
                        session.tenant
                    ),
                ),
                e => e.into(),
            })?;
        identity.require(SUBSCRIBE)?;
        if identity.subject != session.subject || identity.kind != session.kind {
            return Err(ApiError::new(
                Code::PermissionDenied,
                "token is for another user: reconnect to switch users",
            ));
        }
        Ok(identity.expires_at)
    }

    /// Parses a type filter sent on an open connection (Socket.IO
    /// `subscribe`).
    pub fn type_filter(&self, types: &[String]) -> Result<TypeFilter, ApiError> {
        Ok(TypeFilter::parse(types)?)
    }
}

/// A policy document; `path_id`, when a path names one, fills its id or
/// must equal it.
fn read_policy(path_id: Option<&str>, document: &[u8]) -> Result<Policy, ApiError> {
    let Some(path_id) = path_id else {
        return crate::policy::spec::read(document);
    };
    crate::policy::spec::check_id(path_id)?;
    let mut value: serde_json::Value = serde_json::from_slice(document)
        .map_err(|e| ApiError::invalid(format!("body: not a policy document: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::invalid("body: a policy is a JSON object"));
    };
    match object.get("id") {
        None => {
            object.insert("id".into(), path_id.into());
        }
        Some(id) if id.as_str() == Some(path_id) => {}
        Some(id) => {
            return Err(ApiError::invalid(format!(
                "id: {id} is not the id the path names ({path_id:?})"
            )));
        }
    }
    crate::policy::spec::read(value.to_string().as_bytes())
}

/// A resume id named `field`: none when absent or blank.
fn resume_id(field: &str, id: Option<&str>) -> Result<Option<String>, ApiError> {
    match id {
        None | Some("") => Ok(None),
        Some(id) => {
            check_identifier(id).map_err(|r| ApiError::invalid(format!("{field}: {r}")))?;
            Ok(Some(id.to_string()))
        }
    }
}

/// Refuses a value not among `allowed`, naming the parameter and the
/// allowed values.
fn one_of(field: &str, values: &[String], allowed: &[&str]) -> Result<(), ApiError> {
    match values.iter().find(|v| !allowed.contains(&v.as_str())) {
        Some(bad) => Err(ApiError::invalid(format!(
            "{field}: {bad:?} is not one of {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `value` within 1 to `max`, or `default` when none.
fn in_range(
    field: &str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "{field}: {n} is out of range (1 to {max})"
        ))),
    }
}

/// A cost window from its parameters: `window` (default 7 days, at most
/// the 90 days kept), `until` (default now), `source`, `top` (1 to 200,
/// default 20). Errors name the parameter.
fn cost_query(params: &CostParams) -> Result<SummaryQuery, ApiError> {
    let max = crate::projection::cost::RETENTION;
    let window = match params.window.as_deref().map(str::trim) {
        None | Some("") => Duration::from_secs(7 * 24 * 3600),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::invalid(format!(
                "window: {text:?} is not a duration like 7d or 24h ({e})"
            ))
        })?,
    };
    if window.is_zero() || window > max {
        return Err(ApiError::invalid(format!(
            "window: {} is out of range (up to 90d, the costs kept)",
            humantime::format_duration(window)
        )));
    }
    let until = match params.until.as_deref().map(str::trim) {
        None | Some("") => SystemTime::now(),
        Some(text) => clock::parse_timestamp(text).ok_or_else(|| {
            ApiError::invalid(format!(
                "until: {text:?} is not an RFC 3339 time like 2026-11-28T12:00:00Z"
            ))
        })?,
    };
    let top = match params.top {
        None => 20,
        Some(n) if (1..=200).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "top: {n} is out of range (1 to 200)"
            )));
        }
    };
    Ok(SummaryQuery {
        window,
        until,
        source: params.source.clone().filter(|s| !s.is_empty()),
        top,
    })
}

/// An agent's open gRPC stream; see [`App::agent_stream`].
pub struct AgentStream {
    app: App,
    identity: Identity,
    tenant: String,
    agent: String,
    reason: Mutex<Option<Reason>>,
}

impl AgentStream {
    /// Records why the stream is ending; the first reason given counts.
    pub fn ended(&self, reason: Reason) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        let recorded = *self.reason.get_mut().unwrap_or_else(|e| e.into_inner());
        let reason = match recorded {
            Some(reason) => reason,
            None if self.app.broker.is_closed() => Reason::Shutdown,
            None => Reason::Closed,
        };
        let app = &self.app;
        app.presence.closed(
            &self.tenant,
            &self.agent,
            SystemTime::now(),
            |since, lasted| {
                app.announce(
                    &self.identity,
                    "agent.disconnected",
                    serde_json::json!({
                        "agent_id": self.agent,
                        "reason": reason.as_str(),
                        "connected_at": clock::format_timestamp(since),
                        "connected_s": lasted.as_secs(),
                        "instance": app.presence.instance(),
                    }),
                );
            },
        );
    }
}

/// Validates and stamps one draft for the tenant the identity acts for.
/// The publish scope is checked by the caller, once per call.
fn accept(
    identity: &Identity,
    draft: EventDraft,
    stamp: &Stamp,
    now: SystemTime,
) -> Result<event::Event, ApiError> {
    let tenant = identity.acting_tenant(&draft.tenant_id)?;
    Ok(event::accept(draft, &tenant, stamp, now)?)
}
