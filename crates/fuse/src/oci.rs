//! Just enough of an OCI image layout to find the layers of a converted
//! (overlaybd or TurboOCI) image: `oci:DIR[:TAG]`.
//!
//! Layout: `DIR/index.json` lists descriptors (`mediaType`, `digest`, `size`,
//! `annotations["org.opencontainers.image.ref.name"]` = tag, `platform`);
//! each digest `ALG:HEX` is stored at `DIR/blobs/ALG/HEX`. A descriptor is an
//! image manifest (`layers`: descriptors, bottom first) or an index of
//! manifests (one per platform). An overlaybd layer descriptor carries the
//! annotation `containerd.io/snapshot/overlaybd/blob-digest`; its blob is the
//! tar-wrapped ZFile/LSMT layer that the stack opens directly. TurboOCI
//! layers are resolved by [`crate::image`] through [`LayoutStore`].
//!
//! This reader is deliberately small ([`layers`]); it is to be replaced by
//! the shared layout code once that lives in its own crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::io::IoFile;
use blockdev::source::{FileSlice, ReadAt};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::image::{BlobStore, LayerDesc};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OBD_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Index and manifest files larger than this are refused.
const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, Deserialize, Default)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct IndexOrManifest {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Split `oci:DIR[:TAG]` (the `oci:` prefix already removed) into the
/// directory and the optional tag. `DIR` itself may contain `:` when it
/// exists as given.
pub fn split_ref(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).join("index.json").exists() {
        return (PathBuf::from(s), None);
    }
    match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') => {
            (PathBuf::from(dir), Some(tag.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let bad = || Error::oci(dir, format!("malformed digest '{digest}'"));
    let (alg, hex) = digest.split_once(':').ok_or_else(bad)?;
    let alg_ok = !alg.is_empty() && alg.bytes().all(|b| b.is_ascii_alphanumeric());
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !alg_ok || !hex_ok {
        return Err(bad());
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

fn read_json(path: &Path) -> Result<IndexOrManifest> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, "cannot read", e))?;
    if md.len() > MAX_JSON {
        return Err(Error::oci(
            path,
            format!("{} bytes is too large for an index or manifest", md.len()),
        ));
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
    serde_json::from_slice(&text).map_err(|e| Error::oci(path, format!("bad JSON: {e}")))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The layer descriptors (bottom first) of image `tag` in the layout at
/// `dir` (the only image when `tag` is `None`). An index picks the manifest
/// of the host's architecture.
pub fn layers(dir: &Path, tag: Option<&str>) -> Result<Vec<LayerDesc>> {
    let index_path = dir.join("index.json");
    let index = read_json(&index_path)?;
    let manifests = index.manifests.unwrap_or_default();
    let name = |d: &Descriptor| d.annotations.get(REF_NAME).cloned().unwrap_or_default();
    let top = match tag {
        Some(t) => manifests.iter().find(|d| name(d) == t).ok_or_else(|| {
            let tags: Vec<String> = manifests
                .iter()
                .map(name)
                .filter(|n| !n.is_empty())
                .collect();
            Error::oci(
                &index_path,
                format!("no image tagged '{t}' (tags: {})", tags.join(", ")),
            )
        })?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            let tags: Vec<String> = manifests.iter().map(name).collect();
            return Err(Error::oci(
                &index_path,
                format!(
                    "{} images in the layout; name one as oci:DIR:TAG (tags: {})",
                    manifests.len(),
                    tags.join(", ")
                ),
            ));
        }
    };
    let mut path = blob_path(dir, &top.digest)?;
    let mut doc = read_json(&path)?;
    let mut depth = 0;
    while INDEX_TYPES.contains(&doc.media_type.as_str())
        || (doc.manifests.is_some() && doc.layers.is_none())
    {
        depth += 1;
        if depth > 4 {
            return Err(Error::oci(&path, "indexes nested too deeply"));
        }
        let list = doc.manifests.unwrap_or_default();
        let pick = list
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
            })
            .or_else(|| (list.len() == 1).then(|| &list[0]))
            .ok_or_else(|| {
                Error::oci(
                    &path,
                    format!("the index has no linux/{} manifest", host_arch()),
                )
            })?;
        path = blob_path(dir, &pick.digest)?;
        doc = read_json(&path)?;
    }
    let layers = doc
        .layers
        .ok_or_else(|| Error::oci(&path, "not an image manifest (no \"layers\")"))?;
    if layers.is_empty() {
        return Err(Error::oci(&path, "the manifest has no layers"));
    }
    Ok(layers
        .into_iter()
        .map(|l| LayerDesc {
            media_type: l.media_type,
            digest: l.digest,
            size: l.size,
            annotations: l.annotations,
        })
        .collect())
}

/// The layer blob files (bottom first) of the native overlaybd image `tag`
/// in the layout at `dir`.
pub fn layer_blobs(dir: &Path, tag: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (i, l) in layers(dir, tag)?.iter().enumerate() {
        if !l.annotations.contains_key(OBD_DIGEST) {
            return Err(Error::oci(
                dir,
                format!("layer {i} ({}) is not an overlaybd layer", l.media_type),
            ));
        }
        out.push(blob_path(dir, &l.digest)?);
    }
    Ok(out)
}

/// The blobs of a layout, as a [`BlobStore`].
#[derive(Debug, Clone)]
pub struct LayoutStore {
    dir: PathBuf,
}

impl LayoutStore {
    /// The blobs under `dir/blobs`.
    pub fn new(dir: &Path) -> Self {
        LayoutStore {
            dir: dir.to_path_buf(),
        }
    }
}

impl BlobStore for LayoutStore {
    fn name(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn open(&self, digest: &str, size: Option<u64>) -> Result<Arc<dyn ReadAt>> {
        let p = blob_path(&self.dir, digest)?;
        let f = IoFile::open(&p).map_err(|source| Error::Stack {
            what: format!("blob {digest} is missing from the layout"),
            source,
        })?;
        let s = FileSlice::whole(Arc::new(f)).map_err(|source| Error::Stack {
            what: format!("cannot read blob {digest}"),
            source,
        })?;
        if let Some(want) = size.filter(|&n| n != 0 && n != s.size()) {
            return Err(Error::oci(
                &p,
                format!("blob is {} bytes, the manifest says {want}", s.size()),
            ));
        }
        Ok(Arc::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tags_and_rejects_bad_digests() {
        assert_eq!(
            split_ref("/nonexistent/x:latest_obd"),
            (PathBuf::from("/nonexistent/x"), Some("latest_obd".into()))
        );
        assert_eq!(
            split_ref("/nonexistent/x"),
            (PathBuf::from("/nonexistent/x"), None)
        );
        assert!(blob_path(Path::new("/d"), "sha256:../../etc/passwd").is_err());
        assert!(blob_path(Path::new("/d"), "nodigest").is_err());
        let ok = blob_path(Path::new("/d"), &format!("sha256:{}", "ab".repeat(32))).unwrap();
        assert_eq!(ok, Path::new("/d/blobs/sha256").join("ab".repeat(32)));
    }
}
