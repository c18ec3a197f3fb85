//! Operator settings that span tenants: per-tenant emit rate limits (the
//! product text's "raise on enterprise tier") and Cognito users' tenant
//! memberships. Reached through [`crate::app::App`] with scope `admin`,
//! which only an all-tenants backend token (no tenant of its own) may use.
//!
//! Stored where the broker already keeps them:
//! - rate limits: with Redis the hash `tc:ratelimits` (field tenant, value
//!   events per second), which every instance reads every
//!   `TC_RATE_LIMITS_REFRESH`; without Redis the embedded state store. The
//!   instance that takes the call applies it at once.
//! - memberships: with Redis the hash `tc:memberships` (field
//!   `cognito_sub`, value a JSON list of tenants); without Redis the file
//!   `TC_MEMBERSHIPS_FILE`, rewritten whole (write, then rename) and
//!   re-read by every reader within a second. With neither there is
//!   nowhere to keep them, and the calls say so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::auth::{Identity, TokenKind};
use crate::edge::rooms::RateLimits;
use crate::error::{ApiError, Code};
use crate::event::check_identifier;
use crate::state::State;
use crate::store::Lazy;
use crate::store::keys::{MEMBERSHIPS_KEY, RATE_LIMITS_KEY};

/// The scope of these calls.
pub const ADMIN: &str = "admin";

/// Kept-state table of rate limits without Redis (key: the tenant).
const RATE_TABLE: &str = "rate_limits";
const RATE_KEY: &str = "events_per_second";

/// Highest rate limit that can be set, events per second.
pub const MAX_RATE: u32 = 1_000_000;
/// Most tenants in one user's membership list.
pub const MAX_TENANTS: usize = 100;
/// Longest `cognito_sub`.
const MAX_SUB: usize = 128;

/// Per-tenant rates set at run time (the API, or Redis), shared with the
/// Socket.IO edge, which reads them for every tenant's pump.
#[derive(Debug, Clone, Default)]
pub struct LiveRates(Arc<RwLock<HashMap<String, u32>>>);

impl LiveRates {
    pub fn get(&self, tenant: &str) -> Option<u32> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .copied()
    }

    pub fn replace(&self, all: HashMap<String, u32>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = all;
    }

    fn set(&self, tenant: &str, rate: Option<u32>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        match rate {
            Some(rate) => map.insert(tenant.to_string(), rate),
            None => map.remove(tenant),
        };
    }
}

/// A tenant's emit rate limit and where it comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RateLimit {
    pub tenant: String,
    pub events_per_second: u32,
    /// `override` (set here, or in Redis), `setting`
    /// (`TC_RATE_LIMIT_OVERRIDES`) or `default` (`TC_RATE_LIMIT_PER_TENANT`).
    pub source: String,
}

/// A Cognito user's tenants, as kept for the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Membership {
    pub cognito_sub: String,
    pub tenants: Vec<String>,
}

#[derive(Clone)]
pub struct Admin {
    state: State,
    redis: Option<Arc<Lazy>>,
    /// The edge's limits: their `live` part is shared with it.
    limits: RateLimits,
    memberships_file: Option<PathBuf>,
    /// One file rewrite at a time.
    file_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Admin {
    pub fn new(
        state: State,
        redis: Option<Lazy>,
        limits: RateLimits,
        memberships_file: Option<PathBuf>,
    ) -> Self {
        Self {
            state,
            redis: redis.map(Arc::new),
            limits,
            memberships_file,
            file_lock: Arc::default(),
        }
    }

    /// Without Redis: the rates kept in the embedded store, into the live
    /// set (at start).
    pub async fn load(&self) -> anyhow::Result<usize> {
        if self.redis.is_some() {
            return Ok(0);
        }
        let mut all = HashMap::new();
        for (tenant, _, value) in self.state.list_all(RATE_TABLE).await? {
            match value.parse::<u32>() {
                Ok(rate) if (1..=MAX_RATE).contains(&rate) => {
                    all.insert(tenant, rate);
                }
                _ => tracing::warn!(tenant, "ignoring a kept rate limit: {value:?}"),
            }
        }
        let n = all.len();
        self.limits.live.replace(all);
        Ok(n)
    }

    pub fn rate_limit(&self, tenant: &str) -> Result<RateLimit, ApiError> {
        check_identifier(tenant).map_err(|e| ApiError::invalid(format!("tenant: {e}")))?;
        let (events_per_second, source) = match self.limits.live.get(tenant) {
            Some(rate) => (rate, "override"),
            None => match self.limits.overrides.get(tenant) {
                Some(&rate) => (rate, "setting"),
                None => (self.limits.default.per_second, "default"),
            },
        };
        Ok(RateLimit {
            tenant: tenant.to_string(),
            events_per_second,
            source: source.to_string(),
        })
    }

    /// Sets (`Some`) or removes (`None`) a tenant's override.
    pub async fn set_rate_limit(
        &self,
        tenant: &str,
        rate: Option<u32>,
    ) -> Result<RateLimit, ApiError> {
        check_identifier(tenant).map_err(|e| ApiError::invalid(format!("tenant: {e}")))?;
        if let Some(rate) = rate
            && !(1..=MAX_RATE).contains(&rate)
        {
            return Err(ApiError::invalid(format!(
                "events_per_second: {rate} is not between 1 and {MAX_RATE}"
            )));
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::new(Code::Unavailable, format!("rate limit not kept: {e}"))
        };
        match (&self.redis, rate) {
            (Some(redis), Some(rate)) => {
                let _: () = redis
                    .query(
                        redis::cmd("HSET")
                            .arg(RATE_LIMITS_KEY)
                            .arg(tenant)
                            .arg(rate),
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            (Some(redis), None) => {
                let _: i64 = redis
                    .query(redis::cmd("HDEL").arg(RATE_LIMITS_KEY).arg(tenant))
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            (None, Some(rate)) => self
                .state
                .put(RATE_TABLE, tenant, RATE_KEY, rate.to_string())
                .await
                .map_err(|e| unavailable(&e))?,
            (None, None) => {
                self.state
                    .delete(RATE_TABLE, tenant, RATE_KEY)
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
        }
        self.limits.live.set(tenant, rate);
        tracing::info!(tenant, rate = ?rate, "rate limit override changed");
        self.rate_limit(tenant)
    }

    fn no_store() -> ApiError {
        ApiError::new(
            Code::Unavailable,
            "memberships are kept in Redis (TC_REDIS_URL) or in TC_MEMBERSHIPS_FILE: set one",
        )
    }

    fn check_sub(sub: &str) -> Result<(), ApiError> {
        if sub.is_empty()
            || sub.len() > MAX_SUB
            || sub.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ApiError::invalid(format!(
                "cognito_sub: 1 to {MAX_SUB} characters without spaces"
            )));
        }
        Ok(())
    }

    pub async fn membership(&self, sub: &str) -> Result<Membership, ApiError> {
        Self::check_sub(sub)?;
        let tenants = if let Some(redis) = &self.redis {
            let value: Option<Vec<u8>> = redis
                .query(redis::cmd("HGET").arg(MEMBERSHIPS_KEY).arg(sub))
                .await
                .map_err(|e| ApiError::new(Code::Unavailable, format!("memberships: {e}")))?;
            value
                .map(|v| crate::auth::memberships::tenants_from_redis(sub, &v))
                .unwrap_or_default()
        } else if let Some(path) = &self.memberships_file {
            read_file(path)?.remove(sub).unwrap_or_default()
        } else {
            return Err(Self::no_store());
        };
        if tenants.is_empty() {
            return Err(ApiError::new(
                Code::NotFound,
                format!("cognito_sub {sub}: no memberships"),
            ));
        }
        Ok(Membership {
            cognito_sub: sub.to_string(),
            tenants,
        })
    }

    /// Replaces (`Some`) or removes (`None`) a user's tenants.
    pub async fn set_membership(
        &self,
        sub: &str,
        tenants: Option<Vec<String>>,
    ) -> Result<Option<Membership>, ApiError> {
        Self::check_sub(sub)?;
        if let Some(tenants) = &tenants {
            if tenants.is_empty() || tenants.len() > MAX_TENANTS {
                return Err(ApiError::invalid(format!(
                    "tenants: 1 to {MAX_TENANTS} tenant ids (DELETE removes a user)"
                )));
            }
            for (i, t) in tenants.iter().enumerate() {
                check_identifier(t).map_err(|e| ApiError::invalid(format!("tenants[{i}]: {e}")))?;
            }
        }
        let failed = |e: &dyn std::fmt::Display| {
            ApiError::new(Code::Unavailable, format!("membership not kept: {e}"))
        };
        if let Some(redis) = &self.redis {
            match &tenants {
                Some(list) => {
                    let value = serde_json::to_string(list).map_err(|e| failed(&e))?;
                    let _: () = redis
                        .query(redis::cmd("HSET").arg(MEMBERSHIPS_KEY).arg(sub).arg(value))
                        .await
                        .map_err(|e| failed(&e))?;
                }
                None => {
                    let _: i64 = redis
                        .query(redis::cmd("HDEL").arg(MEMBERSHIPS_KEY).arg(sub))
                        .await
                        .map_err(|e| failed(&e))?;
                }
            }
        } else if let Some(path) = &self.memberships_file {
            let _one = self.file_lock.lock().await;
            let mut users = read_file(path)?;
            match &tenants {
                Some(list) => users.insert(sub.to_string(), list.clone()),
                None => users.remove(sub),
            };
            write_file(path, &users).map_err(|e| failed(&e))?;
        } else {
            return Err(Self::no_store());
        }
        tracing::info!(cognito_sub = sub, tenants = ?tenants, "membership changed");
        Ok(tenants.map(|tenants| Membership {
            cognito_sub: sub.to_string(),
            tenants,
        }))
    }
}

type Users = std::collections::BTreeMap<String, Vec<String>>;

/// The memberships file as the broker reads it (a missing file: nobody
/// yet); one it cannot read is left for the operator to fix.
fn read_file(path: &std::path::Path) -> Result<Users, ApiError> {
    if !path.exists() {
        return Ok(Users::new());
    }
    crate::auth::memberships::read_users(path)
        .map(|users| users.into_iter().collect())
        .map_err(|e| ApiError::new(Code::Unavailable, format!("{e}; fix it by hand first")))
}

/// Writes the whole file beside itself, then renames it over: a reader
/// never sees half of it.
fn write_file(path: &std::path::Path, users: &Users) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(users).map_err(std::io::Error::other)?;
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, text + "\n")?;
    std::fs::rename(&staged, path)
}

/// The caller may use the admin API: scope `admin` on an all-tenants
/// backend token without a tenant of its own.
pub fn authorize(identity: &Identity) -> Result<(), ApiError> {
    identity.require(ADMIN)?;
    if identity.kind != TokenKind::Backend
        || !identity.scopes.all_tenants()
        || identity.tenant.is_some()
    {
        return Err(ApiError::new(
            Code::PermissionDenied,
            format!(
                "scope {ADMIN} is honored only on a backend token with {} and no tenant of its own",
                crate::auth::rbac::ALL_TENANTS
            ),
        ));
    }
    Ok(())
}

pub mod rest {
    //! The admin REST surface: extract, authenticate (before reading a
    //! body), call [`crate::app::App`], render.

    use axum::Json;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use serde::Deserialize;

    use crate::error::ApiError;
    use crate::http::{HttpState, authenticated};

    /// Largest request body of these routes.
    const MAX_BODY: usize = 16 * 1024;

    pub fn routes() -> Router<HttpState> {
        Router::new()
            .route(
                "/v1/admin/tenants/{tenant}/rate-limit",
                get(rate).put(put_rate).delete(delete_rate),
            )
            .route(
                "/v1/admin/memberships/{sub}",
                get(membership)
                    .put(put_membership)
                    .delete(delete_membership),
            )
    }

    async fn json<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
        let bytes = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|_| ApiError::invalid(format!("body: larger than {MAX_BODY} bytes")))?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body: {e}")))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RateBody {
        events_per_second: u32,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MembershipBody {
        tenants: Vec<String>,
    }

    async fn rate(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(tenant): Path<String>,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        Ok(Json(s.app.admin_rate_limit(&id, &tenant)?).into_response())
    }

    async fn put_rate(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(tenant): Path<String>,
        body: Body,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        crate::admin::authorize(&id)?;
        let body: RateBody = json(body).await?;
        let limit = s
            .app
            .admin_set_rate_limit(&id, &tenant, Some(body.events_per_second))
            .await?;
        Ok(Json(limit).into_response())
    }

    async fn delete_rate(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(tenant): Path<String>,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        Ok(Json(s.app.admin_set_rate_limit(&id, &tenant, None).await?).into_response())
    }

    async fn membership(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(sub): Path<String>,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        Ok(Json(s.app.admin_membership(&id, &sub).await?).into_response())
    }

    async fn put_membership(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(sub): Path<String>,
        body: Body,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        crate::admin::authorize(&id)?;
        let body: MembershipBody = json(body).await?;
        let kept = s
            .app
            .admin_set_membership(&id, &sub, Some(body.tenants))
            .await?;
        Ok(Json(kept).into_response())
    }

    async fn delete_membership(
        State(s): State<HttpState>,
        headers: HeaderMap,
        Path(sub): Path<String>,
    ) -> Result<Response, ApiError> {
        let id = authenticated(&s.app, &headers).await?;
        s.app.admin_set_membership(&id, &sub, None).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}
