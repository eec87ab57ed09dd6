//! The convertor's work directory (`-d/--dir`, default `tmp_conv`), safe for
//! several convertors at once and after a killed run.
//!
//! Layout and locks (`flock(2)` on the directories themselves, so nothing is
//! left to clean up when a process dies):
//! ```text
//! <dir>/                      shared lock: runs working in a private subdirectory;
//!                             exclusive lock: a run that keeps its files in <dir>
//!     .run-<pid>-<n>/         one run's private directory, locked exclusively by it
//!     <n>-<platform>-<hex>/   per-manifest directories (in .run-*/, or in <dir>
//!     index.json              itself with --reserve/--dump-manifest)
//! ```
//! * A run that removes its work files afterwards (the default) works in its own
//!   `.run-*` directory, so any number of them share `<dir>`.
//! * `--reserve` and `--dump-manifest` keep files in `<dir>` under upstream's
//!   names, so such a run needs `<dir>` to itself: it fails at once, naming the pid
//!   holding it, while another convertor uses it (and vice versa).
//! * A `.run-*` directory nobody holds is left over from a killed run: the next run
//!   removes it. Per-manifest directories left in `<dir>` by a killed `--reserve`
//!   run are replaced when the same manifest is converted again.
//! * A run that quits at once (a second Ctrl-C) calls [`remove_for_exit`] first: no
//!   destructor runs then, and its private directory and unfinished files would stay
//!   until the next run.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::{Error, Result};

const RUN_PREFIX: &str = ".run-";

/// Prefix of an archive destination's scratch layout in the work directory
/// (see [`crate::archive::ArchiveOutput::create`]).
pub(crate) const ARCHIVE_SCRATCH_PREFIX: &str = "archive-out.";

/// A live work directory of the process.
struct Live {
    /// Where its files go.
    path: PathBuf,
    /// `path` is its private directory (removed at exit), not `root`.
    private: bool,
    root: PathBuf,
    root_lock: Arc<Flock<File>>,
}

/// The process's live work directories.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<Live>> {
    // Every change under the lock is one push or retain.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// For a process about to exit without running destructors (a second stop signal):
/// removes every unfinished output file ([`blockdev::pending::abandon_all`], e.g. a
/// commit file being written, and no new one is started), the temporary files of
/// layout and archive destinations ([`obdoci::tempfiles::abandon_all`]: a blob or
/// `index.json` being written, an archive's `.partial` file), the private directories
/// of the live work directories with everything in them, and the scratch layouts of
/// archive destinations in a work directory a run keeps its files in (`--reserve`);
/// then what the run added to OCI layout destinations ([`obdoci::journal::undo_all`]:
/// a layout it created, blobs no image uses), and `<dir>` itself when that leaves it
/// empty and no other run holds it, as [`WorkDir`]'s drop does. Files that threads
/// still running create afterwards go with the next run. Returns what it removed or
/// kept, for the exit message.
pub fn remove_for_exit() -> Vec<String> {
    blockdev::pending::abandon_all();
    obdoci::tempfiles::abandon_all();
    let mut done = obdoci::journal::undo_all();
    for l in live().iter() {
        if l.private {
            // Threads still working may add files meanwhile: a few tries.
            for _ in 0..3 {
                if fs::remove_dir_all(&l.path).is_ok() || !l.path.exists() {
                    break;
                }
            }
        } else {
            remove_archive_scratch(&l.path);
            if fs::read_dir(&l.path).is_ok_and(|mut rd| rd.next().is_some()) {
                done.push(format!("work files kept in {}", l.path.display()));
            }
        }
        if l.root_lock.relock(FlockArg::LockExclusiveNonblock).is_ok() {
            let _ = fs::remove_dir(&l.root);
        }
    }
    done
}

/// Removes the archive scratch layouts in `dir`.
fn remove_archive_scratch(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(ARCHIVE_SCRATCH_PREFIX)
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A locked work directory; dropping it removes what the run leaves behind
/// (its private directory, and `<dir>` itself when empty and unused).
#[derive(Debug)]
pub struct WorkDir {
    root: PathBuf,
    /// Shared with [`LIVE`], for [`remove_for_exit`].
    root_lock: Arc<Flock<File>>,
    /// The private directory and its lock; `None` when working in `root`.
    run: Option<(PathBuf, Flock<File>)>,
}

impl WorkDir {
    /// Lock `root` (created if missing) for a run. `in_root`: the run keeps its
    /// files in `root` itself (`--reserve`, `--dump-manifest`) and needs it alone;
    /// otherwise it shares `root` and works in a private subdirectory.
    pub fn acquire(root: &Path, in_root: bool) -> Result<WorkDir> {
        let root_lock = Arc::new(lock_root(root, in_root)?);
        remove_stale_runs(root);
        let run = if in_root {
            // The directory is ours alone: scratch of a run that was killed.
            remove_archive_scratch(root);
            None
        } else {
            Some(private_dir(root)?)
        };
        live().push(Live {
            path: run.as_ref().map_or(root, |(p, _)| p).to_path_buf(),
            private: run.is_some(),
            root: root.to_path_buf(),
            root_lock: root_lock.clone(),
        });
        Ok(WorkDir {
            root: root.to_path_buf(),
            root_lock,
            run,
        })
    }

    /// Where the run's files go.
    pub fn path(&self) -> &Path {
        match &self.run {
            Some((p, _)) => p,
            None => &self.root,
        }
    }

    /// The work directory as given (`-d`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Fails unless the work directory's filesystem can hold a sparse file of
    /// `bytes` (the writable layer files of a `bytes`-sized device). Checked up
    /// front: otherwise the first layer fails half-way with "File too large".
    pub fn check_sparse_size(&self, bytes: u64) -> Result<()> {
        let probe = self.path().join(".vsize-probe");
        let res = File::create(&probe).and_then(|f| f.set_len(bytes));
        let _ = fs::remove_file(&probe);
        res.map_err(|e| Error::io(self.path(), e))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let mine = self.path().to_path_buf();
        live().retain(|l| l.path != mine);
        if let Some((p, lock)) = self.run.take() {
            let _ = fs::remove_dir_all(&p);
            drop(lock);
        }
        // Remove `root` if it is empty and no other run holds it. Whoever locks
        // it next finds it gone and makes it again (see `lock_root`).
        if self
            .root_lock
            .relock(FlockArg::LockExclusiveNonblock)
            .is_ok()
        {
            let _ = fs::remove_dir(&self.root);
        }
    }
}

/// Whether `f` is still the directory at `p` (not removed or replaced).
fn same_dir(f: &File, p: &Path) -> bool {
    match (f.metadata(), fs::symlink_metadata(p)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn lock_root(root: &Path, exclusive: bool) -> Result<Flock<File>> {
    let arg = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    // A finishing run may remove an empty `root` between our mkdir and our lock:
    // then lock the new one.
    for _ in 0..10 {
        let as_work_dir = |e: std::io::Error| {
            let e = match fs::metadata(root) {
                Ok(m) if !m.is_dir() => std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "exists and is not a directory",
                ),
                _ => e,
            };
            Error::io(root, e).context("work directory (-d/--dir)")
        };
        fs::create_dir_all(root).map_err(as_work_dir)?;
        let f = File::open(root).map_err(as_work_dir)?;
        let ino = f.metadata().map(|m| m.ino()).ok();
        let lock = match Flock::lock(f, arg) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Err(in_use(root, ino, exclusive)),
            Err((_, e)) => return Err(Error::io(root, std::io::Error::from(e))),
        };
        if same_dir(&lock, root) {
            return Ok(lock);
        }
    }
    Err(Error::Invalid(format!(
        "work directory {}: keeps disappearing while being locked",
        root.display()
    )))
}

/// The "in use" error for `root`, naming the pids holding it (from /proc/locks).
fn in_use(root: &Path, ino: Option<u64>, we_need_it_alone: bool) -> Error {
    let me = std::process::id();
    let mut pids: Vec<u32> = ino.map(lock_holders).unwrap_or_default();
    pids.retain(|&p| p != me);
    pids.sort_unstable();
    pids.dedup();
    let who = match pids.as_slice() {
        [] => "another convertor".to_string(),
        [p] => format!("another convertor (pid {p})"),
        ps => format!(
            "other convertors (pids {})",
            ps.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    let why = if we_need_it_alone {
        "--reserve and --dump-manifest keep files there and need it to themselves"
    } else {
        "it keeps its files there (--reserve/--dump-manifest)"
    };
    Error::Invalid(format!(
        "work directory {} is in use by {who}: {why}; wait for it or give another -d/--dir",
        root.display()
    ))
}

/// Pids holding a `flock` on inode `ino`, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`).
fn lock_holders(ino: u64) -> Vec<u32> {
    let Ok(text) = fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") {
                return None;
            }
            let file_ino = f.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
            (file_ino == ino).then(|| f.get(4)?.parse().ok())?
        })
        .collect()
}

/// Remove `.run-*` directories no live run holds (left by killed runs).
fn remove_stale_runs(root: &Path) {
    let Ok(rd) = fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(RUN_PREFIX) {
            continue;
        }
        let p = e.path();
        let Ok(f) = File::open(&p) else {
            continue;
        };
        if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            if same_dir(&lock, &p) {
                tracing::info!("removing {}, left over from a killed run", p.display());
                let _ = fs::remove_dir_all(&p);
            }
        }
    }
}

/// Make and lock a private directory `.run-<pid>-<n>` in `root`.
fn private_dir(root: &Path) -> Result<(PathBuf, Flock<File>)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut last = None;
    for _ in 0..10 {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = root.join(format!("{RUN_PREFIX}{}-{n}", std::process::id()));
        if let Err(e) = fs::create_dir(&p) {
            let exists = e.kind() == std::io::ErrorKind::AlreadyExists;
            last = Some(Error::io(&p, e).context("work directory (-d/--dir)"));
            // Another name helps only if this one was taken (a read-only or full
            // filesystem, or no permission, fails them all).
            if exists {
                continue;
            }
            break;
        }
        let locked = File::open(&p)
            .ok()
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).ok());
        // Another run's stale sweep may have taken it first: try another name.
        match locked {
            Some(l) if same_dir(&l, &p) => return Ok((p, l)),
            _ => {}
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::Invalid(format!(
            "work directory {}: cannot make a private directory in it",
            root.display()
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_runs_share_the_root_and_clean_up() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("w");
        let a = WorkDir::acquire(&root, false).unwrap();
        let b = WorkDir::acquire(&root, false).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(&root) && a.path().is_dir());
        fs::write(a.path().join("x"), b"data").unwrap();
        // A run that needs the directory alone is refused, naming us.
        let e = WorkDir::acquire(&root, true).unwrap_err().to_string();
        assert!(e.contains("is in use by another convertor"), "{e}");
        drop(a);
        assert!(root.is_dir(), "b still works in it");
        drop(b);
        assert!(!root.exists(), "empty and unused: removed");
    }

    #[test]
    fn stale_runs_are_removed_and_in_root_runs_exclude_others() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("w");
        let stale = root.join(".run-999999-0");
        fs::create_dir_all(stale.join("1-linux_amd64-ab/0001_sha256:cd")).unwrap();
        fs::write(
            stale.join("1-linux_amd64-ab/0001_sha256:cd/writable_data"),
            b"x",
        )
        .unwrap();
        let keep = WorkDir::acquire(&root, true).unwrap();
        assert!(!stale.exists(), "a killed run's directory is removed");
        assert_eq!(keep.path(), root);
        keep.check_sparse_size(1 << 30).unwrap();
        let e = WorkDir::acquire(&root, false).unwrap_err().to_string();
        assert!(e.contains("is in use by another convertor"), "{e}");
        fs::write(root.join("index.json"), b"{}").unwrap();
        drop(keep);
        assert!(root.join("index.json").exists(), "kept files stay");
        let again = WorkDir::acquire(&root, false).unwrap();
        assert!(again.check_sparse_size(u64::MAX / 2).is_err());
    }
}
