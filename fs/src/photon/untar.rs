//! Applying a layer tar as upstream's `UnTar` does (overlaybd
//! `src/overlaybd/tar/libtar.cpp`, `whiteout.cpp`, `header.cpp`), over
//! [`Extfs`].
//!
//! Per entry, in tar order:
//! 1. the path is cleaned lexically (Plan 9 `cleanname`; `/` is skipped;
//!    `.`, the root's own entry, is applied to the root like any existing
//!    directory, and refused when it is not a directory);
//! 2. missing parent directories are made (mode 0755, owner 0, times 0);
//! 3. whiteouts: `.wh..wh..opq` empties its directory, `.wh.<name>` removes
//!    `<name>`, recursively; anything this layer unpacked is kept;
//! 4. an existing non-directory is unlinked; an existing directory is
//!    removed with everything in it unless the entry is a directory too
//!    (also what this layer unpacked there: the later entry wins, as the
//!    native engine does; upstream's `remove_all` keeps those, its `rmdir`
//!    fails and the new name is added next to the directory's, which
//!    e2fsck reports as a duplicate entry);
//! 5. the entry is made: directory (an existing one is kept), regular file
//!    (created, its blocks allocated and mapped by the [`FileData`]), hard
//!    link, symbolic link (to the cleaned target), device node or FIFO;
//! 6. owner, extended attributes (sorted by name), times (atime = mtime =
//!    ctime = the header's mtime) and, except for symbolic links, mode.
//!
//! At the end every directory entry's times are set again, in tar order.
//! Owner, mode and mtime come from the header fields, as libtar reads them.

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;

use super::extfs::Extfs;
use crate::apply::{device_numbers, entry_err, root_entry, ApplyOptions, ApplyStats};
use crate::error::{quote, Error, Result};
use crate::ext2fs::cache::WriteMode;
use crate::filedata::{FileData, FillCtx, Run, TarData};
use crate::tar::{symlink_target_problem, Entry, Kind, TarReader};

/// Plan 9's `cleanname`, as libtar's `clean_name`: collapse `//`, drop `.`,
/// resolve `..` lexically (`/..` is `/`; a relative path keeps leading
/// `..`); empty becomes `.`.
pub fn clean_name(p: &[u8]) -> Vec<u8> {
    let rooted = p.first() == Some(&b'/');
    let base = rooted as usize;
    let mut out: Vec<u8> = if rooted { vec![b'/'] } else { Vec::new() };
    let mut dotdot = base;
    for el in p.split(|&b| b == b'/') {
        match el {
            b"" | b"." => {}
            b".." => {
                if out.len() > dotdot {
                    let cut = out[dotdot..]
                        .iter()
                        .rposition(|&b| b == b'/')
                        .map_or(dotdot, |i| dotdot + i);
                    out.truncate(cut.max(dotdot));
                } else if !rooted {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(b"..");
                    dotdot = out.len();
                }
            }
            el => {
                if out.len() != base {
                    out.push(b'/');
                }
                out.extend_from_slice(el);
            }
        }
    }
    if out.is_empty() {
        out.push(b'.');
    }
    out
}

/// A path as photon's subfs hands it to extfs: its components.
fn comps(p: &[u8]) -> Result<Vec<&[u8]>> {
    let v: Vec<&[u8]> = p.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    if v.iter().any(|c| *c == b"..") {
        return Err(Error::Invalid(format!(
            "'{}' leaves the layer root; refusing",
            quote(p)
        )));
    }
    // A directory entry's name length is one byte: a longer name would be cut.
    if let Some(c) = v.iter().find(|c| c.len() > 255) {
        return Err(Error::Invalid(format!(
            "'{}': a name is {} bytes long (ext4 allows 255)",
            quote(p),
            c.len()
        )));
    }
    Ok(v)
}

/// `dirname` with its trailing slash, and `basename` (photon's `Path`).
fn split_path(p: &[u8]) -> (&[u8], &[u8]) {
    let end = match p.iter().rposition(|&b| b != b'/') {
        Some(e) => e,
        None => return (p, b""),
    };
    let begin = p[..=end]
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1);
    (&p[..begin], &p[begin..=end])
}

fn strip_slash(p: &[u8]) -> &[u8] {
    p.strip_suffix(b"/").unwrap_or(p)
}

/// Apply the (uncompressed) layer tar `tar` to the ext4 on `dev` as
/// upstream's `turboOCI-apply` does. Regular files get their blocks
/// allocated (`fallocate`) and `opts.file_data` fills each extent (a
/// [`crate::filedata::TargetData`] maps it into the tar). Without a
/// `file_data` it does what upstream's `overlaybd-apply` does: the bytes are
/// written through libext2fs file I/O, and the image is reached through
/// photon's 128 KiB buffer file ([`WriteMode::Buffered`]).
pub fn apply_tar<R: Read>(
    dev: Arc<dyn BlockDevice>,
    tar: R,
    opts: ApplyOptions<'_>,
) -> Result<ApplyStats> {
    let start = Instant::now();
    let file_data = opts.file_data;
    // overlaybd-apply (no FileData) puts photon's buffer file in front of
    // the image; turboOCI-apply does not.
    let mode = match file_data {
        Some(_) => WriteMode::Exact,
        None => WriteMode::Buffered,
    };
    let mut u = Untar {
        x: Extfs::open(dev, opts.cache_bytes, mode)?,
        file_data,
        unpacked: HashSet::new(),
        dirs: Vec::new(),
        stats: ApplyStats::default(),
    };
    let mut reader = TarReader::new(std::io::BufReader::with_capacity(1 << 20, tar));
    let mut progress = opts.progress;
    let mut last = Instant::now();
    while let Some(e) = reader.next_entry()? {
        u.stats.entries += 1;
        let name = clean_name(&e.path);
        if name == b"/" {
            tracing::warn!("file '/' ignored: resolved to root");
            continue;
        }
        if name == b"." {
            // The root's own entry: a directory goes through the sequence
            // below like any existing directory (owner, xattrs, times,
            // mode). Anything else is refused: libtar would remove the
            // root's contents and then the root itself to make room.
            root_entry(&e)?;
        }
        match u.extract_file(&e, &name, &mut reader) {
            Ok(()) => {}
            Err(err @ Error::Entry { .. }) => return Err(err),
            Err(err) => {
                return Err(Error::AtEntry {
                    path: e.path_lossy(),
                    source: Box::new(err),
                })
            }
        }
        if let Some(cb) = progress.as_mut() {
            if last.elapsed() >= Duration::from_millis(500) {
                last = Instant::now();
                u.stats.tar_bytes = reader.position();
                u.stats.elapsed = start.elapsed();
                cb(&u.stats);
            }
        }
    }
    for (path, t) in std::mem::take(&mut u.dirs) {
        u.x.utimes(&comps(&path)?, t)?;
    }
    let Untar { x, mut stats, .. } = u;
    x.close()?;
    stats.tar_bytes = reader.position();
    stats.elapsed = start.elapsed();
    if let Some(cb) = progress.as_mut() {
        cb(&stats);
    }
    Ok(stats)
}

struct Untar<'a> {
    x: Extfs,
    /// `Some`: allocate each file and let the FileData fill its extents
    /// (turboOCI-apply); `None`: write the bytes (overlaybd-apply).
    file_data: Option<Box<dyn FileData + 'a>>,
    /// Paths this layer unpacked (as cleaned, the strings libtar keeps).
    unpacked: HashSet<Vec<u8>>,
    /// Directory entries and their mtimes, in tar order.
    dirs: Vec<(Vec<u8>, u32)>,
    stats: ApplyStats,
}

impl Untar<'_> {
    fn extract_file<R: Read>(
        &mut self,
        e: &Entry,
        name: &[u8],
        tar: &mut TarReader<R>,
    ) -> Result<()> {
        if e.kind == Kind::Symlink {
            // ext2fs_symlink refuses a target of a block or more with a bare
            // "Invalid argument passed to ext2 library"; said before anything
            // is changed, as the native engine says it.
            let limit = self.x.fs.block_size() as usize - 1;
            if let Some(problem) = symlink_target_problem(&clean_name(&e.link), limit) {
                return Err(entry_err(e, problem));
            }
        }
        let (dir, base) = split_path(name);
        self.mkdir_hier(e, dir)?;
        if self.convert_whiteout(dir, base)? {
            self.stats.whiteouts += 1;
            return Ok(());
        }
        let path = comps(name)?;
        if e.kind == Kind::HardLink
            && comps(&clean_name(&e.link)).is_ok_and(|t| t == path)
            && self.x.lstat(&path)?.is_some()
        {
            // A hard link to its own name (`tar cf x.tar f f` writes one for the
            // second `f`) changes nothing, as in erofs-utils and GNU tar: the
            // file stays as it is (unlinking it first would lose the target).
            self.stats.hardlinks += 1;
            self.unpacked.insert(name.to_vec());
            return Ok(());
        }
        if let Some(st) = self.x.lstat(&path)? {
            if !st.is_dir() {
                self.x.unlink(&path)?;
            } else if e.kind != Kind::Dir {
                self.remove_dir_tree(name)?;
            }
        }
        let mode = e.mode & 0o7777;
        match e.kind {
            Kind::Dir => {
                self.x.mkdir(&path, mode)?;
                self.stats.dirs += 1;
            }
            Kind::File => {
                self.stats.files += 1;
                self.extract_regfile(e, &path, tar)?;
            }
            Kind::HardLink => {
                self.stats.hardlinks += 1;
                let target = clean_name(&e.link);
                self.x.hardlink(&comps(&target)?, &path)?;
            }
            Kind::Symlink => {
                self.stats.symlinks += 1;
                self.x.symlink(&clean_name(&e.link), &path)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.stats.specials += 1;
                let ty = match e.kind {
                    Kind::Char => crate::ext2fs::inode::S_IFCHR,
                    Kind::Block => crate::ext2fs::inode::S_IFBLK,
                    _ => crate::ext2fs::inode::S_IFIFO,
                };
                let (major, minor) = device_numbers(e)?;
                self.x.mknod(&path, ty | mode as u16, major, minor)?;
            }
        }
        self.set_file_perms(e, &path)?;
        if e.kind == Kind::Dir {
            self.dirs.push((name.to_vec(), e.mtime.sec as u32));
        }
        self.unpacked.insert(name.to_vec());
        Ok(())
    }

    /// libtar's `mkdir_hier`: make the missing directories of `dir` (a
    /// dirname with its trailing slash).
    fn mkdir_hier(&mut self, e: &Entry, dir: &[u8]) -> Result<()> {
        let parts = comps(strip_slash(dir))?;
        if let Some(st) = self.x.lstat(&parts)? {
            if st.is_dir() {
                return Ok(());
            }
            return Err(entry_err(e, "a parent directory is not a directory"));
        }
        // photon's mkdir_recursive: every prefix, existing ones skipped.
        self.x.mkdir_all(&parts, 0o755)
    }

    /// libtar's `convert_whiteout`: whether the entry was a whiteout.
    fn convert_whiteout(&mut self, dir: &[u8], base: &[u8]) -> Result<bool> {
        if base == b".wh..wh..opq" {
            let d = strip_slash(dir);
            if self.x.lstat(&comps(d)?)?.is_none() {
                return Err(Error::Invalid(format!(
                    "opaque whiteout in '{}', which does not exist",
                    quote(d)
                )));
            }
            self.remove_all(d, false)?;
            return Ok(true);
        }
        if let Some(target) = base.strip_prefix(b".wh.") {
            let opath = [dir, target].concat();
            self.remove_all(&opath, true)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// libtar's `remove_all`: remove `path` recursively, keeping what this
    /// layer unpacked; the directory itself only when `rmdir`. Failures to
    /// remove are ignored, as upstream ignores them.
    fn remove_all(&mut self, path: &[u8], rmdir: bool) -> Result<()> {
        let p = comps(path)?;
        let Some(st) = self.x.lstat(&p)? else {
            return Ok(());
        };
        if !st.is_dir() {
            if !self.unpacked.contains(path) {
                if let Err(err) = self.x.unlink(&p) {
                    tracing::debug!("remove_all: {err}");
                }
            }
            return Ok(());
        }
        for name in self.x.readdir(&p)? {
            let child = [path, b"/", &name].concat();
            self.remove_all(&child, true)?;
        }
        if rmdir && !self.unpacked.contains(path) {
            self.x.rmdir(&p)?;
        }
        Ok(())
    }

    /// Remove the directory `path` and everything in it, also what this
    /// layer unpacked there, for a later entry of the layer that is not a
    /// directory: it replaces the directory. What this layer unpacked below
    /// `path` is forgotten (a later whiteout must not keep a name of the
    /// new entry's), and so are the directory times still to be set there.
    fn remove_dir_tree(&mut self, path: &[u8]) -> Result<()> {
        self.remove_dir_entries(path)?;
        let below = |q: &[u8]| {
            q.strip_prefix(path)
                .is_some_and(|r| r.is_empty() || r[0] == b'/')
        };
        self.unpacked.retain(|q| !below(q));
        self.dirs.retain(|(q, _)| !below(q));
        Ok(())
    }

    /// The filesystem side of [`Self::remove_dir_tree`]: `path`, its entries
    /// and theirs, depth first.
    fn remove_dir_entries(&mut self, path: &[u8]) -> Result<()> {
        let p = comps(path)?;
        for name in self.x.readdir(&p)? {
            let child = [path, b"/", &name].concat();
            let c = comps(&child)?;
            match self.x.lstat(&c)? {
                Some(st) if st.is_dir() => self.remove_dir_entries(&child)?,
                Some(_) => self.x.unlink(&c)?,
                None => {}
            }
        }
        if !self.x.rmdir(&p)? {
            return Err(Error::Invalid(format!(
                "'{}': the directory to replace is not empty after removing its entries",
                quote(path)
            )));
        }
        Ok(())
    }

    /// libtar's `extract_regfile_meta_only` (with a [`FileData`]): create the
    /// file, allocate its blocks and let the [`FileData`] fill (map) each
    /// extent; or `extract_regfile` (without): create it and write its bytes.
    fn extract_regfile<R: Read>(
        &mut self,
        e: &Entry,
        path: &[&[u8]],
        tar: &mut TarReader<R>,
    ) -> Result<()> {
        if e.sparse.is_some() {
            return Err(entry_err(
                e,
                "sparse tar members are not supported by the upstream-compatible engine (upstream's libtar cannot expand them)",
            ));
        }
        let ino = self.x.create(path, 0o666)?;
        self.stats.data_bytes += e.size;
        let Some(file_data) = self.file_data.as_mut() else {
            return self.x.write_file(ino, e.size, &mut |b| tar.read_data(b));
        };
        let data_offset = TarData::stream_position(tar);
        self.x.fallocate(ino, e.size)?;
        let extents = self.x.fiemap(ino)?;
        file_data.begin(e, data_offset)?;
        let bs = self.x.fs.block_size();
        let mut lblk = 0u64;
        for (pblk, len) in extents {
            let ctx = FillCtx {
                cache: &mut self.x.fs.channel().cache,
                block_size: bs,
                entry: e,
                tar: &mut *tar,
            };
            file_data.fill(ctx, Run { lblk, pblk, len })?;
            lblk += len;
        }
        Ok(())
    }

    /// libtar's `set_file_perms`.
    fn set_file_perms(&mut self, e: &Entry, path: &[&[u8]]) -> Result<()> {
        self.x.chown(path, e.uid, e.gid)?;
        let mut xattrs: Vec<&(Vec<u8>, Vec<u8>)> = e.xattrs.iter().collect();
        // A std::map keyed by the record name: sorted, the last value wins.
        xattrs.reverse();
        xattrs.sort_by(|a, b| a.0.cmp(&b.0));
        xattrs.dedup_by(|a, b| a.0 == b.0);
        for (name, value) in xattrs {
            if !self.x.setxattr(path, name, value)? {
                tracing::warn!(
                    "'{}': ignored xattr '{}' (namespace not supported)",
                    e.path_lossy(),
                    quote(name)
                );
            }
        }
        self.x.utimes(path, e.mtime.sec as u32)?;
        if let Some(st) = self.x.lstat(path)? {
            if st.is_symlink() {
                return Ok(());
            }
        }
        self.x.chmod(path, e.mode & 0o7777)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanname() {
        let c = |p: &str| String::from_utf8(clean_name(p.as_bytes())).unwrap();
        assert_eq!(c("usr/"), "usr");
        assert_eq!(c("./usr//share/./doc/"), "usr/share/doc");
        assert_eq!(c("./"), ".");
        assert_eq!(c(""), ".");
        assert_eq!(c("/"), "/");
        assert_eq!(c("/.."), "/");
        assert_eq!(c("/../a"), "/a");
        assert_eq!(c("a/../../b"), "../b");
        assert_eq!(c("../../x"), "../../x");
        assert_eq!(c("a/b/../c"), "a/c");
        assert_eq!(c("/a/b/.."), "/a");
        assert_eq!(c("a/.."), ".");
    }

    #[test]
    fn dir_and_base() {
        assert_eq!(split_path(b"a/b/c"), (&b"a/b/"[..], &b"c"[..]));
        assert_eq!(split_path(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(split_path(b"/x"), (&b"/"[..], &b"x"[..]));
    }
}
