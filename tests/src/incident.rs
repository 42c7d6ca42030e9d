//! The field incident, end to end: the collector, the manager pod's sidecar
//! (real Envoy with the built module) and the pods as TCP servers, wired on
//! loopback ([`Loopback`]) or in network namespaces
//! ([`crate::netns::PodNetwork`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;
use tempfile::TempDir;

use crate::client::{self, Outcome};
use crate::collector::Collector;
use crate::dist::Dist;
use crate::pods::PodServer;
use crate::sidecar::{self, DynamicListeners, Envoy, Install, Layout};

/// How the manager application's connections reach its sidecar, and how
/// the test reaches the sidecar's admin endpoint.
pub trait Wiring {
    /// The application in the pod `own_pod` dials `dialed`.
    fn dial(
        &self,
        sidecar: &Envoy,
        own_pod: Ipv4Addr,
        dialed: SocketAddr,
    ) -> anyhow::Result<Outcome>;
    /// GET `path` from the admin endpoint at `admin`.
    fn admin_get(&self, admin: SocketAddr, path: &str) -> anyhow::Result<String>;
    /// A destination whose connection the sidecar sends to
    /// `BlackHoleCluster`, with no upstream host.
    fn blackholed_destination(&self, layout: &Layout) -> SocketAddr;
}

/// Everything on loopback; the client states the dialed address in a PROXY
/// protocol header (see [`crate::client`]).
#[derive(Debug)]
pub struct Loopback;

impl Wiring for Loopback {
    fn dial(
        &self,
        sidecar: &Envoy,
        own_pod: Ipv4Addr,
        dialed: SocketAddr,
    ) -> anyhow::Result<Outcome> {
        client::dial(sidecar.outbound, IpAddr::V4(own_pod), dialed)
    }
    fn admin_get(&self, admin: SocketAddr, path: &str) -> anyhow::Result<String> {
        sidecar::admin_get(admin, path)
    }
    /// The client can state any destination, its own pod IP included: the
    /// catch-all's own-IP chain blackholes it.
    fn blackholed_destination(&self, layout: &Layout) -> SocketAddr {
        layout.at(layout.own_pod)
    }
}

#[derive(Debug)]
pub struct Incident<W = Loopback> {
    // Dropped in this order: Envoy first, so it does not log the collector's
    // exit; the processes and servers before the network they live in.
    /// The peer manager pod's sidecar, when started ([`Incident::start_peer_sidecar`]).
    pub peer_sidecar: Option<Envoy>,
    pub envoy: Envoy,
    pub pods: Vec<PodServer>,
    pub collector: Collector,
    pub layout: Layout,
    pub wiring: W,
    pub dir: TempDir,
}

impl Incident {
    /// Starts everything; `echo` forwards the children's logs to stderr.
    pub fn start(dist: &Dist, echo: bool) -> anyhow::Result<Self> {
        Self::start_with(dist, &sidecar::filter_config(), echo)
    }

    /// Starts everything with a given dialguard filter configuration.
    pub fn start_with(
        dist: &Dist,
        filter_config: &serde_json::Value,
        echo: bool,
    ) -> anyhow::Result<Self> {
        Self::start_installed(dist, false, echo, |collector| {
            Ok(Install::local(&dist.module, filter_config, collector.grpc))
        })
    }

    /// Starts everything with the sidecar's listeners served over file-based
    /// LDS, so that [`Incident::reconfigure`] can push a new dialguard
    /// configuration while traffic flows.
    pub fn start_dynamic(
        dist: &Dist,
        echo: bool,
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
    ) -> anyhow::Result<(Self, DynamicListeners)> {
        let mut lds = None;
        let incident = Self::start_configured(dist, false, echo, install, |bootstrap, dir| {
            lds = Some(DynamicListeners::install(bootstrap, dir)?);
            Ok(())
        })?;
        Ok((incident, lds.context("listeners were not made dynamic")?))
    }

    /// Pushes the sidecar's listeners with dialguard installed as `install`
    /// and waits until Envoy has applied them.
    pub fn reconfigure(&self, lds: &mut DynamicListeners, install: &Install) -> anyhow::Result<()> {
        self.reconfigure_with(lds, install, |_| {})
    }

    /// [`Incident::reconfigure`], with the listeners changed by `change`
    /// first (e.g. istiod's `REGISTRY_ONLY` passthrough chain).
    pub fn reconfigure_with(
        &self,
        lds: &mut DynamicListeners,
        install: &Install,
        change: impl FnOnce(&mut serde_json::Value),
    ) -> anyhow::Result<()> {
        let mut bootstrap = sidecar::bootstrap(&self.layout, install, &self.envoy.access_log);
        change(&mut bootstrap["static_resources"]["listeners"]);
        let applied = |admin: &Self| -> Option<u64> {
            let stats =
                sidecar::stats(admin.envoy.admin, "listener_manager.lds.update_success").ok()?;
            stats.values().next().copied()
        };
        let before = applied(self).unwrap_or(0);
        lds.push(&bootstrap["static_resources"]["listeners"])?;
        crate::wait_for(std::time::Duration::from_secs(20), || {
            (applied(self)? > before).then_some(())
        })
        .with_context(|| format!("Envoy did not apply listeners version {}", lds.version()))
    }

    /// Starts everything, with dialguard installed in the sidecar as `install`
    /// decides once the collector runs (with `serve_module`, it serves the
    /// module too).
    pub fn start_installed(
        dist: &Dist,
        serve_module: bool,
        echo: bool,
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
    ) -> anyhow::Result<Self> {
        Self::start_configured(dist, serve_module, echo, install, |_, _| Ok(()))
    }

    /// [`Incident::start_installed`] with more `dialguard serve` flags.
    pub fn start_with_collector_flags(
        dist: &Dist,
        serve_module: bool,
        collector_flags: &[&str],
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
    ) -> anyhow::Result<Self> {
        Self::start_full(
            dist,
            serve_module,
            collector_flags,
            false,
            install,
            |_, _| Ok(()),
        )
    }

    fn start_configured(
        dist: &Dist,
        serve_module: bool,
        echo: bool,
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
        adjust: impl FnOnce(&mut serde_json::Value, &std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        Self::start_full(dist, serve_module, &[], echo, install, adjust)
    }

    fn start_full(
        dist: &Dist,
        serve_module: bool,
        collector_flags: &[&str],
        echo: bool,
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
        adjust: impl FnOnce(&mut serde_json::Value, &std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        // DIALGUARD_TEST_ECHO=1 shows every child's log, for debugging a test.
        let echo = echo || std::env::var_os("DIALGUARD_TEST_ECHO").is_some();
        let dir = tempfile::Builder::new().prefix("dialguard-e2e").tempdir()?;
        let layout = Layout::choose()?;
        let module = serve_module.then_some(dist.module.as_path());
        let collector = Collector::start_with_flags(
            &dist.dialguard,
            &dir.path().join("dialguard.db"),
            module,
            collector_flags,
            echo,
        )?;
        let pods = layout
            .pod_servers()
            .iter()
            .map(|(name, addr)| PodServer::start(name, *addr))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let access_log = dir.path().join("access.log");
        let mut bootstrap = sidecar::bootstrap(&layout, &install(&collector)?, &access_log);
        adjust(&mut bootstrap, dir.path())?;
        let envoy = Envoy::start(&dist.envoy, echo, &bootstrap, dir.path(), access_log)?;
        Ok(Self {
            layout,
            collector,
            peer_sidecar: None,
            envoy,
            pods,
            wiring: Loopback,
            dir,
        })
    }
}

impl Incident {
    /// Starts the peer manager pod's sidecar: the same listeners (istiod
    /// gives both replicas one configuration), its own identity and IP, and
    /// dialguard installed as `install`. The application in the peer pod
    /// dials through it with [`Incident::dial_from_peer`].
    pub fn start_peer_sidecar(&mut self, dist: &Dist, install: &Install) -> anyhow::Result<()> {
        let dir = self.dir.path().join("peer-sidecar");
        std::fs::create_dir_all(&dir)?;
        let access_log = dir.join("access.log");
        let bootstrap = sidecar::bootstrap(&self.layout.as_peer(), install, &access_log);
        let echo = std::env::var_os("DIALGUARD_TEST_ECHO").is_some();
        self.peer_sidecar = Some(Envoy::start(
            &dist.envoy,
            echo,
            &bootstrap,
            &dir,
            access_log,
        )?);
        Ok(())
    }

    /// The application in the peer pod dials `dialed` through its sidecar.
    pub fn dial_from_peer(&self, dialed: SocketAddr) -> anyhow::Result<Outcome> {
        let sidecar = self
            .peer_sidecar
            .as_ref()
            .context("the peer sidecar was not started")?;
        client::dial(sidecar.outbound, IpAddr::V4(self.layout.peer_pod), dialed)
    }
}

impl<W: Wiring> Incident<W> {
    /// The manager application in this pod dials `dialed` through its sidecar.
    pub fn dial(&self, dialed: SocketAddr) -> anyhow::Result<Outcome> {
        self.wiring.dial(&self.envoy, self.layout.own_pod, dialed)
    }

    /// The pod server listening on `addr`.
    pub fn pod(&self, addr: SocketAddr) -> Option<&PodServer> {
        self.pods.iter().find(|pod| pod.addr == addr)
    }

    /// Stops the pod server listening on `addr` (the incident's `idle` pod has none).
    pub fn stop_pod(&mut self, addr: SocketAddr) {
        self.pods.retain(|pod| pod.addr != addr);
    }

    /// GET `path` from the sidecar's admin endpoint.
    pub fn envoy_admin(&self, path: &str) -> anyhow::Result<String> {
        self.wiring.admin_get(self.envoy.admin, path)
    }

    /// See [`Wiring::blackholed_destination`].
    pub fn blackholed_destination(&self) -> SocketAddr {
        self.wiring.blackholed_destination(&self.layout)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.envoy.access_log).unwrap_or_default()
    }
}
