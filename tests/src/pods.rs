//! TCP servers that play pods: each greets with its name (a server-first
//! protocol, so the client learns who it really reached) and counts what it
//! receives.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;

#[derive(Debug)]
pub struct PodServer {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("pod {name}: bind {addr}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, connections, name) = (stop.clone(), connections.clone(), name.to_owned());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let name = name.clone();
                    std::thread::spawn(move || serve(stream, &name));
                }
            })
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            stop,
            connections,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn serve(mut stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = writeln!(stream, "{name}");
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and closes the listener.
        let _ = TcpStream::connect_timeout(&self.addr, std::time::Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
