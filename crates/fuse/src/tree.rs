//! The seam of filesystem mode: a read-only file tree ([`FileTree`]) and the
//! FUSE server over any such tree ([`TreeFs`]).
//!
//! A tree names inodes by its own numbers (ext4 inode numbers, EROFS nids,
//! ...). FUSE's node ids are those numbers, except that the tree's root is
//! FUSE's root node 1 (and the tree's inode 1, if any, takes the root's
//! number), so hard links stay one inode. `st_ino` is the tree's number
//! wherever FUSE lets the two differ (getattr, readdir, `.` and `..`): the
//! root shows the same inode number as under the kernel's own driver (2 for
//! ext4, its nid for EROFS). The tree never changes while mounted:
//! attributes, entries and names are cached by the kernel for long, and
//! files keep their page cache across opens. When the kernel forgets an
//! inode, the tree may drop what it caches about it ([`FileTree::forget`]).
//!
//! A damaged inode (invalid on disk) fails every access with `EIO`, never
//! `ENOENT`, which would tell the client that the name does not exist (and
//! end a directory listing early). Its name is still listed: readdir sends
//! the type its directory entry records, readdirplus the same with no
//! attributes to cache ([`FileTree::entry_attr`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};

use crate::cache::CacheStats;

/// Result of tree operations: an errno for the client on failure.
pub type TreeResult<T> = std::result::Result<T, Errno>;

/// Extended attributes of an inode: (full name, value).
pub type Xattrs = Arc<Vec<(Vec<u8>, Vec<u8>)>>;

/// One name in a directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// The name (no `/`, not `.` or `..`).
    pub name: Vec<u8>,
    /// The tree's inode number.
    pub ino: u64,
    /// The file type, when the directory records it.
    pub kind: Option<FileType>,
}

/// The time `sec` seconds (negative: before 1970) and `nsec` nanoseconds after
/// the epoch, as filesystems store inode times. A time `SystemTime` cannot hold
/// shows as the epoch rather than failing the inode.
pub fn system_time(sec: i64, nsec: u32) -> std::time::SystemTime {
    let base = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    base.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
        .unwrap_or(UNIX_EPOCH)
}

/// The file type in an inode's mode: the POSIX type bits, which ext4 and EROFS
/// inodes both store; `None` for a value that is no type.
pub fn file_kind(mode: u32) -> Option<FileType> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::RegularFile,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => return None,
    })
}

/// The file type byte of a directory entry, numbered alike by ext4 (its `filetype`
/// feature) and EROFS (`EROFS_FT_*`); `None` for 0 (unknown) and values past 7.
pub fn dirent_kind(ftype: u8) -> Option<FileType> {
    Some(match ftype {
        1 => FileType::RegularFile,
        2 => FileType::Directory,
        3 => FileType::CharDevice,
        4 => FileType::BlockDevice,
        5 => FileType::NamedPipe,
        6 => FileType::Socket,
        7 => FileType::Symlink,
        _ => return None,
    })
}

/// A directory's contents.
#[derive(Debug, Clone, Default)]
pub struct DirList {
    /// Entries in the tree's order, without `.` and `..`.
    pub entries: Vec<DirEntry>,
    /// The parent directory's inode number (the root's own for the root).
    pub parent: u64,
}

/// Why an inode cannot be served, for the trees' own use.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// It is damaged (or uses a feature not implemented) on disk: every
    /// access fails the same way, with this errno (`EIO` for damage).
    Damaged(Errno),
    /// The device failed, perhaps only for now, with this errno.
    Io(Errno),
}

impl Fault {
    /// What a device failure means: a read past the end of the device (or
    /// otherwise refused) comes from a damaged block number.
    pub(crate) fn of_device(e: &blockdev::Error) -> Fault {
        match crate::error::errno_of(e) {
            libc::EINVAL | libc::EROFS => Fault::Damaged(Errno::EIO),
            n => Fault::Io(Errno::from_i32(n)),
        }
    }

    /// The errno the client gets.
    pub(crate) fn errno(self) -> Errno {
        match self {
            Fault::Damaged(e) | Fault::Io(e) => e,
        }
    }
}

/// Filesystem-wide counters for statfs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    /// Blocks in the filesystem (of `block_size`).
    pub blocks: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Free blocks available to unprivileged users.
    pub avail_blocks: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub free_files: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

/// A read-only file tree (the ext4 in a stack today; EROFS next).
pub trait FileTree: Send + Sync + 'static {
    /// The root directory's inode number.
    fn root(&self) -> u64;
    /// Attributes of `ino`; `ino` field = the tree's number.
    fn attr(&self, ino: u64) -> TreeResult<FileAttr>;
    /// Attributes of `ino` for listing it in a directory, as
    /// [`FileTree::attr`], but `Ok(None)` when the inode is damaged (its
    /// on-disk structure is invalid, so every access to it fails with
    /// `EIO`): the name is still listed. Other failures (the device's, which
    /// may pass) are errors.
    fn entry_attr(&self, ino: u64) -> TreeResult<Option<FileAttr>> {
        self.attr(ino).map(Some)
    }
    /// The names in directory `ino`.
    fn dir(&self, ino: u64) -> TreeResult<Arc<DirList>>;
    /// The inode `name` refers to in directory `dir`.
    fn lookup(&self, dir: u64, name: &[u8]) -> TreeResult<u64>;
    /// Up to `len` bytes of regular file `ino` from `offset` (fewer at the end).
    fn read(&self, ino: u64, offset: u64, len: u32) -> TreeResult<Vec<u8>>;
    /// `lseek(SEEK_DATA)` (`want_hole` false) or `lseek(SEEK_HOLE)` (true)
    /// in regular file `ino` from `offset`: the first offset at or after
    /// it that is data or a hole (the end of the file is one), `ENXIO` when
    /// `offset` is at or past the end or no data follows. By default the
    /// whole file is data, as for a filesystem without holes.
    fn seek(&self, ino: u64, offset: u64, want_hole: bool) -> TreeResult<u64> {
        let size = self.attr(ino)?.size;
        if offset >= size {
            return Err(Errno::ENXIO);
        }
        Ok(if want_hole { size } else { offset })
    }
    /// The target of symlink `ino`.
    fn read_link(&self, ino: u64) -> TreeResult<Arc<Vec<u8>>>;
    /// The extended attributes of `ino`.
    fn xattrs(&self, ino: u64) -> TreeResult<Xattrs>;
    /// statfs counters.
    fn stats(&self) -> TreeStats;
    /// The kernel dropped `ino` from its cache: whatever the tree caches
    /// about it can go too.
    fn forget(&self, _ino: u64) {}
    /// The counters of the tree's metadata cache.
    fn cache_stats(&self) -> CacheStats {
        CacheStats::default()
    }
}

/// Everything is immutable while mounted.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// The file type listed for a damaged inode whose directory entry does not
/// record one (FUSE has no `DT_UNKNOWN` in fuser's API).
const DAMAGED_KIND: FileType = FileType::RegularFile;
/// Largest read the kernel sends at once.
const MAX_READ: u32 = 1 << 20;

/// The FUSE server of a [`FileTree`].
pub struct TreeFs<T: FileTree> {
    tree: T,
    root: u64,
}

impl<T: FileTree> TreeFs<T> {
    /// Serve `tree`.
    pub fn new(tree: T) -> Self {
        TreeFs {
            root: tree.root(),
            tree,
        }
    }

    /// The tree served.
    pub fn tree(&self) -> &T {
        &self.tree
    }

    fn fuse_ino(&self, ino: u64) -> INodeNo {
        INodeNo(if ino == self.root {
            1
        } else if ino == 1 {
            self.root
        } else {
            ino
        })
    }

    fn tree_ino(&self, ino: INodeNo) -> u64 {
        if ino.0 == 1 {
            self.root
        } else if ino.0 == self.root {
            1
        } else {
            ino.0
        }
    }

    /// Attributes for an entry reply: `ino` is the node id.
    fn attr(&self, ino: u64) -> TreeResult<FileAttr> {
        let mut a = self.tree.attr(ino)?;
        a.ino = self.fuse_ino(ino);
        Ok(a)
    }

    /// Attributes of node `ino` as `stat` shows them: the tree's number.
    fn fuse_attr(&self, ino: INodeNo) -> TreeResult<FileAttr> {
        let i = self.tree_ino(ino);
        let mut a = self.tree.attr(i)?;
        a.ino = INodeNo(i);
        Ok(a)
    }

    fn dir_of(&self, ino: INodeNo) -> TreeResult<(u64, Arc<DirList>)> {
        let i = self.tree_ino(ino);
        Ok((i, self.tree.dir(i)?))
    }
}

/// What readdirplus sends for a damaged inode: its number and the type its
/// directory entry records, nothing else. It goes with a zero TTL, so the
/// kernel's entry and attributes are stale at once: any use of the name
/// looks it up again (and gets the error), and nothing shows these
/// attributes. (A node id of 0 would be the way to send no attributes, but
/// fuser sends the node id as `d_ino` too, and older glibc readdir, glob and
/// Go skip entries whose `d_ino` is 0.)
fn placeholder(ino: INodeNo, kind: FileType) -> FileAttr {
    FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn reply_xattr(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32)
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(data)
    }
}

impl<T: FileTree> Filesystem for TreeFs<T> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        // Without it the kernel refuses getxattr of `system.posix_acl_*`
        // (EOPNOTSUPP, while listxattr names them) and checks permissions by
        // the mode alone; with it, it asks getxattr for the ACLs and uses them.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self
            .tree
            .lookup(self.tree_ino(parent), name.as_bytes())
            .and_then(|i| self.attr(i));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fuse_attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.read_link(self.tree_ino(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.fuse_attr(ino) {
            Ok(a) if a.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree.read(self.tree_ino(ino), offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // The kernel answers SEEK_SET/CUR/END itself; only these come here.
        let want_hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        match self.tree.seek(self.tree_ino(ino), offset, want_hole) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fuse_attr(ino) {
            Ok(a) if a.kind == FileType::Directory => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (me, d) = match self.dir_of(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let total = d.entries.len() as u64 + 2;
        for i in offset..total {
            let (name, ino, kind): (&[u8], u64, FileType) = match i {
                0 => (b".", me, FileType::Directory),
                1 => (b"..", d.parent, FileType::Directory),
                _ => {
                    let e = &d.entries[(i - 2) as usize];
                    let kind = match e.kind {
                        Some(k) => k,
                        // Only the type is wanted: a damaged inode is listed
                        // all the same.
                        None => match self.tree.entry_attr(e.ino) {
                            Ok(a) => a.map_or(DAMAGED_KIND, |a| a.kind),
                            // Send what is listed so far; the error comes
                            // with the next call, which starts here.
                            Err(_) if i > offset => break,
                            Err(err) => return reply.error(err),
                        },
                    };
                    (&e.name, e.ino, kind)
                }
            };
            // Only d_ino: the tree's number, as stat shows it.
            if reply.add(INodeNo(ino), i + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (me, d) = match self.dir_of(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let total = d.entries.len() as u64 + 2;
        for i in offset..total {
            let (name, ino): (&[u8], u64) = match i {
                0 => (b".", me),
                1 => (b"..", d.parent),
                _ => {
                    let e = &d.entries[(i - 2) as usize];
                    (&e.name, e.ino)
                }
            };
            // The kernel links no inode for `.` and `..`: their numbers are
            // only d_ino, so they show the tree's number like stat does.
            let shown = if i < 2 {
                INodeNo(ino)
            } else {
                self.fuse_ino(ino)
            };
            let (a, ttl) = match self.tree.entry_attr(ino) {
                Ok(Some(mut a)) => {
                    a.ino = shown;
                    (a, TTL)
                }
                // Listed, but nothing about it is cached.
                Ok(None) => {
                    let kind = match i {
                        0 | 1 => FileType::Directory,
                        _ => d.entries[(i - 2) as usize].kind.unwrap_or(DAMAGED_KIND),
                    };
                    (placeholder(shown, kind), Duration::ZERO)
                }
                // Send what is listed so far; the error comes with the
                // next call, which starts here.
                Err(_) if i > offset => break,
                Err(e) => return reply.error(e),
            };
            if reply.add(
                a.ino,
                i + 1,
                OsStr::from_bytes(name),
                &ttl,
                &a,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        // The kernel sends one forget with the whole lookup count when it
        // drops the inode; the tree only caches, so it can drop it too.
        if ino.0 != 1 {
            self.tree.forget(self.tree_ino(ino));
        }
    }

    fn destroy(&mut self) {
        let s = self.tree.cache_stats();
        tracing::info!(
            "metadata cache: {} entries, {} of {} bytes (peak {}), {} evicted, {} forgotten",
            s.entries,
            s.weight,
            s.limit,
            s.peak_weight,
            s.evicted,
            s.forgotten
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of a read-only file: nothing to do.
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.tree.stats();
        reply.statfs(
            s.blocks,
            s.free_blocks,
            s.avail_blocks,
            s.files,
            s.free_files,
            s.block_size,
            255,
            s.block_size,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.tree.xattrs(self.tree_ino(ino)) {
            Ok(x) => match x.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
                Some((_, v)) => reply_xattr(reply, v, size),
                None => reply.error(Errno::ENODATA),
            },
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.tree.xattrs(self.tree_ino(ino)) {
            Ok(x) => {
                let mut list = Vec::new();
                for (k, _) in x.iter() {
                    list.extend_from_slice(k);
                    list.push(0);
                }
                reply_xattr(reply, &list, size)
            }
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree with nothing but a root numbered like an EROFS nid.
    struct Root(u64);
    impl FileTree for Root {
        fn root(&self) -> u64 {
            self.0
        }
        fn attr(&self, _ino: u64) -> TreeResult<FileAttr> {
            Err(Errno::ENOENT)
        }
        fn dir(&self, _ino: u64) -> TreeResult<Arc<DirList>> {
            Err(Errno::ENOENT)
        }
        fn lookup(&self, _dir: u64, _name: &[u8]) -> TreeResult<u64> {
            Err(Errno::ENOENT)
        }
        fn read(&self, _ino: u64, _offset: u64, _len: u32) -> TreeResult<Vec<u8>> {
            Err(Errno::ENOENT)
        }
        fn read_link(&self, _ino: u64) -> TreeResult<Arc<Vec<u8>>> {
            Err(Errno::ENOENT)
        }
        fn xattrs(&self, _ino: u64) -> TreeResult<Xattrs> {
            Err(Errno::ENOENT)
        }
        fn stats(&self) -> TreeStats {
            TreeStats::default()
        }
    }

    #[test]
    fn root_and_inode_one_swap_everything_else_stays() {
        for root in [2u64, 36, 1] {
            let fs = TreeFs::new(Root(root));
            assert_eq!(fs.fuse_ino(root), INodeNo(1));
            assert_eq!(fs.tree_ino(INodeNo(1)), root);
            for i in [1u64, 2, 3, 36, 37, 1 << 40] {
                assert_eq!(fs.tree_ino(fs.fuse_ino(i)), i, "root {root}, ino {i}");
            }
            assert_eq!(fs.fuse_ino(5), INodeNo(5));
        }
    }
}
