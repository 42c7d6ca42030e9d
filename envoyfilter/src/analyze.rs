//! Finding catch-all ports in a sidecar's configuration before they bite.
//! A Service without a VIP (an ExternalName Service, a DNS ServiceEntry
//! without addresses) that declares a TCP port makes istiod give every sidecar
//! that sees it a catch-all listener (`0.0.0.0_<port>`). Its default filter
//! chain, the one that takes plain TCP to every address without a listener of
//! its own, then leads to that service instead of `PassthroughCluster`, and
//! pod-to-pod connections on that port go somewhere else (the incident
//! dialguard exists for). [`analyze`] reads a config dump (`istioctl
//! proxy-config all -o json`, Envoy's `/config_dump`, or the array of
//! `istioctl proxy-config listeners -o json`) and lists those ports. It only
//! reads the JSON value it is given, never panics, and names the place of any
//! shape it cannot read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use serde_json::{Map, Value};

use dialguard_istio::{BLACK_HOLE_CLUSTER, OutboundCluster, PASSTHROUGH_CLUSTER};

/// One port where plain TCP to unknown destinations is captured.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub port: u16,
    /// The catch-all listener's name, e.g. `0.0.0.0_5701`.
    pub listener: String,
    /// The filter chain that takes the connections: its name, or its place
    /// (`filter_chains[1]`, `default_filter_chain`) when it has none.
    pub filter_chain: String,
    /// The `tcp_proxy` cluster the connections go to.
    pub cluster: String,
    /// The cluster's discovery type (`STRICT_DNS`, `EDS`, ...) when the dump
    /// has the cluster.
    pub cluster_type: Option<String>,
    /// Hosts of the services behind the cluster: its `istio.services`
    /// metadata, else the host in its name (`outbound|PORT|SUBSET|HOST`).
    pub services: Vec<String>,
    /// One line on how to fix it.
    pub hint: String,
}

/// The findings, and how much of the dump was looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analysis {
    /// Sorted by port, listener, filter chain and cluster.
    pub findings: Vec<Finding>,
    /// Listeners found in the dump (all of them, not only catch-alls).
    pub listeners: usize,
    /// Clusters found in the dump.
    pub clusters: usize,
}

/// Why a dump could not be analyzed. The message names the problem and, for
/// a wrong shape, where it is (a path such as `configs[0].dynamic_listeners`).
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error(
        "not JSON ({0}); expected the output of `istioctl proxy-config all -o json`, \
         `istioctl proxy-config listeners -o json` or Envoy's /config_dump"
    )]
    /// The parser's message is part of this one's; it is not a `source`,
    /// so chains (`{:#}`) do not print it twice.
    NotJson(serde_json::Error),
    #[error("{path}: expected {expected}, found {found}")]
    Shape {
        path: String,
        expected: String,
        found: String,
    },
}

/// Parses `text` as JSON, with an error that says what was expected.
pub fn parse(text: &str) -> Result<Value, AnalyzeError> {
    serde_json::from_str(text).map_err(AnalyzeError::NotJson)
}

/// The findings in `dump`; see [`analyze_dump`].
pub fn analyze(dump: &Value) -> Result<Vec<Finding>, AnalyzeError> {
    analyze_dump(dump).map(|analysis| analysis.findings)
}

/// Lists every port where plain TCP to unknown destinations is captured by a
/// catch-all outbound listener (address `0.0.0.0` or `::`) whose default
/// chain leads to a `tcp_proxy` cluster other than `PassthroughCluster`.
///
/// `dump` is a config dump (`{"configs": [...]}`), an array of listeners
/// (and/or clusters), or an object of listeners (and/or clusters) by name.
/// Field names may be snake_case or camelCase.
///
/// Not reported, because they do not send a connection anywhere else than
/// where it was dialed: inbound listeners and clusters (`inbound|...`),
/// `ORIGINAL_DST` clusters, and `BlackHoleCluster` when the `virtualOutbound`
/// listener drops unknown destinations on every port anyway
/// (`outboundTrafficPolicy: REGISTRY_ONLY`).
pub fn analyze_dump(dump: &Value) -> Result<Analysis, AnalyzeError> {
    let inventory = Inventory::read(dump)?;
    let mut clusters = HashMap::new();
    for (path, cluster) in &inventory.clusters {
        if let Some((name, info)) = ClusterInfo::read(cluster, path)? {
            clusters.entry(name).or_insert(info);
        }
    }
    let mut listeners = Vec::with_capacity(inventory.listeners.len());
    for (path, listener) in &inventory.listeners {
        listeners.push(Listener::read(listener, path)?);
    }
    // What every other port does with an unknown destination.
    let baseline = listeners
        .iter()
        .find(|listener| listener.name == "virtualOutbound")
        .and_then(|listener| listener.unknown_destination_target(true))
        .and_then(|(_, target)| target.clusters.first().cloned());

    let mut findings = Vec::new();
    for listener in &listeners {
        let Some(port) = listener.catch_all_port() else {
            continue;
        };
        let Some((chain, target)) = listener.unknown_destination_target(false) else {
            continue;
        };
        for cluster in &target.clusters {
            let info = clusters.get(cluster.as_str());
            if !captures(cluster, info, baseline.as_deref()) {
                continue;
            }
            let services = match info {
                Some(info) if !info.services.is_empty() => info.services.clone(),
                _ => OutboundCluster::parse(cluster)
                    .map(|outbound| outbound.host.to_string())
                    .into_iter()
                    .collect(),
            };
            let cluster_type = info.and_then(|info| info.cluster_type.clone());
            let hint = hint(port, cluster, &services);
            findings.push(Finding {
                port,
                listener: listener.name.clone(),
                filter_chain: chain.clone(),
                cluster: cluster.clone(),
                cluster_type,
                services,
                hint,
            });
        }
    }
    findings.sort();
    findings.dedup();
    Ok(Analysis {
        findings,
        listeners: listeners.len(),
        clusters: clusters.len(),
    })
}

/// The findings as a table, with the fix hints below it.
/// The findings for people, fitted into `width` columns when given (cells
/// wrap); without it, comfy-table fits a terminal on stdout and leaves a
/// pipe unlimited.
pub fn render_table(findings: &[Finding], width: Option<u16>) -> String {
    if findings.is_empty() {
        return "no catch-all listener sends plain TCP anywhere but PassthroughCluster\n".into();
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    if let Some(width) = width {
        table.set_width(width);
    }
    table.set_header([
        "port",
        "listener",
        "filter chain",
        "cluster",
        "cluster type",
        "services",
    ]);
    for finding in findings {
        table.add_row([
            finding.port.to_string(),
            finding.listener.clone(),
            finding.filter_chain.clone(),
            finding.cluster.clone(),
            finding
                .cluster_type
                .clone()
                .unwrap_or_else(|| "(not in dump)".into()),
            if finding.services.is_empty() {
                "(unknown)".into()
            } else {
                finding.services.join(", ")
            },
        ]);
    }
    let mut out = table.to_string();
    out.push('\n');
    for finding in findings {
        out.push_str(&format!("port {}: {}\n", finding.port, finding.hint));
    }
    out
}

/// The findings as `{"findings": [...]}`, pretty-printed, camelCase.
pub fn render_json(findings: &[Finding]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        findings: &'a [Finding],
    }
    // Serializing plain structs of strings and numbers cannot fail; the
    // fallback keeps this total anyway.
    serde_json::to_string_pretty(&Out { findings }).unwrap_or_else(|_| "{\"findings\":[]}".into())
}

// ---------------------------------------------------------------------------
// Verdict and hint
// ---------------------------------------------------------------------------

/// Whether a catch-all chain leading to `cluster` sends connections somewhere
/// else than where they were dialed.
fn captures(cluster: &str, info: Option<&ClusterInfo>, baseline: Option<&str>) -> bool {
    if cluster == PASSTHROUGH_CLUSTER
        || cluster.starts_with("InboundPassthroughCluster")
        || cluster.starts_with("inbound|")
    {
        return false;
    }
    if info.and_then(|info| info.cluster_type.as_deref()) == Some("ORIGINAL_DST") {
        return false;
    }
    !(cluster == BLACK_HOLE_CLUSTER && baseline == Some(BLACK_HOLE_CLUSTER))
}

fn hint(port: u16, cluster: &str, services: &[String]) -> String {
    if cluster == BLACK_HOLE_CLUSTER {
        return format!(
            "plain TCP on port {port} to any address without its own listener is dropped, \
             unlike other ports: find the Service or ServiceEntry that declares port {port} \
             without a VIP, and remove the port or restrict its visibility (Sidecar, exportTo)"
        );
    }
    let Some(service) = services.first() else {
        return format!(
            "plain TCP on port {port} to any address without its own listener goes to {cluster}: \
             don't declare port {port} on a Service without a VIP (ExternalName) or a ServiceEntry \
             without addresses, use different ports or TLS with SNI, or restrict visibility \
             (Sidecar, networking.istio.io/exportTo)"
        );
    };
    if service.contains(".svc.") {
        format!(
            "plain TCP on port {port} to any address without its own listener goes to {service}: \
             don't declare port {port} on that Service (ExternalName: no VIP), use different ports \
             or TLS with SNI, or restrict its visibility (Sidecar, networking.istio.io/exportTo)"
        )
    } else {
        format!(
            "plain TCP on port {port} to any address without its own listener goes to {service}: \
             give its ServiceEntry addresses or a port no other TCP service uses, use TLS with SNI, \
             or restrict its visibility (Sidecar, exportTo)"
        )
    }
}

// ---------------------------------------------------------------------------
// Reading the dump
// ---------------------------------------------------------------------------

type Obj = Map<String, Value>;

/// Where a value sits in the input, for error messages.
#[derive(Debug, Clone, Default)]
struct Path(String);

impl Path {
    fn key(&self, key: &str) -> Path {
        if self.0.is_empty() {
            Path(key.to_string())
        } else {
            Path(format!("{}.{key}", self.0))
        }
    }

    fn index(&self, index: usize) -> Path {
        Path(format!("{}[{index}]", self.0))
    }

    /// An entry of an object keyed by name (`["0.0.0.0_7070"]`).
    fn name(&self, name: &str) -> Path {
        Path(format!("{}[{}]", self.0, Value::from(name)))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("top level")
        } else {
            f.write_str(&self.0)
        }
    }
}

fn shape(path: &Path, expected: impl Into<String>, found: &Value) -> AnalyzeError {
    AnalyzeError::Shape {
        path: path.to_string(),
        expected: expected.into(),
        found: describe(found),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) if s.chars().count() > 40 => {
            format!(
                "a string (\"{}...\")",
                s.chars().take(40).collect::<String>()
            )
        }
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(a) if a.is_empty() => "an empty array".into(),
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Object(o) if o.is_empty() => "an empty object".into(),
        Value::Object(o) => {
            let mut keys: Vec<String> = o.keys().take(5).map(|k| format!("{k:?}")).collect();
            if o.len() > 5 {
                keys.push("...".into());
            }
            format!("an object with keys {}", keys.join(", "))
        }
    }
}

/// `filter_chain_match` → `filterChainMatch`.
fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// `socket_address` → `SocketAddress` (Go struct field names, in very old dumps).
fn pascal(snake: &str) -> String {
    let camel = camel(snake);
    let mut chars = camel.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => camel,
    }
}

/// A field by its proto name (snake_case), its JSON name (lowerCamelCase) or
/// its Go name (PascalCase). `null` counts as absent.
fn field<'a>(obj: &'a Obj, snake: &str) -> Option<(String, &'a Value)> {
    [snake.to_string(), camel(snake), pascal(snake)]
        .into_iter()
        .find_map(|key| match obj.get(&key) {
            None | Some(Value::Null) => None,
            Some(value) => Some((key, value)),
        })
}

fn opt_object<'a>(
    obj: &'a Obj,
    snake: &str,
    path: &Path,
) -> Result<Option<(&'a Obj, Path)>, AnalyzeError> {
    match field(obj, snake) {
        None => Ok(None),
        Some((key, Value::Object(inner))) => Ok(Some((inner, path.key(&key)))),
        Some((key, other)) => Err(shape(&path.key(&key), "an object", other)),
    }
}

fn opt_array<'a>(
    obj: &'a Obj,
    snake: &str,
    path: &Path,
) -> Result<Option<(&'a [Value], Path)>, AnalyzeError> {
    match field(obj, snake) {
        None => Ok(None),
        Some((key, Value::Array(items))) => Ok(Some((items.as_slice(), path.key(&key)))),
        Some((key, other)) => Err(shape(&path.key(&key), "an array", other)),
    }
}

fn opt_str<'a>(obj: &'a Obj, snake: &str, path: &Path) -> Result<Option<&'a str>, AnalyzeError> {
    match field(obj, snake) {
        None => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(s.as_str())),
        Some((key, other)) => Err(shape(&path.key(&key), "a string", other)),
    }
}

/// A number, also as a wrapper (`{"value": 5701}`) or a decimal string.
fn opt_u32(obj: &Obj, snake: &str, path: &Path) -> Result<Option<u32>, AnalyzeError> {
    let Some((key, value)) = field(obj, snake) else {
        return Ok(None);
    };
    let inner = match value {
        Value::Object(wrapper) => wrapper.get("value").unwrap_or(value),
        _ => value,
    };
    let number = match inner {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match number.and_then(|n| u32::try_from(n).ok()) {
        Some(n) => Ok(Some(n)),
        None => Err(shape(&path.key(&key), "a non-negative integer", value)),
    }
}

/// A boolean, also as a wrapper (`{"value": true}`).
fn opt_bool(obj: &Obj, snake: &str, path: &Path) -> Result<Option<bool>, AnalyzeError> {
    let Some((key, value)) = field(obj, snake) else {
        return Ok(None);
    };
    let inner = match value {
        Value::Object(wrapper) => wrapper.get("value").unwrap_or(value),
        _ => value,
    };
    match inner {
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(shape(&path.key(&key), "a boolean", value)),
    }
}

/// An enum, by name or number.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Enum<'a> {
    Name(&'a str),
    Number(u64),
}

fn opt_enum<'a>(obj: &'a Obj, snake: &str, path: &Path) -> Result<Option<Enum<'a>>, AnalyzeError> {
    match field(obj, snake) {
        None => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(Enum::Name(s))),
        Some((key, value @ Value::Number(n))) => match n.as_u64() {
            Some(n) => Ok(Some(Enum::Number(n))),
            None => Err(shape(&path.key(&key), "an enum name or number", value)),
        },
        Some((key, other)) => Err(shape(&path.key(&key), "an enum name or number", other)),
    }
}

fn is_listener_config_dump(type_url: &str) -> bool {
    type_url.ends_with(".ListenersConfigDump")
}

fn is_cluster_config_dump(type_url: &str) -> bool {
    type_url.ends_with(".ClustersConfigDump")
}

/// The listeners and clusters of the dump, each with its place.
#[derive(Debug, Default)]
struct Inventory<'a> {
    listeners: Vec<(Path, &'a Obj)>,
    clusters: Vec<(Path, &'a Obj)>,
}

const TOP_LEVEL_EXPECTED: &str = "a config dump (an object with \"configs\"), an array of listeners, \
     or an object of listeners by name";

impl<'a> Inventory<'a> {
    fn read(dump: &'a Value) -> Result<Self, AnalyzeError> {
        let root = Path::default();
        let mut inventory = Inventory::default();
        match dump {
            Value::Object(obj) if field(obj, "configs").is_some() => {
                inventory.read_config_dump(obj, &root)?;
            }
            Value::Object(obj) if Kind::of(obj) == Some(Kind::Listener) => {
                inventory.listeners.push((root, obj));
            }
            Value::Object(obj) if !obj.is_empty() && obj.values().all(Value::is_object) => {
                for (name, entry) in obj {
                    inventory.add_entry(entry, root.name(name))?;
                }
            }
            Value::Array(items) => {
                for (i, entry) in items.iter().enumerate() {
                    inventory.add_entry(entry, root.index(i))?;
                }
            }
            other => return Err(shape(&root, TOP_LEVEL_EXPECTED, other)),
        }
        Ok(inventory)
    }

    /// An element of a plain array or of an object by name.
    fn add_entry(&mut self, entry: &'a Value, path: Path) -> Result<(), AnalyzeError> {
        let expected = "a Listener or Cluster object";
        let Value::Object(obj) = entry else {
            return Err(shape(&path, expected, entry));
        };
        match Kind::of(obj) {
            Some(Kind::Listener) => self.listeners.push((path, obj)),
            Some(Kind::Cluster) => self.clusters.push((path, obj)),
            None => return Err(shape(&path, expected, entry)),
        }
        Ok(())
    }

    fn read_config_dump(&mut self, dump: &'a Obj, path: &Path) -> Result<(), AnalyzeError> {
        let Some((configs, configs_path)) = opt_array(dump, "configs", path)? else {
            return Ok(());
        };
        for (i, config) in configs.iter().enumerate() {
            let config_path = configs_path.index(i);
            let type_url = match config {
                Value::Object(obj) => match obj.get("@type") {
                    Some(Value::String(type_url)) => Some((obj, type_url.as_str())),
                    _ => None,
                },
                _ => None,
            };
            let Some((obj, type_url)) = type_url else {
                return Err(shape(&config_path, "an object with \"@type\"", config));
            };
            if is_listener_config_dump(type_url) {
                self.read_listeners_config_dump(obj, &config_path)?;
            } else if is_cluster_config_dump(type_url) {
                self.read_clusters_config_dump(obj, &config_path)?;
            }
            // Bootstrap, routes, secrets, endpoints...: not needed.
        }
        Ok(())
    }

    fn read_listeners_config_dump(
        &mut self,
        dump: &'a Obj,
        path: &Path,
    ) -> Result<(), AnalyzeError> {
        // `static_listeners[].listener`; v2 dumps also had
        // `dynamic_active_listeners[].listener`.
        for list in ["static_listeners", "dynamic_active_listeners"] {
            for (item, item_path) in items(dump, list, path)? {
                if let Some((listener, listener_path)) = opt_object(item, "listener", &item_path)? {
                    self.listeners.push((listener_path, listener));
                }
            }
        }
        // `dynamic_listeners[].active_state.listener`; warming, draining and
        // failed versions are not what the sidecar routes with now.
        for (item, item_path) in items(dump, "dynamic_listeners", path)? {
            let Some((state, state_path)) = opt_object(item, "active_state", &item_path)? else {
                continue;
            };
            if let Some((listener, listener_path)) = opt_object(state, "listener", &state_path)? {
                self.listeners.push((listener_path, listener));
            }
        }
        Ok(())
    }

    fn read_clusters_config_dump(
        &mut self,
        dump: &'a Obj,
        path: &Path,
    ) -> Result<(), AnalyzeError> {
        for list in [
            "static_clusters",
            "dynamic_active_clusters",
            "dynamic_warming_clusters",
        ] {
            for (item, item_path) in items(dump, list, path)? {
                if let Some((cluster, cluster_path)) = opt_object(item, "cluster", &item_path)? {
                    self.clusters.push((cluster_path, cluster));
                }
            }
        }
        Ok(())
    }
}

/// The objects of the array field `snake` (none when it is absent).
fn items<'a>(obj: &'a Obj, snake: &str, path: &Path) -> Result<Vec<(&'a Obj, Path)>, AnalyzeError> {
    let Some((list, list_path)) = opt_array(obj, snake, path)? else {
        return Ok(Vec::new());
    };
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let item_path = list_path.index(i);
            match item {
                Value::Object(obj) => Ok((obj, item_path)),
                other => Err(shape(&item_path, "an object", other)),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listener,
    Cluster,
}

impl Kind {
    /// Tells a Listener from a Cluster by `@type`, else by its fields.
    fn of(obj: &Obj) -> Option<Kind> {
        if let Some(Value::String(type_url)) = obj.get("@type") {
            return if type_url.ends_with(".Listener") {
                Some(Kind::Listener)
            } else if type_url.ends_with(".Cluster") {
                Some(Kind::Cluster)
            } else {
                None
            };
        }
        const LISTENER_FIELDS: [&str; 6] = [
            "filter_chains",
            "default_filter_chain",
            "listener_filters",
            "use_original_dst",
            "traffic_direction",
            "address",
        ];
        if LISTENER_FIELDS.iter().any(|f| field(obj, f).is_some()) {
            Some(Kind::Listener)
        } else if matches!(obj.get("name"), Some(Value::String(_))) {
            Some(Kind::Cluster)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct ClusterInfo {
    cluster_type: Option<String>,
    services: Vec<String>,
}

impl ClusterInfo {
    fn read(cluster: &Obj, path: &Path) -> Result<Option<(String, ClusterInfo)>, AnalyzeError> {
        let Some(name) = opt_str(cluster, "name", path)? else {
            return Ok(None);
        };
        let info = ClusterInfo {
            cluster_type: Some(cluster_type(cluster, path)?),
            services: istio_services(cluster),
        };
        Ok(Some((name.to_string(), info)))
    }
}

/// `type` (by name, or by number in old dumps), or the custom `cluster_type`'s
/// name; `STATIC` when neither is set (the proto default).
fn cluster_type(cluster: &Obj, path: &Path) -> Result<String, AnalyzeError> {
    // Go struct dumps wrap the oneof: `ClusterDiscoveryType: {Type: 1}`.
    let (obj, path) = match opt_object(cluster, "cluster_discovery_type", path)? {
        Some((inner, inner_path)) => (inner, inner_path),
        None => (cluster, path.clone()),
    };
    if let Some(kind) = opt_enum(obj, "type", &path)? {
        return Ok(match kind {
            Enum::Name(name) => name.to_string(),
            Enum::Number(0) => "STATIC".into(),
            Enum::Number(1) => "STRICT_DNS".into(),
            Enum::Number(2) => "LOGICAL_DNS".into(),
            Enum::Number(3) => "EDS".into(),
            Enum::Number(4) => "ORIGINAL_DST".into(),
            Enum::Number(n) => format!("type {n}"),
        });
    }
    if let Some((custom, custom_path)) = opt_object(obj, "cluster_type", &path)? {
        if let Some(name) = opt_str(custom, "name", &custom_path)? {
            return Ok(name.to_string());
        }
    }
    Ok("STATIC".into())
}

/// `metadata.filter_metadata.istio.services[].host`. Metadata is free-form,
/// so anything else there is ignored rather than rejected.
fn istio_services(cluster: &Obj) -> Vec<String> {
    let services = field(cluster, "metadata")
        .and_then(|(_, m)| m.as_object())
        .and_then(|m| field(m, "filter_metadata"))
        .and_then(|(_, fm)| fm.as_object())
        .and_then(|fm| fm.get("istio"))
        .and_then(Value::as_object)
        .and_then(|istio| istio.get("services"))
        .and_then(Value::as_array);
    let mut hosts: Vec<String> = services
        .into_iter()
        .flatten()
        .filter_map(|service| service.get("host").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    hosts.dedup();
    hosts
}

// ---------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Listener<'a> {
    name: String,
    inbound: bool,
    use_original_dst: bool,
    /// `(address, port)` of a socket address; `None` for pipes and internal listeners.
    socket: Option<(&'a str, u32)>,
    chains: Vec<Chain>,
    default_chain: Option<Chain>,
}

/// What a filter chain is for, as far as this analysis cares.
#[derive(Debug, Clone)]
struct Chain {
    /// Its name, or its place in the listener.
    label: String,
    matcher: ChainMatch,
    target: Target,
}

#[derive(Debug, Clone, Default)]
struct ChainMatch {
    destination_port: Option<u32>,
    /// `prefix_ranges` is set and none of its ranges is `/0`.
    restricts_destination: bool,
    /// `prefix_ranges` has a `/0` range (an explicit "any address").
    any_destination_range: bool,
    /// Matches only TLS with SNI, HTTP (by ALPN or sniffing), some sources...
    excludes_plain_tcp: bool,
    raw_buffer: bool,
}

/// Where a chain's `tcp_proxy` sends connections.
#[derive(Debug, Clone, Default)]
struct Target {
    /// `cluster`, or the `weighted_clusters`' names; empty without `tcp_proxy`.
    clusters: Vec<String>,
}

impl<'a> Listener<'a> {
    fn read(obj: &'a Obj, path: &Path) -> Result<Self, AnalyzeError> {
        let name = opt_str(obj, "name", path)?.unwrap_or_default().to_string();
        let inbound = match opt_enum(obj, "traffic_direction", path)? {
            Some(Enum::Name(direction)) => direction == "INBOUND",
            Some(Enum::Number(direction)) => direction == 1,
            None => false,
        };
        let use_original_dst = opt_bool(obj, "use_original_dst", path)?.unwrap_or(false);
        let socket = socket_address(obj, path)?;
        let mut chains = Vec::new();
        for (i, (chain, chain_path)) in items(obj, "filter_chains", path)?.into_iter().enumerate() {
            chains.push(Chain::read(
                chain,
                &chain_path,
                format!("filter_chains[{i}]"),
            )?);
        }
        let default_chain = match opt_object(obj, "default_filter_chain", path)? {
            Some((chain, chain_path)) => Some(Chain::read(
                chain,
                &chain_path,
                "default_filter_chain".into(),
            )?),
            None => None,
        };
        Ok(Listener {
            name,
            inbound,
            use_original_dst,
            socket,
            chains,
            default_chain,
        })
    }

    /// The port of an outbound catch-all listener (`0.0.0.0_<port>`, `[::]_<port>`).
    fn catch_all_port(&self) -> Option<u16> {
        if self.inbound
            || self.use_original_dst
            || self.name == "virtualOutbound"
            || self.name == "virtualInbound"
        {
            return None;
        }
        let (address, port) = self.socket?;
        let ip: IpAddr = address.parse().ok()?;
        if !ip.is_unspecified() {
            return None;
        }
        let port = if port == 0 {
            // proto3 JSON omits zero; Istio names the listener after its port.
            self.name.rsplit('_').next()?.parse().ok()?
        } else {
            port
        };
        u16::try_from(port).ok()
    }

    /// The chain, and its target, that takes a plain TCP connection to an
    /// address no other listener has: the most specific chain that matches
    /// any destination address, else `default_filter_chain`. With
    /// `any_port`, chains for a single destination port do not count (the
    /// `virtualOutbound` listener, which sees every port).
    fn unknown_destination_target(&self, any_port: bool) -> Option<(String, Target)> {
        let port = self.socket.map(|(_, port)| port).unwrap_or(0);
        let candidate = self
            .chains
            .iter()
            .filter(|chain| {
                let m = &chain.matcher;
                !m.restricts_destination
                    && !m.excludes_plain_tcp
                    && match m.destination_port {
                        None => true,
                        Some(p) => !any_port && p == port,
                    }
            })
            // Envoy prefers, in this order, a matching destination port, a
            // matching address range, and an explicit `raw_buffer`.
            .max_by_key(|chain| {
                let m = &chain.matcher;
                (
                    m.destination_port.is_some(),
                    m.any_destination_range,
                    m.raw_buffer,
                    // `max_by_key` keeps the last of equals; Envoy would
                    // reject such a listener, so any choice will do.
                )
            })
            .or(self.default_chain.as_ref())?;
        Some((candidate.label.clone(), candidate.target.clone()))
    }
}

fn socket_address<'a>(
    listener: &'a Obj,
    path: &Path,
) -> Result<Option<(&'a str, u32)>, AnalyzeError> {
    let Some((address, address_path)) = opt_object(listener, "address", path)? else {
        return Ok(None);
    };
    // Go struct dumps wrap the oneof: `Address: {SocketAddress: {...}}`.
    let (address, address_path) = match address.get("Address") {
        Some(Value::Object(inner)) => (inner, address_path.key("Address")),
        _ => (address, address_path),
    };
    let Some((socket, socket_path)) = opt_object(address, "socket_address", &address_path)? else {
        return Ok(None);
    };
    let ip = opt_str(socket, "address", &socket_path)?.unwrap_or("");
    let port = match opt_object(socket, "port_specifier", &socket_path)? {
        Some((specifier, specifier_path)) => opt_u32(specifier, "port_value", &specifier_path)?,
        None => opt_u32(socket, "port_value", &socket_path)?,
    };
    Ok(Some((ip, port.unwrap_or(0))))
}

impl Chain {
    fn read(chain: &Obj, path: &Path, place: String) -> Result<Self, AnalyzeError> {
        let label = match opt_str(chain, "name", path)? {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => place,
        };
        let matcher = match opt_object(chain, "filter_chain_match", path)? {
            Some((m, m_path)) => ChainMatch::read(m, &m_path)?,
            None => ChainMatch::default(),
        };
        let mut target = Target::default();
        for (filter, filter_path) in items(chain, "filters", path)? {
            if let Some(clusters) = tcp_proxy_clusters(filter, &filter_path)? {
                target.clusters = clusters;
                break;
            }
        }
        Ok(Chain {
            label,
            matcher,
            target,
        })
    }
}

impl ChainMatch {
    fn read(m: &Obj, path: &Path) -> Result<Self, AnalyzeError> {
        let mut out = ChainMatch {
            destination_port: opt_u32(m, "destination_port", path)?,
            ..ChainMatch::default()
        };
        if let Some((ranges, ranges_path)) = opt_array(m, "prefix_ranges", path)? {
            if !ranges.is_empty() {
                let mut any = false;
                for (i, range) in ranges.iter().enumerate() {
                    let range_path = ranges_path.index(i);
                    let Value::Object(range) = range else {
                        return Err(shape(&range_path, "an address range object", range));
                    };
                    // `prefix_len` absent means 0.
                    if opt_u32(range, "prefix_len", &range_path)?.unwrap_or(0) == 0 {
                        any = true;
                    }
                }
                out.any_destination_range = any;
                out.restricts_destination = !any;
            }
        }
        let non_empty = |snake: &str| -> Result<bool, AnalyzeError> {
            Ok(opt_array(m, snake, path)?.is_some_and(|(list, _)| !list.is_empty()))
        };
        // Plain TCP has no SNI and no application protocol; a chain that
        // needs them, or only takes some sources, does not take it all.
        let mut excludes = non_empty("server_names")?
            || non_empty("application_protocols")?
            || non_empty("source_prefix_ranges")?
            || non_empty("direct_source_prefix_ranges")?
            || non_empty("source_ports")?;
        match opt_str(m, "transport_protocol", path)? {
            None | Some("") => {}
            Some("raw_buffer") => out.raw_buffer = true,
            Some(_) => excludes = true,
        }
        match opt_enum(m, "source_type", path)? {
            None | Some(Enum::Name("ANY" | "EXTERNAL")) | Some(Enum::Number(0 | 2)) => {}
            Some(_) => excludes = true,
        }
        out.excludes_plain_tcp = excludes;
        Ok(out)
    }
}

/// The clusters of a `tcp_proxy` filter; `None` for any other filter.
fn tcp_proxy_clusters(filter: &Obj, path: &Path) -> Result<Option<Vec<String>>, AnalyzeError> {
    let name = opt_str(filter, "name", path)?.unwrap_or("");
    let Some((config, config_path)) = filter_config(filter, path)? else {
        return Ok(None);
    };
    let typed_as_tcp_proxy =
        matches!(config.get("@type"), Some(Value::String(t)) if t.ends_with(".TcpProxy"));
    if !(typed_as_tcp_proxy
        || name == "envoy.filters.network.tcp_proxy"
        || name == "envoy.tcp_proxy")
    {
        return Ok(None);
    }
    let Value::Object(config) = config.as_ref() else {
        return Ok(None);
    };
    if let Some(cluster) = opt_str(config, "cluster", &config_path)? {
        return Ok(Some(vec![cluster.to_string()]));
    }
    let mut clusters = Vec::new();
    if let Some((weighted, weighted_path)) = opt_object(config, "weighted_clusters", &config_path)?
    {
        for (cluster, cluster_path) in items(weighted, "clusters", &weighted_path)? {
            if let Some(name) = opt_str(cluster, "name", &cluster_path)? {
                clusters.push(name.to_string());
            }
        }
    }
    Ok(Some(clusters))
}

/// A filter's configuration as plain JSON: `typed_config`, the older `config`,
/// or, in Go struct dumps, `ConfigType.Config` (a `google.protobuf.Struct`
/// spelled out as `{"fields": {"cluster": {"Kind": {"StringValue": ...}}}}`).
fn filter_config<'a>(
    filter: &'a Obj,
    path: &Path,
) -> Result<Option<(Cow<'a, Value>, Path)>, AnalyzeError> {
    for snake in ["typed_config", "config"] {
        match field(filter, snake) {
            None => {}
            Some((key, config @ Value::Object(_))) => {
                return Ok(Some((Cow::Borrowed(config), path.key(&key))));
            }
            Some((key, other)) => return Err(shape(&path.key(&key), "an object", other)),
        }
    }
    if let Some((wrapper, wrapper_path)) = opt_object(filter, "config_type", path)? {
        if let Some(config @ Value::Object(obj)) = wrapper.get("Config") {
            let config = match obj.get("fields") {
                Some(Value::Object(fields)) => Cow::Owned(go_struct(fields)),
                _ => Cow::Borrowed(config),
            };
            return Ok(Some((config, wrapper_path.key("Config"))));
        }
    }
    Ok(None)
}

fn go_struct(fields: &Obj) -> Value {
    Value::Object(
        fields
            .iter()
            .map(|(k, v)| (k.clone(), go_value(v)))
            .collect(),
    )
}

fn go_value(value: &Value) -> Value {
    let Some(kind) = value.get("Kind").and_then(Value::as_object) else {
        return Value::Null;
    };
    if let Some(inner) = kind.get("StructValue") {
        return match inner.get("fields").and_then(Value::as_object) {
            Some(fields) => go_struct(fields),
            None => Value::Object(Map::new()),
        };
    }
    if let Some(inner) = kind.get("ListValue") {
        let values = inner.get("values").and_then(Value::as_array);
        return Value::Array(values.into_iter().flatten().map(go_value).collect());
    }
    ["StringValue", "NumberValue", "BoolValue"]
        .iter()
        .find_map(|k| kind.get(*k).cloned())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_in_all_spellings() {
        assert_eq!(camel("filter_chain_match"), "filterChainMatch");
        assert_eq!(pascal("socket_address"), "SocketAddress");
        assert_eq!(pascal("port_value"), "PortValue");
    }

    #[test]
    fn paths_read_like_json() {
        let path = Path::default()
            .key("configs")
            .index(0)
            .key("dynamic_listeners");
        assert_eq!(path.to_string(), "configs[0].dynamic_listeners");
        assert_eq!(
            Path::default().name("0.0.0.0_7070").to_string(),
            "[\"0.0.0.0_7070\"]"
        );
        assert_eq!(Path::default().to_string(), "top level");
    }
}
