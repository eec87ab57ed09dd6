//! Registry blobs read on demand: a [`RemoteBlob`] is a [`ReadAt`] whose
//! bytes come from `GET /v2/<repo>/blobs/<digest>` with `Range` requests,
//! in whole chunks kept in a bounded [`ChunkCache`].
//!
//! * A read fetches the chunks it needs that are not cached, as one request
//!   per run of missing chunks. Sequential reads (a read starting where the
//!   previous one ended) widen the request by a read-ahead window that
//!   doubles up to the configured maximum.
//! * Two readers needing the same missing chunk fetch it once: the second
//!   waits for the first, and fails with it if that fetch fails (it has been
//!   retried already; the next read tries again).
//! * A failed request (connection refused, timeout, 5xx, a body that breaks
//!   off) is retried with backoff; when the retries are used up, the read
//!   fails with an I/O error (EIO for a FUSE or NBD client) and the next
//!   read tries again, so service resumes when the registry is back.
//! * Digests: ZFile blocks carry CRCs that the ZFile reader checks on every
//!   read; on top of that, the blob's sha256 is computed over its chunks in
//!   order as they arrive (reading cached ones back), and once the whole
//!   blob has been seen it must equal the digest, or the blob's cache is
//!   dropped and every later read of it fails. (A chunk evicted from a small
//!   cache before its turn holds the check back until it is fetched again.)
//!
//! [`FetchStats`] counts requests and bytes for logs, tests and benchmarks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use blockdev::source::ReadAt;
use obdoci::Digest;
use obdregistry::Repository;
use parking_lot::{Condvar, Mutex};
use sha2::{Digest as _, Sha256};

use crate::chunkcache::{CacheFile, ChunkCache};
use crate::error::{Error, Result};
use crate::layers::BlobStore;

/// How blobs are fetched.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Largest read-ahead window for sequential reads, in bytes.
    pub readahead: u64,
    /// Attempts after an answer whose body broke off (connection failures
    /// and 5xx answers are retried by the registry client itself).
    pub retries: u32,
    /// First delay between attempts; doubles each time.
    pub retry_delay: Duration,
    /// Bound on one range request, body included.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            readahead: 4 << 20,
            retries: 2,
            retry_delay: Duration::from_millis(200),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a registry source (all blobs).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Range requests that succeeded.
    pub requests: AtomicU64,
    /// Bytes fetched.
    pub bytes: AtomicU64,
    /// Bytes served from the cache.
    pub cache_bytes: AtomicU64,
    /// Requests that failed for good (after retries).
    pub failures: AtomicU64,
    /// Blobs whose whole-blob digest was checked and matched.
    pub verified: AtomicU64,
}

impl FetchStats {
    /// A one-line summary.
    pub fn summary(&self) -> String {
        format!(
            "{} bytes fetched in {} requests, {} bytes from the cache, {} failed requests, {} blobs verified",
            self.bytes.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.cache_bytes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.verified.load(Ordering::Relaxed)
        )
    }
}

/// Where the whole-blob digest check stands.
struct Verify {
    /// The next chunk to hash.
    next: u64,
    hasher: Sha256,
    /// Checked (good or bad).
    done: bool,
}

/// A fetch in flight, shared by the readers that wait for its chunks.
#[derive(Default)]
struct Pending {
    /// Set if it failed: why, on one line.
    failed: OnceLock<String>,
}

/// The read-ahead state of sequential readers.
struct Ahead {
    /// Where the last read ended.
    last_end: u64,
    /// The current window.
    window: u64,
}

/// One registry blob, read lazily.
pub struct RemoteBlob {
    repo: Repository,
    digest: Digest,
    size: u64,
    name: PathBuf,
    cache: Arc<ChunkCache>,
    file: Arc<CacheFile>,
    opts: FetchOptions,
    stats: Arc<FetchStats>,
    /// Chunks being fetched, each with its fetch.
    inflight: Mutex<HashMap<u64, Arc<Pending>>>,
    landed: Condvar,
    ahead: Mutex<Ahead>,
    verify: Mutex<Verify>,
    bad: AtomicBool,
}

impl std::fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RemoteBlob({}, {} bytes)",
            self.name.display(),
            self.size
        )
    }
}

/// The I/O error a reader sees for a failure of ours.
fn io_error(name: &Path, e: Error) -> blockdev::Error {
    blockdev::Error::io(name, std::io::Error::other(e))
}

impl RemoteBlob {
    /// Blob `digest` of `size` bytes in `repo`, cached in `cache`.
    pub fn new(
        repo: Repository,
        digest: Digest,
        size: u64,
        cache: Arc<ChunkCache>,
        opts: FetchOptions,
        stats: Arc<FetchStats>,
    ) -> Result<RemoteBlob> {
        let file = cache.file(digest.as_str(), size)?;
        let name = PathBuf::from(format!(
            "{}/{}@{digest}",
            repo.registry().host(),
            repo.name()
        ));
        Ok(RemoteBlob {
            repo,
            size,
            name,
            file,
            cache,
            opts,
            stats,
            inflight: Mutex::new(HashMap::new()),
            landed: Condvar::new(),
            ahead: Mutex::new(Ahead {
                last_end: u64::MAX,
                window: 0,
            }),
            verify: Mutex::new(Verify {
                next: 0,
                hasher: Sha256::new(),
                done: false,
            }),
            bad: AtomicBool::new(false),
            digest,
        })
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Read-ahead for a read of `[offset, end)`: how many bytes past `end`
    /// to fetch when chunks are missing.
    fn readahead(&self, offset: u64, end: u64) -> u64 {
        let mut a = self.ahead.lock();
        let sequential = a.last_end == offset;
        a.last_end = end;
        if !sequential || self.opts.readahead == 0 {
            a.window = 0;
            return 0;
        }
        a.window = (a.window * 2)
            .max(self.cache.chunk_size())
            .min(self.opts.readahead);
        a.window
    }

    /// Fetch `[first, last]` chunks (all missing and claimed by the caller)
    /// with retries.
    fn fetch(&self, first: u64, last: u64) -> Result<Vec<u8>> {
        let cs = self.cache.chunk_size();
        let start = first * cs;
        let end = ((last + 1) * cs).min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        let mut attempt = 0;
        loop {
            let t0 = Instant::now();
            match self
                .repo
                .read_blob_range(&self.digest, start, &mut buf, Some(self.opts.timeout))
            {
                Ok(()) => {
                    let total = self
                        .stats
                        .bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed)
                        + buf.len() as u64;
                    let n = self.stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(
                        "lazy: fetched {} bytes of {} at {start} in {} ms ({total} bytes in {n} requests so far)",
                        buf.len(),
                        self.digest,
                        t0.elapsed().as_millis()
                    );
                    return Ok(buf);
                }
                Err(e) => {
                    // The client already retried connection failures and 5xx
                    // answers; a body that broke off is ours to ask again.
                    let again = matches!(e, obdregistry::Error::Stream { .. })
                        && attempt < self.opts.retries;
                    if !again {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::Registry {
                            what: format!(
                                "cannot fetch bytes {start}..{end} of {}",
                                self.name.display()
                            ),
                            source: e,
                        });
                    }
                    let delay = self.opts.retry_delay * 2u32.saturating_pow(attempt);
                    tracing::warn!(
                        "lazy: {}; retrying in {:.1} s",
                        obdoci::error::Chain(&e),
                        delay.as_secs_f64()
                    );
                    std::thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
    }

    /// Feed chunks to the whole-blob digest in order: from `fetched`
    /// (chunks from `first`) or the cache. Returns an error when the blob
    /// was seen whole and its digest does not match.
    fn advance_digest(&self, first: u64, fetched: &[u8]) -> Result<()> {
        let mut v = self.verify.lock();
        if v.done {
            return Ok(());
        }
        let cs = self.cache.chunk_size();
        let n = self.file.chunks();
        let mut tmp = Vec::new();
        while v.next < n {
            let c = v.next;
            let len = self.file.chunk_len(c) as usize;
            let from_fetch = c >= first && ((c - first) * cs) < fetched.len() as u64;
            if from_fetch {
                let a = ((c - first) * cs) as usize;
                v.hasher.update(&fetched[a..a + len]);
            } else {
                tmp.resize(len, 0);
                if !self.cache.read(&self.file, c, 0, &mut tmp)? {
                    break;
                }
                v.hasher.update(&tmp);
            }
            v.next += 1;
        }
        if v.next < n {
            return Ok(());
        }
        v.done = true;
        let got = hex::encode(std::mem::take(&mut v.hasher).finalize());
        if got == self.digest.hex() {
            self.stats.verified.fetch_add(1, Ordering::Relaxed);
            tracing::info!("lazy: {} read whole, digest verified", self.digest);
            return Ok(());
        }
        self.bad.store(true, Ordering::Relaxed);
        self.cache.purge(&self.file);
        Err(Error::Integrity(format!(
            "{}: the blob's bytes hash to sha256:{got}, not its digest; its cache is dropped",
            self.name.display()
        )))
    }

    fn read_chunks(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cache.chunk_size();
        let end = offset + buf.len() as u64;
        let last = (end - 1) / cs;
        let ahead = self.readahead(offset, end);
        let mut c = offset / cs;
        while c <= last {
            let cstart = c * cs;
            let a = offset.max(cstart);
            let b = end.min(cstart + self.file.chunk_len(c));
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if self.cache.read(&self.file, c, a - cstart, dst)? {
                self.stats
                    .cache_bytes
                    .fetch_add(dst.len() as u64, Ordering::Relaxed);
                c += 1;
                continue;
            }
            // Claim the run of missing chunks from c (up to the read-ahead).
            let mut inflight = self.inflight.lock();
            if let Some(p) = inflight.get(&c).cloned() {
                // Wait for that fetch to end; share its failure.
                while inflight.get(&c).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    self.landed.wait(&mut inflight);
                }
                drop(inflight);
                if let Some(why) = p.failed.get() {
                    return Err(Error::Fetch(format!(
                        "the fetch this read waited for failed: {why}"
                    )));
                }
                continue;
            }
            if self.file.has(c) {
                continue;
            }
            let limit = (((end + ahead).min(self.size) - 1) / cs).max(last);
            let mut run_end = c;
            while run_end < limit
                && !inflight.contains_key(&(run_end + 1))
                && !self.file.has(run_end + 1)
            {
                run_end += 1;
            }
            let pending = Arc::new(Pending::default());
            for k in c..=run_end {
                inflight.insert(k, pending.clone());
            }
            drop(inflight);
            let fetched = self.fetch(c, run_end);
            let result = fetched.and_then(|data| {
                for k in c..=run_end {
                    let o = ((k - c) * cs) as usize;
                    let piece = &data[o..o + self.file.chunk_len(k) as usize];
                    self.cache.insert(&self.file, k, piece)?;
                    // Copy what this read wants straight from the answer.
                    if k <= last {
                        let kstart = k * cs;
                        let a = offset.max(kstart);
                        let b = end.min(kstart + piece.len() as u64);
                        buf[(a - offset) as usize..(b - offset) as usize]
                            .copy_from_slice(&piece[(a - kstart) as usize..(b - kstart) as usize]);
                    }
                }
                self.advance_digest(c, &data)
            });
            if let Err(e) = &result {
                let _ = pending.failed.set(obdoci::error::Chain(e).to_string());
            }
            let mut inflight = self.inflight.lock();
            for k in c..=run_end {
                inflight.remove(&k);
            }
            drop(inflight);
            self.landed.notify_all();
            result?;
            c = run_end.min(last) + 1;
        }
        Ok(())
    }
}

impl ReadAt for RemoteBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if self.bad.load(Ordering::Relaxed) {
            return Err(io_error(
                &self.name,
                Error::Integrity(format!(
                    "{}: the blob failed its digest check",
                    self.name.display()
                )),
            ));
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        self.read_chunks(&mut buf[..n], offset)
            .map_err(|e| io_error(&self.name, e))?;
        Ok(n)
    }

    /// Drops the cached chunks of the range, so that they are fetched
    /// again: bytes that failed a reader's check (a ZFile block's checksum)
    /// may have been damaged on their way, by a proxy say. A blob already
    /// verified whole, or found bad, is what the registry holds: no.
    fn refetch(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size || self.bad.load(Ordering::Relaxed) {
            return false;
        }
        let mut v = self.verify.lock();
        if v.done {
            return false;
        }
        let cs = self.cache.chunk_size();
        let (first, last) = (offset / cs, ((offset + len).min(self.size) - 1) / cs);
        let dropped: Vec<u64> = (first..=last)
            .filter(|&c| self.cache.forget(&self.file, c))
            .collect();
        if dropped.is_empty() {
            return false;
        }
        // The whole-blob digest has taken in those bytes: start it again.
        if dropped[0] < v.next {
            v.next = 0;
            v.hasher = Sha256::new();
        }
        tracing::warn!(
            "lazy: {}: bytes {offset}..{} failed their check; fetching chunks {}..={} again",
            self.name.display(),
            offset + len,
            dropped[0],
            dropped[dropped.len() - 1]
        );
        true
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.name
    }
}

/// A registry repository as a [`BlobStore`]: every blob a [`RemoteBlob`]
/// sharing one cache and one set of counters.
pub struct RegistryStore {
    repo: Repository,
    cache: Arc<ChunkCache>,
    opts: FetchOptions,
    stats: Arc<FetchStats>,
}

impl RegistryStore {
    pub fn new(
        repo: Repository,
        cache: Arc<ChunkCache>,
        opts: FetchOptions,
        stats: Arc<FetchStats>,
    ) -> Self {
        RegistryStore {
            repo,
            cache,
            opts,
            stats,
        }
    }
}

impl BlobStore for RegistryStore {
    fn name(&self) -> String {
        format!("{}/{}", self.repo.registry().host(), self.repo.name())
    }

    fn open(&self, digest: &str, size: Option<u64>) -> Result<Arc<dyn ReadAt>> {
        let d: Digest = digest.parse().map_err(|source| Error::Oci {
            what: format!("{}: bad blob digest", self.name()),
            source,
        })?;
        let size = match size.filter(|&s| s > 0) {
            Some(s) => s,
            None => self.repo.blob_size(&d).map_err(|source| Error::Registry {
                what: format!("cannot find blob {digest} in {}", self.name()),
                source,
            })?,
        };
        Ok(Arc::new(RemoteBlob::new(
            self.repo.clone(),
            d,
            size,
            self.cache.clone(),
            self.opts.clone(),
            self.stats.clone(),
        )?))
    }
}
