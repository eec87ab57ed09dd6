//! ZFile: random-access block compression (overlaybd `zfile/format_spec.md`).
//!
//! Layout: `header (512 B) | block 0 [crc] | block 1 [crc] | ... | jump table | trailer (512 B)`.
//! The source is cut into `block_size` pieces (the last may be short), each
//! compressed independently with lz4 (raw block format) or zstd (one frame,
//! level 3); with `verify` each compressed block is followed by a 4-byte
//! CRC32C of the compressed bytes, seeded with 100007. The jump table holds
//! one little-endian u32 per block: its stored length including the CRC.
//!
//! Header/trailer fields (little endian): magic0 `"ZFile\0\1\0"` @0,
//! magic1 `74 75 6A 69 2E 79 79 66 40 41 6C 69 62 61 62 61` @8, struct size
//! (96) u32 @24, digest u32 @28, flags u64 @32, index offset u64 @40, index
//! size (entries) u64 @48, original size u64 @56, index CRC u32 @64,
//! block size u32 @72, algorithm u8 @76 (1 lz4, 2 zstd), level u8 @77,
//! use_dict u8 @78, dict size u32 @84, verify u8 @88; the rest is zero.
//! Flags: bit0 header, bit1 data file, bit2 sealed, bit3 header overwritten
//! with the trailer's info, bit4 digest present, bit5 index compressed.
//! The digest is a CRC32C (seed 0, no final inversion, as overlaybd computes
//! it) of the 512 bytes with the digest field zeroed; the index CRC likewise
//! over the jump table.
//!
//! Readers use the header when bit3 is set, otherwise the trailer. Only the
//! low six flag bits have meaning: overlaybd's own old base layer carries
//! garbage in the upper bits and in reserved fields, so those are ignored.

use std::path::Path;

use crate::compress::{BlockEngine, JOB_BYTES};
use crate::error::{Error, Result};
use crate::source::{BlobSink, ReadAt};

/// Header/trailer size.
pub const ZF_SPACE: usize = 512;
pub const ZF_MAGIC0: [u8; 8] = *b"ZFile\0\x01\0";
pub const ZF_MAGIC1: [u8; 16] = [
    0x74, 0x75, 0x6A, 0x69, 0x2E, 0x79, 0x79, 0x66, 0x40, 0x41, 0x6C, 0x69, 0x62, 0x61, 0x62, 0x61,
];
const STRUCT_SIZE: u32 = 96;
/// Upstream's limit on the number of jump-table entries.
pub const MAX_INDEX_ENTRIES: u64 = 1_000_000_000;
/// Seed of the per-block CRC.
pub const BLOCK_CRC_SEED: u32 = 100_007;
/// Largest block size a reader accepts (upstream's MAX_READ_SIZE).
pub const MAX_BLOCK_SIZE: u32 = 64 << 10;

pub const ZF_HEADER: u64 = 1 << 0;
pub const ZF_DATA: u64 = 1 << 1;
pub const ZF_SEALED: u64 = 1 << 2;
pub const ZF_OVERWRITE: u64 = 1 << 3;
pub const ZF_DIGEST: u64 = 1 << 4;
pub const ZF_INDEX_COMPRESSED: u64 = 1 << 5;
const MEANINGFUL_FLAGS: u64 = 0x3F;

/// CRC32C as overlaybd computes it: no pre/post inversion, explicit seed.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Compression algorithm of a ZFile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Lz4,
    Zstd,
}

impl Algorithm {
    pub(crate) fn code(self) -> u8 {
        match self {
            Algorithm::Lz4 => 1,
            Algorithm::Zstd => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Algorithm::Lz4),
            2 => Some(Algorithm::Zstd),
            _ => None,
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lz4" => Ok(Algorithm::Lz4),
            "zstd" => Ok(Algorithm::Zstd),
            o => Err(Error::Invalid(format!(
                "invalid algorithm '{o}': expected lz4 or zstd"
            ))),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        })
    }
}

/// Options for writing a ZFile.
#[derive(Debug, Clone)]
pub struct ZfileOptions {
    pub algorithm: Algorithm,
    /// Block size in bytes: a power of two from 4 KiB to 64 KiB.
    pub block_size: u32,
    /// Append a CRC32C after each compressed block.
    pub verify: bool,
    /// Rewrite the header with the trailer's information at the end
    /// (`overlaybd-commit -z` does; `overlaybd-zfile` does not).
    pub overwrite_header: bool,
    /// Compression threads (1 compresses on the writer's thread); the
    /// output bytes never depend on it. Default: every core.
    pub threads: usize,
}

impl Default for ZfileOptions {
    fn default() -> Self {
        ZfileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            verify: true,
            overwrite_header: true,
            threads: crate::compress::default_threads(),
        }
    }
}

impl ZfileOptions {
    /// Check the block size the way upstream's tools do.
    pub fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(4096..=65536).contains(&bs) {
            return Err(Error::Invalid(format!(
                "invalid block size {bs}: must be a power of two from 4 KiB to 64 KiB (4/8/16/32/64)"
            )));
        }
        Ok(())
    }
}

/// A decoded ZFile header or trailer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZHeader {
    pub digest: u32,
    pub flags: u64,
    pub index_offset: u64,
    pub index_size: u64,
    pub original_size: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub algorithm: u8,
    pub level: u8,
    pub use_dict: u8,
    pub dict_size: u32,
    pub verify: bool,
}

impl ZHeader {
    pub fn has_flag(&self, f: u64) -> bool {
        self.flags & f != 0
    }

    /// Whether `buf` begins with the ZFile magic.
    pub fn has_magic(buf: &[u8]) -> bool {
        buf.len() >= 24 && buf[..8] == ZF_MAGIC0 && buf[8..24] == ZF_MAGIC1
    }

    /// Decode a 512-byte block (magic already checked or not: `None` if absent).
    pub fn decode(b: &[u8]) -> Option<ZHeader> {
        if b.len() < ZF_SPACE || !Self::has_magic(b) {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        Some(ZHeader {
            digest: u32_at(28),
            flags: u64_at(32),
            index_offset: u64_at(40),
            index_size: u64_at(48),
            original_size: u64_at(56),
            index_crc: u32_at(64),
            block_size: u32_at(72),
            algorithm: b[76],
            level: b[77],
            use_dict: b[78],
            dict_size: u32_at(84),
            verify: b[88] != 0,
        })
    }

    /// Encode to 512 bytes, computing the digest when the digest flag is set.
    pub fn encode(&self) -> [u8; ZF_SPACE] {
        let mut b = [0u8; ZF_SPACE];
        b[..8].copy_from_slice(&ZF_MAGIC0);
        b[8..24].copy_from_slice(&ZF_MAGIC1);
        b[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
        b[32..40].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.index_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.original_size.to_le_bytes());
        b[64..68].copy_from_slice(&self.index_crc.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        b[76] = self.algorithm;
        b[77] = self.level;
        b[78] = self.use_dict;
        b[84..88].copy_from_slice(&self.dict_size.to_le_bytes());
        b[88] = self.verify as u8;
        let digest = if self.has_flag(ZF_DIGEST) {
            crc32c_raw(0, &b)
        } else {
            self.digest
        };
        b[28..32].copy_from_slice(&digest.to_le_bytes());
        b
    }

    /// Check the digest of a raw 512-byte block (true when no digest is recorded).
    pub fn digest_ok(raw: &[u8]) -> bool {
        let Some(h) = ZHeader::decode(raw) else {
            return false;
        };
        if !h.has_flag(ZF_DIGEST) {
            return true;
        }
        let mut copy = [0u8; ZF_SPACE];
        copy.copy_from_slice(&raw[..ZF_SPACE]);
        copy[28..32].fill(0);
        crc32c_raw(0, &copy) == h.digest
    }
}

/// Whether `src` starts with a valid ZFile header.
pub fn is_zfile(src: &dyn ReadAt) -> Result<bool> {
    if src.size() < ZF_SPACE as u64 {
        return Ok(false);
    }
    let mut b = [0u8; ZF_SPACE];
    src.read_exact_at(&mut b, 0)?;
    Ok(ZHeader::has_magic(&b) && b[32] & ZF_HEADER as u8 != 0)
}

/// Random-access reader of a ZFile, presenting the original bytes.
pub struct ZFileReader {
    src: Box<dyn ReadAt>,
    info: ZHeader,
    algorithm: Algorithm,
    /// `offsets[i]` = start of block i in the file; `offsets[n]` = end of the last block.
    offsets: Vec<u64>,
}

impl std::fmt::Debug for ZFileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZFileReader")
            .field("path", &self.src.path())
            .field("info", &self.info)
            .finish()
    }
}

/// Largest compressed span read with one call.
const READ_CHUNK: u64 = 4 << 20;

thread_local! {
    /// Compressed bytes of the blocks being read, kept between reads.
    static STORED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// This thread's zstd decompression context.
    static ZSTD_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl ZFileReader {
    /// Open and validate a ZFile.
    pub fn open(src: Box<dyn ReadAt>) -> Result<ZFileReader> {
        let path = src.path().to_path_buf();
        let bad = |msg: String| Error::corrupt(&path, "ZFile", msg);
        let size = src.size();
        if size < 2 * ZF_SPACE as u64 {
            return Err(bad(format!(
                "file is {size} bytes, too small for a header and a trailer"
            )));
        }
        let mut raw = [0u8; ZF_SPACE];
        src.read_exact_at(&mut raw, 0)?;
        let header = ZHeader::decode(&raw).ok_or_else(|| bad("bad header magic".into()))?;
        if !header.has_flag(ZF_HEADER) {
            return Err(bad("first block is not marked as a header".into()));
        }
        if !ZHeader::digest_ok(&raw) {
            return Err(bad("header checksum mismatch".into()));
        }
        let trailer_offset = size - ZF_SPACE as u64;
        let info = if header.has_flag(ZF_OVERWRITE) {
            header
        } else {
            if !header.has_flag(ZF_DATA) {
                return Err(bad("header is not marked as a data file".into()));
            }
            read_trailer(&*src, trailer_offset, &bad)?
        };
        if info.has_flag(ZF_INDEX_COMPRESSED) {
            return Err(bad("compressed jump tables are not supported".into()));
        }
        let algorithm = Algorithm::from_code(info.algorithm).ok_or_else(|| {
            bad(format!(
                "unsupported compression algorithm {}",
                info.algorithm
            ))
        })?;
        let bs = info.block_size;
        if !bs.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(bad(format!("invalid block size {bs}")));
        }
        if info.use_dict != 0 || info.dict_size != 0 {
            return Err(bad("compression dictionaries are not supported".into()));
        }
        if info.index_size > MAX_INDEX_ENTRIES {
            return Err(bad(format!(
                "jump table of {} entries exceeds the maximum {MAX_INDEX_ENTRIES}",
                info.index_size
            )));
        }
        let index_bytes = info.index_size * 4;
        if info.index_offset < ZF_SPACE as u64
            || info.index_offset > trailer_offset
            || index_bytes > trailer_offset - info.index_offset
        {
            return Err(bad(format!(
                "jump table at {} (+{index_bytes} bytes) does not fit before the trailer at {trailer_offset}",
                info.index_offset
            )));
        }
        let expect_blocks = info.original_size.div_ceil(bs as u64);
        if info.index_size != expect_blocks {
            return Err(bad(format!(
                "jump table has {} entries but {} bytes in {bs}-byte blocks need {expect_blocks}",
                info.index_size, info.original_size
            )));
        }
        let mut table = vec![0u8; index_bytes as usize];
        src.read_exact_at(&mut table, info.index_offset)?;
        if info.has_flag(ZF_DIGEST) && crc32c_raw(0, &table) != info.index_crc {
            return Err(bad("jump table checksum mismatch".into()));
        }
        let min = if info.verify { 4 } else { 0 };
        let max = 2 * bs as u64 + 1024;
        let mut offsets = Vec::with_capacity(info.index_size as usize + 1);
        let mut pos = ZF_SPACE as u64;
        offsets.push(pos);
        for (i, c) in table.chunks_exact(4).enumerate() {
            let len = u32::from_le_bytes(c.try_into().unwrap()) as u64;
            if len <= min || len > max {
                return Err(bad(format!("block {i} has invalid stored length {len}")));
            }
            pos += len;
            offsets.push(pos);
        }
        if pos > info.index_offset {
            return Err(bad(format!(
                "compressed blocks end at {pos}, past the jump table at {}",
                info.index_offset
            )));
        }
        Ok(ZFileReader {
            src,
            info,
            algorithm,
            offsets,
        })
    }

    /// The header or trailer information in use.
    pub fn info(&self) -> &ZHeader {
        &self.info
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Size of the original (decompressed) data.
    pub fn original_size(&self) -> u64 {
        self.info.original_size
    }

    /// Decompress block `i` (whose stored bytes are `stored`) into `out`.
    fn decode_block(&self, i: usize, stored: &[u8], out: &mut [u8]) -> Result<()> {
        decode_stored(self.algorithm, self.info.verify, stored, out)
            .map_err(|msg| Error::corrupt(self.src.path(), "ZFile", format!("block {i}{msg}")))
    }

    /// Decode blocks `first..end`, whose stored bytes are `stored`
    /// (starting at block `first`), into `out`, which receives the original
    /// bytes from `offset` on (inside those blocks). Returns the bytes
    /// written.
    fn decode_run(
        &self,
        first: usize,
        end: usize,
        stored: &[u8],
        offset: u64,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<usize> {
        let bs = self.info.block_size as u64;
        let start = self.offsets[first];
        let mut done = 0usize;
        for i in first..end {
            if done == out.len() {
                break;
            }
            let s =
                &stored[(self.offsets[i] - start) as usize..(self.offsets[i + 1] - start) as usize];
            let blen = self.block_len(i);
            let bstart = i as u64 * bs;
            let from = (offset + done as u64 - bstart) as usize;
            let n = (blen - from).min(out.len() - done);
            if from == 0 && n == blen {
                self.decode_block(i, s, &mut out[done..done + n])?;
            } else {
                scratch.resize(bs as usize, 0);
                self.decode_block(i, s, &mut scratch[..blen])?;
                out[done..done + n].copy_from_slice(&scratch[from..from + n]);
            }
            done += n;
        }
        Ok(done)
    }

    /// [`Self::decode_run`] once more after it failed with `err`, on the
    /// stored bytes read again, if the source can fetch them again
    /// ([`ReadAt::refetch`]: bytes a lazily loaded blob cached may have
    /// been damaged on their way); otherwise `err`.
    fn decode_run_again(
        &self,
        first: usize,
        end: usize,
        offset: u64,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
        err: Error,
    ) -> Result<usize> {
        let start = self.offsets[first];
        let n = self.offsets[end] - start;
        if !self.src.refetch(start, n) {
            return Err(err);
        }
        let mut stored = vec![0u8; n as usize];
        self.src.read_exact_at(&mut stored, start)?;
        self.decode_run(first, end, &stored, offset, out, scratch)
    }

    fn block_len(&self, i: usize) -> usize {
        let bs = self.info.block_size as u64;
        (self.info.original_size - i as u64 * bs).min(bs) as usize
    }
}

impl ReadAt for ZFileReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.info.original_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset) as usize;
        let bs = self.info.block_size as u64;
        let first = (offset / bs) as usize;
        let last = ((offset + want as u64 - 1) / bs) as usize;
        let mut scratch = Vec::new();
        let mut stored = STORED.with(|v| std::mem::take(&mut *v.borrow_mut()));
        let mut done = 0usize;
        let mut b = first;
        while b <= last {
            // Gather a run of blocks whose compressed bytes fit one read.
            let mut e = b + 1;
            while e <= last && self.offsets[e + 1] - self.offsets[b] <= READ_CHUNK {
                e += 1;
            }
            let start = self.offsets[b];
            stored.resize((self.offsets[e] - start) as usize, 0);
            self.src.read_exact_at(&mut stored, start)?;
            let at = offset + done as u64;
            done += match self.decode_run(b, e, &stored, at, &mut buf[done..want], &mut scratch) {
                Ok(n) => n,
                Err(err) => {
                    self.decode_run_again(b, e, at, &mut buf[done..want], &mut scratch, err)?
                }
            };
            b = e;
        }
        if stored.capacity() <= READ_CHUNK as usize + MAX_BLOCK_SIZE as usize * 3 {
            STORED.with(|v| *v.borrow_mut() = stored);
        }
        Ok(done)
    }

    /// Reads whose compressed blocks fit one read each are read together
    /// (overlapping when the source can), then decoded.
    fn read_many_exact(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        let size = self.info.original_size;
        let bs = self.info.block_size as u64;
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(reqs.len());
        // (request, first block, end block, where its compressed bytes
        // start in `stored`): one buffer for the whole batch, reused by the
        // thread like `read_at`'s.
        let mut spans: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut total = 0usize;
        for (k, (off, buf)) in reqs.iter_mut().enumerate() {
            let len = buf.len() as u64;
            if len == 0 || off.checked_add(len).is_none_or(|end| end > size) {
                results.push(Some(self.read_exact_at(buf, *off)));
                continue;
            }
            let first = (*off / bs) as usize;
            let end = ((*off + len - 1) / bs) as usize + 1;
            let span = self.offsets[end] - self.offsets[first];
            if span > READ_CHUNK {
                results.push(Some(self.read_exact_at(buf, *off)));
                continue;
            }
            results.push(None);
            spans.push((k, first, end, total));
            total += span as usize;
        }
        let mut stored = STORED.with(|v| std::mem::take(&mut *v.borrow_mut()));
        stored.resize(total, 0);
        let read = {
            let mut io: Vec<(u64, &mut [u8])> = Vec::with_capacity(spans.len());
            let mut rest: &mut [u8] = &mut stored;
            for &(_, first, end, _) in &spans {
                let n = (self.offsets[end] - self.offsets[first]) as usize;
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                io.push((self.offsets[first], head));
                rest = tail;
            }
            self.src.read_many_exact(&mut io)
        };
        let mut scratch = Vec::new();
        for (&(k, first, end, at), r) in spans.iter().zip(read) {
            let (off, buf) = &mut reqs[k];
            let n = (self.offsets[end] - self.offsets[first]) as usize;
            results[k] = Some(r.and_then(|()| {
                self.decode_run(first, end, &stored[at..at + n], *off, buf, &mut scratch)
                    .or_else(|err| self.decode_run_again(first, end, *off, buf, &mut scratch, err))
                    .map(|_| ())
            }));
        }
        if stored.capacity() <= READ_CHUNK as usize + MAX_BLOCK_SIZE as usize * 3 {
            STORED.with(|v| *v.borrow_mut() = stored);
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    fn size(&self) -> u64 {
        self.info.original_size
    }

    fn path(&self) -> &Path {
        self.src.path()
    }
}

/// The trailer at `offset` of `src`, which must be a sealed data trailer with a valid
/// checksum; `bad` makes the error for one that is not.
fn read_trailer(src: &dyn ReadAt, offset: u64, bad: &dyn Fn(String) -> Error) -> Result<ZHeader> {
    let mut raw = [0u8; ZF_SPACE];
    src.read_exact_at(&mut raw, offset)?;
    let t = ZHeader::decode(&raw).ok_or_else(|| bad("bad trailer magic".into()))?;
    if t.has_flag(ZF_HEADER) || !t.has_flag(ZF_DATA) || !t.has_flag(ZF_SEALED) {
        return Err(bad(format!(
            "trailer flags {:#x} are not those of a sealed data trailer",
            t.flags & MEANINGFUL_FLAGS
        )));
    }
    if !ZHeader::digest_ok(&raw) {
        return Err(bad("trailer checksum mismatch".into()));
    }
    Ok(t)
}

/// Check every block's CRC without keeping the output (`overlaybd-zfile --verify`).
pub fn verify_blocks(r: &ZFileReader) -> Result<()> {
    if !r.info.verify {
        return Err(Error::corrupt(
            r.src.path(),
            "ZFile",
            "file carries no per-block checksums",
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < r.original_size() {
        let n = r.read_at(&mut buf, off)?;
        off += n as u64;
    }
    verify_trailer(r)
}

/// A file whose header was rewritten at the end (flags 0x1b) is read through its header
/// alone; [`verify_blocks`] still wants its trailer to be a sealed data trailer that
/// agrees with the header (the other files' trailers are checked by opening them).
fn verify_trailer(r: &ZFileReader) -> Result<()> {
    let h = &r.info;
    if !h.has_flag(ZF_OVERWRITE) {
        return Ok(());
    }
    let bad = |msg: String| Error::corrupt(r.src.path(), "ZFile", msg);
    let t = read_trailer(&*r.src, r.src.size() - ZF_SPACE as u64, &bad)?;
    let fields = |z: &ZHeader| {
        (
            z.index_offset,
            z.index_size,
            z.original_size,
            z.block_size,
            z.algorithm,
        )
    };
    if fields(&t) != fields(h) {
        return Err(bad(format!(
            "the trailer (index at {}, {} entries, {} bytes) disagrees with the rewritten header (index at {}, {} entries, {} bytes)",
            t.index_offset, t.index_size, t.original_size, h.index_offset, h.index_size, h.original_size
        )));
    }
    Ok(())
}

/// Data whose 4 KiB ZFile blocks are already compressed (a packed layer,
/// [`crate::lsmt::packed`]), for a commit to copy instead of compressing.
pub trait StoredSource {
    /// Algorithm and checksums of the stored blocks (4 KiB each).
    fn stored_format(&self) -> (Algorithm, bool);
    /// Append the stored forms of the blocks from data byte `offset` on (4 KiB
    /// aligned) to `out` and their lengths to `lens`, at most `max` and as many
    /// as are at hand; returns how many (0: the block at `offset` is not stored).
    fn stored_blocks(
        &self,
        offset: u64,
        max: u64,
        out: &mut Vec<u8>,
        lens: &mut Vec<u32>,
    ) -> Result<u64>;
}

/// Decompress one stored ZFile block (compressed bytes, then a CRC32C when
/// `verify`) into `out`, which it must fill exactly. The error says what is
/// wrong, to follow "block N".
pub(crate) fn decode_stored(
    algorithm: Algorithm,
    verify: bool,
    stored: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let data = if verify {
        if stored.len() < 4 {
            return Err(format!(
                " is {} bytes, too short for its checksum",
                stored.len()
            ));
        }
        let (d, crc) = stored.split_at(stored.len() - 4);
        let want = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32c_raw(BLOCK_CRC_SEED, d) != want {
            return Err(" checksum mismatch".into());
        }
        d
    } else {
        stored
    };
    let n = match algorithm {
        Algorithm::Lz4 => lz4::block::decompress_to_buffer(data, Some(out.len() as i32), out)
            .map_err(|e| format!(": lz4 decode failed: {e}"))?,
        Algorithm::Zstd => ZSTD_DCTX
            .with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                d.as_mut()
                    .expect("set just above")
                    .decompress_to_buffer(data, out)
            })
            .map_err(|e| format!(": zstd decode failed: {e}"))?,
    };
    if n != out.len() {
        return Err(format!(" decodes to {n} bytes, expected {}", out.len()));
    }
    Ok(())
}

/// Streaming ZFile writer over a [`BlobSink`].
///
/// Blocks are compressed on `opts.threads` threads by a
/// [`BlockEngine`] and written in order, so the output bytes are the same
/// for every thread count.
pub struct ZFileWriter<S: BlobSink> {
    sink: S,
    opts: ZfileOptions,
    engine: BlockEngine,
    /// The job being filled: `pending[..filled]` (always `JOB_BYTES` long).
    pending: Vec<u8>,
    filled: usize,
    block_lens: Vec<u32>,
    raw_size: u64,
    header: ZHeader,
}

impl<S: BlobSink> ZFileWriter<S> {
    /// Start a ZFile: writes the provisional header.
    pub fn new(mut sink: S, opts: ZfileOptions) -> Result<Self> {
        opts.validate()?;
        let header = ZHeader {
            flags: ZF_HEADER | ZF_DATA | ZF_DIGEST,
            block_size: opts.block_size,
            algorithm: opts.algorithm.code(),
            verify: opts.verify,
            ..Default::default()
        };
        let mut engine =
            BlockEngine::new(opts.algorithm, opts.verify, opts.block_size, opts.threads)?;
        sink.put(&header.encode())?;
        Ok(ZFileWriter {
            sink,
            pending: engine.buffer(),
            filled: 0,
            engine,
            opts,
            block_lens: Vec::new(),
            raw_size: 0,
            header,
        })
    }

    /// Append original bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_filled(data.len(), &mut |piece, off| {
            piece.copy_from_slice(&data[off..off + piece.len()]);
            Ok(())
        })
    }

    /// Append `len` original bytes that `fill` writes straight into the
    /// writer's job buffers (one copy less than [`ZFileWriter::write`]):
    /// `fill(piece, offset)` is called on consecutive pieces covering the
    /// `len` bytes, `offset` counting from their start.
    pub fn write_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (JOB_BYTES - self.filled).min(len - done);
            fill(&mut self.pending[self.filled..self.filled + n], done)?;
            self.filled += n;
            self.raw_size += n as u64;
            done += n;
            if self.filled == JOB_BYTES {
                self.submit_pending()?;
            }
        }
        Ok(())
    }

    /// Whether the next byte written starts a block.
    pub fn at_block_boundary(&self) -> bool {
        self.raw_size.is_multiple_of(self.opts.block_size as u64)
    }

    /// The options of the blocks this writer stores.
    pub fn options(&self) -> &ZfileOptions {
        &self.opts
    }

    /// Append whole blocks already in their stored form (as this writer would
    /// store them: same algorithm, checksums and block size): `data` holds
    /// them back to back, `lens` their lengths. The writer must be at a block
    /// boundary ([`ZFileWriter::at_block_boundary`]); the file is the same as
    /// if their original bytes had been written.
    pub fn write_stored(&mut self, data: &[u8], lens: &[u32]) -> Result<()> {
        if !self.at_block_boundary() {
            return Err(Error::Invalid(
                "stored ZFile blocks must start at a block boundary".into(),
            ));
        }
        if lens.iter().map(|&l| l as usize).sum::<usize>() != data.len() {
            return Err(Error::Invalid(
                "stored ZFile blocks do not add up to their lengths".into(),
            ));
        }
        // Everything before them goes out first, in order.
        self.submit_pending()?;
        let (sink, block_lens) = (&mut self.sink, &mut self.block_lens);
        self.engine.finish(&mut |d, l| {
            block_lens.extend_from_slice(l);
            sink.put(d)
        })?;
        self.sink.put(data)?;
        self.block_lens.extend_from_slice(lens);
        self.raw_size += lens.len() as u64 * self.opts.block_size as u64;
        Ok(())
    }

    /// Hand the pending bytes to the engine; finished jobs go to the sink.
    fn submit_pending(&mut self) -> Result<()> {
        let raw = std::mem::take(&mut self.pending);
        let (sink, lens) = (&mut self.sink, &mut self.block_lens);
        self.pending = self.engine.submit(raw, self.filled, &mut |d, l| {
            lens.extend_from_slice(l);
            sink.put(d)
        })?;
        self.filled = 0;
        Ok(())
    }

    /// Write the jump table and trailer (and rewrite the header if asked);
    /// returns the sink.
    pub fn finish(mut self) -> Result<S> {
        self.submit_pending()?;
        let (sink, lens) = (&mut self.sink, &mut self.block_lens);
        self.engine.finish(&mut |d, l| {
            lens.extend_from_slice(l);
            sink.put(d)
        })?;
        let index_offset = self.sink.position();
        let mut table = Vec::with_capacity(self.block_lens.len() * 4);
        for l in &self.block_lens {
            table.extend_from_slice(&l.to_le_bytes());
        }
        self.sink.put(&table)?;
        let mut h = self.header.clone();
        h.index_crc = crc32c_raw(0, &table);
        h.index_offset = index_offset;
        h.index_size = self.block_lens.len() as u64;
        h.original_size = self.raw_size;
        h.flags = ZF_DATA | ZF_SEALED | ZF_DIGEST;
        self.sink.put(&h.encode())?;
        if self.opts.overwrite_header {
            h.flags = ZF_HEADER | ZF_DATA | ZF_OVERWRITE | ZF_DIGEST;
            self.sink.put_at(&h.encode(), 0)?;
        }
        Ok(self.sink)
    }
}

/// Compress everything `src` yields into `sink`.
pub fn compress_stream<R: std::io::Read, S: BlobSink>(
    mut src: R,
    src_name: &Path,
    sink: S,
    opts: ZfileOptions,
) -> Result<S> {
    let mut w = ZFileWriter::new(sink, opts)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(src_name, e)),
        };
        w.write(&buf[..n])?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{MemSource, VecSink};

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 7) % 251) as u8 ^ ((i / 4096) as u8))
            .collect()
    }

    fn build(data: &[u8], opts: ZfileOptions) -> Vec<u8> {
        let mut w = ZFileWriter::new(VecSink::default(), opts).unwrap();
        for c in data.chunks(3000) {
            w.write(c).unwrap();
        }
        w.finish().unwrap().0
    }

    #[test]
    fn roundtrip_all_algorithms_and_block_sizes() {
        let data = sample(200_000);
        for algo in [Algorithm::Lz4, Algorithm::Zstd] {
            for bs in [4096, 8192, 65536] {
                for verify in [true, false] {
                    let z = build(
                        &data,
                        ZfileOptions {
                            algorithm: algo,
                            block_size: bs,
                            verify,
                            overwrite_header: true,
                            threads: 2,
                        },
                    );
                    let r = ZFileReader::open(Box::new(MemSource::new(z, "t.zfile"))).unwrap();
                    assert_eq!(r.size(), data.len() as u64);
                    let mut out = vec![0u8; data.len()];
                    assert_eq!(r.read_at(&mut out, 0).unwrap(), data.len());
                    assert_eq!(out, data);
                    // unaligned random access
                    let mut piece = vec![0u8; 10_000];
                    r.read_exact_at(&mut piece, 12_345).unwrap();
                    assert_eq!(&piece[..], &data[12_345..22_345]);
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_bytes() {
        let data = sample(9_000_000);
        let mk = |t| {
            build(
                &data,
                ZfileOptions {
                    threads: t,
                    ..Default::default()
                },
            )
        };
        assert_eq!(mk(1), mk(4));
    }

    #[test]
    fn header_flags_follow_overwrite_option() {
        let data = sample(10_000);
        let with = build(&data, ZfileOptions::default());
        let without = build(
            &data,
            ZfileOptions {
                overwrite_header: false,
                ..Default::default()
            },
        );
        assert_eq!(with[32], 0x1b);
        assert_eq!(without[32], 0x13);
        assert_eq!(&with[512..], &without[512..]);
        for z in [with, without] {
            let r = ZFileReader::open(Box::new(MemSource::new(z, "t"))).unwrap();
            let mut out = vec![0u8; data.len()];
            r.read_exact_at(&mut out, 0).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn corruption_is_reported() {
        let data = sample(50_000);
        let z = build(&data, ZfileOptions::default());
        let open = |b: Vec<u8>| ZFileReader::open(Box::new(MemSource::new(b, "bad.zfile")));
        // truncated
        let e = open(z[..z.len() - 100].to_vec()).unwrap_err().to_string();
        assert!(e.contains("bad.zfile"), "{e}");
        // bad magic
        let mut b = z.clone();
        b[0] = b'X';
        assert!(open(b).unwrap_err().to_string().contains("magic"));
        // header digest
        let mut b = z.clone();
        b[60] ^= 1;
        assert!(open(b).unwrap_err().to_string().contains("checksum"));
        // flipped data byte: per-block crc
        let mut b = z.clone();
        b[700] ^= 0xff;
        let r = open(b).unwrap();
        let mut out = vec![0u8; data.len()];
        let e = r.read_at(&mut out, 0).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("block 0"), "{e}");
        // tiny file
        assert!(open(vec![0u8; 10])
            .unwrap_err()
            .to_string()
            .contains("too small"));
    }
}
