//! The index walk: from the source object down to platform manifests, and per manifest
//! the steps around its layers (checks, manifest-level dedup, config and chain IDs).
//! Every function returns one converted descriptor per output.

use super::publish::Pending;
use super::Run;
use crate::annotations::ANNOTATION_BLOB_DIGEST;
use crate::dedup::Reused;
use crate::{Error, Result};
use blockdev::stack::MAX_LAYERS;
use obdoci::error::Chain;
use obdoci::model::*;
use obdoci::{chain_ids, Descriptor};
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;

impl Run<'_> {
    /// Converts a manifest or index (`top`: the source object itself, pushed under the
    /// output tags).
    pub(super) fn process(
        &self,
        desc: &Descriptor,
        bytes: Vec<u8>,
        top: bool,
    ) -> Result<Vec<Descriptor>> {
        self.check_abort()?;
        let sniffed = sniff_media_type(&bytes);
        let mt = if desc.media_type.is_empty() {
            sniffed.unwrap_or_default()
        } else {
            // A descriptor that calls a manifest an index (or the other way round) would
            // otherwise be parsed as what it is not, e.g. "no image manifests".
            if let Some(found) = sniffed.filter(|f| {
                (is_manifest(f) && is_index(&desc.media_type))
                    || (is_index(f) && is_manifest(&desc.media_type))
            }) {
                return Err(Error::Invalid(format!(
                    "{}@{}: the descriptor's media type is {} but the content is {found}",
                    self.c.src.name(),
                    desc.digest,
                    desc.media_type
                )));
            }
            desc.media_type.clone()
        };
        if is_manifest(&mt) {
            self.build_one(desc, &bytes, top)
        } else if is_index(&mt) {
            self.build_index(desc, &bytes, top)
        } else {
            Err(Error::Unsupported(format!(
                "{}@{}: unsupported media type {mt:?} (expected an OCI or Docker schema-2 manifest or index)",
                self.c.src.name(),
                desc.digest
            )))
        }
    }

    fn build_index(&self, desc: &Descriptor, bytes: &[u8], top: bool) -> Result<Vec<Descriptor>> {
        let what = format!("index {}@{}", self.c.src.name(), desc.digest);
        let idx: Index = parse_json(&what, bytes)?;
        let mut children = Vec::new();
        for c in &idx.manifests {
            if let Some(why) = skipped_entry(c) {
                tracing::warn!("{what}: skipping {}: {why}", c.digest);
                continue;
            }
            children.push(c.clone());
        }
        if children.is_empty() {
            return Err(Error::Invalid(format!(
                "{what}: no image manifests to convert"
            )));
        }
        let what_ref = &what;
        type ChildResult = Result<Option<Vec<Descriptor>>>;
        let results: Vec<ChildResult> = std::thread::scope(|s| {
            let handles: Vec<_> = children
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = self.child(what_ref, c);
                        if r.is_err() {
                            self.c.abort.set();
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Invalid("conversion thread panicked".into()))
                    })
                })
                .collect()
        });
        // Report the first real failure, not the interruptions it caused.
        let mut first_interrupt = None;
        let mut converted: Vec<Vec<Descriptor>> = Vec::new();
        for r in results {
            match r {
                Ok(Some(d)) => converted.push(d),
                Ok(None) => {}
                Err(e) if e.is_interrupted() => {
                    first_interrupt.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = first_interrupt {
            return Err(e);
        }
        if converted.is_empty() {
            return Err(Error::Invalid(format!(
                "{what}: no image manifests to convert"
            )));
        }
        (0..self.outputs.len())
            .map(|k| {
                let mut out = idx.clone();
                out.manifests = converted.iter().map(|c| c[k].clone()).collect();
                self.finish_index(k, desc, out, top)
            })
            .collect()
    }

    /// Index entry `c` of index `what`, converted (`None`: dropped, not an image). A
    /// manifest or index listed more than once in the tree (two platforms' entries naming
    /// one manifest, an entry repeated, a nested index listing it again) is converted
    /// once: the other entries wait for that conversion and take its result, keeping
    /// their own platform and annotations.
    fn child(&self, what: &str, c: &Descriptor) -> Result<Option<Vec<Descriptor>>> {
        let slot = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(c.digest.clone())
            .or_default()
            .clone();
        // Held while converting: the other entries naming it wait here.
        let mut done = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*done {
            tracing::debug!("{what}: {} is listed again; converted once", c.digest);
            return Ok(r
                .as_ref()
                .map(|ds| ds.iter().map(|d| replace_target(c, d)).collect()));
        }
        let r = self.c.src.fetch_manifest(c).and_then(|b| {
            if let Some(why) = not_an_image(&b) {
                tracing::warn!("{what}: skipping {} ({why})", c.digest);
                return Ok(None);
            }
            self.process(c, b, false).map(Some)
        });
        match &r {
            Ok(v) => *done = Some(v.clone()),
            // Stop the run before the next entry naming it takes the slot, so that it
            // does not convert it again.
            Err(_) => self.c.abort.set(),
        }
        r
    }

    /// A platform manifest: in its own work directory, at most `concurrency_limit` at once.
    fn build_one(&self, desc: &Descriptor, bytes: &[u8], top: bool) -> Result<Vec<Descriptor>> {
        let _permit = self.sem.acquire(&self.c.abort)?;
        let id = self.manifest_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let plat = desc
            .platform
            .as_ref()
            .map(|p| p.dir_name())
            .unwrap_or_default();
        let mdir = self
            .c
            .opts
            .workdir
            .join(format!("{id}-{plat}-{}", desc.digest.hex()));
        // Left by a killed run in a kept work dir (held by this run alone): start afresh.
        if mdir.exists() {
            let _ = fs::remove_dir_all(&mdir);
        }
        fs::create_dir_all(&mdir).map_err(|e| Error::io(&mdir, e))?;
        let label = if plat.is_empty() {
            format!("[{id}]")
        } else {
            format!("[{id} {plat}]")
        };
        let res = self
            .build_manifest(&mdir, &label, desc, bytes, top)
            .map_err(|e| {
                e.context(format!(
                    "converting manifest {}@{}",
                    self.c.src.name(),
                    desc.digest
                ))
            });
        if !self.c.opts.reserve {
            cleanup_manifest_dir(&mdir);
        }
        res
    }

    fn build_manifest(
        &self,
        mdir: &Path,
        label: &str,
        desc: &Descriptor,
        bytes: &[u8],
        top: bool,
    ) -> Result<Vec<Descriptor>> {
        // For logs; errors get "converting manifest ..." from the caller, so they do not
        // name it again.
        let what = format!("manifest {}@{}", self.c.src.name(), desc.digest);
        let m: Manifest = parse_json("its content", bytes)?;
        // An index drops such children; named on its own, it is refused as what it is
        // (a Helm chart, an SBOM), not for its first layer's media type.
        if let Some(why) = not_an_image(bytes) {
            return Err(Error::Unsupported(format!(
                "not a container image ({why}); only images can be converted"
            )));
        }
        if m.layers.is_empty() {
            return Err(Error::Invalid("the image has no layers".into()));
        }
        // The converted layers (on the base layer without --mkfs) are stacked when
        // each is applied and when the image is used: a stack deeper than overlaybd
        // takes is refused now, not after hundreds of layers were converted.
        let base = usize::from(!self.c.opts.mkfs);
        if m.layers.len() + base > MAX_LAYERS {
            return Err(Error::Unsupported(format!(
                "the image has {} layers{}; at most {MAX_LAYERS} can be stacked",
                m.layers.len(),
                if base == 1 { " and the base layer" } else { "" }
            )));
        }
        for l in &m.layers {
            check_layer_type(&l.media_type)
                .map_err(|e| Error::Unsupported(format!("layer {}: {e}", l.digest)))?;
            // An overlaybd blob has a tar's media type (and tar-wrapped blobs parse
            // as a tar): converting it again would make an image holding the
            // previous conversion's blob files.
            if l.annotation(ANNOTATION_BLOB_DIGEST).is_some() {
                return Err(Error::Unsupported(format!(
                    "layer {} is an overlaybd layer (it has the {ANNOTATION_BLOB_DIGEST} annotation): the image is converted already; convert the OCI image it was made from",
                    l.digest
                )));
            }
            for o in &self.outputs {
                o.out
                    .format
                    .check_layer(l)
                    .map_err(|e| Error::Unsupported(format!("layer {}: {e}", l.digest)))?;
            }
        }
        let out_mt = self.out_manifest_type();
        // Dedup: this very manifest converted before (same options and output type).
        let mut results: Vec<Option<Descriptor>> = vec![None; self.outputs.len()];
        for (k, o) in self.outputs.iter().enumerate() {
            let Some(hit) = o
                .out
                .dedup
                .as_ref()
                .and_then(|dd| dd.lookup_manifest(out_mt, &desc.digest))
            else {
                continue;
            };
            if o.out.format.references_source_layers()
                && self.source_layers_to_copy(&m.layers)?.contains(&true)
            {
                tracing::info!(
                    "{what}: converted manifest {} is not used: the source layers it reads are not all in {}",
                    hit.digest,
                    self.c.dst.name()
                );
                continue;
            }
            match self.reuse_manifest(k, label, desc, out_mt, &hit, top) {
                Ok(d) => results[k] = Some(d),
                Err(e) if e.is_interrupted() => return Err(e),
                Err(e) => tracing::warn!(
                    "{what}: cannot reuse its converted manifest {} ({}); converting",
                    hit.digest,
                    Chain(&e)
                ),
            }
        }
        let todo: Vec<usize> = (0..self.outputs.len())
            .filter(|&k| results[k].is_none())
            .collect();
        if !todo.is_empty() {
            let cfg_bytes = self.c.src.read_blob(&m.config, MAX_CONFIG_SIZE)?;
            let cfg = ImageConfig::parse(&format!("config {}", m.config.digest), &cfg_bytes)?;
            let diff_ids = cfg.diff_ids(&format!("config {}", m.config.digest))?;
            if diff_ids.len() != m.layers.len() {
                return Err(Error::Invalid(format!(
                    "the config has {} rootfs.diff_ids but the manifest has {} layers",
                    diff_ids.len(),
                    m.layers.len()
                )));
            }
            let chain = chain_ids(&diff_ids);
            let layers = self.convert_layers(mdir, label, &m.layers, &diff_ids, &chain, &todo)?;
            for (k, l) in todo.iter().zip(layers) {
                results[*k] = Some(self.finish_manifest(*k, mdir, label, desc, &m, &cfg, l, top)?);
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Dedup manifest hit: the converted manifest is in the destination with all its
    /// blobs; fetch it (verified) and push it again under the tag at the end (a child of
    /// an index is referenced by digest and needs no push).
    fn reuse_manifest(
        &self,
        k: usize,
        label: &str,
        desc: &Descriptor,
        out_mt: &str,
        hit: &Reused,
        top: bool,
    ) -> Result<Descriptor> {
        let d = Descriptor::new(out_mt, hit.digest.clone(), hit.size);
        let bytes = self.c.dst.fetch_manifest(&d)?;
        let d = Descriptor::new(out_mt, hit.digest.clone(), bytes.len() as u64);
        if top {
            self.queue(Pending {
                output: k,
                tag: Some(self.outputs[k].out.tag.clone()),
                desc: d.clone(),
                bytes,
                dedup_source: None,
            });
        }
        self.outputs[k]
            .stats
            .manifests_reused
            .fetch_add(1, Ordering::Relaxed);
        self.c.progress.println(&format!(
            "{label} reused {} → {} (converted before{}){}",
            desc.digest,
            d.digest,
            match &hit.from {
                Some(r) => format!(", copied from {r}"),
                None => String::new(),
            },
            self.suffix(k)
        ));
        Ok(replace_target(desc, &d))
    }
}

/// Why an index entry is left out without fetching it: an attestation manifest (by its
/// annotation), or a media type that is neither a manifest's nor an index's ("an
/// encountered mediaType that is unknown to the implementation MUST be ignored", image
/// spec: a Helm chart, a future format). `None`: the entry is fetched and converted
/// (and may still turn out to be an artifact once fetched).
pub fn skipped_entry(c: &Descriptor) -> Option<String> {
    if c.is_attestation() {
        return Some("an attestation manifest".into());
    }
    if !c.media_type.is_empty() && !is_manifest(&c.media_type) && !is_index(&c.media_type) {
        return Some(format!(
            "media type {:?} is not a manifest's or an index's",
            c.media_type
        ));
    }
    None
}

/// Why an index child is not a container image (artifacts such as signatures or SBOMs
/// are dropped from the converted index, like attestations), or `None` for images and
/// nested indexes of images. An index with an `artifactType` is an artifact too.
fn not_an_image(bytes: &[u8]) -> Option<String> {
    let mt = sniff_media_type(bytes)?;
    if is_index(&mt) {
        let idx: Index = serde_json::from_slice(bytes).ok()?;
        return idx
            .artifact_type
            .map(|a| format!("an artifact index of type {a}"));
    }
    if !is_manifest(&mt) {
        return None;
    }
    let m: Manifest = serde_json::from_slice(bytes).ok()?;
    if let Some(a) = &m.artifact_type {
        return Some(format!("an artifact of type {a}"));
    }
    // A BuildKit attestation manifest has an image config and in-toto statements for
    // layers; its index entry's annotation says so, but a copy may have dropped it.
    if !m.layers.is_empty() && m.layers.iter().all(|l| l.media_type == MT_IN_TOTO) {
        return Some("an attestation manifest: its layers are in-toto statements".into());
    }
    match m.config.media_type.as_str() {
        MT_OCI_CONFIG | MT_DOCKER_CONFIG => None,
        other => Some(format!(
            "config media type {other:?} is not an image config"
        )),
    }
}

/// The source descriptor (platform, annotations, ...) pointing at the converted object.
/// Embedded `data` is the source object's bytes, which the converted digest does not
/// match: it is dropped (the object is fetched by its digest).
pub(super) fn replace_target(src: &Descriptor, new: &Descriptor) -> Descriptor {
    let mut d = src.clone();
    d.digest = new.digest.clone();
    d.size = new.size;
    d.media_type = new.media_type.clone();
    d.data = None;
    d
}

/// The media type of BuildKit's attestation layers (in-toto statements).
const MT_IN_TOTO: &str = "application/vnd.in-toto+json";

fn check_layer_type(mt: &str) -> std::result::Result<(), String> {
    match mt {
        MT_DOCKER_LAYER_GZIP | MT_DOCKER_LAYER_TAR | MT_DOCKER_LAYER_ZSTD | MT_OCI_LAYER_TAR
        | MT_OCI_LAYER_GZIP | MT_OCI_LAYER_ZSTD | "" => Ok(()),
        MT_DOCKER_FOREIGN_LAYER => {
            Err("foreign (non-distributable) layers are not supported".into())
        }
        other if other.starts_with("application/vnd.oci.image.layer.nondistributable") => {
            Err("non-distributable layers are not supported".into())
        }
        other => Err(format!("unsupported layer media type {other:?}")),
    }
}

/// Remove layer data from a finished manifest directory, keeping dumped JSON files;
/// remove the directory itself if nothing is left.
fn cleanup_manifest_dir(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                let _ = fs::remove_dir_all(&p);
            } else if p.extension().and_then(|x| x.to_str()) != Some("json") {
                let _ = fs::remove_file(&p);
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
