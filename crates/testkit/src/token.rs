//! HS256 tokens with the broker's documented claims (`tenantId`, `scope`,
//! `sub`, `exp`, `iat`), minted independently of the broker's own code.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token for `tenant` (none: an all-tenants service token) with the
/// space-separated `scopes`, subject `sub`, valid for `ttl`.
pub fn mint(secret: &str, tenant: Option<&str>, scopes: &str, sub: &str, ttl: Duration) -> String {
    let now = unix_now();
    let mut claims = serde_json::json!({
        "sub": sub,
        "scope": scopes.split_whitespace().collect::<Vec<_>>().join(" "),
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    if let Some(t) = tenant {
        claims["tenantId"] = t.into();
    }
    sign(secret, &claims)
}

/// Any claims, signed HS256 with `secret`.
pub fn sign(secret: &str, claims: &serde_json::Value) -> String {
    // Encoding a JSON object with a byte secret cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("HS256 signing failed: {e}"))
}
