//! The verdict table, driven through the same host trait the wasm glue implements.

use std::net::SocketAddr;

use dialguard_filter_core::{
    ConnectionFacts, FilterConfig, JudgePoint, Judgement, MetadataCache, OrigDst, Outcome,
    UpstreamHost, UpstreamMemory, Verdict,
};

/// Judges at the connection's end (every connection gets a verdict); `None`
/// when it cannot be judged.
fn judge(
    config: &FilterConfig,
    upstreams: &mut UpstreamMemory,
    facts: &mut Facts,
) -> Option<Judgement> {
    match dialguard_filter_core::judge(config, upstreams, facts, JudgePoint::End) {
        Outcome::Judged(judgement) => Some(judgement),
        Outcome::Unjudged => None,
        Outcome::NotYet => panic!("judging at the end never waits"),
    }
}

/// Plain values, with a log of which facts were read (each read is a hostcall in Envoy).
#[derive(Default)]
struct Facts {
    dst: Option<&'static str>,
    upstream: Option<&'static str>,
    cluster: Option<&'static str>,
    response_flags: u64,
    reads: Vec<&'static str>,
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

impl ConnectionFacts for Facts {
    fn original_destination(&mut self) -> Option<OrigDst> {
        self.reads.push("destination");
        self.dst.map(|a| OrigDst(addr(a)))
    }
    fn upstream_host(&mut self) -> Option<UpstreamHost> {
        self.reads.push("upstream");
        self.upstream.map(|a| UpstreamHost(addr(a)))
    }
    fn cluster_name(&mut self) -> Option<String> {
        self.reads.push("cluster");
        self.cluster.map(str::to_owned)
    }
    fn source(&mut self) -> Option<SocketAddr> {
        self.reads.push("source");
        Some(addr("10.0.1.6:40000"))
    }
    fn connection_id(&mut self) -> Option<u64> {
        self.reads.push("connection_id");
        Some(42)
    }
    fn filter_chain_name(&mut self) -> Option<String> {
        self.reads.push("filter_chain");
        None
    }
    fn response_flags(&mut self) -> Option<u64> {
        self.reads.push("response_flags");
        Some(self.response_flags)
    }
    fn upstream_transport_failure_reason(&mut self) -> Option<String> {
        self.reads.push("failure_reason");
        None
    }
    fn intended_service(&mut self) -> Option<String> {
        self.reads.push("intended_service");
        Some("app-ext.app.svc.cluster.local".into())
    }
    fn upstream_workload(&mut self) -> Option<String> {
        self.reads.push("upstream_workload");
        Some("idle;manager;idle;latest;Kubernetes".into())
    }
}

fn memory() -> UpstreamMemory {
    UpstreamMemory::new(64)
}

fn config(extra: &str) -> FilterConfig {
    let json = format!(
        r#"{{ "collector": {{ "cluster": "dialguard_collector" }},
              "serviceCidrs": ["10.96.0.0/12", "fd00:96::/108"] {extra} }}"#
    );
    FilterConfig::from_json(json.as_bytes()).expect("test config")
}

const ALLOW: &str = r#", "allow": [
    { "cluster": "outbound|5432||db.example.com" },
    { "cluster": "outbound|6379||*" },
    { "destinationCidr": "10.1.0.0/16", "port": 5432 },
    { "destinationCidr": "fd00:1::/64" } ]"#;

#[test]
fn verdict_table() {
    // (config extra, dialed, upstream, cluster, verdict)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        Option<Verdict>,
    );
    let cases: &[Case] = &[
        (
            "",
            "10.0.1.7:5701",
            Some("10.0.1.7:5701"),
            None,
            Some(Verdict::Match),
        ),
        (
            "",
            "10.0.1.7:5701",
            Some("10.0.3.9:5701"),
            None,
            Some(Verdict::Misrouted),
        ),
        (
            "",
            "10.0.1.7:5701",
            Some("10.0.1.7:5702"),
            None,
            Some(Verdict::Misrouted),
        ),
        (
            "",
            "10.0.1.7:5701",
            None,
            Some("BlackHoleCluster"),
            Some(Verdict::Blackholed),
        ),
        (
            "",
            "10.96.3.4:5701",
            Some("10.0.1.7:5701"),
            None,
            Some(Verdict::Service),
        ),
        ("", "10.96.3.4:5701", None, None, Some(Verdict::Service)),
        (
            "",
            "10.111.255.255:80",
            Some("10.0.1.7:80"),
            None,
            Some(Verdict::Service),
        ),
        // Outside the pod ranges: not certain.
        (
            "",
            "10.112.0.1:80",
            Some("10.0.1.7:80"),
            None,
            Some(Verdict::Redirected),
        ),
        // Istio's auto-allocated ServiceEntry VIPs are VIPs.
        (
            "",
            "240.240.0.5:443",
            Some("203.0.113.11:443"),
            None,
            Some(Verdict::Service),
        ),
        (
            "",
            "[2001:2::5]:443",
            Some("[2001:db8::11]:443"),
            None,
            Some(Verdict::Service),
        ),
        // IPv6
        (
            "",
            "[fd00:10::7]:5701",
            Some("[fd00:10::7]:5701"),
            None,
            Some(Verdict::Match),
        ),
        (
            "",
            "[fd00:10::7]:5701",
            Some("[fd00:10::9]:5701"),
            None,
            Some(Verdict::Misrouted),
        ),
        (
            "",
            "[fd00:96::1]:5701",
            Some("[fd00:10::9]:5701"),
            None,
            Some(Verdict::Service),
        ),
        (
            "",
            "[fd00:10::7]:5701",
            None,
            None,
            Some(Verdict::Blackholed),
        ),
        // Allow rules: exact cluster, cluster prefix, CIDR + port, CIDR alone.
        (
            ALLOW,
            "10.0.1.7:5432",
            Some("10.0.9.9:5432"),
            Some("outbound|5432||db.example.com"),
            Some(Verdict::Allowed),
        ),
        (
            ALLOW,
            "10.0.1.7:5432",
            Some("10.0.9.9:5432"),
            Some("outbound|5432||db.example.org"),
            Some(Verdict::Misrouted),
        ),
        (
            ALLOW,
            "10.0.1.7:6379",
            Some("10.0.9.9:6379"),
            Some("outbound|6379||redis.cache.svc.cluster.local"),
            Some(Verdict::Allowed),
        ),
        (
            ALLOW,
            "10.1.4.4:5432",
            Some("10.0.9.9:5432"),
            Some("x"),
            Some(Verdict::Allowed),
        ),
        (
            ALLOW,
            "10.1.4.4:5433",
            Some("10.0.9.9:5433"),
            Some("x"),
            Some(Verdict::Redirected),
        ),
        (
            ALLOW,
            "10.0.4.4:5433",
            Some("10.0.9.9:5433"),
            Some("x"),
            Some(Verdict::Misrouted),
        ),
        (
            ALLOW,
            "[fd00:1::5]:1",
            Some("[fd00:2::5]:1"),
            Some("x"),
            Some(Verdict::Allowed),
        ),
        (
            ALLOW,
            "10.0.1.7:5432",
            None,
            Some("outbound|5432||db.example.com"),
            Some(Verdict::Allowed),
        ),
        (
            ALLOW,
            "10.0.1.7:5701",
            None,
            Some("BlackHoleCluster"),
            Some(Verdict::Blackholed),
        ),
        // A match needs no allow rule.
        (
            ALLOW,
            "10.0.1.7:5701",
            Some("10.0.1.7:5701"),
            None,
            Some(Verdict::Match),
        ),
    ];
    for (extra, dst, upstream, cluster, expected) in cases {
        let mut facts = Facts {
            dst: Some(dst),
            upstream: *upstream,
            cluster: *cluster,
            ..Facts::default()
        };
        let config = config(&format!("{PODS}{extra}"));
        let verdict = judge(&config, &mut memory(), &mut facts).map(|j| j.verdict);
        assert_eq!(
            verdict, *expected,
            "dialed {dst}, upstream {upstream:?}, cluster {cluster:?}, config {extra:?}"
        );
    }
}

#[test]
fn unknown_original_destination_is_not_judged() {
    let mut facts = Facts {
        upstream: Some("10.0.1.7:5701"),
        ..Facts::default()
    };
    assert_eq!(judge(&config(""), &mut memory(), &mut facts), None);
    assert_eq!(facts.reads, ["destination"]);
    let mut open = Facts::default();
    assert_eq!(
        dialguard_filter_core::judge(&config(""), &mut memory(), &mut open, JudgePoint::Open),
        Outcome::Unjudged
    );
}

#[test]
fn reads_only_what_the_decision_needs() {
    // A VIP is decided from the destination alone.
    let mut vip = Facts {
        dst: Some("10.96.0.10:53"),
        ..Facts::default()
    };
    judge(&config(ALLOW), &mut memory(), &mut vip);
    assert_eq!(vip.reads, ["destination"]);
    // A match needs the upstream too, and nothing else.
    let mut matched = Facts {
        dst: Some("10.0.1.7:80"),
        upstream: Some("10.0.1.7:80"),
        ..Facts::default()
    };
    judge(&config(ALLOW), &mut memory(), &mut matched);
    assert_eq!(matched.reads, ["destination", "upstream"]);
    // A difference needs the cluster (for the DNS memory), read once.
    let mut differs = Facts {
        dst: Some("10.0.1.7:80"),
        upstream: Some("10.0.3.9:80"),
        cluster: Some("outbound|80||app-ext.app.svc.cluster.local"),
        ..Facts::default()
    };
    let judgement = judge(&config(PODS), &mut memory(), &mut differs).expect("judged");
    assert_eq!(differs.reads, ["destination", "upstream", "cluster"]);
    judgement.to_event(&mut differs, &mut MetadataCache::new(8), 1, 0);
    assert_eq!(differs.reads.iter().filter(|r| **r == "cluster").count(), 1);
    // No upstream and no cluster rule: the cluster is left for the report.
    let mut blackholed = Facts {
        dst: Some("10.0.1.7:80"),
        ..Facts::default()
    };
    judge(&config(""), &mut memory(), &mut blackholed);
    assert_eq!(blackholed.reads, ["destination", "upstream"]);
}

const PODS: &str = r#", "podCidrs": ["10.0.0.0/16", "fd00:10::/64"]"#;

#[test]
fn outside_the_pod_ranges_a_difference_is_redirected() {
    let cases = [
        // (podCidrs, dialed, upstream, verdict)
        (PODS, "10.0.1.7:5701", "10.0.3.9:5701", Verdict::Misrouted),
        (
            PODS,
            "203.0.113.10:443",
            "203.0.113.11:443",
            Verdict::Redirected,
        ),
        (
            PODS,
            "[2001:db8::10]:443",
            "[2001:db8::11]:443",
            Verdict::Redirected,
        ),
        (
            PODS,
            "[fd00:10::7]:5701",
            "[fd00:10::9]:5701",
            Verdict::Misrouted,
        ),
        (PODS, "10.96.0.10:53", "10.0.0.5:53", Verdict::Service),
        // Without pod ranges no difference is certain.
        (
            "",
            "203.0.113.10:443",
            "203.0.113.11:443",
            Verdict::Redirected,
        ),
        ("", "10.0.1.7:5701", "10.0.3.9:5701", Verdict::Redirected),
    ];
    for (pods, dst, upstream, expected) in cases {
        let mut facts = Facts {
            dst: Some(dst),
            upstream: Some(upstream),
            cluster: Some("c"),
            ..Facts::default()
        };
        let judgement = judge(&config(pods), &mut memory(), &mut facts).expect("judged");
        assert_eq!(judgement.verdict, expected, "{pods} {dst} -> {upstream}");
    }
    let mut blackholed = Facts {
        dst: Some("203.0.113.10:443"),
        ..Facts::default()
    };
    assert_eq!(
        judge(&config(PODS), &mut memory(), &mut blackholed).map(|j| j.verdict),
        Some(Verdict::Blackholed)
    );
}

#[test]
fn a_dns_cluster_picking_another_address_of_the_name_is_resolved() {
    let mut upstreams = memory();
    let mut connection = |dst, upstream, cluster| {
        let mut facts = Facts {
            dst: Some(dst),
            upstream: Some(upstream),
            cluster: Some(cluster),
            ..Facts::default()
        };
        judge(&config(PODS), &mut upstreams, &mut facts).map(|j| j.verdict)
    };
    let db = "outbound|5432||db.example.com";
    // The app resolved db.example.com to .10, Envoy's STRICT_DNS cluster picked .11.
    assert_eq!(
        connection("203.0.113.10:5432", "203.0.113.11:5432", db),
        Some(Verdict::Redirected)
    );
    // Once .10 has been an upstream host of that cluster, dialing it and landing on .11 is DNS.
    assert_eq!(
        connection("203.0.113.11:5432", "203.0.113.10:5432", db),
        Some(Verdict::Resolved)
    );
    assert_eq!(
        connection("203.0.113.10:5432", "203.0.113.11:5432", db),
        Some(Verdict::Resolved)
    );
    // Another cluster, another port, or an address never seen: not resolved.
    assert_eq!(
        connection(
            "203.0.113.10:5432",
            "203.0.113.12:5432",
            "outbound|5432||other.example.com"
        ),
        Some(Verdict::Redirected)
    );
    assert_eq!(
        connection("203.0.113.10:5433", "203.0.113.11:5433", db),
        Some(Verdict::Redirected)
    );
    // The incident is never masked: the peer pod is not an upstream of app-ext.
    let app_ext = "outbound|5701||app-ext.app.svc.cluster.local";
    for _ in 0..3 {
        assert_eq!(
            connection("10.0.1.7:5701", "10.0.3.9:5701", app_ext),
            Some(Verdict::Misrouted)
        );
    }
}

#[test]
fn upstream_memory_is_bounded() {
    let mut upstreams = UpstreamMemory::new(3);
    for i in 1..=5u8 {
        upstreams.record("c", SocketAddr::from(([10, 0, 0, i], 80)));
    }
    assert_eq!(upstreams.len(), 3);
    assert!(!upstreams.has_seen("c", SocketAddr::from(([10, 0, 0, 1], 80))));
    assert!(upstreams.has_seen("c", SocketAddr::from(([10, 0, 0, 5], 80))));
    assert!(!upstreams.has_seen("d", SocketAddr::from(([10, 0, 0, 5], 80))));
}

#[test]
fn reported_event_carries_both_sides_and_the_details() {
    let mut facts = Facts {
        dst: Some("10.0.1.7:5701"),
        upstream: Some("10.0.3.9:5701"),
        cluster: Some("outbound|5701||app-ext.app.svc.cluster.local"),
        response_flags: 0x8020,
        ..Facts::default()
    };
    let judgement = judge(&config(PODS), &mut memory(), &mut facts).expect("judged");
    assert!(judgement.is_reported());
    let event = judgement.to_event(
        &mut facts,
        &mut MetadataCache::new(8),
        7,
        1_700_000_000_000_000_000,
    );
    assert_eq!(event.sequence, 7);
    let dst = event
        .original_destination
        .clone()
        .expect("original destination");
    let upstream = event.upstream_host.clone().expect("upstream");
    assert_eq!((dst.ip.as_str(), dst.port), ("10.0.1.7", 5701));
    assert_eq!((upstream.ip.as_str(), upstream.port), ("10.0.3.9", 5701));
    assert_eq!(
        event.cluster_name,
        "outbound|5701||app-ext.app.svc.cluster.local"
    );
    assert_eq!(event.verdict(), Verdict::Misrouted);
    assert!(
        event.would_close,
        "a certain misroute is what enforce closes"
    );
    assert!(
        !event.judged_open,
        "judge_and_record sets it; to_event does not guess"
    );
    assert_eq!(event.response_flags, 0x8020);
    assert_eq!(event.connection_id, 42);
    assert_eq!(event.intended_service, "app-ext.app.svc.cluster.local");
    assert_eq!(event.source.as_ref().expect("source").ip, "10.0.1.6");
    assert_eq!(
        event.upstream_workload,
        "idle;manager;idle;latest;Kubernetes"
    );
}

#[test]
fn only_misrouted_redirected_and_blackholed_are_reported() {
    for (upstream, reported) in [
        (Some("10.0.1.7:1"), false),
        (Some("10.0.1.8:1"), true),
        (None, true),
    ] {
        let mut facts = Facts {
            dst: Some("10.0.1.7:1"),
            upstream,
            ..Facts::default()
        };
        assert_eq!(
            judge(&config(""), &mut memory(), &mut facts)
                .expect("judged")
                .is_reported(),
            reported
        );
    }
    let mut vip = Facts {
        dst: Some("10.96.0.1:443"),
        upstream: Some("10.0.0.5:6443"),
        ..Facts::default()
    };
    assert!(
        !judge(&config(""), &mut memory(), &mut vip)
            .expect("judged")
            .is_reported()
    );
}

/// Reads of one reported connection's event, after `judge`.
fn event_reads(
    upstream: &'static str,
    cluster: &'static str,
    response_flags: u64,
    metadata: &mut MetadataCache,
    at_ns: u64,
) -> Vec<&'static str> {
    let mut facts = Facts {
        dst: Some("10.0.1.7:5701"),
        upstream: Some(upstream),
        cluster: Some(cluster),
        response_flags,
        ..Facts::default()
    };
    let judgement = judge(&config(PODS), &mut memory(), &mut facts).expect("judged");
    facts.reads.clear();
    judgement.to_event(&mut facts, metadata, 1, at_ns);
    facts.reads
}

#[test]
fn metadata_is_read_once_a_minute_per_cluster_and_host() {
    const CATCH_ALL: &str = "outbound|5701||app-ext.app.svc.cluster.local";
    const MINUTE: u64 = 60_000_000_000;
    let t0 = 1_700_000_000_000_000_000;
    let mut metadata = MetadataCache::new(64);
    let all = [
        "response_flags",
        "intended_service",
        "upstream_workload",
        "source",
        "connection_id",
        "filter_chain",
    ];
    assert_eq!(
        event_reads("10.0.3.9:5701", CATCH_ALL, 0, &mut metadata, t0),
        all
    );
    // The same catch-all and host again: no metadata reads.
    let again = event_reads("10.0.3.9:5701", CATCH_ALL, 0, &mut metadata, t0 + 1);
    assert_eq!(
        again,
        ["response_flags", "source", "connection_id", "filter_chain"]
    );
    // Another host behind the same cluster: only its workload.
    let other_host = event_reads("10.0.3.10:5701", CATCH_ALL, 0, &mut metadata, t0 + 2);
    assert_eq!(
        other_host,
        [
            "response_flags",
            "upstream_workload",
            "source",
            "connection_id",
            "filter_chain"
        ]
    );
    // A minute later (an xDS update may have changed it), or a clock that
    // went backwards: read again.
    let later = event_reads("10.0.3.9:5701", CATCH_ALL, 0, &mut metadata, t0 + MINUTE);
    assert_eq!(later, all);
    let backwards = event_reads("10.0.3.9:5701", CATCH_ALL, 0, &mut metadata, t0);
    assert_eq!(backwards, all);
}

#[test]
fn failure_reason_is_read_only_when_a_flag_says_the_upstream_failed() {
    let cluster = "outbound|5701||app-ext.app.svc.cluster.local";
    let mut metadata = MetadataCache::new(64);
    let quiet = event_reads("10.0.3.9:5701", cluster, 0, &mut metadata, 1);
    assert!(!quiet.contains(&"failure_reason"), "{quiet:?}");
    // UF: upstream connection failure.
    let failed = event_reads("10.0.3.9:5701", cluster, 0x20, &mut metadata, 2);
    assert!(failed.contains(&"failure_reason"), "{failed:?}");
}

#[test]
fn metadata_cache_is_bounded() {
    let mut metadata = MetadataCache::new(4);
    for i in 0..100u16 {
        let cluster = format!("outbound|{i}||svc-{i}.ns.svc.cluster.local");
        let host = SocketAddr::from(([10, 0, 3, 9], i));
        metadata.intended_service(&cluster, 1, || Some("svc".into()));
        metadata.upstream_workload(&cluster, host, 1, || Some("w".into()));
        assert!(metadata.len() <= 8, "{} entries", metadata.len());
    }
}

/// An ExternalName Service aliasing a headless Service: the catch-all's DNS
/// name resolves to pod IPs, so the cluster's upstream hosts are pods. A pod
/// dialed directly and sent to another pod of that set is misrouted every
/// time, though the dialed pod was seen as an upstream of the cluster.
#[test]
fn a_pod_ip_sent_elsewhere_is_misrouted_whatever_was_learned() {
    let mut upstreams = memory();
    let cluster = "outbound|5701||peers-ext.app.svc.cluster.local";
    let pods = ["10.0.1.7:5701", "10.0.1.8:5701", "10.0.1.9:5701"];
    for v6 in [false, true] {
        let pods: Vec<String> = pods
            .iter()
            .map(|p| {
                if v6 {
                    let last = &p[7..8];
                    format!("[fd00:10::{last}]:5701")
                } else {
                    (*p).to_owned()
                }
            })
            .collect();
        for round in 0..3 {
            for (i, dialed) in pods.iter().enumerate() {
                let reached = &pods[(i + 1 + round % 2) % pods.len()];
                let mut facts = Facts {
                    dst: Some(Box::leak(dialed.clone().into_boxed_str())),
                    upstream: Some(Box::leak(reached.clone().into_boxed_str())),
                    cluster: Some(cluster),
                    ..Facts::default()
                };
                let judgement = judge(&config(PODS), &mut upstreams, &mut facts).expect("judged");
                assert_eq!(
                    judgement.verdict,
                    Verdict::Misrouted,
                    "round {round}: {dialed} -> {reached}"
                );
                assert!(judgement.would_close());
            }
        }
    }
}

/// DNS load balancing: the application resolved a name with several A
/// records and dialed one; the ServiceEntry's STRICT_DNS cluster picked
/// another. Never MISROUTED, from the first connection, with or without pod
/// ranges; with them, known addresses of the name become RESOLVED.
#[test]
fn dns_load_balancing_is_never_misrouted() {
    let cluster = "outbound|443||api.example.com";
    let records = ["203.0.113.10:443", "203.0.113.11:443", "203.0.113.12:443"];
    let records6 = [
        "[2001:db8::10]:443",
        "[2001:db8::11]:443",
        "[2001:db8::12]:443",
    ];
    for pods in [PODS, ""] {
        for records in [records, records6] {
            // The application dials the first record, or rotates over them
            // as resolvers do; Envoy round-robins over all of them.
            for rotates in [false, true] {
                let mut upstreams = memory();
                let mut verdicts = Vec::new();
                for n in 0..20 {
                    let dialed = if rotates { records[n % 3] } else { records[0] };
                    let mut facts = Facts {
                        dst: Some(dialed),
                        upstream: Some(records[(n * 2) % 3]),
                        cluster: Some(cluster),
                        ..Facts::default()
                    };
                    let judgement =
                        judge(&config(pods), &mut upstreams, &mut facts).expect("judged");
                    assert!(!judgement.would_close());
                    verdicts.push(judgement.verdict);
                }
                assert!(
                    !verdicts.contains(&Verdict::Misrouted),
                    "{pods:?}: {verdicts:?}"
                );
                if pods.is_empty() {
                    // Without pod ranges the filter cannot tell external from
                    // pod: every difference goes to the collector to decide.
                    assert!(
                        verdicts
                            .iter()
                            .all(|v| matches!(v, Verdict::Match | Verdict::Redirected)),
                        "{verdicts:?}"
                    );
                } else if rotates {
                    // Once a record has been reached through the cluster,
                    // dialing it and landing elsewhere is DNS, not capture.
                    let later = verdicts.get(6..).unwrap_or_default();
                    assert!(
                        later
                            .iter()
                            .all(|v| matches!(v, Verdict::Match | Verdict::Resolved)),
                        "{verdicts:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn an_open_connection_is_judged_once_its_upstream_is_chosen() {
    let open = |facts: &mut Facts| {
        dialguard_filter_core::judge(&config(PODS), &mut memory(), facts, JudgePoint::Open)
    };
    // Still connecting: no verdict yet, and nothing read past the upstream.
    let mut connecting = Facts {
        dst: Some("10.0.1.7:5701"),
        ..Facts::default()
    };
    assert_eq!(open(&mut connecting), Outcome::NotYet);
    assert_eq!(connecting.reads, ["destination", "upstream"]);
    // A VIP needs no upstream.
    let mut vip = Facts {
        dst: Some("10.96.0.10:53"),
        ..Facts::default()
    };
    assert!(matches!(open(&mut vip), Outcome::Judged(j) if j.verdict == Verdict::Service));
    // Connected elsewhere: misrouted while open.
    let mut captured = Facts {
        dst: Some("10.0.1.7:5701"),
        upstream: Some("10.0.1.9:5701"),
        cluster: Some("outbound|5701||app-ext.app.svc.cluster.local"),
        ..Facts::default()
    };
    assert!(matches!(open(&mut captured), Outcome::Judged(j) if j.verdict == Verdict::Misrouted));
    // At the end, no upstream means blackholed.
    let mut blackholed = Facts {
        dst: Some("10.0.1.7:5701"),
        cluster: Some("BlackHoleCluster"),
        ..Facts::default()
    };
    assert_eq!(
        judge(&config(PODS), &mut memory(), &mut blackholed).map(|j| j.verdict),
        Some(Verdict::Blackholed)
    );
}

#[test]
fn only_a_certain_misroute_would_be_closed() {
    for (pods, dst, upstream, cluster, close) in [
        (PODS, "10.0.1.7:5701", Some("10.0.1.9:5701"), "c", true),
        (
            PODS,
            "203.0.113.10:443",
            Some("203.0.113.11:443"),
            "c",
            false,
        ),
        ("", "10.0.1.7:5701", Some("10.0.1.9:5701"), "c", false),
        (PODS, "10.0.1.7:5701", None, "BlackHoleCluster", false),
        (PODS, "10.96.0.1:443", Some("10.0.0.5:6443"), "c", false),
    ] {
        let mut facts = Facts {
            dst: Some(dst),
            upstream,
            cluster: Some(cluster),
            ..Facts::default()
        };
        let judgement = judge(&config(pods), &mut memory(), &mut facts).expect("judged");
        assert_eq!(
            judgement.would_close(),
            close,
            "{pods:?} {dst} -> {upstream:?}"
        );
    }
}
