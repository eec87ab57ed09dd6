//! A stack of layers read as one virtual disk.
//!
//! Lowers (sealed LSMT layers, possibly ZFile-compressed and tar-wrapped)
//! are merged into one index at open time, newest layer winning; an optional
//! writable upper sits on top and receives every write. Unmapped ranges read
//! as zeros; `zeroed` entries hide whatever lies below them.
//!
//! TurboOCI (warp) layers take part like any other: a warp lower enters the
//! merged index with entries that map onto themselves and resolves reads
//! through its own tagged index (metadata from its blob, file data from its
//! target tar); a warp upper takes writes like any upper plus
//! [`BlockDevice::map_target`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::config::ImageConfig;
use crate::device::{check_range, push_extent, BlockDevice, Extent};
use crate::error::{Error, Result};
use crate::layer::open_layer;
use crate::lsmt::format::{Mapping, SECTOR};
use crate::lsmt::index::{pieces, Piece, RoIndex};
use crate::lsmt::packed::PackedStore;
use crate::lsmt::{SealedLayer, WritableLayer};
use crate::uuid::Uuid;
use crate::warp::{TargetSource, WarpLayer};

/// Upstream refuses stacks deeper than this.
pub const MAX_LAYERS: usize = 255;

/// Refuse `n` lowers when more than [`MAX_LAYERS`]; callers check before
/// opening any: every open layer holds a file and its index, so a config.json
/// (or manifest) naming 100,000 layers would take gigabytes, or every file
/// descriptor, before the count was looked at.
pub fn check_lower_count(n: usize) -> Result<()> {
    if n > MAX_LAYERS {
        return Err(Error::Invalid(format!(
            "{n} lower layers; at most {MAX_LAYERS} can be stacked"
        )));
    }
    Ok(())
}

/// Where a lower layer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LowerSource {
    /// A sealed layer file (plain, ZFile, tar-wrapped).
    File(PathBuf),
    /// A writable layer that will not change any more (e.g. still being
    /// committed), read in place.
    Writable { data: PathBuf, index: PathBuf },
    /// A sealed TurboOCI layer (`<fs>.fs.meta`) and its target tar.
    Warp { file: PathBuf, target: TargetSource },
    /// A writable TurboOCI layer that will not change any more, read in
    /// place, and its target tar.
    WritableWarp {
        data: PathBuf,
        index: PathBuf,
        target: TargetSource,
    },
    /// A packed sparse layer of this process that will not change any more
    /// ([`crate::lsmt::writable::create_packed`]), read from its store.
    Packed(Arc<PackedStore>),
}

impl LowerSource {
    /// Open this lower layer.
    pub fn open(&self) -> Result<Lower> {
        Ok(match self {
            LowerSource::File(p) => Lower::Sealed(open_layer(p)?),
            LowerSource::Writable { data, index } => {
                Lower::Writable(WritableLayer::open_read_only(data, index)?)
            }
            LowerSource::Warp { file, target } => Lower::Warp(WarpLayer::open(file, target)?),
            LowerSource::WritableWarp {
                data,
                index,
                target,
            } => Lower::Writable(WritableLayer::open_warp(
                data,
                index,
                Some(target.open()?),
                true,
            )?),
            LowerSource::Packed(store) => {
                Lower::Writable(WritableLayer::open_packed(store.clone(), true)?)
            }
        })
    }
}

/// Whether layers given bottom first look out of order: a layer whose header
/// names a parent uuid (as the convertor's and upstream's commits record the
/// layer below) sitting on a layer with another uuid. Layers without uuids
/// (nil, e.g. committed without `--uuid`) are not compared. Upstream's runtime
/// does not check either, so [`Stack::with_lowers`] only warns with this text.
///
/// The bottom layer naming a parent is noticed too: its parent is one of the
/// layers above it (two layers given top first), or missing.
pub fn order_problem(lowers: &[Lower]) -> Option<String> {
    let pairs = lowers.windows(2).enumerate().find_map(|(i, pair)| {
        let (below, _) = pair[0].uuids();
        let (_, parent) = pair[1].uuids();
        (!below.is_nil() && !parent.is_nil() && below != parent).then(|| {
            format!(
                "the layers may be out of order (give them bottom first): layer {} records its parent as {parent}, but layer {} below it is {below}",
                i + 2,
                i + 1
            )
        })
    });
    pairs.or_else(|| {
        let (_, parent) = lowers.first()?.uuids();
        if parent.is_nil() {
            return None;
        }
        Some(
            match lowers.iter().position(|l| !l.uuids().0.is_nil() && l.uuids().0 == parent) {
                Some(k) => format!(
                    "the layers may be out of order (give them bottom first): layer 1, the bottom one, records its parent as {parent}, which is layer {} above it",
                    k + 1
                ),
                None => format!(
                    "a layer may be missing (give every layer, bottom first): layer 1, the bottom one, records its parent as {parent}, which is not in the stack"
                ),
            },
        )
    })
}

/// Whether a lower layer records a larger virtual size than the disk's, which
/// the topmost layer recording a size sets (as upstream's stack does): what
/// that layer holds past the disk's end is not visible. Upstream does not
/// check, so [`Stack::with_lowers`] only warns with this text.
pub fn size_problem(lowers: &[Lower]) -> Option<String> {
    let size = lowers_vsize(lowers);
    let (k, l) = lowers
        .iter()
        .enumerate()
        .find(|(_, l)| l.virtual_size() > size)?;
    let top = lowers.iter().rposition(|l| l.virtual_size() == size)?;
    Some(format!(
        "the layers disagree on the disk's size: layer {} records {} bytes, layer {} above it {size}, and the topmost size counts (as upstream), so what layer {} holds past byte {size} is not visible (are the layers in order, and all of one image?)",
        k + 1,
        l.virtual_size(),
        top + 1,
        k + 1
    ))
}

/// The virtual size of a stack of lowers: the topmost one recorded (0 when
/// none is), as upstream's `open_files_ro`.
fn lowers_vsize(lowers: &[Lower]) -> u64 {
    lowers
        .iter()
        .rev()
        .map(|l| l.virtual_size())
        .find(|&v| v > 0)
        .unwrap_or(0)
}

/// An opened lower layer.
#[derive(Debug)]
pub enum Lower {
    Sealed(SealedLayer),
    Writable(WritableLayer),
    Warp(WarpLayer),
}

impl Lower {
    /// The layer's uuid and its parent's, as its header records them.
    fn uuids(&self) -> (Uuid, Uuid) {
        let (uuid, parent) = match self {
            Lower::Sealed(l) => (l.info().uuid, l.info().parent_uuid),
            Lower::Writable(w) => {
                let h = w.header();
                (h.uuid, h.parent_uuid)
            }
            Lower::Warp(w) => (w.meta().info().uuid, w.meta().info().parent_uuid),
        };
        (uuid, parent)
    }

    fn virtual_size(&self) -> u64 {
        match self {
            Lower::Sealed(l) => l.info().virtual_size,
            Lower::Writable(w) => w.virtual_size(),
            Lower::Warp(w) => w.meta().info().virtual_size,
        }
    }

    fn entries(&self) -> std::borrow::Cow<'_, [Mapping]> {
        match self {
            Lower::Sealed(l) => std::borrow::Cow::Borrowed(l.index().entries()),
            Lower::Writable(w) if w.is_warp() => std::borrow::Cow::Owned(
                w.entries()
                    .into_iter()
                    .map(|m| Mapping {
                        moffset: m.offset,
                        tag: 0,
                        ..m
                    })
                    .collect(),
            ),
            Lower::Writable(w) => std::borrow::Cow::Owned(w.entries()),
            Lower::Warp(w) => std::borrow::Cow::Owned(w.identity_entries()),
        }
    }

    fn read_mapped(&self, buf: &mut [u8], moffset: u64) -> Result<()> {
        match self {
            Lower::Sealed(l) => l.read_mapped(buf, moffset),
            Lower::Writable(w) if w.is_warp() => w.read_logical(buf, moffset * SECTOR),
            Lower::Writable(w) => w.read_mapped(buf, moffset),
            Lower::Warp(w) => w.read_logical(buf, moffset * SECTOR),
        }
    }

    fn read_mapped_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        match self {
            Lower::Sealed(l) => l.read_mapped_many(reqs),
            Lower::Writable(w) if !w.is_warp() => w.read_mapped_many(reqs),
            // TurboOCI layers resolve through their own tagged index.
            _ => reqs
                .iter_mut()
                .map(|(m, buf)| self.read_mapped(buf, *m))
                .collect(),
        }
    }
}

/// Reads of one layer gathered from a batch: `(moffset, buffer, request)`.
type LayerReads<'a> = Vec<(u64, &'a mut [u8], usize)>;

/// Run `reads` through `read_many` and record failures in `results`.
fn run_layer_reads(
    reads: LayerReads<'_>,
    results: &mut [Result<()>],
    read_many: impl FnOnce(&mut [(u64, &mut [u8])]) -> Vec<Result<()>>,
) {
    if reads.is_empty() {
        return;
    }
    let mut owners = Vec::with_capacity(reads.len());
    let mut io: Vec<(u64, &mut [u8])> = reads
        .into_iter()
        .map(|(m, b, k)| {
            owners.push(k);
            (m, b)
        })
        .collect();
    for (r, k) in read_many(&mut io).into_iter().zip(owners) {
        if let Err(e) = r {
            if results[k].is_ok() {
                results[k] = Err(e);
            }
        }
    }
}

/// Lower layers plus an optional writable upper.
pub struct Stack {
    lowers: Vec<Lower>,
    lower_index: RoIndex,
    upper: Option<WritableLayer>,
    size: u64,
    /// Granularity of upper writes: 4 KiB for sparse uppers (holes are
    /// page-sized), 512 otherwise.
    write_align: u64,
    /// Block locks, striped by block number ([`Stack::lock_blocks`]): a
    /// write covering part of a block is a read-modify-write of the whole
    /// block, and no other write to that block may land between its read and
    /// its write-back (from another NBD connection or FUSE thread), or the
    /// write-back would put the block back as it was before that write.
    block_locks: Box<[RwLock<()>]>,
}

/// Stripes of [`Stack`]'s block locks.
const BLOCK_STRIPES: u64 = 64;

/// A held stripe of [`Stack`]'s block locks, released when dropped.
#[expect(dead_code, reason = "the guards are held for their drop, never read")]
enum BlockGuard<'a> {
    Shared(RwLockReadGuard<'a, ()>),
    Exclusive(RwLockWriteGuard<'a, ()>),
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("lowers", &self.lowers.len())
            .field("upper", &self.upper)
            .field("size", &self.size)
            .finish()
    }
}

impl Stack {
    /// Open the stack a config.json describes (TurboOCI lowers and upper
    /// included).
    pub fn open_config(cfg: &ImageConfig) -> Result<Stack> {
        Self::open_config_mode(cfg, false)
    }

    /// [`Self::open_config`] with the upper opened read-only.
    pub fn open_config_read_only(cfg: &ImageConfig) -> Result<Stack> {
        Self::open_config_mode(cfg, true)
    }

    fn open_config_mode(cfg: &ImageConfig, read_only: bool) -> Result<Stack> {
        let lowers = Stack::open_lowers(&cfg.lower_sources())?;
        let upper = match &cfg.upper {
            None => None,
            Some(u) => Some(match &u.target {
                Some(t) => WritableLayer::open_warp(&u.data, &u.index, Some(t.open()?), read_only)?,
                None if read_only => WritableLayer::open_read_only(&u.data, &u.index)?,
                None => WritableLayer::open(&u.data, &u.index)?,
            }),
        };
        Stack::with_lowers(lowers, upper)
    }

    /// Open lower files (bottom first) and an optional writable `(data, index)`.
    pub fn open(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Result<Stack> {
        Self::open_with(lowers, upper, WritableLayer::open)
    }

    /// Open lowers and the upper without write access.
    pub fn open_read_only(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Result<Stack> {
        Self::open_with(lowers, upper, WritableLayer::open_read_only)
    }

    fn open_with(
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        open_upper: fn(&Path, &Path) -> Result<WritableLayer>,
    ) -> Result<Stack> {
        let sources: Vec<LowerSource> = lowers.iter().cloned().map(LowerSource::File).collect();
        Self::open_sources(&sources, upper, open_upper)
    }

    /// Open lowers of any [`LowerSource`] (bottom first) and an optional upper
    /// opened with `open_upper` ([`WritableLayer::open`] or `open_read_only`).
    pub fn open_sources(
        lowers: &[LowerSource],
        upper: Option<(&Path, &Path)>,
        open_upper: fn(&Path, &Path) -> Result<WritableLayer>,
    ) -> Result<Stack> {
        let layers = Stack::open_lowers(lowers)?;
        let upper = upper.map(|(d, i)| open_upper(d, i)).transpose()?;
        Stack::with_lowers(layers, upper)
    }

    /// Open lowers of any [`LowerSource`] (bottom first), for [`Stack::with_lowers`].
    pub fn open_lowers(lowers: &[LowerSource]) -> Result<Vec<Lower>> {
        check_lower_count(lowers.len())?;
        lowers.iter().map(LowerSource::open).collect()
    }

    /// Build from already opened layers.
    pub fn from_layers(lowers: Vec<SealedLayer>, upper: Option<WritableLayer>) -> Result<Stack> {
        Self::with_lowers(lowers.into_iter().map(Lower::Sealed).collect(), upper)
    }

    /// Build from opened lowers of either kind.
    pub fn with_lowers(lowers: Vec<Lower>, upper: Option<WritableLayer>) -> Result<Stack> {
        if let Some(problem) = order_problem(&lowers) {
            tracing::warn!("{problem}");
        }
        check_lower_count(lowers.len())?;
        if lowers.is_empty() && upper.is_none() {
            return Err(Error::Invalid("a stack needs at least one layer".into()));
        }
        let lower_vsize = lowers_vsize(&lowers);
        if let Some(problem) = size_problem(&lowers) {
            tracing::warn!("{problem}");
        }
        let mut size = lower_vsize;
        let mut write_align = SECTOR;
        if let Some(u) = &upper {
            // A layer created with size 0 takes the lowers' size, persisted
            // in its header as upstream does (unless opened read-only).
            if u.virtual_size() == 0 && lower_vsize > 0 && !u.is_read_only() {
                u.set_virtual_size(lower_vsize)?;
            }
            if u.virtual_size() > 0 {
                if u.virtual_size() < lower_vsize {
                    return Err(Error::Invalid(format!(
                        "the upper layer {} has a virtual size of {} bytes, smaller than its lower layers' {} bytes: their filesystem would not fit (create it with at least that size, or 0 to take the lowers')",
                        u.data_path().display(),
                        u.virtual_size(),
                        lower_vsize
                    )));
                }
                size = u.virtual_size();
            }
            if u.is_sparse() {
                write_align = 4096;
            }
        }
        if size == 0 {
            return Err(Error::Invalid(
                "virtual size of the stack is 0 (no layer records a size)".into(),
            ));
        }
        let entries: Vec<_> = lowers.iter().map(|l| l.entries()).collect();
        let slices: Vec<&[Mapping]> = entries.iter().map(|e| e.as_ref()).collect();
        let lower_index = RoIndex::merge(&slices);
        drop(slices);
        drop(entries);
        Ok(Stack {
            lowers,
            lower_index,
            upper,
            size,
            write_align,
            block_locks: (0..BLOCK_STRIPES).map(|_| RwLock::new(())).collect(),
        })
    }

    pub fn lowers(&self) -> &[Lower] {
        &self.lowers
    }

    pub fn upper(&self) -> Option<&WritableLayer> {
        self.upper.as_ref()
    }

    /// Merged index of the lowers (tag = lower position, bottom 0).
    pub fn lower_index(&self) -> &RoIndex {
        &self.lower_index
    }

    /// Allocation map of the sectors that `[offset, offset+len)` touches
    /// (any byte range; the answer is in whole sectors, so it may start
    /// before `offset` and end after `offset + len`): which sector ranges
    /// hold data in some layer (`true`) and which read as zeros because
    /// nothing maps them or a zeroed entry covers them.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let s = offset / SECTOR;
        let n = (offset + len).div_ceil(SECTOR) - s;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |o: u64, l: u64, d: bool| {
            if let Some(last) = out.last_mut() {
                if last.2 == d && last.0 + last.1 == o {
                    last.1 += l;
                    return;
                }
            }
            out.push((o, l, d));
        };
        let upper_maps = self
            .upper
            .as_ref()
            .map(|u| u.lookup(s, n))
            .unwrap_or_default();
        for p in pieces(s, n, &upper_maps) {
            match p {
                Piece::Mapped(m) => push(m.offset, m.length as u64, !m.zeroed),
                Piece::Hole { offset, len } => {
                    let lm = self.lower_index.lookup(offset, len);
                    for q in pieces(offset, len, &lm) {
                        match q {
                            Piece::Mapped(m) => push(m.offset, m.length as u64, !m.zeroed),
                            Piece::Hole { offset, len } => push(offset, len, false),
                        }
                    }
                }
            }
        }
        out.into_iter()
            .map(|(o, l, d)| (o * SECTOR, l * SECTOR, d))
            .collect()
    }

    /// Write the whole virtual disk to a new sparse raw image at `path`,
    /// copying only allocated ranges. Returns the bytes of data copied.
    pub fn write_raw_image(&self, path: &Path) -> Result<u64> {
        let out = crate::io::IoFile::create_new(path)?;
        out.set_len(self.size)?;
        let mut buf = vec![0u8; 4 << 20];
        let mut copied = 0;
        let step = 1u64 << 30;
        let mut off = 0;
        while off < self.size {
            let len = step.min(self.size - off);
            for (o, l, data) in self.allocation(off, len) {
                if !data {
                    continue;
                }
                let mut p = o;
                while p < o + l {
                    let n = (o + l - p).min(buf.len() as u64) as usize;
                    self.read_at(&mut buf[..n], p)?;
                    out.write_all_at(&buf[..n], p)?;
                    p += n as u64;
                    copied += n as u64;
                }
            }
            off += len;
        }
        out.sync()?;
        Ok(copied)
    }

    fn read_lower(&self, buf: &mut [u8], sector: u64) -> Result<()> {
        let n = buf.len() as u64 / SECTOR;
        let maps = self.lower_index.lookup(sector, n);
        for p in pieces(sector, n, &maps) {
            match p {
                Piece::Hole { offset, len } => {
                    let a = ((offset - sector) * SECTOR) as usize;
                    buf[a..a + (len * SECTOR) as usize].fill(0);
                }
                Piece::Mapped(m) => {
                    let a = ((m.offset - sector) * SECTOR) as usize;
                    let b = &mut buf[a..a + m.length as usize * SECTOR as usize];
                    if m.zeroed {
                        b.fill(0);
                    } else {
                        self.lowers[m.tag as usize].read_mapped(b, m.moffset)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sector-aligned read.
    fn read_sectors(&self, buf: &mut [u8], sector: u64) -> Result<()> {
        let Some(upper) = &self.upper else {
            return self.read_lower(buf, sector);
        };
        let n = buf.len() as u64 / SECTOR;
        let maps = upper.lookup(sector, n);
        for p in pieces(sector, n, &maps) {
            match p {
                Piece::Hole { offset, len } => {
                    let a = ((offset - sector) * SECTOR) as usize;
                    self.read_lower(&mut buf[a..a + (len * SECTOR) as usize], offset)?;
                }
                Piece::Mapped(m) => {
                    let a = ((m.offset - sector) * SECTOR) as usize;
                    let b = &mut buf[a..a + m.length as usize * SECTOR as usize];
                    if m.zeroed {
                        b.fill(0);
                    } else {
                        upper.read_entry(b, &m)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)` (multiples of the write alignment) in
    /// the upper. A sparse upper's holes read from the lowers once the layer
    /// is reopened, so it punches holes only where no lower maps data (the
    /// hole then reads as zeros for good) and writes real zeros over the
    /// 4 KiB blocks where some lower does: zeroing a large range of a sparse
    /// upper stays sparse.
    fn zero_upper(&self, upper: &WritableLayer, offset: u64, len: u64) -> Result<()> {
        if !upper.is_sparse() {
            return upper.write_zeroes(offset, len);
        }
        let al = self.write_align;
        let end = offset + len;
        // Byte ranges (whole blocks) that some lower holds data in, merged.
        let mut data: Vec<(u64, u64)> = Vec::new();
        for m in self.lower_index.lookup(offset / SECTOR, len / SECTOR) {
            if m.zeroed {
                continue;
            }
            let (a, l) = widen(m.offset * SECTOR, m.length as u64 * SECTOR, al);
            let (a, b) = (a.max(offset), (a + l).min(end));
            match data.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => data.push((a, b)),
            }
        }
        let mut pos = offset;
        for (a, b) in data {
            if a > pos {
                upper.discard(pos, a - pos)?;
            }
            upper.write_zeroes(a, b - a)?;
            pos = b;
        }
        if end > pos {
            upper.discard(pos, end - pos)?;
        }
        Ok(())
    }

    /// Locks the stripes of the blocks `[a, a + l)` (whole write blocks,
    /// `l > 0`), in stripe order so that no two writers wait for each other.
    /// A write that replaces whole blocks shares them with other such writes;
    /// a `partial` write (a read-modify-write of its first and last blocks)
    /// holds those two alone until its write-back, and shares the middle.
    fn lock_blocks(&self, a: u64, l: u64, partial: bool) -> Vec<BlockGuard<'_>> {
        let al = self.write_align;
        let (first, last) = (a / al, (a + l - 1) / al);
        let (start, end) = (first % BLOCK_STRIPES, last % BLOCK_STRIPES);
        // The stripes covered, in ascending order: all of them, one run, or
        // (wrapping past the last stripe) two runs.
        let (low, high) = if last - first + 1 >= BLOCK_STRIPES {
            (0..BLOCK_STRIPES, 0..0)
        } else if start <= end {
            (start..end + 1, 0..0)
        } else {
            (0..end + 1, start..BLOCK_STRIPES)
        };
        let edge = |s: u64| partial && (s == start || s == end);
        low.chain(high)
            .map(|s| {
                let lock = &self.block_locks[s as usize];
                if edge(s) {
                    BlockGuard::Exclusive(lock.write())
                } else {
                    BlockGuard::Shared(lock.read())
                }
            })
            .collect()
    }

    fn upper_for_write(&self) -> Result<&WritableLayer> {
        self.upper.as_ref().ok_or(Error::ReadOnly)
    }
}

/// Round `[offset, offset+len)` out to multiples of `align`.
fn widen(offset: u64, len: u64, align: u64) -> (u64, u64) {
    let a = offset / align * align;
    let b = (offset + len).div_ceil(align) * align;
    (a, b - a)
}

/// The whole `align`-sized blocks inside `offset..offset + len`, as `start..end`
/// (empty when `end <= start`).
fn inner_blocks(offset: u64, len: u64, align: u64) -> (u64, u64) {
    (
        offset.div_ceil(align) * align,
        (offset + len) / align * align,
    )
}

impl BlockDevice for Stack {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if offset.is_multiple_of(SECTOR) && (buf.len() as u64).is_multiple_of(SECTOR) {
            return self.read_sectors(buf, offset / SECTOR);
        }
        let (a, l) = widen(offset, buf.len() as u64, SECTOR);
        let mut tmp = vec![0u8; l as usize];
        self.read_sectors(&mut tmp, a / SECTOR)?;
        let d = (offset - a) as usize;
        buf.copy_from_slice(&tmp[d..d + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let upper = self.upper_for_write()?;
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let al = self.write_align;
        if offset.is_multiple_of(al) && (buf.len() as u64).is_multiple_of(al) {
            let _held = self.lock_blocks(offset, buf.len() as u64, false);
            return upper.write(buf, offset);
        }
        let (a, l) = widen(offset, buf.len() as u64, al);
        let (a, l) = (a, l.min(self.size - a));
        let _held = self.lock_blocks(a, l, true);
        let mut tmp = vec![0u8; l as usize];
        self.read_at(&mut tmp, a)?;
        let d = (offset - a) as usize;
        tmp[d..d + buf.len()].copy_from_slice(buf);
        upper.write(&tmp, a)
    }

    fn flush(&self) -> Result<()> {
        match &self.upper {
            Some(u) => u.flush(),
            None => Ok(()),
        }
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let upper = self.upper_for_write()?;
        check_range(offset, len, self.size)?;
        // Only whole aligned blocks can be discarded; the rest is advisory.
        let (a, b) = inner_blocks(offset, len, self.write_align);
        if b > a {
            let _held = self.lock_blocks(a, b - a, false);
            upper.discard(a, b - a)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let upper = self.upper_for_write()?;
        check_range(offset, len, self.size)?;
        let (a, b) = inner_blocks(offset, len, self.write_align);
        if b <= a {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        if a > offset {
            self.write_at(&vec![0u8; (a - offset) as usize], offset)?;
        }
        {
            let _held = self.lock_blocks(a, b - a, false);
            self.zero_upper(upper, a, b - a)?;
        }
        if offset + len > b {
            self.write_at(&vec![0u8; (offset + len - b) as usize], b)?;
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.upper.as_ref().is_none_or(|u| u.is_read_only())
    }

    /// Resolves every read through the indexes first, then reads each
    /// layer's pieces in one batch ([`crate::io::IoFile::read_many`]: in
    /// flight together with io_uring). Holes and zeroed ranges are filled
    /// without reading.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(reqs.len());
        let mut upper_reads: LayerReads<'_> = Vec::new();
        // A TurboOCI upper reads some entries from its target: entry by entry.
        let mut upper_entries: Vec<(Mapping, &mut [u8], usize)> = Vec::new();
        let warp_upper = self.upper.as_ref().is_some_and(|u| u.is_warp());
        let mut lower_reads: Vec<LayerReads<'_>> = Vec::new();
        lower_reads.resize_with(self.lowers.len(), Vec::new);
        for (k, (off, buf)) in reqs.iter_mut().enumerate() {
            let (off, len) = (*off, buf.len() as u64);
            if let Err(e) = check_range(off, len, self.size) {
                results.push(Err(e));
                continue;
            }
            if !off.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
                results.push(self.read_at(buf, off));
                continue;
            }
            results.push(Ok(()));
            let (sector, n) = (off / SECTOR, len / SECTOR);
            let mut rest: &mut [u8] = buf;
            let mut take = |sectors: u64| {
                let (head, tail) =
                    std::mem::take(&mut rest).split_at_mut((sectors * SECTOR) as usize);
                rest = tail;
                head
            };
            let upper_maps = self
                .upper
                .as_ref()
                .map(|u| u.lookup(sector, n))
                .unwrap_or_default();
            for p in pieces(sector, n, &upper_maps) {
                match p {
                    Piece::Mapped(m) => {
                        let b = take(m.length as u64);
                        if m.zeroed {
                            b.fill(0);
                        } else if warp_upper {
                            upper_entries.push((m, b, k));
                        } else {
                            upper_reads.push((m.moffset, b, k));
                        }
                    }
                    Piece::Hole { offset, len } => {
                        let lm = self.lower_index.lookup(offset, len);
                        for q in pieces(offset, len, &lm) {
                            match q {
                                Piece::Mapped(m) => {
                                    let b = take(m.length as u64);
                                    if m.zeroed {
                                        b.fill(0);
                                    } else {
                                        lower_reads[m.tag as usize].push((m.moffset, b, k));
                                    }
                                }
                                Piece::Hole { len, .. } => take(len).fill(0),
                            }
                        }
                    }
                }
            }
        }
        if let Some(u) = &self.upper {
            run_layer_reads(upper_reads, &mut results, |io| u.read_mapped_many(io));
            for (m, b, k) in upper_entries {
                if let Err(e) = u.read_entry(b, &m) {
                    if results[k].is_ok() {
                        results[k] = Err(e);
                    }
                }
            }
        }
        for (tag, reads) in lower_reads.into_iter().enumerate() {
            let l = &self.lowers[tag];
            run_layer_reads(reads, &mut results, |io| l.read_mapped_many(io));
        }
        results
    }

    /// From the LSMT indexes: ranges no layer maps, or that a zeroed entry
    /// covers, read as zeros.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut out = Vec::new();
        for (o, l, data) in self.allocation(offset, len) {
            // Sector-granular answers may start before `offset` or end after `end`.
            let (s, e) = (o.max(offset), (o + l).min(end));
            if s < e {
                push_extent(&mut out, s, e - s, !data);
            }
        }
        Ok(out)
    }

    fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> Result<()> {
        let upper = self.upper_for_write()?;
        if !upper.is_warp() {
            return Err(Error::Invalid(
                "target mappings need a TurboOCI (warp) upper layer".into(),
            ));
        }
        upper.map_target(offset, len, target_offset)
    }
}

/// Convenience: a stack as a shareable device.
pub fn open_shared(cfg: &ImageConfig) -> Result<Arc<Stack>> {
    Ok(Arc::new(Stack::open_config(cfg)?))
}
