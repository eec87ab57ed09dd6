//! io_uring waits interrupted by signals, as happen when a tool installs
//! SIGINT/SIGTERM handlers (or libFuzzer its timer): a thread fires
//! `pthread_kill` at a worker in a loop while it reads and writes through
//! the ring. A completion must reach its own request only, and no buffer
//! may be given back while the kernel can still write into it: every read
//! must return the right length and bytes, and the waits must really have
//! been interrupted.
//!
//! The two tests share one signal handler and run one after the other (the
//! engine's counters are process-wide).

use std::fs::OpenOptions;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use blockdev::io::{IoBackend, IoFile};
use blockdev::uring;

static HANDLED: AtomicU64 = AtomicU64::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

extern "C" fn on_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// A SIGUSR1 handler without SA_RESTART, so that waits return EINTR.
fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sa` is fully initialised (zeroed, then the handler and an
        // empty mask); the handler only touches an atomic, which is
        // async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
    });
}

/// Fire SIGUSR1 at `worker` every 50 µs until it finishes; returns how
/// many were sent.
fn pelt<T>(worker: &std::thread::JoinHandle<T>, done: &AtomicBool) -> u64 {
    let tid = worker.as_pthread_t();
    let mut sent = 0u64;
    while !done.load(Ordering::SeqCst) && !worker.is_finished() {
        // SAFETY: `tid` names the worker thread, which has not been joined
        // (so its pthread_t is valid); SIGUSR1 has a handler installed.
        unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
        sent += 1;
        std::thread::sleep(Duration::from_micros(50));
    }
    sent
}

const BLOCK: usize = 4096;
const BLOCKS: u64 = 512;

/// Block `b` as written in version `v`.
fn pattern(b: u64, v: u64) -> Vec<u8> {
    let mut x = ((b + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ v;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Batched reads and writes through the engine, with completions coming
/// from kernel worker threads while the submitter waits.
#[test]
fn signals_during_uring_waits_lose_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !uring::test_gate() {
        return;
    }
    install_handler();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let f = IoFile::open_with(
        &path,
        OpenOptions::new().read(true).write(true).create(true),
        IoBackend::Uring,
    )
    .unwrap();
    let mut version = vec![0u64; BLOCKS as usize];
    for b in 0..BLOCKS {
        f.write_all_at(&pattern(b, 0), b * BLOCK as u64).unwrap();
    }
    // Completions then come from kernel worker threads while we wait.
    uring::set_force_async(true);
    let before = uring::stats();
    let handled_before = HANDLED.load(Ordering::Relaxed);
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let worker = std::thread::spawn(move || {
        let mut x = 12345u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut checked = 0u64;
        for round in 1..=400u64 {
            // Rewrite a block (a ring write), then read a batch of 24
            // blocks, including it, all in flight at once.
            let w = next() % BLOCKS;
            version[w as usize] = round;
            f.write_all_at(&pattern(w, round), w * BLOCK as u64)
                .unwrap();
            let picks: Vec<u64> = (0..24)
                .map(|k| if k == 0 { w } else { next() % BLOCKS })
                .collect();
            let mut bufs = vec![vec![0u8; BLOCK]; picks.len()];
            let mut reqs: Vec<(u64, &mut [u8])> = picks
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&b, buf)| (b * BLOCK as u64, &mut buf[..]))
                .collect();
            for r in f.read_many(&mut reqs) {
                assert_eq!(r.unwrap(), BLOCK);
            }
            drop(reqs);
            for (&b, buf) in picks.iter().zip(&bufs) {
                assert!(
                    *buf == pattern(b, version[b as usize]),
                    "round {round}: block {b} has wrong bytes"
                );
                checked += 1;
            }
            // And a single read.
            let b = next() % BLOCKS;
            let mut one = vec![0u8; BLOCK];
            assert_eq!(f.read_at(&mut one, b * BLOCK as u64).unwrap(), BLOCK);
            assert!(one == pattern(b, version[b as usize]), "single read of {b}");
        }
        f.sync().unwrap();
        done2.store(true, Ordering::SeqCst);
        checked
    });
    let sent = pelt(&worker, &done);
    let checked = worker.join();
    uring::set_force_async(false);
    let checked = checked.expect("worker failed");
    let after = uring::stats();
    assert_eq!(checked, 400 * 24);
    assert!(
        HANDLED.load(Ordering::Relaxed) > handled_before,
        "no signal was handled"
    );
    assert_eq!(after.strays, before.strays, "stray completions");
    assert!(
        after.interrupted > before.interrupted,
        "no wait was interrupted ({sent} signals sent): the test did not test anything"
    );
    eprintln!(
        "{sent} signals sent, {} handled, {} waits interrupted and resumed",
        HANDLED.load(Ordering::Relaxed) - handled_before,
        after.interrupted - before.interrupted
    );
}

/// Single reads of alternating sizes from a file whose pages are dropped
/// before each read, so the kernel waits for the disk while signals arrive:
/// a request whose completion was lost track of would show as a later read
/// of the wrong length or bytes. Found by the lsmt_writable fuzz target
/// (libFuzzer's timer signal) against the earlier one-request-at-a-time ring.
#[test]
fn reads_survive_signals() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !uring::test_gate() {
        return;
    }
    install_handler();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let f = IoFile::open_with(&p, OpenOptions::new().read(true), IoBackend::Uring).unwrap();
    let plain = std::fs::File::open(&p).unwrap();
    let before = uring::stats();
    let handled_before = HANDLED.load(Ordering::Relaxed);
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let reader = std::thread::spawn(move || {
        let (mut bad, mut i) = (0, 0u64);
        while !d2.load(Ordering::SeqCst) {
            i += 1;
            // Alternate sizes so a stale completion shows as a wrong length.
            let len = if i % 2 == 0 { 4096 } else { 512 };
            let off = (i * 7919 * 512) % ((1 << 20) - 4096);
            let mut buf = vec![0u8; len];
            // SAFETY: a valid open fd; advice only, no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&plain),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            let n = f.read_at(&mut buf, off).unwrap();
            if n != len || buf != data[off as usize..off as usize + len] {
                bad += 1;
            }
        }
        (bad, i)
    });
    let tid = reader.as_pthread_t();
    let sent = 5000;
    for _ in 0..sent {
        // SAFETY: the reader thread runs until `done` is set below and is
        // joined after that, so tid names a live thread.
        unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_micros(50));
    }
    done.store(true, Ordering::SeqCst);
    let (bad, reads) = reader.join().unwrap();
    let after = uring::stats();
    assert_eq!(
        bad, 0,
        "{bad} of {reads} reads returned wrong data under {sent} signals"
    );
    assert!(
        HANDLED.load(Ordering::Relaxed) > handled_before,
        "no signal was handled"
    );
    assert_eq!(after.strays, before.strays, "stray completions");
    eprintln!(
        "{reads} reads, {sent} signals sent, {} waits interrupted and resumed",
        after.interrupted - before.interrupted
    );
}
