//! `dialguard-tests`: the end-to-end harness. It runs the real parts built by
//! `cargo xtask dist` (Envoy 1.40, the wasm module, the `dialguard` binary)
//! on loopback: an Envoy shaped like an Istio sidecar ([`sidecar`]), TCP
//! servers that play the pods ([`pods`]), and a client that dials through the
//! sidecar as an application would ([`client`]). [`incident`] is the field
//! incident end to end; the e2e tests and `cargo xtask demo` both run it.
//! [`netns`] runs the same sidecar in network namespaces with istio-iptables'
//! rules, and [`scenario`] holds the incident's checks that both must pass.

pub mod client;
pub mod collector;
pub mod dist;
pub mod incident;
pub mod istio_dump;
pub mod netns;
pub mod pods;
pub mod process;
pub mod scenario;
pub mod sidecar;

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
