//! One connection type over standalone Redis and Redis Cluster, so the
//! writer and relay are written once; and [`Lazy`], a connection for
//! lookups that must not hold up start-up when Redis is down.

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Where Redis is.
#[derive(Clone)]
pub enum Target {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

/// A connection to either kind.
#[derive(Clone)]
pub enum Conn {
    /// Reconnects by itself: for writes and lookups.
    Managed(ConnectionManager),
    /// A dedicated connection: for blocking reads.
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Target {
    /// Parses `TC_REDIS_URL`. Errors never echo the URL (it may hold a
    /// password).
    pub fn parse(urls: &str, cluster: bool) -> Result<Self, String> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            return Err("TC_REDIS_URL is empty".into());
        }
        for (i, url) in urls.iter().enumerate() {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(format!(
                    "TC_REDIS_URL entry {} must start with redis:// or rediss://",
                    i + 1
                ));
            }
            redis::Client::open(url.as_str()).map_err(|_| {
                format!(
                    "TC_REDIS_URL entry {} is not a valid Redis URL (redis://[:password@]host:port[/db])",
                    i + 1
                )
            })?;
        }
        if cluster || urls.len() > 1 {
            Ok(Target::Cluster(urls))
        } else {
            let client = redis::Client::open(urls[0].as_str())
                .map_err(|_| "TC_REDIS_URL is not a valid Redis URL".to_string())?;
            Ok(Target::Single(Box::new(client)))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    fn cluster(&self, response_timeout: Duration) -> RedisResult<ClusterClient> {
        let Target::Cluster(urls) = self else {
            unreachable!("cluster() on a single-node target");
        };
        ClusterClientBuilder::new(urls.clone())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(response_timeout)
            .build()
    }

    /// A self-healing connection for writes and lookups.
    pub async fn managed(&self) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                Ok(Conn::Managed(
                    client.get_connection_manager_with_config(config).await?,
                ))
            }
            Target::Cluster(_) => Ok(Conn::Cluster(
                self.cluster(Duration::from_secs(2))?
                    .get_async_connection()
                    .await?,
            )),
        }
    }

    /// A dedicated connection whose responses may take `response_timeout`
    /// (longer than any `BLOCK` used on it).
    pub async fn dedicated(&self, response_timeout: Duration) -> RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(response_timeout));
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Target::Cluster(_) => Ok(Conn::Cluster(
                self.cluster(response_timeout)?
                    .get_async_connection()
                    .await?,
            )),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection made on first use and remade after an error, for lookups
/// that must not hold up start-up when Redis is down.
pub struct Lazy {
    target: Target,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl Lazy {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `cmd`; on error the connection is dropped and made again next time.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.conn().await?;
        let result = cmd.query_async(&mut conn).await;
        if result.is_err() {
            *self.conn.lock().await = None;
        }
        result
    }

    /// Runs a (non-atomic) pipeline, ignoring its replies.
    pub async fn pipeline(&self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        let mut conn = self.conn().await?;
        let result = pipe.query_async::<()>(&mut conn).await;
        if result.is_err() {
            *self.conn.lock().await = None;
        }
        result
    }

    async fn conn(&self) -> redis::RedisResult<Conn> {
        Ok({
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.target.managed().await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        })
    }
}
