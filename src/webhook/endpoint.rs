//! A webhook endpoint: what is kept, what a client may send to create or
//! change one, and what it is shown (never a secret, except once at
//! creation and rotation).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::guard::Guard;
use super::sign;
use crate::broker::TypeFilter;
use crate::error::ApiError;

/// Longest description kept.
pub const MAX_DESCRIPTION: usize = 1024;
/// Longest secret overlap a rotation may ask for.
pub const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

/// An endpoint as stored (state table `webhooks`, tenant, id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub tenant: String,
    pub url: String,
    pub types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The current secret first; a rotated-out one with its expiry after.
    pub secrets: Vec<Secret>,
    /// First failure of the current run of failures, Unix ms.
    #[serde(default)]
    pub failing_since_ms: Option<u64>,
    #[serde(default)]
    pub disabled_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Secret {
    pub value: String,
    /// Unix ms after which it no longer signs; none for the current one.
    pub expires_at_ms: Option<u64>,
}

impl Secret {
    /// Whether a secret that expires at `expires_at_ms` signs at `now_ms`:
    /// the current one always, a rotated-out one until it expires.
    pub fn signs_at(expires_at_ms: Option<u64>, now_ms: u64) -> bool {
        expires_at_ms.is_none_or(|t| t > now_ms)
    }
}

/// What clients see of an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub id: String,
    pub url: String,
    pub types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Only in the answer to a creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl Endpoint {
    pub fn view(&self) -> View {
        View {
            id: self.id.clone(),
            url: self.url.clone(),
            types: self.types.clone(),
            description: self.description.clone(),
            enabled: self.enabled,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            disabled_reason: self.disabled_reason.clone(),
            secret: None,
        }
    }

    /// The type filter (validated when stored; none if it no longer
    /// parses, which matches nothing).
    pub fn filter(&self) -> Option<TypeFilter> {
        TypeFilter::parse(&self.types).ok()
    }

    /// Makes `secret` current; the current one signs for `overlap` more.
    pub fn rotate(&mut self, secret: String, now_ms: u64, overlap: Duration) -> Option<u64> {
        let previous = self.secrets.first().map(|s| s.value.clone());
        self.secrets.clear();
        self.secrets.push(Secret {
            value: secret,
            expires_at_ms: None,
        });
        let expires = now_ms.saturating_add(overlap.as_millis() as u64);
        match previous {
            Some(value) if !overlap.is_zero() => {
                self.secrets.push(Secret {
                    value,
                    expires_at_ms: Some(expires),
                });
                Some(expires)
            }
            _ => None,
        }
    }
}

/// `POST /v1/webhooks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Create {
    pub url: Option<String>,
    pub types: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `PATCH /v1/webhooks/{id}`: what is present changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub url: Option<String>,
    pub types: Option<Vec<String>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
}

/// `POST /v1/webhooks/{id}/rotate-secret`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    pub overlap: Option<String>,
}

/// Checks a URL: form, and a literal address against the guard.
pub fn check_url(guard: &Guard, url: &str) -> Result<String, ApiError> {
    guard
        .check_url(url.trim())
        .map(|u| u.to_string())
        .map_err(|e| ApiError::invalid(e.to_string()))
}

/// Checks type patterns as Subscribe does; at least one.
pub fn check_types(types: &[String]) -> Result<Vec<String>, ApiError> {
    if types.is_empty() {
        return Err(ApiError::invalid(
            "types: empty: list exact types or prefix patterns (alert.*), or [\"*\"] for every type",
        ));
    }
    let filter = TypeFilter::parse(types)?;
    if filter.is_all() {
        return Ok(vec!["*".into()]);
    }
    Ok(types.iter().map(|t| t.trim().to_string()).collect())
}

pub fn check_description(d: &str) -> Result<String, ApiError> {
    if d.chars().count() > MAX_DESCRIPTION {
        return Err(ApiError::invalid(format!(
            "description: longer than {MAX_DESCRIPTION} characters"
        )));
    }
    Ok(d.to_string())
}

/// Parses a rotation's overlap (`24h` by default, at most 7 days).
pub fn parse_overlap(overlap: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = overlap else {
        return Ok(Duration::from_secs(24 * 3600));
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        ApiError::invalid(format!(
            "overlap: {text:?} is not a duration like 24h or 30m: {e}"
        ))
    })?;
    if d > MAX_OVERLAP {
        return Err(ApiError::invalid("overlap: at most 7 days (168h)"));
    }
    Ok(d)
}

/// A new endpoint id.
pub fn new_id() -> String {
    format!("we_{}", uuid::Uuid::now_v7().simple())
}

/// A new secret.
pub fn new_secret() -> String {
    sign::new_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_checked_like_subscribe() {
        assert_eq!(check_types(&["*".into()]).unwrap(), vec!["*"]);
        assert!(
            check_types(&[])
                .unwrap_err()
                .message
                .contains("types: empty")
        );
        let e = check_types(&["Alert!".into()]).unwrap_err();
        assert!(e.message.contains("types[0]"), "{e}");
        assert_eq!(
            check_types(&["alert.*".into(), " cost.threshold_exceeded ".into()]).unwrap(),
            vec!["alert.*", "cost.threshold_exceeded"]
        );
    }

    #[test]
    fn rotation_keeps_the_previous_secret_for_the_overlap() {
        let mut e = Endpoint {
            id: "we_1".into(),
            tenant: "t".into(),
            url: "https://example.com".into(),
            types: vec!["*".into()],
            description: String::new(),
            enabled: true,
            created_at: String::new(),
            updated_at: String::new(),
            secrets: vec![Secret {
                value: "whsec_old".into(),
                expires_at_ms: None,
            }],
            failing_since_ms: None,
            disabled_reason: None,
        };
        let expires = e.rotate("whsec_new".into(), 1_000, Duration::from_secs(60));
        assert_eq!(expires, Some(61_000));
        let signing = |now| {
            e.secrets
                .iter()
                .filter(|s| Secret::signs_at(s.expires_at_ms, now))
                .map(|s| s.value.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(signing(2_000), vec!["whsec_new", "whsec_old"]);
        assert_eq!(signing(61_000), vec!["whsec_new"]);
        assert_eq!(e.rotate("whsec_3".into(), 2_000, Duration::ZERO), None);
        assert_eq!(e.secrets.len(), 1);
        assert!(parse_overlap(Some("8d")).is_err());
        assert!(
            parse_overlap(Some("soon"))
                .unwrap_err()
                .message
                .contains("overlap")
        );
        assert_eq!(parse_overlap(None).unwrap(), Duration::from_secs(86_400));
    }
}
