//! Signatures and secrets. A receiver gets
//! `X-TensorCost-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]`, where
//! each `<hex>` is the lowercase hex HMAC-SHA256 of `"<t>.<body>"` keyed by
//! one active secret's UTF-8 bytes (the whole `whsec_…` string): Stripe's
//! scheme, so receivers verify with code they already have.

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;

use super::endpoint::{Endpoint, Secret};

/// The header a delivery carries.
pub const HEADER: &str = "x-tensorcost-signature";

/// Secrets start with this, as Stripe's and Svix's do.
pub const SECRET_PREFIX: &str = "whsec_";

/// Appends the lowercase hex HMAC-SHA256 of `"<t>.<body>"` under `key`.
fn sign_into(out: &mut String, key: &hmac::Key, t: u64, body: &[u8]) {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    hex_into(out, ctx.sign().as_ref());
}

/// An endpoint's secrets as HMAC keys, made once when the endpoint is
/// loaded rather than at every delivery.
pub struct Signer {
    /// Each key and when it stops signing (Unix ms; none: current).
    keys: Vec<(hmac::Key, Option<u64>)>,
}

impl Signer {
    pub fn new(endpoint: &Endpoint) -> Self {
        Self {
            keys: endpoint
                .secrets
                .iter()
                .map(|s| {
                    (
                        hmac::Key::new(hmac::HMAC_SHA256, s.value.as_bytes()),
                        s.expires_at_ms,
                    )
                })
                .collect(),
        }
    }

    /// `t=<t>,v1=<sig>` with one `v1` per secret that signs at `now_ms`
    /// (two during a rotation), `t` being `now_ms` in seconds.
    pub fn header_value(&self, now_ms: u64, body: &[u8]) -> String {
        let t = now_ms / 1000;
        let mut out = String::with_capacity(16 + 68 * self.keys.len());
        out.push_str("t=");
        out.push_str(&t.to_string());
        for (key, expires) in &self.keys {
            if Secret::signs_at(*expires, now_ms) {
                out.push_str(",v1=");
                sign_into(&mut out, key, t, body);
            }
        }
        out
    }
}

/// A new secret: `whsec_` and 32 random bytes, base64url.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    // The system's random source failing is not recoverable here.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn hex_into(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowercase hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
    fn signature(secret: &str, t: u64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut out = String::with_capacity(64);
        sign_into(&mut out, &key, t, body);
        out
    }

    fn hex(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len() * 2);
        hex_into(&mut out, bytes);
        out
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231 test case 2, with the message split as "<t>.<body>".
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let whole = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, b"whsec_x"),
            b"1700000000.{\"a\":1}",
        );
        assert_eq!(
            signature("whsec_x", 1_700_000_000, b"{\"a\":1}"),
            hex(whole.as_ref())
        );
    }

    #[test]
    fn header_carries_one_v1_per_secret_that_signs() {
        let mut endpoint: crate::webhook::endpoint::Endpoint =
            serde_json::from_value(serde_json::json!({
                "id": "we_1", "tenant": "t", "url": "https://example.com/", "types": ["*"],
                "description": "", "enabled": true, "created_at": "", "updated_at": "",
                "secrets": [{"value": "whsec_a", "expires_at_ms": null}],
            }))
            .unwrap();
        endpoint.rotate("whsec_b".into(), 1_000, std::time::Duration::from_secs(10));
        let signer = Signer::new(&endpoint);
        let h = signer.header_value(5_500, b"{}");
        let parts: Vec<&str> = h.split(',').collect();
        assert_eq!(parts[0], "t=5");
        assert_eq!(parts.len(), 3, "{h}");
        assert_eq!(parts[1], format!("v1={}", signature("whsec_b", 5, b"{}")));
        assert_eq!(parts[2], format!("v1={}", signature("whsec_a", 5, b"{}")));
        // Past the overlap only the new secret signs.
        let h = signer.header_value(11_000, b"{}");
        assert_eq!(h, format!("t=11,v1={}", signature("whsec_b", 11, b"{}")));
        let s = new_secret();
        assert!(s.starts_with("whsec_") && s.len() == 6 + 43, "{s}");
        assert_ne!(s, new_secret());
    }
}
