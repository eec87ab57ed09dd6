//! Tar skeletons: a layer tar without the bytes a reference-mode apply never
//! reads, so that it can be inflated (and indexed) well ahead of its apply
//! while holding little memory.
//!
//! A TurboOCI apply maps regular files' data into the tar instead of reading
//! it; it needs every header (and extension record) and the *positions* of
//! the data. [`record`] reads a tar and hands it on in [`Piece`]s: the
//! stream's bytes, except that the stored data and padding of each regular,
//! non-sparse member become a *hole* (a length). [`SkeletonReader`] gives
//! the stream back with zeros in the holes: the same length, every header
//! and extension record at its offset, so a [`TarReader`] over it sees the
//! same entries at the same offsets.
//!
//! The members are found by the same [`TarReader`] the apply uses. Where it
//! stops (the end of the archive, or a malformed header) the rest of the
//! stream is passed on verbatim, so the apply then meets exactly what it
//! would have met in the original (the same error at the same offset).

use std::io::Read;
use std::sync::mpsc::Receiver;

use crate::error::Result;
use crate::tar::{Kind, TarReader, BLOCK};

/// Literal bytes per piece at most (headers: about 500 entries).
pub const PIECE_BYTES: usize = 256 << 10;
/// Tar bytes (literal and holes) per piece at most, so the apply of a
/// layer being read gets pieces regularly.
pub const PIECE_SPAN: u64 = 32 << 20;

/// A stretch of the skeleton: `bytes`, with `holes[k].1` zero bytes
/// inserted before `bytes[holes[k].0]` (offsets ascending; equal offsets
/// are not produced).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Piece {
    pub bytes: Vec<u8>,
    pub holes: Vec<(usize, u64)>,
}

impl Piece {
    /// Tar bytes the piece stands for.
    pub fn span(&self) -> u64 {
        self.bytes.len() as u64 + self.holes.iter().map(|h| h.1).sum::<u64>()
    }
}

/// Why [`record`] stopped before the end of the stream.
#[derive(Debug)]
pub enum Halt {
    /// The sink refused a piece (its reader is gone).
    Sink,
    /// Reading the stream failed.
    Source(crate::Error),
}

/// Reads the tar with `read` (0: its end) to its end and sends it as
/// pieces to `send` (false: stop). Returns the stream's length.
pub fn record(
    read: impl FnMut(&mut [u8]) -> Result<usize>,
    send: impl FnMut(Piece) -> bool,
) -> std::result::Result<u64, Halt> {
    let mut rec = Recorder {
        read,
        send,
        piece: Piece::default(),
        span: 0,
        hole: 0,
        total: 0,
        halt: None,
    };
    {
        // The rest is read below, whatever its length.
        let mut tar = TarReader::new(&mut rec).drain_limit(0);
        loop {
            match tar.next_entry() {
                Ok(Some(e)) if e.kind == Kind::File && e.sparse.is_none() => {
                    let stored = tar.remaining();
                    let padding = (BLOCK as u64 - stored % BLOCK as u64) % BLOCK as u64;
                    // `TarReader` skips exactly these bytes first when asked for the next entry.
                    tar.get_mut().hole = stored + padding;
                }
                Ok(Some(_)) => {}
                // The end, or a header the apply will refuse too: the rest as it is.
                Ok(None) | Err(_) => break,
            }
        }
    }
    if let Some(h) = rec.halt.take() {
        return Err(h);
    }
    rec.hole = 0;
    let mut sink = vec![0u8; 64 << 10];
    loop {
        match rec.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Err(rec.halt.take().unwrap_or(Halt::Sink)),
        }
    }
    rec.flush()?;
    Ok(rec.total)
}

/// The [`Read`] under [`record`]'s tar reader: passes the stream on,
/// recording what it hands out.
struct Recorder<F, S> {
    read: F,
    send: S,
    piece: Piece,
    /// Tar bytes in `piece`.
    span: u64,
    /// Bytes still to hand out as a hole.
    hole: u64,
    total: u64,
    halt: Option<Halt>,
}

impl<F, S> Recorder<F, S>
where
    F: FnMut(&mut [u8]) -> Result<usize>,
    S: FnMut(Piece) -> bool,
{
    fn flush(&mut self) -> std::result::Result<(), Halt> {
        if self.span == 0 {
            return Ok(());
        }
        self.span = 0;
        if (self.send)(std::mem::take(&mut self.piece)) {
            Ok(())
        } else {
            Err(Halt::Sink)
        }
    }
}

impl<F, S> Read for Recorder<F, S>
where
    F: FnMut(&mut [u8]) -> Result<usize>,
    S: FnMut(Piece) -> bool,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.halt.is_some() {
            return Err(std::io::Error::other("the tar stream stopped"));
        }
        let n = match (self.read)(buf) {
            Ok(n) => n,
            Err(e) => {
                self.halt = Some(Halt::Source(e));
                return Err(std::io::Error::other("the tar stream cannot be read"));
            }
        };
        let zeros = self.hole.min(n as u64);
        if zeros > 0 {
            self.hole -= zeros;
            let at = self.piece.bytes.len();
            match self.piece.holes.last_mut() {
                Some(h) if h.0 == at => h.1 += zeros,
                _ => self.piece.holes.push((at, zeros)),
            }
        }
        self.piece.bytes.extend_from_slice(&buf[zeros as usize..n]);
        self.span += n as u64;
        self.total += n as u64;
        if self.piece.bytes.len() >= PIECE_BYTES || self.span >= PIECE_SPAN {
            if let Err(h) = self.flush() {
                self.halt = Some(h);
                return Err(std::io::Error::other("the tar stream stopped"));
            }
        }
        Ok(n)
    }
}

/// The tar back from a skeleton's pieces, zeros in the holes: pieces (or
/// an error, which the read returns) from `rx`; its end when the sender
/// is gone.
pub struct SkeletonReader {
    rx: Receiver<std::io::Result<Piece>>,
    cur: Piece,
    /// Next byte of `cur.bytes`, next hole of `cur.holes`, zeros left of
    /// the hole being handed out.
    byte: usize,
    next_hole: usize,
    zeros: u64,
}

impl SkeletonReader {
    pub fn new(rx: Receiver<std::io::Result<Piece>>) -> Self {
        SkeletonReader {
            rx,
            cur: Piece::default(),
            byte: 0,
            next_hole: 0,
            zeros: 0,
        }
    }
}

impl Read for SkeletonReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.zeros > 0 {
                let k = (buf.len() as u64).min(self.zeros) as usize;
                buf[..k].fill(0);
                self.zeros -= k as u64;
                return Ok(k);
            }
            let cut = self
                .cur
                .holes
                .get(self.next_hole)
                .map_or(self.cur.bytes.len(), |h| h.0);
            if self.byte < cut {
                let k = buf.len().min(cut - self.byte);
                buf[..k].copy_from_slice(&self.cur.bytes[self.byte..self.byte + k]);
                self.byte += k;
                return Ok(k);
            }
            if let Some(h) = self.cur.holes.get(self.next_hole) {
                self.zeros = h.1;
                self.next_hole += 1;
                continue;
            }
            match self.rx.recv() {
                Ok(Ok(p)) => {
                    (self.cur, self.byte, self.next_hole) = (p, 0, 0);
                }
                Ok(Err(e)) => return Err(e),
                // The sender is gone after the last piece.
                Err(_) => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, usize)], with_pax: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (k, (name, size)) in entries.iter().enumerate() {
            let data: Vec<u8> = (0..*size).map(|i| (i * 7 + k) as u8 | 1).collect();
            let mut h = tar::Header::new_gnu();
            h.set_size(*size as u64);
            h.set_mode(0o644);
            if with_pax && k % 2 == 1 {
                b.append_pax_extensions([("user.comment", b"x".as_slice())])
                    .unwrap();
            }
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", "target/of/link").unwrap();
        b.into_inner().unwrap()
    }

    /// Skeleton pieces of `tar` read in `step`-byte reads.
    fn skeleton(tar: &[u8], step: usize) -> (Vec<Piece>, u64) {
        let mut pos = 0;
        let mut pieces = Vec::new();
        let n = record(
            |b| {
                let k = b.len().min(step).min(tar.len() - pos);
                b[..k].copy_from_slice(&tar[pos..pos + k]);
                pos += k;
                Ok(k)
            },
            |p| {
                pieces.push(p);
                true
            },
        )
        .unwrap();
        (pieces, n)
    }

    fn rebuild(pieces: Vec<Piece>) -> Vec<u8> {
        let (tx, rx) = std::sync::mpsc::channel();
        for p in pieces {
            tx.send(Ok(p)).unwrap();
        }
        drop(tx);
        let mut out = Vec::new();
        SkeletonReader::new(rx).read_to_end(&mut out).unwrap();
        out
    }

    fn entries(tar: &[u8]) -> Vec<(Vec<u8>, u64, u64, Vec<u8>)> {
        let mut r = TarReader::new(tar);
        let mut v = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            v.push((e.path.clone(), e.offset, r.position(), e.link.clone()));
        }
        v
    }

    #[test]
    fn holes_are_file_data_and_everything_else_stays() {
        let big = (3 << 20) + 12345;
        let names: Vec<(String, usize)> = (0..1500)
            .map(|i| (format!("d/f{i}"), if i == 700 { big } else { i % 1100 }))
            .collect();
        let refs: Vec<(&str, usize)> = names.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let tar = tar_of(&refs, true);
        for step in [1 << 20, 4096, 777] {
            let (pieces, n) = skeleton(&tar, step);
            assert_eq!(n, tar.len() as u64);
            assert!(pieces.len() > 2, "{}", pieces.len());
            let literal: usize = pieces.iter().map(|p| p.bytes.len()).sum();
            assert!(literal < tar.len() / 3, "{literal} of {}", tar.len());
            // A read adds at most 64 KiB (the tar reader's largest) past the limit.
            assert!(pieces
                .iter()
                .all(|p| p.bytes.len() <= PIECE_BYTES + (64 << 10)));
            let back = rebuild(pieces);
            assert_eq!(back.len(), tar.len());
            assert_eq!(entries(&back), entries(&tar));
            // Only file data became zeros.
            let mut r = TarReader::new(&tar[..]);
            let mut data = Vec::new();
            while let Some(e) = r.next_entry().unwrap() {
                if e.kind == Kind::File {
                    let p = r.position() as usize;
                    data.push(p..(p + e.size as usize).next_multiple_of(BLOCK));
                }
            }
            let mut expect = tar.clone();
            for d in data {
                expect[d].fill(0);
            }
            assert!(back == expect);
        }
    }

    #[test]
    fn after_a_bad_header_the_rest_is_verbatim() {
        let mut tar = tar_of(&[("a", 3000), ("b", 100), ("c", 5000)], false);
        // Break b's header checksum: a's data becomes a hole, the rest stays.
        let b_at = 512 + 3072;
        tar[b_at + 148] ^= 1;
        let (pieces, n) = skeleton(&tar, 1000);
        assert_eq!(n, tar.len() as u64);
        let back = rebuild(pieces);
        assert_eq!(back[b_at..], tar[b_at..]);
        assert!(back[512..b_at].iter().all(|&x| x == 0));
        let err = |t: &[u8]| {
            let mut r = TarReader::new(t);
            r.next_entry().unwrap();
            r.next_entry().unwrap_err().to_string()
        };
        assert_eq!(err(&back), err(&tar));
    }

    #[test]
    fn truncated_and_failing_streams() {
        let tar = tar_of(&[("a", 3000), ("b", 100)], false);
        // Ends inside a's data: the hole covers what there is.
        let cut = &tar[..2000];
        let (pieces, n) = skeleton(cut, 300);
        assert_eq!(n, 2000);
        assert_eq!(rebuild(pieces).len(), 2000);
        // A read error stops it with that error; a refused piece with Sink.
        let mut calls = 0;
        let r = record(
            |b| {
                calls += 1;
                if calls > 3 {
                    return Err(crate::Error::Invalid("boom".into()));
                }
                b[..512].fill(0);
                Ok(512)
            },
            |_| true,
        );
        assert!(matches!(r, Err(Halt::Source(crate::Error::Invalid(m))) if m == "boom"));
        let mut pos = 0;
        let r = record(
            |b| {
                let k = b.len().min(tar.len() - pos);
                b[..k].copy_from_slice(&tar[pos..pos + k]);
                pos += k;
                Ok(k)
            },
            |_| false,
        );
        assert!(matches!(r, Err(Halt::Sink)));
    }
}
