//! The few zlib calls the gzip index needs, over the system libz.
//!
//! Why the C zlib and not flate2's Rust backend: the index stores every
//! access-point window and its entry table as zlib streams, and upstream
//! wrote them with Debian's zlib 1.2.13 at level 6. Other deflate
//! implementations (zlib-rs, miniz, zlib-ng) produce different (equally
//! valid) bytes, so a byte-identical `gzip.meta` needs the same library.
//! Building the index also needs `inflate(Z_BLOCK)`, `data_type` and
//! `inflatePrime`, which flate2 does not expose.
//!
//! Every `unsafe` block of the crate's gzip code is in this file; the rest
//! uses the safe wrappers below.

use std::ffi::c_int;

use libz_sys as z;

pub(crate) const Z_OK: c_int = z::Z_OK;
pub(crate) const Z_STREAM_END: c_int = z::Z_STREAM_END;
pub(crate) const Z_BUF_ERROR: c_int = z::Z_BUF_ERROR;
pub(crate) const Z_NO_FLUSH: c_int = z::Z_NO_FLUSH;
pub(crate) const Z_BLOCK: c_int = z::Z_BLOCK;
pub(crate) const Z_FINISH: c_int = z::Z_FINISH;

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

    /// One `inflate` call from `input` into `output`.
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        self.strm.next_in = input.as_ptr() as *mut u8;
        self.strm.avail_in = input.len() as z::uInt;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = output.len() as z::uInt;
        // SAFETY: next_in/next_out point into the borrowed slices for their
        // stated lengths (zlib never writes through next_in); the pointers
        // are not used after this call returns.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let step = Step {
            ret,
            consumed: input.len() - self.strm.avail_in as usize,
            produced: output.len() - self.strm.avail_out as usize,
        };
        self.strm.next_in = std::ptr::null_mut();
        self.strm.next_out = std::ptr::null_mut();
        step
    }

    /// `data_type` after the last call: bits 0-2 unused bits of the last
    /// byte, 64 last block seen, 128 stopped at a block boundary.
    pub fn data_type(&self) -> c_int {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised and is ended exactly once.
        unsafe { z::inflateEnd(&mut *self.strm) };
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
    strm.next_in = data.as_ptr() as *mut u8;
    strm.avail_in = data.len() as z::uInt;
    strm.next_out = out.as_mut_ptr();
    strm.avail_out = out.len() as z::uInt;
    // SAFETY: the pointers cover the borrowed input and the owned output
    // buffer for their stated lengths and are not used after the call.
    let ret = unsafe { z::deflate(&mut *strm, Z_FINISH) };
    let produced = out.len() - strm.avail_out as usize;
    // SAFETY: initialised stream, ended once.
    unsafe { z::deflateEnd(&mut *strm) };
    if ret != Z_STREAM_END {
        return Err(ret);
    }
    out.truncate(produced);
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
    let s = inf.inflate(data, &mut out, Z_FINISH);
    if s.ret != Z_STREAM_END || s.produced != expected {
        return None;
    }
    out.truncate(expected);
    Some(out)
}

/// Deflate's largest expansion (output bytes per input byte).
const MAX_RATIO: usize = 1032;

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
}
