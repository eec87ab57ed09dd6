//! Positional file I/O over `pread`/`pwrite` and io_uring.
//!
//! [`IoFile`] reads and writes at explicit offsets. Single operations use
//! plain `pread`/`pwrite`, which cost less than a ring round trip when the
//! data is in the page cache; batches of reads ([`IoFile::read_many`]) go
//! through the io_uring engine of [`crate::uring`], all in flight at once,
//! which pays when they reach the device. The backend is picked at run
//! time: [`IoBackend::Auto`] (the default) as just described when the
//! kernel allows io_uring, [`IoBackend::Pread`] never uses the ring,
//! [`IoBackend::Uring`] sends every operation through it. The environment
//! variable `OVERLAYBD_IO` (`uring`, `pread` or `auto`) overrides the default
//! for a whole process, which lets every test run against each backend.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};
use crate::uring;

/// Which system interface carries file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// Batched reads through io_uring if available, the rest pread/pwrite.
    Auto,
    /// Plain `pread(2)` / `pwrite(2)` only.
    Pread,
    /// Everything through io_uring; opening fails if the kernel refuses it.
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
        _ => env_backend(),
    }
}

/// The backend `OVERLAYBD_IO` names, read once; `Auto` without it. A value
/// that names none (a typo) is `Auto` too, with a warning, once.
fn env_backend() -> IoBackend {
    static FROM_ENV: std::sync::OnceLock<IoBackend> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| {
        let v = match std::env::var("OVERLAYBD_IO") {
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => return IoBackend::Auto,
            Err(std::env::VarError::NotUnicode(v)) => v.to_string_lossy().into_owned(),
        };
        v.parse().unwrap_or_else(|_| {
            tracing::warn!(
                "OVERLAYBD_IO={v:?} names no I/O backend (uring, pread or auto): using auto"
            );
            IoBackend::Auto
        })
    })
}

/// Whether this process can create an io_uring instance.
pub fn uring_available() -> bool {
    crate::uring::available()
}

/// A file accessed at explicit offsets, remembering its path for errors.
#[derive(Debug)]
pub struct IoFile {
    path: PathBuf,
    file: File,
    /// Batches of several reads go through io_uring.
    uring: bool,
    /// Every operation goes through io_uring ([`IoBackend::Uring`]).
    uring_always: bool,
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

    /// Claim the file for this open, without waiting: an exclusive `flock`
    /// (`exclusive`) or a shared one, released when the file is closed.
    /// `Ok(false)`: another open file holds a conflicting claim.
    pub fn try_lock(&self, exclusive: bool) -> Result<bool> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        } | libc::LOCK_NB;
        // SAFETY: flock on the descriptor `self.file` owns and keeps open; no
        // memory is passed.
        if unsafe { libc::flock(self.file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(Error::io(&self.path, e))
        }
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
                if let Err(e) = crate::uring::probe() {
                    let why = io::Error::new(e.kind(), format!("io_uring unavailable ({e})"));
                    return Err(Error::io(&path, why));
                }
                true
            }
        };
        Ok(IoFile {
            path,
            file,
            uring,
            uring_always: backend == IoBackend::Uring,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether io_uring carries this file's batched reads.
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

    /// Read up to `buf.len()` bytes; returns how many were read (short only at EOF).
    ///
    /// A single read is a plain `pread` unless the backend is
    /// [`IoBackend::Uring`]: on a warm page cache it costs less than a
    /// round trip through the ring (see the README's I/O section).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if self.uring_always {
            let mut r = [uring::Req::read(self.file.as_raw_fd(), offset, buf)];
            uring::run(&mut r, true);
            return r[0].take_result().map_err(|e| self.err(e));
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(done)
    }

    /// Read several ranges `(offset, buf)` of the file, each as
    /// [`IoFile::read_at`] would; with io_uring, all of them are in flight
    /// at once (one system call for the batch, and device reads overlap).
    pub fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<usize>> {
        if !self.uring || reqs.len() < 2 && !self.uring_always {
            return reqs
                .iter_mut()
                .map(|(off, buf)| self.read_at(buf, *off))
                .collect();
        }
        let fd = self.file.as_raw_fd();
        let mut rs: Vec<uring::Req<'_>> = reqs
            .iter_mut()
            .map(|(off, buf)| uring::Req::read(fd, *off, buf))
            .collect();
        uring::run(&mut rs, true);
        rs.iter_mut()
            .map(|r| r.take_result().map_err(|e| self.err(e)))
            .collect()
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

    /// Write all of `buf` at `offset` (`pwrite`, or io_uring with
    /// [`IoBackend::Uring`]: buffered writes through the ring are handed to
    /// kernel worker threads, which costs a wake-up each).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.uring_always {
            let mut r = [uring::Req::write(self.file.as_raw_fd(), offset, buf)];
            uring::run(&mut r, true);
            return r[0].take_result().map(|_| ()).map_err(|e| self.err(e));
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], offset + done as u64) {
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
        if self.uring_always {
            let mut r = [uring::Req::fsync(self.file.as_raw_fd())];
            uring::run(&mut r, true);
            r[0].take_result().map(|_| ()).map_err(|e| self.err(e))
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
        self.data_ranges_in(from, u64::MAX)
    }

    /// Like [`IoFile::data_ranges`], limited to `[from, to)`: the ranges are
    /// clipped to it and the scan stops at `to`.
    pub fn data_ranges_in(&self, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = from.min(i64::MAX as u64) as libc::off_t;
        while (pos as u64) < to {
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
            if start as u64 >= to {
                break;
            }
            out.push((start as u64, (end as u64).min(to)));
            pos = end;
        }
        Ok(out)
    }
}

/// Whether this process may write `p` (a file, or a directory to create files
/// in): `access(2)` with `W_OK`, which also reports a read-only filesystem.
pub fn check_writable(p: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `a` and `b` name the same existing file (same device and inode:
/// through links, `..` or another spelling).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// What a file that is not a regular one is, for messages ("a FIFO", ...);
/// `None` for a regular file.
fn irregular_kind(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

/// Refuses an output path that exists and is not a regular file (or a link
/// to one): a device, FIFO, socket or directory there is never replaced by
/// an output file (`-f` on `/dev/null` must not destroy it).
pub fn check_replaceable(out: &Path) -> crate::Result<()> {
    let Some(kind) = std::fs::metadata(out)
        .ok()
        .and_then(|m| irregular_kind(m.file_type()))
    else {
        return Ok(());
    };
    Err(crate::Error::Invalid(format!(
        "output {} exists and is {kind}: refusing to replace it with a file",
        out.display()
    )))
}

/// `e`, the error of creating the file `p`, or, when it is "not found"
/// because the directory of `p` does not exist, an error that says so (ENOENT
/// alone does not say which path, or which part of it, is missing: it reads as
/// if an input were missing).
pub fn name_missing_dir(p: &Path, e: crate::Error) -> crate::Error {
    match (&e, p.parent()) {
        (crate::Error::Io { source, .. }, Some(dir))
            if source.kind() == std::io::ErrorKind::NotFound
                && !dir.as_os_str().is_empty()
                && !dir.exists() =>
        {
            crate::Error::Invalid(format!(
                "cannot create {}: the directory {} does not exist",
                p.display(),
                dir.display()
            ))
        }
        _ => e,
    }
}

/// Why an input path is not a regular file ([`check_regular_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRegular {
    /// Nothing is there.
    Missing,
    /// Something else is: "a FIFO", "a directory", ...
    Is(&'static str),
}

/// The one check of input files: `refuse` chooses the error (or, returning
/// `None`, lets it pass) when `path` is missing or exists and is not a
/// regular file (or a link to one). Opening a FIFO to read it would wait
/// for a writer, forever; a device or a directory is no layer or config.
/// A path that cannot be looked at (no permission) passes: opening it then
/// says why.
pub fn check_regular_with<E>(
    path: &Path,
    refuse: impl FnOnce(NotRegular) -> Option<E>,
) -> std::result::Result<(), E> {
    let why = match std::fs::metadata(path) {
        Ok(m) => irregular_kind(m.file_type()).map(NotRegular::Is),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(NotRegular::Missing),
        Err(_) => None,
    };
    match why.and_then(refuse) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Why a file of `len` bytes cannot be made (`set_len` failed with EFBIG):
/// this process's file size limit (`ulimit -f`, RLIMIT_FSIZE) is smaller,
/// or else the filesystem's largest file is. `what` names the file ("a
/// sparse file").
pub fn too_large_to_make(what: &str, len: u64) -> String {
    match file_size_limit() {
        Some(limit) if limit < len => format!(
            "{what} of {len} bytes is larger than this process's file size limit (ulimit -f) \
             of {limit} bytes: raise the limit or choose a smaller virtual size"
        ),
        _ => format!(
            "the filesystem cannot hold {what} of {len} bytes (its largest file size is \
             smaller; ext4 with 4 KiB blocks allows 16 TiB): choose a smaller virtual size or \
             another filesystem"
        ),
    }
}

/// This process's file size limit (`ulimit -f`, the soft RLIMIT_FSIZE) in
/// bytes, if it has one: writes past it fail with EFBIG (the binaries ignore
/// SIGXFSZ), as they do past the filesystem's largest file size.
pub fn file_size_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    getrlimit(Resource::RLIMIT_FSIZE)
        .ok()
        .map(|(soft, _)| soft)
        .filter(|&soft| soft != RLIM_INFINITY)
}

/// Refuses an input `path` that exists and is not a regular file (or a link
/// to one), naming it and what it is: `what` it should be ("a layer file").
/// A missing path passes: opening it then says so.
pub fn check_regular(path: &Path, what: &str) -> crate::Result<()> {
    check_regular_with(path, |why| match why {
        NotRegular::Missing => None,
        NotRegular::Is(kind) => Some(crate::Error::Invalid(format!(
            "{}: not {what}: it is {kind}",
            path.display()
        ))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--io uring` without io_uring (a thread whose seccomp filter refuses
    /// `io_uring_setup`) fails at open, naming the file and the kernel's
    /// reason.
    #[test]
    fn a_forced_uring_open_says_why_io_uring_is_unavailable() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("layer");
        std::fs::write(&f, b"x").unwrap();
        let (msg, auto_uses_uring) = std::thread::spawn(move || {
            crate::uring::tests::refuse_io_uring_setup_on_this_thread();
            let open = |backend| IoFile::open_with(&f, OpenOptions::new().read(true), backend);
            let e = open(IoBackend::Uring).unwrap_err();
            let msg = (e.to_string(), crate::error::Chain(&e).to_string());
            // Automatic choice falls back to pread there.
            (msg, open(IoBackend::Auto).unwrap().uses_uring())
        })
        .join()
        .unwrap();
        assert!(msg.0.contains("layer"), "{msg:?}");
        assert!(
            msg.1
                .contains("io_uring unavailable (Function not implemented"),
            "{msg:?}"
        );
        assert!(!auto_uses_uring);
    }

    #[test]
    fn only_regular_files_are_replaceable() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        assert!(check_replaceable(&f).is_ok(), "a new path");
        std::fs::write(&f, b"x").unwrap();
        assert!(check_replaceable(&f).is_ok(), "a regular file");
        let fifo = d.path().join("p");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for (p, kind) in [
            (Path::new("/dev/null"), "a character device"),
            (fifo.as_path(), "a FIFO"),
            (d.path(), "a directory"),
        ] {
            let e = check_replaceable(p).unwrap_err().to_string();
            assert!(e.contains(kind) && e.contains(&*p.to_string_lossy()), "{e}");
            // The same files are no inputs either.
            let e = check_regular(p, "a layer file").unwrap_err().to_string();
            assert_eq!(
                e,
                format!("{}: not a layer file: it is {kind}", p.display())
            );
        }
        assert!(check_regular(&f, "a layer file").is_ok());
        assert!(check_regular(&d.path().join("missing"), "a layer file").is_ok());
        // The caller chooses the message, also for a missing path.
        let why = |p: &Path| check_regular_with(p, Some).err();
        assert_eq!(why(&f), None);
        assert_eq!(why(&d.path().join("missing")), Some(NotRegular::Missing));
        assert_eq!(why(&fifo), Some(NotRegular::Is("a FIFO")));
        assert_eq!(why(d.path()), Some(NotRegular::Is("a directory")));
    }

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
        if !crate::uring::test_gate() {
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
