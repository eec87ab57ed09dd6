//! io_uring reads interrupted by signals: a signal arriving while a thread
//! waits for its completion must not lose track of the request (the next
//! read would then take the stale completion: a wrong length, or the kernel
//! writing into a buffer that was already given back). Found by the
//! lsmt_writable fuzz target (libFuzzer's timer signal).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blockdev::io::{uring_available, IoBackend, IoFile};

extern "C" fn on_signal(_: libc::c_int) {}

#[test]
fn reads_survive_signals() {
    assert!(
        uring_available(),
        "io_uring is not available to this process"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    // SAFETY: installs a handler that does nothing, without SA_RESTART, so
    // blocking calls of the reader thread return EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let f =
        IoFile::open_with(&p, std::fs::OpenOptions::new().read(true), IoBackend::Uring).unwrap();
    // Dropping the file's pages before each read makes the kernel wait for
    // the disk, so signals arrive while the thread waits for completions.
    let plain = std::fs::File::open(&p).unwrap();
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
            // SAFETY: a valid open fd; advice only.
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
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    done.store(true, Ordering::SeqCst);
    let (bad, reads) = reader.join().unwrap();
    assert_eq!(
        bad, 0,
        "{bad} of {reads} reads returned wrong data under {sent} signals"
    );
}
