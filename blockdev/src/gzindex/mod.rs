//! The `ddgzidx` gzip random-access index (`gzip.meta` of TurboOCI layers).
//!
//! Upstream: overlaybd `src/overlaybd/gzindex/`. The index lets a reader
//! start inflating a gzip blob at a few *access points* instead of at the
//! beginning. Layout (little endian, packed):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `"ddgzidx\0"` |
//! | 8 | 1+1 | major (1), minor (0) version |
//! | 10 | 1 | dict_compress_algo (0 none, 1 zlib) |
//! | 11 | 1 | dict_compress_level (i8, 6) |
//! | 12 | 1 | flag (0) |
//! | 13 | 4 | span: uncompressed bytes between access points (1 MiB) |
//! | 17 | 4 | window (32768) |
//! | 21 | 4 | entry size (29) |
//! | 25 | 8 | number of entries |
//! | 33 | 8 | size of the gzip blob |
//! | 41 | 8 | size of the index file |
//! | 49 | 8 | uncompressed size |
//! | 57 | 256 | reserved (zeros) |
//! | 313 | 8 | offset of the entry table |
//! | 321 | 8 | length of the entry table |
//! | 329 | 4 | crc: PhotonLibOS crc32c of bytes 0..329 (Castagnoli, start 0, no inversion) |
//!
//! Then one zlib stream per entry holding its 32 KiB inflate window (the 32
//! KiB of output before the access point, zeros before the start), back to
//! back from offset 333, and last the entry table as one zlib stream of
//! packed 29-byte entries: i64 uncompressed offset, i64 compressed offset,
//! i64 window offset, u8 bits (unused bits of the byte before the
//! compressed offset that belong to the next block, for `inflatePrime`),
//! u32 window length.
//!
//! Access points sit at deflate block boundaries: right after the gzip
//! header, then the last boundary at or before each multiple of the span.
//! [`build`] reproduces upstream's index byte for byte (same inflate
//! stepping, same zlib); [`GzFile`] reads the uncompressed stream at any
//! offset through it.

mod zlib;

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::io::IoFile;
use crate::source::ReadAt;

pub use zlib::zlib_version;

/// Magic at offset 0.
pub const MAGIC: [u8; 8] = *b"ddgzidx\0";
/// Size of the header.
pub const HEADER_SIZE: usize = 333;
/// Size of one packed entry.
pub const ENTRY_SIZE: usize = 29;
/// Inflate window size.
pub const WINDOW: usize = 32768;
/// The span turboOCI-apply uses.
pub const DEFAULT_SPAN: u32 = 1 << 20;
/// Smallest span upstream accepts (the largest uncompressed deflate block).
pub const MIN_SPAN: u32 = 65536;
/// zlib level of the windows and the table.
pub const DEFAULT_LEVEL: i8 = 6;
/// Input read per step while building, as upstream.
const BUILD_INPUT: usize = 32768;
/// Compressed input read per step while extracting.
const READ_INPUT: usize = 65536;
/// Uncompressed bytes cached per cache slot.
const CHUNK: u64 = 1 << 20;
/// Cache slots.
const CACHE_SLOTS: usize = 8;

const FORMAT: &str = "gzip index";

/// Whether `head` starts with the gzip magic `1f 8b`.
pub fn is_gzip(head: &[u8]) -> bool {
    head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b
}

/// PhotonLibOS's `crc32c`: Castagnoli polynomial, start value 0 and no
/// final inversion (the usual CRC-32C starts at and inverts with !0).
pub fn photon_crc32c(data: &[u8]) -> u32 {
    // crc32c_append(c, d) = !raw(!c, d); with c = !0: !raw(0, d).
    !crc32c::crc32c_append(!0, data)
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub major: u8,
    pub minor: u8,
    pub dict_compress_algo: u8,
    pub dict_compress_level: i8,
    pub flag: u8,
    pub span: i32,
    pub window: i32,
    pub entry_size: i32,
    pub index_num: i64,
    pub gzip_file_size: i64,
    pub index_file_size: i64,
    pub uncompressed_size: i64,
    pub index_start: i64,
    pub index_area_len: i64,
    pub crc: u32,
}

impl Header {
    fn encode_without_crc(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(&MAGIC);
        b[8] = self.major;
        b[9] = self.minor;
        b[10] = self.dict_compress_algo;
        b[11] = self.dict_compress_level as u8;
        b[12] = self.flag;
        b[13..17].copy_from_slice(&self.span.to_le_bytes());
        b[17..21].copy_from_slice(&self.window.to_le_bytes());
        b[21..25].copy_from_slice(&self.entry_size.to_le_bytes());
        b[25..33].copy_from_slice(&self.index_num.to_le_bytes());
        b[33..41].copy_from_slice(&self.gzip_file_size.to_le_bytes());
        b[41..49].copy_from_slice(&self.index_file_size.to_le_bytes());
        b[49..57].copy_from_slice(&self.uncompressed_size.to_le_bytes());
        b[313..321].copy_from_slice(&self.index_start.to_le_bytes());
        b[321..329].copy_from_slice(&self.index_area_len.to_le_bytes());
        b
    }

    /// Encode with a freshly computed crc.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = self.encode_without_crc();
        let crc = photon_crc32c(&b[..HEADER_SIZE - 4]);
        b[HEADER_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode (no validation besides the length).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let i32_at = |o: usize| i32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let i64_at = |o: usize| i64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Header {
            major: b[8],
            minor: b[9],
            dict_compress_algo: b[10],
            dict_compress_level: b[11] as i8,
            flag: b[12],
            span: i32_at(13),
            window: i32_at(17),
            entry_size: i32_at(21),
            index_num: i64_at(25),
            gzip_file_size: i64_at(33),
            index_file_size: i64_at(41),
            uncompressed_size: i64_at(49),
            index_start: i64_at(313),
            index_area_len: i64_at(321),
            crc: u32::from_le_bytes(b[329..333].try_into().expect("4 bytes")),
        }
    }
}

/// One access point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Offset in the uncompressed stream.
    pub de_pos: u64,
    /// Offset in the gzip blob of the first whole byte of the next block.
    pub en_pos: u64,
    /// Offset of the window's zlib stream in the index file.
    pub win_pos: u64,
    /// Bits of byte `en_pos - 1` that belong to the next block (0..=7).
    pub bits: u8,
    /// Length of the window's zlib stream.
    pub win_len: u32,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.de_pos.to_le_bytes());
        out.extend_from_slice(&self.en_pos.to_le_bytes());
        out.extend_from_slice(&self.win_pos.to_le_bytes());
        out.push(self.bits);
        out.extend_from_slice(&self.win_len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Entry {
            de_pos: u64_at(0),
            en_pos: u64_at(8),
            win_pos: u64_at(16),
            bits: b[24],
            win_len: u32::from_le_bytes(b[25..29].try_into().expect("4 bytes")),
        }
    }
}

/// What [`build`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// Size of the gzip blob (all bytes read, including any trailing data).
    pub gzip_size: u64,
    /// Size of the uncompressed stream (of the first gzip member).
    pub uncompressed_size: u64,
    /// Compressed size of the first gzip member (header and trailer included):
    /// less than `gzip_size` when other bytes follow it.
    pub member_size: u64,
    /// Access points written.
    pub entries: usize,
    /// Size of the index file.
    pub index_size: u64,
}

/// Errors of building an index (the blob's name is added by the caller).
fn blob_err(blob: &Path, msg: impl Into<String>) -> Error {
    Error::corrupt(blob, "gzip blob", msg)
}

/// Upstream's access-point filter: keeps, for each multiple of the span,
/// the last block boundary at or before it.
struct Recorder<W: Write> {
    span: u64,
    level: i8,
    expected: u64,
    last: Option<(u8, u64, u64, Box<[u8; WINDOW]>)>,
    entries: Vec<Entry>,
    out: W,
    pos: u64,
}

impl<W: Write> Recorder<W> {
    /// A block boundary at uncompressed `de` / compressed `en`; `window`
    /// is the circular output buffer whose next write position is
    /// `WINDOW - left`.
    fn record(&mut self, bits: u8, en: u64, de: u64, left: usize, window: &[u8]) -> Result<()> {
        if de < self.expected {
            self.keep(bits, en, de, left, window);
            return Ok(());
        }
        if de > self.expected {
            if let Some((b, e, d, w)) = self.last.take() {
                self.add(b, e, d, &w[..])?;
            }
            self.keep(bits, en, de, left, window);
            while self.expected < de {
                self.expected += self.span;
            }
        }
        if de == self.expected {
            self.last = None;
            let dict = linear_window(left, window);
            self.add(bits, en, de, &dict[..])?;
            self.expected += self.span;
        }
        Ok(())
    }

    fn keep(&mut self, bits: u8, en: u64, de: u64, left: usize, window: &[u8]) {
        let dict = linear_window(left, window);
        self.last = Some((bits, en, de, dict));
    }

    /// Write the window and remember the entry. `dict` is the linear window.
    fn add(&mut self, bits: u8, en: u64, de: u64, dict: &[u8]) -> Result<()> {
        let z = zlib::compress(self.level as i32, dict)
            .map_err(|rc| Error::Invalid(format!("zlib deflate failed ({rc})")))?;
        self.out.write_all(&z).map_err(Error::RawIo)?;
        self.entries.push(Entry {
            de_pos: de,
            en_pos: en,
            win_pos: self.pos,
            bits,
            win_len: z.len() as u32,
        });
        self.pos += z.len() as u64;
        Ok(())
    }
}

/// The last 32 KiB of output in order, from the circular `window` whose next
/// write position is `WINDOW - left` (as upstream rebuilds it).
fn linear_window(left: usize, window: &[u8]) -> Box<[u8; WINDOW]> {
    let mut d = Box::new([0u8; WINDOW]);
    if left > 0 {
        d[..left].copy_from_slice(&window[WINDOW - left..]);
    }
    if left < WINDOW {
        d[left..].copy_from_slice(&window[..WINDOW - left]);
    }
    d
}

/// Fill `buf` from `r` as far as possible (short only at end of input).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Builds the index of a gzip stream in one sequential pass while handing
/// out the stream's uncompressed bytes: read the uncompressed data
/// ([`Indexer::read_uncompressed`], or as a [`Read`]), then
/// [`Indexer::finish`] writes the entry table and the header. Reading the
/// whole stream through it and finishing equals [`build`]: the index is
/// byte-identical to upstream's `create_gz_index` with the same span.
pub struct Indexer<R: Read, W: Write + Seek> {
    blob: R,
    name: PathBuf,
    rec: Recorder<W>,
    inf: zlib::BlockInflater,
    inbuf: Vec<u8>,
    /// Valid input in `inbuf` and how much of it inflate consumed.
    n: usize,
    inp: usize,
    /// The circular output buffer (32 KiB: the inflate window).
    window: Vec<u8>,
    /// Where inflate writes before its output is copied into `window`:
    /// zlib-rs may use the output buffer past what it produced as scratch,
    /// which would clobber the older part of the circular window.
    scratch: Vec<u8>,
    /// Next write position in `window` (`WINDOW`: wrap before writing).
    out_pos: usize,
    /// Output of the last inflate call not yet handed out: `window[a..b]`.
    pending: (usize, usize),
    ttin: u64,
    ttout: u64,
    read_total: u64,
    /// The gzip member ended (its uncompressed size is `ttout`).
    ended: bool,
    /// A read failed: the indexer cannot go on.
    failed: bool,
}

impl<R: Read, W: Write + Seek> Indexer<R, W> {
    /// Index the gzip stream `blob` (named `name` in errors) into `out`,
    /// which must be empty: the header is written last, at offset 0.
    pub fn new(blob: R, name: &Path, mut out: W, span: u32) -> Result<Self> {
        if !(MIN_SPAN..=i32::MAX as u32).contains(&span) {
            return Err(Error::Invalid(format!(
                "gzip index span {span} is out of range ({MIN_SPAN}..2^31)"
            )));
        }
        out.seek(SeekFrom::Start(HEADER_SIZE as u64))
            .map_err(Error::RawIo)?;
        let inf = zlib::BlockInflater::new_gzip()
            .map_err(|rc| Error::Invalid(format!("zlib-rs inflate init failed ({rc})")))?;
        Ok(Indexer {
            blob,
            name: name.to_path_buf(),
            rec: Recorder {
                span: span as u64,
                level: DEFAULT_LEVEL,
                expected: 0,
                last: None,
                entries: Vec::new(),
                out,
                pos: HEADER_SIZE as u64,
            },
            inf,
            inbuf: vec![0u8; BUILD_INPUT],
            n: 0,
            inp: 0,
            window: vec![0u8; WINDOW],
            scratch: vec![0u8; WINDOW],
            out_pos: WINDOW, // avail_out = WINDOW - out_pos; 0 at the start
            pending: (0, 0),
            ttin: 0,
            ttout: 0,
            read_total: 0,
            ended: false,
            failed: false,
        })
    }

    /// Uncompressed bytes handed out or inflated so far.
    pub fn uncompressed_pos(&self) -> u64 {
        self.ttout
    }

    /// One inflate step as upstream steps (32 KiB of input at a time, up to
    /// a block boundary or the end of the window), recording access points;
    /// sets `pending` to what it produced. False at the end of the member.
    /// After an error the indexer cannot go on: [`Indexer::read_uncompressed`]
    /// marks it failed, [`Indexer::finish`] consumes it.
    fn step(&mut self) -> Result<bool> {
        loop {
            if self.ended {
                return Ok(false);
            }
            if self.inp == self.n {
                let n = read_full(&mut self.blob, &mut self.inbuf)
                    .map_err(|e| Error::io(&self.name, e))?;
                self.read_total += n as u64;
                if n == 0 {
                    return Err(blob_err(
                        &self.name,
                        format!(
                            "gzip stream ends early: truncated after {} bytes",
                            self.read_total
                        ),
                    ));
                }
                (self.n, self.inp) = (n, 0);
            }
            if self.out_pos == WINDOW {
                self.out_pos = 0;
            }
            let start = self.out_pos;
            let (ret, consumed, produced) = self.inf.inflate(
                &self.inbuf[self.inp..self.n],
                &mut self.scratch[..WINDOW - start],
            );
            self.window[start..start + produced].copy_from_slice(&self.scratch[..produced]);
            self.inp += consumed;
            self.out_pos += produced;
            self.ttin += consumed as u64;
            self.ttout += produced as u64;
            self.pending = (start, self.out_pos);
            if ret == zlib::BlockRet::StreamEnd {
                self.ended = true;
                self.refuse_next_member()?;
                return Ok(produced > 0);
            }
            let stuck =
                consumed == 0 && produced == 0 && self.inp < self.n && self.out_pos < WINDOW;
            let why = match ret {
                zlib::BlockRet::Error(rc) => Some(format!("zlib error {rc}")),
                _ if stuck => Some("inflate makes no progress".to_string()),
                _ => None,
            };
            if let Some(why) = why {
                return Err(blob_err(
                    &self.name,
                    format!(
                        "invalid gzip/deflate data near compressed offset {} ({why})",
                        self.ttin
                    ),
                ));
            }
            if let Some(b) = self.inf.boundary() {
                self.rec.record(
                    b.bits,
                    b.en,
                    self.ttout,
                    WINDOW - self.out_pos,
                    &self.window,
                )?;
            }
            if produced > 0 {
                return Ok(true);
            }
        }
    }

    /// At the end of the first gzip member: fails when another member
    /// follows (a multi-member gzip, RFC 1952 2.2). Upstream's index, like
    /// this one, covers the first member only and its reader ends there, so
    /// the rest of the stream would be silently missing from the layer.
    /// Other trailing bytes are counted in the blob size, as upstream does.
    fn refuse_next_member(&mut self) -> Result<()> {
        if self.n - self.inp < 2 {
            self.inbuf.copy_within(self.inp..self.n, 0);
            (self.n, self.inp) = (self.n - self.inp, 0);
            let k = read_full(&mut self.blob, &mut self.inbuf[self.n..])
                .map_err(|e| Error::io(&self.name, e))?;
            self.read_total += k as u64;
            self.n += k;
        }
        if is_gzip(&self.inbuf[self.inp..self.n]) {
            return Err(Error::Invalid(format!(
                "{}: multi-member gzip is not supported for TurboOCI: the first gzip member \
                 ends at compressed offset {} (uncompressed {}) and another one follows; the \
                 gzip index, as upstream's, covers the first member only",
                self.name.display(),
                self.ttin,
                self.ttout
            )));
        }
        Ok(())
    }

    /// Inflates what was not read yet, reads the rest of the blob (its size
    /// counts every byte, also those after the gzip member), writes the
    /// entry table and the header. Returns what was built and the output.
    pub fn finish(mut self) -> Result<(BuildInfo, W)> {
        if self.failed {
            return Err(Error::Invalid(format!(
                "{}: the gzip index cannot be finished after a failed read",
                self.name.display()
            )));
        }
        while self.step()? {}
        let mut sink = vec![0u8; 65536];
        loop {
            let k = read_full(&mut self.blob, &mut sink).map_err(|e| Error::io(&self.name, e))?;
            if k == 0 {
                break;
            }
            self.read_total += k as u64;
        }
        let rec = self.rec;
        let mut table = Vec::with_capacity(rec.entries.len() * ENTRY_SIZE);
        for e in &rec.entries {
            e.encode(&mut table);
        }
        let ztable = zlib::compress(DEFAULT_LEVEL as i32, &table)
            .map_err(|rc| Error::Invalid(format!("zlib deflate failed ({rc})")))?;
        let index_start = rec.pos;
        let entries = rec.entries.len();
        let mut out = rec.out;
        out.write_all(&ztable).map_err(Error::RawIo)?;
        let index_size = index_start + ztable.len() as u64;
        let h = Header {
            major: 1,
            minor: 0,
            dict_compress_algo: 1,
            dict_compress_level: DEFAULT_LEVEL,
            flag: 0,
            span: rec.span as i32,
            window: WINDOW as i32,
            entry_size: ENTRY_SIZE as i32,
            index_num: entries as i64,
            gzip_file_size: self.read_total as i64,
            index_file_size: index_size as i64,
            uncompressed_size: self.ttout as i64,
            index_start: index_start as i64,
            index_area_len: ztable.len() as i64,
            crc: 0,
        };
        out.seek(SeekFrom::Start(0)).map_err(Error::RawIo)?;
        out.write_all(&h.encode()).map_err(Error::RawIo)?;
        out.flush().map_err(Error::RawIo)?;
        Ok((
            BuildInfo {
                gzip_size: self.read_total,
                uncompressed_size: self.ttout,
                member_size: self.ttin,
                entries,
                index_size,
            },
            out,
        ))
    }
}

impl<R: Read, W: Write + Seek> Indexer<R, W> {
    /// Up to `buf.len()` uncompressed bytes; 0 at the end of the gzip
    /// member (or for an empty `buf`). After an error nothing more can be
    /// read.
    pub fn read_uncompressed(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pending.0 == self.pending.1 {
            if self.failed {
                return Err(blob_err(&self.name, "reading on after a failed read"));
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        let (a, b) = self.pending;
        let k = buf.len().min(b - a);
        buf[..k].copy_from_slice(&self.window[a..a + k]);
        self.pending.0 += k;
        Ok(k)
    }
}

/// The uncompressed stream ([`Indexer::read_uncompressed`]; errors carry
/// the [`Error`]).
impl<R: Read, W: Write + Seek> Read for Indexer<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_uncompressed(buf).map_err(std::io::Error::other)
    }
}

/// Build the index of the gzip stream read from `blob` into `out` (which
/// must be empty: the header is written last, at offset 0). `name` names
/// the blob in errors. Byte-identical to upstream's `create_gz_index` with
/// the same span (turboOCI-apply: [`DEFAULT_SPAN`]) and level 6.
pub fn build<R: Read, W: Write + Seek>(
    blob: R,
    name: &Path,
    out: &mut W,
    span: u32,
) -> Result<BuildInfo> {
    let ix = Indexer::new(blob, name, out, span)?;
    ix.finish().map(|(info, _)| info)
}

/// Build `index` (created or truncated) for the gzip blob at `blob`, as
/// `turboOCI-apply --gz_index_path` does. On error the index file is removed.
pub fn build_file(blob: &Path, index: &Path) -> Result<BuildInfo> {
    let f = std::fs::File::open(blob).map_err(|e| Error::io(blob, e))?;
    let r = std::io::BufReader::with_capacity(1 << 20, f);
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(index)
        .map_err(|e| Error::io(index, e))?;
    let mut w = std::io::BufWriter::new(out);
    let res = build(r, blob, &mut w, DEFAULT_SPAN).and_then(|info| {
        let f = w
            .into_inner()
            .map_err(|e| Error::io(index, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(index, e))?;
        Ok(info)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(index);
    }
    res.map_err(|e| match e {
        Error::RawIo(io) => Error::io(index, io),
        other => other,
    })
}

/// One cached piece of uncompressed data.
struct Slot {
    start: u64,
    data: Arc<Vec<u8>>,
}

/// The uncompressed stream of a gzip blob, read at any offset through its
/// index. A few recently inflated 1 MiB chunks are cached, so sequential
/// and nearby reads do not inflate the same data again.
pub struct GzFile {
    blob: Arc<dyn ReadAt>,
    index_path: PathBuf,
    index: Arc<dyn ReadAt>,
    header: Header,
    entries: Vec<Entry>,
    cache: Mutex<VecDeque<Slot>>,
}

impl std::fmt::Debug for GzFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GzFile")
            .field("blob", &self.blob.path())
            .field("index", &self.index_path)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl GzFile {
    /// Open the blob at `blob` through the index file at `index`.
    pub fn open_paths(blob: &Path, index: &Path) -> Result<GzFile> {
        crate::io::check_regular(blob, "a gzip layer blob")?;
        let f = Arc::new(IoFile::open(blob)?);
        let src = crate::source::FileSlice::whole(f)?;
        Self::open(Arc::new(src), index)
    }

    /// Open `blob` (the gzip bytes) through the index file at `index`. Every
    /// field of the index is validated against both files first.
    pub fn open(blob: Arc<dyn ReadAt>, index: &Path) -> Result<GzFile> {
        crate::io::check_regular(index, "a gzip index")?;
        let file = Arc::new(IoFile::open(index)?);
        let src = crate::source::FileSlice::whole(file)?;
        Self::open_source(blob, Arc::new(src))
    }

    /// [`Self::open`] with the index read from any source (a `gzip.meta`
    /// unpacked from a TurboOCI layer blob into memory, say); the source's
    /// `path()` names it in errors.
    pub fn open_source(blob: Arc<dyn ReadAt>, file: Arc<dyn ReadAt>) -> Result<GzFile> {
        let index = file.path().to_path_buf();
        let index = index.as_path();
        let bad = |msg: String| Error::corrupt(index, FORMAT, msg);
        let size = file.size();
        if size < HEADER_SIZE as u64 {
            return Err(bad(format!(
                "file is {size} bytes, smaller than the {HEADER_SIZE}-byte header"
            )));
        }
        let mut hb = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, 0)?;
        if hb[..8] != MAGIC {
            return Err(bad("bad magic (not a ddgzidx gzip index)".into()));
        }
        let h = Header::decode(&hb);
        let crc = photon_crc32c(&hb[..HEADER_SIZE - 4]);
        if crc != h.crc {
            return Err(bad(format!(
                "header checksum {:#010x} does not match the computed {crc:#010x}",
                h.crc
            )));
        }
        if h.major != 1 {
            return Err(bad(format!("unsupported major version {}", h.major)));
        }
        if h.entry_size != ENTRY_SIZE as i32 {
            return Err(bad(format!(
                "entry size {} is not {ENTRY_SIZE}",
                h.entry_size
            )));
        }
        if h.window != WINDOW as i32 {
            return Err(bad(format!("window size {} is not {WINDOW}", h.window)));
        }
        if h.dict_compress_algo > 1 {
            return Err(bad(format!(
                "unknown window compression {}",
                h.dict_compress_algo
            )));
        }
        if h.index_file_size != size as i64 {
            return Err(bad(format!(
                "header records a file size of {} but the file is {size} bytes",
                h.index_file_size
            )));
        }
        if h.index_start < HEADER_SIZE as i64
            || h.index_area_len < 0
            || h.index_start.checked_add(h.index_area_len) != Some(size as i64)
        {
            return Err(bad(format!(
                "entry table at {} (+{} bytes) does not end at the end of the file ({size} bytes)",
                h.index_start, h.index_area_len
            )));
        }
        let blob_size = blob.size();
        if h.gzip_file_size != blob_size as i64 {
            return Err(bad(format!(
                "index is for a gzip blob of {} bytes but {} has {blob_size}",
                h.gzip_file_size,
                blob.path().display()
            )));
        }
        if h.uncompressed_size < 0 || h.span < MIN_SPAN as i32 {
            return Err(bad(format!(
                "invalid uncompressed size {} or span {}",
                h.uncompressed_size, h.span
            )));
        }
        let usize_ = h.uncompressed_size as u64;
        // Deflate expands at most MAX_RATIO:1, which bounds the uncompressed
        // size, so the entry count, so what is read and allocated below.
        if usize_ > blob_size.saturating_mul(zlib::MAX_RATIO as u64) {
            return Err(bad(format!(
                "uncompressed size {usize_} is more than a gzip blob of {blob_size} bytes can hold"
            )));
        }
        let max_entries = usize_ / h.span as u64 + 2;
        if h.index_num < 1 || h.index_num as u64 > max_entries {
            return Err(bad(format!(
                "{} entries for {usize_} uncompressed bytes (expected 1..={max_entries})",
                h.index_num
            )));
        }
        let n = h.index_num as usize;
        let table_len = n * ENTRY_SIZE;
        let area_max = if h.dict_compress_algo == 1 {
            zlib::compress_bound(table_len)
        } else {
            table_len
        };
        if h.index_area_len as u64 > area_max as u64 {
            return Err(bad(format!(
                "entry table is {} bytes, more than {n} entries take ({area_max})",
                h.index_area_len
            )));
        }
        let mut area = vec![0u8; h.index_area_len as usize];
        file.read_exact_at(&mut area, h.index_start as u64)?;
        let table = if h.dict_compress_algo == 1 {
            zlib::decompress_exact(&area, n * ENTRY_SIZE)
                .ok_or_else(|| bad(format!("entry table is not a zlib stream of {n} entries")))?
        } else {
            if area.len() != n * ENTRY_SIZE {
                return Err(bad(format!(
                    "entry table is {} bytes, expected {}",
                    area.len(),
                    n * ENTRY_SIZE
                )));
            }
            area
        };
        let mut entries: Vec<Entry> = Vec::with_capacity(n);
        for (i, raw) in table.chunks_exact(ENTRY_SIZE).enumerate() {
            let e = Entry::decode(raw);
            let win_end = e.win_pos.checked_add(e.win_len as u64);
            // The first access point is the start of the stream (reads before
            // it would have nothing to inflate from); the rest are in order.
            let bad_entry = e.bits > 7
                || (i == 0 && e.de_pos != 0)
                || e.de_pos > usize_
                || e.en_pos > blob_size
                || (e.bits > 0 && e.en_pos == 0)
                || e.win_pos < HEADER_SIZE as u64
                || win_end.is_none_or(|end| end > h.index_start as u64)
                || (h.dict_compress_algo == 0 && e.win_len as usize != WINDOW)
                || entries.last().is_some_and(|p| p.de_pos > e.de_pos);
            if bad_entry {
                return Err(bad(format!(
                    "entry {i} is invalid (uncompressed {}, compressed {}, bits {}, window {}+{})",
                    e.de_pos, e.en_pos, e.bits, e.win_pos, e.win_len
                )));
            }
            entries.push(e);
        }
        Ok(GzFile {
            blob,
            index_path: index.to_path_buf(),
            index: file,
            header: h,
            entries,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The access point to start from for `offset`.
    fn entry_for(&self, offset: u64) -> &Entry {
        let i = self.entries.partition_point(|e| e.de_pos <= offset);
        &self.entries[i.saturating_sub(1)]
    }

    fn window(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; e.win_len as usize];
        self.index.read_exact_at(&mut raw, e.win_pos)?;
        if self.header.dict_compress_algo == 0 {
            return Ok(raw);
        }
        zlib::decompress_exact(&raw, WINDOW).ok_or_else(|| {
            Error::corrupt(
                &self.index_path,
                FORMAT,
                format!(
                    "window at {} (+{}) is not a zlib stream of {WINDOW} bytes",
                    e.win_pos, e.win_len
                ),
            )
        })
    }

    /// Inflate `buf.len()` bytes at uncompressed `offset` (already clipped
    /// to the stream) starting from the access point before it.
    fn extract(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let e = *self.entry_for(offset);
        let blob_err = |msg: String| {
            Error::corrupt(
                self.blob.path(),
                "gzip blob",
                format!("{msg} (through index {})", self.index_path.display()),
            )
        };
        let mut inf = zlib::Inflater::new(-15)
            .map_err(|rc| Error::Invalid(format!("zlib inflateInit2 failed ({rc})")))?;
        let mut pos = e.en_pos;
        if e.bits > 0 {
            let mut b = [0u8; 1];
            self.blob.read_exact_at(&mut b, e.en_pos - 1)?;
            let v = (b[0] as i32) >> (8 - e.bits as i32);
            if inf.prime(e.bits as i32, v) != zlib::Z_OK {
                return Err(blob_err(
                    "cannot resume inflation at the access point".into(),
                ));
            }
        }
        let dict = self.window(&e)?;
        if inf.set_dictionary(&dict) != zlib::Z_OK {
            return Err(blob_err("cannot set the inflate window".into()));
        }
        let mut skip = offset - e.de_pos;
        let mut discard = vec![0u8; READ_INPUT.min(skip as usize).max(1)];
        let mut inbuf = vec![0u8; READ_INPUT];
        let (mut have, mut used) = (0usize, 0usize);
        let mut done = 0usize;
        while done < buf.len() {
            if used == have {
                let n = self.blob.read_at(&mut inbuf, pos)?;
                if n == 0 {
                    return Err(blob_err(format!(
                        "gzip data ends early at compressed offset {pos}"
                    )));
                }
                pos += n as u64;
                have = n;
                used = 0;
            }
            let out: &mut [u8] = if skip > 0 {
                let k = (skip as usize).min(discard.len());
                &mut discard[..k]
            } else {
                &mut buf[done..]
            };
            let s = inf.inflate(&inbuf[used..have], out, zlib::Z_NO_FLUSH);
            used += s.consumed;
            if skip > 0 {
                skip -= s.produced as u64;
            } else {
                done += s.produced;
            }
            if s.consumed == 0 && s.produced == 0 && s.ret != zlib::Z_STREAM_END && used < have {
                return Err(blob_err(format!(
                    "inflation makes no progress after compressed offset {}",
                    e.en_pos
                )));
            }
            match s.ret {
                zlib::Z_OK | zlib::Z_BUF_ERROR => {}
                zlib::Z_STREAM_END => {
                    if skip > 0 || done < buf.len() {
                        return Err(blob_err(format!(
                            "deflate stream ends before uncompressed offset {}",
                            offset + buf.len() as u64
                        )));
                    }
                }
                rc => {
                    return Err(blob_err(format!(
                        "invalid deflate data after compressed offset {} (zlib error {rc})",
                        e.en_pos
                    )))
                }
            }
        }
        Ok(())
    }

    /// The cached chunk starting at `start` (a multiple of [`CHUNK`]).
    fn chunk(&self, start: u64) -> Result<Arc<Vec<u8>>> {
        {
            let mut c = self.cache.lock();
            if let Some(i) = c.iter().position(|s| s.start == start) {
                let s = c.remove(i).expect("index just found");
                let data = s.data.clone();
                c.push_front(s);
                return Ok(data);
            }
        }
        let len = CHUNK.min(self.size() - start) as usize;
        let mut data = vec![0u8; len];
        self.extract(&mut data, start)?;
        let data = Arc::new(data);
        let mut c = self.cache.lock();
        c.push_front(Slot {
            start,
            data: data.clone(),
        });
        c.truncate(CACHE_SLOTS);
        Ok(data)
    }
}

impl ReadAt for GzFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let start = at / CHUNK * CHUNK;
            let data = self.chunk(start)?;
            let o = (at - start) as usize;
            let k = (data.len() - o).min(n - done);
            buf[done..done + k].copy_from_slice(&data[o..o + k]);
            done += k;
        }
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.header.uncompressed_size as u64
    }

    fn path(&self) -> &Path {
        self.blob.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photon_crc_is_raw_castagnoli() {
        // Bitwise reference: reflected Castagnoli, start 0, no final xor.
        fn slow(data: &[u8]) -> u32 {
            let mut c = 0u32;
            for &b in data {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0x82F6_3B78
                    } else {
                        c >> 1
                    };
                }
            }
            c
        }
        for d in [&b""[..], b"a", b"123456789", &[0u8; 329][..]] {
            assert_eq!(photon_crc32c(d), slow(d));
        }
    }

    #[test]
    fn window_is_linearised() {
        let w: Vec<u8> = (0..WINDOW).map(|i| (i % 256) as u8).collect();
        let d = linear_window(100, &w);
        assert_eq!(&d[..100], &w[WINDOW - 100..]);
        assert_eq!(&d[100..], &w[..WINDOW - 100]);
        assert_eq!(&linear_window(WINDOW, &w)[..], &w[..]);
    }
}
