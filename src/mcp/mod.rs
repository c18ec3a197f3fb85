//! The MCP server: the product's tools over the event stream, on
//! Streamable HTTP at `/mcp` of the HTTP listener (rmcp, the official
//! Rust SDK).
//!
//! Every call goes through [`App`] with the caller's own identity: the
//! bearer token of each HTTP request is verified by [`authenticate`]
//! before rmcp reads the body, and the tools take the [`Identity`] it
//! leaves in the request's extensions. A tool that is refused (a missing
//! scope, a bad filter) answers a tool error whose text names what was
//! wrong; only a malformed MCP message is a protocol error.

mod resources;
pub mod stdio;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse,
    ResourceUpdatedNotificationParam, ServerCapabilities, ServerConfig, SubscribeRequestParams,
    SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{RequestContext, RoleServer, SubscriptionContext};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::app::{
    Accepted, AlertParams, App, CostParams, RECENT_DEFAULT, RECENT_MAX, RecentParams,
};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::projection::{
    AgentCosts, Alert, Connection, CostSummary, Fleet, FleetFilter, Recommendation, WorkloadCosts,
};

/// Largest MCP request body (a JSON-RPC message); past it the answer is
/// 413. Read only after the token is verified.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Settings of the MCP server (`serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct McpSettings {
    /// `Host` header values `/mcp` accepts (comma separated, `host` or
    /// `host:port`): a guard against DNS rebinding. Add the names clients
    /// reach the broker by.
    #[arg(
        long,
        env = "TC_MCP_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    pub mcp_allowed_hosts: Vec<String>,
}

/// `/mcp` on the HTTP listener; requests in flight end when `shutdown`
/// fires.
pub fn router(app: App, settings: &McpSettings, shutdown: CancellationToken) -> Router {
    // Stateless: every request stands alone (JSON answers, no session
    // kept between requests), so nothing is held per client and any
    // instance behind a load balancer answers any request.
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Comments on quiet listen streams, so proxies keep them.
        .with_sse_keep_alive(Some(std::time::Duration::from_secs(15)))
        .with_allowed_hosts(settings.mcp_allowed_hosts.iter().cloned())
        .with_max_request_body_bytes(MAX_REQUEST_BYTES)
        .with_cancellation_token(shutdown);
    // The tools and their schemas are built once; each request gets a
    // clone.
    let tools = Tools::new(app.clone());
    let service = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service("/mcp", service)
        .layer(middleware::from_fn_with_state(app, authenticate))
}

/// Verifies the bearer token of every `/mcp` request before anything else
/// reads it: no token or a bad one is 401 with `WWW-Authenticate: Bearer`.
async fn authenticate(State(app): State<App>, mut request: Request, next: Next) -> Response {
    match crate::http::authenticated(&app, request.headers()).await {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

/// The tools and resources; over HTTP a clone per request, over stdio one
/// value for the connection.
#[derive(Clone)]
pub struct Tools {
    app: App,
    tool_router: ToolRouter<Self>,
    /// The caller of every request over stdio (from `TC_TOKEN`); over
    /// HTTP, `None`: each request's own verified token.
    fixed: Option<Arc<Identity>>,
    /// `resources/subscribe` followers of a stdio connection, by URI;
    /// dropping one ends it.
    followed: Arc<Mutex<HashMap<String, Followed>>>,
}

/// A stdio follower: ended when dropped; cancelled when it ends by itself.
struct Followed(CancellationToken);

impl Drop for Followed {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// `events.recent` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecentInput {
    /// Event types to include: exact types (`alert.created`) or prefixes
    /// (`cost.*`); omitted or empty: every type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Continue after this event id (the last id of the previous page);
    /// omitted: the newest events.
    pub since: Option<String>,
    /// How many events, 1 to 1000; default 100.
    pub limit: Option<usize>,
}

/// `events.recent` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecentOutput {
    /// Envelopes (`id`, `type`, `tenant_id`, `data`, `timestamp`,
    /// `trace_id`), oldest first.
    pub events: Vec<serde_json::Value>,
    /// False when `since` is no longer held: events after it may be
    /// missing before the first one listed.
    pub recovered: bool,
    /// More matching events are held after the last one listed.
    pub more: bool,
}

/// `cost.summary` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CostInput {
    /// How far back from `until`: a duration like `7d`, `24h` or `30d`;
    /// default 7d, at most 90d. Counted in whole hours.
    pub window: Option<String>,
    /// End of the window, RFC 3339 (`2026-11-28T00:00:00Z`); default now.
    pub until: Option<String>,
    /// Only this source: aws, gcp, azure, bedrock, azure_openai, ...
    pub source: Option<String>,
    /// Sources and tag values listed, the largest first: 1 to 200;
    /// default 20.
    pub top: Option<usize>,
}

/// `workload.cost` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowInput {
    /// How far back from `until`: a duration like `7d`, `24h` or `30d`;
    /// default 7d, at most 90d. Counted in whole hours.
    pub window: Option<String>,
    /// End of the window, RFC 3339; default now.
    pub until: Option<String>,
    /// Values listed per breakdown, the largest first: 1 to 200; default 20.
    pub top: Option<usize>,
}

/// `agent.cost` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    /// Only this agent (its `agent_id`).
    pub agent_id: Option<String>,
    /// How far back from `until`: a duration like `7d`, `24h` or `30d`;
    /// default 7d, at most 90d. Counted in whole hours.
    pub window: Option<String>,
    /// End of the window, RFC 3339; default now.
    pub until: Option<String>,
    /// Agents and workflows listed, the largest first: 1 to 200; default 20.
    pub top: Option<usize>,
}

fn window_params(window: Option<String>, until: Option<String>, top: Option<usize>) -> CostParams {
    CostParams {
        window,
        until,
        source: None,
        top,
    }
}

/// `alerts.recent` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsInput {
    /// Only alerts in these states: `open`, `escalated`, `suppressed`,
    /// `resolved`; omitted: all.
    #[serde(default)]
    pub state: Vec<String>,
    /// Only these severities: `critical`, `high`, `medium`, `low`,
    /// `info`; omitted: all.
    #[serde(default)]
    pub severity: Vec<String>,
    /// How many, most recently changed first: 1 to 500; default 50.
    pub limit: Option<usize>,
}

/// `alerts.recent` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AlertsOutput {
    pub alerts: Vec<Alert>,
}

/// `inference.recommendations` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendationsInput {
    /// Only this provider: `bedrock`, `azure_openai`, ...
    pub provider: Option<String>,
    /// How many, largest estimated savings first: 1 to 200; default 20.
    pub limit: Option<usize>,
}

/// `inference.recommendations` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecommendationsOutput {
    pub recommendations: Vec<Recommendation>,
}

/// `fleet.list_instances` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetInput {
    /// Only instances in these states (`running`, `stopped`, ...);
    /// omitted: all.
    #[serde(default)]
    pub state: Vec<String>,
    /// Only this provider: `aws`, `gcp`, `azure`, ...
    pub provider: Option<String>,
    /// Only this region.
    pub region: Option<String>,
    /// Only this GPU type: `H100`, `A100`, ...
    pub gpu_type: Option<String>,
    /// How many, most recently changed first: 1 to 1000; default 100.
    pub limit: Option<usize>,
}

/// `recommendations.accept` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInput {
    /// The open recommendation to accept.
    pub recommendation_id: String,
}

/// `policies.simulate` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulateInput {
    /// A policy document to try, not stored (the format of
    /// docs/policies.md); or give `policy_id`.
    #[schemars(with = "Option<crate::policy::spec::Policy>")]
    pub policy: Option<serde_json::Value>,
    /// A stored policy's id.
    pub policy_id: Option<String>,
    /// How far back from `until` (`24h`, `90m`); default 24h, at most 7d,
    /// and only what the broker's history holds.
    pub window: Option<String>,
    /// End of the span, RFC 3339; default now.
    pub until: Option<String>,
}

/// `policies.create` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePolicyInput {
    /// The policy document (docs/policies.md); a policy with the same id
    /// is replaced.
    #[schemars(with = "crate::policy::spec::Policy")]
    pub policy: serde_json::Value,
}

/// `connections.health` output.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConnectionsOutput {
    /// Failing first.
    pub connections: Vec<Connection>,
    pub failing: usize,
}

#[tool_router]
impl Tools {
    pub fn new(app: App) -> Self {
        Self {
            app,
            tool_router: Self::tool_router(),
            fixed: None,
            followed: Arc::default(),
        }
    }

    /// The tools for one caller, whatever the request carries (stdio).
    pub fn for_identity(app: App, identity: Identity) -> Self {
        Self {
            fixed: Some(Arc::new(identity)),
            ..Self::new(app)
        }
    }

    /// The caller: over stdio the identity of `TC_TOKEN` while it is
    /// valid; over HTTP the one the HTTP layer verified for this request.
    fn caller(&self, context: &RequestContext<RoleServer>) -> Result<Identity, ErrorData> {
        if let Some(identity) = &self.fixed {
            if crate::clock::unix_secs() >= identity.valid_until() {
                return Err(ErrorData::invalid_request(
                    "TC_TOKEN has expired: start `tensorcost-events mcp` again with a new token",
                    None,
                ));
            }
            return Ok(Identity::clone(identity));
        }
        context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Identity>())
            .cloned()
            .ok_or_else(|| ErrorData::internal_error("no verified caller for this request", None))
    }

    /// The tenant's recent events from the broker's history.
    #[tool(
        name = "events.recent",
        output_schema = rmcp::handler::server::tool::schema_for_type::<RecentOutput>(),
        description = "The tenant's recent events (id, type, data, timestamp, trace_id), oldest first, filtered by type patterns such as `cost.*`; page forward with `since`. Scope: events:subscribe."
    )]
    async fn events_recent(
        &self,
        Parameters(input): Parameters<RecentInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = RecentParams {
            types: input.types,
            since: input.since,
            limit: input.limit,
        };
        let page = match self.app.recent_events(&identity, &params) {
            Ok(page) => page,
            Err(e) => return Ok(refused(&e)),
        };
        let events: Vec<serde_json::Value> = page
            .events
            .iter()
            .filter_map(|e| serde_json::from_str(&e.to_json()).ok())
            .collect();
        let text = format!(
            "{} event(s){}{}",
            events.len(),
            if page.more {
                "; more after the last"
            } else {
                ""
            },
            if page.recovered {
                ""
            } else {
                "; `since` is no longer held, some events may be missing"
            }
        );
        structured(
            &RecentOutput {
                events,
                recovered: page.recovered,
                more: page.more,
            },
            text,
        )
    }

    /// Costs over a window from the tenant's `cost.updated` events.
    #[tool(
        name = "cost.summary",
        output_schema = rmcp::handler::server::tool::schema_for_type::<CostSummary>(),
        description = "The tenant's costs over a window (default the last 7 days): the total in USD, by source (aws, gcp, azure, bedrock, azure_openai, ...), by service or model within a source, and by tag (application, team, environment, ...), largest first; with `source`, what drove that source's bill. Built from cost.updated events. Scope: cost:read."
    )]
    async fn cost_summary(
        &self,
        Parameters(input): Parameters<CostInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = CostParams {
            window: input.window,
            until: input.until,
            source: input.source,
            top: input.top,
        };
        let summary = match self.app.cost_summary(&identity, &params) {
            Ok(summary) => summary,
            Err(e) => return Ok(refused(&e)),
        };
        let mut text = format!(
            "{:.2} USD from {} to {}",
            summary.total_usd, summary.from, summary.to
        );
        for s in summary.by_source.iter().take(5) {
            text.push_str(&format!("; {} {:.2}", s.source, s.usd));
        }
        for s in summary.by_service.iter().take(3) {
            text.push_str(&format!("; {} {} {:.2}", s.source, s.service, s.usd));
        }
        structured(&summary, text)
    }

    /// Costs by workload tags over a window.
    #[tool(
        name = "workload.cost",
        output_schema = rmcp::handler::server::tool::schema_for_type::<WorkloadCosts>(),
        description = "The tenant's costs over a window (default the last 7 days) by the application, team and environment tags of cost.updated events, largest first, with what carries no such tag. Scope: workload:read."
    )]
    async fn workload_cost(
        &self,
        Parameters(input): Parameters<WindowInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = window_params(input.window, input.until, input.top);
        let costs = match self.app.workload_costs(&identity, &params) {
            Ok(costs) => costs,
            Err(e) => return Ok(refused(&e)),
        };
        let mut text = format!(
            "{:.2} USD from {} to {}",
            costs.total_usd, costs.from, costs.to
        );
        for (tag, b) in [
            ("application", &costs.application),
            ("team", &costs.team),
            ("environment", &costs.environment),
        ] {
            if let Some(top) = b.values.first() {
                text.push_str(&format!("; top {tag} {} {:.2}", top.name, top.usd));
            }
        }
        structured(&costs, text)
    }

    /// Costs by agent and workflow over a window.
    #[tool(
        name = "agent.cost",
        output_schema = rmcp::handler::server::tool::schema_for_type::<AgentCosts>(),
        description = "The tenant's AI agent costs over a window (default the last 7 days): per agent_id and per workflow_id of cost.updated events, largest first; or one agent's; with each listed agent's presence and health from agent.* events. Scope: agent:read."
    )]
    async fn agent_cost(
        &self,
        Parameters(input): Parameters<AgentInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = window_params(input.window, input.until, input.top);
        let costs = match self
            .app
            .agent_costs(&identity, &params, input.agent_id.as_deref())
        {
            Ok(costs) => costs,
            Err(e) => return Ok(refused(&e)),
        };
        let mut text = format!(
            "{:.2} USD attributed to agents from {} to {}",
            costs.agents_usd, costs.from, costs.to
        );
        for a in costs.by_agent.iter().take(5) {
            text.push_str(&format!("; {} {:.2}", a.name, a.usd));
        }
        text.push_str(&format!("; {} agent(s) connected", costs.connected));
        structured(&costs, text)
    }

    /// Recent alerts with their current state.
    #[tool(
        name = "alerts.recent",
        output_schema = rmcp::handler::server::tool::schema_for_type::<AlertsOutput>(),
        description = "The tenant's alerts as they stand now (open, escalated, suppressed, resolved), most recently changed first, from alert.* events; filter by state and severity. Scope: alert:read."
    )]
    async fn alerts_recent(
        &self,
        Parameters(input): Parameters<AlertsInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = AlertParams {
            states: input.state,
            severities: input.severity,
            limit: input.limit,
        };
        let alerts = match self.app.recent_alerts(&identity, &params) {
            Ok(alerts) => alerts,
            Err(e) => return Ok(refused(&e)),
        };
        let open = alerts.iter().filter(|a| a.state != "resolved").count();
        let text = format!("{} alert(s), {open} not resolved", alerts.len());
        structured(&AlertsOutput { alerts }, text)
    }

    /// Open managed-inference recommendations.
    #[tool(
        name = "inference.recommendations",
        output_schema = rmcp::handler::server::tool::schema_for_type::<RecommendationsOutput>(),
        description = "The tenant's open managed-inference recommendations (Bedrock, Azure OpenAI, ...: recommendation.created events with category inference, not yet accepted or dismissed), largest estimated monthly savings first. Scope: ai:read."
    )]
    async fn inference_recommendations(
        &self,
        Parameters(input): Parameters<RecommendationsInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let recommendations = match self.app.inference_recommendations(
            &identity,
            input.provider.as_deref(),
            input.limit,
        ) {
            Ok(list) => list,
            Err(e) => return Ok(refused(&e)),
        };
        let savings: f64 = recommendations
            .iter()
            .filter_map(|r| r.estimated_monthly_savings_usd)
            .sum();
        let text = format!(
            "{} open recommendation(s), {savings:.2} USD a month in estimated savings",
            recommendations.len()
        );
        structured(&RecommendationsOutput { recommendations }, text)
    }

    /// The current GPU fleet.
    #[tool(
        name = "fleet.list_instances",
        output_schema = rmcp::handler::server::tool::schema_for_type::<Fleet>(),
        description = "The tenant's GPU instances as they stand now (id, state, GPU type and count, region, provider, hourly cost), most recently changed first, from instance.* events, with the running count, GPUs and cost per hour; filter by state, provider, region, GPU type. Scope: gpu:read."
    )]
    async fn fleet_list_instances(
        &self,
        Parameters(input): Parameters<FleetInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let filter = FleetFilter {
            states: input.state,
            provider: input.provider,
            region: input.region,
            gpu_type: input.gpu_type,
            limit: 0,
        };
        let fleet = match self.app.fleet(&identity, filter, input.limit) {
            Ok(fleet) => fleet,
            Err(e) => return Ok(refused(&e)),
        };
        let text = format!(
            "{} instance(s), {} running with {} GPU(s) at {:.2} USD an hour",
            fleet.matched, fleet.running, fleet.running_gpus, fleet.running_hourly_cost_usd
        );
        structured(&fleet, text)
    }

    /// Accepts a recommendation: publishes `recommendation.accepted`.
    #[tool(
        name = "recommendations.accept",
        output_schema = rmcp::handler::server::tool::schema_for_type::<Accepted>(),
        description = "Marks one of the tenant's open recommendations accepted by publishing recommendation.accepted, which every subscriber sees. A write tool: runs only when the tenant's MCP settings have write_tools_enabled and grant recommendations.accept. Scope: recommendation:write."
    )]
    async fn recommendations_accept(
        &self,
        Parameters(input): Parameters<AcceptInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let accepted = match self
            .app
            .accept_recommendation(&identity, &input.recommendation_id)
            .await
        {
            Ok(accepted) => accepted,
            Err(e) => return Ok(refused(&e)),
        };
        let text = format!(
            "accepted {}: event {}",
            accepted.recommendation_id, accepted.event_id
        );
        structured(&accepted, text)
    }

    /// Dry-runs a policy over the tenant's history.
    #[tool(
        name = "policies.simulate",
        output_schema = rmcp::handler::server::tool::schema_for_type::<crate::policy::Simulation>(),
        description = "Dry-runs an enforcement policy (given inline, or a stored one by policy_id) over the tenant's recent events with the same evaluator that runs live, and answers what would have fired: when, for which subject, the measured value and the action, and when it would have been resolved. Publishes nothing. Only reaches as far back as the broker's history holds (`complete` says whether it did). Scope: enforcement:read."
    )]
    async fn policies_simulate(
        &self,
        Parameters(input): Parameters<SimulateInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let params = crate::app::SimulateParams {
            policy: input.policy,
            policy_id: input.policy_id,
            window: input.window,
            until: input.until,
        };
        let simulation = match self.app.simulate_policy(&identity, &params).await {
            Ok(s) => s,
            Err(e) => return Ok(refused(&e)),
        };
        let text = format!(
            "{} would have fired {} time(s) over {} event(s) from {} to {}{}",
            simulation.policy_id,
            simulation.firings.len(),
            simulation.events,
            simulation.from,
            simulation.until,
            if simulation.complete {
                ""
            } else {
                " (history does not reach back to the start: firings may be missing)"
            }
        );
        structured(&simulation, text)
    }

    /// Creates or updates a policy.
    #[tool(
        name = "policies.create",
        output_schema = rmcp::handler::server::tool::schema_for_type::<crate::app::PolicyWritten>(),
        description = "Creates an enforcement policy, or replaces the one with the same id: which events it counts, the subject it watches (agent_id, workflow_id, ...), a count or sum over a sliding window and its threshold, and what it does when it fires (pause, alert or notify). It counts from the next event and publishes policy.created or policy.updated. A write tool: runs only when the tenant's MCP settings have write_tools_enabled and grant policies.create. Scope: enforcement:write."
    )]
    async fn policies_create(
        &self,
        Parameters(input): Parameters<CreatePolicyInput>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let written = match self.app.create_policy_tool(&identity, &input.policy).await {
            Ok(w) => w,
            Err(e) => return Ok(refused(&e)),
        };
        let text = format!(
            "{} policy {} ({})",
            if written.created {
                "created"
            } else {
                "updated"
            },
            written.policy.id,
            written.policy.name
        );
        structured(&written, text)
    }

    /// Sync health of the tenant's provider connections.
    #[tool(
        name = "connections.health",
        output_schema = rmcp::handler::server::tool::schema_for_type::<ConnectionsOutput>(),
        description = "Last sync status and time of each of the tenant's cloud and inference provider connections (from system.connection_synced and system.connection_failed events), failing first. Scope: integration:read."
    )]
    async fn connections_health(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let identity = self.caller(&context)?;
        let connections = match self.app.connections_health(&identity) {
            Ok(list) => list,
            Err(e) => return Ok(refused(&e)),
        };
        let failing = connections.iter().filter(|c| c.status != "ok").count();
        let text = format!("{} connection(s), {failing} failing", connections.len());
        structured(
            &ConnectionsOutput {
                connections,
                failing,
            },
            text,
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    /// Every tool call: refused for a tenant whose MCP settings say
    /// `enabled: false` (an unknown tool is still a protocol error).
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, ErrorData> {
        if self.tool_router.has_route(&request.name) {
            let identity = self.caller(&context)?;
            if let Err(e) = self.app.mcp_open(&identity).await {
                return Ok(refused(&e).into());
            }
        }
        let call = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new(
            "tensorcost-events",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(format!(
            "TensorCost's event broker: read the caller's tenant's events and the \
                 figures built from them. Each tool names the scope it needs; a call \
                 without it fails naming the scope. events.recent returns {RECENT_DEFAULT} \
                 events by default, at most {RECENT_MAX}. Resources events://{{pattern}} \
                 (cost.*, alert.created, *) give the newest matching events and notify \
                 as new ones arrive."
        ))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(resources::listed()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let identity = self.caller(&context)?;
        self.app
            .mcp_open(&identity)
            .await
            .and_then(|()| resources::read(&self.app, &identity, &request.uri))
            .map(Into::into)
            .map_err(|e| resources::protocol_error(&e))
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(resources::accepted(requested))
    }

    /// `subscriptions/listen` (2026-07-28): notifications ride the
    /// request's own stream until the client ends it.
    async fn listen(&self, subscription: SubscriptionContext) -> Result<(), ErrorData> {
        let identity = self.caller(subscription.request_context())?;
        self.app
            .mcp_open(&identity)
            .await
            .map_err(|e| resources::protocol_error(&e))?;
        let uris = subscription
            .accepted()
            .resource_subscriptions
            .clone()
            .unwrap_or_default();
        if uris.is_empty() {
            return Err(ErrorData::invalid_params(
                "no event resource to follow: resourceSubscriptions takes events://{pattern} URIs, \
                 e.g. events://cost.*",
                None,
            ));
        }
        let follower = resources::Follower::open(&self.app, &identity, &uris)
            .map_err(|e| resources::protocol_error(&e))?;
        let sink = subscription.sink().clone();
        // rmcp acknowledged before the subscription existed: one
        // notification per URI now says "read it", so nothing published in
        // between is missed.
        for uri in &uris {
            if sink.notify_resource_updated(uri.clone()).await.is_err() {
                return Ok(());
            }
        }
        let ended = tokio::select! {
            ended = follower.run(|uri| {
                let sink = sink.clone();
                async move { sink.notify_resource_updated(uri).await.is_ok() }
            }) => ended,
            () = subscription.cancelled() => return Ok(()),
        };
        match ended {
            resources::Ended::Closed => Ok(()),
            resources::Ended::Expired => Err(token_expired()),
            resources::Ended::Refused(e) => Err(resources::protocol_error(&e)),
        }
    }

    /// `resources/subscribe` (revisions before 2026-07-28): stdio only,
    /// where the connection is the session; over HTTP, which keeps no
    /// session, `subscriptions/listen` is the way.
    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if self.fixed.is_none() {
            return Err(ErrorData::invalid_request(
                "resources/subscribe needs a session, and /mcp keeps none: use \
                 subscriptions/listen (protocol revision 2026-07-28), or run \
                 `tensorcost-events mcp` without TC_SERVER",
                None,
            ));
        }
        let identity = self.caller(&context)?;
        let refused = |e: ApiError| resources::protocol_error(&e);
        self.app.mcp_open(&identity).await.map_err(refused)?;
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        // Followers that ended (token expired, cap) no longer count.
        followed.retain(|_, f| !f.0.is_cancelled());
        if followed.contains_key(&request.uri) {
            return Ok(());
        }
        if followed.len() >= resources::MAX_URIS {
            return Err(refused(ApiError::invalid(format!(
                "uri: this connection already follows {} event resources, the limit; \
                 unsubscribe from one first",
                resources::MAX_URIS
            ))));
        }
        let follower =
            resources::Follower::open(&self.app, &identity, std::slice::from_ref(&request.uri))
                .map_err(refused)?;
        let stop = CancellationToken::new();
        let peer = context.peer.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ended = token.clone().drop_guard();
            tokio::select! {
                _ = follower.run(|uri| {
                    let peer = peer.clone();
                    async move {
                        peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                            .await
                            .is_ok()
                    }
                }) => {}
                () = token.cancelled() => {}
            }
        });
        followed.insert(request.uri, Followed(stop));
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request.uri);
        Ok(())
    }
}

fn token_expired() -> ErrorData {
    ErrorData::invalid_request("the token has expired: follow again with a new one", None)
}

/// A refusal as a tool error: the code and the message that names what
/// was wrong.
fn refused(e: &ApiError) -> CallToolResult {
    let value = serde_json::to_value(e).unwrap_or_default();
    let mut result = CallToolResult::structured_error(value);
    result.content = vec![ContentBlock::text(format!(
        "{}: {}",
        e.code.as_str(),
        e.message
    ))];
    result
}

/// Structured content, and for clients that show only text a short
/// summary line followed by the same JSON.
fn structured<T: Serialize>(value: &T, summary: String) -> Result<CallToolResult, ErrorData> {
    let value = serde_json::to_value(value)
        .map_err(|e| ErrorData::internal_error(format!("answer not encoded: {e}"), None))?;
    let mut result = CallToolResult::structured(value);
    if let Some(structured) = &result.structured_content {
        result.content = vec![ContentBlock::text(format!("{summary}\n{structured}"))];
    }
    Ok(result)
}
