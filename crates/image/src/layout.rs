//! Converted images in an OCI image layout (`oci:DIR[:TAG]`), read with
//! the shared layout code of `obdoci::layout`: the tagged manifest (or the
//! layout's only one), through an index to this machine's platform, and
//! its blobs as a [`BlobStore`] of files under `DIR/blobs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::io::IoFile;
use blockdev::source::{FileSlice, ReadAt};
use obdoci::layout::Layout;
use obdoci::model::{is_index, parse_json, sniff_media_type, MAX_MANIFEST_SIZE};
use obdoci::{Digest, Index, Manifest, Reference};

use crate::error::{Error, Result};
use crate::layers::{pick_manifest, BlobStore, LayerDesc, OBD_DIGEST};

/// An opened layout.
#[derive(Debug)]
pub struct LayoutStore {
    layout: Layout,
}

/// Indexes nested deeper than this are refused.
const MAX_DEPTH: usize = 4;

impl LayoutStore {
    /// Open the layout at `dir`.
    pub fn open(dir: &Path) -> Result<LayoutStore> {
        let layout = Layout::open(dir).map_err(|source| Error::Oci {
            what: "cannot open the OCI layout".into(),
            source,
        })?;
        Ok(LayoutStore { layout })
    }

    fn oci_err(&self, what: String) -> impl FnOnce(obdoci::Error) -> Error {
        move |source| Error::Oci { what, source }
    }

    /// The layer descriptors (bottom first) of image `tag` (the layout's
    /// only image when `None`).
    pub fn layers(&self, tag: Option<&str>) -> Result<Vec<LayerDesc>> {
        let root = self.layout.root().display().to_string();
        let mut desc = match tag {
            Some(t) => {
                let r = Reference::ref_name(t).map_err(self.oci_err(format!("oci:{root}:{t}")))?;
                self.layout
                    .resolve(&r)
                    .map_err(self.oci_err(format!("oci:{root}")))?
            }
            None => {
                let idx = self
                    .layout
                    .read_index()
                    .map_err(self.oci_err(format!("oci:{root}")))?;
                match idx.manifests.as_slice() {
                    [one] => one.clone(),
                    many => {
                        let tags: Vec<&str> = many
                            .iter()
                            .filter_map(|d| d.annotation(obdoci::model::ANNOTATION_REF_NAME))
                            .collect();
                        return Err(Error::Usage(format!(
                            "oci:{root}: {} images in the layout; name one as oci:DIR:TAG (tags: {})",
                            many.len(),
                            tags.join(", ")
                        )));
                    }
                }
            }
        };
        for _ in 0..MAX_DEPTH {
            let bytes = self
                .layout
                .read_blob(&desc, MAX_MANIFEST_SIZE)
                .map_err(self.oci_err(format!("oci:{root}: manifest {}", desc.digest)))?;
            let what = format!("oci:{root}: {}", desc.digest);
            let mt = if desc.media_type.is_empty() {
                sniff_media_type(&bytes).unwrap_or_default()
            } else {
                desc.media_type.clone()
            };
            if is_index(&mt) {
                let idx: Index = parse_json(&what, &bytes).map_err(self.oci_err(what.clone()))?;
                desc = pick_manifest(&idx).cloned().ok_or_else(|| {
                    Error::Usage(format!(
                        "{what}: the index has no linux/{} image",
                        crate::layers::host_arch()
                    ))
                })?;
                continue;
            }
            let m: Manifest = parse_json(&what, &bytes).map_err(self.oci_err(what.clone()))?;
            return Ok(m.layers.iter().map(LayerDesc::from).collect());
        }
        Err(Error::Usage(format!(
            "oci:{root}: indexes nested more than {MAX_DEPTH} deep"
        )))
    }

    /// The blob files of the native overlaybd image `tag` (tests and tools
    /// that flatten a stack from files).
    pub fn layer_files(&self, tag: Option<&str>) -> Result<Vec<PathBuf>> {
        self.layers(tag)?
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if !l.annotations.contains_key(OBD_DIGEST) {
                    return Err(Error::Usage(format!(
                        "oci:{}: layer {i} ({}) is not an overlaybd layer",
                        self.layout.root().display(),
                        l.media_type
                    )));
                }
                let d: Digest = l.digest.parse().map_err(self.oci_err(l.digest.clone()))?;
                Ok(self.layout.blob_path(&d))
            })
            .collect()
    }
}

/// Split `oci:DIR[:TAG]` (without `oci:`) into the directory and tag, as
/// the convertor and skopeo do: at the first colon, so that the tag may be
/// any OCI reference name (`v1.0+build`, `example.com/app:1.0`). A `DIR`
/// that is a layout as given keeps its colons.
pub fn split_ref(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).join("index.json").exists() {
        return (PathBuf::from(s), None);
    }
    match s.split_once(':') {
        Some((dir, tag)) => (
            PathBuf::from(dir),
            Some(tag.to_string()).filter(|t| !t.is_empty()),
        ),
        None => (PathBuf::from(s), None),
    }
}

impl BlobStore for LayoutStore {
    fn name(&self) -> String {
        format!("oci:{}", self.layout.root().display())
    }

    fn open(&self, digest: &str, size: Option<u64>) -> Result<Arc<dyn ReadAt>> {
        let d: Digest = digest
            .parse()
            .map_err(self.oci_err(format!("{}: bad blob digest", self.name())))?;
        let p = self.layout.blob_path(&d);
        // A FIFO would block the open; a directory or device is no blob.
        blockdev::io::check_regular_with(&p, |why| match why {
            blockdev::io::NotRegular::Missing => None,
            blockdev::io::NotRegular::Is(kind) => Some(Error::Usage(format!(
                "{}: blob {digest} ({}) is not a regular file: it is {kind}",
                self.name(),
                p.display()
            ))),
        })?;
        let f = IoFile::open(&p).map_err(|source| Error::Stack {
            what: format!("{}: blob {digest} is missing", self.name()),
            source,
        })?;
        let s = FileSlice::whole(Arc::new(f)).map_err(|source| Error::Stack {
            what: format!("{}: cannot read blob {digest}", self.name()),
            source,
        })?;
        if let Some(want) = size.filter(|&n| n != 0 && n != s.size()) {
            return Err(Error::Usage(format!(
                "{}: blob {digest} is {} bytes, the manifest says {want}",
                self.name(),
                s.size()
            )));
        }
        Ok(Arc::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obdoci::{Descriptor, Digest};

    #[test]
    fn the_tag_starts_at_the_first_colon() {
        let t = |s: &str| {
            let (d, t) = split_ref(s);
            (d.display().to_string(), t)
        };
        assert_eq!(t("/x/lay"), ("/x/lay".into(), None));
        assert_eq!(t("/x/lay:"), ("/x/lay".into(), None));
        assert_eq!(t("/x/lay:v1"), ("/x/lay".into(), Some("v1".into())));
        assert_eq!(
            t("/x/lay:example.com/app:1.0"),
            ("/x/lay".into(), Some("example.com/app:1.0".into()))
        );
        // A layout whose directory name has a colon is taken whole.
        let dir = tempfile::tempdir().unwrap();
        let lay = dir.path().join("a:b");
        Layout::open_or_create(&lay).unwrap();
        let whole = lay.display().to_string();
        assert_eq!(t(&whole), (whole.clone(), None));
    }

    #[test]
    fn an_image_is_found_by_an_oci_reference_name() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(dir.path()).unwrap();
        let layer = layout.write_blob_bytes(b"layer").unwrap();
        let config = layout.write_blob_bytes(b"{}").unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config.to_string(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer.to_string(), "size": 5}],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let d: Digest = layout.write_blob_bytes(&bytes).unwrap();
        let desc = Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            d,
            bytes.len() as u64,
        );
        // Not a tag in the registry's grammar ('+', '/', ':').
        for name in ["v1.0+build", "example.com/app:1.0"] {
            layout.tag(name, &desc).unwrap();
            let store = LayoutStore::open(dir.path()).unwrap();
            let layers = store.layers(Some(name)).unwrap();
            assert_eq!(layers.len(), 1, "{name}");
            assert_eq!(layers[0].digest, layer.to_string());
        }
    }
}
