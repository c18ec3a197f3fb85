//! tensorcost-events: a multi-tenant real-time event broker.
//!
//! The file list is the architecture: [`event`] (envelope and rules),
//! [`broker`] (dispatch, order, dedupe, history), [`auth`] (tokens and
//! scopes), [`app`] (what every surface does), [`grpc`] and [`http`] (thin
//! transports), [`server`] (wiring and shutdown), [`cli`] (the binary's
//! commands).

pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod edge;
pub mod error;
pub mod event;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tenant;

/// Generated gRPC code for `tensorcost.events.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tensorcost.events.v1");

    /// Encoded descriptors of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/events_descriptor.bin"));
}
