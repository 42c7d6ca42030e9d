//! The field incident with the sidecar wired as in a real pod: network
//! namespaces with pod IPs (10.244.0.0/16) and Service VIPs (10.96.0.0/12),
//! istio-iptables' nat rules redirecting the application's plain TCP connects
//! to Envoy's 15001, Envoy running as uid 1337, `virtualOutbound` with
//! `use_original_dst` and no PROXY header anywhere. The incident's checks
//! ([`dialguard_tests::scenario`]) must hold exactly as on loopback. Needs
//! root, iproute2 and iptables (CI installs them); fails without them.

use anyhow::ensure;
use dialguard_tests::client::Outcome;
use dialguard_tests::dist::Dist;
use dialguard_tests::netns::{self, NetnsIncident, PROXY_UID};
use dialguard_tests::scenario;

/// `[packets:bytes]` of the first rule in `table` that starts with `rule`.
fn packets(table: &str, rule: &str) -> Option<u64> {
    table.lines().find_map(|line| {
        let (counters, text) = line.strip_prefix('[')?.split_once("] ")?;
        text.starts_with(rule)
            .then(|| counters.split(':').next()?.parse().ok())?
    })
}

#[test]
fn incident_is_detected_in_network_namespaces() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut pod = NetnsIncident::in_network_namespaces(&dist, false)?;
    let namespaces = pod.namespace_paths();
    ensure!(pod.envoy_uid()? == PROXY_UID, "Envoy does not run as 1337");

    // istio-iptables returns the application's connections over `lo`: its
    // own pod IP reaches its own server and the sidecar never sees it (the
    // incident's exact Envoy counters below would count it otherwise).
    let l = pod.layout.clone();
    let own = l.at(l.own_pod);
    ensure!(pod.dial(own)? == Outcome::Reached("manager-0 (this pod)".into()));

    scenario::incident_is_detected(&mut pod)?;

    // The kernel did the capturing: every dial but the own-IP one went
    // through ISTIO_REDIRECT (3 + 1 misrouted, 1 blackholed, 12 VIP,
    // 2 passthrough), and none of Envoy's own connections did.
    let nat = pod.wiring.nat_table()?;
    let redirected = packets(
        &nat,
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    );
    ensure!(
        redirected == Some(19),
        "ISTIO_REDIRECT counted {redirected:?}:\n{nat}"
    );

    drop(pod);
    netns::ensure_removed(&namespaces)
}

/// The DNS ServiceEntry shape (`resolution: DNS`, no `addresses`, a port the
/// app pods also serve) behind real iptables capture.
#[test]
fn dns_service_entry_catch_all_is_detected_in_network_namespaces() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let pod = NetnsIncident::in_network_namespaces(&dist, false)?;
    let namespaces = pod.namespace_paths();
    scenario::dns_service_entry_is_detected(&pod)?;
    drop(pod);
    netns::ensure_removed(&namespaces)
}
