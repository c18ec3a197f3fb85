//! Which tenants a Cognito user (by `cognito_sub`) belongs to.
//!
//! The built-in source is a JSON file mapping each `cognito_sub` to its
//! tenant ids:
//!
//! ```json
//! {"8a3c…-sub": ["tenant-acme", "tenant-beta"], "f00d…-sub": ["tenant-acme"]}
//! ```
//!
//! It is re-read when its modification time or length changes (checked at
//! most once per [`RELOAD_CHECK`]), so memberships change without a
//! restart; write it atomically (write a temporary file, then rename). A file
//! that fails to parse on reload is logged and the last good version kept;
//! at start-up it is an error that names the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::event::check_identifier;

/// How often the file's modification time is looked at.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Where memberships come from.
pub enum Memberships {
    /// No source configured: Cognito users belong to no tenant.
    None,
    File(FileMemberships),
}

impl Memberships {
    /// The tenants `sub` belongs to, in the source's order.
    pub async fn tenants_of(&self, sub: &str) -> Vec<String> {
        match self {
            Memberships::None => Vec::new(),
            Memberships::File(f) => f.tenants_of(sub),
        }
    }
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
    let shown = path.display().to_string();
    let seen = stamp(path);
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
    Ok((seen, users))
}
