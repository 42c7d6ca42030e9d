//! Nothing acknowledged is ever lost, also when the process dies: the real
//! `dialguard serve` binary, streamed to by several sidecar VMs at once, is
//! killed with SIGKILL (a crash, an OOM kill) or stopped with SIGTERM (a
//! rollout) under load, then started again on the same database while every
//! VM resends what it did not see acknowledged, as the filter does. Every
//! wait is bounded; the only processes signalled are the ones started here,
//! by their PID.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dialguard_proto::v1::{CollectorMessage, collector_message};
use tokio::task::JoinHandle;
use tonic::{Code, Status};

/// Sidecar VMs streaming at once, each on its own connection.
const VMS: usize = 8;
const BATCH_EVENTS: u64 = 20;
/// Batches a VM has in flight ahead of their acks.
const PIPELINE: usize = 4;
/// How long the VMs stream before the collector is stopped.
const LOAD: Duration = Duration::from_millis(1500);
/// Already acknowledged events each VM sends again after the restart.
const REPLAYED: u64 = 30;
/// New events each VM sends after the restart.
const MORE: u64 = 200;
/// Every start: the events carry 2023 timestamps, so no retention; a
/// short grace so that SIGTERM ends soon.
const SERVE_FLAGS: &[&str] = &["--retention", "off", "--shutdown-grace", "2s"];
/// How long SIGTERM may take, the grace included.
const TERM_BOUND: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------------------
// The collector process
// ---------------------------------------------------------------------------

/// `dialguard serve` with its log kept (for failure messages).
struct Collector {
    process: ServeProcess,
    log: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start(db: &Path) -> Self {
        let (process, stderr) = ServeProcess::start_with_args(db, SERVE_FLAGS);
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        // Ends when the process does (the pipe closes).
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().expect("log").push(line);
            }
        });
        Self { process, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Waits (bounded) for the process to exit on its own.
    fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < bound,
                "dialguard serve still running {bound:?} after SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// Sidecar VMs
// ---------------------------------------------------------------------------

/// What one VM has sent and seen acknowledged, readable while it streams.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    acked: AtomicU64,
}

fn vm_name(index: usize) -> String {
    format!("vm-{index}")
}

/// One VM streaming to the collector at `grpc`: batches of BATCH_EVENTS
/// misrouted events numbered from `first`, up to PIPELINE of them ahead of
/// their acks, through `last` (or forever). Returns once `last` is
/// acknowledged (`None`) or with the status that ended the stream.
async fn stream_vm(
    grpc: SocketAddr,
    vm: String,
    first: u64,
    last: Option<u64>,
    progress: Arc<Progress>,
) -> Option<Status> {
    let mut client = client(grpc).await;
    let mut stream = ReportStream::open(&mut client, NODE, &vm).await;
    let mut next = first;
    let mut in_flight = 0;
    let mut stream_acked = 0;
    loop {
        while in_flight < PIPELINE && last.is_none_or(|last| next <= last) {
            let end = last.unwrap_or(u64::MAX).min(next + BATCH_EVENTS - 1);
            if stream.tx.send(misrouted_batch(next..=end)).await.is_err() {
                break; // the call is over; its status follows
            }
            progress.sent.fetch_max(end, Ordering::SeqCst);
            next = end + 1;
            in_flight += 1;
        }
        if in_flight == 0 && last.is_some_and(|last| next > last) {
            return None;
        }
        let reply = tokio::time::timeout(WAIT, stream.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{vm}: neither an ack nor a status within {WAIT:?}"));
        let through = match reply {
            Ok(Some(CollectorMessage {
                kind: Some(collector_message::Kind::Ack(ack)),
            })) => ack.through_sequence,
            Ok(Some(other)) => panic!("{vm}: expected an ack, got {other:?}"),
            Ok(None) => return Some(Status::ok("the stream ended")),
            Err(status) => return Some(status),
        };
        // Acks are cumulative within a stream.
        assert!(
            through >= stream_acked && through < next,
            "{vm}: ack through {through} after one through {stream_acked}, with {} sent",
            next - 1
        );
        stream_acked = through;
        progress.acked.fetch_max(through, Ordering::SeqCst);
        in_flight -= 1;
    }
}

/// VMS VMs, each its own sidecar.
struct Fleet {
    progress: Vec<Arc<Progress>>,
}

impl Fleet {
    fn new() -> Self {
        Self {
            progress: (0..VMS).map(|_| Arc::default()).collect(),
        }
    }

    fn acked(&self, index: usize) -> u64 {
        self.progress[index].acked.load(Ordering::SeqCst)
    }

    fn sent(&self, index: usize) -> u64 {
        self.progress[index].sent.load(Ordering::SeqCst)
    }

    /// Every VM streams until its stream breaks.
    fn stream_until_broken(&self, grpc: SocketAddr) -> Vec<JoinHandle<Option<Status>>> {
        (0..VMS)
            .map(|index| {
                let progress = Arc::clone(&self.progress[index]);
                tokio::spawn(stream_vm(grpc, vm_name(index), 1, None, progress))
            })
            .collect()
    }

    /// Streams under load for LOAD, and until every VM has had acks.
    async fn load(&self) {
        tokio::time::sleep(LOAD).await;
        wait_until("every VM to get an ack", || {
            (0..VMS).all(|index| self.acked(index) > 0).then_some(())
        })
        .await;
    }

    /// The statuses that ended every VM's stream.
    async fn ended(streams: Vec<JoinHandle<Option<Status>>>) -> Vec<Status> {
        let mut statuses = Vec::new();
        for stream in streams {
            let status = bounded("a VM's stream to end", stream)
                .await
                .expect("a VM task panicked")
                .expect("an endless stream cannot finish");
            statuses.push(status);
        }
        statuses
    }

    /// After a restart at `grpc`: every VM reconnects and sends again from
    /// REPLAYED events before its last ack (so some were acknowledged
    /// already), through MORE events past the last it had sent.
    async fn resume(&self, grpc: SocketAddr) -> Vec<u64> {
        let lasts: Vec<u64> = (0..VMS).map(|index| self.sent(index) + MORE).collect();
        let streams: Vec<_> = (0..VMS)
            .map(|index| {
                let first = self.acked(index).saturating_sub(REPLAYED).max(1);
                let progress = Arc::clone(&self.progress[index]);
                tokio::spawn(stream_vm(
                    grpc,
                    vm_name(index),
                    first,
                    Some(lasts[index]),
                    progress,
                ))
            })
            .collect();
        for (index, stream) in streams.into_iter().enumerate() {
            let end = bounded("a VM to resend everything", stream)
                .await
                .expect("a VM task panicked");
            assert!(end.is_none(), "{}: stream ended: {end:?}", vm_name(index));
            assert_eq!(self.acked(index), lasts[index]);
        }
        lasts
    }
}

// ---------------------------------------------------------------------------
// The database after the fact
// ---------------------------------------------------------------------------

/// Every VM's acknowledged events are stored, each exactly once: the VM's
/// high-water mark n (`sidecars.committed_through`, what the collector
/// committed) lies between what it acknowledged and what was sent; the
/// aggregates count each of the events 1..=n of every VM once; and each
/// such event has its raw row, unless the writer sampled raw rows out under
/// overload (then the rows kept and the ones counted as sampled out add up).
/// Returns the events committed, over all VMs.
fn assert_acked_events_stored(db: &Path, fleet: &Fleet, log: &str) -> i64 {
    let sampled_out = count(
        db,
        "SELECT coalesce(sum(value), 0) FROM totals WHERE name = 'sampled_out_events'",
    );
    let mut committed = 0;
    for index in 0..VMS {
        let vm = vm_name(index);
        let n = count(
            db,
            &format!(
                "SELECT coalesce(max(committed_through), 0) FROM sidecars WHERE vm_instance = '{vm}'"
            ),
        );
        let (acked, sent) = (fleet.acked(index) as i64, fleet.sent(index) as i64);
        assert!(
            acked <= n && n <= sent,
            "{vm}: committed through {n}, {acked} acknowledged, {sent} sent; collector log:\n{log}"
        );
        let stored = stored_sequences(db, &vm);
        if sampled_out == 0 {
            assert!(
                stored.iter().copied().eq(1..=n),
                "{vm}: the raw rows are not 1..={n} each once: {stored:?}"
            );
        } else {
            assert!(
                stored.windows(2).all(|pair| pair[0] < pair[1])
                    && stored.iter().all(|sequence| (1..=n).contains(sequence)),
                "{vm}: raw rows outside 1..={n} or twice: {stored:?}"
            );
        }
        committed += n;
    }
    assert_eq!(
        count(db, "SELECT coalesce(sum(count), 0) FROM aggregates"),
        committed,
        "the aggregates do not count each committed event once"
    );
    assert_eq!(
        stored_events(db) + sampled_out,
        committed,
        "raw rows and rows sampled out do not add up to the events committed"
    );
    committed
}

/// Starts the collector again on `db`: every VM resends, and then each has
/// exactly its events stored, once.
async fn restart_and_resend(db: &Path, fleet: &Fleet) {
    let collector = Collector::start(db);
    let lasts = fleet.resume(collector.process.grpc).await;
    let committed = assert_acked_events_stored(db, fleet, &collector.log());
    assert_eq!(committed, lasts.iter().sum::<u64>() as i64);
    assert_eq!(misrouted_aggregate(db), committed);
    assert_eq!(count(db, "SELECT count(*) FROM sidecars"), VMS as i64);
    drop(collector);
}

/// The collector on `db`, with every VM streaming to it for LOAD.
async fn under_load(db: &Path) -> (Collector, Fleet, Vec<JoinHandle<Option<Status>>>) {
    let collector = Collector::start(db);
    let fleet = Fleet::new();
    let streams = fleet.stream_until_broken(collector.process.grpc);
    fleet.load().await;
    (collector, fleet, streams)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let (_dir, db) = temp_db();
    let (mut collector, fleet, streams) = under_load(&db).await;

    // SIGKILL, by its PID, while batches are in flight and being committed.
    collector
        .process
        .child
        .kill()
        .expect("SIGKILL dialguard serve");
    let status = collector.process.child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status:?}"
    );
    let statuses = Fleet::ended(streams).await;
    assert!(
        statuses.iter().all(|status| status.code() != Code::Ok),
        "a stream ended cleanly: {statuses:?}"
    );

    assert_acked_events_stored(&db, &fleet, &collector.log());
    drop(collector);

    restart_and_resend(&db, &fleet).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_0_and_loses_nothing_acknowledged() {
    let (_dir, db) = temp_db();
    let (mut collector, fleet, streams) = under_load(&db).await;

    let sent = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &collector.process.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM failed: {kill:?}");
    let status = collector.wait_exit(TERM_BOUND);
    let took = sent.elapsed();
    assert!(
        status.success(),
        "dialguard serve exited with {status:?} on SIGTERM; its log:\n{}",
        collector.log()
    );
    // Open streams are told the collector is going away.
    let statuses = Fleet::ended(streams).await;
    assert!(
        statuses
            .iter()
            .all(|status| status.code() == Code::Unavailable),
        "SIGTERM took {took:?}: {statuses:?}"
    );

    assert_acked_events_stored(&db, &fleet, &collector.log());
    // A graceful stop acknowledges every batch it committed.
    for index in 0..VMS {
        let vm = vm_name(index);
        let committed = count(
            &db,
            &format!("SELECT committed_through FROM sidecars WHERE vm_instance = '{vm}'"),
        );
        assert_eq!(
            committed,
            fleet.acked(index) as i64,
            "{vm}: committed through {committed} but acknowledged through {}",
            fleet.acked(index)
        );
    }
    drop(collector);

    restart_and_resend(&db, &fleet).await;
}
