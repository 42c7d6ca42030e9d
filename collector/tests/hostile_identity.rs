//! Issue 12, item 3: with `--grpc-client-ca`, a certificate holder speaks
//! only for the namespace its certificate proves. Against the real
//! in-process server over mutual TLS, with certificates made at test time
//! (a CA; Istio-style workload certificates with a SPIFFE URI SAN; one with
//! DNS names only; one whose SPIFFE ID is not a workload's).

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::path::Path;

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::tls::{TlsConfig, TlsFiles};
use dialguard_proto::v1::collector_client::CollectorClient;
use dialguard_proto::v1::{Hello, SidecarMessage, sidecar_message};
use pki::{Ca, Files, Pem};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const APP_ID: &str = "spiffe://cluster.local/ns/app/sa/default";

struct Setup {
    ca: Ca,
    files: Files,
}

impl Setup {
    fn new() -> Self {
        let ca = Ca::new("identity test CA");
        let files = Files::new();
        files.write_pair("server", &ca.server());
        files.write("ca.pem", &ca.pem.cert);
        Self { ca, files }
    }

    fn tls(&self, client_ca: bool) -> TlsConfig {
        TlsConfig::load(&TlsFiles {
            cert: self.files.path("server.pem"),
            key: self.files.path("server.key"),
            grpc_client_ca: client_ca.then(|| self.files.path("ca.pem")),
        })
        .expect("load the test certificates")
    }

    async fn server(&self, db: &Path, client_ca: bool) -> Server {
        Server::start_with(ServeConfig {
            tls: Some(self.tls(client_ca)),
            ..test_config(db)
        })
        .await
    }

    /// A client over TLS, presenting `identity` if given.
    async fn client(
        &self,
        grpc: SocketAddr,
        identity: Option<&Pem>,
    ) -> CollectorClient<tonic::transport::Channel> {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.pem.cert))
            .domain_name("localhost");
        if let Some(pem) = identity {
            config = config.identity(Identity::from_pem(&pem.cert, &pem.key));
        }
        let channel = bounded(
            "connecting over TLS",
            Endpoint::from_shared(format!("https://{grpc}"))
                .expect("endpoint")
                .connect_timeout(WAIT)
                .timeout(WAIT)
                .tls_config(config)
                .expect("client TLS config")
                .connect(),
        )
        .await
        .expect("TLS connection");
        CollectorClient::new(channel)
    }
}

fn hello_in(namespace: &str, vm: &str) -> SidecarMessage {
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(Hello {
            namespace: namespace.into(),
            ..hello(NODE, vm)
        })),
    }
}

/// Opens a stream with a hello in `namespace` and sends a batch of 1..=3:
/// the ack's sequence, or the status that ended the stream.
async fn report(
    client: &mut CollectorClient<tonic::transport::Channel>,
    namespace: &str,
    vm: &str,
) -> Result<u64, tonic::Status> {
    let mut stream = ReportStream::open_with(client, hello_in(namespace, vm)).await?;
    // Refused streams may already be closed for sending.
    let _ = stream.tx.send(misrouted_batch(1..=3)).await;
    stream.next_ack().await
}

fn sidecar_rows(db: &Path, vm: &str) -> i64 {
    count(
        db,
        &format!("SELECT count(*) FROM sidecars WHERE vm_instance = '{vm}'"),
    )
}

/// `dialguard_streams_refused_total{reason}` from `/metrics` (HTTPS: the
/// listeners share the TLS configuration).
async fn streams_refused(setup: &Setup, http: SocketAddr, reason: &str) -> f64 {
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(setup.ca.pem.cert.as_bytes()).expect("CA for reqwest"),
        )
        .timeout(WAIT)
        .build()
        .expect("HTTPS client");
    let url = format!("https://localhost:{}/metrics", http.port());
    let response = bounded("GET /metrics", client.get(&url).send())
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200);
    let body = bounded("the metrics", response.text()).await.expect("body");
    let series = format!("dialguard_streams_refused_total{{reason=\"{reason}\"}}");
    body.lines()
        .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_must_name_the_namespace_its_certificate_proves() {
    let setup = Setup::new();
    let (_dir, db) = temp_db();
    let server = setup.server(&db, true).await;
    let app = setup.ca.workload(APP_ID);
    let mut client = setup.client(server.grpc, Some(&app)).await;

    // Another namespace's sidecar, claimed with app's certificate.
    let status = report(&mut client, "other", "vm-claimed")
        .await
        .expect_err("a hello for another namespace was served");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    for needle in ["\"other\"", "\"app\"", APP_ID, "hello.namespace"] {
        assert!(
            status.message().contains(needle),
            "{needle} missing from: {}",
            status.message()
        );
    }
    assert_eq!(sidecar_rows(&db, "vm-claimed"), 0);
    assert!(stored_sequences(&db, "vm-claimed").is_empty());
    assert_eq!(
        streams_refused(&setup, server.http, "identity_mismatch").await,
        1.0
    );

    // Its own namespace: served and stored, on the same connection.
    assert_eq!(
        report(&mut client, "app", "vm-own").await.expect("served"),
        3
    );
    assert_eq!(stored_sequences(&db, "vm-own"), vec![1, 2, 3]);
    assert_eq!(stored_events(&db), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_service_accounts_certificate_cannot_blind_a_vm() {
    let setup = Setup::new();
    let (_dir, db) = temp_db();
    let server = setup.server(&db, true).await;
    let owner = setup.ca.workload(APP_ID);
    let intruder = setup
        .ca
        .workload("spiffe://cluster.local/ns/app/sa/intruder");
    let mut owner_client = setup.client(server.grpc, Some(&owner)).await;
    let mut intruder_client = setup.client(server.grpc, Some(&intruder)).await;

    // Same namespace, another service account, the owner's node id and VM
    // instance: its events go to a VM of its own identity...
    assert_eq!(
        report(&mut intruder_client, "app", "vm-1")
            .await
            .expect("served"),
        3
    );
    // ...so the owner's 1..=3, sent after, are new events, not duplicates
    // of the intruder's.
    assert_eq!(
        report(&mut owner_client, "app", "vm-1")
            .await
            .expect("served"),
        3
    );
    let identities: Vec<String> = read_only(&db)
        .prepare("SELECT peer_identity FROM sidecars WHERE vm_instance = 'vm-1' ORDER BY 1")
        .expect("prepare")
        .query_map([], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        identities,
        [APP_ID, "spiffe://cluster.local/ns/app/sa/intruder"]
    );
    assert_eq!(stored_events(&db), 6);
    assert_eq!(misrouted_aggregate(&db), 6);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_a_workload_spiffe_id_is_refused_clearly() {
    let setup = Setup::new();
    let (_dir, db) = temp_db();
    let server = setup.server(&db, true).await;
    let cases = [
        (
            setup.ca.dns_client("sidecar.app"),
            "vm-dns",
            "carries no spiffe:// URI SAN",
        ),
        (
            setup.ca.workload("spiffe://cluster.local/app/default"),
            "vm-odd-spiffe",
            "\"spiffe://cluster.local/app/default\": the path is not /ns/<namespace>/sa/<service-account>",
        ),
    ];
    for (pem, vm, expected) in &cases {
        let mut client = setup.client(server.grpc, Some(pem)).await;
        let status = report(&mut client, "app", vm)
            .await
            .expect_err("a certificate without a workload identity was served");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{expected} missing from: {}",
            status.message()
        );
        assert_eq!(sidecar_rows(&db, vm), 0);
    }
    assert_eq!(stored_events(&db), 0);
    assert_eq!(
        streams_refused(&setup, server.http, "no_identity").await,
        2.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_ca_the_namespace_is_not_checked() {
    let setup = Setup::new();
    let (_dir, db) = temp_db();
    let server = setup.server(&db, false).await;
    // Server TLS only: no client certificate, any namespace, as before.
    let mut client = setup.client(server.grpc, None).await;
    assert_eq!(
        report(&mut client, "other", "vm-any")
            .await
            .expect("served"),
        3
    );
    assert_eq!(stored_sequences(&db, "vm-any"), vec![1, 2, 3]);
    assert_eq!(
        streams_refused(&setup, server.http, "identity_mismatch").await,
        0.0
    );
    server.stop().await;
}
