//! Issue 12, item 8: `/readyz` tells the truth about the store, `/healthz`
//! stays a liveness check. Real faults against the real in-process server:
//! SQLite's disk-full error (`SQLITE_FULL`, the database capped at its size
//! with `max_page_count` while sidecars keep sending), and a write lock held
//! by another connection while the collector is idle.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::ServeConfig;
use dialguard_collector::store::{PageLimit, WriterConfig};
use dialguard_proto::v1::collector_client::CollectorClient;
use tonic::transport::Channel;

/// Status and body of `GET path`.
async fn get(http: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_get(http, path).await;
    (status, body)
}

/// The database's size in pages, as a reader sees it.
fn page_count(db: &Path) -> u64 {
    read_only(db)
        .pragma_query_value(None, "page_count", |row| row.get::<_, i64>(0))
        .expect("page_count") as u64
}

/// A sidecar VM that resends what was not acknowledged, as the filter does:
/// a batch refused with an error is sent again on a new stream.
struct Sidecar {
    client: CollectorClient<Channel>,
    stream: Option<ReportStream>,
    acked: u64,
}

const PER_BATCH: u64 = 200;

impl Sidecar {
    /// Sends the next batch (or the unacknowledged one again); true when
    /// it was acknowledged.
    async fn send_next(&mut self) -> bool {
        if self.stream.is_none() {
            match ReportStream::open_with(&mut self.client, hello_message(NODE, "vm-1")).await {
                Ok(stream) => self.stream = Some(stream),
                Err(_) => return false,
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let first = self.acked + 1;
        let _ = stream
            .tx
            .send(misrouted_batch(first..=first + PER_BATCH - 1))
            .await;
        match stream.next_ack().await {
            Ok(through) => {
                assert_eq!(through, first + PER_BATCH - 1);
                self.acked = through;
                true
            }
            Err(_) => {
                // The collector ended the stream (the commit failed).
                self.stream = None;
                false
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_commits_fail_and_recovers_without_losing_acked_events() {
    let (_dir, db) = temp_db();
    let max_pages = PageLimit::default();
    let server = Server::start_with(ServeConfig {
        writer: WriterConfig {
            max_pages: max_pages.clone(),
            ..WriterConfig::default()
        },
        ..test_config(&db)
    })
    .await;
    let mut sidecar = Sidecar {
        client: server.client().await,
        stream: None,
        acked: 0,
    };
    for _ in 0..3 {
        assert!(sidecar.send_next().await, "stored before the fault");
    }
    assert_eq!(get(server.http, "/readyz").await.0, 200);

    // The disk is full: the database may not grow beyond its size now.
    max_pages.set(page_count(&db));
    let mut first_failure = None;
    let became_unready = bounded("/readyz to answer 503", async {
        loop {
            if !sidecar.send_next().await && first_failure.is_none() {
                first_failure = Some(Instant::now());
            }
            let (status, body) = get(server.http, "/readyz").await;
            if status == 503 {
                return (Instant::now(), body);
            }
        }
    })
    .await;
    let first_failure = first_failure.expect("a commit failed");
    let (unready_at, body) = became_unready;
    assert!(
        unready_at.duration_since(first_failure) < Duration::from_secs(5),
        "/readyz took {:?} to notice",
        unready_at.duration_since(first_failure)
    );
    eprintln!(
        "/readyz answered 503 {:?} after the first failed commit",
        unready_at.duration_since(first_failure)
    );
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["ready"], false, "{body}");
    let reason = answer["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("database or disk is full"), "{body}");
    assert!(
        answer["since"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{body}"
    );
    let acked_when_full = sidecar.acked;

    // While the sidecar keeps retrying, readiness stays down, liveness up.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            !sidecar.send_next().await,
            "a commit succeeded on a full store"
        );
        assert_eq!(get(server.http, "/readyz").await.0, 503);
        assert_eq!(get(server.http, "/healthz").await, (200, "ok\n".into()));
    }
    assert_eq!(sidecar.acked, acked_when_full);

    // Room again: the resent batch is stored and readiness returns.
    max_pages.set(0);
    let recovered = Instant::now();
    bounded("the resent batch to be stored", async {
        while !sidecar.send_next().await {}
    })
    .await;
    let (status, body) = get(server.http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(recovered.elapsed() < Duration::from_secs(5));
    for _ in 0..2 {
        assert!(sidecar.send_next().await);
    }

    // Every acknowledged event is stored, once.
    let expected: Vec<i64> = (1..=sidecar.acked as i64).collect();
    assert_eq!(stored_sequences(&db, "vm-1"), expected);
    assert_eq!(misrouted_aggregate(&db), sidecar.acked as i64);
    drop(sidecar);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_that_cannot_write_is_not_ready() {
    let (_dir, db) = temp_db();
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut stream = ReportStream::open(&mut client, NODE, "vm-1").await;
    assert_eq!(stream.send_acked(misrouted_batch(1..=3)).await, 3);
    stream.close().await;
    assert_eq!(get(server.http, "/readyz").await.0, 200);

    // Another process takes the database's write lock and keeps it; nobody
    // sends anything, so only the writer's idle probe can notice.
    let mut other = rusqlite::Connection::open(&db).expect("a second writer");
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("take the write lock");
    let locked = Instant::now();
    let body = bounded("/readyz to answer 503", async {
        loop {
            let (status, body) = get(server.http, "/readyz").await;
            if status == 503 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        locked.elapsed() < Duration::from_secs(5),
        "/readyz took {:?} to notice",
        locked.elapsed()
    );
    eprintln!(
        "/readyz answered 503 {:?} after the lock: {body}",
        locked.elapsed()
    );
    assert!(
        body.contains("has not finished") || body.contains("database is locked"),
        "{body}"
    );
    assert_eq!(get(server.http, "/healthz").await.0, 200);

    // The lock is gone: the next probe succeeds.
    lock.rollback().expect("release the lock");
    let released = Instant::now();
    bounded("/readyz to answer 200 again", async {
        while get(server.http, "/readyz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(8),
        "{:?}",
        released.elapsed()
    );
    eprintln!(
        "/readyz answered 200 {:?} after the lock was released",
        released.elapsed()
    );
    drop(other);
    server.stop().await;
}

#[tokio::test]
async fn readyz_needs_no_token() {
    let (_dir, db) = temp_db();
    let server = Server::start_with(ServeConfig {
        http_token: Some(dialguard_collector::auth::HttpToken::new("s3cret").expect("token")),
        ..test_config(&db)
    })
    .await;
    assert_eq!(
        get(server.http, "/readyz").await,
        (200, "{\"ready\":true}".into())
    );
    assert_eq!(get(server.http, "/api/v1/report").await.0, 401);
    server.stop().await;
}
