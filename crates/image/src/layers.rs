//! The layers of a converted image, from its manifest's layer descriptors
//! and a [`BlobStore`] (an OCI layout, a registry).
//!
//! Two kinds of layer (annotations as the convertor writes them):
//!
//! * **overlaybd** (`containerd.io/snapshot/overlaybd/blob-digest`): the blob
//!   is the tar-wrapped ZFile/LSMT layer itself, opened in place.
//! * **TurboOCI** (`…/overlaybd/turbo-oci/target-digest`, or the legacy
//!   `…/fastoci/target-digest`): the blob is a small gzip'd tar holding
//!   `ext4.fs.meta` or `erofs.fs.meta` (the metadata layer), `.turbo.ociv1`
//!   (an empty marker) and, for a gzip target, `gzip.meta` (its random
//!   access index). The target digest names the original OCI layer blob in
//!   the same store, whose uncompressed tar holds the file data. The small
//!   blob is read whole, checked against its digest and unpacked into
//!   memory; the target stays where it is and is read at random offsets
//!   (through `gzip.meta` when it is compressed).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use blockdev::gzindex::{is_gzip, GzFile};
use blockdev::source::{MemSource, ReadAt};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::source::{LayerBlob, LowerSpec, Target};

/// Annotation of an overlaybd layer.
pub const OBD_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// Annotations naming a TurboOCI layer's original blob (current, legacy).
pub const TURBO_TARGET: [&str; 2] = [
    "containerd.io/snapshot/overlaybd/turbo-oci/target-digest",
    "containerd.io/snapshot/overlaybd/fastoci/target-digest",
];
/// Annotation (`yes`) of the acceleration layer `ctr record-trace` puts on top of an
/// image: a tar holding the trace overlaybd prefetches by, not a layer of the disk.
pub const ACCELERATION_LAYER: &str = "containerd.io/snapshot/overlaybd/acceleration-layer";
/// TurboOCI metadata layers, in the order overlaybd's snapshotter prefers.
const FS_META: [&str; 2] = ["erofs.fs.meta", "ext4.fs.meta"];
/// The gzip index member of a TurboOCI blob.
const GZIP_META: &str = "gzip.meta";
/// TurboOCI blobs larger than this are refused (they hold metadata only).
pub const MAX_TURBO_BLOB: u64 = 1 << 30;

/// A layer descriptor of an image manifest.
#[derive(Debug, Clone, Default)]
pub struct LayerDesc {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub annotations: HashMap<String, String>,
}

impl From<&obdoci::Descriptor> for LayerDesc {
    fn from(d: &obdoci::Descriptor) -> Self {
        LayerDesc {
            media_type: d.media_type.clone(),
            digest: d.digest.to_string(),
            size: d.size,
            annotations: d
                .annotations
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// The platform name of this machine in OCI terms (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The manifest to use from an index: linux on this machine's
/// architecture, or the only image in it (attestations never count).
pub fn pick_manifest(index: &obdoci::Index) -> Option<&obdoci::Descriptor> {
    let images: Vec<&obdoci::Descriptor> = index
        .manifests
        .iter()
        .filter(|d| !d.is_attestation())
        .collect();
    images
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
        })
        .copied()
        .or_else(|| (images.len() == 1).then(|| images[0]))
}

impl LayerDesc {
    /// The original layer's digest, for a TurboOCI layer.
    pub fn turbo_target(&self) -> Option<&str> {
        TURBO_TARGET
            .iter()
            .find_map(|k| self.annotations.get(*k))
            .map(String::as_str)
    }
}

/// Where blobs are read from.
pub trait BlobStore: Send + Sync {
    /// A name for messages (`oci:DIR`, `registry/repo`).
    fn name(&self) -> String;
    /// Random access to blob `digest`; `size` is the descriptor's, when known.
    fn open(&self, digest: &str, size: Option<u64>) -> Result<Arc<dyn ReadAt>>;
}

/// The lower layers (bottom first) of an image with these layers, and a word
/// for what kind of image it is.
///
/// An acceleration layer on top (`ctr record-trace`'s trace, [`ACCELERATION_LAYER`]) is
/// left out, as overlaybd leaves it out of the stack; one anywhere else is refused.
pub fn lowers(layers: &[LayerDesc], store: &dyn BlobStore) -> Result<(Vec<LowerSpec>, String)> {
    let is_accel = |l: &LayerDesc| {
        l.annotations
            .get(ACCELERATION_LAYER)
            .is_some_and(|v| v == "yes")
    };
    let layers = match layers.split_last() {
        Some((top, below)) if is_accel(top) => {
            tracing::info!(
                "{}: the top layer {} is an acceleration layer (a trace): not a layer of the disk",
                store.name(),
                top.digest
            );
            below
        }
        _ => layers,
    };
    if let Some((i, l)) = layers.iter().enumerate().find(|(_, l)| is_accel(l)) {
        return Err(Error::Usage(format!(
            "{}: layer {i} ({}) is an acceleration layer (a trace) with layers above it; \
             overlaybd reads one only on top",
            store.name(),
            l.digest
        )));
    }
    if layers.is_empty() {
        return Err(Error::Usage(format!(
            "{}: the image has no layers",
            store.name()
        )));
    }
    // Before any blob is opened or fetched.
    blockdev::stack::check_lower_count(layers.len()).map_err(|source| Error::Stack {
        what: format!("cannot stack {}", store.name()),
        source,
    })?;
    let mut out = Vec::with_capacity(layers.len());
    let (mut native, mut turbo) = (0, 0);
    for (i, l) in layers.iter().enumerate() {
        if let Some(target) = l.turbo_target() {
            out.push(turbo_lower(i, l, target, store)?);
            turbo += 1;
        } else if l.annotations.contains_key(OBD_DIGEST) {
            let blob = store.open(&l.digest, Some(l.size))?;
            out.push(LowerSpec::layer(LayerBlob::Source(blob)));
            native += 1;
        } else {
            return Err(Error::Usage(format!(
                "{}: not an overlaybd image: layer {i} ({}, {}) has no overlaybd or TurboOCI \
                 annotations; convert the image first (convertor --overlaybd or --turboOCI)",
                store.name(),
                l.digest,
                l.media_type
            )));
        }
    }
    let kind = match (native, turbo) {
        (_, 0) => "overlaybd",
        (0, _) => "TurboOCI",
        _ => "overlaybd+TurboOCI",
    };
    Ok((out, kind.to_string()))
}

/// Read a whole (small) blob and check it against its digest.
pub fn read_verified(src: &dyn ReadAt, digest: &str, what: &str) -> Result<Vec<u8>> {
    let size = src.size();
    if size > MAX_TURBO_BLOB {
        return Err(Error::Usage(format!(
            "{what} {digest} is {size} bytes; more than {MAX_TURBO_BLOB} is not metadata"
        )));
    }
    let mut data = vec![0u8; size as usize];
    src.read_exact_at(&mut data, 0)
        .map_err(|source| Error::Stack {
            what: format!("cannot read {what} {digest}"),
            source,
        })?;
    if let Some(hex) = digest.strip_prefix("sha256:") {
        let got = hex::encode(Sha256::digest(&data));
        if got != hex {
            return Err(Error::Integrity(format!(
                "{what} {digest}: content hashes to sha256:{got}"
            )));
        }
    }
    Ok(data)
}

/// The members of a TurboOCI blob this crate uses, by name.
fn unpack_turbo(blob: &[u8], what: &str) -> Result<HashMap<String, Vec<u8>>> {
    let bad = |msg: String| Error::Usage(format!("{what}: {msg}"));
    let unpack = |msg: String| {
        move |source| Error::Unpack {
            what: format!("{what}: {msg}"),
            source,
        }
    };
    let raw: Box<dyn Read + '_> = if is_gzip(blob) {
        Box::new(flate2::read::MultiGzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut ar = tar::Archive::new(raw);
    let mut out = HashMap::new();
    let entries = ar
        .entries()
        .map_err(unpack("not a TurboOCI layer tar".into()))?;
    for e in entries {
        let mut e = e.map_err(unpack("bad tar".into()))?;
        let path = e.path().map_err(unpack("bad tar entry name".into()))?;
        let name = path.to_string_lossy();
        let name = name.trim_start_matches("./").to_string();
        if !FS_META.contains(&name.as_str()) && name != GZIP_META {
            continue;
        }
        let size = e
            .header()
            .size()
            .map_err(unpack(format!("{name}: bad tar header")))?;
        if size > MAX_TURBO_BLOB {
            return Err(bad(format!("{name} is {size} bytes")));
        }
        let mut v = Vec::with_capacity(size as usize);
        e.read_to_end(&mut v)
            .map_err(unpack(format!("cannot unpack {name}")))?;
        out.insert(name, v);
    }
    Ok(out)
}

fn turbo_lower(i: usize, l: &LayerDesc, target: &str, store: &dyn BlobStore) -> Result<LowerSpec> {
    let what = format!("{}: TurboOCI layer {i}", store.name());
    let src = store.open(&l.digest, Some(l.size))?;
    let blob = read_verified(src.as_ref(), &l.digest, &what)?;
    let mut files = unpack_turbo(&blob, &format!("{what} ({})", l.digest))?;
    let (fs_name, meta) = FS_META
        .iter()
        .find_map(|n| files.remove(*n).map(|m| (*n, m)))
        .ok_or_else(|| {
            Error::Usage(format!(
                "{what} ({}) holds neither ext4.fs.meta nor erofs.fs.meta",
                l.digest
            ))
        })?;
    let hex = l.digest.rsplit(':').next().unwrap_or(&l.digest);
    let short = &hex[..hex.len().min(12)];
    let meta = MemSource::new(meta, format!("{short}/{fs_name}"));
    let tblob = store.open(target, None)?;
    let tar: Arc<dyn ReadAt> = match files.remove(GZIP_META) {
        Some(idx) => {
            let idx = MemSource::new(idx, format!("{short}/{GZIP_META}"));
            Arc::new(
                GzFile::open_source(tblob, Arc::new(idx)).map_err(|source| Error::Stack {
                    what: format!("{what}: cannot read target {target} through its gzip.meta"),
                    source,
                })?,
            )
        }
        None => {
            let mut head = [0u8; 2];
            let n = tblob.read_at(&mut head, 0).map_err(|source| Error::Stack {
                what: format!("{what}: cannot read target {target}"),
                source,
            })?;
            if is_gzip(&head[..n]) {
                return Err(Error::Usage(format!(
                    "{what}: target {target} is gzip-compressed but the layer has no gzip.meta"
                )));
            }
            tblob
        }
    };
    Ok(LowerSpec {
        blob: LayerBlob::Source(Arc::new(meta)),
        target: Some(Target::Tar(tar)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A store holding one blob.
    struct OneBlob(Vec<u8>);

    impl BlobStore for OneBlob {
        fn name(&self) -> String {
            "test".into()
        }
        fn open(&self, _: &str, _: Option<u64>) -> Result<Arc<dyn ReadAt>> {
            Ok(Arc::new(MemSource::new(self.0.clone(), "blob")))
        }
    }

    /// An image of more layers than can be stacked is refused before any of
    /// its blobs is opened (for a registry image: fetched).
    #[test]
    fn too_many_layers_are_refused_before_any_blob_opens() {
        struct NoOpen;
        impl BlobStore for NoOpen {
            fn name(&self) -> String {
                "oci:big".into()
            }
            fn open(&self, d: &str, _: Option<u64>) -> Result<Arc<dyn ReadAt>> {
                panic!("{d} opened");
            }
        }
        let layers: Vec<LayerDesc> = (0..256)
            .map(|i| LayerDesc {
                digest: format!("sha256:{i:064x}"),
                annotations: [(OBD_DIGEST.to_string(), format!("sha256:{i:064x}"))].into(),
                ..Default::default()
            })
            .collect();
        let e = match lowers(&layers, &NoOpen) {
            Ok(_) => panic!("256 layers stacked"),
            Err(e) => testutil::assert_clean_chain(&e),
        };
        assert!(
            e.contains("oci:big") && e.contains("256 lower layers; at most 255"),
            "{e}"
        );
    }

    /// The lowers of a one-layer TurboOCI image whose metadata blob is `blob`.
    fn turbo_lowers(blob: Vec<u8>) -> Result<(Vec<LowerSpec>, String)> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
        let layer = LayerDesc {
            digest,
            size: blob.len() as u64,
            annotations: [(
                TURBO_TARGET[0].to_string(),
                format!("sha256:{}", "0".repeat(64)),
            )]
            .into(),
            ..Default::default()
        };
        lowers(&[layer], &OneBlob(blob))
    }

    /// A gzip'd tar holding `ext4.fs.meta` (`size` bytes of noise), cut short
    /// inside that member.
    fn truncated_turbo_blob(size: usize) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "ext4.fs.meta", &data[..]).unwrap();
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        gz[..gz.len() / 2].to_vec()
    }

    /// A store of named blobs that records which ones were opened.
    struct Blobs(HashMap<String, Vec<u8>>, std::sync::Mutex<Vec<String>>);

    impl BlobStore for Blobs {
        fn name(&self) -> String {
            "test".into()
        }
        fn open(&self, digest: &str, _: Option<u64>) -> Result<Arc<dyn ReadAt>> {
            self.1.lock().unwrap().push(digest.to_string());
            let b = self.0.get(digest).expect("a blob of the store");
            Ok(Arc::new(MemSource::new(b.clone(), digest.to_string())))
        }
    }

    /// A native layer descriptor (blob digest, size, version annotations) named
    /// `digest`, marked as `ctr record-trace` marks its acceleration layer when `accel`.
    fn native_layer(digest: &str, accel: bool) -> LayerDesc {
        let mut annotations: HashMap<String, String> = [
            (OBD_DIGEST.to_string(), digest.to_string()),
            (
                "containerd.io/snapshot/overlaybd/blob-size".to_string(),
                "3".to_string(),
            ),
        ]
        .into();
        if accel {
            annotations.insert(ACCELERATION_LAYER.to_string(), "yes".to_string());
        }
        LayerDesc {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: digest.to_string(),
            size: 3,
            annotations,
        }
    }

    fn store(digests: &[&str]) -> Blobs {
        Blobs(
            digests
                .iter()
                .map(|d| (d.to_string(), b"obd".to_vec()))
                .collect(),
            Default::default(),
        )
    }

    /// `ctr record-trace` (upstream `pkg/convertor/convertor.go:195-210`) pushes the
    /// trace as a top layer with the blob digest and size annotations of a native layer
    /// and `acceleration-layer: yes`; its blob is a tar holding `trace`, not a layer.
    /// The snapshotter gives it to overlaybd as the last lower with
    /// `accelerationLayer: true` (`pkg/snapshot/overlay.go:480-498, 586-596`), and
    /// overlaybd leaves that lower out of the stack (`src/image_file.cpp:455-458`).
    /// So is it here: the image's layers are the ones below it, and its blob is not read.
    #[test]
    fn acceleration_layer_on_top_is_left_out() {
        let s = store(&["sha256:l0", "sha256:l1", "sha256:trace"]);
        let layers = [
            native_layer("sha256:l0", false),
            native_layer("sha256:l1", false),
            native_layer("sha256:trace", true),
        ];
        let (lowers, kind) = lowers(&layers, &s).unwrap();
        assert_eq!(lowers.len(), 2);
        assert_eq!(kind, "overlaybd");
        assert_eq!(*s.1.lock().unwrap(), ["sha256:l0", "sha256:l1"]);
    }

    /// Anywhere but on top an acceleration layer would be stacked as a layer (overlaybd
    /// drops only the last lower): refused, naming it. An image of nothing else has no
    /// layers.
    #[test]
    fn acceleration_layer_below_the_top_or_alone_is_refused() {
        let s = store(&["sha256:l0", "sha256:trace"]);
        let layers = [
            native_layer("sha256:trace", true),
            native_layer("sha256:l0", false),
        ];
        let refused = |layers: &[LayerDesc]| match lowers(layers, &s) {
            Ok(_) => panic!("an acceleration layer was stacked"),
            Err(e) => e.to_string(),
        };
        let e = refused(&layers);
        assert!(
            e.contains("layer 0 (sha256:trace) is an acceleration layer"),
            "{e}"
        );
        let e = refused(&[native_layer("sha256:trace", true)]);
        assert!(e.contains("no layers"), "{e}");
        assert!(s.1.lock().unwrap().is_empty());
    }

    /// A damaged TurboOCI blob: the error keeps the decompressor's error as
    /// its source, after naming the blob and the member once.
    #[test]
    fn damaged_turbo_blob_keeps_the_io_error() {
        let e = match turbo_lowers(truncated_turbo_blob(64 << 10)) {
            Ok(_) => panic!("a truncated blob unpacked"),
            Err(e) => e,
        };
        let chain = testutil::assert_clean_chain(&e);
        assert!(matches!(e, Error::Unpack { .. }), "{e:?}");
        let io = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the I/O error is the source");
        assert!(
            chain.starts_with("test: TurboOCI layer 0 (sha256:"),
            "{chain}"
        );
        assert!(
            chain.ends_with(&format!(": cannot unpack ext4.fs.meta: {io}")),
            "{chain}"
        );
    }
}
