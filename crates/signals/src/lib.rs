//! Stop signals for the binaries.
//!
//! Every long-running binary (the single-layer tools, `overlaybd-nbd`,
//! `overlaybd-fuse`, `convertor`) takes SIGINT and SIGTERM (and
//! `overlaybd-fuse` SIGHUP) the same way: blocked in the main thread before
//! any other thread starts, so that every thread inherits the mask, then
//! taken by one thread with `sigwait` or a signalfd, which stops the work
//! cleanly.
//!
//! A signal the process was started with ignored stays ignored, as it would
//! be without any handling: a non-interactive shell starts background jobs
//! (`cmd &`) with SIGINT and SIGQUIT ignored so that a Ctrl-C meant for the
//! foreground does not stop them, and `nohup` starts its command with SIGHUP
//! ignored. Blocking such a signal would make it deliverable again (Linux
//! never discards a blocked signal), so [`block`] leaves it out.

use nix::sys::signal::{SigSet, Signal};

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
    use nix::sys::signal::{pthread_sigmask, signal, SigHandler, SigmaskHow};

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
