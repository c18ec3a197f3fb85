//! Who is calling: bearer tokens verified into an [`Identity`] (tenant,
//! scopes, expiry). One module for every surface (gRPC, REST, Socket.IO,
//! MCP), so a token means the same thing everywhere.
//!
//! Backend-issued tokens are HS256, verified against the shared secret; the
//! tenant is the `tenantId` or `tenant_id` claim. The algorithm is decided
//! by the broker, never by the token: the header's `alg` is read only to
//! give a precise refusal (`none`, a different algorithm).

pub mod rbac;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::event::check_identifier;
pub use rbac::Scopes;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, when it has one.
    pub subject: Option<String>,
    /// The token's tenant. `None` only for all-tenants service tokens.
    pub tenant: Option<String>,
    pub scopes: Scopes,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
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
    #[error("token algorithm {found} is not accepted: backend tokens must be HS256")]
    WrongAlgorithm { found: String },
    #[error("invalid signature: the token was not signed with this broker's secret")]
    InvalidSignature,
    #[error("token expired at {at}")]
    Expired { at: String },
    #[error("token has no exp claim: tokens must expire")]
    NoExpiry,
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token has no tenant: set the tenantId or tenant_id claim")]
    NoTenant,
    #[error("token tenant is invalid: {0}")]
    BadTenant(String),
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
}

/// Verifies tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    hs256: DecodingKey,
    validation: Validation,
    /// Scopes of a token that carries no `scope`/`scopes` claim at all.
    default_scopes: Scopes,
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
        }
    }

    /// Verifies the value of an `authorization` header (or of a bare token
    /// when `header` has no scheme and `bare_ok` is set).
    pub fn verify_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim())
    }

    /// Verifies a bare JWT.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let alg = header_alg(token)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::AlgNone);
        }
        if alg != "HS256" {
            return Err(AuthError::WrongAlgorithm { found: alg });
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.hs256, &self.validation)
            .map_err(|e| map_jwt_error(e.kind(), token))?;
        self.identity(data.claims)
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
        Ok(Identity {
            subject: claims.sub,
            tenant,
            scopes,
            expires_at: claims.exp,
        })
    }
}

/// Reads `alg` from a JWT header without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, AuthError> {
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
    struct RawHeader {
        alg: Option<String>,
    }
    let raw: RawHeader = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed("header is not a JSON object".into()))?;
    raw.alg
        .ok_or_else(|| AuthError::Malformed("header has no alg".into()))
}

fn map_jwt_error(kind: &ErrorKind, token: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => {
            // The signature was valid, so the claims can be read for a
            // precise message.
            let exp = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
                .map(|d| d.claims.exp)
                .unwrap_or(0);
            AuthError::Expired {
                at: crate::event::format_timestamp(UNIX_EPOCH + Duration::from_secs(exp)),
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

    #[test]
    fn accepts_either_tenant_claim_and_scope_forms() {
        let a = auth();
        let t = sign(
            serde_json::json!({"tenantId": "tenant-a", "exp": now() + 60, "scope": "events:subscribe"}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify_header(Some(&format!("Bearer {t}"))).expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-a"));
        assert!(id.scopes.has(SUBSCRIBE));
        assert!(!id.scopes.has(PUBLISH));
        let t = sign(
            serde_json::json!({"tenant_id": "tenant-b", "exp": now() + 60, "scopes": ["events:publish"]}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t).expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-b"));
        assert!(id.scopes.has(PUBLISH));
        let t = sign(
            serde_json::json!({"tenantId": "tenant-c", "exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t).expect("ok");
        assert!(
            id.scopes.has(PUBLISH) && id.scopes.has(SUBSCRIBE),
            "defaults"
        );
    }

    #[test]
    fn refusals_say_which() {
        let a = auth();
        assert_eq!(a.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            a.verify_header(Some("Basic abc")),
            Err(AuthError::NotBearer)
        );
        assert!(matches!(a.verify("abc"), Err(AuthError::Malformed(_))));
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"tenantId":"t","exp":{}}}"#, now() + 60))
        );
        assert_eq!(a.verify(&none), Err(AuthError::AlgNone));
        let hs512 = sign(
            serde_json::json!({"tenantId": "t", "exp": now() + 60}),
            Algorithm::HS512,
            SECRET,
        );
        assert_eq!(
            a.verify(&hs512),
            Err(AuthError::WrongAlgorithm {
                found: "HS512".into()
            })
        );
        let forged = sign(
            serde_json::json!({"tenantId": "t", "exp": now() + 60}),
            Algorithm::HS256,
            b"another secret another secret !!",
        );
        assert_eq!(a.verify(&forged), Err(AuthError::InvalidSignature));
        let expired = sign(
            serde_json::json!({"tenantId": "t", "exp": 1_700_000_000}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            a.verify(&expired),
            Err(AuthError::Expired {
                at: "2023-11-14T22:13:20.000Z".into()
            })
        );
        let no_exp = sign(
            serde_json::json!({"tenantId": "t"}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(a.verify(&no_exp), Err(AuthError::NoExpiry));
        let no_tenant = sign(
            serde_json::json!({"exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(a.verify(&no_tenant), Err(AuthError::NoTenant));
        let bad_tenant = sign(
            serde_json::json!({"tenantId": "a/b", "exp": now() + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(matches!(
            a.verify(&bad_tenant),
            Err(AuthError::BadTenant(_))
        ));
        // Messages never carry the token or the secret.
        for err in [a.verify(&forged), a.verify(&expired)] {
            let msg = err.expect_err("refused").to_string();
            assert!(!msg.contains(&forged) && !msg.contains("0123456789abcdef"));
        }
    }

    #[test]
    fn all_tenants_token_needs_no_tenant() {
        let a = auth();
        let t = sign(
            serde_json::json!({"exp": now() + 60, "scope": format!("{ALL_TENANTS} {PUBLISH}")}),
            Algorithm::HS256,
            SECRET,
        );
        let id = a.verify(&t).expect("ok");
        assert_eq!(id.tenant, None);
        assert!(id.scopes.all_tenants());
    }

    #[test]
    fn minted_tokens_verify() {
        let scopes: BTreeSet<String> = [PUBLISH.to_string()].into();
        let t = mint_hs256(
            SECRET,
            Some("tenant-x"),
            Some("svc"),
            Some(&scopes),
            Duration::from_secs(60),
        )
        .expect("mint");
        let id = auth().verify(&t).expect("ok");
        assert_eq!(id.tenant.as_deref(), Some("tenant-x"));
        assert_eq!(id.subject.as_deref(), Some("svc"));
        assert!(id.scopes.has(PUBLISH) && !id.scopes.has(SUBSCRIBE));
        assert!(id.expires_at > now());
    }
}
