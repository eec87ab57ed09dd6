//! Filesystem mode: the ext4 filesystem inside the stack, served read-only.
//!
//! Metadata (inodes, directories, extent trees, symlinks, xattrs) is read
//! through libext2fs ([`obdfs::ext2fs::Ext2Fs`], opened read-only over the
//! stack), which is single-threaded and therefore sits behind one mutex.
//! What it returns is cached per inode ([`Node`]): the filesystem never
//! changes while mounted. File data never goes through libext2fs: a file's
//! block map is resolved once under the mutex, and reads then go straight to
//! the block device, so any number of data reads run in parallel.
//!
//! Inode numbers are the stored ones, except that ext4's root (2) is FUSE's
//! root node (1); hard links are therefore one inode. Modes, owners, times
//! (nanoseconds), device numbers and xattrs are reported as stored.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockdev::BlockDevice;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use obdfs::ext2fs::inode::{self, Inode, Timestamp};
use obdfs::ext2fs::read::{Counts, Run};
use obdfs::ext2fs::Ext2Fs;
use parking_lot::{Mutex, RwLock};

use crate::error::{errno_of, Error, Result};

/// ext4's root directory inode.
const EXT4_ROOT: u32 = 2;
/// The filesystem never changes: let the kernel cache for long.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// libext2fs's metadata cache.
const META_CACHE: usize = 64 << 20;
/// Largest read the kernel sends.
const MAX_READ: u32 = 1 << 20;

fn to_fuse(ino: u32) -> INodeNo {
    INodeNo(if ino == EXT4_ROOT { 1 } else { ino as u64 })
}

fn from_fuse(ino: INodeNo) -> Option<u32> {
    match ino.0 {
        1 => Some(EXT4_ROOT),
        2 => None, // ext4's root is only reachable as FUSE's root
        n => u32::try_from(n).ok(),
    }
}

fn time(t: Timestamp) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn kind(mode: u16) -> Option<FileType> {
    Some(match mode & inode::S_IFMT {
        inode::S_IFREG => FileType::RegularFile,
        inode::S_IFDIR => FileType::Directory,
        inode::S_IFLNK => FileType::Symlink,
        inode::S_IFCHR => FileType::CharDevice,
        inode::S_IFBLK => FileType::BlockDevice,
        inode::S_IFIFO => FileType::NamedPipe,
        inode::S_IFSOCK => FileType::Socket,
        _ => return None,
    })
}

/// The file type byte of a directory entry (`filetype` feature), if set.
fn dirent_kind(ftype: u8) -> Option<FileType> {
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

/// Linux's `new_encode_dev`, which the kernel decodes from FUSE attributes.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// A directory's names.
struct Dir {
    /// (name, ext4 inode, file type from the entry or None), in on-disk
    /// order, without `.` and `..`.
    entries: Vec<(Vec<u8>, u32, Option<FileType>)>,
    by_name: HashMap<Vec<u8>, u32>,
    parent: u32,
}

/// A regular file's data.
enum Data {
    /// Physical runs of the file's blocks.
    Runs(Vec<Run>),
    /// Inline data (stored in the inode).
    Inline(Vec<u8>),
}

/// Extended attributes: (full name, value).
type Xattrs = Arc<Vec<(Vec<u8>, Vec<u8>)>>;

/// What is cached about one inode.
pub struct Node {
    ino: u32,
    attr: FileAttr,
    /// `i_flags` (the inode itself is read again when its data is mapped,
    /// so a cached node stays small).
    flags: u32,
    dir: OnceLock<Arc<Dir>>,
    data: OnceLock<Arc<Data>>,
    link: OnceLock<Arc<Vec<u8>>>,
    xattrs: OnceLock<Xattrs>,
}

/// The filesystem-mode server.
pub struct Ext4Fs {
    fs: Mutex<Ext2Fs>,
    dev: Arc<dyn BlockDevice>,
    block_size: u64,
    counts: Counts,
    huge_file: bool,
    nodes: RwLock<HashMap<u32, Arc<Node>>>,
}

impl Ext4Fs {
    /// Open the ext4 filesystem on `dev` (read-only).
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let fs = Ext2Fs::open_read_only(dev.clone(), META_CACHE).map_err(|source| Error::Ext4 {
            what: "no readable ext4 filesystem on the disk".into(),
            source,
        })?;
        let counts = fs.counts();
        let huge_file = fs.has_ro_compat(obdfs::ext2fs::sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE);
        let me = Ext4Fs {
            block_size: counts.block_size,
            counts,
            huge_file,
            fs: Mutex::new(fs),
            dev,
            nodes: RwLock::new(HashMap::new()),
        };
        let root = me.node(EXT4_ROOT).map_err(|source| Error::Ext4 {
            what: "cannot read the root directory".into(),
            source,
        })?;
        if root.attr.kind != FileType::Directory {
            return Err(Error::Usage(
                "the ext4 root inode is not a directory".into(),
            ));
        }
        Ok(me)
    }

    /// The cached node of ext4 inode `ino`, reading it on first use.
    pub fn node(&self, ino: u32) -> obdfs::Result<Arc<Node>> {
        if let Some(n) = self.nodes.read().get(&ino) {
            return Ok(n.clone());
        }
        let inode = self.fs.lock().read_inode(ino)?;
        let n = Arc::new(self.make_node(ino, inode)?);
        Ok(self.nodes.write().entry(ino).or_insert(n).clone())
    }

    fn make_node(&self, ino: u32, inode: Inode) -> obdfs::Result<Node> {
        let mode = inode.mode();
        if inode.links() == 0 {
            return Err(obdfs::Error::Invalid(format!("inode {ino} is not in use")));
        }
        let kind = kind(mode)
            .ok_or_else(|| obdfs::Error::Invalid(format!("inode {ino} has file type {mode:o}")))?;
        let b = inode.as_bytes();
        let mut blocks = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")) as u64
            | (u16::from_le_bytes([b[116], b[117]]) as u64) << 32;
        if self.huge_file && inode.flags() & obdfs::ext2fs::sys::EXT4_HUGE_FILE_FL as u32 != 0 {
            blocks *= self.block_size / 512;
        }
        let rdev = match kind {
            FileType::CharDevice | FileType::BlockDevice => {
                let (ma, mi) = inode.rdev();
                encode_dev(ma, mi)
            }
            _ => 0,
        };
        let attr = FileAttr {
            ino: to_fuse(ino),
            size: if kind == FileType::Directory
                || kind == FileType::RegularFile
                || kind == FileType::Symlink
            {
                inode.size()
            } else {
                0
            },
            blocks,
            atime: time(inode.atime()),
            mtime: time(inode.mtime()),
            ctime: time(inode.ctime()),
            crtime: time(inode.crtime()),
            kind,
            perm: mode & 0o7777,
            nlink: inode.links() as u32,
            uid: inode.uid(),
            gid: inode.gid(),
            rdev,
            blksize: self.block_size as u32,
            flags: 0,
        };
        Ok(Node {
            ino,
            attr,
            flags: inode.flags(),
            dir: OnceLock::new(),
            data: OnceLock::new(),
            link: OnceLock::new(),
            xattrs: OnceLock::new(),
        })
    }

    fn dir(&self, n: &Node) -> obdfs::Result<Arc<Dir>> {
        if let Some(d) = n.dir.get() {
            return Ok(d.clone());
        }
        let mut fs = self.fs.lock();
        let names = fs.dir_entries(n.ino)?;
        let parent = fs.lookup(n.ino, b"..")?.unwrap_or(EXT4_ROOT);
        drop(fs);
        let mut entries = Vec::with_capacity(names.len());
        let mut by_name = HashMap::with_capacity(names.len());
        for (name, ino, ftype) in names {
            if ino == 0 {
                continue;
            }
            by_name.insert(name.clone(), ino);
            entries.push((name, ino, dirent_kind(ftype)));
        }
        let d = Arc::new(Dir {
            entries,
            by_name,
            parent,
        });
        Ok(n.dir.get_or_init(|| d).clone())
    }

    fn data(&self, n: &Node) -> obdfs::Result<Arc<Data>> {
        if let Some(d) = n.data.get() {
            return Ok(d.clone());
        }
        let mut fs = self.fs.lock();
        let mut inode = fs.read_inode(n.ino)?;
        let d = if n.flags & inode::INLINE_DATA_FL != 0 {
            let mut v = fs.inline_data(n.ino, &mut inode)?;
            v.truncate(n.attr.size as usize);
            Data::Inline(v)
        } else {
            Data::Runs(fs.block_map(n.ino, &mut inode)?)
        };
        drop(fs);
        Ok(n.data.get_or_init(|| Arc::new(d)).clone())
    }

    fn link(&self, n: &Node) -> obdfs::Result<Arc<Vec<u8>>> {
        if let Some(l) = n.link.get() {
            return Ok(l.clone());
        }
        let mut fs = self.fs.lock();
        let mut inode = fs.read_inode(n.ino)?;
        let t = fs.link_target(n.ino, &mut inode)?;
        drop(fs);
        Ok(n.link.get_or_init(|| Arc::new(t)).clone())
    }

    fn xattrs(&self, n: &Node) -> obdfs::Result<Xattrs> {
        if let Some(x) = n.xattrs.get() {
            return Ok(x.clone());
        }
        let x = self.fs.lock().xattrs(n.ino)?;
        Ok(n.xattrs.get_or_init(|| Arc::new(x)).clone())
    }

    /// Read file bytes `[offset, offset+len)` (clamped to the file size).
    pub fn read_file(&self, n: &Node, offset: u64, len: u64) -> Result<Vec<u8>> {
        let size = n.attr.size;
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len));
        let mut buf = vec![0u8; (end - offset) as usize];
        let data = self.data(n).map_err(|source| Error::Ext4 {
            what: format!("inode {}: cannot map its blocks", n.ino),
            source,
        })?;
        let runs = match data.as_ref() {
            Data::Inline(v) => {
                let a = (offset as usize).min(v.len());
                let b = (end as usize).min(v.len());
                buf[..b - a].copy_from_slice(&v[a..b]);
                return Ok(buf);
            }
            Data::Runs(r) => r,
        };
        let bs = self.block_size;
        let mut pos = offset;
        // First run that ends after `pos`.
        let mut i = runs.partition_point(|r| (r.lblk + r.len) * bs <= pos);
        while pos < end && i < runs.len() {
            let r = runs[i];
            let start = r.lblk * bs;
            if start >= end {
                break;
            }
            let a = pos.max(start);
            let b = end.min((r.lblk + r.len) * bs);
            if !r.uninit {
                let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
                self.dev
                    .read_at(dst, r.pblk * bs + (a - start))
                    .map_err(|source| Error::Stack {
                        what: format!("inode {}: reading {} bytes at {a}", n.ino, b - a),
                        source,
                    })?;
            }
            pos = b;
            i += 1;
        }
        Ok(buf)
    }

    fn lookup_name(&self, parent: INodeNo, name: &[u8]) -> std::result::Result<Arc<Node>, Errno> {
        let p = self.fuse_node(parent)?;
        if p.attr.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let d = self.dir(&p).map_err(|e| ext_errno(&e))?;
        let ino = match name {
            b"." => p.ino,
            b".." => d.parent,
            _ => *d.by_name.get(name).ok_or(Errno::ENOENT)?,
        };
        self.node(ino).map_err(|e| ext_errno(&e))
    }

    fn fuse_node(&self, ino: INodeNo) -> std::result::Result<Arc<Node>, Errno> {
        let i = from_fuse(ino).ok_or(Errno::ENOENT)?;
        self.node(i).map_err(|e| ext_errno(&e))
    }
}

fn ext_errno(e: &obdfs::Error) -> Errno {
    tracing::warn!("{e}");
    match e {
        obdfs::Error::Device(d) => Errno::from_i32(errno_of(d)),
        obdfs::Error::Invalid(_) => Errno::ENOENT,
        _ => Errno::EIO,
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

impl Filesystem for Ext4Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent, name.as_bytes()) {
            Ok(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fuse_node(ino) {
            Ok(n) => reply.attr(&TTL, &n.attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if n.attr.kind != FileType::Symlink {
            return reply.error(Errno::EINVAL);
        }
        match self.link(&n) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(ext_errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.fuse_node(ino) {
            Ok(n) if n.attr.kind == FileType::Directory => reply.error(Errno::EISDIR),
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
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if n.attr.kind != FileType::RegularFile {
            return reply.error(Errno::EINVAL);
        }
        match self.read_file(&n, offset, size as u64) {
            Ok(b) => reply.data(&b),
            Err(e) => {
                tracing::warn!("{e}");
                reply.error(match &e {
                    Error::Stack { source, .. } => Errno::from_i32(errno_of(source)),
                    _ => Errno::EIO,
                })
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fuse_node(ino) {
            Ok(n) if n.attr.kind == FileType::Directory => {
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
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let d = match self.dir(&n) {
            Ok(d) => d,
            Err(e) => return reply.error(ext_errno(&e)),
        };
        let total = d.entries.len() as u64 + 2;
        for i in offset..total {
            let (name, ino, kind): (&[u8], u32, FileType) = match i {
                0 => (b".", n.ino, FileType::Directory),
                1 => (b"..", d.parent, FileType::Directory),
                _ => {
                    let (name, ino, ftype) = &d.entries[(i - 2) as usize];
                    let kind = match ftype {
                        Some(k) => *k,
                        None => match self.node(*ino) {
                            Ok(c) => c.attr.kind,
                            Err(e) => return reply.error(ext_errno(&e)),
                        },
                    };
                    (name, *ino, kind)
                }
            };
            if reply.add(to_fuse(ino), i + 1, kind, OsStr::from_bytes(name)) {
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
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let d = match self.dir(&n) {
            Ok(d) => d,
            Err(e) => return reply.error(ext_errno(&e)),
        };
        let total = d.entries.len() as u64 + 2;
        for i in offset..total {
            let (name, ino): (&[u8], u32) = match i {
                0 => (b".", n.ino),
                1 => (b"..", d.parent),
                _ => {
                    let (name, ino, _) = &d.entries[(i - 2) as usize];
                    (name, *ino)
                }
            };
            let c = match self.node(ino) {
                Ok(c) => c,
                Err(e) => return reply.error(ext_errno(&e)),
            };
            if reply.add(
                to_fuse(ino),
                i + 1,
                OsStr::from_bytes(name),
                &TTL,
                &c.attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c = self.counts;
        reply.statfs(
            c.blocks,
            c.free_blocks,
            c.free_blocks.saturating_sub(c.reserved_blocks),
            c.inodes,
            c.free_inodes,
            c.block_size as u32,
            255,
            c.block_size as u32,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.xattrs(&n) {
            Ok(x) => match x.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
                Some((_, v)) => reply_xattr(reply, v, size),
                None => reply.error(Errno::ENODATA),
            },
            Err(e) => reply.error(ext_errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let n = match self.fuse_node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.xattrs(&n) {
            Ok(x) => {
                let mut list = Vec::new();
                for (k, _) in x.iter() {
                    list.extend_from_slice(k);
                    list.push(0);
                }
                reply_xattr(reply, &list, size)
            }
            Err(e) => reply.error(ext_errno(&e)),
        }
    }
}
