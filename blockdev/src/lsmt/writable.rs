//! Writable LSMT layers, as `overlaybd-create` makes them.
//!
//! Append mode: the data file is `header | data appended in write order`, the
//! index file is `header | 16-byte entries appended in write order` (later
//! entries win on overlap; padding entries are skipped). Sparse mode (`-s`):
//! the data file is `header | data at 4096 + logical offset`, truncated to
//! `4096 + virtual size`; the index file stays empty and the index is
//! rebuilt from the data file's allocated ranges (SEEK_DATA/SEEK_HOLE).
//!
//! Warp mode (TurboOCI, `overlaybd-create --turboOCI`, upstream's
//! `LSMTWarpFile`): the data file has **no header** and holds every write at
//! its own offset (`moffset == offset`), truncated to the virtual size; the
//! index file is `header | 16-byte entries` as in append mode, and entries
//! carry a tag: 0 = data in the data file, 1 = "target" data that lives in
//! the layer's uncompressed tar at `moffset` ([`WritableLayer::map_target`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::format::*;
use super::index::IndexMap;
use super::packed::PackedStore;
use crate::error::{Error, Result};
use crate::io::IoFile;
use crate::source::ReadAt;
use crate::uuid::Uuid;

/// Tag of warp entries whose data is in the layer's data file.
pub const TAG_FS_META: u8 = 0;
/// Tag of warp entries whose data is in the layer's target (the tar).
pub const TAG_TARGET: u8 = 1;

/// Options of [`create_writable`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size in bytes; 0 means "take it from the lower layers".
    pub virtual_size: u64,
    /// Sparse data file instead of append mode.
    pub sparse: bool,
    /// Parent layer uuid recorded in the header.
    pub parent_uuid: Option<Uuid>,
    /// Uuid of the new layer; `None` picks a random one, as upstream does.
    pub uuid: Option<Uuid>,
}

fn random_uuid() -> Uuid {
    let mut b = [0u8; 16];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut &f, &mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid(b)
}

/// Create a writable warp (TurboOCI) layer, as `overlaybd-create
/// --turboOCI`: `index` gets an LSMT index header (virtual size, a random
/// uuid unless given), `data` becomes a sparse headerless file of
/// `virtual_size` bytes. Both files must not exist.
pub fn create_warp(data: &Path, index: &Path, virtual_size: u64, uuid: Option<Uuid>) -> Result<()> {
    if !virtual_size.is_multiple_of(SECTOR) || virtual_size == 0 {
        return Err(Error::Invalid(format!(
            "virtual size {virtual_size} is not a positive multiple of 512"
        )));
    }
    check_writable_vsize(virtual_size).map_err(Error::Invalid)?;
    create_pair(data, index, |fdata, findex| {
        let h = HeaderTrailer {
            flags: FLAG_HEADER,
            index_offset: HT_SPACE as u64,
            virtual_size,
            uuid: uuid.unwrap_or_else(random_uuid),
            ..Default::default()
        };
        findex.write_all_at(&h.encode(), 0)?;
        set_sparse_len(fdata, data, virtual_size)
    })
}

/// Claims the data file of a writable layer for this open (see
/// [`IoFile::try_lock`]): exclusively to write it, shared to read it, so that
/// two processes never write one layer at once (an `overlaybd-nbd` serving it
/// and an `overlaybd-apply`, say: each would overwrite the other's blocks and
/// index), and a layer being written is not read (committed) meanwhile.
///
/// A claim held by another process is waited for up to [`set_claim_wait`]
/// (none unless set): a server stopped just before (`fusermount -u`, a
/// signal) may still be flushing the layer when the next tool opens it.
/// After [`CLAIM_NOTICE_AFTER`] the holder is looked up (every 100 ms): one
/// that runs on idle ([`ClaimHolder::runs_on`] at [`IDLE_LOOKS`] looks in a row: a
/// server serving the layer) will not let go by itself, and the error comes
/// at once; otherwise (one that is exiting or busy, or none identified) the
/// [`set_claim_notice`] callback (if any) is told once and the wait goes on.
/// The error names the holder when it is a live process that is not exiting.
fn claim(f: &IoFile, read_only: bool) -> Result<()> {
    let wait = claim_wait();
    let start = Instant::now();
    let deadline = start + wait;
    let mut noticed = false;
    let mut next_look = start + CLAIM_NOTICE_AFTER;
    // The holder found idle at the last looks, and at how many in a row: one
    // idle at every look for half a second runs on (not one caught between
    // two writes of its flush, or between its flush and its exit).
    let mut idle_before: Option<(u32, u32)> = None;
    let mut search = HolderSearch::default();
    // The lock's key, worked out at the first look (from the open file) and
    // kept for the wait.
    let key = std::cell::OnceCell::new();
    // The holder, if one is found; `None` once the claim is taken: a lock
    // `/proc/locks` does not list may have been let go just before it was
    // read, rather than held from outside, so it is tried again then.
    let look = |search: &mut HolderSearch| -> Result<Option<Option<ClaimHolder>>> {
        let holder = key
            .get_or_init(|| lock_key(f.file()))
            .as_deref()
            .and_then(|key| claim_holder_with(key, search));
        if search.outside && f.try_lock(!read_only)? {
            return Ok(None);
        }
        Ok(Some(holder))
    };
    loop {
        if f.try_lock(!read_only)? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_look {
            next_look = now + Duration::from_millis(100);
            let Some(holder) = look(&mut search)? else {
                return Ok(());
            };
            let idle = holder.as_ref().filter(|h| h.runs_on()).map(|h| {
                let looks = match idle_before {
                    Some((pid, n)) if pid == h.pid => n + 1,
                    _ => 1,
                };
                (h.pid, looks)
            });
            if idle.is_some_and(|(_, n)| n >= IDLE_LOOKS) {
                return Err(in_use(
                    f,
                    read_only,
                    holder.as_ref(),
                    &search,
                    format!(
                        " (it has held it for {} s and is not exiting)",
                        (now - start).as_secs()
                    ),
                ));
            }
            idle_before = idle;
            // (An idle holder is looked at again before anything is said.)
            if !noticed && idle.is_none() {
                noticed = true;
                if let Some(notice) = *CLAIM_NOTICE.read().unwrap_or_else(|p| p.into_inner()) {
                    let who = who(holder.as_ref(), &search);
                    notice(&format!(
                        "waiting up to {} s for {}: in use by another process{who} ...",
                        wait.as_secs_f64(),
                        f.path().display()
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The holder named when it runs on (not one that is exiting now).
    let Some(holder) = look(&mut search)? else {
        return Ok(());
    };
    let holder = holder.filter(|h| h.live);
    let waited = if wait.is_zero() {
        String::new()
    } else {
        format!(" (waited {} s for it to let go)", wait.as_secs_f64())
    };
    Err(in_use(f, read_only, holder.as_ref(), &search, waited))
}

/// Looks (100 ms apart) at which a claim's holder must be found idle before
/// opening gives up on it.
const IDLE_LOOKS: u32 = 6;

/// What follows "another process" when a claim's holder is described: " (pid
/// N, NAME)"; " not visible here (...)" when the latest look found the lock
/// unlisted or listed as pid 0 (a process in another pid namespace, or on
/// another machine for a file on a network filesystem); else nothing.
fn who(holder: Option<&ClaimHolder>, search: &HolderSearch) -> String {
    match holder {
        Some(h) => format!(" ({h})"),
        None if search.outside => {
            " not visible here (in another pid namespace: on the host or in another \
             container; or on another machine)"
                .to_string()
        }
        None => String::new(),
    }
}

/// "PATH: the layer is in use: another process (HOLDER) is writing it; stop
/// that first" and `why`; when no holder is named, which tools hold layers.
fn in_use(
    f: &IoFile,
    read_only: bool,
    holder: Option<&ClaimHolder>,
    search: &HolderSearch,
    why: String,
) -> Error {
    let who = who(holder, search);
    let kinds = match holder {
        Some(_) => "",
        None => " (an overlaybd-nbd, overlaybd-fuse, overlaybd-apply or overlaybd-commit)",
    };
    Error::Invalid(format!(
        "{}: the layer is in use: another process{who} is {} it{kinds}; stop that first{why}",
        f.path().display(),
        if read_only { "writing" } else { "using" },
    ))
}

/// How long opening a writable layer waits before telling the [`set_claim_notice`] callback.
pub const CLAIM_NOTICE_AFTER: Duration = Duration::from_secs(1);

/// What is told about a wait for another process's claim: one line.
pub type ClaimNotice = fn(&str);

static CLAIM_NOTICE: std::sync::RwLock<Option<ClaimNotice>> = std::sync::RwLock::new(None);

/// Have opening a writable layer that another process holds call `notice`
/// with one line ("waiting up to 10 s for PATH: in use by another process
/// (pid N, NAME) ...") once it has waited [`CLAIM_NOTICE_AFTER`] (only when
/// [`set_claim_wait`] lets it wait that long). By default nothing is told:
/// the library prints nothing; the tools print the line on stderr.
pub fn set_claim_notice(notice: Option<ClaimNotice>) {
    *CLAIM_NOTICE.write().unwrap_or_else(|p| p.into_inner()) = notice;
}

/// A process holding an `flock` claim on a file, from `/proc/locks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHolder {
    /// Its pid (as `/proc/locks` records it: the process that took the lock).
    pub pid: u32,
    /// Its program name (`argv[0]`'s file name, else `comm`), if readable.
    pub name: Option<String>,
    /// Whether it is running (not a zombie, not exiting).
    pub live: bool,
    /// Whether one of its threads was running or in uninterruptible I/O
    /// (state `R` or `D`, as a server flushing a layer before it exits is)
    /// rather than every thread sleeping.
    pub busy: bool,
}

impl ClaimHolder {
    /// A live holder that is neither exiting nor busy: a process that keeps
    /// the layer (a server serving it, waiting for requests), not one about
    /// to let go, so waiting for it is pointless.
    pub fn runs_on(&self) -> bool {
        self.live && !self.busy
    }
}

impl std::fmt::Display for ClaimHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(n) = &self.name {
            write!(f, ", {n}")?;
        }
        if !self.live {
            f.write_str(", exiting")?;
        }
        Ok(())
    }
}

/// The fields of a `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) line
/// after "(comm) ": state, ppid, pgrp, session, tty_nr, tpgid, flags, ...
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default()
}

/// Whether `line` (of `/proc/locks`, or a `lock:` line of an fdinfo file,
/// without its prefix) is an `flock` held on the file `want`
/// ("MAJOR:MINOR:INODE"): "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0
/// EOF"; waiters read "1: -> FLOCK ...". Returns the pid it records.
fn flock_on(line: &str, want: &str) -> Option<u32> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&want) {
        return None;
    }
    f.get(4)?.parse().ok()
}

/// Whether process `pid` holds an `flock` on `want` through one of its
/// open files (`/proc/PID/fdinfo/*` list the locks held through each);
/// `None` if its open files are not ours to look at (another user's
/// process, to one without `CAP_SYS_PTRACE`).
fn holds_flock(pid: u32, want: &str) -> Option<bool> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => return Some(false),
    };
    Some(dir.flatten().any(|e| {
        std::fs::read_to_string(e.path()).is_ok_and(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("lock:"))
                .any(|l| flock_on(l, want).is_some())
        })
    }))
}

/// How `/proc/locks` names the file `f`: "MAJOR:MINOR:INODE" in hex, the
/// device being that of the file system's superblock.
fn lock_key(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().ok()?;
    let (major, minor) = mount_dev(f).unwrap_or((libc::major(m.dev()), libc::minor(m.dev())));
    Some(format!("{major:02x}:{minor:02x}:{}", m.ino()))
}

/// The device (major, minor) of the file system `f` is on, as
/// `/proc/locks` gives it: its superblock's, which `/proc/self/mountinfo`
/// lists for the file's mount. `stat`'s device differs on btrfs (each
/// subvolume has one of its own) and on an overlayfs over several file
/// systems (the layer's), where a lock keyed by it is never found.
fn mount_dev(f: &std::fs::File) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).ok()?;
    let id = info.lines().find_map(|l| l.strip_prefix("mnt_id:"))?.trim();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        // "ID PARENT MAJOR:MINOR ROOT MOUNT_POINT ..."
        let mut f = l.split(' ');
        if f.next()? != id {
            return None;
        }
        let (major, minor) = f.nth(1)?.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

/// What the last search of every process's open files for a claim's holder
/// found, so that the looks of a wait (100 ms apart) do not repeat it: it
/// reads a file per open file of every process (a few milliseconds with a
/// hundred processes, far more than 100 ms on a host running thousands).
#[derive(Debug, Default)]
struct HolderSearch {
    /// The pid `/proc/locks` recorded at the search (0: none, or unlisted),
    /// and the holder found.
    last: Option<(u32, Option<u32>)>,
    /// Whether the latest look found the lock held by a process this one
    /// cannot see: `/proc/locks` lists only the locks of processes this pid
    /// namespace sees (older kernels list the others with pid 0), and not
    /// the locks other machines hold on a network filesystem's file, so a
    /// lock that `flock` finds taken but `/proc/locks` does not list, or
    /// lists as pid 0, while no process here holds it (by its open files'
    /// `lock:` lines), is held from outside.
    outside: bool,
    /// Searches made (for the test that they are not repeated).
    #[cfg(test)]
    searches: u32,
}

/// Another process holding an `flock` on `path`, if one can be found (the
/// first listed; waiters are skipped).
///
/// `/proc/locks` records the process that took the lock, but the lock
/// belongs to the open file: a child that inherited it (a server that
/// forked, then exited in the parent) holds it after the recorded process
/// is gone, and a holder outside this pid namespace is not listed (older
/// kernels list it as pid 0); nor, in a pid namespace other than the
/// first, is a lock whose recorded process is gone. The recorded process
/// is named only if it still holds the lock through one of its files (or
/// its files cannot be looked at: another user's process); otherwise (or
/// when the lock is not listed) every process's open files are searched
/// for it.
pub fn claim_holder(path: &Path) -> Option<ClaimHolder> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .ok()?;
    claim_holder_with(&lock_key(&f)?, &mut HolderSearch::default())
}

/// [`claim_holder`] of the file whose lock key ([`lock_key`]) is `want`,
/// searching every process's open files only if `search`
/// (the previous look's) was made for another recorded pid, or the holder
/// it found no longer holds the lock. A search that found nothing is not
/// repeated for the same recorded pid (the holder is outside this pid
/// namespace, or this process, or another user's: it stays unseen).
fn claim_holder_with(want: &str, search: &mut HolderSearch) -> Option<ClaimHolder> {
    search.outside = false;
    let me = std::process::id();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // Unlisted, the lock is looked for as one listed as pid 0 is: its
    // recorded process is not in this pid namespace, yet the holder may be
    // (a child that inherited it from a process gone since, which the
    // kernel can no longer translate); the `lock:` lines of open files
    // list it (as pid 0).
    let recorded = locks.lines().find_map(|l| flock_on(l, want)).unwrap_or(0);
    let pid = if recorded != 0 && recorded != me && holds_flock(recorded, want) != Some(false) {
        recorded
    } else {
        let found = match search.last {
            Some((r, found))
                if r == recorded && found.is_none_or(|p| holds_flock(p, want) == Some(true)) =>
            {
                found
            }
            _ => {
                #[cfg(test)]
                {
                    search.searches += 1;
                }
                let found = std::fs::read_dir("/proc")
                    .ok()?
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|&p| p != me)
                    .find(|&p| holds_flock(p, want) == Some(true));
                search.last = Some((recorded, found));
                found
            }
        };
        search.outside = found.is_none() && recorded == 0;
        found?
    };
    let proc = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{proc}/stat")).ok();
    let rest = stat.as_deref().map(stat_fields).unwrap_or_default();
    let state = rest.first().copied();
    let live = state.is_some_and(|st| {
        const PF_EXITING: u64 = 0x4;
        let flags: u64 = rest.get(6).and_then(|x| x.parse().ok()).unwrap_or(0);
        !matches!(st, "Z" | "X" | "x") && flags & PF_EXITING == 0
    });
    // Any thread: a server flushes on a worker while its main thread waits
    // (io_uring's io-wq workers are threads of the process too).
    let working = |state: Option<&str>| matches!(state, Some("R" | "D"));
    let busy = working(state)
        || std::fs::read_dir(format!("{proc}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .is_ok_and(|s| working(stat_fields(&s).first().copied()))
            });
    let name = std::fs::read(format!("{proc}/cmdline"))
        .ok()
        .and_then(|c| {
            let argv0 = c.split(|&b| b == 0).next()?;
            let base = argv0.rsplit(|&b| b == b'/').next()?;
            (!base.is_empty()).then(|| String::from_utf8_lossy(base).into_owned())
        })
        .or_else(|| {
            std::fs::read_to_string(format!("{proc}/comm"))
                .ok()
                .map(|c| c.trim_end().to_string())
        })
        .filter(|n| !n.is_empty());
    Some(ClaimHolder {
        pid,
        name,
        live,
        busy,
    })
}

/// How long the tools (`overlaybd-commit`, `-apply`, `-nbd`, `-fuse`,
/// `turboOCI-apply`) wait for another process to let go of a writable layer
/// ([`set_claim_wait`]): a server just stopped (`fusermount -u` returns
/// before the daemon has flushed the upper and exited; `kill` before the
/// server has) still holds it for a moment, and
/// `fusermount -u M && overlaybd-commit data index out` must work.
pub const TOOL_CLAIM_WAIT: Duration = Duration::from_secs(10);

/// Milliseconds [`claim`] waits for another process's claim to end.
static CLAIM_WAIT_MS: AtomicU64 = AtomicU64::new(0);

/// How long opening a writable layer that another process holds waits for
/// it to let go before failing with "the layer is in use" (default: not at
/// all). The tools set a few seconds: a server that was just stopped
/// (`fusermount -u` returns before the daemon has flushed the upper and
/// exited) still holds the layer for a moment.
pub fn set_claim_wait(wait: Duration) {
    CLAIM_WAIT_MS.store(
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

fn claim_wait() -> Duration {
    Duration::from_millis(CLAIM_WAIT_MS.load(Ordering::Relaxed))
}

/// Open a layer file for reading, or also for writing unless `read_only`.
/// Anything but a regular file is refused first (a FIFO's open for reading
/// would wait for a writer).
fn open_file(p: &Path, read_only: bool) -> Result<IoFile> {
    crate::io::check_regular(p, "a layer file")?;
    if read_only {
        IoFile::open(p)
    } else {
        IoFile::open_rw(p)
    }
}

/// Create the new files `data` and `index` and fill them with `fill`; on
/// any failure neither is left behind (a retry would find them in the way).
fn create_pair(
    data: &Path,
    index: &Path,
    fill: impl FnOnce(&IoFile, &IoFile) -> Result<()>,
) -> Result<()> {
    if data == index {
        return Err(Error::Invalid(format!(
            "the data and index files are the same path, {}",
            data.display()
        )));
    }
    let fdata = create_new(data)?;
    let r = create_new(index).and_then(|findex| {
        fill(&fdata, &findex).inspect_err(|_| {
            let _ = std::fs::remove_file(index);
        })
    });
    if r.is_err() {
        let _ = std::fs::remove_file(data);
    }
    r
}

/// For a header in the wrong file of a writable pair: what the file is, when
/// it is the other file of a pair (the paths given the wrong way round).
fn swapped_hint(h: &HeaderTrailer) -> &'static str {
    match (h.is_header(), h.is_data_file(), h.is_sealed()) {
        (true, false, false) => " (it is an index file: are the data and index files swapped?)",
        (true, true, false) => " (it is a data file: are the data and index files swapped?)",
        _ => "",
    }
}

/// The LSMT header at the start of the file `p`, if it has one (to tell
/// swapped paths; any failure to read it is no header). Only a regular
/// file is opened (a FIFO would block).
fn index_header(p: &Path) -> Option<HeaderTrailer> {
    if !std::fs::metadata(p).ok()?.is_file() {
        return None;
    }
    let f = std::fs::File::open(p).ok()?;
    let mut buf = vec![0u8; HT_SPACE];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).ok()?;
    HeaderTrailer::decode(&buf)
}

/// Create the new file `p`; a missing directory is named
/// ([`crate::io::name_missing_dir`]).
fn create_new(p: &Path) -> Result<IoFile> {
    IoFile::create_new(p).map_err(|e| crate::io::name_missing_dir(p, e))
}

/// Size the sparse data file `f` (at `path`) to `len` bytes, saying so when
/// the filesystem cannot hold a file that large.
fn set_sparse_len(f: &IoFile, path: &Path, len: u64) -> Result<()> {
    f.set_len(len).map_err(|e| match &e {
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFBIG) => {
            Error::Invalid(format!(
                "{}: {}",
                path.display(),
                crate::io::too_large_to_make("a sparse file", len)
            ))
        }
        _ => e,
    })
}

/// Create a writable layer (both files must not exist).
pub fn create_writable(data: &Path, index: &Path, opts: &CreateOptions) -> Result<()> {
    // Nothing that opening the layer would refuse.
    check_writable_vsize(opts.virtual_size).map_err(Error::Invalid)?;
    create_pair(data, index, |fdata, findex| {
        let mut h = HeaderTrailer {
            flags: FLAG_HEADER | FLAG_DATA,
            virtual_size: opts.virtual_size,
            uuid: opts.uuid.unwrap_or_else(random_uuid),
            parent_uuid: opts.parent_uuid.unwrap_or(Uuid::NIL),
            ..Default::default()
        };
        if opts.sparse {
            h.flags |= FLAG_SPARSE_RW;
        }
        fdata.write_all_at(&h.encode(), 0)?;
        if opts.sparse {
            let len = (HT_SPACE as u64)
                .checked_add(opts.virtual_size)
                .ok_or_else(|| Error::Invalid("virtual size too large".into()))?;
            set_sparse_len(fdata, data, len)
        } else {
            let mut hi = h.clone();
            hi.flags = FLAG_HEADER;
            hi.index_offset = HT_SPACE as u64;
            findex.write_all_at(&hi.encode(), 0)
        }
    })
}

/// Create a sparse writable layer whose data is packed ([`PackedStore`] in the new
/// file `side`) instead of a data file: the same header as [`create_writable`] with
/// `sparse`, its blocks stored as 4 KiB ZFile blocks of `zfile`'s algorithm and
/// checksums, ready for [`crate::commit::commit_packed`]. Open it with
/// [`WritableLayer::open_packed`].
pub fn create_packed(
    side: &Path,
    opts: &CreateOptions,
    zfile: &crate::zfile::ZfileOptions,
) -> Result<Arc<PackedStore>> {
    check_writable_vsize(opts.virtual_size).map_err(Error::Invalid)?;
    if zfile.block_size as u64 != super::packed::BLOCK {
        return Err(Error::Invalid(format!(
            "a packed layer stores 4 KiB ZFile blocks, not {} bytes",
            zfile.block_size
        )));
    }
    let h = HeaderTrailer {
        flags: FLAG_HEADER | FLAG_DATA | FLAG_SPARSE_RW,
        virtual_size: opts.virtual_size,
        uuid: opts.uuid.unwrap_or_else(random_uuid),
        parent_uuid: opts.parent_uuid.unwrap_or(Uuid::NIL),
        ..Default::default()
    };
    let len = (HT_SPACE as u64)
        .checked_add(opts.virtual_size)
        .ok_or_else(|| Error::Invalid("virtual size too large".into()))?;
    Ok(Arc::new(PackedStore::create(
        side,
        &h.encode(),
        len,
        zfile.algorithm,
        zfile.verify,
        zfile.threads,
    )?))
}

/// Where a writable layer's data is: its data file, or packed ZFile blocks
/// (sparse layers that this process commits itself, [`create_packed`]).
enum DataFile {
    File(IoFile),
    Packed(Arc<PackedStore>),
}

impl DataFile {
    fn path(&self) -> &Path {
        match self {
            DataFile::File(f) => f.path(),
            DataFile::Packed(p) => p.path(),
        }
    }
    fn len(&self) -> Result<u64> {
        match self {
            DataFile::File(f) => f.len(),
            DataFile::Packed(p) => p.len(),
        }
    }
    fn set_len(&self, len: u64) -> Result<()> {
        match self {
            DataFile::File(f) => f.set_len(len),
            DataFile::Packed(p) => p.set_len(len),
        }
    }
    fn sync(&self) -> Result<()> {
        match self {
            DataFile::File(f) => f.sync(),
            DataFile::Packed(p) => p.sync(),
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        match self {
            DataFile::File(f) => f.read_at(buf, offset),
            DataFile::Packed(p) => p.read_at(buf, offset),
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            DataFile::File(f) => f.read_exact_at(buf, offset),
            DataFile::Packed(p) => p.read_exact_at(buf, offset),
        }
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<usize>> {
        match self {
            DataFile::File(f) => f.read_many(reqs),
            DataFile::Packed(p) => p.read_many(reqs),
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            DataFile::File(f) => f.write_all_at(buf, offset),
            DataFile::Packed(p) => p.write_all_at(buf, offset),
        }
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            DataFile::File(f) => f.punch_hole(offset, len),
            DataFile::Packed(p) => p.punch_hole(offset, len),
        }
    }
    fn data_ranges(&self, from: u64) -> Result<Vec<(u64, u64)>> {
        match self {
            DataFile::File(f) => f.data_ranges(from),
            DataFile::Packed(p) => p.data_ranges(from),
        }
    }
}

struct RwState {
    index: IndexMap,
    /// Append position of the data file (bytes).
    data_end: u64,
    /// Entries not yet appended to the index file.
    pending: Vec<Mapping>,
    /// Append position of the index file (bytes).
    index_end: u64,
    /// The owner was given an error by the last write or attempt to append
    /// `pending` (nothing was recorded since): it reports the failure and
    /// discards or saves the layer, so the drop, which tries to append
    /// `pending` again, does not log a failure of its own as well (on a
    /// full disk: the same one, or the index's after the data's).
    failure_returned: bool,
}

/// Largest single write mapping, in sectors (upstream's 4 MiB MAX_IO_SIZE).
const MAX_IO_SECTORS: u64 = 8192;
/// Pending index entries flushed to the index file at once.
const INDEX_BATCH: usize = 4096;

/// An open writable layer.
pub struct WritableLayer {
    data: DataFile,
    index_file: Option<IoFile>,
    header: Mutex<HeaderTrailer>,
    sparse: bool,
    /// Warp (TurboOCI) layer: headerless data file, tagged entries.
    warp: bool,
    /// The uncompressed layer tar of a warp layer (tag-1 data), if known.
    target: Option<Arc<dyn ReadAt>>,
    read_only: bool,
    /// [`WritableLayer::flush`] fsyncs (false for scratch layers that are committed
    /// and deleted, e.g. the convertor's: [`WritableLayer::scratch`]).
    durable: bool,
    /// Set by [`WritableLayer::freeze`]: every later change is refused. Set
    /// while holding `state`, so a change that records under that lock
    /// either is in what `freeze` saved or is refused.
    frozen: AtomicBool,
    state: Mutex<RwState>,
}

impl std::fmt::Debug for WritableLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritableLayer")
            .field("data", &self.data.path())
            .field("sparse", &self.sparse)
            .field("warp", &self.warp)
            .finish()
    }
}

impl WritableLayer {
    /// Open for writing.
    pub fn open(data: &Path, index: &Path) -> Result<Self> {
        Self::open_mode(data, index, false)
    }

    /// Open without write access (e.g. to commit it).
    pub fn open_read_only(data: &Path, index: &Path) -> Result<Self> {
        Self::open_mode(data, index, true)
    }

    /// Open a writable warp (TurboOCI) layer: `data` (headerless), `index`,
    /// and optionally the `target` its tag-1 entries point into (the
    /// uncompressed layer tar; needed only to read those ranges back).
    pub fn open_warp(
        data: &Path,
        index: &Path,
        target: Option<Arc<dyn ReadAt>>,
        read_only: bool,
    ) -> Result<Self> {
        let open = |p: &Path| open_file(p, read_only);
        let bad = |p: &Path, msg: String| Error::corrupt(p, "LSMT warp layer", msg);
        let data_file = open(data)?;
        claim(&data_file, read_only)?;
        let fi = open(index)?;
        let len = fi.len()?;
        if len < HT_SPACE as u64 {
            return Err(bad(index, format!("index file is only {len} bytes")));
        }
        let mut buf = vec![0u8; HT_SPACE];
        fi.read_exact_at(&mut buf, 0)?;
        if HeaderTrailer::has_magic(&buf[..HT_SPACE]) && data_file.len()? >= HT_SPACE as u64 {
            // A data file with an LSMT header is an ordinary writable layer.
            let mut d = vec![0u8; HT_SPACE];
            data_file.read_exact_at(&mut d, 0)?;
            if HeaderTrailer::has_magic(&d) {
                return Err(bad(
                    data,
                    "has an LSMT header: this is an ordinary writable layer, not a warp (TurboOCI) layer".into(),
                ));
            }
        }
        let ih =
            HeaderTrailer::decode(&buf).ok_or_else(|| bad(index, "bad header magic".into()))?;
        if !ih.is_header() || ih.is_data_file() || ih.is_sealed() {
            return Err(bad(
                index,
                format!(
                    "header flags {:#x} are not those of an index file{}",
                    ih.flags,
                    swapped_hint(&ih)
                ),
            ));
        }
        if ih.index_offset != HT_SPACE as u64 {
            return Err(bad(
                index,
                format!("index offset {} is not 4096", ih.index_offset),
            ));
        }
        check_writable_vsize(ih.virtual_size).map_err(|msg| bad(index, msg))?;
        let n = (len - HT_SPACE as u64) / ENTRY_SIZE as u64;
        if n > MAX_RW_INDEX_ENTRIES {
            return Err(bad(
                index,
                format!("index of {n} entries exceeds the maximum {MAX_RW_INDEX_ENTRIES}"),
            ));
        }
        let mut raw = vec![0u8; (n as usize) * ENTRY_SIZE];
        fi.read_exact_at(&mut raw, HT_SPACE as u64)?;
        let mut all: Vec<Mapping> = decode_entries(&raw)
            .into_iter()
            .filter(|m| !m.is_padding() && m.length > 0)
            .collect();
        // As upstream (warp_file_tag 3): tags are shifted so the smallest is 0.
        let min_tag = all.iter().map(|m| m.tag).min().unwrap_or(0);
        let data_sectors = ih.virtual_size / SECTOR;
        let target_sectors = target.as_ref().map(|t| t.size() / SECTOR);
        let mut index_map = IndexMap::new();
        for (i, m) in all.iter_mut().enumerate() {
            m.tag -= min_tag;
            super::sealed::check_within_vsize(m, i, ih.virtual_size)
                .map_err(|msg| bad(index, msg))?;
            check_warp_entry(m, i, data_sectors, target_sectors, target.as_deref())
                .map_err(|msg| bad(index, msg))?;
            index_map.insert(*m);
        }
        Ok(WritableLayer {
            data: DataFile::File(data_file),
            index_file: Some(fi),
            header: Mutex::new(ih),
            sparse: false,
            warp: true,
            target,
            read_only,
            durable: true,
            frozen: AtomicBool::new(false),
            state: Mutex::new(RwState {
                index: index_map,
                data_end: 0,
                pending: Vec::new(),
                index_end: HT_SPACE as u64 + n * ENTRY_SIZE as u64,
                failure_returned: false,
            }),
        })
    }

    fn open_mode(data_path: &Path, index_path: &Path, read_only: bool) -> Result<Self> {
        let data = open_file(data_path, read_only)?;
        claim(&data, read_only)?;
        Self::open_data(DataFile::File(data), index_path, read_only)
    }

    /// Open a packed sparse layer ([`create_packed`]); read-only views share the
    /// store with the layer being written (e.g. a lower of the next layer, or the
    /// commit), and see its allocation as a reopened sparse data file shows it.
    pub fn open_packed(store: Arc<PackedStore>, read_only: bool) -> Result<Self> {
        let path = store.path().to_path_buf();
        let l = Self::open_data(DataFile::Packed(store), &path, read_only)?;
        if !l.sparse {
            return Err(Error::Invalid(format!(
                "{}: a packed layer must be sparse",
                path.display()
            )));
        }
        Ok(l)
    }

    /// The packed store of this layer, if its data is packed.
    pub fn packed(&self) -> Option<&Arc<PackedStore>> {
        match &self.data {
            DataFile::Packed(p) => Some(p),
            DataFile::File(_) => None,
        }
    }

    fn open_data(data: DataFile, index_path: &Path, read_only: bool) -> Result<Self> {
        let data_path = data.path().to_path_buf();
        let data_path = data_path.as_path();
        let open = |p: &Path| open_file(p, read_only);
        let bad = |p: &Path, msg: String| Error::corrupt(p, "LSMT writable layer", msg);
        let data_len = data.len()?;
        if data_len < HT_SPACE as u64 {
            // A sparse layer's index file is empty: given as the data file
            // (the paths swapped), it is the index path that holds the header.
            let hint = match index_header(index_path) {
                Some(h) if h.is_header() && h.is_data_file() && !h.is_sealed() => format!(
                    " (and {} is a data file: are the data and index files swapped?)",
                    index_path.display()
                ),
                _ => String::new(),
            };
            return Err(bad(
                data_path,
                format!("data file is only {data_len} bytes{hint}"),
            ));
        }
        let mut buf = vec![0u8; HT_SPACE];
        data.read_exact_at(&mut buf, 0)?;
        let header =
            HeaderTrailer::decode(&buf).ok_or_else(|| bad(data_path, "bad header magic".into()))?;
        if !header.is_header() || !header.is_data_file() {
            return Err(bad(
                data_path,
                format!(
                    "header flags {:#x} are not those of a data file{}",
                    header.flags,
                    swapped_hint(&header)
                ),
            ));
        }
        if header.is_sealed() {
            return Err(bad(
                data_path,
                "layer is sealed; open it as a lower layer instead".into(),
            ));
        }
        // Sealing in place (`--seal`) leaves the header as it was and appends
        // the index and a trailer: such a file ends with a sealed trailer that
        // carries the header's uuid (a sealed layer stored as file data in
        // the filesystem, say, has another).
        if data_len >= 2 * HT_SPACE as u64 {
            let mut t = vec![0u8; HT_SPACE];
            data.read_exact_at(&mut t, data_len - HT_SPACE as u64)?;
            if HeaderTrailer::decode(&t)
                .is_some_and(|t| t.is_sealed() && !t.is_header() && t.uuid == header.uuid)
            {
                return Err(bad(
                    data_path,
                    "layer is already sealed (it ends with an LSMT trailer); open it as a lower layer, or commit it with --commit_sealed".into(),
                ));
            }
        }
        check_writable_vsize(header.virtual_size).map_err(|msg| bad(data_path, msg))?;
        let sparse = header.is_sparse_rw();
        let mut index = IndexMap::new();
        let mut index_file = None;
        let mut index_end = 0;
        if sparse && matches!(data, DataFile::File(_)) {
            // Unused (the index is the data file's allocation), but it is part of
            // the layer upstream's tools create: a mistyped path is an error.
            let m = std::fs::metadata(index_path).map_err(|e| Error::io(index_path, e))?;
            if !m.is_file() {
                return Err(bad(index_path, "index file is not a regular file".into()));
            }
        }
        if sparse {
            let base = HT_SPACE as u64;
            let vsize = header.virtual_size;
            for (start, end) in data.data_ranges(base)? {
                let start = start.max(base);
                let (s, e) = ((start - base) / SECTOR, (end - base).div_ceil(SECTOR));
                if vsize != 0 && e * SECTOR > vsize {
                    return Err(bad(
                        data_path,
                        format!(
                            "holds data at bytes {}..{} of the disk, beyond the virtual size of {vsize} bytes",
                            s * SECTOR,
                            e * SECTOR
                        ),
                    ));
                }
                let mut off = s;
                while off < e {
                    let len = (e - off).min(MAX_LENGTH as u64);
                    index.insert(Mapping::new(off, len as u32, off + base / SECTOR));
                    off += len;
                }
            }
        } else {
            let fi = open(index_path)?;
            let len = fi.len()?;
            if len < HT_SPACE as u64 {
                return Err(bad(index_path, format!("index file is only {len} bytes")));
            }
            fi.read_exact_at(&mut buf, 0)?;
            let ih = HeaderTrailer::decode(&buf)
                .ok_or_else(|| bad(index_path, "bad header magic".into()))?;
            if !ih.is_header() || ih.is_data_file() || ih.is_sealed() {
                return Err(bad(
                    index_path,
                    format!(
                        "header flags {:#x} are not those of an index file{}",
                        ih.flags,
                        swapped_hint(&ih)
                    ),
                ));
            }
            if ih.index_offset != HT_SPACE as u64 {
                return Err(bad(
                    index_path,
                    format!("index offset {} is not 4096", ih.index_offset),
                ));
            }
            // Both headers carry the layer's uuid (upstream writes the same one):
            // a data file with another layer's index would commit garbage.
            if ih.uuid != header.uuid {
                return Err(bad(
                    index_path,
                    format!(
                        "index of another layer: its uuid is {}, the data file {} has {}",
                        ih.uuid,
                        data_path.display(),
                        header.uuid
                    ),
                ));
            }
            let n = (len - HT_SPACE as u64) / ENTRY_SIZE as u64;
            if n > MAX_RW_INDEX_ENTRIES {
                return Err(bad(
                    index_path,
                    format!("index of {n} entries exceeds the maximum {MAX_RW_INDEX_ENTRIES}"),
                ));
            }
            let torn = (len - HT_SPACE as u64) % ENTRY_SIZE as u64;
            if torn != 0 {
                // An append cut short (a crash): the last write's entry is
                // incomplete, so that write is lost. Later entries overwrite it.
                tracing::warn!(
                    "{}: ignoring the last {torn} bytes, a partial index entry (an interrupted write?); the data of that write is not in the layer",
                    index_path.display()
                );
            }
            let data_end = data_len.div_ceil(SECTOR);
            let mut pos = HT_SPACE as u64;
            let chunk = 1 << 20;
            let mut raw = vec![0u8; chunk];
            let mut i = 0usize;
            while pos + ENTRY_SIZE as u64 <= len {
                let want = ((len - pos) as usize).min(chunk) / ENTRY_SIZE * ENTRY_SIZE;
                fi.read_exact_at(&mut raw[..want], pos)?;
                for m in decode_entries(&raw[..want]) {
                    if !m.is_padding() && m.length > 0 {
                        if !m.zeroed && (m.moffset < 8 || m.mend() > data_end) {
                            return Err(bad(
                                index_path,
                                format!(
                                    "entry {i} maps data file bytes {}..{} outside the data file (data at bytes 4096..{}, the file is {data_len} bytes)",
                                    sector_bytes(m.moffset),
                                    sector_bytes(m.mend()),
                                    sector_bytes(data_end)
                                ),
                            ));
                        }
                        super::sealed::check_within_vsize(&m, i, header.virtual_size)
                            .map_err(|msg| bad(index_path, msg))?;
                        index.insert(Mapping { tag: 0, ..m });
                    }
                    i += 1;
                }
                pos += want as u64;
            }
            index_end = pos;
            index_file = Some(fi);
        }
        Ok(WritableLayer {
            data,
            index_file,
            header: Mutex::new(header),
            sparse,
            warp: false,
            target: None,
            read_only,
            durable: true,
            frozen: AtomicBool::new(false),
            state: Mutex::new(RwState {
                index,
                data_end: data_len.div_ceil(SECTOR) * SECTOR,
                pending: Vec::new(),
                index_end,
                failure_returned: false,
            }),
        })
    }

    pub fn is_sparse(&self) -> bool {
        self.sparse
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether this is a warp (TurboOCI) layer.
    pub fn is_warp(&self) -> bool {
        self.warp
    }

    /// The target (uncompressed layer tar) of a warp layer, if opened with one.
    pub fn target(&self) -> Option<&Arc<dyn ReadAt>> {
        self.target.as_ref()
    }

    pub fn header(&self) -> HeaderTrailer {
        self.header.lock().clone()
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.lock().virtual_size
    }

    pub fn data_path(&self) -> &Path {
        self.data.path()
    }

    /// Persist a new virtual size (used when a layer created with size 0 is stacked).
    pub fn set_virtual_size(&self, vsize: u64) -> Result<()> {
        check_writable_vsize(vsize)
            .map_err(|msg| Error::Invalid(format!("{}: {msg}", self.data.path().display())))?;
        let mut h = self.header.lock();
        h.virtual_size = vsize;
        if self.warp {
            if let Some(fi) = &self.index_file {
                fi.write_all_at(&h.encode(), 0)?;
            }
            self.data.set_len(vsize)?;
            return Ok(());
        }
        self.data.write_all_at(&h.encode(), 0)?;
        if self.sparse {
            self.data.set_len(HT_SPACE as u64 + vsize)?;
        } else if let Some(fi) = &self.index_file {
            let mut buf = vec![0u8; HT_SPACE];
            fi.read_exact_at(&mut buf, 0)?;
            if let Some(mut ih) = HeaderTrailer::decode(&buf) {
                ih.virtual_size = vsize;
                fi.write_all_at(&ih.encode(), 0)?;
            }
        }
        Ok(())
    }

    /// Entries overlapping `[sector, sector+count)`, clipped.
    pub fn lookup(&self, sector: u64, count: u64) -> Vec<Mapping> {
        self.state.lock().index.lookup(sector, count)
    }

    /// A snapshot of the whole index, sorted.
    pub fn entries(&self) -> Vec<Mapping> {
        self.state.lock().index.to_vec()
    }

    /// Read the data of entry `m` (as returned by [`Self::lookup`]; its
    /// length is `buf.len()`): from the data file, or for tag-1 entries of a
    /// warp layer from the target.
    pub fn read_entry(&self, buf: &mut [u8], m: &Mapping) -> Result<()> {
        if self.warp && m.tag == TAG_TARGET {
            let Some(t) = &self.target else {
                return Err(Error::Invalid(format!(
                    "{}: reading target data of a warp layer opened without its target",
                    self.data.path().display()
                )));
            };
            return t.read_exact_at(buf, m.moffset * SECTOR);
        }
        self.read_mapped(buf, m.moffset)
    }

    /// Read `buf` (sector aligned) at logical byte `offset` of this layer
    /// alone: mapped ranges from the data file (or target), the rest zeros.
    pub fn read_logical(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = offset / SECTOR;
        let n = buf.len() as u64 / SECTOR;
        let maps = self.lookup(s, n);
        for p in super::index::pieces(s, n, &maps) {
            match p {
                super::index::Piece::Hole { offset: o, len } => {
                    let a = ((o - s) * SECTOR) as usize;
                    buf[a..a + (len * SECTOR) as usize].fill(0);
                }
                super::index::Piece::Mapped(m) => {
                    let a = ((m.offset - s) * SECTOR) as usize;
                    let b = &mut buf[a..a + m.length as usize * SECTOR as usize];
                    if m.zeroed {
                        b.fill(0);
                    } else {
                        self.read_entry(b, &m)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Read mapped data at sector `moffset` of the data file.
    pub fn read_mapped(&self, buf: &mut [u8], moffset: u64) -> Result<()> {
        let n = self.data.read_at(buf, moffset * SECTOR)?;
        // a sparse file may end inside a block: the rest is zeros
        buf[n..].fill(0);
        Ok(())
    }

    /// Several [`WritableLayer::read_mapped`] at once `(moffset, buf)`.
    pub fn read_mapped_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        for r in reqs.iter_mut() {
            r.0 *= SECTOR;
        }
        let results = self.data.read_many(reqs);
        reqs.iter_mut()
            .zip(results)
            .map(|((_, buf), r)| {
                let n = r?;
                buf[n..].fill(0);
                Ok(())
            })
            .collect()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only || self.frozen.load(Ordering::Acquire) {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn check_aligned(offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "unaligned layer I/O: offset {offset}, length {len} (must be multiples of 512)"
            )));
        }
        Ok(())
    }

    /// Write sector-aligned data at logical byte `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.write_data(buf, offset);
        if r.is_err() {
            self.state.lock().failure_returned = true;
        }
        r
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        Self::check_aligned(offset, buf.len() as u64)?;
        if self.warp {
            // As upstream's LSMTWarpFile::pwrite: data at its own offset, one
            // tag-0 entry per write (split only where an entry cannot hold it).
            self.data.write_all_at(buf, offset)?;
            let step = (MAX_IO_SECTORS * SECTOR) as usize;
            for (i, chunk) in buf.chunks(step).enumerate() {
                let s = offset / SECTOR + (i * step) as u64 / SECTOR;
                let n = (chunk.len() as u64 / SECTOR) as u32;
                self.record(Mapping::new(s, n, s))?;
            }
            return Ok(());
        }
        if self.sparse {
            self.data.write_all_at(buf, HT_SPACE as u64 + offset)?;
            let mut st = self.state.lock();
            self.check_writable()?;
            let mut s = offset / SECTOR;
            let end = s + buf.len() as u64 / SECTOR;
            while s < end {
                let n = (end - s).min(MAX_LENGTH as u64);
                st.index
                    .insert(Mapping::new(s, n as u32, s + HT_SPACE as u64 / SECTOR));
                s += n;
            }
            return Ok(());
        }
        let step = (MAX_IO_SECTORS * SECTOR) as usize;
        for (i, chunk) in buf.chunks(step).enumerate() {
            let logical = offset / SECTOR + (i * step) as u64 / SECTOR;
            let pos = {
                let mut st = self.state.lock();
                let p = st.data_end;
                st.data_end += chunk.len() as u64;
                p
            };
            self.data.write_all_at(chunk, pos)?;
            let m = Mapping::new(logical, (chunk.len() as u64 / SECTOR) as u32, pos / SECTOR);
            self.record(m)?;
        }
        Ok(())
    }

    fn record(&self, m: Mapping) -> Result<()> {
        let mut st = self.state.lock();
        // Checked again under the lock: a write that began before
        // [`Self::freeze`] must not complete after it unsaved.
        self.check_writable()?;
        st.index.insert(m);
        st.pending.push(m);
        st.failure_returned = false;
        if st.pending.len() >= INDEX_BATCH {
            self.save_pending(&mut st)?;
        }
        Ok(())
    }

    /// [`Self::flush_index`] for a caller that returns its error: a failure
    /// is then not logged again by the drop.
    fn save_pending(&self, st: &mut RwState) -> Result<()> {
        let r = self.flush_index(st);
        st.failure_returned = r.is_err();
        r
    }

    fn flush_index(&self, st: &mut RwState) -> Result<()> {
        if st.pending.is_empty() {
            return Ok(());
        }
        if let Some(fi) = &self.index_file {
            let raw = encode_entries(&st.pending);
            fi.write_all_at(&raw, st.index_end)?;
            st.index_end += raw.len() as u64;
        }
        st.pending.clear();
        Ok(())
    }

    /// Map `len` bytes at device `offset` to `target_offset` in the warp
    /// layer's target (tag-1 entries; all multiples of 512), as upstream's
    /// `RemoteData` ioctl: entries of at most [`MAX_LENGTH`] sectors.
    pub fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> Result<()> {
        self.check_writable()?;
        if !self.warp {
            return Err(Error::Invalid(format!(
                "{}: target mappings need a warp (TurboOCI) layer",
                self.data.path().display()
            )));
        }
        for (v, what) in [
            (offset, "offset"),
            (len, "length"),
            (target_offset, "target offset"),
        ] {
            if !v.is_multiple_of(SECTOR) {
                return Err(Error::Invalid(format!(
                    "target mapping {what} {v} is not a multiple of 512"
                )));
            }
        }
        let vsize = self.virtual_size();
        if offset.checked_add(len).is_none_or(|e| e > vsize) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: vsize,
            });
        }
        if let Some(t) = &self.target {
            if target_offset.checked_add(len).is_none_or(|e| e > t.size()) {
                return Err(Error::Invalid(format!(
                    "target mapping of {len} bytes at {target_offset} is past the end of the layer tar {} ({} bytes)",
                    t.path().display(),
                    t.size()
                )));
            }
        }
        let (mut s, mut n, mut t) = (offset / SECTOR, len / SECTOR, target_offset / SECTOR);
        while n > 0 {
            let k = n.min(MAX_LENGTH as u64);
            self.record(Mapping {
                offset: s,
                length: k as u32,
                moffset: t,
                zeroed: false,
                tag: TAG_TARGET,
            })?;
            s += k;
            t += k;
            n -= k;
        }
        Ok(())
    }

    /// Mark a sector-aligned range as zeros (persisted; hides lower data).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        Self::check_aligned(offset, len)?;
        if self.sparse || self.warp {
            // Holes in a sparse layer re-expose lower data after reopening,
            // so zeros must be real data here.
            let zeros = vec![0u8; (len.min(4 << 20)) as usize];
            let mut off = offset;
            while off < offset + len {
                let n = (offset + len - off).min(zeros.len() as u64) as usize;
                self.write(&zeros[..n], off)?;
                off += n as u64;
            }
            return Ok(());
        }
        self.discard(offset, len)
    }

    /// Discard a sector-aligned range: reads as zeros from now on. In sparse
    /// layers the hole is punched (after reopening, lower data shows again,
    /// exactly as upstream behaves).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        Self::check_aligned(offset, len)?;
        let mut s = offset / SECTOR;
        let end = s + len / SECTOR;
        if self.sparse {
            self.data.punch_hole(HT_SPACE as u64 + offset, len)?;
            let mut st = self.state.lock();
            self.check_writable()?;
            while s < end {
                let n = (end - s).min(MAX_LENGTH as u64);
                st.index
                    .insert(Mapping::zeroed(s, n as u32, s + HT_SPACE as u64 / SECTOR));
                s += n;
            }
            return Ok(());
        }
        while s < end {
            let n = (end - s).min(MAX_LENGTH as u64);
            let moff = if self.warp {
                s
            } else {
                self.state.lock().data_end / SECTOR
            };
            self.record(Mapping::zeroed(s, n as u32, moff))?;
            s += n;
        }
        Ok(())
    }

    /// Seal the layer in place (`overlaybd-commit --seal`): append the index
    /// and a trailer to the data file, which then opens as a sealed layer.
    pub fn seal(self) -> Result<()> {
        self.check_writable()?;
        if self.warp {
            return Err(Error::Invalid(
                "a warp (TurboOCI) layer cannot be sealed in place; commit it".into(),
            ));
        }
        let mut st = self.state.lock();
        self.save_pending(&mut st)?;
        let entries = st.index.to_vec();
        let index_offset = self.data.len()?.div_ceil(SECTOR) * SECTOR;
        let mut raw = encode_entries(&entries);
        let padded = raw.len().div_ceil(SECTOR as usize) * SECTOR as usize;
        while raw.len() < padded {
            raw.extend_from_slice(&Mapping::padding().encode());
        }
        self.data.write_all_at(&raw, index_offset)?;
        let mut t = self.header.lock().clone();
        t.flags = FLAG_DATA | FLAG_SEALED;
        t.index_offset = index_offset;
        t.index_size = entries.len() as u64;
        self.data
            .write_all_at(&t.encode(), index_offset + raw.len() as u64)?;
        self.data.sync()?;
        st.pending.clear();
        drop(st);
        Ok(())
    }

    /// Append pending index entries to the index file, without fsync.
    pub fn save_index(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.save_pending(&mut self.state.lock())
    }

    /// The layer as scratch: [`WritableLayer::flush`] writes the pending index
    /// entries but does not fsync, for a layer that is read back by this process
    /// (committed) and thrown away if it stops (the convertor's work files).
    pub fn scratch(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Append pending index entries and fsync both files (unless
    /// [`WritableLayer::scratch`]).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.state.lock();
        self.save_pending(&mut st)?;
        if !self.durable {
            return Ok(());
        }
        self.data.sync()?;
        if let Some(fi) = &self.index_file {
            fi.sync()?;
        }
        Ok(())
    }

    /// Make every change made so far durable, as [`WritableLayer::flush`]
    /// does (even for a [`WritableLayer::scratch`] layer), and refuse every
    /// later one with [`Error::ReadOnly`]: for a process about to exit
    /// without closing the layer while other threads may still be writing
    /// to it. A write under way meanwhile is either saved or fails (having
    /// perhaps changed some data, as a failed write may); none succeeds
    /// after this returns. Fails when the index cannot be written or the
    /// files cannot be synced (the layer stays frozen).
    pub fn freeze(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.state.lock();
        self.frozen.store(true, Ordering::Release);
        self.save_pending(&mut st)?;
        self.data.sync()?;
        if let Some(fi) = &self.index_file {
            fi.sync()?;
        }
        Ok(())
    }
}

impl Drop for WritableLayer {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let mut st = self.state.lock();
        if let Err(e) = self.flush_index(&mut st) {
            // The owner was given a failure (and reports it).
            if st.failure_returned {
                tracing::debug!(
                    "failed again to save the index of {}: {}",
                    self.data.path().display(),
                    crate::error::Chain(&e)
                );
            } else {
                tracing::error!(
                    "failed to save the index of {}: {}",
                    self.data.path().display(),
                    crate::error::Chain(&e)
                );
            }
        }
    }
}

/// Check the virtual size (bytes) in a writable layer's header: whole sectors,
/// every one of which an index entry can map (its 50-bit offset, up to
/// [`MAX_OFFSET`], where padding entries sit). A larger size (a flipped top
/// bit, a hand-edited header) would take writes whose offsets the index cuts
/// to 50 bits: after a reopen their data would show at another offset.
fn check_writable_vsize(vsize: u64) -> std::result::Result<(), String> {
    if !vsize.is_multiple_of(SECTOR) || vsize / SECTOR > MAX_OFFSET {
        return Err(format!(
            "virtual size {vsize} is not a multiple of 512 up to {} bytes",
            sector_bytes(MAX_OFFSET)
        ));
    }
    Ok(())
}

/// Validate one entry of a warp index (tags already shifted).
pub(crate) fn check_warp_entry(
    m: &Mapping,
    i: usize,
    data_sectors: u64,
    target_sectors: Option<u64>,
    target: Option<&dyn ReadAt>,
) -> std::result::Result<(), String> {
    if m.end() > MAX_OFFSET {
        return Err(super::sealed::past_largest_offset(m, i));
    }
    match m.tag {
        TAG_FS_META => {
            if !m.zeroed && m.mend() > data_sectors {
                return Err(format!(
                    "index entry {i} maps data bytes {}..{} outside the data ({} bytes)",
                    sector_bytes(m.moffset),
                    sector_bytes(m.mend()),
                    sector_bytes(data_sectors)
                ));
            }
        }
        TAG_TARGET => {
            if let (Some(n), Some(t)) = (target_sectors, target) {
                if m.mend() > n {
                    return Err(format!(
                        "index entry {i} maps target bytes {}..{} past the end of the layer tar {} ({} bytes)",
                        sector_bytes(m.moffset),
                        sector_bytes(m.mend()),
                        t.path().display(),
                        t.size()
                    ));
                }
            }
        }
        t => {
            return Err(format!(
                "index entry {i} has tag {t}; warp layers use 0 and 1"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim inherited by a child of the process that took it (which then
    /// exited) is found by searching every process's open files once; the
    /// next looks of the wait check that child only.
    #[test]
    fn the_holder_of_an_inherited_claim_is_searched_for_once() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::write(&data, b"x").unwrap();
        let mut holder =
            testutil::locked_holder(d.path(), "sh", &["-c", testutil::INHERITED_FLOCK_SH]);
        let key = lock_key(&std::fs::File::open(&data).unwrap()).unwrap();
        let mut search = HolderSearch::default();
        let pids: Vec<Option<u32>> = (0..5)
            .map(|_| claim_holder_with(&key, &mut search).map(|h| h.pid))
            .collect();
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(pids, vec![Some(holder.id()); 5]);
        assert_eq!(search.searches, 1);
    }
}
