//! Hook points for a conversion cache (the dedup database): the pipeline asks before
//! converting a layer or a manifest and records what it pushed. Keys follow upstream's
//! tables: layers by (host, repository, chain id of the *source* diff ids); manifests by
//! (host, repository, *output* media type, source manifest digest).
//!
//! Every hit is re-validated against the destination before use, and a failed store is
//! only logged, as upstream does; the cache can never make a conversion wrong, only
//! faster.

use crate::oci::Digest;

/// A converted layer known to the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedLayer {
    pub digest: Digest,
    pub size: u64,
    /// Repository (same host) holding the blob when it is not the destination
    /// repository: the pipeline mounts it from there (cross-repository dedup).
    pub repository: Option<String>,
}

/// A converted manifest known to the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedManifest {
    pub digest: Digest,
    pub size: u64,
}

/// What the pipeline needs from a conversion database.
pub trait ConversionCache: Send + Sync {
    /// A converted layer for this chain id: in `repo` first, else in another
    /// repository of `host` (then `CachedLayer::repository` names it).
    fn lookup_layer(&self, host: &str, repo: &str, chain_id: &Digest) -> Option<CachedLayer>;
    fn store_layer(&self, host: &str, repo: &str, chain_id: &Digest, layer: &CachedLayer);
    /// Forget a row whose blob turned out to be missing.
    fn forget_layer(&self, host: &str, repo: &str, chain_id: &Digest);
    fn lookup_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
    ) -> Option<CachedManifest>;
    fn store_manifest(
        &self,
        host: &str,
        repo: &str,
        media_type: &str,
        source: &Digest,
        converted: &CachedManifest,
    );
    fn forget_manifest(&self, host: &str, repo: &str, media_type: &str, source: &Digest);
}
