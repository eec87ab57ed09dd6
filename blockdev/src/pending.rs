//! Outputs written under a temporary name beside their destination and
//! renamed into place once complete: a destination is never seen
//! half-written, and a file already there survives a write that fails or is
//! interrupted.
//!
//! Every unfinished file is listed in a process-wide registry. A failed
//! write removes its file when its [`PendingFile`] is dropped; a tool that
//! exits on a signal (no destructor runs then) first calls [`abandon_all`]
//! from its signal thread, which removes them all and makes every later
//! [`PendingFile::create`] and [`PendingFile::persist`] fail, so that no
//! unfinished file appears or is renamed into place while the process exits.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// The unfinished files: `(id, temporary path, destination)`.
struct Registry {
    /// Set by [`abandon_all`]: no new file, no rename.
    closed: bool,
    files: Vec<(u64, PathBuf, PathBuf)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    closed: false,
    files: Vec::new(),
});

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn registry() -> MutexGuard<'static, Registry> {
    // Every change under the lock is a single push, retain or drain: a panic
    // elsewhere while it was held leaves the list consistent.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn abandoned(dest: &Path) -> Error {
    Error::io(
        dest,
        io::Error::new(
            io::ErrorKind::Interrupted,
            "interrupted: the unfinished output was removed",
        ),
    )
}

/// A file being written under a temporary name (`.NAME.tmp-PID-N`) in the
/// directory of its destination `NAME`. Dropped before
/// [`persist`](Self::persist) succeeded, it removes the temporary file.
#[derive(Debug)]
pub struct PendingFile {
    id: u64,
    temp: PathBuf,
    dest: PathBuf,
}

impl PendingFile {
    /// Reserves a temporary name beside `dest` and lists it in the registry;
    /// the file is made by [`create`](Self::create).
    pub fn new(dest: &Path) -> Result<Self> {
        let Some(name) = dest.file_name() else {
            return Err(Error::Invalid(format!(
                "output {} does not name a file",
                dest.display()
            )));
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let temp = dest.with_file_name(format!(
            ".{}.tmp-{}-{id}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut r = registry();
        if r.closed {
            return Err(abandoned(dest));
        }
        r.files.push((id, temp.clone(), dest.to_path_buf()));
        Ok(PendingFile {
            id,
            temp,
            dest: dest.to_path_buf(),
        })
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Creates the temporary file with `opts` (and `create_new`: the name is
    /// this process's own). Errors name the destination (and its directory
    /// when that does not exist).
    pub fn create(&self, opts: &mut OpenOptions) -> Result<File> {
        let r = registry();
        if r.closed || !r.files.iter().any(|f| f.0 == self.id) {
            return Err(abandoned(&self.dest));
        }
        opts.create_new(true)
            .open(&self.temp)
            .map_err(|e| crate::io::name_missing_dir(&self.dest, Error::io(&self.dest, e)))
    }

    /// Renames the complete file to its destination. With `replace`, a file
    /// at the destination is replaced (atomically: it stays whole until
    /// then); without it, a destination that exists by now is left alone and
    /// the rename fails with `EEXIST`. On error the temporary file is kept
    /// until `self` is dropped.
    pub fn persist(&self, replace: bool) -> Result<()> {
        let mut r = registry();
        if r.closed || !r.files.iter().any(|f| f.0 == self.id) {
            return Err(abandoned(&self.dest));
        }
        if replace {
            std::fs::rename(&self.temp, &self.dest)
        } else {
            rename_noreplace(&self.temp, &self.dest)
        }
        .map_err(|e| Error::io(&self.dest, e))?;
        r.files.retain(|f| f.0 != self.id);
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        let mut r = registry();
        let before = r.files.len();
        r.files.retain(|f| f.0 != self.id);
        if r.files.len() != before {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Removes every unfinished file of the process and makes later
/// [`PendingFile`]s fail: for a signal thread about to exit the process.
/// Returns the destinations whose unfinished file was removed.
pub fn abandon_all() -> Vec<PathBuf> {
    let mut r = registry();
    r.closed = true;
    r.files
        .drain(..)
        .filter_map(|(_, temp, dest)| std::fs::remove_file(temp).is_ok().then_some(dest))
        .collect()
}

/// `rename(from, to)` that fails with `EEXIST` rather than replace `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // A filesystem without RENAME_NOREPLACE: a hard link never replaces either.
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::hard_link(from, to)?;
    // `to` is complete; a temporary name left behind is only untidy.
    let _ = std::fs::remove_file(from);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(p: &PendingFile) -> File {
        p.create(OpenOptions::new().write(true)).unwrap()
    }

    #[test]
    fn persist_never_replaces_without_replace() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let p = PendingFile::new(&dest).unwrap();
        assert_eq!(p.dest(), dest);
        assert!(p
            .temp_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".out.tmp-"));
        std::io::Write::write_all(&mut create(&p), b"new").unwrap();
        std::fs::write(&dest, b"old").unwrap();
        let e = p.persist(false).unwrap_err();
        assert!(e.to_string().contains("out"), "{e}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert!(p.temp_path().exists());
        p.persist(true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        drop(p);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn dropped_unfinished_files_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let p = PendingFile::new(&dest).unwrap();
        let f = create(&p);
        assert!(p.temp_path().exists());
        drop(p);
        drop(f);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let p = PendingFile::new(&dest).unwrap();
        create(&p);
        p.persist(false).unwrap();
        drop(p);
        assert!(dest.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
