//! Reading an EROFS image through a [`BlockDevice`]: superblock, inodes,
//! directories, file data (flat, inline-tail and chunk-based layouts),
//! symlinks and extended attributes. Everything read from the image is
//! checked before it is used; a corrupt image gives [`Error::Corrupt`],
//! never a panic or an allocation sized by the image.
//!
//! Inodes are addressed by nid (see the module docs of [`crate::erofs`]).
//! Nothing is cached: every call reads the device, so the reader always
//! sees the current bytes (the incremental writer relies on that).

use std::sync::Arc;

use blockdev::BlockDevice;

use super::error::{Error, Result};
use super::format::{self, ft, mode, DataLayout, Dirent, DiskInode, SuperBlock};

/// Largest symlink target we return (PATH_MAX).
pub const MAX_SYMLINK: u64 = 4096;
/// Largest directory [`ErofsReader::read_dir_inode`] reads whole.
pub const MAX_DIR_SIZE: u64 = 256 << 20;

/// Bounds of [`ErofsReader::verify`].
#[derive(Debug, Clone, Copy)]
pub struct VerifyLimits {
    /// Stop with an error after this many inodes.
    pub max_inodes: u64,
    /// Read at most this many bytes of file data in total (the rest of
    /// the files is mapped but not read).
    pub max_data_bytes: u64,
}

impl Default for VerifyLimits {
    fn default() -> Self {
        VerifyLimits {
            max_inodes: 10_000_000,
            max_data_bytes: u64::MAX,
        }
    }
}

/// What [`ErofsReader::verify`] went through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyStats {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub others: u64,
    /// Names (a hard-linked inode counts once per name).
    pub entries: u64,
    pub xattrs: u64,
    pub data_bytes: u64,
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The inode's nid (its address).
    pub nid: u64,
    /// The `i_ino` field (a serial number for 32-bit stat).
    pub ino: u32,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since 1970 as stored: a time before 1970 is the two's
    /// complement of its negative value (`as i64` reads it, as the kernel does).
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Encoded device number for character and block devices, else 0.
    pub rdev: u32,
    /// The data layout.
    pub layout: DataLayout,
    /// Extended (64-byte) on-disk form.
    pub extended: bool,
    /// Size of the inline xattr area.
    pub xattr_isize: u32,
    /// `raw_blkaddr` (flat layouts) or the chunk format (chunk-based).
    pub i_u: u32,
}

impl Inode {
    /// The type bits of the mode.
    pub fn file_type(&self) -> u32 {
        self.mode & mode::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == mode::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == mode::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == mode::S_IFLNK
    }
    /// The directory-entry type of this inode.
    pub fn dirent_type(&self) -> u8 {
        format::ftype_of_mode(self.mode)
    }
    /// `(major, minor)` of a device inode.
    pub fn device(&self) -> (u32, u32) {
        format::decode_dev(self.rdev)
    }
    fn isize(&self) -> u64 {
        if self.extended {
            format::EXTENDED_INODE_SIZE as u64
        } else {
            format::COMPACT_INODE_SIZE as u64
        }
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    /// One of [`format::ft`].
    pub file_type: u8,
    /// Position of the next entry, for [`ErofsReader::readdir`] (FUSE
    /// readdir offsets).
    pub next_pos: u64,
}

/// Where a range of file data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at device byte `offset`.
    Mapped { offset: u64, len: u64 },
    /// `len` bytes of zeros (a chunk hole).
    Hole { len: u64 },
}

/// An EROFS image on a block device.
pub struct ErofsReader {
    dev: Arc<dyn BlockDevice>,
    sb: SuperBlock,
    blkszbits: u32,
    dev_size: u64,
    /// Long xattr name prefixes: (base index, infix).
    prefixes: Vec<(u8, Vec<u8>)>,
}

impl std::fmt::Debug for ErofsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErofsReader")
            .field("sb", &self.sb)
            .finish_non_exhaustive()
    }
}

impl ErofsReader {
    /// Open the image: read and check the superblock.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<ErofsReader> {
        let dev_size = dev.size();
        if dev_size < format::SUPER_END {
            return Err(Error::corrupt(
                None,
                format!("device of {dev_size} bytes is too small for a superblock"),
            ));
        }
        let mut b = [0u8; format::SUPER_SIZE];
        dev.read_at(&mut b, format::SUPER_OFFSET)?;
        let sb = SuperBlock::decode(&b);
        if sb.magic != format::MAGIC {
            return Err(Error::corrupt(
                None,
                format!("bad superblock magic {:#010x}", sb.magic),
            ));
        }
        if !(9..=16).contains(&sb.blkszbits) {
            return Err(Error::corrupt(
                None,
                format!("block size 2^{} is out of range", sb.blkszbits),
            ));
        }
        if sb.extra_devices != 0 && sb.feature_incompat & format::FEATURE_INCOMPAT_DEVICE_TABLE != 0
        {
            return Err(Error::Unsupported(format!(
                "{} extra devices",
                sb.extra_devices
            )));
        }
        let mut r = ErofsReader {
            dev,
            blkszbits: sb.blkszbits as u32,
            sb,
            dev_size,
            prefixes: Vec::new(),
        };
        if r.sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM != 0 {
            r.check_sb_checksum()?;
        }
        if r.sb.feature_incompat & format::FEATURE_INCOMPAT_XATTR_PREFIXES != 0
            && r.sb.xattr_prefix_count > 0
        {
            r.load_prefixes()?;
        }
        Ok(r)
    }

    /// The superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        1 << self.blkszbits
    }

    /// The nid of the root directory.
    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid as u64
    }

    /// The device the image is read from.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    fn check_sb_checksum(&self) -> Result<()> {
        let bs = self.block_size();
        let len = if bs > format::SUPER_OFFSET {
            bs - format::SUPER_OFFSET
        } else {
            bs
        };
        let mut b = vec![0u8; len as usize];
        self.read_dev(&mut b, format::SUPER_OFFSET, None)?;
        b[4..8].fill(0);
        let crc = erofs_crc32c(!0, &b);
        if crc != self.sb.checksum {
            return Err(Error::corrupt(
                None,
                format!(
                    "superblock checksum {:#010x} does not match the computed {crc:#010x}",
                    self.sb.checksum
                ),
            ));
        }
        Ok(())
    }

    fn load_prefixes(&mut self) -> Result<()> {
        if self.sb.packed_nid != 0 {
            return Err(Error::Unsupported(
                "long xattr name prefixes in the packed inode".into(),
            ));
        }
        let mut pos = (self.sb.xattr_prefix_start as u64) << 2;
        for _ in 0..self.sb.xattr_prefix_count {
            let mut h = [0u8; 2];
            self.read_dev(&mut h, pos, None)?;
            let len = u16::from_le_bytes(h) as u64;
            if len == 0 || len > 1 + format::NAME_LEN as u64 {
                return Err(Error::corrupt(
                    None,
                    format!("long xattr prefix of {len} bytes"),
                ));
            }
            let mut p = vec![0u8; len as usize];
            self.read_dev(&mut p, pos + 2, None)?;
            let base = p[0];
            if format::xattr_prefix(base).is_none() {
                return Err(Error::corrupt(
                    None,
                    format!("long xattr prefix with base index {base}"),
                ));
            }
            self.prefixes.push((base, p[1..].to_vec()));
            pos = (pos + 2 + len + 3) & !3;
        }
        Ok(())
    }

    /// Read device bytes, turning an out-of-range request into a corruption
    /// error that names `nid`.
    fn read_dev(&self, buf: &mut [u8], offset: u64, nid: Option<u64>) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.dev_size => {}
            _ => {
                return Err(Error::corrupt(
                    nid,
                    format!(
                        "reference to bytes {offset}+{} beyond the device end {}",
                        buf.len(),
                        self.dev_size
                    ),
                ))
            }
        }
        self.dev.read_at(buf, offset)?;
        Ok(())
    }

    /// Byte address of inode `nid`.
    pub fn iloc(&self, nid: u64) -> Result<u64> {
        nid.checked_mul(1 << format::ISLOT_BITS)
            .and_then(|o| o.checked_add((self.sb.meta_blkaddr as u64) << self.blkszbits))
            .ok_or_else(|| Error::corrupt(nid, "nid out of range"))
    }

    /// The attributes of inode `nid` (the same as [`ErofsReader::inode`]).
    pub fn getattr(&self, nid: u64) -> Result<Inode> {
        self.inode(nid)
    }

    /// Read inode `nid` (getattr).
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let loc = self.iloc(nid)?;
        let mut b = [0u8; format::EXTENDED_INODE_SIZE];
        self.read_dev(&mut b[..format::COMPACT_INODE_SIZE], loc, Some(nid))?;
        let (extended, _) = DiskInode::format_of(u16::from_le_bytes([b[0], b[1]]));
        if extended {
            self.read_dev(
                &mut b[format::COMPACT_INODE_SIZE..],
                loc + format::COMPACT_INODE_SIZE as u64,
                Some(nid),
            )?;
        }
        let d = DiskInode::decode(&b, self.sb.build_time, self.sb.build_time_nsec)
            .ok_or_else(|| Error::corrupt(nid, "short inode"))?;
        let layout = DataLayout::from_raw(d.layout)
            .ok_or_else(|| Error::corrupt(nid, format!("unknown data layout {}", d.layout)))?;
        let m = d.mode as u32;
        let rdev = match m & mode::S_IFMT {
            mode::S_IFREG | mode::S_IFDIR | mode::S_IFLNK => 0,
            mode::S_IFCHR | mode::S_IFBLK => d.i_u,
            mode::S_IFIFO | mode::S_IFSOCK => 0,
            _ => return Err(Error::corrupt(nid, format!("bogus mode {m:o}"))),
        };
        if layout == DataLayout::ChunkBased
            && (d.i_u as u16) & !(format::CHUNK_FORMAT_BLKBITS_MASK | format::CHUNK_FORMAT_INDEXES)
                != 0
        {
            return Err(Error::corrupt(
                nid,
                format!("unknown chunk format {:#x}", d.i_u as u16),
            ));
        }
        Ok(Inode {
            nid,
            ino: d.ino,
            mode: m,
            nlink: d.nlink,
            uid: d.uid,
            gid: d.gid,
            size: d.size,
            mtime: d.mtime,
            mtime_nsec: d.mtime_nsec,
            rdev,
            layout,
            extended: d.extended,
            xattr_isize: format::xattr_ibody_size(d.xattr_icount),
            i_u: d.i_u,
        })
    }

    /// Where the byte at `offset` of the inode's data lives, and how many
    /// bytes from there are contiguous (capped at the file size).
    fn map(&self, ino: &Inode, offset: u64) -> Result<Extent> {
        let bs = self.block_size();
        let nid = Some(ino.nid);
        debug_assert!(offset < ino.size);
        match ino.layout {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                let nblocks = ino.size.div_ceil(bs);
                let tail = ino.layout == DataLayout::FlatInline;
                let lastblk = nblocks - tail as u64;
                if offset < lastblk * bs {
                    let start = (ino.i_u as u64) * bs;
                    let end = start + lastblk * bs;
                    if end > self.dev_size {
                        return Err(Error::corrupt(
                            nid,
                            format!(
                                "data blocks {}..{} beyond the device end",
                                ino.i_u,
                                end / bs
                            ),
                        ));
                    }
                    let len = (lastblk * bs).min(ino.size) - offset;
                    Ok(Extent::Mapped {
                        offset: start + offset,
                        len,
                    })
                } else {
                    // Inline tail right after the inode and its xattrs.
                    let base = self.iloc(ino.nid)? + ino.isize() + ino.xattr_isize as u64;
                    let pa = base + (offset % bs);
                    let len = ino.size - offset;
                    if (pa % bs) + len > bs {
                        return Err(Error::corrupt(nid, "inline data crosses a block boundary"));
                    }
                    Ok(Extent::Mapped { offset: pa, len })
                }
            }
            DataLayout::ChunkBased => {
                let fmt = ino.i_u as u16;
                let chunkbits = self.blkszbits + (fmt & format::CHUNK_FORMAT_BLKBITS_MASK) as u32;
                if chunkbits > 48 {
                    return Err(Error::corrupt(nid, "chunk size out of range"));
                }
                let unit: u64 = if fmt & format::CHUNK_FORMAT_INDEXES != 0 {
                    8
                } else {
                    4
                };
                let chunknr = offset >> chunkbits;
                let base = self.iloc(ino.nid)? + ino.isize() + ino.xattr_isize as u64;
                let pos = base.div_ceil(unit) * unit + unit * chunknr;
                let mut e = [0u8; 8];
                self.read_dev(&mut e[..unit as usize], pos, nid)?;
                let blk = if unit == 8 {
                    u32::from_le_bytes(e[4..8].try_into().expect("4 bytes"))
                } else {
                    u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"))
                };
                let chunk_start = chunknr << chunkbits;
                let chunk_len = (1u64 << chunkbits).min(ino.size - chunk_start);
                let len = chunk_len - (offset - chunk_start);
                if blk == format::NULL_ADDR {
                    return Ok(Extent::Hole { len });
                }
                let pa = ((blk as u64) << self.blkszbits) + (offset - chunk_start);
                if pa + len > self.dev_size {
                    return Err(Error::corrupt(nid, "chunk beyond the device end"));
                }
                Ok(Extent::Mapped { offset: pa, len })
            }
            DataLayout::CompressedFull | DataLayout::CompressedCompact => Err(Error::Unsupported(
                format!("compressed file data (nid {})", ino.nid),
            )),
        }
    }

    /// The extents of the whole file data, in order (for inspection and
    /// tests: which device ranges a file occupies).
    pub fn extents(&self, ino: &Inode) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < ino.size {
            let e = self.map(ino, pos)?;
            let len = match e {
                Extent::Mapped { len, .. } | Extent::Hole { len } => len,
            };
            if len == 0 {
                return Err(Error::corrupt(ino.nid, "empty extent"));
            }
            match (out.last_mut(), e) {
                (Some(Extent::Mapped { offset: o, len: l }), Extent::Mapped { offset, len })
                    if *o + *l == offset =>
                {
                    *l += len
                }
                (Some(Extent::Hole { len: l }), Extent::Hole { len }) => *l += len,
                _ => out.push(e),
            }
            pos += len;
        }
        Ok(out)
    }

    /// Read file data at `offset` into `buf`; returns the bytes read (short
    /// only at the end of the file).
    pub fn read_data(&self, ino: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= ino.size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(ino.size - offset) as usize;
        let mut done = 0;
        while done < want {
            let pos = offset + done as u64;
            let e = self.map(ino, pos)?;
            match e {
                Extent::Mapped { offset: pa, len } => {
                    let n = (len as usize).min(want - done);
                    if n == 0 {
                        return Err(Error::corrupt(ino.nid, "empty extent"));
                    }
                    self.read_dev(&mut buf[done..done + n], pa, Some(ino.nid))?;
                    done += n;
                }
                Extent::Hole { len } => {
                    let n = (len as usize).min(want - done);
                    if n == 0 {
                        return Err(Error::corrupt(ino.nid, "empty extent"));
                    }
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Ok(done)
    }

    /// Read file data of inode `nid`.
    pub fn read(&self, nid: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino = self.inode(nid)?;
        if ino.is_dir() {
            return Err(Error::WrongType {
                nid,
                msg: "is a directory",
            });
        }
        self.read_data(&ino, offset, buf)
    }

    /// The whole contents of a file, refusing files larger than `limit`.
    pub fn read_all(&self, ino: &Inode, limit: u64) -> Result<Vec<u8>> {
        if ino.size > limit {
            return Err(Error::TooBig(format!(
                "nid {}: file of {} bytes exceeds the {limit}-byte limit",
                ino.nid, ino.size
            )));
        }
        let mut v = vec![0u8; ino.size as usize];
        let n = self.read_data(ino, 0, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// The target of symlink `nid`.
    pub fn readlink(&self, nid: u64) -> Result<Vec<u8>> {
        let ino = self.inode(nid)?;
        if !ino.is_symlink() {
            return Err(Error::WrongType {
                nid,
                msg: "not a symlink",
            });
        }
        if ino.size > MAX_SYMLINK {
            return Err(Error::corrupt(
                nid,
                format!("symlink target of {} bytes", ino.size),
            ));
        }
        self.read_all(&ino, MAX_SYMLINK)
    }

    fn dir_check(&self, ino: &Inode) -> Result<()> {
        if !ino.is_dir() {
            return Err(Error::WrongType {
                nid: ino.nid,
                msg: "not a directory",
            });
        }
        // A directory's size is bounded by the device it lives on; this
        // bounds the work a corrupt size can cause.
        if ino.size > self.dev_size {
            return Err(Error::corrupt(
                ino.nid,
                format!("directory size {} exceeds the device", ino.size),
            ));
        }
        Ok(())
    }

    /// Read and check directory block `lblk` of `dir`: its entries, with
    /// `next_pos` set for readdir.
    pub fn dir_block(&self, dir: &Inode, lblk: u64) -> Result<Vec<DirEntry>> {
        self.dir_check(dir)?;
        let bs = self.block_size();
        let pos = lblk
            .checked_mul(bs)
            .filter(|p| *p < dir.size)
            .ok_or_else(|| Error::corrupt(dir.nid, "directory block out of range"))?;
        let maxsize = (dir.size - pos).min(bs) as usize;
        let mut buf = vec![0u8; maxsize];
        let n = self.read_data(dir, pos, &mut buf)?;
        if n != maxsize {
            return Err(Error::corrupt(dir.nid, "short directory block"));
        }
        parse_dir_block(&buf, dir.nid, lblk, bs)
    }

    /// Number of directory blocks.
    pub fn dir_blocks(&self, dir: &Inode) -> u64 {
        dir.size.div_ceil(self.block_size())
    }

    /// All entries of directory `nid`, including `.` and `..`.
    pub fn read_dir(&self, nid: u64) -> Result<Vec<DirEntry>> {
        let dir = self.inode(nid)?;
        self.read_dir_inode(&dir)
    }

    /// All entries of a directory inode, including `.` and `..`
    /// (directories above [`MAX_DIR_SIZE`] are refused: use
    /// [`ErofsReader::readdir`] to go through them a block at a time).
    pub fn read_dir_inode(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        self.dir_check(dir)?;
        if dir.size > MAX_DIR_SIZE {
            return Err(Error::TooBig(format!(
                "nid {}: directory of {} bytes",
                dir.nid, dir.size
            )));
        }
        let mut out = Vec::new();
        for lblk in 0..self.dir_blocks(dir) {
            out.extend(self.dir_block(dir, lblk)?);
        }
        Ok(out)
    }

    /// Entries of directory `nid` from readdir position `pos` (0 = start;
    /// then a previous entry's `next_pos`), at most one block's worth.
    /// An empty result means the end.
    pub fn readdir(&self, nid: u64, pos: u64) -> Result<Vec<DirEntry>> {
        let dir = self.inode(nid)?;
        self.dir_check(&dir)?;
        let (lblk, idx) = (pos >> 16, (pos & 0xffff) as usize);
        if lblk >= self.dir_blocks(&dir) {
            return Ok(Vec::new());
        }
        let mut ents = self.dir_block(&dir, lblk)?;
        if idx >= ents.len() {
            // Positions only come from next_pos; a stale one means "next block".
            return self.readdir(nid, (lblk + 1) << 16);
        }
        Ok(ents.split_off(idx))
    }

    /// Look `name` up in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        let d = self.inode(dir)?;
        self.lookup_inode(&d, name)
    }

    /// Look `name` up in a directory inode. Entries are sorted by name
    /// within and across blocks: binary search over the blocks' first
    /// names, then a scan of one block.
    pub fn lookup_inode(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        self.dir_check(dir)?;
        let n = self.dir_blocks(dir);
        let (mut lo, mut hi) = (0u64, n);
        // Find the last block whose first name <= name.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let ents = self.dir_block(dir, mid)?;
            match ents.first() {
                Some(e) if e.name.as_slice() <= name => lo = mid,
                _ => hi = mid,
            }
        }
        if n == 0 {
            return Ok(None);
        }
        Ok(self
            .dir_block(dir, lo)?
            .into_iter()
            .find(|e| e.name == name))
    }

    /// Resolve a '/'-separated path from the root without following
    /// symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Result<Option<Inode>> {
        let mut cur = self.inode(self.root_nid())?;
        for comp in path.split(|&c| c == b'/').filter(|c| !c.is_empty()) {
            if !cur.is_dir() {
                return Ok(None);
            }
            match self.lookup_inode(&cur, comp)? {
                Some(e) => cur = self.inode(e.nid)?,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// All extended attributes of inode `nid`: (full name, value), shared
    /// ones first, in on-disk order.
    pub fn xattrs(&self, nid: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let ino = self.inode(nid)?;
        self.xattrs_of(&ino)
    }

    /// All extended attributes of an inode.
    pub fn xattrs_of(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let nid = Some(ino.nid);
        let isz = ino.xattr_isize as usize;
        if isz == 0 {
            return Ok(Vec::new());
        }
        if isz <= format::XATTR_IBODY_HEADER_SIZE {
            return Err(Error::corrupt(nid, format!("xattr ibody of {isz} bytes")));
        }
        let mut body = vec![0u8; isz];
        self.read_dev(&mut body, self.iloc(ino.nid)? + ino.isize(), nid)?;
        let shared = body[4] as usize;
        let mut p = format::XATTR_IBODY_HEADER_SIZE;
        if p + shared * 4 > isz {
            return Err(Error::corrupt(
                nid,
                format!("{shared} shared xattrs do not fit the xattr ibody"),
            ));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let id = u32::from_le_bytes(body[p + 4 * i..p + 4 * i + 4].try_into().expect("4"));
            let pos = ((self.sb.xattr_blkaddr as u64) << self.blkszbits) + 4 * id as u64;
            let mut h = [0u8; format::XATTR_ENTRY_SIZE];
            self.read_dev(&mut h, pos, nid)?;
            let (nlen, vlen) = (h[0] as usize, u16::from_le_bytes([h[2], h[3]]) as usize);
            let mut kv = vec![0u8; nlen + vlen];
            self.read_dev(&mut kv, pos + 4, nid)?;
            out.push(self.xattr_kv(ino.nid, h[1], &kv[..nlen], &kv[nlen..])?);
        }
        p += shared * 4;
        while p < isz {
            if p + format::XATTR_ENTRY_SIZE > isz {
                return Err(Error::corrupt(nid, "truncated inline xattr entry"));
            }
            let (nlen, idx) = (body[p] as usize, body[p + 1]);
            let vlen = u16::from_le_bytes([body[p + 2], body[p + 3]]) as usize;
            if nlen == 0 && idx == 0 && vlen == 0 {
                // Padding up to the reserved size (erofs-utils reserves room
                // in the root inode): the rest must be zero.
                if body[p..].iter().any(|&b| b != 0) {
                    return Err(Error::corrupt(nid, "garbage after the inline xattrs"));
                }
                break;
            }
            let end = p + format::XATTR_ENTRY_SIZE + nlen + vlen;
            if end > isz {
                return Err(Error::corrupt(nid, "inline xattr entry overruns the ibody"));
            }
            let n0 = p + format::XATTR_ENTRY_SIZE;
            out.push(self.xattr_kv(ino.nid, idx, &body[n0..n0 + nlen], &body[n0 + nlen..end])?);
            p = format::xattr_align(end);
        }
        Ok(out)
    }

    fn xattr_kv(&self, nid: u64, idx: u8, name: &[u8], value: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut full = if idx & 0x80 != 0 {
            let (base, infix) = self
                .prefixes
                .get((idx & 0x7f) as usize)
                .ok_or_else(|| Error::corrupt(nid, format!("long xattr prefix {}", idx & 0x7f)))?;
            let mut v = format::xattr_prefix(*base).unwrap_or_default().to_vec();
            v.extend_from_slice(infix);
            v
        } else {
            format::xattr_prefix(idx)
                .ok_or_else(|| Error::corrupt(nid, format!("xattr name index {idx}")))?
                .to_vec()
        };
        full.extend_from_slice(name);
        Ok((full, value.to_vec()))
    }

    /// Names of the extended attributes of inode `nid`.
    pub fn listxattr(&self, nid: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self.xattrs(nid)?.into_iter().map(|(k, _)| k).collect())
    }

    /// Value of extended attribute `name` of inode `nid` (the first one
    /// stored under that name).
    pub fn getxattr(&self, nid: u64, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .xattrs(nid)?
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v))
    }
}

impl ErofsReader {
    /// Walk the whole tree from the root and check it: every directory
    /// has `.` (itself) and `..` (its parent), strictly sorted unique
    /// names, entry types that match the inodes, no directory reached
    /// twice; every file's data, every symlink and every xattr is read.
    /// The checks of a filesystem checker, and what the fuzz target runs.
    pub fn verify(&self, limits: &VerifyLimits) -> Result<VerifyStats> {
        let mut st = VerifyStats::default();
        let root = self.inode(self.root_nid())?;
        if !root.is_dir() {
            return Err(Error::corrupt(root.nid, "the root is not a directory"));
        }
        let mut seen_dirs = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        seen_dirs.insert(root.nid);
        let mut stack = vec![(root, self.root_nid())];
        let mut buf = vec![0u8; 1 << 16];
        while let Some((dir, parent)) = stack.pop() {
            st.dirs += 1;
            self.verify_inode_common(&dir, &mut st)?;
            let mut prev: Option<Vec<u8>> = None;
            let (mut dot, mut dotdot) = (false, false);
            for lblk in 0..self.dir_blocks(&dir) {
                for e in self.dir_block(&dir, lblk)? {
                    if let Some(p) = &prev {
                        if p.as_slice() >= e.name.as_slice() {
                            return Err(Error::corrupt(
                                dir.nid,
                                format!(
                                    "entries not in order: '{}' after '{}'",
                                    String::from_utf8_lossy(&e.name),
                                    String::from_utf8_lossy(p)
                                ),
                            ));
                        }
                    }
                    prev = Some(e.name.clone());
                    if e.name == b"." {
                        dot = true;
                        if e.nid != dir.nid {
                            return Err(Error::corrupt(dir.nid, "'.' is not the directory"));
                        }
                        continue;
                    }
                    if e.name == b".." {
                        dotdot = true;
                        if e.nid != parent {
                            return Err(Error::corrupt(
                                dir.nid,
                                format!("'..' is nid {}, the parent is {parent}", e.nid),
                            ));
                        }
                        continue;
                    }
                    if e.name.contains(&b'/') {
                        return Err(Error::corrupt(dir.nid, "a name contains '/'"));
                    }
                    st.entries += 1;
                    if st.entries > limits.max_inodes {
                        return Err(Error::TooBig(format!(
                            "more than {} entries",
                            limits.max_inodes
                        )));
                    }
                    let ino = self.inode(e.nid)?;
                    if ino.dirent_type() != e.file_type {
                        return Err(Error::corrupt(
                            e.nid,
                            format!(
                                "entry '{}' says type {}, the inode is {:o}",
                                String::from_utf8_lossy(&e.name),
                                e.file_type,
                                ino.mode
                            ),
                        ));
                    }
                    if ino.is_dir() {
                        if !seen_dirs.insert(ino.nid) {
                            return Err(Error::corrupt(ino.nid, "directory reached twice"));
                        }
                        stack.push((ino, dir.nid));
                        continue;
                    }
                    if !seen.insert(ino.nid) {
                        continue; // another name of a hard-linked inode
                    }
                    self.verify_inode_common(&ino, &mut st)?;
                    if ino.is_reg() {
                        st.files += 1;
                        let mut pos = 0;
                        while pos < ino.size && st.data_bytes < limits.max_data_bytes {
                            let n = self.read_data(&ino, pos, &mut buf)?;
                            if n == 0 {
                                return Err(Error::corrupt(ino.nid, "short file data"));
                            }
                            pos += n as u64;
                            st.data_bytes += n as u64;
                        }
                        if pos < ino.size {
                            self.extents(&ino)?;
                        }
                    } else if ino.is_symlink() {
                        st.symlinks += 1;
                        self.readlink(ino.nid)?;
                    } else {
                        st.others += 1;
                    }
                }
            }
            if !dot || !dotdot {
                return Err(Error::corrupt(dir.nid, "'.' or '..' is missing"));
            }
        }
        Ok(st)
    }

    fn verify_inode_common(&self, ino: &Inode, st: &mut VerifyStats) -> Result<()> {
        st.xattrs += self.xattrs_of(ino)?.len() as u64;
        Ok(())
    }
}

/// Parse one directory block (`buf` is `min(blksz, remaining size)` long),
/// with the checks of the kernel and erofs-utils.
fn parse_dir_block(buf: &[u8], nid: u64, lblk: u64, bs: u64) -> Result<Vec<DirEntry>> {
    let maxsize = buf.len();
    let corrupt = |m: String| Error::corrupt(nid, format!("directory block {lblk}: {m}"));
    if maxsize < format::DIRENT_SIZE {
        return Err(corrupt(format!("{maxsize} bytes is too small")));
    }
    let first = Dirent::decode(&buf[..format::DIRENT_SIZE]).nameoff as usize;
    if first < format::DIRENT_SIZE || first as u64 >= bs || first > maxsize {
        return Err(corrupt(format!("bad first nameoff {first}")));
    }
    let count = first / format::DIRENT_SIZE;
    let mut out = Vec::with_capacity(count);
    let mut next_nameoff = first;
    for i in 0..count {
        let de = Dirent::decode(&buf[i * format::DIRENT_SIZE..(i + 1) * format::DIRENT_SIZE]);
        let nameoff = de.nameoff as usize;
        if nameoff != next_nameoff {
            return Err(corrupt(format!("entry {i}: bogus nameoff {nameoff}")));
        }
        let namelen = if i + 1 < count {
            let next =
                Dirent::decode(&buf[(i + 1) * format::DIRENT_SIZE..(i + 2) * format::DIRENT_SIZE])
                    .nameoff as usize;
            next.checked_sub(nameoff)
                .ok_or_else(|| corrupt(format!("entry {i}: names out of order")))?
        } else {
            buf[nameoff..]
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(maxsize - nameoff)
        };
        if namelen == 0 || namelen > format::NAME_LEN || nameoff + namelen > maxsize {
            return Err(corrupt(format!("entry {i}: bogus name length {namelen}")));
        }
        if de.file_type >= ft::MAX {
            return Err(corrupt(format!("entry {i}: file type {}", de.file_type)));
        }
        let next_pos = if i + 1 < count {
            (lblk << 16) | (i as u64 + 1)
        } else {
            (lblk + 1) << 16
        };
        out.push(DirEntry {
            name: buf[nameoff..nameoff + namelen].to_vec(),
            nid: de.nid,
            file_type: de.file_type,
            next_pos,
        });
        next_nameoff = nameoff + namelen;
    }
    Ok(out)
}

/// EROFS' CRC-32C: the raw register after feeding `b`, starting from
/// `crc` (the superblock checksum starts from !0 and is not inverted).
pub fn erofs_crc32c(mut crc: u32, b: &[u8]) -> u32 {
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ if crc & 1 != 0 { 0x82F6_3B78 } else { 0 };
        }
    }
    crc
}
