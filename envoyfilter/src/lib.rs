//! `dialguard-envoyfilter`: the Envoy configuration that installs dialguard in
//! a sidecar: the wasm network filter that goes before `tcp_proxy` and the
//! HTTP/2 cluster that leads to the collector. The Istio `EnvoyFilter` rollout
//! wraps these same pieces in patches; the end-to-end tests and the demo put
//! them into an Istio-shaped Envoy bootstrap, so what ships is what is tested.

pub mod analyze;
pub mod image;
pub mod module;
pub mod rollout;

use serde_json::{Value, json};

/// The filter's name in Envoy's filter chains, and its wasm `root_id`.
pub const FILTER_NAME: &str = "dialguard";

/// Where Envoy loads the module from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A file on the proxy's disk.
    LocalFile(String),
    /// Fetched by Envoy over HTTP through `cluster`, checked against `sha256`.
    Remote {
        uri: String,
        cluster: String,
        sha256: String,
    },
}

/// The `envoy.filters.network.wasm` filter, with `filter_config` (the
/// dialguard JSON configuration) passed as its `configuration`. Fail-open:
/// a broken module must never stop traffic.
pub fn network_filter(filter_config: &Value, module: &ModuleSource) -> Value {
    let code = match module {
        ModuleSource::LocalFile(path) => json!({ "local": { "filename": path } }),
        ModuleSource::Remote {
            uri,
            cluster,
            sha256,
        } => json!({ "remote": {
            "http_uri": { "uri": uri, "cluster": cluster, "timeout": "10s" },
            "sha256": sha256,
            "retry_policy": { "num_retries": 5 },
        }}),
    };
    json!({
        "name": FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
            "config": {
                "name": FILTER_NAME,
                "root_id": FILTER_NAME,
                "vm_config": {
                    "vm_id": FILTER_NAME,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": code,
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": filter_config.to_string(),
                },
                "failure_policy": "FAIL_OPEN",
            }
        }
    })
}

/// A STRICT_DNS cluster with one endpoint (a name or an IP literal).
fn dns_cluster(name: &str, host: &str, port: u16, connect_timeout: &str) -> Value {
    json!({
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": connect_timeout,
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port }
            }}}]}]
        },
    })
}

/// The cluster the filter streams events through. It must speak HTTP/2
/// (gRPC); without it the stream closes with "protocol error".
pub fn collector_cluster(name: &str, host: &str, port: u16) -> Value {
    let mut cluster = dns_cluster(name, host, port, "1s");
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} }
        }
    });
    cluster
}

/// The name of the SDS cluster in Istio's sidecar bootstrap, through which
/// istio-agent serves the workload certificate and the mesh's root.
pub const ISTIO_SDS_CLUSTER: &str = "sds-grpc";
/// Istio's SDS secret holding the workload certificate and key.
pub const ISTIO_WORKLOAD_SECRET: &str = "default";
/// Istio's SDS secret holding the mesh's root certificate(s).
pub const ISTIO_ROOT_SECRET: &str = "ROOTCA";

/// An SDS secret from istio-agent, configured as Istio configures its own
/// (`pkg/model.ConstructSdsSecretConfig`; the sidecar listeners in
/// `shared/testdata/istio/sidecar-listeners-configdump.json` show it).
fn istio_sds_secret(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": ISTIO_SDS_CLUSTER } }],
                "set_node_on_first_message_only": true,
                "transport_api_version": "V3",
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        },
    })
}

/// The `transport_socket` that makes a sidecar's cluster to the collector
/// mutual TLS with Istio's own certificates: the workload certificate
/// (whose SPIFFE ID names the pod's namespace and service account) as the
/// client certificate, and the mesh's root to verify the collector, whose
/// certificate must name `host` (as DNS name, or IP address for a literal).
pub fn istio_mtls_transport_socket(host: &str) -> Value {
    let san_type = if host.parse::<std::net::IpAddr>().is_ok() {
        "IP_ADDRESS"
    } else {
        "DNS"
    };
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                // The collector's gRPC listener speaks only h2.
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [istio_sds_secret(ISTIO_WORKLOAD_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            { "san_type": san_type, "matcher": { "exact": host } }
                        ],
                    },
                    "validation_context_sds_secret_config": istio_sds_secret(ISTIO_ROOT_SECRET),
                },
            },
        }
    })
}

/// A plain HTTP/1.1 (or TLS, for `https` module URLs) cluster from which Envoy
/// fetches the module.
pub fn module_cluster(name: &str, host: &str, port: u16, tls: bool) -> Value {
    let mut cluster = dns_cluster(name, host, port, "5s");
    if tls {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
            }
        });
    }
    cluster
}
