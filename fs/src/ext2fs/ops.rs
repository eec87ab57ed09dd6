//! Thin safe wrappers for the libext2fs calls the apply code needs.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;

use super::inode::Inode;
use super::{cstring, sys, Ext2Fs};
use crate::error::Result;

/// Largest length of an initialized extent.
pub const MAX_EXTENT_LEN: u64 = 32768;

impl Ext2Fs {
    /// Find a free inode near directory `dir` (not yet marked in use).
    pub fn new_inode(&mut self, dir: u32, mode: u16) -> Result<u32> {
        let mut ino = 0;
        // SAFETY: fs is open; `ino` is a valid out-pointer.
        let rc = unsafe {
            sys::ext2fs_new_inode(
                self.raw(),
                dir,
                mode as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        self.check(rc, "allocate an inode")?;
        Ok(ino)
    }

    /// Account an inode as used (+1) or free (-1).
    pub fn inode_alloc_stats(&mut self, ino: u32, delta: i32, is_dir: bool) {
        // SAFETY: fs is open; ino is a valid inode number.
        unsafe { sys::ext2fs_inode_alloc_stats2(self.raw(), ino, delta, is_dir as c_int) };
    }

    /// Account `n` blocks from `blk` as used (+1) or free (-1).
    pub fn block_alloc_stats_range(&mut self, blk: u64, n: u64, delta: i32) {
        // SAFETY: fs is open; the range lies within the filesystem (it came
        // from the allocator or from an inode's map).
        unsafe { sys::ext2fs_block_alloc_stats_range(self.raw(), blk, n as u32, delta) };
    }

    /// A free range of at most `len` blocks at or after `goal`.
    pub fn new_range(&mut self, goal: u64, len: u64) -> Result<(u64, u64)> {
        let (mut pblk, mut plen) = (0u64, 0u64);
        // SAFETY: fs is open; out-pointers are valid.
        let rc = unsafe {
            sys::ext2fs_new_range(
                self.raw(),
                0,
                goal,
                len,
                std::ptr::null_mut(),
                &mut pblk,
                &mut plen,
            )
        };
        self.check(rc, "allocate blocks (is the filesystem full?)")?;
        Ok((pblk, plen))
    }

    /// Physical block of logical block `lblk` of `ino` (0 for a hole).
    pub fn bmap(&mut self, ino: u32, inode: &mut Inode, lblk: u64) -> Result<u64> {
        let mut pblk = 0u64;
        // SAFETY: fs is open; inode is an aligned buffer of the inode size.
        let rc = unsafe {
            sys::ext2fs_bmap2(
                self.raw(),
                ino,
                inode.as_ext2_ptr(),
                std::ptr::null_mut(),
                0,
                lblk,
                std::ptr::null_mut(),
                &mut pblk,
            )
        };
        self.check_with(rc, || format!("map block {lblk} of inode {ino}"))?;
        Ok(pblk)
    }

    /// Map logical block `lblk` of `ino` to `pblk` (block-mapped files;
    /// indirect blocks are allocated as needed).
    pub fn bmap_set(&mut self, ino: u32, inode: &mut Inode, lblk: u64, pblk: u64) -> Result<()> {
        let mut p = pblk;
        // SAFETY: as in bmap.
        let rc = unsafe {
            sys::ext2fs_bmap2(
                self.raw(),
                ino,
                inode.as_ext2_ptr(),
                std::ptr::null_mut(),
                (sys::BMAP_SET | sys::BMAP_ALLOC) as c_int,
                lblk,
                std::ptr::null_mut(),
                &mut p,
            )
        };
        self.check_with(rc, || format!("map block {lblk} of inode {ino}"))
    }

    /// Add `n` blocks to the inode's block count.
    pub fn iblk_add_blocks(&mut self, inode: &mut Inode, n: u64) -> Result<()> {
        // SAFETY: fs is open; inode is a valid inode buffer.
        let rc = unsafe { sys::ext2fs_iblk_add_blocks(self.raw(), inode.as_ext2_ptr(), n) };
        self.check(rc, "update the block count")
    }

    /// Read a directory block (checksum verified when enabled).
    pub fn read_dir_block(&mut self, blk: u64, dir: u32) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.block_size() as usize];
        // SAFETY: the buffer holds one block.
        let rc = unsafe {
            sys::ext2fs_read_dir_block4(self.raw(), blk, b.as_mut_ptr() as *mut c_void, 0, dir)
        };
        self.check_with(rc, || format!("read block {blk} of directory inode {dir}"))?;
        Ok(b)
    }

    /// Write a directory block (checksum set when enabled).
    pub fn write_dir_block(&mut self, blk: u64, buf: &mut [u8], dir: u32) -> Result<()> {
        assert_eq!(buf.len() as u64, self.block_size());
        // SAFETY: the buffer holds one block.
        let rc = unsafe {
            sys::ext2fs_write_dir_block4(self.raw(), blk, buf.as_mut_ptr() as *mut c_void, 0, dir)
        };
        self.check_with(rc, || format!("write block {blk} of directory inode {dir}"))
    }

    /// Append an empty block to directory `dir`.
    pub fn expand_dir(&mut self, dir: u32) -> Result<()> {
        // SAFETY: fs is open; dir is a directory inode.
        let rc = unsafe { sys::ext2fs_expand_dir(self.raw(), dir) };
        self.check_with(rc, || format!("grow directory inode {dir}"))
    }

    /// Add a name with libext2fs (used for hashed or inline directories).
    pub fn link(&mut self, dir: u32, name: &[u8], ino: u32, ftype: u8) -> Result<()> {
        let c = cstring(name)?;
        for attempt in 0..2 {
            // SAFETY: fs is open; c is a valid C string.
            let rc = unsafe { sys::ext2fs_link(self.raw(), dir, c.as_ptr(), ino, ftype as c_int) };
            if rc == sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t && attempt == 0 {
                self.expand_dir(dir)?;
                continue;
            }
            return self.check_with(rc, || format!("add a name to directory inode {dir}"));
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Remove a name with libext2fs.
    pub fn unlink(&mut self, dir: u32, name: &[u8], ino: u32) -> Result<()> {
        let c = cstring(name)?;
        // SAFETY: fs is open; c is a valid C string.
        let rc = unsafe { sys::ext2fs_unlink(self.raw(), dir, c.as_ptr(), ino, 0) };
        self.check_with(rc, || format!("remove a name from directory inode {dir}"))
    }

    /// Every name in a directory except `.` and `..`: (name, inode, type byte).
    pub fn dir_entries(&mut self, dir: u32) -> Result<Vec<(Vec<u8>, u32, u8)>> {
        self.dir_entries_impl(dir, false)
    }

    /// Every name in a directory, `.` and `..` included, in on-disk order.
    pub fn dir_entries_all(&mut self, dir: u32) -> Result<Vec<(Vec<u8>, u32, u8)>> {
        self.dir_entries_impl(dir, true)
    }

    fn dir_entries_impl(&mut self, dir: u32, dots: bool) -> Result<Vec<(Vec<u8>, u32, u8)>> {
        struct Out {
            dots: bool,
            v: Vec<(Vec<u8>, u32, u8)>,
        }
        unsafe extern "C" fn cb(
            _dir: sys::ext2_ino_t,
            entry: c_int,
            dirent: *mut sys::ext2_dir_entry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            priv_data: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a valid entry inside its block buffer
            // and our Out as priv_data.
            unsafe {
                let out = &mut *(priv_data as *mut Out);
                if !out.dots && entry != sys::DIRENT_OTHER_FILE as c_int {
                    return 0;
                }
                let d = &*dirent;
                let len = (d.name_len & 0xff) as usize;
                let ftype = (d.name_len >> 8) as u8;
                let name = std::slice::from_raw_parts(d.name.as_ptr() as *const u8, len).to_vec();
                out.v.push((name, d.inode, ftype));
            }
            0
        }
        let mut out = Out {
            dots,
            v: Vec::new(),
        };
        // SAFETY: fs is open; the callback only touches `out`.
        let rc = unsafe {
            sys::ext2fs_dir_iterate2(
                self.raw(),
                dir,
                0,
                std::ptr::null_mut(),
                Some(cb),
                &mut out as *mut _ as *mut c_void,
            )
        };
        self.check_with(rc, || format!("read directory inode {dir}"))?;
        Ok(out.v)
    }

    /// Create symlink inode `ino` (from [`Ext2Fs::new_inode`]) pointing to
    /// `target`, without linking it anywhere. Marks the inode in use.
    pub fn symlink(&mut self, parent: u32, ino: u32, target: &[u8]) -> Result<()> {
        let c = cstring(target)?;
        // SAFETY: fs is open; a NULL name means "do not link".
        let rc =
            unsafe { sys::ext2fs_symlink(self.raw(), parent, ino, std::ptr::null(), c.as_ptr()) };
        self.check(rc, "create a symbolic link")
    }

    /// Whether the inode has a block map (not a fast symlink, device, ...).
    pub fn has_valid_blocks(&mut self, inode: &mut Inode) -> bool {
        // SAFETY: fs is open; inode is a valid buffer.
        unsafe { sys::ext2fs_inode_has_valid_blocks2(self.raw(), inode.as_ext2_ptr()) != 0 }
    }

    /// Free every data and mapping block of `ino` (the inode is written).
    pub fn punch_all(&mut self, ino: u32, inode: &mut Inode) -> Result<()> {
        // SAFETY: fs is open; inode is a valid buffer for `ino`.
        let rc = unsafe {
            sys::ext2fs_punch(
                self.raw(),
                ino,
                inode.as_ext2_ptr(),
                std::ptr::null_mut(),
                0,
                !0u64,
            )
        };
        self.check_with(rc, || format!("free the blocks of inode {ino}"))
    }

    /// Release the extended-attribute block of `ino` (updates `inode`).
    pub fn free_ext_attr(&mut self, ino: u32, inode: &mut Inode) -> Result<()> {
        if inode.file_acl() == 0 {
            return Ok(());
        }
        // SAFETY: fs is open; the function only reads and updates the
        // i_file_acl and i_blocks fields, which lie in the first 128 bytes.
        let rc = unsafe {
            sys::ext2fs_free_ext_attr(
                self.raw(),
                ino,
                inode.as_ext2_ptr() as *mut sys::ext2_inode_large,
            )
        };
        self.check_with(rc, || {
            format!("free the extended attributes of inode {ino}")
        })
    }

    /// The data of an inline-data inode.
    pub fn inline_data(&mut self, ino: u32, inode: &mut Inode) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: fs is open; out-pointer valid.
        let rc = unsafe { sys::ext2fs_inline_data_size(self.raw(), ino, &mut size) };
        self.check_with(rc, || format!("read inline data of inode {ino}"))?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: the buffer holds `size` bytes.
        let rc = unsafe {
            sys::ext2fs_inline_data_get(
                self.raw(),
                ino,
                inode.as_ext2_ptr(),
                buf.as_mut_ptr() as *mut c_void,
                &mut size,
            )
        };
        self.check_with(rc, || format!("read inline data of inode {ino}"))?;
        buf.truncate(size);
        Ok(buf)
    }

    fn xattr_handle(&mut self, ino: u32) -> Result<XattrHandle> {
        let mut h: *mut sys::ext2_xattr_handle = std::ptr::null_mut();
        // SAFETY: fs is open; out-pointer valid.
        let rc = unsafe { sys::ext2fs_xattrs_open(self.raw(), ino, &mut h) };
        self.check_with(rc, || {
            format!("open the extended attributes of inode {ino}")
        })?;
        let xh = XattrHandle(h);
        // SAFETY: h is an open handle.
        let rc = unsafe { sys::ext2fs_xattrs_read(xh.0) };
        self.check_with(rc, || {
            format!("read the extended attributes of inode {ino}")
        })?;
        Ok(xh)
    }

    /// All extended attributes of `ino`.
    pub fn xattrs(&mut self, ino: u32) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        unsafe extern "C" fn cb(
            name: *mut c_char,
            value: *mut c_char,
            len: usize,
            data: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a NUL-terminated name, `len` value
            // bytes and our Vec.
            unsafe {
                let out = &mut *(data as *mut Vec<(Vec<u8>, Vec<u8>)>);
                let n = CStr::from_ptr(name).to_bytes().to_vec();
                let v = if len == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(value as *const u8, len).to_vec()
                };
                out.push((n, v));
            }
            0
        }
        let h = self.xattr_handle(ino)?;
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        // SAFETY: h is open; the callback only touches `out`.
        let rc =
            unsafe { sys::ext2fs_xattrs_iterate(h.0, Some(cb), &mut out as *mut _ as *mut c_void) };
        self.check_with(rc, || {
            format!("list the extended attributes of inode {ino}")
        })?;
        // The iteration hands out values as stored; POSIX ACLs are stored in
        // ext4's own compact form, which `ext2fs_xattr_get` turns back into
        // the `system.posix_acl_*` value every reader expects (as the kernel's
        // ext4 does; the stored form is refused by getxattr's callers).
        for (name, value) in out.iter_mut() {
            if name != b"system.posix_acl_access" && name != b"system.posix_acl_default" {
                continue;
            }
            let c = cstring(name)?;
            let mut p: *mut c_void = std::ptr::null_mut();
            let mut len = 0usize;
            // SAFETY: h is open; c is a valid C string; both out-pointers are
            // valid for the call.
            let rc = unsafe { sys::ext2fs_xattr_get(h.0, c.as_ptr(), &mut p, &mut len) };
            self.check_with(rc, || {
                format!(
                    "read extended attribute '{}' of inode {ino}",
                    String::from_utf8_lossy(name)
                )
            })?;
            if !p.is_null() {
                // SAFETY: on success p holds `len` bytes that libext2fs
                // allocated for us; they are copied before it is freed, once,
                // by the library's own free (it takes the pointer's address).
                unsafe {
                    *value = std::slice::from_raw_parts(p as *const u8, len).to_vec();
                    sys::ext2fs_free_mem(&mut p as *mut *mut c_void as *mut c_void);
                }
            }
        }
        Ok(out)
    }

    /// Replace (when `clear`) or extend the extended attributes of `ino`.
    pub fn set_xattrs(
        &mut self,
        ino: u32,
        clear: bool,
        attrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let old = if clear { self.xattrs(ino)? } else { Vec::new() };
        if old.is_empty() && attrs.is_empty() {
            return Ok(());
        }
        let h = self.xattr_handle(ino)?;
        for (name, _) in &old {
            if attrs.iter().any(|(n, _)| n == name) {
                continue;
            }
            let c = cstring(name)?;
            // SAFETY: h is open; c is a valid C string.
            let rc = unsafe { sys::ext2fs_xattr_remove(h.0, c.as_ptr()) };
            self.check_with(rc, || format!("remove extended attribute of inode {ino}"))?;
        }
        for (name, value) in attrs {
            let c = cstring(name)?;
            // SAFETY: h is open; value points to value.len() bytes.
            let rc = unsafe {
                sys::ext2fs_xattr_set(
                    h.0,
                    c.as_ptr(),
                    value.as_ptr() as *const c_void,
                    value.len(),
                )
            };
            self.check_with(rc, || {
                format!(
                    "set extended attribute '{}' on inode {ino}",
                    String::from_utf8_lossy(name)
                )
            })?;
        }
        Ok(())
    }

    /// Open the extent tree of `ino`, whose in-memory inode is `inode`.
    /// libext2fs keeps a pointer to `inode` and writes it when the tree root
    /// changes, so the inode stays borrowed for the handle's lifetime.
    pub fn extents<'a>(&mut self, ino: u32, inode: &'a mut Inode) -> Result<ExtentHandle<'a>> {
        let mut h: sys::ext2_extent_handle_t = std::ptr::null_mut();
        let ip = inode.as_ext2_ptr();
        // SAFETY: fs is open; `ip` stays valid while the handle lives because
        // the handle borrows the inode.
        let rc = unsafe { sys::ext2fs_extent_open2(self.raw(), ino, ip, &mut h) };
        self.check_with(rc, || format!("open the extent tree of inode {ino}"))?;
        Ok(ExtentHandle {
            h,
            inode: ip,
            _borrow: PhantomData,
        })
    }
}

/// An open extended-attribute handle, closed on drop.
struct XattrHandle(*mut sys::ext2_xattr_handle);

impl Drop for XattrHandle {
    fn drop(&mut self) {
        // SAFETY: the handle is open; close frees it.
        unsafe { sys::ext2fs_xattrs_close(&mut self.0) };
    }
}

/// An open extent tree (see [`Ext2Fs::extents`]).
pub struct ExtentHandle<'a> {
    pub(super) h: sys::ext2_extent_handle_t,
    inode: *mut sys::ext2_inode,
    _borrow: PhantomData<&'a mut Inode>,
}

impl ExtentHandle<'_> {
    /// Map logical blocks `[lblk, lblk+len)` to `[pblk, pblk+len)` (len at
    /// most [`MAX_EXTENT_LEN`]) and add them to the inode's block count.
    pub fn insert(&mut self, fs: &mut Ext2Fs, lblk: u64, pblk: u64, len: u64) -> Result<()> {
        debug_assert!(len > 0 && len <= MAX_EXTENT_LEN);
        let mut newex = sys::ext2fs_extent {
            e_pblk: pblk,
            e_lblk: lblk,
            e_len: len as u32,
            e_flags: 0,
        };
        let mut cur = sys::ext2fs_extent::default();
        // SAFETY: h is open. goto may fail for an empty tree or a hole; the
        // current position is then what get() reports, as in libext2fs's
        // own fallocate.
        let rc = unsafe {
            sys::ext2fs_extent_goto(self.h, lblk);
            sys::ext2fs_extent_get(self.h, sys::EXT2_EXTENT_CURRENT as c_int, &mut cur)
        };
        let op = if rc == sys::EXT2_ET_NO_CURRENT_NODE as sys::errcode_t {
            0
        } else {
            fs.check(rc, "walk an extent tree")?;
            if cur.e_lblk > lblk {
                0
            } else {
                sys::EXT2_EXTENT_INSERT_AFTER as c_int
            }
        };
        // SAFETY: h is open; newex is a valid extent.
        let rc = unsafe { sys::ext2fs_extent_insert(self.h, op, &mut newex) };
        fs.check(rc, "insert an extent")?;
        // SAFETY: h is open.
        let rc = unsafe { sys::ext2fs_extent_fix_parents(self.h) };
        fs.check(rc, "update an extent tree")?;
        // SAFETY: inode points to the borrowed inode buffer.
        let rc = unsafe { sys::ext2fs_iblk_add_blocks(fs.raw(), self.inode, len) };
        fs.check(rc, "update the block count")
    }
}

impl Drop for ExtentHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is open; free releases it.
        unsafe { sys::ext2fs_extent_free(self.h) };
    }
}
