//! Packed data of a sparse writable layer: what the data file of a sparse
//! layer (`overlaybd-create -s`) holds, kept as the ZFile blocks its commit
//! will store, for a layer that this process writes, reads and commits
//! itself (the convertor's scratch layers).
//!
//! A sparse data file is `header (4 KiB) | data at 4096 + logical offset`,
//! and its commit with `-z` stores the layer's data as ZFile blocks. With
//! 4 KiB ZFile blocks every 4 KiB data block of the file becomes exactly one
//! ZFile block (the sealed blob's data starts after its 4 KiB header and
//! every sparse mapping is whole 4 KiB blocks), so the block can be
//! compressed as soon as it is written: the commit then copies the stored
//! bytes instead of reading raw data back and compressing it, and the raw
//! data never goes through the page cache.
//!
//! Layout of the side file (scratch: only this process reads it): stored
//! blocks (compressed bytes, then a CRC32C when verified: see
//! [`crate::compress`]) appended in the order their compression finished,
//! jobs of up to 1 MiB of source contiguous. In memory: the emulated data
//! file's header and, per run of logical blocks stored together, the side
//! file position of its first block and the stored length of each.
//! Rewritten blocks are stored again and the old bytes left unused;
//! punched blocks are forgotten. Allocated ranges are the stored blocks, as
//! `SEEK_DATA` reports the written 4 KiB blocks of a sparse file on ext4.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use parking_lot::Mutex;

use super::format::HT_SPACE;
use crate::compress::{BlockEngine, JOB_BYTES};
use crate::error::{Error, Result};
use crate::io::IoFile;
use crate::zfile::{decode_stored, Algorithm};

/// Bytes per block: the ZFile block size this store produces.
pub const BLOCK: u64 = 4096;
const HT: u64 = HT_SPACE as u64;

/// The stored blocks of one run of logical blocks.
#[derive(Debug, Clone)]
struct Run {
    /// Side file position of the first block's stored bytes.
    pos: u64,
    /// Stored length of each block.
    lens: Vec<u32>,
}

impl Run {
    fn blocks(&self) -> u64 {
        self.lens.len() as u64
    }
    /// Side file position of block `k` of the run.
    fn pos_of(&self, k: usize) -> u64 {
        self.pos + self.lens[..k].iter().map(|&l| l as u64).sum::<u64>()
    }
}

struct Map {
    header: Vec<u8>,
    /// Runs keyed by their first logical block (block 0 = file offset 4096).
    runs: BTreeMap<u64, Run>,
    /// Submitted jobs not stored yet, in order: (first block, blocks).
    inflight: VecDeque<(u64, u64)>,
    /// Append position of the side file.
    end: u64,
}

impl Map {
    /// Forget blocks `a..b`, splitting the runs they are part of.
    fn remove(&mut self, a: u64, b: u64) {
        let hit: Vec<u64> = self
            .runs
            .range(..b)
            .rev()
            .take_while(|(s, r)| **s + r.blocks() > a)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let r = self.runs.remove(&s).expect("key just listed");
            let e = s + r.blocks();
            if s < a {
                let k = (a - s) as usize;
                let left = Run {
                    pos: r.pos,
                    lens: r.lens[..k].to_vec(),
                };
                self.runs.insert(s, left);
            }
            if e > b {
                let k = (b - s) as usize;
                let right = Run {
                    pos: r.pos_of(k),
                    lens: r.lens[k..].to_vec(),
                };
                self.runs.insert(b, right);
            }
        }
    }

    /// The stored bytes of block `blk`: (side file position, length).
    fn lookup(&self, blk: u64) -> Option<(u64, u32)> {
        let (s, r) = self.runs.range(..=blk).next_back()?;
        let k = blk.checked_sub(*s)?;
        (k < r.blocks()).then(|| (r.pos_of(k as usize), r.lens[k as usize]))
    }

    fn overlaps_inflight(&self, a: u64, b: u64) -> bool {
        self.inflight.iter().any(|&(s, n)| s < b && s + n > a)
    }
}

struct Inner {
    engine: BlockEngine,
    /// The engine's buffer for the next job.
    buf: Vec<u8>,
    map: Map,
}

/// The packed data of a sparse writable layer (see the module
/// documentation). Offsets are those of the data file it stands for.
pub struct PackedStore {
    file: IoFile,
    algorithm: Algorithm,
    verify: bool,
    inner: Mutex<Inner>,
    /// Length of the emulated data file (header + virtual size).
    len: Mutex<u64>,
}

/// Two stores are the same store: one object, shared.
impl PartialEq for PackedStore {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for PackedStore {}

impl std::fmt::Debug for PackedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedStore")
            .field("file", &self.file.path())
            .finish()
    }
}

/// Stores the finished jobs `data`/`lens` (the oldest in flight) at the end
/// of the side file.
fn store(file: &IoFile, map: &mut Map, data: &[u8], lens: &[u32]) -> Result<()> {
    let (first, n) = map
        .inflight
        .pop_front()
        .ok_or_else(|| Error::Invalid("packed layer: a job finished that was never sent".into()))?;
    if n != lens.len() as u64 {
        return Err(Error::Invalid(format!(
            "packed layer: a job of {n} blocks came back with {}",
            lens.len()
        )));
    }
    file.write_all_at(data, map.end)?;
    map.remove(first, first + n);
    map.runs.insert(
        first,
        Run {
            pos: map.end,
            lens: lens.to_vec(),
        },
    );
    map.end += data.len() as u64;
    Ok(())
}

impl PackedStore {
    /// A new store in the new file `path`, standing for a data file of `len`
    /// bytes that starts with `header`; blocks are stored as ZFile blocks of
    /// 4 KiB with `algorithm` (and CRCs with `verify`), compressed on
    /// `threads` threads.
    pub fn create(
        path: &Path,
        header: &[u8],
        len: u64,
        algorithm: Algorithm,
        verify: bool,
        threads: usize,
    ) -> Result<PackedStore> {
        let mut engine = BlockEngine::new(algorithm, verify, BLOCK as u32, threads)?;
        let file = IoFile::create_new(path)?;
        let mut h = header.to_vec();
        h.resize(HT_SPACE, 0);
        Ok(PackedStore {
            file,
            algorithm,
            verify,
            inner: Mutex::new(Inner {
                buf: engine.buffer(),
                engine,
                map: Map {
                    header: h,
                    runs: BTreeMap::new(),
                    inflight: VecDeque::new(),
                    end: 0,
                },
            }),
            len: Mutex::new(len),
        })
    }

    /// The side file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Length of the data file this store stands for.
    pub fn len(&self) -> Result<u64> {
        Ok(*self.len.lock())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        *self.len.lock() = len;
        Ok(())
    }

    /// Wait until every block written is stored.
    pub fn sync(&self) -> Result<()> {
        let mut g = self.inner.lock();
        Self::drain(&self.file, &mut g)
    }

    fn drain(file: &IoFile, g: &mut Inner) -> Result<()> {
        let Inner { engine, map, .. } = g;
        engine.finish(&mut |d, l| store(file, map, d, l))
    }

    /// Send the whole blocks of `src`, logical blocks `first..`, to
    /// compression.
    fn submit(&self, g: &mut Inner, mut first: u64, src: &[u8]) -> Result<()> {
        for chunk in src.chunks(JOB_BYTES) {
            let n = chunk.len() as u64 / BLOCK;
            let mut buf = std::mem::take(&mut g.buf);
            if buf.len() < chunk.len() {
                // Not handed back by a submit that failed.
                buf = g.engine.buffer();
            }
            buf[..chunk.len()].copy_from_slice(chunk);
            g.map.inflight.push_back((first, n));
            let Inner { engine, map, .. } = &mut *g;
            g.buf = engine.submit(buf, chunk.len(), &mut |d, l| store(&self.file, map, d, l))?;
            first += n;
        }
        Ok(())
    }

    /// The current content of block `blk` into `out` (4 KiB): zeros when it
    /// is not stored. Blocks in flight must have been drained.
    fn read_block(&self, map: &Map, blk: u64, out: &mut [u8]) -> Result<()> {
        let Some((pos, len)) = map.lookup(blk) else {
            out.fill(0);
            return Ok(());
        };
        let mut stored = vec![0u8; len as usize];
        self.file.read_exact_at(&mut stored, pos)?;
        decode_stored(self.algorithm, self.verify, &stored, out).map_err(|msg| {
            Error::corrupt(
                self.file.path(),
                "packed layer data",
                format!("block {blk}{msg}"),
            )
        })
    }

    /// Write `buf` at data file offset `offset`. Parts of blocks keep the
    /// block's other bytes (zeros if it was not written).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut g = self.inner.lock();
        let (mut off, mut buf) = (offset, buf);
        if off < HT {
            let n = ((HT - off) as usize).min(buf.len());
            g.map.header[off as usize..off as usize + n].copy_from_slice(&buf[..n]);
            off += n as u64;
            buf = &buf[n..];
        }
        if buf.is_empty() {
            return Ok(());
        }
        let rel = off - HT;
        let (a, e) = (rel / BLOCK, (rel + buf.len() as u64).div_ceil(BLOCK));
        if rel.is_multiple_of(BLOCK) && (buf.len() as u64).is_multiple_of(BLOCK) {
            return self.submit(&mut g, a, buf);
        }
        // Whole blocks around the partial ones.
        if g.map.overlaps_inflight(a, e) {
            Self::drain(&self.file, &mut g)?;
        }
        let mut tmp = vec![0u8; ((e - a) * BLOCK) as usize];
        let last = (e - a - 1) as usize * BLOCK as usize;
        self.read_block(&g.map, a, &mut tmp[..BLOCK as usize])?;
        if e - a > 1 {
            self.read_block(&g.map, e - 1, &mut tmp[last..])?;
        }
        let d = (rel - a * BLOCK) as usize;
        tmp[d..d + buf.len()].copy_from_slice(buf);
        self.submit(&mut g, a, &tmp)
    }

    /// Read at data file offset `offset`; returns the bytes read (fewer only
    /// past the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let end = self.len()?;
        if offset >= end {
            return Ok(0);
        }
        let want = ((end - offset) as usize).min(buf.len());
        let buf = &mut buf[..want];
        let mut g = self.inner.lock();
        let (mut off, mut done) = (offset, 0usize);
        if off < HT {
            let n = ((HT - off) as usize).min(buf.len());
            buf[..n].copy_from_slice(&g.map.header[off as usize..off as usize + n]);
            off += n as u64;
            done = n;
        }
        if done == buf.len() {
            return Ok(want);
        }
        let rel = off - HT;
        let (a, e) = (
            rel / BLOCK,
            (rel + (buf.len() - done) as u64).div_ceil(BLOCK),
        );
        if g.map.overlaps_inflight(a, e) {
            Self::drain(&self.file, &mut g)?;
        }
        let mut block = vec![0u8; BLOCK as usize];
        for blk in a..e {
            let bstart = HT + blk * BLOCK;
            let from = off.max(bstart);
            let to = (bstart + BLOCK).min(offset + buf.len() as u64);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if to - from == BLOCK {
                self.read_block(&g.map, blk, dst)?;
            } else {
                self.read_block(&g.map, blk, &mut block)?;
                dst.copy_from_slice(&block[(from - bstart) as usize..(to - bstart) as usize]);
            }
        }
        Ok(want)
    }

    /// [`PackedStore::read_at`] for each request.
    pub fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<usize>> {
        reqs.iter_mut()
            .map(|(off, buf)| self.read_at(buf, *off))
            .collect()
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(Error::Invalid(format!(
                "{}: read past the end of the packed layer data ({} bytes)",
                self.file.path().display(),
                self.len()?
            )));
        }
        Ok(())
    }

    /// Punch a hole: whole blocks are forgotten (they read as zeros and are
    /// no longer allocated), parts of blocks become zeros, as in a sparse
    /// file.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let start = offset.max(HT);
        let end = offset + len;
        if end <= start {
            return Ok(());
        }
        let (rs, re) = (start - HT, end - HT);
        let (a, b) = (rs.div_ceil(BLOCK), re / BLOCK);
        {
            let mut g = self.inner.lock();
            if g.map.overlaps_inflight(rs / BLOCK, re.div_ceil(BLOCK)) {
                Self::drain(&self.file, &mut g)?;
            }
            if b > a {
                g.map.remove(a, b);
            }
        }
        // Partial blocks at either end keep their allocation, zeroed.
        if b <= a {
            let partial = |s: u64, e: u64| -> Result<()> {
                if e > s {
                    self.zero_stored(s, e)?;
                }
                Ok(())
            };
            return partial(rs, re);
        }
        if rs < a * BLOCK {
            self.zero_stored(rs, a * BLOCK)?;
        }
        if re > b * BLOCK {
            self.zero_stored(b * BLOCK, re)?;
        }
        Ok(())
    }

    /// Zero relative bytes `s..e` (inside one block) if that block is stored.
    fn zero_stored(&self, s: u64, e: u64) -> Result<()> {
        let stored = self.inner.lock().map.lookup(s / BLOCK).is_some();
        if stored {
            self.write_all_at(&vec![0u8; (e - s) as usize], HT + s)?;
        }
        Ok(())
    }

    /// The allocated ranges of the data file from `from` on: the header and
    /// the stored blocks, as `(start, end)` byte ranges, runs merged.
    pub fn data_ranges(&self, from: u64) -> Result<Vec<(u64, u64)>> {
        let mut g = self.inner.lock();
        Self::drain(&self.file, &mut g)?;
        let mut out: Vec<(u64, u64)> = vec![(0, HT)];
        for (s, r) in &g.map.runs {
            let (a, b) = (HT + s * BLOCK, HT + (s + r.blocks()) * BLOCK);
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => out.push((a, b)),
            }
        }
        Ok(out
            .into_iter()
            .filter(|&(_, b)| b > from)
            .map(|(a, b)| (a.max(from), b))
            .collect())
    }

    /// Append the stored bytes of blocks `first..` to `out` and their
    /// lengths to `lens`, as many as are stored contiguously, up to `max`;
    /// returns how many (0 when block `first` is not stored). Blocks in
    /// flight must have been drained ([`PackedStore::sync`]).
    pub fn stored_run(
        &self,
        first: u64,
        max: u64,
        out: &mut Vec<u8>,
        lens: &mut Vec<u32>,
    ) -> Result<u64> {
        let (pos, bytes, n) = {
            let g = self.inner.lock();
            let Some((s, r)) = g.map.runs.range(..=first).next_back() else {
                return Ok(0);
            };
            let k = first - s;
            if k >= r.blocks() {
                return Ok(0);
            }
            let n = (r.blocks() - k).min(max) as usize;
            let k = k as usize;
            let run = &r.lens[k..k + n];
            lens.extend_from_slice(run);
            let bytes: u64 = run.iter().map(|&l| l as u64).sum();
            (r.pos_of(k), bytes, n as u64)
        };
        let at = out.len();
        out.resize(at + bytes as usize, 0);
        self.file.read_exact_at(&mut out[at..], pos)?;
        Ok(n)
    }
}

impl crate::zfile::StoredSource for PackedStore {
    fn stored_format(&self) -> (Algorithm, bool) {
        (self.algorithm, self.verify)
    }

    fn stored_blocks(
        &self,
        offset: u64,
        max: u64,
        out: &mut Vec<u8>,
        lens: &mut Vec<u32>,
    ) -> Result<u64> {
        if offset < HT || !(offset - HT).is_multiple_of(BLOCK) {
            return Ok(0);
        }
        self.stored_run((offset - HT) / BLOCK, max, out, lens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(seed) >> 7) % 13) as u8)
            .collect()
    }

    fn store(threads: usize) -> (tempfile::TempDir, PackedStore) {
        let d = tempfile::tempdir().unwrap();
        let s = PackedStore::create(
            &d.path().join("x.packed"),
            b"HDR",
            HT + (64 << 20),
            Algorithm::Lz4,
            true,
            threads,
        )
        .unwrap();
        (d, s)
    }

    #[test]
    fn reads_what_was_written_with_zeros_around() {
        for threads in [1, 2] {
            let (_d, s) = store(threads);
            let a = sample(3 << 20, 7);
            s.write_all_at(&a, HT + 8 * BLOCK).unwrap();
            // an overwrite in the middle, and a partial block
            let b = sample(5 * BLOCK as usize, 11);
            s.write_all_at(&b, HT + 100 * BLOCK).unwrap();
            s.write_all_at(&[9u8; 700], HT + 900 * BLOCK + 512).unwrap();
            let mut want = vec![0u8; 4 << 20];
            want[8 * 4096..8 * 4096 + a.len()].copy_from_slice(&a);
            want[100 * 4096..105 * 4096].copy_from_slice(&b);
            want[900 * 4096 + 512..900 * 4096 + 1212].fill(9);
            let mut got = vec![0u8; 4 << 20];
            assert_eq!(s.read_at(&mut got, HT).unwrap(), got.len());
            assert!(got == want);
            // unaligned read across blocks
            let mut piece = vec![0u8; 10_000];
            s.read_at(&mut piece, HT + 99 * BLOCK + 123).unwrap();
            assert!(piece[..] == want[99 * 4096 + 123..99 * 4096 + 10_123]);
            // the header
            let mut h = [0u8; 4];
            s.read_at(&mut h, 0).unwrap();
            assert_eq!(&h, b"HDR\0");
        }
    }

    #[test]
    fn allocation_is_the_written_blocks_and_holes_are_punched() {
        let (_d, s) = store(2);
        s.write_all_at(&sample(8 * BLOCK as usize, 3), HT).unwrap();
        s.write_all_at(&[1u8; 512], HT + 20 * BLOCK).unwrap();
        assert_eq!(
            s.data_ranges(HT).unwrap(),
            vec![(HT, HT + 8 * BLOCK), (HT + 20 * BLOCK, HT + 21 * BLOCK)]
        );
        s.punch_hole(HT + 2 * BLOCK, 3 * BLOCK).unwrap();
        assert_eq!(
            s.data_ranges(0).unwrap(),
            vec![
                (0, HT + 2 * BLOCK),
                (HT + 5 * BLOCK, HT + 8 * BLOCK),
                (HT + 20 * BLOCK, HT + 21 * BLOCK)
            ]
        );
        let mut b = vec![7u8; BLOCK as usize];
        s.read_at(&mut b, HT + 3 * BLOCK).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // a partial punch zeroes bytes and keeps the block
        s.punch_hole(HT + 20 * BLOCK, 256).unwrap();
        let mut b = vec![0u8; 512];
        s.read_at(&mut b, HT + 20 * BLOCK).unwrap();
        assert!(b[..256].iter().all(|&x| x == 0) && b[256..].iter().all(|&x| x == 1));
        assert_eq!(s.data_ranges(HT + 9 * BLOCK).unwrap().len(), 1);
    }

    #[test]
    fn stored_blocks_are_the_zfile_blocks_of_the_data() {
        let (_d, s) = store(2);
        let a = sample(600 * BLOCK as usize, 5);
        s.write_all_at(&a, HT).unwrap();
        s.write_all_at(&sample(BLOCK as usize, 9), HT + 300 * BLOCK)
            .unwrap();
        s.sync().unwrap();
        let mut codec = crate::compress::Codec::new(Algorithm::Lz4, true).unwrap();
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let mut blk = 0;
        while blk < 600 {
            let n = s.stored_run(blk, 600 - blk, &mut out, &mut lens).unwrap();
            assert!(n > 0);
            blk += n;
        }
        let mut want = Vec::new();
        let mut raw = a.clone();
        raw[300 * 4096..301 * 4096].copy_from_slice(&sample(4096, 9));
        let mut wl = Vec::new();
        codec
            .compress_blocks(&raw, 4096, &mut want, &mut wl)
            .unwrap();
        assert_eq!(lens, wl);
        assert!(out == want);
        assert_eq!(s.stored_run(600, 10, &mut out, &mut lens).unwrap(), 0);
    }
}
