//! `dialguard analyze` logic on real Istio dumps (../shared/testdata/istio/)
//! and on dumps derived from them with the catch-all listeners of the
//! incident: an ExternalName Service and a DNS ServiceEntry without addresses
//! that declare a shared TCP port.

use dialguard_envoyfilter::analyze::{
    AnalyzeError, Finding, analyze, analyze_dump, parse, render_json, render_table,
};
use serde_json::{Value, json};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/istio");

/// The own pod IP of the derived sidecar.
const POD_IP: &str = "10.244.1.17";
const APP_EXT_CLUSTER: &str = "outbound|5701||app-ext.app.svc.cluster.local";
const APP_EXT_HOST: &str = "app-ext.app.svc.cluster.local";
const MONGO_CLUSTER: &str = "outbound|27017||mongo.external.example.com";
const MONGO_HOST: &str = "mongo.external.example.com";

fn load(name: &str) -> Value {
    let path = format!("{TESTDATA}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn sidecar_dump() -> Value {
    load("sidecar-listeners-configdump.json")
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        }
    })
}

/// A catch-all outbound listener `0.0.0.0_<port>` as istiod renders it for a
/// TCP service without a VIP: the own pod IP goes to `BlackHoleCluster`
/// (no loop to itself), everything else to `cluster`.
fn catch_all_listener(port: u16, cluster: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": format!("0.0.0.0_{port}"),
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": port } },
        "filter_chains": [
            {
                "filter_chain_match": {
                    "prefix_ranges": [{ "address_prefix": POD_IP, "prefix_len": 32 }]
                },
                "filters": [
                    { "name": "istio.stats", "typed_config": { "@type": "type.googleapis.com/stats.PluginConfig" } },
                    tcp_proxy("BlackHoleCluster"),
                ]
            },
            {
                "filters": [
                    { "name": "istio.stats", "typed_config": { "@type": "type.googleapis.com/stats.PluginConfig" } },
                    tcp_proxy(cluster),
                ]
            }
        ],
        "traffic_direction": "OUTBOUND",
        "bind_to_port": false
    })
}

/// A STRICT_DNS cluster with Istio's service metadata.
fn dns_cluster(name: &str, host: &str, namespace: &str, port: u16, endpoint: &str) -> Value {
    let short = host.split('.').next().unwrap_or(host);
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "10s",
        "dns_lookup_family": "V4_ONLY",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": endpoint, "port_value": port }
            }}}]}]
        },
        "metadata": { "filter_metadata": { "istio": {
            "services": [{ "host": host, "name": short, "namespace": namespace }],
            "default_original_port": port
        }}}
    })
}

fn external_name_cluster() -> Value {
    dns_cluster(
        APP_EXT_CLUSTER,
        APP_EXT_HOST,
        "app",
        5701,
        "idle.manager.svc.cluster.local",
    )
}

fn mongo_cluster() -> Value {
    dns_cluster(MONGO_CLUSTER, MONGO_HOST, "databases", 27017, MONGO_HOST)
}

/// The real sidecar dump plus `listeners` (as active dynamic listeners) and,
/// when there are any, a ClustersConfigDump holding `clusters`.
fn derived(listeners: &[Value], clusters: &[Value]) -> Value {
    let mut dump = sidecar_dump();
    let dynamic = dump["configs"][0]["dynamic_listeners"]
        .as_array_mut()
        .expect("dynamic_listeners");
    for listener in listeners {
        dynamic.push(json!({
            "name": listener["name"],
            "active_state": { "version_info": "2025-01-01T00:00:00Z/42", "listener": listener }
        }));
    }
    if !clusters.is_empty() {
        let dynamic_active_clusters: Vec<Value> = clusters
            .iter()
            .map(|cluster| json!({ "version_info": "2025-01-01T00:00:00Z/42", "cluster": cluster }))
            .collect();
        let configs = dump["configs"].as_array_mut().expect("configs");
        configs.push(json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "version_info": "2025-01-01T00:00:00Z/42",
            "static_clusters": [],
            "dynamic_active_clusters": dynamic_active_clusters,
        }));
    }
    dump
}

fn external_name_dump() -> Value {
    derived(
        &[catch_all_listener(5701, APP_EXT_CLUSTER)],
        &[external_name_cluster()],
    )
}

/// Every object key in snake_case rewritten to lowerCamelCase, as proto3 JSON
/// may print it (`@type` and the metadata's own keys have no underscore).
fn camel_case(value: &Value) -> Value {
    match value {
        Value::Object(obj) => Value::Object(
            obj.iter()
                .map(|(k, v)| {
                    let mut key = String::new();
                    let mut upper = false;
                    for c in k.chars() {
                        match (c, upper) {
                            ('_', _) => upper = true,
                            (c, true) => {
                                key.extend(c.to_uppercase());
                                upper = false;
                            }
                            (c, false) => key.push(c),
                        }
                    }
                    (key, camel_case(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(camel_case).collect()),
        other => other.clone(),
    }
}

fn only(findings: Vec<Finding>) -> Finding {
    assert_eq!(
        findings.len(),
        1,
        "expected exactly one finding: {findings:#?}"
    );
    findings.into_iter().next().expect("one finding")
}

fn shape_error(input: Value) -> String {
    match analyze(&input) {
        Err(err @ AnalyzeError::Shape { .. }) => err.to_string(),
        other => panic!("expected a shape error for {input}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// (a) The real dumps: nothing to report
// ---------------------------------------------------------------------------

#[test]
fn real_sidecar_dump_has_no_findings() {
    let analysis = analyze_dump(&sidecar_dump()).expect("analyze");
    assert_eq!(analysis.findings, vec![]);
    // It did look: 2 static and 27 dynamic listeners, 0.0.0.0_9080 among them.
    assert_eq!(analysis.listeners, 29);
}

#[test]
fn real_none_mode_listeners_have_no_findings() {
    // An object of listeners by name in the old Go-struct JSON shape; its
    // 0.0.0.0_7070 is an inbound listener and `virtual` the capture listener.
    let analysis = analyze_dump(&load("none-lds-tcp.json")).expect("analyze");
    assert_eq!(analysis.findings, vec![]);
    assert_eq!(analysis.listeners, 9);
}

#[test]
fn old_go_struct_shape_is_read_not_skipped() {
    // The same 0.0.0.0_7070, pointed at an outbound cluster: found, so the
    // absence of findings above comes from reading the old shape.
    let mut dump = load("none-lds-tcp.json");
    let cluster = &mut dump["0.0.0.0_7070"]["filter_chains"][0]["filters"][0]["ConfigType"]["Config"]
        ["fields"]["cluster"]["Kind"]["StringValue"];
    assert_eq!(cluster, "inbound|7070|tcplocal|s1tcp.none");
    *cluster = json!("outbound|7070||s1tcp.none");
    let finding = only(analyze(&dump).expect("analyze"));
    assert_eq!(finding.port, 7070);
    assert_eq!(finding.cluster, "outbound|7070||s1tcp.none");
    assert_eq!(finding.services, vec!["s1tcp.none".to_string()]);

    // And `virtual` (0.0.0.0:15001 → BlackHoleCluster) is skipped only
    // because of `use_original_dst: {"value": true}`.
    let mut dump = load("none-lds-tcp.json");
    dump["virtual"]["use_original_dst"] = json!({ "value": false });
    let finding = only(analyze(&dump).expect("analyze"));
    assert_eq!(
        (finding.port, finding.cluster.as_str()),
        (15001, "BlackHoleCluster")
    );
}

#[test]
fn real_none_mode_clusters_have_no_findings() {
    let analysis = analyze_dump(&load("none-cds.json")).expect("analyze");
    assert_eq!(analysis.findings, vec![]);
    assert_eq!(analysis.listeners, 0);
    assert_eq!(analysis.clusters, 8);
}

// ---------------------------------------------------------------------------
// (b) Catch-alls that capture
// ---------------------------------------------------------------------------

#[test]
fn external_name_catch_all_is_found() {
    let finding = only(analyze(&external_name_dump()).expect("analyze"));
    assert_eq!(finding.port, 5701);
    assert_eq!(finding.listener, "0.0.0.0_5701");
    assert_eq!(finding.filter_chain, "filter_chains[1]");
    assert_eq!(finding.cluster, APP_EXT_CLUSTER);
    assert_eq!(finding.cluster_type.as_deref(), Some("STRICT_DNS"));
    assert_eq!(finding.services, vec![APP_EXT_HOST.to_string()]);
    assert!(finding.hint.contains("port 5701"), "{}", finding.hint);
    assert!(finding.hint.contains("ExternalName"), "{}", finding.hint);
    assert!(finding.hint.contains("exportTo"), "{}", finding.hint);
}

#[test]
fn external_name_catch_all_is_found_in_camel_case() {
    let finding = only(analyze(&camel_case(&external_name_dump())).expect("analyze"));
    assert_eq!(finding.port, 5701);
    assert_eq!(finding.cluster, APP_EXT_CLUSTER);
    assert_eq!(finding.cluster_type.as_deref(), Some("STRICT_DNS"));
    assert_eq!(finding.services, vec![APP_EXT_HOST.to_string()]);
}

#[test]
fn external_name_catch_all_is_found_in_a_listener_array() {
    // `istioctl proxy-config listeners -o json`: listeners only, so no
    // cluster type, and the service comes from the cluster's name.
    let mut listeners: Vec<Value> = sidecar_dump()["configs"][0]["dynamic_listeners"]
        .as_array()
        .expect("dynamic_listeners")
        .iter()
        .map(|l| l["active_state"]["listener"].clone())
        .collect();
    listeners.push(catch_all_listener(5701, APP_EXT_CLUSTER));
    let finding = only(analyze(&Value::Array(listeners)).expect("analyze"));
    assert_eq!(finding.port, 5701);
    assert_eq!(finding.cluster, APP_EXT_CLUSTER);
    assert_eq!(finding.cluster_type, None);
    assert_eq!(finding.services, vec![APP_EXT_HOST.to_string()]);
}

#[test]
fn the_chain_without_match_wins_over_the_default_filter_chain() {
    // Sniffed ports carry a PassthroughFilterChain as default; plain TCP
    // still lands on the chain with no match.
    let mut listener = catch_all_listener(5701, APP_EXT_CLUSTER);
    listener["default_filter_chain"] = json!({
        "name": "PassthroughFilterChain",
        "filters": [tcp_proxy("PassthroughCluster")]
    });
    let dump = derived(&[listener], &[external_name_cluster()]);
    assert_eq!(
        only(analyze(&dump).expect("analyze")).cluster,
        APP_EXT_CLUSTER
    );
}

#[test]
fn the_default_filter_chain_counts_when_no_chain_takes_plain_tcp() {
    // An HTTP chain (sniffed) and a TLS chain; plain TCP falls to the default.
    let listener = json!({
        "name": "0.0.0.0_5701",
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": 5701 } },
        "filter_chains": [
            { "filter_chain_match": { "transport_protocol": "raw_buffer", "application_protocols": ["http/1.1", "h2c"] },
              "filters": [{ "name": "envoy.filters.network.http_connection_manager", "typed_config": {} }] },
            { "filter_chain_match": { "transport_protocol": "tls" },
              "filters": [tcp_proxy("outbound|5701||tls-only.app.svc.cluster.local")] },
        ],
        "default_filter_chain": { "filters": [tcp_proxy(APP_EXT_CLUSTER)] },
        "traffic_direction": "OUTBOUND"
    });
    let finding = only(analyze(&derived(&[listener], &[])).expect("analyze"));
    assert_eq!(finding.filter_chain, "default_filter_chain");
    assert_eq!(finding.cluster, APP_EXT_CLUSTER);
}

#[test]
fn dns_service_entry_catch_all_is_found() {
    let dump = derived(
        &[catch_all_listener(27017, MONGO_CLUSTER)],
        &[mongo_cluster()],
    );
    let finding = only(analyze(&dump).expect("analyze"));
    assert_eq!(finding.port, 27017);
    assert_eq!(finding.listener, "0.0.0.0_27017");
    assert_eq!(finding.cluster, MONGO_CLUSTER);
    assert_eq!(finding.cluster_type.as_deref(), Some("STRICT_DNS"));
    assert_eq!(finding.services, vec![MONGO_HOST.to_string()]);
    assert!(finding.hint.contains("ServiceEntry"), "{}", finding.hint);
}

#[test]
fn both_catch_alls_are_found_sorted_by_port() {
    let dump = derived(
        &[
            catch_all_listener(27017, MONGO_CLUSTER),
            catch_all_listener(5701, APP_EXT_CLUSTER),
        ],
        &[mongo_cluster(), external_name_cluster()],
    );
    let ports: Vec<u16> = analyze(&dump)
        .expect("analyze")
        .iter()
        .map(|f| f.port)
        .collect();
    assert_eq!(ports, vec![5701, 27017]);
}

#[test]
fn ipv6_catch_all_and_weighted_clusters_are_found() {
    let mut listener = catch_all_listener(5701, APP_EXT_CLUSTER);
    listener["name"] = json!("[::]_5701");
    listener["address"]["socket_address"]["address"] = json!("::");
    listener["filter_chains"][1]["filters"][1] = json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "weighted",
            "weighted_clusters": { "clusters": [
                { "name": "PassthroughCluster", "weight": 10 },
                { "name": APP_EXT_CLUSTER, "weight": 90 },
            ]}
        }
    });
    let finding = only(analyze(&derived(&[listener], &[])).expect("analyze"));
    assert_eq!(finding.listener, "[::]_5701");
    assert_eq!(finding.cluster, APP_EXT_CLUSTER);
}

#[test]
fn a_per_port_blackhole_is_found_when_other_ports_pass_through() {
    // The real dump's virtualOutbound passes unknown destinations through
    // (ALLOW_ANY), so dropping them on one port is a capture too.
    let listener = catch_all_listener(5701, "BlackHoleCluster");
    let finding = only(analyze(&derived(&[listener], &[])).expect("analyze"));
    assert_eq!(finding.cluster, "BlackHoleCluster");
    assert!(finding.hint.contains("dropped"), "{}", finding.hint);
}

// ---------------------------------------------------------------------------
// (c) Catch-alls that do not capture
// ---------------------------------------------------------------------------

#[test]
fn passthrough_catch_all_is_not_found() {
    let dump = derived(&[catch_all_listener(5701, "PassthroughCluster")], &[]);
    assert_eq!(analyze(&dump).expect("analyze"), vec![]);
}

#[test]
fn original_dst_service_entry_is_not_found() {
    // A ServiceEntry with `resolution: NONE`: its cluster forwards to the
    // address the application dialed, so nothing goes elsewhere.
    let mut cluster = mongo_cluster();
    cluster["type"] = json!("ORIGINAL_DST");
    cluster["lb_policy"] = json!("CLUSTER_PROVIDED");
    let dump = derived(&[catch_all_listener(27017, MONGO_CLUSTER)], &[cluster]);
    assert_eq!(analyze(&dump).expect("analyze"), vec![]);
}

#[test]
fn blackhole_is_not_found_when_every_port_drops_unknown_destinations() {
    // outboundTrafficPolicy REGISTRY_ONLY: virtualOutbound drops too.
    let mut dump = derived(&[catch_all_listener(5701, "BlackHoleCluster")], &[]);
    let dynamic = dump["configs"][0]["dynamic_listeners"]
        .as_array_mut()
        .expect("dynamic_listeners");
    let virtual_outbound = dynamic
        .iter_mut()
        .find(|l| l["name"] == "virtualOutbound")
        .expect("virtualOutbound");
    let catch_all = &mut virtual_outbound["active_state"]["listener"]["filter_chains"][1];
    assert_eq!(catch_all["name"], "virtualOutbound-catchall-tcp");
    catch_all["filters"][1] = tcp_proxy("BlackHoleCluster");
    assert_eq!(analyze(&dump).expect("analyze"), vec![]);
}

#[test]
fn vip_and_inbound_listeners_are_not_found() {
    let mut vip = catch_all_listener(5701, APP_EXT_CLUSTER);
    vip["name"] = json!("10.96.12.7_5701");
    vip["address"]["socket_address"]["address"] = json!("10.96.12.7");
    let mut inbound = catch_all_listener(5702, "inbound|5702||manager.manager.svc.cluster.local");
    inbound["traffic_direction"] = json!("INBOUND");
    let dump = derived(&[vip, inbound], &[external_name_cluster()]);
    assert_eq!(analyze(&dump).expect("analyze"), vec![]);
}

#[test]
fn warming_listeners_are_not_analyzed() {
    let mut dump = sidecar_dump();
    dump["configs"][0]["dynamic_listeners"]
        .as_array_mut()
        .expect("dynamic_listeners")
        .push(json!({
            "name": "0.0.0.0_5701",
            "warming_state": { "listener": catch_all_listener(5701, APP_EXT_CLUSTER) }
        }));
    assert_eq!(analyze(&dump).expect("analyze"), vec![]);
}

// ---------------------------------------------------------------------------
// (d) Invalid input
// ---------------------------------------------------------------------------

#[test]
fn not_json_is_rejected() {
    let err = parse("listeners:\n- name: 0.0.0.0_5701\n").expect_err("YAML is not JSON");
    let message = err.to_string();
    assert!(matches!(err, AnalyzeError::NotJson(_)));
    assert!(message.starts_with("not JSON"), "{message}");
    assert!(message.contains("line 1 column 1"), "{message}");
    assert!(
        message.contains("istioctl proxy-config all -o json"),
        "{message}"
    );

    let err = parse("{\"configs\": [").expect_err("truncated");
    assert!(err.to_string().contains("EOF"), "{err}");
}

#[test]
fn wrong_top_level_shapes_are_rejected() {
    let message = shape_error(json!(42));
    assert!(
        message.starts_with("top level: expected a config dump"),
        "{message}"
    );
    assert!(message.ends_with("found a number (42)"), "{message}");
    assert!(shape_error(json!({})).ends_with("found an empty object"));
    assert!(shape_error(json!("configs")).contains("found a string"));
    assert_eq!(
        shape_error(json!({ "listeners": 3 })),
        "top level: expected a config dump (an object with \"configs\"), an array of listeners, \
         or an object of listeners by name, found an object with keys \"listeners\""
    );
}

#[test]
fn wrong_config_dump_shapes_are_rejected() {
    assert_eq!(
        shape_error(json!({ "configs": { "@type": "x" } })),
        "configs: expected an array, found an object with keys \"@type\""
    );
    assert_eq!(
        shape_error(json!({ "configs": [{ "dynamic_listeners": [] }] })),
        "configs[0]: expected an object with \"@type\", found an object with keys \"dynamic_listeners\""
    );
    assert_eq!(
        shape_error(json!({ "configs": ["ListenersConfigDump"] })),
        "configs[0]: expected an object with \"@type\", found a string (\"ListenersConfigDump\")"
    );
    assert_eq!(
        shape_error(json!({ "configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "dynamic_listeners": { "name": "0.0.0.0_5701" }
        }]})),
        "configs[0].dynamic_listeners: expected an array, found an object with keys \"name\""
    );
    assert_eq!(
        shape_error(json!({ "configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "dynamicActiveClusters": [{ "cluster": "outbound|5701||x" }]
        }]})),
        "configs[0].dynamicActiveClusters[0].cluster: expected an object, found a string (\"outbound|5701||x\")"
    );
}

#[test]
fn wrong_listener_shapes_are_rejected() {
    let mut dump = external_name_dump();
    let index = dump["configs"][0]["dynamic_listeners"]
        .as_array()
        .expect("dynamic_listeners")
        .len()
        - 1;
    dump["configs"][0]["dynamic_listeners"][index]["active_state"]["listener"]["filter_chains"]
        [1]["filters"] = json!("tcp_proxy");
    assert_eq!(
        shape_error(dump.clone()),
        format!(
            "configs[0].dynamic_listeners[{index}].active_state.listener.filter_chains[1].filters: \
             expected an array, found a string (\"tcp_proxy\")"
        )
    );

    dump["configs"][0]["dynamic_listeners"][index]["active_state"]["listener"]["address"]["socket_address"]
        ["port_value"] = json!("fifty-seven-oh-one");
    let message = shape_error(dump);
    assert!(
        message.ends_with(
            "socket_address.port_value: expected a non-negative integer, found a string (\"fifty-seven-oh-one\")"
        ),
        "{message}"
    );

    assert_eq!(
        shape_error(json!([catch_all_listener(5701, APP_EXT_CLUSTER), 7])),
        "[1]: expected a Listener or Cluster object, found a number (7)"
    );
    assert_eq!(
        shape_error(json!({ "0.0.0.0_5701": { "port": 5701 } })),
        "[\"0.0.0.0_5701\"]: expected a Listener or Cluster object, found an object with keys \"port\""
    );
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

#[test]
fn json_output_is_stable_camel_case() {
    let findings = analyze(&external_name_dump()).expect("analyze");
    let out: Value = serde_json::from_str(&render_json(&findings)).expect("JSON");
    let finding = &out["findings"][0];
    assert_eq!(out["findings"].as_array().map(Vec::len), Some(1));
    assert_eq!(finding["port"], 5701);
    assert_eq!(finding["listener"], "0.0.0.0_5701");
    assert_eq!(finding["filterChain"], "filter_chains[1]");
    assert_eq!(finding["cluster"], APP_EXT_CLUSTER);
    assert_eq!(finding["clusterType"], "STRICT_DNS");
    assert_eq!(finding["services"], json!([APP_EXT_HOST]));
    assert!(finding["hint"].as_str().is_some_and(|h| !h.is_empty()));
    let keys: Vec<&String> = finding.as_object().expect("object").keys().collect();
    assert_eq!(
        keys.len(),
        7,
        "port, listener, filterChain, cluster, clusterType, services, hint: {keys:?}"
    );

    assert_eq!(
        serde_json::from_str::<Value>(&render_json(&[])).expect("JSON"),
        json!({ "findings": [] })
    );
}

#[test]
fn table_output_shows_the_finding_and_its_fix() {
    let table = render_table(&analyze(&external_name_dump()).expect("analyze"), None);
    for expected in [
        "5701",
        "0.0.0.0_5701",
        APP_EXT_CLUSTER,
        "STRICT_DNS",
        APP_EXT_HOST,
    ] {
        assert!(table.contains(expected), "{expected} missing from\n{table}");
    }
    assert!(table.contains("port 5701: plain TCP"), "{table}");
    assert!(render_table(&[], None).starts_with("no catch-all listener"));
}
