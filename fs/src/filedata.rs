//! Where the contents of regular files go: the seam between *what apply
//! does* (OCI semantics, in [`crate::apply`]: whiteouts, opaque
//! directories, hard links, xattrs, directory times, which blocks a file
//! gets) and *where its bytes end up*.
//!
//! The apply engines allocate a file's blocks and insert them into the
//! inode (the native engine, [`crate::apply`], as contiguous runs; the
//! upstream-compatible one, [`crate::photon`], with `fallocate`); a
//! [`FileData`] then decides what the runs hold:
//!
//! * [`CopyData`] (overlaybd layers): the tar bytes are copied into the
//!   blocks; holes of sparse members stay holes.
//! * [`TargetData`] (TurboOCI layers): nothing is copied. The whole file
//!   is allocated, and each run becomes a [`BlockDevice::map_target`] to
//!   the member's data in the uncompressed tar, its length rounded up to
//!   512 bytes; the device (a stack with a TurboOCI upper) records them as
//!   LSMT tag-1 entries.

use std::io::Read;

use blockdev::BlockDevice;

use crate::error::{Error, Result};
use crate::ext2fs::cache::PageCache;
use crate::tar::{Entry, TarReader};

/// The tar stream as a [`FileData`] sees it.
pub trait TarData {
    /// Read exactly `buf.len()` bytes of the current member's stored data.
    fn read_data(&mut self, buf: &mut [u8]) -> Result<()>;
    /// Offset of the next unread byte in the (uncompressed) tar stream.
    fn stream_position(&self) -> u64;
}

impl<R: Read> TarData for TarReader<R> {
    fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        TarReader::read_data(self, buf)
    }
    fn stream_position(&self) -> u64 {
        self.position()
    }
}

/// One run of a file's blocks: file blocks `lblk..lblk+len` are device
/// blocks `pblk..pblk+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub lblk: u64,
    pub pblk: u64,
    pub len: u64,
}

/// What a [`FileData`] can use while filling a file's runs.
pub struct FillCtx<'a> {
    /// The metadata cache in front of the device (its staging buffer takes
    /// file data).
    pub cache: &'a mut PageCache,
    /// Filesystem block size.
    pub block_size: u64,
    /// The member being applied.
    pub entry: &'a Entry,
    /// Its stored data in the tar stream.
    pub tar: &'a mut dyn TarData,
}

/// Where regular file data goes; see the module documentation.
pub trait FileData {
    /// The byte ranges `(offset, length)` of the file that get blocks.
    fn allocated_ranges(&self, e: &Entry) -> Result<Vec<(u64, u64)>>;

    /// Called once per regular file before its runs, with the stream
    /// position of its stored data.
    fn begin(&mut self, e: &Entry, data_offset: u64) -> Result<()>;

    /// Fill one run (runs come in increasing `lblk` order).
    fn fill(&mut self, ctx: FillCtx<'_>, run: Run) -> Result<()>;
}

/// Copy the tar bytes into the file's blocks (overlaybd layers).
#[derive(Debug, Default)]
pub struct CopyData {
    segs: Vec<(u64, u64)>,
    i: usize,
}

impl FileData for CopyData {
    fn allocated_ranges(&self, e: &Entry) -> Result<Vec<(u64, u64)>> {
        Ok(e.segments())
    }

    fn begin(&mut self, e: &Entry, _data_offset: u64) -> Result<()> {
        self.segs = e.segments();
        self.i = 0;
        Ok(())
    }

    fn fill(&mut self, ctx: FillCtx<'_>, run: Run) -> Result<()> {
        let bs = ctx.block_size;
        let stage_blocks = crate::ext2fs::cache::STAGE_BYTES as u64 / bs;
        let mut b = 0;
        while b < run.len {
            let n = (run.len - b).min(stage_blocks);
            let file_off = (run.lblk + b) * bs;
            let buf = ctx
                .cache
                .data_buf((run.pblk + b) * bs, (n * bs) as usize)
                .map_err(Error::Device)?;
            self.fill_buf(buf, file_off, ctx.tar)?;
            b += n;
        }
        Ok(())
    }
}

impl CopyData {
    /// Fill `buf` (file bytes `[off, off+len)`) from the tar, zeros in holes.
    fn fill_buf(&mut self, buf: &mut [u8], off: u64, tar: &mut dyn TarData) -> Result<()> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            while self.i < self.segs.len() && self.segs[self.i].0 + self.segs[self.i].1 <= pos {
                self.i += 1;
            }
            let Some(&(so, sl)) = self.segs.get(self.i) else {
                buf[(pos - off) as usize..].fill(0);
                break;
            };
            if so >= end {
                buf[(pos - off) as usize..].fill(0);
                break;
            }
            if so > pos {
                buf[(pos - off) as usize..(so - off) as usize].fill(0);
                pos = so;
            }
            let take = (so + sl).min(end) - pos;
            tar.read_data(&mut buf[(pos - off) as usize..(pos - off + take) as usize])?;
            pos += take;
        }
        Ok(())
    }
}

/// Map the file's blocks to its data in the uncompressed tar (TurboOCI).
pub struct TargetData {
    dev: std::sync::Arc<dyn BlockDevice>,
    data_offset: u64,
    /// The member's size rounded up to 512.
    padded: u64,
}

impl std::fmt::Debug for TargetData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetData")
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl TargetData {
    /// Target mappings go to `dev` (a stack whose upper is a TurboOCI layer).
    pub fn new(dev: std::sync::Arc<dyn BlockDevice>) -> Self {
        TargetData {
            dev,
            data_offset: 0,
            padded: 0,
        }
    }
}

impl FileData for TargetData {
    fn allocated_ranges(&self, e: &Entry) -> Result<Vec<(u64, u64)>> {
        if e.sparse.is_some() {
            return Err(Error::Entry {
                path: e.path_lossy(),
                msg: "sparse tar members cannot be referenced by a TurboOCI layer (their data is not stored contiguously)".into(),
            });
        }
        Ok(if e.size > 0 {
            vec![(0, e.size)]
        } else {
            Vec::new()
        })
    }

    fn begin(&mut self, e: &Entry, data_offset: u64) -> Result<()> {
        self.data_offset = data_offset;
        self.padded = e.size.div_ceil(512) * 512;
        Ok(())
    }

    fn fill(&mut self, ctx: FillCtx<'_>, run: Run) -> Result<()> {
        let bs = ctx.block_size;
        let start = run.lblk * bs;
        if start >= self.padded {
            return Ok(());
        }
        let len = (run.len * bs).min(self.padded - start);
        // Metadata the cache still holds for these blocks (freed and
        // reused) was written before the mapping: it must not land after it.
        ctx.cache
            .discard(run.pblk * bs, len)
            .map_err(Error::Device)?;
        self.dev
            .map_target(run.pblk * bs, len, self.data_offset + start)
            .map_err(Error::Device)
    }
}
