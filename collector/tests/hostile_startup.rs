//! Issue 12, hostile inputs at startup, through the `dialguard serve`
//! binary: it says it listens only once its database is open and migrated
//! (and fails naming `--db` otherwise), warns about a server certificate
//! that clients would refuse, and refuses an RSA key under 2048 bits naming
//! `--tls-key`, the size and the minimum.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dialguard_collector::tls::{TlsConfig, TlsFiles};
use pki::{Ca, Files};
use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa};

/// Runs `dialguard serve` on loopback port 0 with `args`; it must exit on
/// its own, non-zero, without panicking and without saying it listens.
/// Returns its stderr.
fn serve_fails(db: &Path, args: &[&str]) -> String {
    exits_failing(Command::new(env!("CARGO_BIN_EXE_dialguard")), db, args)
}

/// As [`serve_fails`], with `command` running the binary (killed by its
/// PID if still running after [`WAIT`]).
fn exits_failing(mut command: Command, db: &Path, args: &[&str]) -> String {
    let mut child = command
        .args(["serve", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--db")
        .arg(db)
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
            panic!("{command:?} still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(!status.success(), "{command:?} succeeded: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "{command:?} panicked: {stderr}"
    );
    assert!(
        !stderr.contains("listening"),
        "{command:?} said it listens: {stderr}"
    );
    stderr
}

#[test]
fn the_listening_line_comes_after_the_database_is_migrated() {
    let (_dir, db) = temp_db();
    let (process, stderr) = ServeProcess::start(&db);
    // The line has been read: the database must exist, migrated.
    let conn = read_only(&db);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("user_version");
    assert!(
        version >= 6,
        "schema version {version} at the listening line"
    );
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('sidecars', 'events', 'aggregates')",
            [],
            |row| row.get(0),
        )
        .expect("tables");
    assert_eq!(tables, 3);
    drop((process, stderr));
}

#[test]
fn a_database_serve_cannot_use_fails_before_listening_naming_db() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing_dir = dir.path().join("no-such-dir").join("dialguard.db");
    let not_a_database = dir.path().join("garbage.db");
    std::fs::write(&not_a_database, vec![b'x'; 8192]).expect("write garbage");
    let newer = dir.path().join("newer.db");
    rusqlite::Connection::open(&newer)
        .and_then(|conn| conn.pragma_update(None, "user_version", 999))
        .expect("a database from a newer collector");
    for (db, expected) in [
        (&missing_dir, "unable to open database file"),
        (&not_a_database, "not a database"),
        (&newer, "newer than this collector knows"),
    ] {
        let stderr = serve_fails(db, &[]);
        let shown = db.display().to_string();
        for needle in ["--db", shown.as_str(), expected] {
            assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
        }
    }
}

/// A WAL database needs its `-shm` (and `-wal`) beside it: in a directory
/// the collector may not write, opening fails, before listening and with
/// the reason, rather than later or silently. Root writes anywhere, so as
/// root the binary runs as `nobody` (util-linux's `setpriv`).
#[test]
fn a_database_whose_shm_cannot_be_created_fails_before_listening() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let db = data.join("dialguard.db");
    drop(dialguard_collector::store::open_for_writing(&db).expect("create the database"));
    // The last connection closed: SQLite removed the -wal and -shm files.
    assert!(!data.join("dialguard.db-shm").exists());

    let root = std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0;
    // As root, setpriv (util-linux) runs it as nobody.
    let command = if root {
        let nobody = 65534;
        for path in [&data, &db] {
            std::os::unix::fs::chown(path, Some(nobody), Some(nobody)).expect("chown to nobody");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("let nobody in");
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_dialguard"));
        command
    } else {
        Command::new(env!("CARGO_BIN_EXE_dialguard"))
    };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555))
        .expect("make the directory read-only");
    let stderr = exits_failing(command, &db, &[]);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))
        .expect("make the directory writable again");
    for needle in ["--db", arg(&db), "readonly database"] {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// The server certificate
// ---------------------------------------------------------------------------

fn load(cert: &Path, key: &Path) -> Result<TlsConfig, dialguard_collector::tls::TlsError> {
    TlsConfig::load(&TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        grpc_client_ca: None,
    })
}

#[test]
fn doubtful_server_certificates_load_with_a_warning_naming_flag_and_file() {
    let ca = Ca::new("startup test CA");
    let files = Files::new();
    let server = |name: &str, edit: &dyn Fn(&mut rcgen::CertificateParams)| {
        let mut params = pki::leaf_params(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        edit(&mut params);
        files.write_pair(name, &ca.issue(params))
    };
    let good = server("good", &|_| {});
    let expired = server("expired", &|p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let future = server("future", &|p| {
        p.not_before = rcgen::date_time_ymd(2999, 1, 1);
        p.not_after = rcgen::date_time_ymd(3000, 1, 1);
    });
    let ca_as_server = server("ca-as-server", &|p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    });
    let sha1 = pki::openssl_self_signed(&files.dir, "sha1", 2048, "-sha1");

    let loaded = load(&good.0, &good.1).expect("a good certificate loads");
    assert_eq!(loaded.warnings(), [] as [String; 0]);
    for ((cert, key), expected) in [
        (&expired, "expired on 2021-01-01T00:00:00Z"),
        (&future, "not valid before 2999-01-01T00:00:00Z"),
        (&ca_as_server, "CA certificate (basicConstraints CA:true)"),
        (&sha1, "signed with SHA-1"),
    ] {
        let loaded = load(cert, key).expect("a doubtful certificate still loads");
        let warnings = loaded.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let shown = format!("--tls-cert {}", cert.display());
        assert!(
            warnings[0].starts_with(&shown) && warnings[0].contains(expected),
            "expected {shown}: …{expected}…, got {warnings:?}"
        );
    }

    // Through the binary: a warning line after the listening line.
    let lines = serve_lines_until(
        &[
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tls-cert",
            arg(&expired.0),
            "--tls-key",
            arg(&expired.1),
        ],
        "expired on",
    );
    assert!(lines[0].contains("listening"), "{lines:#?}");
    let warning = lines.last().expect("the warning");
    assert!(
        warning.starts_with("dialguard: warning: --tls-cert") && warning.contains(arg(&expired.0)),
        "{warning}"
    );
}

#[test]
fn an_rsa_key_under_2048_bits_is_refused_naming_tls_key_size_and_minimum() {
    let files = Files::new();
    let (cert, key) = pki::openssl_self_signed(&files.dir, "rsa1024", 1024, "-sha256");
    let err = load(&cert, &key).expect_err("a 1024-bit RSA key is refused");
    let message = err.to_string();
    for needle in ["--tls-key", arg(&key), "1024 bits", "at least 2048"] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
    let (_dir, db) = temp_db();
    let stderr = serve_fails(&db, &["--tls-cert", arg(&cert), "--tls-key", arg(&key)]);
    assert!(
        stderr.contains("--tls-key") && stderr.contains("1024 bits") && stderr.contains("2048"),
        "{stderr}"
    );
    // 2048 bits is enough.
    let (cert, key) = pki::openssl_self_signed(&files.dir, "rsa2048", 2048, "-sha256");
    let loaded = load(&cert, &key).expect("a 2048-bit RSA key loads");
    assert!(loaded.warnings().is_empty(), "{:?}", loaded.warnings());
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}
