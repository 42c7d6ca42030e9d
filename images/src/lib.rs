//! `dialguard-images`: dialguard's OCI image archives, written from what
//! `cargo xtask dist` built, without Docker or any container daemon
//! (`cargo xtask images` drives it; the tests rebuild with it to check
//! that a build is reproducible).
//!
//! - `dialguard-collector`: `/usr/local/bin/dialguard` (the glibc build,
//!   with exactly the shared libraries it loads, at their paths: no musl
//!   build, no base image), both module builds in
//!   [`IMAGE_MODULE_DIR`], `/etc/passwd` and `/etc/group` naming 65532
//!   `nonroot`, `/tmp`, and `/var/lib/dialguard` owned by 65532. It runs as
//!   `65532:65532`; its `Cmd` is a `serve` on all interfaces with the
//!   database in `/var/lib/dialguard` and both modules served.
//! - `dialguard-filter` / `dialguard-filter-enforce`: one module each, in
//!   the "compat" Wasm image form Istio's WasmPlugin fetcher tries first
//!   (istio-agent's `pkg/wasm/imagefetcher.go`): a standard OCI image whose
//!   single `tar+gzip` layer holds `plugin.wasm`. Unlike the artifact form
//!   (custom media types, two layers), registries, skopeo and umoci all
//!   handle it as any image.
//!
//! A build is a function of its inputs: the files, the version, the git
//! revision and one timestamp ([`Provenance`]).

pub mod libraries;
pub mod oci;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dialguard_envoyfilter::image::{
    COLLECTOR_IMAGE, FILTER_ENFORCE_IMAGE, FILTER_IMAGE, IMAGE_MODULE_DIR, IMAGE_TAG, reference,
};
use dialguard_envoyfilter::module::{AUDIT_MODULE_FILE, ENFORCE_MODULE_FILE};
use dialguard_envoyfilter::rollout::{COLLECTOR_GRPC_PORT, COLLECTOR_HTTP_PORT};
use oci_spec::image::{Arch, ConfigBuilder, Os};

pub use oci::{Written, write_archive};

/// Where the project's source lives (`org.opencontainers.image.source`;
/// ghcr.io links a package to its repository by it).
pub const IMAGE_SOURCE: &str = "https://github.com/dialguard/dialguard";
/// The collector binary's path in its image.
pub const BINARY_PATH: &str = "/usr/local/bin/dialguard";
/// The non-root user and group the collector runs as.
pub const NONROOT_ID: u64 = 65532;
/// The collector's data directory (the Deployment mounts its PVC here).
pub const DATA_DIR: &str = "/var/lib/dialguard";
/// The file a Wasm image holds its module in (the compat form's name).
pub const WASM_IMAGE_FILE: &str = "plugin.wasm";

const SOURCE_ANNOTATION: &str = "org.opencontainers.image.source";
const VERSION_ANNOTATION: &str = "org.opencontainers.image.version";
const REVISION_ANNOTATION: &str = "org.opencontainers.image.revision";
const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
const DESCRIPTION_ANNOTATION: &str = "org.opencontainers.image.description";
const LICENSES_ANNOTATION: &str = "org.opencontainers.image.licenses";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source} (run `cargo xtask dist` first)")]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Libraries(#[from] libraries::LibraryError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("creating {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image labels lack `{0}`, or it is not what a build writes")]
    Label(&'static str),
}

/// What a build records besides the files: the git revision
/// (`org.opencontainers.image.revision`) and the time every file and the
/// configuration are stamped with (SOURCE_DATE_EPOCH, seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub revision: String,
    pub created: u64,
}

impl Provenance {
    /// The provenance a build recorded in its labels (`skopeo inspect`'s
    /// `Labels`), to build the same image again.
    pub fn from_labels<'a>(
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ImageError> {
        let labels: BTreeMap<&str, &str> = labels.into_iter().collect();
        let revision = labels
            .get(REVISION_ANNOTATION)
            .ok_or(ImageError::Label(REVISION_ANNOTATION))?;
        let created = labels
            .get(CREATED_ANNOTATION)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .ok_or(ImageError::Label(CREATED_ANNOTATION))?;
        Ok(Self {
            revision: (*revision).to_owned(),
            created: created.as_secs(),
        })
    }
}

/// The inputs, as `cargo xtask dist` leaves them in `dist/`.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The stripped collector binary.
    pub binary: PathBuf,
    pub audit_module: PathBuf,
    pub enforce_module: PathBuf,
}

impl Inputs {
    pub fn in_dist(dist: &Path) -> Self {
        Self {
            binary: dist.join("dialguard"),
            audit_module: dist.join(AUDIT_MODULE_FILE),
            enforce_module: dist.join(ENFORCE_MODULE_FILE),
        }
    }
}

/// One archive written.
#[derive(Debug, Clone)]
pub struct Archive {
    /// `dialguard-collector`, …
    pub name: &'static str,
    /// `ghcr.io/dialguard/NAME:TAG`, what `xtask` tags it as.
    pub reference: String,
    pub path: PathBuf,
    pub written: Written,
}

/// The archive file of image `name` in `dir`: `NAME.oci.tar`.
pub fn archive_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.oci.tar"))
}

/// Writes the three archives into `out` (created if missing).
pub fn build_all(
    inputs: &Inputs,
    out: &Path,
    provenance: &Provenance,
) -> Result<Vec<Archive>, ImageError> {
    std::fs::create_dir_all(out).map_err(|source| ImageError::Output {
        path: out.to_owned(),
        source,
    })?;
    let images = [
        (COLLECTOR_IMAGE, collector_image(inputs, provenance)?),
        (
            FILTER_IMAGE,
            filter_image(&inputs.audit_module, FILTER_IMAGE, "audit", provenance)?,
        ),
        (
            FILTER_ENFORCE_IMAGE,
            filter_image(
                &inputs.enforce_module,
                FILTER_ENFORCE_IMAGE,
                "enforce",
                provenance,
            )?,
        ),
    ];
    images
        .into_iter()
        .map(|(name, image)| {
            let path = archive_path(out, name);
            let written = write_archive(&image, &path)?;
            Ok(Archive {
                name,
                reference: reference(name),
                path,
                written,
            })
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Input {
        path: path.to_owned(),
        source,
    })
}

fn annotations(
    title: &str,
    description: &str,
    provenance: &Provenance,
) -> BTreeMap<String, String> {
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(provenance.created),
    );
    [
        (SOURCE_ANNOTATION, IMAGE_SOURCE.to_owned()),
        (VERSION_ANNOTATION, IMAGE_TAG.to_owned()),
        (REVISION_ANNOTATION, provenance.revision.clone()),
        (CREATED_ANNOTATION, created.to_string()),
        (TITLE_ANNOTATION, title.to_owned()),
        (DESCRIPTION_ANNOTATION, description.to_owned()),
        (LICENSES_ANNOTATION, "Apache-2.0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The collector image: the binary, its libraries, both modules, a
/// non-root user and its writable directories.
pub fn collector_image(inputs: &Inputs, provenance: &Provenance) -> Result<oci::Image, ImageError> {
    let mut layer = oci::Layer::default();
    layer.file(BINARY_PATH, read(&inputs.binary)?, 0o755)?;
    for library in libraries::shared_libraries(&inputs.binary)? {
        // Read through symlinks (/lib64/ld-linux-x86-64.so.2 is one): the
        // image gets the file itself at the path the loader asks for.
        layer.file(&library.to_string_lossy(), read(&library)?, 0o755)?;
    }
    for (module, file) in [
        (&inputs.audit_module, AUDIT_MODULE_FILE),
        (&inputs.enforce_module, ENFORCE_MODULE_FILE),
    ] {
        layer.file(&format!("{IMAGE_MODULE_DIR}/{file}"), read(module)?, 0o644)?;
    }
    let id = NONROOT_ID;
    layer.file(
        "/etc/passwd",
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{id}:{id}:nonroot:/home/nonroot:/sbin/nologin\n")
            .into_bytes(),
        0o644,
    )?;
    layer.file(
        "/etc/group",
        format!("root:x:0:\nnonroot:x:{id}:\n").into_bytes(),
        0o644,
    )?;
    // /etc/hosts before DNS, as everywhere (glibc's default without the file is DNS first).
    layer.file(
        "/etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
        0o644,
    )?;
    // SQLite's temporary files; a read-only root gets an emptyDir here.
    layer.directory("/tmp", 0o1777, 0, 0)?;
    layer.directory(DATA_DIR, 0o755, id, id)?;
    layer.directory("/home/nonroot", 0o700, id, id)?;

    let config = ConfigBuilder::default()
        .user(format!("{id}:{id}"))
        .entrypoint(vec![BINARY_PATH.to_owned()])
        .cmd(
            [
                "serve".to_owned(),
                "--grpc".into(),
                format!("0.0.0.0:{COLLECTOR_GRPC_PORT}"),
                "--http".into(),
                format!("0.0.0.0:{COLLECTOR_HTTP_PORT}"),
                "--db".into(),
                format!("{DATA_DIR}/dialguard.db"),
                "--module".into(),
                format!("{IMAGE_MODULE_DIR}/{AUDIT_MODULE_FILE}"),
                "--enforce-module".into(),
                format!("{IMAGE_MODULE_DIR}/{ENFORCE_MODULE_FILE}"),
            ]
            .to_vec(),
        )
        .exposed_ports(vec![
            format!("{COLLECTOR_GRPC_PORT}/tcp"),
            format!("{COLLECTOR_HTTP_PORT}/tcp"),
        ])
        .env(vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
            "HOME=/home/nonroot".to_owned(),
        ])
        .working_dir("/")
        .build()
        .map_err(|source| oci::OciError::Spec {
            what: "collector configuration",
            source,
        })?;
    Ok(oci::Image {
        tag: IMAGE_TAG.to_owned(),
        architecture: Arch::Amd64,
        os: Os::Linux,
        config,
        layers: vec![layer],
        annotations: annotations(
            COLLECTOR_IMAGE,
            "dialguard's collector: receives mismatch events from every sidecar, stores them, alerts and reports; serves the filter modules",
            provenance,
        ),
        created: provenance.created,
    })
}

/// A Wasm image of one module build (`audit` or `enforce`), named `name`.
pub fn filter_image(
    module: &Path,
    name: &str,
    build: &str,
    provenance: &Provenance,
) -> Result<oci::Image, ImageError> {
    let mut layer = oci::Layer::default();
    layer.file(WASM_IMAGE_FILE, read(module)?, 0o644)?;
    Ok(oci::Image {
        tag: IMAGE_TAG.to_owned(),
        // Docker's platform for Wasm; no runtime runs this image, Istio's
        // agent only takes the file out.
        architecture: Arch::Wasm,
        os: Os::Other("wasi".to_owned()),
        config: oci_spec::image::Config::default(),
        layers: vec![layer],
        annotations: annotations(
            name,
            &format!(
                "dialguard's proxy-wasm network filter ({build} build) for Istio's WasmPlugin"
            ),
            provenance,
        ),
        created: provenance.created,
    })
}
