//! What the tests of tensorcost-events and its load generator share, so
//! each exists once: real processes on free ports ([`process`]), the broker
//! binary started and waited for through its ready file ([`broker`]),
//! `redis-server` single and cluster ([`redis`]), HS256 tokens ([`token`])
//! and a minimal Socket.IO client ([`sio`]).
//!
//! The kit starts real things only. It does not depend on the broker's
//! crate: tokens are minted with `jsonwebtoken` from the documented claims,
//! so a test also proves that a token made elsewhere is accepted.

pub mod broker;
pub mod process;
pub mod redis;
pub mod sio;
pub mod token;

pub use broker::BrokerProcess;
pub use process::{Process, Scratch, free_port};
pub use redis::{RedisCluster, RedisServer};
