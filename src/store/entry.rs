//! One Redis stream entry, written and read here only. An event stream's
//! entry has two fields: `o`, the instance that wrote it, and `e`, the
//! event as JSON ([`crate::event::json`]). A registry entry has one, `t`,
//! an event type. Replies are read from raw Redis values: most entries a
//! relay reads are its own instance's, skipped on their `o` field without
//! building maps or strings for them.

use redis::Value;

use super::own::Id;
use crate::event::Event;
use crate::event::rules::check_stored;

const FIELD_ORIGIN: &str = "o";
const FIELD_EVENT: &str = "e";
const FIELD_TYPE: &str = "t";

/// Appends the `XADD` of `event` to `pipe`.
pub(super) fn add_event(
    pipe: &mut redis::Pipeline,
    key: &str,
    max_len: usize,
    instance_id: &str,
    event: &Event,
) {
    // Sized up front: the JSON is written in small pieces, and a command
    // grown by doubling is copied several times.
    let size = 48 + key.len() + instance_id.len() + event.size_bytes();
    let mut cmd = redis::Cmd::with_capacity(10, size);
    cmd.arg("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*")
        .arg(FIELD_ORIGIN)
        .arg(instance_id)
        .arg(FIELD_EVENT)
        .arg(AsJson(event));
    pipe.add_command(cmd);
}

/// An event as a command argument: its JSON ([`Event::to_json`]) written
/// straight into the command, without a string of its own.
struct AsJson<'a>(&'a Event);

impl redis::ToRedisArgs for AsJson<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        // Serialising plain strings and pre-validated raw JSON cannot fail.
        let _ = serde_json::to_writer(out.writer_for_next_arg(), self.0);
    }
}

/// Appends the `XADD` of a type to a partition's registry.
pub(super) fn add_type(
    pipe: &mut redis::Pipeline,
    registry: &str,
    max_len: usize,
    event_type: &str,
) {
    pipe.cmd("XADD")
        .arg(registry)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*")
        .arg(FIELD_TYPE)
        .arg(event_type)
        .ignore();
}

/// An entry as Redis returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub(super) id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an event stream's entry holds, for the instance reading it.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Written by this instance: already delivered here.
    Own,
    Event(Event),
    /// Not an entry this broker wrote; skipped with the reason.
    Invalid(String),
}

impl RawEntry {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The event of an event stream's entry, unless `instance_id` wrote
    /// it. Another instance's event must follow the rules of a published
    /// one (`data` at most `max_data_bytes`); Redis is a peer, not an
    /// oracle.
    pub(crate) fn decode(&self, instance_id: &str, max_data_bytes: usize) -> Decoded {
        if self.field(FIELD_ORIGIN) == Some(instance_id.as_bytes()) {
            return Decoded::Own;
        }
        let Some(json) = self.field(FIELD_EVENT) else {
            return Decoded::Invalid("no event field".into());
        };
        let event = match Event::from_json(json) {
            Ok(event) => event,
            Err(e) => return Decoded::Invalid(format!("not an event: {e}")),
        };
        match check_stored(&event, max_data_bytes) {
            Ok(()) => Decoded::Event(event),
            Err(e) => Decoded::Invalid(format!("event breaks a rule: {e}")),
        }
    }

    /// The type a registry entry names.
    pub(crate) fn registered_type(&self) -> Option<&str> {
        self.field(FIELD_TYPE)
            .and_then(|t| std::str::from_utf8(t).ok())
    }

    /// The entry id (`1700000000000-3`), which orders entries numerically;
    /// `0-0` if Redis sent something else.
    pub(crate) fn position(&self) -> Id {
        Id::parse(self.id.as_bytes()).unwrap_or(Id(0, 0))
    }
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    }
}

/// An `XRANGE` / `XREVRANGE` reply (also the entries of one stream in an
/// `XREAD` reply): `[[id, [field, value, …]], …]`.
pub(crate) fn parse_entries(reply: Value) -> Vec<RawEntry> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = text(parts.pop()?)?;
            let Value::Array(flat) = fields else {
                return Some(RawEntry {
                    id,
                    fields: Vec::new(),
                });
            };
            let mut it = flat.into_iter();
            let mut fields = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.push((bytes(k), bytes(v)));
            }
            Some(RawEntry { id, fields })
        })
        .collect()
}

/// An `XREAD` reply as (stream key, entries), RESP2 arrays or RESP3 maps.
pub(crate) fn parse_streams(reply: Value) -> Vec<(String, Vec<RawEntry>)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| Some((text(key)?, parse_entries(entries))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), bulk(v)])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn one_decoder_for_every_reply() {
        let event = r#"{"id":"e1","type":"a.b","tenant_id":"t","data":{"n":1.50},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#;
        let entries = Value::Array(vec![
            entry("1700000000000-9", &[("o", "other"), ("e", event)]),
            entry("1700000000000-10", &[("o", "me"), ("e", event)]),
            entry("1700000000001-0", &[("o", "other"), ("e", "{")]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk("s"), entries.clone())]);
        for reply in [resp2, resp3] {
            let streams = parse_streams(reply);
            assert_eq!(streams.len(), 1);
            assert_eq!(streams[0].1, parse_entries(entries.clone()));
        }
        let parsed = parse_entries(entries);
        assert!(parsed[0].position() < parsed[1].position(), "numeric order");
        match parsed[0].decode("me", 1024) {
            Decoded::Event(e) => assert_eq!(e.data.get(), r#"{"n":1.50}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parsed[1].decode("me", 1024), Decoded::Own));
        assert!(matches!(parsed[2].decode("me", 1024), Decoded::Invalid(_)));
        assert!(
            matches!(parsed[0].decode("me", 4), Decoded::Invalid(m) if m.contains("data")),
            "data over the size limit"
        );
        // What a published event could never be is skipped, not relayed.
        let bad_events = [
            event.replace(r#""type":"a.b""#, r#""type":"NOT A TYPE""#),
            event.replace(r#""id":"e1""#, r#""id":"../../x y""#),
            event.replace(r#""tenant_id":"t""#, r#""tenant_id":"""#),
            event.replace("2026-04-29T16:41:38.412Z", "yesterday"),
            event.replace("4bf92f3577b34da6a3ce929d0e0e4736", "x"),
        ];
        for bad in &bad_events {
            let entries = parse_entries(Value::Array(vec![entry(
                "1-0",
                &[("o", "other"), ("e", bad)],
            )]));
            assert!(
                matches!(entries[0].decode("me", 1024), Decoded::Invalid(m) if m.starts_with("event breaks a rule")),
                "{bad}"
            );
        }
        let registry = parse_entries(Value::Array(vec![entry("1-0", &[("t", "cost.updated")])]));
        assert_eq!(registry[0].registered_type(), Some("cost.updated"));
    }
}
