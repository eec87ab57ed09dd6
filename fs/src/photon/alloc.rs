//! The allocation policy of upstream's libext2fs fork
//! (data-accelerator/e2fsprogs, patches "new block/inode/extent start from
//! last allocated").
//!
//! Stock libext2fs starts a block search at the caller's goal (usually the
//! inode's group) and an inode search at the parent directory's group. The
//! fork keeps two cursors in the filesystem handle, zero when it is opened:
//!
//! * `fs->reserved[3]`, the block cursor. `new_block` ignores its goal and
//!   searches from the cursor (block 0 when the cursor is 0 or out of range),
//!   wrapping around once; the cursor becomes the block found. `new_range`
//!   searches from its goal, or from the cursor when the goal is 0 or out of
//!   range; the cursor becomes the end of the range found. Fallocate of a
//!   file without extents starts from the cursor instead of the inode's
//!   group ([`fallocate_goal`]).
//! * `fs->reserved[2]`, the inode cursor. `new_inode` searches from the
//!   cursor (at least `s_first_ino`) with stock's group-by-group loop; the
//!   cursor becomes the inode found.
//!
//! Both cursors are 32-bit, as in the fork. Block allocation is hooked into
//! the stock library through its two allocator callbacks
//! (`ext2fs_set_alloc_block_callback`, `ext2fs_set_new_range_callback`),
//! which every block allocation of libext2fs goes through when no explicit
//! bitmap is passed. Inode allocation has no hook: [`new_inode`] is called
//! instead of `ext2fs_new_inode`, and inode numbers are passed to the
//! libext2fs calls that would otherwise allocate one.
//!
//! On a filesystem with `uninit_bg` (group descriptor checksums, as
//! `mke2fs` makes them; upstream's own mkfs does not), the allocators' lazy
//! initialisation is reproduced: blocks through libext2fs's
//! `ext2fs_clear_block_uninit`, inodes as stock `check_inode_uninit`.
//! `metadata_csum` is refused ([`install`]).

use std::ffi::c_int;

use crate::error::{Error, Result};
use crate::ext2fs::sys_ext::{self, GetAllocBlock, NewRange};
use crate::ext2fs::{sys, Ext2Fs};

const INODE_CURSOR: usize = 2;
const BLOCK_CURSOR: usize = 3;
const ENOENT: sys::errcode_t = libc::ENOENT as sys::errcode_t;

/// Reset both cursors and route libext2fs's block allocations through the
/// fork's policy. Fails for filesystems with group descriptor checksums
/// (uninit_bg, metadata_csum), whose lazy-init bookkeeping is not emulated.
pub fn install(fs: &mut Ext2Fs) -> Result<()> {
    if fs.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM) {
        return Err(Error::Unsupported(
            "the upstream-compatible ext4 engine does not support metadata_csum \
             (overlaybd's mkfs does not enable it)"
                .into(),
        ));
    }
    let raw = fs.raw();
    // SAFETY: raw is the open handle of `fs`; the callbacks only use the
    // handle libext2fs passes them, which is this one.
    unsafe {
        (*raw).reserved[INODE_CURSOR] = 0;
        (*raw).reserved[BLOCK_CURSOR] = 0;
        let mut old: GetAllocBlock = None;
        sys_ext::ext2fs_set_alloc_block_callback(raw, Some(get_alloc_block), &mut old);
        let mut old: NewRange = None;
        sys_ext::ext2fs_set_new_range_callback(raw, Some(new_range), &mut old);
    }
    Ok(())
}

/// The block cursor.
pub fn block_cursor(fs: &Ext2Fs) -> u64 {
    // SAFETY: fs is open; plain field read.
    unsafe { (*fs.raw()).reserved[BLOCK_CURSOR] as u64 }
}

/// The goal to pass to `ext2fs_fallocate` so that a file without extents is
/// placed as the fork places it (from the block cursor).
pub fn fallocate_goal(fs: &Ext2Fs) -> u64 {
    block_cursor(fs)
}

/// The fork's `ext2fs_new_inode`: the first free inode at or after the
/// inode cursor (see the module documentation). The inode is not marked in
/// use.
pub fn new_inode(fs: &mut Ext2Fs) -> Result<u32> {
    let raw = fs.raw();
    // SAFETY: raw is open; field reads.
    let (map, ipg, count, first, cursor) = unsafe {
        let sb = &*(*raw).super_;
        (
            (*raw).inode_map,
            sb.s_inodes_per_group,
            sb.s_inodes_count,
            if sb.s_rev_level == 0 {
                11
            } else {
                sb.s_first_ino
            },
            (*raw).reserved[INODE_CURSOR],
        )
    };
    let fail = || {
        Error::ext2fs(
            "allocate an inode",
            sys::EXT2_ET_INODE_ALLOC_FAIL as sys::errcode_t,
            None,
        )
    };
    if map.is_null() {
        return Err(Error::ext2fs(
            "allocate an inode",
            sys::EXT2_ET_NO_INODE_BITMAP as sys::errcode_t,
            None,
        ));
    }
    let start = cursor.max(first);
    if start > count {
        return Err(fail());
    }
    let csum = fs.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_GDT_CSUM);
    let mut i = start;
    loop {
        if csum {
            check_inode_uninit(fs, map, (i - 1) / ipg);
        }
        let in_group = (i - 1) % ipg;
        let mut upto = i + (ipg - in_group);
        if i < start && upto >= start {
            upto = start - 1;
        }
        upto = upto.min(count);
        let mut found = 0u32;
        // SAFETY: map is the open inode bitmap; found is an out-pointer.
        let rc = unsafe { sys_ext::ext2fs_find_first_zero_inode_bitmap2(map, i, upto, &mut found) };
        if rc == 0 {
            i = found;
            break;
        }
        if rc != ENOENT {
            return Err(fail());
        }
        i = upto + 1;
        if i > count {
            i = first;
        }
        if i == start {
            break;
        }
    }
    // SAFETY: map is open and i is in range.
    if unsafe { sys::ext2fs_test_inode_bitmap2(map, i) } != 0 {
        return Err(fail());
    }
    // SAFETY: raw is open; plain field store.
    unsafe { (*raw).reserved[INODE_CURSOR] = i };
    Ok(i)
}

/// Stock `check_inode_uninit`: a group whose inode table is not
/// initialised gets its inodes marked free and loses both uninit flags.
fn check_inode_uninit(fs: &mut Ext2Fs, map: sys::ext2fs_inode_bitmap, group: u32) {
    const INODE_UNINIT: u16 = 0x0001;
    const BLOCK_UNINIT: u16 = 0x0002;
    let raw = fs.raw();
    // SAFETY: raw is open; map is its inode bitmap; the group number is
    // checked against the group count before use.
    unsafe {
        if group >= (*raw).group_desc_count
            || sys_ext::ext2fs_bg_flags_test(raw, group, INODE_UNINIT) == 0
        {
            return;
        }
        let ipg = (*(*raw).super_).s_inodes_per_group;
        let first = group * ipg + 1;
        for ino in first..first + ipg {
            sys_ext::ext2fs_fast_unmark_inode_bitmap2(map, ino);
        }
        sys_ext::ext2fs_bg_flags_clear(raw, group, INODE_UNINIT);
        sys_ext::ext2fs_bg_flags_clear(raw, group, BLOCK_UNINIT);
        sys_ext::ext2fs_group_desc_csum_set(raw, group);
        sys::ext2fs_mark_ib_dirty(raw);
        sys::ext2fs_mark_super_dirty(raw);
    }
}

/// `get_alloc_block` hook: the fork's `ext2fs_new_block3` without a bitmap.
unsafe extern "C" fn get_alloc_block(
    fs: sys::ext2_filsys,
    _goal: sys::blk64_t,
    ret: *mut sys::blk64_t,
) -> sys::errcode_t {
    // SAFETY: libext2fs passes its open handle and a valid out-pointer.
    unsafe {
        let map = (*fs).block_map;
        if map.is_null() {
            return sys::EXT2_ET_NO_BLOCK_BITMAP as sys::errcode_t;
        }
        let sb = &*(*fs).super_;
        let blocks = sb.s_blocks_count as u64 | (sb.s_blocks_count_hi as u64) << 32;
        let first = sb.s_first_data_block as u64;
        let mut goal = (*fs).reserved[BLOCK_CURSOR] as u64;
        if goal == 0 || goal >= blocks {
            goal = first;
        }
        let mut b = 0u64;
        let mut rc = sys_ext::ext2fs_find_first_zero_block_bitmap2(map, goal, blocks - 1, &mut b);
        if rc == ENOENT && goal != first {
            rc = sys_ext::ext2fs_find_first_zero_block_bitmap2(map, first, goal - 1, &mut b);
        }
        if rc == ENOENT {
            return sys::EXT2_ET_BLOCK_ALLOC_FAIL as sys::errcode_t;
        }
        if rc != 0 {
            return rc;
        }
        sys_ext::ext2fs_clear_block_uninit(fs, sys_ext::ext2fs_group_of_blk2(fs, b));
        *ret = b;
        (*fs).reserved[BLOCK_CURSOR] = b as u32;
        0
    }
}

/// `new_range` hook: the fork's `ext2fs_new_range` without a bitmap.
unsafe extern "C" fn new_range(
    fs: sys::ext2_filsys,
    flags: c_int,
    goal: sys::blk64_t,
    len: sys::blk64_t,
    pblk: *mut sys::blk64_t,
    plen: *mut sys::blk64_t,
) -> sys::errcode_t {
    let fixed = flags & sys::EXT2_NEWRANGE_FIXED_GOAL as c_int != 0;
    let min_len = flags & sys::EXT2_NEWRANGE_MIN_LENGTH as c_int != 0;
    // SAFETY: libext2fs passes its open handle and valid out-pointers.
    unsafe {
        let map = (*fs).block_map;
        if map.is_null() {
            return sys::EXT2_ET_NO_BLOCK_BITMAP as sys::errcode_t;
        }
        let sb = &*(*fs).super_;
        let max = sb.s_blocks_count as u64 | (sb.s_blocks_count_hi as u64) << 32;
        let first = sb.s_first_data_block as u64;
        let goal = if goal == 0 || goal >= max {
            (*fs).reserved[BLOCK_CURSOR] as u64
        } else {
            goal
        };
        let fail = sys::EXT2_ET_BLOCK_ALLOC_FAIL as sys::errcode_t;
        let mut start = goal;
        let mut looped = false;
        while !looped || start <= goal {
            let mut found = 0u64;
            let rc = sys_ext::ext2fs_find_first_zero_block_bitmap2(map, start, max - 1, &mut found);
            if rc == ENOENT {
                if fixed || start == first {
                    return fail;
                }
                start = first;
                continue;
            } else if rc != 0 {
                return rc;
            }
            start = found;
            if fixed && start != goal {
                return fail;
            }
            let b = (start + len - 1).min(max - 1);
            let mut end = 0u64;
            let rc = sys_ext::ext2fs_find_first_set_block_bitmap2(map, start, b, &mut end);
            if rc == ENOENT {
                end = b + 1;
            } else if rc != 0 {
                return rc;
            }
            if !min_len || end - start >= len {
                *pblk = start;
                *plen = end - start;
                let bpg = sb.s_blocks_per_group as u64;
                let mut g = start;
                while g < end {
                    sys_ext::ext2fs_clear_block_uninit(fs, sys_ext::ext2fs_group_of_blk2(fs, g));
                    g += bpg;
                }
                (*fs).reserved[BLOCK_CURSOR] = end as u32;
                return 0;
            }
            if fixed {
                return fail;
            }
            start = end;
            if start >= max {
                if looped {
                    return fail;
                }
                looped = true;
                start = first;
            }
        }
        fail
    }
}
