//! TurboOCI layers from OCI layer blobs: what `turboOCI-apply` does, as a
//! library for the tools and the convertor.
//!
//! A TurboOCI layer is made in three steps, as upstream's convertor runs
//! its tools:
//!
//! 1. [`create_layer`]: a writable warp layer (`overlaybd-create
//!    --turboOCI [--mkfs]`);
//! 2. [`apply_layer`]: the layer blob applied in reference mode
//!    (`turboOCI-apply`): for a gzip blob its `gzip.meta` is built first
//!    ([`blockdev::gzindex::build_file`]); metadata is written into the warp
//!    layer, file data becomes target mappings into the uncompressed tar;
//! 3. [`blockdev::commit::commit_warp`]: the sealed `<fs>.fs.meta`
//!    (`overlaybd-commit --turboOCI [-z]`).
//!
//! The layer's filesystem is ext4 (`ext4.fs.meta`) or, with
//! [`FsType::Erofs`] (`--fstype erofs`), EROFS (`erofs.fs.meta`, built by
//! [`crate::erofs::build_layer`]: no mkfs, the bottom layer creates the
//! filesystem and every later one extends its lowers'). The ext4 is written
//! by the upstream-compatible engine ([`crate::photon`]), so the committed
//! `ext4.fs.meta` has upstream's bytes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::gzindex::{self, GzFile};
use blockdev::lsmt::writable::create_warp;
use blockdev::lsmt::WritableLayer;
use blockdev::source::ReadAt;
use blockdev::stack::LowerSource;
use blockdev::warp::TargetSource;
use blockdev::{BlockDevice, Stack};

use crate::apply::{ApplyOptions, ApplyStats};
use crate::error::{Error, Result};
use crate::filedata::TargetData;
use crate::mkfs::MkfsOptions;
use crate::photon;

/// What kind of layer blob a TurboOCI layer can reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// gzip: read through its `gzip.meta`.
    Gzip,
    /// An uncompressed tar, referenced directly.
    Tar,
}

/// Sniff a layer blob: gzip or an uncompressed tar. Anything else (zstd,
/// garbage) cannot be read by offset and is refused naming the file.
pub fn blob_kind(blob: &Path) -> Result<BlobKind> {
    let mut f = std::fs::File::open(blob)
        .map_err(|e| Error::Invalid(format!("cannot open {}: {e}", blob.display())))?;
    let mut head = vec![0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "cannot read {}: {e}",
                    blob.display()
                )))
            }
        }
    }
    let head = &head[..n];
    if gzindex::is_gzip(head) {
        return Ok(BlobKind::Gzip);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(Error::Invalid(format!(
            "{}: zstd-compressed layers cannot be read by offset; TurboOCI needs a gzip or uncompressed tar layer",
            blob.display()
        )));
    }
    if n == 512 && (is_tar_header(head) || head.iter().all(|&b| b == 0)) {
        return Ok(BlobKind::Tar);
    }
    Err(Error::Invalid(format!(
        "{}: neither a gzip blob nor a tar archive",
        blob.display()
    )))
}

/// Whether `h` (512 bytes) is a tar header with a valid checksum.
fn is_tar_header(h: &[u8]) -> bool {
    let field = &h[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let text = text.trim_start();
    let Ok(stored) = u32::from_str_radix(text, 8) else {
        return false;
    };
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    sum == stored
}

/// Create a writable TurboOCI layer (`overlaybd-create --turboOCI`):
/// `data` + `index` of `virtual_size` bytes, with a fresh ext4 when `mkfs`.
/// Both files must not exist; on error they are removed.
pub fn create_layer(data: &Path, index: &Path, virtual_size: u64, with_mkfs: bool) -> Result<()> {
    create_warp(data, index, virtual_size, None).map_err(Error::Device)?;
    if !with_mkfs {
        return Ok(());
    }
    let r = WritableLayer::open_warp(data, index, None, false)
        .and_then(|u| Stack::with_lowers(Vec::new(), Some(u)))
        .map_err(Error::Device)
        .and_then(|s| photon::mkfs(Arc::new(s), &MkfsOptions::default()));
    if r.is_err() {
        let _ = std::fs::remove_file(data);
        let _ = std::fs::remove_file(index);
    }
    r
}

/// The filesystem of a TurboOCI layer's metadata (`--fstype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsType {
    /// ext4 (`ext4.fs.meta`), the default.
    #[default]
    Ext4,
    /// EROFS (`erofs.fs.meta`).
    Erofs,
}

impl FsType {
    /// Parse `--fstype` as upstream does ("" means ext4).
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "" | "ext4" => Some(FsType::Ext4),
            "erofs" => Some(FsType::Erofs),
            _ => None,
        }
    }

    /// The name of the committed layer file (`<fs>.fs.meta`).
    pub fn meta_file_name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4.fs.meta",
            FsType::Erofs => "erofs.fs.meta",
        }
    }
}

/// Inputs of [`apply_layer`].
#[derive(Debug, Clone)]
pub struct TurboApply {
    /// The layer blob (gzip or tar): the upper's target.
    pub blob: PathBuf,
    /// Where to write the gzip index when the blob is gzip
    /// (`--gz_index_path`). Nothing is written for a tar.
    pub gz_index: PathBuf,
    /// The lower layers, bottom first (TurboOCI lowers as
    /// [`LowerSource::Warp`], or any other kind).
    pub lowers: Vec<LowerSource>,
    /// The writable warp layer (`overlaybd-create --turboOCI`).
    pub upper_data: PathBuf,
    pub upper_index: PathBuf,
    /// Make a new ext4 first (`--mkfs`; upstream's convertor instead passes
    /// it to overlaybd-create). Ignored for EROFS, as upstream does.
    pub mkfs: bool,
    /// The filesystem. EROFS creates it on the bottom layer (no lowers)
    /// and extends the lowers' image otherwise.
    pub fstype: FsType,
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone)]
pub struct TurboApplyReport {
    /// The blob's kind.
    pub kind: BlobKind,
    /// The gzip index that was built, for gzip blobs.
    pub gzip_index: Option<gzindex::BuildInfo>,
    /// The apply counters (for EROFS: entries, files and mapped bytes).
    pub stats: ApplyStats,
    /// What the EROFS writer did, for [`FsType::Erofs`].
    pub erofs: Option<crate::erofs::BuildStats>,
}

/// Apply a layer blob in reference mode onto a writable warp layer (what
/// `turboOCI-apply` does): build `gzip.meta` for a gzip blob, open the stack
/// (lowers + the warp upper whose target is the blob), and apply the tar:
/// directories, inodes, xattrs, symlinks and whiteouts are written, each
/// regular file's blocks are mapped to its data in the uncompressed tar.
pub fn apply_layer(
    job: &TurboApply,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<TurboApplyReport> {
    let kind = blob_kind(&job.blob)?;
    let (target, built): (Arc<dyn ReadAt>, _) = match kind {
        BlobKind::Gzip => {
            let info = gzindex::build_file(&job.blob, &job.gz_index).map_err(Error::Device)?;
            let gz = GzFile::open_paths(&job.blob, &job.gz_index).map_err(Error::Device)?;
            (Arc::new(gz), Some(info))
        }
        BlobKind::Tar => (
            TargetSource::tar(&job.blob).open().map_err(Error::Device)?,
            None,
        ),
    };
    let lowers = job
        .lowers
        .iter()
        .map(LowerSource::open)
        .collect::<blockdev::Result<Vec<_>>>()
        .map_err(Error::Device)?;
    let upper = WritableLayer::open_warp(
        &job.upper_data,
        &job.upper_index,
        Some(target.clone()),
        false,
    )
    .map_err(Error::Device)?;
    let stack: Arc<dyn BlockDevice> =
        Arc::new(Stack::with_lowers(lowers, Some(upper)).map_err(Error::Device)?);
    if job.fstype == FsType::Erofs {
        let start = std::time::Instant::now();
        let opts = crate::erofs::BuildOptions {
            incremental: !job.lowers.is_empty(),
        };
        let mut progress = progress;
        let mut report = |entries: u64, tar_bytes: u64| {
            if let Some(p) = progress.as_mut() {
                p(&ApplyStats {
                    entries,
                    tar_bytes,
                    elapsed: start.elapsed(),
                    ..Default::default()
                });
            }
        };
        let e = crate::erofs::build_layer_with_progress(
            stack.clone(),
            ReadAtStream::new(target),
            &opts,
            Some(&mut report),
        )?;
        stack.flush().map_err(Error::Device)?;
        let stats = ApplyStats {
            entries: e.entries,
            files: e.mapped_files,
            data_bytes: e.mapped_bytes,
            elapsed: start.elapsed(),
            ..Default::default()
        };
        return Ok(TurboApplyReport {
            kind,
            gzip_index: built,
            stats,
            erofs: Some(e),
        });
    }
    if job.mkfs {
        photon::mkfs(stack.clone(), &MkfsOptions::default())?;
    }
    let stats = apply_reference(stack.clone(), ReadAtStream::new(target), progress)?;
    stack.flush().map_err(Error::Device)?;
    Ok(TurboApplyReport {
        kind,
        gzip_index: built,
        stats,
        erofs: None,
    })
}

/// Apply the uncompressed layer tar `tar` to the ext4 on `dev` in reference
/// mode, with the upstream-compatible engine ([`crate::photon`]): file data
/// becomes [`BlockDevice::map_target`] mappings to its offset in `tar` (so
/// `dev` is a stack with a TurboOCI upper whose target is that tar).
pub fn apply_reference<R: Read>(
    dev: Arc<dyn BlockDevice>,
    tar: R,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<ApplyStats> {
    let opts = ApplyOptions {
        progress,
        file_data: Some(Box::new(TargetData::new(dev.clone()))),
        ..Default::default()
    };
    photon::apply_tar(dev, tar, opts)
}

/// A [`ReadAt`] read from start to end as a stream.
pub struct ReadAtStream {
    src: Arc<dyn ReadAt>,
    pos: u64,
}

impl ReadAtStream {
    pub fn new(src: Arc<dyn ReadAt>) -> Self {
        ReadAtStream { src, pos: 0 }
    }
}

impl Read for ReadAtStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .src
            .read_at(buf, self.pos)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}
