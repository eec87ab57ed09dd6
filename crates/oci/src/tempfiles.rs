//! Temporary files this crate writes beside their destinations (a layout's
//! blobs and `index.json`, an archive's `.partial` file), listed process-wide
//! while they exist. Their `tempfile` handles remove them when dropped, but a
//! process that exits on a signal runs no destructors: its signal thread
//! calls [`abandon_all`] first, which removes them and makes every later
//! [`Temp`] fail to start, so that none is left behind in a destination.

use std::io;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tempfile::{NamedTempFile, PersistError};

/// A list of temporary files; the process has one ([`abandon_all`]).
struct Registry {
    state: Mutex<State>,
    next_id: AtomicU64,
}

struct State {
    /// Set by [`Registry::abandon_all`]: no new temporary file.
    closed: bool,
    files: Vec<(u64, PathBuf)>,
}

static PROCESS: Registry = Registry::new();

impl Registry {
    const fn new() -> Registry {
        Registry {
            state: Mutex::new(State {
                closed: false,
                files: Vec::new(),
            }),
            next_id: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is one push, retain or drain.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track(&'static self, file: NamedTempFile) -> io::Result<Temp> {
        let mut st = self.state();
        if st.closed {
            drop(st);
            let path = file.path().display().to_string();
            drop(file);
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("{path}: interrupted: no new temporary file"),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.files.push((id, file.path().to_path_buf()));
        Ok(Temp {
            file,
            listed: Listed { id, list: self },
        })
    }

    fn unlist(&self, id: u64) {
        self.state().files.retain(|f| f.0 != id);
    }

    fn abandon_all(&self) -> usize {
        let mut st = self.state();
        st.closed = true;
        st.files
            .drain(..)
            .filter(|(_, p)| std::fs::remove_file(p).is_ok())
            .count()
    }
}

/// A temporary file, listed until it is persisted or dropped.
#[derive(Debug)]
pub struct Temp {
    // (Dropped in this order: the file is removed, then unlisted.)
    file: NamedTempFile,
    listed: Listed,
}

/// A file's entry in a [`Registry`], removed when dropped.
#[derive(Debug)]
struct Listed {
    id: u64,
    list: &'static Registry,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.list.unlist(self.id);
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Temp {
    /// Lists `file`; fails (and removes it) once [`abandon_all`] ran.
    pub fn track(file: NamedTempFile) -> io::Result<Temp> {
        PROCESS.track(file)
    }

    /// Renames the file to `dest` (see [`NamedTempFile::persist`]) and
    /// unlists it.
    pub fn persist(self, dest: &Path) -> Result<std::fs::File, PersistError> {
        let Temp { file, listed } = self;
        let r = file.persist(dest);
        drop(listed);
        r
    }

    /// Removes the file (see [`NamedTempFile::close`]) and unlists it.
    pub fn close(self) -> io::Result<()> {
        let Temp { file, listed } = self;
        let r = file.close();
        drop(listed);
        r
    }
}

impl Deref for Temp {
    type Target = NamedTempFile;
    fn deref(&self) -> &NamedTempFile {
        &self.file
    }
}

impl DerefMut for Temp {
    fn deref_mut(&mut self) -> &mut NamedTempFile {
        &mut self.file
    }
}

/// Removes every listed temporary file of the process and makes later
/// [`Temp::track`] calls fail: for a signal thread about to exit the
/// process. Returns how many files were removed.
pub fn abandon_all() -> usize {
    PROCESS.abandon_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandon_all_removes_listed_files_and_refuses_new_ones() {
        // A registry of the test's own: the process's one serves the other
        // tests running meanwhile.
        let list: &'static Registry = Box::leak(Box::new(Registry::new()));
        let d = tempfile::tempdir().unwrap();
        let new = || NamedTempFile::new_in(d.path()).unwrap();
        let kept = list.track(new()).unwrap();
        let done = list.track(new()).unwrap();
        done.persist(&d.path().join("done")).unwrap();
        let dropped = list.track(new()).unwrap();
        let dropped_path = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!dropped_path.exists());
        let kept_path = kept.path().to_path_buf();
        // As on a quick exit: the handle is never dropped.
        let _never_dropped = std::mem::ManuallyDrop::new(kept);
        assert!(kept_path.exists());
        assert_eq!(list.abandon_all(), 1, "only the file still listed");
        assert!(!kept_path.exists(), "a listed file is removed");
        assert!(d.path().join("done").exists(), "a persisted file stays");
        let e = list.track(new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the persisted file: {left:?}");
    }
}
