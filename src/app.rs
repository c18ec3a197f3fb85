//! What every surface does, once: authenticate, check rights, validate and
//! stamp, hand to the broker. gRPC and HTTP handlers only translate their
//! wire formats to these calls and back.

use std::sync::Arc;
use std::time::SystemTime;

use crate::auth::rbac::PUBLISH;
use crate::auth::{Authenticator, Identity};
use crate::broker::{Broker, Outcome, Subscription, TypeFilter};
use crate::error::ApiError;
use crate::event::{self, EventDraft, EventError, Stamp, check_identifier};
use crate::tenant::TenantScope;

/// Request-size limits shared by every publishing surface.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `data`, in bytes of JSON text.
    pub max_event_bytes: usize,
    /// Most events in one publish call.
    pub max_batch: usize,
}

impl Limits {
    /// Largest request body a publish may need: a full batch of full events
    /// plus room for the envelope fields.
    pub fn max_request_bytes(&self) -> usize {
        self.max_batch.max(1) * (self.max_event_bytes + 1024) + 64 * 1024
    }
}

/// The broker with its front door. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub broker: Broker,
    pub auth: Arc<Authenticator>,
    pub limits: Limits,
}

/// Parameters of a subscription, as any surface receives them.
#[derive(Debug, Clone, Default)]
pub struct SubscribeParams {
    pub types: Vec<String>,
    pub since_id: String,
    pub tenant_id: String,
}

impl App {
    /// Verifies an `authorization` header value; `active_tenant` is the
    /// `x-active-tenant-id` header (a Cognito user's choice of tenant).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        active_tenant: Option<&str>,
    ) -> Result<Identity, ApiError> {
        Ok(self
            .auth
            .verify_header(authorization, active_tenant)
            .await?)
    }

    /// Publish-wide context: limits and the caller's `traceparent`.
    pub fn stamp(&self, traceparent: Option<&str>) -> Stamp {
        Stamp {
            max_data_bytes: self.limits.max_event_bytes,
            trace_id: traceparent.and_then(event::trace_id_from_traceparent),
        }
    }

    /// Publishes a batch: every event is checked first, and one bad event
    /// refuses the whole batch (its message names the event's index), so
    /// nothing is half accepted.
    pub fn publish(
        &self,
        identity: &Identity,
        drafts: Vec<EventDraft>,
        stamp: &Stamp,
    ) -> Result<Vec<Outcome>, ApiError> {
        identity.require(PUBLISH)?;
        if drafts.is_empty() {
            return Err(EventError::BatchEmpty.into());
        }
        if drafts.len() > self.limits.max_batch {
            return Err(EventError::BatchTooLarge {
                len: drafts.len(),
                limit: self.limits.max_batch,
            }
            .into());
        }
        let now = SystemTime::now();
        let events = drafts
            .into_iter()
            .enumerate()
            .map(|(i, draft)| accept(identity, draft, stamp, now).map_err(|e| e.at_index(i)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.broker.publish(events))
    }

    /// Publishes one event (streaming publish acknowledges each on its own).
    pub fn publish_one(
        &self,
        identity: &Identity,
        draft: EventDraft,
        stamp: &Stamp,
    ) -> Result<Outcome, ApiError> {
        let event = accept(identity, draft, stamp, SystemTime::now())?;
        Ok(self.broker.publish_one(event))
    }

    /// Opens a subscription for `identity`.
    pub fn subscribe(
        &self,
        identity: &Identity,
        params: &SubscribeParams,
    ) -> Result<(TenantScope, Subscription), ApiError> {
        let scope = identity.subscribe_scope(&params.tenant_id)?;
        let filter = TypeFilter::parse(&params.types)?;
        let since = match params.since_id.as_str() {
            "" => None,
            id => {
                check_identifier(id).map_err(|r| ApiError::invalid(format!("since_id: {r}")))?;
                Some(id)
            }
        };
        if since.is_some() && scope == TenantScope::All {
            return Err(ApiError::invalid(
                "since_id: resuming needs one tenant: set tenant_id (history is kept per tenant)",
            ));
        }
        let subscription = self.broker.subscribe(scope.clone(), filter, since);
        Ok((scope, subscription))
    }
}

fn accept(
    identity: &Identity,
    draft: EventDraft,
    stamp: &Stamp,
    now: SystemTime,
) -> Result<event::Event, ApiError> {
    let tenant = identity.publish_tenant(&draft.tenant_id)?;
    Ok(event::accept(draft, &tenant, stamp, now)?)
}
