//! Who a gRPC client proves to be (`serve --grpc-client-ca`): the SPIFFE ID
//! in its certificate's URI SAN, as Istio issues workload certificates,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! A certificate from the CA proves only that; without this, any holder of
//! one could claim another sidecar's node and VM in its `hello`. Ingest
//! holds the hello to what the certificate proves (the namespace) and keeps
//! the identity beside the stream.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// An Istio workload identity, read from a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// The SPIFFE ID as the certificate carries it.
    pub uri: String,
}

/// Why a client certificate proves no workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the client certificate carries no spiffe:// URI SAN; expected an Istio workload \
         certificate with {SHAPE}"
    )]
    NoSpiffeId,
    #[error("the client certificate carries {0} spiffe:// URI SANs; expected exactly one, {SHAPE}")]
    SeveralSpiffeIds(usize),
    #[error("the client certificate's SPIFFE ID {uri:?}: {problem}; expected {SHAPE}")]
    Malformed { uri: String, problem: &'static str },
    #[error("the client certificate cannot be read: {0}")]
    Unreadable(String),
}

/// What an Istio workload's SPIFFE ID looks like, for error messages.
const SHAPE: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

/// The SPIFFE specification's bound on an ID.
const MAX_SPIFFE_ID_BYTES: usize = 2048;

impl PeerIdentity {
    /// Parses an Istio workload SPIFFE ID, refusing anything else (another
    /// path shape, a port, a query, characters SPIFFE does not allow).
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let malformed = |problem| IdentityError::Malformed {
            uri: uri.chars().take(200).collect(),
            problem,
        };
        if uri.len() > MAX_SPIFFE_ID_BYTES {
            return Err(malformed("longer than 2048 bytes"));
        }
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| malformed("not a spiffe:// URI"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| malformed("no path after the trust domain"))?;
        let trust_domain_ok = !trust_domain.is_empty()
            && trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !trust_domain_ok {
            return Err(malformed(
                "the trust domain must be lower-case letters, digits, '.', '-' or '_'",
            ));
        }
        let segments: Vec<&str> = path.split('/').collect();
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        if !segments.iter().all(|s| segment_ok(s)) {
            return Err(malformed(
                "path segments must be non-empty letters, digits, '.', '-' or '_' \
                 (no query, fragment or trailing slash)",
            ));
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => Ok(Self {
                trust_domain: trust_domain.to_owned(),
                namespace: (*namespace).to_owned(),
                service_account: (*service_account).to_owned(),
                uri: uri.to_owned(),
            }),
            _ => Err(malformed(
                "the path is not /ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    /// The identity in a client certificate (DER): its one spiffe:// URI SAN.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|err| IdentityError::Unreadable(err.to_string()))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|err| IdentityError::Unreadable(err.to_string()))?;
        let spiffe_ids: Vec<&str> = names
            .iter()
            .flat_map(|san| san.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect();
        match spiffe_ids.as_slice() {
            [] => Err(IdentityError::NoSpiffeId),
            [uri] => Self::parse(uri),
            several => Err(IdentityError::SeveralSpiffeIds(several.len())),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_istio_workload_ids() {
        let id = PeerIdentity::parse("spiffe://cluster.local/ns/app/sa/default").expect("valid");
        assert_eq!(
            (
                id.trust_domain.as_str(),
                id.namespace.as_str(),
                id.service_account.as_str()
            ),
            ("cluster.local", "app", "default")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/app/sa/default");
    }

    #[test]
    fn refuses_what_is_not_an_istio_workload_id() {
        for (uri, problem) in [
            (
                "https://cluster.local/ns/app/sa/default",
                "not a spiffe:// URI",
            ),
            (
                "SPIFFE://cluster.local/ns/app/sa/default",
                "not a spiffe:// URI",
            ),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://Cluster.Local/ns/app/sa/default", "trust domain"),
            (
                "spiffe://cluster.local:443/ns/app/sa/default",
                "trust domain",
            ),
            (
                "spiffe://user@cluster.local/ns/app/sa/default",
                "trust domain",
            ),
            ("spiffe:///ns/app/sa/default", "trust domain"),
            ("spiffe://cluster.local/ns/app/sa/default/", "path segments"),
            ("spiffe://cluster.local/ns//sa/default", "path segments"),
            ("spiffe://cluster.local/ns/../sa/default", "path segments"),
            (
                "spiffe://cluster.local/ns/app/sa/default?x=1",
                "path segments",
            ),
            (
                "spiffe://cluster.local/ns/app/sa/default#x",
                "path segments",
            ),
            ("spiffe://cluster.local/ns/app", "/ns/<namespace>/sa/"),
            (
                "spiffe://cluster.local/sa/default/ns/app",
                "/ns/<namespace>/sa/",
            ),
            (
                "spiffe://cluster.local/ns/app/sa/default/x",
                "/ns/<namespace>/sa/",
            ),
        ] {
            let err = PeerIdentity::parse(uri).expect_err(uri);
            let message = err.to_string();
            assert!(
                message.contains(problem) && message.contains(SHAPE),
                "{uri}: {message}"
            );
        }
        let long = format!("spiffe://cluster.local/ns/app/sa/{}", "a".repeat(2048));
        assert!(
            PeerIdentity::parse(&long)
                .expect_err("too long")
                .to_string()
                .contains("2048 bytes")
        );
    }
}
