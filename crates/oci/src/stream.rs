//! The one chunked copy loop of the image tools: blob downloads, hashing, layout writes
//! and layer decompression all move bytes through [`copy`].

use std::io::{self, Read, Write};

/// Bytes read per call: large enough that per-read costs vanish, small enough for
/// timely progress and prompt stops.
pub const CHUNK: usize = 1 << 20;

/// Why [`copy`] did not finish.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed.
    Read(io::Error),
    /// Writing the destination failed.
    Write(io::Error),
    /// `stop()` asked to give up.
    Stopped,
}

impl CopyError {
    /// As one `io::Error` (a stop is `Interrupted`), for callers that do not care
    /// which side failed.
    pub fn into_io(self) -> io::Error {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
            CopyError::Stopped => io::Error::new(io::ErrorKind::Interrupted, "interrupted"),
        }
    }
}

/// Copies `r` into `w` in chunks of up to [`CHUNK`] bytes until `r` ends, and returns the
/// bytes copied. Reads that fail as `Interrupted` are retried; `stop()` is asked before
/// every read, and `progress(copied)` is told after every write.
pub fn copy<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    loop {
        if stop() {
            return Err(CopyError::Stopped);
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
        copied += n as u64;
        progress(copied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Hands out `data` in odd-sized pieces, with an interruption before each.
    struct Choppy<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Choppy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "signal"));
            }
            let n = buf.len().min(self.data.len()).min(777);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn copies_everything_retrying_interruptions() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        let mut last = 0;
        let n = copy(
            &mut Choppy {
                data: &data,
                interrupt: false,
            },
            &mut out,
            &|| false,
            &mut |c| last = c,
        )
        .unwrap();
        assert_eq!((n, last), (10_000, 10_000));
        assert_eq!(out, data);
    }

    #[test]
    fn stops_and_names_the_failing_side() {
        let calls = Cell::new(0);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > 2
        };
        let mut src = io::repeat(7);
        let e = copy(&mut src, &mut io::sink(), &stop, &mut |_| {}).unwrap_err();
        assert!(matches!(e, CopyError::Stopped));
        assert_eq!(e.into_io().kind(), io::ErrorKind::Interrupted);

        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = copy(&mut &b"abc"[..], &mut Broken, &|| false, &mut |_| {}).unwrap_err();
        assert!(matches!(e, CopyError::Write(_)));
        let e = copy(
            &mut io::BufReader::new(Broken2),
            &mut io::sink(),
            &|| false,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, CopyError::Read(_)));

        struct Broken2;
        impl Read for Broken2 {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("bad sector"))
            }
        }
    }
}
