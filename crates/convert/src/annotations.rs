//! What marks an image as overlaybd: the layer annotations the overlaybd snapshotter reads
//! and the `artifactType` of converted manifests and indexes (`--referrer`).

use obdoci::Digest;
use std::collections::BTreeMap;

/// `artifactType` of converted overlaybd manifests and indexes (`--referrer`).
pub const ARTIFACT_TYPE_OVERLAYBD: &str = "application/vnd.containerd.overlaybd.native.v1+json";

/// Layer annotation: the digest of the overlaybd blob.
pub const ANNOTATION_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// Layer annotation: the size of the overlaybd blob.
pub const ANNOTATION_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
/// Layer annotation: the overlaybd layer format version.
pub const ANNOTATION_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
/// Value of [`ANNOTATION_VERSION`] for native overlaybd layers.
pub const OVERLAYBD_VERSION: &str = "0.1.0";

/// The annotations every converted layer blob carries, native or TurboOCI: its digest,
/// its size and the format `version`.
pub(crate) fn blob_annotations(d: &Digest, size: u64, version: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANNOTATION_BLOB_DIGEST.to_string(), d.to_string()),
        (ANNOTATION_BLOB_SIZE.to_string(), size.to_string()),
        (ANNOTATION_VERSION.to_string(), version.to_string()),
    ])
}

/// `artifactType` of TurboOCI manifests and indexes with `--referrer`.
pub const ARTIFACT_TYPE_TURBO: &str = "application/vnd.containerd.overlaybd.turbo.v1+json";
/// The format version annotation value of TurboOCI v1 layers.
pub const TURBO_OCI_VERSION: &str = "0.1.0-turbo.ociv1";
/// TurboOCI: the digest of the source layer the metadata layer reads.
pub const ANNOTATION_TURBO_TARGET_DIGEST: &str =
    "containerd.io/snapshot/overlaybd/turbo-oci/target-digest";
/// TurboOCI: the media type of that source layer (tar or gzip, as sniffed).
pub const ANNOTATION_TURBO_TARGET_MEDIA_TYPE: &str =
    "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type";
