//! The benchmark itself: each variant in its own Envoy under callgrind, side
//! by side in one run, then the native system view and memory.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dialguard_tests::collector::Collector;
use dialguard_tests::dist::Dist;

use crate::callgrind;
use crate::envoy::{Envoy, Runner};
use crate::proc_stat;
use crate::sink::Sink;
use crate::topology::{self, Endpoints, SINK_CLUSTER, Topology, Traffic, Variant};
use crate::traffic::{self, Driven, Servers};

/// The empty filter's file name in `dist/` (`cargo xtask bench filter` builds it).
pub const EMPTY_MODULE: &str = "empty_filter.wasm";

/// The misroute rate of the system view: one connection in this many.
pub const SYSTEM_MISROUTE_ONE_IN: u32 = 1000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Measured connections per variant.
    pub connections: u64,
    /// Connections before the measured window (not counted).
    pub warmup: u64,
    pub variants: Vec<Variant>,
    /// Connections of the native system view (0.1% misrouted); `None` skips it.
    pub system_connections: Option<u64>,
    /// Whether to measure Envoy's RSS with and without the module.
    pub memory: bool,
    /// Idle time after the warm-up and after the measured connections, so
    /// that batched events and access log entries are flushed (dialguard:
    /// 200 ms; tcp_grpc: 1 s) inside the window that sent them.
    pub settle: Duration,
    /// Data chunks of the long-lived view: one connection held open through
    /// (1) and (3), so the per-chunk cost shows; `None` skips it.
    pub long_lived_chunks: Option<u64>,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Keep the configurations, logs and callgrind dumps in this directory
    /// (default: a temporary directory, removed at the end).
    pub keep: Option<PathBuf>,
}

impl Options {
    /// `cargo xtask bench filter`.
    pub fn full() -> Self {
        Self {
            connections: 5000,
            warmup: 20,
            variants: Variant::ALL.to_vec(),
            system_connections: Some(20_000),
            memory: true,
            long_lived_chunks: Some(2000),
            settle: Duration::from_secs(2),
            progress: true,
            keep: None,
        }
    }

    /// `cargo xtask bench filter --quick`.
    pub fn quick() -> Self {
        Self {
            connections: 200,
            warmup: 10,
            system_connections: Some(2000),
            long_lived_chunks: Some(200),
            ..Self::full()
        }
    }
}

/// Where the parts under test are.
#[derive(Debug, Clone)]
pub struct Parts {
    pub envoy: PathBuf,
    pub dialguard_module: PathBuf,
    pub empty_module: PathBuf,
    pub collector: PathBuf,
}

impl Parts {
    /// What `cargo xtask dist` left in `dist/` (or `$DIALGUARD_DIST`), plus
    /// `empty_filter.wasm` next to it.
    pub fn from_dist() -> anyhow::Result<Self> {
        let dist = Dist::locate()?;
        let empty_module = dist
            .module
            .parent()
            .map_or_else(|| PathBuf::from(EMPTY_MODULE), |d| d.join(EMPTY_MODULE));
        Ok(Self {
            envoy: dist.envoy,
            dialguard_module: dist.module,
            empty_module,
            collector: dist.dialguard,
        })
    }
}

/// What reached the collector or the sink in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reporting {
    pub connections: u64,
    /// Bytes Envoy wrote to the receiver's cluster
    /// (`cluster.<name>.upstream_cx_tx_bytes_total`: HTTP/2 framing included).
    pub wire_bytes: u64,
    /// The receiver's CPU time (see [`proc_stat`]).
    pub cpu: Duration,
    /// Events stored by the collector, or log entries received by the sink.
    pub items: u64,
    /// How many there should be.
    pub expected: u64,
    /// gRPC messages the sink received (0 for the collector).
    pub messages: u64,
}

impl Reporting {
    pub fn bytes_per_1000(&self) -> f64 {
        per_1000(self.wire_bytes as f64, self.connections)
    }

    pub fn cpu_ms_per_1000(&self) -> f64 {
        per_1000(self.cpu.as_secs_f64() * 1000.0, self.connections)
    }
}

fn per_1000(value: f64, connections: u64) -> f64 {
    if connections == 0 {
        0.0
    } else {
        value * 1000.0 / connections as f64
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct VariantResult {
    pub variant: Variant,
    pub traffic: Traffic,
    pub driven: Driven,
    /// Instructions (`Ir`) inside Envoy during the window, all threads.
    pub instructions: u64,
    pub startup: Duration,
    /// For (4) and (5): what reached the collector or the sink.
    pub reporting: Option<Reporting>,
    pub dump: PathBuf,
}

impl VariantResult {
    pub fn per_connection(&self) -> f64 {
        if self.driven.connections == 0 {
            0.0
        } else {
            self.instructions as f64 / self.driven.connections as f64
        }
    }
}

/// One connection held open through a variant: what each data chunk costs.
#[derive(Debug, Clone, Copy)]
pub struct LongLived {
    pub variant: Variant,
    pub chunks: u64,
    /// Instructions inside Envoy while the chunks passed, all threads.
    pub instructions: u64,
}

impl LongLived {
    pub fn per_chunk(&self) -> f64 {
        self.instructions as f64 / self.chunks.max(1) as f64
    }
}

/// The native system view at a 0.1% misroute rate: dialguard's events to the
/// collector against the access log of every connection to the sink.
#[derive(Debug, Clone, Copy)]
pub struct SystemView {
    pub dialguard: Reporting,
    pub access_log: Reporting,
}

/// Envoy's `VmRSS` (KiB), natively, after startup and some traffic.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub plain_1: u64,
    pub plain_2: u64,
    pub dialguard_1: u64,
    pub dialguard_2: u64,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub options: Options,
    pub envoy_version: String,
    pub module_sizes: Vec<(String, u64)>,
    pub variants: Vec<VariantResult>,
    pub system: Option<SystemView>,
    pub memory: Option<Memory>,
    pub long_lived: Vec<LongLived>,
    /// (1) measured again after the other variants: the machine's drift
    /// during the run (Envoy's timers scale with wall time).
    pub plain_again: Option<VariantResult>,
}

/// Where the events and log entries go.
#[derive(Debug, Clone, Copy)]
enum Receiver<'a> {
    Collector(&'a Collector),
    Sink(&'a Sink),
}

/// A receiver's counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Mark {
    wire_bytes: u64,
    cpu: Duration,
    items: u64,
    messages: u64,
}

impl Receiver<'_> {
    fn cluster(self) -> &'static str {
        match self {
            Self::Collector(_) => dialguard_tests::sidecar::COLLECTOR_CLUSTER,
            Self::Sink(_) => SINK_CLUSTER,
        }
    }

    /// Misrouted connections the collector stored, or entries the sink got.
    fn items(self) -> anyhow::Result<(u64, u64)> {
        Ok(match self {
            Self::Collector(collector) => {
                let stored = collector
                    .report()?
                    .rows
                    .iter()
                    .filter(|row| row.verdict == "misrouted")
                    .map(|row| row.count)
                    .sum();
                (stored, 0)
            }
            Self::Sink(sink) => {
                let snapshot = sink.snapshot();
                (snapshot.entries, snapshot.messages)
            }
        })
    }

    fn cpu(self) -> anyhow::Result<Duration> {
        match self {
            Self::Collector(collector) => proc_stat::process_cpu(collector.process.id()),
            Self::Sink(sink) => Ok(sink.snapshot().cpu),
        }
    }

    /// Waits (bounded) until at least `items` arrived, then marks.
    fn mark_when(self, envoy: &Envoy, items: u64, timeout: Duration) -> anyhow::Result<Mark> {
        let deadline = Instant::now() + timeout;
        let (items, messages) = loop {
            let (got, messages) = self.items()?;
            if got >= items || Instant::now() >= deadline {
                break (got, messages);
            }
            sleep(Duration::from_millis(200));
        };
        Ok(Mark {
            wire_bytes: envoy.stat(&format!(
                "cluster.{}.upstream_cx_tx_bytes_total",
                self.cluster()
            ))?,
            cpu: self.cpu()?,
            items,
            messages,
        })
    }
}

fn reporting(before: Mark, after: Mark, connections: u64, expected: u64) -> Reporting {
    Reporting {
        connections,
        wire_bytes: after.wire_bytes.saturating_sub(before.wire_bytes),
        cpu: after.cpu.saturating_sub(before.cpu),
        items: after.items.saturating_sub(before.items),
        expected,
        messages: after.messages.saturating_sub(before.messages),
    }
}

/// Everything a run shares: addresses, servers, the collector, the sink.
struct Bench<'a> {
    parts: &'a Parts,
    options: &'a Options,
    topology: Topology,
    dir: PathBuf,
    collector: Option<Collector>,
    sink: Option<Sink>,
    _servers: Servers,
    started: Instant,
}

impl Bench<'_> {
    fn progress(&self, line: &str) {
        if self.options.progress {
            eprintln!(
                "bench: [{:>4.0} s] {line}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn endpoints(&self) -> Endpoints<'_> {
        Endpoints {
            dialguard_module: &self.parts.dialguard_module,
            empty_module: &self.parts.empty_module,
            collector: self.collector.as_ref().map(|c| c.grpc),
            sink: self.sink.as_ref().map(|s| s.addr),
        }
    }

    fn receiver(&self, variant: Variant) -> Option<Receiver<'_>> {
        match variant {
            Variant::DialguardMisrouted => self.collector.as_ref().map(Receiver::Collector),
            Variant::GrpcAccessLog => self.sink.as_ref().map(Receiver::Sink),
            _ => None,
        }
    }

    fn start_envoy(
        &self,
        variant: Variant,
        name: &str,
        concurrency: u32,
        runner: Runner,
    ) -> anyhow::Result<Envoy> {
        let bootstrap = topology::bootstrap(&self.topology, variant, &self.endpoints())?;
        Envoy::start(
            &self.parts.envoy,
            &bootstrap,
            &self.dir.join(name),
            concurrency,
            runner,
        )
    }

    /// One variant under callgrind: warm-up, zero, N connections, dump.
    fn measure(&self, variant: Variant) -> anyhow::Result<VariantResult> {
        self.measure_as(variant, &format!("variant-{}", variant.number()))
    }

    /// Measures `variant` with its files under `dir/name` (a second
    /// measurement of one variant needs a directory of its own).
    fn measure_as(&self, variant: Variant, name: &str) -> anyhow::Result<VariantResult> {
        let n = variant.number();
        let out = self.dir.join(name).join("callgrind.out");
        self.progress(&format!(
            "({n}) {}: starting Envoy under callgrind",
            variant.label()
        ));
        let started = Instant::now();
        let envoy = self.start_envoy(variant, name, 1, Runner::Callgrind { out: out.clone() })?;
        let startup = started.elapsed();
        let result = callgrind::instrument(envoy.pid())
            .and_then(|()| self.measure_in(&envoy, variant, &out, startup));
        if result.is_err() {
            self.progress(&format!("({n}) Envoy's log: {}", envoy.log_so_far()));
        }
        envoy.stop();
        self.progress(&format!("({n}) Envoy stopped"));
        result
    }

    fn measure_in(
        &self,
        envoy: &Envoy,
        variant: Variant,
        out: &Path,
        startup: Duration,
    ) -> anyhow::Result<VariantResult> {
        let n = variant.number();
        let traffic = variant.traffic();
        let receiver = self.receiver(variant);
        let expected = |driven: &Driven| match receiver {
            Some(Receiver::Collector(_)) => driven.misrouted,
            _ => driven.connections,
        };
        let items_at_start = match receiver {
            Some(receiver) => receiver.items()?.0,
            None => 0,
        };
        let warm = traffic::drive(envoy, &self.topology, traffic, 0, self.options.warmup);
        sleep(self.options.settle);
        let before = match receiver {
            Some(receiver) => Some(receiver.mark_when(
                envoy,
                items_at_start + expected(&warm),
                Duration::from_secs(60),
            )?),
            None => None,
        };
        self.progress(&format!(
            "({n}) started in {:.0} s; warm-up {} connections; measuring {}",
            startup.as_secs_f64(),
            warm.connections,
            self.options.connections
        ));
        callgrind::zero(envoy.pid())?;
        let driven = traffic::drive(
            envoy,
            &self.topology,
            traffic,
            self.options.warmup,
            self.options.connections,
        );
        sleep(self.options.settle);
        let (instructions, dump) = callgrind::dump(envoy.pid(), out)?;
        let reporting = match (receiver, before) {
            (Some(receiver), Some(before)) => {
                let after = receiver.mark_when(
                    envoy,
                    before.items + expected(&driven),
                    Duration::from_secs(60),
                )?;
                Some(reporting(
                    before,
                    after,
                    driven.connections,
                    expected(&driven),
                ))
            }
            _ => None,
        };
        let result = VariantResult {
            variant,
            traffic,
            driven,
            instructions,
            startup,
            reporting,
            dump,
        };
        self.progress(&format!(
            "({n}) {} connections ({} answered) in {:.1} s: {} instructions per connection",
            driven.connections,
            driven.answered,
            driven.elapsed.as_secs_f64(),
            thousands(result.per_connection().round() as u64)
        ));
        Ok(result)
    }

    /// One passthrough connection (a `MATCH`, judged on the filter's timer
    /// while open) through `variant` under callgrind, carrying `chunks` small
    /// writes 1 ms apart so each is its own read in Envoy.
    fn long_lived(&self, variant: Variant, chunks: u64) -> anyhow::Result<LongLived> {
        let n = variant.number();
        let name = format!("long-lived-{n}");
        let out = self.dir.join(&name).join("callgrind.out");
        let envoy = self.start_envoy(variant, &name, 1, Runner::Callgrind { out: out.clone() })?;
        let result = callgrind::instrument(envoy.pid()).and_then(|()| {
            let mut held = traffic::Held::open(
                envoy.outbound,
                self.topology.source(),
                self.topology.passthrough(),
            )?;
            // Past the timer's first tick: the connection is judged before
            // the window, so only the chunks are measured.
            sleep(Duration::from_millis(500));
            callgrind::zero(envoy.pid())?;
            for _ in 0..chunks {
                held.send_chunk()?;
                sleep(Duration::from_millis(1));
            }
            sleep(Duration::from_millis(200));
            let (instructions, _) = callgrind::dump(envoy.pid(), &out)?;
            Ok(LongLived {
                variant,
                chunks,
                instructions,
            })
        });
        envoy.stop();
        let result = result.with_context(|| format!("the long-lived view of ({n})"))?;
        self.progress(&format!(
            "({n}) long-lived: {} chunks, {} instructions per chunk",
            chunks,
            thousands(result.per_chunk().round() as u64)
        ));
        Ok(result)
    }

    /// Natively, `variant` with 0.1% of connections misrouted: what reaches
    /// the receiver per connection in a steady state (stream already open).
    fn system_window(&self, variant: Variant, connections: u64) -> anyhow::Result<Reporting> {
        let receiver = self
            .receiver(variant)
            .or_else(|| self.collector.as_ref().map(Receiver::Collector))
            .context("no receiver")?;
        let envoy = self.start_envoy(
            variant,
            &format!("system-{}", variant.number()),
            1,
            Runner::Native,
        )?;
        let expected = |driven: &Driven| match receiver {
            Receiver::Collector(_) => driven.misrouted,
            Receiver::Sink(_) => driven.connections,
        };
        let traffic = Traffic::MisroutedOneIn(SYSTEM_MISROUTE_ONE_IN);
        let items_at_start = receiver.items()?.0;
        // One misrouted connection first, so that dialguard's stream is open
        // as in a steady state (it opens lazily), like the access log's.
        let mut warm = traffic::drive(&envoy, &self.topology, Traffic::Misrouted, 0, 1);
        let more = traffic::drive(&envoy, &self.topology, Traffic::Mixed, 0, 20);
        warm.connections += more.connections;
        sleep(self.options.settle);
        let before = receiver.mark_when(
            &envoy,
            items_at_start + expected(&warm),
            Duration::from_secs(30),
        )?;
        let driven = traffic::drive(&envoy, &self.topology, traffic, 0, connections);
        sleep(self.options.settle);
        let after = receiver.mark_when(
            &envoy,
            before.items + expected(&driven),
            Duration::from_secs(30),
        )?;
        envoy.stop();
        if driven.answered != driven.connections {
            bail!(
                "system view ({}): only {} of {} connections answered",
                variant.number(),
                driven.answered,
                driven.connections
            );
        }
        Ok(reporting(
            before,
            after,
            driven.connections,
            expected(&driven),
        ))
    }

    fn system_view(&self, connections: u64) -> anyhow::Result<SystemView> {
        self.progress(&format!(
            "system view (native): {connections} connections, 1 in {SYSTEM_MISROUTE_ONE_IN} misrouted"
        ));
        Ok(SystemView {
            dialguard: self.system_window(Variant::DialguardAudit, connections)?,
            access_log: self.system_window(Variant::GrpcAccessLog, connections)?,
        })
    }

    fn rss(&self, variant: Variant, concurrency: u32) -> anyhow::Result<u64> {
        let envoy = self.start_envoy(
            variant,
            &format!("memory-{}-{concurrency}", variant.number()),
            concurrency,
            Runner::Native,
        )?;
        traffic::drive(&envoy, &self.topology, Traffic::MisroutedOneIn(50), 0, 200);
        sleep(Duration::from_secs(1));
        let rss = envoy.rss_kib();
        envoy.stop();
        rss
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        self.progress(
            "memory (native): VmRSS with --concurrency 1 and 2, without and with dialguard",
        );
        Ok(Memory {
            plain_1: self.rss(Variant::Plain, 1)?,
            plain_2: self.rss(Variant::Plain, 2)?,
            dialguard_1: self.rss(Variant::DialguardAudit, 1)?,
            dialguard_2: self.rss(Variant::DialguardAudit, 2)?,
        })
    }
}

fn envoy_version(envoy: &Path) -> String {
    std::process::Command::new(envoy)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split_whitespace()
                .find(|w| {
                    w.contains('/') && w.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
                })
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs the benchmark.
pub fn run(parts: &Parts, options: &Options) -> anyhow::Result<Results> {
    let mut variants = options.variants.clone();
    variants.sort();
    variants.dedup();
    if variants.is_empty() {
        bail!("no variant to measure");
    }
    if variants.contains(&Variant::EmptyWasm) && !parts.empty_module.exists() {
        bail!(
            "{} is missing: `cargo xtask bench filter` builds it",
            parts.empty_module.display()
        );
    }
    crate::envoy::valgrind()?;
    let temporary = tempfile::Builder::new()
        .prefix("dialguard-bench")
        .tempdir()?;
    let dir = match &options.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.canonicalize()?
        }
        None => temporary.path().to_owned(),
    };
    let topology = Topology::choose()?;
    let servers = Servers::start(&topology)?;
    let needs_collector = variants.iter().any(|v| {
        matches!(
            v,
            Variant::DialguardAudit | Variant::DialguardMisrouted | Variant::DialguardHeartbeat
        )
    }) || options.system_connections.is_some()
        || options.memory;
    let collector = if needs_collector {
        Some(Collector::start(
            &parts.collector,
            &dir.join("dialguard.db"),
            None,
            false,
        )?)
    } else {
        None
    };
    let sink = if variants.contains(&Variant::GrpcAccessLog) || options.system_connections.is_some()
    {
        Some(Sink::start()?)
    } else {
        None
    };
    let bench = Bench {
        parts,
        options,
        topology,
        dir,
        collector,
        sink,
        _servers: servers,
        started: Instant::now(),
    };
    let mut results = Results {
        options: options.clone(),
        envoy_version: envoy_version(&parts.envoy),
        module_sizes: [&parts.dialguard_module, &parts.empty_module]
            .into_iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((name, std::fs::metadata(p).ok()?.len()))
            })
            .collect(),
        variants: Vec::new(),
        system: None,
        memory: None,
        long_lived: Vec::new(),
        plain_again: None,
    };
    let again = variants.len() > 1 && variants.contains(&Variant::Plain);
    for variant in variants {
        results.variants.push(
            bench
                .measure(variant)
                .with_context(|| format!("measuring ({}) {}", variant.number(), variant.label()))?,
        );
    }
    if again {
        results.plain_again = Some(
            bench
                .measure_as(Variant::Plain, "variant-1-again")
                .context("measuring (1) again at the end")?,
        );
    }
    if let Some(chunks) = options.long_lived_chunks {
        for variant in [Variant::Plain, Variant::DialguardAudit] {
            results.long_lived.push(bench.long_lived(variant, chunks)?);
        }
    }
    if let Some(connections) = options.system_connections {
        results.system = Some(bench.system_view(connections)?);
    }
    if options.memory {
        results.memory = Some(bench.memory()?);
    }
    Ok(results)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn kib_as_mib(kib: i64) -> String {
    format!("{:+.1} MB", kib as f64 / 1024.0)
}

impl Results {
    pub fn variant(&self, variant: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.variant == variant)
    }

    /// The report as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "Envoy {} (V8), --concurrency 1, under callgrind; {} measured connections per variant after {} warm-up",
            self.envoy_version, self.options.connections, self.options.warmup
        ));
        line(String::new());
        let base = self
            .variant(Variant::Plain)
            .map(VariantResult::per_connection);
        line(format!(
            "{:<58} {:>16} {:>12}",
            "variant", "instr/connection", "ratio to (1)"
        ));
        for r in &self.variants {
            let ratio = match base {
                Some(base) if base > 0.0 => format!("{:.2}x", r.per_connection() / base),
                _ => "n/a".to_owned(),
            };
            line(format!(
                "{:<58} {:>16} {:>12}",
                format!("({}) {}", r.variant.number(), r.variant.label()),
                thousands(r.per_connection().round() as u64),
                ratio
            ));
        }
        if let (Some(again), Some(base)) = (&self.plain_again, base) {
            line(format!(
                "{:<58} {:>16} {:>12}",
                "(1) again, after the others (drift)",
                thousands(again.per_connection().round() as u64),
                format!("{:.3}x", again.per_connection() / base.max(1.0))
            ));
        }
        line(String::new());
        line("traffic and checks:".to_owned());
        for r in &self.variants {
            line(format!(
                "  ({}) {}; {}/{} answered; {:.1} s for the window; Envoy startup {:.0} s",
                r.variant.number(),
                r.traffic.describe(),
                r.driven.answered,
                r.driven.connections,
                r.driven.elapsed.as_secs_f64(),
                r.startup.as_secs_f64()
            ));
        }
        line(String::new());
        line("module sizes:".to_owned());
        for (name, size) in &self.module_sizes {
            line(format!("  {name}: {} bytes", thousands(*size)));
        }
        let reported: Vec<&VariantResult> = self
            .variants
            .iter()
            .filter(|r| r.reporting.is_some())
            .collect();
        if !reported.is_empty() {
            line(String::new());
            line(
                "what leaves Envoy, per 1,000 connections (the callgrind windows above):"
                    .to_owned(),
            );
            for r in reported {
                if let Some(rep) = &r.reporting {
                    line(describe_reporting(
                        &format!("({})", r.variant.number()),
                        r.variant,
                        rep,
                    ));
                }
            }
        }
        if let [plain, dialguard, ..] = self.long_lived.as_slice() {
            line(String::new());
            line(format!(
                "long-lived connection (passthrough, judged while open), {} data chunks, instructions per chunk:",
                thousands(plain.chunks)
            ));
            for l in [plain, dialguard] {
                line(format!(
                    "  ({}) {}: {}",
                    l.variant.number(),
                    l.variant.label(),
                    thousands(l.per_chunk().round() as u64)
                ));
            }
            line(format!(
                "  dialguard per chunk: {:+.0} instructions ({:+.2}%)",
                dialguard.per_chunk() - plain.per_chunk(),
                (dialguard.per_chunk() / plain.per_chunk().max(1.0) - 1.0) * 100.0
            ));
        }
        if let Some(system) = &self.system {
            line(String::new());
            line(format!(
                "system view (native, --concurrency 1, {} connections as (3) with 1 in {SYSTEM_MISROUTE_ONE_IN} misrouted), per 1,000 connections:",
                thousands(system.dialguard.connections)
            ));
            line(describe_reporting(
                "dialguard",
                Variant::DialguardMisrouted,
                &system.dialguard,
            ));
            line(describe_reporting(
                "(5) access log",
                Variant::GrpcAccessLog,
                &system.access_log,
            ));
        }
        if let Some(m) = &self.memory {
            let d = |a: u64, b: u64| i64::try_from(a).unwrap_or(0) - i64::try_from(b).unwrap_or(0);
            line(String::new());
            line("memory (native VmRSS after startup and 200 connections):".to_owned());
            line(format!(
                "  no wasm: {} KiB (1 worker), {} KiB (2 workers); dialguard: {} KiB (1 worker), {} KiB (2 workers)",
                thousands(m.plain_1),
                thousands(m.plain_2),
                thousands(m.dialguard_1),
                thousands(m.dialguard_2)
            ));
            line(format!(
                "  dialguard once (V8 + module, 1 worker): {}; per extra worker: {} with dialguard, {} without, so {} for the module's VM",
                kib_as_mib(d(m.dialguard_1, m.plain_1)),
                kib_as_mib(d(m.dialguard_2, m.dialguard_1)),
                kib_as_mib(d(m.plain_2, m.plain_1)),
                kib_as_mib(d(m.dialguard_2, m.dialguard_1) - d(m.plain_2, m.plain_1)),
            ));
        }
        out
    }
}

fn describe_reporting(name: &str, variant: Variant, rep: &Reporting) -> String {
    let (receiver, items) = match variant {
        Variant::GrpcAccessLog => (
            "sink",
            format!(
                "{}/{} log entries in {} messages",
                rep.items, rep.expected, rep.messages
            ),
        ),
        _ => (
            "collector",
            format!(
                "{}/{} misrouted connections stored",
                rep.items, rep.expected
            ),
        ),
    };
    format!(
        "  {name:<15} {:>9} bytes to the {receiver}, {receiver} CPU {:>6.1} ms ({items}, {:.1} bytes per connection)",
        thousands(rep.bytes_per_1000().round() as u64),
        rep.cpu_ms_per_1000(),
        if rep.connections == 0 {
            0.0
        } else {
            rep.wire_bytes as f64 / rep.connections as f64
        }
    )
}
