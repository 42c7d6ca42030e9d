//! The sidecar inventory: every Envoy wasm VM that said `hello`, what it
//! runs and what it judged (its heartbeat counters), so that a silent
//! namespace can be told apart from one where nothing runs (issue 11).
//!
//! Ingest updates it in memory on every hello, heartbeat and batch; the
//! store persists the changed VMs at most once a second in one transaction
//! (`sidecars` table), and `serve` loads it back at startup. Coverage (per
//! pod and per namespace: reporting or stale, expected or not) is computed
//! here, for the report (from the database) and for the metrics (from
//! memory).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dialguard_proto::v1::{Build, Heartbeat, Hello, Mode};
use serde::{Deserialize, Serialize};

use crate::time::rfc3339;

/// `--max-vms` when not given: VMs held in memory (about 0.6 KiB each).
pub const DEFAULT_MAX_VMS: usize = 200_000;
/// Heartbeats one VM may send per second, over all its streams; a filter
/// sends one per `heartbeat_interval_ms` (at least 1 s), so more is a bug
/// or an attack.
pub const MAX_HEARTBEATS_PER_SECOND: u32 = 10;
/// A VM is stale after this many of its heartbeat intervals without a word.
pub const STALE_AFTER_INTERVALS: u64 = 3;
/// The interval assumed for filters that do not heartbeat (interval 0).
pub const LEGACY_INTERVAL_MS: u64 = 60_000;
/// `--forget-stale` when not given.
pub const DEFAULT_FORGET_STALE: Duration = Duration::from_secs(3600);
/// `hello.heartbeat_interval_ms`: 0 (no heartbeats) or within this range.
pub const INTERVAL_RANGE_MS: std::ops::RangeInclusive<u32> = 1_000..=3_600_000;

/// The verdicts a heartbeat counts, in `ConnectionCounters` order; the
/// `verdict` label of `dialguard_judged_connections_total`.
pub const VERDICTS: [&str; 7] = [
    "match",
    "service",
    "allowed",
    "misrouted",
    "blackholed",
    "redirected",
    "resolved",
];
/// `ConnectionCounters`' fields, as named in errors.
const CONNECTION_FIELDS: [&str; 9] = [
    "connections.match",
    "connections.service",
    "connections.allowed",
    "connections.misrouted",
    "connections.blackholed",
    "connections.redirected",
    "connections.resolved",
    "connections.unjudged",
    "connections.enforced",
];
/// `DeliveryCounters`' fields, as named in errors.
const DELIVERY_FIELDS: [&str; 5] = [
    "delivery.sent",
    "delivery.acked",
    "delivery.resent",
    "delivery.dropped",
    "delivery.rejected",
];
const DROPPED: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "the collector holds at most {0} sidecar VMs (--max-vms); this new vm_instance is refused"
    )]
    Full(usize),
    #[error(
        "heartbeat.{field}: {got} is below {had}, already reported by this vm_instance; \
         counters are cumulative (a restarted VM sends a new vm_instance)"
    )]
    Backwards {
        field: &'static str,
        got: u64,
        had: u64,
    },
    #[error(
        "more than {0} heartbeats per second from this vm_instance (over all its streams); \
         expected one per heartbeat_interval_ms"
    )]
    Flood(u32),
    #[error(
        "{source_name}: line {line}: {value:?}: expected a namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"
    )]
    ExpectedNamespace {
        source_name: String,
        line: usize,
        value: String,
    },
}

/// One VM: a (node_id, vm_instance), as proven by its connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmKey {
    pub node_id: Box<str>,
    pub vm_instance: Box<str>,
    /// The identity the client certificate proved (its SPIFFE URI) under
    /// `--grpc-client-ca`, empty without: one service account's certificate
    /// cannot speak for, or blind, a VM of another.
    pub peer: Box<str>,
}

impl VmKey {
    /// The key of a VM whose connection proved no identity.
    pub fn of(hello: &Hello) -> Self {
        Self::proven(hello, "")
    }

    pub fn proven(hello: &Hello, peer: &str) -> Self {
        Self {
            node_id: hello.node_id.as_str().into(),
            vm_instance: hello.vm_instance.as_str().into(),
            peer: peer.into(),
        }
    }
}

/// What is known of one VM. Strings are boxed (no spare capacity): at
/// 200,000 VMs every byte counts 200 KB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vm {
    pub pod_name: Box<str>,
    pub namespace: Box<str>,
    pub workload_name: Box<str>,
    /// Comma-joined, as the `sidecars` table keeps them.
    pub instance_ips: Box<str>,
    pub cluster_id: Box<str>,
    pub istio_version: Box<str>,
    pub filter_version: Box<str>,
    /// Empty or 64 lower-case hex digits.
    pub module_sha256: Box<str>,
    pub build: &'static str,
    pub mode: &'static str,
    pub heartbeat_interval_ms: u32,
    pub first_heard_ns: u64,
    pub last_heard_ns: u64,
    /// `ConnectionCounters` in field order (the seven verdicts, unjudged, enforced).
    pub connections: [u64; 9],
    /// `DeliveryCounters` in field order.
    pub delivery: [u64; 5],
    /// The highest of the batches' `dropped_total` and the heartbeats'
    /// `delivery.dropped`: the gap the report shows.
    pub dropped_total: u64,
    rate_window_ns: u64,
    rate_count: u32,
    dirty: bool,
}

/// The label of a `hello.build` value (already validated).
pub fn build_label(build: i32) -> &'static str {
    match Build::try_from(build) {
        Ok(Build::Audit) => "audit",
        Ok(Build::Enforce) => "enforce",
        _ => "unspecified",
    }
}

/// The label of a `hello.mode` value (already validated).
pub fn mode_label(mode: i32) -> &'static str {
    match Mode::try_from(mode) {
        Ok(Mode::Audit) => "audit",
        Ok(Mode::Enforce) => "enforce",
        _ => "unspecified",
    }
}

/// A stored label back to its static form.
pub fn label_from_text(text: &str) -> &'static str {
    match text {
        "audit" => "audit",
        "enforce" => "enforce",
        _ => "unspecified",
    }
}

impl Vm {
    /// A VM as the store reads it back.
    #[allow(clippy::too_many_arguments)]
    pub fn stored(
        identity: [String; 8],
        build: &str,
        mode: &str,
        heartbeat_interval_ms: u32,
        first_heard_ns: u64,
        last_heard_ns: u64,
        connections: [u64; 9],
        delivery: [u64; 5],
        dropped_total: u64,
    ) -> Self {
        let [
            pod_name,
            namespace,
            workload_name,
            instance_ips,
            cluster_id,
            istio_version,
            filter_version,
            module_sha256,
        ] = identity.map(String::into_boxed_str);
        Self {
            pod_name,
            namespace,
            workload_name,
            instance_ips,
            cluster_id,
            istio_version,
            filter_version,
            module_sha256,
            build: label_from_text(build),
            mode: label_from_text(mode),
            heartbeat_interval_ms,
            first_heard_ns,
            last_heard_ns,
            connections,
            delivery,
            dropped_total,
            ..Self::default()
        }
    }

    fn identify(&mut self, hello: &Hello) {
        fn set(slot: &mut Box<str>, value: &str) {
            if **slot != *value {
                *slot = value.into();
            }
        }
        set(&mut self.pod_name, &hello.pod_name);
        set(&mut self.namespace, &hello.namespace);
        set(&mut self.workload_name, &hello.workload_name);
        set(&mut self.instance_ips, &hello.instance_ips.join(","));
        set(&mut self.cluster_id, &hello.cluster_id);
        set(&mut self.istio_version, &hello.istio_version);
        set(&mut self.filter_version, &hello.filter_version);
        set(
            &mut self.module_sha256,
            &hello.module_sha256.to_ascii_lowercase(),
        );
        self.build = build_label(hello.build);
        self.mode = mode_label(hello.mode);
        self.heartbeat_interval_ms = hello.heartbeat_interval_ms;
    }

    fn heard(&mut self, now_ns: u64) {
        self.last_heard_ns = self.last_heard_ns.max(now_ns);
        self.dirty = true;
    }

    /// How long after its last word this VM counts as stale.
    pub fn stale_after(&self) -> Duration {
        let interval = match self.heartbeat_interval_ms {
            0 => LEGACY_INTERVAL_MS,
            ms => u64::from(ms),
        };
        Duration::from_millis(interval * STALE_AFTER_INTERVALS)
    }

    /// When it became (or becomes) stale.
    pub fn stale_at_ns(&self) -> u64 {
        self.last_heard_ns
            .saturating_add(u64::try_from(self.stale_after().as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn is_fresh(&self, now_ns: u64) -> bool {
        now_ns <= self.stale_at_ns()
    }

    /// Stale for longer than `forget`: out of coverage (and out of memory).
    pub fn is_forgotten(&self, now_ns: u64, forget: Duration) -> bool {
        let forget = u64::try_from(forget.as_nanos()).unwrap_or(u64::MAX);
        now_ns > self.stale_at_ns().saturating_add(forget)
    }
}

/// What an accepted heartbeat added, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Increase {
    /// Per verdict, in [`VERDICTS`] order.
    pub judged: [u64; 7],
    /// Growth of the VM's dropped-events total.
    pub dropped: u64,
}

/// What serve was told about coverage (recorded in the database too, so
/// that `report` knows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoverageConfig {
    pub max_vms: usize,
    /// Namespaces that must have a reporting sidecar.
    pub expected: BTreeSet<String>,
    pub forget_stale: Duration,
}

impl Default for CoverageConfig {
    fn default() -> Self {
        Self {
            max_vms: DEFAULT_MAX_VMS,
            expected: BTreeSet::new(),
            forget_stale: DEFAULT_FORGET_STALE,
        }
    }
}

type VmMap = HashMap<VmKey, Vm, foldhash::fast::RandomState>;

/// The VMs in memory; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Inventory {
    vms: Arc<Mutex<VmMap>>,
    config: Arc<CoverageConfig>,
    /// The expected namespaces now: `config.expected` until
    /// [`Inventory::set_expected`] replaces them (a re-read file).
    expected: Arc<std::sync::RwLock<Arc<BTreeSet<String>>>>,
}

impl Inventory {
    /// The inventory with what the database held (newest first; beyond
    /// `max_vms`, the oldest are left out).
    pub fn load(stored: Vec<(VmKey, Vm)>, config: CoverageConfig) -> Self {
        let mut vms = VmMap::default();
        for (key, vm) in stored.into_iter().take(config.max_vms) {
            vms.insert(key, vm);
        }
        Self {
            vms: Arc::new(Mutex::new(vms)),
            expected: Arc::new(std::sync::RwLock::new(Arc::new(config.expected.clone()))),
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &CoverageConfig {
        &self.config
    }

    /// The namespaces that must have a reporting sidecar, now.
    pub fn expected(&self) -> Arc<BTreeSet<String>> {
        // A poisoned lock still holds a whole set: it is only ever replaced.
        self.expected
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the expected namespaces (the file was changed).
    pub fn set_expected(&self, expected: BTreeSet<String>) {
        *self
            .expected
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(expected);
    }

    fn lock(&self) -> MutexGuard<'_, VmMap> {
        // A panic elsewhere while holding the lock leaves plain data behind:
        // still usable.
        self.vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The VM of `key`, created from `hello` if new (refused beyond `max_vms`).
    fn entry<'a>(
        &self,
        vms: &'a mut VmMap,
        key: &VmKey,
        hello: &Hello,
        now_ns: u64,
    ) -> Result<&'a mut Vm, InventoryError> {
        if !vms.contains_key(key) {
            if vms.len() >= self.config.max_vms {
                return Err(InventoryError::Full(self.config.max_vms));
            }
            let mut vm = Vm {
                first_heard_ns: now_ns,
                ..Vm::default()
            };
            vm.identify(hello);
            vms.insert(key.clone(), vm);
        }
        vms.get_mut(key)
            .ok_or(InventoryError::Full(self.config.max_vms))
    }

    /// A VM said hello (a validated one).
    pub fn hello(&self, key: &VmKey, hello: &Hello, now_ns: u64) -> Result<(), InventoryError> {
        let mut vms = self.lock();
        let vm = self.entry(&mut vms, key, hello, now_ns)?;
        vm.identify(hello);
        vm.heard(now_ns);
        Ok(())
    }

    /// Checks and records a heartbeat; a refused one changes no counter.
    pub fn heartbeat(
        &self,
        key: &VmKey,
        hello: &Hello,
        heartbeat: &Heartbeat,
        now_ns: u64,
    ) -> Result<Increase, InventoryError> {
        let mut vms = self.lock();
        let vm = self.entry(&mut vms, key, hello, now_ns)?;
        if now_ns.saturating_sub(vm.rate_window_ns) >= 1_000_000_000 || now_ns < vm.rate_window_ns {
            vm.rate_window_ns = now_ns;
            vm.rate_count = 0;
        }
        vm.rate_count = vm.rate_count.saturating_add(1);
        if vm.rate_count > MAX_HEARTBEATS_PER_SECOND {
            return Err(InventoryError::Flood(MAX_HEARTBEATS_PER_SECOND));
        }
        let connections = connection_counters(heartbeat);
        let delivery = delivery_counters(heartbeat);
        let pairs = CONNECTION_FIELDS
            .iter()
            .zip(connections.iter().zip(&vm.connections))
            .chain(
                DELIVERY_FIELDS
                    .iter()
                    .zip(delivery.iter().zip(&vm.delivery)),
            );
        for (field, (got, had)) in pairs {
            if got < had {
                return Err(InventoryError::Backwards {
                    field,
                    got: *got,
                    had: *had,
                });
            }
        }
        let mut increase = Increase::default();
        for (index, judged) in increase.judged.iter_mut().enumerate() {
            *judged = connections[index] - vm.connections[index];
        }
        let dropped = vm.dropped_total.max(delivery[DROPPED]);
        increase.dropped = dropped - vm.dropped_total;
        vm.connections = connections;
        vm.delivery = delivery;
        vm.dropped_total = dropped;
        vm.heard(now_ns);
        Ok(increase)
    }

    /// A batch arrived: the VM was heard, and its `dropped_total` (the
    /// growth is returned, for the metric).
    pub fn batch(&self, key: &VmKey, dropped_total: u64, now_ns: u64) -> u64 {
        let mut vms = self.lock();
        let Some(vm) = vms.get_mut(key) else {
            return 0;
        };
        let increase = dropped_total.saturating_sub(vm.dropped_total);
        vm.dropped_total += increase;
        vm.heard(now_ns);
        increase
    }

    /// The VM ended a stream (or went quiet): it was heard now.
    pub fn touch(&self, key: &VmKey, now_ns: u64) {
        if let Some(vm) = self.lock().get_mut(key) {
            vm.heard(now_ns);
        }
    }

    /// The VMs changed since the last call, to persist; their flag is cleared.
    pub fn take_dirty(&self) -> Vec<(VmKey, Vm)> {
        let mut vms = self.lock();
        vms.iter_mut()
            .filter(|(_, vm)| vm.dirty)
            .map(|(key, vm)| {
                vm.dirty = false;
                (key.clone(), vm.clone())
            })
            .collect()
    }

    /// Persisting failed: these are written with the next flush.
    pub fn mark_dirty<'a>(&self, keys: impl IntoIterator<Item = &'a VmKey>) {
        let mut vms = self.lock();
        for key in keys {
            if let Some(vm) = vms.get_mut(key) {
                vm.dirty = true;
            }
        }
    }

    /// Drops the VMs stale for longer than `--forget-stale` from memory
    /// (the database keeps them until retention); returns how many.
    pub fn forget(&self, now_ns: u64) -> usize {
        let forget = self.config.forget_stale;
        let mut vms = self.lock();
        let before = vms.len();
        vms.retain(|_, vm| vm.dirty || !vm.is_forgotten(now_ns, forget));
        before - vms.len()
    }

    /// Per namespace, as now: for the gauges, at every scrape. Pods are
    /// summed in a hash map (no sorting, nothing copied) while the lock is
    /// held: ingest waits meanwhile.
    pub fn namespaces(&self, now_ns: u64) -> Vec<NamespaceCoverage> {
        let forget = u64::try_from(self.config.forget_stale.as_nanos()).unwrap_or(u64::MAX);
        let vms = self.lock();
        // Per pod: a VM fresh, when the last one goes stale, connections judged.
        let mut pods: HashMap<PodKey<'_>, (bool, u64, u64), foldhash::fast::RandomState> =
            HashMap::default();
        for (key, vm) in vms.iter() {
            let name = if vm.pod_name.is_empty() {
                &*key.node_id
            } else {
                &*vm.pod_name
            };
            let pod = pods.entry((&vm.namespace, name)).or_default();
            pod.0 |= vm.is_fresh(now_ns);
            pod.1 = pod.1.max(vm.stale_at_ns());
            pod.2 = pod
                .2
                .saturating_add(ConnectionCounts::from_array(vm.connections).judged());
        }
        let listed = pods
            .into_iter()
            .filter(|(_, (fresh, stale_at, _))| *fresh || now_ns <= stale_at.saturating_add(forget))
            .map(|((namespace, _), (fresh, _, judged))| (namespace, fresh, judged));
        namespaces(listed, &self.expected(), None)
    }
}

fn connection_counters(heartbeat: &Heartbeat) -> [u64; 9] {
    let c = heartbeat.connections.unwrap_or_default();
    [
        c.r#match,
        c.service,
        c.allowed,
        c.misrouted,
        c.blackholed,
        c.redirected,
        c.resolved,
        c.unjudged,
        c.enforced,
    ]
}

fn delivery_counters(heartbeat: &Heartbeat) -> [u64; 5] {
    let d = heartbeat.delivery.unwrap_or_default();
    [d.sent, d.acked, d.resent, d.dropped, d.rejected]
}

/// Reads an expected-namespaces file: one namespace per line, `#` starts a
/// comment, blank lines ignored (a ConfigMap key mounted as a file).
pub fn parse_expected_namespaces(
    source_name: &str,
    text: &str,
) -> Result<Vec<String>, InventoryError> {
    let mut namespaces = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let value = line.split('#').next().unwrap_or("").trim();
        if value.is_empty() {
            continue;
        }
        namespaces.push(check_namespace(source_name, index + 1, value)?);
    }
    Ok(namespaces)
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn check_namespace(
    source_name: &str,
    line: usize,
    value: &str,
) -> Result<String, InventoryError> {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum);
    if valid {
        Ok(value.to_string())
    } else {
        Err(InventoryError::ExpectedNamespace {
            source_name: source_name.to_string(),
            line,
            value: value.chars().take(100).collect(),
        })
    }
}

// ---------------------------------------------------------------------------
// Coverage
// ---------------------------------------------------------------------------

/// Which VMs a coverage view covers, and as of when.
#[derive(Debug, Clone, Default)]
pub struct CoverageScope {
    pub now_ns: u64,
    /// VMs heard within [since, until] (both optional).
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    pub namespace: Option<String>,
    pub expected: BTreeSet<String>,
    pub forget_stale: Duration,
}

/// Per pod: which sidecars report and what they judged. The JSON shape is
/// documented in docs/report.md (`coverage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    pub sidecars: Vec<SidecarCoverage>,
    pub namespaces: Vec<NamespaceCoverage>,
    /// Expected namespaces without a reporting sidecar.
    #[serde(default)]
    pub uncovered: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCoverage {
    /// The pod's name (its sidecar's node id when the pod name is unknown).
    pub pod: String,
    pub namespace: String,
    pub workload: String,
    /// `audit`, `enforce` or `unspecified` (filters before 0.2), of its newest VM.
    pub mode: String,
    #[serde(default)]
    pub build: String,
    pub filter_version: String,
    #[serde(default)]
    pub module_sha256: String,
    pub first_seen: String,
    pub last_seen: String,
    /// No VM of the pod heard within three heartbeat intervals.
    pub stale: bool,
    /// VMs (Envoy workers, restarts) summed in the counts.
    #[serde(default)]
    pub vms: u64,
    pub connections: ConnectionCounts,
    #[serde(default)]
    pub delivery: DeliveryCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionCounts {
    #[serde(rename = "match")]
    pub matched: u64,
    pub service: u64,
    pub allowed: u64,
    pub misrouted: u64,
    pub blackholed: u64,
    pub redirected: u64,
    pub resolved: u64,
    #[serde(default)]
    pub unjudged: u64,
    #[serde(default)]
    pub enforced: u64,
}

impl ConnectionCounts {
    fn from_array(c: [u64; 9]) -> Self {
        Self {
            matched: c[0],
            service: c[1],
            allowed: c[2],
            misrouted: c[3],
            blackholed: c[4],
            redirected: c[5],
            resolved: c[6],
            unjudged: c[7],
            enforced: c[8],
        }
    }

    /// Connections given one of the seven verdicts.
    pub fn judged(&self) -> u64 {
        [
            self.matched,
            self.service,
            self.allowed,
            self.misrouted,
            self.blackholed,
            self.redirected,
            self.resolved,
        ]
        .iter()
        .fold(0u64, |sum, n| sum.saturating_add(*n))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCounts {
    pub sent: u64,
    pub acked: u64,
    pub resent: u64,
    pub dropped: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceCoverage {
    pub namespace: String,
    /// Pods with a reporting sidecar.
    pub sidecars: u64,
    /// Pods whose sidecars all went stale (not yet forgotten).
    pub stale: u64,
    /// Named by `serve --expect-namespace` or `--expect-namespaces-file`.
    #[serde(default)]
    pub expected: bool,
    /// At least one reporting sidecar.
    #[serde(default)]
    pub covered: bool,
    /// Connections the namespace's sidecars judged (the seven verdicts).
    #[serde(default)]
    pub judged: u64,
}

/// One pod's VMs summed.
struct Pod<'a> {
    newest: &'a Vm,
    first_ns: u64,
    last_ns: u64,
    fresh: bool,
    stale_at_ns: u64,
    vms: u64,
    connections: [u64; 9],
    delivery: [u64; 5],
}

type PodKey<'a> = (&'a str, &'a str);

/// The pods in scope, by (namespace, pod).
fn pods<'a>(
    vms: impl Iterator<Item = (&'a VmKey, &'a Vm)>,
    scope: &CoverageScope,
) -> BTreeMap<PodKey<'a>, Pod<'a>> {
    let mut pods: BTreeMap<PodKey<'a>, Pod<'a>> = BTreeMap::new();
    for (key, vm) in vms {
        if scope
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != &*vm.namespace)
            || scope.since_ns.is_some_and(|since| vm.last_heard_ns < since)
            || scope
                .until_ns
                .is_some_and(|until| vm.first_heard_ns > until)
        {
            continue;
        }
        let name = if vm.pod_name.is_empty() {
            &*key.node_id
        } else {
            &*vm.pod_name
        };
        let fresh = vm.is_fresh(scope.now_ns);
        let pod = pods.entry((&vm.namespace, name)).or_insert_with(|| Pod {
            newest: vm,
            first_ns: vm.first_heard_ns,
            last_ns: vm.last_heard_ns,
            fresh,
            stale_at_ns: vm.stale_at_ns(),
            vms: 0,
            connections: [0; 9],
            delivery: [0; 5],
        });
        if vm.last_heard_ns > pod.newest.last_heard_ns {
            pod.newest = vm;
        }
        pod.first_ns = pod.first_ns.min(vm.first_heard_ns);
        pod.last_ns = pod.last_ns.max(vm.last_heard_ns);
        pod.fresh |= fresh;
        pod.stale_at_ns = pod.stale_at_ns.max(vm.stale_at_ns());
        pod.vms += 1;
        // Cumulative per VM: a replaced VM's last values still count.
        for (sum, n) in pod.connections.iter_mut().zip(vm.connections) {
            *sum = sum.saturating_add(n);
        }
        let mut delivery = vm.delivery;
        delivery[DROPPED] = vm.dropped_total;
        for (sum, n) in pod.delivery.iter_mut().zip(delivery) {
            *sum = sum.saturating_add(n);
        }
    }
    // Stale longer than --forget-stale: gone from coverage. A report about
    // a window that ended (--until) lists whoever reported then.
    if scope.until_ns.is_none() {
        let forget = u64::try_from(scope.forget_stale.as_nanos()).unwrap_or(u64::MAX);
        pods.retain(|_, pod| pod.fresh || scope.now_ns <= pod.stale_at_ns.saturating_add(forget));
    }
    pods
}

/// Per namespace from its listed pods (namespace, reporting, judged), with
/// every expected namespace (only `only`, when given).
fn namespaces<'a>(
    pods: impl Iterator<Item = (&'a str, bool, u64)>,
    expected: &'a BTreeSet<String>,
    only: Option<&str>,
) -> Vec<NamespaceCoverage> {
    let mut by_namespace: BTreeMap<&str, NamespaceCoverage> = BTreeMap::new();
    for expected in expected {
        if only.is_some_and(|ns| ns != expected) {
            continue;
        }
        by_namespace.insert(
            expected,
            NamespaceCoverage {
                namespace: expected.clone(),
                expected: true,
                ..NamespaceCoverage::default()
            },
        );
    }
    for (namespace, fresh, judged) in pods {
        let entry = by_namespace
            .entry(namespace)
            .or_insert_with(|| NamespaceCoverage {
                namespace: namespace.to_string(),
                ..NamespaceCoverage::default()
            });
        if fresh {
            entry.sidecars += 1;
            entry.covered = true;
        } else {
            entry.stale += 1;
        }
        entry.judged = entry.judged.saturating_add(judged);
    }
    by_namespace.into_values().collect()
}

/// Coverage of `vms` (loaded from the database) within `scope`.
pub fn coverage<'a>(
    vms: impl Iterator<Item = (&'a VmKey, &'a Vm)>,
    scope: &CoverageScope,
) -> Coverage {
    let pods = pods(vms, scope);
    let namespaces = namespaces(
        pods.iter().map(|((namespace, _), pod)| {
            let judged = ConnectionCounts::from_array(pod.connections).judged();
            (*namespace, pod.fresh, judged)
        }),
        &scope.expected,
        scope.namespace.as_deref(),
    );
    let uncovered = namespaces
        .iter()
        .filter(|ns| ns.expected && !ns.covered)
        .map(|ns| ns.namespace.clone())
        .collect();
    let sidecars = pods
        .iter()
        .map(|((namespace, pod_name), pod)| {
            let newest = pod.newest;
            let d = pod.delivery;
            SidecarCoverage {
                pod: pod_name.to_string(),
                namespace: namespace.to_string(),
                workload: newest.workload_name.to_string(),
                mode: newest.mode.to_string(),
                build: newest.build.to_string(),
                filter_version: newest.filter_version.to_string(),
                module_sha256: newest.module_sha256.to_string(),
                first_seen: rfc3339(pod.first_ns),
                last_seen: rfc3339(pod.last_ns),
                stale: !pod.fresh,
                vms: pod.vms,
                connections: ConnectionCounts::from_array(pod.connections),
                delivery: DeliveryCounts {
                    sent: d[0],
                    acked: d[1],
                    resent: d[2],
                    dropped: d[3],
                    rejected: d[4],
                },
            }
        })
        .collect();
    Coverage {
        sidecars,
        namespaces,
        uncovered,
    }
}

#[cfg(test)]
mod tests {
    use dialguard_proto::v1::{ConnectionCounters, DeliveryCounters};

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn hello(pod: &str, vm: &str, interval_ms: u32) -> Hello {
        Hello {
            node_id: format!("sidecar~10.0.0.1~{pod}.ns~ns.svc.cluster.local"),
            vm_instance: vm.into(),
            pod_name: pod.into(),
            namespace: "ns".into(),
            workload_name: "w".into(),
            instance_ips: vec!["10.0.0.1".into()],
            heartbeat_interval_ms: interval_ms,
            ..Hello::default()
        }
    }

    fn beat(matched: u64, misrouted: u64, dropped: u64) -> Heartbeat {
        Heartbeat {
            connections: Some(ConnectionCounters {
                r#match: matched,
                misrouted,
                ..ConnectionCounters::default()
            }),
            delivery: Some(DeliveryCounters {
                dropped,
                ..DeliveryCounters::default()
            }),
        }
    }

    #[test]
    fn counters_never_go_back_and_a_refusal_changes_nothing() {
        let inventory = Inventory::load(Vec::new(), CoverageConfig::default());
        let h = hello("p", "vm-1", 1000);
        let key = VmKey::of(&h);
        inventory.hello(&key, &h, SECOND).expect("hello");
        let increase = inventory
            .heartbeat(&key, &h, &beat(5, 7, 1), SECOND)
            .expect("first");
        assert_eq!(increase.judged[0], 5);
        assert_eq!(increase.judged[3], 7);
        assert_eq!(increase.dropped, 1);
        let err = inventory
            .heartbeat(&key, &h, &beat(6, 3, 1), 2 * SECOND)
            .expect_err("backwards");
        assert_eq!(
            err.to_string(),
            "heartbeat.connections.misrouted: 3 is below 7, already reported by this \
             vm_instance; counters are cumulative (a restarted VM sends a new vm_instance)"
        );
        let vms = inventory.take_dirty();
        assert_eq!(
            vms[0].1.connections[0], 5,
            "the refused heartbeat left no trace"
        );
        // The batch's dropped_total feeds the same gap.
        assert_eq!(inventory.batch(&key, 4, 3 * SECOND), 3);
        let increase = inventory
            .heartbeat(&key, &h, &beat(6, 7, 2), 3 * SECOND)
            .expect("heartbeat below the batch's dropped_total is fine");
        assert_eq!((increase.judged[0], increase.dropped), (1, 0));
    }

    #[test]
    fn more_than_ten_heartbeats_a_second_are_refused() {
        let inventory = Inventory::load(Vec::new(), CoverageConfig::default());
        let h = hello("p", "vm-1", 1000);
        let key = VmKey::of(&h);
        for n in 0..10 {
            inventory
                .heartbeat(&key, &h, &beat(n, 0, 0), SECOND + n)
                .expect("within the limit");
        }
        assert_eq!(
            inventory.heartbeat(&key, &h, &beat(10, 0, 0), SECOND + 500_000_000),
            Err(InventoryError::Flood(10))
        );
        inventory
            .heartbeat(&key, &h, &beat(10, 0, 0), 2 * SECOND)
            .expect("a new second");
    }

    #[test]
    fn new_vms_beyond_the_limit_are_refused() {
        let config = CoverageConfig {
            max_vms: 2,
            ..CoverageConfig::default()
        };
        let inventory = Inventory::load(Vec::new(), config);
        for vm in ["a", "b"] {
            let h = hello("p", vm, 0);
            inventory.hello(&VmKey::of(&h), &h, SECOND).expect("room");
        }
        let h = hello("p", "c", 0);
        assert_eq!(
            inventory.hello(&VmKey::of(&h), &h, SECOND),
            Err(InventoryError::Full(2))
        );
        // Known VMs still come back.
        let h = hello("p", "a", 0);
        inventory
            .hello(&VmKey::of(&h), &h, 2 * SECOND)
            .expect("known");
    }

    #[test]
    fn pods_go_stale_after_three_intervals_and_leave_after_forget_stale() {
        let inventory = Inventory::load(
            Vec::new(),
            CoverageConfig {
                expected: BTreeSet::from(["ns".to_string(), "empty".to_string()]),
                forget_stale: Duration::from_secs(60),
                ..CoverageConfig::default()
            },
        );
        let fast = hello("fast", "vm-1", 1000);
        let legacy = hello("legacy", "vm-1", 0);
        for h in [&fast, &legacy] {
            inventory.hello(&VmKey::of(h), h, SECOND).expect("hello");
        }
        let states = |at: u64| {
            inventory
                .namespaces(at)
                .into_iter()
                .map(|ns| (ns.namespace, ns.sidecars, ns.stale, ns.covered))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            states(4 * SECOND),
            [("empty".into(), 0, 0, false), ("ns".into(), 2, 0, true)]
        );
        assert_eq!(
            states(5 * SECOND),
            [("empty".into(), 0, 0, false), ("ns".into(), 1, 1, true)]
        );
        // The legacy VM (no heartbeats) is stale after 3 x 60 s.
        assert_eq!(
            states(182 * SECOND),
            [("empty".into(), 0, 0, false), ("ns".into(), 0, 1, false)]
        );
        assert_eq!(inventory.forget(200 * SECOND), 0, "dirty VMs stay");
        let _ = inventory.take_dirty();
        assert_eq!(inventory.forget(200 * SECOND), 1, "fast: stale at 4 s");
        assert_eq!(
            states(242 * SECOND),
            [("empty".into(), 0, 0, false), ("ns".into(), 0, 0, false)]
        );
    }

    #[test]
    fn a_pod_sums_its_vms_and_falls_back_to_the_node_id() {
        let mut a = hello("p", "vm-1", 1000);
        let b = hello("p", "vm-2", 1000);
        a.pod_name.clear();
        let inventory = Inventory::load(Vec::new(), CoverageConfig::default());
        for (h, n) in [(&a, 2), (&b, 3)] {
            let key = VmKey::of(h);
            inventory.hello(&key, h, SECOND).expect("hello");
            inventory
                .heartbeat(&key, h, &beat(n, 1, 0), SECOND)
                .expect("beat");
        }
        let vms = inventory.take_dirty();
        let scope = CoverageScope {
            now_ns: SECOND,
            forget_stale: DEFAULT_FORGET_STALE,
            ..CoverageScope::default()
        };
        let coverage = coverage(vms.iter().map(|(k, v)| (k, v)), &scope);
        let pods: Vec<(&str, u64, u64)> = coverage
            .sidecars
            .iter()
            .map(|s| (s.pod.as_str(), s.vms, s.connections.matched))
            .collect();
        assert_eq!(pods, [("p", 1, 3), (&*a.node_id, 1, 2)]);
        assert_eq!(coverage.namespaces[0].judged, 7);
    }

    #[test]
    fn expected_namespace_files_read_like_a_configmap_key() {
        let text = "# namespaces dialguard must cover\nmanager\n\n  app  # the app\n";
        assert_eq!(
            parse_expected_namespaces("f", text),
            Ok(vec!["manager".to_string(), "app".to_string()])
        );
        let err = parse_expected_namespaces("f", "ok\nNot_OK\n").expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("f: line 2: \"Not_OK\": expected a namespace name"),
            "{err}"
        );
    }
}
