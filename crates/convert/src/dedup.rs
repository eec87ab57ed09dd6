//! Glue between the conversion pipeline and the dedup database ([`crate::dedup`]).
//!
//! The pipeline uses [`Dedup`]'s lookup/record algorithm directly, through a
//! [`DedupTarget`]: the destination repository (its registry host and path name the
//! rows) plus the registry operations dedup needs ([`RegistryOps`], our registry client
//! behind [`DedupRegistry`]). The image stores know nothing of it. Hook points in
//! the pipeline (`pipeline/walk.rs`, `pipeline/layers.rs`, `pipeline/publish.rs`):
//! * before building a platform manifest: [`DedupTarget::lookup_manifest`]; a hit is
//!   re-tagged instead of converted;
//! * per layer, before any download: [`DedupTarget::lookup_layer`]; a hit is not
//!   converted; its converted blob is downloaded (digest-verified) only when its format
//!   needs it (native: as that layer's commit file when a layer above it is converted,
//!   as that layer's lower; see `OutputFormat::reuse`);
//! * after a layer push / a manifest push: [`DedupTarget::record_layer`] /
//!   [`DedupTarget::record_manifest`]. Never with `--no-upload` (dedup is off then).
//!
//! Rows are namespaced by the output format's key
//! (`OutputFormat::dedup_format_key`; for native images
//! [`ConvertOptions::dedup_format_key`]): its format version plus every option that
//! changes the converted bytes. One database handle per output format.

#[cfg(doc)]
use super::ConvertOptions;
use obddedup::resolve::{
    CopyOutcome, Dedup, DedupRegistry, DedupStats, LayerLookup, ManifestLookup, Target,
};
use obdoci::error::Chain;
use obdoci::model::{is_manifest, sniff_media_type, Manifest};
use obdoci::{Descriptor, Digest, Reference};
use obdregistry::{self as registry, Registry, Repository};
use std::sync::Arc;

/// [`DedupRegistry`] on one registry host with our client. "Missing" (`Ok(false)`,
/// [`CopyOutcome::SourceMissing`]) is only ever a 404; every other failure is an `Err`.
#[derive(Clone)]
pub struct RegistryOps {
    reg: Arc<Registry>,
}

impl RegistryOps {
    pub fn new(reg: Arc<Registry>) -> RegistryOps {
        RegistryOps { reg }
    }

    fn digest(s: &str) -> registry::Result<Digest> {
        Ok(s.parse::<Digest>()?)
    }

    /// The manifest `digest` in `repo` and its bytes, `None` on a 404.
    fn get_manifest(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> registry::Result<Option<Vec<u8>>> {
        match repo.get_manifest(&Reference::Digest(digest.clone())) {
            Ok((_, b)) => Ok(Some(b)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The config and layer descriptors of a manifest, `None` for anything else.
fn manifest_blobs(bytes: &[u8]) -> Option<Vec<Descriptor>> {
    if !is_manifest(&sniff_media_type(bytes)?) {
        return None;
    }
    let m: Manifest = serde_json::from_slice(bytes).ok()?;
    Some(std::iter::once(m.config).chain(m.layers).collect())
}

/// A registry error as dedup logs it: with its causes.
#[derive(Debug)]
pub struct OpError(pub registry::Error);

impl From<registry::Error> for OpError {
    fn from(e: registry::Error) -> OpError {
        OpError(e)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", Chain(&self.0))
    }
}

impl DedupRegistry for RegistryOps {
    type Error = OpError;

    /// A blob whose size the registry gives (`Content-Length`) and which is not `size` is
    /// not the blob the row means: a manifest naming it with `size` bytes cannot be pulled.
    fn blob_exists(&self, repo: &str, digest: &str, size: u64) -> Result<bool, OpError> {
        let stat = self
            .reg
            .repository(repo)
            .blob_stat(&Self::digest(digest)?)?;
        Ok(match stat {
            registry::BlobStat::Missing => false,
            registry::BlobStat::Present { size: Some(s) } if s != size => {
                tracing::warn!(
                    "dedup: blob {digest} in {repo} has {s} bytes, not the {size} of its database row"
                );
                false
            }
            registry::BlobStat::Present { .. } => true,
        })
    }

    fn mount_blob(&self, from_repo: &str, to_repo: &str, digest: &str) -> Result<bool, OpError> {
        let d = Descriptor::new("application/octet-stream", Self::digest(digest)?, 0);
        Ok(self.reg.repository(to_repo).mount_blob(&d, from_repo)?)
    }

    /// A manifest counts as present only with every blob it references: one whose config
    /// or layer was deleted from the repository cannot be pulled, so its row is stale.
    fn manifest_exists(&self, repo: &str, digest: &str) -> Result<bool, OpError> {
        let r = self.reg.repository(repo);
        let Some(bytes) = self.get_manifest(&r, &Self::digest(digest)?)? else {
            return Ok(false);
        };
        for b in manifest_blobs(&bytes).unwrap_or_default() {
            if !r.blob_exists(&b.digest)? {
                tracing::info!(
                    "dedup: converted manifest {digest} in {repo} references blob {}, which the registry no longer has",
                    b.digest
                );
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn copy_manifest(
        &self,
        from_repo: &str,
        to_repo: &str,
        digest: &str,
        media_type: &str,
    ) -> Result<CopyOutcome, OpError> {
        let d = Self::digest(digest)?;
        let from = self.reg.repository(from_repo);
        let Some(bytes) = self.get_manifest(&from, &d)? else {
            return Ok(CopyOutcome::SourceMissing);
        };
        let Some(blobs) = manifest_blobs(&bytes) else {
            tracing::warn!("dedup: {from_repo}@{digest} is not an image manifest; not copying it");
            return Ok(CopyOutcome::NotCopied);
        };
        let to = self.reg.repository(to_repo);
        for b in &blobs {
            if !to.mount_blob(b, from_repo)? {
                // Declined: fine if the registry just does not mount, stale if the source
                // manifest lost the blob.
                return Ok(if from.blob_exists(&b.digest)? {
                    CopyOutcome::NotCopied
                } else {
                    tracing::info!(
                        "dedup: converted manifest {digest} in {from_repo} references blob {}, which the registry no longer has",
                        b.digest
                    );
                    CopyOutcome::SourceMissing
                });
            }
        }
        // The same bytes, so the same digest.
        to.put_manifest(&Reference::Digest(d), media_type, &bytes)?;
        Ok(CopyOutcome::Copied)
    }
}

/// A reused converted object.
#[derive(Clone, Debug)]
pub struct Reused {
    pub digest: Digest,
    pub size: u64,
    /// The repository it was mounted or copied from, if not the destination.
    pub from: Option<String>,
}

/// Dedup for one destination repository: the pipeline's view of [`Dedup`].
#[derive(Clone)]
pub struct DedupTarget {
    dedup: Arc<Dedup>,
    ops: RegistryOps,
    host: String,
    repository: String,
}

impl DedupTarget {
    /// Dedup for conversions pushed to `repo` (the destination store's repository).
    pub fn new(dedup: Arc<Dedup>, repo: &Repository) -> DedupTarget {
        let reg = repo.registry().clone();
        DedupTarget {
            dedup,
            host: reg.host().to_string(),
            ops: RegistryOps::new(reg),
            repository: repo.name().to_string(),
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            host: &self.host,
            repository: &self.repository,
        }
    }

    pub fn stats(&self) -> DedupStats {
        self.dedup.stats()
    }

    fn reused(digest: String, size: u64, from: Option<String>, what: &str) -> Option<Reused> {
        match digest.parse::<Digest>() {
            Ok(digest) => Some(Reused { digest, size, from }),
            Err(e) => {
                tracing::warn!("dedup: {what}: ignoring the stored digest: {e}");
                None
            }
        }
    }

    /// A converted blob for the source layers with chain ID `chain_id`, present in the
    /// destination repository (verified there, or just mounted into it).
    pub fn lookup_layer(&self, chain_id: &Digest) -> Option<Reused> {
        use obddedup::resolve::HitSource;
        match self
            .dedup
            .lookup_layer(&self.ops, self.target(), chain_id.as_str())
        {
            LayerLookup::Hit {
                digest,
                size,
                source,
            } => {
                let from = match source {
                    HitSource::SameRepo => None,
                    HitSource::OtherRepo { from_repository } => Some(from_repository),
                };
                Self::reused(digest, size, from, &format!("layer {chain_id}"))
            }
            LayerLookup::Miss => None,
        }
    }

    /// A converted manifest (media type `media_type`) of source manifest `source`,
    /// present with all its blobs in the destination repository (verified, or copied).
    pub fn lookup_manifest(&self, media_type: &str, source: &Digest) -> Option<Reused> {
        use obddedup::resolve::HitSource;
        match self
            .dedup
            .lookup_manifest(&self.ops, self.target(), source.as_str(), media_type)
        {
            ManifestLookup::Hit {
                digest,
                size,
                source: src,
            } => {
                let from = match src {
                    HitSource::SameRepo => None,
                    HitSource::OtherRepo { from_repository } => Some(from_repository),
                };
                Self::reused(digest, size, from, &format!("manifest {source}"))
            }
            ManifestLookup::Miss => None,
        }
    }

    /// After the push of a converted layer.
    pub fn record_layer(&self, chain_id: &Digest, layer: &Descriptor) {
        self.dedup.record_layer(
            self.target(),
            chain_id.as_str(),
            layer.digest.as_str(),
            layer.size,
        );
    }

    /// After the push of a converted manifest.
    pub fn record_manifest(&self, source: &Digest, manifest: &Descriptor) {
        self.dedup.record_manifest(
            self.target(),
            source.as_str(),
            &manifest.media_type,
            manifest.digest.as_str(),
            manifest.size,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_blobs_lists_config_then_layers() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":1},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":2}]}"#;
        let b = manifest_blobs(m).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b[0].digest.hex().starts_with('a'));
        assert!(b[1].digest.hex().starts_with('b'));
        let idx = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(manifest_blobs(idx).is_none());
    }
}
