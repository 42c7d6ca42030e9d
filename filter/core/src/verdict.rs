//! The verdict on one connection, reading from the host only what it needs
//! (each Envoy property read costs about 12k instructions).

use dialguard_proto::v1::{ConnectionEvent, SocketAddress, Verdict};

use crate::{FilterConfig, MetadataCache, OrigDst, UpstreamHost, UpstreamMemory};

/// What the filter can learn about a finished connection. Implemented with
/// Envoy property reads in the wasm crate and with plain values in tests;
/// methods are called lazily, only when the decision or the report needs them.
pub trait ConnectionFacts {
    /// `destination.address`; `None` when absent or not an IP address.
    fn original_destination(&mut self) -> Option<OrigDst>;
    /// `upstream.address`; `None` when no host was chosen.
    fn upstream_host(&mut self) -> Option<UpstreamHost>;
    /// `xds.cluster_name`.
    fn cluster_name(&mut self) -> Option<String>;

    // Read only for connections that are reported.
    fn source(&mut self) -> Option<std::net::SocketAddr>;
    fn connection_id(&mut self) -> Option<u64>;
    fn filter_chain_name(&mut self) -> Option<String>;
    fn response_flags(&mut self) -> Option<u64>;
    fn upstream_transport_failure_reason(&mut self) -> Option<String>;
    /// Cluster metadata `istio.services[0].host`.
    fn intended_service(&mut self) -> Option<String>;
    /// Upstream host metadata `istio.workload`.
    fn upstream_workload(&mut self) -> Option<String>;
}

/// The outcome for one connection, with what was read to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub original_destination: OrigDst,
    pub upstream_host: Option<UpstreamHost>,
    /// Present when it had to be read for the decision.
    pub cluster_name: Option<String>,
}

impl Judgement {
    /// Whether enforce mode closes this connection: only a certain misroute
    /// (a pod IP sent elsewhere). Reported in audit mode too, as a preview.
    pub fn would_close(&self) -> bool {
        self.verdict == Verdict::Misrouted
    }

    /// Whether the collector must hear about this connection.
    pub fn is_reported(&self) -> bool {
        matches!(
            self.verdict,
            Verdict::Misrouted | Verdict::Blackholed | Verdict::Redirected
        )
    }

    /// Builds the event for a reported connection, reading the remaining
    /// facts; cluster and host metadata come from `metadata` while recent,
    /// and the failure reason is read only when a response flag says the
    /// upstream failed.
    pub fn to_event(
        &self,
        facts: &mut impl ConnectionFacts,
        metadata: &mut MetadataCache,
        sequence: u64,
        timestamp_unix_nanos: u64,
    ) -> ConnectionEvent {
        let cluster_name = match &self.cluster_name {
            Some(name) => name.clone(),
            None => facts.cluster_name().unwrap_or_default(),
        };
        let response_flags = facts.response_flags().unwrap_or_default();
        let upstream_transport_failure_reason = if response_flags == 0 {
            String::new()
        } else {
            let mut reason = facts
                .upstream_transport_failure_reason()
                .unwrap_or_default();
            // Free text from Envoy: cut to what the collector accepts rather
            // than lose the event to a refusal.
            truncate_at_char(&mut reason, dialguard_proto::limits::FAILURE_REASON);
            reason
        };
        let now = timestamp_unix_nanos;
        let intended_service =
            metadata.intended_service(&cluster_name, now, || facts.intended_service());
        let upstream_workload = match self.upstream_host {
            Some(host) => {
                metadata.upstream_workload(&cluster_name, host.0, now, || facts.upstream_workload())
            }
            None => String::new(),
        };
        ConnectionEvent {
            sequence,
            timestamp_unix_nanos,
            original_destination: Some(SocketAddress::from_socket_addr(
                self.original_destination.0,
            )),
            upstream_host: self
                .upstream_host
                .map(|u| SocketAddress::from_socket_addr(u.0)),
            source: facts.source().map(SocketAddress::from_socket_addr),
            connection_id: facts.connection_id().unwrap_or_default(),
            cluster_name,
            filter_chain_name: facts.filter_chain_name().unwrap_or_default(),
            verdict: self.verdict.into(),
            response_flags,
            upstream_transport_failure_reason,
            intended_service,
            enforced: false,
            upstream_workload,
            would_close: self.would_close(),
            judged_open: false,
        }
    }
}

/// When a connection is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgePoint {
    /// While it is open, once Envoy has chosen its upstream: a connection
    /// without an upstream host yet is not judged (it is still connecting,
    /// or will end with `BLACKHOLED` at its close).
    Open,
    /// At its end (`on_log`): every connection gets a verdict.
    End,
}

/// The outcome of trying to judge a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Judged(Judgement),
    /// [`JudgePoint::Open`] before the upstream is known: try again later.
    NotYet,
    /// The original destination is unknown (not an IP connection, or a
    /// listener without original_dst): there is nothing to compare.
    Unjudged,
}

/// Judges one connection.
///
/// The line that matters is whether the dialed address belongs to the mesh:
/// a pod IP (inside `podCidrs`) that reached another address is certain to
/// be misrouted, whatever was learned before. Any other difference may be
/// legitimate (the same DNS name answering with another address) and is
/// `REDIRECTED`, or `RESOLVED` once this VM has seen the dialed address as an
/// upstream host of the same cluster. That memory is kept and used only when
/// pod ranges are configured, since only then is an address known to be
/// external; `upstreams` holds it.
pub fn judge(
    config: &FilterConfig,
    upstreams: &mut UpstreamMemory,
    facts: &mut impl ConnectionFacts,
    at: JudgePoint,
) -> Outcome {
    let Some(dst) = facts.original_destination() else {
        return Outcome::Unjudged;
    };
    let mut judgement = Judgement {
        verdict: Verdict::Service,
        original_destination: dst,
        upstream_host: None,
        cluster_name: None,
    };
    // Cheapest decisions first: a VIP needs one read, a match two; only
    // connections that differ pay for more.
    if config.is_service_vip(dst.ip()) {
        return Outcome::Judged(judgement);
    }
    judgement.upstream_host = facts.upstream_host();
    if at == JudgePoint::Open && judgement.upstream_host.is_none() {
        return Outcome::NotYet;
    }
    if judgement.upstream_host.is_some_and(|u| u.is(dst)) {
        judgement.verdict = Verdict::Match;
        return Outcome::Judged(judgement);
    }
    if config.allow_needs_cluster() || judgement.upstream_host.is_some() {
        judgement.cluster_name = facts.cluster_name();
    }
    let cluster = judgement.cluster_name.as_deref();
    if config.allow.iter().any(|rule| rule.matches(dst, cluster)) {
        judgement.verdict = Verdict::Allowed;
        return Outcome::Judged(judgement);
    }
    let Some(upstream) = judgement.upstream_host else {
        judgement.verdict = Verdict::Blackholed;
        return Outcome::Judged(judgement);
    };
    judgement.verdict = if config.is_pod(dst.ip()) {
        Verdict::Misrouted
    } else if config.knows_pods() {
        let cluster = cluster.unwrap_or_default();
        // A pod IP learned as an upstream never excuses anything: the
        // branch above decides pod IPs first.
        upstreams.record(cluster, upstream.0);
        if upstreams.has_seen(cluster, dst.0) {
            Verdict::Resolved
        } else {
            Verdict::Redirected
        }
    } else {
        Verdict::Redirected
    };
    Outcome::Judged(judgement)
}

/// Shortens `text` to at most `max` bytes, at a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

#[cfg(test)]
mod truncation {
    use super::truncate_at_char;

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let mut ascii = "x".repeat(10);
        truncate_at_char(&mut ascii, 4);
        assert_eq!(ascii, "xxxx");
        // "é" is two bytes: a cut inside it keeps the character out.
        let mut accented = "aé".repeat(3);
        truncate_at_char(&mut accented, 4);
        assert_eq!(accented, "aéa");
        let mut short = String::from("ok");
        truncate_at_char(&mut short, 4);
        assert_eq!(short, "ok");
    }
}
