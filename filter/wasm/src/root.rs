//! The per-VM root context: configuration, identity, the flush timer and the
//! collector stream. Connection contexts share its state through [`Shared`].

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use dialguard_filter_core::{FilterConfig, Outbox, OutboxLimits, UpstreamMemory, hello};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::connection::ConnectionFilter;
use crate::delivery::Delivery;
use crate::host::{EnvoyNode, vm_instance};
use crate::metrics::Metrics;

/// State of one VM, shared by its root and connection contexts (a VM is single-threaded).
#[derive(Debug)]
pub struct Shared {
    pub config: FilterConfig,
    pub outbox: RefCell<Outbox>,
    pub upstreams: RefCell<UpstreamMemory>,
    pub metrics: Metrics,
}

/// (cluster, upstream host) pairs each VM remembers: about 40 bytes each.
const UPSTREAM_MEMORY_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
pub struct FilterRoot {
    shared: Option<Rc<Shared>>,
    delivery: Option<Delivery>,
}

impl Context for FilterRoot {
    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        if let (Some(delivery), Some(shared)) = (&mut self.delivery, &self.shared) {
            delivery.on_message(token, size, shared);
        }
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        if let (Some(delivery), Some(shared)) = (&mut self.delivery, &self.shared) {
            delivery.on_close(token, status, shared);
        }
    }
}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match FilterConfig::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log::error!("{err}");
                return false;
            }
        };
        let hello = hello(&mut EnvoyNode, vm_instance(), &config);
        self.delivery = Some(Delivery::new(&config.collector, hello));
        let _ =
            hostcalls::set_tick_period(Duration::from_millis(config.collector.flush_interval_ms));
        let outbox = RefCell::new(Outbox::new(OutboxLimits::from(&config.collector)));
        self.shared = Some(Rc::new(Shared {
            config,
            outbox,
            upstreams: RefCell::new(UpstreamMemory::new(UPSTREAM_MEMORY_ENTRIES)),
            metrics: Metrics::define(),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let (Some(delivery), Some(shared)) = (&mut self.delivery, &self.shared) {
            delivery.flush(shared);
        }
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        // Returning None would make the SDK panic; an unconfigured filter just watches.
        Some(Box::new(ConnectionFilter::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}
