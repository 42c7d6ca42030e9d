//! Issue 12, item 6: the HTTP listener cannot starve ingest or lock out
//! health checks. Against the real in-process server on loopback: hundreds
//! of slow-header clients (one header line a second, never finishing),
//! while `/healthz` and real gRPC streams keep being answered; and the gRPC
//! listener's connection cap.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::{ListenerLimits, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The value of the series `name{labels}` in the exposition text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

async fn metrics(http: SocketAddr) -> String {
    let (status, _, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn refused(text: &str, listener: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!(
            "dialguard_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ),
    )
}

/// A client that sends a request line and then one header line a second,
/// never ending its headers. Returns how long the server kept it open.
async fn slow_client(http: SocketAddr, id: usize, started: mpsc::Sender<()>) -> Duration {
    let opened = Instant::now();
    let connected = TcpStream::connect(http).await;
    let _ = started.send(()).await;
    let Ok(mut stream) = connected else {
        return Duration::ZERO;
    };
    let mut buf = [0u8; 1024];
    if stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: slow-{id}\r\n").as_bytes())
        .await
        .is_err()
    {
        return opened.elapsed();
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for line in 0.. {
        // Bounded: the test fails below if any client lasts this long.
        if opened.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                // Closed (an error answer first, perhaps): it is over.
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            _ = tick.tick() => {
                if stream
                    .write_all(format!("X-Slow-{line}: still coming\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    opened.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_cut_off_while_health_and_ingest_keep_working() {
    // The server's caps shrink to the descriptor limit; this test needs
    // its 100 connections, its 300 clients and their server sides.
    let limit = dialguard_collector::listener::raise_fd_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        limit.soft >= 2048,
        "this test needs 2,048 file descriptors; the hard limit is {}",
        limit.hard
    );
    const CAP: usize = 100;
    const SLOW: usize = 300;
    let header_timeout = Duration::from_secs(2);
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        listeners: ListenerLimits {
            max_http_connections: CAP,
            http_header_timeout: header_timeout,
            ..ListenerLimits::default()
        },
        ..test_config(&db)
    })
    .await;
    let started = Instant::now();
    // A sidecar connected before the flood.
    let mut client = server.client().await;
    let mut before = ReportStream::open(&mut client, NODE, "vm-before").await;
    assert_eq!(before.send_acked(misrouted_batch(1..=3)).await, 3);

    let http = server.http;
    let (started_tx, mut started_rx) = mpsc::channel(SLOW);
    let slow: Vec<_> = (0..SLOW)
        .map(|id| tokio::spawn(slow_client(http, id, started_tx.clone())))
        .collect();
    // The flood is on once every slow client has connected: the listener
    // is full of them, and each newcomer so far took the oldest one's slot.
    // (During the connect burst itself, a probe may meet 100 newer
    // connections before its own headers are in, and be evicted too.)
    bounded("the slow clients to connect", async {
        for _ in 0..SLOW {
            started_rx.recv().await;
        }
    })
    .await;
    let flood = Instant::now();

    // Throughout: health answers, the open gauge stays within the cap, and
    // sidecars (the one connected before, and new ones) are acknowledged.
    let mut probes = 0;
    let mut sequence = 3;
    let mut most_open = 0.0f64;
    let mut slowest_probe = Duration::ZERO;
    while flood.elapsed() < header_timeout + Duration::from_secs(1) {
        let asked = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(2), try_http_get(http, "/healthz"))
            .await
            .unwrap_or_else(|_| panic!("/healthz took over 2 s during the flood"))
            .unwrap_or_else(|err| panic!("/healthz failed during the flood: {err}"));
        assert_eq!(answer.0, 200, "/healthz during the flood: {answer:?}");
        slowest_probe = slowest_probe.max(asked.elapsed());
        probes += 1;

        let text = metrics(http).await;
        most_open = most_open.max(metric(
            &text,
            "dialguard_connections_open{listener=\"http\"}",
        ));

        sequence += 1;
        assert_eq!(
            before
                .send_acked(misrouted_batch(sequence..=sequence))
                .await,
            sequence
        );
        let vm = format!("vm-during-{probes}");
        let mut during = ReportStream::open(&mut server.client().await, NODE, &vm).await;
        assert_eq!(during.send_acked(misrouted_batch(1..=2)).await, 2);
        during.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(probes >= 5, "only {probes} probes");
    eprintln!(
        "{probes} /healthz probes during the flood, the slowest answered in {slowest_probe:?}"
    );
    assert!(
        most_open <= CAP as f64,
        "{most_open} HTTP connections open, cap {CAP}"
    );

    let mut longest = Duration::ZERO;
    for client in slow {
        let held = bounded("a slow client to be cut off", client)
            .await
            .expect("slow client task");
        longest = longest.max(held);
    }
    // Cut off by the header timeout (or sooner, evicted for a newcomer);
    // without it they would have lasted the 15 s of their loop.
    assert!(
        longest < header_timeout + Duration::from_secs(2),
        "a slow client was held {longest:?} (header timeout {header_timeout:?})"
    );

    let text = metrics(http).await;
    let evicted = refused(&text, "http", "evicted");
    let timed_out = refused(&text, "http", "timeout");
    assert!(
        evicted >= (SLOW - CAP) as f64,
        "{evicted} evicted of {SLOW} slow clients with {CAP} slots"
    );
    assert!(timed_out >= 1.0, "no header timeout counted:\n{text}");
    assert!(
        evicted + timed_out >= SLOW as f64,
        "{evicted} evicted + {timed_out} timed out < {SLOW} slow clients"
    );
    // Health was never turned away: a newcomer always found a slot.
    assert_eq!(refused(&text, "http", "full"), 0.0);
    assert_eq!(refused(&text, "grpc", "full"), 0.0);
    // Every slow connection's slot is free again: only the scrape's is held.
    wait_for_open(http, "http", 1.0).await;
    assert_eq!(stored_sequences(&db, "vm-before").len() as u64, sequence);
    drop((before, client));
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_grpc_listener_refuses_and_a_freed_slot_is_taken_again() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        listeners: ListenerLimits {
            max_grpc_connections: 2,
            ..ListenerLimits::default()
        },
        ..test_config(&db)
    })
    .await;
    // Two sidecars hold the two slots (each client is its own connection).
    let mut first_client = server.client().await;
    let mut first = ReportStream::open(&mut first_client, NODE, "vm-1").await;
    assert_eq!(first.send_acked(misrouted_batch(1..=1)).await, 1);
    let mut second_client = server.client().await;
    let mut second = ReportStream::open(&mut second_client, NODE, "vm-2").await;
    assert_eq!(second.send_acked(misrouted_batch(1..=1)).await, 1);

    // A third is closed at once: its connection (or its call) fails.
    let third = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .timeout(WAIT)
        .connect()
        .await;
    let refused_third = match third {
        Err(_) => true,
        Ok(channel) => {
            let mut client = dialguard_proto::v1::collector_client::CollectorClient::new(channel);
            ReportStream::open_with(&mut client, hello_message(NODE, "vm-3"))
                .await
                .is_err()
        }
    };
    assert!(
        refused_third,
        "a third gRPC connection was served with 2 slots"
    );
    let text = metrics(server.http).await;
    assert!(refused(&text, "grpc", "full") >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "dialguard_connections_open{listener=\"grpc\"}"),
        2.0
    );
    assert_eq!(sidecar_rows(&db, "vm-3"), 0);

    // The first sidecar goes away: its slot serves the next one.
    first.close().await;
    drop(first_client);
    let text = wait_for_open(server.http, "grpc", 1.0).await;
    assert_eq!(
        metric(&text, "dialguard_connections_open{listener=\"grpc\"}"),
        1.0
    );
    let mut fourth_client = server.client().await;
    let mut fourth = ReportStream::open(&mut fourth_client, NODE, "vm-4").await;
    assert_eq!(fourth.send_acked(misrouted_batch(1..=1)).await, 1);
    assert_eq!(second.send_acked(misrouted_batch(2..=2)).await, 2);
    drop((second, second_client, fourth, fourth_client));
    server.stop().await;
}

fn sidecar_rows(db: &std::path::Path, vm: &str) -> i64 {
    count(
        db,
        &format!("SELECT count(*) FROM sidecars WHERE vm_instance = '{vm}'"),
    )
}

/// Polls /metrics until `listener` holds `open` connections; the text.
async fn wait_for_open(http: SocketAddr, listener: &str, open: f64) -> String {
    let series = format!("dialguard_connections_open{{listener=\"{listener}\"}}");
    bounded("the slot to be freed", async {
        loop {
            let text = metrics(http).await;
            if metric(&text, &series) == open {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}
