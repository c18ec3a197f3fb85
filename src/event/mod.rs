//! The event envelope: what a producer sends ([`EventDraft`]), what the
//! broker stamps and keeps ([`Event`]), the rules an event must follow
//! before it is accepted ([`rules`]), and the envelope's wire forms, each
//! written once: [`json`] (REST, Redis, webhooks, `tail`), [`protobuf`]
//! (gRPC) and [`socketio`] (the `event` message).
//!
//! `data` is kept as the producer's JSON text ([`RawValue`]) from acceptance
//! to delivery, so it round-trips exactly: `42` stays `42`, a 30-digit
//! decimal keeps every digit, key order is kept.

pub mod json;
pub mod protobuf;
pub mod rules;
pub mod socketio;

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use rules::{
    EventError, check_identifier, is_trace_id, new_event_id, new_trace_id, parse_data,
    parse_traceparent, validate_type,
};

/// An accepted event, as it is stored in history, delivered to
/// subscribers and written to Redis. Shared by `Arc` between every
/// subscriber that receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub tenant_id: String,
    pub data: Box<RawValue>,
    pub timestamp: String,
    pub trace_id: String,
}

impl Event {
    /// Approximate memory held by this event, for history byte bounds.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.id.len()
            + self.event_type.len()
            + self.tenant_id.len()
            + self.data.get().len()
            + self.timestamp.len()
            + self.trace_id.len()
    }
}

pub type SharedEvent = Arc<Event>;

/// What a producer asks the broker to publish, before validation.
#[derive(Debug, Clone, Default)]
pub struct EventDraft {
    /// Producer-supplied id; empty means "stamp one".
    pub id: String,
    pub event_type: String,
    /// Requested tenant; empty means the token's own tenant.
    pub tenant_id: String,
    /// JSON text.
    pub data: String,
    /// Producer-supplied W3C trace id; empty means the caller's `traceparent`
    /// or a new one.
    pub trace_id: String,
}

/// Everything that is fixed for one publish call: limits and the caller's
/// trace context.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub max_data_bytes: usize,
    /// From the caller's `traceparent`, if it had a valid one.
    pub trace_id: Option<String>,
    /// That `traceparent`'s span: the parent of the publish spans exported
    /// over OTLP.
    pub parent_span_id: Option<u64>,
}

impl Stamp {
    /// The caller's trace and span, for publish spans.
    pub fn parent(&self) -> (Option<&str>, Option<u64>) {
        (self.trace_id.as_deref(), self.parent_span_id)
    }
}

/// Validates one draft for `tenant_id` and stamps id, timestamp and trace id.
/// Returns a fully formed event; nothing is dispatched here.
pub fn accept(
    draft: EventDraft,
    tenant_id: &str,
    stamp: &Stamp,
    now: SystemTime,
) -> Result<Event, EventError> {
    validate_type(&draft.event_type)?;
    let data = parse_data(draft.data, stamp.max_data_bytes)?;
    let id = if draft.id.is_empty() {
        new_event_id()
    } else {
        check_identifier(&draft.id).map_err(|reason| EventError::IdInvalid { reason })?;
        draft.id
    };
    let trace_id = if draft.trace_id.is_empty() {
        stamp.trace_id.clone().unwrap_or_else(new_trace_id)
    } else if is_trace_id(&draft.trace_id) {
        draft.trace_id
    } else {
        return Err(EventError::TraceIdInvalid {
            value: draft.trace_id.chars().take(64).collect(),
        });
    };
    Ok(Event {
        id,
        event_type: draft.event_type,
        tenant_id: tenant_id.to_string(),
        data,
        timestamp: crate::clock::timestamp_now(now),
        trace_id,
    })
}

/// An event the broker itself publishes (delivery trace, notices): its
/// type is one of the broker's own and its data is serialized here, so
/// neither is checked again. The trace id is kept when it is one, else new.
pub fn internal(
    tenant_id: &str,
    event_type: &str,
    data: &impl Serialize,
    trace_id: &str,
    now: SystemTime,
) -> Result<Event, serde_json::Error> {
    Ok(Event {
        id: new_event_id(),
        event_type: event_type.to_string(),
        tenant_id: tenant_id.to_string(),
        data: serde_json::value::to_raw_value(data)?,
        timestamp: crate::clock::timestamp_now(now),
        trace_id: if is_trace_id(trace_id) {
            trace_id.to_string()
        } else {
            new_trace_id()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_events_keep_a_valid_trace_id_only() {
        let now = SystemTime::now();
        let data = serde_json::json!({"a": 1});
        let kept = internal(
            "t",
            "notification.sent",
            &data,
            "4bf92f3577b34da6a3ce929d0e0e4736",
            now,
        )
        .unwrap();
        assert_eq!(kept.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(kept.data.get(), r#"{"a":1}"#);
        let fresh = internal("t", "system.webhook_disabled", &data, "", now).unwrap();
        assert!(is_trace_id(&fresh.trace_id));
        assert_ne!(fresh.id, kept.id);
    }

    #[test]
    fn stamping() {
        let stamp = Stamp {
            max_data_bytes: 1024,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            parent_span_id: None,
        };
        let draft = EventDraft {
            event_type: "cost.updated".into(),
            data: r#"{"amount":42}"#.into(),
            ..Default::default()
        };
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_777_480_898_412);
        let event = accept(draft, "tenant-a", &stamp, now).expect("accepted");
        assert_eq!(event.timestamp, "2026-04-29T16:41:38.412Z");
        assert_eq!(event.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            uuid::Uuid::try_parse(&event.id).map(|u| u.get_version_num()),
            Ok(7)
        );
        assert_eq!(
            event.to_json(),
            format!(
                r#"{{"id":"{}","type":"cost.updated","tenant_id":"tenant-a","data":{{"amount":42}},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}}"#,
                event.id
            )
        );
    }
}
