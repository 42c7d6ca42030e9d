//! `dialguard rollout`: the Istio resources that install dialguard in the
//! sidecars of selected namespaces, rendered from command-line flags.
//!
//! Per namespace an `EnvoyFilter` inserts the wasm network filter before
//! `envoy.filters.network.tcp_proxy` in every `SIDECAR_OUTBOUND` filter chain
//! and adds the clusters the filter needs (the collector, over HTTP/2, and the
//! module's download), so events reach the collector even when a Sidecar
//! resource hides its Service. A `WasmPlugin` variant exists for Istio 1.20
//! and later. Every flag is validated before anything is rendered; an error
//! names the flag, the value and what was expected.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use dialguard_filter_core::{Cidr, FilterConfig};
use serde_json::{Value, json};

use crate::image::IMAGE_MODULE_DIR;
use crate::module::{self, AUDIT_MODULE_FILE, Build, ENFORCE_MODULE_FILE};
use crate::{
    ModuleSource, collector_cluster, istio_mtls_transport_socket, module_cluster, network_filter,
};

/// The Envoy cluster the filter streams events through.
pub const COLLECTOR_CLUSTER: &str = "dialguard_collector";
/// The Envoy cluster Envoy downloads the module through.
pub const MODULE_CLUSTER: &str = "dialguard_module";
/// Name of the rendered resources in each namespace.
pub const RESOURCE_NAME: &str = "dialguard";
pub const COLLECTOR_GRPC_PORT: u16 = 50051;
pub const COLLECTOR_HTTP_PORT: u16 = 8080;
/// The ConfigMap listing the namespaces rolled out to, for the collector's
/// coverage report: an expected namespace with no reporting sidecar is news.
pub const EXPECTED_NAMESPACES_CONFIGMAP: &str = "dialguard-expected-namespaces";
/// Its key, one namespace per line.
pub const EXPECTED_NAMESPACES_KEY: &str = "namespaces";
/// Where the collector's pod mounts that ConfigMap (as a directory).
pub const EXPECTED_NAMESPACES_DIR: &str = "/etc/dialguard/expected-namespaces";

/// The flags, as given. [`render`] validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutArgs {
    pub namespaces: Vec<String>,
    /// `key=value` pairs for `workloadSelector`.
    pub selectors: Vec<String>,
    pub mode: String,
    /// `HOST:PORT` of the collector's gRPC listener.
    pub collector: String,
    /// Where Envoy downloads the module. Without it, `collector_manifests`
    /// gives the in-cluster collector's URL of the build the mode needs.
    pub module_url: Option<String>,
    /// The module's SHA-256; computed from `module_file` when that is given.
    pub module_sha256: Option<String>,
    /// The module file itself (`--module`): its SHA-256 and build are checked
    /// against the mode and the other module flags.
    pub module_file: Option<PathBuf>,
    pub service_cidrs: Vec<String>,
    pub pod_cidrs: Vec<String>,
    /// EnvoyFilter `priority`: patches apply in ascending order.
    pub priority: i32,
    /// Render a `WasmPlugin` for the filter instead of the filter patch.
    pub wasm_plugin: bool,
    /// Also render the collector's Deployment, Service and PVC.
    pub collector_manifests: Option<CollectorManifests>,
    /// How the sidecars' collector cluster is secured (`--collector-mtls`).
    pub collector_mtls: CollectorMtls,
}

/// `--collector-mtls`: how sidecars connect to the collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CollectorMtls {
    /// Plain text (HTTP/2 without TLS).
    #[default]
    Off,
    /// Mutual TLS with Istio's workload certificate and the mesh's root,
    /// both from istio-agent over SDS; the collector runs with
    /// `--tls-cert/--tls-key` and `--grpc-client-ca` set to the mesh's root.
    Istio,
}

/// The Secret (`kubernetes.io/tls`) `--with-collector --collector-mtls
/// istio` mounts as the collector's server certificate: the cluster
/// operator provides it, issued under the mesh's root for the collector's
/// Service name.
pub const COLLECTOR_TLS_SECRET: &str = "dialguard-collector-tls";
/// The ConfigMap istiod keeps in every namespace with the mesh's root certificate.
pub const ISTIO_ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const COLLECTOR_TLS_DIR: &str = "/etc/dialguard/tls";
const ISTIO_ROOT_DIR: &str = "/etc/dialguard/istio-ca";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorManifests {
    pub namespace: String,
    pub image: String,
    /// PVC size, e.g. `1Gi`.
    pub storage: String,
}

impl Default for RolloutArgs {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            selectors: Vec::new(),
            mode: "audit".into(),
            collector: String::new(),
            module_url: None,
            module_sha256: None,
            module_file: None,
            service_cidrs: Vec::new(),
            pod_cidrs: Vec::new(),
            priority: 10,
            wasm_plugin: false,
            collector_manifests: None,
            collector_mtls: CollectorMtls::Off,
        }
    }
}

/// A flag whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {expected}")]
pub struct RolloutError {
    pub flag: &'static str,
    pub value: String,
    pub expected: String,
}

fn invalid(flag: &'static str, value: &str, expected: impl Into<String>) -> RolloutError {
    RolloutError {
        flag,
        value: value.to_owned(),
        expected: expected.into(),
    }
}

/// Flags after validation.
#[derive(Debug)]
struct Plan {
    namespaces: Vec<String>,
    selector: BTreeMap<String, String>,
    collector_host: String,
    collector_port: u16,
    module_url: String,
    module_host: String,
    module_port: u16,
    module_tls: bool,
    module_sha256: String,
    filter_config: Value,
    priority: i32,
    wasm_plugin: bool,
    collector_manifests: Option<CollectorManifests>,
    collector_mtls: CollectorMtls,
}

/// A DNS-1123 label, as Kubernetes requires of namespace names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A label value (or the name part of a key): up to 63 alphanumerics, `-`, `_`, `.`.
fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    !name.is_empty()
        && is_label_value(name)
        && prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(is_dns_label))
}

fn is_host(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || (s.len() <= 253 && s.split('.').all(is_dns_label))
}

/// `HOST:PORT`, with IPv6 hosts in brackets.
fn parse_host_port(flag: &'static str, value: &str) -> Result<(String, u16), RolloutError> {
    let expected = "expected HOST:PORT, e.g. dialguard-collector.dialguard.svc.cluster.local:50051";
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(flag, value, expected))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(flag, value, expected))?;
    if !is_host(host) {
        return Err(invalid(flag, value, expected));
    }
    Ok((host.to_owned(), port))
}

const URL_EXPECTED: &str = "expected an http:// or https:// URL of the module, e.g. http://dialguard-collector.dialguard:8080/module/dialguard_filter.wasm";

/// The module the sidecars load: where from and its SHA-256.
#[derive(Debug)]
struct ResolvedModule {
    url: String,
    sha256: String,
}

/// The last path segment of a URL, where a module's file name is.
fn url_file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// Picks the module for the mode and checks what can be checked: the file's
/// build against the mode, its SHA-256 against `--module-sha256`, and the
/// build a URL names against both. Envoy refuses a configuration the module
/// cannot run, leaving the namespace silently without dialguard, so anything
/// that could be the wrong build is refused here instead.
fn resolve_module(args: &RolloutArgs) -> Result<ResolvedModule, RolloutError> {
    let file = match &args.module_file {
        None => None,
        Some(path) => {
            let shown = path.display().to_string();
            let bytes = std::fs::read(path)
                .map_err(|err| invalid("--module", &shown, format!("cannot read it: {err}")))?;
            let info = module::inspect(&bytes).map_err(|why| invalid("--module", &shown, why))?;
            if !info.build.runs(&args.mode) {
                return Err(invalid(
                    "--module",
                    &shown,
                    format!(
                        "this is the audit build (it exports no proxy_on_downstream_data/proxy_on_upstream_data), \
                         which refuses --mode enforce; expected the enforce build, {ENFORCE_MODULE_FILE}"
                    ),
                ));
            }
            Some((shown, info))
        }
    };
    let sha256 = match (&args.module_sha256, &file) {
        (Some(given), file) => {
            let sha = given.to_ascii_lowercase();
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "--module-sha256",
                    given,
                    "expected the module's SHA-256 as 64 hexadecimal digits (`dialguard serve` prints it)",
                ));
            }
            if let Some((shown, info)) = file {
                if info.sha256 != sha {
                    return Err(invalid(
                        "--module-sha256",
                        given,
                        format!(
                            "does not match --module {shown} (sha256 {}); Envoy would refuse the download. \
                             Expected that file's SHA-256, or leave --module-sha256 out",
                            info.sha256
                        ),
                    ));
                }
            }
            sha
        }
        (None, Some((_, info))) => info.sha256.clone(),
        (None, None) => {
            return Err(invalid(
                "--module-sha256",
                "",
                "expected the module's SHA-256 (64 hexadecimal digits, `dialguard serve` prints it), \
                 or --module PATH to the module file so that rollout computes it and checks its build",
            ));
        }
    };
    let file_build = file.as_ref().map(|(_, info)| info.build);
    let url = match (&args.module_url, &args.collector_manifests) {
        (Some(url), _) => {
            let named = Build::named(url_file_name(url));
            match (file_build, named) {
                (Some(build), Some(named)) if build != named => {
                    return Err(invalid(
                        "--module-url",
                        url,
                        format!(
                            "names the {named} build but --module {} is the {build} build; \
                             expected a URL ending in /{}",
                            file.as_ref().map_or("", |(shown, _)| shown.as_str()),
                            build.file_name()
                        ),
                    ));
                }
                // The file says what it is (checked above against the mode).
                (Some(_), _) => {}
                (None, Some(named)) if !named.runs(&args.mode) => {
                    return Err(invalid(
                        "--module-url",
                        url,
                        format!(
                            "names the audit build, which refuses --mode enforce; expected the enforce \
                             build's URL, ending in /{ENFORCE_MODULE_FILE} (`dialguard serve --enforce-module` serves it there)"
                        ),
                    ));
                }
                (None, Some(_)) => {}
                // An unknown name in audit mode: both builds run audit.
                (None, None) if args.mode != "enforce" => {}
                (None, None) => {
                    return Err(invalid(
                        "--module-url",
                        url,
                        format!(
                            "cannot tell which build this URL serves, and only the enforce build runs --mode enforce; \
                             expected a URL ending in /{ENFORCE_MODULE_FILE}, or --module PATH to the module file so that rollout checks its build"
                        ),
                    ));
                }
            }
            url.clone()
        }
        (None, Some(c)) => {
            // The collector serves both builds; a given file decides, else the mode.
            let build = file_build.unwrap_or(if args.mode == "enforce" {
                Build::Enforce
            } else {
                Build::Audit
            });
            // The collector's HTTP listener has TLS too when its gRPC does.
            module_url(
                &c.namespace,
                build,
                args.collector_mtls == CollectorMtls::Istio,
            )
        }
        (None, None) => {
            return Err(invalid(
                "--module-url",
                "",
                format!("{URL_EXPECTED}; only --with-collector knows it without the flag"),
            ));
        }
    };
    Ok(ResolvedModule { url, sha256 })
}

fn plan(args: &RolloutArgs) -> Result<Plan, RolloutError> {
    if args.namespaces.is_empty() {
        return Err(invalid(
            "--namespace",
            "",
            "expected at least one namespace to roll out to",
        ));
    }
    let mut namespaces = Vec::new();
    for ns in &args.namespaces {
        if !is_dns_label(ns) {
            return Err(invalid(
                "--namespace",
                ns,
                "expected a Kubernetes namespace name (lower-case letters, digits and '-', at most 63)",
            ));
        }
        if !namespaces.contains(ns) {
            namespaces.push(ns.clone());
        }
    }
    let mut selector = BTreeMap::new();
    for pair in &args.selectors {
        let expected = "expected key=value with a Kubernetes label key and value, e.g. app=manager";
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid("--selector", pair, expected))?;
        if !is_label_key(key) || !is_label_value(value) {
            return Err(invalid("--selector", pair, expected));
        }
        selector.insert(key.to_owned(), value.to_owned());
    }
    if !matches!(args.mode.as_str(), "audit" | "enforce") {
        return Err(invalid("--mode", &args.mode, "expected audit or enforce"));
    }
    if args.mode == "enforce" && args.pod_cidrs.is_empty() {
        return Err(invalid(
            "--pod-cidr",
            "",
            "enforce mode closes only connections dialed to pod IPs, so it needs the cluster's pod ranges, e.g. --pod-cidr 10.244.0.0/16",
        ));
    }
    let (collector_host, collector_port) = parse_host_port("--collector", &args.collector)?;

    let module = resolve_module(args)?;
    let url = url::Url::parse(&module.url)
        .map_err(|_| invalid("--module-url", &module.url, URL_EXPECTED))?;
    let module_tls = match url.scheme() {
        "http" => false,
        "https" => true,
        _ => return Err(invalid("--module-url", &module.url, URL_EXPECTED)),
    };
    let module_host = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .filter(|h| is_host(h))
        .ok_or_else(|| invalid("--module-url", &module.url, URL_EXPECTED))?;
    let module_port = url
        .port_or_known_default()
        .ok_or_else(|| invalid("--module-url", &module.url, URL_EXPECTED))?;

    for (flag, cidrs) in [
        ("--service-cidr", &args.service_cidrs),
        ("--pod-cidr", &args.pod_cidrs),
    ] {
        for cidr in cidrs {
            cidr.parse::<Cidr>()
                .map_err(|expected| invalid(flag, cidr, expected))?;
        }
    }
    let mut filter_config = json!({
        "mode": args.mode,
        "collector": { "cluster": COLLECTOR_CLUSTER },
        // The filter passes it on in its hello: the collector then knows
        // which build each sidecar runs.
        "moduleSha256": module.sha256,
    });
    if !args.service_cidrs.is_empty() {
        filter_config["serviceCidrs"] = json!(args.service_cidrs);
    }
    if !args.pod_cidrs.is_empty() {
        filter_config["podCidrs"] = json!(args.pod_cidrs);
    }
    // What we render, the filter must accept: check with the filter's own parser.
    FilterConfig::from_json(filter_config.to_string().as_bytes())
        .map_err(|err| invalid("--service-cidr/--pod-cidr", &err.field, err.message))?;

    if let Some(c) = &args.collector_manifests {
        if !is_dns_label(&c.namespace) {
            return Err(invalid(
                "--collector-namespace",
                &c.namespace,
                "expected a Kubernetes namespace name",
            ));
        }
        if c.image.trim().is_empty() || c.image.contains(char::is_whitespace) {
            return Err(invalid(
                "--collector-image",
                &c.image,
                "expected a container image reference, e.g. registry.example.com/dialguard:0.1.0",
            ));
        }
        let digits = c
            .storage
            .trim_end_matches(|ch: char| ch.is_ascii_alphabetic());
        let unit = &c.storage[digits.len()..];
        if digits.parse::<u64>().map_or(true, |n| n == 0)
            || !matches!(unit, "Mi" | "Gi" | "Ti" | "M" | "G" | "T")
        {
            return Err(invalid(
                "--collector-storage",
                &c.storage,
                "expected a Kubernetes quantity such as 1Gi",
            ));
        }
    }
    Ok(Plan {
        namespaces,
        selector,
        collector_host,
        collector_port,
        module_url: module.url,
        module_host,
        module_port,
        module_tls,
        module_sha256: module.sha256,
        filter_config,
        priority: args.priority,
        wasm_plugin: args.wasm_plugin,
        collector_manifests: args.collector_manifests.clone(),
        collector_mtls: args.collector_mtls,
    })
}

fn labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "dialguard",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "dialguard-rollout",
    })
}

fn metadata(name: &str, namespace: &str, component: &str) -> Value {
    json!({ "name": name, "namespace": namespace, "labels": labels(component) })
}

impl Plan {
    /// The network filter exactly as it goes into each outbound filter chain.
    fn filter(&self) -> Value {
        network_filter(
            &self.filter_config,
            &ModuleSource::Remote {
                uri: self.module_url.clone(),
                cluster: MODULE_CLUSTER.into(),
                sha256: self.module_sha256.clone(),
            },
        )
    }

    fn add_cluster(value: Value) -> Value {
        json!({
            "applyTo": "CLUSTER",
            "match": { "context": "SIDECAR_OUTBOUND" },
            "patch": { "operation": "ADD", "value": value },
        })
    }

    fn envoy_filter(&self, namespace: &str, name: &str, patches: Vec<Value>) -> Value {
        let mut spec = json!({ "priority": self.priority, "configPatches": patches });
        if !self.selector.is_empty() {
            spec["workloadSelector"] = json!({ "labels": self.selector });
        }
        json!({
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": metadata(name, namespace, "sidecar-filter"),
            "spec": spec,
        })
    }

    fn collector_cluster_patch(&self) -> Value {
        let mut cluster =
            collector_cluster(COLLECTOR_CLUSTER, &self.collector_host, self.collector_port);
        if self.collector_mtls == CollectorMtls::Istio {
            cluster["transport_socket"] = istio_mtls_transport_socket(&self.collector_host);
        }
        Self::add_cluster(cluster)
    }

    fn for_namespace(&self, namespace: &str) -> Vec<Value> {
        if self.wasm_plugin {
            let mut spec = json!({
                "url": self.module_url,
                "sha256": self.module_sha256,
                "type": "NETWORK",
                "failStrategy": "FAIL_OPEN",
                "pluginName": crate::FILTER_NAME,
                "pluginConfig": self.filter_config,
                "match": [{ "mode": "CLIENT" }],
            });
            if !self.selector.is_empty() {
                spec["selector"] = json!({ "matchLabels": self.selector });
            }
            let plugin = json!({
                "apiVersion": "extensions.istio.io/v1alpha1",
                "kind": "WasmPlugin",
                "metadata": metadata(RESOURCE_NAME, namespace, "sidecar-filter"),
                "spec": spec,
            });
            let clusters = self.envoy_filter(
                namespace,
                &format!("{RESOURCE_NAME}-collector"),
                vec![self.collector_cluster_patch()],
            );
            return vec![plugin, clusters];
        }
        let insert_filter = json!({
            "applyTo": "NETWORK_FILTER",
            "match": {
                "context": "SIDECAR_OUTBOUND",
                "listener": { "filterChain": { "filter": { "name": "envoy.filters.network.tcp_proxy" } } },
            },
            "patch": { "operation": "INSERT_BEFORE", "value": self.filter() },
        });
        let module = Self::add_cluster(module_cluster(
            MODULE_CLUSTER,
            &self.module_host,
            self.module_port,
            self.module_tls,
        ));
        vec![self.envoy_filter(
            namespace,
            RESOURCE_NAME,
            vec![insert_filter, self.collector_cluster_patch(), module],
        )]
    }

    fn collector_objects(&self, c: &CollectorManifests) -> Vec<Value> {
        let name = "dialguard-collector";
        let ns = c.namespace.as_str();
        let selector = json!({ "app.kubernetes.io/name": "dialguard", "app.kubernetes.io/component": "collector" });
        let expected: String = self.namespaces.iter().map(|n| format!("{n}\n")).collect();
        let expected_file = format!("{EXPECTED_NAMESPACES_DIR}/{EXPECTED_NAMESPACES_KEY}");
        let mut args = vec![
            "serve".to_string(),
            "--grpc".into(),
            format!("0.0.0.0:{COLLECTOR_GRPC_PORT}"),
            "--http".into(),
            format!("0.0.0.0:{COLLECTOR_HTTP_PORT}"),
            "--db".into(),
            "/var/lib/dialguard/dialguard.db".into(),
            "--module".into(),
            format!("{IMAGE_MODULE_DIR}/{AUDIT_MODULE_FILE}"),
            "--enforce-module".into(),
            format!("{IMAGE_MODULE_DIR}/{ENFORCE_MODULE_FILE}"),
            "--expect-namespaces-file".into(),
            expected_file,
        ];
        let mut mounts = vec![
            json!({ "name": "db", "mountPath": "/var/lib/dialguard" }),
            // A directory, not a subPath: kubelet keeps it current when
            // the ConfigMap changes.
            json!({ "name": "expected-namespaces", "mountPath": EXPECTED_NAMESPACES_DIR, "readOnly": true }),
        ];
        let mut volumes = vec![
            json!({ "name": "db", "persistentVolumeClaim": { "claimName": format!("{name}-db") } }),
            json!({ "name": "expected-namespaces", "configMap": { "name": EXPECTED_NAMESPACES_CONFIGMAP } }),
        ];
        let tls = self.collector_mtls == CollectorMtls::Istio;
        if tls {
            args.extend([
                "--tls-cert".to_string(),
                format!("{COLLECTOR_TLS_DIR}/tls.crt"),
                "--tls-key".into(),
                format!("{COLLECTOR_TLS_DIR}/tls.key"),
                // Sidecars present their Istio workload certificates.
                "--grpc-client-ca".into(),
                format!("{ISTIO_ROOT_DIR}/root-cert.pem"),
            ]);
            mounts.push(json!({ "name": "tls", "mountPath": COLLECTOR_TLS_DIR, "readOnly": true }));
            mounts
                .push(json!({ "name": "istio-ca", "mountPath": ISTIO_ROOT_DIR, "readOnly": true }));
            volumes
                .push(json!({ "name": "tls", "secret": { "secretName": COLLECTOR_TLS_SECRET } }));
            volumes
                .push(json!({ "name": "istio-ca", "configMap": { "name": ISTIO_ROOT_CONFIGMAP } }));
        }
        let probe = |path: &str| {
            let mut get = json!({ "path": path, "port": COLLECTOR_HTTP_PORT });
            if tls {
                get["scheme"] = json!("HTTPS");
            }
            json!({ "httpGet": get })
        };
        vec![
            json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": metadata(&format!("{name}-db"), ns, "collector"),
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": c.storage } },
                },
            }),
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata(EXPECTED_NAMESPACES_CONFIGMAP, ns, "collector"),
                "data": { EXPECTED_NAMESPACES_KEY: expected },
            }),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": metadata(name, ns, "collector"),
                "spec": {
                    // One writer per SQLite file: never two pods at once.
                    "replicas": 1,
                    "strategy": { "type": "Recreate" },
                    "selector": { "matchLabels": selector },
                    "template": {
                        "metadata": {
                            "labels": labels("collector"),
                            "annotations": {
                                // The collector's own traffic needs no sidecar.
                                "sidecar.istio.io/inject": "false",
                                // A changed list restarts the collector, so it
                                // reads the list whenever it reads it.
                                "dialguard.io/expected-namespaces-sha256": module::sha256_hex(expected.as_bytes()),
                            },
                        },
                        "spec": {
                            "containers": [{
                                "name": "collector",
                                "image": c.image,
                                "args": args,
                                "ports": [
                                    { "name": "grpc-ingest", "containerPort": COLLECTOR_GRPC_PORT },
                                    { "name": "http-api", "containerPort": COLLECTOR_HTTP_PORT },
                                ],
                                // Ready while the store can write; alive while the
                                // process answers (a full disk is not cured by a restart).
                                "readinessProbe": probe("/readyz"),
                                "livenessProbe": probe("/healthz"),
                                "volumeMounts": mounts,
                            }],
                            "volumes": volumes,
                        },
                    },
                },
            }),
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(name, ns, "collector"),
                "spec": {
                    "selector": selector,
                    "ports": [
                        { "name": "grpc-ingest", "port": COLLECTOR_GRPC_PORT, "targetPort": COLLECTOR_GRPC_PORT, "appProtocol": "grpc" },
                        { "name": "http-api", "port": COLLECTOR_HTTP_PORT, "targetPort": COLLECTOR_HTTP_PORT, "appProtocol": "http" },
                    ],
                },
            }),
        ]
    }
}

/// Every resource that installs dialguard, in apply order.
pub fn render(args: &RolloutArgs) -> Result<Vec<Value>, RolloutError> {
    let plan = plan(args)?;
    let mut objects = Vec::new();
    if let Some(c) = &plan.collector_manifests {
        objects.extend(plan.collector_objects(c));
    }
    for ns in &plan.namespaces {
        objects.extend(plan.for_namespace(ns));
    }
    Ok(objects)
}

/// What removes it: the same resources, identified only (`kubectl delete -f -`).
/// The collector's database volume is left out: deleting the audit record
/// takes a deliberate `kubectl delete pvc`.
pub fn uninstall(args: &RolloutArgs) -> Result<Vec<Value>, RolloutError> {
    Ok(render(args)?
        .into_iter()
        .filter(|o| o["kind"] != "PersistentVolumeClaim")
        .map(|o| {
            json!({
                "apiVersion": o["apiVersion"],
                "kind": o["kind"],
                "metadata": { "name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"] },
            })
        })
        .collect())
}

/// Where the collector that `--with-collector` deploys serves `build`.
pub fn in_cluster_module_url(namespace: &str, build: Build) -> String {
    module_url(namespace, build, false)
}

fn module_url(namespace: &str, build: Build, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!(
        "{scheme}://dialguard-collector.{namespace}.svc.cluster.local:{COLLECTOR_HTTP_PORT}/module/{}",
        build.file_name()
    )
}

/// The collector address that `--with-collector` deploys, for `--collector`.
pub fn in_cluster_collector(namespace: &str) -> String {
    format!("dialguard-collector.{namespace}.svc.cluster.local:{COLLECTOR_GRPC_PORT}")
}
