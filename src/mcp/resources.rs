//! MCP resources for live events: `events://{pattern}`, where the pattern
//! is one Subscribe type pattern (`cost.*`, `alert.created`, `*`).
//!
//! Reading one gives the tenant's newest matching events from history.
//! Following one sends `notifications/resources/updated` for that URI as
//! matching events are dispatched: through `subscriptions/listen` at
//! protocol revision 2026-07-28 (over HTTP and stdio: the notifications
//! ride the listen request's own stream, so no session is kept), and
//! through `resources/subscribe` at earlier revisions over stdio, whose
//! connection is the session. A follower is one broker subscription of the
//! caller's tenant, counted against the tenant's subscriber cap and ended
//! when the token expires.

use std::future::Future;

use futures_util::FutureExt;
use rmcp::ErrorData;
use rmcp::model::{
    ErrorCode, ReadResourceResult, Resource, ResourceContents, ResourceTemplate, SubscriptionFilter,
};
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::app::{App, RecentParams, SubscribeParams};
use crate::auth::Identity;
use crate::broker::{Delivery, Subscription, TypeFilter};
use crate::error::ApiError;

/// The URI scheme of event resources.
pub const SCHEME: &str = "events://";
/// The resource template clients fill in.
pub const TEMPLATE: &str = "events://{pattern}";
/// Most URIs one follower watches (one listen request, or one stdio
/// connection's `resources/subscribe` calls together).
pub const MAX_URIS: usize = 16;
/// Most dispatched events looked at before the notifications they cause
/// are sent: a burst becomes one notification per URI.
const COALESCE: usize = 1024;

/// The type pattern of an `events://` URI, checked as Subscribe checks it.
pub fn pattern(uri: &str) -> Result<TypeFilter, ApiError> {
    let Some(pattern) = uri.strip_prefix(SCHEME) else {
        return Err(ApiError::invalid(format!(
            "uri: {:?} is not an event resource: expected {TEMPLATE}, e.g. events://cost.*",
            shorten(uri)
        )));
    };
    TypeFilter::parse(&[pattern])
        .map_err(|_| {
            ApiError::invalid(format!(
                "uri: {:?} has no valid type pattern after events:// (an exact type like alert.created, a prefix like cost.*, or *)",
                shorten(uri)
            ))
        })
        .and_then(|filter| {
            if pattern.trim().is_empty() {
                Err(ApiError::invalid(
                    "uri: events:// needs a type pattern, e.g. events://cost.* (events://* for every type)",
                ))
            } else {
                Ok(filter)
            }
        })
}

fn shorten(uri: &str) -> String {
    uri.chars().take(140).collect()
}

/// A refusal as a JSON-RPC error: the code and the message naming what
/// was wrong (resources have no tool-error form).
pub fn protocol_error(e: &ApiError) -> ErrorData {
    let code = match e.code.http().as_u16() {
        400 | 404 | 413 => ErrorCode::INVALID_PARAMS,
        _ => ErrorCode::INVALID_REQUEST,
    };
    ErrorData::new(
        code,
        format!("{}: {}", e.code.as_str(), e.message),
        serde_json::to_value(e).ok(),
    )
}

/// What `resources/list` shows: every event.
pub fn listed() -> Vec<Resource> {
    vec![
        Resource::new(format!("{SCHEME}*"), "events")
            .with_title("Every event of your tenant")
            .with_description(
                "The newest events of every type (read), or a notification as each arrives \
                 (subscribe). Scope: events:subscribe.",
            )
            .with_mime_type("application/json"),
    ]
}

/// What `resources/templates/list` shows.
pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new(TEMPLATE, "events by type")
            .with_title("Events of a type or prefix")
            .with_description(
                "pattern: an exact type (alert.created), a prefix (cost.*) or * for every \
                 type. Reading gives the newest 100 matching events, oldest first; \
                 subscribing notifies as matching events arrive. Scope: events:subscribe.",
            )
            .with_mime_type("application/json"),
    ]
}

#[derive(Serialize)]
struct Contents {
    events: Vec<serde_json::Value>,
}

/// `resources/read` of an `events://` URI: the newest matching events.
pub fn read(app: &App, identity: &Identity, uri: &str) -> Result<ReadResourceResult, ApiError> {
    pattern(uri)?;
    let pattern = &uri[SCHEME.len()..];
    let page = app.recent_events(
        identity,
        &RecentParams {
            types: vec![pattern.to_string()],
            since: None,
            limit: None,
        },
    )?;
    let contents = Contents {
        events: page
            .events
            .iter()
            .filter_map(|e| serde_json::from_str(&e.to_json()).ok())
            .collect(),
    };
    let text = serde_json::to_string(&contents).unwrap_or_default();
    Ok(ReadResourceResult::new(vec![
        ResourceContents::text(text, uri).with_mime_type("application/json"),
    ]))
}

/// The part of a `subscriptions/listen` filter this server honours: event
/// URIs with valid patterns, at most [`MAX_URIS`]; nothing else.
pub fn accepted(requested: &SubscriptionFilter) -> SubscriptionFilter {
    let uris: Vec<String> = requested
        .resource_subscriptions
        .iter()
        .flatten()
        .filter(|uri| pattern(uri).is_ok())
        .take(MAX_URIS)
        .cloned()
        .collect();
    SubscriptionFilter::builder()
        .resource_subscriptions(uris)
        .build()
}

/// How a follow ended, when it was not asked to.
#[derive(Debug)]
pub enum Ended {
    /// The broker is shutting down, or the client stopped reading.
    Closed,
    /// The caller's token expired.
    Expired,
    /// It fell behind, and following again was refused (the tenant's
    /// subscriber cap).
    Refused(ApiError),
}

/// One broker subscription of the caller's tenant behind a set of URIs.
pub struct Follower {
    app: App,
    identity: Identity,
    uris: Vec<(String, TypeFilter)>,
    subscription: Subscription,
}

impl Follower {
    /// Opens the subscription, checking the scope and every URI. (A
    /// listen is acknowledged by rmcp before this runs; its caller
    /// notifies every URI once when this succeeds.)
    pub fn open(app: &App, identity: &Identity, uris: &[String]) -> Result<Self, ApiError> {
        if uris.len() > MAX_URIS {
            return Err(ApiError::invalid(format!(
                "{} event resources followed at once is more than the limit of {MAX_URIS}",
                uris.len()
            )));
        }
        let uris = uris
            .iter()
            .map(|uri| Ok((uri.clone(), pattern(uri)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let subscription = subscribe(app, identity, &uris)?;
        Ok(Self {
            app: app.clone(),
            identity: identity.clone(),
            uris,
            subscription,
        })
    }

    /// Sends `notify(uri)` for each URI a dispatched event matches, one per
    /// URI for a burst, until the subscription ends or `notify` fails (the
    /// client is gone). A follower that falls behind is resubscribed and
    /// every URI notified: something changed.
    pub async fn run<F, Fut>(mut self, mut notify: F) -> Ended
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = bool>,
    {
        loop {
            let Some(first) = self.subscription.next().await else {
                return Ended::Closed;
            };
            let mut changed = vec![false; self.uris.len()];
            let mut next = Some(first);
            let mut seen = 0;
            while let Some(delivery) = next.take() {
                match delivery {
                    Delivery::Event(event) => {
                        for (hit, (_, filter)) in changed.iter_mut().zip(&self.uris) {
                            *hit |= filter.matches(&event.event_type);
                        }
                    }
                    Delivery::Lagged { .. } => {
                        changed.iter_mut().for_each(|hit| *hit = true);
                        match subscribe(&self.app, &self.identity, &self.uris) {
                            Ok(subscription) => self.subscription = subscription,
                            Err(e) => return Ended::Refused(e),
                        }
                        break;
                    }
                    Delivery::Closed { .. } => return Ended::Closed,
                    Delivery::Expired { .. } => return Ended::Expired,
                }
                seen += 1;
                if seen < COALESCE {
                    next = self.subscription.next().now_or_never().flatten();
                }
            }
            for ((uri, _), hit) in self.uris.iter().zip(changed) {
                if hit && !notify(uri.clone()).await {
                    return Ended::Closed;
                }
            }
        }
    }
}

fn subscribe(
    app: &App,
    identity: &Identity,
    uris: &[(String, TypeFilter)],
) -> Result<Subscription, ApiError> {
    let tenant = identity.acting_tenant("")?;
    let types = uris
        .iter()
        .flat_map(|(_, filter)| filter.patterns())
        .collect();
    let (_, subscription) = app.subscribe(
        identity,
        &SubscribeParams {
            types,
            since_id: String::new(),
            tenant_id: tenant,
        },
    )?;
    Ok(subscription)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_uris_are_checked_and_named() {
        assert!(pattern("events://cost.*").is_ok());
        assert!(pattern("events://alert.created").is_ok());
        assert!(pattern("events://*").is_ok());
        for bad in [
            "events://",
            "events://cost.",
            "file:///etc/passwd",
            "events://a b",
        ] {
            let e = pattern(bad).unwrap_err();
            assert!(e.message.starts_with("uri:"), "{bad}: {}", e.message);
        }
        let accepted = accepted(
            &SubscriptionFilter::builder()
                .resource_subscriptions(["events://cost.*", "nope://x", "events://alert.*"])
                .build(),
        );
        assert_eq!(
            accepted.resource_subscriptions.unwrap(),
            vec![
                "events://cost.*".to_string(),
                "events://alert.*".to_string()
            ]
        );
    }
}
