//! A libext2fs `io_manager` whose channels read and write a [`BlockDevice`].
//!
//! libext2fs opens a channel by name. We register a [`Channel`] (device +
//! [`PageCache`]) under a numeric id and hand libext2fs the name
//! `obdfs:<id>`; the `open` callback takes the registered channel and
//! stores it in `io_channel.private_data`. From then on every block
//! libext2fs reads or writes goes through the cache to the device; no file
//! is ever opened. Errors from the device are kept in the channel so that
//! the Rust side can report the real cause next to libext2fs's error code.
//!
//! A channel in [`WriteMode::Exact`] (or `Buffered`) behaves as upstream's
//! extfs I/O manager (PhotonLibOS `fs/extfs/extfs_io.cpp`) as seen from the
//! device: no
//! `write_byte` (so libext2fs writes the whole 1 KiB superblock), `zeroout`
//! does nothing (blocks libext2fs would zero keep what the device holds),
//! and the cache writes back exactly the sectors libext2fs wrote.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_ulong, c_ulonglong, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::BlockDevice;

use super::cache::{PageCache, WriteMode};
use super::sys;

/// State behind one open channel.
pub struct Channel {
    /// The device and its cache.
    pub cache: PageCache,
    /// The last device error, kept for error messages.
    pub last_error: Option<blockdev::Error>,
}

impl Channel {
    /// A channel on `dev` with a metadata cache of `cache_bytes`.
    pub fn new(dev: Arc<dyn BlockDevice>, cache_bytes: usize) -> Self {
        Self::with_mode(dev, cache_bytes, WriteMode::Pages)
    }

    /// A channel whose cache writes back in `mode`.
    pub fn with_mode(dev: Arc<dyn BlockDevice>, cache_bytes: usize, mode: WriteMode) -> Self {
        Channel {
            cache: PageCache::with_mode(dev, cache_bytes, mode),
            last_error: None,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static PENDING: Mutex<Option<HashMap<u64, Box<Channel>>>> = Mutex::new(None);

/// Register `ch` for the next `open` and return the name to pass to libext2fs.
pub fn register(ch: Channel) -> CString {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(id, Box::new(ch));
    CString::new(format!("obdfs:{id}")).expect("no NUL in name")
}

/// Drop a registered channel that libext2fs never opened.
pub fn unregister(name: &CStr) {
    if let Some(id) = parse_name(name) {
        if let Some(map) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.remove(&id);
        }
    }
}

fn parse_name(name: &CStr) -> Option<u64> {
    name.to_str().ok()?.strip_prefix("obdfs:")?.parse().ok()
}

fn take(id: u64) -> Option<Box<Channel>> {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()?
        .remove(&id)
}

/// The manager table libext2fs calls through. libext2fs never writes to it.
struct Manager(sys::struct_io_manager);
// SAFETY: the table is immutable after construction; its raw `name` pointer
// refers to a static C string.
unsafe impl Sync for Manager {}

static MANAGER: Manager = Manager(sys::struct_io_manager {
    magic: sys::EXT2_ET_MAGIC_IO_MANAGER as sys::errcode_t,
    name: c"overlaybd block device".as_ptr(),
    open: Some(ch_open),
    close: Some(ch_close),
    set_blksize: Some(ch_set_blksize),
    read_blk: Some(ch_read_blk),
    write_blk: Some(ch_write_blk),
    flush: Some(ch_flush),
    write_byte: Some(ch_write_byte),
    set_option: Some(ch_set_option),
    get_stats: None,
    read_blk64: Some(ch_read_blk64),
    write_blk64: Some(ch_write_blk64),
    discard: None,
    cache_readahead: None,
    zeroout: Some(ch_zeroout),
    reserved: [0; 14],
});

/// The manager of [`WriteMode::Exact`] channels: no `write_byte`, and a
/// `zeroout` that does nothing.
static MANAGER_EXACT: Manager = Manager(sys::struct_io_manager {
    magic: sys::EXT2_ET_MAGIC_IO_MANAGER as sys::errcode_t,
    name: c"overlaybd block device (write-through)".as_ptr(),
    open: Some(ch_open),
    close: Some(ch_close),
    set_blksize: Some(ch_set_blksize),
    read_blk: Some(ch_read_blk),
    write_blk: Some(ch_write_blk),
    flush: Some(ch_flush),
    write_byte: None,
    set_option: Some(ch_set_option),
    get_stats: None,
    read_blk64: Some(ch_read_blk64),
    write_blk64: Some(ch_write_blk64),
    discard: None,
    cache_readahead: None,
    zeroout: Some(ch_zeroout_nop),
    reserved: [0; 14],
});

/// The manager to pass to `ext2fs_open2` / `ext2fs_initialize` for a
/// channel registered in `mode`.
pub fn manager(mode: WriteMode) -> sys::io_manager {
    let m = match mode {
        WriteMode::Pages => &MANAGER,
        WriteMode::Exact | WriteMode::Buffered => &MANAGER_EXACT,
    };
    &m.0 as *const sys::struct_io_manager as sys::io_manager
}

/// The Rust channel behind an open libext2fs channel.
///
/// # Safety
/// `io` must be a channel opened by this manager and not yet closed, and no
/// other reference to its [`Channel`] may be alive.
pub unsafe fn channel_of<'a>(io: sys::io_channel) -> &'a mut Channel {
    // SAFETY: guaranteed by the caller: private_data was set by ch_open to a
    // leaked Box<Channel> that lives until ch_close.
    unsafe { &mut *((*io).private_data as *mut Channel) }
}

/// Byte offset and length of a libext2fs block request: `count` blocks of the channel's
/// `block_size` at `block`, or, when negative, `-count` bytes.
fn byte_range(block_size: c_int, block: u64, count: c_int) -> (u64, usize) {
    let bs = block_size as u64;
    if count < 0 {
        (block * bs, (-(count as i64)) as usize)
    } else {
        (block * bs, count as usize * bs as usize)
    }
}

/// The block size of an open channel.
///
/// # Safety
/// `io` must be a channel opened by this manager and not yet closed.
unsafe fn block_size(io: sys::io_channel) -> c_int {
    // SAFETY: guaranteed by the caller: `io` points to the live struct ch_open made.
    unsafe { (*io).block_size }
}

fn record(ch: &mut Channel, e: blockdev::Error, code: sys::errcode_t) -> sys::errcode_t {
    ch.last_error = Some(e);
    code
}

// The `ch_*` callbacks are called by libext2fs only, through MANAGER, one at a time per
// channel; each states what libext2fs guarantees it.

/// `io_manager.open`: takes the channel registered under `name` (see [`register`]).
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `out` is NULL or valid for a write.
unsafe extern "C" fn ch_open(
    name: *const c_char,
    _flags: c_int,
    out: *mut sys::io_channel,
) -> sys::errcode_t {
    if name.is_null() || out.is_null() {
        return sys::EXT2_ET_BAD_DEVICE_NAME as sys::errcode_t;
    }
    // SAFETY: libext2fs passes a NUL-terminated name.
    let cname = unsafe { CStr::from_ptr(name) };
    let Some(ch) = parse_name(cname).and_then(take) else {
        return sys::EXT2_ET_BAD_DEVICE_NAME as sys::errcode_t;
    };
    let mode = ch.cache.mode();
    let io = Box::new(sys::struct_io_channel {
        magic: sys::EXT2_ET_MAGIC_IO_CHANNEL as sys::errcode_t,
        manager: manager(mode),
        name: cname.to_owned().into_raw(),
        block_size: 1024,
        read_error: None,
        write_error: None,
        refcount: 1,
        flags: 0,
        reserved: [0; 14],
        private_data: Box::into_raw(ch) as *mut c_void,
        app_data: std::ptr::null_mut(),
        align: 0,
    });
    // SAFETY: `out` is a valid pointer supplied by libext2fs.
    unsafe { *out = Box::into_raw(io) };
    0
}

/// `io_manager.close`: drops a reference; the last one writes the cache back and frees
/// the channel.
///
/// # Safety
/// `io` is an open channel of this manager; after the last reference it is not used again.
unsafe extern "C" fn ch_close(io: sys::io_channel) -> sys::errcode_t {
    // SAFETY: `io` was created by ch_open and is still open.
    let chan = unsafe { &mut *io };
    chan.refcount -= 1;
    if chan.refcount > 0 {
        return 0;
    }
    // SAFETY: private_data is the Box<Channel> leaked in ch_open; reclaimed once.
    let mut ch = unsafe { Box::from_raw(chan.private_data as *mut Channel) };
    let rc = match ch.cache.writeback() {
        Ok(()) => 0,
        Err(e) => record(&mut ch, e, sys::EXT2_ET_SHORT_WRITE as sys::errcode_t),
    };
    drop(ch);
    // SAFETY: name came from CString::into_raw in ch_open; the channel struct
    // from Box::into_raw. Neither is used after this.
    unsafe {
        drop(CString::from_raw(chan.name));
        drop(Box::from_raw(io));
    }
    rc
}

/// `io_manager.set_blksize`.
///
/// # Safety
/// `io` is an open channel of this manager.
unsafe extern "C" fn ch_set_blksize(io: sys::io_channel, blksize: c_int) -> sys::errcode_t {
    if blksize <= 0 {
        return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
    }
    // SAFETY: `io` is an open channel of this manager.
    unsafe { (*io).block_size = blksize };
    0
}

/// Read `count` blocks (or `-count` bytes) at `block` into `data`.
///
/// # Safety
/// `io` is an open channel of this manager with no other reference to its [`Channel`]
/// alive; `data` is valid for writes of the bytes the request covers.
unsafe fn do_read(
    io: sys::io_channel,
    block: u64,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    // SAFETY: guaranteed by the caller.
    let (off, len) = byte_range(unsafe { block_size(io) }, block, count);
    // SAFETY: libext2fs guarantees `data` holds `len` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, len) };
    // SAFETY: open channel; no other reference to the Channel exists while
    // libext2fs is inside a callback.
    let ch = unsafe { channel_of(io) };
    match ch.cache.read(buf, off) {
        Ok(()) => 0,
        Err(e) => {
            buf.fill(0);
            record(ch, e, sys::EXT2_ET_SHORT_READ as sys::errcode_t)
        }
    }
}

/// Write `len` bytes of `data` at byte `off`.
///
/// # Safety
/// `io` is an open channel of this manager with no other reference to its [`Channel`]
/// alive; `data` is valid for reads of `len` bytes.
unsafe fn do_write(
    io: sys::io_channel,
    off: u64,
    len: usize,
    data: *const c_void,
) -> sys::errcode_t {
    // SAFETY: libext2fs guarantees `data` holds `len` bytes.
    let buf = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
    // SAFETY: as in do_read.
    let ch = unsafe { channel_of(io) };
    match ch.cache.write(buf, off) {
        Ok(()) => 0,
        Err(e) => record(ch, e, sys::EXT2_ET_SHORT_WRITE as sys::errcode_t),
    }
}

/// `io_manager.read_blk`.
///
/// # Safety
/// As [`do_read`].
unsafe extern "C" fn ch_read_blk(
    io: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    // SAFETY: forwarded from libext2fs with the same guarantees.
    unsafe { do_read(io, block, count, data) }
}

/// `io_manager.read_blk64`.
///
/// # Safety
/// As [`do_read`].
unsafe extern "C" fn ch_read_blk64(
    io: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    // SAFETY: forwarded from libext2fs with the same guarantees.
    unsafe { do_read(io, block, count, data) }
}

/// `io_manager.write_blk`.
///
/// # Safety
/// As [`do_write`], for the bytes `count` blocks (or `-count` bytes) at `block` cover.
unsafe extern "C" fn ch_write_blk(
    io: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    // SAFETY: `io` is an open channel of this manager (the caller's guarantee).
    let (off, len) = byte_range(unsafe { block_size(io) }, block, count);
    // SAFETY: forwarded from libext2fs with the same guarantees.
    unsafe { do_write(io, off, len, data) }
}

/// `io_manager.write_blk64`.
///
/// # Safety
/// As [`ch_write_blk`].
unsafe extern "C" fn ch_write_blk64(
    io: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    // SAFETY: `io` is an open channel of this manager (the caller's guarantee).
    let (off, len) = byte_range(unsafe { block_size(io) }, block, count);
    // SAFETY: forwarded from libext2fs with the same guarantees.
    unsafe { do_write(io, off, len, data) }
}

/// `io_manager.write_byte`: `count` bytes at byte `offset`.
///
/// # Safety
/// As [`do_write`], with `len` = `count`.
unsafe extern "C" fn ch_write_byte(
    io: sys::io_channel,
    offset: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    if count < 0 {
        return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
    }
    // SAFETY: forwarded from libext2fs with the same guarantees.
    unsafe { do_write(io, offset, count as usize, data) }
}

/// libext2fs flushes only at the end of `ext2fs_flush2`; the Rust side
/// writes the cache back right after that (once the superblock times are
/// fixed), so writing back here would only write those blocks twice, which
/// an append-mode LSMT layer would keep.
///
/// # Safety
/// Touches nothing; any pointer is fine.
unsafe extern "C" fn ch_flush(_io: sys::io_channel) -> sys::errcode_t {
    0
}

/// `io_manager.set_option`: no options are supported.
///
/// # Safety
/// Touches nothing; any pointers are fine.
unsafe extern "C" fn ch_set_option(
    _io: sys::io_channel,
    _opt: *const c_char,
    _arg: *const c_char,
) -> sys::errcode_t {
    sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t
}

/// `io_manager.zeroout`: zero `count` blocks at `block`.
///
/// # Safety
/// `io` is an open channel of this manager with no other reference to its [`Channel`]
/// alive.
unsafe extern "C" fn ch_zeroout(
    io: sys::io_channel,
    block: c_ulonglong,
    count: c_ulonglong,
) -> sys::errcode_t {
    // SAFETY: open channel of this manager.
    let bs = unsafe { block_size(io) } as u64;
    // SAFETY: as in do_read.
    let ch = unsafe { channel_of(io) };
    match ch.cache.zero(block * bs, count * bs) {
        Ok(()) => 0,
        Err(e) => record(ch, e, sys::EXT2_ET_SHORT_WRITE as sys::errcode_t),
    }
}

/// `zeroout` of [`WriteMode::Exact`] channels: succeed without writing, as
/// upstream's extfs I/O manager does (libext2fs then skips its own zeroing).
unsafe extern "C" fn ch_zeroout_nop(
    _io: sys::io_channel,
    _block: c_ulonglong,
    _count: c_ulonglong,
) -> sys::errcode_t {
    0
}
