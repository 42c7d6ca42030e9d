//! `dialguard-filter-wasm`: the proxy-wasm network filter that runs inside
//! every istio-proxy, before `tcp_proxy`. It is glue only: Envoy callbacks
//! ([`exports`]) forward to `dialguard-filter-core`, and [`host`] answers the
//! core's questions with property reads through [`abi`], a minimal binding of
//! the proxy-wasm ABI that exports only the callbacks dialguard needs. Built
//! for `wasm32-unknown-unknown` with the `wasm-release` profile as
//! `dialguard_filter.wasm`.
//!
//! Nothing here may panic: a trap would make Envoy apply the failure policy
//! to every later connection of the listener.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod abi;
mod connection;
mod delivery;
mod exports;
mod host;
mod metrics;
mod reporter;
mod root;
