//! Reading a filesystem without changing it: a read-only open and the calls
//! a file server needs (block maps, symlink targets, names, counters).
//!
//! File data is meant to be read from the device directly, without the
//! (single-threaded) libext2fs handle: [`Ext2Fs::block_map`] returns the
//! physical runs of a file once, and the caller reads them as it likes.

use std::ffi::c_int;
use std::sync::Arc;

use blockdev::BlockDevice;

use super::inode::{Inode, EXTENTS_FL, INLINE_DATA_FL};
use super::{cstring, sys, Ext2Fs};
use crate::error::{Error, Result};

// SAFETY: an Ext2Fs exclusively owns its libext2fs handle and the channel
// behind it; libext2fs keeps no thread-local or thread-bound state for a
// handle, so moving the owner to another thread is sound. It is not Sync:
// every call goes through one owner at a time (callers wrap it in a Mutex).
unsafe impl Send for Ext2Fs {}

/// A run of a file's logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First logical block.
    pub lblk: u64,
    /// First physical block.
    pub pblk: u64,
    /// Number of blocks.
    pub len: u64,
    /// Allocated but unwritten (reads as zeros).
    pub uninit: bool,
}

/// Direct block pointers in a block-mapped inode's `i_block`; the three
/// after them root the single, double and triple indirect trees.
const DIRECT_BLOCKS: u64 = 12;

/// The state of one walk of a block-mapped file's indirect trees.
struct IndirectWalk {
    ino: u32,
    /// Block pointers (u32) in a block.
    per_block: u64,
    /// Logical blocks `i_size` covers.
    end: u64,
    /// Blocks in the filesystem.
    blocks: u64,
    first_data: u64,
    /// The most data blocks the inode can have (its `i_blocks`), and how many
    /// were found: a corrupt tree cannot map more than the inode holds.
    most: u64,
    found: u64,
    runs: Vec<Run>,
}

impl IndirectWalk {
    fn check(&self, p: u64, what: &str) -> Result<()> {
        if p < self.first_data || p >= self.blocks {
            return Err(Error::Unsupported(format!(
                "inode {}: {what} block {p} is outside the filesystem ({} blocks): the inode is corrupt",
                self.ino, self.blocks
            )));
        }
        Ok(())
    }

    /// Logical block `lblk` is at `p`.
    fn push(&mut self, lblk: u64, p: u64) -> Result<()> {
        self.check(p, "data")?;
        self.found += 1;
        if self.found > self.most {
            return Err(Error::Unsupported(format!(
                "inode {}: maps more blocks than its block count ({}): the inode is corrupt",
                self.ino, self.most
            )));
        }
        match self.runs.last_mut() {
            Some(r) if r.lblk + r.len == lblk && r.pblk + r.len == p => r.len += 1,
            _ => self.runs.push(Run {
                lblk,
                pblk: p,
                len: 1,
                uninit: false,
            }),
        }
        Ok(())
    }

    /// The tree of indirect block `p` at `depth` (1: it points at data),
    /// mapping logical blocks from `first`.
    fn tree(&mut self, fs: &mut Ext2Fs, p: u64, depth: u32, first: u64) -> Result<()> {
        self.check(p, "indirect")?;
        let mut buf = vec![0u8; (self.per_block * 4) as usize];
        fs.read_bytes(&mut buf, p * self.per_block * 4)?;
        let span = self.per_block.saturating_pow(depth - 1);
        for (k, ptr) in buf.chunks_exact(4).enumerate() {
            let lblk = first.saturating_add(k as u64 * span);
            if lblk >= self.end {
                break;
            }
            let q = u32::from_le_bytes([ptr[0], ptr[1], ptr[2], ptr[3]]) as u64;
            if q == 0 {
                continue;
            }
            if depth == 1 {
                self.push(lblk, q)?;
            } else {
                self.tree(fs, q, depth - 1, lblk)?;
            }
        }
        Ok(())
    }
}

/// Filesystem-wide counters for statfs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Block size in bytes.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Blocks reserved for root.
    pub reserved_blocks: u64,
    /// Inodes in the filesystem.
    pub inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

impl Ext2Fs {
    /// Open the filesystem on `dev` for reading only: nothing is ever
    /// written to the device, the allocation bitmaps are not loaded.
    pub fn open_read_only(dev: Arc<dyn BlockDevice>, cache_bytes: usize) -> Result<Self> {
        Self::open_flags(
            dev,
            cache_bytes,
            sys::EXT2_FLAG_64BITS as c_int,
            super::cache::WriteMode::Pages,
        )
    }

    /// Superblock counters.
    pub fn counts(&self) -> Counts {
        let s = self.sb();
        Counts {
            block_size: self.block_size(),
            blocks: self.blocks_count(),
            free_blocks: s.s_free_blocks_count as u64 | (s.s_free_blocks_hi as u64) << 32,
            reserved_blocks: s.s_r_blocks_count as u64 | (s.s_r_blocks_count_hi as u64) << 32,
            inodes: s.s_inodes_count as u64,
            free_inodes: s.s_free_inodes_count as u64,
        }
    }

    /// The inode a name in directory `dir` refers to (`..` included), if any.
    pub fn lookup(&mut self, dir: u32, name: &[u8]) -> Result<Option<u32>> {
        let c = cstring(name)?;
        let mut ino = 0u32;
        // SAFETY: fs is open; c is valid for name.len() bytes; ino is an
        // out-pointer.
        let rc = unsafe {
            sys::ext2fs_lookup(
                self.raw(),
                dir,
                c.as_ptr(),
                name.len() as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        if rc == sys::EXT2_ET_FILE_NOT_FOUND as sys::errcode_t {
            return Ok(None);
        }
        self.check(rc, &format!("look up a name in directory inode {dir}"))?;
        Ok(Some(ino))
    }

    /// The physical runs of file `ino` (sorted by logical block; holes are
    /// absent). Extent-mapped and block-mapped files alike.
    pub fn block_map(&mut self, ino: u32, inode: &mut Inode) -> Result<Vec<Run>> {
        if inode.flags() & INLINE_DATA_FL != 0 || !self.has_valid_blocks(inode) {
            return Ok(Vec::new());
        }
        if inode.flags() & EXTENTS_FL != 0 {
            return self.extent_runs(ino, inode);
        }
        self.indirect_runs(ino, inode)
    }

    /// The blocks (of the filesystem's size) `i_blocks` of `inode` counts:
    /// data and indirect blocks.
    fn inode_blocks(&self, inode: &Inode) -> u64 {
        let b = inode.as_bytes();
        let lo = u32::from_le_bytes([b[28], b[29], b[30], b[31]]) as u64;
        let hi = if self.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE) {
            u16::from_le_bytes([b[116], b[117]]) as u64
        } else {
            0
        };
        let n = lo | hi << 32;
        if inode.flags() & sys::EXT4_HUGE_FILE_FL as u32 != 0 {
            n
        } else {
            n / (self.block_size() / 512)
        }
    }

    /// The runs of a block-mapped (ext2/ext3) file: its 12 direct pointers and
    /// the single, double and triple indirect trees of `i_block`, walked as
    /// trees, so a hole costs nothing and a corrupt `i_size` cannot make the
    /// walk visit billions of logical blocks. Blocks past `i_size` are left
    /// out; a pointer outside the filesystem is corruption.
    fn indirect_runs(&mut self, ino: u32, inode: &Inode) -> Result<Vec<Run>> {
        let bs = self.block_size();
        let end = inode.size().div_ceil(bs);
        let mut walk = IndirectWalk {
            ino,
            per_block: bs / 4,
            end,
            blocks: self.blocks_count(),
            first_data: self.sb().s_first_data_block as u64,
            most: self.inode_blocks(inode),
            found: 0,
            runs: Vec::new(),
        };
        for i in 0..DIRECT_BLOCKS {
            let p = inode.block(i as usize) as u64;
            if p != 0 && i < end {
                walk.push(i, p)?;
            }
        }
        let mut first = DIRECT_BLOCKS;
        for depth in 1..=3u32 {
            let p = inode.block(DIRECT_BLOCKS as usize + depth as usize - 1) as u64;
            if first >= end {
                break;
            }
            if p != 0 {
                walk.tree(self, p, depth, first)?;
            }
            first = first.saturating_add(walk.per_block.saturating_pow(depth));
        }
        Ok(walk.runs)
    }

    fn extent_runs(&mut self, ino: u32, inode: &mut Inode) -> Result<Vec<Run>> {
        let h = self.extents(ino, inode)?;
        let mut runs: Vec<Run> = Vec::new();
        let mut op = sys::EXT2_EXTENT_ROOT as c_int;
        loop {
            let mut e = sys::ext2fs_extent::default();
            // SAFETY: the handle is open; e is an out-parameter.
            let rc = unsafe { sys::ext2fs_extent_get(h.h, op, &mut e) };
            op = sys::EXT2_EXTENT_NEXT as c_int;
            if rc == sys::EXT2_ET_EXTENT_NO_NEXT as sys::errcode_t
                || rc == sys::EXT2_ET_NO_CURRENT_NODE as sys::errcode_t
            {
                break;
            }
            self.check(rc, &format!("walk the extent tree of inode {ino}"))?;
            if e.e_flags & sys::EXT2_EXTENT_FLAGS_LEAF as u32 == 0 || e.e_len == 0 {
                continue;
            }
            runs.push(Run {
                lblk: e.e_lblk,
                pblk: e.e_pblk,
                len: e.e_len as u64,
                uninit: e.e_flags & sys::EXT2_EXTENT_FLAGS_UNINIT as u32 != 0,
            });
        }
        runs.sort_by_key(|r| r.lblk);
        Ok(runs)
    }

    /// The target of symlink `ino` (fast, slow or inline).
    pub fn link_target(&mut self, ino: u32, inode: &mut Inode) -> Result<Vec<u8>> {
        let size = inode.size() as usize;
        if inode.flags() & INLINE_DATA_FL != 0 {
            let mut t = self.inline_data(ino, inode)?;
            t.truncate(size);
            return Ok(t);
        }
        if !self.has_valid_blocks(inode) {
            let area = inode.block_area();
            return Ok(area[..size.min(area.len())].to_vec());
        }
        let bs = self.block_size();
        if size as u64 > bs {
            return Err(Error::Unsupported(format!(
                "symlink inode {ino}: target of {size} bytes is longer than a block"
            )));
        }
        let runs = self.block_map(ino, inode)?;
        let Some(r) = runs.first().filter(|r| r.lblk == 0) else {
            return Ok(vec![0; size]);
        };
        let mut buf = vec![0u8; size];
        self.read_bytes(&mut buf, r.pblk * bs)?;
        Ok(buf)
    }
}
