//! Benchmark helpers: deterministic, realistically compressible layer data.

/// `len` bytes that compress roughly like filesystem content (about 2:1
/// with lz4): runs of text-like bytes mixed with pseudo-random ones.
pub fn layer_like_data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    let words: [&[u8]; 8] = [
        b"the ",
        b"overlaybd ",
        b"layer ",
        b"block ",
        b"\0\0\0\0\0\0\0\0",
        b"ext4 ",
        b"data ",
        b"zfile ",
    ];
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x % 8) as usize]);
        }
    }
    out.truncate(len);
    out
}
