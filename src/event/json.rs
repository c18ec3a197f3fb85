//! The envelope as JSON: what `tail` prints, what Redis stream entries and
//! webhook bodies carry, and the REST publish body (one event or
//! `{"events":[…]}`) that becomes drafts.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{Event, EventDraft};

impl Event {
    /// The envelope as one line of JSON:
    /// `{"id","type","tenant_id","data","timestamp","trace_id"}`.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and pre-validated raw JSON cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads what [`Event::to_json`] wrote.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Why a REST publish body could not be read. The message names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body: empty: send {{\"type\":…,\"data\":…}} or {{\"events\":[…]}}")]
    Empty,
    #[error("body: {0}")]
    Json(String),
    #[error(
        "body: send either one event ({{\"type\":…,\"data\":…}}) or {{\"events\":[…]}}, not both"
    )]
    Both,
}

/// Reads a REST publish body into drafts, in one pass; `data` keeps its
/// exact text.
pub fn drafts_from_body(bytes: &[u8]) -> Result<Vec<EventDraft>, BodyError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    serde_json::from_slice::<PublishBody>(bytes)
        .map_err(|e| BodyError::Json(e.to_string()))?
        .into_drafts()
}

/// `data` is kept as raw JSON text, so it round-trips exactly; `null` is a
/// valid payload, distinct from a missing field.
fn raw_present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// One event in a REST publish body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    #[serde(default)]
    id: String,
    #[serde(rename = "type", default)]
    event_type: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default, deserialize_with = "raw_present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    trace_id: String,
    /// Accepted so that a delivered envelope can be posted back; the broker
    /// stamps its own.
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<String>,
}

/// A REST publish body: one event (`{"type":…,"data":…}`) or a batch
/// (`{"events":[…]}`), parsed in one pass. (`#[serde(flatten)]` would be
/// shorter but cannot carry a `RawValue`.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[serde(default)]
    events: Option<Vec<JsonEvent>>,
    #[serde(default)]
    id: String,
    #[serde(rename = "type", default)]
    event_type: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default, deserialize_with = "raw_present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    trace_id: String,
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<String>,
}

impl PublishBody {
    fn into_drafts(self) -> Result<Vec<EventDraft>, BodyError> {
        let single_set = !(self.id.is_empty()
            && self.event_type.is_empty()
            && self.tenant_id.is_empty()
            && self.data.is_none()
            && self.trace_id.is_empty());
        match self.events {
            Some(_) if single_set => Err(BodyError::Both),
            Some(events) => Ok(events.into_iter().map(Into::into).collect()),
            None => Ok(vec![
                JsonEvent {
                    id: self.id,
                    event_type: self.event_type,
                    tenant_id: self.tenant_id,
                    data: self.data,
                    trace_id: self.trace_id,
                    _timestamp: None,
                }
                .into(),
            ]),
        }
    }
}

impl From<JsonEvent> for EventDraft {
    fn from(e: JsonEvent) -> Self {
        EventDraft {
            id: e.id,
            event_type: e.event_type,
            tenant_id: e.tenant_id,
            data: e.data.map(|d| d.get().to_string()).unwrap_or_default(),
            trace_id: e.trace_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let one = drafts_from_body(br#"{"type":"a.b","data":{"n":1.50}}"#).expect("one");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data, r#"{"n":1.50}"#);
        let null = drafts_from_body(br#"{"type":"a.b","data":null}"#).expect("null data");
        assert_eq!(null[0].data, "null");
        let batch = drafts_from_body(br#"{"events":[{"type":"a.b","data":1},{"type":"c.d"}]}"#)
            .expect("batch");
        assert_eq!((batch[0].data.as_str(), batch[1].data.as_str()), ("1", ""));
        assert_eq!(drafts_from_body(b"  ").err(), Some(BodyError::Empty));
        assert_eq!(
            drafts_from_body(br#"{"events":[],"type":"a.b"}"#).err(),
            Some(BodyError::Both)
        );
        assert!(matches!(
            drafts_from_body(br#"{"type":"a.b","extra":1}"#),
            Err(BodyError::Json(m)) if m.contains("unknown field `extra`")
        ));
    }
}
