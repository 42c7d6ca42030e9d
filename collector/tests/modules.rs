//! Both builds of the filter through the real binary: `dialguard serve`
//! serves each under its own name and refuses the other build under that
//! name; `dialguard rollout --mode enforce` takes the served enforce build and
//! refuses the audit build's URL, naming the flag.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{WAIT, free_addr, temp_db};
use dialguard_envoyfilter::module::{Build, sha256_hex};

/// A module `cargo xtask dist` built: `$DIALGUARD_DIST` (from the workspace
/// root) or dist/.
fn dist_module(build: Build) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir =
        std::env::var_os("DIALGUARD_DIST").map_or_else(|| root.join("dist"), |d| root.join(d));
    let path = dir.join(build.file_name());
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask dist` first",
        path.display()
    );
    path
}

fn arg(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn dialguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dialguard")
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_serves_both_builds_and_rollout_enforce_uses_the_enforce_one() {
    let (audit, enforce) = (dist_module(Build::Audit), dist_module(Build::Enforce));
    let (_dir, db) = temp_db();
    let http = free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args([
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            &http.to_string(),
        ])
        .args(["--db", arg(&db), "--module", arg(&audit)])
        .args(["--enforce-module", arg(&enforce)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dialguard serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains("dialguard_filter_enforce.wasm");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(WAIT).expect("serve's startup lines");

    // Both digests printed, the audit build's line first and as before.
    let audit_sha = sha256_hex(&std::fs::read(&audit).expect("audit module"));
    let enforce_sha = sha256_hex(&std::fs::read(&enforce).expect("enforce module"));
    assert_ne!(audit_sha, enforce_sha);
    let audit_line = format!(
        "dialguard: serving module sha256={audit_sha} at http://{http}/module/dialguard_filter.wasm"
    );
    let enforce_line = format!(
        "dialguard: serving enforce module sha256={enforce_sha} at http://{http}/module/dialguard_filter_enforce.wasm"
    );
    let at = |wanted: &str| lines.iter().position(|l| l == wanted);
    assert!(
        matches!((at(&audit_line), at(&enforce_line)), (Some(a), Some(e)) if a < e),
        "{lines:#?}"
    );

    // Each build under its own name, with its digest beside it.
    let client = reqwest::Client::new();
    for (name, sha) in [
        ("dialguard_filter.wasm", &audit_sha),
        ("dialguard_filter_enforce.wasm", &enforce_sha),
    ] {
        let url = format!("http://{http}/module/{name}");
        let bytes = client
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("module")
            .bytes()
            .await
            .expect("module bytes");
        assert_eq!(&sha256_hex(&bytes), sha, "{url}");
        let text = client
            .get(format!("{url}.sha256"))
            .send()
            .await
            .expect("sha256")
            .text()
            .await
            .expect("sha256 text");
        assert_eq!(text.trim(), sha.as_str());
    }

    // Rollout with the served enforce URL and the file: the file's digest,
    // which is what serve serves there.
    let enforce_url = format!("http://{http}/module/dialguard_filter_enforce.wasm");
    let common = [
        "rollout",
        "--namespace",
        "manager",
        "--collector",
        "127.0.0.1:50051",
        "--pod-cidr",
        "10.244.0.0/16",
        "--mode",
        "enforce",
        "--output",
        "json",
    ];
    let out = dialguard(
        &[
            &common[..],
            &["--module-url", &enforce_url, "--module", arg(&enforce)],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let config =
        &list["items"][0]["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"];
    assert_eq!(
        config["vm_config"]["code"]["remote"]["sha256"],
        enforce_sha.as_str()
    );
    assert_eq!(
        config["vm_config"]["code"]["remote"]["http_uri"]["uri"],
        enforce_url.as_str()
    );

    // The audit build's URL with enforce: refused, naming the flag.
    let audit_url = format!("http://{http}/module/dialguard_filter.wasm");
    let out = dialguard(
        &[
            &common[..],
            &["--module-url", &audit_url, "--module-sha256", &audit_sha],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--module-url {audit_url:?}: names the audit build"
        )),
        "{stderr}"
    );

    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn serve_refuses_a_build_under_the_other_builds_name() {
    let (audit, enforce) = (dist_module(Build::Audit), dist_module(Build::Enforce));
    let not_wasm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cases: [(&[&str], String); 3] = [
        (
            &["--module", arg(&enforce)],
            format!(
                "--module {}: this is the enforce build; expected the audit build, dialguard_filter.wasm",
                enforce.display()
            ),
        ),
        (
            &["--enforce-module", arg(&audit)],
            format!(
                "--enforce-module {}: this is the audit build; expected the enforce build, dialguard_filter_enforce.wasm",
                audit.display()
            ),
        ),
        (
            &["--enforce-module", arg(&not_wasm)],
            format!(
                "--enforce-module {}: not a WebAssembly module",
                not_wasm.display()
            ),
        ),
    ];
    for (flags, expected) in cases {
        let (_dir, db) = temp_db();
        let out = dialguard(
            &[
                &[
                    "serve",
                    "--grpc",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                    "--db",
                    arg(&db),
                ][..],
                flags,
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} started");
        assert!(stderr.contains(&expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
