//! The harness shared by the collector's integration tests: the real
//! collector in-process (`dialguard_collector::run`) or as the `dialguard
//! serve` binary, on loopback port 0 with a temporary SQLite database, the
//! generated tonic client, the messages a sidecar sends, and the database
//! read behind the collector's back. Every await is bounded.

// Each test file uses its own part of the harness.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use dialguard_collector::{ServeConfig, ServeError};
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{
    Ack, CollectorMessage, ConnectionEvent, EventBatch, Hello, SidecarMessage, SocketAddress,
    Verdict, collector_message, sidecar_message,
};
use rusqlite::{Connection, OpenFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// Bound on every single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// When test events happen: an hour before the test binary started (the
/// collector refuses events older than retention or ahead of its clock).
pub fn base_ns() -> u64 {
    static BASE: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        dialguard_collector::time::now_unix_nanos() - 3_600_000_000_000
    });
    *BASE
}

pub async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

// ---------------------------------------------------------------------------
// The server, in process
// ---------------------------------------------------------------------------

pub struct Server {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), ServeError>>,
}

impl Server {
    pub async fn start(db: &Path) -> Self {
        Self::start_with_grace(db, Duration::from_secs(3)).await
    }

    pub async fn start_with_grace(db: &Path, shutdown_grace: Duration) -> Self {
        Self::start_with(ServeConfig {
            shutdown_grace,
            ..test_config(db)
        })
        .await
    }

    /// A collector whose every commit group counts as late: the store
    /// samples raw rows as under overload.
    pub async fn start_overloaded(db: &Path) -> Self {
        Self::start_with(ServeConfig {
            writer: dialguard_collector::store::WriterConfig {
                overloaded_after: Duration::ZERO,
                ..Default::default()
            },
            ..test_config(db)
        })
        .await
    }

    pub async fn start_with(config: ServeConfig) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let grpc_addr = grpc.local_addr().expect("grpc addr");
        let http_addr = http.local_addr().expect("http addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(dialguard_collector::run(grpc, http, config, async move {
            let _ = stopped.await;
        }));
        Self {
            grpc: grpc_addr,
            http: http_addr,
            stop,
            task,
        }
    }

    pub async fn client(&self) -> CollectorClient<Channel> {
        client(self.grpc).await
    }

    /// Signals shutdown and waits for `run` to return `Ok`.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        bounded("the collector to shut down", self.task)
            .await
            .expect("the collector task panicked")
            .expect("run returned an error");
    }
}

/// A client on its own HTTP/2 connection to the collector at `grpc`.
pub async fn client(grpc: SocketAddr) -> CollectorClient<Channel> {
    let channel = bounded(
        "connecting to the collector",
        Endpoint::from_shared(format!("http://{grpc}"))
            .expect("endpoint")
            .connect_timeout(WAIT)
            .connect(),
    )
    .await
    .expect("connect to the collector");
    CollectorClient::new(channel)
}

pub fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("dialguard.db");
    (dir, db)
}

// ---------------------------------------------------------------------------
// The server, as the `dialguard serve` binary
// ---------------------------------------------------------------------------

/// `dialguard serve` as a child process; killed (SIGKILL, by its PID) when
/// dropped, so that a failing test leaves nothing behind.
pub struct ServeProcess {
    pub child: Child,
    pub grpc: SocketAddr,
}

impl ServeProcess {
    /// Starts `dialguard serve` on loopback port 0 (alert lines on stdout
    /// discarded) and reads its listening line from stderr. Returns the
    /// stderr reader positioned after that line: keep draining it, or drop
    /// it to close the pipe.
    pub fn start(db: &Path) -> (Self, BufReader<ChildStderr>) {
        Self::start_with_args(db, &[])
    }

    /// [`ServeProcess::start`] with more `serve` flags.
    pub fn start_with_args(db: &Path, args: &[&str]) -> (Self, BufReader<ChildStderr>) {
        Self::start_with_stdout(db, args, Stdio::null())
    }

    /// [`ServeProcess::start_with_args`] with its stdout (the alert lines)
    /// going to `stdout`, e.g. `Stdio::piped()` (then read `child.stdout`).
    pub fn start_with_stdout(
        db: &Path,
        args: &[&str],
        stdout: Stdio,
    ) -> (Self, BufReader<ChildStderr>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dialguard"))
            .args([
                "serve",
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dialguard serve");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        // Read on a thread so that the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = stderr.read_line(&mut line);
            let _ = tx.send((read.map(|_| line), stderr));
        });
        let mut process = Self {
            child,
            grpc: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let (line, stderr) = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no listening line from dialguard serve within {WAIT:?}"));
        let line = line.expect("read the listening line");
        process.grpc = line
            .split("grpc=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no grpc address in {line:?}"));
        (process, stderr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// A server from Debian's packages (Prometheus, Alertmanager) started by a
/// test on a free loopback port, its output in `log`; killed by its PID when
/// dropped.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `binary` (or the path in `env_override`) listening on `addr`
    /// (which `args` puts on its command line).
    pub fn start(
        binary: &str,
        env_override: &str,
        package: &str,
        dir: &Path,
        addr: SocketAddr,
        args: impl FnOnce(SocketAddr) -> Vec<String>,
    ) -> Self {
        let binary = std::env::var(env_override).unwrap_or(binary.into());
        assert!(
            Path::new(&binary).exists(),
            "{binary} not found: install Debian's `{package}` (.ci/run does) or set {env_override}"
        );
        let name = Path::new(&binary)
            .file_name()
            .map_or("daemon".into(), |n| n.to_string_lossy().into_owned());
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("daemon log");
        let child = Command::new(&binary)
            .args(args(addr))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {binary}: {err}"));
        Self { child, addr, log }
    }

    /// Its output so far, for failure messages.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON body of a GET that answered 200, or None (not ready, or an error).
    pub async fn get_json(&self, path: &str) -> Option<serde_json::Value> {
        let (status, _, body) = try_http_get(self.addr, path).await.ok()?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A file of this repository, by its path from the root.
pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// A plain HTTP/1.0 GET (no chunked responses to decode): status, lower-cased head, body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|err| panic!("GET http://{addr}{path}: {err}"))
}

/// As [`http_get`], with connection errors returned (a server still starting).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    bounded("an HTTP GET", async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let raw = String::from_utf8_lossy(&raw);
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status code"))?;
        Ok((status, head.to_ascii_lowercase(), body.to_owned()))
    })
    .await
}

/// Polls `check` until it yields a value (bounded by WAIT).
/// The value of one series (name and labels exactly as exposed) in a
/// Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The collector's `/metrics` series, 0 when absent.
pub async fn metric_now(http: SocketAddr, series: &str) -> f64 {
    let (_, _, body) = http_get(http, "/metrics").await;
    metric(&body, series).unwrap_or(0.0)
}

pub async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    bounded(what, async {
        loop {
            if let Some(value) = check() {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// `serve`'s defaults, but keeping everything (the tests' events carry 2023
/// timestamps) and printing every alert line.
pub fn test_config(db: &Path) -> ServeConfig {
    ServeConfig {
        retention: None,
        alert_interval: Duration::ZERO,
        ..ServeConfig::new(db)
    }
}

pub fn hello(node_id: &str, vm_instance: &str) -> Hello {
    Hello {
        node_id: node_id.into(),
        vm_instance: vm_instance.into(),
        pod_name: "reviews-v1-7d9f-abcde".into(),
        namespace: "bookinfo".into(),
        workload_name: "reviews-v1".into(),
        instance_ips: vec!["10.0.1.6".into()],
        cluster_id: "Kubernetes".into(),
        istio_version: "1.24.0".into(),
        filter_version: "test".into(),
        ..Default::default()
    }
}

pub fn hello_message(node_id: &str, vm_instance: &str) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello(node_id, vm_instance))),
    }
}

pub const NODE: &str = "sidecar~10.0.1.6~reviews-v1-7d9f-abcde.bookinfo~bookinfo.svc.cluster.local";

pub fn addr(text: &str) -> SocketAddress {
    SocketAddress::from_socket_addr(text.parse().expect("socket address"))
}

pub fn event(
    sequence: u64,
    verdict: Verdict,
    dest: &str,
    upstream: Option<&str>,
) -> ConnectionEvent {
    ConnectionEvent {
        sequence,
        // A millisecond per sequence, within the hour after base_ns() even
        // for the huge sequences of hostile tests.
        timestamp_unix_nanos: base_ns() + (sequence % 1_000_000) * 1_000_000,
        original_destination: Some(addr(dest)),
        upstream_host: upstream.map(addr),
        source: Some(addr("10.0.1.6:40000")),
        connection_id: 1000 + sequence,
        cluster_name: "outbound|9080||ratings.bookinfo.svc.cluster.local".into(),
        filter_chain_name: "0.0.0.0_9080".into(),
        verdict: verdict as i32,
        response_flags: 0,
        upstream_transport_failure_reason: String::new(),
        intended_service: "ratings.bookinfo.svc.cluster.local".into(),
        upstream_workload: "ratings-v1;bookinfo;ratings;v1;Kubernetes".into(),
        enforced: false,
        // The filter is certain only of its own MISROUTED verdicts.
        would_close: verdict == Verdict::Misrouted,
        judged_open: false,
    }
}

pub const DEST: &str = "10.0.2.7:9080";
pub const WRONG_POD: &str = "10.0.3.9:9080";

pub fn misrouted(sequence: u64) -> ConnectionEvent {
    event(sequence, Verdict::Misrouted, DEST, Some(WRONG_POD))
}

pub fn batch(events: Vec<ConnectionEvent>) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Batch(EventBatch {
            events,
            dropped_total: 0,
        })),
    }
}

pub fn misrouted_batch(sequences: std::ops::RangeInclusive<u64>) -> SidecarMessage {
    batch(sequences.map(misrouted).collect())
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// One `Report` stream, as a sidecar VM holds it.
pub struct ReportStream {
    pub tx: mpsc::Sender<SidecarMessage>,
    pub rx: Streaming<CollectorMessage>,
}

impl ReportStream {
    /// Opens a stream whose first message is `first` (normally a hello).
    /// Returns the status instead if the collector refused the call outright.
    pub async fn open_with(
        client: &mut CollectorClient<Channel>,
        first: SidecarMessage,
    ) -> Result<Self, Status> {
        let (tx, outbound) = mpsc::channel(16);
        tx.send(first).await.expect("queue the first message");
        let response = bounded(
            "the Report call",
            client.report(ReceiverStream::new(outbound)),
        )
        .await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    pub async fn open(client: &mut CollectorClient<Channel>, node_id: &str, vm: &str) -> Self {
        Self::open_with(client, hello_message(node_id, vm))
            .await
            .expect("the Report call failed")
    }

    pub async fn send(&self, message: SidecarMessage) {
        bounded("sending a message", self.tx.send(message))
            .await
            .expect("the request stream is closed");
    }

    /// The next ack's `through_sequence`, or the status that ended the stream.
    pub async fn next_ack(&mut self) -> Result<u64, Status> {
        Ok(self.next_full_ack().await?.through_sequence)
    }

    /// The next ack with its list of refused events.
    pub async fn next_full_ack(&mut self) -> Result<Ack, Status> {
        match bounded("the next ack", self.rx.message()).await? {
            Some(CollectorMessage {
                kind: Some(collector_message::Kind::Ack(ack)),
            }) => Ok(ack),
            Some(other) => panic!("expected an ack, got {other:?}"),
            None => panic!("the collector ended the stream without a status"),
        }
    }

    /// Sends a batch and waits for its ack.
    pub async fn send_acked(&mut self, message: SidecarMessage) -> u64 {
        self.send(message).await;
        self.next_ack().await.expect("batch not acknowledged")
    }

    /// Ends the stream as a sidecar that shuts down does, and waits until the
    /// collector has finished with it (it then has recorded the disconnect).
    pub async fn close(self) {
        let Self { tx, mut rx } = self;
        drop(tx);
        loop {
            match bounded("the end of the stream", rx.message()).await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(status) => panic!("the stream ended with {status}"),
            }
        }
    }

    /// Waits for the status that ends the stream; it must be an error.
    pub async fn error(&mut self) -> Status {
        match self.next_ack().await {
            Ok(through) => panic!("expected an error, got an ack through {through}"),
            Err(status) => status,
        }
    }
}

// ---------------------------------------------------------------------------
// The database, read behind the collector's back
// ---------------------------------------------------------------------------

pub fn read_only(db: &Path) -> Connection {
    Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the database read-only")
}

pub fn count(db: &Path, sql: &str) -> i64 {
    read_only(db)
        .query_row(sql, [], |row| row.get(0))
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
}

pub fn stored_events(db: &Path) -> i64 {
    count(db, "SELECT count(*) FROM events")
}

pub fn stored_sequences(db: &Path, vm: &str) -> Vec<i64> {
    let conn = read_only(db);
    let mut statement = conn
        .prepare(
            "SELECT e.sequence FROM events e JOIN sidecars s ON s.id = e.sidecar_id
             WHERE s.vm_instance = ?1 ORDER BY e.sequence",
        )
        .expect("prepare");
    statement
        .query_map([vm], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The aggregate count of the (DEST, WRONG_POD, misrouted) row; 0 if absent.
pub fn misrouted_aggregate(db: &Path) -> i64 {
    let conn = read_only(db);
    let rows: Vec<i64> = conn
        .prepare(
            "SELECT count FROM aggregates
             WHERE original_destination = ?1 AND upstream_host = ?2 AND verdict = 'misrouted'",
        )
        .expect("prepare")
        .query_map([DEST, WRONG_POD], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(rows.len() <= 1, "duplicate aggregate rows: {rows:?}");
    rows.first().copied().unwrap_or(0)
}

/// `dialguard serve` with `args` (its own `--grpc` and `--http`) on a fresh
/// database: its stderr lines up to and including the first that contains
/// `until`; then it is killed by its PID.
pub fn serve_lines_until(args: &[&str], until: &str) -> Vec<String> {
    let (_dir, db) = temp_db();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .arg("serve")
        .arg("--db")
        .arg(&db)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dialguard serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let until_owned = until.to_owned();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains(&until_owned);
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(WAIT);
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.unwrap_or_else(|_| panic!("no {until:?} within {WAIT:?}"));
    assert!(
        lines.iter().any(|line| line.contains(until)),
        "serve {args:?} ended without {until:?}: {lines:#?}"
    );
    lines
}
