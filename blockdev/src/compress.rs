//! Block compression for ZFile writers, on one thread or a pool, output in order.
//!
//! ZFile cuts its source into fixed-size blocks and compresses each one on
//! its own (see [`crate::zfile`]), so blocks can be compressed in any order
//! on any thread and the file is still the concatenation of the stored
//! blocks in source order. [`BlockEngine`] takes the source in jobs of whole
//! blocks ([`JOB_BYTES`]) and hands the stored bytes and per-block lengths
//! back in job order, whatever the thread count: the output bytes never
//! depend on it.
//!
//! * One thread: each job is compressed on the caller's thread when it is
//!   submitted.
//! * `n > 1` threads: `n - 1` workers compress jobs while the caller goes
//!   on reading the source and writing finished jobs. At most
//!   [`BlockEngine::max_in_flight`] jobs are outstanding, so memory stays
//!   bounded (about `2 * JOB_BYTES` per job in flight); when that many are,
//!   the caller compresses queued jobs itself instead of waiting. So `n`
//!   threads are busy whichever side is the bottleneck: compression (the
//!   caller helps) or reading and writing (the caller is never slowed by
//!   more runnable workers than cores).
//!
//! Stored block: the compressed bytes (lz4 raw block, or one zstd frame at
//! level 3), followed with `verify` by a 4-byte little-endian CRC32C of the
//! compressed bytes seeded with [`BLOCK_CRC_SEED`].

use std::collections::BTreeMap;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::error::{Error, Result};
use crate::zfile::{crc32c_raw, Algorithm, BLOCK_CRC_SEED};

/// Source bytes per job: a multiple of every valid ZFile block size.
pub const JOB_BYTES: usize = 1 << 20;
/// Upper bound on compression threads.
pub const MAX_THREADS: usize = 64;
/// zstd level of ZFile blocks (upstream's default).
pub const ZSTD_LEVEL: i32 = 3;

/// Compression threads to use when none are given: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The error of a failed lz4 call.
fn lz4_failed(source: std::io::Error) -> Error {
    Error::Compress {
        what: "lz4 compression failed",
        source,
    }
}

/// Compresses blocks on one thread, reusing its buffers and zstd context.
pub struct Codec {
    algorithm: Algorithm,
    verify: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Codec {
    /// A codec for `algorithm`, appending CRCs when `verify`.
    pub fn new(algorithm: Algorithm, verify: bool) -> Result<Codec> {
        let zstd = match algorithm {
            Algorithm::Zstd => {
                Some(
                    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|source| Error::Compress {
                        what: "cannot set up the zstd compressor",
                        source,
                    })?,
                )
            }
            Algorithm::Lz4 => None,
        };
        Ok(Codec {
            algorithm,
            verify,
            zstd,
            scratch: Vec::new(),
        })
    }

    /// Compress one block, appending its stored form to `out`; returns the
    /// stored length.
    pub fn compress_block(&mut self, src: &[u8], out: &mut Vec<u8>) -> Result<u32> {
        let bound = match self.algorithm {
            Algorithm::Lz4 => lz4::block::compress_bound(src.len()).map_err(lz4_failed)?,
            Algorithm::Zstd => zstd::zstd_safe::compress_bound(src.len()),
        };
        if self.scratch.len() < bound {
            self.scratch.resize(bound, 0);
        }
        let dst = &mut self.scratch[..bound];
        let n = match &mut self.zstd {
            None => lz4::block::compress_to_buffer(src, None, false, dst).map_err(lz4_failed)?,
            Some(z) => z
                .compress_to_buffer(src, dst)
                .map_err(|source| Error::Compress {
                    what: "zstd compression failed",
                    source,
                })?,
        };
        if n == 0 {
            return Err(Error::Invalid("compressor produced no output".into()));
        }
        let data = &self.scratch[..n];
        out.extend_from_slice(data);
        let mut stored = n;
        if self.verify {
            out.extend_from_slice(&crc32c_raw(BLOCK_CRC_SEED, data).to_le_bytes());
            stored += 4;
        }
        u32::try_from(stored).map_err(|_| Error::Invalid("compressed block too large".into()))
    }

    /// Compress `raw` cut into `block_size` pieces (the last may be short),
    /// appending stored blocks to `out` and their lengths to `lens`.
    pub fn compress_blocks(
        &mut self,
        raw: &[u8],
        block_size: usize,
        out: &mut Vec<u8>,
        lens: &mut Vec<u32>,
    ) -> Result<()> {
        for b in raw.chunks(block_size) {
            lens.push(self.compress_block(b, out)?);
        }
        Ok(())
    }
}

/// A finished job: stored blocks and their lengths.
#[derive(Default)]
struct Output {
    data: Vec<u8>,
    lens: Vec<u32>,
}

struct Job {
    seq: u64,
    /// Source bytes in `raw[..len]`.
    raw: Vec<u8>,
    len: usize,
    out: Output,
}

struct Done {
    seq: u64,
    raw: Vec<u8>,
    out: Output,
    result: Result<()>,
}

/// Receives finished jobs in source order: `(stored bytes, block lengths)`.
pub type Emit<'a> = dyn FnMut(&[u8], &[u32]) -> Result<()> + 'a;

/// Compresses jobs of whole blocks and emits them in order (see the module
/// documentation).
pub struct BlockEngine {
    block_size: usize,
    mode: Mode,
}

enum Mode {
    Inline { codec: Codec, out: Output },
    Pool(Pool),
}

struct Pool {
    jobs: Option<Sender<Job>>,
    /// The queue's receiving side, for the caller to take jobs when it helps.
    queue: Receiver<Job>,
    codec: Codec,
    block_size: usize,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_seq: u64,
    next_emit: u64,
    ready: BTreeMap<u64, Done>,
    free_raw: Vec<Vec<u8>>,
    free_out: Vec<Output>,
    max_in_flight: u64,
    /// The error of the first job whose compression or emit failed. That
    /// job is out of the queue and will not come back, so jobs after it can
    /// no longer be emitted in order: every later call fails with this,
    /// instead of waiting for it forever.
    failed: Option<String>,
}

impl BlockEngine {
    /// An engine for `block_size`-byte blocks on `threads` threads (clamped
    /// to 1..=[`MAX_THREADS`]; 1 compresses on the caller's thread).
    pub fn new(
        algorithm: Algorithm,
        verify: bool,
        block_size: u32,
        threads: usize,
    ) -> Result<BlockEngine> {
        let block_size = block_size as usize;
        if block_size == 0 || !JOB_BYTES.is_multiple_of(block_size) {
            return Err(Error::Invalid(format!(
                "block size {block_size} does not divide the job size {JOB_BYTES}"
            )));
        }
        let threads = threads.clamp(1, MAX_THREADS);
        let mode = if threads == 1 {
            Mode::Inline {
                codec: Codec::new(algorithm, verify)?,
                out: Output::default(),
            }
        } else {
            Mode::Pool(Pool::start(algorithm, verify, block_size, threads)?)
        };
        Ok(BlockEngine { block_size, mode })
    }

    /// Jobs that may be outstanding at once (1 on one thread).
    pub fn max_in_flight(&self) -> u64 {
        match &self.mode {
            Mode::Inline { .. } => 1,
            Mode::Pool(p) => p.max_in_flight,
        }
    }

    /// A buffer of [`JOB_BYTES`] to fill with the next job's source bytes.
    pub fn buffer(&mut self) -> Vec<u8> {
        let v = match &mut self.mode {
            Mode::Inline { .. } => None,
            Mode::Pool(p) => p.free_raw.pop(),
        };
        v.unwrap_or_else(|| vec![0u8; JOB_BYTES])
    }

    /// Compress `raw[..len]`: whole blocks, except that the last job of a
    /// stream may end with a short block. Finished jobs, this one or earlier
    /// ones, go to `emit` in order; with a pool this may return before `raw`
    /// is compressed. Returns a buffer (from [`BlockEngine::buffer`]) for
    /// the next job.
    pub fn submit(&mut self, raw: Vec<u8>, len: usize, emit: &mut Emit<'_>) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(raw);
        }
        let len = len.min(raw.len());
        match &mut self.mode {
            Mode::Inline { codec, out } => {
                out.data.clear();
                out.lens.clear();
                codec.compress_blocks(
                    &raw[..len],
                    self.block_size,
                    &mut out.data,
                    &mut out.lens,
                )?;
                emit(&out.data, &out.lens)?;
                Ok(raw)
            }
            Mode::Pool(p) => {
                p.submit(raw, len, emit)?;
                Ok(self.buffer())
            }
        }
    }

    /// Wait for every submitted job and emit the rest in order.
    pub fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        match &mut self.mode {
            Mode::Inline { .. } => Ok(()),
            Mode::Pool(p) => {
                while p.next_emit < p.next_seq {
                    p.collect(true, emit)?;
                }
                Ok(())
            }
        }
    }
}

impl Pool {
    fn start(
        algorithm: Algorithm,
        verify: bool,
        block_size: usize,
        threads: usize,
    ) -> Result<Pool> {
        let max_in_flight = (2 * threads + 2) as u64;
        let (jobs_tx, jobs_rx) = bounded::<Job>(max_in_flight as usize);
        let (done_tx, done_rx) = unbounded::<Done>();
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 0..threads - 1 {
            let mut codec = Codec::new(algorithm, verify)?;
            let rx = jobs_rx.clone();
            let tx = done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("zfile-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        let done = run_job(&mut codec, block_size, job);
                        if tx.send(done).is_err() {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Fewer workers still produce the same bytes (the
                    // caller compresses whatever they do not).
                    tracing::warn!("cannot start compression thread {i}: {e}");
                    break;
                }
            }
        }
        Ok(Pool {
            jobs: Some(jobs_tx),
            queue: jobs_rx,
            codec: Codec::new(algorithm, verify)?,
            block_size,
            done: done_rx,
            workers,
            next_seq: 0,
            next_emit: 0,
            ready: BTreeMap::new(),
            free_raw: Vec::new(),
            free_out: Vec::new(),
            max_in_flight,
            failed: None,
        })
    }

    fn submit(&mut self, raw: Vec<u8>, len: usize, emit: &mut Emit<'_>) -> Result<()> {
        self.check_failed()?;
        let mut out = self.free_out.pop().unwrap_or_default();
        out.data.clear();
        out.lens.clear();
        let job = Job {
            seq: self.next_seq,
            raw,
            len,
            out,
        };
        let jobs = self.jobs.as_ref().expect("pool is running");
        if jobs.send(job).is_err() {
            return Err(Error::Invalid("the compression threads stopped".into()));
        }
        self.next_seq += 1;
        // Write out whatever is done, then keep the number of jobs in
        // flight bounded by waiting for the oldest.
        self.collect(false, emit)?;
        while self.next_seq - self.next_emit >= self.max_in_flight {
            self.collect(true, emit)?;
        }
        Ok(())
    }

    /// Take finished jobs and emit the ones that are next in order. With
    /// `wait`, make progress first: compress a queued job here, or else wait
    /// for a worker to finish one.
    fn collect(&mut self, wait: bool, emit: &mut Emit<'_>) -> Result<()> {
        self.check_failed()?;
        if wait && !self.ready.contains_key(&self.next_emit) {
            let d = match self.queue.try_recv() {
                Ok(job) => run_job(&mut self.codec, self.block_size, job),
                Err(_) => self
                    .done
                    .recv()
                    .map_err(|_| Error::Invalid("the compression threads stopped".into()))?,
            };
            self.ready.insert(d.seq, d);
        }
        while let Ok(d) = self.done.try_recv() {
            self.ready.insert(d.seq, d);
        }
        while let Some(d) = self.ready.remove(&self.next_emit) {
            let done = d.result.and_then(|()| emit(&d.out.data, &d.out.lens));
            self.free_raw.push(d.raw);
            self.free_out.push(d.out);
            if let Err(e) = done {
                self.failed = Some(crate::error::Chain(&e).to_string());
                return Err(e);
            }
            self.next_emit += 1;
        }
        Ok(())
    }

    /// [`Error::Invalid`] with the first failure, once a job failed.
    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(first) => Err(Error::Invalid(format!(
                "an earlier block could not be stored ({first}); the blocks after it cannot be stored in order"
            ))),
        }
    }
}

/// Compress one job, turning a panic into an error so that its result
/// always arrives.
fn run_job(codec: &mut Codec, block_size: usize, mut job: Job) -> Done {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        codec.compress_blocks(
            &job.raw[..job.len],
            block_size,
            &mut job.out.data,
            &mut job.out.lens,
        )
    }))
    .unwrap_or_else(|_| Err(Error::Invalid("a compression thread panicked".into())));
    Done {
        seq: job.seq,
        raw: job.raw,
        out: job.out,
        result,
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job queue ends the workers after their current job.
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 512) % 3 == 0 {
                    (x % 7) as u8
                } else {
                    (i % 97) as u8
                }
            })
            .collect()
    }

    /// Run a stream through an engine, in jobs of `JOB_BYTES`.
    fn run(data: &[u8], algo: Algorithm, bs: u32, threads: usize) -> (Vec<u8>, Vec<u32>) {
        let mut e = BlockEngine::new(algo, true, bs, threads).unwrap();
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let mut emit = |d: &[u8], l: &[u32]| {
            out.extend_from_slice(d);
            lens.extend_from_slice(l);
            Ok(())
        };
        for c in data.chunks(JOB_BYTES) {
            let mut b = e.buffer();
            b[..c.len()].copy_from_slice(c);
            e.submit(b, c.len(), &mut emit).unwrap();
        }
        e.finish(&mut emit).unwrap();
        (out, lens)
    }

    #[test]
    fn thread_counts_give_identical_output() {
        let data = sample(7 * JOB_BYTES + 12_345, 3);
        for algo in [Algorithm::Lz4, Algorithm::Zstd] {
            for bs in [4096, 65536] {
                let one = run(&data, algo, bs, 1);
                assert_eq!(one.1.len(), data.len().div_ceil(bs as usize));
                assert_eq!(
                    one.1.iter().map(|&l| l as usize).sum::<usize>(),
                    one.0.len()
                );
                for t in 2..=4 {
                    assert!(run(&data, algo, bs, t) == one, "{algo} bs {bs} threads {t}");
                }
            }
        }
    }

    #[test]
    fn reused_zstd_context_matches_one_shot_compression() {
        let data = sample(64 << 10, 9);
        let mut c = Codec::new(Algorithm::Zstd, false).unwrap();
        for b in data.chunks(4096) {
            let mut out = Vec::new();
            c.compress_block(b, &mut out).unwrap();
            assert_eq!(out, zstd::bulk::compress(b, ZSTD_LEVEL).unwrap());
        }
        let mut c = Codec::new(Algorithm::Lz4, false).unwrap();
        for b in data.chunks(4096) {
            let mut out = Vec::new();
            c.compress_block(b, &mut out).unwrap();
            assert_eq!(out, lz4::block::compress(b, None, false).unwrap());
        }
    }

    /// An emit that fails ("disk full") on its `nth` call, succeeding on the others.
    fn failing_emit(nth: usize) -> impl FnMut(&[u8], &[u32]) -> Result<()> {
        let mut calls = 0;
        move |_, _| {
            calls += 1;
            if calls == nth {
                Err(Error::Invalid("disk full".into()))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn an_emit_error_stops_the_stream_and_the_pool_shuts_down() {
        let data = sample(6 * JOB_BYTES, 5);
        let mut e = BlockEngine::new(Algorithm::Lz4, true, 4096, 3).unwrap();
        let mut emit = failing_emit(2);
        let mut err = None;
        for c in data.chunks(JOB_BYTES) {
            let mut b = e.buffer();
            b[..c.len()].copy_from_slice(c);
            if let Err(x) = e.submit(b, c.len(), &mut emit) {
                err = Some(x);
                break;
            }
        }
        let err = match err {
            Some(x) => x,
            None => e.finish(&mut emit).unwrap_err(),
        };
        assert!(err.to_string().contains("disk full"), "{err}");
        drop(e); // joins the workers
    }

    /// A caller that keeps writing after a failed emit (the packed layer
    /// behind FUSE: the kernel writes back the next pages after a failed
    /// one) gets errors, never a wait for the job whose emit failed: it was
    /// taken out of the queue, so no worker will finish it again. That wait
    /// hung the FUSE thread, and with it the kernel engine's unmount, for
    /// good once the work directory's disk was full.
    #[test]
    fn writes_after_a_failed_emit_fail_instead_of_waiting_forever() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let data = sample(4 * JOB_BYTES, 7);
            let mut e = BlockEngine::new(Algorithm::Lz4, true, 4096, 3).unwrap();
            let mut emit = failing_emit(1);
            let mut results = Vec::new();
            for _ in 0..4 * e.max_in_flight() {
                for c in data.chunks(JOB_BYTES) {
                    let mut b = e.buffer();
                    b[..c.len()].copy_from_slice(c);
                    results.push(e.submit(b, c.len(), &mut emit).map(drop));
                }
            }
            results.push(e.finish(&mut emit));
            let _ = tx.send(results);
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a write after the failed emit waits forever");
        let first = results.iter().position(Result::is_err).expect("an error");
        assert!(
            results[first]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("disk full"),
            "{:?}",
            results[first]
        );
        // Nothing is stored out of order after the lost job.
        for r in &results[first + 1..] {
            let e = r
                .as_ref()
                .expect_err("a write after the failed one succeeded");
            assert!(e.to_string().contains("disk full"), "{e}");
        }
    }
}
