//! TLS on both listeners, with rustls on aws-lc-rs (the TLS stack and
//! crypto backend the rest of the broker already uses), and the client
//! side of the CLI's commands.
//!
//! - `TC_TLS_CERT` / `TC_TLS_KEY` (PEM; the certificate file may hold the
//!   chain) turn TLS on for the gRPC and the HTTP listener together;
//!   without them both speak plain text (the development default).
//! - `TC_TLS_CLIENT_CA` (PEM) makes gRPC clients present a certificate
//!   signed by one of its certificates (mTLS for agent fleets). The HTTP
//!   listener never asks for one: browsers connect there.
//! - The files are read again on `SIGHUP` and when they change (checked
//!   every `TC_TLS_WATCH_INTERVAL`): new handshakes use the new
//!   certificate, established connections keep theirs. A reload that fails
//!   (a half-written file, a key that does not match) keeps the previous
//!   certificate and logs why.
//! - The handshake happens in the connection's own task, within the
//!   listener's header-read deadline, after admission: a client without a
//!   certificate or a token holds one admitted connection and rustls's
//!   buffers for that long at most.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The TLS settings of `serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsSettings {
    /// Certificate (PEM, the chain after it if any) served on both
    /// listeners; with `TC_TLS_KEY`, turns TLS on. Plain text without it.
    #[arg(long, env = "TC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) gRPC clients' certificates must chain to:
    /// gRPC then requires a client certificate (mTLS). HTTP never does.
    #[arg(long, env = "TC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the certificate, key and client CA files are checked for
    /// a change (size or modification time); 0: only on SIGHUP.
    #[arg(long, env = "TC_TLS_WATCH_INTERVAL", default_value = "5s", value_parser = crate::config::parse::duration_or_zero)]
    pub tls_watch_interval: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Counters of TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    /// Handshakes that failed (not counting those cut by the deadline), by listener (`grpc`, `http`).
    pub handshake_failures: Family<ListenerLabel, Counter>,
    /// Reloads of the certificate files, by outcome (`loaded`, `failed`).
    pub reloads: Family<OutcomeLabel, Counter>,
}

/// The listener a connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Http,
}

impl Listener {
    fn label(self) -> &'static str {
        match self {
            Listener::Grpc => "grpc",
            Listener::Http => "http",
        }
    }
}

/// The server side: the current configuration of each listener, swapped
/// whole on reload.
pub struct Tls {
    settings: TlsSettings,
    grpc: RwLock<Arc<rustls::ServerConfig>>,
    http: RwLock<Arc<rustls::ServerConfig>>,
    /// Size and modification time of each file, as last loaded.
    seen: Mutex<Vec<Option<(u64, SystemTime)>>>,
    pub metrics: TlsMetrics,
}

impl Tls {
    /// The files of `settings` loaded; `None` when TLS is off. Errors name
    /// the setting, the file and what is wrong with it.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Option<Arc<Tls>>> {
        if settings.tls_cert.is_none() {
            return Ok(None);
        }
        let seen = fingerprint(settings);
        let (grpc, http) = server_configs(settings)?;
        Ok(Some(Arc::new(Tls {
            settings: settings.clone(),
            grpc: RwLock::new(Arc::new(grpc)),
            http: RwLock::new(Arc::new(http)),
            seen: Mutex::new(seen),
            metrics: TlsMetrics::default(),
        })))
    }

    /// Reads the files again; on failure the previous configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let seen = fingerprint(&self.settings);
        let result = server_configs(&self.settings);
        let outcome = if result.is_ok() { "loaded" } else { "failed" };
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        let (grpc, http) = result?;
        *self.grpc.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(grpc);
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(http);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(())
    }

    fn changed(&self) -> bool {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != fingerprint(&self.settings)
    }

    fn acceptor(&self, listener: Listener) -> tokio_rustls::TlsAcceptor {
        let config = match listener {
            Listener::Grpc => &self.grpc,
            Listener::Http => &self.http,
        };
        tokio_rustls::TlsAcceptor::from(Arc::clone(
            &config.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Starts `stream`'s handshake for `listener` (driven by the first
    /// read or write).
    pub fn accept(&self, listener: Listener, stream: TcpStream) -> Transport {
        Transport::Accepting {
            accept: Box::new(self.acceptor(listener).accept(stream)),
            listener,
            failures: self.metrics.handshake_failures.clone(),
        }
    }

    /// Reloads on SIGHUP and when the files change, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut hangup = hangups();
        let interval = self.settings.tls_watch_interval;
        let mut tick = (!interval.is_zero()).then(|| {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let why = tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = next_hangup(&mut hangup) => "SIGHUP",
                _ = async { match &mut tick { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                    if !self.changed() {
                        continue;
                    }
                    "the files changed"
                }
            };
            match self.reload() {
                Ok(()) => tracing::info!(
                    cert = %self.settings.tls_cert.as_deref().unwrap_or(Path::new("")).display(),
                    "TLS certificate reloaded ({why}): new connections use it"
                ),
                Err(e) => tracing::error!(
                    "TLS certificate not reloaded ({why}), the previous one stays: {e:#}"
                ),
            }
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!("no SIGHUP reload: {e}"))
            .ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn next_hangup(hangup: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        return signal.recv().await;
    }
    let _ = hangup;
    std::future::pending().await
}

fn fingerprint(settings: &TlsSettings) -> Vec<Option<(u64, SystemTime)>> {
    [
        &settings.tls_cert,
        &settings.tls_key,
        &settings.tls_client_ca,
    ]
    .into_iter()
    .map(|path| {
        let meta = std::fs::metadata(path.as_ref()?).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    })
    .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A file's bytes; an error names `setting`, the file and the cause.
fn read(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("{setting} {}: cannot read it: {e}", path.display()))
}

/// Certificates of a PEM file; an error names `setting` and the file.
pub fn read_certs(setting: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{setting} {}: no PEM certificate in it",
        path.display()
    );
    Ok(certs)
}

/// The gRPC and the HTTP listener's configurations.
fn server_configs(
    settings: &TlsSettings,
) -> anyhow::Result<(rustls::ServerConfig, rustls::ServerConfig)> {
    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        anyhow::bail!("TC_TLS_CERT and TC_TLS_KEY go together: set both");
    };
    let chain = read_certs("TC_TLS_CERT", cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("TC_TLS_KEY", key)?).map_err(|e| {
        anyhow::anyhow!(
            "TC_TLS_KEY {}: no PEM private key in it ({e})",
            key.display()
        )
    })?;
    let builder = || {
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS")
    };
    let grpc_verifier = match &settings.tls_client_ca {
        None => rustls::server::WebPkiClientVerifier::no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certs("TC_TLS_CLIENT_CA", path)? {
                roots
                    .add(ca)
                    .map_err(|e| anyhow::anyhow!("TC_TLS_CLIENT_CA {}: {e}", path.display()))?;
            }
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| anyhow::anyhow!("TC_TLS_CLIENT_CA {}: {e}", path.display()))?
        }
    };
    let mismatch = |e: rustls::Error| {
        anyhow::anyhow!(
            "TC_TLS_CERT {} with TC_TLS_KEY {}: {e}",
            cert.display(),
            settings
                .tls_key
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        )
    };
    let mut grpc = builder()?
        .with_client_cert_verifier(grpc_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut http = builder()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(mismatch)?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((grpc, http))
}

/// An accepted connection's transport: plain TCP, or TLS (its handshake
/// first, driven by the first read or write in the connection's task).
pub enum Transport {
    Plain(TcpStream),
    Accepting {
        accept: Box<tokio_rustls::Accept<TcpStream>>,
        listener: Listener,
        failures: Family<ListenerLabel, Counter>,
    },
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The handshake failed; the connection is closed.
    Failed,
}

impl Transport {
    /// Drives the handshake; ready once the transport carries data.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Transport::Accepting {
            accept,
            listener,
            failures,
        } = self
        else {
            return Poll::Ready(match self {
                Transport::Failed => Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "TLS handshake failed",
                )),
                _ => Ok(()),
            });
        };
        match std::task::ready!(Pin::new(accept.as_mut()).poll(cx)) {
            Ok(tls) => {
                *self = Transport::Tls(Box::new(tls));
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                failures
                    .get_or_create(&ListenerLabel {
                        listener: listener.label(),
                    })
                    .inc();
                tracing::debug!(listener = listener.label(), "TLS handshake failed: {e}");
                *self = Transport::Failed;
                Poll::Ready(Err(e))
            }
        }
    }

    /// The TCP stream under it (`None` once a handshake failed).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Plain(s) => Some(s),
            Transport::Accepting { accept, .. } => accept.get_ref(),
            Transport::Tls(tls) => Some(tls.get_ref().0),
            Transport::Failed => None,
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match this {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match this {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            _ => Poll::Ready(Ok(0)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ready(cx))?;
        match this {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            _ => Poll::Ready(Ok(0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
            _ => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The client side: a rustls configuration that trusts the system's roots
/// and, when given, the CA certificates of `ca_file` (named by `setting`
/// in errors), offering `alpn`.
pub fn client_config(
    setting: &str,
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ClientConfig> {
    let roots = match ca_file {
        None => Vec::new(),
        Some(path) => read_certs(setting, path)?,
    };
    let provider = provider();
    let verifier = if roots.is_empty() {
        rustls_platform_verifier::Verifier::new(Arc::clone(&provider))
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(roots, Arc::clone(&provider))
    }
    .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The `--ca-file` of client commands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CaArgs {
    /// CA certificates (PEM) to trust for an `https://` server, beside the
    /// system's (a private CA, a self-signed development certificate).
    #[arg(long, env = "TC_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// A reqwest client builder whose TLS trusts the system's roots and
/// `ca_file`'s.
pub fn http_client(ca: &CaArgs) -> anyhow::Result<reqwest::ClientBuilder> {
    let config = client_config("TC_CA_FILE", ca.ca_file.as_deref(), &[b"http/1.1"])?;
    Ok(reqwest::Client::builder().tls_backend_preconfigured(config))
}

/// A gRPC channel to `server` (`http://` or `https://`, trusting the
/// system's roots and `ca.ca_file`'s), connected now.
pub async fn grpc_channel(server: &str, ca: &CaArgs) -> anyhow::Result<tonic::transport::Channel> {
    let (endpoint, tls) = grpc_endpoint(server, "--server", "TC_CA_FILE", ca.ca_file.as_deref())?;
    let connect_error = |e: &dyn std::error::Error| {
        // The TLS error is the source's source: say it.
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        anyhow::anyhow!(
            "cannot connect to {server}: {text} (is `tensorcost-events serve` running?)"
        )
    };
    match tls {
        None => endpoint.connect().await.map_err(|e| connect_error(&e)),
        Some(dial) => endpoint
            .connect_with_connector(dial.service())
            .await
            .map_err(|e| connect_error(&e)),
    }
}

/// A gRPC channel to `url`, which connects when first used (and again
/// after it broke); `setting` and `ca_setting` name the settings in errors.
pub fn grpc_channel_lazy(
    url: &str,
    setting: &str,
    ca_setting: &str,
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let (endpoint, tls) = grpc_endpoint(url, setting, ca_setting, ca_file)?;
    let endpoint = endpoint.connect_timeout(connect_timeout);
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some(dial) => endpoint.connect_with_connector_lazy(dial.service()),
    })
}

/// The endpoint of a gRPC URL; for `https://`, how to dial it (tonic is
/// given the plain scheme, the connector does TLS).
fn grpc_endpoint(
    server: &str,
    setting: &str,
    ca_setting: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<(tonic::transport::Endpoint, Option<TlsDial>)> {
    use tonic::transport::Endpoint;
    let bad = || {
        anyhow::anyhow!(
            "{setting} {server:?} is not a URL like http://127.0.0.1:50051 or https://events.example.com:50051"
        )
    };
    let uri: axum::http::Uri = server.trim().parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    match scheme {
        "http" => Ok((
            Endpoint::from_shared(server.trim().to_string()).map_err(|_| bad())?,
            None,
        )),
        "https" => {
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = authority.port_u16().unwrap_or(443);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| anyhow::anyhow!("{setting} {server:?}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(
                ca_setting,
                ca_file,
                &[b"h2"],
            )?));
            let dial = TlsDial {
                tls,
                name,
                host: host.to_string(),
                port,
            };
            let endpoint =
                Endpoint::from_shared(format!("http://{authority}")).map_err(|_| bad())?;
            Ok((endpoint, Some(dial)))
        }
        _ => Err(bad()),
    }
}

/// Dials a TLS server for tonic.
#[derive(Clone)]
struct TlsDial {
    tls: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    host: String,
    port: u16,
}

impl TlsDial {
    fn service(
        self,
    ) -> impl tower::Service<
        axum::http::Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl std::future::Future<
            Output = std::io::Result<
                hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
            >,
        > + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: axum::http::Uri| {
            let dial = self.clone();
            async move {
                let tcp = TcpStream::connect((dial.host.as_str(), dial.port)).await?;
                tcp.set_nodelay(true)?;
                let stream = dial.tls.connect(dial.name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })
    }
}
