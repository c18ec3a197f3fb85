//! Property tests of every parser that sees outside input: whatever arrives,
//! it is either accepted or refused with an error that names what was
//! wrong; nothing panics, and what is accepted keeps the rules.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use crate::auth::{AuthError, Authenticator, MAX_EXP, Scopes};
use crate::broker::TypeFilter;
use crate::clock;
use crate::edge::ratelimit::rates_from_redis;
use crate::event::json::drafts_from_body;
use crate::event::{self, EventDraft, Stamp};

const SECRET: &str = "property-test-secret-0123456789abcdef";

/// Text that looks like what clients send, and text that does not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_]{1,12}(\\.[a-z0-9_]{1,12}){0,3}",
        "[A-Za-z0-9._:*/ -]{0,40}",
        "\\PC{0,64}",
        any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn drafts_are_accepted_by_the_rules_or_refused_naming_the_field(
        event_type in text(), data in text(), id in text(), trace_id in text(),
    ) {
        let stamp = Stamp { max_data_bytes: 1024, trace_id: None, parent_span_id: None };
        let draft = EventDraft { id: id.clone(), event_type: event_type.clone(), tenant_id: String::new(), data, trace_id };
        match event::accept(draft, "tenant-a", &stamp, SystemTime::now()) {
            Ok(e) => {
                prop_assert!(event::validate_type(&e.event_type).is_ok());
                prop_assert!(event::check_identifier(&e.id).is_ok());
                prop_assert!(event::is_trace_id(&e.trace_id));
                prop_assert!(e.data.get().len() <= 1024);
                prop_assert!(event::rules::check_stored(&e, 1024).is_ok(), "a stamped event passes a peer's check");
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(
                    ["type:", "data:", "id:", "trace_id:"].iter().any(|f| m.starts_with(f)),
                    "{m}"
                );
            }
        }
    }

    #[test]
    fn rest_bodies_never_panic(body in prop_oneof![
        any::<Vec<u8>>(),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(json_value(), 0..4)
            .prop_map(|events| serde_json::json!({"events": events}).to_string().into_bytes()),
    ]) {
        if let Err(e) = drafts_from_body(&body) {
            prop_assert!(e.to_string().starts_with("body:"), "{e}");
        }
    }

    #[test]
    fn type_filters_parse_or_name_the_pattern(patterns in prop::collection::vec(text(), 0..80), probe in text()) {
        match TypeFilter::parse(&patterns) {
            Ok(filter) => {
                // At most 64 filters (broker::filter::MAX_FILTERS).
                prop_assert!(patterns.len() <= 64 || filter.is_all());
                let _ = filter.matches(&probe);
                // What it says it is parses back to the same filter.
                prop_assert_eq!(TypeFilter::parse(&filter.patterns()).ok(), Some(filter));
            }
            Err(e) => prop_assert!(e.to_string().starts_with("types"), "{e}"),
        }
    }

    #[test]
    fn identifiers_and_traceparents_never_panic(value in text()) {
        if event::check_identifier(&value).is_ok() {
            prop_assert!(!value.is_empty() && value.len() <= event::rules::MAX_ID_LEN);
        }
        if let Some(parent) = event::parse_traceparent(&value) {
            prop_assert!(event::is_trace_id(&parent.trace_id) && parent.parent_id != 0);
        }
    }

    #[test]
    fn tokens_with_any_claims_are_verified_or_refused(
        exp in prop_oneof![any::<u64>(), Just(MAX_EXP), Just(MAX_EXP + 1), Just(u64::MAX), 0u64..4_000_000_000],
        nbf in proptest::option::of(any::<u64>()),
        iat in proptest::option::of(any::<u64>()),
        tenant in proptest::option::of(text()),
        scope in proptest::option::of(text()),
        extra in json_value(),
    ) {
        let mut claims = serde_json::json!({ "exp": exp, "extra": extra });
        if let Some(nbf) = nbf { claims["nbf"] = nbf.into(); }
        if let Some(iat) = iat { claims["iat"] = iat.into(); }
        if let Some(t) = &tenant { claims["tenantId"] = t.clone().into(); }
        if let Some(s) = &scope { claims["scope"] = s.clone().into(); }
        let auth = Authenticator::new(SECRET.as_bytes(), Scopes::parse(crate::auth::rbac::DEFAULT_SCOPES));
        let token = sign(&claims);
        match runtime().block_on(auth.verify(&token, None)) {
            Ok(identity) => {
                prop_assert!(identity.expires_at <= MAX_EXP);
                // Everything computed from it stays in range.
                let _ = clock::format_unix_secs(identity.valid_until());
                let _ = runtime().block_on(async { clock::instant_at(identity.valid_until()) });
            }
            Err(AuthError::ExpTooFar { exp: refused }) => prop_assert!(refused > MAX_EXP),
            Err(e) => prop_assert!(!e.to_string().contains(SECRET)),
        }
    }

    #[test]
    fn any_bearer_header_is_verified_or_refused(header in text()) {
        let auth = Authenticator::new(SECRET.as_bytes(), Scopes::default());
        let refused = runtime().block_on(auth.verify_header(Some(&header), None));
        prop_assert!(refused.is_err());
    }

    #[test]
    fn socket_handshakes_never_panic(auth in json_value()) {
        if let Err(e) = crate::edge::socket_params(auth) {
            prop_assert!(e.message.starts_with("auth"), "{}", e.message);
        }
    }

    #[test]
    fn redis_replies_never_panic(reply in redis_value(), instance in text(), max in 0usize..4096) {
        for (_, entries) in crate::store::entry::parse_streams(reply.clone()) {
            for entry in entries {
                if let crate::store::entry::Decoded::Event(e) = entry.decode(&instance, max) {
                    prop_assert!(event::rules::check_stored(&e, max).is_ok());
                }
                let _ = entry.registered_type();
                let _ = entry.position();
            }
        }
        let _ = crate::store::entry::parse_entries(reply);
    }

    #[test]
    fn rate_limit_and_membership_values_never_panic(
        pairs in prop::collection::vec((any::<Vec<u8>>(), any::<Vec<u8>>()), 0..8),
        value in any::<Vec<u8>>(),
    ) {
        let (rates, refused) = rates_from_redis(pairs.clone());
        // Every entry is either applied or refused with a reason (a tenant
        // named twice is applied once).
        prop_assert!(rates.len() + refused.len() <= pairs.len());
        prop_assert!(refused.iter().all(|(_, why)| !why.is_empty()));
        for (tenant, rate) in &rates {
            prop_assert!(event::check_identifier(tenant).is_ok());
            prop_assert!(*rate > 0);
        }
        for tenant in crate::auth::memberships::tenants_from_redis("sub", &value) {
            prop_assert!(event::check_identifier(&tenant).is_ok());
        }
    }

    #[test]
    fn durations_in_settings_never_panic(value in text()) {
        if let Ok(d) = crate::config::parse::duration(&value) {
            prop_assert!(d > Duration::ZERO);
        }
        let _ = crate::config::parse::duration_or_zero(&value);
        let _ = crate::config::parse::positive(&value);
    }

    #[test]
    fn times_never_panic(secs in any::<u64>(), millis in any::<u64>()) {
        let _ = clock::format_unix_secs(secs);
        let far = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis));
        if let Some(at) = far {
            let text = clock::format_timestamp(at);
            prop_assert!(clock::parse_timestamp(&text).is_some(), "{text}");
        }
    }
}

/// Redis replies: nested arrays and maps of strings and numbers.
fn redis_value() -> impl Strategy<Value = redis::Value> {
    let leaf = prop_oneof![
        Just(redis::Value::Nil),
        any::<i64>().prop_map(redis::Value::Int),
        any::<Vec<u8>>().prop_map(redis::Value::BulkString),
        text().prop_map(|t| redis::Value::BulkString(t.into_bytes())),
        text().prop_map(redis::Value::SimpleString),
        Just(redis::Value::BulkString(
            br#"{"id":"e1","type":"a.b","tenant_id":"t","data":{},"timestamp":"2026-04-29T16:41:38.412Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#.to_vec()
        )),
        Just(redis::Value::BulkString(b"e".to_vec())),
        Just(redis::Value::BulkString(b"o".to_vec())),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(redis::Value::Array),
            prop::collection::vec((inner.clone(), inner), 0..4).prop_map(redis::Value::Map),
        ]
    })
}
