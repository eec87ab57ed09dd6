//! The native overlaybd format (upstream's `--overlaybd` / `-o`): each source layer is
//! decompressed and applied onto an ext4 in an LSMT writable layer stacked on the layers
//! below ([`crate::chain`]), then committed to `overlaybd.commit`: a ZFile (lz4, 4 KiB
//! blocks) wrapped in a tar, uuid = UUID(chain ID), parent = UUID(previous chain ID).
//!
//! Layer descriptor: media type `application/vnd.docker.image.rootfs.diff.tar` (OCI:
//! `application/vnd.oci.image.layer.v1.tar`), annotations `overlaybd/version: 0.1.0`,
//! `blob-digest`, `blob-size`; the diff ID is the blob digest (the blob is an
//! uncompressed tar). With `--mkfs=false` upstream's prebuilt base layer, tar-wrapped as
//! upstream wraps it (`overlaybd.commit`, mode 0444, no times), is the bottom layer.

use super::gotar::go_ustar_header;
use super::{
    Applied, LayerChain, LayerInput, LayerJob, LayerOut, ManifestJob, OutputFormat, ProgressFn,
    Reuse, SealJob, Sealed,
};
use crate::annotations::*;
use crate::chain::{self, LayerJob as ChainJob};
use crate::dedup::Reused;
use crate::{ConvertOptions, Error, Result, FORMAT_VERSION};
use blockdev::stack::LowerSource;
use obdoci::digest::hash_reader;
use obdoci::model::*;
use obdoci::{Descriptor, Digest};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The native overlaybd output format.
#[derive(Clone, Debug)]
pub struct NativeFormat {
    oci: bool,
    referrer: bool,
    mkfs: bool,
    vsize_gb: u64,
    sparse: bool,
    reserve: bool,
    baselayer: PathBuf,
    /// How the ext4 is made and each tar applied (`--engine`).
    engine: Arc<dyn obdfs::Engine>,
    /// `--algorithm` / `--bs` as given; checked by [`OutputFormat::check`].
    zfile_algorithm: crate::ZfileAlgorithm,
    zfile_block_kib: u32,
}

impl NativeFormat {
    pub fn new(o: &ConvertOptions) -> NativeFormat {
        NativeFormat {
            oci: o.oci || o.referrer,
            referrer: o.referrer,
            mkfs: o.mkfs,
            vsize_gb: o.vsize_gb,
            sparse: !o.disable_sparse,
            reserve: o.reserve,
            baselayer: o.baselayer.clone(),
            engine: o.engine.clone(),
            zfile_algorithm: o.zfile_algorithm,
            zfile_block_kib: o.zfile_block_kib,
        }
    }

    /// The ZFile options of committed layers (`--algorithm`, `--bs`).
    fn zfile(&self) -> Result<blockdev::zfile::ZfileOptions> {
        crate::zfile_options(self.zfile_algorithm, self.zfile_block_kib)
    }

    /// The descriptor of a native layer blob.
    fn layer_descriptor(&self, d: Digest, size: u64) -> Descriptor {
        native_layer_descriptor(self.oci, d, size)
    }
}

/// The descriptor of a native overlaybd layer blob (also upstream's base layer with
/// `--mkfs=false`, in either format): tar media type (OCI or Docker), blob digest,
/// size and version annotations.
pub(super) fn native_layer_descriptor(oci: bool, d: Digest, size: u64) -> Descriptor {
    let mt = if oci {
        MT_OCI_LAYER_TAR
    } else {
        MT_DOCKER_LAYER_TAR
    };
    let ann = blob_annotations(&d, size, OVERLAYBD_VERSION);
    let mut desc = Descriptor::new(mt, d, size);
    desc.annotations = Some(ann);
    desc
}

/// The dedup key options shared by the formats: vsize, mkfs, referrer, and the base
/// layer's content with `--mkfs=false` (every layer is applied on top of it).
pub(crate) fn key_options(
    vsize_gb: u64,
    mkfs: bool,
    referrer: bool,
    baselayer: &Path,
) -> Result<Vec<(&'static str, String)>> {
    let mut opts: Vec<(&str, String)> =
        vec![("vsize", vsize_gb.to_string()), ("mkfs", mkfs.to_string())];
    opts.push(("referrer", referrer.to_string()));
    if !mkfs {
        let f = File::open(baselayer).map_err(|e| Error::io(baselayer, e))?;
        let (d, _) = hash_reader(f).map_err(|e| Error::io(baselayer, e))?;
        opts.push(("base", d.hex()[..16].to_string()));
    }
    Ok(opts)
}

/// `--mkfs=false` needs the base layer file.
pub(crate) fn check_baselayer(mkfs: bool, baselayer: &Path) -> Result<()> {
    if !mkfs && !baselayer.is_file() {
        return Err(Error::Invalid(format!(
            "--mkfs=false needs upstream's prebuilt base layer at {}, which is missing; \
             give its path with --baselayer, or use --mkfs (the default) to make the \
             filesystem in the bottom layer",
            baselayer.display()
        )));
    }
    Ok(())
}

impl OutputFormat for NativeFormat {
    fn name(&self) -> &'static str {
        "overlaybd"
    }

    fn artifact_type(&self) -> &'static str {
        ARTIFACT_TYPE_OVERLAYBD
    }

    fn dedup_format_key(&self) -> Result<String> {
        let mut opts = key_options(self.vsize_gb, self.mkfs, self.referrer, &self.baselayer)?;
        // Upstream's order: sparse after mkfs.
        opts.insert(2, ("sparse", self.sparse.to_string()));
        // Left out for the default engine, so that its keys stay as they were.
        if self.engine.name() != "libext2fs" {
            opts.push(("engine", self.engine.name().to_string()));
        }
        // Differently compressed layers never share rows; the default (lz4, 4 KiB)
        // keeps the key it had before these options existed.
        let z = self.zfile()?;
        if z.algorithm != crate::ZfileAlgorithm::Lz4 || z.block_size != 4096 {
            opts.push((
                "zfile",
                format!("{}-{}k", self.zfile_algorithm, self.zfile_block_kib),
            ));
        }
        let refs: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Ok(obddedup::format_key(FORMAT_VERSION, &refs))
    }

    fn check(&self) -> Result<()> {
        self.zfile()?;
        check_baselayer(self.mkfs, &self.baselayer)
    }

    fn check_layer(&self, _layer: &Descriptor) -> std::result::Result<(), String> {
        Ok(())
    }

    /// A layer below a converted one is its lower: its commit file is downloaded.
    fn reuse(&self, needed_as_lower: bool) -> Reuse {
        if needed_as_lower {
            Reuse::Download(chain::COMMIT_FILE)
        } else {
            Reuse::Descriptor
        }
    }

    fn begin<'a>(&'a self, job: &ManifestJob<'a>) -> Result<Box<dyn LayerChain + 'a>> {
        let mut lowers = Vec::new();
        if !self.mkfs {
            lowers.push((None, LowerSource::File(self.baselayer.clone())));
        }
        Ok(Box::new(NativeChain {
            fmt: self,
            chain_ids: job.chain_ids.to_vec(),
            lowers,
            primed: None,
        }))
    }

    /// The upstream base layer (`--mkfs=false`): the prebuilt ext4 image, tar-wrapped
    /// the way upstream's convertor wraps it, as the bottom layer.
    fn base_layers(&self, mdir: &Path) -> Result<Vec<(Descriptor, PathBuf)>> {
        if self.mkfs {
            return Ok(Vec::new());
        }
        let base = &self.baselayer;
        let mut f = File::open(base).map_err(|e| {
            Error::io(base, e).context("--mkfs=false needs upstream's prebuilt base layer")
        })?;
        let len = f.metadata().map_err(|e| Error::io(base, e))?.len();
        let out = mdir.join("ext4_64.tar");
        let mut w = io::BufWriter::new(File::create(&out).map_err(|e| Error::io(&out, e))?);
        go_ustar_header("overlaybd.commit", 0o444, len)
            .and_then(|h| w.write_all(&h))
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
        Ok(vec![(self.layer_descriptor(d, size), out)])
    }
}

/// The layers of one manifest as native overlaybd layers.
struct NativeChain<'a> {
    fmt: &'a NativeFormat,
    chain_ids: Vec<Digest>,
    /// Bottom first; each with the index of its layer (`None`: the base layer).
    lowers: Vec<(Option<usize>, LowerSource)>,
    /// The bottom layer, made ready (its ext4 made) before its tar arrived.
    primed: Option<chain::Prepared>,
}

impl NativeChain<'_> {
    /// The chain step of layer `job.index` on `lowers` (the layers below it).
    fn chain_job<'j>(
        &'j self,
        job: &'j LayerJob<'_>,
        lowers: &'j [LowerSource],
    ) -> Result<ChainJob<'j>> {
        let i = job.index;
        let f = self.fmt;
        let virtual_size = match (i, f.mkfs) {
            (0, true) => f.vsize_gb << 30,
            (0, false) => 64 << 30,
            _ => 0,
        };
        Ok(ChainJob {
            dir: job.dir,
            lowers,
            virtual_size,
            mkfs: i == 0 && f.mkfs,
            engine: &*f.engine,
            zfile: f.zfile()?,
            sparse: f.sparse,
            // With --reserve the writable files are kept to look at.
            packed: !f.reserve,
            uuid: blockdev::Uuid::from_chain_id(self.chain_ids[i].as_str())?,
            parent_uuid: if i > 0 {
                Some(blockdev::Uuid::from_chain_id(
                    self.chain_ids[i - 1].as_str(),
                )?)
            } else {
                None
            },
        })
    }
}

impl LayerChain for NativeChain<'_> {
    /// Creates the bottom layer and makes its ext4 (with `--mkfs`), which needs no tar.
    fn prime(&mut self, job: &LayerJob<'_>) -> Result<()> {
        if job.index != 0 || !self.fmt.mkfs || self.primed.is_some() {
            return Ok(());
        }
        let cj = self.chain_job(job, &[])?;
        self.primed = Some(chain::prepare_layer(&cj, true)?);
        Ok(())
    }

    fn apply(
        &mut self,
        job: &LayerJob<'_>,
        input: LayerInput<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Applied> {
        let i = job.index;
        let f = self.fmt;
        let prepared = match self.primed.take().filter(|_| i == 0) {
            Some(p) => p,
            None => {
                let lowers: Vec<LowerSource> = self.lowers.iter().map(|(_, l)| l.clone()).collect();
                chain::prepare_layer(&self.chain_job(job, &lowers)?, false)?
            }
        };
        let tee = f.reserve.then(|| job.dir.join("layer.tar"));
        let (applied, bytes) = crate::tarstream::with_tar(input, tee.as_deref(), |tar| {
            prepared.apply(&*f.engine, tar, progress)
        })?;
        self.lowers.push((Some(i), applied.as_lower()));
        Ok(Applied {
            seal: Box::new(NativeSeal {
                fmt: f.clone(),
                applied,
            }),
            input_bytes: bytes,
        })
    }

    fn sealed(&mut self, index: usize, sealed: &Sealed) {
        if let Some((_, l)) = self.lowers.iter_mut().find(|(i, _)| *i == Some(index)) {
            *l = LowerSource::File(sealed.blob.clone());
        }
    }

    fn reused(
        &mut self,
        job: &LayerJob<'_>,
        hit: &Reused,
        file: Option<&Path>,
    ) -> Result<LayerOut> {
        // Downloaded as its commit file when a layer above is built on it.
        if let Some(f) = file {
            self.lowers
                .push((Some(job.index), LowerSource::File(f.to_path_buf())));
        }
        Ok(LayerOut {
            desc: self.fmt.layer_descriptor(hit.digest.clone(), hit.size),
            diff_id: hit.digest.clone(),
        })
    }
}

/// Commits an applied layer: ZFile in a tar, with its uuids.
struct NativeSeal {
    fmt: NativeFormat,
    applied: chain::Applied,
}

impl SealJob for NativeSeal {
    fn seal(self: Box<Self>, progress: ProgressFn) -> Result<Sealed> {
        let (a, stats) = (&self.applied.files, &self.applied.apply);
        let p = blockdev::commit::Progress(Arc::new(move |done, _total| progress(done)));
        chain::commit_layer(a, Some(p))?;
        let f = File::open(&a.out).map_err(|e| Error::io(&a.out, e))?;
        let (d, size) = hash_reader(f).map_err(|e| Error::io(&a.out, e))?;
        Ok(Sealed {
            out: LayerOut {
                desc: self.fmt.layer_descriptor(d.clone(), size),
                diff_id: d,
            },
            blob: a.out.clone(),
            // Removed by the uploader: unlinking a large sparse file takes a while.
            scratch: vec![a.data.clone(), a.index.clone()],
            note: format!(
                "{} tar entries, {:.1} MB of file data",
                stats.entries,
                stats.data_bytes as f64 / 1e6
            ),
        })
    }
}
