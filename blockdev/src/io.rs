//! Positional file I/O with two interchangeable backends.
//!
//! [`IoFile`] reads and writes at explicit offsets through either plain
//! `pread`/`pwrite` or io_uring (the `io-uring` crate). The backend is picked
//! at run time: [`IoBackend::Auto`] (the default) uses io_uring when the
//! kernel allows it and falls back to `pread` otherwise. The environment
//! variable `OVERLAYBD_IO` (`uring`, `pread` or `auto`) overrides the default
//! for a whole process, which lets every test run against both backends.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};

/// Which system interface carries file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring if available, else pread/pwrite.
    Auto,
    /// Plain `pread(2)` / `pwrite(2)`.
    Pread,
    /// io_uring; opening fails if the kernel refuses it.
    Uring,
}

impl std::str::FromStr for IoBackend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" | "" => Ok(IoBackend::Auto),
            "pread" | "sync" => Ok(IoBackend::Pread),
            "uring" | "io_uring" | "io-uring" => Ok(IoBackend::Uring),
            other => Err(Error::Invalid(format!(
                "unknown I/O backend '{other}' (expected auto, pread or uring)"
            ))),
        }
    }
}

static DEFAULT_BACKEND: AtomicU8 = AtomicU8::new(0); // 0 = unset

/// Set the backend used by [`IoFile::open`] for the rest of the process.
pub fn set_default_backend(b: IoBackend) {
    DEFAULT_BACKEND.store(
        match b {
            IoBackend::Auto => 1,
            IoBackend::Pread => 2,
            IoBackend::Uring => 3,
        },
        Ordering::Relaxed,
    );
}

/// The backend new files get: the last [`set_default_backend`], else
/// `OVERLAYBD_IO`, else `Auto`.
pub fn default_backend() -> IoBackend {
    match DEFAULT_BACKEND.load(Ordering::Relaxed) {
        1 => IoBackend::Auto,
        2 => IoBackend::Pread,
        3 => IoBackend::Uring,
        _ => std::env::var("OVERLAYBD_IO")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(IoBackend::Auto),
    }
}

/// Whether this process can create an io_uring instance.
pub fn uring_available() -> bool {
    with_ring(|_| Ok(())).is_ok()
}

/// Ring entries per thread. Requests are submitted one at a time per
/// thread, so a small ring suffices.
const RING_ENTRIES: u32 = 8;

thread_local! {
    static RING: RefCell<Option<io_uring::IoUring>> = const { RefCell::new(None) };
}

fn with_ring<T>(f: impl FnOnce(&mut io_uring::IoUring) -> io::Result<T>) -> io::Result<T> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(io_uring::IoUring::new(RING_ENTRIES)?);
        }
        f(slot.as_mut().expect("ring initialised above"))
    })
}

thread_local! {
    /// user_data of the next request on this thread's ring.
    static NEXT_TAG: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// Submit one SQE on this thread's ring and wait for its result.
///
/// A signal can end the wait early (io_uring_enter then reports the SQE
/// as submitted, or fails with EINTR) while the kernel still owns the
/// buffer; so we keep waiting until the completion carrying this request's
/// tag arrives, and drop any other (stale) completion on the way.
fn uring_submit(entry: io_uring::squeue::Entry) -> io::Result<usize> {
    let tag = NEXT_TAG.with(|t| {
        let v = t.get();
        t.set(v.wrapping_add(1).max(1));
        v
    });
    let entry = entry.user_data(tag);
    with_ring(|ring| {
        // SAFETY: the buffers referenced by `entry` are borrowed by the caller
        // for the whole call, and we do not return before the completion of
        // this request (matched by its tag) has arrived, so the kernel never
        // touches them after they are released.
        unsafe {
            ring.submission()
                .push(&entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let mut submitted = false;
        loop {
            let r = if submitted {
                ring.submitter().submit_and_wait(1)
            } else {
                ring.submit_and_wait(1)
            };
            match r {
                Ok(_) => submitted = true,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) =>
                {
                    // Whether the SQE went in is known from the queue.
                    submitted = ring.submission().is_empty();
                }
                // Argument errors: the kernel took nothing from the queue.
                Err(e) => return Err(e),
            }
            while let Some(cqe) = ring.completion().next() {
                if cqe.user_data() == tag {
                    let res = cqe.result();
                    return if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as usize)
                    };
                }
            }
        }
    })
}

/// A file accessed at explicit offsets, remembering its path for errors.
#[derive(Debug)]
pub struct IoFile {
    path: PathBuf,
    file: File,
    uring: bool,
}

impl IoFile {
    /// Open an existing file read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, OpenOptions::new().read(true), default_backend())
    }

    /// Open an existing file for reading and writing.
    pub fn open_rw(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(
            path,
            OpenOptions::new().read(true).write(true),
            default_backend(),
        )
    }

    /// Create a new file (failing if it exists), mode 0644.
    pub fn create_new(path: impl AsRef<Path>) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        Self::open_with(
            path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644),
            default_backend(),
        )
    }

    /// Open with explicit options and backend.
    pub fn open_with(
        path: impl AsRef<Path>,
        opts: &OpenOptions,
        backend: IoBackend,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = opts.open(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_file(path, file, backend)
    }

    /// Wrap an already open file.
    pub fn from_file(path: PathBuf, file: File, backend: IoBackend) -> Result<Self> {
        let uring = match backend {
            IoBackend::Pread => false,
            IoBackend::Auto => uring_available(),
            IoBackend::Uring => {
                with_ring(|_| Ok(())).map_err(|e| {
                    Error::io(
                        &path,
                        io::Error::new(e.kind(), format!("io_uring unavailable: {e}")),
                    )
                })?;
                true
            }
        };
        Ok(IoFile { path, file, uring })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether io_uring carries this file's I/O.
    pub fn uses_uring(&self) -> bool {
        self.uring
    }

    /// The underlying `std::fs::File`.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn err(&self, e: io::Error) -> Error {
        Error::io(&self.path, e)
    }

    fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.uring {
            let e = io_uring::opcode::Read::new(
                io_uring::types::Fd(self.file.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len().min(u32::MAX as usize) as u32,
            )
            .offset(offset)
            .build();
            uring_submit(e)
        } else {
            self.file.read_at(buf, offset)
        }
    }

    fn write_once(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if self.uring {
            let e = io_uring::opcode::Write::new(
                io_uring::types::Fd(self.file.as_raw_fd()),
                buf.as_ptr(),
                buf.len().min(u32::MAX as usize) as u32,
            )
            .offset(offset)
            .build();
            uring_submit(e)
        } else {
            self.file.write_at(buf, offset)
        }
    }

    /// Read up to `buf.len()` bytes; returns how many were read (short only at EOF).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_once(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(done)
    }

    /// Fill `buf` exactly; a short file is reported as corruption-like EOF.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(self.err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "unexpected end of file reading {} bytes at offset {offset} (got {n})",
                    buf.len()
                ),
            )));
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.write_once(&buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(
                        self.err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"))
                    )
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    /// Current file length.
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.err(e))
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncate or extend the file.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| self.err(e))
    }

    /// fsync the file.
    pub fn sync(&self) -> Result<()> {
        if self.uring {
            let e =
                io_uring::opcode::Fsync::new(io_uring::types::Fd(self.file.as_raw_fd())).build();
            uring_submit(e).map(|_| ()).map_err(|e| self.err(e))
        } else {
            self.file.sync_all().map_err(|e| self.err(e))
        }
    }

    /// Deallocate a range so it reads back as zeros, keeping the file size.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid fd owned by `self.file`; no memory is shared.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                // Filesystem without hole punching: write zeros instead.
                let zeros = vec![0u8; (len.min(1 << 20)) as usize];
                let mut off = offset;
                let end = offset + len;
                while off < end {
                    let n = (end - off).min(zeros.len() as u64) as usize;
                    self.write_all_at(&zeros[..n], off)?;
                    off += n as u64;
                }
                return Ok(());
            }
            return Err(self.err(e));
        }
        Ok(())
    }

    /// The data/hole layout of the file: `(start, end)` byte ranges holding data,
    /// from `from` on, found with `lseek(SEEK_DATA/SEEK_HOLE)`.
    pub fn data_ranges(&self, from: u64) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = from as libc::off_t;
        loop {
            // SAFETY: lseek on a valid fd; no memory is passed.
            let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if start < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(self.err(e));
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            if end < 0 {
                return Err(self.err(io::Error::last_os_error()));
            }
            out.push((start as u64, end as u64));
            pos = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(backend: IoBackend) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = IoFile::open_with(
            &p,
            OpenOptions::new().read(true).write(true).create(true),
            backend,
        )
        .unwrap();
        f.write_all_at(b"hello world", 4096).unwrap();
        let mut buf = [0u8; 11];
        f.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello world");
        assert_eq!(f.len().unwrap(), 4107);
        let mut big = [1u8; 100];
        assert_eq!(f.read_at(&mut big, 4100).unwrap(), 7);
        assert!(f.read_exact_at(&mut big, 4100).is_err());
        f.punch_hole(4096, 4096).unwrap();
        f.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 11]);
        f.sync().unwrap();
    }

    #[test]
    fn pread_backend_roundtrip() {
        roundtrip(IoBackend::Pread);
    }

    #[test]
    fn uring_backend_roundtrip() {
        if !uring_available() {
            eprintln!("io_uring unavailable here; skipping");
            return;
        }
        roundtrip(IoBackend::Uring);
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("uring".parse::<IoBackend>().unwrap(), IoBackend::Uring);
        assert_eq!("pread".parse::<IoBackend>().unwrap(), IoBackend::Pread);
        assert!("bogus".parse::<IoBackend>().is_err());
    }
}
