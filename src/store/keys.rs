//! Redis keys. Each event type has one stream, `tc:{p<N>}:ev:<type>`, in
//! partition `N = fnv1a(type) % partitions`. The `{p<N>}` hash tag puts a
//! partition's streams in one Redis Cluster slot, so one `XREAD` covers
//! them. `tc:{p<N>}:types` is the partition's registry: writers append a
//! type the first time they write it, readers learn new streams from it.

use std::collections::HashMap;
use std::sync::Arc;

/// Cognito memberships in Redis: field `cognito_sub`, value a JSON array of
/// tenant ids (or a comma-separated list).
pub const MEMBERSHIPS_KEY: &str = "tc:memberships";
/// Per-tenant Socket.IO rate limits in Redis: field tenant, value events/s.
pub const RATE_LIMITS_KEY: &str = "tc:ratelimits";

/// The partition of an event type: FNV-1a, stable across instances and
/// releases.
pub fn partition_of(event_type: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in event_type.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// The stream of an event type.
pub fn stream_key(event_type: &str, partitions: u32) -> String {
    format!(
        "tc:{{p{}}}:ev:{event_type}",
        partition_of(event_type, partitions)
    )
}

/// A partition's registry of event types.
pub fn registry_key(partition: u32) -> String {
    format!("tc:{{p{partition}}}:types")
}

/// Partition and stream key of each type, computed once (the writer's
/// hot path).
#[derive(Default)]
pub(super) struct StreamKeys(HashMap<String, (u32, Arc<str>)>);

impl StreamKeys {
    pub(super) fn of(&mut self, event_type: &str, partitions: u32) -> &(u32, Arc<str>) {
        if !self.0.contains_key(event_type) {
            let entry = (
                partition_of(event_type, partitions),
                stream_key(event_type, partitions).into(),
            );
            self.0.insert(event_type.to_string(), entry);
        }
        &self.0[event_type]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_per_partition() {
        let key = stream_key("cost.updated", 4);
        let p = partition_of("cost.updated", 4);
        assert_eq!(key, format!("tc:{{p{p}}}:ev:cost.updated"));
        assert!(registry_key(p).starts_with(&format!("tc:{{p{p}}}:")));
        // Stable: the same everywhere, forever.
        assert_eq!(partition_of("cost.updated", 1), 0);
        assert_eq!(partition_of("", 7), 0x811c_9dc5 % 7);
        let spread: std::collections::HashSet<u32> = [
            "a.b",
            "cost.updated",
            "alert.created",
            "instance.created",
            "ml.training.started",
        ]
        .iter()
        .map(|t| partition_of(t, 4))
        .collect();
        assert!(spread.len() > 1);
        let mut cache = StreamKeys::default();
        assert_eq!(cache.of("cost.updated", 4), &(p, key.into()));
    }
}
