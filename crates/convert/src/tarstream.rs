//! A source layer as its uncompressed tar stream: the blob (gzip, zstd or plain, sniffed)
//! is decompressed on its own thread straight into 1 MiB chunks that the consumer reads
//! from a channel (and hands back for reuse), so decompression and apply run on two
//! cores with one copy of the tar bytes between them. With `--reserve` the tar is
//! also written to a file on the way.

use crate::format::LayerInput;
use crate::{Abort, Error, ErrorKind, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use obdoci::digest::VerifyReader;
use obdoci::stream::CHUNK;
use obdoci::{decompress, Digest};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Chunks in flight between the decompression thread and the consumer.
const IN_FLIGHT: usize = 16;

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
    let check = input.take_diff_id().map(|d| {
        (
            d,
            format!(
                "uncompressed layer {} (its rootfs.diff_ids entry in the config)",
                input.layer.digest
            ),
        )
    });
    let blob = input.stream()?;
    let tee = match tee {
        Some(p) => Some((
            File::create(p).map_err(|e| Error::io(p, e))?,
            p.to_path_buf(),
        )),
        None => None,
    };
    let (tx, rx) = bounded::<io::Result<Vec<u8>>>(IN_FLIGHT);
    // Read chunks go back to the decompression thread to be filled again: no fresh
    // 1 MiB allocation (and its page faults) per chunk.
    let (free_tx, free_rx) = bounded::<Vec<u8>>(IN_FLIGHT + 2);
    let abort = input.abort().clone();
    std::thread::scope(|s| {
        s.spawn(move || decompress_into(blob, check, tee, tx, free_rx, &abort));
        let consumed = Arc::new(AtomicU64::new(0));
        let mut reader = ChannelReader::new(rx, Some(free_tx), consumed.clone());
        let res = consume(&mut reader);
        let drained = io::copy(&mut reader, &mut io::sink());
        let out = res?;
        drained.map_err(|e| Error::io(what, e))?;
        Ok((out, consumed.load(Ordering::Relaxed)))
    })
}

/// Decompress `input` straight into chunks of [`CHUNK`] bytes (the last one shorter)
/// sent on `tx` (and written to `tee` with `--reserve`), reusing the buffers that come
/// back on `free`.
fn decompress_into(
    input: Box<dyn Read + Send>,
    check: Option<(Digest, String)>,
    mut tee: Option<(File, PathBuf)>,
    tx: Sender<io::Result<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
    abort: &Abort,
) {
    let (dec, kind) = match decompress::decoder(input) {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    // With a diff_id to match, the end of the stream fails on a mismatch.
    let mut dec: Box<dyn Read> = match check {
        Some((d, what)) => Box::new(VerifyReader::digest_only(dec, d, what)),
        None => dec,
    };
    tracing::debug!("layer is {kind}");
    let e = loop {
        let mut chunk = free.try_recv().unwrap_or_default();
        // A recycled buffer is full length already; only a new one is zero-filled.
        chunk.resize(CHUNK, 0);
        let mut filled = 0;
        let mut failed = None;
        while filled < CHUNK {
            // Asked before every read: an aborted source fails its reads as
            // `Interrupted`, which is otherwise retried.
            if abort.is_set() {
                failed = Some(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
                break;
            }
            match dec.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        chunk.truncate(filled);
        if let Some((f, p)) = &mut tee {
            if let Err(e) = f.write_all(&chunk) {
                break io::Error::new(e.kind(), obdoci::Error::io(&*p, e));
            }
        }
        if filled > 0 && tx.send(Ok(chunk)).is_err() {
            // The consumer stopped reading: it reports why.
            return;
        }
        if let Some(e) = failed {
            break e;
        }
        if filled < CHUNK {
            return;
        }
    };
    let _ = tx.send(Err(e));
}

/// Reads the chunks a decompression thread sends.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    /// Where read chunks go back for reuse.
    free: Option<Sender<Vec<u8>>>,
    cur: Vec<u8>,
    off: usize,
    eof: bool,
    /// How the stream failed, once it has (its error's kind and text): every
    /// later read fails too.
    failed: Option<(io::ErrorKind, String)>,
    /// Bytes handed out so far.
    consumed: Arc<AtomicU64>,
}

impl ChannelReader {
    /// A reader of the chunks `rx` brings, handing each back to `free` once read
    /// (if given) and counting the bytes handed out in `consumed`.
    fn new(
        rx: Receiver<io::Result<Vec<u8>>>,
        free: Option<Sender<Vec<u8>>>,
        consumed: Arc<AtomicU64>,
    ) -> ChannelReader {
        ChannelReader {
            rx,
            free,
            cur: Vec::new(),
            off: 0,
            eof: false,
            failed: None,
            consumed,
        }
    }

    /// The error of a read after the stream failed. A failed stream never reads as
    /// one that ended: a caller that retries an `Interrupted` read (the tar reader,
    /// `read_to_end`, `io::copy`: what an aborted source fails with) would take the
    /// end for the layer's end, and a layer cut by Ctrl-C or by a failed download
    /// for a complete (or, at its first byte, an empty) one. An interruption is
    /// repeated as an error that is not retried but still says "interrupted".
    fn failed_again(&self) -> Option<io::Error> {
        let (kind, msg) = self.failed.as_ref()?;
        Some(if *kind == io::ErrorKind::Interrupted {
            crate::abort::stopped_read()
        } else {
            io::Error::new(*kind, msg.clone())
        })
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.off >= self.cur.len() {
            if let Some(e) = self.failed_again() {
                return Err(e);
            }
            if self.eof {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    let done = std::mem::replace(&mut self.cur, v);
                    if done.capacity() > 0 {
                        if let Some(f) = &self.free {
                            let _ = f.try_send(done);
                        }
                    }
                    self.off = 0;
                }
                Ok(Err(e)) => {
                    // An interruption (whatever its io kind) is repeated as one.
                    let kind = match crate::io_kind(&e) {
                        ErrorKind::Interrupted => io::ErrorKind::Interrupted,
                        _ => e.kind(),
                    };
                    self.failed = Some((kind, e.to_string()));
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
        let mut r = ChannelReader::new(rx, None, Arc::new(AtomicU64::new(0)));
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(out, b"abc");
        assert!(e.to_string().contains("boom"));
    }

    /// A stream that failed as `Interrupted` (an aborted download) is not taken
    /// for one that ended by callers that retry such reads: the tar reader applied
    /// it as an empty layer, saying so ("the layer tar is empty"), when a download
    /// failed or Ctrl-C came before its first byte.
    #[test]
    fn an_interrupted_stream_never_reads_as_ended() {
        // `head`, then the failure an aborted source sends.
        let failing = |head: &[u8]| {
            let (tx, rx) = bounded(4);
            if !head.is_empty() {
                tx.send(Ok(head.to_vec())).unwrap();
            }
            tx.send(Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "interrupted",
            )))
            .unwrap();
            ChannelReader::new(rx, None, Arc::new(AtomicU64::new(0)))
        };
        for head in [&b""[..], b"abc"] {
            let mut r = failing(head);
            let mut out = Vec::new();
            let e = r.read_to_end(&mut out).unwrap_err();
            assert_eq!(out, head);
            // Still an interruption to the conversion, not a failure of its own.
            assert!(crate::Error::Stream(e).is_interrupted());
            let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
            assert!(crate::Error::Stream(e).is_interrupted());
        }
        // The tar reader retries `Interrupted` reads: the layer fails, it is not empty.
        let mut r = failing(b"");
        let e = obdfs::tar::TarReader::new(&mut r).next_entry().unwrap_err();
        assert!(crate::Error::Fs(e).is_interrupted());
    }

    /// Runs [`decompress_into`] on `blob` and reads its output back through a
    /// [`ChannelReader`] that recycles the chunks, as [`with_tar`] does.
    fn round_trip(blob: Vec<u8>) -> io::Result<Vec<u8>> {
        round_trip_checked(blob, None)
    }

    /// [`round_trip`], the output checked against `diff_id` when given.
    fn round_trip_checked(blob: Vec<u8>, diff_id: Option<Digest>) -> io::Result<Vec<u8>> {
        let (tx, rx) = bounded(IN_FLIGHT);
        let (free_tx, free_rx) = bounded(IN_FLIGHT + 2);
        let abort = Abort::default();
        let check = diff_id.map(|d| (d, "the layer".to_string()));
        std::thread::scope(|s| {
            s.spawn(|| {
                decompress_into(
                    Box::new(io::Cursor::new(blob)),
                    check,
                    None,
                    tx,
                    free_rx,
                    &abort,
                )
            });
            let mut r = ChannelReader::new(rx, Some(free_tx), Arc::new(AtomicU64::new(0)));
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            assert_eq!(r.consumed.load(Ordering::Relaxed), out.len() as u64);
            Ok(out)
        })
    }

    #[test]
    fn recycled_chunks_carry_every_byte() {
        use std::io::Write;
        // Exactly two chunks, a bit more, and less than one: the chunk boundary and a
        // short last chunk.
        for len in [2 * CHUNK, 2 * CHUNK + 5, CHUNK / 3, 0] {
            let data: Vec<u8> = (0..len as u64)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&data).unwrap();
            let out = round_trip(gz.finish().unwrap()).unwrap();
            assert!(out == data, "{len} bytes: output differs");
        }
        // A truncated gzip stream is an error after the bytes before it.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![7u8; 3 * CHUNK]).unwrap();
        let mut g = gz.finish().unwrap();
        g.truncate(g.len() - 12);
        assert!(round_trip(g).is_err());
    }

    #[test]
    fn the_uncompressed_stream_is_checked_against_its_diff_id() {
        use std::io::Write;
        let data = vec![3u8; CHUNK + 17];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let blob = gz.finish().unwrap();
        let out = round_trip_checked(blob.clone(), Some(Digest::of(&data))).unwrap();
        assert!(out == data);
        let e = round_trip_checked(blob, Some(Digest::of(b"other"))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string().contains("the layer") && e.to_string().contains("mismatch"),
            "{e}"
        );
    }

    #[test]
    fn an_abort_stops_a_source_that_fails_as_interrupted() {
        use std::io::Write;
        // A gzip stream's first bytes, then reads that fail as `Interrupted` (what an
        // aborted download does): the conversion stops instead of retrying forever.
        struct Aborted(io::Cursor<Vec<u8>>);
        impl Read for Aborted {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.read(buf)? {
                    0 => Err(io::Error::new(io::ErrorKind::Interrupted, "aborted")),
                    n => Ok(n),
                }
            }
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![1u8; 4 * CHUNK]).unwrap();
        let head = gz.finish().unwrap()[..64].to_vec();
        let abort = Abort::default();
        abort.set();
        let (tx, rx) = bounded(IN_FLIGHT);
        let (_free_tx, free_rx) = bounded(1);
        decompress_into(
            Box::new(Aborted(io::Cursor::new(head))),
            None,
            None,
            tx,
            free_rx,
            &abort,
        );
        let e = rx.iter().find_map(|r| r.err()).expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
    }
}
