//! Agent presence: which agents have a gRPC stream open on this instance.
//!
//! A caller whose token carries an `agent_id` claim is an agent. When its
//! first stream (Subscribe or PublishStream) opens here, the broker
//! publishes `agent.connected` into the agent's tenant; when its last one
//! ends, `agent.disconnected` with the reason. Ordinary service callers
//! (no `agent_id`) get no presence events. Counted per instance: an agent
//! with streams on two instances is connected until both have ended.

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
#[derive(Clone, Default)]
pub struct Presence {
    open: Arc<Mutex<HashMap<AgentKey, (usize, SystemTime)>>>,
}

/// (tenant, agent id).
type AgentKey = (String, String);

impl Presence {
    /// A stream of `agent` opened: `true` when it is the agent's first.
    pub fn opened(&self, tenant: &str, agent: &str, now: SystemTime) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let entry = open
            .entry((tenant.to_string(), agent.to_string()))
            .or_insert((0, now));
        entry.0 += 1;
        entry.0 == 1
    }

    /// A stream of `agent` ended: when it was its last, how long the agent
    /// was connected.
    pub fn closed(
        &self,
        tenant: &str,
        agent: &str,
        now: SystemTime,
    ) -> Option<(SystemTime, Duration)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_string(), agent.to_string());
        let entry = open.get_mut(&key)?;
        entry.0 -= 1;
        if entry.0 > 0 {
            return None;
        }
        let since = entry.1;
        open.remove(&key);
        Some((since, now.duration_since(since).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_open_and_last_close_count() {
        let p = Presence::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert!(p.opened("t", "a", t0));
        assert!(!p.opened("t", "a", t0 + Duration::from_secs(1)));
        assert!(
            p.opened("u", "a", t0),
            "another tenant's agent of the same id"
        );
        assert_eq!(p.closed("t", "a", t0 + Duration::from_secs(5)), None);
        assert_eq!(
            p.closed("t", "a", t0 + Duration::from_secs(7)),
            Some((t0, Duration::from_secs(7)))
        );
        assert_eq!(p.closed("t", "a", t0), None, "not open any more");
        assert_eq!(p.closed("u", "a", t0), Some((t0, Duration::ZERO)));
    }
}
