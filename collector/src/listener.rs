//! The collector's two listeners (gRPC ingest and the HTTP API): one accept
//! loop for both, plain or TLS, that bounds what clients can hold.
//!
//! - Each listener holds at most a number of connections (its slots); the
//!   caps come from flags and from the file descriptor limit, so that HTTP
//!   can never take the descriptors ingest needs ([`ListenerLimits::caps`]).
//! - A full HTTP listener makes room for a newcomer by closing its oldest
//!   connection that is not answering a request (a slow client still
//!   sending its headers, an idle kept-alive one): a flood of slow clients
//!   cannot lock kubelet's probes out. A full gRPC listener refuses.
//! - Every connection must complete its TLS handshake (or, plain gRPC, send
//!   its first bytes) within [`HANDSHAKE_TIMEOUT`]; HTTP requests must
//!   complete their headers within `--http-header-timeout`, and an answer
//!   the client stops reading is abandoned after `--http-idle-timeout`.
//! - Refusals are counted in `dialguard_connections_refused_total{listener,
//!   reason}` and logged at most once per [`REFUSAL_LOG_EVERY`] per
//!   listener, with the counts since the last line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::identity::{IdentityError, PeerIdentity};
use crate::metrics::{ConnectionRefusalLabels, ListenerLabels, Metrics};

/// How long a client gets to complete its TLS handshake, or, on plain
/// gRPC, to send its first bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress on one listener; further connections wait in
/// the kernel's accept queue until one finishes.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// At most one refusal line per listener per this interval.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Descriptors kept for the collector's own files whatever its clients do:
/// the database with its WAL and shared memory, stdio, both listening
/// sockets, the runtime's epoll and event descriptors, the served modules.
pub const RESERVED_FDS: u64 = 64;

/// Descriptors one HTTP connection may hold: its socket, and the database
/// and WAL files of the reading connection a report query opens.
pub const FDS_PER_HTTP_CONNECTION: u64 = 3;

/// HTTP gets at most this fraction (1/N) of the descriptors left after the
/// reserve: scrapes and reports can never starve ingest.
pub const HTTP_FD_SHARE: u64 = 4;

/// The values of the `reason` label of `dialguard_connections_refused_total`.
pub const REFUSAL_REASONS: [&str; 4] = ["full", "evicted", "timeout", "handshake"];

/// Connection caps and timeouts of the two listeners.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// `--max-grpc-connections`.
    pub max_grpc_connections: usize,
    /// `--max-http-connections`.
    pub max_http_connections: usize,
    /// `--http-header-timeout`: from when the listener waits for a request
    /// (on a new connection, or the next one on a kept-alive connection)
    /// until its headers are complete.
    pub http_header_timeout: Duration,
    /// `--http-idle-timeout`: how long an answer may wait for a client
    /// that does not read it.
    pub http_idle_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_grpc_connections: 100_000,
            max_http_connections: 256,
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// The connections each listener may hold, given the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub grpc: usize,
    pub http: usize,
    /// The soft `RLIMIT_NOFILE` the caps were computed for.
    pub fd_limit: u64,
}

impl ListenerLimits {
    /// The caps for `fd_limit` descriptors: [`RESERVED_FDS`] stay for the
    /// collector's own files; HTTP gets at most 1/[`HTTP_FD_SHARE`] of the
    /// rest at [`FDS_PER_HTTP_CONNECTION`] each; gRPC the remainder. Each
    /// flag lowers its cap further; each listener keeps at least one slot.
    pub fn caps(&self, fd_limit: u64) -> ConnectionCaps {
        let available = fd_limit.saturating_sub(RESERVED_FDS);
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let http = self
            .max_http_connections
            .min(to_usize(
                available / HTTP_FD_SHARE / FDS_PER_HTTP_CONNECTION,
            ))
            .max(1);
        let grpc = self
            .max_grpc_connections
            .min(to_usize(
                available.saturating_sub(http as u64 * FDS_PER_HTTP_CONNECTION),
            ))
            .max(1);
        ConnectionCaps {
            grpc,
            http,
            fd_limit,
        }
    }
}

/// The soft file descriptor limit before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one: the default soft limit
/// (often 1,024) is far below what thousands of sidecars need.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let (soft_before, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(FdLimit {
        soft_before,
        soft,
        hard,
    })
}

/// The soft `RLIMIT_NOFILE` now.
pub fn fd_limit() -> std::io::Result<u64> {
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// Which listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Http,
}

impl Listener {
    pub const ALL: [Listener; 2] = [Listener::Grpc, Listener::Http];

    /// The `listener` label, and the name in log lines.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Grpc => "grpc",
            Listener::Http => "http",
        }
    }
}

/// Why a connection was refused or closed before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Full,
    Evicted,
    Timeout,
    Handshake,
}

impl Refusal {
    fn index(self) -> usize {
        self as usize
    }
}

/// The slots of one listener: the connections it holds, oldest first.
#[derive(Debug)]
pub(crate) struct Slots {
    listener: Listener,
    max: usize,
    /// Whether a full listener closes an idle connection for a newcomer.
    evicts: bool,
    held: Mutex<Held>,
    log: Mutex<RefusalLog>,
    metrics: Metrics,
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    connections: BTreeMap<u64, Arc<SlotState>>,
}

/// What the accept loop and the HTTP server share about one connection.
#[derive(Debug, Default)]
pub(crate) struct SlotState {
    /// Answering a request (from its headers until its body is sent): not
    /// to be evicted.
    busy: AtomicBool,
    /// Has answered at least one request.
    served: AtomicBool,
    /// Signalled when the connection is evicted.
    evict: Notify,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    state: Arc<SlotState>,
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        held.connections.remove(&self.id);
        self.slots.open_gauge().set(held.connections.len() as i64);
    }
}

#[derive(Debug, Default)]
struct RefusalLog {
    last_line: Option<Instant>,
    counts: [u64; REFUSAL_REASONS.len()],
    example: Option<String>,
}

impl Slots {
    pub(crate) fn new(listener: Listener, max: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            listener,
            max,
            evicts: listener == Listener::Http,
            held: Mutex::default(),
            log: Mutex::default(),
            metrics,
        })
    }

    fn open_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.metrics
            .connections_open
            .get_or_create(&ListenerLabels {
                listener: self.listener.label().into(),
            })
            .clone()
    }

    /// A slot for a new connection: a free one, or (HTTP) the one of the
    /// oldest connection that is not answering a request, which is told to
    /// close. `None` when every slot is busy.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.connections.len() >= self.max {
            let victim = self
                .evicts
                .then(|| {
                    held.connections
                        .iter()
                        .find(|(_, state)| !state.busy.load(Ordering::Acquire))
                        .map(|(id, _)| *id)
                })
                .flatten();
            let Some(victim) = victim.and_then(|id| held.connections.remove(&id)) else {
                drop(held);
                self.refused(Refusal::Full, None);
                return None;
            };
            victim.evict.notify_one();
            drop(held);
            self.refused(Refusal::Evicted, None);
            held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        }
        let id = held.next_id;
        held.next_id += 1;
        let state = Arc::new(SlotState::default());
        held.connections.insert(id, Arc::clone(&state));
        self.open_gauge().set(held.connections.len() as i64);
        Some(Slot {
            id,
            state,
            slots: Arc::clone(self),
        })
    }

    /// Counts a refusal and logs, at most once per [`REFUSAL_LOG_EVERY`],
    /// how many of each kind happened since the last line.
    fn refused(&self, reason: Refusal, detail: Option<String>) {
        let label = REFUSAL_REASONS[reason.index()];
        self.metrics
            .connections_refused
            .get_or_create(&ConnectionRefusalLabels {
                listener: self.listener.label().into(),
                reason: label.into(),
            })
            .inc();
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.counts[reason.index()] += 1;
        if log.example.is_none() {
            log.example = detail;
        }
        let due = log
            .last_line
            .is_none_or(|last| last.elapsed() >= REFUSAL_LOG_EVERY);
        if !due {
            return;
        }
        let counts: Vec<String> = REFUSAL_REASONS
            .iter()
            .zip(log.counts)
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect();
        let since = match log.last_line {
            Some(last) => format!("in the last {}s", last.elapsed().as_secs()),
            None => "since start".to_string(),
        };
        let example = log
            .example
            .take()
            .map(|e| format!("; e.g. {e}"))
            .unwrap_or_default();
        tracing::warn!(
            "{} listener: refused or closed connections {since} ({}; at most {} held){example}",
            self.listener.label(),
            counts.join(", "),
            self.max
        );
        log.last_line = Some(Instant::now());
        log.counts = [0; REFUSAL_REASONS.len()];
    }
}

/// What a gRPC client's certificate proves, if it presented one.
#[derive(Debug, Clone)]
pub enum ClientCertificate {
    /// No certificate (plain text, or TLS without `--grpc-client-ca`).
    None,
    /// A verified certificate with an Istio workload identity.
    Identity(Arc<PeerIdentity>),
    /// A verified certificate that proves no workload identity.
    Unusable(IdentityError),
}

/// A connection's addresses and client certificate; tonic hands it to
/// every request of the connection (`request.extensions()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: SocketAddr,
    pub client: ClientCertificate,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection, handshake done, holding its listener slot.
#[derive(Debug)]
pub struct Connection {
    io: Io,
    peer: PeerInfo,
    slot: Slot,
}

impl Connection {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// How a listener's connections begin.
#[derive(Debug, Clone)]
pub(crate) struct Accept {
    pub listener: Listener,
    pub slots: Arc<Slots>,
    /// TLS, if on.
    pub tls: Option<Arc<ServerConfig>>,
    /// Plain text: wait for the client's first bytes (HTTP/2's preface)
    /// before handing the connection on, at most [`HANDSHAKE_TIMEOUT`].
    pub await_first_bytes: bool,
}

/// Accepts connections on `listener` until `stop` turns true and yields
/// those that got a slot and completed their handshake. A failed handshake
/// (no or an untrusted client certificate, plain text, a timeout) closes
/// that connection only, before anything it sent reaches the server.
pub(crate) fn accept(
    listener: TcpListener,
    how: Accept,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Connection> {
    let (established, rx) = mpsc::channel(16);
    let acceptor = how.tls.clone().map(TlsAcceptor::from);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let mut stopping = std::pin::pin!(stopping);
        let mut accept_errors = ErrorLog::default();
        loop {
            let permit = tokio::select! {
                () = &mut stopping => return,
                permit = pending.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, remote_addr) = tokio::select! {
                () = &mut stopping => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        accept_errors.log(how.listener, &err);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Refused at once (closed): the kernel's queue keeps moving.
            let Some(slot) = how.slots.admit() else {
                continue;
            };
            let local_addr = tcp.local_addr().ok();
            let acceptor = acceptor.clone();
            let established = established.clone();
            let how = how.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let state = Arc::clone(&slot.state);
                let begun = tokio::select! {
                    begun = tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        begin(tcp, acceptor.as_ref(), how.await_first_bytes),
                    ) => begun,
                    // Evicted during its handshake: counted at eviction.
                    () = state.evict.notified() => return,
                };
                let (io, client) = match begun {
                    Ok(Ok(begun)) => begun,
                    Ok(Err(err)) => {
                        let detail = format!("TLS handshake with {remote_addr} failed: {err}");
                        how.slots.refused(Refusal::Handshake, Some(detail));
                        return;
                    }
                    Err(_) => {
                        let detail = format!(
                            "{remote_addr} did not complete its handshake within {HANDSHAKE_TIMEOUT:?}"
                        );
                        how.slots.refused(Refusal::Timeout, Some(detail));
                        return;
                    }
                };
                let connection = Connection {
                    io,
                    peer: PeerInfo {
                        local_addr,
                        remote_addr,
                        client,
                    },
                    slot,
                };
                let _ = established.send(connection).await;
            });
        }
    });
    rx
}

/// The TLS handshake, or for plain text the wait for the first bytes.
async fn begin(
    tcp: TcpStream,
    acceptor: Option<&TlsAcceptor>,
    await_first_bytes: bool,
) -> std::io::Result<(Io, ClientCertificate)> {
    let Some(acceptor) = acceptor else {
        if await_first_bytes {
            tcp.readable().await?;
        }
        return Ok((Io::Plain(tcp), ClientCertificate::None));
    };
    let stream = acceptor.accept(tcp).await?;
    let client = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => match PeerIdentity::from_certificate(leaf) {
            Ok(identity) => ClientCertificate::Identity(Arc::new(identity)),
            Err(err) => ClientCertificate::Unusable(err),
        },
        _ => ClientCertificate::None,
    };
    Ok((Io::Tls(Box::new(stream)), client))
}

/// `accept()` errors, logged at most once per [`REFUSAL_LOG_EVERY`].
#[derive(Debug, Default)]
struct ErrorLog {
    last_line: Option<Instant>,
    since: u64,
}

impl ErrorLog {
    fn log(&mut self, listener: Listener, err: &std::io::Error) {
        self.since += 1;
        if self
            .last_line
            .is_some_and(|last| last.elapsed() < REFUSAL_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            "{} listener: accepting a connection failed ({} times since the last line): {err}",
            listener.label(),
            self.since
        );
        self.last_line = Some(Instant::now());
        self.since = 0;
    }
}

/// Serves the HTTP API on the connections of `incoming` until `stop`
/// turns true and every connection has finished (kept-alive ones are
/// closed, requests in progress answered).
pub(crate) async fn serve_http(
    mut incoming: mpsc::Receiver<Connection>,
    app: Router,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let connection = tokio::select! {
            connection = incoming.recv() => connection,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(connection) = connection else { break };
        connections.spawn(serve_http_connection(
            connection,
            app.clone(),
            limits,
            stop.clone(),
        ));
    }
    while connections.join_next().await.is_some() {}
}

async fn serve_http_connection(
    connection: Connection,
    app: Router,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::clone(&connection.slot.state);
    let slots = Arc::clone(&connection.slot.slots);
    let router = TowerToHyperService::new(app);
    let busy = Arc::clone(&state);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = BusyGuard::enter(Arc::clone(&busy));
        let answer = hyper::service::Service::call(&router, request);
        async move {
            let response = answer.await?;
            // Busy until the body is sent (or the connection drops it).
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _ = &guard;
                    frame
                }))
            }))
        }
    });
    let io = TokioIo::new(WriteTimeout::new(connection, limits.http_idle_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout);
    let served = builder.serve_connection(io, service);
    let mut served = std::pin::pin!(served);
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        result = served.as_mut() => result,
        // Counted when it was chosen.
        () = state.evict.notified() => return,
        () = stopping => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                result = served.as_mut() => result,
                () = state.evict.notified() => return,
            }
        }
    };
    if let Err(err) = result {
        let timed_out = err.is_timeout() || is_write_timeout(&err);
        // A kept-alive connection that goes quiet ends by the header
        // timeout too; only one that never got a request in was refused.
        if timed_out && (is_write_timeout(&err) || !state.served.load(Ordering::Acquire)) {
            slots.refused(Refusal::Timeout, Some(format!("HTTP: {err}")));
        } else {
            tracing::debug!("HTTP connection ended: {err}");
        }
    }
}

fn is_write_timeout(err: &hyper::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// Marks a connection busy while a request is answered.
struct BusyGuard(Arc<SlotState>);

impl BusyGuard {
    fn enter(state: Arc<SlotState>) -> Self {
        state.busy.store(true, Ordering::Release);
        state.served.store(true, Ordering::Release);
        Self(state)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Fails a write that makes no progress for `timeout` (a client that does
/// not read its answer), so that its connection and slot are freed.
struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Set while a write is pending.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
        }
    }

    /// `Pending` from the inner write: an error once the deadline passed.
    fn check_deadline<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of the answer for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(
        &mut self,
        result: Poll<std::io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<R>> {
        match result {
            Poll::Ready(result) => {
                self.deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.check_deadline(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_answer_nobody_reads_fails_after_the_idle_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let mut guarded = WriteTimeout::new(server, Duration::from_millis(200));
        let started = Instant::now();
        let err = guarded
            .write_all(&[0u8; 4096])
            .await
            .expect_err("nobody reads the answer");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = WriteTimeout::new(server, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0u8; 64];
            while total < 1024 {
                // Each read frees room well within the timeout.
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += client.read(&mut buf).await.expect("read");
            }
            total
        });
        // 16 reads of 64 bytes, about 320 ms: longer than the timeout in all.
        guarded
            .write_all(&[0u8; 1024])
            .await
            .expect("progress keeps the answer going");
        assert_eq!(reader.await.expect("reader"), 1024);
    }

    #[test]
    fn http_never_gets_more_than_its_share_of_descriptors() {
        let limits = ListenerLimits::default();
        // The brief's machine: 1,024 descriptors.
        let caps = limits.caps(1024);
        assert_eq!((caps.http, caps.grpc), (80, 720));
        assert!(
            caps.http as u64 * FDS_PER_HTTP_CONNECTION + caps.grpc as u64 + RESERVED_FDS <= 1024
        );
        // A large limit: the flags decide.
        let caps = limits.caps(1 << 20);
        assert_eq!((caps.http, caps.grpc), (256, 100_000));
        // Flags lower the caps further; a tiny limit still leaves one slot each.
        let small = ListenerLimits {
            max_grpc_connections: 10,
            max_http_connections: 5,
            ..limits
        };
        assert_eq!(small.caps(1 << 20).grpc, 10);
        assert_eq!(small.caps(1 << 20).http, 5);
        let tiny = limits.caps(10);
        assert_eq!((tiny.http, tiny.grpc), (1, 1));
    }
}
