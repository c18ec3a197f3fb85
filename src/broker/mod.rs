//! The in-process broker, the domain core: dispatch in per-type order
//! ([`dispatch`]), the dedupe window of recently dispatched ids
//! ([`dedupe`]), type filters ([`filter`]), subscriptions with bounded
//! buffers ([`subscription`]) and the per-tenant history ring that resumes
//! replay from ([`history`]).
//!
//! Dispatch is synchronous in the publish path: when `publish` returns, every
//! matching subscriber's buffer holds the event. Handing over is a
//! `try_send` into a bounded channel, so a slow subscriber costs the
//! publisher nothing: when its buffer is full it is dropped, and its stream
//! ends telling it the last id it was sent.
//!
//! The broker knows neither transports, nor Redis (only the [`Persist`]
//! trait it owns), nor the metrics library (it counts in [`Stats`]).

mod dedupe;
mod dispatch;
mod filter;
mod history;
mod stats;
mod subscription;

use std::time::Duration;

pub use dispatch::{Broker, TooManySubscribers};
pub use filter::{FilterError, TypeFilter};
pub use history::Page;
pub use stats::{Count, Stats};
pub use subscription::{Delivery, Subscription};

use crate::config::parse::{duration, positive};
use crate::event::SharedEvent;

/// Limits of the in-process broker: flags and `TC_*` variables of
/// `serve`, each default written once, here (the README's table lists
/// them).
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// Most events kept per tenant for resume (`since_id`).
    #[arg(long, env = "TC_HISTORY_MAX_EVENTS", default_value_t = 10_000, value_parser = positive)]
    pub history_max_events: usize,

    /// Oldest event kept per tenant for resume, e.g. `1h`, `15m`.
    #[arg(long, env = "TC_HISTORY_MAX_AGE", default_value = "1h", value_parser = duration)]
    pub history_max_age: Duration,

    /// Most bytes of events kept per tenant for resume.
    #[arg(long, env = "TC_HISTORY_MAX_BYTES", default_value_t = 64 << 20, value_parser = positive)]
    pub history_max_bytes: usize,

    /// Most recently dispatched ids remembered to drop retried publishes.
    #[arg(long, env = "TC_DEDUPE_MAX_IDS", default_value_t = 100_000, value_parser = positive)]
    pub dedupe_max_ids: usize,

    /// How long a dispatched id is remembered, e.g. `10m`.
    #[arg(long, env = "TC_DEDUPE_MAX_AGE", default_value = "10m", value_parser = duration)]
    pub dedupe_max_age: Duration,

    /// Events buffered per subscriber before it is dropped as too slow.
    #[arg(long, env = "TC_SUBSCRIBER_BUFFER", default_value_t = 1024, value_parser = positive)]
    pub subscriber_buffer: usize,

    /// Most subscriptions (gRPC streams; and, counted apart, Socket.IO
    /// sockets) one tenant may hold open; all-tenants streams count
    /// together.
    #[arg(long, env = "TC_MAX_SUBSCRIBERS_PER_TENANT", default_value_t = 10_000, value_parser = positive)]
    pub max_subscribers_per_tenant: usize,

    /// On resume, also replay held events accepted up to this long before
    /// the resume point. Events reach instances in different orders; with
    /// several instances this covers what another instance's subscriber
    /// had not yet seen. Zero for a single instance; set from
    /// `TC_RESUME_MARGIN` when Redis is configured.
    #[arg(skip)]
    pub resume_margin: Duration,
}

impl Default for BrokerConfig {
    /// The defaults the flags declare.
    fn default() -> Self {
        crate::config::defaults()
    }
}

/// The answer to one event of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: String,
    /// Recently dispatched already: acknowledged, not delivered again.
    pub duplicate: bool,
}

/// Where accepted events go after local dispatch (the Redis writer).
/// `offer` is called in the publish path under the tenant's lock, so it
/// sees each tenant's events in order; it must not block.
pub trait Persist: Send + Sync {
    fn offer(&self, event: &SharedEvent);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use tokio_stream::{Stream, StreamExt};

    use super::*;
    use crate::event::Event;
    use crate::tenant::TenantScope;

    pub(crate) fn event(tenant: &str, id: &str, event_type: &str) -> Event {
        Event {
            id: id.into(),
            event_type: event_type.into(),
            tenant_id: tenant.into(),
            data: serde_json::value::RawValue::from_string("{}".into()).expect("json"),
            timestamp: String::new(),
            trace_id: String::new(),
        }
    }

    #[tokio::test]
    async fn slow_subscriber_is_dropped_with_last_id() {
        let broker = Broker::new(BrokerConfig {
            subscriber_buffer: 2,
            ..Default::default()
        });
        let mut slow = broker
            .subscribe(TenantScope::One("t".into()), TypeFilter::all(), None)
            .expect("under the cap");
        for i in 0..5 {
            broker.publish_one(event("t", &format!("e{i}"), "a.b"));
        }
        let mut got = Vec::new();
        while let Some(d) = slow.next().await {
            got.push(d);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            matches!(&got[2], Delivery::Lagged { last_id: Some(id) } if id == "e1"),
            "{got:?}"
        );
        assert_eq!(broker.stats().slow_subscribers_dropped.get(), 1);
    }

    #[tokio::test]
    async fn minted_events_reach_subscribers_and_skip_the_dedupe_window() {
        let broker = Broker::new(BrokerConfig::default());
        let mut sub = broker
            .subscribe(TenantScope::One("t".into()), TypeFilter::all(), None)
            .expect("under the cap");
        broker.publish_minted(event("t", "m1", "notification.sent"));
        // Not recorded as seen: the same id from a publisher is new.
        let outcome = broker.publish_one(event("t", "m1", "a.b"));
        assert!(!outcome.duplicate);
        for expected in ["notification.sent", "a.b"] {
            match sub.next().await {
                Some(Delivery::Event(e)) => assert_eq!(e.event_type, expected),
                other => panic!("expected {expected}, got {other:?}"),
            }
        }
        assert_eq!(broker.stats().published.get(), 2);
    }

    #[tokio::test]
    async fn close_ends_streams_and_drop_unsubscribes() {
        let broker = Broker::new(BrokerConfig::default());
        let mut sub = broker
            .subscribe(TenantScope::One("t".into()), TypeFilter::all(), None)
            .expect("under the cap");
        let other = broker
            .subscribe(TenantScope::All, TypeFilter::all(), None)
            .expect("under the cap");
        assert_eq!(broker.subscriber_count(), 2);
        drop(other);
        assert_eq!(broker.subscriber_count(), 1);
        broker.publish_one(event("t", "x", "a.b"));
        broker.close();
        assert!(matches!(sub.next().await, Some(Delivery::Event(_))));
        assert!(matches!(
            sub.next().await,
            Some(Delivery::Closed { last_id: Some(id) }) if id == "x"
        ));
        assert!(sub.next().await.is_none());
    }

    #[test]
    fn tenants_without_subscribers_or_history_are_released() {
        let broker = Broker::new(BrokerConfig {
            history_max_age: Duration::from_secs(60),
            ..Default::default()
        });
        // A subscriber of a tenant that never publishes leaves nothing behind.
        let sub = broker
            .subscribe(TenantScope::One("quiet".into()), TypeFilter::all(), None)
            .expect("under the cap");
        assert_eq!(broker.tenant_count(), 1);
        drop(sub);
        assert_eq!(
            broker.tenant_count(),
            0,
            "released when the last subscriber left"
        );

        // A tenant with history stays until it has aged out.
        for t in 0..1000 {
            broker.publish_one(event(&format!("tenant-{t}"), "e", "a.b"));
        }
        let sub = broker
            .subscribe(TenantScope::One("tenant-0".into()), TypeFilter::all(), None)
            .expect("under the cap");
        assert_eq!(broker.tenant_count(), 1000);
        let now = Instant::now();
        assert_eq!(broker.release_idle(now), 0, "history is still held");
        let later = now + Duration::from_secs(61);
        assert_eq!(
            broker.release_idle(later),
            999,
            "all but the subscribed tenant"
        );
        assert_eq!(broker.tenant_count(), 1);

        // A released tenant comes back on its next event, and a subscriber
        // that arrived meanwhile sees it.
        let mut again = broker
            .subscribe(TenantScope::One("tenant-5".into()), TypeFilter::all(), None)
            .expect("under the cap");
        broker.publish_one(event("tenant-5", "f", "a.b"));
        assert!(matches!(again.try_next_now(), Some(Delivery::Event(e)) if e.id == "f"));
        drop(sub);
    }

    #[test]
    fn subscriptions_per_tenant_are_capped() {
        let broker = Broker::new(BrokerConfig {
            max_subscribers_per_tenant: 2,
            ..Default::default()
        });
        let one = |t: &str| TenantScope::One(t.into());
        let a = broker
            .subscribe(one("a"), TypeFilter::all(), None)
            .expect("1st");
        let _b = broker
            .subscribe(one("a"), TypeFilter::all(), None)
            .expect("2nd");
        let refused = broker.subscribe(one("a"), TypeFilter::all(), None).err();
        assert_eq!(
            refused,
            Some(TooManySubscribers {
                tenant: "a".into(),
                limit: 2
            })
        );
        assert!(
            broker.subscribe(one("b"), TypeFilter::all(), None).is_ok(),
            "per tenant"
        );
        let _internal = broker.follow("a", None);
        drop(a);
        assert!(
            broker.subscribe(one("a"), TypeFilter::all(), None).is_err(),
            "internal followers count as held"
        );
        let _all1 = broker
            .subscribe(TenantScope::All, TypeFilter::all(), None)
            .expect("all 1");
        let _all2 = broker
            .subscribe(TenantScope::All, TypeFilter::all(), None)
            .expect("all 2");
        assert!(
            broker
                .subscribe(TenantScope::All, TypeFilter::all(), None)
                .is_err()
        );
    }

    impl Subscription {
        /// The next delivery if one is ready now.
        fn try_next_now(&mut self) -> Option<Delivery> {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            match std::pin::Pin::new(self).poll_next(&mut cx) {
                std::task::Poll::Ready(d) => d,
                std::task::Poll::Pending => None,
            }
        }
    }
}
