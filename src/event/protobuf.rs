//! The envelope as protobuf (`tensorcost.events.v1.Event`): `data` travels
//! as JSON text in a string field, so numbers round-trip exactly.

use serde_json::value::RawValue;

use super::{Event, EventDraft};
use crate::proto;

impl From<proto::Event> for EventDraft {
    fn from(e: proto::Event) -> Self {
        EventDraft {
            id: e.id,
            event_type: e.r#type,
            tenant_id: e.tenant_id,
            data: e.data,
            trace_id: e.trace_id,
        }
    }
}

impl From<&Event> for proto::Event {
    fn from(e: &Event) -> Self {
        proto::Event {
            id: e.id.clone(),
            r#type: e.event_type.clone(),
            tenant_id: e.tenant_id.clone(),
            data: e.data.get().to_string(),
            timestamp: e.timestamp.clone(),
            trace_id: e.trace_id.clone(),
        }
    }
}

impl Event {
    /// An event as a subscriber received it (the `tail` command), back as an
    /// envelope; `data` that is not JSON text is kept as a JSON string.
    pub fn from_received(e: proto::Event) -> Self {
        let data = RawValue::from_string(e.data.clone()).unwrap_or_else(|_| {
            serde_json::value::to_raw_value(&e.data).unwrap_or_else(|_| RawValue::NULL.to_owned())
        });
        Event {
            id: e.id,
            event_type: e.r#type,
            tenant_id: e.tenant_id,
            data,
            timestamp: e.timestamp,
            trace_id: e.trace_id,
        }
    }
}
