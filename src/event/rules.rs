//! The rules an event must follow before it is accepted, each naming the
//! field and the rule it broke.

use serde_json::value::RawValue;

/// Longest accepted event type name.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest accepted producer-supplied event id or tenant id.
pub const MAX_ID_LEN: usize = 128;

/// Why an event was refused. Each names the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("type: required (a lowercase dotted name such as \"cost.updated\")")]
    TypeMissing,
    #[error("type: {len} characters is longer than the limit of {MAX_TYPE_LEN}")]
    TypeTooLong { len: usize },
    #[error(
        "type: {value:?} is not a lowercase dotted name: it must match [a-z0-9_]+(\\.[a-z0-9_]+)+, e.g. \"cost.updated\""
    )]
    TypeGrammar { value: String },
    #[error("data: required: JSON text such as {{}} or null")]
    DataMissing,
    #[error("data: {size} bytes is larger than the limit of {limit} bytes")]
    DataTooLarge { size: usize, limit: usize },
    #[error("data: not valid JSON: {reason}")]
    DataNotJson { reason: String },
    #[error("id: {reason}")]
    IdInvalid { reason: String },
    #[error("tenant_id: {reason}")]
    TenantInvalid { reason: String },
    #[error("trace_id: {value:?} is not a W3C trace id: 32 lowercase hex characters, not all zero")]
    TraceIdInvalid { value: String },
    #[error("timestamp: {value:?} is not an RFC 3339 time such as 2026-04-29T16:41:38.412Z")]
    TimestampInvalid { value: String },
    #[error("events: empty: a publish needs at least one event")]
    BatchEmpty,
    #[error("events: {len} events is more than the batch limit of {limit}")]
    BatchTooLarge { len: usize, limit: usize },
}

/// Checks an event type against the grammar `[a-z0-9_]+(\.[a-z0-9_]+)+`.
pub fn validate_type(value: &str) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::TypeMissing);
    }
    if value.len() > MAX_TYPE_LEN {
        return Err(EventError::TypeTooLong { len: value.len() });
    }
    // One pass over the bytes: words of [a-z0-9_], separated by single dots,
    // at least two words.
    let mut words = 1;
    let mut word_empty = true;
    let mut ok = true;
    for &b in value.as_bytes() {
        if b == b'.' {
            ok &= !word_empty;
            word_empty = true;
            words += 1;
        } else if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' {
            word_empty = false;
        } else {
            ok = false;
            break;
        }
    }
    if ok && !word_empty && words >= 2 {
        Ok(())
    } else {
        Err(EventError::TypeGrammar {
            value: value.chars().take(MAX_TYPE_LEN + 8).collect(),
        })
    }
}

/// Identifiers supplied from outside (event ids, tenant ids): 1-128
/// characters of `[A-Za-z0-9._:-]`, so they are safe in logs, Redis keys and
/// Socket.IO room names.
pub fn check_identifier(value: &str) -> Result<(), String> {
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "{} characters is longer than the limit of {MAX_ID_LEN}",
            value.len()
        ));
    }
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed: use 1-{MAX_ID_LEN} characters of [A-Za-z0-9._:-]"
        )),
        None => Ok(()),
    }
}

/// Checks `data` and keeps its exact text.
/// Takes ownership of the text: validated in one pass and kept without a
/// copy (the publish path's largest field).
pub fn parse_data(data: impl Into<String>, max_bytes: usize) -> Result<Box<RawValue>, EventError> {
    let data = data.into();
    if data.trim().is_empty() {
        return Err(EventError::DataMissing);
    }
    if data.len() > max_bytes {
        return Err(EventError::DataTooLarge {
            size: data.len(),
            limit: max_bytes,
        });
    }
    RawValue::from_string(data).map_err(|e| EventError::DataNotJson {
        reason: e.to_string(),
    })
}

/// True for a W3C trace id: 32 lowercase hex characters, not all zero.
pub fn is_trace_id(value: &str) -> bool {
    value.len() == 32
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && value.bytes().any(|b| b != b'0')
}

/// A valid W3C `traceparent`'s trace id and parent span id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: String,
    /// The caller's span, the parent of the broker's publish span.
    pub parent_id: u64,
}

/// Reads a W3C `traceparent` header
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), or `None` when
/// it is malformed (the spec says to ignore it then).
pub fn parse_traceparent(header: &str) -> Option<Traceparent> {
    let mut parts = header.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !hex(parent_id, 16) || parent_id.bytes().all(|b| b == b'0') || !hex(flags, 2) {
        return None;
    }
    if !is_trace_id(trace_id) {
        return None;
    }
    Some(Traceparent {
        trace_id: trace_id.to_string(),
        parent_id: u64::from_str_radix(parent_id, 16).ok()?,
    })
}

/// A new random W3C trace id.
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A new time-ordered event id (UUIDv7).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Checks an event another instance accepted (read back from Redis)
/// against the rules a published event follows: type, id, tenant, `data`
/// size, timestamp and trace id. Redis is a peer, not an oracle.
pub fn check_stored(event: &super::Event, max_data_bytes: usize) -> Result<(), EventError> {
    validate_type(&event.event_type)?;
    check_identifier(&event.id).map_err(|reason| EventError::IdInvalid { reason })?;
    check_identifier(&event.tenant_id).map_err(|reason| EventError::TenantInvalid { reason })?;
    let size = event.data.get().len();
    if size > max_data_bytes {
        return Err(EventError::DataTooLarge {
            size,
            limit: max_data_bytes,
        });
    }
    if crate::clock::parse_timestamp(&event.timestamp).is_none() {
        return Err(EventError::TimestampInvalid {
            value: event.timestamp.chars().take(64).collect(),
        });
    }
    if !is_trace_id(&event.trace_id) {
        return Err(EventError::TraceIdInvalid {
            value: event.trace_id.chars().take(64).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_grammar() {
        for ok in ["cost.updated", "ml.training.completed", "a.b", "x_1.y_2.z3"] {
            assert_eq!(validate_type(ok), Ok(()), "{ok}");
        }
        for bad in [
            "cost",
            "Cost.updated",
            "cost.",
            ".cost",
            "cost..x",
            "cost-x.y",
            "cost.*",
            "cost updated",
            "cöst.x",
        ] {
            assert!(
                matches!(validate_type(bad), Err(EventError::TypeGrammar { .. })),
                "{bad}"
            );
        }
        assert_eq!(validate_type(""), Err(EventError::TypeMissing));
        let long = format!("a.{}", "b".repeat(127));
        assert_eq!(
            validate_type(&long),
            Err(EventError::TypeTooLong { len: 129 })
        );
        assert!(validate_type(&format!("a.{}", "b".repeat(126))).is_ok());
    }

    #[test]
    fn data_keeps_exact_text() {
        let raw = parse_data(
            r#"{"n":42,"f":1.50,"big":123456789012345678901234567890}"#,
            1024,
        )
        .expect("valid");
        assert_eq!(
            raw.get(),
            r#"{"n":42,"f":1.50,"big":123456789012345678901234567890}"#
        );
        assert!(matches!(
            parse_data("{", 1024),
            Err(EventError::DataNotJson { .. })
        ));
        assert!(matches!(
            parse_data("{} {}", 1024),
            Err(EventError::DataNotJson { .. })
        ));
        assert_eq!(parse_data("  ", 1024).err(), Some(EventError::DataMissing));
        assert_eq!(
            parse_data("[1,2,3]", 4).err(),
            Some(EventError::DataTooLarge { size: 7, limit: 4 })
        );
        // Deep nesting is refused by the parser's recursion limit, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse_data(deep.as_str(), 1 << 20),
            Err(EventError::DataNotJson { .. })
        ));
    }

    #[test]
    fn traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(tp).map(|t| t.trace_id).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            parse_traceparent(tp).map(|t| t.parent_id),
            Some(0x00f0_67aa_0ba9_02b7)
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert!(is_trace_id(&new_trace_id()));
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("tenant-abc_1.2:3").is_ok());
        assert!(check_identifier("").is_err());
        assert!(check_identifier("a b").is_err());
        assert!(check_identifier("tenant/x").is_err());
        assert!(check_identifier(&"a".repeat(129)).is_err());
    }
}
