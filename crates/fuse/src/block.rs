//! Block mode: the stack's virtual disk as one file, `MOUNTPOINT/disk`.
//!
//! The mount holds a root directory (inode 1) with a single regular file
//! (inode 2) whose bytes are the disk. Reads go straight to the device;
//! with a writable upper, writes, `fallocate` (punch hole, zero range) and
//! `fsync` go to it as well. `lseek(SEEK_DATA/SEEK_HOLE)` answers from the
//! stack's allocation map, so `cp`, `tar -S` and friends skip the unmapped
//! parts of a 64 GiB disk. Every failure is answered with an errno, and
//! recorded in the mount's [`IoFailures`] for an owner that must know.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blockdev::nbd::proto::STATE_HOLE;
use blockdev::nbd::Allocation;
use blockdev::BlockDevice;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use crate::error::errno_of;

/// Name of the disk file in the mount.
pub const DISK_NAME: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);
/// Largest read or write the kernel sends at once.
pub const MAX_IO: u32 = 1 << 20;

/// How often at most a [`DiskFs`] logs how many more requests failed since
/// it last said (the first failure is logged at once, the rest counted: a
/// full disk fails every write of the writeback, dozens of them).
const FAILURES_EVERY: Duration = Duration::from_secs(60);

/// The device errors a [`DiskFs`] answered with an errno. The kernel does not
/// always pass them on: a failed writeback of a loop device over the disk
/// file is logged by ext4 and dropped, and the unmount still succeeds. So an
/// owner that writes through the mount (the kernel apply engine) checks here
/// before it calls the result good.
#[derive(Debug, Default)]
pub struct IoFailures {
    count: AtomicU64,
    first: Mutex<Option<String>>,
    /// How many failures the log has told of, and when it last did.
    said: Mutex<(u64, Option<Instant>)>,
}

impl IoFailures {
    /// How many requests failed.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The first failure: the request and the device's error.
    pub fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, what: String) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
        }
    }

    /// Log the failure just recorded (`line`): the first one itself, later
    /// ones as a count, at most every `every` (`None`: now, if any is
    /// untold).
    fn tell(&self, line: Option<&str>, every: Option<Duration>) {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        let (told, at) = &mut *said;
        let count = self.count();
        if *told == 0 {
            if let Some(line) = line {
                // The one recorded first (another thread's, in a race).
                tracing::warn!("{}", self.first().as_deref().unwrap_or(line));
                *told = 1;
                *at = Some(Instant::now());
                return;
            }
        }
        if let Some(line) = line {
            tracing::debug!("{line}");
        }
        let due = match (every, *at) {
            (Some(every), Some(at)) => at.elapsed() >= every,
            _ => true,
        };
        if count > *told && due {
            let more = count - *told;
            tracing::warn!(
                "{more} more device request{} failed",
                if more == 1 { "" } else { "s" }
            );
            *told = count;
            *at = Some(Instant::now());
        }
    }
}

/// The block-mode filesystem.
pub struct DiskFs {
    dev: Arc<dyn BlockDevice>,
    failures: Arc<IoFailures>,
    alloc: Option<Arc<dyn Allocation>>,
    writable: bool,
    uid: u32,
    gid: u32,
    since: SystemTime,
    /// A read-only disk's `st_blocks`, counted once.
    mapped: std::sync::OnceLock<u64>,
}

impl DiskFs {
    /// Serve `dev`; writes are accepted only when `writable` (and the device
    /// accepts them). Files are owned by `uid`/`gid`.
    pub fn new(dev: Arc<dyn BlockDevice>, writable: bool, uid: u32, gid: u32) -> Self {
        DiskFs {
            writable: writable && !dev.is_read_only(),
            dev,
            failures: Arc::default(),
            alloc: None,
            uid,
            gid,
            since: SystemTime::now(),
            mapped: std::sync::OnceLock::new(),
        }
    }

    /// The record of the requests it failed, shared with the mount.
    pub fn failures(&self) -> Arc<IoFailures> {
        self.failures.clone()
    }

    /// Answer `SEEK_DATA`/`SEEK_HOLE` from `alloc` (without it, the whole
    /// disk is data, as for any file system without hole support).
    pub fn with_allocation(mut self, alloc: Arc<dyn Allocation>) -> Self {
        self.alloc = Some(alloc);
        self
    }

    /// The first offset at or after `from` that is data (`want_hole` false)
    /// or a hole (true); `None` when there is none before the end.
    fn seek(&self, from: u64, want_hole: bool) -> blockdev::Result<Option<u64>> {
        let size = self.dev.size();
        let Some(alloc) = &self.alloc else {
            return Ok(Some(if want_hole { size } else { from }));
        };
        const STEP: u64 = 1 << 30;
        let mut pos = from;
        while pos < size {
            let len = STEP.min(size - pos);
            let mut p = pos;
            for (l, flags) in alloc.extents(pos, len)? {
                if (flags & STATE_HOLE != 0) == want_hole {
                    return Ok(Some(p));
                }
                p += l;
            }
            if p <= pos {
                break;
            }
            pos = p;
        }
        Ok(if want_hole { Some(size) } else { None })
    }

    /// Bytes of the disk that the stack maps to data (what the layers hold;
    /// ranges that read as zeros because no layer maps them, or a zeroed
    /// entry covers them, do not count). Without an allocation map, the
    /// whole disk.
    fn mapped_bytes(&self) -> blockdev::Result<u64> {
        let size = self.dev.size();
        let Some(alloc) = &self.alloc else {
            return Ok(size);
        };
        const STEP: u64 = 1 << 30;
        let mut total = 0;
        let mut pos = 0;
        while pos < size {
            let before = pos;
            for (l, flags) in alloc.extents(pos, STEP.min(size - pos))? {
                if flags & STATE_HOLE == 0 {
                    total += l;
                }
                pos += l;
            }
            if pos == before {
                break;
            }
        }
        Ok(total)
    }

    /// The disk's `st_blocks` (512-byte units): what the stack maps, so
    /// `du` tells how much the layers hold. Counted once for a read-only
    /// disk (it never changes), at every getattr for a writable one.
    fn disk_blocks(&self) -> u64 {
        let count = || match self.mapped_bytes() {
            Ok(b) => b.div_ceil(512),
            Err(e) => {
                tracing::warn!(
                    "cannot count the disk's mapped blocks: {}",
                    obdimage::error::Chain(&e)
                );
                self.dev.size().div_ceil(512)
            }
        };
        if self.writable {
            count()
        } else {
            *self.mapped.get_or_init(count)
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o755, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.writable { 0o644 } else { 0o444 },
                self.dev.size(),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: if ino == DISK_INO {
                self.disk_blocks()
            } else {
                0
            },
            atime: self.since,
            mtime: self.since,
            ctime: self.since,
            crtime: self.since,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn fail(&self, e: &blockdev::Error, what: &str) -> Errno {
        let line = format!("{what}: {}", obdimage::error::Chain(e));
        self.failures.record(line.clone());
        self.failures.tell(Some(&line), Some(FAILURES_EVERY));
        Errno::from_i32(errno_of(e))
    }

    /// Punch-hole and zero-range alike: the range reads as zeros from now on,
    /// also after the upper is reopened. The stack's write-zeroes leaves holes
    /// in a sparse upper where no lower holds data, and writes zeros only over
    /// the blocks a lower does (where a hole would show the lower's bytes
    /// again once reopened, as a trim does); unaligned edges are written.
    fn zero_range(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.dev.write_zeroes(offset, len)
    }
}

impl Drop for DiskFs {
    fn drop(&mut self) {
        // The count of the failures not told yet, once the mount is done.
        self.failures.tell(None, None);
    }
}

impl Filesystem for DiskFs {
    // mkfs.ext4 and other block tools probe the disk file with block-device
    // ioctls and capability xattrs: answer as a plain file would, without
    // fuser's "not implemented" warnings.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != DISK_NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(DISK_INO) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The disk has a fixed size, owner and mode; time updates are
        // accepted and ignored (touch, O_TRUNC to the same size).
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(s) = size {
            if ino != DISK_INO || s != a.size {
                return reply.error(if self.writable {
                    Errno::EPERM
                } else {
                    Errno::EROFS
                });
            }
        }
        reply.attr(&TTL, &a)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.writable {
            return reply.error(Errno::EROFS);
        }
        // A read-only disk never changes: keep the kernel's page cache
        // across opens.
        let f = if self.writable {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(0), f)
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
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = self.dev.size();
        if offset >= end {
            return reply.data(&[]);
        }
        let n = (size as u64).min(end - offset) as usize;
        let mut buf = vec![0u8; n];
        match self.dev.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(self.fail(&e, &format!("read {n} bytes at {offset}"))),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        let end = self.dev.size();
        if offset >= end && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(end.saturating_sub(offset)) as usize;
        match self.dev.write_at(&data[..n], offset) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(self.fail(&e, &format!("write {n} bytes at {offset}"))),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): durability is fsync's job (and unmount's).
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO || !self.writable {
            return reply.ok();
        }
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(&e, "fsync")),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        let size = self.dev.size();
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if !punch && !zero {
            // Plain allocation: the disk is all there already; it cannot grow.
            return if end <= size || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                reply.ok()
            } else {
                reply.error(Errno::EFBIG)
            };
        }
        let end = end.min(size);
        if offset >= end {
            return reply.ok();
        }
        match self.zero_range(offset, end - offset) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(
                &e,
                &format!("fallocate mode {mode:#x} at {offset}+{length}"),
            )),
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
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
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
        if ino != DISK_INO {
            return reply.error(Errno::EINVAL);
        }
        let size = self.dev.size();
        let want_hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        if offset as u64 >= size {
            return reply.error(Errno::ENXIO);
        }
        match self.seek(offset as u64, want_hole) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.fail(&e, "lseek")),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.dev.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096)
    }
}
