//! Committing a layer: what `overlaybd-commit` does.
//!
//! A writable layer (or an already sealed one) is compacted into a sealed
//! LSMT blob, optionally ZFile-compressed (`-z`) and tar-wrapped (`-t`).
//! The output bytes equal upstream's for the same input and options.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::IoFile;
use crate::layer::open_blob;
use crate::lsmt::compact::{compact, compact_stored, compact_warp, SealInfo};
use crate::lsmt::format::SECTOR;
use crate::lsmt::{SealedLayer, WritableLayer};
use crate::pending::PendingFile;
use crate::source::{BlobSink, FileSink};
use crate::tarwrap;
use crate::uuid::Uuid;
use crate::zfile::{StoredSource, ZFileWriter, ZfileOptions};

/// A progress callback: `(bytes of layer data copied, total bytes)`.
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

/// Options of a commit, mirroring `overlaybd-commit`'s flags.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// `-z`: compress to ZFile with these options.
    pub zfile: Option<ZfileOptions>,
    /// `-t`: wrap the output in a tar.
    pub tar: bool,
    /// `--uuid`: uuid of the committed layer (nil when absent, as upstream).
    pub uuid: Option<Uuid>,
    /// `--parent-uuid`: overrides the parent uuid recorded in the source.
    pub parent_uuid: Option<Uuid>,
    /// `-m`: commit message, at most 256 bytes.
    pub user_tag: Option<String>,
    /// `-f`: replace an existing output file.
    pub force: bool,
    /// Called as data is copied.
    pub progress: Option<Progress>,
}

/// What a commit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStats {
    /// Size of the sealed LSMT blob before compression.
    pub lsmt_size: u64,
    /// Size of the output file.
    pub output_size: u64,
    /// Bytes of layer data copied.
    pub data_bytes: u64,
}

fn seal_info(opts: &CommitOptions, virtual_size: u64, source_parent: Uuid) -> Result<SealInfo> {
    let tag = opts.user_tag.clone().unwrap_or_default().into_bytes();
    if tag.len() > 256 {
        return Err(Error::Invalid(format!(
            "commit message is {} bytes; at most 256 are allowed",
            tag.len()
        )));
    }
    Ok(SealInfo {
        virtual_size,
        uuid: opts.uuid.unwrap_or(Uuid::NIL),
        parent_uuid: opts.parent_uuid.unwrap_or(source_parent),
        user_tag: tag,
    })
}

/// Create the file that becomes `out` once complete: a [`PendingFile`]
/// beside it, renamed over it (with `force`; never over an existing file
/// without) by [`PendingFile::persist`], removed if dropped before. Refused
/// when `out` is one of `inputs` (replacing it would lose the input), when
/// it is not a regular file, and when it exists without `force`.
fn create_output(out: &Path, force: bool, inputs: &[&Path]) -> Result<(IoFile, PendingFile)> {
    check_output(out, force, inputs)?;
    let pending = PendingFile::new(out)?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        pending.create(OpenOptions::new().read(true).write(true).mode(0o644))?
    };
    // Errors name the destination, the file asked for.
    let file = IoFile::from_file(out.to_path_buf(), file, crate::io::default_backend())?;
    Ok((file, pending))
}

/// Whether `out` may be written as a commit's or compression's output: not
/// one of `inputs`, not a device, FIFO, socket or directory, and not an
/// existing file unless `force`. A commit checks this before it creates the
/// output; tools call it themselves to say so before reading their input.
pub fn check_output(out: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    if let Some(i) = inputs.iter().find(|i| crate::io::same_file(out, i)) {
        return Err(Error::Invalid(format!(
            "output {} is the input file {}: write to another path",
            out.display(),
            i.display()
        )));
    }
    crate::io::check_replaceable(out)?;
    // Found before the work; the final rename refuses one made meanwhile.
    if !force && std::fs::symlink_metadata(out).is_ok() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output already exists (force, -f, replaces it)",
            ),
        ));
    }
    Ok(())
}

/// How the sealed blob is made from the entries, their data and, for data some of
/// whose ZFile blocks are already compressed, those blocks.
#[derive(Clone, Copy)]
enum Compactor<'a> {
    Plain,
    Warp,
    Stored(&'a dyn StoredSource),
}

impl Compactor<'_> {
    fn run(
        self,
        entries: &[crate::lsmt::Mapping],
        info: &SealInfo,
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
        out: &mut dyn crate::lsmt::compact::CompactOut,
    ) -> Result<u64> {
        match self {
            Compactor::Plain => compact(entries, info, read, out),
            Compactor::Warp => compact_warp(entries, info, read, out),
            Compactor::Stored(st) => compact_stored(entries, info, read, st, out),
        }
    }
}

/// Run the compaction into `out` with the requested wrapping.
fn write_output(
    out: &Path,
    inputs: &[&Path],
    opts: &CommitOptions,
    entries: &[crate::lsmt::Mapping],
    info: &SealInfo,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    compact: Compactor<'_>,
) -> Result<CommitStats> {
    // On error `pending` removes the unfinished file; `out` is not touched.
    let (file, pending) = create_output(out, opts.force, inputs)?;
    let total: u64 = entries
        .iter()
        .filter(|m| !m.zeroed && m.tag == 0)
        .map(|m| m.length as u64 * SECTOR)
        .sum();
    let mut done = 0u64;
    let mut last_report = 0u64;
    let progress = opts.progress.clone();
    let mut read = |buf: &mut [u8], moff: u64| -> Result<()> {
        read(buf, moff)?;
        done += buf.len() as u64;
        if let Some(p) = &progress {
            if done - last_report >= 64 << 20 || done == total {
                last_report = done;
                (p.0)(done, total);
            }
        }
        Ok(())
    };
    let base = if opts.tar { tarwrap::DATA_OFFSET } else { 0 };
    let mut sink = FileSink::new(file, base);
    let data_bytes = total;
    let (lsmt_size, blob_len) = match &opts.zfile {
        Some(z) => {
            let mut zw = ZFileWriter::new(&mut sink, z.clone())?;
            let n = compact.run(entries, info, &mut read, &mut zw)?;
            let s = zw.finish()?;
            (n, s.position())
        }
        None => {
            let n = compact.run(entries, info, &mut read, &mut sink)?;
            (n, n)
        }
    };
    let mut output_size = blob_len;
    if opts.tar {
        sink.put(&vec![0u8; tarwrap::trailer_len(blob_len) as usize])?;
        sink.flush_buffer()?;
        let file = sink.into_file()?;
        file.write_all_at(&tarwrap::header_blocks(blob_len), 0)?;
        output_size = file.len()?;
    } else {
        sink.into_file()?;
    }
    // No fsync, as upstream's overlaybd-commit: the output is closed, not synced
    // (the convertor uploads it and deletes it; an fsync cost it seconds).
    let stats = CommitStats {
        lsmt_size,
        output_size,
        data_bytes,
    };
    pending.persist(opts.force)?;
    Ok(stats)
}

/// Commit a writable layer (`overlaybd-commit [-z] [-t] data index out`).
pub fn commit_writable(
    data: &Path,
    index: &Path,
    out: &Path,
    opts: &CommitOptions,
) -> Result<CommitStats> {
    let layer = WritableLayer::open_read_only(data, index)?;
    let h = layer.header();
    let info = seal_info(opts, h.virtual_size, h.parent_uuid)?;
    let entries = layer.entries();
    write_output(
        out,
        &[data, index],
        opts,
        &entries,
        &info,
        &mut |buf, moff| layer.read_mapped(buf, moff),
        Compactor::Plain,
    )
}

/// Commit a packed sparse layer ([`crate::lsmt::writable::create_packed`], open as
/// `layer`, e.g. a read-only view of it): the same output as [`commit_writable`]
/// of that layer's sparse data and index files, but the ZFile blocks of its data
/// are copied as they were stored when written (with `-z`, 4 KiB blocks and the
/// store's algorithm and checksums; other options compress them again).
pub fn commit_packed(
    layer: &WritableLayer,
    out: &Path,
    opts: &CommitOptions,
) -> Result<CommitStats> {
    let store = layer.packed().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not a packed layer",
            layer.data_path().display()
        ))
    })?;
    // Every block written is stored before its bytes are copied.
    store.sync()?;
    let h = layer.header();
    let info = seal_info(opts, h.virtual_size, h.parent_uuid)?;
    let entries = layer.entries();
    write_output(
        out,
        &[store.path()],
        opts,
        &entries,
        &info,
        &mut |buf, moff| layer.read_mapped(buf, moff),
        Compactor::Stored(&**store),
    )
}

/// Commit a writable warp (TurboOCI) layer (`overlaybd-commit --turboOCI
/// data index out [-z]`): a sealed LSMT blob whose tag-0 data is copied and
/// whose tag-1 (target) entries are kept as they are, byte-identical to
/// upstream. As upstream, the uuid is nil unless `opts.uuid` is set, the
/// parent uuid is nil unless `opts.parent_uuid` is set, and no commit message
/// is stored.
pub fn commit_warp(
    data: &Path,
    index: &Path,
    out: &Path,
    opts: &CommitOptions,
) -> Result<CommitStats> {
    let layer = WritableLayer::open_warp(data, index, None, true)?;
    let h = layer.header();
    let info = SealInfo {
        virtual_size: h.virtual_size,
        uuid: opts.uuid.unwrap_or(Uuid::NIL),
        parent_uuid: opts.parent_uuid.unwrap_or(Uuid::NIL),
        user_tag: Vec::new(),
    };
    let entries = layer.entries();
    write_output(
        out,
        &[data, index],
        opts,
        &entries,
        &info,
        &mut |buf, moff| layer.read_mapped(buf, moff),
        Compactor::Warp,
    )
}

/// Commit an already sealed layer, possibly ZFile/tar wrapped
/// (`overlaybd-commit --commit_sealed in out`): re-compacts it, e.g. to
/// compress it or to give it a uuid.
pub fn commit_sealed(input: &Path, out: &Path, opts: &CommitOptions) -> Result<CommitStats> {
    let (blob, _) = open_blob(input)?;
    let layer = SealedLayer::open(blob.clone())?;
    // The trailer is authoritative, as for every reader of a sealed layer (upstream's
    // `open_file_ro` loads the trailer; so does the NBD/FUSE stack).
    let info = seal_info(opts, layer.info().virtual_size, layer.info().parent_uuid)?;
    let entries = layer.index().entries().to_vec();
    write_output(
        out,
        &[input],
        opts,
        &entries,
        &info,
        &mut |buf, moff| blob.read_exact_at(buf, moff * SECTOR),
        Compactor::Plain,
    )
}

/// Compress any file to ZFile (`overlaybd-zfile src dst`); with `tar`, wrap it.
pub fn zfile_compress_file(
    src: Option<&Path>,
    dst: &Path,
    opts: ZfileOptions,
    tar: bool,
    force: bool,
) -> Result<u64> {
    let inputs: Vec<&Path> = src.into_iter().collect();
    let (file, pending) = create_output(dst, force, &inputs)?;
    // On error `pending` removes the unfinished file; `dst` is not touched.
    let base = if tar { tarwrap::DATA_OFFSET } else { 0 };
    let mut sink = FileSink::new(file, base);
    let name = src
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("<stdin>"));
    let shifted = &mut sink;
    let s = match src {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            crate::zfile::compress_stream(
                std::io::BufReader::with_capacity(1 << 20, f),
                &name,
                shifted,
                opts,
            )?
        }
        None => crate::zfile::compress_stream(std::io::stdin().lock(), &name, shifted, opts)?,
    };
    let len = s.position();
    if tar {
        sink.put(&vec![0u8; tarwrap::trailer_len(len) as usize])?;
    }
    let file = sink.into_file()?;
    if tar {
        file.write_all_at(&tarwrap::header_blocks(len), 0)?;
    }
    file.sync()?;
    let size = file.len()?;
    drop(file);
    pending.persist(force)?;
    Ok(size)
}

/// Decompress a (possibly tar-wrapped) ZFile to a plain file (`overlaybd-zfile -x`).
pub fn zfile_decompress_file(src: &Path, dst: &Path, force: bool) -> Result<u64> {
    // What is wrong with a source that is no ZFile, said as --verify says it
    // (an empty file, a tar that is not the one-file wrapper, a FIFO).
    crate::layer::open_zfile(src)?;
    let (blob, wrap) = open_blob(src)?;
    if !wrap.zfile {
        return Err(Error::corrupt(
            src,
            "ZFile",
            "not a ZFile (bad header magic)",
        ));
    }
    let (out, pending) = create_output(dst, force, &[src])?;
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < blob.size() {
        let n = blob.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        out.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    out.sync()?;
    drop(out);
    pending.persist(force)?;
    Ok(off)
}
