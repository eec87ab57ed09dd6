//! A small safe layer over libext2fs (Debian's e2fsprogs 1.47.0).
//!
//! [`Ext2Fs`] owns one `ext2_filsys` whose I/O goes through [`io`] to a
//! [`BlockDevice`]. Every libext2fs call is made here or in the modules of
//! this crate that need direct access, each wrapped in an `unsafe` block
//! with its safety argument. Error codes become [`Error::Ext2fs`] with
//! com_err's message and, when the device failed, the device's own error.

pub mod cache;
pub mod inode;
pub mod io;
pub mod ops;
pub mod read;
#[allow(unsafe_op_in_unsafe_fn, rustdoc::all, missing_docs, unused_imports)]
pub mod sys;

use std::ffi::{c_int, CStr, CString};
use std::sync::{Arc, Once};

use blockdev::BlockDevice;

use crate::error::{Error, Result};
use inode::Inode;
use io::Channel;

/// Metadata cache size per open filesystem.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

static ERROR_TABLE: Once = Once::new();

fn init_error_table() {
    ERROR_TABLE.call_once(|| {
        // SAFETY: registers libext2fs's static com_err table; called once.
        unsafe { sys::initialize_ext2_error_table() };
    });
}

/// com_err's text for an error code.
pub fn error_text(code: sys::errcode_t) -> String {
    init_error_table();
    // SAFETY: error_message returns a pointer to a static or thread-local
    // NUL-terminated string, valid until the next call on this thread.
    let p = unsafe { sys::error_message(code) };
    if p.is_null() {
        return format!("error {code}");
    }
    // SAFETY: non-null NUL-terminated string from com_err.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// An open filesystem.
pub struct Ext2Fs {
    fs: sys::ext2_filsys,
    closed: bool,
}

impl Ext2Fs {
    /// Open the ext2/3/4 filesystem on `dev` read-write and load its bitmaps.
    pub fn open(dev: Arc<dyn BlockDevice>, cache_bytes: usize) -> Result<Self> {
        let flags = (sys::EXT2_FLAG_RW | sys::EXT2_FLAG_64BITS) as c_int;
        let mut me = Self::open_flags(dev, cache_bytes, flags)?;
        // SAFETY: fs is a valid open handle.
        let rc = unsafe { sys::ext2fs_read_bitmaps(me.fs) };
        me.check(rc, "read the allocation bitmaps")?;
        me.set_now(1);
        Ok(me)
    }

    /// `ext2fs_open2` with `flags` over our I/O manager.
    fn open_flags(dev: Arc<dyn BlockDevice>, cache_bytes: usize, flags: c_int) -> Result<Self> {
        init_error_table();
        let name = io::register(Channel::new(dev, cache_bytes));
        let mut fs: sys::ext2_filsys = std::ptr::null_mut();
        // SAFETY: name is a valid C string; manager() is our static table;
        // fs receives the new handle.
        let rc = unsafe {
            sys::ext2fs_open2(
                name.as_ptr(),
                std::ptr::null(),
                flags,
                0,
                0,
                io::manager(),
                &mut fs,
            )
        };
        if rc != 0 {
            io::unregister(&name);
            if !fs.is_null() {
                // SAFETY: a handle returned on error (NOFREE flag not set, so
                // normally null); freeing it releases the channel.
                unsafe { sys::ext2fs_free(fs) };
            }
            return Err(Error::ext2fs("open the ext4 filesystem", rc, None));
        }
        Ok(Ext2Fs { fs, closed: false })
    }

    /// Create a new filesystem on `dev` from the superblock template `param`
    /// (`ext2fs_initialize`). The caller finishes mkfs (tables, root, ...).
    pub fn initialize(
        dev: Arc<dyn BlockDevice>,
        param: &mut sys::ext2_super_block,
        cache_bytes: usize,
    ) -> Result<Self> {
        init_error_table();
        let name = io::register(Channel::new(dev, cache_bytes));
        let mut fs: sys::ext2_filsys = std::ptr::null_mut();
        // SAFETY: valid C string, superblock template and manager; fs is an
        // out-pointer.
        let rc = unsafe {
            sys::ext2fs_initialize(
                name.as_ptr(),
                sys::EXT2_FLAG_64BITS as c_int,
                param,
                io::manager(),
                &mut fs,
            )
        };
        if rc != 0 {
            io::unregister(&name);
            return Err(Error::ext2fs("set up the superblock", rc, None));
        }
        let mut me = Ext2Fs { fs, closed: false };
        me.set_now(1);
        Ok(me)
    }

    /// The raw handle, for calls made by this crate.
    pub fn raw(&self) -> sys::ext2_filsys {
        self.fs
    }

    /// The superblock (libext2fs's in-memory copy).
    pub fn sb(&self) -> &sys::ext2_super_block {
        // SAFETY: fs is open; super_ points to its superblock, alive as long
        // as the handle.
        unsafe { &*(*self.fs).super_ }
    }

    /// The superblock, mutable.
    pub fn sb_mut(&mut self) -> &mut sys::ext2_super_block {
        // SAFETY: as in sb(); &mut self gives exclusive access.
        unsafe { &mut *(*self.fs).super_ }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        // SAFETY: fs is open.
        unsafe { (*self.fs).blocksize as u64 }
    }

    /// Inode size in bytes.
    pub fn inode_size(&self) -> usize {
        let s = self.sb();
        if s.s_rev_level == 0 {
            128
        } else {
            s.s_inode_size as usize
        }
    }

    /// Number of blocks.
    pub fn blocks_count(&self) -> u64 {
        let s = self.sb();
        s.s_blocks_count as u64 | (s.s_blocks_count_hi as u64) << 32
    }

    /// Whether an incompat/ro_compat/compat feature bit is set.
    pub fn has_incompat(&self, bit: i32) -> bool {
        self.sb().s_feature_incompat & bit as u32 != 0
    }
    /// See [`Ext2Fs::has_incompat`].
    pub fn has_ro_compat(&self, bit: i32) -> bool {
        self.sb().s_feature_ro_compat & bit as u32 != 0
    }

    /// Set the time libext2fs stamps on what it creates (0 means "now" to
    /// libext2fs, so callers overwrite times they care about).
    pub fn set_now(&mut self, t: i64) {
        // SAFETY: fs is open; plain field store.
        unsafe { (*self.fs).now = t as sys::time_t };
    }

    /// Set the umask libext2fs applies in `ext2fs_mkdir`.
    pub fn set_umask(&mut self, m: u32) {
        // SAFETY: fs is open; plain field store.
        unsafe { (*self.fs).umask = m };
    }

    /// The Rust side of the I/O channel (cache, last device error).
    pub fn channel(&mut self) -> &mut Channel {
        // SAFETY: fs->io was opened by our manager; &mut self guarantees no
        // other reference to the channel, and no libext2fs call is running.
        unsafe { io::channel_of((*self.fs).io) }
    }

    /// Turn a libext2fs return code into a `Result`.
    pub fn check(&mut self, rc: sys::errcode_t, what: &str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(self.error(rc, what))
        }
    }

    /// An error for `rc`, with the device's error when it caused it.
    pub fn error(&mut self, rc: sys::errcode_t, what: &str) -> Error {
        let dev = self.channel().last_error.take();
        Error::ext2fs(what, rc, dev)
    }

    /// Read inode `ino`.
    pub fn read_inode(&mut self, ino: u32) -> Result<Inode> {
        let mut i = Inode::zeroed(self.inode_size());
        let len = i.len() as c_int;
        // SAFETY: the buffer is aligned and holds `len` bytes.
        let rc = unsafe { sys::ext2fs_read_inode_full(self.fs, ino, i.as_ext2_ptr(), len) };
        self.check(rc, &format!("read inode {ino}"))?;
        Ok(i)
    }

    /// Write all bytes of inode `ino`.
    pub fn write_inode(&mut self, ino: u32, i: &mut Inode) -> Result<()> {
        let len = i.len() as c_int;
        // SAFETY: the buffer is aligned and holds `len` bytes.
        let rc = unsafe { sys::ext2fs_write_inode_full(self.fs, ino, i.as_ext2_ptr(), len) };
        self.check(rc, &format!("write inode {ino}"))
    }

    /// Read `buf.len()` bytes at byte offset `off` through the cache.
    pub fn read_bytes(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        self.channel().cache.read(buf, off).map_err(Error::Device)
    }

    /// Write bytes at `off` through the cache.
    pub fn write_bytes(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.channel().cache.write(buf, off).map_err(Error::Device)
    }

    /// Flush everything to the device and close. `wtime`, when given, is
    /// stored as the superblock's last-write time in the primary and every
    /// backup superblock (libext2fs would stamp the wall clock there).
    pub fn close(self, wtime: Option<u32>) -> Result<()> {
        self.finish(wtime, true)
    }

    /// [`Ext2Fs::close`] without making the device durable: everything is
    /// written to the device, which is not flushed (no fsync).
    pub fn close_unsynced(self, wtime: Option<u32>) -> Result<()> {
        self.finish(wtime, false)
    }

    fn finish(mut self, wtime: Option<u32>, sync: bool) -> Result<()> {
        // SAFETY: fs is open.
        let rc = unsafe { sys::ext2fs_flush2(self.fs, 0) };
        self.check(rc, "write the superblock, group descriptors and bitmaps")?;
        if let Some(t) = wtime {
            self.patch_wtime(t)?;
        }
        let ch = self.channel();
        ch.cache.writeback().map_err(Error::Device)?;
        if sync {
            ch.cache.device().flush().map_err(Error::Device)?;
        }
        self.closed = true;
        // SAFETY: fs is open and no longer used; ext2fs_free closes the
        // channel, whose cache is already clean.
        unsafe {
            (*self.fs).flags &= !(sys::EXT2_FLAG_DIRTY as c_int);
            sys::ext2fs_free(self.fs);
        }
        Ok(())
    }

    /// Overwrite `s_wtime` in every on-disk superblock copy.
    fn patch_wtime(&mut self, t: u32) -> Result<()> {
        const SB_SIZE: usize = 1024;
        const WTIME_OFF: usize = 48;
        const WTIME_HI_OFF: usize = 0x274;
        const MAGIC_OFF: usize = 56;
        let groups = {
            // SAFETY: fs is open.
            unsafe { (*self.fs).group_desc_count }
        };
        let bs = self.block_size();
        let csum = self.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM);
        let mut offsets = vec![1024u64];
        for g in 1..groups {
            // SAFETY: fs is open; g is a valid group number.
            if unsafe { sys::ext2fs_bg_has_super(self.fs, g) } != 0 {
                // SAFETY: as above.
                let blk = unsafe { sys::ext2fs_group_first_block2(self.fs, g) };
                // The backup superblock fills the group's first block.
                offsets.push(blk * bs);
            }
        }
        for off in offsets {
            let mut buf = SbBuf([0u8; SB_SIZE]);
            let sb = &mut buf.0;
            self.read_bytes(sb, off)?;
            if u16::from_le_bytes([sb[MAGIC_OFF], sb[MAGIC_OFF + 1]]) != 0xEF53 {
                continue;
            }
            sb[WTIME_OFF..WTIME_OFF + 4].copy_from_slice(&t.to_le_bytes());
            sb[WTIME_HI_OFF] = 0;
            self.sb_mut().s_wtime = t;
            self.sb_mut().s_wtime_hi = 0;
            if csum {
                // SAFETY: sb is a 1024-byte superblock image, properly sized
                // for struct ext2_super_block; the call only computes and
                // stores s_checksum in it.
                let rc = unsafe {
                    sys::ext2fs_superblock_csum_set(
                        self.fs,
                        sb.as_mut_ptr() as *mut sys::ext2_super_block,
                    )
                };
                self.check(rc, "checksum the superblock")?;
            }
            self.write_bytes(sb, off)?;
        }
        Ok(())
    }
}

/// A superblock image aligned like `struct ext2_super_block`.
#[repr(C, align(8))]
struct SbBuf([u8; 1024]);

impl Drop for Ext2Fs {
    fn drop(&mut self) {
        if !self.closed {
            // Abandon the filesystem without writing anything more: a failed
            // apply leaves a layer that must not be committed anyway.
            // SAFETY: fs is open and not used afterwards.
            unsafe {
                (*self.fs).flags &= !(sys::EXT2_FLAG_DIRTY as c_int);
                let ch = io::channel_of((*self.fs).io);
                ch.cache.clear_dirty();
                sys::ext2fs_free(self.fs);
            }
        }
    }
}

/// Make a C string from a file name (names never contain NUL in tar).
pub fn cstring(name: &[u8]) -> Result<CString> {
    CString::new(name.to_vec()).map_err(|_| Error::Invalid("file name contains a NUL byte".into()))
}
