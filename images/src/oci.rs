//! An OCI image layout archive (`oci-layout`, `index.json`, `blobs/sha256/…`
//! in one uncompressed tar: what `skopeo copy … oci-archive:FILE:TAG`
//! writes), built in memory from a description of its files.
//!
//! Everything that could make two builds of the same inputs differ is fixed:
//! entries are sorted, owned by uid/gid 0 unless said otherwise, stamped
//! with one given time, and JSON documents have sorted keys (oci-spec keeps
//! labels and annotations in `HashMap`s).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use dialguard_envoyfilter::module::sha256_hex;
use flate2::Compression;
use flate2::write::GzEncoder;
use oci_spec::image::{
    Arch, Config, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder, Sha256Digest,
};

/// The index annotation that names a manifest's tag in an image layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the tar stream of {what}: {source}")]
    Tar {
        what: String,
        source: std::io::Error,
    },
    #[error("the OCI {what} is invalid: {source}")]
    Spec {
        what: &'static str,
        source: oci_spec::OciSpecError,
    },
    #[error("serializing the OCI {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("layer path `{0}` must be relative to the root, without `..` or empty parts")]
    Path(String),
}

/// What a layer holds at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Directory { mode: u32, uid: u64, gid: u64 },
    File { bytes: Vec<u8>, mode: u32 },
}

/// One filesystem layer, keyed by path (relative to `/`, so sorted).
#[derive(Debug, Clone, Default)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

impl Layer {
    /// A file owned by root; its parent directories are added (0755, root).
    pub fn file(&mut self, path: &str, bytes: Vec<u8>, mode: u32) -> Result<(), OciError> {
        let path = relative(path)?;
        self.parents(&path);
        self.entries.insert(path, Entry::File { bytes, mode });
        Ok(())
    }

    /// A directory with its own mode and owner (e.g. `/tmp`, 01777).
    pub fn directory(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Result<(), OciError> {
        let path = relative(path)?;
        self.parents(&path);
        self.entries
            .insert(path, Entry::Directory { mode, uid, gid });
        Ok(())
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            self.entries
                .entry(path[..end].to_owned())
                .or_insert(Entry::Directory {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                });
            end += 1;
        }
    }

    /// The uncompressed tar stream: sorted, every entry stamped `mtime`.
    fn tar(&self, mtime: u64) -> Result<Vec<u8>, OciError> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_ustar();
            header.set_mtime(mtime);
            let failed = |source| OciError::Tar {
                what: path.clone(),
                source,
            };
            match entry {
                Entry::Directory { mode, uid, gid } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_uid(*uid);
                    header.set_gid(*gid);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                        .map_err(failed)?;
                }
                Entry::File { bytes, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_uid(0);
                    header.set_gid(0);
                    header.set_size(bytes.len() as u64);
                    tar.append_data(&mut header, path, bytes.as_slice())
                        .map_err(failed)?;
                }
            }
        }
        tar.into_inner().map_err(|source| OciError::Tar {
            what: "a layer".into(),
            source,
        })
    }
}

/// `/usr/local/bin/x` or `usr/local/bin/x` → `usr/local/bin/x`.
fn relative(path: &str) -> Result<String, OciError> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "..")
    {
        return Err(OciError::Path(path.to_owned()));
    }
    Ok(trimmed.to_owned())
}

/// An image to write: its runtime configuration, platform, layers and
/// annotations (given to the manifest, and as labels to the configuration).
#[derive(Debug, Clone)]
pub struct Image {
    /// The tag the index names the manifest by (`org.opencontainers.image.ref.name`).
    pub tag: String,
    pub architecture: Arch,
    pub os: Os,
    /// `User`, `Entrypoint`, … (labels are set from `annotations`).
    pub config: Config,
    pub layers: Vec<Layer>,
    /// `org.opencontainers.image.*`: on the manifest and as configuration labels.
    pub annotations: BTreeMap<String, String>,
    /// Every file's time and the configuration's `created`, in seconds since
    /// the epoch (SOURCE_DATE_EPOCH).
    pub created: u64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `sha256:…` of the image manifest: what a registry and Istio's
    /// WasmPlugin `sha256` (without the prefix) identify the image by.
    pub manifest_digest: String,
    /// The archive's size in bytes.
    pub size: u64,
}

/// A content-addressed blob of the layout.
struct Blob {
    hex: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            hex: sha256_hex(&bytes),
            bytes,
        }
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor, OciError> {
        let digest: Sha256Digest = self.hex.parse().map_err(|source| OciError::Spec {
            what: "digest",
            source,
        })?;
        Ok(Descriptor::new(media_type, self.bytes.len() as u64, digest))
    }
}

/// JSON with sorted keys at every level, so equal documents are equal bytes.
fn canonical_json(what: &'static str, value: &impl serde::Serialize) -> Result<Vec<u8>, OciError> {
    let json = |source| OciError::Json { what, source };
    let mut value = serde_json::to_value(value).map_err(json)?;
    value.sort_all_objects();
    serde_json::to_vec(&value).map_err(json)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, OciError> {
    // flate2 writes no file name and a zero time into the gzip header.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    let failed = |source| OciError::Tar {
        what: "a gzip'd layer".into(),
        source,
    };
    encoder.write_all(bytes).map_err(failed)?;
    encoder.finish().map_err(failed)
}

fn rfc3339(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

/// Writes `image` as an OCI layout archive at `path` (through a temporary
/// file beside it, renamed into place).
pub fn write_archive(image: &Image, path: &Path) -> Result<Written, OciError> {
    let spec = |what| move |source| OciError::Spec { what, source };
    let mut layer_blobs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in &image.layers {
        let tar = layer.tar(image.created)?;
        diff_ids.push(format!("sha256:{}", sha256_hex(&tar)));
        layer_blobs.push(Blob::new(gzip(&tar)?));
    }
    let labels: HashMap<String, String> = image.annotations.clone().into_iter().collect();
    let mut config = image.config.clone();
    config.set_labels(Some(labels.clone()));
    let configuration = ImageConfigurationBuilder::default()
        .created(rfc3339(image.created))
        .architecture(image.architecture.clone())
        .os(image.os.clone())
        .config(config)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .map_err(spec("rootfs"))?,
        )
        .build()
        .map_err(spec("image configuration"))?;
    let config_blob = Blob::new(canonical_json("image configuration", &configuration)?);
    let layers = layer_blobs
        .iter()
        .map(|blob| blob.descriptor(MediaType::ImageLayerGzip))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_blob.descriptor(MediaType::ImageConfig)?)
        .layers(layers)
        .annotations(labels)
        .build()
        .map_err(spec("image manifest"))?;
    let manifest_blob = Blob::new(canonical_json("image manifest", &manifest)?);
    let manifest_descriptor = manifest_blob.descriptor(MediaType::ImageManifest)?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(manifest_descriptor.digest().clone())
                .size(manifest_descriptor.size())
                .annotations(HashMap::from([(
                    REF_NAME_ANNOTATION.to_owned(),
                    image.tag.clone(),
                )]))
                .build()
                .map_err(spec("index entry"))?,
        ])
        .build()
        .map_err(spec("image index"))?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec("oci-layout"))?;

    let mut archive = Layer::default();
    archive.file("oci-layout", canonical_json("oci-layout", &layout)?, 0o644)?;
    archive.file("index.json", canonical_json("image index", &index)?, 0o644)?;
    for blob in layer_blobs.into_iter().chain([config_blob, manifest_blob]) {
        archive.file(&format!("blobs/sha256/{}", blob.hex), blob.bytes, 0o644)?;
    }
    let bytes = archive.tar(image.created)?;
    let io = |source| OciError::Io {
        path: path.to_owned(),
        source,
    };
    let partial = path.with_extension("tar.partial");
    std::fs::write(&partial, &bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)?;
    Ok(Written {
        manifest_digest: manifest_descriptor.digest().to_string(),
        size: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_relative_and_parents_come_first() {
        let mut layer = Layer::default();
        layer
            .file("/usr/local/bin/dialguard", b"x".to_vec(), 0o755)
            .unwrap();
        layer.directory("/tmp", 0o1777, 0, 0).unwrap();
        let paths: Vec<&str> = layer.entries.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/dialguard"
            ]
        );
        for bad in ["", "/", "a/../b", "a//b"] {
            assert!(
                matches!(layer.file(bad, Vec::new(), 0o644), Err(OciError::Path(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn the_same_layer_gives_the_same_bytes_and_time_changes_them() {
        let build = || {
            let mut layer = Layer::default();
            layer.file("b", b"2".to_vec(), 0o644).unwrap();
            layer.file("a/x", b"1".to_vec(), 0o644).unwrap();
            layer
        };
        let first = gzip(&build().tar(1_700_000_000).unwrap()).unwrap();
        assert_eq!(first, gzip(&build().tar(1_700_000_000).unwrap()).unwrap());
        assert_ne!(first, gzip(&build().tar(1_700_000_001).unwrap()).unwrap());
    }
}
