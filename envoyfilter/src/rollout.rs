//! `dialguard rollout`: the Istio resources that install dialguard in the
//! sidecars of selected namespaces, rendered from command-line flags.
//!
//! Per namespace an `EnvoyFilter` inserts the wasm network filter before
//! `envoy.filters.network.tcp_proxy` in every `SIDECAR_OUTBOUND` filter chain
//! and adds the clusters the filter needs (the collector, over HTTP/2, and the
//! module's download), so events reach the collector even when a Sidecar
//! resource hides its Service. A `WasmPlugin` variant exists for Istio 1.20
//! and later; it also takes the module as an OCI image (`oci://`), which
//! istio-agent pulls. The collector's objects come from the kustomize base
//! ([`crate::base`]) with the flags' changes applied. Every flag is validated
//! before anything is rendered; an error names the flag, the value and what
//! was expected.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use dialguard_filter_core::{Cidr, FilterConfig};
use serde_json::{Value, json};

use crate::base;
use crate::image::{self, FILTER_ENFORCE_IMAGE, FILTER_IMAGE};
use crate::module::{self, Build, ENFORCE_MODULE_FILE};
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
    /// Where Envoy (http, https) or istio-agent (also oci, with
    /// `wasm_plugin`) gets the module. Without it, `wasm_plugin` takes the
    /// release's filter image of the build the mode needs, and
    /// `collector_manifests` the in-cluster collector's URL of that build.
    pub module_url: Option<String>,
    /// The module's SHA-256; computed from `module_file` when that is given.
    /// For an `oci://` URL, the image manifest's digest (what Istio checks).
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
    /// Also render the collector: the kustomize base's objects with these changes.
    pub collector_manifests: Option<CollectorManifests>,
    /// How the sidecars' collector cluster is secured (`--collector-mtls`).
    pub collector_mtls: CollectorMtls,
    /// WasmPlugin `imagePullPolicy` (`--image-pull-policy`).
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// WasmPlugin `imagePullSecret`: a Secret in each rolled-out namespace.
    pub image_pull_secret: Option<String>,
}

/// `--image-pull-policy`: when istio-agent fetches the module again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Once per module (digest or tag) on each node's agent.
    IfNotPresent,
    /// Whenever the WasmPlugin changes (a moving tag is followed).
    Always,
}

impl ImagePullPolicy {
    /// The WasmPlugin field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Always => "Always",
        }
    }
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
            image_pull_policy: None,
            image_pull_secret: None,
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
    module_location: ModuleLocation,
    /// `None` only for an OCI image referenced by tag without a digest.
    module_sha256: Option<String>,
    filter_config: Value,
    priority: i32,
    wasm_plugin: bool,
    collector_manifests: Option<CollectorManifests>,
    collector_mtls: CollectorMtls,
    image_pull_policy: Option<ImagePullPolicy>,
    image_pull_secret: Option<String>,
}

/// Where the module comes from, by URL scheme.
#[derive(Debug)]
enum ModuleLocation {
    /// Envoy downloads it through the `dialguard_module` cluster.
    Http { host: String, port: u16, tls: bool },
    /// istio-agent pulls the image (WasmPlugin only).
    Oci,
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

const URL_EXPECTED: &str = "expected an http:// or https:// URL of the module, e.g. http://dialguard-collector.dialguard:8080/module/dialguard_filter.wasm (with --wasm-plugin also an oci:// image)";
const OCI_EXPECTED: &str = "expected an OCI image reference oci://REGISTRY/PATH/NAME[:TAG][@sha256:DIGEST], e.g. oci://ghcr.io/dialguard/dialguard-filter:0.1.0";

/// The module the sidecars load: where from and its SHA-256.
#[derive(Debug)]
struct ResolvedModule {
    url: String,
    location: ModuleLocation,
    sha256: Option<String>,
}

/// The last path segment of a URL, where a module's file name is.
fn url_file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What an `oci://` reference names: the image (its last path segment) and
/// the manifest digest it is pinned to, if any.
#[derive(Debug)]
struct OciReference {
    name: String,
    digest: Option<String>,
}

/// `oci://REGISTRY[:PORT]/PATH[:TAG][@sha256:HEX]`, as the OCI distribution
/// spec names repositories and tags.
fn parse_oci(url: &str) -> Option<OciReference> {
    let rest = url.strip_prefix("oci://")?;
    let (rest, digest) = match rest.split_once('@') {
        Some((rest, digest)) => {
            let hex = digest.strip_prefix("sha256:")?;
            is_sha256_hex(hex).then_some((rest, Some(hex.to_owned())))?
        }
        None => (rest, None),
    };
    let (registry, path) = rest.split_once('/')?;
    let host = match registry.rsplit_once(':') {
        Some((host, port)) => port.parse::<u16>().ok().filter(|p| *p != 0).map(|_| host)?,
        None => registry,
    };
    if !is_host(host) {
        return None;
    }
    let (path, tag) = match path.rsplit_once(':') {
        Some((path, tag)) => (path, Some(tag)),
        None => (path, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    });
    let segment_ok = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            })
    };
    if !tag_ok || !path.split('/').all(segment_ok) {
        return None;
    }
    Some(OciReference {
        name: path.rsplit('/').next().unwrap_or(path).to_owned(),
        digest,
    })
}

/// The build an OCI image's name says it is.
fn image_build(name: &str) -> Option<Build> {
    match name {
        FILTER_IMAGE => Some(Build::Audit),
        FILTER_ENFORCE_IMAGE => Some(Build::Enforce),
        _ => None,
    }
}

/// The reference a release publishes `build` under (`cargo xtask images`).
pub fn release_module_image(build: Build) -> String {
    let name = match build {
        Build::Audit => FILTER_IMAGE,
        Build::Enforce => FILTER_ENFORCE_IMAGE,
    };
    format!("oci://{}", image::reference(name))
}

/// How a URL names a build: `/dialguard_filter.wasm` or the image `dialguard-filter`.
fn naming(url: &str, build: Build) -> String {
    if url.starts_with("oci://") {
        let name = match build {
            Build::Audit => FILTER_IMAGE,
            Build::Enforce => FILTER_ENFORCE_IMAGE,
        };
        format!("an image named {name}")
    } else {
        format!("a URL ending in /{}", build.file_name())
    }
}

/// Checks the build a URL names (`named`) against the module file's and
/// the mode: the wrong build would leave the namespace silently unwatched.
fn check_named_build(
    args: &RolloutArgs,
    url: &str,
    file: Option<(&str, Build)>,
    named: Option<Build>,
) -> Result<(), RolloutError> {
    match (file, named) {
        (Some((shown, build)), Some(named)) if build != named => Err(invalid(
            "--module-url",
            url,
            format!(
                "names the {named} build but --module {shown} is the {build} build; expected {}",
                naming(url, build)
            ),
        )),
        // The file says what it is (checked against the mode already).
        (Some(_), _) => Ok(()),
        (None, Some(named)) if !named.runs(&args.mode) => Err(invalid(
            "--module-url",
            url,
            format!(
                "names the audit build, which refuses --mode enforce; expected the enforce build: {}{}",
                naming(url, Build::Enforce),
                if url.starts_with("oci://") {
                    ""
                } else {
                    " (`dialguard serve --enforce-module` serves it there)"
                }
            ),
        )),
        (None, Some(_)) => Ok(()),
        // An unknown name in audit mode: both builds run audit.
        (None, None) if args.mode != "enforce" => Ok(()),
        (None, None) => Err(invalid(
            "--module-url",
            url,
            format!(
                "cannot tell which build this URL serves, and only the enforce build runs --mode enforce; \
                 expected {}, or --module PATH to the module file so that rollout checks its build",
                naming(url, Build::Enforce)
            ),
        )),
    }
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
    let file_build = file
        .as_ref()
        .map(|(shown, info)| (shown.as_str(), info.build));
    let given_sha = match &args.module_sha256 {
        None => None,
        Some(given) => {
            let sha = given.to_ascii_lowercase();
            if !is_sha256_hex(&sha) {
                return Err(invalid(
                    "--module-sha256",
                    given,
                    "expected the module's SHA-256 as 64 hexadecimal digits (`dialguard serve` prints it; \
                     for an oci:// image, the manifest digest without `sha256:`)",
                ));
            }
            Some(sha)
        }
    };
    // Without a URL, a given file decides the build, else the mode.
    let default_build = file_build.map_or(
        if args.mode == "enforce" {
            Build::Enforce
        } else {
            Build::Audit
        },
        |(_, build)| build,
    );
    let url = match (&args.module_url, &args.collector_manifests) {
        (Some(url), _) => url.clone(),
        // istio-agent pulls images (and would not trust a collector whose
        // certificate chains to the mesh's root for a download).
        (None, _) if args.wasm_plugin => release_module_image(default_build),
        // The collector serves both builds; its HTTP listener has TLS too
        // when its gRPC does.
        (None, Some(c)) => module_url(
            &c.namespace,
            default_build,
            args.collector_mtls == CollectorMtls::Istio,
        ),
        (None, None) => {
            return Err(invalid(
                "--module-url",
                "",
                format!(
                    "{URL_EXPECTED}; only --with-collector (the collector's URL) and --wasm-plugin \
                     (the release's filter image) know it without the flag"
                ),
            ));
        }
    };

    if url.starts_with("oci://") {
        if !args.wasm_plugin {
            return Err(invalid(
                "--module-url",
                &url,
                "Envoy cannot load an oci:// image itself (istio-agent pulls images for a WasmPlugin only); \
                 expected --wasm-plugin, or an https:// or http:// URL of the module file with its sha256 \
                 (--module or --module-sha256)",
            ));
        }
        let oci = parse_oci(&url).ok_or_else(|| invalid("--module-url", &url, OCI_EXPECTED))?;
        check_named_build(args, &url, file_build, image_build(&oci.name))?;
        // Istio checks an image by its manifest digest, which the module
        // file cannot tell: --module checks the build only.
        let sha256 = match (given_sha, oci.digest) {
            (Some(given), Some(pinned)) if given != pinned => {
                return Err(invalid(
                    "--module-sha256",
                    &given,
                    format!(
                        "differs from the digest --module-url {url} is pinned to; for an oci:// image both \
                         are the image manifest's digest: give one of them"
                    ),
                ));
            }
            (given, pinned) => given.or(pinned),
        };
        return Ok(ResolvedModule {
            url,
            location: ModuleLocation::Oci,
            sha256,
        });
    }

    let parsed = url::Url::parse(&url).map_err(|_| invalid("--module-url", &url, URL_EXPECTED))?;
    let tls = match parsed.scheme() {
        "http" => false,
        "https" => true,
        _ => return Err(invalid("--module-url", &url, URL_EXPECTED)),
    };
    let host = parsed
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .filter(|h| is_host(h))
        .ok_or_else(|| invalid("--module-url", &url, URL_EXPECTED))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| invalid("--module-url", &url, URL_EXPECTED))?;
    check_named_build(args, &url, file_build, Build::named(url_file_name(&url)))?;
    let sha256 = match (given_sha, &file) {
        (Some(given), Some((shown, info))) if info.sha256 != given => {
            return Err(invalid(
                "--module-sha256",
                &given,
                format!(
                    "does not match --module {shown} (sha256 {}); Envoy would refuse the download. \
                     Expected that file's SHA-256, or leave --module-sha256 out",
                    info.sha256
                ),
            ));
        }
        (Some(given), _) => given,
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
    Ok(ResolvedModule {
        url,
        location: ModuleLocation::Http { host, port, tls },
        sha256: Some(sha256),
    })
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
    if let Some(secret) = &args.image_pull_secret {
        if !matches!(module.location, ModuleLocation::Oci) {
            return Err(invalid(
                "--image-pull-secret",
                secret,
                "istio-agent uses the secret only to pull an image; expected an oci:// --module-url",
            ));
        }
        if secret.len() > 253 || !secret.split('.').all(is_dns_label) {
            return Err(invalid(
                "--image-pull-secret",
                secret,
                "expected the name of a Secret of type kubernetes.io/dockerconfigjson in each rolled-out namespace",
            ));
        }
    }
    if !args.wasm_plugin {
        let flag = if args.image_pull_policy.is_some() {
            Some((
                "--image-pull-policy",
                args.image_pull_policy
                    .map(ImagePullPolicy::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ))
        } else {
            args.image_pull_secret
                .clone()
                .map(|s| ("--image-pull-secret", s))
        };
        if let Some((flag, value)) = flag {
            return Err(invalid(
                flag,
                &value,
                "only the WasmPlugin form pulls the module through istio-agent; expected --wasm-plugin",
            ));
        }
    }

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
    });
    if let Some(sha) = &module.sha256 {
        // The filter passes it on in its hello: the collector then knows
        // which build each sidecar runs.
        filter_config["moduleSha256"] = json!(sha);
    }
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
        module_location: module.location,
        module_sha256: module.sha256,
        filter_config,
        priority: args.priority,
        wasm_plugin: args.wasm_plugin,
        collector_manifests: args.collector_manifests.clone(),
        collector_mtls: args.collector_mtls,
        image_pull_policy: args.image_pull_policy,
        image_pull_secret: args.image_pull_secret.clone(),
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
    fn filter(&self, sha256: &str) -> Value {
        network_filter(
            &self.filter_config,
            &ModuleSource::Remote {
                uri: self.module_url.clone(),
                cluster: MODULE_CLUSTER.into(),
                sha256: sha256.to_owned(),
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

    fn for_namespace(&self, namespace: &str) -> Result<Vec<Value>, RolloutError> {
        if self.wasm_plugin {
            let mut spec = json!({
                "url": self.module_url,
                "type": "NETWORK",
                "failStrategy": "FAIL_OPEN",
                "pluginName": crate::FILTER_NAME,
                "pluginConfig": self.filter_config,
                "match": [{ "mode": "CLIENT" }],
            });
            if let Some(sha) = &self.module_sha256 {
                spec["sha256"] = json!(sha);
            }
            if let Some(policy) = self.image_pull_policy {
                spec["imagePullPolicy"] = json!(policy.as_str());
            }
            if let Some(secret) = &self.image_pull_secret {
                spec["imagePullSecret"] = json!(secret);
            }
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
            return Ok(vec![plugin, clusters]);
        }
        // `plan` refuses an OCI image without --wasm-plugin, and an HTTP
        // module without its sha256.
        let (ModuleLocation::Http { host, port, tls }, Some(sha256)) =
            (&self.module_location, &self.module_sha256)
        else {
            return Err(invalid(
                "--module-url",
                &self.module_url,
                "expected an https:// or http:// URL with its sha256 for the EnvoyFilter form",
            ));
        };
        let insert_filter = json!({
            "applyTo": "NETWORK_FILTER",
            "match": {
                "context": "SIDECAR_OUTBOUND",
                "listener": { "filterChain": { "filter": { "name": "envoy.filters.network.tcp_proxy" } } },
            },
            "patch": { "operation": "INSERT_BEFORE", "value": self.filter(sha256) },
        });
        let module = Self::add_cluster(module_cluster(MODULE_CLUSTER, host, *port, *tls));
        Ok(vec![self.envoy_filter(
            namespace,
            RESOURCE_NAME,
            vec![insert_filter, self.collector_cluster_patch(), module],
        )])
    }

    /// The kustomize base's objects with what the flags change, as an
    /// overlay would: namespace, image, storage, the expected namespaces,
    /// and for `--collector-mtls istio` the certificates and HTTPS.
    fn collector_objects(&self, c: &CollectorManifests) -> Result<Vec<Value>, RolloutError> {
        let mut objects = base::objects()
            .map_err(|err| invalid("--with-collector", err.file, err.to_string()))?;
        let expected: String = self.namespaces.iter().map(|n| format!("{n}\n")).collect();
        let tls = self.collector_mtls == CollectorMtls::Istio;
        for object in &mut objects {
            if object["kind"] == "Namespace" {
                object["metadata"]["name"] = json!(c.namespace);
            } else {
                object["metadata"]["namespace"] = json!(c.namespace);
            }
            match object["kind"].as_str().unwrap_or_default() {
                "PersistentVolumeClaim" => {
                    object["spec"]["resources"]["requests"]["storage"] = json!(c.storage);
                }
                "ConfigMap" if object["metadata"]["name"] == EXPECTED_NAMESPACES_CONFIGMAP => {
                    object["data"][EXPECTED_NAMESPACES_KEY] = json!(expected);
                }
                "Deployment" => {
                    let pod = &mut object["spec"]["template"]["spec"];
                    pod["containers"][0]["image"] = json!(c.image);
                    if tls {
                        Self::collector_pod_with_istio_mtls(pod);
                    }
                }
                "ServiceMonitor" if tls => {
                    // The HTTP listener shares the gRPC listener's certificate.
                    object["spec"]["endpoints"][0]["scheme"] = json!("https");
                    object["spec"]["endpoints"][0]["tlsConfig"] = json!({
                        "ca": { "configMap": { "name": ISTIO_ROOT_CONFIGMAP, "key": "root-cert.pem" } },
                        "serverName": format!("dialguard-collector.{}.svc.cluster.local", c.namespace),
                    });
                }
                _ => {}
            }
        }
        Ok(objects)
    }

    /// `--collector-mtls istio`: the server certificate from
    /// [`COLLECTOR_TLS_SECRET`], the mesh's root to verify the sidecars'
    /// workload certificates, and probes over HTTPS.
    fn collector_pod_with_istio_mtls(pod: &mut Value) {
        let container = &mut pod["containers"][0];
        if let Some(args) = container["args"].as_array_mut() {
            args.extend([
                json!("--tls-cert"),
                json!(format!("{COLLECTOR_TLS_DIR}/tls.crt")),
                json!("--tls-key"),
                json!(format!("{COLLECTOR_TLS_DIR}/tls.key")),
                // Sidecars present their Istio workload certificates.
                json!("--grpc-client-ca"),
                json!(format!("{ISTIO_ROOT_DIR}/root-cert.pem")),
            ]);
        }
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            mounts.push(json!({ "name": "tls", "mountPath": COLLECTOR_TLS_DIR, "readOnly": true }));
            mounts
                .push(json!({ "name": "istio-ca", "mountPath": ISTIO_ROOT_DIR, "readOnly": true }));
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            if container[probe]["httpGet"].is_object() {
                container[probe]["httpGet"]["scheme"] = json!("HTTPS");
            }
        }
        if let Some(volumes) = pod["volumes"].as_array_mut() {
            volumes
                .push(json!({ "name": "tls", "secret": { "secretName": COLLECTOR_TLS_SECRET } }));
            volumes
                .push(json!({ "name": "istio-ca", "configMap": { "name": ISTIO_ROOT_CONFIGMAP } }));
        }
    }
}

/// Every resource that installs dialguard, in apply order.
pub fn render(args: &RolloutArgs) -> Result<Vec<Value>, RolloutError> {
    let plan = plan(args)?;
    let mut objects = Vec::new();
    if let Some(c) = &plan.collector_manifests {
        objects.extend(plan.collector_objects(c)?);
    }
    for ns in &plan.namespaces {
        objects.extend(plan.for_namespace(ns)?);
    }
    Ok(objects)
}

/// What removes it: the same resources, identified only (`kubectl delete -f -`).
/// The collector's database volume is left out, and so is its Namespace,
/// whose deletion would take the volume with it: deleting the audit record
/// takes a deliberate `kubectl delete pvc` (or namespace).
pub fn uninstall(args: &RolloutArgs) -> Result<Vec<Value>, RolloutError> {
    Ok(render(args)?
        .into_iter()
        .filter(|o| o["kind"] != "PersistentVolumeClaim" && o["kind"] != "Namespace")
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
