//! The two sides of every judgement, as distinct types so they cannot be swapped.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// What the application dialed: Envoy's `destination.address`, i.e. the
/// downstream local address restored by the `original_dst` listener filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The host Envoy selected for the connection: `upstream.address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamHost(pub SocketAddr);

impl OrigDst {
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }
    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

impl UpstreamHost {
    /// True when Envoy connected to exactly the address the application dialed.
    pub fn is(&self, dst: OrigDst) -> bool {
        self.0 == dst.0
    }
}

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for UpstreamHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Envoy address attribute that is not an IP socket address (for example a
/// pipe path, or bytes that are not UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrParseError(pub String);

impl fmt::Display for AddrParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an IP socket address: {:?}", self.0)
    }
}

/// Parses an address attribute as Envoy renders it: `10.0.1.7:5701` or
/// `[fd00::7]:5701`.
pub fn parse_envoy_address(raw: &[u8]) -> Result<SocketAddr, AddrParseError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| AddrParseError(String::from_utf8_lossy(raw).into_owned()))?;
    text.parse().map_err(|_| AddrParseError(text.to_owned()))
}
