//! Signatures and secrets. A receiver gets
//! `X-TensorCost-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]`, where
//! each `<hex>` is the lowercase hex HMAC-SHA256 of `"<t>.<body>"` keyed by
//! one active secret's UTF-8 bytes (the whole `whsec_…` string): Stripe's
//! scheme, so receivers verify with code they already have.

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;

/// The header a delivery carries.
pub const HEADER: &str = "x-tensorcost-signature";

/// Secrets start with this, as Stripe's and Svix's do.
pub const SECRET_PREFIX: &str = "whsec_";

/// Lowercase hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    hex(ctx.sign().as_ref())
}

/// `t=<t>,v1=<sig>` with one `v1` per secret (two during a rotation).
pub fn header_value<'a>(secrets: impl IntoIterator<Item = &'a str>, t: u64, body: &[u8]) -> String {
    let mut out = format!("t={t}");
    for secret in secrets {
        out.push_str(",v1=");
        out.push_str(&signature(secret, t, body));
    }
    out
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

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn header_carries_one_v1_per_secret() {
        let h = header_value(["whsec_a", "whsec_b"], 12, b"{}");
        let parts: Vec<&str> = h.split(',').collect();
        assert_eq!(parts[0], "t=12");
        assert_eq!(parts.len(), 3);
        assert!(parts[1].starts_with("v1=") && parts[1].len() == 67);
        assert_ne!(parts[1], parts[2]);
        let s = new_secret();
        assert!(s.starts_with("whsec_") && s.len() == 6 + 43, "{s}");
        assert_ne!(s, new_secret());
    }
}
