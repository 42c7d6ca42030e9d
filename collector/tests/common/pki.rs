//! Certificates made at test time: rcgen for CAs and leaves (SANs, SPIFFE
//! URIs, validity dates, CA flags), openssl's CLI for what rcgen cannot make
//! (SHA-1 signatures, RSA keys). Used with `#[path = "common/pki.rs"] mod pki;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A CA that issues certificates.
pub struct Ca {
    pub pem: Pem,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        Self {
            pem: Pem {
                cert: issuer.pem(),
                key: key_pem,
            },
            issuer,
        }
    }

    /// Signs `params` for a new key.
    pub fn issue(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self) -> Pem {
        self.issue(leaf_params(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ))
    }

    /// A client certificate with `uri` as its only SAN, as Istio issues
    /// workload certificates (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub fn workload(&self, uri: &str) -> Pem {
        let mut params = leaf_params(&[], ExtendedKeyUsagePurpose::ClientAuth);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("an IA5 URI"))];
        self.issue(params)
    }

    /// A client certificate with DNS names only (no URI SAN).
    pub fn dns_client(&self, name: &str) -> Pem {
        self.issue(leaf_params(&[name], ExtendedKeyUsagePurpose::ClientAuth))
    }
}

/// Leaf parameters with `names` as DNS/IP SANs (the first also the CN).
pub fn leaf_params(names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf params");
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![usage];
    params
}

/// A temporary directory holding PEM files.
pub struct Files {
    _dir: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Files {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            dir: dir.path().to_owned(),
            _dir: dir,
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    }

    /// Writes `pem` as `<name>.pem` and `<name>.key`; returns both paths.
    pub fn write_pair(&self, name: &str, pem: &Pem) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.pem"), &pem.cert),
            self.write(&format!("{name}.key"), &pem.key),
        )
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A self-signed certificate for localhost made by `openssl req`, with an
/// RSA key of `rsa_bits` and the digest `digest` (e.g. `-sha1`), written as
/// `<name>.pem` and `<name>.key` in `dir`. rcgen (on ring) can neither
/// generate RSA keys nor sign with SHA-1, hence the CLI.
pub fn openssl_self_signed(
    dir: &Path,
    name: &str,
    rsa_bits: u32,
    digest: &str,
) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A server certificate, not the CA that `req -x509` makes by default.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-newkey")
        .arg(format!("rsa:{rsa_bits}"))
        .arg(digest)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap_or_else(|err| {
            panic!("running openssl (Debian's `openssl` package) to make a test certificate: {err}")
        });
    assert!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}
