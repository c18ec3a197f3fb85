//! Connection admission, shared by both listeners: a global and a per-IP
//! cap on open connections, the accept loop's back-off when the process is
//! out of file descriptors (logged once a second, not per attempt), and
//! for gRPC a deadline by which a new connection must have sent its
//! HTTP/2 preface; on both, a write deadline for peers that stop reading.
//!
//! A connection over a cap is accepted and closed at once: its descriptor
//! is held for a moment only. The caps bound what any number of clients
//! without a token can hold open; the header-read and preface deadlines
//! bound how long each can.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;

use crate::tls::{Listener, Tls, Transport};

/// Descriptors kept free of connections: log files, Redis, the JWKS fetch,
/// and the accept that closes an over-limit connection.
const RESERVED_FDS: u64 = 128;
/// How long the accept loop pauses after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Bytes of the HTTP/2 client preface.
const PREFACE_BYTES: usize = 24;

/// Counters of admission.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Connections open now, both listeners.
    pub open: Gauge,
    /// Connections closed at once because a cap was reached.
    pub refused: Counter,
    /// Accept attempts that failed (out of descriptors and the like).
    pub accept_errors: Counter,
}

/// The caps, shared by both listeners.
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: AdmissionMetrics,
    /// Unix second of the last accept-error log line, and errors since.
    last_error_log: AtomicU64,
    errors_since_log: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

impl Admission {
    /// `max_total` 0 means "what the descriptor limit allows"; `max_per_ip`
    /// 0 means no per-IP cap, and any other value is held to half the total,
    /// so that one address can never take every place (a health check from
    /// elsewhere still gets in).
    pub fn new(max_total: usize, max_per_ip: usize, metrics: AdmissionMetrics) -> Arc<Self> {
        let fd_room = fd_limit().saturating_sub(RESERVED_FDS).max(1) as usize;
        let max_total = match max_total {
            0 => fd_room,
            n if n > fd_room => {
                tracing::warn!(
                    configured = n,
                    descriptors = fd_room,
                    "TC_MAX_CONNECTIONS is above what the descriptor limit (ulimit -n) leaves; using {fd_room}"
                );
                fd_room
            }
            n => n,
        };
        Arc::new(Self {
            max_total,
            max_per_ip: if max_per_ip == 0 {
                usize::MAX
            } else {
                max_per_ip.min((max_total / 2).max(1))
            },
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
            last_error_log: AtomicU64::new(0),
            errors_since_log: AtomicU64::new(0),
        })
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// The per-address cap in force (`usize::MAX` when there is none).
    pub fn max_per_ip(&self) -> usize {
        self.max_per_ip
    }

    /// A place for a connection from `ip`, if both caps allow it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.max_per_ip || self.total.load(Ordering::Acquire) >= self.max_total {
            drop(per_ip);
            self.metrics.refused.inc();
            return None;
        }
        per_ip.insert(ip, from_ip + 1);
        self.total.fetch_add(1, Ordering::AcqRel);
        self.metrics.open.inc();
        Some(Permit {
            admission: Arc::clone(self),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        match per_ip.get_mut(&ip) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                per_ip.remove(&ip);
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.metrics.open.dec();
    }

    /// Counts an accept error and logs at most one line a second.
    pub fn accept_failed(&self, listener: &str, error: &io::Error) {
        self.metrics.accept_errors.inc();
        let errors = self.errors_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::clock::unix_secs();
        let last = self.last_error_log.load(Ordering::Relaxed);
        if now > last
            && self
                .last_error_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.errors_since_log.store(0, Ordering::Relaxed);
            tracing::warn!(
                listener,
                errors,
                "accept failed: {error}; pausing accepts briefly"
            );
        }
    }
}

/// The soft limit on open descriptors, raised to the hard limit first (as
/// servers commonly do); `u64::MAX` where there is none.
fn fd_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write `limit`.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return u64::MAX;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        if limit.rlim_cur == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            limit.rlim_cur
        }
    }
    #[cfg(not(unix))]
    {
        u64::MAX
    }
}

/// Accepts the next connection that the caps admit, pausing after accept
/// errors. For the HTTP listener's loop.
pub async fn accept(
    listener: &TcpListener,
    admission: &Arc<Admission>,
    name: &str,
) -> (TcpStream, SocketAddr, Permit) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                if let Some(permit) = admission.admit(addr.ip()) {
                    return (stream, addr, permit);
                }
                // Over a cap: closed at once.
            }
            Err(e) => {
                admission.accept_failed(name, &e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// gRPC's incoming connections: admitted by the caps, with TCP_NODELAY
/// (tonic ignores the builder's setting for an incoming stream) and
/// keepalive, each bound to send its HTTP/2 preface within a deadline.
pub struct GrpcIncoming {
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    admission: Arc<Admission>,
    preface_timeout: Duration,
    write_timeout: Duration,
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GrpcIncoming {
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<Tls>>,
        admission: Arc<Admission>,
        preface_timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        Self {
            listener,
            tls,
            admission,
            preface_timeout,
            write_timeout,
            paused: None,
        }
    }
}

impl Stream for GrpcIncoming {
    type Item = io::Result<Admitted>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.paused {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.paused = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, addr))) => {
                    let Some(permit) = this.admission.admit(addr.ip()) else {
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY: {e}");
                    }
                    let socket = socket2::SockRef::from(&stream);
                    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
                        tracing::debug!("cannot set TCP keepalive: {e}");
                    }
                    let stream = match &this.tls {
                        Some(tls) => tls.accept(Listener::Grpc, stream),
                        None => Transport::Plain(stream),
                    };
                    // Over TLS, the deadline covers the handshake too.
                    return Poll::Ready(Some(Ok(Admitted::new(
                        stream,
                        permit,
                        PREFACE_BYTES,
                        this.preface_timeout,
                        this.write_timeout,
                    ))));
                }
                Poll::Ready(Err(e)) => {
                    this.admission.accept_failed("gRPC", &e);
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// An admitted connection: the stream, its place under the caps, the
/// deadline for its HTTP/2 preface (gRPC), and the write deadline: a write
/// that makes no progress for `write_timeout` (a peer that stopped
/// reading, its window at zero) fails, so the connection's tasks end and
/// what they hold is freed instead of waiting on the peer forever.
pub struct Admitted {
    stream: Transport,
    connect_info: tonic::transport::server::TcpConnectInfo,
    _permit: Permit,
    /// Bytes the peer must send within the deadline (the HTTP/2 preface,
    /// one byte of a request over TLS, none for plain HTTP/1), and read.
    preface_bytes: usize,
    preface_read: usize,
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    write_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Admitted {
    /// `stream`, which must send `preface_bytes` within `preface_timeout`
    /// (none: no deadline).
    pub fn new(
        stream: Transport,
        permit: Permit,
        preface_bytes: usize,
        preface_timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        let connect_info = stream
            .tcp()
            .map(tonic::transport::server::Connected::connect_info)
            .unwrap_or(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            });
        Self {
            stream,
            connect_info,
            _permit: permit,
            preface_bytes,
            preface_read: 0,
            preface_deadline: (preface_bytes > 0)
                .then(|| Box::pin(tokio::time::sleep(preface_timeout))),
            write_timeout,
            stalled: None,
        }
    }

    /// An HTTP/1 connection. In plain text hyper's header-read timeout
    /// bounds it; over TLS the handshake and the first byte of a request
    /// must also come within `header_read_timeout` (hyper's clock starts
    /// only once the handshake is done).
    pub fn http(
        stream: Transport,
        permit: Permit,
        header_read_timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        let preface = if matches!(stream, Transport::Plain(_)) {
            0
        } else {
            1
        };
        Self::new(stream, permit, preface, header_read_timeout, write_timeout)
    }

    /// Fails the pending write once it has made no progress for
    /// `write_timeout`; any progress resets the clock.
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer has not read for the write timeout",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.preface_deadline {
            if let Poll::Ready(Ok(())) = read {
                this.preface_read += buf.filled().len() - before;
                if this.preface_read >= this.preface_bytes {
                    this.preface_deadline = None;
                    return read;
                }
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no TLS handshake or HTTP/2 preface within the header-read timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.write_progress(cx, result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.write_progress(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.write_progress(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.write_progress(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.connect_info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_ip_and_in_total_and_places_come_back() {
        let admission = Admission::new(4, 2, AdmissionMetrics::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = admission.admit(a).expect("first from a");
        let a2 = admission.admit(a).expect("second from a");
        assert!(admission.admit(a).is_none(), "per-IP cap");
        let b1 = admission.admit(b).expect("first from b");
        let c: IpAddr = [10, 0, 0, 3].into();
        let c1 = admission.admit(c).expect("first from c");
        assert!(admission.admit(b).is_none(), "total cap");
        drop(a1);
        assert!(admission.admit(b).is_some(), "a place came back");
        drop((a2, b1, c1));
        assert_eq!(admission.metrics.refused.get(), 2);
        let halved = Admission::new(10, 1000, AdmissionMetrics::default());
        let from_a: Vec<Permit> = (0..10).filter_map(|_| halved.admit(a)).collect();
        assert_eq!(from_a.len(), 5, "one address gets at most half the places");
        let unlimited = Admission::new(0, 0, AdmissionMetrics::default());
        assert!(unlimited.max_total() > 0);
        let many: Vec<Permit> = (0..100).filter_map(|_| unlimited.admit(a)).collect();
        assert_eq!(many.len(), 100, "no per-IP cap when 0");
    }
}
