//! Configuration parsing: defaults, and an error naming the field for every mistake.

use dialguard_filter_core::{FilterConfig, Mode};

fn error(json: &str) -> (String, String) {
    let err = FilterConfig::from_json(json.as_bytes()).expect_err(json);
    (err.field, err.message)
}

#[test]
fn issue_example_parses() {
    let config = FilterConfig::from_json(
        br#"{ "mode": "audit",
              "collector": { "cluster": "dialguard_collector", "flushIntervalMs": 200 },
              "serviceCidrs": ["10.96.0.0/12"],
              "podCidrs": ["10.244.0.0/16"],
              "allow": [ { "cluster": "outbound|5432||db.example.com" },
                         { "destinationCidr": "10.1.0.0/16", "port": 5432 } ] }"#,
    )
    .expect("valid");
    assert_eq!(config.mode, Mode::Audit);
    assert_eq!(config.allow.len(), 2);
    assert_eq!(config.pod_cidrs.len(), 1);
}

#[test]
fn everything_but_the_collector_cluster_has_a_default() {
    let config = FilterConfig::from_json(br#"{ "collector": { "cluster": "c" } }"#).expect("valid");
    assert_eq!(config.mode, Mode::Audit);
    assert_eq!(config.collector.flush_interval_ms, 200);
    assert_eq!(config.collector.heartbeat_interval_ms, 60_000);
    assert_eq!(config.module_sha256, None);
    assert!(config.is_service_vip("10.96.0.1".parse().expect("ip")));
    assert!(!config.is_service_vip("10.244.1.1".parse().expect("ip")));
    assert!(config.allow.is_empty());
    // A bare address is a /32.
    let single = FilterConfig::from_json(
        br#"{ "collector": { "cluster": "c" }, "serviceCidrs": ["10.0.0.1"] }"#,
    )
    .expect("valid");
    assert!(single.is_service_vip("10.0.0.1".parse().expect("ip")));
    assert!(!single.is_service_vip("10.0.0.2".parse().expect("ip")));
}

#[test]
fn every_mistake_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("", ".", "expected a JSON object"),
        ("not json", ".", "expected"),
        ("{}", ".", "missing field `collector`"),
        (
            r#"{ "collector": {} }"#,
            "collector",
            "missing field `cluster`",
        ),
        (
            r#"{ "collector": { "cluster": "" } }"#,
            "collector.cluster",
            "empty",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "mode": "loud" }"#,
            "mode",
            "unknown variant `loud`",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "colector": 1 }"#,
            "colector",
            "unknown field `colector`",
        ),
        (
            r#"{ "collector": { "cluster": "c", "flushIntervalMs": 0 } }"#,
            "collector.flushIntervalMs",
            "10 to 60000",
        ),
        (
            r#"{ "collector": { "cluster": "c", "flushIntervalMs": "fast" } }"#,
            "collector.flushIntervalMs",
            "expected u64",
        ),
        (
            r#"{ "collector": { "cluster": "c", "heartbeatIntervalMs": 999 } }"#,
            "collector.heartbeatIntervalMs",
            "1000 to 3600000",
        ),
        (
            r#"{ "collector": { "cluster": "c", "heartbeatIntervalMs": 3600001 } }"#,
            "collector.heartbeatIntervalMs",
            "1000 to 3600000",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "moduleSha256": "abc" }"#,
            "moduleSha256",
            "64 hexadecimal digits",
        ),
        (
            r#"{ "collector": { "cluster": "c", "maxBatchEvents": 0 } }"#,
            "collector.maxBatchEvents",
            "1 to 10000",
        ),
        (
            r#"{ "collector": { "cluster": "c", "maxBufferedEvents": 10 } }"#,
            "collector.maxBufferedEvents",
            "maxBatchEvents",
        ),
        (
            r#"{ "collector": { "cluster": "c", "maxBufferedBytes": 1 } }"#,
            "collector.maxBufferedBytes",
            "4096",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "serviceCidrs": ["10.96.0.0/33"] }"#,
            "serviceCidrs[0]",
            "expected a CIDR",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "podCidrs": ["ok", 1] }"#,
            "podCidrs[0]",
            "expected a CIDR",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ {} ] }"#,
            "allow[0]",
            "at least one of",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "port": 1 }, { "destinationCidr": "x" } ] }"#,
            "allow[1].destinationCidr",
            "expected a CIDR",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "cluster": "*" } ] }"#,
            "allow[0].cluster",
            "ending with `*`",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "cluster": "a*b" } ] }"#,
            "allow[0].cluster",
            "ending with `*`",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "port": 0 } ] }"#,
            "allow[0].port",
            "1 to 65535",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "port": 70000 } ] }"#,
            "allow[0].port",
            "u16",
        ),
        (
            r#"{ "collector": { "cluster": "c" }, "allow": [ { "port": 1, "sni": "x" } ] }"#,
            "allow[0].sni",
            "unknown field `sni`",
        ),
    ];
    for (json, field, message) in cases {
        let (got_field, got_message) = error(json);
        assert_eq!(&got_field, field, "field for {json}: {got_message}");
        assert!(
            got_message.contains(message),
            "message for {json}: {got_message:?} lacks {message:?}"
        );
    }
}

#[test]
fn display_names_field_and_expectation() {
    let err = FilterConfig::from_json(
        br#"{ "collector": { "cluster": "c" }, "serviceCidrs": ["nope"] }"#,
    )
    .expect_err("invalid");
    let line = err.to_string();
    assert!(
        line.starts_with("invalid dialguard configuration at `serviceCidrs[0]`: expected a CIDR"),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn enforce_needs_pod_ranges() {
    let (field, message) = error(r#"{ "collector": { "cluster": "c" }, "mode": "enforce" }"#);
    assert_eq!(field, "podCidrs");
    assert!(message.contains("needs the pod ranges"), "{message}");
    let config = FilterConfig::from_json(
        br#"{ "collector": { "cluster": "c" }, "mode": "enforce", "podCidrs": ["10.244.0.0/16"] }"#,
    )
    .expect("valid");
    assert_eq!(config.mode, Mode::Enforce);
}

#[test]
fn istio_auto_allocated_addresses_are_service_vips() {
    let config =
        FilterConfig::from_json(br#"{ "collector": { "cluster": "c" }, "serviceCidrs": [] }"#)
            .expect("valid");
    for vip in ["240.240.0.1", "240.240.255.254", "2001:2::7"] {
        assert!(config.is_service_vip(vip.parse().expect("ip")), "{vip}");
    }
    for not_vip in ["240.241.0.1", "10.96.0.1", "2001:3::7"] {
        assert!(
            !config.is_service_vip(not_vip.parse().expect("ip")),
            "{not_vip}"
        );
    }
}
