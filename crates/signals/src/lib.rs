//! Stop signals for the binaries.
//!
//! Every long-running binary (the single-layer tools, `overlaybd-nbd`,
//! `overlaybd-fuse`, `convertor`) takes SIGINT and SIGTERM (and
//! `overlaybd-fuse` SIGHUP) the same way: blocked in the main thread before
//! any other thread starts, so that every thread inherits the mask, then
//! taken by one thread from a signalfd ([`Stops`]), which stops the work
//! cleanly.
//!
//! A signal the process was started with ignored stays ignored, as it would
//! be without any handling: a non-interactive shell starts background jobs
//! (`cmd &`) with SIGINT and SIGQUIT ignored so that a Ctrl-C meant for the
//! foreground does not stop them, and `nohup` starts its command with SIGHUP
//! ignored. Blocking such a signal would make it deliverable again (Linux
//! never discards a blocked signal), so [`block`] leaves it out.
//!
//! A second stop signal means "stop now" to every binary, so copies of one
//! request must not count as two: `timeout` sends its signal to the command
//! and then to the command's whole process group, and a wrapper may forward
//! a terminal's Ctrl-C that the process group already got. [`Stops`] takes
//! the copies of a signal that arrive within [`TOGETHER`] of it with it.
//!
//! A write past the file size limit (`ulimit -f`, RLIMIT_FSIZE, which some
//! CI sandboxes set) sends SIGXFSZ, whose default action kills the process
//! without a word and without its clean-up; every binary ignores it first
//! thing ([`fail_writes_past_file_size_limit`]), so that such a write fails
//! with EFBIG (`File too large`) like any other failed write.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// How soon after a stop signal a copy of it counts as the same request
/// (the copies `timeout` or a wrapper sends come within microseconds to a
/// few milliseconds). Nothing is said or done about a signal before this
/// time has passed (unless another signal comes), so a second signal sent
/// in reply to what the first one made the process say is never taken for
/// a copy.
pub const TOGETHER: Duration = Duration::from_millis(50);

/// The stop requests made with the (blocked, see [`block`]) signals of a
/// set, read from a signalfd.
#[derive(Debug)]
pub struct Stops {
    fd: SignalFd,
    /// Another signal that came while copies of the last one were taken:
    /// the next request.
    next: Option<Signal>,
    /// The requests read so far (the one in `next` included).
    requests: Arc<AtomicUsize>,
    /// How long copies of a signal are taken with it: [`TOGETHER`] (a test
    /// sets a longer one, so that a copy it sends is within it whatever the
    /// machine's load).
    window: Duration,
}

impl Stops {
    /// Watch the signals of `set`, which must be blocked in every thread.
    pub fn new(set: &SigSet) -> nix::Result<Stops> {
        let fd = SignalFd::with_flags(set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Stops {
            fd,
            next: None,
            requests: Arc::new(AtomicUsize::new(0)),
            window: TOGETHER,
        })
    }

    /// The number of requests read so far, for another thread: it counts a
    /// request as soon as its first signal is read, before [`wait`](Self::wait)
    /// returns it (a signal sent but not read yet is [`pending`]).
    pub fn requests(&self) -> Arc<AtomicUsize> {
        self.requests.clone()
    }

    /// Wait for the next stop request: its signal, once [`TOGETHER`] has
    /// passed, taking with it the copies of that signal that came meanwhile.
    /// Another signal that comes meanwhile ends the wait: it is the next
    /// request, returned at once by the next call.
    pub fn wait(&mut self) -> nix::Result<Signal> {
        if let Some(sig) = self.next.take() {
            return Ok(sig);
        }
        let sig = loop {
            if let Some(sig) = self.read(None)? {
                self.requests.fetch_add(1, Ordering::SeqCst);
                break sig;
            }
        };
        let until = Instant::now() + self.window;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.read(Some(left))? {
                None => {}
                Some(copy) if copy == sig => {}
                Some(other) => {
                    self.requests.fetch_add(1, Ordering::SeqCst);
                    self.next = Some(other);
                    break;
                }
            }
        }
        Ok(sig)
    }

    /// The next signal, waiting at most `limit` (`None`: without a limit).
    /// `None` when none came in time.
    fn read(&self, limit: Option<Duration>) -> nix::Result<Option<Signal>> {
        let timeout = match limit {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        match self.fd.read_signal()? {
            Some(info) => Signal::try_from(info.ssi_signo as i32).map(Some),
            None => Ok(None),
        }
    }
}

/// Whether a signal of `set` (blocked, see [`block`]) was sent to the process
/// or the calling thread and not taken yet: by [`Stops`], it is the next
/// request, or a copy of the current one.
pub fn pending(set: &SigSet) -> nix::Result<bool> {
    // A signalfd of its own, polled and never read: it shows what is pending
    // without taking it from the `Stops` that will read it.
    let fd = SignalFd::with_flags(set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    Ok(poll(&mut fds, PollTimeout::ZERO)? > 0)
}

/// Block those of `sigs` that this process was not started with ignored,
/// in the calling thread (call it before other threads start: they inherit
/// the mask), and return them: the set to wait on. It may be empty.
pub fn block(sigs: &[Signal]) -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    for &sig in sigs {
        if !ignored(sig) {
            set.add(sig);
        }
    }
    set.thread_block()?;
    Ok(set)
}

/// Ignore SIGXFSZ, so that a write or truncate past the file size limit
/// (RLIMIT_FSIZE) fails with EFBIG, reported and cleaned up after as any
/// other failed write, instead of killing the process (exit status 153, no
/// message, temporary and half-written files left behind). Call it first
/// thing in `main`. Programs this process starts inherit the ignored
/// disposition (as they would from a shell that ignores it) and see EFBIG
/// too.
pub fn fail_writes_past_file_size_limit() -> nix::Result<()> {
    // SAFETY: SIG_IGN runs no code in signal context (no handler whose
    // async-signal safety would matter), and nothing in these binaries
    // installs a handler for SIGXFSZ that this would replace.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.map(drop)
}

/// Whether `sig` is ignored (SIG_IGN, as inherited from the parent).
pub fn ignored(sig: Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<nix::libc::sigaction>::zeroed();
    // SAFETY: with a null new action, sigaction(2) only writes the current one
    // into `old`, which points to writable memory of the right type.
    let r = unsafe {
        nix::libc::sigaction(sig as nix::libc::c_int, std::ptr::null(), old.as_mut_ptr())
    };
    // SAFETY: `old` is initialised: zeroed, a valid value of this plain C
    // struct of integers and masks, and filled in by sigaction when r == 0.
    let old = unsafe { old.assume_init() };
    r == 0 && old.sa_sigaction == nix::libc::SIG_IGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::pthread::{pthread_kill, pthread_self};
    use nix::sys::signal::{pthread_sigmask, SigmaskHow};

    /// Copies of a signal a few milliseconds apart (as `timeout` sends
    /// them) are one request; the same signal after [`TOGETHER`] is a
    /// second one, and so is another signal, even at once. The signals are
    /// sent to the test's own thread, which blocks them (a signal sent to
    /// the process could go to another thread of the test harness).
    #[test]
    fn copies_within_the_window_are_one_request() {
        std::thread::spawn(|| {
            // Not SIGUSR1: the other test sets it ignored for the whole
            // process meanwhile, which would discard it. A signalfd gives
            // the lowest-numbered pending signal first: `a` (12) before
            // `b` (14).
            let (a, b) = (Signal::SIGUSR2, Signal::SIGALRM);
            let mut set = SigSet::empty();
            set.add(a);
            set.add(b);
            set.thread_block().unwrap();
            let mut stops = Stops::new(&set).unwrap();
            let me = pthread_self();
            let send = |sig| pthread_kill(me, sig).unwrap();
            let nothing_pending = |stops: &Stops| stops.read(Some(Duration::ZERO)).unwrap();

            let requests = stops.requests();
            assert!(!pending(&set).unwrap());

            // A copy that comes after the first was read (two sent at once
            // would merge in the kernel) and within the window, then another
            // signal, which ends the wait. The window is a minute here, so
            // that the copy is within it however late a loaded machine runs
            // the thread that sends it (it was sent 5 ms after the first,
            // and came after the 50 ms of TOGETHER about once in three runs
            // under load).
            stops.window = Duration::from_secs(60);
            send(a);
            assert!(pending(&set).unwrap(), "sent, not read");
            assert!(pending(&set).unwrap(), "polling takes nothing");
            assert_eq!(requests.load(Ordering::SeqCst), 0);
            let read = requests.clone();
            let t = std::thread::spawn(move || {
                while read.load(Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                pthread_kill(me, a).unwrap();
                pthread_kill(me, b).unwrap();
            });
            assert_eq!(stops.wait().unwrap(), a);
            t.join().unwrap();
            assert_eq!(requests.load(Ordering::SeqCst), 2, "copies are no request");
            assert_eq!(stops.wait().unwrap(), b);
            assert_eq!(nothing_pending(&stops), None);
            assert!(!pending(&set).unwrap());
            stops.window = TOGETHER;

            // The same signal after the window: a second request. Nothing is
            // returned before the window has passed.
            send(a);
            let took = Instant::now();
            assert_eq!(stops.wait().unwrap(), a);
            assert!(took.elapsed() >= TOGETHER);
            send(a);
            assert_eq!(stops.wait().unwrap(), a);

            // Another signal within the window: the next request, at once
            // (a stop, then a "stop now": the second is not held back).
            send(a);
            send(b);
            assert_eq!(stops.wait().unwrap(), a);
            assert_eq!(stops.next, Some(b), "taken, to be returned without a wait");
            assert_eq!(requests.load(Ordering::SeqCst), 6, "counted once read");
            assert_eq!(stops.wait().unwrap(), b);
            assert_eq!(nothing_pending(&stops), None);
        })
        .join()
        .unwrap();
    }

    /// Runs in a thread of its own (signal masks are per thread; dispositions
    /// are per process, so this is the only test that changes one).
    #[test]
    fn an_ignored_signal_is_left_out_and_the_others_blocked() {
        std::thread::spawn(|| {
            // SAFETY: SIG_IGN is not a handler function; nothing else in this
            // test binary relies on SIGUSR1's disposition.
            unsafe { signal(Signal::SIGUSR1, SigHandler::SigIgn) }.unwrap();
            assert!(ignored(Signal::SIGUSR1));
            assert!(!ignored(Signal::SIGUSR2));
            let set = block(&[Signal::SIGUSR1, Signal::SIGUSR2]).unwrap();
            assert!(!set.contains(Signal::SIGUSR1));
            assert!(set.contains(Signal::SIGUSR2));
            let mut now = SigSet::empty();
            pthread_sigmask(SigmaskHow::SIG_BLOCK, None, Some(&mut now)).unwrap();
            assert!(now.contains(Signal::SIGUSR2));
            assert!(!now.contains(Signal::SIGUSR1));
        })
        .join()
        .unwrap();
    }
}
