//! Delivery faults through real Envoy and the real collector: the collector
//! absent when the sidecar starts reporting, killed mid-stream and restarted,
//! unresponsive, slow; a buffer too small for what piles up meanwhile. Events
//! arrive once each, drops are counted exactly, and no connection waits.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::sidecar;
use dialguard_tests::wait_for;

fn misrouted_count(incident: &Incident) -> u64 {
    incident.collector.report().map_or(0, |r| {
        r.rows
            .iter()
            .filter(|r| r.verdict == "misrouted")
            .map(|r| r.count)
            .sum()
    })
}

fn stored_events(incident: &Incident) -> anyhow::Result<i64> {
    let db = rusqlite::Connection::open_with_flags(
        &incident.collector.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    Ok(db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?)
}

/// Dials the peer pod `n` times; each must be answered (captured to `idle`) promptly.
fn misroute(incident: &Incident, n: usize) -> anyhow::Result<()> {
    let l = &incident.layout;
    for _ in 0..n {
        let started = Instant::now();
        ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "a connection waited {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

fn wait_for_misrouted(incident: &Incident, expected: u64) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(60), || {
        (misrouted_count(incident) == expected).then_some(())
    })
    .with_context(|| {
        format!(
            "expected {expected} misrouted, the report has {}; sidecar counters {:?}",
            misrouted_count(incident),
            incident.envoy.counters("dialguard")
        )
    })
}

#[test]
fn collector_absent_at_start_then_up() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = Incident::start(&dist, false)?;
    incident.collector.kill();
    misroute(&incident, 4)?;
    std::thread::sleep(Duration::from_millis(500));
    incident.collector.restart(false)?;
    wait_for_misrouted(&incident, 4)?;
    assert_eq!(stored_events(&incident)?, 4);
    let counters = incident.envoy.counters("dialguard.stream")?;
    assert!(
        counters.values().sum::<u64>() >= 1,
        "no stream failure counted: {counters:?}"
    );
    Ok(())
}

#[test]
fn collector_killed_mid_stream_and_restarted() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = Incident::start(&dist, false)?;
    misroute(&incident, 3)?;
    wait_for_misrouted(&incident, 3)?;
    incident.collector.kill();
    misroute(&incident, 5)?;
    incident.collector.restart(false)?;
    wait_for_misrouted(&incident, 8)?;
    // Give resends a moment to show up as duplicates, were they stored twice.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(stored_events(&incident)?, 8, "each connection stored once");
    assert_eq!(misrouted_count(&incident), 8);
    Ok(())
}

#[test]
fn unresponsive_collector_delays_no_connection() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start(&dist, false)?;
    misroute(&incident, 2)?;
    wait_for_misrouted(&incident, 2)?;
    incident.collector.signal("STOP")?;
    let result = misroute(&incident, 10);
    incident.collector.signal("CONT")?;
    result?;
    wait_for_misrouted(&incident, 12)?;
    Ok(())
}

/// A slow collector: it runs only a fifth of the time (SIGSTOP for 400 ms,
/// SIGCONT for 100 ms, over and over) while connections keep coming, so
/// acks arrive late and batches pile up. No connection waits, and once the
/// collector runs freely every event is stored exactly once.
#[test]
fn slow_collector_delays_no_connection_and_loses_nothing() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start(&dist, false)?;
    misroute(&incident, 1)?;
    wait_for_misrouted(&incident, 1)?;
    let slow = std::sync::atomic::AtomicBool::new(true);
    // The collector this test started, by its PID.
    let pid = incident.collector.process.id().to_string();
    let signal = |name: &str| -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), pid.as_str()])
            .status()?;
        ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    };
    let result = std::thread::scope(|scope| {
        let throttle = scope.spawn(|| -> anyhow::Result<()> {
            // Bounded: at most 60 cycles (30 s), fewer once the traffic is done.
            for _ in 0..60 {
                if !slow.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                signal("STOP")?;
                std::thread::sleep(Duration::from_millis(400));
                signal("CONT")?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        let traffic = (0..3).try_for_each(|_| {
            misroute(&incident, 10)?;
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, anyhow::Error>(())
        });
        slow.store(false, std::sync::atomic::Ordering::Relaxed);
        let throttled = throttle
            .join()
            .map_err(|_| anyhow::anyhow!("the throttle thread panicked"))?;
        traffic.and(throttled)
    });
    // Whatever happened, leave the collector running.
    incident.collector.signal("CONT")?;
    result?;
    wait_for_misrouted(&incident, 31)?;
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(stored_events(&incident)?, 31, "each connection stored once");
    assert_eq!(misrouted_count(&incident), 31);
    let dropped: u64 = incident
        .envoy
        .counters("dialguard.events.dropped")?
        .values()
        .sum();
    assert_eq!(
        dropped, 0,
        "the default buffer holds what a slow collector delays"
    );
    Ok(())
}

#[test]
fn overflowing_buffer_drops_oldest_and_counts_exactly() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut config = sidecar::filter_config();
    config["collector"]["maxBatchEvents"] = 1.into();
    config["collector"]["maxBufferedEvents"] = 2.into();
    let mut incident = Incident::start_with(&dist, &config, false)?;
    incident.collector.kill();
    let total = 9;
    misroute(&incident, total)?;
    std::thread::sleep(Duration::from_millis(300));
    let dropped: u64 = incident
        .envoy
        .counters("dialguard.events.dropped")?
        .values()
        .sum();
    ensure!(dropped > 0, "nothing was dropped");
    incident.collector.restart(false)?;
    let report = wait_for(Duration::from_secs(60), || {
        let report = incident.collector.report().ok()?;
        let stored: u64 = report.rows.iter().map(|r| r.count).sum();
        (stored + report.dropped_events == total as u64).then_some(report)
    })
    .with_context(|| {
        format!(
            "stored + dropped never reached {total}: {:?}",
            incident.collector.report()
        )
    })?;
    assert_eq!(
        report.dropped_events, dropped,
        "the report's gap is what the sidecar dropped"
    );
    Ok(())
}
