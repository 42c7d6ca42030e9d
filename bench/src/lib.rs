//! `dialguard-bench`: the filter cost benchmark, `cargo xtask bench filter`,
//! and the collector scale benchmark, `cargo xtask bench collector`
//! ([`collector`], with its load generator [`load`] and simulated sidecars
//! [`workload`]; method and figures in `docs/benchmarks.md`, "Collector").
//!
//! Where it sits: beside the end-to-end harness (`dialguard-tests`, whose
//! pods, client, collector wrapper and `dist/` locator it reuses), it runs
//! the parts `cargo xtask dist` built (`dist/envoy`, the real Envoy 1.40 with
//! V8; `dist/dialguard_filter.wasm`; the `dialguard` collector) plus
//! `dist/empty_filter.wasm` (crate `bench/empty-filter`) and measures what
//! the filter costs inside Envoy, as issue 6 ("Cost, measured") asks.
//!
//! Method ([`run`]): for each variant, one Envoy with `--concurrency 1` under
//! `valgrind --tool=callgrind --instr-atstart=no`, shaped like an Istio
//! sidecar ([`topology`]); `callgrind_control --instr=on` once it is LIVE; a
//! warm-up of a few connections; `callgrind_control --zero`; N sequential connections from a native client (connect, PROXY
//! header naming the dialed address, a few bytes, the server's greeting,
//! close); a short idle time so batched events and log entries are sent;
//! `callgrind_control --dump`; the dump's total `Ir` divided by N. Only the
//! Envoy process is counted; servers, client, collector and sink run
//! natively. The variants:
//!
//! 1. plain `tcp_proxy`;
//! 2. an empty proxy-wasm filter (same SDK and `wasm-release` profile);
//! 3. dialguard in audit mode, no mismatches: half the connections to a
//!    Service VIP, half through `PassthroughCluster`;
//! 4. dialguard with every connection misrouted (the ExternalName catch-all)
//!    and reported to a real collector;
//! 5. Envoy's `envoy.access_loggers.tcp_grpc` sending every connection to a
//!    gRPC sink ([`sink`]).
//!
//! Then, natively: bytes on the wire and receiver CPU per 1,000 connections
//! at a 0.1% misroute rate (dialguard to the collector against (5) to the
//! sink), and Envoy's RSS with and without the module, 1 and 2 workers.
//! The method and the figures measured are in `docs/benchmarks.md`.

pub mod callgrind;
pub mod collector;
pub mod envoy;
pub mod heartbeat;
pub mod load;
pub mod proc_stat;
pub mod run;
pub mod sink;
pub mod topology;
pub mod traffic;
pub mod workload;

pub use run::{Options, Parts, Results, run};
pub use topology::Variant;
