//! Agent presence: which agents have a gRPC stream open on this instance.
//!
//! A caller whose token carries an `agent_id` claim is an agent. When its
//! first stream (Subscribe or PublishStream) opens here, the broker
//! publishes `agent.connected` into the agent's tenant; when its last one
//! ends, `agent.disconnected` with the reason. Ordinary service callers
//! (no `agent_id`) get no presence events. Counted per instance, and the
//! events name the instance (an id new at each start): an agent with
//! streams on two instances is announced by each, and the projections keep
//! it connected until both have said it disconnected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Why an agent's stream ended, as `agent.disconnected` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The agent ended the stream (or, for Subscribe, its call or
    /// connection went away: the broker cannot tell those apart).
    Closed,
    /// The token's `exp` passed; the broker ended the stream.
    TokenExpired,
    /// The broker is shutting down.
    Shutdown,
    /// The stream failed on the way (reset, protocol error).
    BrokenConnection,
    /// A subscriber fell further behind than its buffer and was dropped.
    TooSlow,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::TokenExpired => "token_expired",
            Reason::Shutdown => "shutdown",
            Reason::BrokenConnection => "broken_connection",
            Reason::TooSlow => "too_slow",
        }
    }
}

/// Agents with at least one stream open, by (tenant, agent id): how many
/// streams and since when. Bounded by the connections the listeners
/// admit (each entry is at least one open stream).
#[derive(Clone)]
pub struct Presence {
    instance: Arc<str>,
    open: Arc<Mutex<HashMap<AgentKey, (usize, SystemTime)>>>,
}

/// (tenant, agent id).
type AgentKey = (String, String);

impl Default for Presence {
    fn default() -> Self {
        Self {
            instance: uuid::Uuid::now_v7().to_string().into(),
            open: Arc::default(),
        }
    }
}

impl Presence {
    /// This instance, as presence events name it.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A stream of `agent` opened: when it is the agent's first,
    /// `announce` runs, under the lock, so that an agent's presence events
    /// are published in the order of its streams. Returns whether it ran.
    pub fn opened(
        &self,
        tenant: &str,
        agent: &str,
        now: SystemTime,
        announce: impl FnOnce(),
    ) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let entry = open
            .entry((tenant.to_string(), agent.to_string()))
            .or_insert((0, now));
        entry.0 += 1;
        let first = entry.0 == 1;
        if first {
            announce();
        }
        first
    }

    /// A stream of `agent` ended: when it was its last, `announce` runs
    /// under the lock with when the agent connected and for how long.
    /// Returns whether it ran.
    pub fn closed(
        &self,
        tenant: &str,
        agent: &str,
        now: SystemTime,
        announce: impl FnOnce(SystemTime, Duration),
    ) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_string(), agent.to_string());
        let Some(entry) = open.get_mut(&key) else {
            return false;
        };
        entry.0 -= 1;
        if entry.0 > 0 {
            return false;
        }
        let since = entry.1;
        open.remove(&key);
        announce(since, now.duration_since(since).unwrap_or_default());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_open_and_last_close_count() {
        let p = Presence::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let said = std::cell::RefCell::new(Vec::new());
        let open = |tenant: &str, at| p.opened(tenant, "a", at, || said.borrow_mut().push("on"));
        let close = |tenant: &str, at| {
            p.closed(tenant, "a", at, |since, lasted| {
                assert_eq!((since, lasted), (t0, Duration::from_secs(7)));
                said.borrow_mut().push("off");
            })
        };
        assert!(open("t", t0));
        assert!(!open("t", t0 + Duration::from_secs(1)));
        assert!(open("u", t0), "another tenant's agent of the same id");
        assert!(!close("t", t0 + Duration::from_secs(5)));
        assert!(close("t", t0 + Duration::from_secs(7)));
        assert!(!close("t", t0), "not open any more");
        assert_eq!(*said.borrow(), ["on", "on", "off"]);
        assert_ne!(p.instance(), Presence::default().instance());
    }
}
