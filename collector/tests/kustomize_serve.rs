//! The collector exactly as the kustomize base deploys it: the container
//! arguments of the `Deployment` that `rollout --with-collector` prints
//! (the base's, tests in envoyfilter/tests/kustomize.rs) start the real
//! `dialguard serve`, with the image's paths mapped to this machine (the
//! module directory to dist/, the volumes to a temporary directory) and the
//! listeners to loopback; its probes answer and it expects the rolled-out
//! namespaces from the mounted ConfigMap's file.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_get, repo_file};
use dialguard_envoyfilter::image::IMAGE_MODULE_DIR;
use serde_json::Value;

/// dist/ as `cargo xtask dist` left it (`$DIALGUARD_DIST` from the root).
fn dist_dir() -> PathBuf {
    let root = repo_file("");
    std::env::var_os("DIALGUARD_DIST").map_or_else(|| root.join("dist"), |d| root.join(d))
}

#[tokio::test]
async fn the_deployments_arguments_run_the_collector() {
    let output = Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(["rollout", "-n", "a", "-n", "b", "--wasm-plugin"])
        .args(["--with-collector", "-o", "json"])
        .output()
        .expect("run dialguard rollout");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let items = list["items"].as_array().expect("items").clone();
    let of_kind = |kind: &str| items.iter().find(|o| o["kind"] == kind).expect(kind);
    let container = &of_kind("Deployment")["spec"]["template"]["spec"]["containers"][0];
    let expected = of_kind("ConfigMap")["data"]["namespaces"]
        .as_str()
        .expect("the expected namespaces");

    let temp = tempfile::tempdir().expect("tempdir");
    let dist = dist_dir();
    let mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| {
            let path = m["mountPath"].as_str()?.to_owned();
            let local = temp.path().join(m["name"].as_str()?);
            Some((path, local))
        })
        .collect();
    for (path, local) in &mounts {
        std::fs::create_dir_all(local).expect("mount directory");
        if path.ends_with("expected-namespaces") {
            std::fs::write(local.join("namespaces"), expected).expect("the ConfigMap's key");
        }
    }
    // The image's paths, where they are on this machine.
    let local = |arg: &str| -> String {
        if let Some(file) = arg.strip_prefix(&format!("{IMAGE_MODULE_DIR}/")) {
            let path = dist.join(file);
            assert!(
                path.exists(),
                "{} is missing: run `cargo xtask dist`",
                path.display()
            );
            return path.display().to_string();
        }
        for (path, dir) in &mounts {
            if let Some(rest) = arg.strip_prefix(path.as_str()) {
                return format!("{}{rest}", dir.display());
            }
        }
        arg.to_owned()
    };
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .map(local)
        .collect();
    for (flag, loopback) in [("--grpc", "127.0.0.1:0"), ("--http", "127.0.0.1:0")] {
        let at = args.iter().position(|a| a == flag).expect(flag);
        args[at + 1] = loopback.into();
    }
    assert_eq!(args[0], "serve", "the image's entrypoint is dialguard");

    let mut child = Command::new(env!("CARGO_BIN_EXE_dialguard"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dialguard serve");
    let stderr = child.stderr.take().expect("stderr");
    // Killed by its PID however the test ends.
    let _child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains("serving enforce module");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(Duration::from_secs(20));
    let lines = lines.unwrap_or_else(|_| {
        panic!("dialguard serve {args:?} printed no serving lines within 20 s")
    });
    let http: Option<SocketAddr> = lines
        .iter()
        .find_map(|l| l.split("http=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok());
    let http = http.unwrap_or_else(|| panic!("no http address in {lines:#?}"));
    assert!(
        lines.iter().any(|l| l.contains("serving module sha256=")),
        "{lines:#?}"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let path = container[probe]["httpGet"]["path"]
            .as_str()
            .expect("probe path");
        let (status, _, body) = http_get(http, path).await;
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    // The rolled-out namespaces are expected, and nothing reports there yet.
    let (status, _, body) = http_get(http, "/api/v1/coverage").await;
    assert_eq!(status, 200, "{body}");
    let coverage: Value = serde_json::from_str(&body).expect("coverage JSON");
    assert_eq!(
        coverage["uncovered"],
        serde_json::json!(["a", "b"]),
        "{body}"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
