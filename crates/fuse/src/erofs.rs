//! Filesystem mode for EROFS: the [`FileTree`] of the EROFS image inside
//! the stack (TurboOCI `--fstype erofs` layers), read-only.
//!
//! Everything is read with [`obdfs::erofs::ErofsReader`] straight from the
//! block device; the reader caches nothing and takes no lock, so reads of
//! any kind run in parallel. Decoded inodes, directory listings, symlink
//! targets and xattrs are kept in a bounded [`Cache`] (the image never
//! changes while mounted). Directory entries are sorted by name on disk,
//! so a cached listing answers lookups by binary search.
//!
//! Attributes are reported as the kernel's EROFS driver reports them: the
//! nid is the inode number, access and change times equal the modification
//! time, `st_blocks` is the size rounded up to whole blocks, statfs has no
//! free blocks.

use std::sync::Arc;
use std::time::SystemTime;

use blockdev::BlockDevice;
use fuser::{Errno, FileAttr, FileType, INodeNo};
use obdfs::erofs::reader::Inode;
use obdfs::erofs::{ErofsReader, Error as ErofsError};

use crate::cache::{
    xattrs_weight, Cache, CacheStats, Part, DAMAGED_WEIGHT, DIRENT_WEIGHT, NODE_WEIGHT,
};
use crate::error::{Error, Result};
use crate::tree::{DirEntry, DirList, Fault, FileTree, TreeResult, TreeStats, Xattrs};

/// One cached piece of an inode.
#[derive(Clone)]
enum Cached {
    Node(Arc<Node>),
    /// The inode is damaged (it stays so: the image never changes): the
    /// errno every access gets (kept under [`Part::Damaged`]).
    Damaged(Errno),
    Dir(Arc<DirList>),
    Link(Arc<Vec<u8>>),
    Xattrs(Xattrs),
}

/// A decoded inode and its attributes.
pub struct Node {
    inode: Inode,
    attr: FileAttr,
}

/// The EROFS image on a device, as a [`FileTree`].
pub struct ErofsTree {
    r: ErofsReader,
    root: u64,
    cache: Cache<(u64, Part), Cached>,
}

/// An inode's mtime: seconds since 1970 in two's complement (a time before
/// 1970 is stored negative, and the kernel reads it as a signed time64_t),
/// and nanoseconds (past a second taken as 999,999,999).
fn time(sec: u64, nsec: u32) -> SystemTime {
    crate::tree::system_time(sec as i64, nsec.min(999_999_999))
}

/// What a reader failure means: the device's own errno for I/O failures
/// (EIO when a remote blob cannot be fetched); `EIO` for a damaged image
/// (the kernel's EROFS says `EUCLEAN`), as for ext4; else the format's.
fn fault(e: &ErofsError) -> Fault {
    match e {
        ErofsError::Device(d) => Fault::of_device(d),
        ErofsError::Corrupt { .. } => Fault::Damaged(Errno::EIO),
        _ => Fault::Damaged(Errno::from_i32(e.errno())),
    }
}

/// The errno for a reader failure (logged).
fn erofs_errno(e: &ErofsError) -> Errno {
    tracing::warn!("{}", obdimage::error::Chain(e));
    fault(e).errno()
}

impl ErofsTree {
    /// Open the EROFS image on `dev`, caching at most `cache_bytes` of
    /// metadata.
    pub fn open(dev: Arc<dyn BlockDevice>, cache_bytes: usize) -> Result<Self> {
        let r = ErofsReader::open(dev).map_err(|source| Error::Erofs {
            what: "no readable EROFS image on the disk".into(),
            source: Box::new(source),
        })?;
        let me = ErofsTree {
            root: r.root_nid(),
            r,
            cache: Cache::new(cache_bytes),
        };
        let root = me.node(me.root).map_err(|source| Error::Erofs {
            what: "cannot read the root directory".into(),
            source: Box::new(source),
        })?;
        if root.attr.kind != FileType::Directory {
            return Err(Error::Usage(
                "the EROFS root inode is not a directory".into(),
            ));
        }
        Ok(me)
    }

    /// The reader underneath.
    pub fn reader(&self) -> &ErofsReader {
        &self.r
    }

    /// The cached node of `nid`, reading it on first use.
    pub fn node(&self, nid: u64) -> obdfs::erofs::Result<Arc<Node>> {
        let key = (nid, Part::Node);
        if let Some(Cached::Node(n)) = self.cache.get(&key) {
            return Ok(n);
        }
        let inode = self.r.inode(nid)?;
        let kind = crate::tree::file_kind(inode.mode).ok_or_else(|| ErofsError::Corrupt {
            nid: Some(nid),
            msg: format!("file type {:o}", inode.mode),
        })?;
        let mtime = time(inode.mtime, inode.mtime_nsec);
        let bs = self.r.block_size();
        let attr = FileAttr {
            ino: INodeNo(nid),
            size: inode.size,
            blocks: inode.size.div_ceil(bs) * (bs / 512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (inode.mode & 0o7777) as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: inode.rdev,
            blksize: bs as u32,
            flags: 0,
        };
        let n = Arc::new(Node { inode, attr });
        match self.cache.insert(key, Cached::Node(n.clone()), NODE_WEIGHT) {
            Cached::Node(c) => Ok(c),
            _ => Ok(n),
        }
    }

    /// The node of `ino`, or why it cannot be served (logged; a damaged
    /// inode is remembered, so it is logged once while cached).
    fn load(&self, ino: u64) -> std::result::Result<Arc<Node>, Fault> {
        if let Some(Cached::Node(n)) = self.cache.get(&(ino, Part::Node)) {
            return Ok(n);
        }
        let key = (ino, Part::Damaged);
        if let Some(Cached::Damaged(e)) = self.cache.get(&key) {
            return Err(Fault::Damaged(e));
        }
        self.node(ino).map_err(|e| {
            tracing::warn!("{}", obdimage::error::Chain(&e));
            let f = fault(&e);
            if let Fault::Damaged(e) = f {
                self.cache.insert(key, Cached::Damaged(e), DAMAGED_WEIGHT);
            }
            f
        })
    }

    fn node_of(&self, ino: u64) -> TreeResult<Arc<Node>> {
        self.load(ino).map_err(Fault::errno)
    }

    fn dir_of(&self, n: &Node) -> TreeResult<Arc<DirList>> {
        if n.attr.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let key = (n.inode.nid, Part::Dir);
        if let Some(Cached::Dir(d)) = self.cache.get(&key) {
            return Ok(d);
        }
        let all = self
            .r
            .read_dir_inode(&n.inode)
            .map_err(|e| erofs_errno(&e))?;
        let mut parent = self.root;
        let mut entries = Vec::with_capacity(all.len().saturating_sub(2));
        let mut weight = 128;
        for e in all {
            match e.name.as_slice() {
                b"." => {}
                b".." => parent = e.nid,
                _ => {
                    weight += e.name.len() + DIRENT_WEIGHT;
                    entries.push(DirEntry {
                        kind: crate::tree::dirent_kind(e.file_type),
                        name: e.name,
                        ino: e.nid,
                    });
                }
            }
        }
        // Lookups rely on name order; a block out of order would make them
        // miss names that readdir shows.
        if entries.windows(2).any(|w| w[0].name >= w[1].name) {
            tracing::warn!("nid {}: directory entries are not sorted", n.inode.nid);
            return Err(Errno::EIO);
        }
        let d = Arc::new(DirList { entries, parent });
        match self.cache.insert(key, Cached::Dir(d.clone()), weight) {
            Cached::Dir(c) => Ok(c),
            _ => Ok(d),
        }
    }
}

impl FileTree for ErofsTree {
    fn root(&self) -> u64 {
        self.root
    }

    fn attr(&self, ino: u64) -> TreeResult<FileAttr> {
        Ok(self.node_of(ino)?.attr)
    }

    fn entry_attr(&self, ino: u64) -> TreeResult<Option<FileAttr>> {
        match self.load(ino) {
            Ok(n) => Ok(Some(n.attr)),
            Err(Fault::Damaged(_)) => Ok(None),
            Err(Fault::Io(e)) => Err(e),
        }
    }

    fn dir(&self, ino: u64) -> TreeResult<Arc<DirList>> {
        let n = self.node_of(ino)?;
        self.dir_of(&n)
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> TreeResult<u64> {
        let n = self.node_of(dir)?;
        let d = self.dir_of(&n)?;
        let ino = match name {
            b"." => dir,
            b".." => d.parent,
            _ => {
                let i = d
                    .entries
                    .binary_search_by(|e| e.name.as_slice().cmp(name))
                    .map_err(|_| Errno::ENOENT)?;
                d.entries[i].ino
            }
        };
        self.node_of(ino)?;
        Ok(ino)
    }

    fn read(&self, ino: u64, offset: u64, len: u32) -> TreeResult<Vec<u8>> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        if offset >= n.inode.size {
            return Ok(Vec::new());
        }
        let want = (len as u64).min(n.inode.size - offset) as usize;
        let mut buf = vec![0u8; want];
        let got = self
            .r
            .read_data(&n.inode, offset, &mut buf)
            .map_err(|e| erofs_errno(&e))?;
        buf.truncate(got);
        Ok(buf)
    }

    fn read_link(&self, ino: u64) -> TreeResult<Arc<Vec<u8>>> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::Symlink {
            return Err(Errno::EINVAL);
        }
        let key = (ino, Part::Link);
        if let Some(Cached::Link(l)) = self.cache.get(&key) {
            return Ok(l);
        }
        let t = Arc::new(self.r.readlink(ino).map_err(|e| erofs_errno(&e))?);
        match self
            .cache
            .insert(key, Cached::Link(t.clone()), 64 + t.len())
        {
            Cached::Link(c) => Ok(c),
            _ => Ok(t),
        }
    }

    fn xattrs(&self, ino: u64) -> TreeResult<Xattrs> {
        let n = self.node_of(ino)?;
        let key = (ino, Part::Xattrs);
        if let Some(Cached::Xattrs(x)) = self.cache.get(&key) {
            return Ok(x);
        }
        let x: Xattrs = Arc::new(self.r.xattrs_of(&n.inode).map_err(|e| erofs_errno(&e))?);
        match self
            .cache
            .insert(key, Cached::Xattrs(x.clone()), xattrs_weight(&x))
        {
            Cached::Xattrs(c) => Ok(c),
            _ => Ok(x),
        }
    }

    fn stats(&self) -> TreeStats {
        // As the kernel's erofs_statfs: no free blocks, "unlimited" inodes.
        let sb = self.r.superblock();
        TreeStats {
            blocks: sb.blocks as u64,
            free_blocks: 0,
            avail_blocks: 0,
            files: u64::MAX,
            free_files: u64::MAX - sb.inos,
            block_size: self.r.block_size() as u32,
        }
    }

    fn forget(&self, ino: u64) {
        self.cache.remove_all(Part::ALL.map(|p| (ino, p)));
    }

    fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }
}
