//! io_uring waits interrupted by signals, as happen when a tool installs
//! SIGINT/SIGTERM handlers: a thread fires `pthread_kill` at the worker in
//! a loop while it reads and writes through the ring. Every read must
//! return the right bytes, every completion must reach its own request,
//! and the waits must really have been interrupted.

use std::fs::OpenOptions;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockdev::io::{IoBackend, IoFile};
use blockdev::uring;

static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
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

#[test]
fn signals_during_uring_waits_lose_nothing() {
    if !blockdev::io::uring_available() {
        eprintln!("io_uring unavailable here; skipping");
        return;
    }
    // A handler without SA_RESTART, so that waits return EINTR.
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
    let tid = worker.as_pthread_t();
    let mut sent = 0u64;
    while !done.load(Ordering::SeqCst) && !worker.is_finished() {
        // SAFETY: `tid` names the worker thread, which has not been joined
        // (so its pthread_t is valid); SIGUSR1 has a handler installed.
        unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
        sent += 1;
        std::thread::sleep(Duration::from_micros(50));
    }
    let checked = worker.join().expect("worker failed");
    uring::set_force_async(false);
    let after = uring::stats();
    assert_eq!(checked, 400 * 24);
    assert!(HANDLED.load(Ordering::Relaxed) > 0, "no signal was handled");
    assert_eq!(after.strays, before.strays, "stray completions");
    assert!(
        after.interrupted > before.interrupted,
        "no wait was interrupted ({sent} signals sent): the test did not test anything"
    );
    eprintln!(
        "{sent} signals sent, {} handled, {} waits interrupted and resumed",
        HANDLED.load(Ordering::Relaxed),
        after.interrupted - before.interrupted
    );
}
