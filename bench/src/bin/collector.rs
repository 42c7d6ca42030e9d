//! `dialguard-bench-collector`: the collector scale benchmark's command line;
//! `cargo xtask bench collector [--quick]` builds `dist/` and runs it. See
//! `dialguard_bench::collector` for the method.

use std::time::Duration;

use clap::Parser;
use dialguard_bench::collector::{self, IngestCase, Options, Parts};

#[derive(Debug, Parser)]
#[command(
    name = "dialguard-bench-collector",
    about = "Collector scale over loopback: ingest rate and CPU per event (1, 100, 2,000 streams), memory with idle streams, report time over large databases, report memory over 1,000,000 rows"
)]
struct Cli {
    /// A short run: two streams, a few thousand events, 20 idle streams, a 10,000-event database, 20,000 report rows.
    #[arg(long)]
    quick: bool,
    /// Ingest cases instead of the default, each STREAMSxEVENTS_PER_STREAM[xBATCH], e.g. `100x20000,2000x500x20`.
    #[arg(long, value_delimiter = ',')]
    ingest: Vec<String>,
    /// Most unacknowledged events per stream (the filter's maxBufferedEvents).
    #[arg(long)]
    max_in_flight: Option<u64>,
    /// Idle stream counts to measure memory at, e.g. `2000,10000` (0 skips).
    #[arg(long, value_delimiter = ',')]
    idle: Vec<usize>,
    /// Stored event counts to time the report at, e.g. `1000000,10000000` (0 skips).
    #[arg(long, value_delimiter = ',')]
    report_events: Vec<u64>,
    /// Report runs per size (the median is printed).
    #[arg(long)]
    report_runs: Option<usize>,
    /// Distinct report rows to measure the report's memory over, e.g.
    /// `1000000` (0 skips).
    #[arg(long, value_delimiter = ',')]
    report_rows: Vec<u64>,
    /// Bound on each ingest case, in seconds.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Keep the databases in this directory.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
    /// VMs in the heartbeat measurement (0 skips it); full run 40,000.
    #[arg(long)]
    heartbeat_vms: Option<usize>,
    /// Connections the VMs share (default: one each); each is a socket in
    /// both processes, so the open-files hard limit bounds it.
    #[arg(long)]
    heartbeat_connections: Option<usize>,
    /// Heartbeat intervals and their windows, INTERVAL:WINDOW in seconds,
    /// e.g. `60:60,6:30` (the full run's).
    #[arg(long, value_delimiter = ',')]
    heartbeat_intervals: Vec<String>,
}

fn parse_interval(text: &str) -> anyhow::Result<(Duration, Duration)> {
    let parsed = text
        .split_once(':')
        .and_then(|(i, w)| Some((i.trim().parse::<u64>().ok()?, w.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((interval, window)) if interval > 0 && window > 0 => {
            Ok((Duration::from_secs(interval), Duration::from_secs(window)))
        }
        _ => anyhow::bail!(
            "--heartbeat-intervals {text}: expected INTERVAL:WINDOW in whole seconds above 0, e.g. 60:60"
        ),
    }
}

fn parse_case(text: &str) -> anyhow::Result<IngestCase> {
    let numbers = text
        .split('x')
        .map(|n| n.trim().replace('_', "").parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow::anyhow!("--ingest {text}: {err}"))?;
    match numbers[..] {
        [streams, events] => Ok(IngestCase {
            streams: streams as usize,
            events_per_stream: events,
            batch_events: collector::FILTER_BATCH_EVENTS,
        }),
        [streams, events, batch] if batch > 0 => Ok(IngestCase {
            streams: streams as usize,
            events_per_stream: events,
            batch_events: batch,
        }),
        _ => anyhow::bail!("--ingest {text}: expected STREAMSxEVENTS_PER_STREAM[xBATCH]"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut options = if cli.quick {
        Options::quick()
    } else {
        Options::full()
    };
    if !cli.ingest.is_empty() {
        options.ingest = cli
            .ingest
            .iter()
            .filter(|c| c.as_str() != "0")
            .map(|c| parse_case(c))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(n) = cli.max_in_flight {
        options.max_in_flight = n;
    }
    if !cli.idle.is_empty() {
        options.idle = cli.idle.into_iter().filter(|&n| n > 0).collect();
    }
    if !cli.report_events.is_empty() {
        options.report_sizes = cli.report_events.into_iter().filter(|&n| n > 0).collect();
        options.report_sizes.sort_unstable();
    }
    if !cli.report_rows.is_empty() {
        options.report_keys = cli.report_rows.into_iter().filter(|&n| n > 0).collect();
    }
    if let Some(n) = cli.report_runs {
        options.report_runs = n.max(1);
    }
    if let Some(secs) = cli.timeout_secs {
        options.timeout = Duration::from_secs(secs);
    }
    options.keep = cli.keep;
    if let Some(heartbeats) = &mut options.heartbeats {
        if let Some(vms) = cli.heartbeat_vms {
            heartbeats.vms = vms;
            heartbeats.connections = vms;
        }
        if let Some(connections) = cli.heartbeat_connections {
            heartbeats.connections = connections;
        }
        if !cli.heartbeat_intervals.is_empty() {
            heartbeats.intervals = cli
                .heartbeat_intervals
                .iter()
                .map(|t| parse_interval(t))
                .collect::<anyhow::Result<_>>()?;
        }
    }
    if options.heartbeats.as_ref().is_some_and(|h| h.vms == 0) {
        options.heartbeats = None;
    }
    let results = collector::run(&Parts::from_dist()?, &options)?;
    print!("{}", results.render());
    Ok(())
}
