//! The collector scale benchmark, `cargo xtask bench collector` (issue 3,
//! "Scale, measured"): the real `dialguard serve` from `dist/` as a child
//! process on loopback, so its CPU and memory are its own, fed by the load
//! generator of this process ([`crate::load`]).
//!
//! Three measurements:
//!
//! 1. ingest: for each case (1, 100, 2,000 streams), a fresh collector and
//!    database; every stream opened and its `Hello` processed before the
//!    clock starts; then acknowledged events per second from the first
//!    batch sent to the last acknowledgement, and the collector's CPU time
//!    over that window per event (`/proc/PID/task/*/schedstat`, see
//!    [`crate::proc_stat`]). Afterwards the database must hold exactly the
//!    acknowledged events and stdout one alert line per misrouted one.
//! 2. idle memory: `VmRSS` of a fresh collector with N streams open, each
//!    on its own connection, `Hello` sent and processed, nothing else.
//! 3. report time: a database filled through the real ingest (2,000 VMs
//!    over 200 workloads, in waves of a few streams; at full speed the
//!    writer samples raw rows, which the report, made from the aggregates,
//!    does not read), then the median of several
//!    `dialguard report --format json` runs (process start included) and
//!    `GET /api/v1/report`, both while the collector serves the database.
//!
//! 5. report memory: a database of N distinct report rows (1,000,000 in
//!    the full run), filled through the real ingest with every event
//!    dialing an address of its own; the collector restarted on it; then
//!    its peak RSS (`VmHWM`, reset before each) across one default
//!    `GET /api/v1/report` (a page of 1,000 rows), two at once and one of
//!    `?limit=10000`, and their times, the next page's, a filtered page's
//!    and `dialguard report --format json`'s.
//!
//! 4. heartbeats: N VMs (40,000 in the full run: 20,000 sidecars with 2
//!    workers), each on its own connection, heartbeating as the filter
//!    does ([`crate::heartbeat`]) at the default interval and at one ten
//!    times faster, with an ingest case running alongside: the collector's
//!    RSS, its CPU per heartbeat, and the events per second beside them.
//!
//! Checks use only the collector's public surface: the report JSON (the
//! rows' counts add up to the acknowledged events) and the number of rows
//! in its `events` table (plus `sampledOutEvents`, the raw rows an
//! overloaded collector skips while its aggregates stay exact).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use dialguard_tests::process::{ChildGuard, piped, tee_lines};
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::load::{self, Driven, Pace};
use crate::proc_stat::{process_cpu, reset_peak_rss, status_kib};
use crate::run::thousands;
use crate::workload::{VMS_PER_SIDECAR, Vm};

/// The filter's defaults: `maxBatchEvents` and `maxBufferedEvents`.
pub const FILTER_BATCH_EVENTS: u64 = 500;
pub const FILTER_BUFFERED_EVENTS: u64 = 10_000;

/// One ingest case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestCase {
    pub streams: usize,
    pub events_per_stream: u64,
    pub batch_events: u64,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub ingest: Vec<IngestCase>,
    /// Most unacknowledged events per stream.
    pub max_in_flight: u64,
    /// Idle stream counts whose memory is measured.
    pub idle: Vec<usize>,
    /// Stored event counts at which the report is timed, ascending.
    pub report_sizes: Vec<u64>,
    /// Report runs per size (the median is reported).
    pub report_runs: usize,
    /// Distinct report rows at which the report's memory is measured.
    pub report_keys: Vec<u64>,
    /// Bound on each ingest case.
    pub timeout: Duration,
    /// Keep the databases here instead of a temporary directory.
    pub keep: Option<PathBuf>,
    pub progress: bool,
    /// The heartbeat measurement, if any.
    pub heartbeats: Option<HeartbeatCase>,
}

/// VMs heartbeating at each interval in turn (one collector, connections
/// opened once), each for its window, with `alongside` ingesting meanwhile.
#[derive(Debug, Clone)]
pub struct HeartbeatCase {
    pub vms: usize,
    /// Connections they share (one each when equal to `vms`; each is a
    /// socket in both processes, so the open-files limit bounds it).
    pub connections: usize,
    /// (interval, window) pairs.
    pub intervals: Vec<(Duration, Duration)>,
    pub alongside: Option<IngestCase>,
}

impl Options {
    /// The full benchmark: about 10 million events through ingest, 10,000
    /// idle streams, a 10-million-event database.
    pub fn full() -> Self {
        let case = |streams, events_per_stream, batch_events| IngestCase {
            streams,
            events_per_stream,
            batch_events,
        };
        Self {
            ingest: vec![
                case(1, 2_000_000, FILTER_BATCH_EVENTS),
                case(100, 20_000, FILTER_BATCH_EVENTS),
                case(2_000, 2_500, FILTER_BATCH_EVENTS),
                // What a 200 ms flush carries at 100 events/s per VM.
                case(2_000, 500, 20),
            ],
            max_in_flight: FILTER_BUFFERED_EVENTS,
            idle: vec![2_000, 10_000],
            report_sizes: vec![1_000_000, 10_000_000],
            report_runs: 5,
            report_keys: vec![1_000_000],
            timeout: Duration::from_secs(300),
            keep: None,
            progress: true,
            heartbeats: Some(HeartbeatCase {
                vms: 40_000,
                connections: 40_000,
                intervals: vec![
                    (Duration::from_secs(60), Duration::from_secs(60)),
                    (Duration::from_secs(6), Duration::from_secs(30)),
                ],
                alongside: Some(case(100, 20_000, FILTER_BATCH_EVENTS)),
            }),
        }
    }

    /// A few thousand events over two streams, a few idle streams, a small
    /// database: checks that everything works, in seconds.
    pub fn quick() -> Self {
        Self {
            ingest: vec![IngestCase {
                streams: 2,
                events_per_stream: 2_000,
                batch_events: FILTER_BATCH_EVENTS,
            }],
            max_in_flight: 1_000,
            idle: vec![20],
            report_sizes: vec![10_000],
            report_runs: 3,
            report_keys: vec![20_000],
            timeout: Duration::from_secs(60),
            keep: None,
            progress: true,
            heartbeats: Some(HeartbeatCase {
                vms: 200,
                connections: 200,
                intervals: vec![(Duration::from_secs(1), Duration::from_secs(3))],
                alongside: Some(IngestCase {
                    streams: 2,
                    events_per_stream: 2_000,
                    batch_events: FILTER_BATCH_EVENTS,
                }),
            }),
        }
    }
}

/// The collector binary under test.
#[derive(Debug, Clone)]
pub struct Parts {
    pub collector: PathBuf,
}

impl Parts {
    /// `dist/dialguard` (or `$DIALGUARD_DIST/dialguard`).
    pub fn from_dist() -> anyhow::Result<Self> {
        Ok(Self {
            collector: dialguard_tests::dist::Dist::locate()?.dialguard,
        })
    }
}

#[derive(Debug, Clone)]
pub struct IngestResult {
    pub case: IngestCase,
    pub driven: Driven,
    /// Collector CPU over the window (first batch to last acknowledgement).
    pub collector_cpu: Duration,
    /// This process's CPU (the load generator) over the same window.
    pub generator_cpu: Duration,
    /// `VmHWM`: the collector's peak resident size, KiB.
    pub collector_peak_kib: u64,
    /// Rows in the `events` table afterwards.
    pub raw_rows: u64,
    /// The report's `sampledOutEvents`: counted, raw row not kept.
    pub sampled_out: u64,
    /// The report's rows' counts added up.
    pub counted: u64,
    /// Alert lines the collector printed (rate-limited per key).
    pub alerts: u64,
}

impl IngestResult {
    /// Whether the database holds exactly the acknowledged events: each
    /// counted once in the report, each with its raw row or counted as
    /// sampled out.
    pub fn consistent(&self) -> bool {
        self.counted == self.driven.acked && self.raw_rows + self.sampled_out == self.driven.acked
    }

    pub fn cpu_us_per_event(&self) -> f64 {
        per_event_us(self.collector_cpu, self.driven.acked)
    }

    pub fn generator_us_per_event(&self) -> f64 {
        per_event_us(self.generator_cpu, self.driven.acked)
    }

    /// Collector CPU over the window as a share of one core.
    pub fn collector_cores(&self) -> f64 {
        cores(self.collector_cpu, self.driven.elapsed)
    }
}

fn per_event_us(cpu: Duration, events: u64) -> f64 {
    match events {
        0 => 0.0,
        n => cpu.as_secs_f64() * 1e6 / n as f64,
    }
}

fn cores(cpu: Duration, wall: Duration) -> f64 {
    match wall.as_secs_f64() {
        secs if secs > 0.0 => cpu.as_secs_f64() / secs,
        _ => 0.0,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct IdleResult {
    pub streams: usize,
    /// `VmRSS` of the collector after startup, before any stream, KiB.
    pub baseline_kib: u64,
    /// `VmRSS` with the streams open, KiB.
    pub rss_kib: u64,
    /// How long opening the streams took.
    pub open: Duration,
}

impl IdleResult {
    pub fn per_stream_kib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.baseline_kib) as f64 / self.streams.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct ReportResult {
    /// Events acknowledged into the database so far.
    pub events: u64,
    /// The report's rows' counts added up, and its `sampledOutEvents`.
    pub counted: u64,
    pub sampled_out: u64,
    pub rows: u64,
    pub json_bytes: u64,
    pub db_bytes: u64,
    /// `dialguard report --format json`, each run.
    pub cli: Vec<Duration>,
    /// `GET /api/v1/report`, each run.
    pub http: Vec<Duration>,
    /// Filling up to `events` through ingest: events added and time.
    pub filled: u64,
    pub fill_time: Duration,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub options: Options,
    pub ingest: Vec<IngestResult>,
    pub idle: Vec<IdleResult>,
    pub reports: Vec<ReportResult>,
    pub report_memory: Vec<ReportMemoryResult>,
    pub heartbeats: Vec<HeartbeatResult>,
}

/// The report's memory over a database of distinct rows.
#[derive(Debug, Clone)]
pub struct ReportMemoryResult {
    /// Distinct report rows stored (acknowledged events, one row each).
    pub keys: u64,
    /// The default page: its `totalRows`, its rows, `truncated`, JSON size.
    pub total_rows: u64,
    pub page_rows: u64,
    pub truncated: bool,
    pub json_bytes: u64,
    pub db_bytes: u64,
    pub fill_time: Duration,
    /// The collector restarted on the database: `VmRSS` once started.
    pub baseline_kib: u64,
    /// `VmHWM` across one default `GET /api/v1/report`, two at once, and
    /// one `?limit=10000`.
    pub one_peak_kib: u64,
    pub two_peak_kib: u64,
    pub max_limit_peak_kib: u64,
    /// Whether `VmHWM` was reset before each (else each is the peak so far).
    pub peaks_reset: bool,
    pub one: Duration,
    /// The slower of the two at once.
    pub two: Duration,
    pub max_limit: Duration,
    /// The second page (`?cursor=`), and a page of one source namespace.
    pub next_page: Duration,
    pub filtered: Duration,
    /// `dialguard report --format json` on the database (process start included).
    pub cli: Duration,
}
/// One interval of the heartbeat measurement.
#[derive(Debug, Clone)]
pub struct HeartbeatResult {
    pub vms: usize,
    pub connections: usize,
    pub interval: Duration,
    pub beaten: crate::heartbeat::Beaten,
    /// Collector CPU over the window's first quarter (heartbeats alone),
    /// and the heartbeats completed in it.
    pub collector_cpu: Duration,
    pub beats_measured: u64,
    /// Collector VmRSS at the end of the window, and its peak so far.
    pub rss_kib: u64,
    pub peak_kib: u64,
    /// The ingest case run alongside.
    pub alongside: Option<Driven>,
    /// `dialguard_heartbeats_total` on the collector's /metrics after the window, if it has it.
    pub heartbeats_counted: Option<u64>,
}

impl HeartbeatResult {
    pub fn cpu_us_per_heartbeat(&self) -> f64 {
        self.collector_cpu.as_secs_f64() * 1e6 / self.beats_measured.max(1) as f64
    }
}

/// Runs the benchmark.
pub fn run(parts: &Parts, options: &Options) -> anyhow::Result<Results> {
    let most_connections = options
        .idle
        .iter()
        .copied()
        .chain(
            options
                .heartbeats
                .as_ref()
                .map(|h| h.connections.min(h.vms) + h.alongside.map_or(0, |a| a.streams)),
        )
        .max()
        .unwrap_or(0);
    raise_open_files(most_connections)?;
    let temporary = tempfile::Builder::new()
        .prefix("dialguard-bench-collector")
        .tempdir()?;
    let dir = match &options.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.canonicalize()?
        }
        None => temporary.path().to_owned(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bench = Bench {
        parts,
        options,
        dir,
        runtime,
        started: Instant::now(),
    };
    let mut results = Results {
        options: options.clone(),
        ingest: Vec::new(),
        idle: Vec::new(),
        reports: Vec::new(),
        report_memory: Vec::new(),
        heartbeats: Vec::new(),
    };
    for case in &options.ingest {
        let result = bench
            .ingest(*case)
            .with_context(|| format!("ingest with {} streams", case.streams))?;
        results.ingest.push(result);
    }
    for &streams in &options.idle {
        let result = bench
            .idle(streams)
            .with_context(|| format!("{streams} idle streams"))?;
        results.idle.push(result);
    }
    results.reports = bench.reports().context("report time")?;
    for &keys in &options.report_keys {
        let result = bench
            .report_memory(keys)
            .with_context(|| format!("report memory over {keys} rows"))?;
        results.report_memory.push(result);
    }
    if let Some(case) = &options.heartbeats {
        results.heartbeats = bench.heartbeats(case).context("heartbeats")?;
    }
    Ok(results)
}

/// Every stream is a socket in both processes: the soft limit on open
/// files goes up to the hard one (the collector inherits it), and as root
/// the hard one too when it is lower.
fn raise_open_files(streams: usize) -> anyhow::Result<()> {
    let needed = streams as u64 + 1_000;
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    if hard < needed {
        // Only root may raise the hard limit; otherwise the check below says so.
        let _ = rlimit::Resource::NOFILE.set(needed, needed);
    }
    let limit = rlimit::increase_nofile_limit(needed).context("raising RLIMIT_NOFILE")?;
    ensure!(
        limit >= needed,
        "{streams} streams need {needed} open files, the hard limit allows {limit} (ulimit -Hn)"
    );
    Ok(())
}

struct Bench<'a> {
    parts: &'a Parts,
    options: &'a Options,
    dir: PathBuf,
    runtime: Runtime,
    started: Instant,
}

impl Bench<'_> {
    fn progress(&self, message: &str) {
        if self.options.progress {
            eprintln!(
                "[{:6.1} s] collector bench: {message}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn fresh_db(&self, name: &str) -> anyhow::Result<PathBuf> {
        let db = self.dir.join(name);
        for suffix in ["", "-wal", "-shm"] {
            let path = PathBuf::from(format!("{}{suffix}", db.display()));
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(db)
    }

    /// Simulated VMs; `run` makes their `vm_instance` unique per case.
    fn vms(streams: usize, run: u64) -> Vec<Vm> {
        let sidecars = streams.div_ceil(VMS_PER_SIDECAR);
        (0..streams).map(|i| Vm::new(i, sidecars, run)).collect()
    }

    fn ingest(&self, case: IngestCase) -> anyhow::Result<IngestResult> {
        self.progress(&format!(
            "ingest: {} streams x {} events, batches of {}",
            case.streams,
            thousands(case.events_per_stream),
            case.batch_events
        ));
        let db = self.fresh_db(&format!("ingest-{}x{}.db", case.streams, case.batch_events))?;
        let mut collector = CollectorProcess::start(&self.parts.collector, &db)?;
        let streams = self
            .runtime
            .block_on(load::open(collector.grpc, Self::vms(case.streams, 1)))?;
        collector.wait_connected(case.streams, Duration::from_secs(60))?;
        let pace = Pace {
            events_per_stream: case.events_per_stream,
            batch_events: case.batch_events,
            max_in_flight: self.options.max_in_flight,
            timeout: self.options.timeout,
        };
        let (start, started) = watch::channel(false);
        let driving = self.runtime.spawn(load::drive(streams, pace, started));
        let pid = collector.pid();
        let collector_before = process_cpu(pid)?;
        let generator_before = process_cpu(std::process::id())?;
        start.send(true)?;
        let driven = self.runtime.block_on(driving)?;
        let collector_cpu = process_cpu(pid)?.saturating_sub(collector_before);
        let generator_cpu = process_cpu(std::process::id())?.saturating_sub(generator_before);
        let driven = driven.map_err(|err| anyhow::anyhow!("{err:#}; {}", collector.log_tail()))?;
        let collector_peak_kib = status_kib(pid, "VmHWM")?;
        let report = collector.report_all()?;
        let alerts = collector.stop()?;
        let result = IngestResult {
            case,
            driven,
            collector_cpu,
            generator_cpu,
            collector_peak_kib,
            raw_rows: raw_rows(&db)?,
            sampled_out: report.sampled_out,
            counted: report.counted,
            alerts,
        };
        self.progress(&format!(
            "  {} acked in {:.2} s: {} events/s, collector {:.2} us/event",
            thousands(result.driven.acked),
            result.driven.elapsed.as_secs_f64(),
            thousands(result.driven.events_per_second().round() as u64),
            result.cpu_us_per_event()
        ));
        Ok(result)
    }

    fn idle(&self, count: usize) -> anyhow::Result<IdleResult> {
        self.progress(&format!("idle: {} streams", thousands(count as u64)));
        let db = self.fresh_db(&format!("idle-{count}.db"))?;
        let mut collector = CollectorProcess::start(&self.parts.collector, &db)?;
        std::thread::sleep(Duration::from_millis(500));
        let baseline_kib = status_kib(collector.pid(), "VmRSS")?;
        let opening = Instant::now();
        let streams = self
            .runtime
            .block_on(load::open(collector.grpc, Self::vms(count, 2)))?;
        collector.wait_connected(count, Duration::from_secs(120))?;
        let open = opening.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let rss_kib = status_kib(collector.pid(), "VmRSS")?;
        collector.process.check_running()?;
        self.runtime.block_on(async move { drop(streams) });
        collector.stop()?;
        let result = IdleResult {
            streams: count,
            baseline_kib,
            rss_kib,
            open,
        };
        self.progress(&format!(
            "  VmRSS {} KiB ({:.1} KiB per stream)",
            thousands(rss_kib),
            result.per_stream_kib()
        ));
        Ok(result)
    }

    fn heartbeats(&self, case: &HeartbeatCase) -> anyhow::Result<Vec<HeartbeatResult>> {
        self.progress(&format!(
            "heartbeats: {} VMs over {} connections",
            thousands(case.vms as u64),
            thousands(case.connections.min(case.vms) as u64)
        ));
        let db = self.fresh_db("heartbeats.db")?;
        let collector = CollectorProcess::start(&self.parts.collector, &db)?;
        let opening = Instant::now();
        let connected = self.runtime.block_on(crate::heartbeat::connect(
            collector.grpc,
            Self::vms(case.vms, 7),
            case.connections,
        ))?;
        self.progress(&format!(
            "  connected in {:.1} s",
            opening.elapsed().as_secs_f64()
        ));
        let pid = collector.pid();
        let mut results = Vec::new();
        for (round, &(interval, window)) in case.intervals.iter().enumerate() {
            self.progress(&format!(
                "  every {} s for {} s{}",
                interval.as_secs_f64(),
                window.as_secs_f64(),
                case.alongside.map_or(String::new(), |a| format!(
                    ", {} streams x {} events alongside",
                    a.streams,
                    thousands(a.events_per_stream)
                ))
            ));
            let alongside = match case.alongside {
                Some(a) => {
                    let streams = self.runtime.block_on(load::open(
                        collector.grpc,
                        Self::vms(a.streams, 100 + round as u64),
                    ))?;
                    let pace = Pace {
                        events_per_stream: a.events_per_stream,
                        batch_events: a.batch_events,
                        max_in_flight: self.options.max_in_flight,
                        timeout: self.options.timeout,
                    };
                    Some((streams, pace))
                }
                None => None,
            };
            // The collector's CPU per heartbeat is read over the window's
            // first quarter, heartbeats alone; then the ingest case starts
            // and runs alongside.
            let tally = Arc::new(crate::heartbeat::Tally::default());
            let cpu_before = process_cpu(pid)?;
            let (beaten, driven, quarter) = self.runtime.block_on(async {
                let (start, started) = watch::channel(false);
                let driving = alongside
                    .map(|(streams, pace)| tokio::spawn(load::drive(streams, pace, started)));
                let counted = Arc::clone(&tally);
                let starter = tokio::spawn(async move {
                    tokio::time::sleep(window / 4).await;
                    let cpu = process_cpu(pid);
                    let beats = counted.ok.load(Ordering::Relaxed);
                    let _ = start.send(true);
                    cpu.map(|cpu| (cpu, beats))
                });
                let beaten = crate::heartbeat::beat(
                    &connected,
                    interval,
                    window,
                    round as u64 + 1,
                    Arc::clone(&tally),
                )
                .await;
                let quarter = starter.await??;
                let driven = match driving {
                    Some(task) => Some(task.await??),
                    None => None,
                };
                anyhow::Ok((beaten, driven, quarter))
            })?;
            let (cpu_at_quarter, beats_at_quarter) = quarter;
            let collector_cpu = cpu_at_quarter.saturating_sub(cpu_before);
            let result = HeartbeatResult {
                vms: case.vms,
                connections: case.connections.min(case.vms),
                interval,
                beaten,
                collector_cpu,
                beats_measured: beats_at_quarter,
                rss_kib: status_kib(pid, "VmRSS")?,
                peak_kib: status_kib(pid, "VmHWM")?,
                alongside: driven,
                heartbeats_counted: collector.metric("dialguard_heartbeats_total"),
            };
            self.progress(&format!(
                "  {} heartbeats ({:.0}/s, {} failed), collector {:.1} us each, RSS {} MiB (peak {} MiB){}",
                thousands(result.beaten.ok),
                result.beaten.per_second(),
                result.beaten.failed,
                result.cpu_us_per_heartbeat(),
                mib(result.rss_kib),
                mib(result.peak_kib),
                result.alongside.map_or(String::new(), |d| format!(
                    "; alongside {} events/s",
                    thousands(d.events_per_second().round() as u64)
                ))
            ));
            results.push(result);
        }
        self.runtime.block_on(async move { drop(connected) });
        collector.stop()?;
        Ok(results)
    }

    fn reports(&self) -> anyhow::Result<Vec<ReportResult>> {
        if self.options.report_sizes.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.fresh_db("report.db")?;
        let mut collector = CollectorProcess::start(&self.parts.collector, &db)?;
        let mut stored = 0u64;
        let mut results = Vec::new();
        for (stage, &size) in self.options.report_sizes.iter().enumerate() {
            self.progress(&format!(
                "report: filling to {} events through ingest",
                thousands(size)
            ));
            let started = Instant::now();
            let filled = self.fill(&mut collector, size.saturating_sub(stored), stage as u64)?;
            let fill_time = started.elapsed();
            stored += filled;
            let result = self.time_report(&collector, stored, filled, fill_time)?;
            self.progress(&format!(
                "  {} rows; report --format json median {:.0} ms, GET /api/v1/report median {:.0} ms",
                thousands(result.rows),
                median(&result.cli).as_secs_f64() * 1e3,
                median(&result.http).as_secs_f64() * 1e3
            ));
            results.push(result);
        }
        collector.stop()?;
        Ok(results)
    }

    /// Sends `events` more events through `collector`'s ingest: up to 2,000
    /// VMs with an equal share each, `FILL_WAVE` streams at a time; `stage`
    /// gives each fill its own `vm_instance`s (as if the Envoys restarted).
    fn fill(
        &self,
        collector: &mut CollectorProcess,
        events: u64,
        stage: u64,
    ) -> anyhow::Result<u64> {
        let vms = (events / FILTER_BATCH_EVENTS).clamp(1, 2_000) as usize;
        let per_vm = events / vms as u64;
        let pace = Pace {
            events_per_stream: per_vm,
            batch_events: FILTER_BATCH_EVENTS,
            max_in_flight: 2 * FILTER_BATCH_EVENTS,
            timeout: self.options.timeout,
        };
        let mut acked = 0;
        for first in (0..vms).step_by(FILL_WAVE) {
            let wave = (first..vms.min(first + FILL_WAVE))
                .map(|i| Vm::new(i, vms.div_ceil(VMS_PER_SIDECAR), 100 + stage))
                .collect::<Vec<_>>();
            let opened = wave.len();
            let streams = self.runtime.block_on(load::open(collector.grpc, wave))?;
            collector.wait_connected(opened, Duration::from_secs(60))?;
            let (start, started) = watch::channel(true);
            let driven = self.runtime.block_on(load::drive(streams, pace, started));
            drop(start);
            acked += driven
                .map_err(|err| anyhow::anyhow!("{err:#}; {}", collector.log_tail()))?
                .acked;
        }
        Ok(acked)
    }

    fn time_report(
        &self,
        collector: &CollectorProcess,
        events: u64,
        filled: u64,
        fill_time: Duration,
    ) -> anyhow::Result<ReportResult> {
        let mut cli = Vec::new();
        let mut json = Vec::new();
        for _ in 0..self.options.report_runs {
            let started = Instant::now();
            json = collector.report_json(&[])?;
            cli.push(started.elapsed());
        }
        let report = collector.report_all()?;
        let url = format!("http://{}/api/v1/report", collector.http);
        let mut http = Vec::new();
        for _ in 0..self.options.report_runs {
            let (body, took) = timed_get(&url)?;
            http.push(took);
            ensure!(!body.is_empty(), "GET {url}: empty body");
        }
        Ok(ReportResult {
            events,
            counted: report.counted,
            sampled_out: report.sampled_out,
            rows: report.rows,
            json_bytes: json.len() as u64,
            db_bytes: std::fs::metadata(&collector.db)?.len(),
            cli,
            http,
            filled,
            fill_time,
        })
    }
}

/// Streams at once while filling the report database.
const FILL_WAVE: usize = 25;
/// Streams that fill the report memory database (one workload each pair).
const DISTINCT_FILL_STREAMS: u64 = 20;

impl Bench<'_> {
    /// Fills a fresh database with `keys` distinct report rows through
    /// ingest, restarts the collector on it and measures its peak RSS and
    /// times across report requests.
    fn report_memory(&self, keys: u64) -> anyhow::Result<ReportMemoryResult> {
        self.progress(&format!(
            "report memory: filling {} distinct rows through ingest",
            thousands(keys)
        ));
        let db = self.fresh_db(&format!("report-rows-{keys}.db"))?;
        let mut collector = CollectorProcess::start(&self.parts.collector, &db)?;
        let streams = DISTINCT_FILL_STREAMS
            .min(keys.div_ceil(FILTER_BATCH_EVENTS))
            .max(1);
        let per_stream = keys / streams;
        let vms = (0..streams as usize)
            .map(|i| {
                Vm::new(i, (streams as usize).div_ceil(VMS_PER_SIDECAR), 300)
                    .with_distinct_destinations(i as u64 * per_stream)
            })
            .collect();
        let started = Instant::now();
        let opened = self.runtime.block_on(load::open(collector.grpc, vms))?;
        collector.wait_connected(streams as usize, Duration::from_secs(60))?;
        let pace = Pace {
            events_per_stream: per_stream,
            batch_events: FILTER_BATCH_EVENTS,
            max_in_flight: FILTER_BUFFERED_EVENTS,
            timeout: self.options.timeout,
        };
        let (start, go) = watch::channel(true);
        let driven = self.runtime.block_on(load::drive(opened, pace, go));
        drop(start);
        let keys = driven
            .map_err(|err| anyhow::anyhow!("{err:#}; {}", collector.log_tail()))?
            .acked;
        let fill_time = started.elapsed();
        collector.stop()?;

        // A fresh process on the database: its memory is the reports'.
        let collector = CollectorProcess::start(&self.parts.collector, &db)?;
        let pid = collector.pid();
        std::thread::sleep(Duration::from_millis(500));
        let baseline_kib = status_kib(pid, "VmRSS")?;
        let peaks_reset = reset_peak_rss(pid).is_ok();
        let url = format!("http://{}/api/v1/report", collector.http);
        let (body, one) = timed_get(&url)?;
        let one_peak_kib = status_kib(pid, "VmHWM")?;
        let page = ReportSummary::parse(&body)?;
        ensure!(
            page.total_rows == keys,
            "the report counts {} rows, {keys} were stored",
            page.total_rows
        );
        let _ = reset_peak_rss(pid);
        let (first, second) = std::thread::scope(|scope| {
            let first = scope.spawn(|| timed_get(&url));
            let second = scope.spawn(|| timed_get(&url));
            (first.join(), second.join())
        });
        let joined = |r: std::thread::Result<anyhow::Result<(Vec<u8>, Duration)>>| {
            r.map_err(|_| anyhow::anyhow!("a report request thread panicked"))?
        };
        let two = joined(first)?.1.max(joined(second)?.1);
        let two_peak_kib = status_kib(pid, "VmHWM")?;
        let _ = reset_peak_rss(pid);
        let (_, max_limit) = timed_get(&format!("{url}?limit={REPORT_MAX_LIMIT}"))?;
        let max_limit_peak_kib = status_kib(pid, "VmHWM")?;
        let cursor = page
            .next_cursor
            .clone()
            .context("the first page has no nextCursor")?;
        let (_, next_page) = timed_get(&format!("{url}?cursor={cursor}"))?;
        let namespace = page.first_namespace.clone().unwrap_or_default();
        let (_, filtered) = timed_get(&format!("{url}?namespace={namespace}"))?;
        let started = Instant::now();
        collector.report_json(&[])?;
        let cli = started.elapsed();
        let result = ReportMemoryResult {
            keys,
            total_rows: page.total_rows,
            page_rows: page.rows,
            truncated: page.truncated,
            json_bytes: body.len() as u64,
            db_bytes: std::fs::metadata(&db)?.len(),
            fill_time,
            baseline_kib,
            one_peak_kib,
            two_peak_kib,
            max_limit_peak_kib,
            peaks_reset,
            one,
            two,
            max_limit,
            next_page,
            filtered,
            cli,
        };
        collector.stop()?;
        self.progress(&format!(
            "  {} rows: RSS {} MiB, peak {} MiB (one report), {} MiB (two at once), {} MiB (limit {}); {:.0} ms",
            thousands(result.total_rows),
            mib(result.baseline_kib),
            mib(result.one_peak_kib),
            mib(result.two_peak_kib),
            mib(result.max_limit_peak_kib),
            thousands(REPORT_MAX_LIMIT),
            result.one.as_secs_f64() * 1e3
        ));
        Ok(result)
    }
}

/// The largest page the report serves (`--limit`, `?limit=`).
const REPORT_MAX_LIMIT: u64 = 10_000;

/// What the checks read from `dialguard report --format json`.
#[derive(Debug, Clone, Default)]
struct ReportSummary {
    rows: u64,
    /// The rows' counts added up.
    counted: u64,
    /// `sampledOutEvents` (0 for a collector that does not sample).
    sampled_out: u64,
    /// `totalRows`, `truncated` and `nextCursor` (absent before paging).
    total_rows: u64,
    truncated: bool,
    next_cursor: Option<String>,
    /// The first row's `sourceNamespace`.
    first_namespace: Option<String>,
}

impl ReportSummary {
    fn parse(json: &[u8]) -> anyhow::Result<Self> {
        let report: Value = serde_json::from_slice(json).context("parsing the JSON report")?;
        let rows = report["rows"]
            .as_array()
            .context("the report has no `rows` array")?;
        Ok(Self {
            rows: rows.len() as u64,
            counted: rows.iter().filter_map(|r| r["count"].as_u64()).sum(),
            sampled_out: report["sampledOutEvents"].as_u64().unwrap_or(0),
            total_rows: report["totalRows"].as_u64().unwrap_or(0),
            truncated: report["truncated"].as_bool().unwrap_or(false),
            next_cursor: report["nextCursor"].as_str().map(str::to_owned),
            first_namespace: rows
                .first()
                .and_then(|row| row["sourceNamespace"].as_str())
                .map(str::to_owned),
        })
    }
}

/// `GET url`, its body and how long it took.
fn timed_get(url: &str) -> anyhow::Result<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let body = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()?;
    Ok((body, started.elapsed()))
}

/// Rows of the collector's `events` table (one per raw event kept).
fn raw_rows(db: &Path) -> anyhow::Result<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM events", [], |row| row.get(0))?;
    Ok(rows.max(0) as u64)
}

pub fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// `dialguard serve` as the benchmark runs it: port 0 for both listeners,
/// its stdout (one alert line per misrouted event) counted and discarded,
/// its log read for the listening line (and kept for errors).
struct CollectorProcess {
    process: ChildGuard,
    binary: PathBuf,
    db: PathBuf,
    grpc: SocketAddr,
    http: SocketAddr,
    log: Receiver<String>,
    recent: Vec<String>,
    alerts: Arc<AtomicU64>,
    alert_reader: JoinHandle<()>,
}

impl CollectorProcess {
    fn start(binary: &Path, db: &Path) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .args([
                "serve",
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db)
            .env("RUST_LOG", "info");
        let mut process = ChildGuard::spawn("dialguard serve", piped(&mut command))?;
        let child = process.child_mut();
        let stderr = child.stderr.take().context("collector stderr")?;
        let mut stdout = child.stdout.take().context("collector stdout")?;
        let log = tee_lines("collector", stderr, false);
        let alerts = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&alerts);
        let alert_reader = std::thread::spawn(move || {
            let mut buffer = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = stdout.read(&mut buffer) {
                let lines = buffer[..n].iter().filter(|&&b| b == b'\n').count();
                counter.fetch_add(lines as u64, Ordering::Relaxed);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut recent = Vec::new();
        while let Some(wait) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = log.recv_timeout(wait) else {
                break;
            };
            if let Some((grpc, http)) = listening(&line) {
                return Ok(Self {
                    process,
                    binary: binary.to_owned(),
                    db: db.to_owned(),
                    grpc,
                    http,
                    log,
                    recent,
                    alerts,
                    alert_reader,
                });
            }
            recent.push(line);
        }
        process.check_running()?;
        bail!(
            "the collector did not print its listening line within 20 s: {}",
            recent.join("\n")
        )
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// `dialguard report --format json ARGS` on its database, while it serves.
    fn report_json(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let output = Command::new(&self.binary)
            .args(["report", "--format", "json", "--db"])
            .arg(&self.db)
            .args(args)
            .output()?;
        ensure!(
            output.status.success(),
            "dialguard report failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
    }

    /// Every page of `dialguard report --format json` (the largest pages,
    /// following `nextCursor`; one page from a collector without paging),
    /// summed.
    fn report_all(&self) -> anyhow::Result<ReportSummary> {
        let limit = REPORT_MAX_LIMIT.to_string();
        let mut cursor: Option<String> = None;
        let mut total = ReportSummary::default();
        loop {
            let mut args = vec!["--limit", limit.as_str()];
            if let Some(cursor) = &cursor {
                args.extend(["--cursor", cursor.as_str()]);
            }
            let page = ReportSummary::parse(&self.report_json(&args)?)?;
            total.rows += page.rows;
            total.counted += page.counted;
            total.sampled_out = page.sampled_out;
            match page.next_cursor {
                Some(next) if cursor.as_ref() != Some(&next) => cursor = Some(next),
                _ => return Ok(total),
            }
        }
    }

    /// A counter or gauge's value on `/metrics` (summed over its series).
    fn metric(&self, name: &str) -> Option<u64> {
        let url = format!("http://{}/metrics", self.http);
        let body = ureq::get(&url)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let values: Vec<f64> = body
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
    }

    /// Waits until the collector counts `streams` open streams (its
    /// `dialguard_streams_connected` gauge: every hello processed).
    fn wait_connected(&mut self, streams: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let connected = self.metric("dialguard_streams_connected").unwrap_or(0);
            if connected >= streams as u64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{connected} of {streams} streams connected after {timeout:?}: {}",
                    self.log_tail()
                );
            }
            while let Ok(line) = self.log.try_recv() {
                self.note(line);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn note(&mut self, line: String) {
        self.recent.push(line);
        if self.recent.len() > 40 {
            self.recent.drain(..20);
        }
    }

    /// The last lines of its log, for errors.
    fn log_tail(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.note(line);
        }
        format!("collector log: {}", self.recent.join("\n"))
    }

    /// SIGTERM (SIGKILL after 30 s); returns the alert lines it printed.
    fn stop(mut self) -> anyhow::Result<u64> {
        if !self.process.terminate(Duration::from_secs(30)) {
            bail!("the collector did not stop within 30 s of SIGTERM");
        }
        self.alert_reader
            .join()
            .map_err(|_| anyhow::anyhow!("the alert reader panicked"))?;
        Ok(self.alerts.load(Ordering::Relaxed))
    }
}

/// The addresses in `dialguard: listening grpc=A http=B db=...`.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("dialguard: listening ")?;
    let value = |key: &str| {
        rest.split(' ')
            .find_map(|word| word.strip_prefix(key)?.parse().ok())
    };
    Some((value("grpc=")?, value("http=")?))
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

impl Results {
    /// The report as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "ingest: the real collector as a child process; one HTTP/2 connection per stream; at most {} unacknowledged events per stream; events/s = acknowledged events / (first batch sent .. last ack)",
            thousands(self.options.max_in_flight)
        ));
        line(format!(
            "{:>7} {:>6} {:>11} {:>7} {:>9} {:>14} {:>10} {:>14} {:>10} {:>11}",
            "streams",
            "batch",
            "acked",
            "seconds",
            "events/s",
            "collector us/ev",
            "collector",
            "generator us/ev",
            "peak RSS",
            "raw rows",
        ));
        for r in &self.ingest {
            line(format!(
                "{:>7} {:>6} {:>11} {:>7.2} {:>9} {:>15.2} {:>9.2}c {:>15.2} {:>6} MiB {:>11}",
                thousands(r.case.streams as u64),
                r.case.batch_events,
                thousands(r.driven.acked),
                r.driven.elapsed.as_secs_f64(),
                thousands(r.driven.events_per_second().round() as u64),
                r.cpu_us_per_event(),
                r.collector_cores(),
                r.generator_us_per_event(),
                mib(r.collector_peak_kib),
                thousands(r.raw_rows),
            ));
        }
        for r in &self.ingest {
            let check = match r.consistent() {
                true => "ok",
                false => "MISMATCH",
            };
            line(format!(
                "  {} streams x {}: {check}: {} acked, {} counted in the report, {} raw rows + {} sampled out; {} alert lines; {} batches",
                r.case.streams,
                r.case.batch_events,
                thousands(r.driven.acked),
                thousands(r.counted),
                thousands(r.raw_rows),
                thousands(r.sampled_out),
                thousands(r.alerts),
                thousands(r.driven.batches),
            ));
        }
        if !self.heartbeats.is_empty() {
            line(String::new());
            line(
                "heartbeats (one connection per VM; each beat a short stream: Hello, Heartbeat, end; OK once stored):"
                    .to_owned(),
            );
            line(format!(
                "{:>7} {:>9} {:>11} {:>8} {:>7} {:>12} {:>10} {:>10} {:>10} {:>13} {:>10}",
                "VMs",
                "interval",
                "heartbeats",
                "per s",
                "failed",
                "collector us",
                "mean ms",
                "RSS MiB",
                "peak MiB",
                "alongside ev/s",
                "counted"
            ));
            for r in &self.heartbeats {
                line(format!(
                    "{:>7} {:>7} {:>8}s {:>11} {:>8.0} {:>7} {:>12.1} {:>10.1} {:>10} {:>10} {:>13} {:>10}",
                    thousands(r.vms as u64),
                    thousands(r.connections as u64),
                    r.interval.as_secs(),
                    thousands(r.beaten.ok),
                    r.beaten.per_second(),
                    r.beaten.failed,
                    r.cpu_us_per_heartbeat(),
                    r.beaten.mean_latency().as_secs_f64() * 1e3,
                    mib(r.rss_kib),
                    mib(r.peak_kib),
                    r.alongside.map_or("-".to_owned(), |d| thousands(
                        d.events_per_second().round() as u64
                    )),
                    r.heartbeats_counted.map_or("-".to_owned(), thousands),
                ));
            }
        }
        if !self.idle.is_empty() {
            line(String::new());
            line(
                "idle streams (one connection each, Hello sent and processed), collector VmRSS:"
                    .to_owned(),
            );
            line(format!(
                "{:>7} {:>13} {:>13} {:>12} {:>10}",
                "streams", "before (MiB)", "with (MiB)", "KiB/stream", "open (s)"
            ));
            for r in &self.idle {
                line(format!(
                    "{:>7} {:>13} {:>13} {:>12.1} {:>10.1}",
                    thousands(r.streams as u64),
                    mib(r.baseline_kib),
                    mib(r.rss_kib),
                    r.per_stream_kib(),
                    r.open.as_secs_f64()
                ));
            }
        }
        if !self.reports.is_empty() {
            line(String::new());
            line(format!(
                "report time, median of {} (min-max), database filled with the collector's store writer:",
                self.options.report_runs
            ));
            line(format!(
                "{:>11} {:>7} {:>10} {:>9} {:>24} {:>24} {:>16}",
                "events",
                "rows",
                "JSON (KB)",
                "DB (MB)",
                "report --format json",
                "GET /api/v1/report",
                "fill (events/s)"
            ));
            let span = |times: &[Duration]| {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let min = times.iter().min().copied().unwrap_or_default();
                let max = times.iter().max().copied().unwrap_or_default();
                format!(
                    "{:.0} ms ({:.0}-{:.0})",
                    ms(median(times)),
                    ms(min),
                    ms(max)
                )
            };
            for r in &self.reports {
                line(format!(
                    "{:>11} {:>7} {:>10} {:>9} {:>24} {:>24} {:>16}",
                    thousands(r.events),
                    thousands(r.rows),
                    thousands(r.json_bytes / 1000),
                    thousands(r.db_bytes / 1_000_000),
                    span(&r.cli),
                    span(&r.http),
                    thousands(
                        (r.filled as f64 / r.fill_time.as_secs_f64().max(1e-9)).round() as u64
                    ),
                ));
            }
        }
        if !self.report_memory.is_empty() {
            line(String::new());
            line(format!(
                "report memory: every event dials its own address (one row each), filled through ingest; the collector restarted on the database; its VmHWM across{} each request:",
                match self.report_memory.iter().all(|r| r.peaks_reset) {
                    true => " (reset before)",
                    false => " (NOT reset: each is the peak so far)",
                }
            ));
            line(format!(
                "{:>10} {:>6} {:>9} {:>9} {:>9} {:>10} {:>11} {:>12} {:>9} {:>10} {:>10} {:>10} {:>9} {:>7} {:>12}",
                "rows",
                "page",
                "JSON KB",
                "DB (MB)",
                "RSS MiB",
                "one (MiB)",
                "two (MiB)",
                "10000 (MiB)",
                "one ms",
                "two ms",
                "10000 ms",
                "next ms",
                "ns ms",
                "CLI ms",
                "fill (ev/s)"
            ));
            let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
            for r in &self.report_memory {
                line(format!(
                    "{:>10} {:>6} {:>9} {:>9} {:>9} {:>10} {:>11} {:>12} {:>9} {:>10} {:>10} {:>10} {:>9} {:>7} {:>12}",
                    thousands(r.total_rows),
                    format!("{}{}", r.page_rows, if r.truncated { "+" } else { "" }),
                    thousands(r.json_bytes / 1000),
                    thousands(r.db_bytes / 1_000_000),
                    mib(r.baseline_kib),
                    mib(r.one_peak_kib),
                    mib(r.two_peak_kib),
                    mib(r.max_limit_peak_kib),
                    ms(r.one),
                    ms(r.two),
                    ms(r.max_limit),
                    ms(r.next_page),
                    ms(r.filtered),
                    ms(r.cli),
                    thousands((r.keys as f64 / r.fill_time.as_secs_f64().max(1e-9)).round() as u64),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_listening_line() {
        let line = "dialguard: listening grpc=127.0.0.1:4000 http=127.0.0.1:4001 db=/tmp/x.db";
        let (grpc, http) = super::listening(line).expect("parsed");
        assert_eq!(grpc.port(), 4000);
        assert_eq!(http.port(), 4001);
        assert!(super::listening("something else").is_none());
    }
}
