//! Who this sidecar is, from Envoy's node (Istio fills its metadata).

use dialguard_proto::v1::{Build, Hello, Mode as WireMode};

use crate::{FilterConfig, Mode};

/// Node facts read once per VM. Each returns `None` when absent.
pub trait NodeFacts {
    fn node_id(&mut self) -> Option<String>;
    /// A leaf of the node metadata, e.g. `NAME`, `NAMESPACE`, `INSTANCE_IPS`.
    fn metadata(&mut self, key: &str) -> Option<String>;
}

/// The first message of each of this VM's streams; `build` is the module's
/// (audit or enforce), known only where it was compiled.
pub fn hello(
    node: &mut impl NodeFacts,
    vm_instance: String,
    config: &FilterConfig,
    build: Build,
) -> Hello {
    let mut meta = |key| node.metadata(key).unwrap_or_default();
    let pod_name = meta("NAME");
    let namespace = meta("NAMESPACE");
    let workload_name = meta("WORKLOAD_NAME");
    let instance_ips = meta("INSTANCE_IPS")
        .split(',')
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .map(str::to_owned)
        .collect();
    let cluster_id = meta("CLUSTER_ID");
    let istio_version = meta("ISTIO_VERSION");
    Hello {
        node_id: node.node_id().unwrap_or_default(),
        vm_instance,
        pod_name,
        namespace,
        workload_name,
        instance_ips,
        cluster_id,
        istio_version,
        filter_version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: match config.mode {
            Mode::Audit => WireMode::Audit,
            Mode::Enforce => WireMode::Enforce,
        }
        .into(),
        build: build.into(),
        module_sha256: config
            .module_sha256
            .as_deref()
            .map(str::to_ascii_lowercase)
            .unwrap_or_default(),
        heartbeat_interval_ms: u32::try_from(config.collector.heartbeat_interval_ms)
            .unwrap_or(u32::MAX),
    }
}
