//! gzip inflate through Intel's ISA-L (`libisal`, Debian `libisal-dev`), 1.15-1.2x
//! the speed of zlib-rs on the benchmark layers (`examples/inflate_bench.rs`). gzip is
//! RFC 1952, one or more members back to back, each a header, a deflate stream and a
//! trailer (CRC-32 and length of the member's data, both checked here). ISA-L's state is
//! reached only through the C shim `isal_shim.c`, compiled against the installed header
//! by `build.rs`, which sets `cfg(isal)` when the library is found.

use std::io::{self, BufRead, Read};
use std::ptr::NonNull;

#[repr(C)]
struct State {
    _opaque: [u8; 0],
}

extern "C" {
    fn obd_isal_new() -> *mut State;
    fn obd_isal_reset(s: *mut State);
    fn obd_isal_free(s: *mut State);
    fn obd_isal_inflate(
        s: *mut State,
        input: *const u8,
        in_len: u32,
        out: *mut u8,
        out_len: u32,
        consumed: *mut u32,
        produced: *mut u32,
        finished: *mut i32,
    ) -> i32;
}

/// ISA-L's `isal_inflate` error codes, in words.
fn describe(code: i32) -> &'static str {
    match code {
        -1 => "invalid deflate block",
        -2 => "invalid deflate symbol",
        -3 => "invalid deflate distance",
        -4 => "invalid gzip header",
        -5 => "unsupported gzip compression method",
        -6 => "gzip checksum mismatch",
        _ => "corrupt gzip data",
    }
}

/// Inflates a multi-member gzip stream read from `R` (as flate2's
/// `MultiGzDecoder`): the members' data back to back; the stream must end where a
/// member ends.
pub struct GzDecoder<R> {
    inner: R,
    state: NonNull<State>,
    /// The current member is complete (trailer checked).
    member_done: bool,
    eof: bool,
    /// Compressed bytes consumed so far (for error messages).
    pos: u64,
    /// Where the current member began, when a complete member came before it
    /// (bytes that follow the last member but are no gzip member are trailing
    /// garbage, and said so).
    next_member_at: Option<u64>,
    /// The current member produced data.
    member_output: bool,
}

// SAFETY: the ISA-L state is plain memory owned by this decoder alone; ISA-L keeps no
// thread-local or global state for it.
unsafe impl<R: Send> Send for GzDecoder<R> {}

impl<R: BufRead> GzDecoder<R> {
    pub fn new(inner: R) -> io::Result<GzDecoder<R>> {
        // SAFETY: allocates and initialises a state; NULL only when out of memory.
        let state = NonNull::new(unsafe { obd_isal_new() })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "ISA-L inflate state"))?;
        Ok(GzDecoder {
            inner,
            state,
            member_done: false,
            eof: false,
            pos: 0,
            next_member_at: None,
            member_output: false,
        })
    }

    /// The error for bytes after a complete member that are no gzip member. Without
    /// a count: only the bytes the inflater took before it gave up were read (a few,
    /// of maybe megabytes), and reading the rest only to count it is not worth it.
    fn trailing(&self) -> Option<io::Error> {
        let at = self.next_member_at.filter(|_| !self.member_output)?;
        Some(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("data that is not gzip follows the last gzip member (at compressed byte {at})"),
        ))
    }

    fn corrupt(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} (near compressed byte {})", self.pos),
        )
    }
}

impl<R> Drop for GzDecoder<R> {
    fn drop(&mut self) {
        // SAFETY: the state came from obd_isal_new and is freed once, here.
        unsafe { obd_isal_free(self.state.as_ptr()) }
    }
}

impl<R: BufRead> Read for GzDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.eof {
            return Ok(0);
        }
        let out_len = out.len().min(u32::MAX as usize);
        loop {
            let input = self.inner.fill_buf()?;
            if self.member_done {
                if input.is_empty() {
                    self.eof = true;
                    return Ok(0);
                }
                // Another member follows.
                // SAFETY: a valid state owned by self.
                unsafe { obd_isal_reset(self.state.as_ptr()) };
                self.member_done = false;
                self.next_member_at = Some(self.pos);
                self.member_output = false;
            }
            let in_len = input.len().min(u32::MAX as usize);
            let at_end = input.is_empty();
            let (mut consumed, mut produced, mut finished) = (0u32, 0u32, 0i32);
            // SAFETY: `input` and `out` are live slices of at least the lengths passed;
            // ISA-L reads at most in_len bytes of one and writes at most out_len bytes
            // of the other, and uses neither pointer after returning (the state still
            // holds them, but the shim sets both anew before every call).
            let code = unsafe {
                obd_isal_inflate(
                    self.state.as_ptr(),
                    input.as_ptr(),
                    in_len as u32,
                    out.as_mut_ptr(),
                    out_len as u32,
                    &mut consumed,
                    &mut produced,
                    &mut finished,
                )
            };
            self.inner.consume(consumed as usize);
            self.pos += u64::from(consumed);
            if code < 0 {
                return Err(self
                    .trailing()
                    .unwrap_or_else(|| self.corrupt(describe(code))));
            }
            if finished != 0 {
                self.member_done = true;
            }
            if produced > 0 {
                self.member_output = true;
                return Ok(produced as usize);
            }
            if self.member_done {
                continue;
            }
            if at_end {
                if let Some(e) = self.trailing() {
                    return Err(e);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "truncated deflate stream: the gzip data ends inside a member, \
                         after {} compressed bytes",
                        self.pos
                    ),
                ));
            }
            if consumed == 0 {
                // Input and output space were offered and nothing moved.
                return Err(self.corrupt("gzip inflate made no progress"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Write};

    fn gz(data: &[u8], level: u32, name: Option<&str>) -> Vec<u8> {
        let mut b = flate2::GzBuilder::new();
        if let Some(n) = name {
            b = b.filename(n).extra(vec![1, 2, 3]).comment("c");
        }
        let mut e = b.write(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sample(n: usize) -> Vec<u8> {
        // Text-like with repeats, plus a stretch of noise.
        let mut v: Vec<u8> = (0..n)
            .map(|i| b"overlaybd layer data "[i % 21] ^ ((i / 997) as u8 & 3))
            .collect();
        let mut x = 0x2545F491u32;
        for b in v.iter_mut().skip(n / 3).take(n / 5) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        v
    }

    fn inflate(input: &[u8], cap: usize, chunk: usize) -> io::Result<Vec<u8>> {
        let mut d = GzDecoder::new(BufReader::with_capacity(cap, input))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn members_headers_and_odd_buffers_match_flate2() {
        let data = sample(3 << 20);
        let mut stream = gz(&data[..1 << 20], 6, None);
        stream.extend(gz(&data[1 << 20..(1 << 20) + 5], 1, Some("name.tar")));
        stream.extend(gz(&[], 9, None));
        stream.extend(gz(&data[(1 << 20) + 5..], 0, Some("stored")));
        let mut want = Vec::new();
        flate2::read::MultiGzDecoder::new(&stream[..])
            .read_to_end(&mut want)
            .unwrap();
        assert_eq!(want, data);
        for (cap, chunk) in [(1 << 20, 1 << 20), (1, 7), (13, 65536), (4096, 1)] {
            assert_eq!(inflate(&stream, cap, chunk).unwrap(), data, "{cap}/{chunk}");
        }
    }

    #[test]
    fn corrupt_and_truncated_streams_are_errors() {
        let data = sample(200_000);
        let good = gz(&data, 6, None);
        // The CRC-32 in the trailer.
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        let e = inflate(&bad_crc, 1 << 16, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
        // The length in the trailer.
        let mut bad_len = good.clone();
        bad_len[n - 1] ^= 1;
        assert!(inflate(&bad_len, 1 << 16, 1 << 16).is_err());
        // Cut inside the deflate data, and inside the trailer.
        for cut in [good.len() / 2, good.len() - 3] {
            let e = inflate(&good[..cut], 1 << 16, 1 << 16).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{cut}: {e}");
        }
        // Garbage after a complete member is not another member.
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"not gzip");
        assert!(inflate(&trailing, 1 << 16, 1 << 16).is_err());
        // Damaged deflate data.
        let mut flipped = good;
        for i in (20..flipped.len() - 8).step_by(97) {
            flipped[i] ^= 0x5a;
        }
        assert!(inflate(&flipped, 1 << 16, 1 << 16).is_err());
    }

    /// Bytes after the last member that are not gzip are named as such, not as
    /// a truncated member; a truncated second member still is one.
    #[test]
    fn trailing_garbage_is_named() {
        let mut blob = gz(&sample(100_000), 6, None);
        let member = blob.len();
        blob.extend_from_slice(b"JUNKJUNK");
        let mut out = Vec::new();
        let e = GzDecoder::new(BufReader::new(&blob[..]))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err()
            .to_string();
        // No count: the decoder read only a few of the bytes that follow.
        assert_eq!(
            e,
            format!(
                "data that is not gzip follows the last gzip member (at compressed byte {member})"
            )
        );
        let second = gz(&sample(50_000), 6, None);
        let mut cut = gz(&sample(100_000), 6, None);
        cut.extend_from_slice(&second[..second.len() / 2]);
        let e = GzDecoder::new(BufReader::new(&cut[..]))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated deflate stream"), "{e}");
    }
}
