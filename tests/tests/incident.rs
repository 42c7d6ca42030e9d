//! The field incident through real Envoy 1.40 with the built module and the
//! real collector: a Hazelcast-style member dialing its peer's pod IP is
//! captured by the catch-all listener an ExternalName Service created, and
//! dialguard reports it; legitimate traffic is not reported. The checks live
//! in [`dialguard_tests::scenario`], shared with the network-namespace run
//! (tests/netns.rs).

use dialguard_tests::dist::Dist;
use dialguard_tests::incident::Incident;
use dialguard_tests::scenario;

#[test]
fn incident_is_detected_and_reported() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let mut incident = Incident::start(&dist, true)?;
    scenario::incident_is_detected(&mut incident)
}

/// The second shape that still happens on current Istio: a TCP ServiceEntry
/// with `resolution: DNS` and no `addresses` on a port pods also serve.
#[test]
fn dns_service_entry_catch_all_is_detected() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let incident = Incident::start(&dist, false)?;
    scenario::dns_service_entry_is_detected(&incident)
}
