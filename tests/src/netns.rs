//! The manager pod as Kubernetes and Istio really wire it, in Linux network
//! namespaces the test creates and removes itself: the pod's namespace has
//! `eth0` (a veth) with its pod IP, a default route to a "peer node"
//! namespace that holds every other pod's IP and the external host, and
//! istio-iptables' nat rules, which REDIRECT the application's outbound TCP
//! to Envoy's 15001 and exempt Envoy's own traffic by its uid, 1337. Envoy
//! runs as that uid with `virtualOutbound` / `virtualInbound` as istiod makes
//! them ([`Capture::Iptables`]), the application dials with a plain connect,
//! and no PROXY header or loopback address stands in for anything.
//!
//! Needs root, `ip` (iproute2) and `iptables-restore` (iptables); it fails,
//! naming what is missing, rather than skipping. Nothing outside the
//! namespaces is touched: the veth is created inside the pod namespace with
//! its other end moved straight into the peer namespace, and the root
//! namespace's routes, addresses and iptables are never changed. Threads
//! enter a namespace with setns(2) ([`Namespace::run`]); a process started
//! from such a thread lives in that namespace.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, anyhow, bail, ensure};

use crate::client::{self, Outcome};
use crate::collector::Collector;
use crate::dist::Dist;
use crate::incident::{Incident, Wiring};
use crate::pods::PodServer;
use crate::sidecar::{self, Capture, Envoy, Install, Layout};

/// istio-proxy's uid and gid, which istio-iptables exempts from capture.
pub const PROXY_UID: u32 = 1337;
/// kubeadm's default Service range (also the filter's default `serviceCidrs`).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The pod range of [`Layout::pod_network`] (flannel's and kind's default).
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The peer node's address on the pod network: the pod's default gateway.
const GATEWAY: &str = "10.244.0.1";

/// What istio-iptables (`-p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT -i '*'
/// -b '*' -d 15090,15021,15020`) installs in a pod's nat table, as
/// `iptables-restore --noflush` input. In order: inbound TCP goes to 15006
/// except Istio's own ports; Envoy's inbound passthrough (from 127.0.0.6)
/// is let through; Envoy (uid/gid 1337) reaching the pod's own IP over `lo`
/// goes to the inbound side, any other of its traffic leaves as is; the
/// application's traffic over `lo` (its own pod IP) and to 127.0.0.1 is not
/// captured; everything else is redirected to 15001.
pub const ISTIO_IPTABLES_NAT: &str = "\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

/// Runs `command`, failing with its stderr when it does not succeed.
fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Root, `ip` and `iptables-restore`, or an error that says which is missing.
pub fn require_root_and_tools() -> anyhow::Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "the network-namespace test needs root (it creates namespaces, veths and iptables rules); CI runs it as root"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("iptables-save", "iptables"),
    ] {
        Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| {
                format!("`{tool}` is missing: apt-get install -y {package} (.ci/run does)")
            })?;
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    /// `/run/netns/<name>`, what setns(2) takes.
    handle: File,
}

/// `ip netns add` mounts /run/netns the first time; two at once can race.
static NETNS_ADD: Mutex<()> = Mutex::new(());

impl Namespace {
    pub fn add(name: &str) -> anyhow::Result<Self> {
        {
            let _serial = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("ip").args(["netns", "add", name]))?;
        }
        let path = format!("/run/netns/{name}");
        match File::open(&path) {
            Ok(handle) => Ok(Self {
                name: name.to_owned(),
                handle,
            }),
            Err(e) => {
                let _ = run(Command::new("ip").args(["netns", "del", name]));
                Err(e).with_context(|| format!("opening {path}"))
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread inside this namespace and waits for it. Sockets
    /// it creates stay in the namespace when used from other threads
    /// afterwards, and processes it starts live in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        let handle = self.handle.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    rustix::thread::move_into_link_name_space(
                        handle,
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .with_context(|| format!("entering network namespace {}", self.name))?;
                    f()
                })
                .join()
                .map_err(|_| anyhow!("a thread in network namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("netns: could not delete {}: {e:#}", self.name);
        }
    }
}

/// The manager pod's namespace and the peer node's, joined by a veth.
#[derive(Debug)]
pub struct PodNetwork {
    /// The manager pod: its application, its sidecar and the collector.
    pub pod: Namespace,
    /// Every other pod's IP and the external host, with their servers.
    pub peers: Namespace,
}

/// Tells apart the networks of one process's tests, which run in parallel.
static NETWORKS: AtomicUsize = AtomicUsize::new(0);

impl PodNetwork {
    /// Creates both namespaces (named after this process's PID), the veth,
    /// the addresses, routes and istio-iptables' rules in the pod.
    pub fn create(layout: &Layout) -> anyhow::Result<Self> {
        let prefix = format!(
            "dialguard-{}-{}",
            std::process::id(),
            NETWORKS.fetch_add(1, Ordering::SeqCst)
        );
        let network = Self {
            pod: Namespace::add(&format!("{prefix}-pod"))?,
            peers: Namespace::add(&format!("{prefix}-peers"))?,
        };
        let (pod, peers) = (&network.pod, &network.peers);
        for namespace in [pod, peers] {
            namespace.ip(&["link", "set", "lo", "up"])?;
        }
        // Created inside the pod, its other end moved straight to the peers:
        // the root namespace never holds either end.
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            peers.name(),
        ])?;
        let own = format!("{}/16", layout.own_pod);
        pod.ip(&["addr", "add", &own, "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
        let mut addresses = vec![format!("{GATEWAY}/16")];
        addresses.extend(
            layout
                .pod_ips()
                .into_iter()
                .filter(|ip| *ip != layout.own_pod && *ip != layout.external_db)
                .map(|ip| format!("{ip}/16")),
        );
        for address in &addresses {
            peers.ip(&["addr", "add", address, "dev", "veth0"])?;
        }
        // Outside the pod network, reached through the gateway.
        let external = format!("{}/32", layout.external_db);
        peers.ip(&["addr", "add", &external, "dev", "lo"])?;
        peers.ip(&["link", "set", "veth0", "up"])?;
        pod.run(|| {
            let mut restore = Command::new("iptables-restore")
                .arg("--noflush")
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting iptables-restore")?;
            restore
                .stdin
                .take()
                .context("iptables-restore stdin")?
                .write_all(ISTIO_IPTABLES_NAT.as_bytes())?;
            let output = restore.wait_with_output()?;
            ensure!(
                output.status.success(),
                "iptables-restore in the pod failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            Ok(())
        })?;
        Ok(network)
    }

    /// The pod's nat table with packet counters (`iptables-save -c -t nat`).
    pub fn nat_table(&self) -> anyhow::Result<String> {
        self.pod
            .run(|| run(Command::new("iptables-save").args(["-c", "-t", "nat"])))
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // Deleting one end deletes both, at once, even if a socket still
        // keeps a namespace alive; the namespaces go when their fields drop.
        if let Err(e) = self.pod.ip(&["link", "del", "eth0"]) {
            eprintln!("netns: could not delete the pod's veth: {e:#}");
        }
    }
}

/// Makes `source` available at `target` to any user: a hard link where the
/// file system allows it (Envoy's binary is 100 MB), a copy otherwise. The
/// checkout may sit below a directory that uid 1337 cannot enter.
fn expose(source: &Path, target: &Path) -> anyhow::Result<()> {
    let source = source.canonicalize()?;
    if std::fs::hard_link(&source, target).is_err() {
        std::fs::copy(&source, target)
            .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    }
    Ok(())
}

/// The incident with the manager pod in its own network namespace.
pub type NetnsIncident = Incident<PodNetwork>;

impl Incident<PodNetwork> {
    /// Creates the namespaces and starts the collector (in the pod, on
    /// 127.0.0.1: Envoy reaches it as uid 1337, so uncaptured), the pod
    /// servers and the sidecar as uid 1337.
    pub fn in_network_namespaces(dist: &Dist, echo: bool) -> anyhow::Result<Self> {
        require_root_and_tools()?;
        let echo = echo || std::env::var_os("DIALGUARD_TEST_ECHO").is_some();
        let layout = Layout::pod_network();
        let network = PodNetwork::create(&layout)?;
        let dir = tempfile::Builder::new()
            .prefix("dialguard-netns")
            .tempdir()?;
        // Envoy writes its admin address and access log here.
        std::os::unix::fs::chown(dir.path(), Some(PROXY_UID), Some(PROXY_UID))?;
        let db = dir.path().join("dialguard.db");
        let collector = network
            .pod
            .run(|| Collector::start(&dist.dialguard, &db, None, echo))?;
        let pods = layout
            .pod_servers()
            .into_iter()
            .map(|(name, addr)| {
                let home = if addr.ip() == IpAddr::V4(layout.own_pod) {
                    &network.pod
                } else {
                    &network.peers
                };
                home.run(|| PodServer::start(&name, addr))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let envoy_binary = dir.path().join("envoy");
        expose(&dist.envoy, &envoy_binary)?;
        let module = dir.path().join("dialguard_filter.wasm");
        expose(&dist.module, &module)?;
        let config = sidecar::filter_config_with(SERVICE_CIDR, POD_CIDR);
        let install = Install::local(&module, &config, collector.grpc);
        let access_log = dir.path().join("access.log");
        let bootstrap = sidecar::bootstrap_for(Capture::Iptables, &layout, &install, &access_log);
        let envoy = network.pod.run(|| {
            Envoy::start_as(
                Some(PROXY_UID),
                &envoy_binary,
                echo,
                &bootstrap,
                dir.path(),
                access_log.clone(),
            )
        })?;
        Ok(Self {
            peer_sidecar: None,
            envoy,
            pods,
            collector,
            layout,
            wiring: network,
            dir,
        })
    }

    /// The namespaces' names, to check they are gone after drop.
    pub fn namespace_paths(&self) -> Vec<PathBuf> {
        [&self.wiring.pod, &self.wiring.peers]
            .iter()
            .map(|n| PathBuf::from(format!("/run/netns/{}", n.name())))
            .collect()
    }

    /// The real uid of Envoy's process, from /proc.
    pub fn envoy_uid(&self) -> anyhow::Result<u32> {
        let pid = self.envoy.process.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .context("no Uid line in /proc/PID/status")?;
        Ok(uid.parse()?)
    }
}

impl Wiring for PodNetwork {
    /// A plain connect from the pod's namespace, as root (not 1337): iptables
    /// decides whether the sidecar sees it.
    fn dial(&self, _: &Envoy, _: Ipv4Addr, dialed: SocketAddr) -> anyhow::Result<Outcome> {
        self.pod.run(|| client::dial_direct(dialed))
    }
    fn admin_get(&self, admin: SocketAddr, path: &str) -> anyhow::Result<String> {
        self.pod.run(|| sidecar::admin_get(admin, path))
    }
    /// Under istio-iptables the application's dial to its own pod IP leaves
    /// over `lo` and is never captured, so the catch-all's own-IP chain
    /// cannot be reached; what does reach `BlackHoleCluster` is a dial to
    /// port 15001 anywhere: `virtualOutbound-blackhole`, Istio's loop guard.
    fn blackholed_destination(&self, layout: &Layout) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(layout.peer_pod), 15001)
    }
}

/// Fails unless every path is gone; for checking cleanup after drop.
pub fn ensure_removed(paths: &[PathBuf]) -> anyhow::Result<()> {
    let left: Vec<_> = paths.iter().filter(|p| p.exists()).collect();
    if !left.is_empty() {
        bail!("network namespaces left behind: {left:?}");
    }
    Ok(())
}
