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
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

fn with_root(root_id: u32, f: impl FnOnce(&mut Root)) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        if let Some((_, Some(root))) = vm.roots.iter_mut().find(|(id, _)| *id == root_id) {
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
        let root_id = match vm.roots.as_slice() {
            [(id, _)] => *id,
            _ => match vm.connections.remove(&context_id) {
                Some(id) => id,
                None => return,
            },
        };
        if let Some((_, Some(root))) = vm.roots.iter_mut().find(|(id, _)| *id == root_id) {
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
