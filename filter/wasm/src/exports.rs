//! The callbacks this module exports to Envoy, and nothing else: per
//! connection Envoy calls only `proxy_on_context_create` and `proxy_on_log`.
//! Each forwards to [`crate::root`] or [`crate::connection`].
//!
//! A VM holds one root context per distinct filter configuration. With one
//! root (the usual case) connections need no bookkeeping; with several, the
//! connection's root is remembered from its creation until its `on_log`.
#![allow(unsafe_code)] // exported callbacks are `no_mangle` functions

use std::cell::RefCell;
use std::collections::HashMap;

use crate::connection;
use crate::root::Root;

/// Connections awaiting their `on_log` while several roots exist; beyond this
/// the map is cleared (those connections go unjudged) to bound memory.
const MAX_TRACKED_CONNECTIONS: usize = 65_536;

#[derive(Default)]
struct Vm {
    /// Root context id, and its state once configured.
    roots: Vec<(u32, Option<Root>)>,
    /// Connection context id → root context id, only while several roots exist.
    connections: HashMap<u32, u32>,
    /// Connections already judged at their first data (enforce mode).
    #[cfg(feature = "enforce")]
    judged: std::collections::HashSet<u32>,
}

impl Vm {
    /// The root a connection belongs to; `forget` ends the tracking.
    fn root_id_of(&mut self, context_id: u32, forget: bool) -> Option<u32> {
        match self.roots.as_slice() {
            [(id, _)] => Some(*id),
            _ if forget => self.connections.remove(&context_id),
            _ => self.connections.get(&context_id).copied(),
        }
    }

    fn root(&mut self, root_id: u32) -> Option<&mut Root> {
        self.roots
            .iter_mut()
            .find(|(id, _)| *id == root_id)
            .and_then(|(_, root)| root.as_mut())
    }
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

fn with_root(root_id: u32, f: impl FnOnce(&mut Root)) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        if let Some(root) = vm.root(root_id) {
            f(root);
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    crate::abi::allocate(size)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        if parent_id == 0 {
            vm.roots.push((context_id, None));
        } else if vm.roots.len() > 1 {
            if vm.connections.len() >= MAX_TRACKED_CONNECTIONS {
                vm.connections.clear();
            }
            vm.connections.insert(context_id, parent_id);
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(root_id: u32, _configuration_size: usize) -> u32 {
    let Some(root) = Root::configure() else {
        return 0;
    };
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return 0;
        };
        match vm.roots.iter_mut().find(|(id, _)| *id == root_id) {
            Some((_, slot)) => *slot = Some(root),
            None => vm.roots.push((root_id, Some(root))),
        }
        1
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with_root(root_id, Root::on_tick);
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context_id: u32) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        let Some(root_id) = vm.root_id_of(context_id, true) else {
            return;
        };
        #[cfg(feature = "enforce")]
        if vm.judged.remove(&context_id) {
            return;
        }
        if let Some(root) = vm.root(root_id) {
            connection::on_log(root);
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive(root_id: u32, token: u32, size: usize) {
    with_root(root_id, |root| root.on_grpc_receive(token, size));
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_close(root_id: u32, token: u32, status: u32) {
    with_root(root_id, |root| root.on_grpc_close(token, status));
}

/// Called for root contexts when their configuration goes away (and, rarely,
/// for a connection context): a root's state is dropped.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
    VM.with(|vm| {
        if let Ok(mut vm) = vm.try_borrow_mut() {
            vm.roots.retain(|(id, _)| *id != context_id);
        }
    });
    1
}

/// Enforce mode: the first data in either direction decides; a misrouted
/// connection is closed on both sides and the data held back.
#[cfg(feature = "enforce")]
fn on_first_data(context_id: u32) -> u32 {
    const CONTINUE: u32 = 0;
    const PAUSE: u32 = 1;
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return CONTINUE;
        };
        if vm.judged.contains(&context_id) {
            return CONTINUE;
        }
        let Some(root) = vm.root_id_of(context_id, false).and_then(|id| vm.root(id)) else {
            return CONTINUE;
        };
        if root.config.mode != dialguard_filter_core::Mode::Enforce {
            return CONTINUE; // audit configuration: judged in on_log
        }
        let close = connection::judge_and_record(root, true);
        if vm.judged.len() >= MAX_TRACKED_CONNECTIONS {
            vm.judged.clear();
        }
        vm.judged.insert(context_id);
        if close {
            crate::abi::close_connection();
            PAUSE
        } else {
            CONTINUE
        }
    })
}

#[cfg(feature = "enforce")]
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_downstream_data(context_id: u32, _size: usize, _end: u32) -> u32 {
    on_first_data(context_id)
}

#[cfg(feature = "enforce")]
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_upstream_data(context_id: u32, _size: usize, _end: u32) -> u32 {
    on_first_data(context_id)
}
