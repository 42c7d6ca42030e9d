//! Durable storage in SQLite (WAL). One writer thread owns the write
//! connection and commits whatever batches are waiting in one transaction
//! (group commit); each batch's sender learns only after the commit, so an
//! acknowledgement always means "on disk". Readers open their own connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dialguard_proto::v1::{Hello, Rejection};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::event::ValidEvent;
use crate::finding::Cause;
use crate::health::{StoreHealth, WriteKind};
use crate::inventory::{Vm, VmKey};
use crate::metrics::Metrics;
use crate::sequence::{Admission, Ledger};

/// Migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: sidecars (one row per Envoy VM), raw events, exact aggregates.
    "CREATE TABLE sidecars (
        id INTEGER PRIMARY KEY,
        node_id TEXT NOT NULL,
        vm_instance TEXT NOT NULL,
        pod_name TEXT NOT NULL,
        namespace TEXT NOT NULL,
        workload_name TEXT NOT NULL,
        instance_ips TEXT NOT NULL,
        cluster_id TEXT NOT NULL,
        istio_version TEXT NOT NULL,
        filter_version TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        dropped_total INTEGER NOT NULL DEFAULT 0,
        UNIQUE (node_id, vm_instance)
     );
     CREATE TABLE events (
        sidecar_id INTEGER NOT NULL REFERENCES sidecars(id),
        sequence INTEGER NOT NULL,
        timestamp_ns INTEGER NOT NULL,
        original_destination TEXT NOT NULL,
        upstream_host TEXT NOT NULL,
        source TEXT NOT NULL,
        connection_id INTEGER NOT NULL,
        cluster TEXT NOT NULL,
        filter_chain TEXT NOT NULL,
        verdict TEXT NOT NULL,
        response_flags INTEGER NOT NULL,
        failure_reason TEXT NOT NULL,
        intended_service TEXT NOT NULL,
        PRIMARY KEY (sidecar_id, sequence)
     ) WITHOUT ROWID;
     CREATE TABLE aggregates (
        source_workload TEXT NOT NULL,
        source_namespace TEXT NOT NULL,
        original_destination TEXT NOT NULL,
        upstream_host TEXT NOT NULL,
        cluster TEXT NOT NULL,
        verdict TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        PRIMARY KEY (source_workload, source_namespace, original_destination,
                     upstream_host, cluster, verdict)
     ) WITHOUT ROWID;",
    // 2: the upstream host's istio.workload.
    "ALTER TABLE events ADD COLUMN upstream_workload TEXT NOT NULL DEFAULT '';",
    // 3: enforce mode closed the connection.
    "ALTER TABLE events ADD COLUMN enforced INTEGER NOT NULL DEFAULT 0;",
    // 4: per-VM high-water mark (dedupe without a raw row, so raw rows can be
    // sampled), rejected events, the pod-IP directory, what the report needs
    // to say who meant to reach whom, and an index for retention.
    "ALTER TABLE sidecars ADD COLUMN committed_through INTEGER NOT NULL DEFAULT 0;
     UPDATE sidecars SET committed_through =
        coalesce((SELECT max(sequence) FROM events WHERE sidecar_id = sidecars.id), 0);
     ALTER TABLE sidecars ADD COLUMN rejected_total INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE aggregates ADD COLUMN capturing_service TEXT NOT NULL DEFAULT '';
     ALTER TABLE aggregates ADD COLUMN upstream_workload TEXT NOT NULL DEFAULT '';
     CREATE TABLE directory (
        ip TEXT PRIMARY KEY,
        pod_name TEXT NOT NULL,
        namespace TEXT NOT NULL,
        workload_name TEXT NOT NULL,
        node_id TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE totals (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX events_by_time ON events (timestamp_ns);",
    // 5: the cause of each event (computed once at ingest), enforce mode's
    // preview (would_close) and when the filter judged it; per report row
    // the latest cause, would-close and enforced counts and the source pods.
    // Rows stored before causes existed get the cause their row alone
    // supports (as `finding::classify` decides it without the filter chain);
    // the others stay empty and read as unexplained.
    "ALTER TABLE events ADD COLUMN would_close INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE events ADD COLUMN judged_open INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE events ADD COLUMN cause TEXT NOT NULL DEFAULT '';
     ALTER TABLE aggregates ADD COLUMN cause TEXT NOT NULL DEFAULT '';
     ALTER TABLE aggregates ADD COLUMN would_close INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE aggregates ADD COLUMN enforced INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE aggregates ADD COLUMN source_pods TEXT NOT NULL DEFAULT '';
     UPDATE aggregates SET cause = CASE
        WHEN cluster LIKE 'outbound|%|%|_%' AND verdict = 'misrouted' THEN 'catch_all'
        WHEN cluster LIKE 'outbound|%|%|_%' AND verdict IN ('redirected', 'resolved')
            THEN 'dns_redirection'
        WHEN verdict = 'blackholed' AND cluster NOT IN ('', 'BlackHoleCluster', 'PassthroughCluster')
            THEN 'no_endpoints'
        ELSE '' END;",
    // 6: coverage (issue 11): what each VM runs and its heartbeat counters
    // (cumulative; `dropped_total` also takes the heartbeats'), the
    // namespaces `serve` was told to expect and its coverage settings.
    "ALTER TABLE sidecars ADD COLUMN build TEXT NOT NULL DEFAULT '';
     ALTER TABLE sidecars ADD COLUMN mode TEXT NOT NULL DEFAULT '';
     ALTER TABLE sidecars ADD COLUMN module_sha256 TEXT NOT NULL DEFAULT '';
     ALTER TABLE sidecars ADD COLUMN heartbeat_interval_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_match INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_service INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_allowed INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_misrouted INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_blackholed INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_redirected INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_resolved INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_unjudged INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN conn_enforced INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN delivery_sent INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN delivery_acked INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN delivery_resent INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN delivery_dropped INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sidecars ADD COLUMN delivery_rejected INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX sidecars_by_namespace ON sidecars (namespace);
     CREATE TABLE expected_namespaces (namespace TEXT PRIMARY KEY) WITHOUT ROWID;
     CREATE TABLE settings (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;",
    // 7 (issue 12): the gaps below each VM's highest committed sequence (see
    // `sequence::Ledger`; rows from before keep no gaps: everything at or
    // below their mark reads as stored, as it did), and the identity the
    // client certificate proved (`--grpc-client-ca`: the SPIFFE URI; empty
    // without), part of what identifies a VM, so a certificate of one
    // service account cannot write into another's VMs. SQLite cannot change
    // a table's UNIQUE constraint: the table is rebuilt with the same ids.
    "CREATE TABLE sidecars_v7 (
        id INTEGER PRIMARY KEY,
        node_id TEXT NOT NULL,
        vm_instance TEXT NOT NULL,
        peer_identity TEXT NOT NULL DEFAULT '',
        pod_name TEXT NOT NULL,
        namespace TEXT NOT NULL,
        workload_name TEXT NOT NULL,
        instance_ips TEXT NOT NULL,
        cluster_id TEXT NOT NULL,
        istio_version TEXT NOT NULL,
        filter_version TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        dropped_total INTEGER NOT NULL DEFAULT 0,
        committed_through INTEGER NOT NULL DEFAULT 0,
        sequence_floor INTEGER NOT NULL DEFAULT 0,
        sequence_gaps TEXT NOT NULL DEFAULT '',
        rejected_total INTEGER NOT NULL DEFAULT 0,
        build TEXT NOT NULL DEFAULT '',
        mode TEXT NOT NULL DEFAULT '',
        module_sha256 TEXT NOT NULL DEFAULT '',
        heartbeat_interval_ms INTEGER NOT NULL DEFAULT 0,
        conn_match INTEGER NOT NULL DEFAULT 0,
        conn_service INTEGER NOT NULL DEFAULT 0,
        conn_allowed INTEGER NOT NULL DEFAULT 0,
        conn_misrouted INTEGER NOT NULL DEFAULT 0,
        conn_blackholed INTEGER NOT NULL DEFAULT 0,
        conn_redirected INTEGER NOT NULL DEFAULT 0,
        conn_resolved INTEGER NOT NULL DEFAULT 0,
        conn_unjudged INTEGER NOT NULL DEFAULT 0,
        conn_enforced INTEGER NOT NULL DEFAULT 0,
        delivery_sent INTEGER NOT NULL DEFAULT 0,
        delivery_acked INTEGER NOT NULL DEFAULT 0,
        delivery_resent INTEGER NOT NULL DEFAULT 0,
        delivery_dropped INTEGER NOT NULL DEFAULT 0,
        delivery_rejected INTEGER NOT NULL DEFAULT 0,
        UNIQUE (node_id, vm_instance, peer_identity)
     );
     INSERT INTO sidecars_v7 (id, node_id, vm_instance, pod_name, namespace, workload_name,
        instance_ips, cluster_id, istio_version, filter_version, first_seen_ns, last_seen_ns,
        dropped_total, committed_through, rejected_total, build, mode, module_sha256,
        heartbeat_interval_ms, conn_match, conn_service, conn_allowed, conn_misrouted,
        conn_blackholed, conn_redirected, conn_resolved, conn_unjudged, conn_enforced,
        delivery_sent, delivery_acked, delivery_resent, delivery_dropped, delivery_rejected)
     SELECT id, node_id, vm_instance, pod_name, namespace, workload_name,
        instance_ips, cluster_id, istio_version, filter_version, first_seen_ns, last_seen_ns,
        dropped_total, committed_through, rejected_total, build, mode, module_sha256,
        heartbeat_interval_ms, conn_match, conn_service, conn_allowed, conn_misrouted,
        conn_blackholed, conn_redirected, conn_resolved, conn_unjudged, conn_enforced,
        delivery_sent, delivery_acked, delivery_resent, delivery_dropped, delivery_rejected
     FROM sidecars;
     DROP TABLE sidecars;
     ALTER TABLE sidecars_v7 RENAME TO sidecars;
     CREATE INDEX sidecars_by_namespace ON sidecars (namespace);",
    // 8: the pod directory holds each pod once (`directory` copied a pod's
    // names to every IP it announced): `pods`, one row per (namespace, pod
    // name, node id), and `pod_ips`, each IP's pod. `directory`'s rows move
    // over, a pod's times the widest of its IPs'.
    "CREATE TABLE pods (
        id INTEGER PRIMARY KEY,
        namespace TEXT NOT NULL,
        pod_name TEXT NOT NULL,
        node_id TEXT NOT NULL,
        workload_name TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        UNIQUE (namespace, pod_name, node_id)
     );
     CREATE TABLE pod_ips (
        ip TEXT PRIMARY KEY,
        pod_id INTEGER NOT NULL REFERENCES pods(id)
     ) WITHOUT ROWID;
     CREATE INDEX pod_ips_by_pod ON pod_ips (pod_id);
     INSERT INTO pods (namespace, pod_name, node_id, workload_name, first_seen_ns, last_seen_ns)
        SELECT namespace, pod_name, node_id, max(workload_name), min(first_seen_ns),
            max(last_seen_ns)
        FROM directory GROUP BY namespace, pod_name, node_id;
     INSERT INTO pod_ips (ip, pod_id)
        SELECT directory.ip, pods.id FROM directory JOIN pods USING (namespace, pod_name, node_id);
     DROP TABLE directory;",
];

/// The `sidecars` columns of the inventory, in `inventory::Vm` order.
const INVENTORY_COLUMNS: &str = "node_id, vm_instance, pod_name, namespace, workload_name,
    instance_ips, cluster_id, istio_version, filter_version, module_sha256, build, mode,
    heartbeat_interval_ms, first_seen_ns, last_seen_ns,
    conn_match, conn_service, conn_allowed, conn_misrouted, conn_blackholed, conn_redirected,
    conn_resolved, conn_unjudged, conn_enforced,
    delivery_sent, delivery_acked, delivery_resent, delivery_dropped, delivery_rejected,
    dropped_total, peer_identity";

/// Most pod names kept per report row (`aggregates.source_pods`).
pub const MAX_SOURCE_PODS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this collector knows ({known})"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store's writer has stopped")]
    WriterGone,
}

/// Opens (creating and migrating) the database for writing.
pub fn open_for_writing(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction().map_err(open_err)?;
        tx.execute_batch(migration).map_err(open_err)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(open_err)?;
        tx.commit().map_err(open_err)?;
    }
    Ok(conn)
}

/// Opens an existing database for reading, alongside a running writer.
pub fn open_for_reading(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        return Err(open_err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some("no such file".into()),
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    Ok(conn)
}

/// A batch from one sidecar VM, to be committed.
#[derive(Debug)]
pub struct Batch {
    pub sidecar: Arc<Hello>,
    /// What the client certificate proved (see `VmKey::peer`).
    pub peer: Arc<str>,
    /// The valid events, in the order sent (sequences ascending).
    pub events: Vec<ValidEvent>,
    /// Events of this batch that validation refused: acknowledged, counted, not stored.
    pub rejected: u64,
    pub dropped_total: u64,
    pub received_ns: u64,
    /// Ingest's share of its memory budget for queued events, given back
    /// as soon as the batch is committed (see `ingest::QUEUED_EVENTS`).
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a commit did: the events seen for the first time (resends are left
/// out, so alerts fire once), and the events refused because the VM's
/// ledger can no longer tell them from duplicates.
#[derive(Debug, Default)]
pub struct Committed {
    pub new_events: Vec<ValidEvent>,
    pub rejected: Vec<Rejection>,
}

/// What one retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub events: u64,
    pub aggregates: u64,
    /// Pods of the directory, with their IPs.
    pub pods: u64,
    pub sidecars: u64,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Request {
    Commit {
        batch: Batch,
        queued: Instant,
        reply: Reply<Committed>,
    },
    /// A sidecar identified itself or went away: refresh its directory entries.
    Seen { sidecar: Arc<Hello>, at_ns: u64 },
    /// The inventory's changed VMs, written in one transaction.
    Inventory {
        vms: Vec<(VmKey, Vm)>,
        reply: Reply<()>,
    },
    /// Remove what is older than the cutoff, a chunk at a time between commits.
    Expire {
        cutoff_ns: u64,
        reply: Reply<Expired>,
    },
    /// The expected namespaces changed: record them for `report`.
    CoverageConfig {
        expected: std::collections::BTreeSet<String>,
        forget_stale: Duration,
        reply: Reply<()>,
    },
    /// The writer has been idle: check that it still can write.
    Probe,
}

/// How the writer thread behaves under load.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Batches that waited longer than this for the writer mean it cannot keep
    /// up: raw rows are then sampled (aggregates stay exact).
    pub overloaded_after: Duration,
    /// A cap on the database's size in pages (SQLite `max_page_count`),
    /// applied before each write when it changed. A handle, so that tests
    /// can make the store full for real (`SQLITE_FULL`) and give it room
    /// again while it runs.
    pub max_pages: PageLimit,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            overloaded_after: Duration::from_millis(250),
            max_pages: PageLimit::default(),
        }
    }
}

/// See [`WriterConfig::max_pages`]; 0 (the default) means no cap.
#[derive(Debug, Clone, Default)]
pub struct PageLimit(Arc<std::sync::atomic::AtomicU64>);

impl PageLimit {
    pub fn set(&self, pages: u64) {
        self.0.store(pages, std::sync::atomic::Ordering::Release);
    }

    fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// SQLite's own largest `max_page_count`: no cap.
const SQLITE_MAX_PAGES: u64 = 4_294_967_294;

/// A batch queued for commit; resolves once it is durable.
#[derive(Debug)]
pub struct PendingCommit {
    done: oneshot::Receiver<Result<Committed, String>>,
}

impl PendingCommit {
    /// A commit that needs no store (an empty batch), done already.
    pub fn ready(committed: Committed) -> Self {
        let (reply, done) = oneshot::channel();
        let _ = reply.send(Ok(committed));
        Self { done }
    }
}

impl std::future::Future for PendingCommit {
    type Output = Result<Committed, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.done)
            .poll(cx)
            .map(|reply| match reply {
                Ok(Ok(committed)) => Ok(committed),
                Ok(Err(message)) => Err(StoreError::Commit(message)),
                Err(_) => Err(StoreError::WriterGone),
            })
    }
}

/// The handle that ingest uses to commit batches.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

/// Most batches committed in one transaction.
const GROUP_COMMIT_MAX: usize = 256;
/// Events after which a group is committed without waiting for more: acks
/// then flow while later batches are stored, so a sidecar with a full
/// window of unacknowledged events keeps sending.
const GROUP_COMMIT_EVENTS: usize = 4_096;
/// Distinct aggregation keys summed in memory before they are written out:
/// bounds memory whatever the spread of the input.
const MAX_AGGREGATE_KEYS: usize = 16_384;
/// Raw rows kept under the heaviest overload: one in this many.
const MAX_KEEP_EVERY: u64 = 64;
/// Rows deleted per retention transaction, so commits interleave.
const EXPIRE_CHUNK: usize = 20_000;

impl Writer {
    /// Starts the writer thread on an opened connection. The thread ends once
    /// every `Writer` clone is dropped and the queue is drained.
    pub fn start(
        conn: Connection,
        config: WriterConfig,
        metrics: Metrics,
        health: StoreHealth,
    ) -> (Self, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let handle = thread::Builder::new()
            .name("dialguard-store".into())
            .spawn(move || WriterThread::new(conn, config, metrics, health).run(rx))
            .unwrap_or_else(|err| {
                // Without a writer thread nothing can be stored: fail loudly at startup.
                tracing::error!("cannot start the store writer thread: {err}");
                std::process::exit(70)
            });
        (Self { tx }, handle)
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(request(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        match done.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(StoreError::Commit(message)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// Commits the batch; returns after it is durable.
    pub async fn commit(&self, batch: Batch) -> Result<Committed, StoreError> {
        self.submit(batch).await?.await
    }

    /// Queues the batch for commit and returns at once with the commit to
    /// await: a stream can decode its next batch while this one commits.
    pub async fn submit(&self, batch: Batch) -> Result<PendingCommit, StoreError> {
        let (reply, done) = oneshot::channel();
        let request = Request::Commit {
            batch,
            queued: Instant::now(),
            reply,
        };
        self.tx
            .send(request)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(PendingCommit { done })
    }

    /// Queues the directory update for the sidecar without waiting for it:
    /// ahead of any batch queued after it (one queue, written in order), so
    /// a report made after a later commit sees it. Heartbeat streams must
    /// not wait for a disk sync just to say hello.
    pub async fn note_seen(&self, sidecar: Arc<Hello>, at_ns: u64) -> Result<(), StoreError> {
        self.tx
            .send(Request::Seen { sidecar, at_ns })
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    /// Writes the inventory's changed VMs (one transaction for all).
    pub async fn save_inventory(&self, vms: Vec<(VmKey, Vm)>) -> Result<(), StoreError> {
        self.ask(|reply| Request::Inventory { vms, reply }).await
    }

    /// Asks the writer to make a small write, so that its health is known
    /// while nothing else is written; skipped when the queue is full (it
    /// is busy writing then).
    pub fn probe(&self) {
        let _ = self.tx.try_send(Request::Probe);
    }

    /// Deletes events, aggregate rows, directory entries and idle sidecars
    /// last seen before `cutoff_ns`; returns when all are gone.
    pub async fn expire(&self, cutoff_ns: u64) -> Result<Expired, StoreError> {
        self.ask(|reply| Request::Expire { cutoff_ns, reply }).await
    }

    /// [`record_coverage_config`], through the writer (serve's connection).
    pub async fn record_coverage_config(
        &self,
        expected: std::collections::BTreeSet<String>,
        forget_stale: Duration,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Request::CoverageConfig {
            expected,
            forget_stale,
            reply,
        })
        .await
    }
}

/// Raw-row sampling: one row in `keep_every` is stored while the writer is
/// behind, which is either of:
/// - batches wait too long: `OVERLOADED_GROUPS` slow commit groups in a
///   row (a single stall, a checkpoint or a reader's lock, is not overload);
/// - the writer is saturated: busy committing for `SATURATED` of a
///   `SATURATION_WINDOW` (one fast sidecar, or a few, whose pipelined
///   batches never let it rest, keep waits short while raw rows still
///   arrive faster than they can be stored).
///
/// Doubles while behind; halves once a window shows it is not and batches
/// wait little.
///
/// Sampling is per VM and fair: in every [`FAIR_WINDOW`] each VM keeps the
/// raw rows of its first [`FAIR_SHARE`] new events, and only then one in
/// `keep_every` of its own. A flood from a few VMs thins out their rows,
/// not those of a VM that reports now and then.
#[derive(Debug)]
struct Sampler {
    keep_every: u64,
    overloaded_after: Duration,
    slow_groups: u32,
    window_started: Instant,
    window_busy: Duration,
    fair_window_started: Instant,
    /// New events per VM (sidecar row id) in this fairness window, counted
    /// while sampling.
    seen: HashMap<i64, u64, foldhash::fast::RandomState>,
}

/// Raw rows every VM keeps per [`FAIR_WINDOW`] before sampling applies to it.
const FAIR_SHARE: u64 = 16;
/// The window of [`FAIR_SHARE`].
const FAIR_WINDOW: Duration = Duration::from_secs(10);

/// Consecutive commit groups whose batches waited too long before sampling starts.
const OVERLOADED_GROUPS: u32 = 3;
/// The window over which the writer's busy share is judged.
const SATURATION_WINDOW: Duration = Duration::from_secs(1);
/// The busy share at which the writer counts as saturated.
const SATURATED: f64 = 0.8;

impl Sampler {
    fn new(overloaded_after: Duration) -> Self {
        Self {
            keep_every: 1,
            overloaded_after,
            slow_groups: 0,
            window_started: Instant::now(),
            window_busy: Duration::ZERO,
            fair_window_started: Instant::now(),
            seen: HashMap::default(),
        }
    }

    /// Time spent committing, for the busy share.
    fn record_busy(&mut self, busy: Duration) {
        self.window_busy += busy;
    }

    fn adjust(&mut self, longest_wait: Duration) {
        let before = self.keep_every;
        let elapsed = self.window_started.elapsed();
        let saturated = (elapsed >= SATURATION_WINDOW).then(|| {
            let share = self.window_busy.as_secs_f64() / elapsed.as_secs_f64();
            self.window_started = Instant::now();
            self.window_busy = Duration::ZERO;
            share >= SATURATED
        });
        if longest_wait > self.overloaded_after {
            self.slow_groups += 1;
            if self.slow_groups >= OVERLOADED_GROUPS {
                self.keep_every = (self.keep_every * 2).min(MAX_KEEP_EVERY);
            }
        } else {
            self.slow_groups = 0;
            match saturated {
                Some(true) => self.keep_every = (self.keep_every * 2).min(MAX_KEEP_EVERY),
                Some(false) if longest_wait < self.overloaded_after / 4 => {
                    self.keep_every = (self.keep_every / 2).max(1);
                }
                _ => {}
            }
        }
        if before != self.keep_every {
            tracing::warn!(
                "store {}: keeping 1 raw event row in {} (aggregates stay exact; batches waited {longest_wait:?})",
                if self.keep_every > before {
                    "behind"
                } else {
                    "catching up"
                },
                self.keep_every
            );
        }
    }

    /// Whether the raw row of this VM's next new event is kept.
    fn keeps(&mut self, sidecar_id: i64) -> bool {
        if self.keep_every == 1 {
            return true;
        }
        if self.fair_window_started.elapsed() >= FAIR_WINDOW {
            self.fair_window_started = Instant::now();
            self.seen.clear();
        }
        let seen = self.seen.entry(sidecar_id).or_default();
        *seen += 1;
        *seen <= FAIR_SHARE || (*seen - FAIR_SHARE) % self.keep_every == 0
    }
}

struct PendingExpiry {
    cutoff_ns: u64,
    done: Expired,
    reply: Reply<Expired>,
}

struct WriterThread {
    conn: Connection,
    sampler: Sampler,
    expiring: Option<PendingExpiry>,
    metrics: Metrics,
    health: StoreHealth,
    max_pages: PageLimit,
    /// The `max_page_count` last applied to the connection.
    applied_max_pages: u64,
}

impl Drop for WriterThread {
    // Also when it panics: /readyz must not stay green without a writer.
    fn drop(&mut self) {
        if thread::panicking() {
            tracing::error!("the store's writer thread panicked; nothing can be stored any more");
        }
        self.health.stopped();
    }
}

impl WriterThread {
    fn new(conn: Connection, config: WriterConfig, metrics: Metrics, health: StoreHealth) -> Self {
        Self {
            conn,
            metrics,
            sampler: Sampler::new(config.overloaded_after),
            expiring: None,
            health,
            max_pages: config.max_pages,
            applied_max_pages: 0,
        }
    }

    /// Runs one write transaction, telling [`StoreHealth`] how it went.
    fn write<T, E: std::fmt::Display>(
        &mut self,
        kind: WriteKind,
        write: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.health.writing();
        self.apply_max_pages();
        let result = write(&mut self.conn);
        self.health.wrote(kind, result.as_ref().map(|_| ()));
        result
    }

    fn apply_max_pages(&mut self) {
        let wanted = self.max_pages.get();
        if wanted == self.applied_max_pages {
            return;
        }
        let pages = if wanted == 0 {
            SQLITE_MAX_PAGES
        } else {
            wanted
        };
        if let Err(err) = self
            .conn
            .pragma_update(None, "max_page_count", as_sql_int(pages))
        {
            tracing::error!("setting the store's max_page_count failed: {err}");
        }
        self.applied_max_pages = wanted;
    }

    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut commits = Vec::with_capacity(GROUP_COMMIT_MAX);
        loop {
            // Retention works only while nothing else waits.
            let first = match rx.try_recv() {
                Ok(request) => request,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if self.expiring.is_some() => {
                    self.expire_chunk();
                    continue;
                }
                Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                    Some(request) => request,
                    None => break,
                },
            };
            let mut next = Some(first);
            let mut group_events = 0;
            // Hellos and stream ends waiting together share one transaction:
            // thousands of short heartbeat streams a second each bring two.
            let mut seen = Vec::new();
            while let Some(request) = next.take() {
                match request {
                    Request::Commit {
                        batch,
                        queued,
                        reply,
                    } => {
                        group_events += batch.events.len();
                        commits.push((batch, queued, reply));
                    }
                    Request::Seen { sidecar, at_ns } => seen.push((sidecar, at_ns)),
                    Request::Inventory { vms, reply } => {
                        let saved = self.write(WriteKind::Other, |conn| save_inventory(conn, &vms));
                        if let Err(err) = &saved {
                            tracing::error!("saving the sidecar inventory failed: {err}");
                        }
                        let _ = reply.send(saved.map_err(|err| err.to_string()));
                    }
                    Request::Expire { cutoff_ns, reply } => self.start_expiry(cutoff_ns, reply),
                    Request::CoverageConfig {
                        expected,
                        forget_stale,
                        reply,
                    } => {
                        let recorded = self.write(WriteKind::Other, |conn| {
                            record_coverage_config(conn, &expected, forget_stale)
                        });
                        let _ = reply.send(recorded.map_err(|err| err.to_string()));
                    }
                    Request::Probe => {
                        if let Err(err) = self.write(WriteKind::Probe, probe) {
                            tracing::error!("the store's probe write failed: {err}");
                        }
                    }
                }
                if commits.len() < GROUP_COMMIT_MAX && group_events < GROUP_COMMIT_EVENTS {
                    next = rx.try_recv().ok();
                }
            }
            if !seen.is_empty() {
                if let Err(err) = self.write(WriteKind::Other, |conn| record_seen(conn, &seen)) {
                    tracing::error!("directory update failed: {err}");
                }
                seen.clear();
            }
            if !commits.is_empty() {
                self.commit_group(&mut commits);
            }
        }
        if let Some(expiry) = self.expiring.take() {
            let _ = expiry.reply.send(Err("the store's writer stopped".into()));
        }
    }

    fn commit_group(&mut self, commits: &mut Vec<(Batch, Instant, Reply<Committed>)>) {
        let longest_wait = commits
            .iter()
            .map(|(_, queued, _)| queued.elapsed())
            .max()
            .unwrap_or_default();
        self.sampler.adjust(longest_wait);
        let started = Instant::now();
        self.health.writing();
        self.apply_max_pages();
        let result = commit_group(
            &mut self.conn,
            &mut self.sampler,
            commits.iter().map(|c| &c.0),
        );
        self.health
            .wrote(WriteKind::Commit, result.as_ref().map(|_| ()));
        let busy = started.elapsed();
        self.sampler.record_busy(busy);
        self.metrics.observe_commit(busy);
        match result {
            Ok(outcome) => {
                self.metrics.events_sampled_out.inc_by(outcome.sampled_out);
                for ((batch, _, reply), admitted) in commits.drain(..).zip(outcome.admitted) {
                    let mut committed = Committed::default();
                    for (event, admission) in batch.events.into_iter().zip(admitted) {
                        match admission {
                            Admission::New => committed.new_events.push(event),
                            Admission::Duplicate => {}
                            Admission::Forgotten { floor } => {
                                committed.rejected.push(forgotten(&event, floor));
                            }
                        }
                    }
                    let _ = reply.send(Ok(committed));
                }
            }
            Err(err) => {
                tracing::error!("commit failed: {err}");
                for (_, _, reply) in commits.drain(..) {
                    let _ = reply.send(Err(err.to_string()));
                }
            }
        }
    }

    fn start_expiry(&mut self, cutoff_ns: u64, reply: Reply<Expired>) {
        if let Some(previous) = self.expiring.take() {
            // A newer cutoff supersedes the older one; report what was done so far.
            let _ = previous.reply.send(Ok(previous.done));
        }
        self.expiring = Some(PendingExpiry {
            cutoff_ns,
            done: Expired::default(),
            reply,
        });
    }

    fn expire_chunk(&mut self) {
        let Some(mut expiry) = self.expiring.take() else {
            return;
        };
        let cutoff_ns = expiry.cutoff_ns;
        match self.write(WriteKind::Other, |conn| {
            expire_chunk(conn, cutoff_ns, &mut expiry.done)
        }) {
            Ok(true) => {
                let _ = expiry.reply.send(Ok(expiry.done));
            }
            Ok(false) => self.expiring = Some(expiry),
            Err(err) => {
                tracing::error!("retention pass failed: {err}");
                let _ = expiry.reply.send(Err(err.to_string()));
            }
        }
    }
}

/// `settings` row: when the idle writer last proved that it can write.
const PROBED_AT: &str = "store_probed_ns";

/// The idle writer's health check: a small write transaction.
fn probe(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        params![PROBED_AT, as_sql_int(crate::time::now_unix_nanos())],
    )?;
    tx.commit()
}

fn record_seen(conn: &mut Connection, seen: &[(Arc<Hello>, u64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut upsert_pod = tx.prepare_cached(
            "INSERT INTO pods (namespace, pod_name, node_id, workload_name, first_seen_ns,
                last_seen_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (namespace, pod_name, node_id) DO UPDATE SET
                workload_name = excluded.workload_name,
                last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)
             RETURNING id",
        )?;
        // A later pod with the same IP takes it over.
        let mut claim_ip = tx.prepare_cached(
            "INSERT INTO pod_ips (ip, pod_id) VALUES (?1, ?2)
             ON CONFLICT (ip) DO UPDATE SET pod_id = excluded.pod_id
                WHERE pod_id <> excluded.pod_id",
        )?;
        for (sidecar, at_ns) in seen {
            // An address that does not parse is kept out of the directory:
            // it could never match a dialed address anyway. A pod without
            // one has nothing to be looked up by.
            let ips = announced_ips(sidecar);
            if ips.is_empty() {
                continue;
            }
            let pod_id: i64 = upsert_pod.query_row(
                params![
                    sidecar.namespace,
                    sidecar.pod_name,
                    sidecar.node_id,
                    sidecar.workload_name,
                    as_sql_int(*at_ns),
                ],
                |row| row.get(0),
            )?;
            for ip in ips {
                claim_ip.execute(params![ip.to_string(), pod_id])?;
            }
        }
    }
    tx.commit()
}

/// The IPs a sidecar announced (`INSTANCE_IPS`) that parse, each once.
pub fn announced_ips(sidecar: &Hello) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = sidecar
        .instance_ips
        .iter()
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// Upserts the VMs' rows; counters and times only ever grow (a VM that
/// memory forgot and that came back must not lower what is stored).
fn save_inventory(conn: &mut Connection, vms: &[(VmKey, Vm)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let grow = |column: &str| format!("{column} = max({column}, excluded.{column})");
        let counters = [
            "conn_match",
            "conn_service",
            "conn_allowed",
            "conn_misrouted",
            "conn_blackholed",
            "conn_redirected",
            "conn_resolved",
            "conn_unjudged",
            "conn_enforced",
            "delivery_sent",
            "delivery_acked",
            "delivery_resent",
            "delivery_dropped",
            "delivery_rejected",
            "dropped_total",
            "last_seen_ns",
        ]
        .map(grow)
        .join(", ");
        let mut upsert = tx.prepare_cached(&format!(
            "INSERT INTO sidecars ({INVENTORY_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31)
             ON CONFLICT (node_id, vm_instance, peer_identity) DO UPDATE SET
                pod_name = excluded.pod_name, namespace = excluded.namespace,
                workload_name = excluded.workload_name, instance_ips = excluded.instance_ips,
                cluster_id = excluded.cluster_id, istio_version = excluded.istio_version,
                filter_version = excluded.filter_version,
                module_sha256 = excluded.module_sha256, build = excluded.build,
                mode = excluded.mode, heartbeat_interval_ms = excluded.heartbeat_interval_ms,
                first_seen_ns = min(first_seen_ns, excluded.first_seen_ns), {counters}"
        ))?;
        for (key, vm) in vms {
            let mut values: Vec<rusqlite::types::Value> = vec![
                key.node_id.to_string().into(),
                key.vm_instance.to_string().into(),
            ];
            for text in [
                &vm.pod_name,
                &vm.namespace,
                &vm.workload_name,
                &vm.instance_ips,
                &vm.cluster_id,
                &vm.istio_version,
                &vm.filter_version,
                &vm.module_sha256,
            ] {
                values.push(text.to_string().into());
            }
            values.push(vm.build.to_string().into());
            values.push(vm.mode.to_string().into());
            values.push(i64::from(vm.heartbeat_interval_ms).into());
            values.push(as_sql_int(vm.first_heard_ns).into());
            values.push(as_sql_int(vm.last_heard_ns).into());
            for n in vm.connections.iter().chain(&vm.delivery) {
                values.push(as_sql_int(*n).into());
            }
            values.push(as_sql_int(vm.dropped_total).into());
            values.push(key.peer.to_string().into());
            upsert.execute(rusqlite::params_from_iter(values))?;
        }
    }
    tx.commit()
}

/// The inventory as stored, newest first, at most `limit` VMs; only
/// `namespace`'s when given.
pub fn inventory(
    conn: &Connection,
    namespace: Option<&str>,
    limit: usize,
) -> Result<Vec<(VmKey, Vm)>, StoreError> {
    let mut statement = conn.prepare(&format!(
        "SELECT {INVENTORY_COLUMNS} FROM sidecars
         WHERE ?1 IS NULL OR namespace = ?1
         ORDER BY last_seen_ns DESC LIMIT ?2"
    ))?;
    let count = |n: i64| n.max(0) as u64;
    let rows = statement.query_map(params![namespace, as_sql_int(limit as u64)], |row| {
        let text = |index: usize| row.get::<_, String>(index);
        let number = |index: usize| row.get::<_, i64>(index).map(count);
        let key = VmKey {
            node_id: text(0)?.into(),
            vm_instance: text(1)?.into(),
            peer: text(30)?.into(),
        };
        let identity = [
            text(2)?,
            text(3)?,
            text(4)?,
            text(5)?,
            text(6)?,
            text(7)?,
            text(8)?,
            text(9)?,
        ];
        let mut connections = [0; 9];
        for (index, slot) in connections.iter_mut().enumerate() {
            *slot = number(15 + index)?;
        }
        let mut delivery = [0; 5];
        for (index, slot) in delivery.iter_mut().enumerate() {
            *slot = number(24 + index)?;
        }
        let vm = Vm::stored(
            identity,
            &text(10)?,
            &text(11)?,
            u32::try_from(number(12)?).unwrap_or(u32::MAX),
            number(13)?,
            number(14)?,
            connections,
            delivery,
            number(29)?,
        );
        Ok((key, vm))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What `serve` was told about coverage, for `report` to read.
pub fn record_coverage_config(
    conn: &mut Connection,
    expected: &std::collections::BTreeSet<String>,
    forget_stale: Duration,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM expected_namespaces", [])?;
    for namespace in expected {
        tx.execute(
            "INSERT INTO expected_namespaces (namespace) VALUES (?1)",
            [namespace],
        )?;
    }
    tx.execute(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        params![FORGET_STALE_MS, as_sql_int(forget_stale.as_millis() as u64)],
    )?;
    tx.commit()?;
    Ok(())
}

/// `settings` row: `serve --forget-stale`, in milliseconds.
const FORGET_STALE_MS: &str = "forget_stale_ms";

/// The expected namespaces and `--forget-stale` the last `serve` recorded
/// (none and the default before any did).
pub fn coverage_config(
    conn: &Connection,
) -> Result<(std::collections::BTreeSet<String>, Duration), StoreError> {
    let expected = conn
        .prepare("SELECT namespace FROM expected_namespaces")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    let forget: Option<i64> = conn
        .query_row(
            "SELECT value FROM settings WHERE name = ?1",
            [FORGET_STALE_MS],
            |row| row.get(0),
        )
        .optional()?;
    let forget = forget.map_or(crate::inventory::DEFAULT_FORGET_STALE, |ms| {
        Duration::from_millis(ms.max(0) as u64)
    });
    Ok((expected, forget))
}

/// Deletes one chunk of each kind; `Ok(true)` once nothing older is left.
fn expire_chunk(
    conn: &mut Connection,
    cutoff_ns: u64,
    done: &mut Expired,
) -> rusqlite::Result<bool> {
    let cutoff = as_sql_int(cutoff_ns);
    let chunk = EXPIRE_CHUNK as i64;
    let tx = conn.transaction()?;
    let events = tx.execute(
        "DELETE FROM events WHERE (sidecar_id, sequence) IN
            (SELECT sidecar_id, sequence FROM events WHERE timestamp_ns < ?1 LIMIT ?2)",
        params![cutoff, chunk],
    )?;
    // Aggregate rows are few (one per distinct key): no need to chunk them.
    let aggregates = tx.execute(
        "DELETE FROM aggregates WHERE last_seen_ns < ?1",
        params![cutoff],
    )?;
    // Pods are few (one per pod that ever connected): no need to chunk them.
    tx.execute(
        "DELETE FROM pod_ips WHERE pod_id IN (SELECT id FROM pods WHERE last_seen_ns < ?1)",
        params![cutoff],
    )?;
    let pods = tx.execute("DELETE FROM pods WHERE last_seen_ns < ?1", params![cutoff])?;
    let finished = events < EXPIRE_CHUNK;
    let sidecars = if finished {
        tx.execute(
            "DELETE FROM sidecars WHERE last_seen_ns < ?1
                AND NOT EXISTS (SELECT 1 FROM events WHERE sidecar_id = sidecars.id)",
            params![cutoff],
        )?
    } else {
        0
    };
    tx.commit()?;
    done.events += events as u64;
    done.aggregates += aggregates as u64;
    done.pods += pods as u64;
    done.sidecars += sidecars as u64;
    Ok(finished)
}

/// One (source VM, dialed, reached, cluster, verdict) summed over a commit group.
#[derive(Debug, Hash, PartialEq, Eq)]
struct AggregateKey {
    sidecar_id: i64,
    dialed: SocketAddr,
    reached: Option<SocketAddr>,
    cluster: String,
    verdict: &'static str,
}

/// The group's sums; the keys come from sidecars, hence a seeded hasher.
type AggregateSums = HashMap<AggregateKey, AggregateSum, foldhash::fast::RandomState>;

#[derive(Debug)]
struct AggregateSum {
    /// One sidecar VM (the key has its id), so one source pod.
    source: Arc<Hello>,
    count: u64,
    would_close: u64,
    enforced: u64,
    first_ns: u64,
    last_ns: u64,
    capturing_service: String,
    upstream_workload: String,
    /// The latest event's.
    cause: Cause,
}

fn flush_aggregates(
    tx: &rusqlite::Transaction<'_>,
    sums: &mut AggregateSums,
) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO aggregates (source_workload, source_namespace, original_destination,
            upstream_host, cluster, verdict, count, first_seen_ns, last_seen_ns,
            capturing_service, upstream_workload, cause, would_close, enforced, source_pods)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         ON CONFLICT DO UPDATE SET
            count = count + excluded.count,
            would_close = would_close + excluded.would_close,
            enforced = enforced + excluded.enforced,
            cause = CASE WHEN excluded.cause = '' THEN cause ELSE excluded.cause END,
            -- The comma-joined set of source pods, at most MAX_SOURCE_PODS:
            -- excluded.source_pods is one name (one sidecar per sum).
            source_pods = CASE
                WHEN excluded.source_pods = ''
                    OR instr(',' || source_pods || ',', ',' || excluded.source_pods || ',') > 0
                    THEN source_pods
                WHEN source_pods = '' THEN excluded.source_pods
                WHEN length(source_pods) - length(replace(source_pods, ',', '')) + 1 >= ?16
                    THEN source_pods
                ELSE source_pods || ',' || excluded.source_pods END,
            first_seen_ns = min(first_seen_ns, excluded.first_seen_ns),
            last_seen_ns = max(last_seen_ns, excluded.last_seen_ns),
            capturing_service = CASE WHEN excluded.capturing_service = ''
                THEN capturing_service ELSE excluded.capturing_service END,
            upstream_workload = CASE WHEN excluded.upstream_workload = ''
                THEN upstream_workload ELSE excluded.upstream_workload END",
    )?;
    for (key, sum) in sums.drain() {
        upsert.execute(params![
            sum.source.workload_name,
            sum.source.namespace,
            key.dialed.to_string(),
            key.reached.map(|a| a.to_string()).unwrap_or_default(),
            key.cluster,
            key.verdict,
            as_sql_int(sum.count),
            as_sql_int(sum.first_ns),
            as_sql_int(sum.last_ns),
            sum.capturing_service,
            sum.upstream_workload,
            sum.cause.label(),
            as_sql_int(sum.would_close),
            as_sql_int(sum.enforced),
            // A name with a comma (not a Kubernetes name) would split the list.
            if sum.source.pod_name.contains(',') {
                ""
            } else {
                sum.source.pod_name.as_str()
            },
            MAX_SOURCE_PODS as i64,
        ])?;
    }
    Ok(())
}

/// What one group commit did.
#[derive(Debug, Default)]
struct GroupOutcome {
    /// Per batch, per event: what the VM's ledger made of it.
    admitted: Vec<Vec<Admission>>,
    sampled_out: u64,
}

/// The refusal of an event the VM's ledger can no longer place.
fn forgotten(event: &ValidEvent, floor: u64) -> Rejection {
    Rejection {
        sequence: event.raw.sequence,
        code: tonic::Code::InvalidArgument as i32,
        message: format!(
            "sequence {} is at or below {floor}, below which this VM's gaps were \
             forgotten (more than {} of them): it cannot be told from a duplicate",
            event.raw.sequence,
            crate::sequence::MAX_GAPS
        ),
    }
}

/// Commits the batches in one transaction.
fn commit_group<'a>(
    conn: &mut Connection,
    sampler: &mut Sampler,
    batches: impl Iterator<Item = &'a Batch>,
) -> Result<GroupOutcome, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut results = Vec::new();
    let mut sums: AggregateSums = AggregateSums::default();
    let mut sampled_out = 0u64;
    {
        let mut upsert_sidecar = tx.prepare_cached(
            "INSERT INTO sidecars (node_id, vm_instance, pod_name, namespace, workload_name,
                instance_ips, cluster_id, istio_version, filter_version, first_seen_ns,
                last_seen_ns, dropped_total, peer_identity)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12)
             ON CONFLICT (node_id, vm_instance, peer_identity) DO UPDATE SET
                last_seen_ns = max(last_seen_ns, excluded.last_seen_ns),
                dropped_total = max(dropped_total, excluded.dropped_total)
             RETURNING id, committed_through, sequence_floor, sequence_gaps",
        )?;
        let mut advance_sidecar = tx.prepare_cached(
            "UPDATE sidecars SET committed_through = ?2, sequence_floor = ?3,
                sequence_gaps = ?4, rejected_total = rejected_total + ?5
             WHERE id = ?1",
        )?;
        let mut insert_event = tx.prepare_cached(
            "INSERT OR IGNORE INTO events (sidecar_id, sequence, timestamp_ns,
                original_destination, upstream_host, source, connection_id, cluster,
                filter_chain, verdict, response_flags, failure_reason, intended_service,
                upstream_workload, enforced, would_close, judged_open, cause)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18)",
        )?;
        let mut texts = RowTexts::default();
        for batch in batches {
            let s = &batch.sidecar;
            let (sidecar_id, mut ledger): (i64, Ledger) = upsert_sidecar.query_row(
                params![
                    s.node_id,
                    s.vm_instance,
                    s.pod_name,
                    s.namespace,
                    s.workload_name,
                    s.instance_ips.join(","),
                    s.cluster_id,
                    s.istio_version,
                    s.filter_version,
                    as_sql_int(batch.received_ns),
                    as_sql_int(batch.dropped_total),
                    &*batch.peer,
                ],
                |row| {
                    let number = |index| row.get::<_, i64>(index).map(|n| n.max(0) as u64);
                    let gaps: String = row.get(3)?;
                    Ok((row.get(0)?, Ledger::stored(number(1)?, number(2)?, &gaps)))
                },
            )?;
            let mut admitted = Vec::with_capacity(batch.events.len());
            let mut forgotten = 0u64;
            for event in &batch.events {
                let raw = &event.raw;
                let admission = ledger.admit(raw.sequence);
                admitted.push(admission);
                match admission {
                    Admission::New => {}
                    Admission::Duplicate => continue,
                    Admission::Forgotten { .. } => {
                        forgotten += 1;
                        continue;
                    }
                }
                if sampler.keeps(sidecar_id) {
                    insert_event.execute(params![
                        sidecar_id,
                        as_sql_int(raw.sequence),
                        as_sql_int(raw.timestamp_unix_nanos),
                        texts.dialed.write(Some(event.original_destination)),
                        texts.reached.write(event.upstream_host),
                        texts.source.write(event.source),
                        as_sql_int(raw.connection_id),
                        raw.cluster_name,
                        raw.filter_chain_name,
                        event.verdict.label(),
                        as_sql_int(raw.response_flags),
                        raw.upstream_transport_failure_reason,
                        raw.intended_service,
                        raw.upstream_workload,
                        raw.enforced,
                        raw.would_close,
                        raw.judged_open,
                        event.cause.label(),
                    ])?;
                } else {
                    sampled_out += 1;
                }
                if sums.len() >= MAX_AGGREGATE_KEYS {
                    flush_aggregates(&tx, &mut sums)?;
                }
                let key = AggregateKey {
                    sidecar_id,
                    dialed: event.original_destination,
                    reached: event.upstream_host,
                    cluster: raw.cluster_name.clone(),
                    verdict: event.verdict.label(),
                };
                let at = raw.timestamp_unix_nanos;
                let would_close = u64::from(raw.would_close);
                let enforced = u64::from(raw.enforced);
                sums.entry(key)
                    .and_modify(|sum| {
                        sum.count += 1;
                        sum.would_close += would_close;
                        sum.enforced += enforced;
                        sum.first_ns = sum.first_ns.min(at);
                        sum.last_ns = sum.last_ns.max(at);
                        sum.cause = event.cause;
                        if !raw.intended_service.is_empty() {
                            sum.capturing_service.clone_from(&raw.intended_service);
                        }
                        if !raw.upstream_workload.is_empty() {
                            sum.upstream_workload.clone_from(&raw.upstream_workload);
                        }
                    })
                    .or_insert_with(|| AggregateSum {
                        source: Arc::clone(s),
                        count: 1,
                        would_close,
                        enforced,
                        first_ns: at,
                        last_ns: at,
                        capturing_service: raw.intended_service.clone(),
                        upstream_workload: raw.upstream_workload.clone(),
                        cause: event.cause,
                    });
            }
            advance_sidecar.execute(params![
                sidecar_id,
                as_sql_int(ledger.through()),
                as_sql_int(ledger.floor()),
                ledger.gaps_text(),
                as_sql_int(batch.rejected + forgotten)
            ])?;
            results.push(admitted);
        }
        flush_aggregates(&tx, &mut sums)?;
        if sampled_out > 0 {
            add_total(&tx, SAMPLED_OUT, sampled_out)?;
        }
    }
    tx.commit()?;
    Ok(GroupOutcome {
        admitted: results,
        sampled_out,
    })
}

/// Reused buffers for the addresses of an event row.
#[derive(Default)]
struct RowTexts {
    dialed: AddrText,
    reached: AddrText,
    source: AddrText,
}

/// An address as stored (`ip:port`, `[ipv6]:port`, empty when absent),
/// written into a reused buffer: `SocketAddr`'s `Display` and a new
/// `String` per address cost the single writer about a tenth of its time.
#[derive(Default)]
struct AddrText(String);

impl AddrText {
    fn write(&mut self, addr: Option<SocketAddr>) -> &str {
        let buf = &mut self.0;
        buf.clear();
        match addr {
            None => {}
            Some(SocketAddr::V4(v4)) => {
                let mut digits = itoa::Buffer::new();
                for (index, octet) in v4.ip().octets().into_iter().enumerate() {
                    if index > 0 {
                        buf.push('.');
                    }
                    buf.push_str(digits.format(octet));
                }
                buf.push(':');
                buf.push_str(digits.format(v4.port()));
            }
            Some(v6) => {
                use std::fmt::Write;
                let _ = write!(buf, "{v6}");
            }
        }
        buf
    }
}

/// `totals` row: events counted in the aggregates whose raw row was not kept.
const SAMPLED_OUT: &str = "sampled_out_events";

fn add_total(tx: &rusqlite::Transaction<'_>, name: &str, n: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO totals (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![name, as_sql_int(n)])?;
    Ok(())
}

/// SQLite integers are signed 64-bit; values past i64::MAX are clamped.
fn as_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What the stored rows miss, over every VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gaps {
    /// Events sidecars dropped before they could be sent (their buffer was full).
    pub dropped: u64,
    /// Events the collector refused (invalid fields); acknowledged, not counted.
    pub rejected: u64,
    /// Events counted in the aggregates whose raw row was not kept (sampled under overload).
    pub sampled_out: u64,
}

pub fn gaps(conn: &Connection) -> Result<Gaps, StoreError> {
    let (dropped, rejected): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT sum(dropped_total), sum(rejected_total) FROM sidecars",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let sampled_out: Option<i64> = conn
        .query_row(
            "SELECT value FROM totals WHERE name = ?1",
            [SAMPLED_OUT],
            |row| row.get(0),
        )
        .optional()?;
    let count = |n: Option<i64>| n.unwrap_or(0).max(0) as u64;
    Ok(Gaps {
        dropped: count(dropped),
        rejected: count(rejected),
        sampled_out: count(sampled_out),
    })
}

/// The pod that owns an IP, from its sidecar's identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub pod_name: String,
    pub namespace: String,
    pub workload_name: String,
    pub last_seen_ns: u64,
}

/// A pod of the directory and the IPs it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryPod {
    pub pod: DirectoryEntry,
    pub ips: Vec<IpAddr>,
}

/// The pod-IP directory, newest pods first, at most `max_ips` IPs (the
/// in-memory directory's bound): every IP a sidecar announced
/// (`INSTANCE_IPS`), grouped by pod.
pub fn directory_pods(conn: &Connection, max_ips: usize) -> Result<Vec<DirectoryPod>, StoreError> {
    let mut statement = conn.prepare(
        "SELECT pods.id, pod_name, namespace, workload_name, last_seen_ns, ip
         FROM pods JOIN pod_ips ON pod_ips.pod_id = pods.id
         ORDER BY pods.id DESC LIMIT ?1",
    )?;
    let mut rows = statement.query([as_sql_int(max_ips as u64)])?;
    let mut pods: Vec<DirectoryPod> = Vec::new();
    let mut current_id = None;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let Ok(ip) = row.get::<_, String>(5)?.parse::<IpAddr>() else {
            continue;
        };
        match pods.last_mut() {
            Some(pod) if current_id == Some(id) => pod.ips.push(ip),
            _ => {
                current_id = Some(id);
                pods.push(DirectoryPod {
                    pod: directory_entry(row, 1)?,
                    ips: vec![ip],
                });
            }
        }
    }
    Ok(pods)
}

/// The owners of `ips` that the directory knows (one lookup per distinct
/// IP: a report page asks for its rows' addresses only).
pub fn directory_owners(
    conn: &Connection,
    ips: impl IntoIterator<Item = IpAddr>,
) -> Result<HashMap<IpAddr, DirectoryEntry>, StoreError> {
    let mut lookup = conn.prepare_cached(
        "SELECT pod_name, namespace, workload_name, last_seen_ns
         FROM pod_ips JOIN pods ON pods.id = pod_ips.pod_id
         WHERE ip = ?1",
    )?;
    let mut owners = HashMap::new();
    for ip in ips {
        if owners.contains_key(&ip) {
            continue;
        }
        let owner = lookup
            .query_row([ip.to_string()], |row| directory_entry(row, 0))
            .optional()?;
        if let Some(owner) = owner {
            owners.insert(ip, owner);
        }
    }
    Ok(owners)
}

/// A `DirectoryEntry` from the pod columns (name, namespace, workload,
/// last seen) starting at `first`.
fn directory_entry(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<DirectoryEntry> {
    let last: i64 = row.get(first + 3)?;
    Ok(DirectoryEntry {
        pod_name: row.get(first)?,
        namespace: row.get(first + 1)?,
        workload_name: row.get(first + 2)?,
        last_seen_ns: last.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database as a collector of schema `version` left it, empty.
    fn database_at_version(version: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(format!("v{version}.db"));
        let conn = Connection::open(&path).expect("create");
        for migration in &MIGRATIONS[..version] {
            conn.execute_batch(migration).expect("old migration");
        }
        conn.pragma_update(None, "user_version", version as i64)
            .expect("version");
        (dir, path)
    }

    #[test]
    fn rows_stored_before_causes_get_the_cause_their_row_supports() {
        let (_dir, path) = database_at_version(4);
        {
            let conn = Connection::open(&path).expect("open");
            let mut insert = conn
                .prepare(
                    "INSERT INTO aggregates (source_workload, source_namespace,
                        original_destination, upstream_host, cluster, verdict, count,
                        first_seen_ns, last_seen_ns) VALUES ('w', 'ns', ?1, '', ?2, ?3, 1, 1, 1)",
                )
                .expect("prepare");
            for (dialed, cluster, verdict) in [
                (
                    "10.0.0.1:5701",
                    "outbound|5701||app-ext.app.svc.cluster.local",
                    "misrouted",
                ),
                ("10.0.0.2:5701", "PassthroughCluster", "misrouted"),
                (
                    "10.0.0.3:443",
                    "outbound|443||api.example.com",
                    "redirected",
                ),
                (
                    "10.0.0.4:5701",
                    "outbound|5701||app.app.svc.cluster.local",
                    "blackholed",
                ),
                ("10.0.0.5:5701", "BlackHoleCluster", "blackholed"),
                ("10.0.0.6:5701", "outbound|5701||", "misrouted"),
            ] {
                insert
                    .execute(params![dialed, cluster, verdict])
                    .expect("insert");
            }
        }
        let conn = open_for_writing(&path).expect("migrate");
        let causes: Vec<(String, String)> = conn
            .prepare("SELECT original_destination, cause FROM aggregates ORDER BY 1")
            .expect("prepare")
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let labels: Vec<&str> = causes.iter().map(|(_, cause)| cause.as_str()).collect();
        // What the row alone supports; the rest needs the filter chain or
        // the sidecar's IPs, which rows do not keep.
        assert_eq!(
            labels,
            ["catch_all", "", "dns_redirection", "no_endpoints", "", ""],
            "{causes:?}"
        );
    }

    #[test]
    fn a_version_5_database_gains_the_inventory_and_keeps_its_sidecars() {
        let (_dir, path) = database_at_version(5);
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute(
                "INSERT INTO sidecars (node_id, vm_instance, pod_name, namespace, workload_name,
                    instance_ips, cluster_id, istio_version, filter_version, first_seen_ns,
                    last_seen_ns, dropped_total, committed_through)
                 VALUES ('node', 'vm', 'pod', 'ns', 'w', '10.0.0.1', 'K', '1.24', '0.1.0',
                    100, 200, 3, 9)",
                [],
            )
            .expect("a version-5 sidecar");
        }
        let mut conn = open_for_writing(&path).expect("migrate");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        // Migration 7: no gaps known, so everything at or below the old
        // mark still reads as stored.
        let (floor, gaps): (i64, String) = conn
            .query_row(
                "SELECT sequence_floor, sequence_gaps FROM sidecars",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("ledger columns");
        let mut ledger = Ledger::stored(9, floor as u64, &gaps);
        assert_eq!(ledger.admit(9), Admission::Duplicate);
        assert_eq!(ledger.admit(10), Admission::New);
        let vms = inventory(&conn, None, 10).expect("inventory");
        let (key, vm) = &vms[0];
        assert_eq!((&*key.node_id, &*key.vm_instance), ("node", "vm"));
        // A filter from before heartbeats: interval 0, nothing counted.
        assert_eq!(
            (&*vm.pod_name, vm.mode, vm.build, vm.heartbeat_interval_ms),
            ("pod", "unspecified", "unspecified", 0)
        );
        assert_eq!(
            (vm.first_heard_ns, vm.last_heard_ns, vm.dropped_total),
            (100, 200, 3)
        );
        assert_eq!(vm.connections, [0; 9]);
        // The old row's dedupe mark is untouched by saving the inventory.
        let mut saved = vm.clone();
        saved.connections[0] = 5;
        save_inventory(&mut conn, &[(key.clone(), saved)]).expect("save");
        let (through, matched): (i64, i64) = conn
            .query_row(
                "SELECT committed_through, conn_match FROM sidecars",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("row");
        assert_eq!((through, matched), (9, 5));
        let expected = std::collections::BTreeSet::from(["ns".to_string()]);
        record_coverage_config(&mut conn, &expected, Duration::from_secs(120)).expect("config");
        assert_eq!(
            coverage_config(&conn).expect("config"),
            (expected, Duration::from_secs(120))
        );
    }

    #[test]
    fn a_version_6_database_keeps_its_directory_once_per_pod() {
        let (_dir, path) = database_at_version(6);
        {
            let conn = Connection::open(&path).expect("open");
            let mut insert = conn
                .prepare(
                    "INSERT INTO directory (ip, pod_name, namespace, workload_name, node_id,
                        first_seen_ns, last_seen_ns) VALUES (?1, ?2, 'ns', 'w', ?3, ?4, ?5)",
                )
                .expect("prepare");
            // Pod a: three IPs, seen at different times; pod b: one.
            for (ip, pod, first, last) in [
                ("10.0.0.1", "a", 100, 300),
                ("10.0.0.2", "a", 50, 200),
                ("fd00::1", "a", 100, 400),
                ("10.0.0.9", "b", 10, 20),
            ] {
                insert
                    .execute(params![ip, pod, format!("node-{pod}"), first, last])
                    .expect("a version-6 directory row");
            }
        }
        let conn = open_for_writing(&path).expect("migrate");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let pods: Vec<(String, String, i64, i64)> = conn
            .prepare("SELECT pod_name, node_id, first_seen_ns, last_seen_ns FROM pods ORDER BY 1")
            .expect("prepare")
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("pods");
        assert_eq!(
            pods,
            [
                ("a".into(), "node-a".into(), 50, 400),
                ("b".into(), "node-b".into(), 10, 20)
            ]
        );
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        let owners = directory_owners(
            &conn,
            [
                ip("10.0.0.2"),
                ip("fd00::1"),
                ip("10.0.0.9"),
                ip("10.0.0.3"),
            ],
        )
        .expect("owners");
        assert_eq!(owners.len(), 3, "{owners:?}");
        assert_eq!(owners[&ip("fd00::1")].pod_name, "a");
        assert_eq!(owners[&ip("10.0.0.2")].last_seen_ns, 400);
        assert_eq!(owners[&ip("10.0.0.9")].pod_name, "b");
        let table: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'directory'",
                [],
                |row| row.get(0),
            )
            .optional()
            .expect("schema");
        assert_eq!(table, None, "the old table is gone");
        let loaded = directory_pods(&conn, 10).expect("load");
        assert_eq!(loaded.len(), 2);
        let a = loaded
            .iter()
            .find(|pod| pod.pod.pod_name == "a")
            .expect("pod a");
        let mut ips = a.ips.clone();
        ips.sort();
        assert_eq!(ips, [ip("10.0.0.1"), ip("10.0.0.2"), ip("fd00::1")]);
    }

    fn announcing(pod: &str, node: &str, ips: &[&str]) -> Arc<Hello> {
        Arc::new(Hello {
            node_id: node.into(),
            vm_instance: "vm".into(),
            pod_name: pod.into(),
            namespace: "ns".into(),
            workload_name: "w".into(),
            instance_ips: ips.iter().map(|ip| ip.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_pod_with_several_ips_is_stored_once_and_expires_with_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut conn = open_for_writing(&dir.path().join("d.db")).expect("open");
        let long_name = "p".repeat(4_000);
        let ips: Vec<String> = (0..200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
            .collect();
        let mut announced: Vec<&str> = ips.iter().map(String::as_str).collect();
        // Duplicates and garbage are not stored.
        announced.extend(["10.1.0.0", " 10.1.0.1 ", "not-an-ip"]);
        let pod = announcing(&long_name, "node-1", &announced);
        // Two VMs of the pod, at hello and at the end of their streams.
        record_seen(
            &mut conn,
            &[(Arc::clone(&pod), 100), (Arc::clone(&pod), 150), (pod, 200)],
        )
        .expect("seen");
        fn count(conn: &Connection, sql: &str) -> i64 {
            conn.query_row(sql, [], |row| row.get(0)).expect(sql)
        }
        assert_eq!(count(&conn, "SELECT count(*) FROM pods"), 1);
        assert_eq!(count(&conn, "SELECT count(*) FROM pod_ips"), 200);
        // The name is stored once, not once per IP.
        assert_eq!(
            count(&conn, "SELECT sum(length(pod_name)) FROM pods"),
            4_000
        );
        assert_eq!(count(&conn, "SELECT last_seen_ns FROM pods"), 200);

        // Another pod takes over one IP; a third announces nothing usable.
        record_seen(
            &mut conn,
            &[
                (announcing("q", "node-2", &["10.1.0.5"]), 1_000),
                (announcing("r", "node-3", &["bogus"]), 1_000),
            ],
        )
        .expect("seen");
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        let owners = directory_owners(&conn, [ip("10.1.0.5"), ip("10.1.0.6")]).expect("owners");
        assert_eq!(owners[&ip("10.1.0.5")].pod_name, "q");
        assert_eq!(owners[&ip("10.1.0.6")].pod_name, long_name);
        assert_eq!(count(&conn, "SELECT count(*) FROM pods"), 2);

        // Retention removes the old pod and its IPs, keeps the newer one.
        let mut done = Expired::default();
        while !expire_chunk(&mut conn, 500, &mut done).expect("expire") {}
        assert_eq!(done.pods, 1);
        assert_eq!(count(&conn, "SELECT count(*) FROM pods"), 1);
        assert_eq!(count(&conn, "SELECT count(*) FROM pod_ips"), 1);
        let loaded = directory_pods(&conn, 10).expect("load");
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (loaded[0].pod.pod_name.as_str(), loaded[0].ips.as_slice()),
            ("q", [ip("10.1.0.5")].as_slice())
        );
    }

    #[test]
    fn stored_addresses_read_as_socket_addr_displays_them() {
        let mut text = AddrText::default();
        assert_eq!(text.write(None), "");
        for addr in [
            "10.0.1.7:5701",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "192.168.100.9:80",
            "[::1]:15001",
            "[fd00:10:96::a]:5701",
            "[::ffff:10.0.0.1]:443",
        ] {
            let addr: SocketAddr = addr.parse().expect("test address");
            assert_eq!(text.write(Some(addr)), addr.to_string());
        }
    }

    /// A sampler whose current window began `ago` and was busy for `busy`.
    fn after_window(sampler: &mut Sampler, ago: Duration, busy: Duration) {
        sampler.window_started = Instant::now() - ago;
        sampler.window_busy = Duration::ZERO;
        sampler.record_busy(busy);
    }

    #[test]
    fn a_saturated_writer_samples_though_batches_wait_little() {
        let short_wait = Duration::from_millis(5);
        let mut sampler = Sampler::new(Duration::from_millis(250));
        // Mid-window nothing changes, however busy.
        after_window(
            &mut sampler,
            Duration::from_millis(100),
            Duration::from_millis(100),
        );
        sampler.adjust(short_wait);
        assert_eq!(sampler.keep_every, 1);
        // A window busy 95% of the time: saturated, rows are sampled.
        after_window(
            &mut sampler,
            Duration::from_secs(1),
            Duration::from_millis(950),
        );
        sampler.adjust(short_wait);
        assert_eq!(sampler.keep_every, 2);
        after_window(
            &mut sampler,
            Duration::from_secs(1),
            Duration::from_millis(900),
        );
        sampler.adjust(short_wait);
        assert_eq!(sampler.keep_every, 4);
        // Busy half the time with short waits: it catches up.
        after_window(
            &mut sampler,
            Duration::from_secs(1),
            Duration::from_millis(500),
        );
        sampler.adjust(short_wait);
        assert_eq!(sampler.keep_every, 2);
        // Not saturated, but batches wait longer than a quarter of the limit: hold.
        after_window(
            &mut sampler,
            Duration::from_secs(1),
            Duration::from_millis(500),
        );
        sampler.adjust(Duration::from_millis(100));
        assert_eq!(sampler.keep_every, 2);
    }

    #[test]
    fn slow_groups_in_a_row_sample_and_a_single_stall_does_not() {
        let mut sampler = Sampler::new(Duration::from_millis(250));
        let slow = Duration::from_millis(400);
        sampler.adjust(slow);
        sampler.adjust(Duration::from_millis(5));
        sampler.adjust(slow);
        assert_eq!(sampler.keep_every, 1, "one stall at a time is not overload");
        sampler.adjust(slow);
        sampler.adjust(slow);
        assert_eq!(sampler.keep_every, 2);
        for _ in 0..20 {
            sampler.adjust(slow);
        }
        assert_eq!(sampler.keep_every, MAX_KEEP_EVERY);
    }

    #[test]
    fn under_sampling_every_vm_keeps_its_first_rows_of_each_window() {
        let mut sampler = Sampler::new(Duration::from_millis(250));
        sampler.keep_every = MAX_KEEP_EVERY;
        // A flooding VM: its first FAIR_SHARE rows, then one in MAX_KEEP_EVERY.
        let flood: u64 = 10_000;
        let kept = (0..flood).filter(|_| sampler.keeps(1)).count() as u64;
        assert_eq!(kept, FAIR_SHARE + (flood - FAIR_SHARE) / MAX_KEEP_EVERY);
        // A quiet VM in the same window keeps every one of its few events,
        // whatever their sequence numbers.
        assert!((0..FAIR_SHARE).all(|_| sampler.keeps(2)));
        assert!(!sampler.keeps(2), "then it is sampled too");
        // A new window: each VM starts again.
        sampler.fair_window_started = Instant::now() - FAIR_WINDOW;
        assert!((0..FAIR_SHARE).all(|_| sampler.keeps(1)));
        // Not sampling: everything kept, nothing counted.
        sampler.keep_every = 1;
        sampler.seen.clear();
        assert!((0..1000).all(|_| sampler.keeps(3)));
        assert!(sampler.seen.is_empty());
    }
}
