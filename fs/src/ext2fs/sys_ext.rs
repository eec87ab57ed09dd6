//! Declarations of libext2fs 1.47.0 functions that the generated
//! [`super::sys`] does not cover, written by hand from Debian's
//! `/usr/include/ext2fs/ext2fs.h` and `bitops.h` (same types as `sys`).
//! They are used by the upstream-compatible engine ([`crate::photon`]).

use std::ffi::{c_char, c_int, c_void};

use super::sys::ext2fs_inode_bitmap;
use super::sys::{
    blk64_t, dgrp_t, errcode_t, ext2_file_t, ext2_filsys, ext2_ino_t, ext2fs_block_bitmap,
};

/// `errcode_t (*)(ext2_filsys fs, blk64_t goal, blk64_t *ret)`.
pub type GetAllocBlock =
    Option<unsafe extern "C" fn(fs: ext2_filsys, goal: blk64_t, ret: *mut blk64_t) -> errcode_t>;

/// `errcode_t (*)(ext2_filsys fs, int flags, blk64_t goal, blk64_t len,
/// blk64_t *pblk, blk64_t *plen)`.
pub type NewRange = Option<
    unsafe extern "C" fn(
        fs: ext2_filsys,
        flags: c_int,
        goal: blk64_t,
        len: blk64_t,
        pblk: *mut blk64_t,
        plen: *mut blk64_t,
    ) -> errcode_t,
>;

unsafe extern "C" {
    pub fn ext2fs_set_alloc_block_callback(
        fs: ext2_filsys,
        func: GetAllocBlock,
        old: *mut GetAllocBlock,
    );
    pub fn ext2fs_set_new_range_callback(fs: ext2_filsys, func: NewRange, old: *mut NewRange);
    /// `charset` is a `const struct ext2fs_nls_table *` (NULL here).
    pub fn ext2fs_dirhash2(
        version: c_int,
        name: *const c_char,
        len: c_int,
        charset: *const c_void,
        hash_flags: c_int,
        seed: *const u32,
        ret_hash: *mut u32,
        ret_minor_hash: *mut u32,
    ) -> errcode_t;
    pub fn ext2fs_find_first_zero_block_bitmap2(
        bitmap: ext2fs_block_bitmap,
        start: blk64_t,
        end: blk64_t,
        out: *mut blk64_t,
    ) -> errcode_t;
    pub fn ext2fs_find_first_set_block_bitmap2(
        bitmap: ext2fs_block_bitmap,
        start: blk64_t,
        end: blk64_t,
        out: *mut blk64_t,
    ) -> errcode_t;
    pub fn ext2fs_find_first_zero_inode_bitmap2(
        bitmap: ext2fs_inode_bitmap,
        start: ext2_ino_t,
        end: ext2_ino_t,
        out: *mut ext2_ino_t,
    ) -> errcode_t;
    pub fn ext2fs_clear_block_uninit(fs: ext2_filsys, group: dgrp_t);
    pub fn ext2fs_bg_flags_test(fs: ext2_filsys, group: dgrp_t, flag: u16) -> c_int;
    pub fn ext2fs_bg_flags_clear(fs: ext2_filsys, group: dgrp_t, flags: u16);
    pub fn ext2fs_group_desc_csum_set(fs: ext2_filsys, group: dgrp_t);
    pub fn ext2fs_fast_unmark_inode_bitmap2(bitmap: ext2fs_inode_bitmap, inode: ext2_ino_t);
    pub fn ext2fs_file_write(
        file: ext2_file_t,
        buf: *const c_void,
        nbytes: std::ffi::c_uint,
        written: *mut std::ffi::c_uint,
    ) -> errcode_t;
    pub fn ext2fs_file_llseek(
        file: ext2_file_t,
        offset: u64,
        whence: c_int,
        ret_pos: *mut u64,
    ) -> errcode_t;
    pub fn ext2fs_file_flush(file: ext2_file_t) -> errcode_t;
    pub fn ext2fs_group_of_blk2(fs: ext2_filsys, blk: blk64_t) -> dgrp_t;
}
