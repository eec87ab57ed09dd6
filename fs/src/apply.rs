//! Apply an OCI layer tar to the ext4 filesystem on a block device.
//!
//! Semantics follow the OCI image spec and upstream overlaybd's `UnTar`
//! (which mirrors containerd):
//! * paths are cleaned lexically; a name that leaves the root (`../x`, a
//!   hard link to `../../etc/passwd`) is refused. Symlinks in parent
//!   components are followed inside the layer root, as containerd's
//!   `fs.RootPath` does: absolute targets start at the root and `..` never
//!   goes above it (`var/run -> /run` puts `var/run/foo` at `/run/foo`,
//!   whichever layer made the link); more than 40 links is a loop.
//! * missing parent directories are created (mode 0755, root, time 0).
//! * an entry for the root itself (`./`, `.`, `./.`) gives the root its
//!   owner, mode, time and xattrs, in any layer, as upstream's libtar
//!   does; an absolute one (`/`, `/.`) is skipped, as libtar skips it
//!   ([`RootEntry`]).
//! * an existing entry is replaced, unless both are directories, in which
//!   case the directory keeps its contents and takes the new metadata
//!   (including the new set of extended attributes).
//! * `.wh.<name>` removes `<name>` from lower layers (recursively); what this
//!   same layer already unpacked is kept, as the spec requires.
//!   `.wh..wh..opq` empties the directory of everything lower layers put
//!   there. Other `.wh..wh.*` names are ignored.
//! * hard links may point at any non-directory, including files of lower
//!   layers; the header's owner, mode, time and xattrs are applied to the
//!   shared inode, as containerd and upstream do.
//! * `user.*` xattrs on anything but files and directories, and xattrs in
//!   namespaces the kernel does not know, are skipped with a warning (the
//!   kernel would refuse them too).
//! * directory times are set after the whole layer is applied.
//!
//! Where the bytes of regular files go is not decided here but by a
//! [`FileData`] ([`crate::filedata`]): copied into the layer (the default)
//! or mapped into the layer tar for TurboOCI layers.
//!
//! Performance: directories touched are cached in memory (name -> inode and
//! the entry's place in the directory), so lookups, replacements and
//! whiteouts never rescan a directory; new names go into the directory's
//! last block directly. File data is allocated in contiguous runs
//! (`ext2fs_new_range`, extents of up to 32768 blocks) and written straight
//! to the device through the staging buffer, never block by block.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;

use crate::dirent;
use crate::error::{quote, Error, Result};
use crate::ext2fs::inode::{self, Inode, Timestamp, EXTRA_ISIZE};
use crate::ext2fs::ops::MAX_EXTENT_LEN;
use crate::ext2fs::{sys, Ext2Fs, DEFAULT_CACHE_BYTES};
use crate::filedata::{CopyData, FileData, FillCtx, Run, TarData};
use crate::tar::{symlink_target_problem, Entry, Kind, TarReader};

/// Counters reported by [`apply_tar`] and its progress callback.
#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    /// Tar entries processed (including whiteouts).
    pub entries: u64,
    /// Regular files created.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Device nodes and FIFOs created.
    pub specials: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// File content bytes written.
    pub data_bytes: u64,
    /// Bytes of tar stream consumed.
    pub tar_bytes: u64,
    /// Time spent so far.
    pub elapsed: Duration,
}

impl ApplyStats {
    /// Tar throughput in MB/s (10^6 bytes).
    pub fn mb_per_sec(&self) -> f64 {
        self.tar_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Entries per second.
    pub fn entries_per_sec(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Options of [`apply_tar`].
pub struct ApplyOptions<'a> {
    /// Called with the running counters about twice a second.
    pub progress: Option<&'a mut dyn FnMut(&ApplyStats)>,
    /// Metadata cache size in bytes.
    pub cache_bytes: usize,
    /// Where regular file data goes; `None` copies it into the layer
    /// ([`CopyData`]). TurboOCI layers are written by the upstream-compatible
    /// engine ([`crate::photon`]) with a [`crate::filedata::TargetData`].
    pub file_data: Option<Box<dyn FileData + 'a>>,
}

impl Default for ApplyOptions<'_> {
    fn default() -> Self {
        ApplyOptions {
            progress: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            file_data: None,
        }
    }
}

impl std::fmt::Debug for ApplyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyOptions")
            .field("progress", &self.progress.is_some())
            .field("cache_bytes", &self.cache_bytes)
            .field("file_data", &self.file_data.is_some())
            .finish()
    }
}

/// Apply the (decompressed) layer tar read from `tar` to the ext4
/// filesystem on `dev`. On error nothing more is written to the device (what
/// was written already is left; the layer must be discarded).
pub fn apply_tar<R: Read>(
    dev: Arc<dyn BlockDevice>,
    tar: R,
    opts: ApplyOptions<'_>,
) -> Result<ApplyStats> {
    let start = Instant::now();
    let fs = Ext2Fs::open(dev, opts.cache_bytes)?;
    if fs.has_incompat(sys::EXT3_FEATURE_INCOMPAT_RECOVER) {
        return Err(Error::Unsupported(
            "the ext4 journal needs recovery; run e2fsck on the lower layers first".into(),
        ));
    }
    let file_data = opts
        .file_data
        .unwrap_or_else(|| Box::new(CopyData::default()));
    let mut a = Applier::new(fs, file_data);
    let mut reader = TarReader::new(std::io::BufReader::with_capacity(1 << 20, tar));
    let mut progress = opts.progress;
    let mut last_report = Instant::now();
    while let Some(entry) = reader.next_entry()? {
        a.stats.entries += 1;
        let path = entry.path_lossy();
        match a.apply_entry(&entry, &mut reader) {
            Ok(()) => {}
            Err(e @ Error::Entry { .. }) => return Err(e),
            Err(e) => {
                return Err(Error::AtEntry {
                    path,
                    source: Box::new(e),
                })
            }
        }
        if let Some(cb) = progress.as_mut() {
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                a.stats.tar_bytes = reader.position();
                a.stats.elapsed = start.elapsed();
                cb(&a.stats);
            }
        }
    }
    a.finish()?;
    let Applier { fs, mut stats, .. } = a;
    fs.close(Some(0))?;
    stats.tar_bytes = reader.position();
    stats.elapsed = start.elapsed();
    if let Some(cb) = progress.as_mut() {
        cb(&stats);
    }
    Ok(stats)
}

/// A directory entry as remembered in memory.
#[derive(Debug, Clone, Copy)]
struct Dent {
    ino: u32,
    ftype: u8,
    /// Logical block and offset of the entry, for directories we edit
    /// ourselves.
    loc: Option<(u64, u32)>,
}

struct DirCache {
    entries: HashMap<Box<[u8]>, Dent>,
    /// A linear directory whose blocks we edit directly.
    fast: bool,
}

const FT_REG: u8 = sys::EXT2_FT_REG_FILE as u8;
const FT_DIR: u8 = sys::EXT2_FT_DIR as u8;
const FT_CHR: u8 = sys::EXT2_FT_CHRDEV as u8;
const FT_BLK: u8 = sys::EXT2_FT_BLKDEV as u8;
const FT_FIFO: u8 = sys::EXT2_FT_FIFO as u8;
const FT_SOCK: u8 = sys::EXT2_FT_SOCK as u8;
const FT_LNK: u8 = sys::EXT2_FT_SYMLINK as u8;
const ROOT: u32 = sys::EXT2_ROOT_INO as u32;
/// Symbolic links followed while resolving one path before giving up (the
/// kernel's limit too).
pub const MAX_SYMLINKS: usize = 40;
/// Linux device numbers: 12-bit major, 20-bit minor (`new_encode_dev`).
const MAX_DEV_MAJOR: u64 = (1 << 12) - 1;
const MAX_DEV_MINOR: u64 = (1 << 20) - 1;
const LINK_MAX: u16 = sys::EXT2_LINK_MAX as u16;
/// dtime of deleted inodes: e2fsck treats small nonzero values as orphan
/// list links, so use the largest value (as upstream does).
const DELETED_DTIME: u32 = u32::MAX;

fn ftype_of_mode(mode: u16) -> u8 {
    match mode & inode::S_IFMT {
        inode::S_IFREG => FT_REG,
        inode::S_IFDIR => FT_DIR,
        inode::S_IFCHR => FT_CHR,
        inode::S_IFBLK => FT_BLK,
        inode::S_IFIFO => FT_FIFO,
        inode::S_IFSOCK => FT_SOCK,
        inode::S_IFLNK => FT_LNK,
        _ => 0,
    }
}

/// The entry's device numbers, refused when past Linux's 12-bit major and
/// 20-bit minor (what an inode stores) instead of truncated.
pub(crate) fn device_numbers(e: &Entry) -> Result<(u32, u32)> {
    if e.devmajor > MAX_DEV_MAJOR || e.devminor > MAX_DEV_MINOR {
        return Err(entry_err(
            e,
            format!(
                "device number {}:{} does not fit in an inode (major at most {MAX_DEV_MAJOR}, minor at most {MAX_DEV_MINOR})",
                e.devmajor, e.devminor
            ),
        ));
    }
    // Both fit in u32: checked against the 12/20-bit limits above.
    Ok((e.devmajor as u32, e.devminor as u32))
}

pub(crate) fn entry_err(e: &Entry, msg: impl Into<String>) -> Error {
    Error::Entry {
        path: e.path_lossy(),
        msg: msg.into(),
    }
}

/// The entry's extended attributes that ext4 accepts on an inode of `kind`:
/// the `user.`, `trusted.`, `security.` namespaces and POSIX ACLs, with
/// `user.*` only on files and directories (the kernel refuses it elsewhere).
/// The others are skipped with a warning, as containerd and upstream do.
/// Both apply engines use this rule.
pub fn accepted_xattrs(e: &Entry, kind: Kind) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v = Vec::new();
    for (n, val) in &e.xattrs {
        let known = n.starts_with(b"user.")
            || n.starts_with(b"trusted.")
            || n.starts_with(b"security.")
            || n == b"system.posix_acl_access"
            || n == b"system.posix_acl_default";
        if !known || n.contains(&0) {
            tracing::warn!(
                "'{}': ignoring xattr '{}' (namespace not supported by ext4)",
                quote(&e.path),
                quote(n)
            );
            continue;
        }
        if n.starts_with(b"user.") && !matches!(kind, Kind::File | Kind::Dir) {
            tracing::warn!(
                "'{}': ignoring xattr '{}' (user.* only applies to files and directories)",
                quote(&e.path),
                quote(n)
            );
            continue;
        }
        v.push((n.clone(), val.clone()));
    }
    v
}

/// What an entry naming the root directory (its path cleans to nothing)
/// does to the root, as upstream's libtar `UnTar` has it: `clean_name`
/// turns a relative name (`./`, `.`, `./.`, `a/..`) into `.`, which is
/// extracted like any existing directory (owner, xattrs, times and mode
/// of the header go to the root, in every layer), and an absolute one
/// (`/`, `/.`) into `/`, which is skipped ("resolved to root").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootEntry {
    /// Give the root the entry's metadata.
    Apply,
    /// Ignore the entry.
    Skip,
}

/// Classify an entry whose path names the root ([`RootEntry`]); a root
/// entry that is not a directory is refused (libtar would remove the
/// root's contents to put it there).
pub fn root_entry(e: &Entry) -> Result<RootEntry> {
    if e.path.first() == Some(&b'/') {
        tracing::warn!("file '{}' ignored: resolved to root", e.path_lossy());
        return Ok(RootEntry::Skip);
    }
    if e.kind != Kind::Dir {
        return Err(entry_err(
            e,
            "names the root directory but is not a directory; refusing",
        ));
    }
    Ok(RootEntry::Apply)
}

/// Split a tar path into clean components (`.` and empty ones dropped, `..`
/// applied lexically); `None` if it leaves the root. Both apply engines use
/// this rule.
pub fn clean_components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// For a hard link entry at `name` whose target is `link`: the target's
/// parent directories (clean components) when the target's last component
/// is `name`, i.e. when the link may name its own entry; the caller then
/// resolves them and compares with the entry's directory. `None` when it
/// cannot (another name, or a target that leaves the root or is empty).
/// Both apply engines use this rule.
pub fn self_link_parents<'a>(link: &'a [u8], name: &[u8]) -> Option<Vec<&'a [u8]>> {
    let mut comps = clean_components(link)?;
    (comps.pop()? == name).then_some(comps)
}

struct Applier<'a> {
    fs: Ext2Fs,
    file_data: Box<dyn FileData + 'a>,
    dirs: HashMap<u32, DirCache>,
    /// Names this layer created, per parent directory inode.
    unpacked: HashMap<u32, HashSet<Box<[u8]>>>,
    /// Directories whose times are set at the end: inode -> mtime.
    dir_times: HashMap<u32, Timestamp>,
    goal: u64,
    bs: u64,
    inode_size: usize,
    csum_tail: usize,
    filetype: bool,
    extents: bool,
    /// Largest regular file the filesystem holds (Linux's `s_maxbytes`).
    max_file_size: u64,
    stats: ApplyStats,
}

impl<'a> Applier<'a> {
    fn new(fs: Ext2Fs, file_data: Box<dyn FileData + 'a>) -> Self {
        let bs = fs.block_size();
        let inode_size = fs.inode_size();
        let csum_tail = if fs.has_ro_compat(sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM) {
            12
        } else {
            0
        };
        let filetype = fs.has_incompat(sys::EXT2_FEATURE_INCOMPAT_FILETYPE);
        let extents = fs.has_incompat(sys::EXT3_FEATURE_INCOMPAT_EXTENTS);
        let max_file_size = fs.max_file_size(extents);
        Applier {
            fs,
            file_data,
            dirs: HashMap::new(),
            unpacked: HashMap::new(),
            dir_times: HashMap::new(),
            goal: 0,
            bs,
            inode_size,
            csum_tail,
            filetype,
            extents,
            max_file_size,
            stats: ApplyStats::default(),
        }
    }

    fn ft(&self, t: u8) -> u8 {
        if self.filetype {
            t
        } else {
            0
        }
    }

    // ----- directory cache -------------------------------------------------

    /// Load directory `dir` into the cache (once).
    fn load_dir(&mut self, dir: u32) -> Result<()> {
        if self.dirs.contains_key(&dir) {
            return Ok(());
        }
        let mut ino = self.fs.read_inode(dir)?;
        if !ino.is_dir() {
            return Err(Error::Unsupported(format!(
                "inode {dir} is not a directory"
            )));
        }
        let fast = ino.flags() & (inode::INDEX_FL | inode::INLINE_DATA_FL) == 0;
        let mut entries = HashMap::new();
        if fast {
            let nblocks = ino.size() / self.bs;
            let limit = self.bs as usize - self.csum_tail;
            for lblk in 0..nblocks {
                let pblk = self.fs.bmap(dir, &mut ino, lblk)?;
                if pblk == 0 {
                    continue;
                }
                let block = self.fs.read_dir_block(pblk, dir)?;
                let parsed = dirent::parse(&block, limit).map_err(|m| {
                    Error::Unsupported(format!("directory inode {dir} block {lblk}: {m}"))
                })?;
                for e in parsed {
                    if e.ino == 0 || e.name == b"." || e.name == b".." {
                        continue;
                    }
                    entries.insert(
                        e.name.to_vec().into_boxed_slice(),
                        Dent {
                            ino: e.ino,
                            ftype: e.ftype,
                            loc: Some((lblk, e.off as u32)),
                        },
                    );
                }
            }
        } else {
            for (name, ino, ftype) in self.fs.dir_entries(dir)? {
                if name == b"." || name == b".." {
                    continue;
                }
                entries.insert(
                    name.into_boxed_slice(),
                    Dent {
                        ino,
                        ftype,
                        loc: None,
                    },
                );
            }
        }
        if !self.filetype {
            // Without the filetype feature the type comes from the inode.
            for d in entries.values_mut() {
                d.ftype = ftype_of_mode(self.fs.read_inode(d.ino)?.mode());
            }
        }
        self.dirs.insert(dir, DirCache { entries, fast });
        Ok(())
    }

    fn lookup(&mut self, dir: u32, name: &[u8]) -> Result<Option<Dent>> {
        self.load_dir(dir)?;
        Ok(self.dirs[&dir].entries.get(name).copied())
    }

    /// Add `name -> ino` to directory `dir`.
    fn dir_add(&mut self, dir: u32, name: &[u8], ino: u32, ftype: u8) -> Result<()> {
        self.load_dir(dir)?;
        let disk_ftype = self.ft(ftype);
        let loc = if self.dirs[&dir].fast {
            Some(self.dir_insert_fast(dir, name, ino, disk_ftype)?)
        } else {
            self.fs.link(dir, name, ino, disk_ftype)?;
            None
        };
        self.dirs
            .get_mut(&dir)
            .expect("loaded above")
            .entries
            .insert(name.to_vec().into_boxed_slice(), Dent { ino, ftype, loc });
        Ok(())
    }

    fn dir_insert_fast(
        &mut self,
        dir: u32,
        name: &[u8],
        ino: u32,
        ftype: u8,
    ) -> Result<(u64, u32)> {
        let limit = self.bs as usize - self.csum_tail;
        for attempt in 0..2 {
            let mut dinode = self.fs.read_inode(dir)?;
            let nblocks = dinode.size() / self.bs;
            if nblocks > 0 {
                let lblk = nblocks - 1;
                let pblk = self.fs.bmap(dir, &mut dinode, lblk)?;
                if pblk != 0 {
                    let mut block = self.fs.read_dir_block(pblk, dir)?;
                    let at = dirent::insert(&mut block, limit, name, ino, ftype).map_err(|m| {
                        Error::Unsupported(format!("directory inode {dir} block {lblk}: {m}"))
                    })?;
                    if let Some(off) = at {
                        self.fs.write_dir_block(pblk, &mut block, dir)?;
                        return Ok((lblk, off as u32));
                    }
                }
            }
            if attempt == 0 {
                self.fs.expand_dir(dir)?;
            }
        }
        Err(Error::Unsupported(format!(
            "no room for a new name in directory inode {dir} even after growing it"
        )))
    }

    /// Remove `name` (holding `d`) from directory `dir`.
    fn dir_remove(&mut self, dir: u32, name: &[u8], d: Dent) -> Result<()> {
        let cache = self.dirs.get_mut(&dir).expect("directory loaded by lookup");
        cache.entries.remove(name);
        if let (true, Some((lblk, off))) = (cache.fast, d.loc) {
            let limit = self.bs as usize - self.csum_tail;
            let mut dinode = self.fs.read_inode(dir)?;
            let pblk = self.fs.bmap(dir, &mut dinode, lblk)?;
            if pblk != 0 {
                let mut block = self.fs.read_dir_block(pblk, dir)?;
                let done = dirent::remove_at(&mut block, limit, off as usize, name, d.ino)
                    .map_err(|m| {
                        Error::Unsupported(format!("directory inode {dir} block {lblk}: {m}"))
                    })?;
                if done {
                    return self.fs.write_dir_block(pblk, &mut block, dir);
                }
            }
        }
        self.fs.unlink(dir, name, d.ino)
    }

    // ----- path resolution ----------------------------------------------------

    /// Resolve the directory that holds the last component of `comps`,
    /// creating missing directories when `create`.
    ///
    /// Symlinks met on the way are followed the way containerd's
    /// `fs.RootPath` (and a chroot) follows them: an absolute target starts
    /// again at the layer root, and `..` at the root stays at the root, so
    /// resolution never leaves the filesystem (Debian's `var/run -> /run`
    /// makes `var/run/foo` land at `/run/foo`). `comps` itself is already
    /// clean; only names leaving the root lexically are refused (by the
    /// callers).
    fn resolve_dir(&mut self, e: &Entry, comps: &[&[u8]], create: bool) -> Result<u32> {
        let mut stack: Vec<u32> = vec![ROOT];
        let mut queue: std::collections::VecDeque<Vec<u8>> =
            comps.iter().map(|c| c.to_vec()).collect();
        let mut followed = 0;
        while let Some(c) = queue.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *stack.last().expect("never empty");
            match self.lookup(cur, &c)? {
                // A directory entry stores 255 bytes of name at most; a longer
                // one would be written with its length modulo 256.
                None if create && c.len() > sys::EXT2_NAME_LEN as usize => {
                    return Err(entry_err(
                        e,
                        format!(
                            "'{}': name is {} bytes long (ext4 allows 255)",
                            quote(&c),
                            c.len()
                        ),
                    ))
                }
                None if create => {
                    let ino = self.make_dir(cur, &c, 0o755, 0, 0, Timestamp::default())?;
                    stack.push(ino);
                }
                None => {
                    return Err(entry_err(
                        e,
                        format!("path component '{}' does not exist", quote(&c)),
                    ))
                }
                Some(d) if d.ftype == FT_DIR => stack.push(d.ino),
                Some(d) if d.ftype == FT_LNK => {
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
                    let target = self.read_symlink(d.ino)?;
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let mut parts: Vec<Vec<u8>> =
                        target.split(|&b| b == b'/').map(|p| p.to_vec()).collect();
                    parts.extend(queue.drain(..));
                    queue = parts.into();
                }
                Some(_) => {
                    return Err(entry_err(
                        e,
                        format!("path component '{}' is not a directory", quote(&c)),
                    ))
                }
            }
        }
        Ok(*stack.last().expect("never empty"))
    }

    fn read_symlink(&mut self, ino: u32) -> Result<Vec<u8>> {
        let mut i = self.fs.read_inode(ino)?;
        let size = i.size() as usize;
        if size > self.bs as usize {
            return Err(Error::Unsupported(format!(
                "symlink inode {ino} is too long"
            )));
        }
        if i.flags() & inode::INLINE_DATA_FL != 0 {
            let mut d = self.fs.inline_data(ino, &mut i)?;
            d.truncate(size);
            return Ok(d);
        }
        if !self.fs.has_valid_blocks(&mut i) {
            return Ok(i.block_area()[..size.min(60)].to_vec());
        }
        let pblk = self.fs.bmap(ino, &mut i, 0)?;
        let mut b = vec![0u8; self.bs as usize];
        if pblk != 0 {
            self.fs.read_bytes(&mut b, pblk * self.bs)?;
        }
        b.truncate(size);
        Ok(b)
    }

    // ----- inode creation -----------------------------------------------------

    fn new_inode_buf(&self, mode: u16, uid: u32, gid: u32, t: Timestamp) -> Inode {
        let mut i = Inode::zeroed(self.inode_size);
        i.set_extra_isize(EXTRA_ISIZE);
        i.set_mode(mode);
        i.set_uid(uid);
        i.set_gid(gid);
        i.set_times(t, Timestamp::default());
        i.set_links(1);
        i
    }

    fn alloc(&mut self, len: u64) -> Result<(u64, u64)> {
        let (p, n) = self.fs.new_range(self.goal, len)?;
        self.fs.block_alloc_stats_range(p, n, 1);
        self.goal = p + n;
        Ok((p, n))
    }

    fn make_dir(
        &mut self,
        parent: u32,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        t: Timestamp,
    ) -> Result<u32> {
        let ino = self.fs.new_inode(parent, inode::S_IFDIR)?;
        self.fs.inode_alloc_stats(ino, 1, true);
        let mut i = self.new_inode_buf(inode::S_IFDIR | (mode & 0o7777) as u16, uid, gid, t);
        i.set_links(2);
        let (blk, _) = self.alloc(1)?;
        let mut block = dirent::new_dir_block(
            self.bs as usize,
            self.csum_tail,
            ino,
            parent,
            self.ft(FT_DIR),
        );
        self.fs.write_dir_block(blk, &mut block, ino)?;
        i.set_size(self.bs);
        if self.extents {
            i.init_extent_root();
            self.fs.write_inode(ino, &mut i)?;
            let mut h = self.fs.extents(ino, &mut i)?;
            h.insert(&mut self.fs, 0, blk, 1)?;
            drop(h);
        } else {
            self.fs.write_inode(ino, &mut i)?;
            self.fs.bmap_set(ino, &mut i, 0, blk)?;
            self.fs.iblk_add_blocks(&mut i, 1)?;
        }
        self.fs.write_inode(ino, &mut i)?;
        self.dir_add(parent, name, ino, FT_DIR)?;
        let mut p = self.fs.read_inode(parent)?;
        // With dir_nlink a parent past the link limit keeps a count of 1.
        let links = p.links();
        p.set_links(if links >= LINK_MAX || links == 1 {
            1
        } else {
            links + 1
        });
        self.fs.write_inode(parent, &mut p)?;
        self.dirs.insert(
            ino,
            DirCache {
                entries: HashMap::new(),
                fast: true,
            },
        );
        Ok(ino)
    }

    fn make_file<R: Read>(
        &mut self,
        parent: u32,
        name: &[u8],
        e: &Entry,
        tar: &mut TarReader<R>,
    ) -> Result<u32> {
        let mode = inode::S_IFREG | (e.mode & 0o7777) as u16;
        let ino = self.fs.new_inode(parent, mode)?;
        self.fs.inode_alloc_stats(ino, 1, false);
        let mut i = self.new_inode_buf(mode, e.uid, e.gid, e.mtime);
        self.fs.set_file_size(&mut i, e.size)?;
        if self.extents {
            i.init_extent_root();
        }
        self.fs.write_inode(ino, &mut i)?;
        self.write_data(ino, &mut i, e, tar)?;
        self.fs.write_inode(ino, &mut i)?;
        self.dir_add(parent, name, ino, FT_REG)?;
        self.stats.data_bytes += e.size;
        Ok(ino)
    }

    /// Allocate the blocks of a regular file and let the [`FileData`] fill
    /// them (copy the tar bytes, or map them into the tar).
    fn write_data<R: Read>(
        &mut self,
        ino: u32,
        i: &mut Inode,
        e: &Entry,
        tar: &mut TarReader<R>,
    ) -> Result<()> {
        let ranges = self.file_data.allocated_ranges(e)?;
        self.file_data.begin(e, tar.stream_position())?;
        if ranges.is_empty() {
            return Ok(());
        }
        let bs = self.bs;
        // Block runs covering the data ranges.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(off, len) in &ranges {
            if len == 0 {
                continue;
            }
            let (s, t) = (off / bs, (off + len).div_ceil(bs));
            match runs.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(t),
                _ => runs.push((s, t)),
            }
        }
        let mut handle = if self.extents {
            Some(self.fs.extents(ino, i)?)
        } else {
            None
        };
        let mut mapped = Vec::new();
        for (rs, re) in runs {
            let mut lblk = rs;
            while lblk < re {
                let (pblk, plen) = {
                    let (p, n) = self
                        .fs
                        .new_range(self.goal, (re - lblk).min(MAX_EXTENT_LEN))?;
                    self.fs.block_alloc_stats_range(p, n, 1);
                    self.goal = p + n;
                    (p, n)
                };
                match handle.as_mut() {
                    Some(h) => h.insert(&mut self.fs, lblk, pblk, plen)?,
                    None => mapped.push((lblk, pblk, plen)),
                }
                let ctx = FillCtx {
                    cache: &mut self.fs.channel().cache,
                    block_size: bs,
                    entry: e,
                    tar: &mut *tar,
                };
                self.file_data.fill(
                    ctx,
                    Run {
                        lblk,
                        pblk,
                        len: plen,
                    },
                )?;
                lblk += plen;
            }
        }
        drop(handle);
        for (lblk, pblk, n) in mapped {
            for k in 0..n {
                self.fs.bmap_set(ino, i, lblk + k, pblk + k)?;
            }
            self.fs.iblk_add_blocks(i, n)?;
        }
        Ok(())
    }

    fn make_symlink(&mut self, parent: u32, name: &[u8], e: &Entry) -> Result<u32> {
        if let Some(problem) = symlink_target_problem(&e.link, self.bs as usize - 1) {
            return Err(entry_err(e, problem));
        }
        let ino = self.fs.new_inode(parent, inode::S_IFLNK | 0o777)?;
        self.fs.symlink(parent, ino, &e.link)?;
        let mut i = self.fs.read_inode(ino)?;
        i.set_uid(e.uid);
        i.set_gid(e.gid);
        i.set_times(e.mtime, Timestamp::default());
        self.fs.write_inode(ino, &mut i)?;
        self.dir_add(parent, name, ino, FT_LNK)?;
        Ok(ino)
    }

    fn make_special(&mut self, parent: u32, name: &[u8], e: &Entry) -> Result<u32> {
        let (ty, ft) = match e.kind {
            Kind::Char => (inode::S_IFCHR, FT_CHR),
            Kind::Block => (inode::S_IFBLK, FT_BLK),
            _ => (inode::S_IFIFO, FT_FIFO),
        };
        let mode = ty | (e.mode & 0o7777) as u16;
        let ino = self.fs.new_inode(parent, mode)?;
        self.fs.inode_alloc_stats(ino, 1, false);
        let mut i = self.new_inode_buf(mode, e.uid, e.gid, e.mtime);
        if ft != FT_FIFO {
            // check_limits kept both within 12 and 20 bits.
            i.set_rdev(e.devmajor as u32, e.devminor as u32);
        }
        self.fs.write_inode(ino, &mut i)?;
        self.dir_add(parent, name, ino, ft)?;
        Ok(ino)
    }

    /// Whether the hard link entry `e`, at `name` in directory `parent`, names
    /// that same directory entry as its target. A target that cannot be
    /// resolved is not (the link then fails as any other would).
    fn links_to_itself(&mut self, e: &Entry, parent: u32, name: &[u8]) -> Result<bool> {
        let Some(tparents) = self_link_parents(&e.link, name) else {
            return Ok(false);
        };
        match self.resolve_dir(e, &tparents, false) {
            Ok(d) => Ok(d == parent),
            Err(Error::Entry { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    fn make_hardlink(&mut self, parent: u32, name: &[u8], e: &Entry) -> Result<u32> {
        let comps = clean_components(&e.link)
            .ok_or_else(|| entry_err(e, "hard link target leaves the layer root; refusing"))?;
        let Some((tname, tparents)) = comps.split_last() else {
            return Err(entry_err(e, "hard link to the root directory"));
        };
        let tdir = self
            .resolve_dir(e, tparents, false)
            .map_err(|err| match err {
                Error::Entry { msg, .. } => {
                    entry_err(e, format!("hard link target '{}': {msg}", quote(&e.link)))
                }
                other => other,
            })?;
        let Some(t) = self.lookup(tdir, tname)? else {
            return Err(entry_err(
                e,
                format!("hard link target '{}' does not exist", quote(&e.link)),
            ));
        };
        if t.ftype == FT_DIR {
            return Err(entry_err(
                e,
                format!("hard link target '{}' is a directory", quote(&e.link)),
            ));
        }
        let mut i = self.fs.read_inode(t.ino)?;
        if i.links() >= LINK_MAX {
            return Err(entry_err(e, "too many hard links to the target"));
        }
        i.set_links(i.links() + 1);
        self.fs.write_inode(t.ino, &mut i)?;
        self.dir_add(parent, name, t.ino, t.ftype)?;
        Ok(t.ino)
    }

    // ----- removal --------------------------------------------------------

    /// Drop one link to `d` (in `dir` as `name`) and free the inode when no
    /// link is left. Directories are emptied first.
    fn remove_tree(&mut self, dir: u32, name: &[u8], d: Dent) -> Result<()> {
        if d.ftype == FT_DIR {
            for (cname, cd) in self.children(d.ino)? {
                self.remove_tree(d.ino, &cname, cd)?;
            }
        }
        self.dir_remove(dir, name, d)?;
        let mut i = self.fs.read_inode(d.ino)?;
        if i.is_dir() {
            self.dirs.remove(&d.ino);
            self.free_inode(d.ino, &mut i, true)?;
            let mut p = self.fs.read_inode(dir)?;
            let links = p.links();
            if links > 2 && links < LINK_MAX {
                p.set_links(links - 1);
            }
            self.fs.write_inode(dir, &mut p)?;
        } else if i.links() <= 1 {
            self.free_inode(d.ino, &mut i, false)?;
        } else {
            i.set_links(i.links() - 1);
            self.fs.write_inode(d.ino, &mut i)?;
        }
        Ok(())
    }

    fn mark_unpacked(&mut self, parent: u32, name: &[u8]) {
        self.unpacked
            .entry(parent)
            .or_default()
            .insert(Box::from(name));
    }

    fn free_inode(&mut self, ino: u32, i: &mut Inode, is_dir: bool) -> Result<()> {
        // Forget per-inode state: the number may be reused in this layer.
        self.dir_times.remove(&ino);
        self.unpacked.remove(&ino);
        self.fs.free_ext_attr(ino, i)?;
        if self.fs.has_valid_blocks(i) {
            self.fs.punch_all(ino, i)?;
        }
        i.set_links(0);
        i.set_dtime(DELETED_DTIME);
        self.fs.write_inode(ino, i)?;
        self.fs.inode_alloc_stats(ino, -1, is_dir);
        Ok(())
    }

    /// The children of a directory, sorted by name (deterministic order).
    fn children(&mut self, dir: u32) -> Result<Vec<(Vec<u8>, Dent)>> {
        self.load_dir(dir)?;
        let mut v: Vec<(Vec<u8>, Dent)> = self.dirs[&dir]
            .entries
            .iter()
            .map(|(n, d)| (n.to_vec(), *d))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// Remove what lower layers put at `dir/name`, keeping what this layer
    /// unpacked (and, for directories, anything still inside them).
    fn remove_lower(&mut self, dir: u32, name: &[u8], d: Dent) -> Result<()> {
        let mine = self.unpacked.get(&dir).is_some_and(|s| s.contains(name));
        if d.ftype == FT_DIR {
            for (cname, cd) in self.children(d.ino)? {
                self.remove_lower(d.ino, &cname, cd)?;
            }
            if !mine && self.dirs[&d.ino].entries.is_empty() {
                self.remove_tree(dir, name, d)?;
            }
        } else if !mine {
            self.remove_tree(dir, name, d)?;
        }
        Ok(())
    }

    // ----- entries ---------------------------------------------------------

    fn apply_entry<R: Read>(&mut self, e: &Entry, tar: &mut TarReader<R>) -> Result<()> {
        let comps = clean_components(&e.path)
            .ok_or_else(|| entry_err(e, "path leaves the layer root ('..' above '/'); refusing"))?;
        let Some((name, parents)) = comps.split_last() else {
            return match root_entry(e)? {
                RootEntry::Skip => Ok(()),
                RootEntry::Apply => {
                    self.update_dir(ROOT, e)?;
                    self.stats.dirs += 1;
                    Ok(())
                }
            };
        };
        let name: &[u8] = name;
        if name.len() > sys::EXT2_NAME_LEN as usize {
            return Err(entry_err(
                e,
                format!("name is {} bytes long (ext4 allows 255)", name.len()),
            ));
        }
        self.check_limits(e)?;
        let parent = self.resolve_dir(e, parents, true)?;

        if let Some(target) = name.strip_prefix(b".wh.") {
            self.stats.whiteouts += 1;
            if target == b".wh..opq" {
                for (cname, cd) in self.children(parent)? {
                    // The root's lost+found belongs to the filesystem, not
                    // to a layer (e2fsck wants it); an opaque root keeps it.
                    if parent == ROOT && cname == b"lost+found" {
                        continue;
                    }
                    self.remove_lower(parent, &cname, cd)?;
                }
            } else if target.starts_with(b".wh.") {
                tracing::debug!("ignoring whiteout metadata entry '{}'", e.path_lossy());
            } else if let Some(d) = self.lookup(parent, target)? {
                self.remove_lower(parent, target, d)?;
            }
            return Ok(());
        }

        let existing = self.lookup(parent, name)?;
        if e.kind == Kind::HardLink
            && existing.is_some()
            && self.links_to_itself(e, parent, name)?
        {
            // A hard link to its own name (`tar cf x.tar f f` writes one for the
            // second `f`) changes nothing, as in erofs-utils and GNU tar: the
            // file stays as it is.
            self.stats.hardlinks += 1;
            self.mark_unpacked(parent, name);
            return Ok(());
        }
        if e.kind == Kind::Dir {
            if let Some(d) = existing {
                if d.ftype == FT_DIR {
                    self.update_dir(d.ino, e)?;
                    self.mark_unpacked(parent, name);
                    self.stats.dirs += 1;
                    return Ok(());
                }
            }
        }
        if let Some(d) = existing {
            self.remove_tree(parent, name, d)?;
        }
        let ino = match e.kind {
            Kind::Dir => {
                let ino = self.make_dir(parent, name, e.mode, e.uid, e.gid, e.mtime)?;
                self.dir_times.insert(ino, e.mtime);
                self.stats.dirs += 1;
                ino
            }
            Kind::File => {
                self.stats.files += 1;
                self.make_file(parent, name, e, tar)?
            }
            Kind::Symlink => {
                self.stats.symlinks += 1;
                self.make_symlink(parent, name, e)?
            }
            Kind::HardLink => {
                self.stats.hardlinks += 1;
                let ino = self.make_hardlink(parent, name, e)?;
                self.apply_link_metadata(ino, e)?;
                ino
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.stats.specials += 1;
                self.make_special(parent, name, e)?
            }
        };
        if e.kind != Kind::HardLink {
            let xattrs = self.filter_xattrs(e, e.kind);
            self.fs.set_xattrs(ino, false, &xattrs)?;
        }
        self.mark_unpacked(parent, name);
        Ok(())
    }

    /// Refuse numbers the filesystem cannot store instead of truncating
    /// them: file sizes (and sparse data) past the maximum file size, and
    /// device numbers past Linux's 12-bit major and 20-bit minor.
    fn check_limits(&self, e: &Entry) -> Result<()> {
        match e.kind {
            Kind::File => {
                let end = e
                    .segments()
                    .iter()
                    .map(|&(o, l)| o.saturating_add(l))
                    .max()
                    .unwrap_or(0)
                    .max(e.size);
                if end > self.max_file_size {
                    return Err(entry_err(
                        e,
                        format!(
                            "file size {end} exceeds the filesystem's maximum file size {} ({} KiB blocks{})",
                            self.max_file_size,
                            self.bs / 1024,
                            if self.extents { "" } else { ", block-mapped files" }
                        ),
                    ));
                }
            }
            Kind::Char | Kind::Block => {
                device_numbers(e)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A directory entry for an existing directory: new owner, mode, time
    /// and xattr set; contents kept.
    fn update_dir(&mut self, ino: u32, e: &Entry) -> Result<()> {
        let mut i = self.fs.read_inode(ino)?;
        i.set_mode(inode::S_IFDIR | (e.mode & 0o7777) as u16);
        i.set_uid(e.uid);
        i.set_gid(e.gid);
        let cr = i.crtime();
        i.set_times(e.mtime, cr);
        self.fs.write_inode(ino, &mut i)?;
        let xattrs = self.filter_xattrs(e, Kind::Dir);
        self.fs.set_xattrs(ino, true, &xattrs)?;
        self.dir_times.insert(ino, e.mtime);
        Ok(())
    }

    /// Apply a hard-link header's metadata to the shared inode.
    fn apply_link_metadata(&mut self, ino: u32, e: &Entry) -> Result<()> {
        let mut i = self.fs.read_inode(ino)?;
        i.set_uid(e.uid);
        i.set_gid(e.gid);
        let kind = match i.file_type() {
            inode::S_IFLNK => Kind::Symlink,
            inode::S_IFREG => Kind::File,
            _ => Kind::Fifo,
        };
        if kind != Kind::Symlink {
            i.set_mode((i.mode() & inode::S_IFMT) | (e.mode & 0o7777) as u16);
        }
        let cr = i.crtime();
        i.set_times(e.mtime, cr);
        self.fs.write_inode(ino, &mut i)?;
        let xattrs = self.filter_xattrs(e, kind);
        self.fs.set_xattrs(ino, false, &xattrs)
    }

    /// The entry's xattrs that the kernel would accept on this kind of inode.
    fn filter_xattrs(&self, e: &Entry, kind: Kind) -> Vec<(Vec<u8>, Vec<u8>)> {
        accepted_xattrs(e, kind)
    }

    /// End of the layer: directory times.
    fn finish(&mut self) -> Result<()> {
        let mut times: Vec<(u32, Timestamp)> =
            std::mem::take(&mut self.dir_times).into_iter().collect();
        times.sort_unstable_by_key(|(ino, _)| *ino);
        for (ino, t) in times {
            let mut i = self.fs.read_inode(ino)?;
            if !i.is_dir() || i.links() == 0 {
                continue;
            }
            let cr = i.crtime();
            i.set_times(t, cr);
            self.fs.write_inode(ino, &mut i)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        let c = |p: &str| {
            clean_components(p.as_bytes()).map(|v| {
                v.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(c("./a//b/./c/").unwrap(), ["a", "b", "c"]);
        assert_eq!(c("/etc/passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(c("a/../b").unwrap(), ["b"]);
        assert!(c("../x").is_none());
        assert!(c("a/../../x").is_none());
        assert_eq!(c("./").unwrap(), Vec::<String>::new());
    }
}
