//! A deterministic ext4 mkfs with upstream overlaybd's parameters.
//!
//! Mirrors what `overlaybd-create --mkfs` does (PhotonLibOS
//! `fs/extfs/mkfs.cpp`, through libext2fs): 4 KiB blocks, one inode per
//! 16 KiB, 256-byte inodes, 5% reserved blocks, features `64bit
//! sparse_super sparse_super2 filetype resize_inode dir_index ext_attr
//! dir_nlink large_file huge_file flex_bg extent extra_isize` (no journal, no
//! metadata_csum, no uninit_bg), backup superblocks only in group 1 and the
//! last group, half_md4 directory hash, no mount-count checks, a root
//! directory, a `lost+found` of three blocks, the reserved inodes marked in
//! use and the resize inode. Unlike libext2fs defaults, nothing depends on
//! the clock or on randomness: the UUID and hash seed are zero (as in
//! upstream's own output) unless given, and every timestamp is 0, so the same
//! device size always gives the same bytes.

use std::sync::Arc;

use blockdev::BlockDevice;

use crate::error::{Error, Result};
use crate::ext2fs::cache::WriteMode;
use crate::ext2fs::inode::Timestamp;
use crate::ext2fs::{cstring, sys, Ext2Fs, DEFAULT_CACHE_BYTES};

/// Block size of the filesystem.
pub const BLOCK_SIZE: u64 = 4096;
const INODE_RATIO: u64 = 16384;
const INODE_SIZE: u16 = 256;
const RESERVED_RATIO: f64 = 0.05;
const LOST_FOUND: &[u8] = b"lost+found";
/// Blocks per group (one block of bitmap bits), libext2fs's default.
const BLOCKS_PER_GROUP: u64 = 8 * BLOCK_SIZE;
/// The largest filesystem [`mkfs`] makes, in bytes: 64 TiB (2^19 block
/// groups of 128 MiB).
///
/// The layout (upstream's feature set has no `uninit_bg`, so no group can
/// be marked as having its bitmaps uninitialised) needs a block bitmap and
/// an inode bitmap of 4 KiB in every 128 MiB block group, each with bits
/// set: 1/16384 of the size is written into the layer whatever it holds,
/// 4 GiB at 64 TiB (about 30 s; `mke2fs` with the same features writes the
/// same), 64 GiB at 1 PiB. At 64 TiB the inode count also reaches ext4's
/// 2^32 - 1, so a larger filesystem gets no more inodes. (Past 2^28 groups,
/// 32 PiB, `ext2fs_initialize` cannot give every group an inode-table block
/// at all and, from 64 PiB on, loops forever.)
pub const MAX_SIZE: u64 = 64 << 40;

/// Why [`MAX_SIZE`] is the limit, for messages.
pub const MAX_SIZE_WHY: &str =
    "every 128 MiB block group needs its own 8 KiB of bitmaps: 1/16384 of the size is written, 4 GiB at 64 TiB";

/// About how many bytes [`mkfs`] writes to a fresh device of `size` bytes:
/// the bitmaps of every group and the group descriptors (with their two
/// backups), which is nearly all of it from a few TiB on. For progress
/// reports.
pub fn write_estimate(size: u64) -> u64 {
    let groups = (size / BLOCK_SIZE).div_ceil(BLOCKS_PER_GROUP);
    groups * (2 * BLOCK_SIZE + 3 * sys::EXT2_MIN_DESC_SIZE_64BIT as u64)
}

/// Options of [`mkfs`].
#[derive(Debug, Clone, Default)]
pub struct MkfsOptions {
    /// Filesystem UUID. Zero, as in upstream's output, unless set.
    pub uuid: [u8; 16],
    /// Filesystem size in bytes; the whole device when `None`.
    pub size: Option<u64>,
}

/// Make sure the inode tables read as zeros. libext2fs does not write them
/// (mke2fs does, or marks them uninitialised). Only ranges the device may
/// hold data in ([`BlockDevice::extents`]) are read, and only chunks that
/// hold old data are zeroed: on a fresh layer, which reads zeros already,
/// nothing is read or written.
fn zero_inode_tables(fs: &mut Ext2Fs) -> Result<()> {
    let raw = fs.raw();
    let bs = fs.block_size();
    // SAFETY: raw is open; plain field reads.
    let (groups, per_group) = unsafe {
        (
            (*raw).group_desc_count,
            (*raw).inode_blocks_per_group as u64,
        )
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for g in 0..groups {
        // SAFETY: raw is open and g a valid group.
        let loc = unsafe { sys::ext2fs_inode_table_loc(raw, g) };
        match ranges.last_mut() {
            Some(r) if r.0 + r.1 == loc => r.1 += per_group,
            _ => ranges.push((loc, per_group)),
        }
    }
    const CHUNK: u64 = 4 << 20;
    let mut buf = Vec::new();
    let cache = &mut fs.channel().cache;
    for (blk, n) in ranges {
        let dev = cache.device().clone();
        for ext in dev.extents(blk * bs, n * bs).map_err(Error::Device)? {
            if ext.zero {
                continue;
            }
            let mut off = ext.offset;
            while off < ext.end() {
                let len = (ext.end() - off).min(CHUNK);
                buf.resize(len as usize, 0);
                dev.read_at(&mut buf, off).map_err(Error::Device)?;
                if buf.iter().any(|&x| x != 0) {
                    cache.zero(off, len).map_err(Error::Device)?;
                }
                off += len;
            }
        }
    }
    Ok(())
}

/// How libext2fs behaves while a filesystem is made: stock (overlaybd
/// layers, [`Stock`]) or as upstream's fork (TurboOCI layers,
/// [`crate::photon::Fork`]).
pub trait Flavor {
    /// How the I/O channel writes back.
    fn write_mode(&self) -> WriteMode;
    /// Set up a freshly initialized or opened filesystem.
    fn prepare(&self, fs: &mut Ext2Fs) -> Result<()>;
    /// `ext2fs_expand_dir`.
    fn expand_dir(&self, fs: &mut Ext2Fs, dir: u32) -> Result<()>;
}

/// Stock libext2fs through the page cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stock;

impl Flavor for Stock {
    fn write_mode(&self) -> WriteMode {
        WriteMode::Pages
    }
    fn prepare(&self, _fs: &mut Ext2Fs) -> Result<()> {
        Ok(())
    }
    fn expand_dir(&self, fs: &mut Ext2Fs, dir: u32) -> Result<()> {
        fs.expand_dir(dir)
    }
}

/// Make an empty ext4 filesystem on `dev`.
///
/// Like upstream's mkfs, the device is not flushed at the end: everything
/// is written to it, and callers that need durability call
/// [`BlockDevice::flush`] (a layer is made durable when it is committed).
pub fn mkfs(dev: Arc<dyn BlockDevice>, opts: &MkfsOptions) -> Result<()> {
    mkfs_with(dev, opts, &Stock)
}

/// [`mkfs`] with a libext2fs [`Flavor`].
pub fn mkfs_with(dev: Arc<dyn BlockDevice>, opts: &MkfsOptions, flavor: &dyn Flavor) -> Result<()> {
    let size = opts.size.unwrap_or_else(|| dev.size());
    if size > dev.size() {
        return Err(Error::Invalid(format!(
            "mkfs size {size} is larger than the device ({} bytes)",
            dev.size()
        )));
    }
    let blocks = size / BLOCK_SIZE;
    // libext2fs needs room for at least a few groups' worth of metadata.
    if blocks < 1024 {
        return Err(Error::Invalid(format!(
            "device of {size} bytes is too small for an ext4 filesystem (need at least 4 MiB)"
        )));
    }
    if size > MAX_SIZE {
        return Err(Error::Invalid(format!(
            "device of {size} bytes is too large for mkfs (at most {MAX_SIZE} bytes, 64 TiB: {MAX_SIZE_WHY})"
        )));
    }
    let mut p = sys::ext2_super_block {
        s_rev_level: 1,
        s_feature_compat: (sys::EXT2_FEATURE_COMPAT_RESIZE_INODE
            | sys::EXT2_FEATURE_COMPAT_DIR_INDEX
            | sys::EXT2_FEATURE_COMPAT_EXT_ATTR
            | sys::EXT4_FEATURE_COMPAT_SPARSE_SUPER2) as u32,
        s_feature_incompat: (sys::EXT4_FEATURE_INCOMPAT_64BIT
            | sys::EXT2_FEATURE_INCOMPAT_FILETYPE
            | sys::EXT3_FEATURE_INCOMPAT_EXTENTS
            | sys::EXT4_FEATURE_INCOMPAT_FLEX_BG) as u32,
        s_feature_ro_compat: (sys::EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER
            | sys::EXT2_FEATURE_RO_COMPAT_LARGE_FILE
            | sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE
            | sys::EXT4_FEATURE_RO_COMPAT_DIR_NLINK
            | sys::EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE) as u32,
        s_log_block_size: 2,
        s_log_cluster_size: 2,
        s_desc_size: sys::EXT2_MIN_DESC_SIZE_64BIT as u16,
        s_log_groups_per_flex: 0,
        s_inode_size: INODE_SIZE,
        s_blocks_count: blocks as u32,
        s_blocks_count_hi: (blocks >> 32) as u32,
        s_inodes_count: (blocks * BLOCK_SIZE / INODE_RATIO).min(u32::MAX as u64) as u32,
        s_backup_bgs: [1, !0],
        ..Default::default()
    };
    let reserved = (RESERVED_RATIO * blocks as f64) as u64;
    p.s_r_blocks_count = reserved as u32;
    p.s_r_blocks_count_hi = (reserved >> 32) as u32;

    let mut fs = Ext2Fs::initialize(dev, &mut p, DEFAULT_CACHE_BYTES, flavor.write_mode())?;
    flavor.prepare(&mut fs)?;
    {
        let sb = fs.sb_mut();
        sb.s_uuid = opts.uuid;
        // Upstream's hash seed ends up zero (it is set on the template after
        // the superblock was built); the kernel then uses its default seed.
        sb.s_hash_seed = [0; 4];
        sb.s_kbytes_written = 1;
        sb.s_def_hash_version = sys::EXT2_HASH_HALF_MD4 as u8;
        sb.s_max_mnt_count = -1;
        sb.s_mkfs_time = 0;
        sb.s_mkfs_time_hi = 0;
        sb.s_lastcheck = 0;
        sb.s_lastcheck_hi = 0;
    }
    let raw = fs.raw();
    // SAFETY: raw is the open handle owned by `fs`; stride is a plain field.
    unsafe { (*raw).stride = (*(*raw).super_).s_raid_stride as u32 };

    // SAFETY: raw is open; allocates bitmaps and inode tables in memory.
    let rc = unsafe { sys::ext2fs_allocate_tables(raw) };
    fs.check(rc, "allocate the group tables")?;

    zero_inode_tables(&mut fs)?;

    let root = sys::EXT2_ROOT_INO as u32;
    // SAFETY: raw is open; creates the root directory (no name, no link).
    let rc = unsafe { sys::ext2fs_mkdir(raw, root, root, std::ptr::null()) };
    fs.check(rc, "create the root directory")?;

    fs.set_umask(0o077);
    let name = cstring(LOST_FOUND)?;
    // SAFETY: raw is open, name is a valid C string.
    let rc = unsafe { sys::ext2fs_mkdir(raw, root, 0, name.as_ptr()) };
    fs.check(rc, "create /lost+found")?;
    let mut lf = 0u32;
    // SAFETY: raw is open; name and lf are valid for the call.
    let rc = unsafe {
        sys::ext2fs_lookup(
            raw,
            root,
            name.as_ptr(),
            LOST_FOUND.len() as i32,
            std::ptr::null_mut(),
            &mut lf,
        )
    };
    fs.check(rc, "look up /lost+found")?;
    for _ in 0..2 {
        flavor.expand_dir(&mut fs, lf)?;
    }

    // Mark the reserved inodes in use.
    // SAFETY: raw is open; inode numbers are below s_first_ino.
    unsafe { sys::ext2fs_inode_alloc_stats2(raw, sys::EXT2_BAD_INO as u32, 1, 0) };
    let first_ino = fs.sb().s_first_ino;
    for ino in root + 1..first_ino {
        // SAFETY: as above.
        unsafe { sys::ext2fs_inode_alloc_stats2(raw, ino, 1, 0) };
    }
    // SAFETY: raw is open.
    unsafe { sys::ext2fs_mark_ib_dirty(raw) };

    // SAFETY: raw is open.
    let rc = unsafe { sys::ext2fs_create_resize_inode(raw) };
    fs.check(rc, "create the resize inode")?;

    // libext2fs stamped the current time on what it created: reset to 0.
    for ino in [root, lf, sys::EXT2_RESIZE_INO as u32] {
        let mut i = fs.read_inode(ino)?;
        i.set_times(Timestamp::default(), Timestamp::default());
        fs.write_inode(ino, &mut i)?;
    }
    fs.close_unsynced(Some(0))
}
