//! What marks an image as overlaybd: the layer annotations the overlaybd snapshotter reads
//! and the `artifactType` of converted manifests and indexes (`--referrer`).

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
