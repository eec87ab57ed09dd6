//! The on-disk ext4 inode, as a little-endian byte buffer.
//!
//! Layout (offsets in bytes; the first 128 are the classic ext2 inode, the
//! rest exists when the filesystem's inode size is larger and
//! `i_extra_isize` covers it):
//!
//! | off | field | off | field |
//! |----:|-------|----:|-------|
//! | 0 | i_mode u16 | 100 | i_generation u32 |
//! | 2 | i_uid (low) u16 | 104 | i_file_acl (low) u32 |
//! | 4 | i_size (low) u32 | 108 | i_size_high u32 |
//! | 8/12/16 | i_atime / i_ctime / i_mtime u32 | 116 | i_blocks_high u16 |
//! | 20 | i_dtime u32 | 118 | i_file_acl_high u16 |
//! | 24 | i_gid (low) u16 | 120/122 | i_uid_high / i_gid_high u16 |
//! | 26 | i_links_count u16 | 128 | i_extra_isize u16 |
//! | 28 | i_blocks (low) u32 | 132/136/140 | i_ctime/mtime/atime_extra u32 |
//! | 32 | i_flags u32 | 144/148 | i_crtime, i_crtime_extra u32 |
//! | 40 | i_block\[15\] (60 bytes) | 160 | end of the 32 extra bytes |
//!
//! A `*_extra` time field holds `nsec << 2 | epoch`, where the two epoch bits
//! extend the signed 32-bit seconds to 34 bits. libext2fs keeps inodes in
//! memory in exactly this layout on little-endian hosts, so the buffer is
//! passed to `ext2fs_read_inode_full` / `ext2fs_write_inode_full` as is.

/// The largest inode size handled (the ext4 maximum is the block size, but
/// mke2fs never makes inodes larger than 1024 bytes).
pub const MAX_INODE_SIZE: usize = 1024;

/// Size of the classic inode.
pub const GOOD_OLD_INODE_SIZE: usize = 128;

/// `i_extra_isize` we write on new inodes (as libext2fs and the kernel do).
pub const EXTRA_ISIZE: u16 = 32;

/// The extent-tree header magic.
pub const EXT_MAGIC: u16 = 0xF30A;

/// File type bits of `i_mode`.
pub const S_IFMT: u16 = 0o170000;
/// Directory.
pub const S_IFDIR: u16 = 0o040000;
/// Regular file.
pub const S_IFREG: u16 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u16 = 0o120000;
/// Character device.
pub const S_IFCHR: u16 = 0o020000;
/// Block device.
pub const S_IFBLK: u16 = 0o060000;
/// FIFO.
pub const S_IFIFO: u16 = 0o010000;
/// Socket.
pub const S_IFSOCK: u16 = 0o140000;

/// `i_flags`: the inode uses extents.
pub const EXTENTS_FL: u32 = 0x0008_0000;
/// `i_flags`: hashed (htree) directory.
pub const INDEX_FL: u32 = 0x0000_1000;
/// `i_flags`: data stored inline in the inode.
pub const INLINE_DATA_FL: u32 = 0x1000_0000;

/// A timestamp: seconds since the epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    /// Seconds (may be negative).
    pub sec: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nsec: u32,
}

impl Timestamp {
    /// Smallest time ext4 can store.
    pub const MIN_SEC: i64 = i32::MIN as i64;
    /// Largest time ext4 can store (34-bit seconds).
    pub const MAX_SEC: i64 = i32::MAX as i64 + (3 << 32);

    /// Clamp to what ext4 can store, as the kernel's `timestamp_truncate`
    /// does: to the first or last second with 0 nanoseconds (a time within
    /// that bound second too); returns whether the time changed.
    pub fn clamped(self) -> (Timestamp, bool) {
        let sec = self.sec.clamp(Self::MIN_SEC, Self::MAX_SEC);
        let t = if sec == Self::MIN_SEC || sec == Self::MAX_SEC {
            Timestamp { sec, nsec: 0 }
        } else {
            self
        };
        (t, t != self)
    }
}

/// Which of the four inode times.
#[derive(Debug, Clone, Copy)]
enum TimeField {
    A,
    C,
    M,
    Cr,
}

impl TimeField {
    fn offsets(self) -> (usize, usize) {
        match self {
            TimeField::A => (8, 140),
            TimeField::C => (12, 132),
            TimeField::M => (16, 136),
            TimeField::Cr => (144, 148),
        }
    }
}

/// An inode buffer of the filesystem's inode size, 8-byte aligned.
#[derive(Clone)]
#[repr(C, align(8))]
pub struct Inode {
    bytes: [u8; MAX_INODE_SIZE],
    size: usize,
}

impl std::fmt::Debug for Inode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inode")
            .field("mode", &format_args!("{:o}", self.mode()))
            .field("links", &self.links())
            .field("size", &self.size())
            .field("flags", &format_args!("{:#x}", self.flags()))
            .finish()
    }
}

impl Inode {
    /// A zeroed inode of `size` bytes (the filesystem's inode size).
    pub fn zeroed(size: usize) -> Self {
        assert!((GOOD_OLD_INODE_SIZE..=MAX_INODE_SIZE).contains(&size));
        Inode {
            bytes: [0; MAX_INODE_SIZE],
            size,
        }
    }

    /// The inode bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.size]
    }

    /// The inode bytes, mutable (for FFI reads).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.size]
    }

    /// Inode size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Never empty; present for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }
    fn set_u16(&mut self, o: usize, v: u16) {
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn u32(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().expect("4 bytes"))
    }
    fn set_u32(&mut self, o: usize, v: u32) {
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Whether the extra fields (nanosecond times, crtime) exist.
    pub fn has_extra(&self) -> bool {
        self.size > GOOD_OLD_INODE_SIZE && self.extra_isize() >= EXTRA_ISIZE
    }

    /// `i_mode`.
    pub fn mode(&self) -> u16 {
        self.u16(0)
    }
    /// Set `i_mode`.
    pub fn set_mode(&mut self, v: u16) {
        self.set_u16(0, v)
    }
    /// File type bits.
    pub fn file_type(&self) -> u16 {
        self.mode() & S_IFMT
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }

    /// 32-bit uid.
    pub fn uid(&self) -> u32 {
        self.u16(2) as u32 | (self.u16(120) as u32) << 16
    }
    /// Set the 32-bit uid.
    pub fn set_uid(&mut self, v: u32) {
        self.set_u16(2, v as u16);
        self.set_u16(120, (v >> 16) as u16);
    }
    /// 32-bit gid.
    pub fn gid(&self) -> u32 {
        self.u16(24) as u32 | (self.u16(122) as u32) << 16
    }
    /// Set the 32-bit gid.
    pub fn set_gid(&mut self, v: u32) {
        self.set_u16(24, v as u16);
        self.set_u16(122, (v >> 16) as u16);
    }

    /// 64-bit size.
    pub fn size(&self) -> u64 {
        self.u32(4) as u64 | (self.u32(108) as u64) << 32
    }
    /// Set the 64-bit size.
    pub fn set_size(&mut self, v: u64) {
        self.set_u32(4, v as u32);
        self.set_u32(108, (v >> 32) as u32);
    }

    /// `i_links_count`.
    pub fn links(&self) -> u16 {
        self.u16(26)
    }
    /// Set `i_links_count`.
    pub fn set_links(&mut self, v: u16) {
        self.set_u16(26, v)
    }

    /// `i_dtime`.
    pub fn dtime(&self) -> u32 {
        self.u32(20)
    }
    /// Set `i_dtime`.
    pub fn set_dtime(&mut self, v: u32) {
        self.set_u32(20, v)
    }

    /// `osd1.linux1.l_i_version`, the low 32 bits of the inode version.
    pub fn version_lo(&self) -> u32 {
        self.u32(36)
    }
    /// Set `l_i_version`.
    pub fn set_version_lo(&mut self, v: u32) {
        self.set_u32(36, v)
    }

    /// Set the 32-bit seconds of atime, mtime and ctime only (what a write
    /// of the 128-byte `struct ext2_inode` changes; the extra fields stay).
    pub fn set_times_lo(&mut self, atime: u32, mtime: u32, ctime: u32) {
        self.set_u32(8, atime);
        self.set_u32(16, mtime);
        self.set_u32(12, ctime);
    }

    /// Zero atime, ctime, mtime and crtime with their extra fields.
    pub fn clear_times(&mut self) {
        for o in [8, 12, 16] {
            self.set_u32(o, 0);
        }
        if self.has_extra() {
            for o in [0x84, 0x88, 0x8c, 0x90, 0x94] {
                self.set_u32(o, 0);
            }
        }
    }

    /// `i_flags`.
    pub fn flags(&self) -> u32 {
        self.u32(32)
    }
    /// Set `i_flags`.
    pub fn set_flags(&mut self, v: u32) {
        self.set_u32(32, v)
    }

    /// The 60-byte `i_block` area.
    pub fn block_area(&self) -> &[u8] {
        &self.bytes[40..100]
    }
    /// The 60-byte `i_block` area, mutable.
    pub fn block_area_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[40..100]
    }
    /// `i_block[i]`.
    pub fn block(&self, i: usize) -> u32 {
        self.u32(40 + 4 * i)
    }
    /// Set `i_block[i]`.
    pub fn set_block(&mut self, i: usize, v: u32) {
        self.set_u32(40 + 4 * i, v)
    }

    /// 48-bit `i_file_acl` (the extended-attribute block).
    pub fn file_acl(&self) -> u64 {
        self.u32(104) as u64 | (self.u16(118) as u64) << 32
    }

    /// `i_extra_isize` (0 for 128-byte inodes).
    pub fn extra_isize(&self) -> u16 {
        if self.size > GOOD_OLD_INODE_SIZE {
            self.u16(128)
        } else {
            0
        }
    }
    /// Set `i_extra_isize` (no-op for 128-byte inodes).
    pub fn set_extra_isize(&mut self, v: u16) {
        if self.size > GOOD_OLD_INODE_SIZE {
            self.set_u16(128, v)
        }
    }

    fn time(&self, f: TimeField) -> Timestamp {
        let (lo, ex) = f.offsets();
        if matches!(f, TimeField::Cr) && !self.has_extra() {
            return Timestamp::default();
        }
        let base = self.u32(lo) as i32 as i64;
        if self.has_extra() {
            let extra = self.u32(ex);
            Timestamp {
                sec: base + (((extra & 3) as i64) << 32),
                nsec: extra >> 2,
            }
        } else {
            Timestamp { sec: base, nsec: 0 }
        }
    }

    fn set_time(&mut self, f: TimeField, t: Timestamp) {
        let (lo, ex) = f.offsets();
        let has_extra = self.has_extra();
        if matches!(f, TimeField::Cr) && !has_extra {
            return;
        }
        let (t, _) = if has_extra {
            t.clamped()
        } else {
            (
                Timestamp {
                    sec: t.sec.clamp(i32::MIN as i64, i32::MAX as i64),
                    nsec: 0,
                },
                false,
            )
        };
        self.set_u32(lo, t.sec as u32);
        if has_extra {
            let epoch = ((t.sec - (t.sec as i32 as i64)) >> 32) as u32 & 3;
            self.set_u32(ex, (t.nsec.min(999_999_999) << 2) | epoch);
        }
    }

    /// Modification time.
    pub fn mtime(&self) -> Timestamp {
        self.time(TimeField::M)
    }
    /// Access time.
    pub fn atime(&self) -> Timestamp {
        self.time(TimeField::A)
    }
    /// Change time.
    pub fn ctime(&self) -> Timestamp {
        self.time(TimeField::C)
    }
    /// Creation time (zero without extra fields).
    pub fn crtime(&self) -> Timestamp {
        self.time(TimeField::Cr)
    }

    /// Set atime, ctime and mtime to `t`, and crtime to `crtime`.
    pub fn set_times(&mut self, t: Timestamp, crtime: Timestamp) {
        self.set_time(TimeField::A, t);
        self.set_time(TimeField::C, t);
        self.set_time(TimeField::M, t);
        self.set_time(TimeField::Cr, crtime);
    }

    /// Put an empty extent-tree root into `i_block` and set `EXTENTS_FL`.
    pub fn init_extent_root(&mut self) {
        let b = self.block_area_mut();
        b.fill(0);
        b[0..2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        b[2..4].copy_from_slice(&0u16.to_le_bytes()); // entries
        b[4..6].copy_from_slice(&4u16.to_le_bytes()); // max entries in i_block
        b[6..8].copy_from_slice(&0u16.to_le_bytes()); // depth
        let f = self.flags() | EXTENTS_FL;
        self.set_flags(f);
    }

    /// Store a device number in `i_block` the way Linux does (old 16-bit
    /// encoding when both numbers fit in 8 bits, new encoding otherwise).
    pub fn set_rdev(&mut self, major: u32, minor: u32) {
        if major < 256 && minor < 256 {
            self.set_block(0, (major << 8) | minor);
            self.set_block(1, 0);
        } else {
            self.set_block(0, 0);
            self.set_block(1, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
        }
    }

    /// Decode the device number stored by [`Inode::set_rdev`].
    pub fn rdev(&self) -> (u32, u32) {
        let old = self.block(0);
        if old != 0 {
            ((old >> 8) & 0xff, old & 0xff)
        } else {
            let new = self.block(1);
            ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
        }
    }

    /// Raw pointer for libext2fs calls that take `struct ext2_inode *`.
    pub fn as_ext2_ptr(&mut self) -> *mut super::sys::ext2_inode {
        self.bytes.as_mut_ptr() as *mut super::sys::ext2_inode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_roundtrip_with_epoch_bits() {
        let mut i = Inode::zeroed(256);
        i.set_extra_isize(EXTRA_ISIZE);
        for sec in [
            0i64,
            1,
            -1,
            1_700_000_000,
            i32::MAX as i64 + 10,
            4_000_000_000,
            -2_000_000_000,
        ] {
            let t = Timestamp {
                sec,
                nsec: 123_456_789,
            };
            i.set_times(t, Timestamp::default());
            assert_eq!(i.mtime(), t, "sec {sec}");
            assert_eq!(i.atime(), t);
            assert_eq!(i.ctime(), t);
        }
    }

    /// Times outside ext4's range (1901-12-13 to 2446-05-10) are clamped
    /// as the kernel's `timestamp_truncate` clamps them when `tar -x` sets
    /// them: to the first or last second, with 0 nanoseconds, also for a
    /// time within that bound second. The last second kept 999,999,999 ns.
    #[test]
    fn times_beyond_the_range_clamp_as_the_kernel_does() {
        let mut i = Inode::zeroed(256);
        i.set_extra_isize(EXTRA_ISIZE);
        let ts = |sec, nsec| Timestamp { sec, nsec };
        for (t, want) in [
            (ts(17_179_869_189, 500_000_000), ts(Timestamp::MAX_SEC, 0)),
            (ts(i64::MAX, 999_999_999), ts(Timestamp::MAX_SEC, 0)),
            (ts(Timestamp::MAX_SEC, 700), ts(Timestamp::MAX_SEC, 0)),
            (
                ts(Timestamp::MAX_SEC - 1, 700),
                ts(Timestamp::MAX_SEC - 1, 700),
            ),
            (ts(-8_589_934_600, 5), ts(Timestamp::MIN_SEC, 0)),
            (ts(Timestamp::MIN_SEC, 5), ts(Timestamp::MIN_SEC, 0)),
            (ts(Timestamp::MIN_SEC + 1, 5), ts(Timestamp::MIN_SEC + 1, 5)),
        ] {
            i.set_times(t, Timestamp::default());
            assert_eq!(i.mtime(), want, "{t:?}");
        }
    }

    #[test]
    fn small_inode_has_seconds_only() {
        let mut i = Inode::zeroed(128);
        i.set_times(Timestamp { sec: 5, nsec: 7 }, Timestamp { sec: 9, nsec: 0 });
        assert_eq!(i.mtime(), Timestamp { sec: 5, nsec: 0 });
        assert_eq!(i.crtime(), Timestamp::default());
    }

    #[test]
    fn ids_and_rdev() {
        let mut i = Inode::zeroed(256);
        i.set_uid(100_000);
        i.set_gid(65_537);
        assert_eq!((i.uid(), i.gid()), (100_000, 65_537));
        for (ma, mi) in [(1, 3), (8, 0), (259, 1), (4, 300), (4095, 1_048_575)] {
            i.set_rdev(ma, mi);
            assert_eq!(i.rdev(), (ma, mi));
        }
    }
}
