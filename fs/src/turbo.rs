//! TurboOCI layers from OCI layer blobs: what `turboOCI-apply` does, as a
//! library for the tools and the convertor.
//!
//! A TurboOCI layer is made in three steps, as upstream's convertor runs
//! its tools:
//!
//! 1. [`create_layer`]: a writable warp layer (`overlaybd-create
//!    --turboOCI [--mkfs]`);
//! 2. [`apply_layer`]: the layer blob applied in reference mode
//!    (`turboOCI-apply`), in one sequential pass over the blob: a gzip blob
//!    is inflated once, its `gzip.meta` built on the way
//!    ([`blockdev::gzindex::Indexer`]); metadata is written into the warp
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

use blockdev::gzindex;
use blockdev::io::NotRegular;
use blockdev::lsmt::writable::create_warp;
use blockdev::lsmt::WritableLayer;
use blockdev::pending::PendingFile;
use blockdev::stack::LowerSource;
use blockdev::{BlockDevice, Stack};
use sha2::{Digest as _, Sha256};

use crate::apply::{ApplyOptions, ApplyStats};
use crate::error::{Error, Result};
use crate::filedata::TargetData;
use crate::mkfs::MkfsOptions;
use crate::photon;
use crate::tarskel::{self, Halt, Piece, SkeletonReader};

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
    let f = std::fs::File::open(blob).map_err(|e| Error::Blob(blockdev::Error::io(blob, e)))?;
    let head = read_head(f, blob)?;
    sniff(blob, &head)
}

/// Up to [`HEAD`] bytes from the start of `r` (fewer only at its end).
fn read_head(mut r: impl Read, name: &Path) -> Result<Vec<u8>> {
    let mut head = vec![0u8; HEAD];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Blob(blockdev::Error::io(name, e))),
        }
    }
    head.truncate(n);
    Ok(head)
}

/// Bytes [`sniff`] looks at: one tar header.
const HEAD: usize = 512;

/// The kind of the blob `name` that starts with `head` (its first 512
/// bytes, fewer if it is shorter).
pub fn sniff(name: &Path, head: &[u8]) -> Result<BlobKind> {
    if gzindex::is_gzip(head) {
        return Ok(BlobKind::Gzip);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(Error::Invalid(format!(
            "{}: zstd-compressed layers cannot be read by offset; TurboOCI needs a gzip or uncompressed tar layer",
            name.display()
        )));
    }
    if head.len() == HEAD && (is_tar_header(head) || head.iter().all(|&b| b == 0)) {
        return Ok(BlobKind::Tar);
    }
    Err(Error::Invalid(format!(
        "{}: neither a gzip blob nor a tar archive",
        name.display()
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
    create_layer_through(data, index, virtual_size, with_mkfs, |dev| dev)
}

/// [`create_layer`], the ext4 made through the device `through` returns for
/// the layer's (a wrapper that reports the progress of a long mkfs, say; it
/// must write what it is given).
pub fn create_layer_through(
    data: &Path,
    index: &Path,
    virtual_size: u64,
    with_mkfs: bool,
    through: impl FnOnce(Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice>,
) -> Result<()> {
    create_warp(data, index, virtual_size, None).map_err(Error::Device)?;
    if !with_mkfs {
        return Ok(());
    }
    let r = WritableLayer::open_warp(data, index, None, false)
        .and_then(|u| Stack::with_lowers(Vec::new(), Some(u)))
        .map_err(Error::Device)
        .and_then(|s| photon::mkfs(through(Arc::new(s)), &MkfsOptions::default()));
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
/// The blob is read once, as [`apply_stream`] does.
pub fn apply_layer(
    job: &TurboApply,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<TurboApplyReport> {
    // The layer maps file data into the blob by offset. A FIFO streams one
    // (a writer comes), but a directory, a socket or a character device
    // (/dev/zero never ends: the apply would read forever) is no blob.
    blockdev::io::check_regular_with(&job.blob, |why| match why {
        NotRegular::Is(kind @ ("a directory" | "a character device" | "a socket")) => {
            Some(Error::Blob(blockdev::Error::Invalid(format!(
                "{}: not a layer blob: it is {kind}",
                job.blob.display()
            ))))
        }
        _ => None,
    })?;
    let f = std::fs::File::open(&job.blob)
        .map_err(|e| Error::Blob(blockdev::Error::io(&job.blob, e)))?;
    let blob = std::io::BufReader::with_capacity(1 << 20, f);
    apply_stream(job, blob, Durability::Fsync, progress)
}

/// Whether [`apply_stream`] makes the layer's files durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the layer's data and index at the end (a tool's output).
    Fsync,
    /// Work files this process commits next and drops if it stops (the
    /// convertor's): written, not fsynced.
    Scratch,
}

/// Skeleton pieces in flight between a blob's reading thread and its apply
/// ([`crate::tarskel`]: at most 256 KiB of headers and 32 MiB of tar each):
/// at most 8 MiB of headers, and at least 1 GiB of tar ahead.
const IN_FLIGHT: usize = 32;

/// [`apply_layer`] with the blob's bytes read from `blob` (`job.blob`
/// names it in errors; a stream that follows a download works: nothing is
/// read from `job.blob` itself): [`read_ahead`] then [`apply_read_ahead`].
pub fn apply_stream<R: Read + Send + 'static>(
    job: &TurboApply,
    blob: R,
    durability: Durability,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<TurboApplyReport> {
    let ahead = read_ahead(&job.blob, &job.gz_index, blob)?;
    apply_read_ahead(job, ahead, durability, progress)
}

/// A layer blob being read on a thread of its own ([`read_ahead`]), for
/// [`apply_read_ahead`]. Dropping it stops the thread and waits for it.
pub struct ReadAhead {
    blob: PathBuf,
    /// Where the index is written: renamed to the `gz_index` asked for once
    /// the apply succeeded, removed otherwise (a file already at `gz_index` is
    /// never touched by a failed apply). Shared with the reading thread.
    gz_tmp: Arc<PendingFile>,
    rx: Option<std::sync::mpsc::Receiver<std::io::Result<Piece>>>,
    thread: Option<std::thread::JoinHandle<Produced>>,
}

type Produced = std::result::Result<(BlobKind, Option<gzindex::BuildInfo>), Produce>;

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Without its reader the thread stops at its next piece.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // `gz_tmp`, dropped next, removes an index not renamed into place.
    }
}

/// Starts reading the layer blob `blob` (named `name` in errors) on a
/// thread of its own, ahead of its apply ([`apply_read_ahead`]) and while
/// other layers are applied: a gzip blob is inflated once, its `gzip.meta`
/// written to `gz_index` on the way ([`gzindex::Indexer`]); a tar blob is
/// read. The apply only needs the tar's headers (file data is mapped, not
/// copied), so the thread keeps only those ([`crate::tarskel`]): it can run
/// through a whole layer ahead with little memory, and stops (bounded) when
/// the apply falls `IN_FLIGHT` pieces behind. The blob is read to its end
/// (the index counts trailing bytes, and a verifying stream checks its
/// digest there).
pub fn read_ahead<R: Read + Send + 'static>(
    name: &Path,
    gz_index: &Path,
    blob: R,
) -> Result<ReadAhead> {
    read_ahead_checked(name, gz_index, blob, None)
}

/// [`read_ahead`], and the uncompressed tar must have the SHA-256 digest
/// `diff_id` (`sha256:<hex>`, the layer's `rootfs.diff_ids` entry) when given:
/// the apply fails at the end of the tar otherwise.
pub fn read_ahead_checked<R: Read + Send + 'static>(
    name: &Path,
    gz_index: &Path,
    blob: R,
    diff_id: Option<String>,
) -> Result<ReadAhead> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Piece>>(IN_FLIGHT);
    let gz_tmp = Arc::new(PendingFile::new(gz_index).map_err(Error::Blob)?);
    let (n, idx, tmp) = (name.to_path_buf(), gz_index.to_path_buf(), gz_tmp.clone());
    let thread = std::thread::Builder::new()
        .name("layer-read".into())
        .spawn(move || produce(&n, &idx, &tmp, blob, diff_id, tx))
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot start a thread to read {}: {e}",
                name.display()
            ))
        })?;
    Ok(ReadAhead {
        blob: name.to_path_buf(),
        gz_tmp,
        rx: Some(rx),
        thread: Some(thread),
    })
}

/// Applies a blob read by [`read_ahead`] as [`apply_layer`] does (`job`'s
/// `blob` and `gz_index` are those of the read). A blob that ends early,
/// or a tar entry whose data runs past the end of the tar, fails the apply.
pub fn apply_read_ahead(
    job: &TurboApply,
    mut ahead: ReadAhead,
    durability: Durability,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<TurboApplyReport> {
    let rx = ahead.rx.take().expect("a ReadAhead is applied once");
    let mut tar = SkeletonReader::new(rx);
    let applied = apply_tar_stream(job, &mut tar, durability, progress).and_then(|a| {
        // The rest (an archive's trailing blocks) so the reading ends; a
        // failed apply drops the reader instead, which stops it.
        std::io::copy(&mut tar, &mut std::io::sink()).map_err(|source| Error::Read {
            offset: a.0.tar_bytes,
            source,
        })?;
        Ok(a)
    });
    drop(tar);
    let produced = ahead
        .thread
        .take()
        .expect("a ReadAhead is applied once")
        .join()
        .unwrap_or_else(|_| {
            Err(Produce::Failed(Error::Invalid(
                "the layer reading thread panicked".into(),
            )))
        });
    // A bad or short blob is the cause of whatever the apply saw.
    let ((kind, gzip_index), (stats, erofs)) = match (produced, applied) {
        (Err(Produce::Failed(e)), _) | (_, Err(e)) => return Err(e),
        (Err(Produce::Stopped), Ok(_)) => {
            return Err(Error::Invalid(format!(
                "internal error: the apply stopped reading {} early",
                ahead.blob.display()
            )))
        }
        (Ok(p), Ok(a)) => (p, a),
    };
    if kind == BlobKind::Gzip {
        ahead.gz_tmp.persist(true).map_err(Error::Blob)?;
    }
    Ok(TurboApplyReport {
        kind,
        gzip_index,
        stats,
        erofs,
    })
}

/// How the reading side of [`read_ahead`] failed.
enum Produce {
    /// The apply stopped reading (it reports why).
    Stopped,
    /// Reading or inflating the blob, or writing its index, failed.
    Failed(Error),
}

/// The reading side of [`read_ahead`]: sniffs the blob and sends its tar's
/// skeleton to `tx`, building `gzip.meta` on the way for a gzip blob.
fn produce(
    name: &Path,
    idx: &Path,
    tmp: &PendingFile,
    mut blob: impl Read,
    diff_id: Option<String>,
    tx: std::sync::mpsc::SyncSender<std::io::Result<Piece>>,
) -> Produced {
    let failed = |e: Error| {
        // The apply's stream then fails too (this error is the one reported).
        let _ = tx.send(Err(std::io::Error::other("the layer blob cannot be read")));
        Produce::Failed(e)
    };
    let head = read_head(&mut blob, name).map_err(failed)?;
    let kind = sniff(name, &head).map_err(failed)?;
    let blob = std::io::Cursor::new(head).chain(blob);
    let send = |p: Piece| tx.send(Ok(p)).is_ok();
    let halted = |h: Halt| match h {
        Halt::Sink => Produce::Stopped,
        Halt::Source(e) => failed(e),
    };
    // Every uncompressed byte goes through `hash` when a diff_id is to match.
    let mut hash = diff_id.as_ref().map(|_| Sha256::new());
    let mut hashed = |r: Result<usize>, b: &[u8]| {
        if let (Ok(n), Some(h)) = (&r, hash.as_mut()) {
            h.update(&b[..*n]);
        }
        r
    };
    let out = match kind {
        BlobKind::Tar => {
            let mut blob = std::io::BufReader::with_capacity(1 << 20, blob);
            let read = |b: &mut [u8]| loop {
                match blob.read(b) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => {
                        let r = r.map_err(|e| Error::Blob(blockdev::Error::io(name, e)));
                        return hashed(r, b);
                    }
                }
            };
            tarskel::record(read, send).map_err(halted)?;
            (kind, None)
        }
        BlobKind::Gzip => {
            // Written beside `idx` and renamed once the apply succeeded; errors
            // name `idx`, the file asked for: the indexer's own failed writes
            // (a full disk) come without a path.
            let at_idx = |e: blockdev::Error| match e {
                blockdev::Error::RawIo(io) => blockdev::Error::io(idx, io),
                other => other,
            };
            let fail = |e: blockdev::Error| failed(Error::Blob(at_idx(e)));
            let out = tmp
                .create(std::fs::OpenOptions::new().write(true))
                .map_err(fail)?;
            let w = std::io::BufWriter::new(out);
            let mut ix =
                gzindex::Indexer::new(blob, name, w, gzindex::DEFAULT_SPAN).map_err(fail)?;
            tarskel::record(
                |b| {
                    let r = ix.read_uncompressed(b).map_err(|e| Error::Blob(at_idx(e)));
                    hashed(r, b)
                },
                send,
            )
            .map_err(halted)?;
            let (info, w) = ix.finish().map_err(fail)?;
            w.into_inner()
                .map_err(|e| fail(blockdev::Error::io(idx, e.into_error())))?;
            (kind, Some(info))
        }
    };
    if let (Some(want), Some(h)) = (diff_id, hash) {
        let got = format!("sha256:{:x}", h.finalize());
        if got != want {
            return Err(failed(Error::Invalid(format!(
                "{}: the uncompressed layer is {got}, but the config's rootfs.diff_ids entry says {want}",
                name.display()
            ))));
        }
    }
    Ok(out)
}

/// The apply side of [`apply_stream`]: opens the stack (the upper without
/// its target: the apply maps file data, it never reads it) and applies
/// `tar` as ext4 or EROFS.
fn apply_tar_stream(
    job: &TurboApply,
    tar: &mut dyn Read,
    durability: Durability,
    progress: Option<&mut dyn FnMut(&ApplyStats)>,
) -> Result<(ApplyStats, Option<crate::erofs::BuildStats>)> {
    let lowers = Stack::open_lowers(&job.lowers).map_err(Error::Device)?;
    let mut upper = WritableLayer::open_warp(&job.upper_data, &job.upper_index, None, false)
        .map_err(Error::Device)?;
    if durability == Durability::Scratch {
        upper = upper.scratch();
    }
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
        let e =
            crate::erofs::build_layer_with_progress(stack.clone(), tar, &opts, Some(&mut report))?;
        stack.flush().map_err(Error::Device)?;
        let stats = ApplyStats {
            entries: e.entries,
            files: e.mapped_files,
            data_bytes: e.mapped_bytes,
            elapsed: start.elapsed(),
            ..Default::default()
        };
        return Ok((stats, Some(e)));
    }
    if job.mkfs {
        photon::mkfs(stack.clone(), &MkfsOptions::default())?;
    }
    let stats = apply_reference(stack.clone(), tar, progress)?;
    stack.flush().map_err(Error::Device)?;
    Ok((stats, None))
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
