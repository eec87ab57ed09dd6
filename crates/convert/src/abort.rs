//! Stopping a conversion, and the waits that must end when it stops.
//!
//! [`Abort`] is set by Ctrl-C or by the first failing part of a conversion. Threads that
//! block (for a manifest slot in `Semaphore`, for more bytes of a download in the
//! `follow` module) wait on channels that [`Abort::set`] disconnects, so they
//! wake up at once instead of polling the flag on a timer.

use crossbeam_channel::{bounded, select, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The error of a read once the conversion stops. Not `Interrupted`: readers retry
/// such reads (std's `read_to_end` and `io::copy`, the tar reader, the TurboOCI
/// reader, which inflates and indexes the blob), and one that did spun at full speed
/// for ever once a download failed or Ctrl-C came, the run never ending. It is still
/// an interruption to the conversion (its kind is looked for inside).
pub(crate) fn stopped_read() -> std::io::Error {
    std::io::Error::other(obdregistry::Error::Interrupted)
}

/// The stop signal of a conversion; clones share it.
#[derive(Clone, Debug)]
pub struct Abort {
    flag: Arc<AtomicBool>,
    /// Dropped by [`Abort::set`], which disconnects `stopped`.
    keep_open: Arc<Mutex<Option<Sender<()>>>>,
    stopped: Receiver<()>,
}

impl Default for Abort {
    fn default() -> Self {
        Abort::new()
    }
}

impl Abort {
    pub fn new() -> Abort {
        let (tx, rx) = bounded(0);
        Abort {
            flag: Arc::new(AtomicBool::new(false)),
            keep_open: Arc::new(Mutex::new(Some(tx))),
            stopped: rx,
        }
    }

    /// Stop: every wait on [`Abort::stopped`] ends now, and [`Abort::is_set`] is true.
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.keep_open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The flag alone, for code that only checks it between steps (the registry
    /// client's `cancel`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// A channel that never delivers and is disconnected once the conversion stops:
    /// `select!` on it next to what a thread waits for.
    pub fn stopped(&self) -> &Receiver<()> {
        &self.stopped
    }
}

/// A counting semaphore (`n` permits; 0 = unlimited) whose waiters give up when the
/// conversion stops.
pub(crate) struct Semaphore {
    /// Holds one message per free permit; `None` when unlimited.
    permits: Option<(Sender<()>, Receiver<()>)>,
}

/// A permit of a [`Semaphore`]; dropping it frees it.
pub(crate) struct Permit<'a>(&'a Sender<()>);

impl Semaphore {
    pub(crate) fn new(n: usize) -> Semaphore {
        if n == 0 {
            return Semaphore { permits: None };
        }
        let (tx, rx) = bounded(n);
        for _ in 0..n {
            tx.send(()).expect("the semaphore holds both ends");
        }
        Semaphore {
            permits: Some((tx, rx)),
        }
    }

    /// Waits for a permit (`None` when unlimited); `Interrupted` once `abort` is set.
    pub(crate) fn acquire(&self, abort: &Abort) -> crate::Result<Option<Permit<'_>>> {
        let Some((tx, rx)) = &self.permits else {
            return Ok(None);
        };
        if abort.is_set() {
            return Err(crate::Error::Interrupted);
        }
        select! {
            recv(rx) -> p => {
                p.expect("the semaphore holds both ends");
                let permit = Permit(tx);
                if abort.is_set() {
                    return Err(crate::Error::Interrupted);
                }
                Ok(Some(permit))
            }
            recv(abort.stopped()) -> _ => Err(crate::Error::Interrupted),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // Never blocks: the channel has room for every permit.
        let _ = self.0.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn semaphore_bounds_concurrency_and_gives_up_on_abort() {
        let sem = Semaphore::new(2);
        let abort = Abort::new();
        let (now, max) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    let _p = sem.acquire(&abort).unwrap();
                    let k = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(k, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    now.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        assert_eq!(max.load(Ordering::SeqCst), 2);
        let held = sem.acquire(&abort).unwrap();
        let _held2 = sem.acquire(&abort).unwrap();
        // A waiter blocked for a permit wakes up when the conversion stops.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| sem.acquire(&abort).map(|p| p.is_some()));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "no permit is free");
            abort.set();
            assert!(matches!(
                waiter.join().unwrap(),
                Err(crate::Error::Interrupted)
            ));
        });
        assert!(matches!(
            sem.acquire(&abort),
            Err(crate::Error::Interrupted)
        ));
        drop(held);
        // 0 means unlimited.
        assert!(Semaphore::new(0).acquire(&abort).unwrap().is_none());
    }

    #[test]
    fn abort_is_shared_by_clones() {
        let a = Abort::new();
        let b = a.clone();
        assert!(!b.is_set());
        a.set();
        assert!(b.is_set() && b.flag().load(Ordering::SeqCst));
        assert!(b.stopped().recv().is_err(), "disconnected, not blocking");
    }
}
