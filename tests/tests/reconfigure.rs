//! Reconfiguration loses nothing, through real Envoy 1.40 with listeners
//! served over file-based LDS and a 2 s drain: while the collector is down,
//! misroutes wait in the sidecar; dialguard configuration changes are
//! pushed (Envoy builds new filter chains with a new plugin root and
//! retires the old one once they drained); when the collector is back,
//! every misroute is stored exactly once, and what a full buffer dropped is
//! counted on both sides.

use std::time::Duration;

use anyhow::{Context, ensure};
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::sidecar::{self, DynamicListeners, Install};
use dialguard_tests::wait_for;
use serde_json::{Value, json};

/// Longer than the 2 s drain: the old chains, and with them the old root,
/// are gone.
const PAST_THE_DRAIN: Duration = Duration::from_millis(3_500);

fn config_with_allowed_port(port: u16) -> Value {
    let mut config = sidecar::filter_config();
    // An allow rule for a port nothing here uses: a real change of the
    // dialguard configuration that changes no verdict.
    config["allow"] = json!([{ "port": port }]);
    config
}

/// The incident with its listeners over file-based LDS and dialguard
/// configured as `config`.
fn start(dist: &Dist, config: &Value) -> anyhow::Result<(Incident, DynamicListeners)> {
    Incident::start_dynamic(dist, false, |c| {
        Ok(Install::local(&dist.module, config, c.grpc))
    })
}

fn misroute(incident: &Incident, times: usize) -> anyhow::Result<()> {
    let l = &incident.layout;
    for _ in 0..times {
        ensure!(incident.dial(l.at(l.peer_pod))? == Outcome::Reached("idle".into()));
    }
    Ok(())
}

fn reconfigure(
    incident: &Incident,
    lds: &mut DynamicListeners,
    config: &Value,
) -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    incident.reconfigure(
        lds,
        &Install::local(&dist.module, config, incident.collector.grpc),
    )?;
    std::thread::sleep(PAST_THE_DRAIN);
    Ok(())
}

/// Waits until the report counts `expected` misrouted connections, then
/// checks that it stays there (nothing stored twice) and returns the
/// sidecar's dropped counter.
fn stored_exactly(incident: &Incident, expected: u64) -> anyhow::Result<u64> {
    let count = |incident: &Incident| -> Option<u64> {
        let report = incident.collector.report().ok()?;
        Some(
            report
                .rows
                .iter()
                .filter(|r| r.verdict == "misrouted")
                .map(|r| r.count)
                .sum(),
        )
    };
    wait_for(Duration::from_secs(40), || {
        (count(incident)? >= expected).then_some(())
    })
    .with_context(|| format!("stored {:?} of {expected} misroutes", count(incident)))?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(incident),
        Some(expected),
        "every misroute stored exactly once"
    );
    let stats = incident.envoy.counters("dialguard.events.dropped")?;
    Ok(stats.values().sum())
}

#[test]
fn misroutes_buffered_across_configuration_changes_are_all_stored_once() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let (mut incident, mut lds) = start(&dist, &sidecar::filter_config())?;
    // Something delivered first, so sequence numbers are under way.
    misroute(&incident, 2)?;
    stored_exactly(&incident, 2)?;

    incident.collector.kill();
    misroute(&incident, 5)?;
    reconfigure(&incident, &mut lds, &config_with_allowed_port(1))?;
    misroute(&incident, 4)?;
    // Several changes in a row, misroutes between them.
    reconfigure(&incident, &mut lds, &config_with_allowed_port(2))?;
    misroute(&incident, 3)?;
    reconfigure(&incident, &mut lds, &config_with_allowed_port(3))?;
    incident.collector.restart(false)?;

    let dropped = stored_exactly(&incident, 2 + 5 + 4 + 3)?;
    assert_eq!(dropped, 0, "nothing was dropped");
    Ok(())
}

/// When dialguard's last configuration goes (its listeners removed), the
/// VM goes with it, and nothing of it outlives it (Envoy removes its stats
/// and shared data): what it could not deliver is lost, but never silently.
#[test]
fn a_removed_filter_logs_what_it_could_not_deliver() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let (mut incident, mut lds) = start(&dist, &sidecar::filter_config())?;
    misroute(&incident, 1)?;
    stored_exactly(&incident, 1)?;
    incident.collector.kill();
    misroute(&incident, 6)?;
    let install = Install::local(
        &dist.module,
        &sidecar::filter_config(),
        incident.collector.grpc,
    );
    incident.reconfigure_with(&mut lds, &install, without_dialguard)?;
    std::thread::sleep(PAST_THE_DRAIN);
    // Each VM (one per worker) logs what it gives up, with the number.
    let log: Vec<String> = incident.envoy.log.try_iter().collect();
    let given_up: u64 = log
        .iter()
        .filter_map(|line| {
            let rest = line.split("shutting down) with ").nth(1)?;
            rest.split(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(given_up, 6, "the lost events, logged:\n{}", log.join("\n"));
    // dialguard back, and the collector: new VMs, nothing resurrected.
    incident.collector.restart(false)?;
    incident.reconfigure(&mut lds, &install)?;
    misroute(&incident, 2)?;
    stored_exactly(&incident, 1 + 2)?;
    Ok(())
}

#[test]
fn an_overflow_across_a_change_is_counted_exactly() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut small = sidecar::filter_config();
    small["collector"]["maxBatchEvents"] = json!(4);
    small["collector"]["maxBufferedEvents"] = json!(4);
    let (mut incident, mut lds) = start(&dist, &small)?;
    incident.collector.kill();
    misroute(&incident, 12)?;
    let mut changed = small.clone();
    changed["allow"] = json!([{ "port": 1 }]);
    reconfigure(&incident, &mut lds, &changed)?;
    misroute(&incident, 8)?;
    incident.collector.restart(false)?;
    // 20 connections over two workers, each VM buffering at most 4: at
    // most 8 stored, and stored + dropped = 20 exactly, on both sides.
    let total = 20;
    let settled = wait_for(Duration::from_secs(40), || {
        let report = incident.collector.report().ok()?;
        let stored: u64 = report
            .rows
            .iter()
            .filter(|r| r.verdict == "misrouted")
            .map(|r| r.count)
            .sum();
        let dropped: u64 = incident
            .envoy
            .counters("dialguard.events.dropped")
            .ok()?
            .values()
            .sum();
        (stored + dropped == total && report.dropped_events == dropped).then_some((stored, dropped))
    });
    let (stored, dropped) = settled.with_context(|| {
        format!(
            "never settled: report {:?}, Envoy {:?}",
            incident
                .collector
                .report()
                .map(|r| (r.rows.len(), r.dropped_events)),
            incident.envoy.counters("dialguard.events.dropped")
        )
    })?;
    eprintln!("{stored} stored, {dropped} dropped of {total}");
    assert!(
        stored <= 8 && dropped >= 12,
        "{stored} stored, {dropped} dropped"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored_exactly(&incident, stored)?, dropped);
    Ok(())
}

/// Removes the dialguard filter from every filter chain.
fn without_dialguard(listeners: &mut Value) {
    for listener in listeners.as_array_mut().into_iter().flatten() {
        for chain in listener["filter_chains"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if let Some(filters) = chain["filters"].as_array_mut() {
                filters.retain(|f| f["name"] != dialguard_envoyfilter::FILTER_NAME);
            }
        }
    }
}
