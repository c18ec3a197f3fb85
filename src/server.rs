//! Wires the parts together and runs both listeners until shutdown.
//!
//! Shutdown is explicit: a [`CancellationToken`] fires, readiness turns
//! false, the broker ends every subscription (each stream tells its client
//! the last id it was sent), then both listeners drain. Anything still open
//! after `TC_SHUTDOWN_TIMEOUT` is cut. Every task the server starts is owned:
//! the listeners' and the closer's join handles, the edge's pumps, the
//! background tasks (Cognito key prefetch, Redis rate limits, releasing
//! idle tenants) in a tracker that watches the same token, and the Redis
//! store, which is stopped last so it writes what the listeners accepted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionMetrics, GrpcIncoming};
use crate::app::App;
use crate::broker::Broker;
use crate::config::Settings;
use crate::edge::Edge;
use crate::edge::ratelimit::rates_from_redis;
use crate::grpc::{Authenticated, GrpcService};
use crate::http::{self, HttpState};
use crate::metrics::{EdgeMetrics, Metrics};
use crate::projection::Projections;
use crate::proto;
use crate::proto::event_broker_server::EventBrokerServer;
use crate::state::State;
use crate::store::{Lazy, Store, StoreMetrics};
use crate::webhook::{WebhookMetrics, Webhooks};
use tokio_util::task::TaskTracker;

/// HTTP/2 flow-control windows of the gRPC listener: what a client may send
/// ahead of the server reading it, per stream and per connection.
const GRPC_STREAM_WINDOW: u32 = 1 << 20;
const GRPC_CONNECTION_WINDOW: u32 = 2 << 20;
/// Largest header block of a gRPC request (a Cognito ID token is ~1-2 KiB).
const GRPC_MAX_HEADER_BYTES: u32 = 16 << 10;

/// How often tenants without subscribers or history are released.
const RELEASE_IDLE_EVERY: Duration = Duration::from_secs(30);

/// Where `serve` listens and tells it is listening; each default written
/// once, here.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenSettings {
    /// gRPC listen address.
    #[arg(long, env = "TC_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address (health, readiness, metrics, REST, Socket.IO).
    #[arg(long, env = "TC_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Once listening, write the bound addresses here as JSON
    /// (`{"grpc":"127.0.0.1:50051","http":"127.0.0.1:8080"}`): for
    /// supervisors and tests that bind port 0.
    #[arg(long, env = "TC_READY_FILE")]
    pub ready_file: Option<PathBuf>,

    /// Most connections open at once, both listeners together (0: what the
    /// descriptor limit leaves, `ulimit -n` minus 128).
    #[arg(long, env = "TC_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most connections open at once from one IP address (0: no cap); held
    /// to half of the total cap, so one address never takes every place.
    /// Behind a load balancer that does not keep client addresses, raise it
    /// or set 0.
    #[arg(long, env = "TC_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: usize,

    /// A new connection must send its request headers (HTTP/1) or its
    /// HTTP/2 preface (gRPC) within this long, and an idle HTTP/1
    /// connection is closed after it.
    #[arg(long, env = "TC_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = crate::config::parse::duration)]
    pub header_read_timeout: Duration,

    /// A connection whose writes make no progress for this long (the peer
    /// stopped reading) is closed, freeing what waits for it.
    #[arg(long, env = "TC_WRITE_TIMEOUT", default_value = "30s", value_parser = crate::config::parse::duration)]
    pub write_timeout: Duration,

    /// Longest a gRPC call may take to produce its response (a unary call's
    /// whole request included); streams, once answered, are not cut.
    #[arg(long, env = "TC_GRPC_REQUEST_TIMEOUT", default_value = "30s", value_parser = crate::config::parse::duration)]
    pub grpc_request_timeout: Duration,

    /// Most concurrent gRPC streams (calls) per connection.
    #[arg(long, env = "TC_GRPC_MAX_STREAMS", default_value_t = 100, value_parser = crate::config::parse::positive_u32)]
    pub grpc_max_streams: u32,

    /// After SIGTERM: how long streams, sockets and background tasks get to
    /// finish, together, before they are cut (then the webhook and Redis
    /// writers flush, each within its own timeout). Set the orchestrator's
    /// grace period a few seconds above it.
    #[arg(long, env = "TC_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = crate::config::parse::duration)]
    pub shutdown_timeout: Duration,

    /// Development mode (no `TC_JWT_SECRET`) keeps its generated secret in
    /// this file for `token` and `check-token` (default:
    /// `$XDG_STATE_HOME` or `~/.local/state`, then
    /// `tensorcost-events/dev-secret`).
    #[arg(long, env = "TC_DEV_SECRET_FILE")]
    pub dev_secret_file: Option<PathBuf>,

    /// Development mode: the token `/console` hands callers on this host.
    #[arg(skip)]
    pub dev_token: Option<String>,
}

/// A started server.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    background: TaskTracker,
    edge: Edge,
    store: Option<Store>,
    webhooks: crate::webhook::Running,
    state: State,
    app: App,
    /// The OTLP exporter: stopped last, so it sends every span.
    otlp: Option<(CancellationToken, JoinHandle<()>)>,
    drain: Duration,
}

/// Binds both listeners and starts serving. `secret` is the HS256 secret
/// (from settings, or generated in development mode).
pub async fn start(settings: &Settings, secret: &[u8]) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    // First: a certificate that does not load stops the start, before
    // anything listens.
    let tls = crate::tls::Tls::load(&settings.tls)?;
    let presence = crate::presence::Presence::default();
    let otlp_metrics = crate::otlp::OtlpMetrics::default();
    let otlp_stop = CancellationToken::new();
    let (tracer, otlp) = match crate::otlp::Tracer::start(
        &settings.otlp,
        presence.instance(),
        otlp_metrics.clone(),
    )? {
        Some((tracer, exporter)) => {
            tracing::info!(
                endpoint = settings.otlp.otlp_endpoint.as_deref().unwrap_or_default(),
                sample_ratio = settings.otlp.otlp_sample_ratio,
                "exporting spans over OTLP"
            );
            (tracer, Some(tokio::spawn(exporter.run(otlp_stop.clone()))))
        }
        None => (crate::otlp::Tracer::off(), None),
    };
    let redis = settings
        .redis
        .config(
            settings.broker.history_max_age,
            settings.limits.max_event_bytes,
        )
        .map_err(anyhow::Error::msg)?;
    let broker = Broker::new(settings.broker());
    let auth = Arc::new(
        settings
            .auth
            .authenticator(secret, redis.as_ref().map(|(t, _)| t))?,
    );
    let background = TaskTracker::new();
    if let Some(cognito) = auth.cognito() {
        tracing::info!(issuer = %cognito.config().issuer, "Cognito ID tokens accepted");
        let (auth, shutdown) = (Arc::clone(&auth), shutdown.clone());
        background.spawn(async move {
            if let Some(cognito) = auth.cognito() {
                tokio::select! {
                    () = cognito.prefetch() => {}
                    () = shutdown.cancelled() => {}
                }
            }
        });
    }
    background.spawn(release_idle_tenants(broker.clone(), shutdown.clone()));
    // Before anything is relayed: projections see every dispatched event.
    let projections = Projections::new(&settings.projections);
    let (observer, projection_queue) = projections.observer(&settings.projections);
    let (policy_observer, policy_queue, policy_gate) =
        crate::policy::Gate::observer(&settings.policies);
    broker.set_observers(vec![observer, policy_observer]);
    let store_metrics = StoreMetrics::default();
    let store = match redis {
        Some((target, config)) => {
            tracing::info!(
                cluster = target.is_cluster(),
                partitions = config.partitions,
                instance = %config.instance_id,
                "Redis configured"
            );
            Some(Store::start(target, config, &broker, store_metrics.clone()))
        }
        None => None,
    };
    let (store, mut sinks) = match store {
        Some((store, sink)) => (Some(store), vec![sink]),
        None => (None, Vec::new()),
    };
    // Kept state: Redis when configured, else the embedded store.
    let state = match &store {
        Some(store) => State::redis(store.target().clone()),
        None => State::embedded_from(&settings.state).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    tracing::info!(state = %state.describe(), "kept state");
    let restored = projections.load(&state).await?;
    tracing::info!(hours = restored, "MCP projections restored");
    background.spawn(
        projections
            .clone()
            .run(projection_queue, state.clone(), shutdown.clone()),
    );
    let policies = crate::policy::Policies::new(
        state.clone(),
        broker.clone(),
        settings.policies.clone(),
        presence.instance().to_string(),
        policy_gate,
    );
    let loaded = policies.load().await?;
    tracing::info!(policies = loaded, "policies loaded");
    background.spawn(policies.clone().run(policy_queue, shutdown.clone()));
    let webhook_metrics = WebhookMetrics::default();
    let webhooks = Webhooks::new(
        state.clone(),
        broker.clone(),
        settings.webhooks.clone(),
        webhook_metrics.clone(),
        tracer.clone(),
    )?;
    let (webhook_tasks, tap) = webhooks.start().await?;
    sinks.push(tap);
    broker.set_persist(sinks);
    let edge_config = settings
        .edge
        .config(settings.broker.max_subscribers_per_tenant);
    // Shares the edge's live rate limits: a change applies here at once.
    let admin = crate::admin::Admin::new(
        state.clone(),
        store.as_ref().map(|s| Lazy::new(s.target().clone())),
        edge_config.limits.clone(),
        settings.auth.memberships_file.clone(),
    );
    let kept = admin.load().await?;
    if kept > 0 {
        tracing::info!(tenants = kept, "rate-limit overrides loaded");
    }
    let app = App::new(broker.clone(), Arc::clone(&auth), settings.limits.clone())
        .with_admin(admin)
        .with_webhooks(webhooks)
        .with_projections(projections.clone())
        .with_policies(policies.clone())
        .with_presence(presence)
        .with_state(state.clone())
        .with_tracer(tracer.clone());
    let edge_metrics = EdgeMetrics {
        tracer,
        ..EdgeMetrics::default()
    };
    let admission_metrics = AdmissionMetrics::default();
    let admission = Admission::new(
        settings.listen.max_connections,
        settings.listen.max_connections_per_ip,
        admission_metrics.clone(),
    );
    tracing::info!(
        max_connections = admission.max_total(),
        per_ip = admission.max_per_ip(),
        "connection caps"
    );
    let mut metrics = Metrics::new(
        &broker,
        &edge_metrics,
        store.as_ref().map(|_| &store_metrics),
        &admission_metrics,
        &webhook_metrics,
        &projections,
        &policies,
    );
    if let Some(tls) = &tls {
        metrics.register_tls(&tls.metrics);
    }
    metrics.register_otlp(&otlp_metrics);
    let metrics = Arc::new(metrics);
    let cors = edge_config.origins.cors_layer();
    let emit_latency = edge_metrics.emit_latency.clone();
    let (socketio, io, edge) = Edge::layer(app.clone(), broker.clone(), edge_config, edge_metrics);
    if let Some(store) = &store {
        background.spawn(refresh_rate_overrides(
            Lazy::new(store.target().clone()),
            edge.clone(),
            settings.redis.rate_limits_refresh,
            shutdown.clone(),
        ));
    }
    if let Some(tls) = &tls {
        background.spawn(Arc::clone(tls).watch(shutdown.clone()));
    }
    background.close();
    let grpc_listener = TcpListener::bind(settings.listen.grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", settings.listen.grpc_addr))?;
    let http_listener = TcpListener::bind(settings.listen.http_addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.listen.http_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let ready = Arc::new(AtomicBool::new(true));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventBrokerServer<GrpcService>>().await;

    // On shutdown: not ready, then end every subscription so streaming
    // responses finish and the listeners can drain.
    let closer = {
        let (shutdown, ready, broker) = (shutdown.clone(), Arc::clone(&ready), broker.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            ready.store(false, Ordering::Release);
            health
                .set_not_serving::<EventBrokerServer<GrpcService>>()
                .await;
            broker.close();
            // Closing the transports (not a Socket.IO disconnect) lets
            // clients reconnect by themselves, to another instance.
            io.close().await;
            Ok(())
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Authenticated before its body is read (grpc::Authenticated).
    let broker_service = Authenticated::new(
        EventBrokerServer::new(GrpcService::new(app.clone(), emit_latency))
            .max_decoding_message_size(app.max_request_bytes()),
        app.clone(),
    );
    let listen = &settings.listen;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(listen.grpc_max_streams)
        .initial_stream_window_size(GRPC_STREAM_WINDOW)
        .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
        .http2_max_header_list_size(GRPC_MAX_HEADER_BYTES)
        .timeout(listen.grpc_request_timeout)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service)
        .serve_with_incoming_shutdown(
            GrpcIncoming::new(
                grpc_listener,
                tls.clone(),
                Arc::clone(&admission),
                listen.header_read_timeout,
                listen.write_timeout,
            ),
            shutdown.clone().cancelled_owned(),
        );
    let grpc = tokio::spawn(async move { grpc.await.context("gRPC server failed") });

    let router = http::router(HttpState {
        app: app.clone(),
        ready,
        metrics,
        redis: store.as_ref().map(Store::status),
        dev_token: settings.listen.dev_token.clone(),
    })
    .merge(crate::mcp::router(
        app.clone(),
        &settings.mcp,
        shutdown.child_token(),
    ))
    .layer(socketio)
    .layer(cors);
    let http = {
        let shutdown = shutdown.clone();
        let admission = Arc::clone(&admission);
        let header_read_timeout = listen.header_read_timeout;
        let write_timeout = listen.write_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            http::serve(
                http_listener,
                tls,
                router,
                admission,
                header_read_timeout,
                write_timeout,
                shutdown,
            )
            .await
            .context("HTTP server failed")
        })
    };

    if let Some(path) = &settings.listen.ready_file {
        write_ready_file(path, grpc_addr, http_addr)?;
    }
    tracing::info!(
        %grpc_addr,
        %http_addr,
        tls = tls.is_some(),
        "tensorcost-events listening"
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        shutdown,
        tasks: vec![closer, grpc, http],
        background,
        edge,
        store,
        webhooks: webhook_tasks,
        state,
        app,
        otlp: otlp.map(|task| (otlp_stop, task)),
        drain: settings.listen.shutdown_timeout,
    })
}

/// Releases tenants that have no subscriber and no history left, until
/// shutdown.
async fn release_idle_tenants(broker: Broker, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RELEASE_IDLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let released = broker.release_idle(std::time::Instant::now());
        if released > 0 {
            tracing::debug!(
                released,
                tenants = broker.tenant_count(),
                "released idle tenants"
            );
        }
    }
}

/// Keeps the edge's per-tenant rates in step with the Redis hash
/// `tc:ratelimits` (field tenant, value events per second).
async fn refresh_rate_overrides(
    redis: Lazy,
    edge: Edge,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut warned = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // Raw bytes: one value that is not text must not hide the others.
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = match redis
            .query(redis::cmd("HGETALL").arg(crate::store::keys::RATE_LIMITS_KEY))
            .await
        {
            Ok(m) => m,
            Err(_) => continue, // Redis down: keep the last known rates.
        };
        let (overrides, refused) = rates_from_redis(pairs);
        for (field, why) in refused {
            // Once per bad entry, not at every refresh.
            if warned.insert(field.clone()) {
                tracing::warn!(%field, "ignoring an entry of Redis tc:ratelimits: {why}");
            }
        }
        edge.set_rate_overrides(overrides);
    }
}

/// Writes `{"grpc": …, "http": …}` atomically (write, then rename), so a
/// reader never sees half a file.
fn write_ready_file(
    path: &std::path::Path,
    grpc: SocketAddr,
    http: SocketAddr,
) -> anyhow::Result<()> {
    let body = serde_json::json!({ "grpc": grpc.to_string(), "http": http.to_string() });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string())
        .with_context(|| format!("cannot write ready file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot write ready file {}", path.display()))?;
    Ok(())
}

impl Running {
    /// The door every surface of this server goes through.
    pub fn app(&self) -> App {
        self.app.clone()
    }

    /// A token that starts shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts shutdown and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server has stopped (after the shutdown token fires),
    /// cutting streams that outlive the drain timeout.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        let drain = self.drain;
        let deadline = tokio::time::Instant::now() + drain;
        let mut result = Ok(());
        for mut task in self.tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result = Err(e),
                Ok(Err(join)) => result = Err(anyhow::anyhow!("server task panicked: {join}")),
                Err(_) => {
                    tracing::warn!(
                        "streams still open after {drain:?} (TC_SHUTDOWN_TIMEOUT); closing them"
                    );
                    task.abort();
                }
            }
        }
        // The broker is closed: every pump ends, and the background tasks
        // watch the same token.
        if tokio::time::timeout_at(deadline, self.edge.closed())
            .await
            .is_err()
        {
            tracing::warn!("Socket.IO rooms still open after {drain:?} (TC_SHUTDOWN_TIMEOUT)");
        }
        // Background tasks hold the policy and webhook state they flush on
        // stop: they get at least a second even when the streams took all.
        let background = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        if tokio::time::timeout_at(background, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks still running after {drain:?} (TC_SHUTDOWN_TIMEOUT)");
        }
        // With nothing publishing any more: the webhook enqueuer writes the
        // deliveries it holds and deliveries in flight finish (bounded by
        // the webhook timeout); they may publish their trace events.
        self.webhooks.stop().await;
        // Last: the Redis writer writes what was accepted (bounded by its
        // flush timeout), so other instances get it.
        if let Some(store) = self.store {
            store.stop().await;
        }
        self.state.close().await;
        // Last: spans of everything above, within one export timeout.
        if let Some((stop, task)) = self.otlp {
            stop.cancel();
            let _ = task.await;
        }
        result
    }
}

/// Resolves on Ctrl-C or SIGTERM (`ctrl_c` alone ignores SIGTERM, which is
/// what container runtimes send).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
