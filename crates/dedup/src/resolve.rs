//! Upstream's dedup algorithm (reference §3.4), as pure logic over a [`ConversionDatabase`] and
//! the few registry operations it needs ([`DedupRegistry`]).
//!
//! The convertor's pipeline calls it through `convert::dedup::DedupTarget`, per platform
//! manifest:
//! 1. [`Dedup::lookup_manifest`] before any layer work. On a hit the converted manifest is in
//!    the target repository (verified, or just copied there from another repository): push it
//!    under the requested tag and stop. If that re-tag fails, convert normally.
//! 2. [`Dedup::lookup_layer`] for each layer (concurrently is fine). On a hit the converted blob
//!    is in the target repository (verified, or just mounted): skip create/apply/commit, and
//!    if a layer above it is converted, download it as this layer's commit file (that layer
//!    needs it as its lower), verifying its digest. If the download fails or its digest is
//!    wrong, convert the layer normally.
//! 3. [`Dedup::record_layer`] after a layer conversion **and its push** succeeded, and
//!    [`Dedup::record_manifest`] after the manifest push. Never with `--no-upload`: a row must
//!    only ever name a blob that was pushed (upstream writes rows anyway, §8.1).
//!
//! Differences from upstream, on purpose:
//! - Only a definite "not found" from the registry (or a layer blob whose size it gives is
//!   not the row's) deletes a row. Any other failure (auth, 5xx, network) makes the lookup
//!   skip that row and keeps it (upstream deletes on some of them).
//! - A stale row is deleted only as it was read (key, converted digest and size): a row
//!   another convertor wrote meanwhile under the same key stays (upstream deletes by key).
//! - A cross-repo layer candidate whose mount is declined is checked in its own repository,
//!   and its row is deleted if the blob is gone there (upstream keeps retrying such rows).
//! - Cross-repo manifest copies push the manifest bytes unchanged ([`DedupRegistry::copy_manifest`]),
//!   never re-serialised.
//! - Database errors never fail a conversion: they are logged, counted, and treated as a miss.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{debug, info, warn};

use super::{
    ConversionDatabase, DbError, LayerEntry, LayerKey, ManifestEntry, ManifestKey, StoreOutcome,
};

/// Outcome of copying a manifest between repositories of one registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The manifest (with its config and layers) is now in the target repository.
    Copied,
    /// The registry answered "manifest unknown" in the source repository: the row is stale.
    SourceMissing,
    /// The source exists but the copy did not happen (e.g. a blob mount was declined).
    NotCopied,
}

/// The registry operations dedup needs, all on the registry of the conversion's target host.
/// The convertor implements this with its registry client.
///
/// `Ok(false)` / [`CopyOutcome::SourceMissing`] must mean a definite "not found" answer (HTTP
/// 404 with `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN` or no body), or for [`DedupRegistry::blob_exists`]
/// a blob of another size; every other failure, including 401 and 403, must be an `Err`,
/// because "not found" deletes database rows.
pub trait DedupRegistry {
    type Error: fmt::Display;

    /// Whether blob `digest` exists in `repo` with `size` bytes. `Ok(false)` also when the
    /// registry gives it another size: a row naming that size is wrong (a manifest giving
    /// the blob that size cannot be pulled), and is deleted as a stale one.
    fn blob_exists(&self, repo: &str, digest: &str, size: u64) -> Result<bool, Self::Error>;

    /// Cross-repository blob mount `from_repo` → `to_repo`. `Ok(true)` when the blob is in
    /// `to_repo` afterwards (mounted, or already there). `Ok(false)` when the registry declined
    /// the mount (e.g. it answered 202 and opened an upload session, which the implementation
    /// must cancel).
    fn mount_blob(&self, from_repo: &str, to_repo: &str, digest: &str)
        -> Result<bool, Self::Error>;

    /// Whether manifest `digest` exists in `repo` and can be used: the convertor's
    /// implementation also requires every blob the manifest references to be there (a
    /// manifest that lost a layer cannot be pulled, nor pushed under a new tag).
    fn manifest_exists(&self, repo: &str, digest: &str) -> Result<bool, Self::Error>;

    /// Copies manifest `digest` (media type `media_type`) from `from_repo` into `to_repo` by
    /// digest: fetch its bytes, mount its config and layer blobs, and push the same bytes.
    fn copy_manifest(
        &self,
        from_repo: &str,
        to_repo: &str,
        digest: &str,
        media_type: &str,
    ) -> Result<CopyOutcome, Self::Error>;
}

/// Where a conversion writes: registry host (as typed, with `:port`) and repository path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub host: &'a str,
    pub repository: &'a str,
}

/// How a dedup hit was obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HitSource {
    /// A row for the target repository, verified in the registry.
    SameRepo,
    /// Mounted (layer) or copied (manifest) from another repository of the same registry.
    OtherRepo { from_repository: String },
}

/// Result of a layer lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerLookup {
    /// The converted blob `digest` (`size` bytes) is in the target repository.
    Hit {
        digest: String,
        size: u64,
        source: HitSource,
    },
    /// Convert the layer.
    Miss,
}

/// Result of a manifest lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestLookup {
    /// The converted manifest `digest` (`size` bytes) is in the target repository.
    Hit {
        digest: String,
        size: u64,
        source: HitSource,
    },
    /// Convert the image.
    Miss,
}

/// Counters of what dedup did, for logs and metrics (see [`Dedup::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub layer_hits_same_repo: u64,
    pub layer_hits_mounted: u64,
    pub layer_misses: u64,
    pub layers_recorded: u64,
    pub manifest_hits_same_repo: u64,
    pub manifest_hits_copied: u64,
    pub manifest_misses: u64,
    pub manifests_recorded: u64,
    /// Rows deleted because the registry no longer has their blob or manifest.
    pub stale_rows_deleted: u64,
    /// Stores that found another worker's row with a different digest.
    pub conflicts: u64,
    /// Database errors (each treated as a miss or a skipped store).
    pub db_errors: u64,
    /// Registry errors during verification, mount or copy (each skips one candidate).
    pub registry_errors: u64,
}

impl fmt::Display for DedupStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layers: {} reused in repo, {} mounted, {} converted, {} recorded; \
             manifests: {} reused in repo, {} copied, {} converted, {} recorded; \
             {} stale rows deleted, {} conflicts, {} db errors, {} registry errors",
            self.layer_hits_same_repo,
            self.layer_hits_mounted,
            self.layer_misses,
            self.layers_recorded,
            self.manifest_hits_same_repo,
            self.manifest_hits_copied,
            self.manifest_misses,
            self.manifests_recorded,
            self.stale_rows_deleted,
            self.conflicts,
            self.db_errors,
            self.registry_errors
        )
    }
}

#[derive(Default)]
struct Counters([AtomicU64; 12]);

#[derive(Clone, Copy)]
enum C {
    LayerSame,
    LayerMounted,
    LayerMiss,
    LayerRecorded,
    ManSame,
    ManCopied,
    ManMiss,
    ManRecorded,
    Stale,
    Conflict,
    DbErr,
    RegErr,
}

impl Counters {
    fn inc(&self, c: C) {
        self.0[c as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self, c: C) -> u64 {
        self.0[c as usize].load(Ordering::Relaxed)
    }
}

/// The dedup database plus counters; shareable between the pipeline's threads.
pub struct Dedup {
    db: Box<dyn ConversionDatabase>,
    counters: Counters,
    /// A statement timed out ([`DbError::is_timeout`]): the database is not used any more
    /// in this run (every lookup a miss, nothing recorded). A server that stopped answering
    /// would otherwise make every statement wait out its timeouts again.
    given_up: AtomicBool,
}

impl fmt::Debug for Dedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("db", &self.db.describe())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Dedup {
    pub fn new(db: Box<dyn ConversionDatabase>) -> Dedup {
        Dedup {
            db,
            counters: Counters::default(),
            given_up: AtomicBool::new(false),
        }
    }

    pub fn db(&self) -> &dyn ConversionDatabase {
        self.db.as_ref()
    }

    pub fn stats(&self) -> DedupStats {
        let c = &self.counters;
        DedupStats {
            layer_hits_same_repo: c.get(C::LayerSame),
            layer_hits_mounted: c.get(C::LayerMounted),
            layer_misses: c.get(C::LayerMiss),
            layers_recorded: c.get(C::LayerRecorded),
            manifest_hits_same_repo: c.get(C::ManSame),
            manifest_hits_copied: c.get(C::ManCopied),
            manifest_misses: c.get(C::ManMiss),
            manifests_recorded: c.get(C::ManRecorded),
            stale_rows_deleted: c.get(C::Stale),
            conflicts: c.get(C::Conflict),
            db_errors: c.get(C::DbErr),
            registry_errors: c.get(C::RegErr),
        }
    }

    fn db_error(&self, what: &str, e: &DbError) {
        self.counters.inc(C::DbErr);
        warn!(
            "dedup: {what}: {}; continuing without dedup for it",
            crate::with_causes(e)
        );
        if e.is_timeout() && !self.given_up.swap(true, Ordering::Relaxed) {
            warn!(
                "dedup: {} did not answer in time; not using it for the rest of this run",
                self.db.describe()
            );
        }
    }

    /// Whether the database is not used any more in this run (see `given_up`).
    fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Relaxed)
    }

    fn reg_error(&self, what: &str, e: &dyn fmt::Display) {
        self.counters.inc(C::RegErr);
        warn!("dedup: {what}: {e}");
    }

    fn deleted_stale(&self, what: &str, r: Result<bool, DbError>) {
        match r {
            Ok(true) => {
                self.counters.inc(C::Stale);
                info!("dedup: deleted stale row: {what}");
            }
            Ok(false) => debug!("dedup: stale row already gone: {what}"),
            Err(e) => self.db_error(&format!("deleting stale row {what}"), &e),
        }
    }

    /// Finds a converted blob for source chain ID `chain_id` usable in `target` (see the module
    /// doc). Never fails: problems are logged and make it a miss.
    pub fn lookup_layer<R: DedupRegistry>(
        &self,
        reg: &R,
        target: Target<'_>,
        chain_id: &str,
    ) -> LayerLookup {
        match self.lookup(reg, target, Object::Layer { chain_id }) {
            Some((digest, size, source)) => LayerLookup::Hit {
                digest,
                size,
                source,
            },
            None => LayerLookup::Miss,
        }
    }

    /// Records that `chain_id` was converted to blob `digest` (`size` bytes), now pushed to
    /// `target`. Call only after the push succeeded. Returns whether the row for `target` now
    /// names `digest` (false on a conflict or a database error, both logged).
    pub fn record_layer(
        &self,
        target: Target<'_>,
        chain_id: &str,
        digest: &str,
        size: u64,
    ) -> bool {
        self.record(target, Object::Layer { chain_id }, digest, size)
    }

    /// Finds a converted manifest for source manifest `original_digest` with output media type
    /// `media_type`, usable in `target` (see the module doc). Never fails.
    pub fn lookup_manifest<R: DedupRegistry>(
        &self,
        reg: &R,
        target: Target<'_>,
        original_digest: &str,
        media_type: &str,
    ) -> ManifestLookup {
        let obj = Object::Manifest {
            original_digest,
            media_type,
        };
        match self.lookup(reg, target, obj) {
            Some((digest, size, source)) => ManifestLookup::Hit {
                digest,
                size,
                source,
            },
            None => ManifestLookup::Miss,
        }
    }

    /// Records that source manifest `original_digest` was converted to `digest` (`media_type`,
    /// `size` bytes), now pushed to `target`. Call only after the push succeeded.
    pub fn record_manifest(
        &self,
        target: Target<'_>,
        original_digest: &str,
        media_type: &str,
        digest: &str,
        size: u64,
    ) -> bool {
        let obj = Object::Manifest {
            original_digest,
            media_type,
        };
        self.record(target, obj, digest, size)
    }

    /// The lookup of the module doc, for layers and manifests alike: the target's own row,
    /// verified in the registry, else another repository's row whose object can be mounted
    /// or copied over. Rows whose object is gone are deleted. Returns digest, size, source.
    fn lookup<R: DedupRegistry>(
        &self,
        reg: &R,
        target: Target<'_>,
        obj: Object<'_>,
    ) -> Option<(String, u64, HitSource)> {
        let hit = self.lookup_inner(reg, target, obj);
        let name = obj.name();
        match &hit {
            Some((digest, _, HitSource::SameRepo)) => {
                self.count(obj, C::LayerSame, C::ManSame);
                info!(
                    "dedup: {name} already converted as {digest} in {}",
                    target.repository
                );
            }
            Some((digest, _, HitSource::OtherRepo { from_repository })) => {
                self.count(obj, C::LayerMounted, C::ManCopied);
                let how = obj.pick("mounted", "copied");
                info!(
                    "dedup: {name} converted as {digest} {how} from {from_repository} into {}",
                    target.repository
                );
            }
            None => {
                self.count(obj, C::LayerMiss, C::ManMiss);
                debug!(
                    "dedup: {name}: no usable converted {}",
                    obj.pick("layer", "manifest")
                );
            }
        }
        hit
    }

    fn lookup_inner<R: DedupRegistry>(
        &self,
        reg: &R,
        target: Target<'_>,
        obj: Object<'_>,
    ) -> Option<(String, u64, HitSource)> {
        if self.given_up() {
            return None;
        }
        match self.stored(target.host, target.repository, obj) {
            Ok(Some(row)) => match obj.exists(reg, target.repository, &row.digest, row.size) {
                Ok(true) => return Some((row.digest, row.size, HitSource::SameRepo)),
                Ok(false) => self.deleted_stale(
                    &obj.gone(&row.digest, target.repository),
                    self.delete(target.host, obj, &row),
                ),
                Err(err) => self.reg_error(&obj.checking(&row.digest, target.repository), &err),
            },
            Ok(None) => {}
            Err(e) => {
                self.db_error(&format!("looking up {}", obj.name()), &e);
                return None;
            }
        }

        if self.given_up() {
            return None;
        }
        let candidates = match self.stored_elsewhere(target.host, obj) {
            Ok(c) => c,
            Err(e) => {
                self.db_error(
                    &format!("looking up {} in other repositories", obj.name()),
                    &e,
                );
                return None;
            }
        };
        for cand in candidates
            .into_iter()
            .filter(|c| c.repository != target.repository)
        {
            let (from, digest) = (&cand.repository, &cand.digest);
            match obj.bring(reg, from, target.repository, digest, cand.size) {
                Ok(CopyOutcome::Copied) => {
                    self.record(target, obj, digest, cand.size);
                    return Some((
                        cand.digest,
                        cand.size,
                        HitSource::OtherRepo {
                            from_repository: cand.repository,
                        },
                    ));
                }
                Ok(CopyOutcome::SourceMissing) => self.deleted_stale(
                    &obj.gone(digest, from),
                    self.delete(target.host, obj, &cand),
                ),
                Ok(CopyOutcome::NotCopied) => {}
                Err((what, err)) => self.reg_error(&what, &err),
            }
        }
        None
    }

    /// Stores the row `obj` → `digest` for `target`; see [`Dedup::record_layer`].
    fn record(&self, target: Target<'_>, obj: Object<'_>, digest: &str, size: u64) -> bool {
        let name = obj.name();
        if self.given_up() {
            debug!("dedup: not recording {name} → {digest}: the database is not used any more");
            return false;
        }
        let repo = target.repository;
        let outcome = match obj {
            Object::Layer { chain_id } => self
                .db
                .create_layer_entry(&LayerEntry {
                    host: target.host.to_string(),
                    repository: repo.to_string(),
                    chain_id: chain_id.to_string(),
                    converted_digest: digest.to_string(),
                    data_size: size,
                })
                .map(|o| o.map(|e| (e.converted_digest, e.data_size))),
            Object::Manifest {
                original_digest,
                media_type,
            } => self
                .db
                .create_manifest_entry(&ManifestEntry {
                    host: target.host.to_string(),
                    repository: repo.to_string(),
                    original_digest: original_digest.to_string(),
                    media_type: media_type.to_string(),
                    converted_digest: digest.to_string(),
                    data_size: size,
                })
                .map(|o| o.map(|e| (e.converted_digest, e.data_size))),
        };
        match outcome {
            Ok(StoreOutcome::Inserted) => {
                self.count(obj, C::LayerRecorded, C::ManRecorded);
                debug!("dedup: recorded {name} → {digest} in {repo}");
                true
            }
            Ok(StoreOutcome::AlreadyPresent) => {
                debug!("dedup: {name} → {digest} in {repo} was recorded by another worker");
                true
            }
            Ok(StoreOutcome::Conflict {
                existing: (existing, existing_size),
            }) => {
                self.counters.inc(C::Conflict);
                warn!(
                    "dedup: {name} in {}/{repo}: we made {digest} ({size} bytes) but the database already has {existing} ({existing_size} bytes) for format {}; conversion is not deterministic or two tool builds share a format key",
                    target.host, self.db.format_key()
                );
                false
            }
            Err(e) => {
                self.db_error(&format!("recording {name}"), &e);
                false
            }
        }
    }

    fn count(&self, obj: Object<'_>, layer: C, manifest: C) {
        self.counters.inc(obj.pick(layer, manifest));
    }

    /// The row of `obj` for `host/repo`, if any.
    fn stored(&self, host: &str, repo: &str, obj: Object<'_>) -> Result<Option<Stored>, DbError> {
        Ok(match obj {
            Object::Layer { chain_id } => self
                .db
                .get_layer_entry_for_repo(LayerKey {
                    host,
                    repository: repo,
                    chain_id,
                })?
                .map(Stored::from),
            Object::Manifest {
                original_digest,
                media_type,
            } => self
                .db
                .get_manifest_entry_for_repo(ManifestKey {
                    host,
                    repository: repo,
                    original_digest,
                    media_type,
                })?
                .map(Stored::from),
        })
    }

    /// The rows of `obj` in every repository of `host`.
    fn stored_elsewhere(&self, host: &str, obj: Object<'_>) -> Result<Vec<Stored>, DbError> {
        Ok(match obj {
            Object::Layer { chain_id } => self
                .db
                .get_cross_repo_layer_entries(host, chain_id)?
                .into_iter()
                .map(Stored::from)
                .collect(),
            Object::Manifest {
                original_digest,
                media_type,
            } => self
                .db
                .get_cross_repo_manifest_entries(host, media_type, original_digest)?
                .into_iter()
                .map(Stored::from)
                .collect(),
        })
    }

    /// Deletes the row of `obj` found stale, as it was read (`row`): a row written
    /// meanwhile under its key by another convertor is not the stale one and stays.
    fn delete(&self, host: &str, obj: Object<'_>, row: &Stored) -> Result<bool, DbError> {
        match obj {
            Object::Layer { chain_id } => self.db.delete_layer_entry(&LayerEntry {
                host: host.to_string(),
                repository: row.repository.clone(),
                chain_id: chain_id.to_string(),
                converted_digest: row.digest.clone(),
                data_size: row.size,
            }),
            Object::Manifest {
                original_digest,
                media_type,
            } => self.db.delete_manifest_entry(&ManifestEntry {
                host: host.to_string(),
                repository: row.repository.clone(),
                original_digest: original_digest.to_string(),
                media_type: media_type.to_string(),
                converted_digest: row.digest.clone(),
                data_size: row.size,
            }),
        }
    }
}

/// What a lookup or record is about: a layer, by the chain ID of its source layers, or a
/// manifest, by its source digest and output media type.
#[derive(Clone, Copy, Debug)]
enum Object<'a> {
    Layer {
        chain_id: &'a str,
    },
    Manifest {
        original_digest: &'a str,
        media_type: &'a str,
    },
}

impl Object<'_> {
    fn pick<T>(&self, layer: T, manifest: T) -> T {
        match self {
            Object::Layer { .. } => layer,
            Object::Manifest { .. } => manifest,
        }
    }

    /// `layer <chain id>` / `manifest <source digest>`, for messages.
    fn name(&self) -> String {
        match self {
            Object::Layer { chain_id } => format!("layer {chain_id}"),
            Object::Manifest {
                original_digest, ..
            } => format!("manifest {original_digest}"),
        }
    }

    /// A stale row: its converted object is no longer in `repo`.
    fn gone(&self, digest: &str, repo: &str) -> String {
        let what = self.pick("blob gone", "gone");
        format!("{} → {digest} ({what} from {repo})", self.name())
    }

    /// The check of a converted object in `repo`, for messages.
    fn checking(&self, digest: &str, repo: &str) -> String {
        format!(
            "checking {} {digest} in {repo}",
            self.pick("blob", "manifest")
        )
    }

    /// Whether the converted object `digest` is usable in `repo` (a blob: with `size`
    /// bytes; a manifest's size is that of the bytes fetched to reuse it).
    fn exists<R: DedupRegistry>(
        &self,
        reg: &R,
        repo: &str,
        digest: &str,
        size: u64,
    ) -> Result<bool, R::Error> {
        match self {
            Object::Layer { .. } => reg.blob_exists(repo, digest, size),
            Object::Manifest { .. } => reg.manifest_exists(repo, digest),
        }
    }

    /// Makes the converted object `digest` of `from` available in `to`: a blob mount or a
    /// manifest copy. A declined mount is `SourceMissing` only when the blob is gone from
    /// `from`; a mounted blob must show in `to` with the row's `size`, and when it does
    /// not, the row is wrong (`SourceMissing`) only if `from` does not have it with that
    /// size either. An error comes with what was being done.
    fn bring<R: DedupRegistry>(
        &self,
        reg: &R,
        from: &str,
        to: &str,
        digest: &str,
        size: u64,
    ) -> Result<CopyOutcome, (String, R::Error)> {
        match self {
            Object::Layer { .. } => match reg.mount_blob(from, to, digest) {
                Ok(true) => match reg.blob_exists(to, digest, size) {
                    Ok(true) => Ok(CopyOutcome::Copied),
                    // Not there (yet: an eventually consistent registry), or of
                    // another size: the source decides whether the row is wrong.
                    Ok(false) => match reg.blob_exists(from, digest, size) {
                        Ok(false) => Ok(CopyOutcome::SourceMissing),
                        Ok(true) => {
                            debug!("dedup: mounted {digest} from {from} is not in {to} yet");
                            Ok(CopyOutcome::NotCopied)
                        }
                        Err(e) => Err((self.checking(digest, from), e)),
                    },
                    Err(e) => Err((self.checking(digest, to), e)),
                },
                Ok(false) => match reg.blob_exists(from, digest, size) {
                    Ok(false) => Ok(CopyOutcome::SourceMissing),
                    Ok(true) => {
                        debug!("dedup: registry declined mounting {digest} from {from}");
                        Ok(CopyOutcome::NotCopied)
                    }
                    Err(e) => Err((self.checking(digest, from), e)),
                },
                Err(e) => Err((format!("mounting {digest} from {from}"), e)),
            },
            Object::Manifest { media_type, .. } => {
                match reg.copy_manifest(from, to, digest, media_type) {
                    Ok(CopyOutcome::NotCopied) => {
                        debug!("dedup: could not copy manifest {digest} from {from}");
                        Ok(CopyOutcome::NotCopied)
                    }
                    Ok(o) => Ok(o),
                    Err(e) => Err((format!("copying manifest {digest} from {from}"), e)),
                }
            }
        }
    }
}

/// A row as the lookup needs it: where, which converted object, how big.
struct Stored {
    repository: String,
    digest: String,
    size: u64,
}

impl From<LayerEntry> for Stored {
    fn from(e: LayerEntry) -> Stored {
        Stored {
            repository: e.repository,
            digest: e.converted_digest,
            size: e.data_size,
        }
    }
}

impl From<ManifestEntry> for Stored {
    fn from(e: ManifestEntry) -> Stored {
        Stored {
            repository: e.repository,
            digest: e.converted_digest,
            size: e.data_size,
        }
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::open;
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    const HOST: &str = "localhost:5000";
    const MT: &str = "application/vnd.oci.image.manifest.v1+json";

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// A registry in memory: per repository, the set of blob digests and of manifests
    /// (digest → blob digests it references). Only for exercising the lookup logic.
    #[derive(Default)]
    struct MemRegistry {
        blobs: Mutex<HashMap<String, HashSet<String>>>,
        manifests: Mutex<HashMap<String, HashMap<String, Vec<String>>>>,
        /// Repositories whose every call fails (like a 401 or a 503).
        broken: HashSet<String>,
        /// Repositories the registry refuses to mount from (answers 202).
        no_mount_from: HashSet<String>,
        /// Blob sizes the registry reports (digest → bytes); a blob not listed has the
        /// size it is asked about.
        sizes: Mutex<HashMap<String, u64>>,
        /// Mounts answered 201 whose blob the target repository does not show yet (an
        /// eventually consistent registry).
        lagging_mounts: bool,
    }

    impl MemRegistry {
        fn put_blob(&self, repo: &str, digest: &str) {
            self.blobs
                .lock()
                .unwrap()
                .entry(repo.into())
                .or_default()
                .insert(digest.into());
        }
        fn del_blob(&self, repo: &str, digest: &str) {
            self.blobs
                .lock()
                .unwrap()
                .get_mut(repo)
                .unwrap()
                .remove(digest);
        }
        fn has_blob(&self, repo: &str, digest: &str) -> bool {
            self.blobs
                .lock()
                .unwrap()
                .get(repo)
                .is_some_and(|s| s.contains(digest))
        }
        fn put_manifest(&self, repo: &str, digest: &str, blobs: &[String]) {
            for b in blobs {
                self.put_blob(repo, b);
            }
            self.manifests
                .lock()
                .unwrap()
                .entry(repo.into())
                .or_default()
                .insert(digest.into(), blobs.to_vec());
        }
        fn check(&self, repo: &str) -> Result<(), String> {
            if self.broken.contains(repo) {
                Err(format!("503 from {repo}"))
            } else {
                Ok(())
            }
        }
    }

    impl DedupRegistry for MemRegistry {
        type Error = String;
        fn blob_exists(&self, repo: &str, digest: &str, size: u64) -> Result<bool, String> {
            self.check(repo)?;
            let sized = self
                .sizes
                .lock()
                .unwrap()
                .get(digest)
                .is_none_or(|&s| s == size);
            Ok(self.has_blob(repo, digest) && sized)
        }
        fn mount_blob(&self, from: &str, to: &str, digest: &str) -> Result<bool, String> {
            self.check(from)?;
            self.check(to)?;
            if self.has_blob(to, digest) {
                return Ok(true);
            }
            if self.no_mount_from.contains(from) || !self.has_blob(from, digest) {
                return Ok(false);
            }
            if !self.lagging_mounts {
                self.put_blob(to, digest);
            }
            Ok(true)
        }
        fn manifest_exists(&self, repo: &str, digest: &str) -> Result<bool, String> {
            self.check(repo)?;
            Ok(self
                .manifests
                .lock()
                .unwrap()
                .get(repo)
                .is_some_and(|m| m.contains_key(digest)))
        }
        fn copy_manifest(
            &self,
            from: &str,
            to: &str,
            digest: &str,
            _media_type: &str,
        ) -> Result<CopyOutcome, String> {
            self.check(from)?;
            let blobs = match self
                .manifests
                .lock()
                .unwrap()
                .get(from)
                .and_then(|m| m.get(digest))
            {
                Some(b) => b.clone(),
                None => return Ok(CopyOutcome::SourceMissing),
            };
            for b in &blobs {
                if !self.mount_blob(from, to, b)? {
                    return Ok(CopyOutcome::NotCopied);
                }
            }
            self.put_manifest(to, digest, &blobs);
            Ok(CopyOutcome::Copied)
        }
    }

    fn dedup(dir: &tempfile::TempDir, format: &str) -> Dedup {
        let path = dir.path().join("dedup.sqlite");
        Dedup::new(
            open("sqlite", path.to_str().unwrap(), format)
                .unwrap()
                .unwrap(),
        )
    }

    fn t(repo: &str) -> Target<'_> {
        Target {
            host: HOST,
            repository: repo,
        }
    }

    #[test]
    fn layer_miss_record_then_same_repo_hit() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        assert_eq!(dd.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        reg.put_blob("app", &blob);
        assert!(dd.record_layer(t("app"), &chain, &blob, 123));
        assert_eq!(
            dd.lookup_layer(&reg, t("app"), &chain),
            LayerLookup::Hit {
                digest: blob.clone(),
                size: 123,
                source: HitSource::SameRepo
            }
        );
        // Recording again (a second worker) is fine and not a new row.
        assert!(dd.record_layer(t("app"), &chain, &blob, 123));
        let s = dd.stats();
        assert_eq!(
            (
                s.layer_misses,
                s.layer_hits_same_repo,
                s.layers_recorded,
                s.conflicts
            ),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn stale_same_repo_row_is_deleted_and_missed() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        reg.put_blob("app", &blob);
        assert!(dd.record_layer(t("app"), &chain, &blob, 5));
        reg.del_blob("app", &blob);
        assert_eq!(dd.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        let key = LayerKey {
            host: HOST,
            repository: "app",
            chain_id: &chain,
        };
        assert_eq!(dd.db().get_layer_entry_for_repo(key).unwrap(), None);
        assert_eq!(dd.stats().stale_rows_deleted, 1);
    }

    /// A row whose size is not its blob's would make a manifest that cannot be pulled:
    /// it is deleted, in the target repository and as a candidate of another one.
    #[test]
    fn a_row_with_another_size_is_deleted_and_missed() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        reg.sizes.lock().unwrap().insert(blob.clone(), 4096);
        for repo in ["app", "lib"] {
            reg.put_blob(repo, &blob);
            assert!(dd.record_layer(t(repo), &chain, &blob, 4608));
        }
        assert_eq!(dd.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        assert_eq!(dd.lookup_layer(&reg, t("new"), &chain), LayerLookup::Miss);
        assert!(dd
            .db()
            .get_cross_repo_layer_entries(HOST, &chain)
            .unwrap()
            .is_empty());
        assert_eq!(dd.stats().stale_rows_deleted, 2);
        // The right size is reused.
        assert!(dd.record_layer(t("lib"), &chain, &blob, 4096));
        assert!(matches!(
            dd.lookup_layer(&reg, t("new"), &chain),
            LayerLookup::Hit { size: 4096, .. }
        ));
    }

    /// A mounted blob the target repository does not show yet (an eventually
    /// consistent registry) is not copied, but the source's row, whose blob is
    /// there with its size, stays: only a definite "not found" deletes a row.
    #[test]
    fn a_mount_not_visible_yet_keeps_the_source_row() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry {
            lagging_mounts: true,
            ..Default::default()
        };
        let (chain, blob) = (d('1'), d('a'));
        reg.put_blob("lib", &blob);
        assert!(dd.record_layer(t("lib"), &chain, &blob, 4096));
        assert_eq!(dd.lookup_layer(&reg, t("new"), &chain), LayerLookup::Miss);
        assert_eq!(
            dd.db()
                .get_cross_repo_layer_entries(HOST, &chain)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(dd.stats().stale_rows_deleted, 0);
    }

    #[test]
    fn registry_error_keeps_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let mut reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        reg.put_blob("app", &blob);
        assert!(dd.record_layer(t("app"), &chain, &blob, 5));
        reg.broken.insert("app".into());
        assert_eq!(dd.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        let key = LayerKey {
            host: HOST,
            repository: "app",
            chain_id: &chain,
        };
        assert!(dd.db().get_layer_entry_for_repo(key).unwrap().is_some());
        assert_eq!(dd.stats().registry_errors, 1);
        assert_eq!(dd.stats().stale_rows_deleted, 0);
    }

    #[test]
    fn cross_repo_mount_skips_stale_and_records_target_row() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        // "old" has a row but lost the blob; "lib" still has it.
        assert!(dd.record_layer(t("old"), &chain, &blob, 7));
        reg.put_blob("lib", &blob);
        assert!(dd.record_layer(t("lib"), &chain, &blob, 7));

        let hit = dd.lookup_layer(&reg, t("app"), &chain);
        assert_eq!(
            hit,
            LayerLookup::Hit {
                digest: blob.clone(),
                size: 7,
                source: HitSource::OtherRepo {
                    from_repository: "lib".into()
                }
            }
        );
        assert!(reg.has_blob("app", &blob));
        let rows = dd.db().get_cross_repo_layer_entries(HOST, &chain).unwrap();
        let mut repos: Vec<_> = rows.iter().map(|r| r.repository.as_str()).collect();
        repos.sort();
        assert_eq!(
            repos,
            ["app", "lib"],
            "old's stale row deleted, app's row added"
        );
        // Next time it is a same-repo hit.
        assert!(matches!(
            dd.lookup_layer(&reg, t("app"), &chain),
            LayerLookup::Hit {
                source: HitSource::SameRepo,
                ..
            }
        ));
    }

    #[test]
    fn declined_mount_keeps_a_live_row() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let mut reg = MemRegistry::default();
        reg.no_mount_from.insert("lib".into());
        let (chain, blob) = (d('1'), d('a'));
        reg.put_blob("lib", &blob);
        assert!(dd.record_layer(t("lib"), &chain, &blob, 7));
        assert_eq!(dd.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        assert_eq!(
            dd.db()
                .get_cross_repo_layer_entries(HOST, &chain)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(dd.stats().stale_rows_deleted, 0);
    }

    #[test]
    fn other_format_rows_are_invisible() {
        let dir = tempfile::tempdir().unwrap();
        let old = dedup(&dir, "test/1");
        let new = dedup(&dir, "test/2");
        let reg = MemRegistry::default();
        let (chain, blob) = (d('1'), d('a'));
        reg.put_blob("app", &blob);
        assert!(old.record_layer(t("app"), &chain, &blob, 7));
        assert_eq!(new.lookup_layer(&reg, t("app"), &chain), LayerLookup::Miss);
        assert_eq!(
            new.lookup_layer(&reg, t("other"), &chain),
            LayerLookup::Miss
        );
        assert!(!reg.has_blob("other", &blob));
        // The old format's row is untouched.
        assert!(matches!(
            old.lookup_layer(&reg, t("app"), &chain),
            LayerLookup::Hit { .. }
        ));
    }

    #[test]
    fn conflicting_record_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let chain = d('1');
        assert!(dd.record_layer(t("app"), &chain, &d('a'), 7));
        assert!(!dd.record_layer(t("app"), &chain, &d('b'), 7));
        assert_eq!(dd.stats().conflicts, 1);
        let key = LayerKey {
            host: HOST,
            repository: "app",
            chain_id: &chain,
        };
        assert_eq!(
            dd.db()
                .get_layer_entry_for_repo(key)
                .unwrap()
                .unwrap()
                .converted_digest,
            d('a')
        );
    }

    #[test]
    fn manifest_same_repo_stale_and_cross_repo() {
        let dir = tempfile::tempdir().unwrap();
        let dd = dedup(&dir, "test/1");
        let reg = MemRegistry::default();
        let (src, out) = (d('5'), d('6'));
        let blobs = [d('c'), d('a'), d('b')];
        assert_eq!(
            dd.lookup_manifest(&reg, t("app"), &src, MT),
            ManifestLookup::Miss
        );

        reg.put_manifest("app", &out, &blobs);
        assert!(dd.record_manifest(t("app"), &src, MT, &out, 900));
        assert_eq!(
            dd.lookup_manifest(&reg, t("app"), &src, MT),
            ManifestLookup::Hit {
                digest: out.clone(),
                size: 900,
                source: HitSource::SameRepo
            }
        );
        // Another media type is another key.
        assert_eq!(
            dd.lookup_manifest(
                &reg,
                t("app"),
                &src,
                "application/vnd.docker.distribution.manifest.v2+json"
            ),
            ManifestLookup::Miss
        );

        // Cross-repo: copied with its blobs, row recorded for the target.
        assert_eq!(
            dd.lookup_manifest(&reg, t("copy"), &src, MT),
            ManifestLookup::Hit {
                digest: out.clone(),
                size: 900,
                source: HitSource::OtherRepo {
                    from_repository: "app".into()
                }
            }
        );
        for b in &blobs {
            assert!(reg.has_blob("copy", b));
        }
        assert_eq!(
            dd.db()
                .get_cross_repo_manifest_entries(HOST, MT, &src)
                .unwrap()
                .len(),
            2
        );

        // Delete the manifest from both repos: both rows are stale and get deleted.
        reg.manifests.lock().unwrap().clear();
        assert_eq!(
            dd.lookup_manifest(&reg, t("third"), &src, MT),
            ManifestLookup::Miss
        );
        assert_eq!(
            dd.lookup_manifest(&reg, t("app"), &src, MT),
            ManifestLookup::Miss
        );
        assert!(dd
            .db()
            .get_cross_repo_manifest_entries(HOST, MT, &src)
            .unwrap()
            .is_empty());
        let s = dd.stats();
        assert_eq!(s.stale_rows_deleted, 2, "{s}");
        assert_eq!((s.manifest_hits_same_repo, s.manifest_hits_copied), (1, 1));
    }

    #[test]
    fn dedup_is_shareable_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Dedup>();
    }

    /// Two workers (separate handles on one database file) convert the same layers at the same
    /// time: each either converts and records, or reuses; nobody fails, no conflict, one row.
    #[test]
    fn two_workers_racing_on_the_same_layers() {
        let dir = tempfile::tempdir().unwrap();
        let workers = [dedup(&dir, "test/1"), dedup(&dir, "test/1")];
        let reg = MemRegistry::default();
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for w in &workers {
                let (reg, barrier) = (&reg, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..30u8 {
                        let chain = format!("sha256:{:064x}", i);
                        let blob = format!("sha256:{:064x}", 1000 + i as u32);
                        if w.lookup_layer(reg, t("app"), &chain) == LayerLookup::Miss {
                            // "convert" deterministically and push, then record
                            reg.put_blob("app", &blob);
                            assert!(w.record_layer(t("app"), &chain, &blob, 10));
                        }
                    }
                });
            }
        });
        let stats: Vec<DedupStats> = workers.iter().map(|w| w.stats()).collect();
        let sum = |f: fn(&DedupStats) -> u64| stats.iter().map(f).sum::<u64>();
        assert_eq!(sum(|s| s.conflicts) + sum(|s| s.db_errors), 0, "{stats:?}");
        assert_eq!(
            sum(|s| s.layer_misses) + sum(|s| s.layer_hits_same_repo),
            60
        );
        assert_eq!(sum(|s| s.layers_recorded), 30, "one row per layer");
        assert!(sum(|s| s.layer_hits_same_repo) <= 30);
    }
}
