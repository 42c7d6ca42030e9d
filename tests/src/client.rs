//! An application dialing through the sidecar. On a real pod iptables
//! redirects the connection to Envoy's port 15001 and the `original_dst`
//! listener filter recovers the dialed address; on loopback the client
//! connects to the `virtualOutbound` listener and states the dialed address in
//! a PROXY protocol (v1) header, which Envoy's `proxy_protocol` listener
//! filter restores the same way, so `use_original_dst` hands the connection to
//! the listener for that address exactly as in a sidecar. In a pod network
//! namespace ([`crate::netns`]) there is no such stand-in: [`dial_direct`]
//! is a plain connect and iptables does the capturing.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// What the application saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A server answered; its greeting names the pod actually reached.
    Reached(String),
    /// The connection was closed without a byte (blackholed, or the upstream failed).
    Closed,
}

pub fn dial(
    outbound: SocketAddr,
    source_ip: IpAddr,
    dialed: SocketAddr,
) -> anyhow::Result<Outcome> {
    let stream =
        connect(outbound).with_context(|| format!("connecting to the sidecar at {outbound}"))?;
    let family = if dialed.is_ipv4() { "TCP4" } else { "TCP6" };
    let source_port = stream.local_addr()?.port();
    let header = format!(
        "PROXY {family} {source_ip} {} {source_port} {}\r\n",
        dialed.ip(),
        dialed.port()
    );
    converse(stream, &header)
}

/// A plain connect to `dialed`, as the application in a pod with iptables
/// capture makes it: the kernel hands it to the sidecar, if at all.
pub fn dial_direct(dialed: SocketAddr) -> anyhow::Result<Outcome> {
    let stream = connect(dialed).with_context(|| format!("connecting to {dialed}"))?;
    converse(stream, "")
}

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `header` and the first line in one write, so no delayed ACK stalls
/// us, and reads who answers.
fn converse(mut stream: TcpStream, header: &str) -> anyhow::Result<Outcome> {
    stream.write_all(format!("{header}hello from the application\n").as_bytes())?;
    let mut greeting = String::new();
    let read = BufReader::new(&stream).read_line(&mut greeting);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(match read {
        Ok(n) if n > 0 => Outcome::Reached(greeting.trim().to_owned()),
        _ => Outcome::Closed,
    })
}

/// A connection the application holds open through the sidecar, talking
/// now and then (a Hazelcast member, a database client).
#[derive(Debug)]
pub struct Held {
    stream: TcpStream,
    /// The first line the server sent: who answered.
    pub greeting: String,
}

impl Held {
    /// Dials `dialed` from `source` through `outbound` with a PROXY header,
    /// as [`dial`] does, and reads the greeting.
    pub fn open(outbound: SocketAddr, source: IpAddr, dialed: SocketAddr) -> anyhow::Result<Self> {
        let mut stream = connect(outbound)?;
        let family = if dialed.is_ipv4() { "TCP4" } else { "TCP6" };
        let local = stream.local_addr()?.port();
        write!(
            stream,
            "PROXY {family} {source} {} {local} {}\r\nhello from the application\n",
            dialed.ip(),
            dialed.port()
        )?;
        let mut greeting = String::new();
        BufReader::new(&stream).read_line(&mut greeting)?;
        Ok(Self {
            stream,
            greeting: greeting.trim().to_owned(),
        })
    }

    /// Sends a few bytes.
    pub fn ping(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(b"ping\n")?;
        Ok(())
    }

    /// Still open: reading finds nothing to read rather than the end.
    pub fn is_open(&self) -> bool {
        use std::io::Read;
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)));
        let mut byte = [0u8; 1];
        match (&self.stream).read(&mut byte) {
            Ok(0) => false,
            Ok(_) => true,
            Err(err) => matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}
