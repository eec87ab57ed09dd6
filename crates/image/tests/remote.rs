//! Registry blobs read on demand ([`RemoteBlob`]) against a real
//! docker-registry: bytes equal the blob at any offset, each chunk is fetched
//! once, sequential reads are widened by read-ahead, the whole-blob digest is
//! checked once every chunk has been seen (a corrupted blob fails the read
//! that completes it, and every later read), the chunk cache keeps to its
//! budget on disk, and a registry that goes away fails reads until it is back.

#[path = "../../registry/tests/common/mod.rs"]
mod services;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blockdev::source::ReadAt;
use obdimage::chunkcache::ChunkCache;
use obdimage::remote::{FetchOptions, FetchStats, RemoteBlob};
use obdoci::Descriptor;
use obdregistry::{BlobSource, Repository};
use services::Registry;

const CHUNK: u64 = 64 << 10;

/// Pseudo-random bytes (incompressible enough, deterministic).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A client for `repo` that does not retry (failures show at once).
fn client(reg: &Registry, repo: &str) -> Repository {
    let o = obdregistry::ClientOptions {
        plain_http: true,
        retries: 0,
        ..Default::default()
    };
    obdregistry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository(repo)
}

fn push(repo: &Repository, bytes: &[u8]) -> Descriptor {
    let d = Descriptor::of_bytes("application/octet-stream", bytes);
    repo.push_blob(&d, BlobSource::Bytes(bytes), None, None)
        .unwrap();
    d
}

fn opts(readahead: u64) -> FetchOptions {
    FetchOptions {
        readahead,
        retries: 0,
        retry_delay: Duration::from_millis(10),
        timeout: Duration::from_secs(10),
    }
}

fn blob(
    repo: &Repository,
    d: &Descriptor,
    cache: &Arc<ChunkCache>,
    readahead: u64,
) -> (RemoteBlob, Arc<FetchStats>) {
    let stats = Arc::new(FetchStats::default());
    let b = RemoteBlob::new(
        repo.clone(),
        d.digest.clone(),
        d.size,
        cache.clone(),
        opts(readahead),
        stats.clone(),
    )
    .unwrap();
    (b, stats)
}

fn read(b: &RemoteBlob, off: u64, len: usize) -> blockdev::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    let n = b.read_at(&mut v, off)?;
    v.truncate(n);
    Ok(v)
}

/// Bytes the files of a cache directory occupy on disk.
fn allocated(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn bytes_at_any_offset_equal_the_blob_and_each_chunk_is_fetched_once() {
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/blobs");
    let want = data(17 * CHUNK as usize + 1000, 1);
    let d = push(&repo, &want);
    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    assert_eq!(b.size(), want.len() as u64);
    // Out of order, across chunk boundaries, past the end.
    for (off, len) in [
        (5 * CHUNK - 10, 20usize),
        (0, 1),
        (17 * CHUNK + 900, 4096),
        (3 * CHUNK, 2 * CHUNK as usize),
        (CHUNK + 7, 100_000),
    ] {
        let got = read(&b, off, len).unwrap();
        let end = (off as usize + len).min(want.len());
        assert!(got == want[off as usize..end], "bytes at {off}+{len}");
    }
    assert_eq!(stats.verified.load(Ordering::Relaxed), 0);
    let all = read(&b, 0, want.len()).unwrap();
    assert!(all == want);
    // Every chunk fetched exactly once, then the digest was checked.
    assert_eq!(stats.bytes.load(Ordering::Relaxed), want.len() as u64);
    assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
    let requests = stats.requests.load(Ordering::Relaxed);
    assert!(read(&b, 0, want.len()).unwrap() == want);
    assert_eq!(stats.requests.load(Ordering::Relaxed), requests, "cached");

    // Sequential small reads: read-ahead fetches far fewer, larger ranges.
    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 1 << 20);
    let mut off = 0;
    while off < want.len() as u64 {
        let got = read(&b, off, 4096).unwrap();
        assert!(got == want[off as usize..off as usize + got.len()]);
        off += got.len() as u64;
    }
    let n = stats.requests.load(Ordering::Relaxed);
    assert!(n <= 6, "{n} requests for 18 chunks read sequentially");
    assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
}

#[test]
fn a_corrupted_blob_fails_the_read_that_completes_it_and_every_later_one() {
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/bad");
    let want = data(4 * CHUNK as usize + 10, 2);
    let d = push(&repo, &want);
    // The registry's stored copy loses its last byte's value (same size).
    let p = reg.blob_data_path(d.digest.as_str());
    let mut stored = std::fs::read(&p).unwrap();
    *stored.last_mut().unwrap() ^= 0xff;
    std::fs::write(&p, &stored).unwrap();

    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    // Until the whole blob has been seen, nothing can be checked.
    assert!(read(&b, 0, 100).unwrap() == want[..100]);
    let tail = read(&b, 4 * CHUNK, 10).unwrap();
    assert_eq!(tail, stored[4 * CHUNK as usize..]);
    // The read that brings in the last missing chunks fails.
    let e = read(&b, CHUNK, 3 * CHUNK as usize).unwrap_err();
    let line = obdimage::error::Chain(&e).to_string();
    assert!(line.contains("not its digest"), "{line}");
    assert!(line.contains(d.digest.as_str()), "{line}");
    // So does everything after, cached or not, and the cache is dropped.
    let e = read(&b, 0, 100).unwrap_err();
    let line = obdimage::error::Chain(&e).to_string();
    assert!(line.contains("failed its digest check"), "{line}");
    assert_eq!(cache.used(), 0);
    assert_eq!(stats.verified.load(Ordering::Relaxed), 0);
}

#[test]
fn the_cache_keeps_to_its_budget_on_disk() {
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/budget");
    let want = data(20 * CHUNK as usize, 3);
    let d = push(&repo, &want);
    let dir = tempfile::tempdir().unwrap();
    let budget = 3 * CHUNK;
    let cache = ChunkCache::new(Some(dir.path()), budget, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    for round in 0..2 {
        // Backwards, then forwards.
        let order: Vec<u64> = if round == 0 {
            (0..20).rev().collect()
        } else {
            (0..20).collect()
        };
        for c in order {
            let got = read(&b, c * CHUNK, CHUNK as usize).unwrap();
            assert!(got == want[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]);
            assert!(cache.used() <= budget);
            // Data file plus the small flags file (a block).
            let on_disk = allocated(dir.path());
            assert!(on_disk <= budget + 8192, "round {round}: {on_disk} bytes");
        }
    }
    // 40 chunk reads through a 3-chunk cache: all fetched but the three
    // still cached at the turn (chunks 2, 1, 0), each once.
    assert_eq!(stats.bytes.load(Ordering::Relaxed), 37 * CHUNK);
    assert_eq!(stats.cache_bytes.load(Ordering::Relaxed), 3 * CHUNK);
    // Chunks are hashed in order as they pass: backwards through a small
    // cache nothing could be checked, forwards the whole blob was.
    assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
}

#[test]
fn a_registry_that_goes_away_fails_reads_until_it_is_back() {
    let mut reg = Registry::plain();
    let repo = client(&reg, "lazy/down");
    let want = data(8 * CHUNK as usize, 4);
    let d = push(&repo, &want);
    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    assert!(read(&b, 0, CHUNK as usize).unwrap() == want[..CHUNK as usize]);
    reg.stop();
    let e = read(&b, 4 * CHUNK, 10).unwrap_err();
    let line = obdimage::error::Chain(&e).to_string();
    assert!(line.contains("cannot fetch bytes"), "{line}");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    // What is cached is still served.
    assert!(read(&b, 10, 10).unwrap() == want[10..20]);
    reg.restart();
    let got = read(&b, 4 * CHUNK, 10).unwrap();
    assert!(got == want[4 * CHUNK as usize..4 * CHUNK as usize + 10]);
}

#[test]
fn concurrent_readers_of_a_missing_chunk_fetch_it_once() {
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/many");
    let want = data(16 * CHUNK as usize, 5);
    let d = push(&repo, &want);
    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    // Eight threads, each reading all 16 chunks in a different order.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (b, want) = (&b, &want);
            s.spawn(move || {
                for i in 0..16u64 {
                    let c = (i * 5 + t * 3) % 16;
                    let got = read(b, c * CHUNK + 100, 1000).unwrap();
                    let a = (c * CHUNK + 100) as usize;
                    assert!(got == want[a..a + 1000], "thread {t} chunk {c}");
                }
            });
        }
    });
    assert_eq!(stats.bytes.load(Ordering::Relaxed), want.len() as u64);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 16);
}

#[test]
fn a_damaged_chunk_in_a_reused_cache_is_fetched_again_not_served() {
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/rot");
    let want = data(6 * CHUNK as usize + 123, 6);
    let d = push(&repo, &want);
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = ChunkCache::new(Some(dir.path()), 1 << 30, CHUNK).unwrap();
        let (b, stats) = blob(&repo, &d, &cache, 0);
        assert!(read(&b, 0, want.len()).unwrap() == want);
        assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
    }
    // Between two mounts the cached bytes change: a flipped byte in chunk
    // 2, chunk 4 zeroed (as a crash can leave a chunk whose flag reached
    // the disk and whose bytes did not), the flags untouched.
    let data_file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .unwrap();
    let mut stored = std::fs::read(&data_file).unwrap();
    assert!(stored == want);
    stored[2 * CHUNK as usize + 77] ^= 0x20;
    stored[4 * CHUNK as usize..5 * CHUNK as usize].fill(0);
    std::fs::write(&data_file, &stored).unwrap();

    let cache = ChunkCache::new(Some(dir.path()), 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    // Every byte is the blob's: the two damaged chunks, and only they,
    // come from the registry again.
    assert!(read(&b, 0, want.len()).unwrap() == want);
    assert_eq!(stats.bytes.load(Ordering::Relaxed), 2 * CHUNK);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2);
    assert!(
        read(&b, 2 * CHUNK, CHUNK as usize).unwrap()
            == want[2 * CHUNK as usize..3 * CHUNK as usize]
    );
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2);
}

#[test]
fn readers_waiting_on_a_failed_fetch_share_its_failure() {
    // A registry that accepts connections and never answers: each fetch
    // fails after the timeout. Eight readers of one missing chunk: one
    // fetches, the others wait for it and fail with it, instead of each
    // trying again in turn (eight timeouts for the last one, with every
    // server thread held meanwhile).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = l.local_addr().unwrap().to_string();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            n.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let o = obdregistry::ClientOptions {
        plain_http: true,
        retries: 0,
        ..Default::default()
    };
    let repo = obdregistry::Registry::new(&host, &o)
        .unwrap()
        .repository("lazy/silent");
    let digest: obdoci::Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let stats = Arc::new(FetchStats::default());
    let b = RemoteBlob::new(
        repo,
        digest,
        4 * CHUNK,
        cache,
        FetchOptions {
            timeout: Duration::from_secs(2),
            ..opts(0)
        },
        stats.clone(),
    )
    .unwrap();
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                let (b, start, accepted) = (&b, &start, &accepted);
                s.spawn(move || {
                    start.wait();
                    if t > 0 {
                        // The first reader's fetch is under way.
                        while accepted.load(Ordering::SeqCst) == 0 {
                            std::thread::yield_now();
                        }
                    }
                    read(b, CHUNK + 10 * t, 100)
                })
            })
            .collect();
        for h in hs {
            let e = h.join().unwrap().unwrap_err();
            let line = obdimage::error::Chain(&e).to_string();
            assert!(line.contains("cannot fetch bytes"), "{line}");
        }
    });
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A ZFile block whose bytes were damaged on their way (here the registry's
/// copy is damaged, then repaired) fails its read with the checksum error,
/// is fetched again once by that read, and is fetched again by the next
/// read instead of failing from the cache for the rest of the mount.
#[test]
fn a_zfile_block_failing_its_checksum_is_fetched_again_not_kept() {
    use blockdev::source::VecSink;
    use blockdev::zfile::{ZFileReader, ZFileWriter, ZfileOptions};
    let reg = Registry::plain();
    let repo = client(&reg, "lazy/zfile");
    // Incompressible: the ZFile spans some 33 chunks, so opening it (header
    // and trailer) does not bring the whole blob in.
    let raw = data(2 << 20, 4);
    let mut w = ZFileWriter::new(VecSink::default(), ZfileOptions::default()).unwrap();
    w.write(&raw).unwrap();
    let z = w.finish().unwrap().0;
    let d = push(&repo, &z);
    let p = reg.blob_data_path(d.digest.as_str());
    // A byte of block 0's stored bytes (after the 512-byte header).
    let mut damaged = z.clone();
    damaged[612] ^= 0xff;
    std::fs::write(&p, &damaged).unwrap();

    let cache = ChunkCache::new(None, 1 << 30, CHUNK).unwrap();
    let (b, stats) = blob(&repo, &d, &cache, 0);
    let r = ZFileReader::open(Box::new(b)).unwrap();
    let mut block = vec![0u8; 4096];
    let before = stats.requests.load(Ordering::Relaxed);
    let e = r.read_exact_at(&mut block, 0).unwrap_err();
    let line = obdimage::error::Chain(&e).to_string();
    assert!(line.contains("checksum"), "{line}");
    // The read fetched the chunk once more before failing.
    assert_eq!(stats.requests.load(Ordering::Relaxed), before + 1);

    std::fs::write(&p, &z).unwrap();
    r.read_exact_at(&mut block, 0).unwrap();
    assert!(block == raw[..4096]);
    // The whole blob reads right, and its digest checks out.
    let mut all = vec![0u8; raw.len()];
    r.read_exact_at(&mut all, 0).unwrap();
    assert!(all == raw);
    assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
}
