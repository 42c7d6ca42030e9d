//! The connections: pod servers on loopback (natively) and a client that
//! dials through the sidecar as an application would, one connection after
//! the other: connect to `virtualOutbound`, a PROXY v1 header naming the
//! dialed address (what iptables and `original_dst` do in a pod, see
//! `dialguard_tests::client`), a few bytes, the server's greeting, close.
//!
//! Unlike `dialguard_tests::client::dial`, the header and the bytes go out
//! in one write with `TCP_NODELAY`: two small writes would wait for a
//! delayed ACK (40 ms on loopback) and make every connection that long.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dialguard_tests::pods::PodServer;

use crate::envoy::Envoy;
use crate::topology::{Topology, Traffic};

/// The servers every variant's connections reach.
#[derive(Debug)]
pub struct Servers {
    pub pods: Vec<PodServer>,
}

impl Servers {
    pub fn start(topology: &Topology) -> anyhow::Result<Self> {
        let pods = topology
            .server_addresses()
            .into_iter()
            .map(|(name, addr)| PodServer::start(name, addr))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { pods })
    }
}

/// What a run of connections did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Driven {
    pub connections: u64,
    /// Connections that a server answered.
    pub answered: u64,
    /// Connections meant to be misrouted (dialguard reports each).
    pub misrouted: u64,
    pub elapsed: Duration,
}

/// Drives `count` sequential connections through `envoy`, numbered from
/// `first` (the number decides the target, see [`Topology::dial_target`]).
pub fn drive(
    envoy: &Envoy,
    topology: &Topology,
    traffic: Traffic,
    first: u64,
    count: u64,
) -> Driven {
    let start = Instant::now();
    let mut driven = Driven::default();
    for i in first..first + count {
        let (dialed, misrouted) = topology.dial_target(traffic, i);
        driven.connections += 1;
        if misrouted {
            driven.misrouted += 1;
        }
        if dial(envoy.outbound, topology.source(), dialed).unwrap_or(false) {
            driven.answered += 1;
        }
    }
    driven.elapsed = start.elapsed();
    driven
}

/// One connection; whether the server's greeting (a line) came back.
pub fn dial(outbound: SocketAddr, source: IpAddr, dialed: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&outbound, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let family = if dialed.is_ipv4() { "TCP4" } else { "TCP6" };
    let source_port = stream.local_addr()?.port();
    let request = format!(
        "PROXY {family} {source} {} {source_port} {}\r\nhello from the application\n",
        dialed.ip(),
        dialed.port()
    );
    stream.write_all(request.as_bytes())?;
    let mut greeting = Vec::new();
    let mut buf = [0u8; 256];
    while !greeting.contains(&b'\n') {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        greeting.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(greeting.contains(&b'\n'))
}

/// A connection held open through the sidecar, sending small chunks.
#[derive(Debug)]
pub struct Held {
    stream: TcpStream,
}

impl Held {
    /// Connects as [`dial`] does and waits for the server's greeting.
    pub fn open(outbound: SocketAddr, source: IpAddr, dialed: SocketAddr) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect_timeout(&outbound, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let source_port = stream.local_addr()?.port();
        write!(
            stream,
            "PROXY TCP4 {source} {} {source_port} {}\r\nhello from the application\n",
            dialed.ip(),
            dialed.port()
        )?;
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "no greeting from {dialed}");
        Ok(Self { stream })
    }

    /// 64 bytes to the server.
    pub fn send_chunk(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&[b'x'; 64])?;
        Ok(())
    }
}
