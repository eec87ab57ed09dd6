//! Apply an OCI layer tar to a mounted directory tree through the kernel.
//!
//! The rules are those of the libext2fs engine ([`obdfs::apply`]), so that
//! both engines give equal trees from the same layers:
//! * paths are cleaned lexically ([`clean_components`]; a name leaving the
//!   root is refused); symlinks in parent components are followed inside
//!   the root as containerd's `fs.RootPath` does: an absolute target starts
//!   again at the root, `..` at the root stays there, more than 40 links is
//!   a loop. Every later system call names a path made only of real
//!   directories, relative to the root's file descriptor, and never follows
//!   the last component.
//! * the root's own entry (`./`) gives the root its owner, mode, time and
//!   xattrs; an absolute one (`/`) is skipped ([`obdfs::apply::RootEntry`]).
//! * missing parents are created (0755, root, time 0); an existing entry is
//!   replaced unless both are directories (then it takes the new owner,
//!   mode, time and set of xattrs and keeps its contents).
//! * `.wh.NAME` removes what lower layers put at NAME; what this layer
//!   unpacked is kept. `.wh..wh..opq` does that for every child (the root's
//!   `lost+found` stays). Other `.wh..wh.*` names are ignored.
//! * hard links point at any non-directory; the header's owner, mode, time
//!   and xattrs go to the shared inode.
//! * xattrs: [`accepted_xattrs`]; they are set after the owner and mode
//!   (chown drops `security.capability`), and times last.
//! * directory times: the kernel stamps a directory with the current time
//!   whenever an entry is added or removed. Each directory's time is
//!   therefore remembered before this layer first changes it (or taken from
//!   its tar entry) and set when the layer is done, as the libext2fs engine
//!   leaves it.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use obdfs::apply::{
    accepted_xattrs, clean_components, root_entry, self_link_parents, RootEntry, MAX_SYMLINKS,
};
use obdfs::error::quote;
use obdfs::tar::{Entry, Kind, TarReader};
use obdfs::ApplyStats;

use crate::error::{Error, Result};

/// Longest name ext4 stores.
const NAME_MAX: usize = 255;

/// A time as (seconds, nanoseconds).
type Time = (i64, u32);

/// A path below the root made of real directories and one last name;
/// empty for the root itself.
type Rel = Vec<u8>;

fn join(dir: &[u8], name: &[u8]) -> Rel {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
        p.extend_from_slice(dir);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// What an `lstat` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Dir,
    Symlink,
    Other,
}

fn entry_err(e: &Entry, msg: impl Into<String>) -> Error {
    Error::Entry {
        path: e.path_lossy(),
        msg: msg.into(),
    }
}

/// The applier of one layer to the tree at one root.
pub struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    /// What this layer unpacked (kept by whiteouts).
    unpacked: BTreeSet<Rel>,
    /// Directory times to set at the end.
    dir_times: HashMap<Rel, Time>,
    stats: ApplyStats,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("root", &self.root_path)
            .finish()
    }
}

/// Options of [`Unpacker::apply`].
#[derive(Default)]
pub struct UnpackOptions<'a> {
    /// Called with the running counters about twice a second, and once at
    /// the end (while the tree is still mounted).
    pub progress: Option<&'a mut dyn FnMut(&ApplyStats)>,
    /// Checked between entries and data chunks; set means stop.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Unpacker {
    /// An unpacker for the tree at `root`.
    pub fn new(root: &Path) -> Result<Unpacker> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(root, "cannot open the mounted tree", e.into()))?;
        Ok(Unpacker {
            root: fd,
            root_path: root.to_path_buf(),
            unpacked: BTreeSet::new(),
            dir_times: HashMap::new(),
            stats: ApplyStats::default(),
            buf: vec![0u8; 1 << 20],
        })
    }

    /// Apply the (decompressed) layer tar read from `tar`.
    pub fn apply(mut self, tar: &mut dyn Read, opts: UnpackOptions<'_>) -> Result<ApplyStats> {
        let start = Instant::now();
        let UnpackOptions {
            mut progress,
            cancel,
        } = opts;
        let stop = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        let mut reader = TarReader::new(std::io::BufReader::with_capacity(1 << 20, tar));
        let mut last = Instant::now();
        while let Some(e) = reader.next_entry().map_err(|e| {
            if stop() {
                Error::Interrupted
            } else {
                Error::Tar(e)
            }
        })? {
            if stop() {
                return Err(Error::Interrupted);
            }
            self.stats.entries += 1;
            self.entry(&e, &mut reader, &stop)?;
            if let Some(cb) = progress.as_mut() {
                if last.elapsed() >= Duration::from_millis(500) {
                    last = Instant::now();
                    self.stats.tar_bytes = reader.position();
                    self.stats.elapsed = start.elapsed();
                    cb(&self.stats);
                }
            }
        }
        self.finish()?;
        self.stats.tar_bytes = reader.position();
        self.stats.elapsed = start.elapsed();
        if let Some(cb) = progress.as_mut() {
            cb(&self.stats);
        }
        Ok(self.stats)
    }

    // ----- system calls on paths below the root ---------------------------

    fn c(p: &[u8]) -> CString {
        // Tar paths are cleaned of NUL by construction (headers end at NUL).
        CString::new(if p.is_empty() {
            b".".to_vec()
        } else {
            p.to_vec()
        })
        .unwrap_or_else(|_| CString::from(c"."))
    }

    /// The full path of `p`, for calls that have no `*at` form (xattrs).
    fn full(&self, p: &[u8]) -> PathBuf {
        self.root_path.join(OsStr::from_bytes(p))
    }

    fn lstat(&self, p: &[u8]) -> std::io::Result<Option<nix::sys::stat::FileStat>> {
        match nix::sys::stat::fstatat(
            &self.root,
            Self::c(p).as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(st)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn found(&self, e: &Entry, p: &[u8]) -> Result<Option<(Found, Time)>> {
        let st = self
            .lstat(p)
            .map_err(|err| self.eio(e, "look up", p, err))?;
        Ok(st.map(|st| {
            let kind = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => Found::Dir,
                SFlag::S_IFLNK => Found::Symlink,
                _ => Found::Other,
            };
            (kind, (st.st_mtime, st.st_mtime_nsec as u32))
        }))
    }

    fn eio(&self, e: &Entry, what: &str, p: &[u8], source: std::io::Error) -> Error {
        Error::EntryIo {
            path: e.path_lossy(),
            what: format!("{what} '{}'", String::from_utf8_lossy(p)),
            source,
        }
    }

    /// Remember `dir`'s time before this layer changes its entries.
    fn touching(&mut self, e: &Entry, dir: &[u8]) -> Result<()> {
        if self.dir_times.contains_key(dir) {
            return Ok(());
        }
        if let Some((_, t)) = self.found(e, dir)? {
            self.dir_times.insert(dir.to_vec(), t);
        }
        Ok(())
    }

    fn mkdir(
        &mut self,
        e: &Entry,
        parent: &[u8],
        p: &[u8],
        owner: (u32, u32),
        mode: u32,
    ) -> Result<()> {
        self.touching(e, parent)?;
        nix::sys::stat::mkdirat(
            &self.root,
            Self::c(p).as_c_str(),
            Mode::from_bits_truncate(0o700),
        )
        .map_err(|err| self.eio(e, "create directory", p, err.into()))?;
        self.owner_mode(e, p, owner.0, owner.1, Some(mode))
    }

    /// Owner, then mode (chown clears setuid bits), never following `p`.
    fn owner_mode(&self, e: &Entry, p: &[u8], uid: u32, gid: u32, mode: Option<u32>) -> Result<()> {
        nix::unistd::fchownat(
            &self.root,
            Self::c(p).as_c_str(),
            Some(uid.into()),
            Some(gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|err| self.eio(e, "change the owner of", p, err.into()))?;
        if let Some(mode) = mode {
            // `p` is not a symlink here, so following it changes nothing.
            nix::sys::stat::fchmodat(
                &self.root,
                Self::c(p).as_c_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|err| self.eio(e, "change the mode of", p, err.into()))?;
        }
        Ok(())
    }

    fn set_time(&self, e: Option<&Entry>, p: &[u8], t: Time) -> Result<()> {
        let ts = nix::sys::time::TimeSpec::new(t.0, t.1 as _);
        nix::sys::stat::utimensat(
            &self.root,
            Self::c(p).as_c_str(),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|err| match e {
            Some(e) => self.eio(e, "set the times of", p, err.into()),
            None => Error::io(self.full(p), "cannot set the directory times", err.into()),
        })
    }

    /// Set the entry's accepted xattrs on `p`; with `clear`, remove the
    /// others first.
    fn xattrs(&self, e: &Entry, p: &[u8], kind: Kind, clear: bool) -> Result<()> {
        let want = accepted_xattrs(e, kind);
        if want.is_empty() && !clear {
            return Ok(());
        }
        let full = CString::new(self.full(p).into_os_string().into_vec())
            .map_err(|_| entry_err(e, "path holds a NUL byte"))?;
        if clear {
            for name in
                list_xattrs(&full).map_err(|err| self.eio(e, "list the xattrs of", p, err))?
            {
                if want.iter().any(|(n, _)| *n == name.as_bytes()) {
                    continue;
                }
                // SAFETY: both are NUL-terminated strings that outlive the call.
                let rc = unsafe { libc::lremovexattr(full.as_ptr(), name.as_ptr()) };
                if rc != 0 {
                    return Err(self.eio(
                        e,
                        "remove an xattr of",
                        p,
                        std::io::Error::last_os_error(),
                    ));
                }
            }
        }
        for (n, v) in &want {
            let name =
                CString::new(n.clone()).map_err(|_| entry_err(e, "xattr name holds a NUL byte"))?;
            // SAFETY: NUL-terminated path and name; `v` is valid for
            // `v.len()` bytes for the duration of the call.
            let rc = unsafe {
                libc::lsetxattr(full.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0)
            };
            if rc != 0 {
                return Err(self.eio(
                    e,
                    &format!("set xattr '{}' on", String::from_utf8_lossy(n)),
                    p,
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }

    // ----- path resolution ------------------------------------------------

    /// The real directory that holds the last component of `comps`, creating
    /// missing ones when `create` (as the libext2fs engine does).
    fn resolve_dir(&mut self, e: &Entry, comps: &[&[u8]], create: bool) -> Result<Rel> {
        let mut stack: Vec<Vec<u8>> = Vec::new();
        let mut queue: std::collections::VecDeque<Vec<u8>> =
            comps.iter().map(|c| c.to_vec()).collect();
        let mut followed = 0;
        while let Some(c) = queue.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let cur = stack.join(&b'/');
            let p = join(&cur, &c);
            match self.found(e, &p)? {
                None if create => {
                    self.mkdir(e, &cur, &p, (0, 0), 0o755)?;
                    self.dir_times.insert(p, (0, 0));
                    stack.push(c);
                }
                None => {
                    return Err(entry_err(
                        e,
                        format!(
                            "path component '{}' does not exist",
                            String::from_utf8_lossy(&c)
                        ),
                    ))
                }
                Some((Found::Dir, _)) => stack.push(c),
                Some((Found::Symlink, _)) => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(entry_err(
                            e,
                            format!(
                                "too many levels of symbolic links in the path (more than {MAX_SYMLINKS}; a symlink loop?) at '{}'",
                                quote(&c)
                            ),
                        ));
                    }
                    let target = nix::fcntl::readlinkat(&self.root, Self::c(&p).as_c_str())
                        .map_err(|err| self.eio(e, "read the symlink", &p, err.into()))?
                        .into_vec();
                    if target.first() == Some(&b'/') {
                        stack.clear();
                    }
                    let mut parts: Vec<Vec<u8>> =
                        target.split(|&b| b == b'/').map(|p| p.to_vec()).collect();
                    parts.extend(queue.drain(..));
                    queue = parts.into();
                }
                Some((Found::Other, _)) => {
                    return Err(entry_err(
                        e,
                        format!(
                            "path component '{}' is not a directory",
                            String::from_utf8_lossy(&c)
                        ),
                    ))
                }
            }
        }
        Ok(stack.join(&b'/'))
    }

    // ----- removal --------------------------------------------------------

    /// Forget what was recorded below (and at) `p`, which is going away.
    fn forget(&mut self, p: &[u8]) {
        let mut prefix = p.to_vec();
        prefix.push(b'/');
        self.unpacked.remove(p);
        let below: Vec<Rel> = self
            .unpacked
            .range(prefix.clone()..)
            .take_while(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in below {
            self.unpacked.remove(&k);
        }
        self.dir_times
            .retain(|k, _| k.as_slice() != p && !k.starts_with(&prefix));
    }

    /// Remove `p` (recursively for a directory).
    fn remove_tree(&mut self, e: &Entry, parent: &[u8], p: &[u8], kind: Found) -> Result<()> {
        self.touching(e, parent)?;
        if kind == Found::Dir {
            // `p` is made of real directories: remove_dir_all does not
            // follow symlinks inside it.
            std::fs::remove_dir_all(self.full(p))
                .map_err(|err| self.eio(e, "remove the directory", p, err))?;
        } else {
            nix::unistd::unlinkat(
                &self.root,
                Self::c(p).as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .map_err(|err| self.eio(e, "remove", p, err.into()))?;
        }
        self.forget(p);
        Ok(())
    }

    /// Names in directory `p`, sorted.
    fn children(&self, e: &Entry, p: &[u8]) -> Result<Vec<Vec<u8>>> {
        let rd = std::fs::read_dir(self.full(p)).map_err(|err| self.eio(e, "list", p, err))?;
        let mut v = Vec::new();
        for d in rd {
            let d = d.map_err(|err| self.eio(e, "list", p, err))?;
            v.push(d.file_name().as_bytes().to_vec());
        }
        v.sort();
        Ok(v)
    }

    /// Remove what lower layers put at `p`, keeping what this layer
    /// unpacked (and, for directories, anything still inside them).
    fn remove_lower(&mut self, e: &Entry, parent: &[u8], p: &[u8], kind: Found) -> Result<()> {
        let mine = self.unpacked.contains(p);
        if kind == Found::Dir {
            for c in self.children(e, p)? {
                let cp = join(p, &c);
                if let Some((k, _)) = self.found(e, &cp)? {
                    self.remove_lower(e, p, &cp, k)?;
                }
            }
            if !mine && self.children(e, p)?.is_empty() {
                self.remove_tree(e, parent, p, kind)?;
            }
        } else if !mine {
            self.remove_tree(e, parent, p, kind)?;
        }
        Ok(())
    }

    // ----- entries --------------------------------------------------------

    fn entry<R: Read>(
        &mut self,
        e: &Entry,
        tar: &mut TarReader<R>,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let comps = clean_components(&e.path)
            .ok_or_else(|| entry_err(e, "path leaves the layer root ('..' above '/'); refusing"))?;
        let Some((name, parents)) = comps.split_last() else {
            // The root's own entry: as the libext2fs engine (and libtar).
            if root_entry(e).map_err(Error::Tar)? == RootEntry::Apply {
                self.owner_mode(e, b"", e.uid, e.gid, Some(e.mode))?;
                self.xattrs(e, b"", Kind::Dir, true)?;
                self.dir_times
                    .insert(Vec::new(), (e.mtime.sec, e.mtime.nsec));
                self.stats.dirs += 1;
            }
            return Ok(());
        };
        let name: &[u8] = name;
        if name.len() > NAME_MAX {
            return Err(entry_err(
                e,
                format!("name is {} bytes long (ext4 allows 255)", name.len()),
            ));
        }
        let parent = self.resolve_dir(e, parents, true)?;

        if let Some(target) = name.strip_prefix(b".wh.") {
            self.stats.whiteouts += 1;
            if target == b".wh..opq" {
                for c in self.children(e, &parent)? {
                    if parent.is_empty() && c == b"lost+found" {
                        continue;
                    }
                    let cp = join(&parent, &c);
                    if let Some((k, _)) = self.found(e, &cp)? {
                        self.remove_lower(e, &parent, &cp, k)?;
                    }
                }
            } else if target.starts_with(b".wh.") {
                tracing::debug!("ignoring whiteout metadata entry '{}'", e.path_lossy());
            } else {
                let tp = join(&parent, target);
                if let Some((k, _)) = self.found(e, &tp)? {
                    self.remove_lower(e, &parent, &tp, k)?;
                }
            }
            return Ok(());
        }

        let p = join(&parent, name);
        let existing = self.found(e, &p)?;
        if e.kind == Kind::HardLink
            && existing.is_some()
            && self.links_to_itself(e, &parent, name)?
        {
            // A hard link to its own name (`tar cf x.tar f f` writes one for the
            // second `f`) changes nothing, as in erofs-utils and GNU tar: the
            // file stays as it is.
            self.stats.hardlinks += 1;
            self.unpacked.insert(p);
            return Ok(());
        }
        if e.kind == Kind::Dir {
            if let Some((Found::Dir, _)) = existing {
                self.owner_mode(e, &p, e.uid, e.gid, Some(e.mode))?;
                self.xattrs(e, &p, Kind::Dir, true)?;
                self.dir_times
                    .insert(p.clone(), (e.mtime.sec, e.mtime.nsec));
                self.unpacked.insert(p);
                self.stats.dirs += 1;
                return Ok(());
            }
        }
        if let Some((k, _)) = existing {
            self.remove_tree(e, &parent, &p, k)?;
        }
        self.touching(e, &parent)?;
        let t = (e.mtime.sec, e.mtime.nsec);
        match e.kind {
            Kind::Dir => {
                self.mkdir(e, &parent, &p, (e.uid, e.gid), e.mode)?;
                self.xattrs(e, &p, Kind::Dir, false)?;
                self.dir_times.insert(p.clone(), t);
                self.stats.dirs += 1;
            }
            Kind::File => {
                self.stats.files += 1;
                self.file(e, &p, tar, stop)?;
                self.owner_mode(e, &p, e.uid, e.gid, Some(e.mode))?;
                self.xattrs(e, &p, Kind::File, false)?;
                self.set_time(Some(e), &p, t)?;
            }
            Kind::Symlink => {
                self.stats.symlinks += 1;
                nix::unistd::symlinkat(
                    OsStr::from_bytes(&e.link),
                    &self.root,
                    Self::c(&p).as_c_str(),
                )
                .map_err(|err| self.eio(e, "create the symlink", &p, err.into()))?;
                self.owner_mode(e, &p, e.uid, e.gid, None)?;
                self.xattrs(e, &p, Kind::Symlink, false)?;
                self.set_time(Some(e), &p, t)?;
            }
            Kind::HardLink => {
                self.stats.hardlinks += 1;
                self.hardlink(e, &p)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.stats.specials += 1;
                let (kind, rdev) = match e.kind {
                    Kind::Char => (
                        SFlag::S_IFCHR,
                        nix::sys::stat::makedev(e.devmajor, e.devminor),
                    ),
                    Kind::Block => (
                        SFlag::S_IFBLK,
                        nix::sys::stat::makedev(e.devmajor, e.devminor),
                    ),
                    _ => (SFlag::S_IFIFO, 0),
                };
                nix::sys::stat::mknodat(
                    &self.root,
                    Self::c(&p).as_c_str(),
                    kind,
                    Mode::from_bits_truncate(0o600),
                    rdev,
                )
                .map_err(|err| self.eio(e, "create the node", &p, err.into()))?;
                self.owner_mode(e, &p, e.uid, e.gid, Some(e.mode))?;
                self.xattrs(e, &p, e.kind, false)?;
                self.set_time(Some(e), &p, t)?;
            }
        }
        self.unpacked.insert(p);
        Ok(())
    }

    /// A regular file with its data (holes of sparse entries kept).
    fn file<R: Read>(
        &mut self,
        e: &Entry,
        p: &[u8],
        tar: &mut TarReader<R>,
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let fd = nix::fcntl::openat(
            &self.root,
            Self::c(p).as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|err| self.eio(e, "create", p, err.into()))?;
        let f = File::from(fd);
        for (off, len) in e.segments() {
            let mut done = 0u64;
            while done < len {
                if stop() {
                    return Err(Error::Interrupted);
                }
                let n = (len - done).min(self.buf.len() as u64) as usize;
                tar.read_data(&mut self.buf[..n]).map_err(|e| {
                    if stop() {
                        Error::Interrupted
                    } else {
                        Error::Tar(e)
                    }
                })?;
                f.write_all_at(&self.buf[..n], off + done)
                    .map_err(|err| self.eio(e, "write", p, err))?;
                done += n as u64;
            }
            self.stats.data_bytes += len;
        }
        if e.sparse.is_some() {
            f.set_len(e.size)
                .map_err(|err| self.eio(e, "set the size of", p, err))?;
        }
        Ok(())
    }

    /// Whether the hard link entry `e`, at `name` in directory `parent`, names
    /// that same directory entry as its target. A target that cannot be
    /// resolved is not (the link then fails as any other would).
    fn links_to_itself(&mut self, e: &Entry, parent: &Rel, name: &[u8]) -> Result<bool> {
        let Some(tparents) = self_link_parents(&e.link, name) else {
            return Ok(false);
        };
        match self.resolve_dir(e, &tparents, false) {
            Ok(d) => Ok(d == *parent),
            Err(Error::Entry { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    fn hardlink(&mut self, e: &Entry, p: &[u8]) -> Result<()> {
        let comps = clean_components(&e.link)
            .ok_or_else(|| entry_err(e, "hard link target leaves the layer root; refusing"))?;
        let Some((tname, tparents)) = comps.split_last() else {
            return Err(entry_err(e, "hard link to the root directory"));
        };
        let tdir = self
            .resolve_dir(e, tparents, false)
            .map_err(|err| match err {
                Error::Entry { msg, .. } => entry_err(
                    e,
                    format!(
                        "hard link target '{}': {msg}",
                        String::from_utf8_lossy(&e.link)
                    ),
                ),
                other => other,
            })?;
        let tp = join(&tdir, tname);
        let kind = match self.found(e, &tp)? {
            None => {
                return Err(entry_err(
                    e,
                    format!(
                        "hard link target '{}' does not exist",
                        String::from_utf8_lossy(&e.link)
                    ),
                ))
            }
            Some((Found::Dir, _)) => {
                return Err(entry_err(
                    e,
                    format!(
                        "hard link target '{}' is a directory",
                        String::from_utf8_lossy(&e.link)
                    ),
                ))
            }
            Some((Found::Symlink, _)) => Kind::Symlink,
            Some((Found::Other, _)) => {
                let st = self
                    .lstat(&tp)
                    .map_err(|err| self.eio(e, "look up", &tp, err))?;
                match st.map(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT) {
                    Some(SFlag::S_IFREG) => Kind::File,
                    _ => Kind::Fifo,
                }
            }
        };
        nix::unistd::linkat(
            &self.root,
            Self::c(&tp).as_c_str(),
            &self.root,
            Self::c(p).as_c_str(),
            AtFlags::empty(),
        )
        .map_err(|err| self.eio(e, "hard link", p, err.into()))?;
        let mode = (kind != Kind::Symlink).then_some(e.mode);
        self.owner_mode(e, p, e.uid, e.gid, mode)?;
        self.xattrs(e, p, kind, false)?;
        self.set_time(Some(e), p, (e.mtime.sec, e.mtime.nsec))
    }

    /// End of the layer: directory times.
    fn finish(&mut self) -> Result<()> {
        let mut times: Vec<(Rel, Time)> = std::mem::take(&mut self.dir_times).into_iter().collect();
        times.sort();
        for (p, t) in times {
            match self.lstat(&p) {
                Ok(Some(st))
                    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR =>
                {
                    self.set_time(None, &p, t)?
                }
                Ok(_) => {}
                Err(err) => return Err(Error::io(self.full(&p), "cannot look up", err)),
            }
        }
        Ok(())
    }
}

/// The xattr names of `path` (not following a symlink).
fn list_xattrs(path: &CString) -> std::io::Result<Vec<CString>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `path` is NUL-terminated; `buf` is valid for `buf.len()`
        // writable bytes.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || buf.len() >= 1 << 20 {
            return Err(err);
        }
        buf.resize(buf.len() * 4, 0);
    }
    Ok(buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| CString::new(n).ok())
        .collect())
}
