//! TLS for both listeners (`serve --tls-cert/--tls-key`) and, on gRPC,
//! client certificates (`--grpc-client-ca`, mutual TLS).
//!
//! The collector terminates TLS itself with rustls rather than through
//! tonic's and axum's own TLS options: one loader gives the same checks and
//! flag-naming errors for both listeners, and one accept loop
//! (`listener.rs`) does handshakes concurrently, each bounded in time, so a
//! client that connects and says nothing holds no listener up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};

/// The PEM files behind `--tls-cert`, `--tls-key` and `--grpc-client-ca`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require gRPC clients to present a certificate issued by one of these CAs.
    pub grpc_client_ca: Option<PathBuf>,
}

/// The server side of TLS for the two listeners, loaded and checked.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    grpc_client_auth: bool,
    warnings: Vec<String>,
}

/// The smallest RSA key `--tls-key` may hold, in bits.
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: {problem}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error(
        "--tls-key {} does not belong to the certificate in --tls-cert {} (their public keys differ)",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "--tls-key {}: an RSA key of {bits} bits (the public key of --tls-cert {}); \
         expected at least {MIN_RSA_BITS} bits",
        key.display(),
        cert.display()
    )]
    WeakKey {
        cert: PathBuf,
        key: PathBuf,
        bits: usize,
    },
}

impl TlsConfig {
    /// Reads and checks the files: each must hold PEM of the right kind, and
    /// the key must match the certificate.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certificates("--tls-cert", &files.cert)?;
        let key = read_private_key(&files.key)?;
        // Before the key is loaded: ring refuses a short RSA key with a
        // message that says neither why nor which flag.
        let warnings = check_server_certificate(&chain, files)?;
        check_key_matches(&provider, &chain, &key, files)?;

        let config = |alpn: &[u8], client_ca: Option<&RootCertStore>| {
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|err| invalid("--tls-cert", &files.cert, err))?;
            let builder = match client_ca {
                None => builder.with_no_client_auth(),
                Some(roots) => {
                    let verifier = WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots.clone()),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|err| invalid("--grpc-client-ca", ca_path(files), err))?;
                    builder.with_client_cert_verifier(verifier)
                }
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|err| invalid("--tls-key", &files.key, err))?;
            // The only protocol each listener speaks; a client offering
            // something else fails the handshake instead of a later parse.
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        let client_roots = files
            .grpc_client_ca
            .as_deref()
            .map(read_client_roots)
            .transpose()?;
        Ok(Self {
            grpc: config(b"h2", client_roots.as_ref())?,
            http: config(b"http/1.1", None)?,
            grpc_client_auth: client_roots.is_some(),
            warnings,
        })
    }

    /// What is wrong with `--tls-cert` without stopping `serve` (expired,
    /// not yet valid, SHA-1 signed, a CA certificate), one sentence each
    /// naming the flag and the file: `serve` prints them as warnings.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether gRPC clients must present a certificate (mutual TLS).
    pub fn grpc_client_auth(&self) -> bool {
        self.grpc_client_auth
    }

    pub(crate) fn grpc(&self) -> Arc<ServerConfig> {
        self.grpc.clone()
    }

    pub(crate) fn http(&self) -> Arc<ServerConfig> {
        self.http.clone()
    }
}

fn ca_path(files: &TlsFiles) -> &Path {
    files.grpc_client_ca.as_deref().unwrap_or(Path::new(""))
}

fn invalid(flag: &'static str, path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

fn read_pem_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// The certificates in a PEM file; at least one. Errors name `flag`.
pub fn read_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem_file(flag, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(flag, path, format!("not valid PEM: {err}")))?;
    if certificates.is_empty() {
        // A common slip: the key file given where the certificate belongs.
        let hint = match (PrivateKeyDer::from_pem_slice(&bytes), flag) {
            (Ok(_), "--tls-cert") => " (it holds a private key: swapped with --tls-key?)",
            (Ok(_), _) => " (it holds a private key)",
            (Err(_), _) => "",
        };
        return Err(invalid(
            flag,
            path,
            format!("no PEM certificate found (expected -----BEGIN CERTIFICATE-----){hint}"),
        ));
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem_file("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| {
        let problem = match err {
            pem::Error::NoItemsFound => {
                "no PEM private key found (expected -----BEGIN PRIVATE KEY-----, \
                 RSA PRIVATE KEY or EC PRIVATE KEY)"
                    .to_string()
            }
            other => format!("not valid PEM: {other}"),
        };
        invalid("--tls-key", path, problem)
    })
}

fn read_client_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates("--grpc-client-ca", path)? {
        roots
            .add(certificate)
            .map_err(|err| invalid("--grpc-client-ca", path, format!("not a usable CA: {err}")))?;
    }
    Ok(roots)
}

/// Signature algorithms over SHA-1 (RSA, ECDSA, DSA, and the old OIW RSA one):
/// collisions for SHA-1 are practical, and clients refuse such certificates.
const SHA1_SIGNATURES: [&str; 4] = [
    "1.2.840.113549.1.1.5",
    "1.2.840.10045.4.1",
    "1.2.840.10040.4.3",
    "1.3.14.3.2.29",
];

/// Checks the chain of `--tls-cert`: an RSA key under [`MIN_RSA_BITS`] is
/// refused; the rest is returned as warnings, because the operator may
/// know why (a test setup, a certificate about to be replaced) and
/// clients decide anyway.
fn check_server_certificate(
    chain: &[CertificateDer<'static>],
    files: &TlsFiles,
) -> Result<Vec<String>, TlsError> {
    let cert_flag = format!("--tls-cert {}", files.cert.display());
    let mut warnings = Vec::new();
    for (index, der) in chain.iter().enumerate() {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|err| {
            invalid(
                "--tls-cert",
                &files.cert,
                format!("not a valid certificate: {err}"),
            )
        })?;
        let which = if index == 0 {
            "the certificate".to_string()
        } else {
            format!("certificate {} of the chain", index + 1)
        };
        let validity = certificate.validity();
        let now = x509_parser::time::ASN1Time::now();
        if now > validity.not_after {
            warnings.push(format!(
                "{cert_flag}: {which} expired on {}; clients will refuse it",
                asn1_rfc3339(&validity.not_after)
            ));
        } else if now < validity.not_before {
            warnings.push(format!(
                "{cert_flag}: {which} is not valid before {}; clients will refuse it until then",
                asn1_rfc3339(&validity.not_before)
            ));
        }
        let algorithm = certificate.signature_algorithm.algorithm.to_id_string();
        if SHA1_SIGNATURES.contains(&algorithm.as_str()) {
            warnings.push(format!(
                "{cert_flag}: {which} is signed with SHA-1 ({algorithm}), which clients refuse; \
                 reissue it signed with SHA-256 or better"
            ));
        }
        if index > 0 {
            continue;
        }
        if certificate.is_ca() {
            warnings.push(format!(
                "{cert_flag}: the certificate is a CA certificate (basicConstraints CA:true), \
                 not a server certificate; many clients refuse it as one"
            ));
        }
        if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = certificate.public_key().parsed()
        {
            let bits = rsa.key_size();
            if bits < MIN_RSA_BITS {
                return Err(TlsError::WeakKey {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    bits,
                });
            }
        }
    }
    Ok(warnings)
}

fn asn1_rfc3339(time: &x509_parser::time::ASN1Time) -> String {
    let seconds = u64::try_from(time.timestamp()).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(seconds))
        .to_string()
}

/// Catches a key and a certificate that do not belong together at startup,
/// naming the flag at fault, rather than as failed handshakes later.
fn check_key_matches(
    provider: &CryptoProvider,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    files: &TlsFiles,
) -> Result<(), TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|err| {
            invalid(
                "--tls-key",
                &files.key,
                format!("unusable private key: {err}"),
            )
        })?;
    match CertifiedKey::new(chain.to_vec(), signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        Err(err) => Err(invalid(
            "--tls-cert",
            &files.cert,
            format!("not a valid certificate: {err}"),
        )),
    }
}
