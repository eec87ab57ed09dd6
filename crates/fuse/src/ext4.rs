//! Filesystem mode for ext4: the [`FileTree`] of the ext4 filesystem inside
//! the stack, read-only.
//!
//! Metadata (inodes, directories, extent trees, symlinks, xattrs) is read
//! through libext2fs ([`obdfs::ext2fs::Ext2Fs`], opened read-only over the
//! stack), which is single-threaded and therefore sits behind one mutex.
//! What it returns is cached per inode ([`Node`]): the filesystem never
//! changes while mounted. File data never goes through libext2fs: a file's
//! block map is resolved once under the mutex, and reads then go straight to
//! the block device, so any number of data reads run in parallel.
//!
//! Inode numbers, modes, owners, times (nanoseconds), device numbers, block
//! counts and xattrs are reported as stored.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockdev::BlockDevice;
use fuser::{Errno, FileAttr, FileType, INodeNo};
use obdfs::ext2fs::inode::{self, Inode, Timestamp};
use obdfs::ext2fs::read::{Counts, Run};
use obdfs::ext2fs::Ext2Fs;
use parking_lot::{Mutex, RwLock};

use crate::error::{errno_of, Error, Result};
use crate::tree::{DirEntry, DirList, FileTree, TreeResult, TreeStats, Xattrs};

/// ext4's root directory inode.
const EXT4_ROOT: u32 = 2;
/// libext2fs's metadata cache.
const META_CACHE: usize = 64 << 20;

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

/// A directory's names, listed and indexed.
struct Dir {
    list: Arc<DirList>,
    by_name: HashMap<Vec<u8>, u32>,
}

/// A regular file's data.
enum Data {
    /// Physical runs of the file's blocks.
    Runs(Vec<Run>),
    /// Inline data (stored in the inode).
    Inline(Vec<u8>),
}

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

/// The ext4 filesystem on a device, as a [`FileTree`].
pub struct Ext4Tree {
    fs: Mutex<Ext2Fs>,
    dev: Arc<dyn BlockDevice>,
    block_size: u64,
    counts: Counts,
    huge_file: bool,
    nodes: RwLock<HashMap<u32, Arc<Node>>>,
}

/// The errno for a libext2fs or device failure (logged).
fn ext_errno(e: &obdfs::Error) -> Errno {
    tracing::warn!("{e}");
    match e {
        obdfs::Error::Device(d) => Errno::from_i32(errno_of(d)),
        obdfs::Error::Invalid(_) => Errno::ENOENT,
        _ => Errno::EIO,
    }
}

impl Ext4Tree {
    /// Open the ext4 filesystem on `dev` (read-only).
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let fs = Ext2Fs::open_read_only(dev.clone(), META_CACHE).map_err(|source| Error::Ext4 {
            what: "no readable ext4 filesystem on the disk".into(),
            source: Box::new(source),
        })?;
        let counts = fs.counts();
        let huge_file = fs.has_ro_compat(obdfs::ext2fs::sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE);
        let me = Ext4Tree {
            block_size: counts.block_size,
            counts,
            huge_file,
            fs: Mutex::new(fs),
            dev,
            nodes: RwLock::new(HashMap::new()),
        };
        let root = me.node(EXT4_ROOT).map_err(|source| Error::Ext4 {
            what: "cannot read the root directory".into(),
            source: Box::new(source),
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
        let n = Arc::new(self.make_node(ino, &inode)?);
        Ok(self.nodes.write().entry(ino).or_insert(n).clone())
    }

    fn make_node(&self, ino: u32, inode: &Inode) -> obdfs::Result<Node> {
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
        let sized = matches!(
            kind,
            FileType::Directory | FileType::RegularFile | FileType::Symlink
        );
        let attr = FileAttr {
            ino: INodeNo(ino as u64),
            size: if sized { inode.size() } else { 0 },
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

    fn node_of(&self, ino: u64) -> TreeResult<Arc<Node>> {
        let i = u32::try_from(ino).map_err(|_| Errno::ENOENT)?;
        if i < EXT4_ROOT {
            return Err(Errno::ENOENT);
        }
        self.node(i).map_err(|e| ext_errno(&e))
    }

    fn dir_of(&self, n: &Node) -> obdfs::Result<Arc<Dir>> {
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
            entries.push(DirEntry {
                name,
                ino: ino as u64,
                kind: dirent_kind(ftype),
            });
        }
        let d = Arc::new(Dir {
            list: Arc::new(DirList {
                entries,
                parent: parent as u64,
            }),
            by_name,
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
            source: Box::new(source),
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
        // First run that ends after `pos`; holes stay zero.
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
}

impl FileTree for Ext4Tree {
    fn root(&self) -> u64 {
        EXT4_ROOT as u64
    }

    fn attr(&self, ino: u64) -> TreeResult<FileAttr> {
        Ok(self.node_of(ino)?.attr)
    }

    fn dir(&self, ino: u64) -> TreeResult<Arc<DirList>> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(self.dir_of(&n).map_err(|e| ext_errno(&e))?.list.clone())
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> TreeResult<u64> {
        let n = self.node_of(dir)?;
        if n.attr.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let d = self.dir_of(&n).map_err(|e| ext_errno(&e))?;
        let ino = match name {
            b"." => n.ino as u64,
            b".." => d.list.parent,
            _ => *d.by_name.get(name).ok_or(Errno::ENOENT)? as u64,
        };
        // Make sure the target is readable before handing it out.
        self.node_of(ino)?;
        Ok(ino)
    }

    fn read(&self, ino: u64, offset: u64, len: u32) -> TreeResult<Vec<u8>> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        self.read_file(&n, offset, len as u64).map_err(|e| {
            tracing::warn!("{e}");
            match &e {
                Error::Stack { source, .. } => Errno::from_i32(errno_of(source)),
                _ => Errno::EIO,
            }
        })
    }

    fn read_link(&self, ino: u64) -> TreeResult<Arc<Vec<u8>>> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::Symlink {
            return Err(Errno::EINVAL);
        }
        if let Some(l) = n.link.get() {
            return Ok(l.clone());
        }
        let mut fs = self.fs.lock();
        let t = fs
            .read_inode(n.ino)
            .and_then(|mut i| fs.link_target(n.ino, &mut i))
            .map_err(|e| ext_errno(&e))?;
        drop(fs);
        Ok(n.link.get_or_init(|| Arc::new(t)).clone())
    }

    fn xattrs(&self, ino: u64) -> TreeResult<Xattrs> {
        let n = self.node_of(ino)?;
        if let Some(x) = n.xattrs.get() {
            return Ok(x.clone());
        }
        let x = self.fs.lock().xattrs(n.ino).map_err(|e| ext_errno(&e))?;
        Ok(n.xattrs.get_or_init(|| Arc::new(x)).clone())
    }

    fn stats(&self) -> TreeStats {
        let c = self.counts;
        TreeStats {
            blocks: c.blocks,
            free_blocks: c.free_blocks,
            avail_blocks: c.free_blocks.saturating_sub(c.reserved_blocks),
            files: c.inodes,
            free_files: c.free_inodes,
            block_size: c.block_size as u32,
        }
    }
}
