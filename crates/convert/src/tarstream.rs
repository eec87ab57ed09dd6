//! A source layer as its uncompressed tar stream: the blob (gzip, zstd or plain, sniffed)
//! is decompressed on its own thread into 1 MiB chunks that the consumer reads from a
//! channel, so decompression and apply run on two cores. With `--reserve` the tar is
//! also written to a file on the way.

use crate::format::LayerInput;
use crate::{Abort, Error, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use obdoci::decompress;
use obdoci::stream::{copy, CopyError, CHUNK};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Runs `consume` on the uncompressed tar of `input` (decompressed on another thread;
/// copied to `tee` too when given). Afterwards the rest of the stream is read, so the
/// source digest is verified even if the tar ended before its padding. Returns what
/// `consume` returned and the tar bytes it read.
pub fn with_tar<T>(
    mut input: LayerInput<'_>,
    tee: Option<&Path>,
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<(T, u64)> {
    let what = format!("{} layer {}", input.src.name(), input.layer.digest);
    let blob = input.stream()?;
    let tee = match tee {
        Some(p) => Some((
            File::create(p).map_err(|e| Error::io(p, e))?,
            p.to_path_buf(),
        )),
        None => None,
    };
    let (tx, rx) = bounded::<io::Result<Vec<u8>>>(16);
    let abort = input.abort().clone();
    std::thread::scope(|s| {
        s.spawn(move || decompress_into(blob, tee, tx, &abort));
        let consumed = Arc::new(AtomicU64::new(0));
        let mut reader = ChannelReader {
            rx,
            cur: Vec::new(),
            off: 0,
            eof: false,
            consumed: consumed.clone(),
        };
        let res = consume(&mut reader);
        let drained = io::copy(&mut reader, &mut io::sink());
        let out = res?;
        drained.map_err(|e| Error::io(what, e))?;
        Ok((out, consumed.load(Ordering::Relaxed)))
    })
}

/// Decompress `input` into chunks of up to 1 MiB on `tx` (and into `tee` with `--reserve`).
fn decompress_into(
    input: Box<dyn Read + Send>,
    tee: Option<(File, PathBuf)>,
    tx: Sender<io::Result<Vec<u8>>>,
    abort: &Abort,
) {
    let (mut dec, kind) = match decompress::decoder(input) {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    tracing::debug!("layer is {kind}");
    let mut out = ChunkSender {
        tx: &tx,
        chunk: Vec::with_capacity(CHUNK),
        tee: tee.map(|(f, p)| (io::BufWriter::with_capacity(CHUNK, f), p)),
        closed: false,
    };
    let res = copy(&mut dec, &mut out, &|| abort.is_set(), &mut |_| {})
        .and_then(|_| out.flush().map_err(CopyError::Write));
    let e = match res {
        Ok(()) => return,
        // The consumer stopped reading: it reports why.
        Err(CopyError::Write(_)) if out.closed => return,
        Err(CopyError::Read(e)) | Err(CopyError::Write(e)) => e,
        Err(CopyError::Stopped) => io::Error::new(io::ErrorKind::Interrupted, "interrupted"),
    };
    let _ = tx.send(Err(e));
}

/// Collects decompressed bytes into chunks for the consumer's channel, copying them into
/// the `--reserve` tee file on the way.
struct ChunkSender<'a> {
    tx: &'a Sender<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    tee: Option<(io::BufWriter<File>, PathBuf)>,
    /// The receiving side is gone.
    closed: bool,
}

impl ChunkSender<'_> {
    fn send_chunk(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        if self.tx.send(Ok(full)).is_err() {
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the layer's applier stopped reading",
            ));
        }
        Ok(())
    }

    fn tee(
        &mut self,
        op: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
    ) -> io::Result<()> {
        match &mut self.tee {
            Some((w, p)) => op(w).map_err(|e| io::Error::new(e.kind(), obdoci::Error::io(&*p, e))),
            None => Ok(()),
        }
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tee(|w| w.write_all(buf))?;
        self.chunk.extend_from_slice(buf);
        if self.chunk.len() >= CHUNK {
            self.send_chunk()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tee(|w| w.flush())?;
        if !self.chunk.is_empty() {
            self.send_chunk()?;
        }
        Ok(())
    }
}

/// Reads the chunks a decompression thread sends.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    off: usize,
    eof: bool,
    /// Bytes handed out so far.
    consumed: Arc<AtomicU64>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.off >= self.cur.len() {
            if self.eof {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.off = 0;
                }
                Ok(Err(e)) => {
                    self.eof = true;
                    return Err(e);
                }
                Err(_) => {
                    self.eof = true;
                    return Ok(0);
                }
            }
        }
        let k = buf.len().min(self.cur.len() - self.off);
        buf[..k].copy_from_slice(&self.cur[self.off..self.off + k]);
        self.off += k;
        self.consumed.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_passes_errors() {
        let (tx, rx) = bounded(4);
        tx.send(Ok(b"abc".to_vec())).unwrap();
        tx.send(Err(io::Error::other("boom"))).unwrap();
        let mut r = ChannelReader {
            rx,
            cur: vec![],
            off: 0,
            eof: false,
            consumed: Arc::new(AtomicU64::new(0)),
        };
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, b"abc");
        assert!(e.to_string().contains("boom"));
    }
}
