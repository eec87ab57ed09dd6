//! The pipeline's view of a conversion cache (the dedup database): it asks before
//! converting a layer or a manifest and records what it pushed. Keys follow upstream's
//! tables: layers by (host, repository, chain id of the *source* diff ids); manifests by
//! (host, repository, *output* media type, source manifest digest).
//!
//! A hit is only returned once it is usable in the destination repository right now:
//! verified there, or mounted/copied there from another repository of the same
//! registry. [`DedupCache`] implements this with [`crate::dedup::Dedup`] (upstream's
//! lookup algorithm) over the destination registry. A cache can never make a
//! conversion wrong, only faster: every failure is a miss.

use std::sync::Arc;

use crate::dedup::resolve::Dedup;
use crate::dedup::resolve::{CopyOutcome, DedupRegistry, LayerLookup, ManifestLookup, Target};
use crate::oci::{Descriptor, Digest, Manifest, Reference};
use crate::registry::{self, Registry};

/// A converted layer present in the destination repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedLayer {
    pub digest: Digest,
    pub size: u64,
}

/// A converted manifest present in the destination repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedManifest {
    pub digest: Digest,
    pub size: u64,
}

/// What the pipeline needs from a conversion database.
pub trait ConversionCache: Send + Sync {
    /// A converted blob for `chain_id`, present in `host/repo` now.
    fn lookup_layer(&self, host: &str, repo: &str, chain_id: &Digest) -> Option<CachedLayer>;
    /// Record a layer converted and pushed by this run.
    fn store_layer(&self, host: &str, repo: &str, chain_id: &Digest, layer: &CachedLayer);
    /// A converted manifest of `source` with media type `media_type`, present in `host/repo` now.
    fn lookup_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
    ) -> Option<CachedManifest>;
    /// Record a manifest converted and pushed by this run.
    fn store_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
        converted: &CachedManifest,
    );
    /// One line describing what the cache did, for the end-of-run report.
    fn summary(&self) -> String;
}

/// [`ConversionCache`] over the dedup database and the destination registry.
pub struct DedupCache {
    dedup: Dedup,
    registry: Arc<Registry>,
}

impl DedupCache {
    pub fn new(dedup: Dedup, registry: Arc<Registry>) -> Self {
        DedupCache { dedup, registry }
    }

    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }
}

/// The registry operations of [`DedupRegistry`] with our registry client. "Not found"
/// answers are `Ok(false)` / `SourceMissing`; every other failure is an error, so that
/// only a definite 404 ever deletes a row.
struct RegistryOps<'a>(&'a Arc<Registry>);

fn digest(d: &str) -> Result<Digest, registry::Error> {
    Ok(d.parse::<Digest>()?)
}

fn blob(d: &str) -> Result<Descriptor, registry::Error> {
    Ok(Descriptor::new("application/octet-stream", digest(d)?, 0))
}

impl DedupRegistry for RegistryOps<'_> {
    type Error = registry::Error;

    fn blob_exists(&self, repo: &str, d: &str) -> Result<bool, Self::Error> {
        self.0.repository(repo).blob_exists(&digest(d)?)
    }

    fn mount_blob(&self, from_repo: &str, to_repo: &str, d: &str) -> Result<bool, Self::Error> {
        self.0.repository(to_repo).mount_blob(&blob(d)?, from_repo)
    }

    /// A manifest counts as present only when its config and every layer blob are
    /// there too: re-tagging a manifest whose blob was deleted would publish a
    /// broken image, so such a manifest is a miss (and its row stale).
    fn manifest_exists(&self, repo: &str, d: &str) -> Result<bool, Self::Error> {
        let r = self.0.repository(repo);
        let bytes = match r.get_manifest(&Reference::Digest(digest(d)?)) {
            Ok((_, b)) => b,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        let m: Manifest = crate::oci::model::parse_json(&format!("manifest {d}"), &bytes)?;
        for b in std::iter::once(&m.config).chain(m.layers.iter()) {
            if !r.blob_exists(&b.digest)? {
                tracing::info!("dedup: manifest {d} in {repo} lacks blob {}", b.digest);
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn copy_manifest(
        &self,
        from_repo: &str,
        to_repo: &str,
        d: &str,
        media_type: &str,
    ) -> Result<CopyOutcome, Self::Error> {
        let r = Reference::Digest(digest(d)?);
        let bytes = match self.0.repository(from_repo).get_manifest(&r) {
            Ok((_, b)) => b,
            Err(e) if e.is_not_found() => return Ok(CopyOutcome::SourceMissing),
            Err(e) => return Err(e),
        };
        let m: Manifest = crate::oci::model::parse_json(&format!("manifest {d}"), &bytes)?;
        let to = self.0.repository(to_repo);
        for b in std::iter::once(&m.config).chain(m.layers.iter()) {
            if !to.mount_blob(b, from_repo)? {
                return Ok(CopyOutcome::NotCopied);
            }
        }
        to.put_manifest(&r, media_type, &bytes)?;
        Ok(CopyOutcome::Copied)
    }
}

impl ConversionCache for DedupCache {
    fn lookup_layer(&self, host: &str, repo: &str, chain_id: &Digest) -> Option<CachedLayer> {
        let t = Target {
            host,
            repository: repo,
        };
        match self
            .dedup
            .lookup_layer(&RegistryOps(&self.registry), t, chain_id.as_str())
        {
            LayerLookup::Hit { digest, size, .. } => Some(CachedLayer {
                digest: digest.parse().ok()?,
                size,
            }),
            LayerLookup::Miss => None,
        }
    }

    fn store_layer(&self, host: &str, repo: &str, chain_id: &Digest, layer: &CachedLayer) {
        let t = Target {
            host,
            repository: repo,
        };
        self.dedup
            .record_layer(t, chain_id.as_str(), layer.digest.as_str(), layer.size);
    }

    fn lookup_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
    ) -> Option<CachedManifest> {
        let t = Target {
            host,
            repository: repo,
        };
        match self.dedup.lookup_manifest(
            &RegistryOps(&self.registry),
            t,
            source.as_str(),
            media_type,
        ) {
            ManifestLookup::Hit { digest, size, .. } => Some(CachedManifest {
                digest: digest.parse().ok()?,
                size,
            }),
            ManifestLookup::Miss => None,
        }
    }

    fn store_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
        converted: &CachedManifest,
    ) {
        let t = Target {
            host,
            repository: repo,
        };
        self.dedup.record_manifest(
            t,
            source.as_str(),
            media_type,
            converted.digest.as_str(),
            converted.size,
        );
    }

    fn summary(&self) -> String {
        format!("dedup: {}", self.dedup.stats())
    }
}
