//! `cargo xtask demo`: the field incident on loopback, detected and reported.
//! `--verbose` also shows the collector's and Envoy's logs.

use std::time::Duration;

use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;

fn main() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    println!(
        "Starting the collector, the manager pods' sidecars (Envoy 1.40 + dialguard) and the pods..."
    );
    let verbose = std::env::args().any(|a| a == "--verbose");
    let mut incident = Incident::start(&dist, verbose)?;
    let l = incident.layout.clone();
    // The peer pod runs dialguard too: its filter says hello when it starts,
    // so the report can name the pod the misrouted connections were meant for.
    let install = dialguard_tests::sidecar::Install::local(
        &dist.module,
        &dialguard_tests::sidecar::filter_config(),
        incident.collector.grpc,
    );
    incident.start_peer_sidecar(&dist, &install)?;
    let (peer, idle, own) = (l.at(l.peer_pod), l.at(l.idle_pod), l.at(l.own_pod));
    println!(
        "\nThe sidecar has a catch-all listener 0.0.0.0_{} (from the ExternalName Service app-ext) whose default chain goes to {}.",
        l.port,
        l.app_ext_cluster()
    );
    let show = |what: &str, dialed, outcome: Outcome| match outcome {
        Outcome::Reached(pod) => println!("  {what:<46} dialed {dialed:<18} -> answered by {pod}"),
        Outcome::Closed => println!("  {what:<46} dialed {dialed:<18} -> connection closed"),
    };
    println!("\nTraffic from manager-0 ({}):", l.own_pod);
    show(
        "Hazelcast member -> peer manager pod",
        peer,
        incident.dial(peer)?,
    );
    show(
        "Hazelcast member -> peer manager pod",
        peer,
        incident.dial(peer)?,
    );
    show(
        "manager -> manager Service VIP",
        l.at(l.manager_vip),
        incident.dial(l.at(l.manager_vip))?,
    );
    show(
        "manager -> app Service VIP",
        l.at(l.app_vip),
        incident.dial(l.at(l.app_vip))?,
    );
    let passthrough = std::net::SocketAddr::new(l.app_pods[0].into(), l.passthrough_port);
    show(
        "manager -> app pod on an unshared port",
        passthrough,
        incident.dial(passthrough)?,
    );
    show("manager -> its own pod IP", own, incident.dial(own)?);
    incident.stop_pod(idle);
    show(
        "Hazelcast member -> peer (idle has no listener)",
        peer,
        incident.dial(peer)?,
    );

    // Reported connections reach the collector on the sidecar's next flush.
    let misrouted = 3;
    let delivered = dialguard_tests::wait_for(Duration::from_secs(15), || {
        let report = incident.collector.report().ok()?;
        let count: u64 = report
            .rows
            .iter()
            .filter(|r| r.verdict == "misrouted")
            .map(|r| r.count)
            .sum();
        (count == misrouted).then_some(())
    });
    if delivered.is_none() {
        anyhow::bail!(
            "the collector did not receive the {misrouted} misrouted connections within 15 s"
        );
    }
    // Both manager pods' sidecars said hello when they started; the
    // collector writes its inventory once a second.
    dialguard_tests::wait_for(Duration::from_secs(10), || {
        let coverage = incident.collector.report_json().ok()?;
        (coverage["coverage"]["namespaces"][0]["sidecars"] == 2).then_some(())
    });
    // Envoy writes its access log about once a second.
    dialguard_tests::wait_for(Duration::from_secs(3), || {
        (incident.access_log().lines().count() >= 7).then_some(())
    });
    println!("\nEnvoy access log (what Istio users see today):");
    for line in incident.access_log().lines() {
        println!("  {line}");
    }
    println!("\nCollector alerts (stdout of `dialguard serve`):");
    for line in incident.collector.alerts.try_iter() {
        println!("  {line}");
    }
    println!(
        "\n$ dialguard report --db {} --format table",
        incident.collector.db.display()
    );
    print!("{}", incident.collector.report_table()?);
    Ok(())
}
