//! The tar wrapper overlaybd puts around a layer blob (`overlaybd-commit -t`).
//!
//! Layout written by upstream and by us:
//! `PAX header "overlaybd.pax" (512) | PAX record "NN size=<len>\n" (512) |
//! ustar header "overlaybd.commit", mode 0100644, uid/gid 0 (root), mtime 0,
//! size field 0 (the real size is in the PAX record) (512) | blob, zero-padded
//! to 512 | two zero blocks`. Readers also accept a plain ustar or GNU entry
//! without PAX (Go's archive/tar wrapper of the base layer), trailing data
//! after the entry, and the size in octal or base-256.

use crate::error::{Error, Result};
use crate::source::ReadAt;

pub const BLOCK: u64 = 512;
/// Offset of the blob inside a wrapper we write.
pub const DATA_OFFSET: u64 = 3 * BLOCK;

fn octal(field: &mut [u8], value: u64, with_nul: bool) {
    let n = field.len();
    let s = if with_nul {
        format!("{:>w$o} ", value, w = n - 2)
    } else {
        format!("{:>w$o} ", value, w = n - 1)
    };
    let bytes = s.as_bytes();
    let take = bytes.len().min(n);
    field[..take].copy_from_slice(&bytes[bytes.len() - take..]);
    if with_nul {
        field[n - 1] = 0;
    }
}

fn checksum(h: &[u8; 512]) -> u64 {
    h.iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                b' ' as u64
            } else {
                b as u64
            }
        })
        .sum()
}

fn set_name(h: &mut [u8; 512], name: &str) {
    h[..name.len()].copy_from_slice(name.as_bytes());
}

fn finish(h: &mut [u8; 512]) {
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let c = checksum(h);
    octal(&mut h[148..156], c, true);
}

fn pax_record(key: &str, value: &str) -> String {
    let base = key.len() + value.len() + 3;
    let mut size = base + base.to_string().len();
    if size.to_string().len() + base != size {
        size = base + size.to_string().len();
    }
    format!("{size} {key}={value}\n")
}

/// The three header blocks placed before a blob of `len` bytes.
pub fn header_blocks(len: u64) -> [u8; 3 * BLOCK as usize] {
    let mut out = [0u8; 3 * BLOCK as usize];
    let record = pax_record("size", &len.to_string());
    let mut pax = [0u8; 512];
    set_name(&mut pax, "overlaybd.pax");
    octal(&mut pax[124..136], record.len() as u64, false);
    pax[156] = b'x';
    finish(&mut pax);
    out[..512].copy_from_slice(&pax);
    out[512..512 + record.len()].copy_from_slice(record.as_bytes());
    let mut h = [0u8; 512];
    set_name(&mut h, "overlaybd.commit");
    octal(&mut h[100..108], 0o100644, true);
    octal(&mut h[108..116], 0, true);
    octal(&mut h[116..124], 0, true);
    octal(&mut h[124..136], 0, false);
    octal(&mut h[136..148], 0, false);
    h[156] = b'0';
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    finish(&mut h);
    out[1024..].copy_from_slice(&h);
    out
}

/// Bytes that follow a blob of `len` bytes: zero padding to 512 plus two zero blocks.
pub fn trailer_len(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK - len + 2 * BLOCK
}

fn parse_numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // base-256, big endian, first byte's top bit is the marker
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let t = s.trim();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

fn is_header(h: &[u8; 512]) -> bool {
    if &h[257..262] != b"ustar" {
        return false;
    }
    match parse_numeric(&h[148..156]) {
        Some(c) => c == checksum(h),
        None => false,
    }
}

/// If `src` is a tar wrapper, return `(data offset, data length)` of its
/// first regular entry.
pub fn detect(src: &dyn ReadAt) -> Result<Option<(u64, u64)>> {
    let size = src.size();
    if size < BLOCK {
        return Ok(None);
    }
    let mut h = [0u8; 512];
    src.read_exact_at(&mut h, 0)?;
    if !is_header(&h) {
        return Ok(None);
    }
    let bad = |msg: String| Error::corrupt(src.path(), "tar wrapper", msg);
    let mut pax_size = None;
    let mut pos = 0u64;
    loop {
        let typ = h[156];
        let field = parse_numeric(&h[124..136])
            .ok_or_else(|| bad(format!("bad size field at offset {pos}")))?;
        let data = pos + BLOCK;
        match typ {
            b'x' | b'g' => {
                if field > 1 << 20 || data + field > size {
                    return Err(bad(format!(
                        "PAX header of {field} bytes at offset {pos} is invalid"
                    )));
                }
                let mut rec = vec![0u8; field as usize];
                src.read_exact_at(&mut rec, data)?;
                if typ == b'x' {
                    pax_size = parse_pax_size(&rec);
                }
                pos = data + field.div_ceil(BLOCK) * BLOCK;
            }
            b'0' | 0 | b'7' => {
                let len = pax_size.unwrap_or(field);
                if data.checked_add(len).is_none_or(|end| end > size) {
                    return Err(bad(format!(
                        "entry claims {len} bytes at offset {data} but the file has {size}"
                    )));
                }
                return Ok(Some((data, len)));
            }
            other => {
                return Err(bad(format!(
                    "unexpected entry type '{}' at offset {pos}; expected one regular file",
                    other as char
                )))
            }
        }
        if pos + BLOCK > size {
            return Err(bad("no file entry after the PAX header".into()));
        }
        src.read_exact_at(&mut h, pos)?;
        if !is_header(&h) {
            return Err(bad(format!("bad tar header at offset {pos}")));
        }
    }
}

fn parse_pax_size(rec: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(rec);
    for line in text.split('\n') {
        let Some((_, kv)) = line.split_once(' ') else {
            continue;
        };
        if let Some(v) = kv.strip_prefix("size=") {
            return v.trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    #[test]
    fn pax_record_lengths() {
        assert_eq!(pax_record("size", "3805060"), "16 size=3805060\n");
        assert_eq!(pax_record("size", "0"), "9 size=0\n");
        // 9 + len crosses 99 -> 100 boundary
        let v = "1".repeat(91);
        let r = pax_record("size", &v);
        assert_eq!(r.len().to_string(), r.split(' ').next().unwrap());
    }

    #[test]
    fn wrap_and_detect() {
        let blob = vec![7u8; 1000];
        let mut f = header_blocks(blob.len() as u64).to_vec();
        f.extend_from_slice(&blob);
        f.resize(f.len() + trailer_len(1000) as usize, 0);
        assert_eq!(f.len() % 512, 0);
        let src = MemSource::new(f.clone(), "w.tar");
        assert_eq!(detect(&src).unwrap(), Some((1536, 1000)));
        // GNU tar can read it
        let mut ar = tar::Archive::new(&f[..]);
        let mut entries = ar.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str().unwrap(), "overlaybd.commit");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut got).unwrap();
        assert_eq!(got, blob);
    }

    #[test]
    fn plain_file_is_not_tar() {
        let src = MemSource::new(vec![0u8; 4096], "x");
        assert_eq!(detect(&src).unwrap(), None);
    }

    #[test]
    fn truncated_entry_is_an_error() {
        let mut f = header_blocks(100_000).to_vec();
        f.extend_from_slice(&[1u8; 512]);
        let e = detect(&MemSource::new(f, "t.tar")).unwrap_err().to_string();
        assert!(e.contains("t.tar") && e.contains("100000"), "{e}");
    }
}
