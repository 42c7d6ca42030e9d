//! A real sidecar's listeners (an `istioctl proxy-config listeners -o json`
//! dump) turned into an Envoy bootstrap that upstream Envoy can load, with a
//! rendered `EnvoyFilter` applied the way istiod applies it. Lets a test ask
//! real Envoy 1.40 whether the rollout's free-form `patch.value`s are valid in
//! the listeners Istio really generates.
//!
//! What is changed to make the dump loadable, and nothing more: filters whose
//! config is not an upstream Envoy type (istio.stats, istio_authn, ...) and
//! per-route configs for them are removed; RDS becomes an empty inline route
//! table; every cluster the listeners name becomes a STATIC placeholder.

use std::collections::BTreeSet;

use anyhow::Context;
use serde_json::{Value, json};

use crate::sidecar::Install;

/// The listeners of a `{"configs": [ListenersConfigDump]}` dump.
pub fn listeners(dump: &Value) -> anyhow::Result<Vec<Value>> {
    let configs = dump["configs"].as_array().context("dump without configs")?;
    let listeners: Vec<Value> = configs
        .iter()
        .flat_map(|c| c["dynamic_listeners"].as_array().into_iter().flatten())
        .filter_map(|l| l["active_state"]["listener"].as_object().cloned())
        .map(Value::Object)
        .collect();
    anyhow::ensure!(!listeners.is_empty(), "no listeners in the dump");
    Ok(listeners)
}

fn is_upstream_envoy(filter: &Value) -> bool {
    let name = filter["name"].as_str().unwrap_or_default();
    let kind = filter["typed_config"]["@type"].as_str().unwrap_or_default();
    !name.starts_with("istio") && kind.starts_with("type.googleapis.com/envoy.")
}

/// Removes Istio-only filters and per-route configs, inlines route tables,
/// and collects the cluster names referenced anywhere.
fn make_loadable(value: &mut Value, clusters: &mut BTreeSet<String>) {
    match value {
        Value::Object(object) => {
            for key in ["filters", "http_filters", "listener_filters"] {
                if let Some(Value::Array(filters)) = object.get_mut(key) {
                    filters.retain(|f| {
                        is_upstream_envoy(f) || f["name"] == dialguard_envoyfilter::FILTER_NAME
                    });
                }
            }
            if let Some(Value::Object(per_filter)) = object.get_mut("typed_per_filter_config") {
                per_filter.retain(|_, v| {
                    v["@type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("type.googleapis.com/envoy."))
                });
            }
            if object.remove("rds").is_some() {
                object.insert(
                    "route_config".into(),
                    json!({ "name": "inlined", "virtual_hosts": [] }),
                );
            }
            for (key, child) in object.iter_mut() {
                if key == "cluster" {
                    if let Some(name) = child.as_str() {
                        clusters.insert(name.to_owned());
                    }
                }
                make_loadable(child, clusters);
            }
            if let (Some(Value::String(name)), true) =
                (object.get("name"), object.contains_key("weight"))
            {
                clusters.insert(name.clone());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| make_loadable(v, clusters)),
        _ => {}
    }
}

/// INSERT_BEFORE `tcp_proxy` in every chain of every outbound listener
/// (context `SIDECAR_OUTBOUND`), including the default chain. Returns how
/// many chains were patched.
fn insert_before_tcp_proxy(listener: &mut Value, filter: &Value) -> usize {
    if listener["traffic_direction"] != "OUTBOUND" {
        return 0;
    }
    let mut patch = |chain: &mut Value| {
        let Some(filters) = chain["filters"].as_array_mut() else {
            return 0;
        };
        match filters
            .iter()
            .position(|f| f["name"] == "envoy.filters.network.tcp_proxy")
        {
            Some(at) => {
                filters.insert(at, filter.clone());
                1
            }
            None => 0,
        }
    };
    let mut patched: usize = listener["filter_chains"]
        .as_array_mut()
        .map_or(0, |chains| chains.iter_mut().map(&mut patch).sum());
    if let Some(default) = listener.get_mut("default_filter_chain") {
        patched += patch(default);
    }
    patched
}

/// A bootstrap with the dump's listeners and `install` applied; returns it and
/// the number of filter chains that received the filter.
pub fn patched_bootstrap(dump: &Value, install: &Install) -> anyhow::Result<(Value, usize)> {
    let mut listeners = listeners(dump)?;
    let mut referenced = BTreeSet::new();
    let mut patched = 0;
    for listener in &mut listeners {
        if let Some(object) = listener.as_object_mut() {
            object.remove("@type");
        }
        make_loadable(listener, &mut referenced);
        patched += insert_before_tcp_proxy(listener, &install.filter);
    }
    let added: BTreeSet<&str> = install
        .clusters
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let mut clusters: Vec<Value> = referenced
        .iter()
        .filter(|name| !added.contains(name.as_str()))
        .map(|name| json!({ "name": name, "type": "STATIC", "connect_timeout": "1s" }))
        .collect();
    clusters.extend(install.clusters.iter().cloned());
    let bootstrap = json!({
        "node": { "id": "sidecar~10.244.0.6~productpage-v1-6b746f74dc-9stvs.default~default.svc.cluster.local", "cluster": "productpage.default" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 }}},
        "static_resources": { "listeners": listeners, "clusters": clusters },
        // As in istio-proxy's own bootstrap: the dump has internal listeners.
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener" }
        }],
    });
    Ok((bootstrap, patched))
}
