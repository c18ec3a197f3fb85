//! The webhook client: HTTP/1.1 (over TLS for `https://`) to receivers.
//!
//! Each connection is driven by the worker that uses it, in the worker's
//! own task: a delivery is one write and one read on a socket the worker
//! already holds, with no connection task to wake and no pool checkout per
//! request (a general-purpose client's pool and connection task cost more
//! than a delivery's own work; see docs/benchmarks.md, scenario 7).
//! Between a worker's runs its connections wait in a small idle pool per
//! endpoint. Connections go only to addresses the [`Guard`] allows, checked
//! on the resolved address at connect time; redirects are never followed
//! (a 3xx is the attempt's answer).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::guard::{Guard, Refused};

/// What a receiver's answer body may hold before the connection is given
/// up rather than read on (the body itself is never kept).
const MAX_ANSWER_BODY: usize = 64 * 1024;
/// A connection's read buffer at most (hyper's floor is 8 KiB).
const MAX_BUFFER: usize = 16 * 1024;
/// An idle connection older than this is closed rather than reused.
const IDLE: Duration = Duration::from_secs(30);
/// Addresses tried per connect, of those a name resolves to.
const MAX_ADDRESSES: usize = 4;

const USER_AGENT: &str = concat!("tensorcost-events/", env!("CARGO_PKG_VERSION"));

/// Where an endpoint's deliveries go: its URL, parsed and checked once.
#[derive(Debug, Clone)]
pub struct Target {
    /// `scheme://host:port`: connections are reused within it only.
    origin: String,
    host: url::Host<String>,
    port: u16,
    /// The `Host` header: host, and port when not the scheme's default.
    authority: HeaderValue,
    /// Path and query: the request target.
    path: String,
    /// The name the certificate must carry, for `https://`.
    tls: Option<ServerName<'static>>,
}

impl Target {
    /// An endpoint's URL, checked by the guard and parsed.
    pub fn checked(guard: &Guard, url: &str) -> Result<Self, Refused> {
        Self::new(&guard.check_url(url)?)
    }

    /// From a URL the guard accepted.
    fn new(url: &url::Url) -> Result<Self, Refused> {
        let bad = |what: &str| Refused::Url(what.to_string());
        let host = url.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let host_text = match &host {
            url::Host::Ipv6(ip) => format!("[{ip}]"),
            other => other.to_string(),
        };
        let authority = match url.port() {
            Some(p) => format!("{host_text}:{p}"),
            None => host_text.clone(),
        };
        let authority = HeaderValue::from_str(&authority).map_err(|_| bad("bad host"))?;
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        let tls = match url.scheme() {
            "https" => {
                let name = match &host {
                    url::Host::Domain(d) => d.clone(),
                    url::Host::Ipv4(ip) => ip.to_string(),
                    url::Host::Ipv6(ip) => ip.to_string(),
                };
                Some(ServerName::try_from(name).map_err(|_| bad("not a TLS server name"))?)
            }
            _ => None,
        };
        Ok(Self {
            origin: format!("{}://{host_text}:{port}", url.scheme()),
            host,
            port,
            authority,
            path,
            tls,
        })
    }
}

/// Why an attempt got no answer. The text never holds the URL (its path or
/// query may carry a receiver's token).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out (TC_WEBHOOK_TIMEOUT)")]
    Timeout,
    #[error("request failed: {0}")]
    Request(String),
}

/// A receiver's answer: its status and `Retry-After`.
pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<String>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One connection to a receiver; its driver is polled only by whoever
/// sends on it.
pub struct Conn {
    origin: String,
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
    closed: bool,
    /// Its last use: unused for [`IDLE`], it is not used again.
    since: Instant,
}

impl Conn {
    fn usable(&mut self, origin: &str) -> bool {
        if self.closed || self.origin != origin || self.since.elapsed() > IDLE {
            return false;
        }
        // Lets the connection notice a close the receiver sent while it
        // was idle.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if self.driver.as_mut().poll(&mut cx).is_ready() {
            self.closed = true;
        }
        !self.closed && !self.sender.is_closed()
    }
}

/// Polls `fut` while driving the connection. When the connection ends
/// first, its driver is dropped and `fut` (which depends on it) resolves.
async fn drive<T>(driver: &mut Driver, closed: &mut bool, fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    if !*closed {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = driver.as_mut() => {}
        }
        *closed = true;
        *driver = Box::pin(std::future::pending());
    }
    fut.await
}

/// The client: TLS settings, the guard, and idle connections per endpoint.
pub struct Client {
    guard: Arc<Guard>,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    idle: Mutex<Idle>,
    /// Idle connections kept per endpoint, and in all.
    idle_per_endpoint: usize,
    idle_total: usize,
}

#[derive(Default)]
struct Idle {
    by_endpoint: HashMap<String, Vec<Conn>>,
    count: usize,
}

impl Client {
    /// `extra_roots`: PEM certificates trusted beside the system's
    /// (`TC_WEBHOOK_CA_FILE`), for receivers behind a private CA.
    pub fn new(
        guard: Arc<Guard>,
        extra_roots: Option<&std::path::Path>,
        connect_timeout: Duration,
        idle_per_endpoint: usize,
        idle_total: usize,
    ) -> anyhow::Result<Self> {
        let config = crate::tls::client_config("TC_WEBHOOK_CA_FILE", extra_roots, &[b"http/1.1"])?;
        Ok(Self {
            guard,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect_timeout,
            idle: Mutex::new(Idle::default()),
            idle_per_endpoint,
            idle_total,
        })
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection of `endpoint`, if one is kept.
    pub fn take(&self, endpoint: &str) -> Option<Conn> {
        let mut idle = self.lock_idle();
        let conns = idle.by_endpoint.get_mut(endpoint)?;
        let conn = conns.pop();
        if conns.is_empty() {
            idle.by_endpoint.remove(endpoint);
        }
        if conn.is_some() {
            idle.count -= 1;
        }
        conn
    }

    /// Keeps a connection for the endpoint's next delivery, within the
    /// bounds; otherwise it is closed.
    pub fn give_back(&self, endpoint: &str, mut conn: Conn) {
        if conn.closed || conn.sender.is_closed() {
            return;
        }
        conn.since = Instant::now();
        let mut idle = self.lock_idle();
        if idle.count >= self.idle_total {
            return;
        }
        let conns = idle.by_endpoint.entry(endpoint.to_string()).or_default();
        if conns.len() >= self.idle_per_endpoint {
            return;
        }
        conns.push(conn);
        idle.count += 1;
    }

    /// Closes connections idle longer than [`IDLE`].
    pub fn sweep(&self) {
        let mut idle = self.lock_idle();
        let mut count = 0;
        idle.by_endpoint.retain(|_, conns| {
            conns.retain(|c| c.since.elapsed() <= IDLE);
            count += conns.len();
            !conns.is_empty()
        });
        idle.count = count;
    }

    /// POSTs `body` to `target` on `conn`'s connection, or on a new one
    /// when it holds none usable for the target; leaves the connection in
    /// `conn` when it can be used again. A reused connection that the
    /// receiver closed before the request went out is replaced once.
    pub async fn post(
        &self,
        conn: &mut Option<Conn>,
        target: &Target,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Answer, SendError> {
        let mut req = request(target, headers, body)?;
        let kept = conn
            .take()
            .and_then(|mut c| c.usable(&target.origin).then_some(c));
        let (mut c, mut reused) = match kept {
            Some(c) => (c, true),
            None => (self.connect(target).await?, false),
        };
        loop {
            // Ready once the previous exchange has ended; an error means
            // the connection was closed under it.
            if let Err(e) = drive(&mut c.driver, &mut c.closed, c.sender.ready()).await {
                if !reused {
                    return Err(SendError::Request(describe(&e)));
                }
                reused = false;
                c = self.connect(target).await?;
                continue;
            }
            let sent = drive(&mut c.driver, &mut c.closed, c.sender.try_send_request(req)).await;
            match sent {
                Ok(response) => {
                    let answer = c.read_answer(response).await;
                    // Idle from now: a connection in use never ages out.
                    c.since = Instant::now();
                    *conn = Some(c);
                    return Ok(answer);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        req = back;
                        reused = false;
                        c = self.connect(target).await?;
                    }
                    _ => return Err(SendError::Request(describe(e.error()))),
                },
            }
        }
    }

    async fn connect(&self, target: &Target) -> Result<Conn, SendError> {
        let literal = |ip: std::net::IpAddr| {
            if self.guard.ip_allowed(ip) {
                Ok(vec![SocketAddr::new(ip, target.port)])
            } else {
                Err(Refused::Address {
                    host: ip.to_string(),
                })
            }
        };
        let addrs = match &target.host {
            url::Host::Ipv4(ip) => literal((*ip).into())?,
            url::Host::Ipv6(ip) => literal((*ip).into())?,
            url::Host::Domain(name) => {
                let found = tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::lookup_host((name.as_str(), target.port)),
                )
                .await
                .map_err(|_| SendError::Connect(format!("resolving {name} timed out")))?
                .map_err(|e| SendError::Connect(format!("resolving {name}: {e}")))?;
                self.guard.allowed_addresses(name, found.collect())?
            }
        };
        let mut last = String::from("no address");
        let mut stream = None;
        for addr in addrs.into_iter().take(MAX_ADDRESSES) {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".into(),
            }
        }
        let stream = stream.ok_or(SendError::Connect(last))?;
        let _ = stream.set_nodelay(true);
        let io: Box<dyn Io> = match &target.tls {
            None => Box::new(stream),
            Some(name) => Box::new(
                tokio::time::timeout(self.connect_timeout, self.tls.connect(name.clone(), stream))
                    .await
                    .map_err(|_| SendError::Connect("TLS handshake timed out".into()))?
                    .map_err(|e| SendError::Connect(format!("TLS: {e}")))?,
            ),
        };
        let (sender, driver) = http1::Builder::new()
            .max_buf_size(MAX_BUFFER)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(describe(&e)))?;
        Ok(Conn {
            origin: target.origin.clone(),
            sender,
            driver: Box::pin(driver),
            closed: false,
            since: Instant::now(),
        })
    }
}

impl Conn {
    /// The status and `Retry-After`; the body is read (up to
    /// [`MAX_ANSWER_BODY`]) and dropped so the connection can be reused.
    async fn read_answer(&mut self, response: hyper::Response<hyper::body::Incoming>) -> Answer {
        let (parts, mut body) = response.into_parts();
        let retry_after = parts
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut read = 0;
        loop {
            match drive(&mut self.driver, &mut self.closed, body.frame()).await {
                None => break,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > MAX_ANSWER_BODY {
                        self.closed = true;
                        break;
                    }
                }
                Some(Err(_)) => {
                    self.closed = true;
                    break;
                }
            }
        }
        if parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("close")))
        {
            self.closed = true;
        }
        Answer {
            status: parts.status,
            retry_after,
        }
    }
}

fn request(
    target: &Target,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, SendError> {
    let mut req = Request::post(target.path.as_str())
        .body(Full::new(body))
        .map_err(|e| SendError::Request(e.to_string()))?;
    let h = req.headers_mut();
    h.insert(header::HOST, target.authority.clone());
    h.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (k, v) in headers {
        h.insert(k.clone(), v.clone());
    }
    Ok(req)
}

/// An error and its causes, one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
