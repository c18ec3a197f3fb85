//! Whose events an operation concerns. Shared by `auth` (which decides it
//! from the token) and `broker` (which follows it), so neither imports the
//! other.

/// Whose events a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    One(String),
    /// Every tenant (service tokens with the all-tenants scope).
    All,
}

impl TenantScope {
    /// The tenant id, or `*` for every tenant, as status messages show it.
    pub fn label(&self) -> &str {
        match self {
            TenantScope::One(t) => t,
            TenantScope::All => "*",
        }
    }
}
