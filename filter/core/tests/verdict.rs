//! The verdict table, driven through the same host trait the wasm glue implements.

use std::net::SocketAddr;

use dialguard_filter_core::{ConnectionFacts, FilterConfig, OrigDst, UpstreamHost, Verdict, judge};

/// Plain values, with a log of which facts were read (each read is a hostcall in Envoy).
#[derive(Default)]
struct Facts {
    dst: Option<&'static str>,
    upstream: Option<&'static str>,
    cluster: Option<&'static str>,
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
        Some(0x8020)
    }
    fn upstream_transport_failure_reason(&mut self) -> Option<String> {
        self.reads.push("failure_reason");
        None
    }
    fn intended_service(&mut self) -> Option<String> {
        self.reads.push("intended_service");
        Some("app-ext.app.svc.cluster.local".into())
    }
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
        (
            "",
            "10.112.0.1:80",
            Some("10.0.1.7:80"),
            None,
            Some(Verdict::Misrouted),
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
        let verdict = judge(&config(extra), &mut facts).map(|j| j.verdict);
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
    assert_eq!(judge(&config(""), &mut facts), None);
    assert_eq!(facts.reads, ["destination"]);
}

#[test]
fn reads_only_what_the_decision_needs() {
    // A VIP is decided from the destination alone.
    let mut vip = Facts {
        dst: Some("10.96.0.10:53"),
        ..Facts::default()
    };
    judge(&config(ALLOW), &mut vip);
    assert_eq!(vip.reads, ["destination"]);
    // A match needs the upstream too, and nothing else.
    let mut matched = Facts {
        dst: Some("10.0.1.7:80"),
        upstream: Some("10.0.1.7:80"),
        ..Facts::default()
    };
    judge(&config(ALLOW), &mut matched);
    assert_eq!(matched.reads, ["destination", "upstream"]);
    // Without cluster rules the cluster is not read to decide.
    let mut no_rules = Facts {
        dst: Some("10.0.1.7:80"),
        upstream: Some("10.0.3.9:80"),
        ..Facts::default()
    };
    judge(&config(""), &mut no_rules);
    assert_eq!(no_rules.reads, ["destination", "upstream"]);
}

#[test]
fn reported_event_carries_both_sides_and_the_details() {
    let mut facts = Facts {
        dst: Some("10.0.1.7:5701"),
        upstream: Some("10.0.3.9:5701"),
        cluster: Some("outbound|5701||app-ext.app.svc.cluster.local"),
        ..Facts::default()
    };
    let judgement = judge(&config(""), &mut facts).expect("judged");
    assert!(judgement.is_reported());
    let event = judgement.to_event(&mut facts, 7, 1_700_000_000_000_000_000);
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
    assert_eq!(event.response_flags, 0x8020);
    assert_eq!(event.connection_id, 42);
    assert_eq!(event.intended_service, "app-ext.app.svc.cluster.local");
    assert_eq!(event.source.as_ref().expect("source").ip, "10.0.1.6");
}

#[test]
fn only_misrouted_and_blackholed_are_reported() {
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
            judge(&config(""), &mut facts)
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
    assert!(!judge(&config(""), &mut vip).expect("judged").is_reported());
}
