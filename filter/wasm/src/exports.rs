//! The callbacks this module exports to Envoy, and nothing else: per
//! connection Envoy calls only `proxy_on_context_create` and `proxy_on_log`
//! (plus, in the enforce build, the data callbacks). Each forwards to
//! [`crate::root`] or [`crate::connection`].
//!
//! Connections are judged while open: each new connection waits in
//! `pending` until the root's timer finds its upstream chosen (the timer
//! makes the connection the effective context to read its properties), and
//! then in `judged` until its end, so it is counted once. A connection that
//! ends first is judged in `on_log`. Long-lived connections thus cost
//! nothing per data chunk, and a misroute is reported while it is open.
//!
//! Roots come and go with configuration changes (Envoy creates the new root
//! before it retires the old one); the VM's [`Reporter`] stays, so nothing
//! buffered goes with a root. When the last root goes (its listeners
//! removed, or Envoy shutting down) the VM goes with it and nothing more can
//! be sent: what is still unacknowledged is given up, counted and logged
//! ([`Reporter::give_up_for_good`]).
#![allow(unsafe_code)] // exported callbacks are `no_mangle` functions

use std::cell::RefCell;
use std::collections::HashSet;

use dialguard_filter_core::JudgePoint;

use crate::connection::{self, Judged};
use crate::host::now_unix_nanos;
use crate::reporter::Reporter;
use crate::root::Root;

/// Most connections tracked in `pending`, and in `judged`; beyond it a new
/// connection is judged at its end only, and open ones wait there (bounded
/// memory, nothing counted twice).
const MAX_TRACKED_CONNECTIONS: usize = 65_536;

#[derive(Default)]
struct Vm {
    /// Root context id, and its state once configured.
    roots: Vec<(u32, Option<Root>)>,
    /// Everything reported, once a root was configured.
    reporter: Option<Reporter>,
    /// Connections not judged yet: (context id, root id), in creation order,
    /// so sorted by id (Envoy's context ids only grow).
    pending: Vec<(u32, u32)>,
    /// Connections judged while open, awaiting their end.
    judged: HashSet<u32>,
}

impl Vm {
    fn pending_index(&self, context_id: u32) -> Option<usize> {
        self.pending
            .binary_search_by_key(&context_id, |(id, _)| *id)
            .ok()
    }
}

fn find_root(roots: &mut [(u32, Option<Root>)], root_id: u32) -> Option<&mut Root> {
    roots
        .iter_mut()
        .find(|(id, _)| *id == root_id)
        .and_then(|(_, root)| root.as_mut())
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

fn with_reporter(f: impl FnOnce(&mut Reporter)) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        if let Some(reporter) = vm.reporter.as_mut() {
            f(reporter);
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
        } else if vm.pending.len() < MAX_TRACKED_CONNECTIONS {
            vm.pending.push((context_id, parent_id));
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
        match vm.reporter.as_mut() {
            Some(reporter) => reporter.reconfigure(&root.config),
            None => vm.reporter = Some(Reporter::new(&root.config)),
        }
        // Reconfiguring an existing root replaces its configuration only.
        match vm.roots.iter_mut().find(|(id, _)| *id == root_id) {
            Some((_, slot)) => *slot = Some(root),
            None => vm.roots.push((root_id, Some(root))),
        }
        1
    })
}

/// The root's timer: judge its open connections whose upstream is now
/// chosen, then flush when due.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        let Vm {
            roots,
            reporter,
            pending,
            judged,
        } = &mut *vm;
        let (Some(root), Some(reporter)) = (find_root(roots, root_id), reporter.as_mut()) else {
            return;
        };
        let mut switched = false;
        pending.retain(|&(context_id, owner)| {
            if owner != root_id || judged.len() >= MAX_TRACKED_CONNECTIONS {
                return true;
            }
            if crate::abi::set_effective_context(context_id).is_err() {
                return false; // gone without an on_log: nothing to judge
            }
            switched = true;
            match connection::judge_and_record(&root.config, reporter, JudgePoint::Open) {
                Judged::NotYet => true,
                Judged::Done { close } => {
                    if close {
                        close_current_connection();
                    }
                    judged.insert(context_id);
                    false
                }
            }
        });
        if switched {
            // The flush's gRPC calls must act for the root again.
            let _ = crate::abi::set_effective_context(root_id);
        }
        reporter.on_tick(root_id, now_unix_nanos());
    });
}

#[cfg(feature = "enforce")]
fn close_current_connection() {
    crate::abi::close_connection();
}

/// The audit build never closes (it refuses `mode: enforce`).
#[cfg(not(feature = "enforce"))]
fn close_current_connection() {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context_id: u32) {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        let root_id = if let Some(index) = vm.pending_index(context_id) {
            vm.pending.remove(index).1
        } else if vm.judged.remove(&context_id) {
            return; // judged while open; counted once
        } else {
            // Not tracked (beyond the bound): judged now if its root is clear.
            match vm.roots.as_slice() {
                [(id, _)] => *id,
                _ => return,
            }
        };
        let Vm {
            roots, reporter, ..
        } = &mut *vm;
        if let (Some(root), Some(reporter)) = (find_root(roots, root_id), reporter.as_mut()) {
            connection::judge_and_record(&root.config, reporter, JudgePoint::End);
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_receive(_root_id: u32, token: u32, size: usize) {
    with_reporter(|reporter| reporter.on_grpc_receive(token, size));
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_grpc_close(_root_id: u32, token: u32, status: u32) {
    with_reporter(|reporter| reporter.on_grpc_close(token, status, now_unix_nanos()));
}

/// Called for a root context when its configuration goes away (and, rarely,
/// for a connection context). The VM's reporter keeps every event while
/// another root remains; Envoy neither ticks a root it retired nor keeps a
/// VM without roots, so the last root's unacknowledged events are given up
/// here, counted and logged.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return;
        };
        let Vm {
            roots, reporter, ..
        } = &mut *vm;
        roots.retain(|(id, _)| *id != context_id);
        let Some(reporter) = reporter.as_mut() else {
            return;
        };
        reporter.root_gone(context_id);
        if roots.iter().all(|(_, root)| root.is_none()) {
            reporter.give_up_for_good();
        }
    });
    1
}

/// Enforce mode: the first data in either direction decides if the timer
/// has not yet; a misrouted connection is closed on both sides and the data
/// held back.
#[cfg(feature = "enforce")]
fn on_first_data(context_id: u32) -> u32 {
    const CONTINUE: u32 = 0;
    const PAUSE: u32 = 1;
    VM.with(|vm| {
        let Ok(mut vm) = vm.try_borrow_mut() else {
            return CONTINUE;
        };
        if vm.judged.len() >= MAX_TRACKED_CONNECTIONS {
            return CONTINUE; // judged at its end
        }
        let Some(index) = vm.pending_index(context_id) else {
            return CONTINUE; // already judged, or not tracked
        };
        let root_id = vm.pending.get(index).map_or(0, |(_, root)| *root);
        let Vm {
            roots, reporter, ..
        } = &mut *vm;
        let (Some(root), Some(reporter)) = (find_root(roots, root_id), reporter.as_mut()) else {
            return CONTINUE;
        };
        if root.config.mode != dialguard_filter_core::Mode::Enforce {
            return CONTINUE; // audit configuration: judged on the timer
        }
        match connection::judge_and_record(&root.config, reporter, JudgePoint::Open) {
            Judged::NotYet => CONTINUE,
            Judged::Done { close } => {
                vm.pending.remove(index);
                vm.judged.insert(context_id);
                if close {
                    crate::abi::close_connection();
                    PAUSE
                } else {
                    CONTINUE
                }
            }
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
