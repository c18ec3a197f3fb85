//! Cognito RS256 ID tokens, verified against the user pool's JWKS.
//!
//! Keys are cached by (issuer, kid): a cache keyed by kid alone would let a
//! key of one issuer verify another issuer's tokens. A token whose kid is
//! cached never waits on the network. An unknown kid triggers one re-fetch
//! (single flight, at most one per `min_refetch`), which is how key rotation
//! is picked up; every fetch has a timeout. Only RSA keys are taken from
//! the JWKS, so a symmetric key published there can never verify a token.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthError, LEEWAY_SECS};

/// Where a user pool's keys are and what its tokens must say.
#[derive(Debug, Clone)]
pub struct CognitoConfig {
    /// `https://cognito-idp.<region>.amazonaws.com/<pool id>`.
    pub issuer: String,
    pub jwks_url: String,
    /// The app client id: the ID token's `aud`.
    pub client_id: String,
    /// Least time between two JWKS fetches caused by unknown kids.
    pub min_refetch: Duration,
    pub fetch_timeout: Duration,
}

impl CognitoConfig {
    /// The issuer of a pool from its region and id.
    pub fn issuer_for(region: &str, pool_id: &str) -> String {
        format!("https://cognito-idp.{region}.amazonaws.com/{pool_id}")
    }

    /// The JWKS URL Cognito publishes for an issuer.
    pub fn jwks_url_for(issuer: &str) -> String {
        format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/'))
    }
}

/// What a verified Cognito ID token tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CognitoUser {
    /// `sub`: the user's `cognito_sub`.
    pub sub: String,
    pub exp: u64,
}

#[derive(Debug, Deserialize)]
struct CognitoClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    token_use: Option<String>,
    #[serde(default)]
    exp: u64,
}

pub struct Cognito {
    config: CognitoConfig,
    http: reqwest::Client,
    keys: RwLock<HashMap<(String, String), DecodingKey>>,
    /// When the last fetch started; the async mutex makes fetches single
    /// flight without holding up tokens whose kid is cached.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    validation: Validation,
}

impl Cognito {
    pub fn new(config: CognitoConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            .build()?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.client_id.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(Self {
            config,
            http,
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            validation,
        })
    }

    pub fn config(&self) -> &CognitoConfig {
        &self.config
    }

    /// Fetches the JWKS now (at start-up, so the first connections find
    /// the keys cached). A failure is logged; verification retries later.
    pub async fn prefetch(&self) {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        if let Err(e) = self.fetch().await {
            tracing::warn!(url = %self.config.jwks_url, "cannot fetch Cognito JWKS: {e}");
        }
    }

    /// Verifies an RS256 ID token of this pool.
    pub async fn verify(&self, token: &str, kid: Option<&str>) -> Result<CognitoUser, AuthError> {
        let kid = kid.ok_or_else(|| AuthError::Malformed("header has no kid".into()))?;
        let claims = match self.with_key(kid, |key| self.decode(token, kid, key)) {
            Some(result) => result?,
            None => {
                self.refetch_for(kid).await?;
                self.with_key(kid, |key| self.decode(token, kid, key))
                    .ok_or_else(|| AuthError::UnknownKey {
                        kid: kid.chars().take(64).collect(),
                    })??
            }
        };
        match claims.token_use.as_deref() {
            Some("id") => {}
            other => {
                return Err(AuthError::WrongTokenUse {
                    found: other.unwrap_or("none").chars().take(32).collect(),
                });
            }
        }
        let sub = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Malformed("token has no sub".into()))?;
        Ok(CognitoUser {
            sub,
            exp: claims.exp,
        })
    }

    fn with_key<T>(&self, kid: &str, f: impl FnOnce(&DecodingKey) -> T) -> Option<T> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(&(self.config.issuer.clone(), kid.to_string()))
            .map(f)
    }

    fn decode(
        &self,
        token: &str,
        kid: &str,
        key: &DecodingKey,
    ) -> Result<CognitoClaims, AuthError> {
        jsonwebtoken::decode::<CognitoClaims>(token, key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::InvalidPoolSignature {
                    kid: kid.chars().take(64).collect(),
                },
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::NoExpiry,
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Malformed(format!("token has no {c} claim"))
                }
                kind => super::map_jwt_error(kind, token),
            })
    }

    /// Re-fetches the JWKS for an unknown kid, unless another fetch already
    /// brought it or the last fetch was too recent.
    async fn refetch_for(&self, kid: &str) -> Result<(), AuthError> {
        let mut last = self.last_fetch.lock().await;
        if self.with_key(kid, |_| ()).is_some() {
            return Ok(());
        }
        if let Some(at) = *last {
            let since = at.elapsed();
            if since < self.config.min_refetch {
                return Err(AuthError::UnknownKeyRecentlyChecked {
                    kid: kid.chars().take(64).collect(),
                    secs: since.as_secs(),
                });
            }
        }
        *last = Some(Instant::now());
        self.fetch().await
    }

    async fn fetch(&self) -> Result<(), AuthError> {
        let unavailable = |reason: String| AuthError::KeysUnavailable { reason };
        let response = self
            .http
            .get(&self.config.jwks_url)
            .send()
            .await
            .map_err(|e| {
                unavailable(if e.is_timeout() {
                    "timed out".into()
                } else {
                    "connection failed".into()
                })
            })?;
        if !response.status().is_success() {
            return Err(unavailable(format!("HTTP {}", response.status().as_u16())));
        }
        let body = response
            .bytes()
            .await
            .map_err(|_| unavailable("body could not be read".into()))?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|_| unavailable("the answer is not a JWKS".into()))?;
        let mut fresh = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), AlgorithmParameters::RSA(rsa)) = (&jwk.common.key_id, &jwk.algorithm)
            else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            match DecodingKey::from_rsa_components(&rsa.n, &rsa.e) {
                Ok(key) => {
                    fresh.insert((self.config.issuer.clone(), kid.clone()), key);
                }
                Err(e) => tracing::warn!(%kid, "skipping unusable JWKS key: {e}"),
            }
        }
        tracing::info!(keys = fresh.len(), url = %self.config.jwks_url, "fetched Cognito JWKS");
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.retain(|(issuer, _), _| issuer != &self.config.issuer);
        keys.extend(fresh);
        Ok(())
    }
}

impl std::fmt::Debug for Cognito {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cognito")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}
