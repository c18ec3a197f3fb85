//! The one place where scopes are checked. gRPC, REST and Socket.IO all
//! ask here whether an identity may do something, and for which tenant, so
//! the same token means the same rights on every surface.

use std::collections::BTreeSet;
use std::fmt;

use super::Identity;
use crate::event::check_identifier;
use crate::tenant::TenantScope;

/// Publish events for the token's tenant.
pub const PUBLISH: &str = "events:publish";
/// Subscribe to the token's tenant's events.
pub const SUBSCRIBE: &str = "events:subscribe";
/// Service tokens only: act for any named tenant (publish) or follow every
/// tenant (subscribe). Combine with `events:publish` / `events:subscribe`.
pub const ALL_TENANTS: &str = "events:all_tenants";

/// Read the tenant's integrations (webhook endpoints and deliveries).
pub const INTEGRATION_READ: &str = "integration:read";
/// Read the tenant's costs (MCP `cost.summary`).
pub const COST_READ: &str = "cost:read";
/// Read costs by workload tags (MCP `workload.cost`).
pub const WORKLOAD_READ: &str = "workload:read";
/// Read costs by agent and workflow (MCP `agent.cost`).
pub const AGENT_READ: &str = "agent:read";
/// Read alerts (MCP `alerts.recent`).
pub const ALERT_READ: &str = "alert:read";
/// Read AI and managed-inference recommendations (MCP
/// `inference.recommendations`).
pub const AI_READ: &str = "ai:read";
/// Read the GPU fleet (MCP `fleet.list_instances`).
pub const GPU_READ: &str = "gpu:read";
/// Accept or dismiss recommendations (MCP `recommendations.accept`).
pub const RECOMMENDATION_WRITE: &str = "recommendation:write";
/// Read and change the tenant's settings (`/v1/settings/mcp`).
pub const SETTINGS_READ: &str = "settings:read";
pub const SETTINGS_WRITE: &str = "settings:write";
/// Change the tenant's integrations; implies reading them.
pub const INTEGRATION_WRITE: &str = "integration:write";
/// Read and dry-run enforcement policies (MCP `policies.simulate`,
/// `GET /v1/policies`).
pub const ENFORCEMENT_READ: &str = "enforcement:read";
/// Create, change and delete them (MCP `policies.create`); implies
/// reading them.
pub const ENFORCEMENT_WRITE: &str = "enforcement:write";

/// Scopes of a backend token that carries no `scope` or `scopes` claim
/// (`TC_DEFAULT_SCOPES`), and of the tokens `token` and development mode
/// mint unless told otherwise.
pub const DEFAULT_SCOPES: &str = "events:publish events:subscribe";

/// [`DEFAULT_SCOPES`] as a set.
pub fn default_scope_set() -> BTreeSet<String> {
    Scopes::parse(DEFAULT_SCOPES).0
}

/// A token's scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<String>);

impl Scopes {
    /// Parses a space-separated list.
    pub fn parse(list: &str) -> Self {
        Self(list.split_whitespace().map(str::to_string).collect())
    }

    /// Scopes from the `scope` (space separated) and `scopes` (array)
    /// claims, merged; `None` when the token has neither claim.
    pub fn from_claims(scope: Option<&str>, scopes: Option<&[String]>) -> Option<Self> {
        if scope.is_none() && scopes.is_none() {
            return None;
        }
        let mut set = scope.map(Self::parse).unwrap_or_default().0;
        set.extend(scopes.unwrap_or_default().iter().cloned());
        Some(Self(set))
    }

    pub fn has(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    pub fn all_tenants(&self) -> bool {
        self.has(ALL_TENANTS)
    }

    pub fn as_set(&self) -> &BTreeSet<String> {
        &self.0
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        let list: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&list.join(" "))
    }
}

/// Why an authenticated caller may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("token lacks scope {needed} (it has: {has})")]
    MissingScope { needed: &'static str, has: String },
    #[error(
        "tenant_id: this token is for tenant {own}; acting for tenant {requested} needs scope {ALL_TENANTS}"
    )]
    OtherTenant { own: String, requested: String },
    #[error("tenant_id: required: this token has scope {ALL_TENANTS} and no tenant of its own")]
    TenantRequired,
    #[error("tenant_id: {0}")]
    BadTenant(String),
}

impl Identity {
    /// Fails unless the token carries `scope`.
    pub fn require(&self, scope: &'static str) -> Result<(), Denied> {
        if self.scopes.has(scope) {
            Ok(())
        } else {
            Err(Denied::MissingScope {
                needed: scope,
                has: self.scopes.to_string(),
            })
        }
    }

    /// Fails unless the token carries one of `scopes` (the first is named
    /// in the refusal).
    pub fn require_any(&self, scopes: &[&'static str]) -> Result<(), Denied> {
        if scopes.iter().any(|s| self.scopes.has(s)) {
            return Ok(());
        }
        self.require(scopes[0])
    }

    /// The tenant an event is published for: the token's own unless the
    /// token may act for every tenant and names one. `requested` is the
    /// event's `tenant_id` field ("" when unset). The publish scope is
    /// checked by the caller, once per call.
    pub fn acting_tenant(&self, requested: &str) -> Result<String, Denied> {
        self.named_tenant(requested)?.ok_or(Denied::TenantRequired)
    }

    /// Whose events a subscription follows. `requested` "" means the token's
    /// own tenant, or every tenant for an all-tenants token without one.
    pub fn subscribe_scope(&self, requested: &str) -> Result<TenantScope, Denied> {
        self.require(SUBSCRIBE)?;
        Ok(match self.named_tenant(requested)? {
            Some(t) => TenantScope::One(t),
            None => TenantScope::All,
        })
    }

    /// Resolves a requested tenant against the token: `Ok(None)` only for an
    /// all-tenants token that names none and has none.
    fn named_tenant(&self, requested: &str) -> Result<Option<String>, Denied> {
        if requested.is_empty() {
            return Ok(self.tenant.clone());
        }
        check_identifier(requested).map_err(Denied::BadTenant)?;
        match &self.tenant {
            Some(own) if own == requested => Ok(Some(own.clone())),
            _ if self.scopes.all_tenants() => Ok(Some(requested.to_string())),
            Some(own) => Err(Denied::OtherTenant {
                own: own.clone(),
                requested: requested.to_string(),
            }),
            None => Err(Denied::TenantRequired),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tenant: Option<&str>, scopes: &str) -> Identity {
        Identity {
            kind: super::super::TokenKind::Backend,
            subject: None,
            tenant: tenant.map(str::to_string),
            scopes: Scopes::parse(scopes),
            expires_at: 0,
            agent_id: None,
        }
    }

    #[test]
    fn tenant_tokens_stay_in_their_tenant() {
        let id = identity(Some("a"), "events:publish events:subscribe");
        assert_eq!(id.acting_tenant(""), Ok("a".into()));
        assert_eq!(id.acting_tenant("a"), Ok("a".into()));
        assert!(matches!(
            id.acting_tenant("b"),
            Err(Denied::OtherTenant { .. })
        ));
        assert_eq!(id.subscribe_scope(""), Ok(TenantScope::One("a".into())));
        assert!(matches!(
            id.subscribe_scope("b"),
            Err(Denied::OtherTenant { .. })
        ));
    }

    #[test]
    fn scopes_gate_actions() {
        let id = identity(Some("a"), "events:subscribe");
        assert!(matches!(
            id.require(PUBLISH),
            Err(Denied::MissingScope {
                needed: PUBLISH,
                ..
            })
        ));
        let id = identity(Some("a"), "events:publish");
        assert!(matches!(
            id.subscribe_scope(""),
            Err(Denied::MissingScope {
                needed: SUBSCRIBE,
                ..
            })
        ));
    }

    #[test]
    fn all_tenants_tokens() {
        let id = identity(None, "events:all_tenants events:publish events:subscribe");
        assert_eq!(id.acting_tenant("b"), Ok("b".into()));
        assert_eq!(id.acting_tenant(""), Err(Denied::TenantRequired));
        assert_eq!(id.subscribe_scope(""), Ok(TenantScope::All));
        assert_eq!(id.subscribe_scope("c"), Ok(TenantScope::One("c".into())));
        assert!(matches!(id.acting_tenant("b c"), Err(Denied::BadTenant(_))));
    }
}
