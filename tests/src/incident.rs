//! The field incident, end to end: the collector, the manager pod's sidecar
//! (real Envoy with the built module) and the pods as TCP servers.

use std::net::{IpAddr, SocketAddr};

use tempfile::TempDir;

use crate::client::{self, Outcome};
use crate::collector::Collector;
use crate::dist::Dist;
use crate::pods::PodServer;
use crate::sidecar::{self, Envoy, Install, Layout};

#[derive(Debug)]
pub struct Incident {
    // Dropped in this order: Envoy first, so it does not log the collector's exit.
    pub envoy: Envoy,
    pub pods: Vec<PodServer>,
    pub collector: Collector,
    pub layout: Layout,
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

    /// Starts everything, with dialguard installed in the sidecar as `install`
    /// decides once the collector runs (with `serve_module`, it serves the
    /// module too).
    pub fn start_installed(
        dist: &Dist,
        serve_module: bool,
        echo: bool,
        install: impl FnOnce(&Collector) -> anyhow::Result<Install>,
    ) -> anyhow::Result<Self> {
        // DIALGUARD_TEST_ECHO=1 shows every child's log, for debugging a test.
        let echo = echo || std::env::var_os("DIALGUARD_TEST_ECHO").is_some();
        let dir = tempfile::Builder::new().prefix("dialguard-e2e").tempdir()?;
        let layout = Layout::choose()?;
        let module = serve_module.then_some(dist.module.as_path());
        let collector = Collector::start(
            &dist.dialguard,
            &dir.path().join("dialguard.db"),
            module,
            echo,
        )?;
        let mut pods = vec![
            PodServer::start("manager-0 (this pod)", layout.at(layout.own_pod))?,
            PodServer::start("manager-1", layout.at(layout.peer_pod))?,
            PodServer::start("idle", layout.at(layout.idle_pod))?,
            PodServer::start(
                "mongo (external)",
                SocketAddr::new(IpAddr::V4(layout.external_db), layout.dns_port),
            )?,
        ];
        for (i, ip) in layout.app_pods.iter().enumerate() {
            pods.push(PodServer::start(&format!("app-{i}"), layout.at(*ip))?);
            for port in [layout.passthrough_port, layout.dns_port] {
                pods.push(PodServer::start(
                    &format!("app-{i} (port {port})"),
                    SocketAddr::new(IpAddr::V4(*ip), port),
                )?);
            }
        }
        let access_log = dir.path().join("access.log");
        let bootstrap = sidecar::bootstrap(&layout, &install(&collector)?, &access_log);
        let envoy = Envoy::start(&dist.envoy, echo, &bootstrap, dir.path(), access_log)?;
        Ok(Self {
            layout,
            collector,
            envoy,
            pods,
            dir,
        })
    }

    /// The manager application in this pod dials `dialed` through its sidecar.
    pub fn dial(&self, dialed: SocketAddr) -> anyhow::Result<Outcome> {
        client::dial(self.envoy.outbound, IpAddr::V4(self.layout.own_pod), dialed)
    }

    /// Stops the pod server listening on `addr` (the incident's `idle` pod has none).
    pub fn stop_pod(&mut self, addr: SocketAddr) {
        self.pods.retain(|pod| pod.addr != addr);
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.envoy.access_log).unwrap_or_default()
    }
}
