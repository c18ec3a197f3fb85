//! tensorcost-events: a multi-tenant real-time event broker.
//!
//! The file list is the architecture (docs/architecture.md has the map):
//! `event` (envelope, rules, wire forms), `broker` (dispatch, order,
//! dedupe, history, subscriptions), `auth` (tokens and scopes), `app`
//! (the one door every surface goes through), `grpc`, `http` and
//! `edge` (thin transports), `store` (Redis), [`server`] (wiring and
//! shutdown), [`config`] (settings), [`cli`] (the binary's commands).
//!
//! Only what the binary, the integration tests and the load generator use
//! is public: [`cli`], [`config`], [`server`] and the generated [`proto`].

pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod app;
pub(crate) mod auth;
pub(crate) mod broker;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub(crate) mod console;
pub(crate) mod edge;
pub(crate) mod error;
pub(crate) mod event;
pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod mcp;
pub(crate) mod metrics;
pub(crate) mod otlp;
pub(crate) mod policy;
pub(crate) mod presence;
pub(crate) mod projection;
pub mod server;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod telemetry;
pub(crate) mod tenant;
pub(crate) mod tenant_settings;
pub(crate) mod tls;
pub(crate) mod webhook;

#[cfg(test)]
mod properties;

/// Generated gRPC code for `tensorcost.events.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tensorcost.events.v1");

    /// Encoded descriptors of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/events_descriptor.bin"));
}
