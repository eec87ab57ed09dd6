//! The conversion pipeline, in three stages around the [`OutputFormat`] seam:
//!
//! * `walk`: the index walk. Indexes are converted child by child (attestations and
//!   artifacts dropped, nested indexes recursed), platform manifests at most
//!   `concurrency_limit` at once; per manifest: parse, checks, manifest-level dedup per
//!   output, then the layers, then publishing;
//! * `layers`: per-layer scheduling for one manifest and every output at once. Each
//!   source blob is downloaded once (digest-verified while streaming) and fanned out to
//!   the outputs that convert it; per output the layers are applied strictly bottom-up,
//!   each sealed on its own thread while the next one applies, then uploaded on another;
//! * `publish`: what is pushed besides layers: base layers, source layers kept for
//!   formats that reference them, configs, and the manifests and indexes, which are all
//!   pushed only once the whole tree has converted (a failed run pushes no manifest),
//!   the top-level objects last under their output tags.

mod layers;
mod publish;
mod walk;
pub use walk::skipped_entry;

use crate::abort::{Abort, Semaphore};
use crate::dedup::DedupTarget;
use crate::format::{NativeFormat, OutputFormat};
use crate::progress::Progress;
use crate::store::ImageStore;
use crate::{ConvertOptions, Error, Result};
use obddedup::resolve::DedupStats;
use obdoci::digest::hash_reader;
use obdoci::{Descriptor, Digest, Reference};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Result of a conversion, per output.
#[derive(Clone, Debug)]
pub struct ConvertOutcome {
    /// The output format's name.
    pub format: &'static str,
    /// The output tag.
    pub tag: String,
    /// The converted top-level manifest or index.
    pub descriptor: Descriptor,
    /// Platform manifests converted.
    pub manifests: usize,
    /// Layers of the converted platform manifests (not counting reused manifests).
    pub layers: usize,
    /// Of `layers`, the ones actually converted (applied and sealed).
    pub layers_converted: usize,
    /// Of `layers`, the ones reused from the dedup database.
    pub layers_reused: usize,
    /// Of `manifests`, the ones reused from the dedup database (re-tagged, no layer work).
    pub manifests_reused: usize,
    /// Whether anything was pushed (false with `--no-upload`).
    pub pushed: bool,
    /// What the dedup database did, when one is used.
    pub dedup: Option<DedupStats>,
}

/// One image to make from the source: a format, its output tag, its dedup database.
pub struct Output {
    pub format: Arc<dyn OutputFormat>,
    pub tag: String,
    pub dedup: Option<DedupTarget>,
}

impl Output {
    pub fn new(format: Arc<dyn OutputFormat>, tag: impl Into<String>) -> Output {
        Output {
            format,
            tag: tag.into(),
            dedup: None,
        }
    }

    /// Deduplicate this output against a conversion database (`--db-type/--db-str`)
    /// opened with its format's [`OutputFormat::dedup_format_key`].
    pub fn with_dedup(mut self, target: DedupTarget) -> Output {
        self.dedup = Some(target);
        self
    }
}

/// Converts images from one store into another.
pub struct Converter {
    src: Arc<dyn ImageStore>,
    dst: Arc<dyn ImageStore>,
    opts: ConvertOptions,
    progress: Arc<Progress>,
    abort: Abort,
    dedup: Option<DedupTarget>,
}

impl Converter {
    /// `abort` stops the conversion (set it from a signal handler); it is also set
    /// internally when any part fails so the rest stops early.
    pub fn new(
        src: Arc<dyn ImageStore>,
        dst: Arc<dyn ImageStore>,
        mut opts: ConvertOptions,
        progress: Arc<Progress>,
        abort: Abort,
    ) -> Converter {
        if opts.referrer {
            opts.oci = true;
        }
        Converter {
            src,
            dst,
            opts,
            progress,
            abort,
            dedup: None,
        }
    }

    /// Deduplicate [`Converter::convert`]'s native output against a conversion database
    /// (`--db-type/--db-str`): reuse manifests and layers converted before, record what
    /// this run pushes. `target` must name the destination repository (a registry: dedup
    /// needs one). With `no_upload` the database is not used at all: a reuse can write
    /// to the registry (cross-repository mounts and manifest copies) and nothing may be
    /// recorded.
    pub fn with_dedup(mut self, target: DedupTarget) -> Converter {
        self.dedup = Some(target);
        self
    }

    /// The options (with `--referrer` implying `--oci`).
    pub fn options(&self) -> &ConvertOptions {
        &self.opts
    }

    /// Convert `source` into a native overlaybd image and push it under `out_tag`.
    pub fn convert(&self, source: &Reference, out_tag: &str) -> Result<ConvertOutcome> {
        let mut out = Output::new(Arc::new(NativeFormat::new(&self.opts)), out_tag);
        out.dedup = self.dedup.clone();
        let mut r = self.convert_outputs(source, vec![out])?;
        Ok(r.remove(0))
    }

    /// Convert `source` into every output in one run (each source blob downloaded once)
    /// and push each result under its tag. Outcomes in the order of `outputs`.
    pub fn convert_outputs(
        &self,
        source: &Reference,
        mut outputs: Vec<Output>,
    ) -> Result<Vec<ConvertOutcome>> {
        if outputs.is_empty() {
            return Err(Error::Invalid("nothing to convert to: no output".into()));
        }
        if self.opts.no_upload && outputs.iter().any(|o| o.dedup.is_some()) {
            tracing::warn!(
                "--no-upload: the dedup database is not used (nothing is reused or recorded)"
            );
            for o in &mut outputs {
                o.dedup = None;
            }
        }
        for o in &outputs {
            // A registry takes tags; an OCI layout or archive any reference name.
            if self.dst.registry_repository().is_some() {
                obdoci::reference::validate_tag(&o.tag)?;
            } else {
                obdoci::reference::validate_ref_name(&o.tag)?;
            }
            o.format.check()?;
        }
        let wd = &self.opts.workdir;
        fs::create_dir_all(wd).map_err(|e| Error::io(wd, e))?;
        if self.opts.dump_manifest {
            remove_stale_index_dumps(wd);
        }
        let (desc, bytes) = self.src.resolve(source)?;
        tracing::info!(
            "source {}:{source} is {} {}",
            self.src.name(),
            desc.media_type,
            desc.digest
        );
        let run = Run {
            c: self,
            outputs: outputs
                .into_iter()
                .map(|o| OutputRun {
                    out: o,
                    stats: Stats::default(),
                })
                .collect(),
            sem: Semaphore::new(self.opts.concurrency_limit),
            manifest_ids: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
            children: Mutex::new(HashMap::new()),
        };
        let descs = match run.process(&desc, bytes, true) {
            Ok(d) => d,
            Err(e) => {
                self.abort.set();
                let _ = fs::remove_dir(wd);
                return Err(e);
            }
        };
        run.push_pending()?;
        if !self.opts.reserve {
            let _ = fs::remove_dir(wd);
        }
        let manifests = run.manifest_ids.load(Ordering::Relaxed);
        Ok(run
            .outputs
            .iter()
            .zip(descs)
            .map(|(o, descriptor)| ConvertOutcome {
                format: o.out.format.name(),
                tag: o.out.tag.clone(),
                descriptor,
                manifests,
                layers: o.stats.layers.load(Ordering::Relaxed),
                layers_converted: o.stats.layers_converted.load(Ordering::Relaxed),
                layers_reused: o.stats.layers_reused.load(Ordering::Relaxed),
                manifests_reused: o.stats.manifests_reused.load(Ordering::Relaxed),
                pushed: !self.opts.no_upload,
                dedup: o.out.dedup.as_ref().map(|d| d.stats()),
            })
            .collect())
    }
}

/// Before a `--dump-manifest` run writes its dumps: removes the index dumps an earlier
/// run left at the top of the work directory (`index.json` of a top-level index,
/// `index-<hex>.json` of nested ones, each also with a `-<format>` suffix from a run that
/// built several formats), which would otherwise mix with this run's (the per-manifest
/// folders are emptied when they are written). Only those names go, never other files;
/// a work directory that is an OCI layout (it has `oci-layout`) is left alone, as its
/// `index.json` is no dump.
fn remove_stale_index_dumps(wd: &Path) {
    if wd.join("oci-layout").exists() {
        return;
    }
    let Ok(rd) = fs::read_dir(wd) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(is_index_dump_name)
            || !e.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let p = e.path();
        match fs::remove_file(&p) {
            Ok(()) => tracing::info!("removed {} (an earlier run's dump)", p.display()),
            Err(err) => {
                tracing::warn!("{}: an earlier run's dump, not removed: {err}", p.display())
            }
        }
    }
}

/// Whether `name` is one `--dump-manifest` writes at the top of the work directory:
/// `index.json`, `index-<hex>.json`, `index-<format>.json`, `index-<hex>-<format>.json`.
fn is_index_dump_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    if stem == "index" {
        return true;
    }
    let Some(rest) = stem.strip_prefix("index-") else {
        return false;
    };
    let hex = |s: &str| {
        matches!(s.len(), 64 | 128) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let format = |s: &str| crate::format::FORMAT_NAMES.contains(&s);
    match rest.split_once('-') {
        Some((h, f)) => hex(h) && format(f),
        None => hex(rest) || format(rest),
    }
}

/// Per-output counters.
#[derive(Default)]
struct Stats {
    layers: AtomicUsize,
    layers_converted: AtomicUsize,
    layers_reused: AtomicUsize,
    manifests_reused: AtomicUsize,
}

struct OutputRun {
    out: Output,
    stats: Stats,
}

/// One [`Converter::convert_outputs`] call.
struct Run<'c> {
    c: &'c Converter,
    outputs: Vec<OutputRun>,
    /// Platform manifests converted at once.
    sem: Semaphore,
    /// Numbers the platform manifests (work directory names).
    manifest_ids: AtomicUsize,
    pending: Mutex<Vec<publish::Pending>>,
    /// Index entries converted or being converted, by digest (see `Run::child`).
    children: Mutex<HashMap<Digest, Arc<ChildSlot>>>,
}

/// The result of converting an index entry, once converted (`Some(None)`: not an
/// image, dropped); locked while it converts.
type ChildSlot = Mutex<Option<Option<Vec<Descriptor>>>>;

impl Run<'_> {
    fn check_abort(&self) -> Result<()> {
        if self.c.abort.is_set() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Whether this run makes several images (then names and files say which).
    fn multi(&self) -> bool {
        self.outputs.len() > 1
    }

    fn format(&self, k: usize) -> &dyn OutputFormat {
        self.outputs[k].out.format.as_ref()
    }

    /// ` (<format>)` when the run has several outputs, for messages.
    fn suffix(&self, k: usize) -> String {
        if self.multi() {
            format!(" ({})", self.format(k).name())
        } else {
            String::new()
        }
    }
}

/// Checks that a local file holds `desc`'s blob (size and digest).
pub(crate) fn verify_file(p: &Path, desc: &Descriptor) -> Result<()> {
    let f = fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let (d, size) = hash_reader(f).map_err(|e| Error::io(p, e))?;
    if d != desc.digest || size != desc.size {
        return Err(Error::Oci(obdoci::Error::DigestMismatch {
            what: format!("blob {} ({})", desc.digest, p.display()),
            expected: format!("{} ({} bytes)", desc.digest, desc.size),
            actual: format!("{d} ({size} bytes)"),
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::TurboFormat;
    use obdfs::turbo::FsType;

    #[test]
    fn index_dump_names_are_those_the_dump_writes() {
        let o = ConvertOptions::default();
        for f in [
            NativeFormat::new(&o).name(),
            TurboFormat::new(&o, FsType::Ext4).name(),
        ] {
            assert!(crate::format::FORMAT_NAMES.contains(&f), "{f}");
        }
        let h = "0123456789abcdef".repeat(4);
        for n in [
            "index.json".to_string(),
            format!("index-{h}.json"),
            "index-overlaybd.json".to_string(),
            "index-turboOCI.json".to_string(),
            format!("index-{h}-overlaybd.json"),
        ] {
            assert!(is_index_dump_name(&n), "{n}");
        }
        for n in [
            "index.json.bak".to_string(),
            "myindex.json".to_string(),
            "index-notes.json".to_string(),
            "index-.json".to_string(),
            format!("index-{}.json", &h[1..]),
            format!("index-{h}-notes.json"),
            format!("index-overlaybd-{h}.json"),
            "manifest.json".to_string(),
        ] {
            assert!(!is_index_dump_name(&n), "{n}");
        }
    }
}
