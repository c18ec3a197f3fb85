//! The envelope as a Socket.IO client receives it on channel `event`: the
//! product's contract (`type`, `data`, `timestamp`, `trace_id`) plus `id`,
//! without `tenant_id` (a socket only ever sees its own tenant).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::Event;

/// A pre-serialised envelope, shared by every socket it goes to: emitting
/// copies bytes instead of serialising the event again per socket.
pub type Payload = Arc<RawValue>;

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    data: &'a RawValue,
    timestamp: &'a str,
    trace_id: &'a str,
}

/// The `event` payload of an accepted event.
pub fn payload(e: &Event) -> Option<Payload> {
    serde_json::value::to_raw_value(&Envelope {
        id: &e.id,
        event_type: &e.event_type,
        data: &e.data,
        timestamp: &e.timestamp,
        trace_id: &e.trace_id,
    })
    .ok()
    .map(Payload::from)
}

/// Type of the notice a socket gets when its tenant's rate limit dropped
/// events it would have received.
pub const EVENTS_DROPPED: &str = "system.events_dropped";

/// The `system.events_dropped` notice: counts by type. `id` is the stream
/// position it was sent at (the last event emitted before it), so a client
/// that resumes from the id it saw last misses nothing.
pub fn dropped_notice(
    id: &str,
    counts: &BTreeMap<&str, u64>,
    timestamp: &str,
    trace_id: &str,
) -> Option<Payload> {
    #[derive(Serialize)]
    struct Counts<'a> {
        dropped: &'a BTreeMap<&'a str, u64>,
        total: u64,
        reason: &'static str,
    }
    let data = serde_json::value::to_raw_value(&Counts {
        dropped: counts,
        total: counts.values().sum(),
        reason: "rate_limit",
    })
    .ok()?;
    serde_json::value::to_raw_value(&Envelope {
        id,
        event_type: EVENTS_DROPPED,
        data: &data,
        timestamp,
        trace_id,
    })
    .ok()
    .map(Payload::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_without_tenant() {
        let e = Event {
            id: "e1".into(),
            event_type: "cost.updated".into(),
            tenant_id: "tenant-a".into(),
            data: RawValue::from_string(r#"{"amount":42}"#.into()).expect("json"),
            timestamp: "2026-04-29T16:41:38.412Z".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        };
        assert_eq!(
            payload(&e).expect("payload").get(),
            r#"{"id":"e1","type":"cost.updated","data":{"amount":42},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#
        );
        let counts = BTreeMap::from([("cost.x", 2), ("alert.y", 1)]);
        let notice = dropped_notice("e1", &counts, "t", "x").expect("notice");
        assert_eq!(
            notice.get(),
            r#"{"id":"e1","type":"system.events_dropped","data":{"dropped":{"alert.y":1,"cost.x":2},"total":3,"reason":"rate_limit"},"timestamp":"t","trace_id":"x"}"#
        );
    }
}
