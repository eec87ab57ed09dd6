//! The local cache of lazily fetched blob bytes, bounded in size.
//!
//! Layout of a cache directory (one pair of files per blob):
//!
//! ```text
//! DIR/.lock                  held (flock) by the process using the cache
//! DIR/<hex>.data             sparse file, the blob's bytes at their offsets
//! DIR/<hex>.chunks           16-byte header "obdchnk2" + chunk size (le64),
//!                            then 8 bytes per chunk: a flag (1 = present in
//!                            .data), 3 zero bytes, the chunk's crc32c (le32)
//! ```
//!
//! A blob is cached in whole chunks (the last one shorter). A chunk's bytes
//! are written before its flag, and its flag is cleared before its bytes are
//! punched out. Nothing is synced, though, so after a crash of the machine
//! a flag may claim bytes that never reached the disk; and a cache
//! directory kept across mounts can be damaged by anything else. So the
//! first read of a chunk found in the cache at open checks the whole chunk
//! against the crc32c stored with its flag: a chunk that fails is dropped
//! (with a warning) and fetched again, never served. Chunks written by this
//! process are trusted. Files whose header or size do not match are started
//! afresh. The total of present chunks stays
//! within the budget: the least recently used chunks (of any blob) are
//! punched out first. Readers of a chunk hold its file's lock shared, so a
//! chunk is never punched out under a reader.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};
use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"obdchnk2";
const HEADER: u64 = 16;
/// Bytes per chunk in the flags file: flag, 3 zero bytes, crc32c (le32).
const SLOT: u64 = 8;

/// A chunk's entry in the flags file.
fn slot(present: bool, crc: u32) -> [u8; SLOT as usize] {
    let mut b = [0u8; SLOT as usize];
    b[0] = present as u8;
    b[4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Ages of present chunks, oldest first.
#[derive(Default)]
struct Lru {
    clock: u64,
    by_age: BTreeMap<u64, (usize, u64)>,
    age: HashMap<(usize, u64), u64>,
    /// Bytes of present chunks.
    used: u64,
}

impl Lru {
    fn touch(&mut self, key: (usize, u64)) {
        self.clock += 1;
        if let Some(old) = self.age.insert(key, self.clock) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.clock, key);
    }
}

/// One blob's cached bytes.
pub struct CacheFile {
    id: usize,
    name: String,
    data: File,
    data_path: PathBuf,
    flags: File,
    size: u64,
    chunk: u64,
    present: RwLock<Vec<bool>>,
    /// The crc32c of each present chunk's bytes.
    crcs: Vec<AtomicU32>,
    /// Chunks kept from an earlier run whose bytes are not checked yet.
    unchecked: Vec<AtomicBool>,
}

impl CacheFile {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// Byte length of chunk `c`.
    pub fn chunk_len(&self, c: u64) -> u64 {
        (self.size - c * self.chunk).min(self.chunk)
    }

    /// Whether chunk `c` is cached.
    pub fn has(&self, c: u64) -> bool {
        self.present
            .read()
            .get(c as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The blob's name (its digest).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The cache of every blob of a mount.
pub struct ChunkCache {
    dir: PathBuf,
    chunk: u64,
    limit: u64,
    lru: Mutex<Lru>,
    files: RwLock<Vec<Arc<CacheFile>>>,
    by_name: Mutex<HashMap<String, Arc<CacheFile>>>,
    _lock: Flock<File>,
    _tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("chunk", &self.chunk)
            .field("limit", &self.limit)
            .finish()
    }
}

impl ChunkCache {
    /// A cache in `dir` (created if missing; a private temporary directory,
    /// removed when the cache is dropped, if `None`) holding at most `limit`
    /// bytes in chunks of `chunk` bytes.
    pub fn new(dir: Option<&Path>, limit: u64, chunk: u64) -> Result<Arc<ChunkCache>> {
        if chunk < 4096 || !chunk.is_power_of_two() {
            return Err(Error::Usage(format!(
                "chunk size {chunk} is not a power of two of at least 4096"
            )));
        }
        let (dir, tmp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(|e| Error::io(d, "cannot create the cache directory", e))?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("overlaybd-cache-")
                    .tempdir()
                    .map_err(|e| {
                        Error::io(std::env::temp_dir(), "cannot create a cache directory", e)
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let lock_path = dir.join(".lock");
        let lf = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "cannot open", e))?;
        let lock = Flock::lock(lf, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            Error::io(
                &dir,
                "the cache directory is in use by another process",
                e.into(),
            )
        })?;
        Ok(Arc::new(ChunkCache {
            dir,
            chunk,
            limit,
            lru: Mutex::new(Lru::default()),
            files: RwLock::new(Vec::new()),
            by_name: Mutex::new(HashMap::new()),
            _lock: lock,
            _tmp: tmp,
        }))
    }

    /// For a private temporary cache: remove its directory now, once every
    /// blob's files are open (they stay usable through their descriptors),
    /// so nothing is left behind however the process ends. Later
    /// [`ChunkCache::file`] calls fail.
    pub fn unlink_temporary(&self) {
        if self._tmp.is_some() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!("cache: cannot remove {}: {e}", self.dir.display());
            }
        }
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes cached now.
    pub fn used(&self) -> u64 {
        self.lru.lock().used
    }

    /// The cache file of blob `digest` (`alg:hex`) of `size` bytes, opened
    /// (keeping what an earlier run cached) or created.
    pub fn file(&self, digest: &str, size: u64) -> Result<Arc<CacheFile>> {
        let mut names = self.by_name.lock();
        if let Some(f) = names.get(digest) {
            return Ok(f.clone());
        }
        let stem: String = digest
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let data_path = self.dir.join(format!("{stem}.data"));
        let flags_path = self.dir.join(format!("{stem}.chunks"));
        let open = |p: &Path| {
            File::options()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| Error::io(p, "cannot open the cache file", e))
        };
        let data = open(&data_path)?;
        let flags = open(&flags_path)?;
        let nchunks = size.div_ceil(self.chunk);
        let mut present = vec![false; nchunks as usize];
        let mut crcs = Vec::with_capacity(nchunks as usize);
        let mut head = [0u8; HEADER as usize];
        let fl_len = flags
            .metadata()
            .map_err(|e| Error::io(&flags_path, "cannot stat", e))?
            .len();
        let d_len = data
            .metadata()
            .map_err(|e| Error::io(&data_path, "cannot stat", e))?
            .len();
        let reusable = fl_len == HEADER + SLOT * nchunks
            && d_len == size
            && flags.read_exact_at(&mut head, 0).is_ok()
            && &head[..8] == MAGIC
            && head[8..] == self.chunk.to_le_bytes();
        if reusable {
            let mut b = vec![0u8; (SLOT * nchunks) as usize];
            flags
                .read_exact_at(&mut b, HEADER)
                .map_err(|e| Error::io(&flags_path, "cannot read", e))?;
            for (p, v) in present.iter_mut().zip(b.chunks_exact(SLOT as usize)) {
                *p = v[0] == 1;
                crcs.push(AtomicU32::new(u32::from_le_bytes(
                    v[4..].try_into().expect("4 bytes"),
                )));
            }
        } else {
            let init = |f: &File, len: u64, p: &Path| {
                f.set_len(0)
                    .and_then(|_| f.set_len(len))
                    .map_err(|e| Error::io(p, "cannot size the cache file", e))
            };
            init(&data, size, &data_path)?;
            init(&flags, HEADER + SLOT * nchunks, &flags_path)?;
            crcs.resize_with(nchunks as usize, || AtomicU32::new(0));
            head[..8].copy_from_slice(MAGIC);
            head[8..].copy_from_slice(&self.chunk.to_le_bytes());
            flags
                .write_all_at(&head, 0)
                .map_err(|e| Error::io(&flags_path, "cannot write", e))?;
        }
        let unchecked = present.iter().map(|&p| AtomicBool::new(p)).collect();
        let mut files = self.files.write();
        let f = Arc::new(CacheFile {
            id: files.len(),
            name: digest.to_string(),
            data,
            data_path,
            flags,
            size,
            chunk: self.chunk,
            present: RwLock::new(present),
            crcs,
            unchecked,
        });
        files.push(f.clone());
        drop(files);
        names.insert(digest.to_string(), f.clone());
        drop(names);
        let kept: Vec<u64> = (0..nchunks).filter(|&c| f.has(c)).collect();
        if !kept.is_empty() {
            let mut lru = self.lru.lock();
            for &c in &kept {
                lru.touch((f.id, c));
                lru.used += f.chunk_len(c);
            }
            self.evict(&mut lru);
            tracing::info!(
                "cache: {} of {} chunks of {digest} kept from an earlier run",
                kept.len(),
                nchunks
            );
        }
        Ok(f)
    }

    /// Copy `buf.len()` bytes at offset `off` of chunk `c` into `buf` if
    /// the chunk is cached.
    /// A chunk kept from an earlier run is checked against its crc32c on
    /// its first read: one that fails is dropped (the caller fetches it
    /// again) and `false` returned.
    pub fn read(&self, f: &CacheFile, c: u64, off: u64, buf: &mut [u8]) -> Result<bool> {
        {
            let p = f.present.read();
            if !p.get(c as usize).copied().unwrap_or(false) {
                return Ok(false);
            }
            if f.unchecked[c as usize].load(Ordering::Acquire) {
                let mut whole = vec![0u8; f.chunk_len(c) as usize];
                f.data
                    .read_exact_at(&mut whole, c * f.chunk)
                    .map_err(|e| Error::io(&f.data_path, "cannot read the cache", e))?;
                let want = f.crcs[c as usize].load(Ordering::Relaxed);
                let got = crc32c::crc32c(&whole);
                if got != want {
                    drop(p);
                    tracing::warn!(
                        "cache: chunk {c} of {} (bytes {}..{} of {}) does not match its checksum \
                         (crc32c {got:08x}, stored {want:08x}); dropped, fetching it again",
                        f.data_path.display(),
                        c * f.chunk,
                        c * f.chunk + f.chunk_len(c),
                        f.name
                    );
                    let mut lru = self.lru.lock();
                    self.drop_chunk(&mut lru, f, c);
                    return Ok(false);
                }
                f.unchecked[c as usize].store(false, Ordering::Release);
                buf.copy_from_slice(&whole[off as usize..off as usize + buf.len()]);
            } else {
                f.data
                    .read_exact_at(buf, c * f.chunk + off)
                    .map_err(|e| Error::io(&f.data_path, "cannot read the cache", e))?;
            }
        }
        self.lru.lock().touch((f.id, c));
        Ok(true)
    }

    /// Cache chunk `c` (all of it), then evict down to the budget.
    pub fn insert(&self, f: &CacheFile, c: u64, data: &[u8]) -> Result<()> {
        debug_assert_eq!(data.len() as u64, f.chunk_len(c));
        if self.limit < f.chunk_len(c) {
            return Ok(());
        }
        {
            let mut p = f.present.write();
            if p[c as usize] {
                return Ok(());
            }
            let crc = crc32c::crc32c(data);
            f.data
                .write_all_at(data, c * f.chunk)
                .map_err(|e| Error::io(&f.data_path, "cannot write the cache", e))?;
            f.flags
                .write_all_at(&slot(true, crc), HEADER + SLOT * c)
                .map_err(|e| Error::io(&f.data_path, "cannot write the cache flags", e))?;
            f.crcs[c as usize].store(crc, Ordering::Relaxed);
            f.unchecked[c as usize].store(false, Ordering::Release);
            p[c as usize] = true;
        }
        let mut lru = self.lru.lock();
        lru.touch((f.id, c));
        lru.used += data.len() as u64;
        self.evict(&mut lru);
        Ok(())
    }

    /// Punch out the oldest chunks until the budget holds.
    fn evict(&self, lru: &mut Lru) {
        while lru.used > self.limit {
            let Some((&age, &(id, c))) = lru.by_age.iter().next() else {
                break;
            };
            lru.by_age.remove(&age);
            lru.age.remove(&(id, c));
            let f = self.files.read()[id].clone();
            self.drop_chunk(lru, &f, c);
        }
    }

    /// Drop chunk `c` of `f` if it is cached (its bytes failed a reader's
    /// own check): the next read fetches it again. Returns whether it was.
    pub fn forget(&self, f: &CacheFile, c: u64) -> bool {
        let mut lru = self.lru.lock();
        self.drop_chunk(&mut lru, f, c)
    }

    /// Drop chunk `c` of `f` if present: clear its flag, punch its bytes
    /// out, forget its age. Returns whether it was present.
    fn drop_chunk(&self, lru: &mut Lru, f: &CacheFile, c: u64) -> bool {
        let mut p = f.present.write();
        if !std::mem::replace(&mut p[c as usize], false) {
            return false;
        }
        if let Some(age) = lru.age.remove(&(f.id, c)) {
            lru.by_age.remove(&age);
        }
        lru.used -= f.chunk_len(c);
        let r = f
            .flags
            .write_all_at(&slot(false, 0), HEADER + SLOT * c)
            .and_then(|_| {
                fallocate(
                    &f.data,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    (c * f.chunk) as i64,
                    f.chunk_len(c) as i64,
                )
                .map_err(std::io::Error::from)
            });
        if let Err(e) = r {
            tracing::warn!(
                "cache: cannot drop a chunk of {}: {e}",
                f.data_path.display()
            );
        }
        true
    }

    /// Drop every cached chunk of `f` (its bytes failed a digest check).
    pub fn purge(&self, f: &CacheFile) {
        let mut lru = self.lru.lock();
        let mut p = f.present.write();
        for c in 0..p.len() as u64 {
            if std::mem::replace(&mut p[c as usize], false) {
                lru.used -= f.chunk_len(c);
                if let Some(age) = lru.age.remove(&(f.id, c)) {
                    lru.by_age.remove(&age);
                }
                let _ = f.flags.write_all_at(&slot(false, 0), HEADER + SLOT * c);
            }
        }
        let _ = f.data.set_len(0).and_then(|_| f.data.set_len(f.size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_the_budget_and_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let chunk = 4096u64;
        let size = 10 * chunk + 100;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let piece = |c: u64| {
            let a = (c * chunk) as usize;
            &data[a..(a + chunk as usize).min(data.len())]
        };
        {
            let cache = ChunkCache::new(Some(d.path()), 4 * chunk, chunk).unwrap();
            // A second user of the same directory is refused.
            let e = ChunkCache::new(Some(d.path()), chunk, chunk).unwrap_err();
            assert!(e.to_string().contains("in use"), "{e}");
            let f = cache.file("sha256:ab", size).unwrap();
            for c in 0..f.chunks() {
                cache.insert(&f, c, piece(c)).unwrap();
                assert!(cache.used() <= 4 * chunk);
            }
            // The newest four are kept; reads see their bytes.
            assert!(!f.has(6) && f.has(7) && f.has(10));
            let mut b = vec![0u8; 100];
            assert!(cache.read(&f, 10, 0, &mut b).unwrap());
            assert_eq!(b, piece(10));
            assert!(!cache.read(&f, 0, 0, &mut b).unwrap());
            // Touching 7 makes 8 the oldest.
            assert!(cache.read(&f, 7, 5, &mut b).unwrap());
            assert_eq!(b, &piece(7)[5..105]);
            cache.insert(&f, 0, piece(0)).unwrap();
            assert!(f.has(7) && !f.has(8) && f.has(0));
        }
        // Reopened: the same chunks are there, with the same bytes.
        let cache = ChunkCache::new(Some(d.path()), 4 * chunk, chunk).unwrap();
        let f = cache.file("sha256:ab", size).unwrap();
        let have: Vec<u64> = (0..f.chunks()).filter(|&c| f.has(c)).collect();
        assert_eq!(have, [0, 7, 9, 10]);
        let mut b = vec![0u8; chunk as usize];
        assert!(cache.read(&f, 9, 0, &mut b).unwrap());
        assert_eq!(b, piece(9));
        // A different chunk size starts afresh.
        drop(f);
        drop(cache);
        let cache = ChunkCache::new(Some(d.path()), 4 * chunk, 2 * chunk).unwrap();
        let f = cache.file("sha256:ab", size).unwrap();
        assert!((0..f.chunks()).all(|c| !f.has(c)));
        assert_eq!(cache.used(), 0);
    }
}
