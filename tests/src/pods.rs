//! TCP servers that play pods: each answers with its name, so the client
//! learns who it really reached, either first (a server-first protocol, like
//! MySQL) or after the client's first line (client-first, like HTTP), and
//! counts every byte it receives.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;

/// Who speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    ServerFirst,
    ClientFirst,
}

#[derive(Debug)]
pub struct PodServer {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The accept loop's socket, to wake it on drop.
    listener: TcpListener,
    connections: Arc<AtomicUsize>,
    bytes_received: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_speaking(name, addr, Protocol::ServerFirst)
    }

    pub fn start_speaking(
        name: &str,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("pod {name}: bind {addr}"))?;
        let wake = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes_received = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, connections, name) = (stop.clone(), connections.clone(), name.to_owned());
            let received = bytes_received.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (name, received) = (name.clone(), received.clone());
                    std::thread::spawn(move || serve(stream, &name, protocol, &received));
                }
            })
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            stop,
            listener: wake,
            connections,
            bytes_received,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Application bytes received, over all connections.
    pub fn bytes_received(&self) -> usize {
        self.bytes_received.load(Ordering::SeqCst)
    }
}

fn serve(mut stream: TcpStream, name: &str, protocol: Protocol, received: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut answered = false;
    if protocol == Protocol::ServerFirst {
        answered = writeln!(stream, "{name}").is_ok();
    }
    let mut buffer = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        received.fetch_add(n, Ordering::SeqCst);
        if !answered && buffer.get(..n).is_some_and(|b| b.contains(&b'\n')) {
            answered = writeln!(stream, "{name}").is_ok();
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and closes the listener:
        // shutting a listening socket down makes a blocked accept() fail.
        // (Connecting to it instead would need the server's network
        // namespace, and under iptables capture would go through a sidecar.)
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
