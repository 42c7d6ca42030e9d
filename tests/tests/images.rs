//! What ships: the OCI archives `cargo xtask images` leaves in
//! `dist/images/`, read by Debian's real `skopeo` and `umoci` (inspect,
//! copy to an OCI layout and a `dir:`, unpack), the collector run from its
//! unpacked root filesystem alone (chroot, as UID 65532), the Wasm images'
//! module bytes, a rebuild to the same digests, and the stripped
//! `dist/dialguard` with its `version`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use dialguard_envoyfilter::image::{
    COLLECTOR_IMAGE, FILTER_ENFORCE_IMAGE, FILTER_IMAGE, IMAGE_MODULE_DIR, IMAGE_TAG, reference,
};
use dialguard_envoyfilter::module::{AUDIT_MODULE_FILE, ENFORCE_MODULE_FILE, sha256_hex};
use dialguard_images::{BINARY_PATH, Inputs, Provenance, archive_path};
use dialguard_tests::dist::Dist;
use dialguard_tests::process::{ChildGuard, piped, tee_lines};
use serde_json::Value;

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The size `dist/dialguard` must stay under.
const MAX_BINARY_BYTES: u64 = 20_000_000;

/// Whether `name` is an executable on PATH (or in /usr/sbin, /sbin, where
/// Debian puts `chroot`), failing with how to get it otherwise.
fn require(name: &str, package: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    ensure!(
        found,
        "`{name}` is missing: `cargo xtask test` installs it (apt-get install {package})"
    );
    Ok(())
}

/// Runs `command`, failing with its stderr; returns its stdout.
fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn images_dir(dist: &Dist) -> anyhow::Result<PathBuf> {
    let dir = dist
        .dialguard
        .parent()
        .context("dist/dialguard has no parent")?
        .join("images");
    for name in [COLLECTOR_IMAGE, FILTER_IMAGE, FILTER_ENFORCE_IMAGE] {
        let archive = archive_path(&dir, name);
        ensure!(
            archive.exists(),
            "{} is missing: run `cargo xtask images` first",
            archive.display()
        );
    }
    Ok(dir)
}

/// `oci-archive:PATH:TAG`, as skopeo names an archive's image.
fn archive_ref(archive: &Path) -> String {
    format!("oci-archive:{}:{IMAGE_TAG}", archive.display())
}

fn skopeo_json(args: &[&str], image: &str) -> anyhow::Result<Value> {
    let text = output(Command::new("skopeo").arg("inspect").args(args).arg(image))?;
    serde_json::from_str(&text).with_context(|| format!("skopeo inspect {args:?} {image}: {text}"))
}

/// The manifest digest (`sha256:…`) `skopeo inspect` reports, checked
/// against the raw manifest's own SHA-256, and the raw manifest.
fn inspect_manifest(image: &str) -> anyhow::Result<(String, Value)> {
    let inspect = skopeo_json(&[], image)?;
    let digest = inspect["Digest"]
        .as_str()
        .context("skopeo inspect: no Digest")?
        .to_owned();
    let raw = output(Command::new("skopeo").args(["inspect", "--raw", image]))?;
    ensure!(
        digest == format!("sha256:{}", sha256_hex(raw.as_bytes())),
        "skopeo's Digest {digest} is not the SHA-256 of the raw manifest"
    );
    Ok((digest, serde_json::from_str(&raw)?))
}

/// `skopeo copy` into an OCI layout (`DIR/oci:TAG`) and a `dir:` (`DIR/dir`);
/// the manifest must keep its digest through both (a registry push is the same copy).
fn copy_out(archive: &Path, dir: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let layout = dir.join("oci");
    let plain = dir.join("dir");
    output(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &archive_ref(archive),
        &format!("oci:{}:{IMAGE_TAG}", layout.display()),
    ]))?;
    output(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &archive_ref(archive),
        &format!("dir:{}", plain.display()),
    ]))?;
    let copied = std::fs::read(plain.join("manifest.json"))?;
    ensure!(
        format!("sha256:{}", sha256_hex(&copied)) == digest,
        "skopeo copy to dir: changed the manifest of {}",
        archive.display()
    );
    let (copied_digest, _) = inspect_manifest(&format!("oci:{}:{IMAGE_TAG}", layout.display()))?;
    ensure!(
        copied_digest == digest,
        "skopeo copy to oci: gave {copied_digest}, not {digest}"
    );
    Ok(layout)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `umoci unpack` (`raw unpack`: only the root filesystem) of `layout:TAG`
/// into `dir/rootfs`; `--rootless` when not root.
fn unpack(layout: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let mut command = Command::new("umoci");
    command.args(["raw", "unpack"]);
    if !is_root() {
        command.arg("--rootless");
    }
    command
        .arg("--image")
        .arg(format!("{}:{IMAGE_TAG}", layout.display()))
        .arg(&rootfs);
    output(&mut command)?;
    Ok(rootfs)
}

/// Every regular file under `root`, relative to it.
fn files(root: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                let path = entry.path();
                found.insert(path.strip_prefix(root)?.to_string_lossy().into_owned());
            }
        }
    }
    Ok(found)
}

/// `dialguard ARGS` from `rootfs` with nothing of this machine: chrooted as
/// root (as `as_user`, `UID:GID`, when given); otherwise through the image's
/// own loader and libraries (`ld-linux --library-path`).
fn in_rootfs(rootfs: &Path, as_user: Option<&str>, args: &[&str]) -> (Command, &'static str) {
    if is_root() {
        let mut command = Command::new("chroot");
        if let Some(user) = as_user {
            command.arg(format!("--userspec={user}"));
        }
        command.arg(rootfs).arg(BINARY_PATH).args(args);
        (command, "chroot")
    } else {
        let mut command = Command::new(rootfs.join("lib64/ld-linux-x86-64.so.2"));
        command
            .arg("--library-path")
            .arg(rootfs.join("lib/x86_64-linux-gnu"))
            .arg(rootfs.join(BINARY_PATH.trim_start_matches('/')))
            .args(args);
        (
            command,
            "the image's ld-linux --library-path (not root: no chroot)",
        )
    }
}

fn http_get(url: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut response = ureq::get(url)
        .config()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.body_mut().read_to_vec()?))
}

#[test]
fn collector_image_is_a_non_root_image_of_the_collector() -> anyhow::Result<()> {
    require("skopeo", "skopeo")?;
    let dist = Dist::locate()?;
    let archive = archive_path(&images_dir(&dist)?, COLLECTOR_IMAGE);
    let image = archive_ref(&archive);
    let inspect = skopeo_json(&[], &image)?;
    let config = skopeo_json(&["--config"], &image)?;
    let (digest, manifest) = inspect_manifest(&image)?;
    eprintln!(
        "{}: {} bytes, manifest {digest}",
        archive.display(),
        std::fs::metadata(&archive)?.len()
    );

    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], OCI_LAYER_GZIP);
    let run = &config["config"];
    assert_eq!(run["User"], "65532:65532");
    assert_eq!(run["Entrypoint"], serde_json::json!([BINARY_PATH]));
    assert_eq!(run["Cmd"][0], "serve", "{run}");
    let ports: BTreeSet<&str> = run["ExposedPorts"]
        .as_object()
        .context("ExposedPorts")?
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(ports, BTreeSet::from(["50051/tcp", "8080/tcp"]));

    // The labels say what was built, from where: the binary's own account.
    let version: Value = serde_json::from_str(&output(
        Command::new(&dist.dialguard).args(["version", "-o", "json"]),
    )?)?;
    let labels = &inspect["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], IMAGE_TAG);
    assert_eq!(
        labels["org.opencontainers.image.revision"], version["revision"],
        "the image and dist/dialguard come from different builds"
    );
    assert_eq!(labels["org.opencontainers.image.title"], COLLECTOR_IMAGE);
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    for key in ["source", "description", "created"] {
        let value = labels[format!("org.opencontainers.image.{key}")].as_str();
        assert!(
            value.is_some_and(|v| !v.is_empty()),
            "no {key} label: {labels}"
        );
    }
    // The same annotations on the manifest, for registries that read those.
    assert_eq!(manifest["annotations"], *labels);
    Ok(())
}

#[test]
fn collector_runs_from_its_unpacked_image_alone() -> anyhow::Result<()> {
    require("skopeo", "skopeo")?;
    require("umoci", "umoci")?;
    let dist = Dist::locate()?;
    let archive = archive_path(&images_dir(&dist)?, COLLECTOR_IMAGE);
    let (digest, _) = inspect_manifest(&archive_ref(&archive))?;
    let work = tempfile::tempdir()?;
    let layout = copy_out(&archive, work.path(), &digest)?;
    let rootfs = unpack(&layout, work.path())?;

    // Nothing but the binary, the modules, the user database and the
    // libraries the binary loads.
    let found = files(&rootfs)?;
    let module_dir = IMAGE_MODULE_DIR.trim_start_matches('/');
    for expected in [
        BINARY_PATH.trim_start_matches('/').to_owned(),
        format!("{module_dir}/{AUDIT_MODULE_FILE}"),
        format!("{module_dir}/{ENFORCE_MODULE_FILE}"),
        "etc/passwd".into(),
        "etc/group".into(),
        "lib64/ld-linux-x86-64.so.2".into(),
        "lib/x86_64-linux-gnu/libc.so.6".into(),
    ] {
        assert!(found.contains(&expected), "{expected} missing: {found:?}");
    }
    let unexpected: Vec<&String> = found
        .iter()
        .filter(|f| {
            !(f.starts_with("lib/")
                || f.starts_with("lib64/")
                || f.starts_with("etc/")
                || f.starts_with(module_dir)
                || *f == BINARY_PATH.trim_start_matches('/'))
        })
        .collect();
    assert!(unexpected.is_empty(), "unexpected files: {unexpected:?}");
    let audit = std::fs::read(rootfs.join(module_dir).join(AUDIT_MODULE_FILE))?;
    let enforce = std::fs::read(rootfs.join(module_dir).join(ENFORCE_MODULE_FILE))?;
    assert!(
        audit == std::fs::read(&dist.module)?,
        "the image's audit module is not dist's"
    );
    assert!(
        enforce == std::fs::read(&dist.module_enforce)?,
        "the image's enforce module is not dist's"
    );

    let (mut command, how) = in_rootfs(&rootfs, None, &["--version"]);
    eprintln!("running the image's collector through {how}");
    let text = output(&mut command)?;
    eprint!("{text}");
    assert!(
        text.starts_with(&format!("dialguard {IMAGE_TAG}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("audit module sha256: {}\n", sha256_hex(&audit))),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "enforce module sha256: {}\n",
            sha256_hex(&enforce)
        )),
        "{text}"
    );

    // `serve` as the image's user, its database on the image's /tmp (a
    // writable directory of this test when not root).
    let db_dir = if is_root() {
        PathBuf::from("/tmp")
    } else {
        work.path().to_owned()
    };
    let db = db_dir.join("dialguard.db").to_string_lossy().into_owned();
    let module = |file: &str| {
        if is_root() {
            format!("{IMAGE_MODULE_DIR}/{file}")
        } else {
            rootfs
                .join(module_dir)
                .join(file)
                .to_string_lossy()
                .into_owned()
        }
    };
    let (audit_path, enforce_path) = (module(AUDIT_MODULE_FILE), module(ENFORCE_MODULE_FILE));
    let (mut command, how) = in_rootfs(
        &rootfs,
        Some("65532:65532"),
        &[
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--db",
            &db,
            "--module",
            &audit_path,
            "--enforce-module",
            &enforce_path,
        ],
    );
    eprintln!("serving from the image through {how}");
    let mut serve = ChildGuard::spawn("image collector", piped(&mut command))?;
    let stderr = serve.child_mut().stderr.take().context("stderr")?;
    let _stdout = serve.child_mut().stdout.take();
    let log = tee_lines("image collector", stderr, true);
    let mut http = None;
    while let Ok(line) = log.recv_timeout(Duration::from_secs(20)) {
        if let Some(rest) = line.split("http=").nth(1) {
            http = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
            break;
        }
    }
    serve.check_running()?;
    let http = http.context("the image's collector did not print its address within 20 s")?;
    if is_root() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", serve.id()))?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .context("no Uid in /proc/PID/status")?;
        assert_eq!(
            uid.split_whitespace().next(),
            Some("65532"),
            "serve runs as {uid}"
        );
    }
    let (status, _) = http_get(&format!("http://{http}/healthz"))?;
    assert_eq!(status, 200);
    let (status, served) = http_get(&format!("http://{http}/module/{AUDIT_MODULE_FILE}"))?;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&served), sha256_hex(&audit));
    let (status, served) = http_get(&format!("http://{http}/module/{ENFORCE_MODULE_FILE}"))?;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&served), sha256_hex(&enforce));
    assert!(
        serve.terminate(Duration::from_secs(10)),
        "serve did not stop on SIGTERM"
    );
    if is_root() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(rootfs.join("tmp/dialguard.db"))?.uid();
        assert_eq!(owner, 65532, "the database was written as uid {owner}");
    }
    Ok(())
}

#[test]
fn filter_images_hold_the_dist_modules_as_istio_pulls_them() -> anyhow::Result<()> {
    require("skopeo", "skopeo")?;
    require("umoci", "umoci")?;
    let dist = Dist::locate()?;
    let dir = images_dir(&dist)?;
    for (name, module) in [
        (FILTER_IMAGE, &dist.module),
        (FILTER_ENFORCE_IMAGE, &dist.module_enforce),
    ] {
        let archive = archive_path(&dir, name);
        let image = archive_ref(&archive);
        let (digest, manifest) = inspect_manifest(&image)?;
        eprintln!(
            "{name}: {} bytes, manifest {digest} (WasmPlugin sha256 for oci://…/{name}:{IMAGE_TAG}: {})",
            std::fs::metadata(&archive)?.len(),
            digest.trim_start_matches("sha256:")
        );
        // istio-agent's fetcher takes the last layer of an OCI image as
        // tar+gzip and reads `plugin.wasm` from it (the "compat" form).
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let layers = manifest["layers"].as_array().context("manifest layers")?;
        assert_eq!(layers.len(), 1, "{manifest}");
        assert_eq!(layers[0]["mediaType"], OCI_LAYER_GZIP);
        let labels = &skopeo_json(&[], &image)?["Labels"];
        assert_eq!(labels["org.opencontainers.image.title"], name);
        assert_eq!(labels["org.opencontainers.image.version"], IMAGE_TAG);

        let work = tempfile::tempdir()?;
        let layout = copy_out(&archive, work.path(), &digest)?;
        let rootfs = unpack(&layout, work.path())?;
        assert_eq!(
            files(&rootfs)?,
            BTreeSet::from([dialguard_images::WASM_IMAGE_FILE.to_owned()])
        );
        let wasm = std::fs::read(rootfs.join(dialguard_images::WASM_IMAGE_FILE))?;
        assert!(
            wasm == std::fs::read(module)?,
            "{name}'s plugin.wasm is not {}",
            module.display()
        );
    }
    Ok(())
}

#[test]
fn images_build_again_to_the_same_bytes() -> anyhow::Result<()> {
    require("skopeo", "skopeo")?;
    let dist = Dist::locate()?;
    let dir = images_dir(&dist)?;
    // The provenance the build recorded: the same inputs must give the
    // same archives, byte for byte, every time.
    let inspect = skopeo_json(&[], &archive_ref(&archive_path(&dir, COLLECTOR_IMAGE)))?;
    let labels = inspect["Labels"].as_object().context("Labels")?;
    let provenance = Provenance::from_labels(
        labels
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))),
    )?;
    let inputs = Inputs::in_dist(dist.dialguard.parent().context("dist")?);
    let (first, second) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let once = dialguard_images::build_all(&inputs, first.path(), &provenance)?;
    let again = dialguard_images::build_all(&inputs, second.path(), &provenance)?;
    for (a, b) in once.iter().zip(&again) {
        eprintln!("{}: {} twice", a.name, a.written.manifest_digest);
        assert_eq!(a.written, b.written);
        let built = std::fs::read(&a.path)?;
        assert!(built == std::fs::read(&b.path)?, "{} differs", a.name);
        assert!(
            built == std::fs::read(archive_path(&dir, a.name))?,
            "{} differs from dist/images/ (run `cargo xtask images` after `dist`)",
            a.name
        );
    }
    // The time is part of the image: another one gives another digest.
    let later = Provenance {
        created: provenance.created + 1,
        ..provenance
    };
    let third = tempfile::tempdir()?;
    let moved = dialguard_images::build_all(&inputs, third.path(), &later)?;
    for (a, b) in once.iter().zip(&moved) {
        assert_ne!(a.written.manifest_digest, b.written.manifest_digest);
    }
    Ok(())
}

#[test]
fn dist_binary_is_stripped_with_its_debug_info_beside_it() -> anyhow::Result<()> {
    require("readelf", "binutils")?;
    let dist = Dist::locate()?;
    let size = std::fs::metadata(&dist.dialguard)?.len();
    eprintln!("dist/dialguard: {size} bytes (limit {MAX_BINARY_BYTES})");
    assert!(size <= MAX_BINARY_BYTES, "dist/dialguard is {size} bytes");
    let sections = output(Command::new("readelf").arg("-SW").arg(&dist.dialguard))?;
    assert!(sections.contains(".gnu_debuglink"), "{sections}");
    assert!(!sections.contains(".debug_line"), "{sections}");
    let debug = dist.dialguard.with_extension("debug");
    let debug_sections = output(Command::new("readelf").arg("-SW").arg(&debug))?;
    assert!(debug_sections.contains(".debug_line"), "{debug_sections}");
    eprintln!(
        "dist/dialguard.debug: {} bytes",
        std::fs::metadata(&debug)?.len()
    );
    Ok(())
}

#[test]
fn version_says_what_was_built_the_same_as_the_flag() -> anyhow::Result<()> {
    let dist = Dist::locate()?;
    let run = |args: &[&str]| output(Command::new(&dist.dialguard).args(args));
    let text = run(&["version"])?;
    eprint!("{text}");
    assert_eq!(run(&["--version"])?, text);
    assert_eq!(run(&["-V"])?, text);

    let json: Value = serde_json::from_str(&run(&["version", "-o", "json"])?)?;
    assert_eq!(json["version"], IMAGE_TAG);
    let revision = json["revision"]
        .as_str()
        .context("no revision recorded: was dist/dialguard built by `cargo xtask dist`?")?;
    let hex = revision.trim_end_matches("-dirty");
    assert!(
        hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "revision {revision:?}"
    );
    assert!(
        text.contains(&format!("\nrevision: {revision}\n")),
        "{text}"
    );
    assert_eq!(
        json["auditModuleSha256"],
        sha256_hex(&std::fs::read(&dist.module)?)
    );
    assert_eq!(
        json["enforceModuleSha256"],
        sha256_hex(&std::fs::read(&dist.module_enforce)?)
    );
    assert_eq!(json["images"]["collector"], reference(COLLECTOR_IMAGE));
    assert_eq!(json["images"]["filter"], reference(FILTER_IMAGE));
    assert_eq!(
        json["images"]["filterEnforce"],
        reference(FILTER_ENFORCE_IMAGE)
    );

    let bad = Command::new(&dist.dialguard)
        .args(["version", "-o", "xml"])
        .output()?;
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--output"), "{stderr}");
    Ok(())
}
