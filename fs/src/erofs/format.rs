//! EROFS on-disk structures: constants, the superblock, compact and extended
//! inodes, directory entries and extended-attribute records, with encoders
//! and decoders. All integers are little endian; see the module docs of
//! [`crate::erofs`] for the layout they make together.

/// The superblock magic.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Byte offset of the superblock in block 0.
pub const SUPER_OFFSET: u64 = 1024;
/// Size of the superblock structure.
pub const SUPER_SIZE: usize = 128;
/// End of the superblock (offset + size).
pub const SUPER_END: u64 = SUPER_OFFSET + SUPER_SIZE as u64;

/// Inode slot size: a nid is `(inode offset - meta_blkaddr * blksz) >> 5`.
pub const ISLOT_BITS: u32 = 5;
/// Size of a compact (v1) inode.
pub const COMPACT_INODE_SIZE: usize = 32;
/// Size of an extended (v2) inode.
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Size of a directory entry.
pub const DIRENT_SIZE: usize = 12;
/// Size of the inline-xattr body header.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of an xattr entry header (name and value follow).
pub const XATTR_ENTRY_SIZE: usize = 4;
/// Longest file name.
pub const NAME_LEN: usize = 255;
/// "No block" in block maps and chunk indexes.
pub const NULL_ADDR: u32 = u32::MAX;

/// `feature_compat`: superblock checksum.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// `feature_incompat`: chunk-based files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `feature_incompat`: extra devices (device table).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// `feature_incompat`: long xattr name prefixes.
pub const FEATURE_INCOMPAT_XATTR_PREFIXES: u32 = 0x40;

/// Chunk format: chunk size bits above the block size.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// Chunk format: 8-byte chunk indexes instead of a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

/// Directory entry file types.
pub mod ft {
    pub const UNKNOWN: u8 = 0;
    pub const REG_FILE: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHRDEV: u8 = 3;
    pub const BLKDEV: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const SYMLINK: u8 = 7;
    /// One past the last valid type.
    pub const MAX: u8 = 8;
}

/// File type bits of `i_mode` (as in `st_mode`).
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// The directory-entry file type for a mode.
pub fn ftype_of_mode(m: u32) -> u8 {
    match m & mode::S_IFMT {
        mode::S_IFREG => ft::REG_FILE,
        mode::S_IFDIR => ft::DIR,
        mode::S_IFCHR => ft::CHRDEV,
        mode::S_IFBLK => ft::BLKDEV,
        mode::S_IFIFO => ft::FIFO,
        mode::S_IFSOCK => ft::SOCK,
        mode::S_IFLNK => ft::SYMLINK,
        _ => ft::UNKNOWN,
    }
}

/// Inode data layouts (`i_format` bits 1..3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Data in contiguous blocks from `raw_blkaddr`.
    FlatPlain,
    /// Like plain, but the last partial block is stored right after the inode.
    FlatInline,
    /// Compressed (full indexes): not supported by this crate.
    CompressedFull,
    /// Compressed (compact indexes): not supported by this crate.
    CompressedCompact,
    /// Chunk-based: a block map or chunk indexes follow the inode.
    ChunkBased,
}

impl DataLayout {
    /// The on-disk value.
    pub fn raw(self) -> u16 {
        match self {
            DataLayout::FlatPlain => 0,
            DataLayout::CompressedFull => 1,
            DataLayout::FlatInline => 2,
            DataLayout::CompressedCompact => 3,
            DataLayout::ChunkBased => 4,
        }
    }

    /// Decode an on-disk value.
    pub fn from_raw(v: u16) -> Option<DataLayout> {
        Some(match v {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            _ => return None,
        })
    }
}

/// Linux "new" device number encoding used by EROFS (`new_encode_dev`).
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Decode [`encode_dev`]: `(major, minor)`.
pub fn decode_dev(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The superblock (128 bytes at byte 1024).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuperBlock {
    pub magic: u32,
    pub checksum: u32,
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    /// `available_compr_algs` or `lz4_max_distance`.
    pub u1: u16,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: u32,
    pub packed_nid: u64,
}

impl SuperBlock {
    /// Decode 128 bytes (no validation).
    pub fn decode(b: &[u8; SUPER_SIZE]) -> SuperBlock {
        SuperBlock {
            magic: le32(b, 0),
            checksum: le32(b, 4),
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            sb_extslots: b[13],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            build_time_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid: b[48..64].try_into().expect("16 bytes"),
            volume_name: b[64..80].try_into().expect("16 bytes"),
            feature_incompat: le32(b, 80),
            u1: le16(b, 84),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
            dirblkbits: b[90],
            xattr_prefix_count: b[91],
            xattr_prefix_start: le32(b, 92),
            packed_nid: le64(b, 96),
        }
    }

    /// Encode to 128 bytes (reserved bytes zero).
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.checksum.to_le_bytes());
        b[8..12].copy_from_slice(&self.feature_compat.to_le_bytes());
        b[12] = self.blkszbits;
        b[13] = self.sb_extslots;
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inos.to_le_bytes());
        b[24..32].copy_from_slice(&self.build_time.to_le_bytes());
        b[32..36].copy_from_slice(&self.build_time_nsec.to_le_bytes());
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        b[44..48].copy_from_slice(&self.xattr_blkaddr.to_le_bytes());
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        b[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        b[84..86].copy_from_slice(&self.u1.to_le_bytes());
        b[86..88].copy_from_slice(&self.extra_devices.to_le_bytes());
        b[88..90].copy_from_slice(&self.devt_slotoff.to_le_bytes());
        b[90] = self.dirblkbits;
        b[91] = self.xattr_prefix_count;
        b[92..96].copy_from_slice(&self.xattr_prefix_start.to_le_bytes());
        b[96..104].copy_from_slice(&self.packed_nid.to_le_bytes());
        b
    }
}

/// An on-disk inode, compact or extended, decoded into one shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInode {
    /// Extended (64-byte) form.
    pub extended: bool,
    /// Raw data layout value (`i_format >> 1 & 7`).
    pub layout: u16,
    pub xattr_icount: u16,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `raw_blkaddr`, `rdev`, `compressed_blocks` or chunk info.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Only stored in extended inodes; compact ones take the build time.
    /// A time before 1970 is the two's complement of its negative value
    /// (the kernel reads it as a signed time64_t).
    pub mtime: u64,
    pub mtime_nsec: u32,
}

impl DiskInode {
    /// On-disk size of this form.
    pub fn isize(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    /// The version bit and layout of the first two bytes.
    pub fn format_of(b0: u16) -> (bool, u16) {
        (b0 & 1 == 1, (b0 >> 1) & 7)
    }

    /// Decode; `b` holds at least 32 bytes, 64 for extended inodes
    /// (`format_of` tells which). Compact inodes get `build_time` as mtime.
    /// Returns `None` for unknown versions (i_format bits above 3 are
    /// reserved and ignored, as the kernel does).
    pub fn decode(b: &[u8], build_time: u64, build_time_nsec: u32) -> Option<DiskInode> {
        if b.len() < COMPACT_INODE_SIZE {
            return None;
        }
        let (extended, layout) = Self::format_of(le16(b, 0));
        if extended {
            if b.len() < EXTENDED_INODE_SIZE {
                return None;
            }
            Some(DiskInode {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                size: le64(b, 8),
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le32(b, 24),
                gid: le32(b, 28),
                mtime: le64(b, 32),
                mtime_nsec: le32(b, 40),
                nlink: le32(b, 44),
            })
        } else {
            Some(DiskInode {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                nlink: le16(b, 6) as u32,
                size: le32(b, 8) as u64,
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le16(b, 24) as u32,
                gid: le16(b, 26) as u32,
                mtime: build_time,
                mtime_nsec: build_time_nsec,
            })
        }
    }

    /// Encode (32 or 64 bytes). Fields that do not fit a compact inode are
    /// truncated; the caller chooses the form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.isize()];
        let format = (self.layout << 1) | self.extended as u16;
        b[0..2].copy_from_slice(&format.to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        if self.extended {
            b[8..16].copy_from_slice(&self.size.to_le_bytes());
            b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            b[20..24].copy_from_slice(&self.ino.to_le_bytes());
            b[24..28].copy_from_slice(&self.uid.to_le_bytes());
            b[28..32].copy_from_slice(&self.gid.to_le_bytes());
            b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
            b[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
            b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        } else {
            b[6..8].copy_from_slice(&(self.nlink as u16).to_le_bytes());
            b[8..12].copy_from_slice(&(self.size as u32).to_le_bytes());
            b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
            b[20..24].copy_from_slice(&self.ino.to_le_bytes());
            b[24..26].copy_from_slice(&(self.uid as u16).to_le_bytes());
            b[26..28].copy_from_slice(&(self.gid as u16).to_le_bytes());
        }
        b
    }
}

/// `i_xattr_icount` for an inline-xattr area of `size` bytes.
pub fn xattr_icount(size: u32) -> u16 {
    if size == 0 {
        0
    } else {
        ((size as usize - XATTR_IBODY_HEADER_SIZE) / XATTR_ENTRY_SIZE + 1) as u16
    }
}

/// Size of the inline-xattr area described by `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> u32 {
    if icount == 0 {
        0
    } else {
        (XATTR_IBODY_HEADER_SIZE + XATTR_ENTRY_SIZE * (icount as usize - 1)) as u32
    }
}

/// Round up to the 4-byte xattr alignment.
pub fn xattr_align(n: usize) -> usize {
    (n + 3) & !3
}

/// A directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub nid: u64,
    pub nameoff: u16,
    pub file_type: u8,
}

impl Dirent {
    pub fn decode(b: &[u8]) -> Dirent {
        Dirent {
            nid: le64(b, 0),
            nameoff: le16(b, 8),
            file_type: b[10],
        }
    }

    pub fn encode(&self) -> [u8; DIRENT_SIZE] {
        let mut b = [0u8; DIRENT_SIZE];
        b[0..8].copy_from_slice(&self.nid.to_le_bytes());
        b[8..10].copy_from_slice(&self.nameoff.to_le_bytes());
        b[10] = self.file_type;
        b
    }
}

/// Short xattr name prefixes by index (index 0 and 5 are unused).
pub const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
];

/// The prefix for a short name index.
pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    XATTR_PREFIXES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, p)| *p)
}

/// Split a full xattr name into (index, suffix), trying the prefixes in
/// index order as erofs-utils does; `None` if no prefix matches (such
/// names cannot be stored).
pub fn xattr_split(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES
        .iter()
        .find(|(_, p)| name.starts_with(p))
        .map(|(i, p)| (*i, &name[p.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_roundtrip() {
        for (ma, mi) in [(1, 3), (8, 0), (300, 70_000), (4095, 0xfffff)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
    }

    #[test]
    fn inode_roundtrip() {
        let i = DiskInode {
            extended: true,
            layout: 2,
            xattr_icount: 3,
            mode: 0o40755,
            nlink: 70000,
            size: 1 << 40,
            i_u: 9,
            ino: 7,
            uid: 100_000,
            gid: 5,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
        };
        assert_eq!(DiskInode::decode(&i.encode(), 0, 0).unwrap(), i);
        let c = DiskInode {
            extended: false,
            mtime: 11,
            mtime_nsec: 12,
            nlink: 2,
            size: 100,
            uid: 1,
            gid: 2,
            ..i
        };
        assert_eq!(DiskInode::decode(&c.encode(), 11, 12).unwrap(), c);
    }

    #[test]
    fn superblock_roundtrip() {
        let s = SuperBlock {
            magic: MAGIC,
            blkszbits: 12,
            root_nid: 36,
            inos: 712,
            blocks: 1653,
            uuid: [7; 16],
            packed_nid: 3,
            ..Default::default()
        };
        assert_eq!(SuperBlock::decode(&s.encode()), s);
    }

    #[test]
    fn xattr_sizes() {
        assert_eq!(xattr_icount(16384), 4094);
        assert_eq!(xattr_ibody_size(4094), 16384);
        assert_eq!(
            xattr_split(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(xattr_split(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(xattr_split(b"foo.bar"), None);
    }
}
