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
use crate::proc_stat::{process_cpu, status_kib};
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
    pub heartbeats: Vec<HeartbeatResult>,
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
        let report = ReportSummary::parse(&collector.report_json()?)?;
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
            json = collector.report_json()?;
            cli.push(started.elapsed());
        }
        let report = ReportSummary::parse(&json)?;
        let url = format!("http://{}/api/v1/report", collector.http);
        let mut http = Vec::new();
        for _ in 0..self.options.report_runs {
            let started = Instant::now();
            let body = ureq::get(&url)
                .call()
                .with_context(|| format!("GET {url}"))?
                .body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()?;
            http.push(started.elapsed());
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

/// What the checks read from `dialguard report --format json`.
#[derive(Debug, Clone, Copy)]
struct ReportSummary {
    rows: u64,
    /// The rows' counts added up.
    counted: u64,
    /// `sampledOutEvents` (0 for a collector that does not sample).
    sampled_out: u64,
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
        })
    }
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

    /// `dialguard report --format json` on its database, while it serves.
    fn report_json(&self) -> anyhow::Result<Vec<u8>> {
        let output = Command::new(&self.binary)
            .args(["report", "--format", "json", "--db"])
            .arg(&self.db)
            .output()?;
        ensure!(
            output.status.success(),
            "dialguard report failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
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
