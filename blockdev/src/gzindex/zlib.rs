//! The few zlib calls the gzip index needs.
//!
//! Two libraries, each for what it does best:
//!
//! * Deflate (every access-point window and the entry table) and the
//!   random-access reader use the system C zlib: upstream wrote its index
//!   with Debian's zlib 1.2.13 at level 6, and other deflate
//!   implementations (zlib-rs, miniz, zlib-ng) produce different (equally
//!   valid) bytes, so a byte-identical `gzip.meta` needs the same library.
//! * Inflating while building the index ([`BlockInflater`]) uses zlib-rs
//!   (flate2's backend, with AVX2 paths), several times faster than the
//!   C inflate. It needs `inflate(Z_BLOCK)` and `data_type`, which flate2
//!   does not expose, so it goes through zlib-rs's `__internal-api`
//!   modules (pinned to an exact version). Inflate output is defined by the
//!   stream, so the windows are the same; only the bit position of a block
//!   boundary is reported differently (zlib-rs buffers up to 63 bits, C
//!   zlib fewer than 8), and [`BlockInflater::boundary`] converts it to C
//!   zlib's (byte offset, unused bits) form that the index stores.
//!
//! Every `unsafe` block of the crate's gzip code is in this file; the rest
//! uses the safe wrappers below.

use std::ffi::c_int;

use libz_sys as z;

pub(crate) const Z_OK: c_int = z::Z_OK;
pub(crate) const Z_STREAM_END: c_int = z::Z_STREAM_END;
pub(crate) const Z_BUF_ERROR: c_int = z::Z_BUF_ERROR;
pub(crate) const Z_NO_FLUSH: c_int = z::Z_NO_FLUSH;
pub(crate) const Z_FINISH: c_int = z::Z_FINISH;
#[cfg(test)]
const Z_BLOCK: c_int = z::Z_BLOCK;

/// zlib allocation callback (the C default would be the same calloc).
extern "C" fn zalloc(_opaque: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    // SAFETY: calloc has no preconditions; zlib checks for NULL.
    unsafe { libc::calloc(items as libc::size_t, size as libc::size_t) }
}

/// zlib free callback.
extern "C" fn zfree(_opaque: z::voidpf, address: z::voidpf) {
    // SAFETY: zlib only frees pointers it got from `zalloc` (calloc).
    unsafe { libc::free(address) }
}

/// The part of a buffer of `len` bytes one zlib call takes: zlib counts in
/// 32-bit `uInt`s, so a longer buffer is offered in pieces (each caller
/// goes on from what was consumed/produced). A plain `as` cast would wrap,
/// offering only `len mod 2^32` bytes while the caller counted `len`.
fn clamp(len: usize) -> z::uInt {
    len.min(z::uInt::MAX as usize) as z::uInt
}

fn new_stream() -> Box<z::z_stream> {
    // zlib keeps a pointer back to the stream in its state, so the stream
    // lives in a Box and never moves.
    Box::new(z::z_stream {
        next_in: std::ptr::null_mut(),
        avail_in: 0,
        total_in: 0,
        next_out: std::ptr::null_mut(),
        avail_out: 0,
        total_out: 0,
        msg: std::ptr::null_mut(),
        state: std::ptr::null_mut(),
        zalloc,
        zfree,
        opaque: std::ptr::null_mut(),
        data_type: 0,
        adler: 0,
        reserved: 0,
    })
}

/// Result of one [`Inflater::inflate`] call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub ret: c_int,
    pub consumed: usize,
    pub produced: usize,
}

/// An inflate stream (`inflateInit2`).
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream is owned exclusively; zlib keeps no thread-local state.
unsafe impl Send for Inflater {}

impl Inflater {
    /// `window_bits` as zlib's `inflateInit2` (47: gzip or zlib header, -15: raw).
    pub fn new(window_bits: c_int) -> Result<Self, c_int> {
        let mut strm = new_stream();
        // SAFETY: strm is a valid, boxed, initialised z_stream; the version
        // string and struct size are those of the linked header.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if rc != Z_OK {
            return Err(rc);
        }
        Ok(Inflater { strm })
    }

    /// Feed `bits` bits of `value` before the next input (`inflatePrime`).
    pub fn prime(&mut self, bits: c_int, value: c_int) -> c_int {
        // SAFETY: the stream was initialised by inflateInit2.
        unsafe { z::inflatePrime(&mut *self.strm, bits, value) }
    }

    /// Set the preset dictionary (`inflateSetDictionary`).
    pub fn set_dictionary(&mut self, dict: &[u8]) -> c_int {
        // SAFETY: the stream is initialised; dict is valid for its length and
        // only read.
        unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as z::uInt) }
    }

    /// One `inflate` call from `input` into `output` (at most 4 GiB - 1 of
    /// each: the caller goes on from what was consumed and produced).
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        let (in_len, out_len) = (clamp(input.len()), clamp(output.len()));
        self.strm.next_in = input.as_ptr() as *mut u8;
        self.strm.avail_in = in_len;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len;
        // SAFETY: next_in/next_out point into the borrowed slices for at
        // most their lengths (zlib never writes through next_in); the
        // pointers are not used after this call returns.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let step = Step {
            ret,
            consumed: (in_len - self.strm.avail_in) as usize,
            produced: (out_len - self.strm.avail_out) as usize,
        };
        self.strm.next_in = std::ptr::null_mut();
        self.strm.next_out = std::ptr::null_mut();
        step
    }

    /// `data_type` after the last call (C zlib: bits 0-2 unused bits of
    /// the last byte, 64 last block seen, 128 stopped at a block boundary).
    #[cfg(test)]
    fn data_type(&self) -> c_int {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised and is ended exactly once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

/// What a [`BlockInflater::inflate`] call ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockRet {
    /// Progress (or none possible: needs input or output space).
    Ok,
    /// The end of the gzip member.
    StreamEnd,
    /// Invalid data (or a zlib-rs failure); the zlib return code.
    Error(c_int),
}

/// A gzip inflate stream (zlib-rs) that stops at every deflate block
/// boundary (`Z_BLOCK`) and tells the exact bit position there.
pub(crate) struct BlockInflater {
    /// zlib-rs keeps no pointer back to the stream, but it stays boxed
    /// (like the C streams) so its address never matters.
    strm: Box<zlib_rs::c_api::z_stream>,
    /// Input bytes zlib-rs took so far (including those in its bit buffer).
    total_in: u64,
}

// SAFETY: the stream and the state it owns are used by one owner at a time;
// zlib-rs keeps no thread-local state.
unsafe impl Send for BlockInflater {}

/// Block boundary position in C zlib's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Boundary {
    /// Offset of the first input byte not (fully) consumed.
    pub en: u64,
    /// Unused bits of byte `en - 1` (0..=7) that belong to the next block.
    pub bits: u8,
}

impl BlockInflater {
    /// Inflate a gzip (or zlib) member (`inflateInit2(.., 47)`).
    pub fn new_gzip() -> Result<Self, c_int> {
        let mut strm = Box::new(zlib_rs::c_api::z_stream::default());
        let config = zlib_rs::inflate::InflateConfig { window_bits: 47 };
        let rc = zlib_rs::inflate::init(&mut strm, config);
        if rc != zlib_rs::ReturnCode::Ok {
            return Err(rc as c_int);
        }
        Ok(BlockInflater { strm, total_in: 0 })
    }

    fn stream(&mut self) -> &mut zlib_rs::inflate::InflateStream<'static> {
        // SAFETY: `strm` was initialised by `inflate::init` (checked in
        // `new_gzip`) and is only ended in Drop; InflateStream is the
        // layout-compatible view of an initialised z_stream.
        unsafe { zlib_rs::inflate::InflateStream::from_stream_mut(&mut *self.strm) }
            .expect("initialised zlib-rs stream")
    }

    /// One `inflate(Z_BLOCK)` call from `input` into `output`: returns what
    /// it ended with, input consumed, output produced.
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8]) -> (BlockRet, usize, usize) {
        let (in_len, out_len) = (clamp(input.len()), clamp(output.len()));
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len;
        let stream = self.stream();
        // SAFETY: next_in/next_out point into the borrowed slices for their
        // stated lengths (zlib-rs never writes through next_in); they are
        // reset below, before the borrows end.
        let rc = unsafe { zlib_rs::inflate::inflate(stream, zlib_rs::InflateFlush::Block) };
        let consumed = (in_len - self.strm.avail_in) as usize;
        let produced = (out_len - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        self.total_in += consumed as u64;
        let ret = match rc {
            zlib_rs::ReturnCode::Ok | zlib_rs::ReturnCode::BufError => BlockRet::Ok,
            zlib_rs::ReturnCode::StreamEnd => BlockRet::StreamEnd,
            other => BlockRet::Error(other as c_int),
        };
        (ret, consumed, produced)
    }

    /// After a call that stopped at a block boundary that is not after the
    /// last block (C zlib: `data_type & 128` set, `& 64` clear), its
    /// position in C zlib's form; `None` elsewhere.
    pub fn boundary(&self) -> Option<Boundary> {
        let dt = self.strm.data_type;
        if dt & 128 == 0 || dt & 64 != 0 {
            return None;
        }
        // zlib-rs: bits 0-5 are the bits still in its bit buffer (up to
        // 63), all taken from the input already counted in total_in.
        let held = (dt & 63) as u64;
        let bit_pos = self.total_in * 8 - held;
        // C zlib holds fewer than 8 bits at a boundary: it reports the
        // byte after the one holding the boundary, with the unused bits.
        let en = bit_pos.div_ceil(8);
        Some(Boundary {
            en,
            bits: (en * 8 - bit_pos) as u8,
        })
    }
}

impl Drop for BlockInflater {
    fn drop(&mut self) {
        let stream = self.stream();
        zlib_rs::inflate::end(stream);
    }
}

/// Compress `data` as one zlib stream at `level` (deflateInit + one
/// `deflate(Z_FINISH)`), as upstream's `zlib_compress` does.
pub(crate) fn compress(level: c_int, data: &[u8]) -> Result<Vec<u8>, c_int> {
    let mut strm = new_stream();
    // SAFETY: as in Inflater::new.
    let rc = unsafe {
        z::deflateInit_(
            &mut *strm,
            level,
            z::zlibVersion(),
            std::mem::size_of::<z::z_stream>() as c_int,
        )
    };
    if rc != Z_OK {
        return Err(rc);
    }
    // SAFETY: the stream was just initialised; deflateBound only reads it.
    let bound = unsafe { z::deflateBound(&mut *strm, data.len() as z::uLong) } as usize;
    let mut out = vec![0u8; bound + 64];
    // One deflate(Z_FINISH) call when the data and the output fit zlib's
    // 32-bit counts (always, in practice); larger data goes in pieces of
    // at most 4 GiB - 1 (Z_NO_FLUSH, then Z_FINISH with the last one).
    let (mut used, mut made) = (0usize, 0usize);
    let ret = loop {
        let (in_len, out_len) = (clamp(data.len() - used), clamp(out.len() - made));
        let flush = if used + in_len as usize == data.len() {
            Z_FINISH
        } else {
            Z_NO_FLUSH
        };
        strm.next_in = data[used..].as_ptr() as *mut u8;
        strm.avail_in = in_len;
        strm.next_out = out[made..].as_mut_ptr();
        strm.avail_out = out_len;
        // SAFETY: the pointers cover at most the rest of the borrowed input
        // and of the owned output buffer and are not used after the call.
        let ret = unsafe { z::deflate(&mut *strm, flush) };
        used += (in_len - strm.avail_in) as usize;
        made += (out_len - strm.avail_out) as usize;
        if ret != Z_OK {
            break ret;
        }
    };
    // SAFETY: initialised stream, ended once.
    unsafe { z::deflateEnd(&mut *strm) };
    if ret != Z_STREAM_END {
        return Err(ret);
    }
    out.truncate(made);
    Ok(out)
}

/// Inflate one complete zlib stream that must decompress to exactly
/// `expected` bytes. `None` if it is not a valid stream of that length.
pub(crate) fn decompress_exact(data: &[u8], expected: usize) -> Option<Vec<u8>> {
    // Deflate expands at most 1032:1 (a 258-byte match per 2 bits, rounded
    // up): a larger `expected` (from an index header) cannot be met, and
    // allocating it could abort the process.
    if expected > data.len().saturating_mul(MAX_RATIO).saturating_add(64) {
        return None;
    }
    let mut inf = Inflater::new(15).ok()?;
    // One spare byte detects streams longer than expected.
    let mut out = vec![0u8; expected + 1];
    // Inflate goes on from what each call took and made (one call takes
    // at most 4 GiB - 1 of each).
    let (mut used, mut made) = (0usize, 0usize);
    loop {
        let s = inf.inflate(&data[used..], &mut out[made..], Z_NO_FLUSH);
        used += s.consumed;
        made += s.produced;
        match s.ret {
            Z_STREAM_END => break,
            Z_OK if s.consumed + s.produced > 0 => {}
            _ => return None,
        }
    }
    if made != expected {
        return None;
    }
    out.truncate(expected);
    Some(out)
}

/// Deflate's largest expansion (output bytes per input byte).
pub(crate) const MAX_RATIO: usize = 1032;

/// The most bytes zlib's `compress` makes of `len` bytes (zlib's
/// `compressBound`, with the zlib wrapper).
pub(crate) fn compress_bound(len: usize) -> usize {
    len + (len >> 12) + (len >> 14) + (len >> 25) + 13
}

/// The version string of the linked zlib.
pub fn zlib_version() -> String {
    // SAFETY: zlibVersion returns a pointer to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(z::zlibVersion()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_roundtrip() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let c = compress(6, &data).unwrap();
        assert!(c.len() < data.len());
        assert_eq!(decompress_exact(&c, data.len()).unwrap(), data);
        assert!(decompress_exact(&c, data.len() - 1).is_none());
        // An impossible expected size is refused before anything is allocated.
        assert!(decompress_exact(&c, usize::MAX / 2).is_none());
        let zeros = compress(9, &vec![0u8; 1 << 20]).unwrap();
        assert_eq!(decompress_exact(&zeros, 1 << 20).unwrap().len(), 1 << 20);
        assert!(decompress_exact(&c[..c.len() / 2], data.len()).is_none());
    }

    /// Pseudo-random words: compresses to many deflate blocks of all kinds.
    fn text(len: usize) -> Vec<u8> {
        let words: [&[u8]; 8] = [
            b"usr ", b"lib ", b"x86_64", b"\n", b"share/", b"0", b"doc ", b"zz",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(16) {
                out.push((x >> 32) as u8);
            } else {
                out.extend_from_slice(words[(x >> 40) as usize % 8]);
            }
        }
        out.truncate(len);
        out
    }

    /// Slices longer than zlib's 32-bit counts are offered in pieces of at
    /// most 4 GiB - 1, and the counts returned are what zlib took and made
    /// (a wrapping cast offered `len mod 2^32` bytes and reported nearly
    /// the whole slice as consumed and produced). The 4 GiB buffers are
    /// zeroed allocations (calloc'd mappings) touched only at their start:
    /// they take address space, not memory.
    #[test]
    fn slices_over_4_gib_are_clamped() {
        assert_eq!(clamp(5), 5);
        assert_eq!(clamp(u32::MAX as usize), u32::MAX);
        assert_eq!(clamp((4usize << 30) + 7), u32::MAX);
        let data = text(100_000);
        let c = compress(6, &data).unwrap();
        let big = (4usize << 30) + 1000;
        let mut input = vec![0u8; big];
        input[..c.len()].copy_from_slice(&c);
        let mut output = vec![0u8; big];
        let mut inf = Inflater::new(15).unwrap();
        let s = inf.inflate(&input, &mut output, Z_NO_FLUSH);
        assert_eq!(
            (s.ret, s.consumed, s.produced),
            (Z_STREAM_END, c.len(), data.len())
        );
        assert!(output[..data.len()] == data[..]);
        let mut inf = BlockInflater::new_gzip().unwrap();
        let (mut used, mut made) = (0usize, 0usize);
        loop {
            let (ret, consumed, produced) = inf.inflate(&input[used..], &mut output[made..]);
            used += consumed;
            made += produced;
            if ret == BlockRet::StreamEnd {
                break;
            }
            assert_eq!(ret, BlockRet::Ok);
            assert!(consumed + produced > 0, "no progress");
        }
        assert_eq!((used, made), (c.len(), data.len()));
    }

    /// zlib-rs and C zlib stop at the same block boundaries, and
    /// `BlockInflater::boundary` gives C zlib's (byte, bits) there, fed in
    /// odd pieces with small output buffers (bit buffers at all fill levels).
    #[test]
    fn block_boundaries_match_c_zlib() {
        let data = text(3 << 20);
        let mut z = compress(6, &data).unwrap();
        z.extend(compress(1, &text(200_000)).unwrap()); // trailing bytes
        let boundaries_c = {
            let mut inf = Inflater::new(47).unwrap();
            let (mut pos, mut out, mut seen) = (0usize, 0u64, Vec::new());
            let mut buf = vec![0u8; 7000];
            loop {
                let end = (pos + 1237).min(z.len());
                let s = inf.inflate(&z[pos..end], &mut buf, Z_BLOCK);
                pos += s.consumed;
                out += s.produced as u64;
                if s.ret == Z_STREAM_END {
                    break;
                }
                assert!(s.ret == Z_OK || s.ret == Z_BUF_ERROR, "{}", s.ret);
                let dt = inf.data_type();
                if dt & 128 != 0 && dt & 64 == 0 {
                    seen.push((out, pos as u64, (dt & 7) as u8));
                }
            }
            seen
        };
        let boundaries_rs = {
            let mut inf = BlockInflater::new_gzip().unwrap();
            let (mut pos, mut out, mut seen) = (0usize, 0u64, Vec::new());
            let mut buf = vec![0u8; 5000];
            loop {
                let end = (pos + 3001).min(z.len());
                let (ret, consumed, produced) = inf.inflate(&z[pos..end], &mut buf);
                pos += consumed;
                out += produced as u64;
                if ret == BlockRet::StreamEnd {
                    break;
                }
                assert_eq!(ret, BlockRet::Ok);
                if let Some(b) = inf.boundary() {
                    seen.push((out, b.en, b.bits));
                }
            }
            seen
        };
        assert!(boundaries_c.len() > 20, "{}", boundaries_c.len());
        assert!(boundaries_c.iter().any(|b| b.2 != 0));
        assert_eq!(boundaries_rs, boundaries_c);
    }
}
