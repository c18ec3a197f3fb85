//! Who is calling: bearer tokens verified into an [`Identity`] (tenant,
//! scopes, expiry). One module for every surface (gRPC, REST, Socket.IO,
//! and every surface to come), so a token means the same thing everywhere.
//!
//! Backend-issued tokens are HS256, verified against the shared secret; the
//! tenant is the `tenantId` or `tenant_id` claim. Cognito ID tokens are
//! RS256, verified against the user pool's JWKS ([`cognito`]); their tenant
//! comes from the user's memberships ([`memberships`]) and the client's
//! `activeTenantId`. The header's `alg` only picks which verifier runs, and
//! each verifier accepts exactly one algorithm with its own key, so an
//! HS256 token is never checked with an RSA key or the reverse.

pub mod cognito;
pub mod memberships;
pub mod rbac;
pub mod settings;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::event::check_identifier;
use cognito::Cognito;
use memberships::Memberships;
pub use rbac::Scopes;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Which kind of token a caller presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// HS256, issued by a backend with the shared secret.
    Backend,
    /// RS256 Cognito ID token.
    Cognito,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: TokenKind,
    /// The token's `sub` (for Cognito, the user's `cognito_sub`).
    pub subject: Option<String>,
    /// The token's tenant. `None` only for all-tenants service tokens.
    pub tenant: Option<String>,
    pub scopes: Scopes,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The token's `agent_id`: the caller is an agent, whose gRPC streams
    /// are announced as `agent.connected` / `agent.disconnected`.
    pub agent_id: Option<String>,
}

impl Identity {
    /// The Unix second from which this identity's token is refused: its
    /// `exp` plus the leeway every check allows. Streams opened with the
    /// token end then.
    pub fn valid_until(&self) -> u64 {
        valid_until(self.expires_at)
    }
}

/// The Unix second from which a token expiring at `exp` is refused.
pub fn valid_until(exp: u64) -> u64 {
    exp.saturating_add(LEEWAY_SECS)
}

/// The latest `exp` accepted: 9999-12-31T23:59:59Z, the last second an RFC
/// 3339 timestamp can name. A later one is refused at verification, so no
/// time computed from a token's claims can leave the clock's range.
pub const MAX_EXP: u64 = clock::MAX_UNIX_SECS;

/// Refuses an `exp` beyond [`MAX_EXP`].
fn check_exp(exp: u64) -> Result<u64, AuthError> {
    if exp > MAX_EXP {
        return Err(AuthError::ExpTooFar { exp });
    }
    Ok(exp)
}

/// Why a token was refused. Messages say which check failed, in words a
/// developer can act on, and never echo the token or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send the header `authorization: Bearer <JWT>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <JWT>`")]
    NotBearer,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm \"none\" is not accepted: tokens must be signed")]
    AlgNone,
    #[error(
        "token algorithm {found} is not accepted: use HS256 (backend tokens) or RS256 (Cognito ID tokens)"
    )]
    WrongAlgorithm { found: String },
    #[error("token algorithm RS256 is not accepted: Cognito is not configured on this broker")]
    CognitoNotConfigured,
    #[error("unknown signing key kid={kid}: not in the user pool's JWKS")]
    UnknownKey { kid: String },
    #[error("unknown signing key kid={kid}: not in the user pool's JWKS (checked {secs} s ago)")]
    UnknownKeyRecentlyChecked { kid: String, secs: u64 },
    #[error("cannot verify the token now: the user pool's JWKS is unavailable ({reason})")]
    KeysUnavailable { reason: String },
    #[error("token issuer is not this broker's Cognito user pool")]
    WrongIssuer,
    #[error("token audience is not this broker's Cognito app client")]
    WrongAudience,
    #[error("token_use is {found}: send the Cognito ID token, not the access token")]
    WrongTokenUse { found: String },
    #[error("no membership in {tenant}")]
    NoMembership { tenant: String },
    #[error("user has no tenant membership")]
    NoMemberships,
    #[error("cannot read tenant memberships now: Redis is unavailable")]
    MembershipsUnavailable,
    #[error("activeTenantId required: user belongs to {count} tenants")]
    ActiveTenantRequired { count: usize },
    #[error("invalid signature: the token was not signed with this broker's secret")]
    InvalidSignature,
    #[error("invalid signature: the token was not signed by the user pool's key {kid}")]
    InvalidPoolSignature { kid: String },
    #[error("token expired at {at}")]
    Expired { at: String },
    #[error("token has no exp claim: tokens must expire")]
    NoExpiry,
    #[error(
        "token exp {exp} is beyond the year 9999: exp must be a Unix time in seconds, at most {MAX_EXP}"
    )]
    ExpTooFar { exp: u64 },
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token has no tenant: set the tenantId or tenant_id claim")]
    NoTenant,
    #[error("token tenant is invalid: {0}")]
    BadTenant(String),
    #[error("token agent_id is invalid: {0}")]
    BadAgent(String),
}

/// The claims the broker reads. Everything else is ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, rename = "tenantId", skip_serializing_if = "Option::is_none")]
    pub tenant_id_camel: Option<String>,
    #[serde(default, rename = "tenant_id", skip_serializing_if = "Option::is_none")]
    pub tenant_id_snake: Option<String>,
    /// Space-separated scopes (OAuth 2 style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Scopes as an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Marks the caller as an agent (presence events; docs/events.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// Verifies tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    hs256: DecodingKey,
    validation: Validation,
    /// Scopes of a backend token that carries no `scope`/`scopes` claim.
    default_scopes: Scopes,
    cognito: Option<Cognito>,
    memberships: Memberships,
    /// Scopes of every Cognito user.
    cognito_scopes: Scopes,
}

impl Authenticator {
    pub fn new(hs256_secret: &[u8], default_scopes: Scopes) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            hs256: DecodingKey::from_secret(hs256_secret),
            validation,
            default_scopes,
            cognito: None,
            memberships: Memberships::default(),
            cognito_scopes: Scopes::parse(rbac::SUBSCRIBE),
        }
    }

    /// Also accepts Cognito ID tokens of this pool, whose users get
    /// `scopes` and the tenants `memberships` lists for them.
    pub fn with_cognito(
        mut self,
        cognito: Cognito,
        memberships: Memberships,
        scopes: Scopes,
    ) -> Self {
        self.cognito = Some(cognito);
        self.memberships = memberships;
        self.cognito_scopes = scopes;
        self
    }

    pub fn cognito(&self) -> Option<&Cognito> {
        self.cognito.as_ref()
    }

    /// Verifies the value of an `authorization: Bearer <JWT>` header.
    pub async fn verify_header(
        &self,
        header: Option<&str>,
        active_tenant: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim(), active_tenant).await
    }

    /// Verifies a bare JWT. `active_tenant` (a client's `activeTenantId`)
    /// picks among a Cognito user's memberships; for a backend token it must
    /// be the token's own tenant, or any tenant for an all-tenants token.
    pub async fn verify(
        &self,
        token: &str,
        active_tenant: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let active_tenant = active_tenant.filter(|t| !t.is_empty());
        let header = read_header(token)?;
        match header.alg.as_str() {
            "HS256" => {
                let data = jsonwebtoken::decode::<Claims>(token, &self.hs256, &self.validation)
                    .map_err(|e| map_jwt_error(e.kind(), token))?;
                self.backend_identity(data.claims, active_tenant)
            }
            "RS256" => {
                let cognito = self
                    .cognito
                    .as_ref()
                    .ok_or(AuthError::CognitoNotConfigured)?;
                let user = cognito.verify(token, header.kid.as_deref()).await?;
                let tenants = self.memberships.tenants_of(&user.sub).await?;
                let tenant = choose_tenant(&tenants, active_tenant)?;
                Ok(Identity {
                    kind: TokenKind::Cognito,
                    subject: Some(user.sub),
                    tenant: Some(tenant),
                    scopes: self.cognito_scopes.clone(),
                    expires_at: check_exp(user.exp)?,
                    agent_id: None,
                })
            }
            alg if alg.eq_ignore_ascii_case("none") => Err(AuthError::AlgNone),
            alg => Err(AuthError::WrongAlgorithm {
                found: alg.chars().take(16).collect(),
            }),
        }
    }

    fn backend_identity(
        &self,
        claims: Claims,
        active_tenant: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let mut identity = self.identity(claims)?;
        if let Some(active) = active_tenant {
            check_identifier(active).map_err(AuthError::BadTenant)?;
            match &identity.tenant {
                Some(own) if own == active => {}
                _ if identity.scopes.all_tenants() => identity.tenant = Some(active.to_string()),
                _ => {
                    return Err(AuthError::NoMembership {
                        tenant: active.to_string(),
                    });
                }
            }
        }
        Ok(identity)
    }

    fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        let scopes = Scopes::from_claims(claims.scope.as_deref(), claims.scopes.as_deref())
            .unwrap_or_else(|| self.default_scopes.clone());
        let tenant = claims
            .tenant_id_camel
            .or(claims.tenant_id_snake)
            .filter(|t| !t.is_empty());
        if let Some(t) = &tenant {
            check_identifier(t).map_err(AuthError::BadTenant)?;
        } else if !scopes.all_tenants() {
            return Err(AuthError::NoTenant);
        }
        let agent_id = claims.agent_id.filter(|a| !a.is_empty());
        if let Some(a) = &agent_id {
            check_identifier(a).map_err(AuthError::BadAgent)?;
        }
        Ok(Identity {
            kind: TokenKind::Backend,
            subject: claims.sub,
            tenant,
            scopes,
            expires_at: check_exp(claims.exp)?,
            agent_id,
        })
    }
}

/// A Cognito user's tenant: the `activeTenantId` when it is one of the
/// memberships, the only membership when there is one.
fn choose_tenant(tenants: &[String], active: Option<&str>) -> Result<String, AuthError> {
    match (active, tenants) {
        (Some(active), _) if tenants.iter().any(|t| t == active) => Ok(active.to_string()),
        (Some(active), _) => Err(AuthError::NoMembership {
            tenant: active.chars().take(128).collect(),
        }),
        (None, []) => Err(AuthError::NoMemberships),
        (None, [only]) => Ok(only.clone()),
        (None, many) => Err(AuthError::ActiveTenantRequired { count: many.len() }),
    }
}

/// The header fields that pick a verifier. Nothing else in the header is
/// trusted.
struct RawHeader {
    alg: String,
    kid: Option<String>,
}

fn read_header(token: &str) -> Result<RawHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed("header is not base64url".into()))?;
    #[derive(Deserialize)]
    struct Fields {
        alg: Option<String>,
        kid: Option<String>,
    }
    let fields: Fields = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed("header is not a JSON object".into()))?;
    let alg = fields
        .alg
        .ok_or_else(|| AuthError::Malformed("header has no alg".into()))?;
    Ok(RawHeader {
        alg,
        kid: fields.kid,
    })
}

pub(crate) fn map_jwt_error(kind: &ErrorKind, token: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => {
            // The signature was valid, so the claims can be read for a
            // precise message.
            let exp = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
                .map(|d| d.claims.exp)
                .unwrap_or(0);
            AuthError::Expired {
                at: crate::clock::format_unix_secs(exp),
            }
        }
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::NoExpiry,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::WrongAlgorithm {
                found: "unknown".into(),
            }
        }
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::Malformed(format!("claim {c} has the wrong type"))
        }
        ErrorKind::Json(_) => AuthError::Malformed("claims are not a valid JSON object".into()),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            AuthError::Malformed("a part is not base64url JSON".into())
        }
        other => AuthError::Malformed(format!("{other:?}")),
    }
}

/// Mints an HS256 token for `tenant` (CLI `token`, tests, dev mode).
pub fn mint_hs256(
    secret: &[u8],
    tenant: Option<&str>,
    subject: Option<&str>,
    scopes: Option<&BTreeSet<String>>,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_agent_hs256(secret, tenant, subject, scopes, ttl, None)
}

/// [`mint_hs256`] with an `agent_id` claim when `agent` is given.
pub fn mint_agent_hs256(
    secret: &[u8],
    tenant: Option<&str>,
    subject: Option<&str>,
    scopes: Option<&BTreeSet<String>>,
    ttl: Duration,
    agent: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: subject.map(str::to_string),
        tenant_id_camel: tenant.map(str::to_string),
        scope: scopes.map(|s| s.iter().cloned().collect::<Vec<_>>().join(" ")),
        exp: now + ttl.as_secs(),
        iat: Some(now),
        agent_id: agent.map(str::to_string),
        ..Default::default()
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// A fresh random secret for development mode: 256 bits, hex.
pub fn generate_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbac::{ALL_TENANTS, PUBLISH, SUBSCRIBE};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::new(SECRET, Scopes::parse("events:publish events:subscribe"))
    }

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[tokio::test]
    async fn accepts_either_tenant_claim_and_scope_forms() {
        let a = auth();
        let t = sign(
            serde_json::json!({"tenantId": "tenant-a", "exp": now() + 60, "scope": "events:subscribe"}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a
            .verify_header(Some(&format!("Bearer {t}")), None)
            .await
            .expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-a"));
        assert!(id.scopes.has(SUBSCRIBE));
        assert!(!id.scopes.has(PUBLISH));
        let t = sign(
            serde_json::json!({"tenant_id": "tenant-b", "exp": now() + 60, "scopes": ["events:publish"]}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t, None).await.expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-b"));
        assert!(id.scopes.has(PUBLISH));
        let t = sign(
            serde_json::json!({"tenantId": "tenant-c", "exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t, None).await.expect("ok");
        assert!(
            id.scopes.has(PUBLISH) && id.scopes.has(SUBSCRIBE),
            "defaults"
        );
    }

    #[tokio::test]
    async fn refusals_say_which() {
        let a = auth();
        assert_eq!(a.verify_header(None, None).await, Err(AuthError::Missing));
        assert_eq!(
            a.verify_header(Some("Basic abc"), None).await,
            Err(AuthError::NotBearer)
        );
        assert!(matches!(
            a.verify("abc", None).await,
            Err(AuthError::Malformed(_))
        ));
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"tenantId":"t","exp":{}}}"#, now() + 60))
        );
        assert_eq!(a.verify(&none, None).await, Err(AuthError::AlgNone));
        let hs512 = sign(
            serde_json::json!({"tenantId": "t", "exp": now() + 60}),
            Algorithm::HS512,
            SECRET,
        );
        assert_eq!(
            a.verify(&hs512, None).await,
            Err(AuthError::WrongAlgorithm {
                found: "HS512".into()
            })
        );
        let forged = sign(
            serde_json::json!({"tenantId": "t", "exp": now() + 60}),
            Algorithm::HS256,
            b"another secret another secret !!",
        );
        assert_eq!(
            a.verify(&forged, None).await,
            Err(AuthError::InvalidSignature)
        );
        let expired = sign(
            serde_json::json!({"tenantId": "t", "exp": 1_700_000_000}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            a.verify(&expired, None).await,
            Err(AuthError::Expired {
                at: "2023-11-14T22:13:20.000Z".into()
            })
        );
        let no_exp = sign(
            serde_json::json!({"tenantId": "t"}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(a.verify(&no_exp, None).await, Err(AuthError::NoExpiry));
        for exp in [MAX_EXP + 1, u64::MAX - 31, u64::MAX] {
            let far = sign(
                serde_json::json!({"tenantId": "t", "exp": exp}),
                Algorithm::HS256,
                SECRET,
            );
            assert_eq!(
                a.verify(&far, None).await,
                Err(AuthError::ExpTooFar { exp }),
                "{exp}"
            );
        }
        let last = sign(
            serde_json::json!({"tenantId": "t", "exp": MAX_EXP}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(a.verify(&last, None).await.is_ok(), "the year 9999 is fine");
        let no_tenant = sign(
            serde_json::json!({"exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(a.verify(&no_tenant, None).await, Err(AuthError::NoTenant));
        let bad_tenant = sign(
            serde_json::json!({"tenantId": "a/b", "exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(matches!(
            a.verify(&bad_tenant, None).await,
            Err(AuthError::BadTenant(_))
        ));
        // Messages never carry the token or the secret.
        for err in [
            a.verify(&forged, None).await,
            a.verify(&expired, None).await,
        ] {
            let msg = err.expect_err("refused").to_string();
            assert!(!msg.contains(&forged) && !msg.contains("0123456789abcdef"));
        }
    }

    #[tokio::test]
    async fn all_tenants_token_needs_no_tenant() {
        let a = auth();
        let t = sign(
            serde_json::json!({"exp": now() + 60, "scope": format!("{ALL_TENANTS} {PUBLISH}")}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t, None).await.expect("ok");
        assert_eq!(id.tenant, None);
        assert!(id.scopes.all_tenants());
    }

    #[tokio::test]
    async fn active_tenant_must_be_the_tokens_own() {
        let a = auth();
        let t = sign(
            serde_json::json!({"tenantId": "tenant-a", "exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            a.verify(&t, Some("tenant-a"))
                .await
                .expect("own")
                .tenant
                .as_deref(),
            Some("tenant-a")
        );
        assert_eq!(
            a.verify(&t, Some("tenant-b")).await,
            Err(AuthError::NoMembership {
                tenant: "tenant-b".into()
            })
        );
        let service = sign(
            serde_json::json!({"exp": now() + 60, "scope": ALL_TENANTS}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            a.verify(&service, Some("tenant-z"))
                .await
                .expect("any")
                .tenant
                .as_deref(),
            Some("tenant-z")
        );
        let rs = format!("{}.{}.sig", b64(r#"{"alg":"RS256","kid":"k"}"#), b64("{}"));
        assert_eq!(
            a.verify(&rs, None).await,
            Err(AuthError::CognitoNotConfigured)
        );
    }

    #[test]
    fn choosing_among_memberships() {
        let two = ["tenant-a".to_string(), "tenant-b".to_string()];
        assert_eq!(choose_tenant(&two, Some("tenant-b")), Ok("tenant-b".into()));
        assert_eq!(
            choose_tenant(&two, Some("tenant-x")),
            Err(AuthError::NoMembership {
                tenant: "tenant-x".into()
            })
        );
        assert_eq!(
            choose_tenant(&two, None),
            Err(AuthError::ActiveTenantRequired { count: 2 })
        );
        assert_eq!(choose_tenant(&two[..1], None), Ok("tenant-a".into()));
        assert_eq!(choose_tenant(&[], None), Err(AuthError::NoMemberships));
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        let scopes: BTreeSet<String> = [PUBLISH.to_string()].into();
        let t = mint_hs256(
            SECRET,
            Some("tenant-x"),
            Some("svc"),
            Some(&scopes),
            Duration::from_secs(60),
        )
        .expect("mint");
        let id = auth().verify(&t, None).await.expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-x"));
        assert_eq!(id.subject.as_deref(), Some("svc"));
        assert!(id.scopes.has(PUBLISH) && !id.scopes.has(SUBSCRIBE));
        assert!(id.expires_at > now());
    }
}
