//! The filesystem operations of PhotonLibOS's extfs (`fs/extfs/extfs.cpp`,
//! `extfs_utils.i`) as upstream's TurboOCI tools use them, over libext2fs.
//!
//! Each operation makes the libext2fs calls upstream makes, in the same
//! order, with the fork's behaviour where the fork differs from stock
//! libext2fs ([`super::alloc`], [`super::htree`]) and without timestamps
//! (the fork's `NO_TIMESTAMP`): what stock libext2fs stamps on new inodes is
//! cleared right away. What upstream leaves to its quirks is kept:
//! * metadata changes (`chown`, `chmod`, `utimes`) read and write the
//!   128-byte `struct ext2_inode` and add one to the inode version;
//! * `utimes` sets the 32-bit atime, mtime and ctime, nothing else;
//! * a new regular file is created with mode 0666 and one link;
//! * fallocate of `len` bytes allocates `(len - 1) / block_size + 1` blocks
//!   with C integer division, so an empty file gets one block;
//! * a deleted inode gets `dtime = 0xFFFFFFFF`;
//! * opening clears the index flag of `/lost+found`;
//! * every device node gets its device number, FIFOs included (0).
//!
//! Paths are lists of name components from the root. Lookups never follow
//! symbolic links: a component below a non-directory is not found.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::Arc;

use blockdev::BlockDevice;

use super::{alloc, htree};
use crate::error::{quote, Error, Result};
use crate::ext2fs::cache::WriteMode;
use crate::ext2fs::inode::{self, Inode};
use crate::ext2fs::sys_ext;
use crate::ext2fs::{cstring, sys, Ext2Fs};

/// The small inode structure photon reads and writes.
const SMALL: usize = inode::GOOD_OLD_INODE_SIZE;
/// `sizeof(struct ext2_inode_large)` in libext2fs 1.47.0.
const LARGE: usize = 160;
const ROOT: u32 = sys::EXT2_ROOT_INO as u32;
/// `EXT2_FILE_WRITE`, `EXT2_FILE_CREATE` (photon's flags for `O_WRONLY |
/// O_CREAT`).
const FILE_WRITE: c_int = 1;
const FILE_CREATE: c_int = 2;
const DIR_NO_SPACE: sys::errcode_t = sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t;

/// What a path names, as `lstat` reports it.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub ino: u32,
    pub mode: u16,
}

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & inode::S_IFMT == inode::S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & inode::S_IFMT == inode::S_IFLNK
    }
}

/// `ext2_file_type` of a mode.
fn file_type(mode: u16) -> u8 {
    (match mode & inode::S_IFMT {
        inode::S_IFLNK => sys::EXT2_FT_SYMLINK,
        inode::S_IFREG => sys::EXT2_FT_REG_FILE,
        inode::S_IFDIR => sys::EXT2_FT_DIR,
        inode::S_IFCHR => sys::EXT2_FT_CHRDEV,
        inode::S_IFBLK => sys::EXT2_FT_BLKDEV,
        inode::S_IFIFO => sys::EXT2_FT_FIFO,
        inode::S_IFSOCK => sys::EXT2_FT_SOCK,
        _ => sys::EXT2_FT_UNKNOWN,
    }) as u8
}

fn path_text(p: &[&[u8]]) -> String {
    let mut b = p.join(&b'/');
    b.insert(0, b'/');
    quote(&b)
}

fn not_found(p: &[&[u8]]) -> Error {
    Error::Invalid(format!("{}: no such file or directory", path_text(p)))
}

/// An ext4 filesystem opened as upstream's extfs opens it.
pub struct Extfs {
    pub fs: Ext2Fs,
    /// The names of the directories read so far (all of them), kept up to
    /// date by the operations here: directory -> name -> inode.
    dirs: HashMap<u32, HashMap<Box<[u8]>, u32>>,
}

impl Extfs {
    /// Open the ext4 on `dev` with an upstream-compatible channel
    /// ([`WriteMode::Exact`], or [`WriteMode::Buffered`] as photon's buffer
    /// file) and the fork's allocation policy.
    pub fn open(dev: Arc<dyn BlockDevice>, cache_bytes: usize, mode: WriteMode) -> Result<Self> {
        let mut fs = Ext2Fs::open_with(dev, cache_bytes, mode)?;
        alloc::install(&mut fs)?;
        // Upstream's handle never stamps times (the fork's NO_TIMESTAMP);
        // stock libext2fs uses `now` where it would, and those fields are
        // cleared after each call that sets them.
        fs.set_now(1);
        let mut x = Extfs {
            fs,
            dirs: HashMap::new(),
        };
        x.unindex_lost_found()?;
        Ok(x)
    }

    /// The fork's `ext2fs_open` clears the index flag of `/lost+found`
    /// (which its `expand_dir` indexed during mkfs), keeping the blocks as
    /// they are. Upstream fails to open a filesystem without `/lost+found`;
    /// this engine goes on.
    fn unindex_lost_found(&mut self) -> Result<()> {
        let Some(ino) = self.lookup_in(ROOT, b"lost+found")? else {
            return Ok(());
        };
        let mut i = self.read(ino, SMALL)?;
        if i.flags() & inode::INDEX_FL != 0 {
            i.set_flags(i.flags() & !inode::INDEX_FL);
            self.write(ino, &mut i)?;
        }
        Ok(())
    }

    /// Flush and close (superblock write time 0, as the fork writes).
    pub fn close(self) -> Result<()> {
        self.fs.close(Some(0))
    }

    // ----- inode I/O -------------------------------------------------------

    fn read(&mut self, ino: u32, size: usize) -> Result<Inode> {
        let mut i = Inode::zeroed(size);
        // SAFETY: the buffer holds `size` aligned bytes.
        let rc = unsafe {
            sys::ext2fs_read_inode_full(self.fs.raw(), ino, i.as_ext2_ptr(), size as c_int)
        };
        self.fs.check_with(rc, || format!("read inode {ino}"))?;
        Ok(i)
    }

    fn write(&mut self, ino: u32, i: &mut Inode) -> Result<()> {
        let len = i.len() as c_int;
        // SAFETY: the buffer holds `len` aligned bytes.
        let rc = unsafe { sys::ext2fs_write_inode_full(self.fs.raw(), ino, i.as_ext2_ptr(), len) };
        self.fs.check_with(rc, || format!("write inode {ino}"))
    }

    /// The fork's `ext2fs_write_new_inode`: the 128-byte structure with
    /// `i_extra_isize` set, no times.
    fn write_new(&mut self, ino: u32, small: &Inode) -> Result<()> {
        let size = self.fs.inode_size();
        let mut i = Inode::zeroed(size);
        i.as_bytes_mut()[..SMALL].copy_from_slice(&small.as_bytes()[..SMALL]);
        i.set_extra_isize((LARGE - SMALL) as u16);
        self.write(ino, &mut i)
    }

    /// Clear the times stock libext2fs stamped on a new inode.
    fn clear_times(&mut self, ino: u32) -> Result<()> {
        let size = self.fs.inode_size();
        let mut i = self.read(ino, size)?;
        i.clear_times();
        self.write(ino, &mut i)
    }

    fn set_size(&mut self, i: &mut Inode, size: u64) -> Result<()> {
        // SAFETY: fs is open; i is an inode buffer of at least 128 bytes.
        let rc = unsafe { sys::ext2fs_inode_size_set(self.fs.raw(), i.as_ext2_ptr(), size as i64) };
        self.fs.check(rc, "set an inode size")
    }

    // ----- lookups ---------------------------------------------------------

    /// `ext2fs_lookup` of one name; `None` when absent or when `dir` is not
    /// a directory. A directory's names are read once and then kept up to
    /// date by the operations here (all changes go through them).
    fn lookup_in(&mut self, dir: u32, name: &[u8]) -> Result<Option<u32>> {
        if let Some(m) = self.dirs.get(&dir) {
            return Ok(m.get(name).copied());
        }
        if !self.read(dir, SMALL)?.is_dir() {
            return Ok(None);
        }
        let m: HashMap<Box<[u8]>, u32> = self
            .fs
            .dir_entries_all(dir)?
            .into_iter()
            .map(|(n, ino, _)| (n.into_boxed_slice(), ino))
            .collect();
        let found = m.get(name).copied();
        self.dirs.insert(dir, m);
        Ok(found)
    }

    /// Record `name -> ino` in `dir` (when its names are loaded).
    fn remember(&mut self, dir: u32, name: &[u8], ino: u32) {
        if let Some(m) = self.dirs.get_mut(&dir) {
            m.insert(Box::from(name), ino);
        }
    }

    /// Photon's `string_to_inode(path, follow = 0)`.
    pub fn resolve(&mut self, path: &[&[u8]]) -> Result<Option<u32>> {
        let mut cur = ROOT;
        for c in path {
            match self.lookup_in(cur, c)? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// The parent directory's inode and the last name (photon's
    /// `get_parent_dir_ino` and `get_filename`).
    fn parent<'p>(&mut self, path: &[&'p [u8]]) -> Result<Option<(u32, &'p [u8])>> {
        let Some((name, dirs)) = path.split_last() else {
            return Ok(None);
        };
        Ok(self.resolve(dirs)?.map(|d| (d, *name)))
    }

    /// `lstat`.
    pub fn lstat(&mut self, path: &[&[u8]]) -> Result<Option<Stat>> {
        let Some(ino) = self.resolve(path)? else {
            return Ok(None);
        };
        let i = self.read(ino, LARGE.min(self.fs.inode_size()))?;
        Ok(Some(Stat {
            ino,
            mode: i.mode(),
        }))
    }

    /// The names in a directory (photon's readdir), in on-disk order.
    pub fn readdir(&mut self, path: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let ino = self.resolve(path)?.ok_or_else(|| not_found(path))?;
        Ok(self
            .fs
            .dir_entries(ino)?
            .into_iter()
            .map(|(n, _, _)| n)
            .collect())
    }

    // ----- directory entries -----------------------------------------------

    /// `ext2fs_link`, expanding the directory once when it is full, as every
    /// photon operation that adds a name does.
    fn link_expanding(&mut self, dir: u32, name: &[u8], ino: u32, ftype: u8) -> Result<()> {
        let mut rc = htree::link(&mut self.fs, dir, name, ino, ftype)?;
        if rc == DIR_NO_SPACE {
            htree::expand_dir(&mut self.fs, dir)?;
            rc = htree::link(&mut self.fs, dir, name, ino, ftype)?;
        }
        self.fs
            .check_with(rc, || format!("add a name to directory inode {dir}"))?;
        self.remember(dir, name, ino);
        Ok(())
    }

    /// Photon's `unlink_file_by_name`: `ext2fs_unlink` of the last name.
    fn unlink_name(&mut self, dir: u32, name: &[u8]) -> Result<()> {
        if let Some(m) = self.dirs.get_mut(&dir) {
            m.remove(name);
        }
        self.fs.unlink(dir, name, 0)
    }

    /// Photon's `remove_inode`: drop one link; free the inode and its blocks
    /// when none is left.
    fn remove_inode(&mut self, ino: u32) -> Result<()> {
        let mut i = self.read(ino, LARGE)?;
        if i.links() == 0 {
            return Ok(());
        }
        i.set_links(i.links() - 1);
        if i.links() == 0 {
            i.set_dtime(u32::MAX);
            self.fs.free_ext_attr(ino, &mut i)?;
            if self.fs.has_valid_blocks(&mut i) {
                self.fs.punch_all(ino, &mut i)?;
            }
            let is_dir = i.is_dir();
            self.fs.inode_alloc_stats(ino, -1, is_dir);
        }
        self.write(ino, &mut i)
    }

    // ----- operations ------------------------------------------------------

    /// `mkdir(path, mode)`. `Ok(false)` when the path exists.
    pub fn mkdir(&mut self, path: &[&[u8]], mode: u32) -> Result<bool> {
        if self.resolve(path)?.is_some() {
            return Ok(false);
        }
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        self.mkdir_in(parent, name, mode, path)?;
        Ok(true)
    }

    /// Photon's `mkdir_recursive`: [`Extfs::mkdir`] of every prefix of
    /// `path`, existing ones skipped, walking the path once (a `mkdir` of
    /// each prefix resolves it from the root: n^2 lookups for n names, many
    /// minutes for a path of 100,000).
    pub fn mkdir_all(&mut self, path: &[&[u8]], mode: u32) -> Result<()> {
        let mut cur = ROOT;
        for (k, name) in path.iter().enumerate() {
            cur = match self.lookup_in(cur, name)? {
                Some(ino) => ino,
                None => self.mkdir_in(cur, name, mode, &path[..=k])?,
            };
        }
        Ok(())
    }

    /// Make directory `name` in `parent` (`path` for messages); its inode.
    fn mkdir_in(&mut self, parent: u32, name: &[u8], mode: u32, path: &[&[u8]]) -> Result<u32> {
        let ino = alloc::new_inode(&mut self.fs)?;
        let mut rc = self.mkdir_at(parent, ino, name)?;
        if rc == DIR_NO_SPACE {
            htree::expand_dir(&mut self.fs, parent)?;
            rc = self.mkdir_at(parent, ino, name)?;
        }
        self.fs
            .check_with(rc, || format!("create directory {}", path_text(path)))?;
        self.remember(parent, name, ino);
        let mut i = self.read(ino, LARGE)?;
        i.set_mode(((mode & !(inode::S_IFMT as u32)) as u16) | inode::S_IFDIR);
        i.clear_times();
        self.write(ino, &mut i)?;
        Ok(ino)
    }

    /// `ext2fs_mkdir(fs, parent, ino, name)`. Stock `ext2fs_link` cannot add
    /// to an indexed parent as the fork does, so for one the directory is
    /// made unlinked and linked here, undoing it as `ext2fs_mkdir` does when
    /// the parent is full.
    fn mkdir_at(&mut self, parent: u32, ino: u32, name: &[u8]) -> Result<sys::errcode_t> {
        let indexed = htree::is_indexed(&mut self.fs, parent)?;
        let c = cstring(name)?;
        let cname = if indexed {
            std::ptr::null()
        } else {
            c.as_ptr()
        };
        // SAFETY: fs is open; cname is NULL or a valid C string.
        let rc = unsafe { sys::ext2fs_mkdir(self.fs.raw(), parent, ino, cname) };
        if rc != 0 || !indexed {
            return Ok(rc);
        }
        let rc = htree::link(&mut self.fs, parent, name, ino, sys::EXT2_FT_DIR as u8)?;
        if rc != 0 {
            // ext2fs_mkdir's cleanup: the block and the inode are freed and
            // the parent keeps its link count.
            let mut i = self.read(ino, SMALL)?;
            let blk = self.fs.bmap(ino, &mut i, 0)?;
            self.fs.block_alloc_stats_range(blk, 1, -1);
            self.fs.inode_alloc_stats(ino, -1, true);
            let mut p = self.read(parent, SMALL)?;
            p.set_links(p.links() - 1);
            self.write(parent, &mut p)?;
        }
        Ok(rc)
    }

    /// `open(path, O_CREAT | O_TRUNC | O_NOFOLLOW, mode)` of a new regular
    /// file (photon's `create_file`). Returns its inode.
    pub fn create(&mut self, path: &[&[u8]], mode: u32) -> Result<u32> {
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        let ino = alloc::new_inode(&mut self.fs)?;
        self.link_expanding(parent, name, ino, sys::EXT2_FT_REG_FILE as u8)?;
        self.fs.inode_alloc_stats(ino, 1, false);
        let mut i = Inode::zeroed(SMALL);
        i.set_mode(((mode & !(inode::S_IFMT as u32)) as u16) | inode::S_IFREG);
        i.set_links(1);
        self.set_size(&mut i, 0)?;
        let incompat = self.fs.sb().s_feature_incompat;
        if incompat & sys::EXT4_FEATURE_INCOMPAT_INLINE_DATA as u32 != 0 {
            return Err(Error::Unsupported(
                "the upstream-compatible ext4 engine does not support inline_data".into(),
            ));
        }
        if incompat & sys::EXT3_FEATURE_INCOMPAT_EXTENTS as u32 != 0 {
            // ext2fs_extent_open2 on a zeroed inode: an empty extent root.
            i.init_extent_root();
        }
        self.write_new(ino, &i)?;
        Ok(ino)
    }

    /// Photon's `fallocate(0, 0, len)` of inode `ino` (see the module
    /// documentation for the block count).
    pub fn fallocate(&mut self, ino: u32, len: u64) -> Result<()> {
        let mut i = self.read(ino, SMALL)?;
        let bs = self.fs.block_size() as i64;
        let end = (len as i64 - 1) / bs;
        let count = (end + 1) as u64;
        let goal = alloc::fallocate_goal(&self.fs);
        // SAFETY: fs is open; i is a 128-byte inode buffer of `ino`.
        let rc = unsafe {
            sys::ext2fs_fallocate(
                self.fs.raw(),
                sys::EXT2_FALLOCATE_FORCE_INIT as c_int,
                ino,
                i.as_ext2_ptr(),
                goal,
                0,
                count,
            )
        };
        self.fs
            .check_with(rc, || format!("allocate the blocks of inode {ino}"))?;
        self.set_size(&mut i, len)?;
        self.write(ino, &mut i)
    }

    /// Write a regular file's bytes as photon's `pwrite` does, chunk by
    /// chunk through libext2fs file I/O (`ext2fs_file_llseek`, `_write`,
    /// `_flush`), which allocates blocks one at a time. `next` fills the
    /// buffer it is given with the next bytes; chunks are sized as libtar's
    /// `extract_regfile` sizes them.
    pub fn write_file(
        &mut self,
        ino: u32,
        size: u64,
        next: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let bs = self.fs.block_size();
        let mut f: sys::ext2_file_t = std::ptr::null_mut();
        // SAFETY: fs is open; f is an out-pointer.
        let rc =
            unsafe { sys::ext2fs_file_open(self.fs.raw(), ino, FILE_WRITE | FILE_CREATE, &mut f) };
        self.fs.check_with(rc, || format!("open inode {ino}"))?;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = 0u64;
        let mut left = size;
        let result = (|| {
            while left > 0 {
                let rsz = if left > CHUNK {
                    CHUNK
                } else if left > bs {
                    left & !(bs - 1)
                } else {
                    left
                };
                let b = &mut buf[..rsz as usize];
                next(b)?;
                let mut written = 0u32;
                // SAFETY: f is open; b holds rsz bytes.
                let rc = unsafe {
                    let rc = sys_ext::ext2fs_file_llseek(f, pos, 0, std::ptr::null_mut());
                    if rc != 0 {
                        rc
                    } else {
                        let rc = sys_ext::ext2fs_file_write(
                            f,
                            b.as_ptr() as *const std::ffi::c_void,
                            rsz as u32,
                            &mut written,
                        );
                        if rc != 0 {
                            rc
                        } else {
                            sys_ext::ext2fs_file_flush(f)
                        }
                    }
                };
                if rc != 0 {
                    return Err(Error::ext2fs(&format!("write inode {ino}"), rc, None));
                }
                pos += rsz;
                left -= rsz;
            }
            Ok(())
        })();
        // SAFETY: f is open and not used afterwards.
        let rc = unsafe { sys::ext2fs_file_close(f) };
        result?;
        self.fs.check_with(rc, || format!("close inode {ino}"))
    }

    /// Photon's `fiemap`: the file's extents as (physical block, blocks).
    pub fn fiemap(&mut self, ino: u32) -> Result<Vec<(u64, u64)>> {
        let mut i = self.read(ino, SMALL)?;
        if !self.fs.has_valid_blocks(&mut i) || i.flags() & inode::EXTENTS_FL == 0 {
            return Ok(Vec::new());
        }
        let mut h: sys::ext2_extent_handle_t = std::ptr::null_mut();
        // SAFETY: fs is open; h is an out-pointer; no inode buffer is passed,
        // so the handle reads its own copy.
        let rc =
            unsafe { sys::ext2fs_extent_open2(self.fs.raw(), ino, std::ptr::null_mut(), &mut h) };
        self.fs
            .check_with(rc, || format!("open the extent tree of inode {ino}"))?;
        let mut out = Vec::new();
        let mut op = sys::EXT2_EXTENT_ROOT as c_int;
        let result = loop {
            let mut e = sys::ext2fs_extent::default();
            // SAFETY: h is open; e is an out-pointer.
            let rc = unsafe { sys::ext2fs_extent_get(h, op, &mut e) };
            if rc != 0 {
                break if rc == sys::EXT2_ET_EXTENT_NO_NEXT as sys::errcode_t {
                    Ok(out)
                } else {
                    Err(Error::ext2fs(
                        &format!("read the extents of inode {ino}"),
                        rc,
                        None,
                    ))
                };
            }
            op = sys::EXT2_EXTENT_NEXT as c_int;
            let f = e.e_flags as c_int;
            if f & sys::EXT2_EXTENT_FLAGS_SECOND_VISIT as c_int != 0
                || f & sys::EXT2_EXTENT_FLAGS_LEAF as c_int == 0
            {
                continue;
            }
            out.push((e.e_pblk, e.e_len as u64));
        };
        // SAFETY: h is open and not used afterwards.
        unsafe { sys::ext2fs_extent_free(h) };
        result
    }

    /// `link(src, dest)`: a hard link.
    pub fn hardlink(&mut self, src: &[&[u8]], dest: &[&[u8]]) -> Result<()> {
        if self.resolve(dest)?.is_some() {
            return Err(Error::Invalid(format!("{}: file exists", path_text(dest))));
        }
        let (parent, name) = self.parent(dest)?.ok_or_else(|| not_found(dest))?;
        let ino = self.resolve(src)?.ok_or_else(|| not_found(src))?;
        let mut i = self.read(ino, LARGE)?;
        // A second name for a directory would corrupt the filesystem (e2fsck
        // reports it); the kernel refuses it too (EPERM).
        if i.mode() & inode::S_IFMT == inode::S_IFDIR {
            return Err(Error::Invalid(format!(
                "hard link target '{}' is a directory",
                path_text(src)
            )));
        }
        if i.links() >= sys::EXT2_LINK_MAX as u16 {
            return Err(Error::Invalid(format!(
                "too many hard links to '{}'",
                path_text(src)
            )));
        }
        i.set_links(i.links() + 1);
        self.write(ino, &mut i)?;
        let ft = file_type(i.mode());
        self.link_expanding(parent, name, ino, ft)
    }

    /// `symlink(target, path)`.
    pub fn symlink(&mut self, target: &[u8], path: &[&[u8]]) -> Result<()> {
        if self.resolve(path)?.is_some() {
            return Err(Error::Invalid(format!("{}: file exists", path_text(path))));
        }
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        let ino = alloc::new_inode(&mut self.fs)?;
        let mut rc = self.symlink_at(parent, ino, name, target)?;
        if rc == DIR_NO_SPACE {
            htree::expand_dir(&mut self.fs, parent)?;
            rc = self.symlink_at(parent, ino, name, target)?;
        }
        self.fs
            .check_with(rc, || format!("create symbolic link {}", path_text(path)))?;
        self.remember(parent, name, ino);
        self.clear_times(ino)
    }

    /// `ext2fs_symlink(fs, parent, ino, name, target)`, with the name added
    /// here for an indexed parent (see [`Extfs::mkdir_at`]).
    fn symlink_at(
        &mut self,
        parent: u32,
        ino: u32,
        name: &[u8],
        target: &[u8],
    ) -> Result<sys::errcode_t> {
        let indexed = htree::is_indexed(&mut self.fs, parent)?;
        let c = cstring(name)?;
        let t = cstring(target)?;
        let cname = if indexed {
            std::ptr::null()
        } else {
            c.as_ptr()
        };
        // SAFETY: fs is open; cname is NULL or a valid C string, t is valid.
        let rc = unsafe { sys::ext2fs_symlink(self.fs.raw(), parent, ino, cname, t.as_ptr()) };
        if rc != 0 || !indexed {
            return Ok(rc);
        }
        let rc = htree::link(&mut self.fs, parent, name, ino, sys::EXT2_FT_SYMLINK as u8)?;
        if rc != 0 {
            // ext2fs_symlink's cleanup.
            let mut i = self.read(ino, SMALL)?;
            if self.fs.has_valid_blocks(&mut i) {
                let blk = self.fs.bmap(ino, &mut i, 0)?;
                self.fs.block_alloc_stats_range(blk, 1, -1);
            }
            self.fs.inode_alloc_stats(ino, -1, false);
        }
        Ok(rc)
    }

    /// `mknod(path, mode, makedev(major, minor))`.
    pub fn mknod(&mut self, path: &[&[u8]], mode: u16, major: u32, minor: u32) -> Result<()> {
        if self.resolve(path)?.is_some() {
            return Err(Error::Invalid(format!("{}: file exists", path_text(path))));
        }
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        let ft = match mode & inode::S_IFMT {
            inode::S_IFCHR | inode::S_IFBLK | inode::S_IFIFO | inode::S_IFSOCK => file_type(mode),
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: not a device, FIFO or socket",
                    path_text(path)
                )))
            }
        };
        let ino = alloc::new_inode(&mut self.fs)?;
        self.link_expanding(parent, name, ino, ft)?;
        self.fs.inode_alloc_stats(ino, 1, false);
        let mut i = Inode::zeroed(SMALL);
        i.set_mode(mode);
        // Upstream compares the ext2 file type with S_IFIFO, which never
        // matches: every node, FIFOs too, stores its device number.
        if major < 256 && minor < 256 {
            i.set_block(0, major * 256 + minor);
            i.set_block(1, 0);
        } else {
            i.set_block(0, 0);
            i.set_block(1, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
        }
        i.set_links(1);
        self.write_new(ino, &i)
    }

    /// `unlink(path)` of a non-directory.
    pub fn unlink(&mut self, path: &[&[u8]]) -> Result<()> {
        let ino = self.resolve(path)?.ok_or_else(|| not_found(path))?;
        if self.read(ino, SMALL)?.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: is a directory",
                path_text(path)
            )));
        }
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        self.unlink_name(parent, name)?;
        self.remove_inode(ino)
    }

    /// `rmdir(path)`. `Ok(false)` when the directory is not empty.
    pub fn rmdir(&mut self, path: &[&[u8]]) -> Result<bool> {
        let ino = self.resolve(path)?.ok_or_else(|| not_found(path))?;
        let mut dotdot = 0u32;
        let mut empty = true;
        for (n, child, _) in self.fs.dir_entries_all(ino)? {
            if n == b"." {
                continue;
            }
            if n == b".." {
                dotdot = child;
                continue;
            }
            empty = false;
        }
        if !empty {
            return Ok(false);
        }
        let (parent, name) = self.parent(path)?.ok_or_else(|| not_found(path))?;
        self.unlink_name(parent, name)?;
        self.dirs.remove(&ino);
        self.remove_inode(ino)?;
        self.remove_inode(ino)?;
        if dotdot != 0 {
            let mut p = self.read(dotdot, LARGE)?;
            if p.links() > 1 {
                p.set_links(p.links() - 1);
            }
            self.write(dotdot, &mut p)?;
        }
        Ok(true)
    }

    /// Photon's read-modify-write of the 128-byte inode that every metadata
    /// change does, adding one to the inode version.
    fn modify(&mut self, path: &[&[u8]], f: impl FnOnce(&mut Inode)) -> Result<()> {
        let ino = self.resolve(path)?.ok_or_else(|| not_found(path))?;
        let mut i = self.read(ino, SMALL)?;
        f(&mut i);
        i.set_version_lo(i.version_lo().wrapping_add(1));
        self.write(ino, &mut i)
    }

    /// `lchown(path, uid, gid)`.
    pub fn chown(&mut self, path: &[&[u8]], uid: u32, gid: u32) -> Result<()> {
        self.modify(path, |i| {
            i.set_uid(uid);
            i.set_gid(gid);
        })
    }

    /// `chmod(path, mode)`: the permission bits of `mode` (everything but
    /// the type).
    pub fn chmod(&mut self, path: &[&[u8]], mode: u32) -> Result<()> {
        self.modify(path, |i| {
            let keep = i.mode() & inode::S_IFMT;
            i.set_mode(keep | (mode as u16 & !inode::S_IFMT));
        })
    }

    /// `lutimes(path, {t, t})`: atime, mtime and ctime all `t`.
    pub fn utimes(&mut self, path: &[&[u8]], t: u32) -> Result<()> {
        self.modify(path, |i| i.set_times_lo(t, t, t))
    }

    /// `lsetxattr(path, name, value)`. `Ok(false)` when photon refuses the
    /// name's namespace (ENOTSUP).
    pub fn setxattr(&mut self, path: &[&[u8]], name: &[u8], value: &[u8]) -> Result<bool> {
        const NAMESPACES: [&[u8]; 8] = [
            b"gnu.",
            b"system.posix_acl_default",
            b"system.posix_acl_access",
            b"system.richacl",
            b"security.",
            b"trusted.",
            b"system.",
            b"user.",
        ];
        if !NAMESPACES.iter().any(|p| name.starts_with(p)) {
            return Ok(false);
        }
        let ino = self.resolve(path)?.ok_or_else(|| not_found(path))?;
        self.fs
            .set_xattrs(ino, false, &[(name.to_vec(), value.to_vec())])?;
        Ok(true)
    }
}
