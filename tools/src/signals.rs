//! SIGINT and SIGTERM in the tools that write files (overlaybd-create,
//! overlaybd-commit, overlaybd-zfile, overlaybd-apply, turboOCI-apply).
//!
//! [`Signals::install`], first thing in `main`, blocks both signals (every
//! thread started later inherits the mask) and takes them on a thread of its
//! own ([`obdsignals::Stops`]: copies of one signal sent together count as
//! one). On a signal that thread removes every unfinished output
//! ([`blockdev::pending::abandon_all`]: outputs are written beside their
//! destination and renamed into place only when complete), writes `failed:`
//! into the result file registered with [`Signals::on_signal`],
//! prints one line and exits with 128 + the signal number (130 for SIGINT,
//! 143 for SIGTERM). Work that must undo things itself (the kernel engine
//! unmounts) hands over a flag with [`Signals::cancel_first`]: the first
//! signal only sets it and the work fails with "interrupted"; a second
//! signal exits at once as above.
//!
//! A signal the tool was started with ignored (SIGINT and SIGQUIT in a
//! script's background job, `cmd &`) stays ignored, as it was before the
//! tools handled signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::ImageConfig;
use nix::sys::signal::{SigSet, Signal};

use crate::cli::{report, say};

/// What a signal leaves behind an apply ([`Signals::on_signal`]): the
/// filesystem is changed in place, never undone.
pub const PARTIAL_LAYER: &str = "the layer is applied only in part: discard the upper layer";

/// The signal handling of a tool ([module docs](self)).
#[derive(Clone)]
pub struct Signals {
    shared: Arc<Shared>,
}

struct Shared {
    tool: &'static str,
    /// The first signal received (0: none).
    caught: AtomicI32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The config whose result file a signal marks failed, until the tool
    /// wrote its own outcome there.
    result: Option<ImageConfig>,
    /// What a signal leaves behind, for the message and the result file.
    left: Option<String>,
    /// Set by the first signal instead of exiting.
    cancel: Option<Arc<AtomicBool>>,
    /// Files the tool is making in place, removed by a signal.
    remove: Vec<PathBuf>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is one assignment: a panic elsewhere
        // while it was held leaves the state consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in the calling thread and starts the thread
    /// that takes them. Call it before any other thread starts (they inherit
    /// the mask; a thread started before would still die of the signal).
    /// Should that fail, the signals keep their default action.
    pub fn install(tool: &'static str) -> Signals {
        let shared = Arc::new(Shared {
            tool,
            caught: AtomicI32::new(0),
            state: Mutex::new(State::default()),
        });
        // A write past `ulimit -f` fails with EFBIG, reported and cleaned
        // up after, instead of SIGXFSZ killing the tool. (It cannot fail: a
        // valid signal and SIG_IGN.)
        let _ = obdsignals::fail_writes_past_file_size_limit();
        let blocked = obdsignals::block(&[Signal::SIGINT, Signal::SIGTERM]);
        if let Some(sigs) = blocked.ok().filter(|s| *s != SigSet::empty()) {
            let s = shared.clone();
            let started = obdsignals::Stops::new(&sigs).ok().and_then(|mut stops| {
                std::thread::Builder::new()
                    .name("signals".into())
                    .spawn(move || {
                        while let Ok(sig) = stops.wait() {
                            take(&s, sig);
                        }
                    })
                    .ok()
            });
            if started.is_none() {
                let _ = sigs.thread_unblock();
            }
        }
        Signals { shared }
    }

    /// On a signal, say that `left` (e.g. "the layer is incomplete") and,
    /// with `cfg`, write `failed:interrupted by SIG...: <left>` into its
    /// result file, unless [`write_result`](Self::write_result) came first.
    pub fn on_signal(&self, cfg: Option<&ImageConfig>, left: &str) {
        let mut st = self.shared.state();
        st.result = cfg.cloned();
        st.left = Some(left.to_string());
    }

    /// Write the tool's own outcome into `cfg`'s result file; from then on a
    /// signal no longer writes there (a signal being handled right now has
    /// written "failed" already and ends the process: this waits for that).
    pub fn write_result(&self, cfg: &ImageConfig, msg: &str) -> blockdev::Result<()> {
        let mut st = self.shared.state();
        st.result = None;
        cfg.write_result(msg)
    }

    /// A signal removes `paths` (files the tool makes in place, such as a new
    /// layer's data and index files, that would look complete when left
    /// half made); an empty list once they are complete.
    pub fn remove_on_signal(&self, paths: Vec<PathBuf>) {
        self.shared.state().remove = paths;
    }

    /// The first signal sets `flag` (the work then stops and fails) instead
    /// of exiting; a second one exits.
    pub fn cancel_first(&self, flag: Arc<AtomicBool>) {
        self.shared.state().cancel = Some(flag);
    }

    /// The first signal received, if any.
    pub fn caught(&self) -> Option<i32> {
        match self.shared.caught.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig),
        }
    }

    /// Run the tool's body, as [`crate::cli::run`]; a body that failed
    /// after a signal (see [`cancel_first`](Self::cancel_first)) exits with
    /// 128 + that signal.
    pub fn run(&self, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
        match body() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => self.failed(&e),
        }
    }

    /// Report `e` as the tool's error; the exit code for it (2 for a
    /// [`Usage`](crate::cli::Usage) error, as in [`crate::cli::run`]).
    pub fn failed(&self, e: &anyhow::Error) -> ExitCode {
        report(self.shared.tool, e);
        if self.caught().is_none() && e.is::<crate::cli::Usage>() {
            return ExitCode::from(2);
        }
        self.failure()
    }

    /// The exit code of a failed run: 128 + the signal that stopped it, if any.
    pub fn failure(&self) -> ExitCode {
        match self.caught() {
            Some(sig) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
            None => ExitCode::FAILURE,
        }
    }
}

/// A signal arrived: cancel (the first, if asked to) or clean up and exit.
fn take(s: &Shared, sig: Signal) {
    let first = s
        .caught
        .compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let cancel = s.state().cancel.clone();
    match cancel {
        Some(flag) if first => {
            flag.store(true, Ordering::SeqCst);
            say(format_args!(
                "{}: {sig}: stopping and cleaning up (again to quit at once)",
                s.tool
            ));
        }
        _ => stop(s, sig),
    }
}

/// Remove the unfinished outputs, mark the result file failed, say so in
/// one line and exit with 128 + `sig`.
fn stop(s: &Shared, sig: Signal) -> ! {
    // Held until the process ends: the tool cannot write its own outcome
    // over "failed" any more.
    let st = s.state();
    let mut removed = blockdev::pending::abandon_all();
    removed.extend(
        st.remove
            .iter()
            .filter(|p| std::fs::remove_file(p).is_ok())
            .cloned(),
    );
    let mut line = format!("{}: interrupted by {sig}", s.tool);
    if let Some(left) = &st.left {
        line.push_str(&format!(": {left}"));
    }
    if !removed.is_empty() {
        let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        line.push_str(&format!("; removed the unfinished {}", names.join(", ")));
    }
    if let Some(cfg) = &st.result {
        let left = st
            .left
            .as_deref()
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        match cfg.write_result(&format!("failed:interrupted by {sig}{left}")) {
            Ok(()) => line.push_str("; result file marked failed"),
            Err(e) => line.push_str(&format!(
                "; cannot write the result file: {}",
                blockdev::error::Chain(&e)
            )),
        }
    }
    crate::cli::clear_progress();
    say(format_args!("{line}"));
    std::process::exit(128 + sig as i32)
}
