//! The conversion pipeline: index recursion, per-manifest conversion, the layer
//! download → decompress → apply → commit → upload chain, and the final pushes.

use super::abort::{Abort, Semaphore};
use super::annotations::*;
use super::chain::{self, LayerJob};
use super::dedup::{DedupTarget, Reused};
use super::follow::{Follow, Growing};
use super::progress::{Progress, Stage};
use super::store::ImageStore;
use super::{ConvertOptions, Error, Result};
use blockdev::stack::LowerSource;
use crossbeam_channel::{bounded, unbounded, Receiver};
use obddedup::resolve::DedupStats;
use obdoci::decompress;
use obdoci::digest::hash_reader;
use obdoci::error::Chain;
use obdoci::model::*;
use obdoci::stream::{copy, CopyError, CHUNK};
use obdoci::{chain_ids, Descriptor, Digest, Reference};
use obdregistry::BlobSource;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Result of a conversion.
#[derive(Clone, Debug)]
pub struct ConvertOutcome {
    /// The converted top-level manifest or index.
    pub descriptor: Descriptor,
    /// Platform manifests converted.
    pub manifests: usize,
    /// Layers of the converted platform manifests (not counting reused manifests).
    pub layers: usize,
    /// Of `layers`, the ones actually converted (downloaded, applied, committed).
    pub layers_converted: usize,
    /// Of `layers`, the ones reused from the dedup database (downloaded converted).
    pub layers_reused: usize,
    /// Of `manifests`, the ones reused from the dedup database (re-tagged, no layer work).
    pub manifests_reused: usize,
    /// Whether anything was pushed (false with `--no-upload`).
    pub pushed: bool,
    /// What the dedup database did, when one is used.
    pub dedup: Option<DedupStats>,
}

struct Pending {
    tag: Option<String>,
    desc: Descriptor,
    bytes: Vec<u8>,
    /// Source manifest digest, to record the pushed manifest in the dedup database.
    dedup_source: Option<Digest>,
}

/// Converts images from one store into another.
pub struct Converter {
    src: Arc<dyn ImageStore>,
    dst: Arc<dyn ImageStore>,
    opts: ConvertOptions,
    progress: Arc<Progress>,
    abort: Abort,
    dedup: Option<DedupTarget>,
    counter: AtomicUsize,
    layers_done: AtomicUsize,
    layers_converted: AtomicUsize,
    layers_reused: AtomicUsize,
    manifests_reused: AtomicUsize,
    sem: Semaphore,
    pending: Mutex<Vec<Pending>>,
}

/// A layer ready for the manifest: converted here (its commit file, to hash and push) or
/// reused (its descriptor; already in the destination).
enum Committed {
    Built(PathBuf),
    Reused(Box<Descriptor>),
}

/// Where a source layer's bytes are, once fetched.
enum LayerBlob {
    /// In the source store's own directory: read (and verified) from there.
    Local,
    /// Being downloaded into this file; readers follow the download.
    Streaming(PathBuf, Follow),
    /// Reused from the dedup database: the converted layer (in the destination), and
    /// when a layer above it is converted, the file it was downloaded (and verified) as:
    /// the layer's commit file, the next layer's lower.
    Reused(Box<Descriptor>, Option<PathBuf>),
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
        let sem = Semaphore::new(opts.concurrency_limit);
        Converter {
            src,
            dst,
            opts,
            progress,
            abort,
            dedup: None,
            counter: AtomicUsize::new(0),
            layers_done: AtomicUsize::new(0),
            layers_converted: AtomicUsize::new(0),
            layers_reused: AtomicUsize::new(0),
            manifests_reused: AtomicUsize::new(0),
            sem,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Deduplicate against a conversion database (`--db-type/--db-str`): reuse manifests
    /// and layers converted before, record what this run pushes. `target` must name the
    /// destination repository (a registry: dedup needs one). With `no_upload` the
    /// database is not used at all: a reuse can write to the registry (cross-repository
    /// mounts and manifest copies) and nothing may be recorded.
    pub fn with_dedup(mut self, target: DedupTarget) -> Converter {
        if self.opts.no_upload {
            tracing::warn!(
                "--no-upload: the dedup database is not used (nothing is reused or recorded)"
            );
            return self;
        }
        self.dedup = Some(target);
        self
    }

    fn check_abort(&self) -> Result<()> {
        if self.abort.is_set() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn out_manifest_type(&self) -> &'static str {
        if self.opts.oci {
            MT_OCI_MANIFEST
        } else {
            MT_DOCKER_MANIFEST
        }
    }

    /// Convert `source` and push the result under `out_tag`.
    pub fn convert(&self, source: &Reference, out_tag: &str) -> Result<ConvertOutcome> {
        obdoci::reference::validate_tag(out_tag)?;
        if !self.opts.mkfs && !self.opts.baselayer.is_file() {
            return Err(Error::Invalid(format!(
                "--mkfs=false needs upstream's prebuilt base layer at {}, which is missing; \
                 use --mkfs (the default) to make the filesystem in the bottom layer",
                self.opts.baselayer.display()
            )));
        }
        let wd = &self.opts.workdir;
        fs::create_dir_all(wd).map_err(|e| Error::io(wd, e))?;
        let (desc, bytes) = self.src.resolve(source)?;
        tracing::info!(
            "source {}:{source} is {} {}",
            self.src.name(),
            desc.media_type,
            desc.digest
        );
        let res = self.process(&desc, bytes, Some(out_tag));
        let out = match res {
            Ok(d) => d,
            Err(e) => {
                self.abort.set();
                let _ = fs::remove_dir(wd);
                return Err(e);
            }
        };
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if !self.opts.no_upload {
            for p in &pending {
                self.check_abort()?;
                self.dst
                    .push_manifest(p.tag.as_deref(), &p.desc, &p.bytes)
                    .map_err(|e| {
                        e.context(format!(
                            "pushing {} {} to {}",
                            p.desc.media_type,
                            p.tag.as_deref().unwrap_or(p.desc.digest.as_str()),
                            self.dst.name()
                        ))
                    })?;
                if let (Some(dd), Some(src)) = (&self.dedup, &p.dedup_source) {
                    dd.record_manifest(src, &p.desc);
                }
            }
        }
        if !self.opts.reserve {
            let _ = fs::remove_dir(wd);
        }
        Ok(ConvertOutcome {
            descriptor: out,
            manifests: self.counter.load(Ordering::Relaxed),
            layers: self.layers_done.load(Ordering::Relaxed),
            layers_converted: self.layers_converted.load(Ordering::Relaxed),
            layers_reused: self.layers_reused.load(Ordering::Relaxed),
            manifests_reused: self.manifests_reused.load(Ordering::Relaxed),
            pushed: !self.opts.no_upload,
            dedup: self.dedup.as_ref().map(|d| d.stats()),
        })
    }

    fn process(&self, desc: &Descriptor, bytes: Vec<u8>, tag: Option<&str>) -> Result<Descriptor> {
        self.check_abort()?;
        let mt = if desc.media_type.is_empty() {
            sniff_media_type(&bytes).unwrap_or_default()
        } else {
            desc.media_type.clone()
        };
        if is_manifest(&mt) {
            self.build_one(desc, &bytes, tag)
        } else if is_index(&mt) {
            self.build_index(desc, &bytes, tag)
        } else {
            Err(Error::Unsupported(format!(
                "{}@{}: unsupported media type {mt:?} (expected an OCI or Docker schema-2 manifest or index)",
                self.src.name(),
                desc.digest
            )))
        }
    }

    fn build_index(
        &self,
        desc: &Descriptor,
        bytes: &[u8],
        tag: Option<&str>,
    ) -> Result<Descriptor> {
        let what = format!("index {}@{}", self.src.name(), desc.digest);
        let idx: Index = parse_json(&what, bytes)?;
        let mut children = Vec::new();
        for c in &idx.manifests {
            if c.is_attestation() {
                tracing::warn!("{what}: skipping attestation manifest {}", c.digest);
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
        let results: Vec<Result<Option<Descriptor>>> = std::thread::scope(|s| {
            let handles: Vec<_> = children
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let what = what_ref;
                        let r = self.src.fetch_manifest(c).and_then(|b| {
                            if let Some(why) = not_an_image(&b) {
                                tracing::warn!("{what}: skipping {} ({why})", c.digest);
                                return Ok(None);
                            }
                            self.process(c, b, None).map(Some)
                        });
                        if r.is_err() {
                            self.abort.set();
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
        let mut converted = Vec::new();
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
        let mut out = idx.clone();
        out.manifests = converted;
        if self.opts.referrer {
            out.artifact_type = Some(ARTIFACT_TYPE_OVERLAYBD.to_string());
            out.subject = Some(desc.bare());
        }
        if self.opts.oci || out.media_type.is_none() {
            // An index without mediaType is an OCI index; say so instead of pushing
            // an empty media type (upstream defect).
            out.media_type = Some(MT_OCI_INDEX.to_string());
        }
        let mt = out.media_type.clone().expect("set above");
        let out_bytes = to_json(&out);
        if self.opts.dump_manifest {
            let name = if tag.is_some() {
                "index.json".to_string()
            } else {
                format!("index-{}.json", desc.digest.hex())
            };
            let p = self.opts.workdir.join(name);
            fs::write(&p, &out_bytes).map_err(|e| Error::io(&p, e))?;
        }
        let new_desc = Descriptor::of_bytes(mt, &out_bytes);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                tag: tag.map(String::from),
                desc: new_desc.clone(),
                bytes: out_bytes,
                dedup_source: None,
            });
        Ok(replace_target(desc, &new_desc))
    }

    fn build_one(&self, desc: &Descriptor, bytes: &[u8], tag: Option<&str>) -> Result<Descriptor> {
        let _permit = self.sem.acquire(&self.abort)?;
        let id = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let plat = desc
            .platform
            .as_ref()
            .map(|p| p.dir_name())
            .unwrap_or_default();
        let mdir = self
            .opts
            .workdir
            .join(format!("{id}-{plat}-{}", desc.digest.hex()));
        fs::create_dir_all(&mdir).map_err(|e| Error::io(&mdir, e))?;
        let label = if plat.is_empty() {
            format!("[{id}]")
        } else {
            format!("[{id} {plat}]")
        };
        let res = self
            .build_manifest(&mdir, &label, desc, bytes, tag)
            .map_err(|e| {
                e.context(format!(
                    "converting manifest {}@{}",
                    self.src.name(),
                    desc.digest
                ))
            });
        if !self.opts.reserve {
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
        tag: Option<&str>,
    ) -> Result<Descriptor> {
        let what = format!("manifest {}@{}", self.src.name(), desc.digest);
        let m: Manifest = parse_json(&what, bytes)?;
        if m.layers.is_empty() {
            return Err(Error::Invalid(format!("{what}: the image has no layers")));
        }
        for l in &m.layers {
            check_layer_type(&l.media_type)
                .map_err(|e| Error::Unsupported(format!("{what}: layer {}: {e}", l.digest)))?;
        }
        let out_mt = self.out_manifest_type();
        // Dedup: this very manifest converted before (same options and output type).
        if let Some(hit) = self
            .dedup
            .as_ref()
            .and_then(|dd| dd.lookup_manifest(out_mt, &desc.digest))
        {
            match self.reuse_manifest(label, desc, out_mt, &hit, tag) {
                Ok(d) => return Ok(d),
                Err(e) if e.is_interrupted() => return Err(e),
                Err(e) => tracing::warn!(
                    "{what}: cannot reuse its converted manifest {} ({}); converting",
                    hit.digest,
                    Chain(&e)
                ),
            }
        }
        let cfg_bytes = self.src.read_blob(&m.config, MAX_CONFIG_SIZE)?;
        let mut cfg = ImageConfig::parse(&format!("config {}", m.config.digest), &cfg_bytes)?;
        let diff_ids = cfg.diff_ids(&format!("config {}", m.config.digest))?;
        if diff_ids.len() != m.layers.len() {
            return Err(Error::Invalid(format!(
                "{what}: the config has {} rootfs.diff_ids but the manifest has {} layers",
                diff_ids.len(),
                m.layers.len()
            )));
        }
        let chain = chain_ids(&diff_ids);

        let mut new_layers = self.convert_layers(mdir, label, &m.layers, &chain)?;
        let mut ids: Vec<Digest> = new_layers.iter().map(|l| l.digest.clone()).collect();

        if !self.opts.mkfs {
            let (base_desc, base_file) = self.baselayer_blob(mdir)?;
            if !self.opts.no_upload {
                self.dst
                    .push_blob(&base_desc, BlobSource::File(&base_file), None)
                    .map_err(|e| e.context("pushing the base layer"))?;
            }
            new_layers.insert(0, base_desc.clone());
            ids.insert(0, base_desc.digest.clone());
        }

        cfg.set_diff_ids(&ids);
        let cfg_out = cfg.to_bytes();
        let cfg_mt = if self.opts.oci {
            MT_OCI_CONFIG
        } else {
            MT_DOCKER_CONFIG
        };
        let cfg_desc = Descriptor::of_bytes(cfg_mt, &cfg_out);
        let mut nm = m.clone();
        nm.media_type = Some(out_mt.to_string());
        nm.config = cfg_desc.clone();
        nm.layers = new_layers;
        if self.opts.referrer {
            nm.artifact_type = Some(ARTIFACT_TYPE_OVERLAYBD.to_string());
            nm.subject = Some(desc.bare());
        }
        let m_out = to_json(&nm);
        let m_desc = Descriptor::of_bytes(out_mt, &m_out);
        if self.opts.dump_manifest {
            for (name, b) in [("config.json", &cfg_out), ("manifest.json", &m_out)] {
                let p = mdir.join(name);
                fs::write(&p, b).map_err(|e| Error::io(&p, e))?;
            }
        }
        if !self.opts.no_upload {
            self.dst
                .push_blob(&cfg_desc, BlobSource::Bytes(&cfg_out), None)
                .map_err(|e| e.context(format!("pushing config {}", cfg_desc.digest)))?;
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                tag: tag.map(String::from),
                desc: m_desc.clone(),
                bytes: m_out,
                dedup_source: Some(desc.digest.clone()),
            });
        self.progress.println(&format!(
            "{label} converted {} → {} ({} layers)",
            desc.digest,
            m_desc.digest,
            m.layers.len()
        ));
        Ok(replace_target(desc, &m_desc))
    }

    /// Dedup manifest hit: the converted manifest is in the destination with all its
    /// blobs; fetch it (verified) and push it again under `tag` at the end (a child of an
    /// index is referenced by digest and needs no push).
    fn reuse_manifest(
        &self,
        label: &str,
        desc: &Descriptor,
        out_mt: &str,
        hit: &Reused,
        tag: Option<&str>,
    ) -> Result<Descriptor> {
        let d = Descriptor::new(out_mt, hit.digest.clone(), hit.size);
        let bytes = self.dst.fetch_manifest(&d)?;
        let d = Descriptor::new(out_mt, hit.digest.clone(), bytes.len() as u64);
        if tag.is_some() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Pending {
                    tag: tag.map(String::from),
                    desc: d.clone(),
                    bytes,
                    dedup_source: None,
                });
        }
        self.manifests_reused.fetch_add(1, Ordering::Relaxed);
        self.progress.println(&format!(
            "{label} reused {} → {} (converted before{})",
            desc.digest,
            d.digest,
            match &hit.from {
                Some(r) => format!(", copied from {r}"),
                None => String::new(),
            }
        ));
        Ok(replace_target(desc, &d))
    }

    /// The upstream base layer (`--mkfs=false`): the prebuilt ext4 image, tar-wrapped
    /// the way upstream's convertor wraps it, as the bottom layer.
    fn baselayer_blob(&self, mdir: &Path) -> Result<(Descriptor, PathBuf)> {
        let base = &self.opts.baselayer;
        let mut f = File::open(base).map_err(|e| {
            Error::io(base, e).context("--mkfs=false needs upstream's prebuilt base layer")
        })?;
        let len = f.metadata().map_err(|e| Error::io(base, e))?.len();
        let out = mdir.join("ext4_64.tar");
        let mut w = io::BufWriter::new(File::create(&out).map_err(|e| Error::io(&out, e))?);
        w.write_all(&go_ustar_header("overlaybd.commit", 0o444, len))
            .and_then(|_| io::copy(&mut f, &mut w).map(|_| ()))
            .and_then(|_| {
                let pad = (512 - len % 512) % 512;
                w.write_all(&vec![0u8; pad as usize + 1024])
            })
            .and_then(|_| w.flush())
            .map_err(|e| Error::io(&out, e))?;
        drop(w);
        let (d, size) = hash_reader(File::open(&out).map_err(|e| Error::io(&out, e))?)
            .map_err(|e| Error::io(&out, e))?;
        Ok((self.layer_descriptor(d, size), out))
    }

    fn layer_descriptor(&self, d: Digest, size: u64) -> Descriptor {
        let mt = if self.opts.oci {
            MT_OCI_LAYER_TAR
        } else {
            MT_DOCKER_LAYER_TAR
        };
        let mut desc = Descriptor::new(mt, d.clone(), size);
        let mut ann = BTreeMap::new();
        ann.insert(ANNOTATION_BLOB_DIGEST.to_string(), d.to_string());
        ann.insert(ANNOTATION_BLOB_SIZE.to_string(), size.to_string());
        ann.insert(
            ANNOTATION_VERSION.to_string(),
            OVERLAYBD_VERSION.to_string(),
        );
        desc.annotations = Some(ann);
        desc
    }

    fn convert_layers(
        &self,
        mdir: &Path,
        label: &str,
        layers: &[Descriptor],
        chain: &[Digest],
    ) -> Result<Vec<Descriptor>> {
        let n = layers.len();
        let dirs: Vec<PathBuf> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| mdir.join(format!("{i:04}_{}", l.digest)))
            .collect();
        for d in &dirs {
            fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        // Dedup lookups for every layer first: a reused layer is downloaded only when a
        // layer above it is converted (it is that layer's lower).
        let hits = self.lookup_layers(chain);
        let last_miss = hits.iter().rposition(Option::is_none);
        let chans: Vec<_> = (0..n).map(|_| bounded::<Result<LayerBlob>>(1)).collect();
        let next = AtomicUsize::new(0);
        let workers = self.opts.download_concurrency.max(1).min(n);
        // The first real failure of any thread; the others then stop as interrupted.
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            if !e.is_interrupted() {
                failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
            self.abort.set();
        };
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let tx = &chans[i].0;
                    let r = if self.abort.is_set() {
                        Err(Error::Interrupted)
                    } else {
                        let hit = hits[i]
                            .as_ref()
                            .map(|h| (h, last_miss.is_some_and(|m| i < m)));
                        self.get_layer(Slot { label, i, n }, &layers[i], &dirs[i], hit, tx, &fail)
                    };
                    if let Err(e) = r {
                        fail(e);
                        // Sends nothing if the layer was already handed over.
                        let _ = tx.try_send(Err(Error::Interrupted));
                    }
                });
            }
            // Committed layers are hashed and pushed on another thread while the next
            // layer is applied.
            let (up_tx, up_rx) = unbounded::<(usize, Committed)>();
            let uploader = s.spawn(move || self.upload_loop(label, n, up_rx, chain));
            let mut lowers: Vec<LowerSource> = Vec::new();
            if !self.opts.mkfs {
                lowers.push(LowerSource::File(self.opts.baselayer.clone()));
            }
            // Layer i is committed on its own thread while layer i+1 is applied on top
            // of its writable files; at most one commit runs at a time.
            type Committing<'a> = (usize, std::thread::ScopedJoinHandle<'a, Result<PathBuf>>);
            let mut committing: Option<Committing<'_>> = None;
            // Wait for the running commit, swap its writable lower for the commit file
            // and hand it to the uploader.
            let finish = |c: &mut Option<Committing<'_>>,
                          lowers: &mut Vec<LowerSource>|
             -> Result<()> {
                if let Some((j, h)) = c.take() {
                    let path = h
                        .join()
                        .unwrap_or_else(|_| Err(Error::Invalid("commit thread panicked".into())))
                        .map_err(|e| {
                            e.context(format!("layer {}/{n} ({})", j + 1, layers[j].digest))
                        })?;
                    if let Some(last) = lowers.last_mut() {
                        *last = LowerSource::File(path.clone());
                    }
                    self.layers_converted.fetch_add(1, Ordering::Relaxed);
                    let _ = up_tx.send((j, Committed::Built(path)));
                }
                Ok(())
            };
            let res = (|| -> Result<()> {
                for i in 0..n {
                    let blob = chans[i].1.recv().map_err(|_| Error::Interrupted)??;
                    self.check_abort()?;
                    if let LayerBlob::Reused(desc, commit) = blob {
                        finish(&mut committing, &mut lowers)?;
                        self.layers_reused.fetch_add(1, Ordering::Relaxed);
                        // Downloaded as its commit file when a layer above is built on it.
                        if let Some(c) = commit {
                            lowers.push(LowerSource::File(c));
                        }
                        let _ = up_tx.send((i, Committed::Reused(desc)));
                        continue;
                    }
                    let applied = self
                        .apply_layer(
                            Slot { label, i, n },
                            &layers[i],
                            blob,
                            &dirs[i],
                            &lowers,
                            chain,
                        )
                        .map_err(|e| {
                            e.context(format!("layer {}/{n} ({})", i + 1, layers[i].digest))
                        })?;
                    finish(&mut committing, &mut lowers)?;
                    lowers.push(applied.as_lower());
                    let h = s.spawn(move || self.commit_one(Slot { label, i, n }, &applied));
                    committing = Some((i, h));
                }
                finish(&mut committing, &mut lowers)
            })();
            drop(up_tx);
            if let Err(e) = &res {
                if !e.is_interrupted() {
                    self.abort.set();
                }
            }
            let res = res.map_err(|e| {
                if e.is_interrupted() {
                    e
                } else {
                    fail(e);
                    Error::Interrupted
                }
            });
            let up = uploader
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("upload thread panicked".into())))
                .map_err(|e| {
                    if !e.is_interrupted() {
                        fail(e);
                    }
                    Error::Interrupted
                });
            if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(e);
            }
            res?;
            let out = up?;
            self.layers_done.fetch_add(n, Ordering::Relaxed);
            Ok(out)
        })
    }

    /// Hash each committed layer into its descriptor and push it; returns the
    /// descriptors in layer order.
    fn upload_loop(
        &self,
        label: &str,
        n: usize,
        rx: Receiver<(usize, Committed)>,
        chain: &[Digest],
    ) -> Result<Vec<Descriptor>> {
        let mut out = Vec::with_capacity(n);
        for (i, done) in rx {
            self.check_abort()?;
            let path = match done {
                // Already in the destination (verified or mounted by dedup); its row exists.
                Committed::Reused(desc) => {
                    out.push(*desc);
                    continue;
                }
                Committed::Built(p) => p,
            };
            if !self.opts.reserve {
                if let Some(dir) = path.parent() {
                    for f in [chain::DATA_FILE, chain::INDEX_FILE, "layer.blob"] {
                        let _ = fs::remove_file(dir.join(f));
                    }
                }
            }
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let (d, size) = hash_reader(f).map_err(|e| Error::io(&path, e))?;
            let desc = self.layer_descriptor(d, size);
            out.push(desc.clone());
            if self.opts.no_upload {
                continue;
            }
            let bar = self.progress.start(
                &format!("{label} layer {}/{n}", i + 1),
                Stage::Upload,
                Some(desc.size),
            );
            let r = self
                .dst
                .push_blob(&desc, BlobSource::File(&path), Some(bar.setter()));
            if let Err(e) = r {
                self.abort.set();
                return Err(e.context(format!(
                    "uploading layer {}/{n} ({}) to {}",
                    i + 1,
                    desc.digest,
                    self.dst.name()
                )));
            }
            bar.finish(Some(desc.size), "");
            if let Some(dd) = &self.dedup {
                dd.record_layer(&chain[i], &desc);
            }
        }
        if out.len() != n {
            return Err(Error::Interrupted);
        }
        Ok(out)
    }

    /// Get a source layer: local stores need nothing; registry blobs are downloaded
    /// into the layer directory (compressed, digest-verified while streaming). The
    /// layer is handed to the applier on `tx` as soon as the download starts, so the
    /// apply follows the download instead of waiting for it.
    fn fetch_layer(
        &self,
        slot: Slot<'_>,
        layer: &Descriptor,
        dir: &Path,
        tx: &crossbeam_channel::Sender<Result<LayerBlob>>,
        fail: &dyn Fn(Error),
    ) -> Result<()> {
        let Slot { label, i, n } = slot;
        if self.src.local_blob_path(layer).is_some() {
            let _ = tx.send(Ok(LayerBlob::Local));
            return Ok(());
        }
        let bar = self.progress.start(
            &format!("{label} layer {}/{n}", i + 1),
            Stage::Download,
            Some(layer.size),
        );
        let path = dir.join("layer.blob");
        let ctx = |e: Error| e.context(format!("downloading layer {}/{n}", i + 1));
        let mut r = self.src.open_blob(layer).map_err(ctx)?;
        let mut f = File::create(&path).map_err(|e| ctx(Error::io(&path, e)))?;
        let (growing, follow) = Growing::new();
        let _ = tx.send(Ok(LayerBlob::Streaming(path.clone(), follow)));
        let res = self
            .download(&mut r, &mut f, &path, &mut |pos| {
                growing.advance(pos);
                bar.set(pos);
            })
            .map_err(ctx);
        match res {
            Ok(()) => {
                growing.finish(Ok(()));
                bar.finish(Some(layer.size), "");
                Ok(())
            }
            Err(e) => {
                // Recorded as the failure before the applier following the download
                // sees it fail, so that its failure is not reported instead.
                fail(e);
                growing.finish(Err(format!("downloading layer {}/{n} failed", i + 1)));
                Err(Error::Interrupted)
            }
        }
    }

    /// Copy a blob stream (it names its store and blob in its errors) into the file
    /// `f` at `path`, until it ends or the conversion is aborted.
    fn download(
        &self,
        r: &mut dyn Read,
        f: &mut File,
        path: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        copy(r, f, &|| self.abort.is_set(), progress).map_err(|e| match e {
            CopyError::Read(e) => Error::Stream(e),
            CopyError::Write(e) => Error::io(path, e),
            CopyError::Stopped => Error::Interrupted,
        })?;
        Ok(())
    }

    /// Dedup lookups of every layer (by chain ID), a few at once.
    fn lookup_layers(&self, chain: &[Digest]) -> Vec<Option<Reused>> {
        let Some(dd) = &self.dedup else {
            return vec![None; chain.len()];
        };
        let found: Vec<Mutex<Option<Reused>>> = chain.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self.opts.download_concurrency.clamp(1, chain.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chain.len() || self.abort.is_set() {
                        break;
                    }
                    let hit = dd.lookup_layer(&chain[i]);
                    *found[i].lock().unwrap_or_else(|e| e.into_inner()) = hit;
                });
            }
        });
        found
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Get layer `i` for the applier. A reused layer (`hit`): only its descriptor when no
    /// layer above is converted, else downloaded as its commit file (if that fails, the
    /// layer is converted after all). Otherwise the source layer ([`Self::fetch_layer`]).
    fn get_layer(
        &self,
        slot: Slot<'_>,
        layer: &Descriptor,
        dir: &Path,
        hit: Option<(&Reused, bool)>,
        tx: &crossbeam_channel::Sender<Result<LayerBlob>>,
        fail: &dyn Fn(Error),
    ) -> Result<()> {
        let Slot { label, i, n } = slot;
        if let Some((hit, needed_as_lower)) = hit {
            if !needed_as_lower {
                let desc = self.layer_descriptor(hit.digest.clone(), hit.size);
                self.progress.println(&format!(
                    "{label} layer {}/{n}: reused {}{} (not downloaded: no layer above it is converted)",
                    i + 1,
                    hit.digest,
                    hit.from
                        .as_ref()
                        .map(|r| format!(", mounted from {r}"))
                        .unwrap_or_default()
                ));
                let _ = tx.send(Ok(LayerBlob::Reused(Box::new(desc), None)));
                return Ok(());
            }
            match self.fetch_converted(slot, dir, hit) {
                Ok(b) => {
                    let _ = tx.send(Ok(b));
                    return Ok(());
                }
                Err(e) if e.is_interrupted() => return Err(e),
                Err(e) => {
                    let _ = fs::remove_file(dir.join(chain::COMMIT_FILE));
                    tracing::warn!(
                        "{label} layer {}/{n}: cannot download its converted layer {} ({}); converting the layer",
                        i + 1,
                        hit.digest,
                        Chain(&e)
                    );
                }
            }
        }
        self.fetch_layer(slot, layer, dir, tx, fail)
    }

    /// A converted layer reused from the dedup database: download it from the destination
    /// as this layer's commit file (the next layer is built on it), verifying its digest.
    fn fetch_converted(&self, slot: Slot<'_>, dir: &Path, hit: &Reused) -> Result<LayerBlob> {
        let Slot { label, i, n } = slot;
        let desc = self.layer_descriptor(hit.digest.clone(), hit.size);
        let bar = self.progress.start(
            &format!("{label} layer {}/{n}", i + 1),
            Stage::Download,
            Some(hit.size),
        );
        let path = dir.join(chain::COMMIT_FILE);
        // The store's stream verifies size and digest at its end.
        let mut r = self.dst.open_blob(&desc)?;
        let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        self.download(&mut r, &mut f, &path, &mut |pos| bar.set(pos))?;
        bar.finish(
            Some(hit.size),
            &match &hit.from {
                Some(repo) => format!("reused (mounted from {repo})"),
                None => "reused".to_string(),
            },
        );
        Ok(LayerBlob::Reused(Box::new(desc), Some(path)))
    }

    fn apply_layer(
        &self,
        slot: Slot<'_>,
        layer: &Descriptor,
        blob: LayerBlob,
        dir: &Path,
        lowers: &[LowerSource],
        chain: &[Digest],
    ) -> Result<chain::Applied> {
        let Slot { label, i, n } = slot;
        let name = format!("{label} layer {}/{n}", i + 1);
        let input: Box<dyn Read + Send> = match blob {
            LayerBlob::Local => self.src.open_blob(layer)?,
            LayerBlob::Streaming(p, follow) => Box::new(follow.reader(
                File::open(&p).map_err(|e| Error::io(&p, e))?,
                self.abort.clone(),
            )),
            LayerBlob::Reused(..) => {
                return Err(Error::Invalid(format!(
                    "{name}: internal error: a reused layer cannot be applied"
                )))
            }
        };
        let tee = if self.opts.reserve {
            let p = dir.join("layer.tar");
            Some((File::create(&p).map_err(|e| Error::io(&p, e))?, p))
        } else {
            None
        };
        let bottom = i == 0 && self.opts.mkfs;
        let virtual_size = if i == 0 {
            if self.opts.mkfs {
                self.opts.vsize_gb << 30
            } else {
                64 << 30
            }
        } else {
            0
        };
        let job = LayerJob {
            dir,
            lowers,
            virtual_size,
            mkfs: bottom,
            sparse: !self.opts.disable_sparse,
            uuid: blockdev::Uuid::from_chain_id(chain[i].as_str())?,
            parent_uuid: if i > 0 {
                Some(blockdev::Uuid::from_chain_id(chain[i - 1].as_str())?)
            } else {
                None
            },
            zfile: self.opts.zfile_options()?,
        };
        let (tx, rx) = bounded::<io::Result<Vec<u8>>>(16);
        let abort = self.abort.clone();
        std::thread::scope(|s| -> Result<chain::Applied> {
            s.spawn(move || decompress_into(input, tee, tx, &abort));
            let consumed = Arc::new(AtomicU64::new(0));
            let mut reader = ChannelReader {
                rx,
                cur: Vec::new(),
                off: 0,
                eof: false,
                consumed: consumed.clone(),
            };
            let apply_bar = self.progress.start(&name, Stage::Apply, None);
            let setter = apply_bar.setter();
            let res = chain::apply_layer(&job, &mut reader, &mut |b| setter(b));
            // Read to the end so the source digest is verified even if the tar ended
            // before its padding.
            let drained = io::copy(&mut reader, &mut io::sink());
            let applied = res?;
            drained
                .map_err(|e| Error::io(format!("{} layer {}", self.src.name(), layer.digest), e))?;
            apply_bar.finish(Some(consumed.load(Ordering::Relaxed)), "");
            Ok(applied)
        })
    }

    /// Commit an applied layer; returns its commit file. The writable files are
    /// removed later by the upload thread: unlinking a large sparse file takes a while.
    fn commit_one(&self, slot: Slot<'_>, applied: &chain::Applied) -> Result<PathBuf> {
        let Slot { label, i, n } = slot;
        let name = format!("{label} layer {}/{n}", i + 1);
        let bar = self.progress.start(&name, Stage::Commit, None);
        let set = bar.setter();
        let progress = blockdev::commit::Progress(Arc::new(move |done, _total| set(done)));
        let stats = chain::commit_layer(applied, Some(progress))?;
        bar.finish(
            Some(stats.output_size),
            &format!(
                "{} tar entries, {:.1} MB of file data",
                applied.apply.entries,
                applied.apply.data_bytes as f64 / 1e6
            ),
        );
        Ok(applied.out.clone())
    }
}

/// Which layer of which platform manifest a step works on: `label` names the manifest
/// (`[1 linux_amd64]`), `i` is the layer's index of `n`.
#[derive(Clone, Copy)]
struct Slot<'a> {
    label: &'a str,
    i: usize,
    n: usize,
}

/// Why an index child is not a container image (artifacts such as signatures or SBOMs
/// are dropped from the converted index, like attestations), or `None` for images and
/// nested indexes.
fn not_an_image(bytes: &[u8]) -> Option<String> {
    let mt = sniff_media_type(bytes)?;
    if !is_manifest(&mt) {
        return None;
    }
    let m: Manifest = serde_json::from_slice(bytes).ok()?;
    if let Some(a) = &m.artifact_type {
        return Some(format!("an artifact of type {a}"));
    }
    match m.config.media_type.as_str() {
        MT_OCI_CONFIG | MT_DOCKER_CONFIG => None,
        other => Some(format!(
            "config media type {other:?} is not an image config"
        )),
    }
}

/// The source descriptor (platform, annotations, ...) pointing at the converted object.
fn replace_target(src: &Descriptor, new: &Descriptor) -> Descriptor {
    let mut d = src.clone();
    d.digest = new.digest.clone();
    d.size = new.size;
    d.media_type = new.media_type.clone();
    d
}

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

/// Decompress `input` into chunks of up to 1 MiB on `tx` (and into `tee` with `--reserve`).
fn decompress_into(
    input: Box<dyn Read + Send>,
    tee: Option<(File, PathBuf)>,
    tx: crossbeam_channel::Sender<io::Result<Vec<u8>>>,
    abort: &Abort,
) {
    let (mut dec, kind) = match decompress::decoder(input) {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    tracing::debug!("layer is {kind}");
    let mut out = ChunkSender {
        tx: &tx,
        chunk: Vec::with_capacity(CHUNK),
        tee: tee.map(|(f, p)| (io::BufWriter::with_capacity(CHUNK, f), p)),
        closed: false,
    };
    let res = copy(&mut dec, &mut out, &|| abort.is_set(), &mut |_| {})
        .and_then(|_| out.flush().map_err(CopyError::Write));
    let e = match res {
        Ok(()) => return,
        // The applier stopped reading: it reports why.
        Err(CopyError::Write(_)) if out.closed => return,
        Err(CopyError::Read(e)) | Err(CopyError::Write(e)) => e,
        Err(CopyError::Stopped) => io::Error::new(io::ErrorKind::Interrupted, "interrupted"),
    };
    let _ = tx.send(Err(e));
}

/// Collects decompressed bytes into chunks for the applier's channel, copying them into
/// the `--reserve` tee file on the way.
struct ChunkSender<'a> {
    tx: &'a crossbeam_channel::Sender<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    tee: Option<(io::BufWriter<File>, PathBuf)>,
    /// The receiving side is gone.
    closed: bool,
}

impl ChunkSender<'_> {
    fn send_chunk(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        if self.tx.send(Ok(full)).is_err() {
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the layer's applier stopped reading",
            ));
        }
        Ok(())
    }

    fn tee(
        &mut self,
        op: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
    ) -> io::Result<()> {
        match &mut self.tee {
            Some((w, p)) => op(w).map_err(|e| io::Error::new(e.kind(), obdoci::Error::io(&*p, e))),
            None => Ok(()),
        }
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tee(|w| w.write_all(buf))?;
        self.chunk.extend_from_slice(buf);
        if self.chunk.len() >= CHUNK {
            self.send_chunk()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tee(|w| w.flush())?;
        if !self.chunk.is_empty() {
            self.send_chunk()?;
        }
        Ok(())
    }
}

/// Reads the chunks a decompression thread sends.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    off: usize,
    eof: bool,
    /// Bytes handed out so far.
    consumed: Arc<AtomicU64>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.off >= self.cur.len() {
            if self.eof {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.off = 0;
                }
                Ok(Err(e)) => {
                    self.eof = true;
                    return Err(e);
                }
                Err(_) => {
                    self.eof = true;
                    return Ok(0);
                }
            }
        }
        let k = buf.len().min(self.cur.len() - self.off);
        buf[..k].copy_from_slice(&self.cur[self.off..self.off + k]);
        self.off += k;
        self.consumed.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// A ustar header as Go's `archive/tar` writes it for `{Name, Mode, Size}` with no
/// owner or time: octal fields zero-padded and NUL-terminated.
fn go_ustar_header(name: &str, mode: u32, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let oct = |h: &mut [u8; 512], off: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}", w = len - 1);
        h[off..off + len - 1].copy_from_slice(s.as_bytes());
        h[off + len - 1] = 0;
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    oct(&mut h, 100, 8, mode as u64);
    oct(&mut h, 108, 8, 0);
    oct(&mut h, 116, 8, 0);
    oct(&mut h, 124, 12, size);
    oct(&mut h, 136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    oct(&mut h, 329, 8, 0);
    oct(&mut h, 337, 8, 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_header_is_valid_ustar() {
        let h = go_ustar_header("overlaybd.commit", 0o444, 12345);
        let mut data = h.to_vec();
        data.extend(vec![7u8; 12345]);
        data.extend(vec![0u8; (512 - 12345 % 512) + 1024]);
        let mut a = tar::Archive::new(&data[..]);
        let mut n = 0;
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.path().unwrap().to_str().unwrap(), "overlaybd.commit");
            assert_eq!(e.header().mode().unwrap(), 0o444);
            assert_eq!(e.header().size().unwrap(), 12345);
            assert_eq!(e.header().mtime().unwrap(), 0);
            n += 1;
        }
        assert_eq!(n, 1);
    }

    #[test]
    fn channel_reader_passes_errors() {
        let (tx, rx) = bounded(4);
        tx.send(Ok(b"abc".to_vec())).unwrap();
        tx.send(Err(io::Error::other("boom"))).unwrap();
        let mut r = ChannelReader {
            rx,
            cur: vec![],
            off: 0,
            eof: false,
            consumed: Arc::new(AtomicU64::new(0)),
        };
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, b"abc");
        assert!(e.to_string().contains("boom"));
    }
}
