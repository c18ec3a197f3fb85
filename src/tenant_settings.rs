//! Per-tenant settings kept in the state store (Redis or the embedded
//! store), so every instance applies the same and they survive restarts.
//! Today: the MCP server's (`GET` / `PUT /v1/settings/mcp`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::State;

/// The state table, and the record id of the MCP settings.
const TABLE: &str = "settings";
const MCP: &str = "mcp";

/// The MCP tools that change something: they run only with
/// `write_tools_enabled`, a grant for the tool, and its scope.
pub const WRITE_TOOLS: [&str; 2] = ["recommendations.accept", "policies.create"];

/// A tenant's MCP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpTenantSettings {
    /// The tenant's MCP tools answer at all (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Write tools may run (the product's `mcp-write-tools-enabled`;
    /// default false).
    #[serde(default)]
    pub write_tools_enabled: bool,
    /// Write tools granted to the tenant by name (default none).
    #[serde(default)]
    pub write_grants: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for McpTenantSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            write_tools_enabled: false,
            write_grants: Vec::new(),
        }
    }
}

impl McpTenantSettings {
    /// Refuses a grant that names no write tool.
    pub fn check(&self) -> Result<(), ApiError> {
        match self
            .write_grants
            .iter()
            .find(|g| !WRITE_TOOLS.contains(&g.as_str()))
        {
            Some(bad) => Err(ApiError::invalid(format!(
                "write_grants: {bad:?} is not a write tool (there is: {})",
                WRITE_TOOLS.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Why `tool` (a write tool) may not run for the tenant, if it may not.
    pub fn refuses_write(&self, tool: &str) -> Option<String> {
        if !self.write_tools_enabled {
            return Some(format!(
                "{tool}: write tools are off for this tenant (settings: write_tools_enabled, PUT /v1/settings/mcp)"
            ));
        }
        if !self.write_grants.iter().any(|g| g == tool) {
            return Some(format!(
                "{tool}: not granted to this tenant (settings: write_grants, PUT /v1/settings/mcp)"
            ));
        }
        None
    }
}

/// Reads a tenant's MCP settings (the defaults when none were saved).
pub async fn mcp(state: &State, tenant: &str) -> Result<McpTenantSettings, ApiError> {
    let text = state
        .get(TABLE, tenant, MCP)
        .await
        .map_err(|e| ApiError::new(crate::error::Code::Unavailable, e.to_string()))?;
    Ok(match text {
        Some(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(tenant, "MCP settings unreadable, using the defaults: {e}");
            McpTenantSettings::default()
        }),
        None => McpTenantSettings::default(),
    })
}

/// Saves a tenant's MCP settings after checking them.
pub async fn set_mcp(
    state: &State,
    tenant: &str,
    settings: &McpTenantSettings,
) -> Result<(), ApiError> {
    settings.check()?;
    let text = serde_json::to_string(settings).unwrap_or_default();
    state
        .put(TABLE, tenant, MCP, text)
        .await
        .map_err(|e| ApiError::new(crate::error::Code::Unavailable, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_tool_needs_the_flag_and_its_grant_and_says_which_is_missing() {
        let mut s = McpTenantSettings::default();
        let off = s.refuses_write("recommendations.accept").unwrap();
        assert!(off.contains("write_tools_enabled"), "{off}");
        s.write_tools_enabled = true;
        let ungranted = s.refuses_write("recommendations.accept").unwrap();
        assert!(ungranted.contains("write_grants"), "{ungranted}");
        s.write_grants = vec!["recommendations.accept".into()];
        assert_eq!(s.refuses_write("recommendations.accept"), None);
        s.write_grants = vec!["policies.delete".into()];
        let bad = s.check().unwrap_err();
        assert!(bad.message.contains("policies.delete"), "{}", bad.message);
    }

    #[test]
    fn unknown_fields_are_refused_and_missing_ones_take_their_defaults() {
        let s: McpTenantSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s, McpTenantSettings::default());
        let e = serde_json::from_str::<McpTenantSettings>(r#"{"enable":false}"#).unwrap_err();
        assert!(e.to_string().contains("enable"), "{e}");
    }
}

/// How long an instance answers a tenant's `enabled` from memory: what a
/// change made on another instance takes to apply here (a change made on
/// this instance applies at once).
pub const ENABLED_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Tenants whose `enabled` is remembered at once; past it the memory is
/// emptied and refilled from the store.
const ENABLED_CACHED: usize = 10_000;

/// Each tenant's `enabled`, read from the state store at most once per
/// [`ENABLED_TTL`]: every MCP call checks it.
#[derive(Clone, Default)]
pub struct EnabledCache {
    seen: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, bool)>>,
    >,
    /// Bumped by every [`EnabledCache::forget`]: a read that started before
    /// one does not remember what it read.
    changes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EnabledCache {
    pub async fn enabled(&self, state: &State, tenant: &str) -> Result<bool, ApiError> {
        let now = std::time::Instant::now();
        if let Some((at, enabled)) = self.lock().get(tenant)
            && now.duration_since(*at) < ENABLED_TTL
        {
            return Ok(*enabled);
        }
        let before = self.changes.load(std::sync::atomic::Ordering::Acquire);
        let enabled = mcp(state, tenant).await?.enabled;
        let mut seen = self.lock();
        if self.changes.load(std::sync::atomic::Ordering::Acquire) != before {
            return Ok(enabled);
        }
        if seen.len() >= ENABLED_CACHED {
            seen.clear();
        }
        seen.insert(tenant.to_string(), (now, enabled));
        Ok(enabled)
    }

    /// Forgets a tenant (its settings were just changed here).
    pub fn forget(&self, tenant: &str) {
        let mut seen = self.lock();
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        seen.remove(tenant);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (std::time::Instant, bool)>>
    {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}
