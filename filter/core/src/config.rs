//! The filter's configuration: JSON in the wasm filter's `configuration`,
//! camelCase, unknown fields rejected, every error naming its field.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// What the filter does with a misrouted connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Observe and report; never touch traffic.
    #[default]
    Audit,
    /// Also close a misrouted connection at its first data, in either
    /// direction, before any byte reaches the wrong server or the client.
    /// Needs the module built with enforcement (`dialguard_filter_enforce.wasm`).
    Enforce,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterConfig {
    #[serde(default)]
    pub mode: Mode,
    pub collector: CollectorConfig,
    /// Service VIP ranges: a destination inside them is load-balanced by design.
    /// The default is kubeadm's service range.
    #[serde(default = "default_service_cidrs")]
    pub service_cidrs: Vec<Cidr>,
    /// Pod ranges: the mesh's own addresses. Only a dialed address inside
    /// them that reached another address is `MISROUTED` (certain, alerted,
    /// closed in enforce mode); any other difference is `REDIRECTED`, which
    /// the collector upgrades when its pod directory knows the address.
    /// Required by enforce mode.
    #[serde(default)]
    pub pod_cidrs: Vec<Cidr>,
    /// Differences the operator declares legitimate.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// The sha256 (hex) the module was pinned with, passed on in the hello
    /// for the audit trail: Envoy does not tell a module its own hash.
    #[serde(default)]
    pub module_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectorConfig {
    /// The Envoy cluster (HTTP/2) that leads to the collector.
    pub cluster: String,
    /// How often buffered events are sent.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Most events in one batch message.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Most events kept awaiting acknowledgement; beyond it the oldest are dropped and counted.
    #[serde(default = "default_max_buffered_events")]
    pub max_buffered_events: usize,
    /// Most encoded bytes kept awaiting acknowledgement.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// How often the VM tells the collector it runs, with its counters
    /// (jittered by up to a tenth either way). Three missed intervals make
    /// it stale in the collector's coverage.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
}

/// A legitimate difference. Every condition given must hold; at least one is required.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowRule {
    /// Envoy cluster name, exact, or a prefix when it ends with `*`.
    pub cluster: Option<String>,
    /// The original destination's IP lies in this range.
    pub destination_cidr: Option<Cidr>,
    /// The original destination's port.
    pub port: Option<u16>,
}

/// An IP network written as `10.96.0.0/12`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| Self(IpNet::from(ip)))
            .map_err(|_| format!("expected a CIDR such as \"10.96.0.0/12\", got {s:?}"))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Istio's ServiceEntry VIP auto-allocation ranges: 240.240.0.0/16 and 2001:2::/48.
fn is_istio_auto_allocated(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets(), [240, 240, _, _]),
        IpAddr::V6(v6) => matches!(v6.segments(), [0x2001, 0x2, 0, ..]),
    }
}

fn default_service_cidrs() -> Vec<Cidr> {
    vec![Cidr(IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 96, 0, 0),
        12,
    )))]
}
fn default_flush_interval_ms() -> u64 {
    200
}
fn default_max_batch_events() -> usize {
    500
}
fn default_max_buffered_events() -> usize {
    10_000
}
fn default_max_buffered_bytes() -> usize {
    4 << 20
}
fn default_heartbeat_interval_ms() -> u64 {
    60_000
}

/// A configuration the filter refuses, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path, e.g. `allow[1].destinationCidr`; `.` for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid dialguard configuration at `{}`: {}",
            self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

impl FilterConfig {
    /// Parses and validates the filter configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
        let config: Self = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let field = err.path().to_string();
            let inner = err.into_inner();
            let message = if inner.is_eof() && bytes.iter().all(u8::is_ascii_whitespace) {
                "expected a JSON object with at least `collector.cluster`, got nothing".to_owned()
            } else {
                inner.to_string()
            };
            ConfigError { field, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field: &str, message: String| {
            Err(ConfigError {
                field: field.to_owned(),
                message,
            })
        };
        let c = &self.collector;
        if c.cluster.trim().is_empty() {
            return fail(
                "collector.cluster",
                "expected the name of the Envoy cluster that leads to the collector, got an empty string".into(),
            );
        }
        if !(10..=60_000).contains(&c.flush_interval_ms) {
            return fail(
                "collector.flushIntervalMs",
                format!(
                    "expected 10 to 60000 milliseconds, got {}",
                    c.flush_interval_ms
                ),
            );
        }
        if !(1..=10_000).contains(&c.max_batch_events) {
            return fail(
                "collector.maxBatchEvents",
                format!("expected 1 to 10000, got {}", c.max_batch_events),
            );
        }
        if c.max_buffered_events < c.max_batch_events || c.max_buffered_events > 1_000_000 {
            return fail(
                "collector.maxBufferedEvents",
                format!(
                    "expected maxBatchEvents ({}) to 1000000, got {}",
                    c.max_batch_events, c.max_buffered_events
                ),
            );
        }
        if !(4 << 10..=256 << 20).contains(&c.max_buffered_bytes) {
            return fail(
                "collector.maxBufferedBytes",
                format!("expected 4096 to 268435456, got {}", c.max_buffered_bytes),
            );
        }
        if !(1_000..=3_600_000).contains(&c.heartbeat_interval_ms) {
            return fail(
                "collector.heartbeatIntervalMs",
                format!(
                    "expected 1000 to 3600000 milliseconds, got {}",
                    c.heartbeat_interval_ms
                ),
            );
        }
        if let Some(sha) = &self.module_sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return fail(
                    "moduleSha256",
                    format!("expected 64 hexadecimal digits, got {sha:?}"),
                );
            }
        }
        if self.mode == Mode::Enforce && self.pod_cidrs.is_empty() {
            // Without pod ranges no difference is certain, and enforce must
            // never close a legitimate connection (DNS load balancing).
            return fail(
                "podCidrs",
                "enforce mode closes only connections dialed to pod IPs, so it needs the pod \
                 ranges, e.g. [\"10.244.0.0/16\"]; got none"
                    .into(),
            );
        }
        for (i, rule) in self.allow.iter().enumerate() {
            if rule.cluster.is_none() && rule.destination_cidr.is_none() && rule.port.is_none() {
                return fail(
                    &format!("allow[{i}]"),
                    "expected at least one of `cluster`, `destinationCidr`, `port`".into(),
                );
            }
            if let Some(cluster) = &rule.cluster {
                let stem = cluster.strip_suffix('*').unwrap_or(cluster);
                if stem.is_empty() || stem.contains('*') {
                    return fail(
                        &format!("allow[{i}].cluster"),
                        format!(
                            "expected a cluster name, optionally ending with `*` for a prefix, got {cluster:?}"
                        ),
                    );
                }
            }
            if rule.port == Some(0) {
                return fail(
                    &format!("allow[{i}].port"),
                    "expected 1 to 65535, got 0".into(),
                );
            }
        }
        Ok(())
    }

    /// True when the address is a Service VIP: inside `serviceCidrs`, or in
    /// the ranges istiod auto-allocates ServiceEntry VIPs from (DNS proxying
    /// answers with them; the `<vip>_<port>` listener then balances over the
    /// entry's real addresses).
    pub fn is_service_vip(&self, ip: IpAddr) -> bool {
        self.service_cidrs.iter().any(|c| c.contains(ip)) || is_istio_auto_allocated(ip)
    }

    /// True when the address is inside `podCidrs`: a difference is then certain.
    pub fn is_pod(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|c| c.contains(ip))
    }

    /// True when pod ranges are configured, so that an address outside them
    /// is known to be external.
    pub fn knows_pods(&self) -> bool {
        !self.pod_cidrs.is_empty()
    }

    /// True when some allow rule reads the cluster name (so it must be fetched).
    pub fn allow_needs_cluster(&self) -> bool {
        self.allow.iter().any(|r| r.cluster.is_some())
    }
}

impl AllowRule {
    /// `cluster` is `None` when no rule needs it and it was not read.
    pub fn matches(&self, dst: crate::OrigDst, cluster: Option<&str>) -> bool {
        let cluster_ok = match (&self.cluster, cluster) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(pattern), Some(name)) => match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            },
        };
        cluster_ok
            && self.destination_cidr.is_none_or(|c| c.contains(dst.ip()))
            && self.port.is_none_or(|p| p == dst.port())
    }
}
