//! Which tenants a Cognito user (by `cognito_sub`) belongs to.
//!
//! The built-in source is a JSON file mapping each `cognito_sub` to its
//! tenant ids:
//!
//! ```json
//! {"8a3c…-sub": ["tenant-acme", "tenant-beta"], "f00d…-sub": ["tenant-acme"]}
//! ```
//!
//! Memberships can also live in Redis (hash `tc:memberships`, field
//! `cognito_sub`, value a JSON array of tenant ids), read at each
//! handshake; a user's tenants are the union of both sources.
//!
//! The file is re-read when its modification time or length changes (checked at
//! most once per [`RELOAD_CHECK`]), so memberships change without a
//! restart; write it atomically (write a temporary file, then rename). A file
//! that fails to parse on reload is logged and the last good version kept;
//! at start-up it is an error that names the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::AuthError;
use crate::event::check_identifier;
use crate::store::Lazy;
use crate::store::keys::MEMBERSHIPS_KEY;

/// How often the file's modification time is looked at.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Where memberships come from: the file, Redis, both (a user's tenants
/// are the union) or neither (Cognito users belong to no tenant).
#[derive(Default)]
pub struct Memberships {
    pub file: Option<FileMemberships>,
    pub redis: Option<Lazy>,
}

impl Memberships {
    /// The tenants `sub` belongs to: the file's first, then Redis's.
    pub async fn tenants_of(&self, sub: &str) -> Result<Vec<String>, AuthError> {
        let mut tenants = self
            .file
            .as_ref()
            .map(|f| f.tenants_of(sub))
            .unwrap_or_default();
        if let Some(redis) = &self.redis {
            // Raw bytes: a value that is not text is skipped, not an outage.
            let value: Option<Vec<u8>> = redis
                .query(redis::cmd("HGET").arg(MEMBERSHIPS_KEY).arg(sub))
                .await
                .map_err(|_| AuthError::MembershipsUnavailable)?;
            for tenant in value
                .map(|v| tenants_from_redis(sub, &v))
                .unwrap_or_default()
            {
                if !tenants.contains(&tenant) {
                    tenants.push(tenant);
                }
            }
        }
        Ok(tenants)
    }
}

/// The tenants a Redis membership value lists; what is not usable is
/// skipped with a warning naming the field (the `cognito_sub`).
pub(crate) fn tenants_from_redis(sub: &str, value: &[u8]) -> Vec<String> {
    let field: String = sub.chars().take(140).collect();
    let Ok(text) = std::str::from_utf8(value) else {
        tracing::warn!(%field, "ignoring the Redis tc:memberships value of this field: not UTF-8 text");
        return Vec::new();
    };
    parse_list(text)
        .into_iter()
        .filter(|tenant| match check_identifier(tenant) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%field, "ignoring a tenant in Redis tc:memberships: {why}");
                false
            }
        })
        .collect()
}

/// A JSON array of strings, or a comma-separated list.
fn parse_list(value: &str) -> Vec<String> {
    serde_json::from_str::<Vec<String>>(value).unwrap_or_else(|_| {
        value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()
    })
}

pub struct FileMemberships {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    /// Modification time and length of the file as last read (or tried):
    /// the length catches a completed write that kept a coarse timestamp.
    seen: Option<(SystemTime, u64)>,
    checked: Instant,
    users: Users,
}

/// Why a memberships file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MembershipsError {
    #[error("cannot read memberships file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "memberships file {path} is not a JSON object of cognito_sub to tenant id lists: {reason}"
    )]
    Parse { path: String, reason: String },
}

impl FileMemberships {
    pub fn load(path: &Path) -> Result<Self, MembershipsError> {
        let (seen, users) = read(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                seen,
                checked: Instant::now(),
                users,
            }),
        })
    }

    pub fn tenants_of(&self, sub: &str) -> Vec<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let seen = stamp(&self.path);
            if seen != state.seen {
                // Whatever the outcome, do not re-read until the file changes
                // again (a half-written file changes again when completed).
                state.seen = seen;
                match read(&self.path) {
                    Ok((seen, users)) => {
                        tracing::info!(path = %self.path.display(), users = users.len(), "reloaded memberships");
                        state.seen = seen;
                        state.users = users;
                    }
                    Err(e) => tracing::error!("{e}; keeping the previous memberships"),
                }
            }
        }
        state.users.get(sub).cloned().unwrap_or_default()
    }
}

/// Tenant ids by `cognito_sub`.
type Users = HashMap<String, Vec<String>>;

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<(Option<(SystemTime, u64)>, Users), MembershipsError> {
    let seen = stamp(path);
    Ok((seen, read_users(path)?))
}

/// The file's users, every tenant id checked.
pub(crate) fn read_users(path: &Path) -> Result<Users, MembershipsError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| MembershipsError::Read {
        path: shown.clone(),
        source,
    })?;
    let users: Users = serde_json::from_str(&text).map_err(|e| MembershipsError::Parse {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    for (sub, tenants) in &users {
        for tenant in tenants {
            check_identifier(tenant).map_err(|reason| MembershipsError::Parse {
                path: shown.clone(),
                reason: format!("tenant {tenant:?} of {sub:?}: {reason}"),
            })?;
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_values_that_are_not_lists_of_tenants_are_skipped() {
        assert_eq!(
            tenants_from_redis("s", br#"["tenant-a","tenant-b"]"#),
            ["tenant-a", "tenant-b"]
        );
        assert_eq!(
            tenants_from_redis("s", b"tenant-a, tenant-b"),
            ["tenant-a", "tenant-b"]
        );
        assert!(tenants_from_redis("s", &[0xff, 0xfe]).is_empty());
        assert_eq!(tenants_from_redis("s", br#"["ok","bad tenant"]"#), ["ok"]);
        assert!(tenants_from_redis("s", b"[1,2]").is_empty());
    }
}
