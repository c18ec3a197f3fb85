//! The authentication settings of `serve`: the HS256 secret, default
//! scopes, Cognito and memberships. Flags and `TC_*` variables (flags
//! win); each default is written once, here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::cognito::{Cognito, CognitoConfig};
use super::memberships::{FileMemberships, Memberships};
use super::rbac::DEFAULT_SCOPES;
use super::{Authenticator, Scopes};
use crate::config::parse::duration;
use crate::store::{Lazy, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// Shared secret for HS256 tokens. Unset: development mode with a
    /// generated secret. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "TC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Scopes of a token that has no `scope`/`scopes` claim.
    #[arg(long, env = "TC_DEFAULT_SCOPES", default_value = DEFAULT_SCOPES)]
    pub default_scopes: String,

    /// Cognito user pool issuer, e.g.
    /// `https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123`.
    /// Setting it (or region and pool id) turns Cognito RS256 tokens on.
    #[arg(long, env = "TC_COGNITO_ISSUER")]
    pub cognito_issuer: Option<String>,

    /// Cognito region (with `TC_COGNITO_USER_POOL_ID`, instead of the issuer).
    #[arg(long, env = "TC_COGNITO_REGION")]
    pub cognito_region: Option<String>,

    /// Cognito user pool id (with `TC_COGNITO_REGION`).
    #[arg(long, env = "TC_COGNITO_USER_POOL_ID")]
    pub cognito_user_pool_id: Option<String>,

    /// JWKS URL (default: `<issuer>/.well-known/jwks.json`).
    #[arg(long, env = "TC_COGNITO_JWKS_URL")]
    pub cognito_jwks_url: Option<String>,

    /// The app client id Cognito ID tokens must carry as `aud`.
    #[arg(long, env = "TC_COGNITO_CLIENT_ID")]
    pub cognito_client_id: Option<String>,

    /// Scopes of every Cognito user.
    #[arg(long, env = "TC_COGNITO_SCOPES", default_value = super::rbac::SUBSCRIBE)]
    pub cognito_scopes: String,

    /// Least time between JWKS re-fetches caused by unknown key ids.
    #[arg(long, env = "TC_JWKS_MIN_REFETCH", default_value = "30s", value_parser = duration)]
    pub jwks_min_refetch: Duration,

    /// Timeout of one JWKS fetch.
    #[arg(long, env = "TC_JWKS_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub jwks_timeout: Duration,

    /// JSON file of Cognito users' tenant memberships
    /// (`{"<cognito_sub>": ["tenant-a", …]}`), re-read when it changes.
    #[arg(long, env = "TC_MEMBERSHIPS_FILE")]
    pub memberships_file: Option<PathBuf>,
}

impl AuthSettings {
    pub fn default_scopes(&self) -> Scopes {
        Scopes::parse(&self.default_scopes.replace(',', " "))
    }

    pub fn cognito_scopes(&self) -> Scopes {
        Scopes::parse(&self.cognito_scopes.replace(',', " "))
    }

    /// The Cognito settings, if Cognito is configured; an error names what
    /// is missing.
    pub fn cognito(&self) -> Result<Option<CognitoConfig>, String> {
        let nonempty = |o: &Option<String>| {
            o.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        let issuer = match (
            nonempty(&self.cognito_issuer),
            nonempty(&self.cognito_region),
            nonempty(&self.cognito_user_pool_id),
        ) {
            (Some(issuer), _, _) => issuer,
            (None, Some(region), Some(pool)) => CognitoConfig::issuer_for(&region, &pool),
            (None, Some(_), None) => {
                return Err("TC_COGNITO_REGION is set but TC_COGNITO_USER_POOL_ID is not".into());
            }
            (None, None, Some(_)) => {
                return Err("TC_COGNITO_USER_POOL_ID is set but TC_COGNITO_REGION is not".into());
            }
            (None, None, None) => return Ok(None),
        };
        let client_id = nonempty(&self.cognito_client_id).ok_or(
            "TC_COGNITO_CLIENT_ID is required with Cognito: ID tokens are checked against it",
        )?;
        Ok(Some(CognitoConfig {
            jwks_url: nonempty(&self.cognito_jwks_url)
                .unwrap_or_else(|| CognitoConfig::jwks_url_for(&issuer)),
            issuer,
            client_id,
            min_refetch: self.jwks_min_refetch,
            fetch_timeout: self.jwks_timeout,
        }))
    }

    /// The token verifier the settings describe: HS256 always, Cognito when
    /// configured.
    pub fn authenticator(
        &self,
        secret: &[u8],
        redis: Option<&Target>,
    ) -> anyhow::Result<Authenticator> {
        let auth = Authenticator::new(secret, self.default_scopes());
        let Some(cognito) = self.cognito().map_err(anyhow::Error::msg)? else {
            if self.memberships_file.is_some() {
                tracing::warn!(
                    "TC_MEMBERSHIPS_FILE is set but Cognito is not configured: it is not used"
                );
            }
            return Ok(auth);
        };
        let memberships = Memberships {
            file: match &self.memberships_file {
                Some(path) => Some(FileMemberships::load(path)?),
                None => None,
            },
            redis: redis.map(|t| Lazy::new(t.clone())),
        };
        if memberships.file.is_none() && memberships.redis.is_none() {
            tracing::warn!(
                "Cognito is configured without TC_MEMBERSHIPS_FILE or Redis: Cognito users belong to no tenant"
            );
        }
        let cognito = Cognito::new(cognito).context("cannot build the JWKS client")?;
        Ok(auth.with_cognito(cognito, memberships, self.cognito_scopes()))
    }
}
