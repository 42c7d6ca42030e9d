//! The collector benchmark's quick mode, run by `cargo xtask test`: two
//! streams of a few thousand events, a few idle streams, a small database,
//! 20,000 distinct report rows and 200 heartbeating VMs. It checks that the measurement works (every acknowledged event
//! stored once and counted by the report, memory and report times read),
//! never the scale targets, which need the full run on a quiet machine.

use dialguard_bench::collector::{self, Options, Parts};

#[test]
fn quick_collector_benchmark_measures_ingest_memory_and_report() -> anyhow::Result<()> {
    let options = Options::quick();
    let results = collector::run(&Parts::from_dist()?, &options)?;
    println!("{}", results.render());

    assert_eq!(results.ingest.len(), 1);
    let ingest = &results.ingest[0];
    let expected = options.ingest[0].streams as u64 * options.ingest[0].events_per_stream;
    assert_eq!(ingest.driven.acked, expected, "every event acknowledged");
    assert!(
        ingest.consistent(),
        "the database does not hold exactly the acknowledged events: {ingest:?}"
    );
    assert!(ingest.driven.events_per_second() > 0.0);
    assert!(ingest.collector_cpu.as_nanos() > 0, "no collector CPU read");

    assert_eq!(results.idle.len(), 1);
    let idle = &results.idle[0];
    assert_eq!(idle.streams, options.idle[0]);
    assert!(
        idle.rss_kib > idle.baseline_kib / 2 && idle.baseline_kib > 0,
        "{idle:?}"
    );

    assert_eq!(results.reports.len(), 1);
    let report = &results.reports[0];
    assert!(report.events >= options.report_sizes[0], "{report:?}");
    assert_eq!(
        report.counted, report.events,
        "the report counts every stored event"
    );
    assert_eq!(report.cli.len(), options.report_runs);
    assert_eq!(report.http.len(), options.report_runs);
    assert!(report.rows > 0 && report.json_bytes > 0);

    // Report memory: every distinct row stored and counted, a page of the
    // default size served, more rows said to follow, peaks read.
    assert_eq!(results.report_memory.len(), 1);
    let memory = &results.report_memory[0];
    assert_eq!(memory.keys, options.report_keys[0], "{memory:?}");
    assert_eq!(memory.total_rows, memory.keys, "{memory:?}");
    assert_eq!(
        (memory.page_rows, memory.truncated),
        (1_000, true),
        "{memory:?}"
    );
    assert!(
        memory.one_peak_kib > 0 && memory.two_peak_kib > 0 && memory.max_limit_peak_kib > 0,
        "{memory:?}"
    );

    // Heartbeats: every VM beat at least once, each beat's stream ended
    // with OK, and the collector counted exactly those.
    assert_eq!(results.heartbeats.len(), 1);
    let beats = &results.heartbeats[0];
    assert_eq!(beats.beaten.failed, 0, "{beats:?}");
    assert!(beats.beaten.ok >= beats.vms as u64, "{beats:?}");
    assert_eq!(beats.heartbeats_counted, Some(beats.beaten.ok), "{beats:?}");
    assert!(beats.alongside.is_some_and(|d| d.acked > 0), "{beats:?}");
    Ok(())
}
