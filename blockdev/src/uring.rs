//! A small io_uring engine: batches of positional reads, writes and fsyncs
//! with several requests in flight, on a ring per thread.
//!
//! Soundness rules, which the rest of the crate relies on:
//!
//! * A batch borrows every buffer for the whole call, and the call returns
//!   only once the completion of every submission entry it pushed has been
//!   taken from the ring. A wait interrupted by a signal (`EINTR`), or
//!   refused for the moment (`EAGAIN`, `EBUSY`), is simply waited again: the
//!   kernel may still own buffers, so nothing is given back to the caller.
//! * Every entry carries `user_data = batch generation << 32 | index`, and a
//!   completion is only credited to the request it names. A completion of
//!   another generation cannot exist (the previous batch took all of its
//!   own); if one ever shows up it is counted ([`stats`]) and dropped,
//!   never taken for someone else's.
//! * Requests that finish short (a read or write of fewer bytes, or a
//!   request that itself failed with `EINTR`/`EAGAIN`, or was cancelled by
//!   the kernel: `ECANCELED`, a bounded number of times) are resubmitted for
//!   the rest.
//! * If `io_uring_enter` fails for another reason while entries are pushed,
//!   entries the kernel has not consumed are abandoned with the ring (which
//!   is closed; a new one is made on next use) and the batch finishes with
//!   plain `pread`/`pwrite`. If requests the kernel did consume are still
//!   outstanding and the ring cannot be waited on any more, the process
//!   aborts: returning would let the kernel write into memory the caller
//!   has reused.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Entries per thread's submission queue (the completion queue has twice
/// as many, so in-flight requests never overflow it).
const RING_ENTRIES: u32 = 64;

thread_local! {
    static RING: RefCell<Option<io_uring::IoUring>> = const { RefCell::new(None) };
}

static GENERATION: AtomicU32 = AtomicU32::new(1);
static STRAYS: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicU64 = AtomicU64::new(0);
static RESUBMITTED: AtomicU64 = AtomicU64::new(0);
static FORCE_ASYNC: AtomicBool = AtomicBool::new(false);

/// Process-wide counters of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Completions that named no request of the batch being waited for.
    pub strays: u64,
    /// Waits cut short by a signal or refused for the moment, then resumed.
    pub interrupted: u64,
    /// Requests resubmitted for the rest after a short or retryable result.
    pub resubmitted: u64,
}

/// The engine's counters since the process started.
pub fn stats() -> Stats {
    Stats {
        strays: STRAYS.load(Ordering::Relaxed),
        interrupted: INTERRUPTED.load(Ordering::Relaxed),
        resubmitted: RESUBMITTED.load(Ordering::Relaxed),
    }
}

/// Make every request go through the kernel's worker threads
/// (`IOSQE_ASYNC`), so that completions arrive while the submitter waits.
/// For tests that need waits to interrupt; slower otherwise.
#[doc(hidden)]
pub fn set_force_async(on: bool) {
    FORCE_ASYNC.store(on, Ordering::Relaxed);
}

/// Whether this thread can use io_uring.
pub fn available() -> bool {
    probe().is_ok()
}

/// Set up this thread's ring if it has none: the error says why io_uring
/// is unavailable (a kernel without it, a seccomp profile refusing it).
pub(crate) fn probe() -> io::Result<()> {
    with_ring(|_| Ok(()))
}

/// For tests that need io_uring: whether to run. Without io_uring the test
/// is skipped with `skipped: io_uring unavailable (<reason>)` on stderr;
/// when the environment variable `CI` is set (not empty, `false` or `0`) it
/// fails instead, as CI machines have io_uring (`.ci/run` sets `CI`) and a
/// test that skips there tests nothing. Public for the crate's integration
/// tests.
#[doc(hidden)]
pub fn test_gate() -> bool {
    test_gate_with(std::env::var_os("CI").as_deref())
}

fn test_gate_with(ci: Option<&std::ffi::OsStr>) -> bool {
    let Err(e) = probe() else {
        return true;
    };
    let why = format!("io_uring unavailable ({e})");
    let ci = ci.is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{why}, and CI is set: CI machines have io_uring, so this test fails instead of skipping"
    );
    eprintln!("skipped: {why}");
    false
}

fn with_ring<T>(f: impl FnOnce(&mut io_uring::IoUring) -> io::Result<T>) -> io::Result<T> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(io_uring::IoUring::new(RING_ENTRIES)?);
        }
        f(slot.as_mut().expect("ring initialised above"))
    })
}

/// Close this thread's ring (entries it holds that the kernel has not
/// consumed are never executed); the next batch makes a new one.
fn discard_ring() {
    RING.with(|cell| drop(cell.borrow_mut().take()));
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Fsync,
}

/// One request of a batch. The buffer is borrowed for `'a`, which outlives
/// the batch call; the engine keeps raw pointers into it only during that
/// call.
pub struct Req<'a> {
    fd: RawFd,
    kind: Kind,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    done: usize,
    /// Completions with `ECANCELED` so far (see [`Req::complete`]).
    cancelled: u32,
    result: Option<io::Result<usize>>,
    _buf: PhantomData<&'a mut [u8]>,
}

/// How often one request is submitted again after the kernel cancelled it.
const MAX_CANCELLED: u32 = 64;

impl<'a> Req<'a> {
    /// Read into all of `buf` from `offset` (short only at end of file).
    pub fn read(fd: RawFd, offset: u64, buf: &'a mut [u8]) -> Req<'a> {
        Req {
            fd,
            kind: Kind::Read,
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            offset,
            done: 0,
            cancelled: 0,
            result: None,
            _buf: PhantomData,
        }
    }

    /// Write all of `buf` at `offset`.
    pub fn write(fd: RawFd, offset: u64, buf: &'a [u8]) -> Req<'a> {
        Req {
            fd,
            kind: Kind::Write,
            // Never written through: write requests only read the buffer.
            ptr: buf.as_ptr() as *mut u8,
            len: buf.len(),
            offset,
            done: 0,
            cancelled: 0,
            result: None,
            _buf: PhantomData,
        }
    }

    /// Flush the file to stable storage.
    pub fn fsync(fd: RawFd) -> Req<'a> {
        Req {
            fd,
            kind: Kind::Fsync,
            ptr: std::ptr::null_mut(),
            len: 0,
            offset: 0,
            done: 0,
            cancelled: 0,
            result: None,
            _buf: PhantomData,
        }
    }

    /// Bytes transferred (reads stop short only at end of file), or the error.
    pub fn take_result(&mut self) -> io::Result<usize> {
        self.result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("request was not run")))
    }

    fn finished(&self) -> bool {
        self.result.is_some()
    }

    fn entry(&self, user_data: u64) -> io_uring::squeue::Entry {
        use io_uring::{opcode, types::Fd};
        let rest = (self.len - self.done).min(u32::MAX as usize) as u32;
        let e = match self.kind {
            Kind::Read => opcode::Read::new(
                Fd(self.fd),
                // In bounds: done <= len, and the buffer holds len bytes.
                self.ptr.wrapping_add(self.done),
                rest,
            )
            .offset(self.offset + self.done as u64)
            .build(),
            Kind::Write => opcode::Write::new(
                Fd(self.fd),
                self.ptr.wrapping_add(self.done) as *const u8,
                rest,
            )
            .offset(self.offset + self.done as u64)
            .build(),
            Kind::Fsync => opcode::Fsync::new(Fd(self.fd)).build(),
        };
        let e = e.user_data(user_data);
        if FORCE_ASYNC.load(Ordering::Relaxed) {
            e.flags(io_uring::squeue::Flags::ASYNC)
        } else {
            e
        }
    }

    /// Account for a completion with result `res`; returns whether the
    /// request must be submitted again for the rest.
    fn complete(&mut self, res: i32) -> bool {
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return true;
        }
        // This engine never cancels a request, yet the kernel completes one with
        // ECANCELED when io-wq cannot start a worker for it (the submitting thread
        // had a signal pending while the worker was being created): submit it
        // again, a bounded number of times.
        if res == -libc::ECANCELED && self.cancelled < MAX_CANCELLED {
            self.cancelled += 1;
            return true;
        }
        if res < 0 {
            self.result = Some(Err(io::Error::from_raw_os_error(-res)));
            return false;
        }
        let n = res as usize;
        match self.kind {
            Kind::Fsync => {
                self.result = Some(Ok(0));
                false
            }
            Kind::Read if n == 0 => {
                self.result = Some(Ok(self.done));
                false
            }
            // A write of nothing (an empty buffer) is done, not stuck.
            Kind::Write if n == 0 && self.done < self.len => {
                self.result = Some(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0",
                )));
                false
            }
            _ => {
                self.done += n.min(self.len - self.done);
                if self.done < self.len {
                    true
                } else {
                    self.result = Some(Ok(self.done));
                    false
                }
            }
        }
    }

    /// Run the request with plain system calls.
    fn run_sync(&mut self) {
        while !self.finished() {
            let rest = self.len - self.done;
            // SAFETY: `ptr + done .. ptr + len` lies in the buffer borrowed
            // for 'a (done <= len; the range is empty, at the slice's own
            // pointer, for an empty buffer), which is alive and not otherwise
            // accessed during the call; the fd is the caller's open file.
            let r = unsafe {
                match self.kind {
                    Kind::Read => libc::pread(
                        self.fd,
                        self.ptr.add(self.done).cast(),
                        rest,
                        (self.offset + self.done as u64) as libc::off_t,
                    ),
                    Kind::Write => libc::pwrite(
                        self.fd,
                        self.ptr.add(self.done).cast_const().cast(),
                        rest,
                        (self.offset + self.done as u64) as libc::off_t,
                    ),
                    Kind::Fsync => libc::fsync(self.fd) as isize,
                }
            };
            let res = if r < 0 {
                -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                r.min(i32::MAX as isize) as i32
            };
            self.complete(res);
        }
    }
}

/// Run `reqs` with as many in flight as the ring holds. With `uring`
/// false, or when no ring can be had, they run one by one with plain
/// system calls. Results are in each request ([`Req::take_result`]).
pub fn run(reqs: &mut [Req<'_>], uring: bool) {
    if reqs.is_empty() {
        return;
    }
    if !uring || with_ring(|ring| run_on_ring(ring, reqs)).is_err() {
        // No ring, or one that failed with nothing outstanding: drop it
        // (with any entries the kernel never consumed) and go on without.
        discard_ring();
        for r in reqs.iter_mut() {
            r.run_sync();
        }
    }
}

/// The batch loop on this thread's ring. `Err` means the ring is unusable;
/// requests not finished then still have no result and run synchronously.
fn run_on_ring(ring: &mut io_uring::IoUring, reqs: &mut [Req<'_>]) -> io::Result<()> {
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) as u64;
    let capacity = ring.params().sq_entries() as usize;
    let mut queue: VecDeque<usize> = (0..reqs.len()).collect();
    // Entries pushed whose completion has not been taken yet.
    let mut in_flight = 0usize;
    loop {
        while in_flight < capacity {
            let Some(&i) = queue.front() else { break };
            let e = reqs[i].entry(generation << 32 | i as u64);
            // SAFETY: the entry points into a buffer borrowed by `reqs[i]`
            // for longer than this call (or at nothing, for fsync), and
            // this function does not return normally before the entry's
            // completion has been taken (see the module documentation).
            if unsafe { ring.submission().push(&e) }.is_err() {
                break;
            }
            queue.pop_front();
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        if let Err(e) = ring.submit_and_wait(1) {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    INTERRUPTED.fetch_add(1, Ordering::Relaxed);
                }
                _ => return abandon(ring, in_flight, e),
            }
        }
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            let i = (ud & 0xffff_ffff) as usize;
            if ud >> 32 != generation || i >= reqs.len() || reqs[i].finished() {
                STRAYS.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            in_flight -= 1;
            if reqs[i].complete(cqe.result()) {
                RESUBMITTED.fetch_add(1, Ordering::Relaxed);
                queue.push_back(i);
            }
        }
    }
}

/// `io_uring_enter` failed for good with `in_flight` entries outstanding.
fn abandon(ring: &mut io_uring::IoUring, in_flight: usize, err: io::Error) -> io::Result<()> {
    let unconsumed = ring.submission().len();
    if unconsumed < in_flight {
        // The kernel owns some buffers and we cannot wait for it any more.
        tracing::error!(
            "io_uring: cannot wait for {} outstanding requests: {err}; aborting",
            in_flight - unconsumed
        );
        std::process::abort();
    }
    // Nothing outstanding reached the kernel: the caller drops the ring
    // with its queued entries and finishes with plain system calls.
    tracing::warn!("io_uring failed ({err}); continuing with pread/pwrite");
    Err(err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    /// Empty reads and writes succeed with 0 bytes, on the ring and off it
    /// (a write of nothing returned 0 and was reported as `WriteZero`).
    #[test]
    fn empty_requests_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let fd = f.as_raw_fd();
        for uring in [false, true] {
            let mut empty: [u8; 0] = [];
            let mut rs = [Req::write(fd, 4096, &[]), Req::read(fd, 0, &mut empty)];
            run(&mut rs, uring);
            for (k, r) in rs.iter_mut().enumerate() {
                assert_eq!(r.take_result().unwrap(), 0, "uring {uring}, request {k}");
            }
        }
        assert_eq!(f.metadata().unwrap().len(), 0);
    }

    /// Without io_uring (here: a thread whose seccomp filter refuses
    /// `io_uring_setup`, as Docker's default profile does) a test needing it
    /// skips, saying why, or fails when `CI` is set; with io_uring it runs.
    #[test]
    fn tests_needing_io_uring_fail_under_ci_when_it_is_unavailable() {
        use std::ffi::OsStr;
        let refused = std::thread::spawn(|| {
            refuse_io_uring_setup_on_this_thread();
            let e = probe().unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSYS), "{e}");
            let skips = [None, Some(OsStr::new("")), Some(OsStr::new("false"))]
                .map(|ci| test_gate_with(ci));
            let fails = [Some(OsStr::new("true")), Some(OsStr::new("1"))].map(|ci| {
                std::panic::catch_unwind(|| test_gate_with(ci))
                    .map_err(|p| p.downcast_ref::<String>().cloned().unwrap_or_default())
            });
            (skips, fails)
        })
        .join()
        .unwrap();
        assert_eq!(refused.0, [false; 3]);
        for f in refused.1 {
            let msg = f.expect_err("CI is set: the test must fail");
            assert!(
                msg.starts_with("io_uring unavailable (Function not implemented")
                    && msg.contains("CI is set"),
                "{msg}"
            );
        }
        // On this thread io_uring is as the machine has it: a test runs
        // (or skips, outside CI).
        assert_eq!(test_gate_with(None), available());
    }

    /// Install a seccomp filter on the calling thread (only) that fails
    /// `io_uring_setup` with ENOSYS and allows every other system call.
    pub(crate) fn refuse_io_uring_setup_on_this_thread() {
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let filter = [
            // A = seccomp_data.nr
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: libc::SYS_io_uring_setup as u32,
            },
            stmt(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            ),
            stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prctl with integer arguments; PR_SET_NO_NEW_PRIVS (needed
        // for an unprivileged filter) and the filter apply to this thread
        // only (no SECCOMP_FILTER_FLAG_TSYNC). `prog` points to `filter`,
        // both alive during the call; the kernel copies the program.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog,
                ),
                0,
                "{}",
                io::Error::last_os_error()
            );
        }
    }

    #[test]
    fn batches_read_write_and_resubmit_short_requests() {
        if !test_gate() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let fd = f.as_raw_fd();
        let blocks: Vec<Vec<u8>> = (0..200u32)
            .map(|i| (0..4096u32).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        // 200 writes: more than the ring holds at once.
        let mut w: Vec<Req<'_>> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| Req::write(fd, i as u64 * 4096, b))
            .collect();
        w.push(Req::fsync(fd));
        run(&mut w, true);
        for r in &mut w {
            r.take_result().unwrap();
        }
        let mut bufs = vec![vec![0u8; 4096]; 200];
        let mut tail = vec![0u8; 10_000];
        let mut rs: Vec<Req<'_>> = bufs
            .iter_mut()
            .enumerate()
            .rev()
            .map(|(i, b)| Req::read(fd, i as u64 * 4096, b))
            .collect();
        // A read across the end of the file stops short there.
        rs.push(Req::read(fd, 199 * 4096, &mut tail));
        run(&mut rs, true);
        let n: Vec<usize> = rs.iter_mut().map(|r| r.take_result().unwrap()).collect();
        assert!(n[..200].iter().all(|&x| x == 4096));
        assert_eq!(n[200], 4096);
        drop(rs);
        assert!(bufs == blocks);
        assert_eq!(&tail[..4096], &blocks[199][..]);
        // Errors are per request.
        let mut b = [0u8; 16];
        let mut bad = [Req::read(-1, 0, &mut b)];
        run(&mut bad, true);
        assert_eq!(
            bad[0].take_result().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
