//! TLS, client certificates and the HTTP token (`serve --tls-cert/--tls-key`,
//! `--grpc-client-ca`, `--http-token-file`), against the real server: in
//! process for what goes over the wire, the binary for the flags. The
//! certificates are made at test time with rcgen: a CA, a server certificate
//! for localhost/127.0.0.1, a client certificate from that CA and one from
//! an unrelated CA.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::auth::HttpToken;
use dialguard_collector::tls::{TlsConfig, TlsFiles};
use dialguard_proto::v1::collector_client::CollectorClient;
use pki::{Ca, Files, Pem};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const TOKEN: &str = "t0ken-for-tests";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

struct Pki {
    files: Files,
    ca: Pem,
    client: Pem,
    /// Issued by a CA the server does not trust.
    stranger: Pem,
}

/// The SPIFFE ID of the test client certificates: namespace `bookinfo`,
/// as `hello()` says.
const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";

impl Pki {
    fn new() -> Self {
        let ca = Ca::new("dialguard test CA");
        let other = Ca::new("some other CA");
        let files = Files::new();
        files.write("ca.pem", &ca.pem.cert);
        files.write_pair("server", &ca.server());
        // Istio workload certificates of the namespace the test hellos name.
        let client = ca.workload(WORKLOAD_ID);
        files.write("client.key", &client.key);
        Self {
            files,
            ca: ca.pem,
            client,
            stranger: other.workload(WORKLOAD_ID),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        self.files.write(name, text)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }

    fn tls(&self, client_ca: bool) -> TlsConfig {
        TlsConfig::load(&TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            grpc_client_ca: client_ca.then(|| self.path("ca.pem")),
        })
        .expect("load the test certificates")
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A gRPC channel to `grpc`: TLS trusting the test CA when `tls`, with
/// `identity` as the client certificate if given; plain text otherwise.
async fn channel(
    grpc: SocketAddr,
    pki: &Pki,
    tls: bool,
    identity: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{grpc}"))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .timeout(WAIT);
    if tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca.cert))
            .domain_name("localhost");
        if let Some(pem) = identity {
            config = config.identity(Identity::from_pem(&pem.cert, &pem.key));
        }
        endpoint = endpoint.tls_config(config).expect("client TLS config");
    }
    bounded("connecting", endpoint.connect()).await
}

/// Streams a hello and a batch of misroutes 1..=3 as `vm`; the sequence the
/// collector acknowledged through, or what went wrong.
async fn report_as(
    grpc: SocketAddr,
    pki: &Pki,
    tls: bool,
    identity: Option<&Pem>,
    vm: &str,
) -> Result<u64, String> {
    let channel = channel(grpc, pki, tls, identity)
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    let mut client = CollectorClient::new(channel);
    let mut stream = ReportStream::open_with(&mut client, hello_message(NODE, vm))
        .await
        .map_err(|status| format!("Report call: {status:?}"))?;
    // The batch may be refused on the way in once the connection is gone.
    let _ = stream.tx.send(misrouted_batch(1..=3)).await;
    stream
        .next_ack()
        .await
        .map_err(|status| format!("ack: {status:?}"))
}

fn https_client(pki: &Pki) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca.cert.as_bytes()).expect("CA for reqwest"),
        )
        .timeout(WAIT)
        .build()
        .expect("HTTPS client")
}

/// Status and body of a GET, with `token` as the bearer token if given.
async fn get(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> reqwest::Result<(u16, String)> {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = bounded("an HTTPS GET", request.send()).await?;
    let status = response.status().as_u16();
    let body = bounded("an HTTPS body", response.text()).await?;
    Ok((status, body))
}

fn sidecars_named(db: &Path, vm: &str) -> i64 {
    count(
        db,
        &format!("SELECT count(*) FROM sidecars WHERE vm_instance = '{vm}'"),
    )
}

async fn start_tls_server(db: &Path, pki: &Pki, client_ca: bool) -> Server {
    Server::start_with(ServeConfig {
        tls: Some(pki.tls(client_ca)),
        http_token: Some(HttpToken::new(TOKEN).expect("token")),
        ..test_config(db)
    })
    .await
}

// ---------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let (_dir, db) = temp_db();
    let server = start_tls_server(&db, &pki, true).await;

    let no_cert = report_as(server.grpc, &pki, true, None, "vm-no-cert").await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate got an ack"
    );
    let wrong_ca = report_as(server.grpc, &pki, true, Some(&pki.stranger), "vm-wrong-ca").await;
    assert!(wrong_ca.is_err(), "a client of another CA got an ack");
    let plain = report_as(server.grpc, &pki, false, None, "vm-plain").await;
    assert!(plain.is_err(), "plain-text gRPC to the TLS port got an ack");
    // The refusals are the server's TLS alerts (or, for plain text, the
    // connection closed), not RPC statuses from the service.
    for (who, result, cause) in [
        ("no certificate", &no_cert, "CertificateRequired"),
        ("another CA", &wrong_ca, "UnknownCA"),
        ("plain text", &plain, "transport error"),
    ] {
        let err = result.as_ref().expect_err("refused");
        assert!(err.contains(cause), "{who}: expected {cause}, got {err}");
    }

    let through = report_as(server.grpc, &pki, true, Some(&pki.client), "vm-trusted")
        .await
        .expect("a client with a certificate from the CA is served");
    assert_eq!(through, 3);
    assert_eq!(stored_sequences(&db, "vm-trusted"), vec![1, 2, 3]);

    // Nothing from the refused clients reached the database.
    for vm in ["vm-no-cert", "vm-wrong-ca", "vm-plain"] {
        assert_eq!(sidecars_named(&db, vm), 0, "{vm} has a sidecar row");
        assert!(stored_sequences(&db, vm).is_empty(), "{vm} has events");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM sidecars"), 1);
    assert_eq!(stored_events(&db), 3);
    server.stop().await;
}

#[tokio::test]
async fn tls_without_client_ca_serves_clients_without_a_certificate() {
    let pki = Pki::new();
    let (_dir, db) = temp_db();
    let server = start_tls_server(&db, &pki, false).await;
    let through = report_as(server.grpc, &pki, true, None, "vm-one-way")
        .await
        .expect("served over one-way TLS");
    assert_eq!(through, 3);
    let plain = report_as(server.grpc, &pki, false, None, "vm-plain").await;
    assert!(plain.is_err(), "plain-text gRPC to the TLS port got an ack");
    assert_eq!(sidecars_named(&db, "vm-plain"), 0);
    assert_eq!(stored_events(&db), 3);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn https_api_requires_the_token() {
    let pki = Pki::new();
    let (_dir, db) = temp_db();
    let server = start_tls_server(&db, &pki, true).await;
    report_as(server.grpc, &pki, true, Some(&pki.client), "vm-trusted")
        .await
        .expect("seed the report");

    let client = https_client(&pki);
    let base = format!("https://127.0.0.1:{}", server.http.port());
    let report_url = format!("{base}/api/v1/report");

    let (status, body) = get(&client, &report_url, Some(TOKEN))
        .await
        .expect("GET the report with the token");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("the report is JSON");
    assert!(
        body.contains(DEST) && body.contains(WRONG_POD),
        "the report lacks the misroute: {report}"
    );

    for token in [None, Some("wrong-token"), Some("t0ken-for-test")] {
        for path in ["/api/v1/report", "/metrics", "/no-such-path"] {
            let (status, body) = get(&client, &format!("{base}{path}"), token)
                .await
                .expect("GET without the right token");
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert!(
                !body.contains(DEST) && !body.contains("dialguard_"),
                "{path} with {token:?} leaked data: {body}"
            );
        }
    }

    let (status, body) = get(&client, &format!("{base}/metrics"), Some(TOKEN))
        .await
        .expect("GET /metrics with the token");
    assert_eq!(status, 200, "{body}");
    // Kubelet probes send no token.
    let (status, _) = get(&client, &format!("{base}/healthz"), None)
        .await
        .expect("GET /healthz");
    assert_eq!(status, 200);

    // A client that does not trust the CA, and plain HTTP, get nothing.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(WAIT)
        .build()
        .expect("client");
    assert!(get(&untrusting, &report_url, Some(TOKEN)).await.is_err());
    if let Ok((status, _, body)) = try_http_get(server.http, "/api/v1/report").await {
        assert_ne!(status, 200, "plain HTTP to the TLS port answered: {body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn token_without_tls_is_checked_too() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        http_token: Some(HttpToken::new(TOKEN).expect("token")),
        ..test_config(&db)
    })
    .await;
    let (status, _, body) = http_get(server.http, "/api/v1/report").await;
    assert_eq!(status, 401, "{body}");
    let client = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client");
    let url = format!("http://{}/api/v1/report", server.http);
    let (status, body) = get(&client, &url, Some(TOKEN)).await.expect("GET");
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

// ---------------------------------------------------------------------------
// The flags, through the binary
// ---------------------------------------------------------------------------

/// Runs `dialguard serve` on loopback port 0 with `args`; it must exit on
/// its own, non-zero. Returns its stderr.
fn serve_fails(args: &[&str]) -> String {
    let (_dir, db) = temp_db();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(["serve", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--db")
        .arg(&db)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dialguard serve");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for dialguard") {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dialguard serve {args:?} still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(!status.success(), "serve {args:?} succeeded: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "serve {args:?} panicked: {stderr}"
    );
    stderr
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

#[test]
fn bad_tls_flags_name_the_flag_and_the_problem() {
    let pki = Pki::new();
    let cert = pki.path("server.pem");
    let key = pki.path("server.key");
    let garbage = pki.write("garbage.pem", "this is not PEM\n");
    let broken = pki.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    let other_key = pki.write("other.key", &pki.client.key);
    let missing = pki.path("missing.pem");
    let empty = pki.write("empty", "\n");

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--tls-cert", arg(&cert)], vec!["--tls-key"]),
        (vec!["--tls-key", arg(&key)], vec!["--tls-cert"]),
        (vec!["--grpc-client-ca", arg(&cert)], vec!["--tls-cert"]),
        (
            vec!["--tls-cert", arg(&missing), "--tls-key", arg(&key)],
            vec!["--tls-cert", "missing.pem", "cannot read"],
        ),
        (
            vec!["--tls-cert", arg(&garbage), "--tls-key", arg(&key)],
            vec!["--tls-cert", "garbage.pem", "no PEM certificate"],
        ),
        (
            vec!["--tls-cert", arg(&broken), "--tls-key", arg(&key)],
            vec!["--tls-cert", "broken.pem", "not valid PEM"],
        ),
        (
            vec!["--tls-cert", arg(&key), "--tls-key", arg(&cert)],
            vec!["--tls-cert", "server.key", "swapped with --tls-key"],
        ),
        (
            vec!["--tls-cert", arg(&cert), "--tls-key", arg(&garbage)],
            vec!["--tls-key", "garbage.pem", "no PEM private key"],
        ),
        (
            vec!["--tls-cert", arg(&cert), "--tls-key", arg(&other_key)],
            vec!["--tls-key", "other.key", "does not belong", "--tls-cert"],
        ),
        (
            vec![
                "--tls-cert",
                arg(&cert),
                "--tls-key",
                arg(&key),
                "--grpc-client-ca",
                arg(&garbage),
            ],
            vec!["--grpc-client-ca", "garbage.pem", "no PEM certificate"],
        ),
        (
            vec!["--http-token-file", arg(&missing)],
            vec!["--http-token-file", "missing.pem", "cannot read"],
        ),
        (
            vec!["--http-token-file", arg(&empty)],
            vec!["--http-token-file", "empty"],
        ),
    ];
    for (args, expected) in cases {
        let stderr = serve_fails(&args);
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "serve {args:?}: {needle:?} missing from: {stderr}"
            );
        }
        assert!(
            !stderr.contains("listening"),
            "serve {args:?} started listening: {stderr}"
        );
    }
}

#[test]
fn serve_with_tls_flags_says_so_and_loopback_needs_no_warning() {
    let pki = Pki::new();
    let token = pki.write("token", &format!("{TOKEN}\n"));
    let lines = serve_lines_until(
        &[
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tls-cert",
            arg(&pki.path("server.pem")),
            "--tls-key",
            arg(&pki.path("server.key")),
            "--grpc-client-ca",
            arg(&pki.path("ca.pem")),
            "--http-token-file",
            arg(&token),
        ],
        "listening",
    );
    let listening = lines.last().expect("the listening line");
    assert!(
        listening.ends_with("tls=on grpc-client-certs=required"),
        "{listening}"
    );
    assert!(
        !lines.iter().any(|line| line.contains("warning")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|line| line.contains(TOKEN)), "{lines:#?}");
}

#[test]
fn serve_warns_when_reachable_from_other_hosts_without_tls() {
    // Binding only; no traffic goes anywhere but loopback.
    let lines = serve_lines_until(
        &["--grpc", "0.0.0.0:0", "--http", "127.0.0.1:0"],
        "warning: --grpc",
    );
    let warning = lines.last().expect("the warning");
    assert!(warning.contains("TLS is off"), "{warning}");
    assert!(
        lines[0].contains("listening") && lines[0].ends_with("tls=off"),
        "the listening line comes first: {lines:#?}"
    );
}

/// `dialguard report --server URL args…`: exit success, stdout, stderr.
async fn report_cli(server: &str, args: &[&str]) -> (bool, String, String) {
    let output = bounded(
        "dialguard report --server",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dialguard"))
            .args(["report", "--server", server, "--format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run dialguard report");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn report_from_an_https_server_with_ca_and_token_file() {
    let pki = Pki::new();
    let (_dir, db) = temp_db();
    let server = start_tls_server(&db, &pki, true).await;
    report_as(server.grpc, &pki, true, Some(&pki.client), "vm-trusted")
        .await
        .expect("seed the report");
    let url = format!("https://localhost:{}", server.http.port());
    let ca = pki.path("ca.pem");
    let token = pki.write("token", &format!("{TOKEN}\n"));
    let wrong_token = pki.write("wrong-token", "nope\n");

    let (ok, stdout, stderr) =
        report_cli(&url, &["--ca", arg(&ca), "--token-file", arg(&token)]).await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(DEST) && stdout.contains(WRONG_POD),
        "{stdout}"
    );

    let (ok, stdout, stderr) =
        report_cli(&url, &["--ca", arg(&ca), "--token-file", arg(&wrong_token)]).await;
    assert!(!ok && stderr.contains("401"), "wrong token: {stderr}");
    assert!(!stdout.contains(DEST), "{stdout}");

    let (ok, _, stderr) = report_cli(&url, &["--ca", arg(&ca)]).await;
    assert!(!ok && stderr.contains("401"), "no token: {stderr}");

    // Without --ca the test CA is not trusted.
    let (ok, stdout, stderr) = report_cli(&url, &["--token-file", arg(&token)]).await;
    assert!(!ok && !stdout.contains(DEST), "{stderr}");

    let (ok, _, stderr) = report_cli(
        &url,
        &[
            "--ca",
            arg(&pki.path("server.key")),
            "--token-file",
            arg(&token),
        ],
    )
    .await;
    assert!(
        !ok && stderr.contains("--ca") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    server.stop().await;
}
