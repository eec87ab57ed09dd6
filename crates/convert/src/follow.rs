//! Applying a layer while it downloads: the downloader reports each write on a channel
//! per follower ([`Growing`]); an applier reads the file through a [`FollowReader`],
//! which blocks on its channel (or on the conversion stopping) when it has caught up,
//! or waits for the whole download ([`Follow::wait`]).

use crate::abort::Abort;
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use std::fs::File;
use std::io::{self, Read};

/// What the downloader tells the readers following it.
enum Event {
    /// This many bytes are in the file now.
    Written(u64),
    /// The download finished and verified.
    Done,
    /// The download failed; the downloader reports why.
    Failed(String),
}

/// The downloader's side: reports progress of a download into a file to every follower.
/// Clones report to the same followers.
#[derive(Clone)]
pub(crate) struct Growing(Vec<Sender<Event>>);

/// The side a [`FollowReader`] is made from.
pub(crate) struct Follow(Receiver<Event>);

impl Growing {
    /// A download followed by `n` readers.
    pub(crate) fn new(n: usize) -> (Growing, Vec<Follow>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded()).unzip();
        (Growing(tx), rx.into_iter().map(Follow).collect())
    }

    fn send(&self, ev: impl Fn() -> Event) {
        for tx in &self.0 {
            let _ = tx.send(ev());
        }
    }

    /// `written` bytes are in the file.
    pub(crate) fn advance(&self, written: u64) {
        self.send(|| Event::Written(written));
    }

    /// The download ended: `Ok` once verified, `Err(why)` if it failed.
    pub(crate) fn finish(&self, r: Result<(), String>) {
        self.send(|| match &r {
            Ok(()) => Event::Done,
            Err(why) => Event::Failed(why.clone()),
        });
    }
}

impl Follow {
    /// A reader of `file` (opened on the downloaded path) that follows the download.
    pub(crate) fn reader(self, file: File, abort: Abort) -> FollowReader {
        FollowReader {
            file,
            pos: 0,
            written: 0,
            end: None,
            events: self.0,
            abort,
        }
    }

    /// Waits until the download has finished and verified; fails if it failed or the
    /// conversion stops.
    pub(crate) fn wait(self, abort: &Abort) -> io::Result<()> {
        let interrupted = || io::Error::new(io::ErrorKind::Interrupted, "interrupted");
        loop {
            if abort.is_set() {
                return Err(interrupted());
            }
            select! {
                recv(self.0) -> ev => match ev {
                    Ok(Event::Written(_)) => {}
                    Ok(Event::Done) => return Ok(()),
                    Ok(Event::Failed(why)) => return Err(io::Error::other(why)),
                    Err(_) => return Err(io::Error::other("the download stopped")),
                },
                recv(abort.stopped()) -> _ => return Err(interrupted()),
            }
        }
    }
}

/// Reads a file while another thread downloads into it: waits for more bytes, ends
/// only once the download finished and verified, fails if it failed.
pub(crate) struct FollowReader {
    file: File,
    pos: u64,
    /// Bytes the downloader has written so far.
    written: u64,
    /// How the download ended, once it has.
    end: Option<Result<(), String>>,
    events: Receiver<Event>,
    abort: Abort,
}

impl FollowReader {
    fn take(&mut self, ev: Result<Event, crossbeam_channel::RecvError>) {
        match ev {
            Ok(Event::Written(n)) => self.written = self.written.max(n),
            Ok(Event::Done) => self.end = Some(Ok(())),
            Ok(Event::Failed(why)) => self.end = Some(Err(why)),
            Err(_) => {
                self.end
                    .get_or_insert_with(|| Err("the download stopped".into()));
            }
        }
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.written <= self.pos {
            match &self.end {
                Some(Ok(())) => return Ok(0),
                Some(Err(why)) => return Err(io::Error::other(why.clone())),
                None => {}
            }
            if self.abort.is_set() {
                return Err(crate::abort::stopped_read());
            }
            select! {
                recv(self.events) -> ev => self.take(ev),
                recv(self.abort.stopped()) -> _ => return Err(crate::abort::stopped_read()),
            }
        }
        let k = (buf.len() as u64).min(self.written - self.pos) as usize;
        let n = self.file.read(&mut buf[..k])?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn follow_reader_waits_for_the_download() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let mut w = File::create(&p).unwrap();
        let (g, mut follow) = Growing::new(2);
        let waiter = follow.pop().unwrap();
        let mut r = follow
            .pop()
            .unwrap()
            .reader(File::open(&p).unwrap(), Abort::new());
        let writer = std::thread::spawn(move || {
            for i in 0..5u8 {
                std::thread::sleep(Duration::from_millis(20));
                w.write_all(&[i; 1000]).unwrap();
                g.advance((i as u64 + 1) * 1000);
            }
            g.finish(Err("digest mismatch".into()));
        });
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        writer.join().unwrap();
        assert_eq!(
            out.len(),
            5000,
            "everything written was read before the error"
        );
        assert!(e.to_string().contains("digest mismatch"));
        // The other follower saw the same end.
        let e = waiter.wait(&Abort::new()).unwrap_err();
        assert!(e.to_string().contains("digest mismatch"));
    }

    #[test]
    fn a_waiter_returns_once_the_download_is_done() {
        let (g, mut follow) = Growing::new(1);
        let w = follow.pop().unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(move || w.wait(&Abort::new()));
            g.advance(10);
            g.finish(Ok(()));
            h.join().unwrap().unwrap();
        });
        let (_g, mut follow) = Growing::new(1);
        let abort = Abort::new();
        abort.set();
        let e = follow.pop().unwrap().wait(&abort).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn a_waiting_follower_wakes_up_when_the_conversion_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        File::create(&p).unwrap();
        let (_g, mut follow) = Growing::new(1);
        let abort = Abort::new();
        let mut r = follow
            .pop()
            .unwrap()
            .reader(File::open(&p).unwrap(), abort.clone());
        std::thread::scope(|s| {
            let reader = s.spawn(move || r.read(&mut [0u8; 10]));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "nothing was written yet");
            abort.set();
            let e = reader.join().unwrap().unwrap_err();
            assert!(crate::Error::Stream(e).is_interrupted());
        });
    }

    /// A reader that retries `Interrupted` reads (`read_to_end`, the TurboOCI
    /// layer reader) ends once the conversion stops: the follower's reads failed
    /// as `Interrupted` for ever, and a TurboOCI conversion whose download failed
    /// spun without end.
    #[test]
    fn a_stopped_follower_ends_readers_that_retry() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        File::create(&p).unwrap();
        let (_g, mut follow) = Growing::new(1);
        let abort = Abort::new();
        abort.set();
        let mut r = follow.pop().unwrap().reader(File::open(&p).unwrap(), abort);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(r.read_to_end(&mut Vec::new()));
        });
        let e = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the read did not end")
            .unwrap_err();
        assert!(crate::Error::Stream(e).is_interrupted());
    }
}
