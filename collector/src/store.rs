//! Durable storage in SQLite (WAL). One writer thread owns the write
//! connection and commits whatever batches are waiting in one transaction
//! (group commit); each batch's sender learns only after the commit, so an
//! acknowledgement always means "on disk". Readers open their own connections.

use std::path::{Path, PathBuf};
use std::thread;

use dialguard_proto::v1::Hello;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::event::ValidEvent;

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
];

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
    pub sidecar: std::sync::Arc<Hello>,
    pub events: Vec<ValidEvent>,
    pub dropped_total: u64,
    pub received_ns: u64,
}

/// What a commit did: the events stored for the first time (duplicates are
/// left out, so alerts fire once).
#[derive(Debug, Default)]
pub struct Committed {
    pub new_events: Vec<ValidEvent>,
}

struct WriteRequest {
    batch: Batch,
    reply: oneshot::Sender<Result<Committed, String>>,
}

/// The handle that ingest uses to commit batches.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<WriteRequest>,
}

impl std::fmt::Debug for WriteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRequest").finish_non_exhaustive()
    }
}

/// Most batches committed in one transaction.
const GROUP_COMMIT_MAX: usize = 256;

impl Writer {
    /// Starts the writer thread on an opened connection. The thread ends once
    /// every `Writer` clone is dropped and the queue is drained.
    pub fn start(conn: Connection) -> (Self, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let handle = thread::Builder::new()
            .name("dialguard-store".into())
            .spawn(move || writer_loop(conn, rx))
            .unwrap_or_else(|err| {
                // Without a writer thread nothing can be stored: fail loudly at startup.
                tracing::error!("cannot start the store writer thread: {err}");
                std::process::exit(70)
            });
        (Self { tx }, handle)
    }

    /// Commits the batch; returns after it is durable.
    pub async fn commit(&self, batch: Batch) -> Result<Committed, StoreError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(WriteRequest { batch, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        match done.await {
            Ok(Ok(committed)) => Ok(committed),
            Ok(Err(message)) => Err(StoreError::Commit(message)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteRequest>) {
    let mut pending = Vec::with_capacity(GROUP_COMMIT_MAX);
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        while pending.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(request) => pending.push(request),
                Err(_) => break,
            }
        }
        let result = commit_group(&mut conn, pending.iter().map(|r| &r.batch));
        match result {
            Ok(committed) => {
                for (request, committed) in pending.drain(..).zip(committed) {
                    let _ = request.reply.send(Ok(committed));
                }
            }
            Err(err) => {
                tracing::error!("commit failed: {err}");
                for request in pending.drain(..) {
                    let _ = request.reply.send(Err(err.to_string()));
                }
            }
        }
    }
}

fn commit_group<'a>(
    conn: &mut Connection,
    batches: impl Iterator<Item = &'a Batch>,
) -> Result<Vec<Committed>, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut results = Vec::new();
    {
        let mut upsert_sidecar = tx.prepare_cached(
            "INSERT INTO sidecars (node_id, vm_instance, pod_name, namespace, workload_name,
                instance_ips, cluster_id, istio_version, filter_version, first_seen_ns,
                last_seen_ns, dropped_total)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)
             ON CONFLICT (node_id, vm_instance) DO UPDATE SET
                last_seen_ns = max(last_seen_ns, excluded.last_seen_ns),
                dropped_total = max(dropped_total, excluded.dropped_total)
             RETURNING id",
        )?;
        let mut insert_event = tx.prepare_cached(
            "INSERT OR IGNORE INTO events (sidecar_id, sequence, timestamp_ns,
                original_destination, upstream_host, source, connection_id, cluster,
                filter_chain, verdict, response_flags, failure_reason, intended_service,
                upstream_workload, enforced)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        let mut upsert_aggregate = tx.prepare_cached(
            "INSERT INTO aggregates (source_workload, source_namespace, original_destination,
                upstream_host, cluster, verdict, count, first_seen_ns, last_seen_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7)
             ON CONFLICT DO UPDATE SET
                count = count + 1,
                first_seen_ns = min(first_seen_ns, excluded.first_seen_ns),
                last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)",
        )?;
        for batch in batches {
            let s = &batch.sidecar;
            let sidecar_id: i64 = upsert_sidecar.query_row(
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
                ],
                |row| row.get(0),
            )?;
            let mut committed = Committed::default();
            for event in &batch.events {
                let raw = &event.raw;
                let upstream = event
                    .upstream_host
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let inserted = insert_event.execute(params![
                    sidecar_id,
                    as_sql_int(raw.sequence),
                    as_sql_int(raw.timestamp_unix_nanos),
                    event.original_destination.to_string(),
                    upstream,
                    event.source.map(|a| a.to_string()).unwrap_or_default(),
                    as_sql_int(raw.connection_id),
                    raw.cluster_name,
                    raw.filter_chain_name,
                    event.verdict.label(),
                    as_sql_int(raw.response_flags),
                    raw.upstream_transport_failure_reason,
                    raw.intended_service,
                    raw.upstream_workload,
                    raw.enforced,
                ])?;
                if inserted == 0 {
                    continue; // a resend of an event stored before
                }
                upsert_aggregate.execute(params![
                    s.workload_name,
                    s.namespace,
                    event.original_destination.to_string(),
                    upstream,
                    raw.cluster_name,
                    event.verdict.label(),
                    as_sql_int(raw.timestamp_unix_nanos),
                ])?;
                committed.new_events.push(event.clone());
            }
            results.push(committed);
        }
    }
    tx.commit()?;
    Ok(results)
}

/// SQLite integers are signed 64-bit; values past i64::MAX are clamped.
fn as_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Events the sidecars dropped before they could be sent (buffer full), summed over every VM.
pub fn total_dropped(conn: &Connection) -> Result<u64, StoreError> {
    let total: Option<i64> = conn
        .query_row("SELECT sum(dropped_total) FROM sidecars", [], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    Ok(total.unwrap_or(0).max(0) as u64)
}
