//! `dialguard-filter-wasm`: the proxy-wasm network filter that runs inside
//! every istio-proxy, before `tcp_proxy`. It is glue only: Envoy callbacks
//! forward to `dialguard-filter-core`, and [`host`] answers the core's
//! questions with property reads. Built for `wasm32-unknown-unknown` with the
//! `wasm-release` profile as `dialguard_filter.wasm`.
//!
//! Nothing here may panic: a trap would make Envoy apply the failure policy
//! to every later connection of the listener.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod connection;
mod delivery;
mod host;
mod metrics;
mod root;

#[allow(unsafe_code)] // the SDK's entry point is an exported `no_mangle` function
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| Box::new(crate::root::FilterRoot::default()));
    }}
}
