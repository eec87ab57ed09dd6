//! Filesystem mode for ext4: the [`FileTree`] of the ext4 filesystem inside
//! the stack, read-only.
//!
//! Metadata (inodes, directories, extent trees, symlinks, xattrs) is read
//! through libext2fs ([`obdfs::ext2fs::Ext2Fs`], opened read-only over the
//! stack), which is single-threaded and therefore sits behind one mutex.
//! What it returns is cached per inode and piece ([`Node`], directory,
//! block map, symlink, xattrs) in a bounded [`Cache`]: the filesystem never
//! changes while mounted, so anything evicted (over budget, or forgotten by
//! the kernel) is simply read again. File data never goes through
//! libext2fs: a file's block map is resolved under the mutex, and reads
//! then go straight to the block device, so any number of data reads run in
//! parallel.
//!
//! Inode numbers, modes, owners, times (nanoseconds), device numbers, block
//! counts and xattrs are reported as stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use blockdev::nbd::proto::STATE_HOLE;
use blockdev::nbd::Allocation;
use blockdev::BlockDevice;
use fuser::{Errno, FileAttr, FileType, INodeNo};
use obdfs::ext2fs::inode::{self, Inode, Timestamp};
use obdfs::ext2fs::read::{Counts, Run};
use obdfs::ext2fs::Ext2Fs;
use parking_lot::Mutex;

use crate::cache::{
    xattrs_weight, Cache, CacheStats, Part, DAMAGED_WEIGHT, DIRENT_WEIGHT, NODE_WEIGHT,
};
use crate::error::{Error, Result};
use crate::tree::{DirEntry, DirList, Fault, FileTree, TreeResult, TreeStats, Xattrs};

/// ext4's root directory inode.
const EXT4_ROOT: u32 = 2;
/// libext2fs's metadata cache.
const META_CACHE: usize = 64 << 20;
/// Our own metadata cache, by default.
pub const DEFAULT_CACHE: usize = crate::cache::DEFAULT_BUDGET;

fn time(t: Timestamp) -> SystemTime {
    crate::tree::system_time(t.sec, t.nsec)
}

/// Linux's `new_encode_dev`, which the kernel decodes from FUSE attributes.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// A directory's names, listed and indexed.
pub struct Dir {
    list: Arc<DirList>,
    by_name: HashMap<Vec<u8>, u32>,
}

/// A regular file's data.
pub enum Data {
    /// Physical runs of the file's blocks.
    Runs(Vec<Run>),
    /// Inline data (stored in the inode).
    Inline(Vec<u8>),
}

/// What is known about one inode without reading more than the inode.
pub struct Node {
    ino: u32,
    attr: FileAttr,
    /// `i_flags` (the inode itself is read again when its data is mapped,
    /// so a cached node stays small).
    flags: u32,
}

/// One cached piece of an inode.
#[derive(Clone)]
enum Cached {
    Node(Arc<Node>),
    /// The inode is damaged (it stays so: the image never changes): the
    /// errno every access gets (kept under [`Part::Damaged`]).
    Damaged(Errno),
    Dir(Arc<Dir>),
    Data(Arc<Data>),
    Link(Arc<Vec<u8>>),
    Xattrs(Xattrs),
}

/// The ext4 filesystem on a device, as a [`FileTree`].
pub struct Ext4Tree {
    fs: Mutex<Ext2Fs>,
    dev: Arc<dyn BlockDevice>,
    block_size: u64,
    counts: Counts,
    huge_file: bool,
    cache: Cache<(u64, Part), Cached>,
    /// Blocks statfs reports (the kernel's count: without the overhead).
    statfs_blocks: u64,
    /// The device's allocation map, for holes of the layer stack inside
    /// a file's extents ([`Ext4Tree::with_allocation`]).
    alloc: Option<Arc<dyn Allocation>>,
}

/// Whether block group `g` holds a superblock backup (and group descriptors).
fn has_super(g: u64, sparse: bool, sparse2: Option<[u64; 2]>) -> bool {
    if g == 0 {
        return true;
    }
    if let Some(b) = sparse2 {
        return g == b[0] || g == b[1];
    }
    if g == 1 || !sparse {
        return true;
    }
    if g.is_multiple_of(2) {
        return false;
    }
    [3u64, 5, 7].iter().any(|&p| {
        let mut x = g;
        while x.is_multiple_of(p) {
            x /= p;
        }
        x == 1
    })
}

/// The blocks the kernel's ext4 counts as overhead (`ext4_calculate_overhead`:
/// the first data block, per group its superblock backup, group descriptor
/// and reserved GDT blocks, two bitmaps and inode table, and the journal),
/// so statfs reports
/// the size `df` shows for a kernel mount. `sb` is the 1024-byte
/// superblock; `None` when the layout is one we do not count (bigalloc).
fn kernel_overhead(sb: &[u8], journal_blocks: u64) -> Option<u64> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    let (compat, incompat, ro_compat) = (u32_at(92), u32_at(96), u32_at(100));
    if ro_compat & 0x200 != 0 {
        return None; // bigalloc
    }
    let stored = u32_at(584);
    let bs = 1024u64.checked_shl(u32_at(24) as u32)?;
    let is64 = incompat & 0x80 != 0;
    let blocks = u32_at(4) | if is64 { u32_at(336) << 32 } else { 0 };
    if stored != 0 && stored <= blocks {
        return Some(stored);
    }
    let first = u32_at(20);
    let per_group = u32_at(32);
    let ipg = u32_at(40);
    let isize = if u32_at(76) >= 1 { u16_at(88) } else { 128 };
    let desc = if is64 { u16_at(254).max(32) } else { 32 };
    if per_group == 0 || isize == 0 || desc > bs || blocks <= first {
        return None;
    }
    let groups = (blocks - first).div_ceil(per_group);
    let per_block = bs / desc;
    let gdb_count = groups.div_ceil(per_block);
    let itb = (ipg * isize).div_ceil(bs);
    let sparse = ro_compat & 0x1 != 0;
    let sparse2 = (compat & 0x200 != 0).then(|| [u32_at(588), u32_at(592)]);
    let meta_bg = incompat & 0x10 != 0;
    let first_meta_bg = u32_at(260);
    let reserved_gdt = u16_at(206);
    let mut total = first;
    for g in 0..groups {
        let sup = has_super(g, sparse, sparse2);
        let metagroup = g / per_block;
        let gdb = if !meta_bg || metagroup < first_meta_bg {
            match (sup, meta_bg) {
                (false, _) => 0,
                (true, true) => first_meta_bg + reserved_gdt,
                (true, false) => gdb_count + reserved_gdt,
            }
        } else {
            let r = g % per_block;
            (r == 0 || r == 1 || r == per_block - 1) as u64
        };
        total += sup as u64 + gdb + itb + 2;
    }
    Some(total + journal_blocks)
}

/// What a libext2fs or device failure means: damage is `EIO` (as with
/// fuse2fs; the kernel's ext4 says `EUCLEAN`), never `ENOENT`, which would
/// tell the client the name does not exist.
fn fault(e: &obdfs::Error) -> Fault {
    match e {
        obdfs::Error::Device(d)
        | obdfs::Error::Blob(d)
        | obdfs::Error::Ext2fs {
            device: Some(d), ..
        } => Fault::of_device(d),
        _ => Fault::Damaged(Errno::EIO),
    }
}

/// The errno for a libext2fs or device failure (logged).
fn ext_errno(e: &obdfs::Error) -> Errno {
    tracing::warn!("{}", obdimage::error::Chain(e));
    fault(e).errno()
}

/// The errno for a failure to read or map a file's data (logged).
fn data_errno(e: &Error) -> Errno {
    tracing::warn!("{}", obdimage::error::Chain(e));
    match e {
        Error::Stack { source, .. } => Fault::of_device(source).errno(),
        Error::Ext4 { source, .. } => fault(source).errno(),
        _ => Errno::EIO,
    }
}

impl Ext4Tree {
    /// Open the ext4 filesystem on `dev` (read-only), caching at most
    /// [`DEFAULT_CACHE`] bytes of metadata.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        Self::open_with_cache(dev, DEFAULT_CACHE)
    }

    /// Open the ext4 filesystem on `dev` (read-only), caching at most
    /// `cache_bytes` of metadata (inodes, directories, block maps).
    pub fn open_with_cache(dev: Arc<dyn BlockDevice>, cache_bytes: usize) -> Result<Self> {
        let mut fs =
            Ext2Fs::open_read_only(dev.clone(), META_CACHE).map_err(|source| Error::Ext4 {
                what: "no readable ext4 filesystem on the disk".into(),
                source: Box::new(source),
            })?;
        let counts = fs.counts();
        let huge_file = fs.has_ro_compat(obdfs::ext2fs::sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE);
        let mut sb = [0u8; 1024];
        dev.read_at(&mut sb, 1024).map_err(|source| Error::Stack {
            what: "cannot read the ext4 superblock".into(),
            source,
        })?;
        let journal = u32::from_le_bytes(sb[224..228].try_into().expect("4 bytes"));
        let journal_blocks = if sb[92] & 0x4 != 0 && journal != 0 {
            fs.read_inode(journal)
                .map(|i| i.size() / counts.block_size)
                .unwrap_or(0)
        } else {
            0
        };
        let statfs_blocks = kernel_overhead(&sb, journal_blocks)
            .and_then(|o| counts.blocks.checked_sub(o))
            .unwrap_or(counts.blocks);
        let me = Ext4Tree {
            block_size: counts.block_size,
            counts,
            huge_file,
            fs: Mutex::new(fs),
            dev,
            cache: Cache::new(cache_bytes),
            statfs_blocks,
            alloc: None,
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

    /// Let `SEEK_HOLE` also find the ranges of a file's extents that no
    /// layer of the stack maps (they read as zeros): `alloc` is the
    /// allocation map of the device the tree was opened on.
    pub fn with_allocation(mut self, alloc: Arc<dyn Allocation>) -> Self {
        self.alloc = Some(alloc);
        self
    }

    /// The whole blocks of device range `[phys, phys + len)` (block-aligned
    /// start) that the stack does not map, as ranges relative to `phys`,
    /// in order. Empty without an allocation map.
    fn stack_holes(&self, phys: u64, len: u64) -> blockdev::Result<Vec<(u64, u64)>> {
        let Some(alloc) = &self.alloc else {
            return Ok(Vec::new());
        };
        let bs = self.block_size;
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut p = 0;
        while p < len {
            let ext = alloc.extents(phys + p, len - p)?;
            let before = p;
            for (l, flags) in ext {
                if flags & STATE_HOLE != 0 {
                    match holes.last_mut() {
                        Some(h) if h.1 == p => h.1 = p + l,
                        _ => holes.push((p, p + l)),
                    }
                }
                p += l;
            }
            if p == before {
                break;
            }
        }
        // Only whole blocks are holes (the map is in 512-byte sectors).
        Ok(holes
            .into_iter()
            .map(|(a, b)| (a.div_ceil(bs) * bs, (b.min(len) / bs) * bs))
            .filter(|(a, b)| a < b)
            .collect())
    }

    /// `SEEK_DATA` / `SEEK_HOLE` in regular file `n` from `from` (below
    /// its size): holes are the blocks no extent maps, unwritten extents,
    /// and the blocks of extents that no layer of the stack maps.
    fn seek_file(&self, n: &Node, from: u64, want_hole: bool) -> Result<Option<u64>> {
        let size = n.attr.size;
        let data = self.data(n).map_err(|source| Error::Ext4 {
            what: format!("inode {}: cannot map its blocks", n.ino),
            source: Box::new(source),
        })?;
        let runs = match data.as_ref() {
            Data::Inline(_) => return Ok(Some(if want_hole { size } else { from })),
            Data::Runs(r) => r,
        };
        let bs = self.block_size;
        let mut pos = from;
        let mut i = runs.partition_point(|r| (r.lblk + r.len) * bs <= pos);
        while pos < size {
            let Some(r) = runs.get(i).filter(|r| r.lblk * bs <= pos) else {
                // In a hole before the next run (or the end).
                if want_hole {
                    return Ok(Some(pos));
                }
                match runs.get(i) {
                    Some(r) => pos = r.lblk * bs,
                    None => break,
                }
                continue;
            };
            let (start, end) = (r.lblk * bs, (r.lblk + r.len) * bs);
            i += 1;
            if r.uninit {
                if want_hole {
                    return Ok(Some(pos));
                }
                pos = pos.max(end);
                continue;
            }
            // The stack's holes from the block of `pos` to the run's end.
            let base = start + (pos - start) / bs * bs;
            let stop = end.min(size.div_ceil(bs) * bs);
            let holes = self
                .stack_holes(r.pblk * bs + (base - start), stop - base)
                .map_err(|source| Error::Stack {
                    what: format!("inode {}: the allocation map of its blocks", n.ino),
                    source,
                })?;
            let found = if want_hole {
                holes
                    .iter()
                    .find(|&&(_, b)| base + b > pos)
                    .map(|&(a, _)| pos.max(base + a))
            } else {
                match holes
                    .iter()
                    .find(|&&(a, b)| base + a <= pos && pos < base + b)
                {
                    None => Some(pos),
                    // Data follows the stack's hole, if within the run.
                    Some(&(_, b)) if base + b < stop => Some(base + b),
                    Some(_) => None,
                }
            };
            match found {
                Some(o) if o < size => return Ok(Some(o)),
                Some(_) => break,
                None => pos = pos.max(end),
            }
        }
        Ok(want_hole.then_some(size))
    }

    /// The node of ext4 inode `ino` (cached).
    pub fn node(&self, ino: u32) -> obdfs::Result<Arc<Node>> {
        let key = (ino as u64, Part::Node);
        if let Some(Cached::Node(n)) = self.cache.get(&key) {
            return Ok(n);
        }
        let inode = self.fs.lock().read_inode(ino)?;
        let n = Arc::new(self.make_node(ino, &inode)?);
        match self.cache.insert(key, Cached::Node(n.clone()), NODE_WEIGHT) {
            Cached::Node(c) => Ok(c),
            _ => Ok(n),
        }
    }

    /// The cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn make_node(&self, ino: u32, inode: &Inode) -> obdfs::Result<Node> {
        let mode = inode.mode();
        if inode.links() == 0 {
            return Err(obdfs::Error::Invalid(format!("inode {ino} is not in use")));
        }
        let kind = crate::tree::file_kind(u32::from(mode))
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
        // A damaged size: no ext4 file maps more than 2^32 blocks, and a served
        // size past that reads as zeros for ever. (The kernel's `ext4_iget`
        // refuses only sizes of 2^63 and more.)
        let max = self.block_size << 32;
        if sized && inode.size() > max {
            return Err(obdfs::Error::Invalid(format!(
                "inode {ino} has size {}, more than an ext4 file can hold ({max} bytes)",
                inode.size()
            )));
        }
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
        })
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
        let f = match u32::try_from(ino) {
            Ok(i) if i >= EXT4_ROOT => match self.node(i) {
                Ok(n) => return Ok(n),
                Err(e) => {
                    tracing::warn!("{}", obdimage::error::Chain(&e));
                    fault(&e)
                }
            },
            // Only a damaged directory entry names these.
            _ => {
                tracing::warn!("inode {ino} is reserved or out of range");
                Fault::Damaged(Errno::EIO)
            }
        };
        if let Fault::Damaged(e) = f {
            self.cache.insert(key, Cached::Damaged(e), DAMAGED_WEIGHT);
        }
        Err(f)
    }

    fn node_of(&self, ino: u64) -> TreeResult<Arc<Node>> {
        self.load(ino).map_err(Fault::errno)
    }

    fn dir_of(&self, n: &Node) -> obdfs::Result<Arc<Dir>> {
        let key = (n.ino as u64, Part::Dir);
        if let Some(Cached::Dir(d)) = self.cache.get(&key) {
            return Ok(d);
        }
        let mut fs = self.fs.lock();
        let names = fs.dir_entries(n.ino)?;
        let parent = fs.lookup(n.ino, b"..")?.unwrap_or(EXT4_ROOT);
        drop(fs);
        let mut entries = Vec::with_capacity(names.len());
        let mut by_name = HashMap::with_capacity(names.len());
        let mut weight = 128;
        for (name, ino, ftype) in names {
            if ino == 0 {
                continue;
            }
            weight += 2 * name.len() + DIRENT_WEIGHT;
            by_name.insert(name.clone(), ino);
            entries.push(DirEntry {
                name,
                ino: ino as u64,
                kind: crate::tree::dirent_kind(ftype),
            });
        }
        let d = Arc::new(Dir {
            list: Arc::new(DirList {
                entries,
                parent: parent as u64,
            }),
            by_name,
        });
        match self.cache.insert(key, Cached::Dir(d.clone()), weight) {
            Cached::Dir(c) => Ok(c),
            _ => Ok(d),
        }
    }

    fn data(&self, n: &Node) -> obdfs::Result<Arc<Data>> {
        let key = (n.ino as u64, Part::Data);
        if let Some(Cached::Data(d)) = self.cache.get(&key) {
            return Ok(d);
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
        let weight = 64
            + match &d {
                Data::Runs(r) => std::mem::size_of_val(r.as_slice()),
                Data::Inline(v) => v.len(),
            };
        let d = Arc::new(d);
        match self.cache.insert(key, Cached::Data(d.clone()), weight) {
            Cached::Data(c) => Ok(c),
            _ => Ok(d),
        }
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

    fn entry_attr(&self, ino: u64) -> TreeResult<Option<FileAttr>> {
        match self.load(ino) {
            Ok(n) => Ok(Some(n.attr)),
            Err(Fault::Damaged(_)) => Ok(None),
            Err(Fault::Io(e)) => Err(e),
        }
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
        self.read_file(&n, offset, len as u64)
            .map_err(|e| data_errno(&e))
    }

    fn seek(&self, ino: u64, offset: u64, want_hole: bool) -> TreeResult<u64> {
        let n = self.node_of(ino)?;
        if n.attr.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        if offset >= n.attr.size {
            return Err(Errno::ENXIO);
        }
        self.seek_file(&n, offset, want_hole)
            .map_err(|e| data_errno(&e))?
            .ok_or(Errno::ENXIO)
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
        let mut fs = self.fs.lock();
        let t = fs
            .read_inode(n.ino)
            .and_then(|mut i| fs.link_target(n.ino, &mut i))
            .map_err(|e| ext_errno(&e))?;
        drop(fs);
        let t = Arc::new(t);
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
        let x = self.fs.lock().xattrs(n.ino).map_err(|e| ext_errno(&e))?;
        let x: Xattrs = Arc::new(x);
        match self
            .cache
            .insert(key, Cached::Xattrs(x.clone()), xattrs_weight(&x))
        {
            Cached::Xattrs(c) => Ok(c),
            _ => Ok(x),
        }
    }

    fn forget(&self, ino: u64) {
        self.cache.remove_all(Part::ALL.map(|p| (ino, p)));
    }

    fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn stats(&self) -> TreeStats {
        let c = self.counts;
        TreeStats {
            blocks: self.statfs_blocks,
            free_blocks: c.free_blocks,
            avail_blocks: c.free_blocks.saturating_sub(c.reserved_blocks),
            files: c.inodes,
            free_files: c.free_inodes,
            block_size: c.block_size as u32,
        }
    }
}
