//! The Redis backend: the same operations on keys every instance shares.
//! Every key carries the hash tag `{tc-state}`, so each multi-key script
//! runs on one node of a Redis Cluster.
//!
//! | what | key | type |
//! |---|---|---|
//! | records of a tenant | `tc:{tc-state}:rec:<table>:<tenant>` | hash: id → value |
//! | tenants with records | `tc:{tc-state}:tenants:<table>` | set |
//! | a log | `tc:{tc-state}:log:<log>:<key>` | list, newest first, trimmed to `keep` |
//! | job bodies | `tc:{tc-state}:jobs` | hash: id → job |
//! | a queue | `tc:{tc-state}:q:<queue>` | sorted set: id by due time (leased: lease end) |
//! | queues with jobs | `tc:{tc-state}:ready` | sorted set: queue by its earliest due time |
//! | a version | `tc:{tc-state}:v:<name>` | counter |
//!
//! Queue operations are Lua scripts, so a claim (take the due jobs, lease
//! them, update the ready index) is atomic across instances.

use super::{Capacity, Finished, Job, Result, StateError};
use crate::store::{Lazy, Target};

const PREFIX: &str = "tc:{tc-state}:";

/// Queues looked at by one claim: the earliest-due first.
const CLAIM_SCAN: usize = 1000;

const ENQUEUE: &str = r"
local prefix = ARGV[1]
for i = 2, #ARGV, 4 do
  local id, q, due, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local qk = prefix .. 'q:' .. q
  local old = redis.call('HGET', KEYS[1], id)
  redis.call('HSET', KEYS[1], id, body)
  redis.call('ZADD', qk, due, id)
  local first = redis.call('ZRANGE', qk, 0, 0, 'WITHSCORES')
  redis.call('ZADD', KEYS[2], first[2], q)
end
return 1
";

const CLAIM: &str = r"
local prefix, now, lease_end = ARGV[1], ARGV[2], ARGV[3]
local max, default, scan = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local caps = {}
for i = 7, #ARGV, 2 do caps[ARGV[i]] = tonumber(ARGV[i + 1]) end
local out = {}
if max <= 0 then return out end
local queues = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, scan)
for _, q in ipairs(queues) do
  local cap = caps[q] or default
  if cap > 0 then
    local room = math.min(cap, max - #out)
    local qk = prefix .. 'q:' .. q
    local ids = redis.call('ZRANGEBYSCORE', qk, '-inf', now, 'LIMIT', 0, room)
    for _, id in ipairs(ids) do
      local body = redis.call('HGET', KEYS[1], id)
      if body then
        redis.call('ZADD', qk, lease_end, id)
        table.insert(out, body)
      else
        redis.call('ZREM', qk, id)
      end
    end
    local first = redis.call('ZRANGE', qk, 0, 0, 'WITHSCORES')
    if #first == 0 then
      redis.call('ZREM', KEYS[2], q)
    else
      redis.call('ZADD', KEYS[2], first[2], q)
    end
    if #out >= max then break end
  end
end
return out
";

const FINISH: &str = r"
local prefix, q, id = ARGV[1], ARGV[2], ARGV[3]
local qk = prefix .. 'q:' .. q
redis.call('HDEL', KEYS[1], id)
redis.call('ZREM', qk, id)
local first = redis.call('ZRANGE', qk, 0, 0, 'WITHSCORES')
if #first == 0 then
  redis.call('ZREM', KEYS[2], q)
else
  redis.call('ZADD', KEYS[2], first[2], q)
end
return 1
";

const DROP_QUEUE: &str = r"
local prefix, q = ARGV[1], ARGV[2]
local qk = prefix .. 'q:' .. q
local ids = redis.call('ZRANGE', qk, 0, -1)
for i = 1, #ids, 500 do
  redis.call('HDEL', KEYS[1], unpack(ids, i, math.min(i + 499, #ids)))
end
redis.call('DEL', qk)
redis.call('ZREM', KEYS[2], q)
return #ids
";

const LEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
";

pub struct RedisState {
    conn: Lazy,
}

fn err(what: &str, e: redis::RedisError) -> StateError {
    StateError(format!("Redis {what}: {e}"))
}

fn key(parts: &[&str]) -> String {
    let mut k = PREFIX.to_string();
    k.push_str(&parts.join(":"));
    k
}

impl RedisState {
    pub fn new(target: Target) -> Self {
        Self {
            conn: Lazy::new(target),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        self.conn.query(cmd).await.map_err(|e| err(what, e))
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &str,
        args: Vec<String>,
    ) -> Result<T> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(2)
            .arg(key(&["jobs"]))
            .arg(key(&["ready"]))
            .arg(PREFIX);
        for a in args {
            cmd.arg(a);
        }
        self.query(what, &cmd).await
    }

    pub async fn get(&self, table: &str, tenant: &str, id: &str) -> Result<Option<String>> {
        self.query(
            "get",
            redis::cmd("HGET").arg(key(&["rec", table, tenant])).arg(id),
        )
        .await
    }

    pub async fn put(&self, table: &str, tenant: &str, id: &str, value: String) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(key(&["rec", table, tenant]))
            .arg(id)
            .arg(value)
            .ignore()
            .cmd("SADD")
            .arg(key(&["tenants", table]))
            .arg(tenant)
            .ignore();
        self.query_pipe("put", &pipe).await
    }

    async fn query_pipe(&self, what: &str, pipe: &redis::Pipeline) -> Result<()> {
        self.conn.pipeline(pipe).await.map_err(|e| err(what, e))
    }

    pub async fn delete(&self, table: &str, tenant: &str, id: &str) -> Result<bool> {
        let removed: i64 = self
            .query(
                "delete",
                redis::cmd("HDEL").arg(key(&["rec", table, tenant])).arg(id),
            )
            .await?;
        Ok(removed > 0)
    }

    pub async fn list(&self, table: &str, tenant: &str) -> Result<Vec<(String, String)>> {
        let mut rows: Vec<(String, String)> = self
            .query(
                "list",
                redis::cmd("HGETALL").arg(key(&["rec", table, tenant])),
            )
            .await?;
        rows.sort();
        Ok(rows)
    }

    pub async fn list_all(&self, table: &str) -> Result<Vec<(String, String, String)>> {
        let tenants: Vec<String> = self
            .query("list", redis::cmd("SMEMBERS").arg(key(&["tenants", table])))
            .await?;
        let mut out = Vec::new();
        for tenant in tenants {
            for (id, value) in self.list(table, &tenant).await? {
                out.push((tenant.clone(), id, value));
            }
        }
        Ok(out)
    }

    pub async fn push_log(&self, log: &str, k: &str, value: String, keep: usize) -> Result<()> {
        let list = key(&["log", log, k]);
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH")
            .arg(&list)
            .arg(value)
            .ignore()
            .cmd("LTRIM")
            .arg(&list)
            .arg(0)
            .arg(keep.max(1) as i64 - 1)
            .ignore();
        self.query_pipe("log", &pipe).await
    }

    pub async fn read_log(&self, log: &str, k: &str, limit: usize) -> Result<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.query(
            "log",
            redis::cmd("LRANGE")
                .arg(key(&["log", log, k]))
                .arg(0)
                .arg(limit as i64 - 1),
        )
        .await
    }

    pub async fn delete_log(&self, log: &str, k: &str) -> Result<()> {
        let _: i64 = self
            .query("log", redis::cmd("DEL").arg(key(&["log", log, k])))
            .await?;
        Ok(())
    }

    pub async fn enqueue(&self, jobs: Vec<Job>) -> Result<()> {
        // One script call per few hundred jobs keeps each call short.
        for chunk in jobs.chunks(256) {
            let mut args = Vec::with_capacity(chunk.len() * 4);
            for job in chunk {
                let body =
                    serde_json::to_string(job).map_err(|e| StateError(format!("job: {e}")))?;
                args.extend([
                    job.id.clone(),
                    job.queue.clone(),
                    job.due_ms.to_string(),
                    body,
                ]);
            }
            let _: i64 = self.script("enqueue", ENQUEUE, args).await?;
        }
        Ok(())
    }

    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        capacity: &Capacity,
        max: usize,
    ) -> Result<Vec<Job>> {
        let mut args = vec![
            now_ms.to_string(),
            now_ms.saturating_add(lease_ms).to_string(),
            max.to_string(),
            capacity.default.to_string(),
            CLAIM_SCAN.to_string(),
        ];
        for (queue, n) in &capacity.limited {
            args.push(queue.clone());
            args.push(n.to_string());
        }
        let bodies: Vec<String> = self.script("claim", CLAIM, args).await?;
        Ok(bodies
            .into_iter()
            .filter_map(|b| match serde_json::from_str::<Job>(&b) {
                Ok(job) => Some(job),
                Err(e) => {
                    tracing::warn!("skipped an unreadable job in Redis: {e}");
                    None
                }
            })
            .collect())
    }

    pub async fn finish(&self, queue: &str, id: &str) -> Result<()> {
        let _: i64 = self
            .script("finish", FINISH, vec![queue.into(), id.into()])
            .await?;
        Ok(())
    }

    /// The jobs finished, concurrently (the connection pipelines them),
    /// and every log entry in one pipeline, each log trimmed once.
    pub async fn finish_logged(&self, log: &str, done: Vec<Finished>, keep: usize) -> Result<()> {
        let mut pipe = redis::pipe();
        let mut trimmed = std::collections::HashSet::new();
        for d in &done {
            let list = key(&["log", log, &d.key]);
            pipe.cmd("LPUSH").arg(&list).arg(&d.value).ignore();
        }
        for d in &done {
            if trimmed.insert(d.key.as_str()) {
                pipe.cmd("LTRIM")
                    .arg(key(&["log", log, &d.key]))
                    .arg(0)
                    .arg(keep.max(1) as i64 - 1)
                    .ignore();
            }
        }
        let finished =
            futures_util::future::join_all(done.iter().map(|d| self.finish(&d.queue, &d.id)));
        let (finished, logged) = tokio::join!(finished, self.query_pipe("log", &pipe));
        finished.into_iter().collect::<Result<Vec<()>>>()?;
        logged
    }

    pub async fn drop_queue(&self, queue: &str) -> Result<()> {
        let _: i64 = self
            .script("drop queue", DROP_QUEUE, vec![queue.into()])
            .await?;
        Ok(())
    }

    pub async fn queue_len(&self, queue: &str) -> Result<usize> {
        self.query("count", redis::cmd("ZCARD").arg(key(&["q", queue])))
            .await
    }

    pub async fn queued(&self) -> Result<u64> {
        self.query("count", redis::cmd("HLEN").arg(key(&["jobs"])))
            .await
    }

    pub async fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        let held: i64 = self
            .query(
                "lease",
                redis::cmd("EVAL")
                    .arg(LEASE)
                    .arg(1)
                    .arg(key(&["lease", name]))
                    .arg(holder)
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(held == 1)
    }

    pub async fn release(&self, name: &str, holder: &str) -> Result<()> {
        let _: i64 = self
            .query(
                "lease",
                redis::cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(key(&["lease", name]))
                    .arg(holder),
            )
            .await?;
        Ok(())
    }

    pub async fn version(&self, name: &str) -> Result<u64> {
        let v: Option<u64> = self
            .query("version", redis::cmd("GET").arg(key(&["v", name])))
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn bump(&self, name: &str) -> Result<u64> {
        self.query("version", redis::cmd("INCR").arg(key(&["v", name])))
            .await
    }
}

#[cfg(test)]
mod tests {
    use tensorcost_testkit::redis::{RedisCluster, RedisServer};

    use crate::state::{State, contract};
    use crate::store::Target;

    #[tokio::test]
    async fn keeps_the_contract_on_one_node_and_on_a_cluster() {
        let server = RedisServer::start();
        let state = State::redis(Target::parse(&server.url(), false).unwrap());
        contract::records(&state).await;
        contract::logs(&state).await;
        contract::queues(&state).await;
        // One holder at a time, until it lets go.
        let ttl = std::time::Duration::from_secs(30);
        assert!(state.lease("l", "a", ttl).await.unwrap());
        assert!(!state.lease("l", "b", ttl).await.unwrap());
        assert!(state.lease("l", "a", ttl).await.unwrap(), "renewed");
        state.release("l", "b").await.unwrap();
        assert!(
            !state.lease("l", "b", ttl).await.unwrap(),
            "only its holder lets go"
        );
        state.release("l", "a").await.unwrap();
        assert!(state.lease("l", "b", ttl).await.unwrap());
        let cluster = RedisCluster::start();
        let state = State::redis(Target::parse(&cluster.url(), true).unwrap());
        contract::records(&state).await;
        contract::logs(&state).await;
        contract::queues(&state).await;
    }
}
