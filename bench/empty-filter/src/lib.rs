//! `empty_filter.wasm`: the baseline of `cargo xtask bench filter` (variant 2).
//!
//! A proxy-wasm network filter built the usual way, with the same SDK
//! (proxy-wasm 0.2.5) and the same `wasm-release` profile as
//! `dialguard_filter.wasm`: its root context hands Envoy a stream context
//! that does nothing. Whatever it costs per connection is the price of
//! having a wasm filter at all (V8 calls for every callback the SDK exports).
//! Built by `cargo xtask bench filter` into `dist/empty_filter.wasm`.

use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{ContextType, LogLevel};

#[allow(unsafe_code)] // the SDK's entry point is an exported `no_mangle` function
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(super::LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(super::EmptyRoot));
    }}
}

/// The per-VM root context: makes one [`EmptyStream`] per connection.
#[derive(Debug)]
struct EmptyRoot;

impl Context for EmptyRoot {}

impl RootContext for EmptyRoot {
    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(EmptyStream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

/// One connection: every callback keeps the SDK's default (continue, do nothing).
#[derive(Debug)]
struct EmptyStream;

impl Context for EmptyStream {}

impl StreamContext for EmptyStream {}
