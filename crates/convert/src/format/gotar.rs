//! Tar archives as upstream's Go convertor writes them with `archive/tar` from a header
//! holding only `Name`, `Mode`, `Size` and `Typeflag` (no owner, no times): USTAR
//! headers with every numeric field octal, zero-padded and NUL-terminated (uid, gid and
//! mtime 0, devmajor/devminor "0000000"), magic `ustar\0` version `00`, empty user and
//! group names, the checksum as six octal digits, NUL, space; each file's data padded to
//! 512 bytes; two zero blocks at the end (Go pads to no record size).
//!
//! Used for the `--mkfs=false` base layer of native images (`overlaybd.commit`, mode
//! 0444) and for TurboOCI's `turboOCIv1.tar.gz`.

use std::io::{self, Read, Write};

/// Tar block size.
pub const BLOCK: usize = 512;

/// Largest size the 12-byte octal size field holds (11 digits): 8 GiB - 1.
pub const MAX_USTAR_SIZE: u64 = (1 << 33) - 1;

/// A regular-file header as Go's `archive/tar` writes it for `{Name, Mode, Size,
/// Typeflag: '0'}`. A name that does not fit the 100-byte name field, or a size
/// or mode beyond the octal fields (where Go would switch to a PAX header), is an
/// `InvalidInput` error.
pub fn go_ustar_header(name: &str, mode: u32, size: u64) -> io::Result<[u8; BLOCK]> {
    if name.len() >= 100 || size > MAX_USTAR_SIZE || mode > 0o7777777 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "tar member {name:?} (mode {mode:o}, {size} bytes) does not fit a ustar header \
                 (names under 100 bytes, sizes up to {MAX_USTAR_SIZE})"
            ),
        ));
    }
    let mut h = [0u8; BLOCK];
    let oct = |h: &mut [u8; BLOCK], off: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}", w = len - 1);
        h[off..off + len - 1].copy_from_slice(s.as_bytes());
        h[off + len - 1] = 0;
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    oct(&mut h, 100, 8, mode as u64);
    oct(&mut h, 108, 8, 0);
    oct(&mut h, 116, 8, 0);
    oct(&mut h, 124, 12, size);
    oct(&mut h, 136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    oct(&mut h, 329, 8, 0);
    oct(&mut h, 337, 8, 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
    Ok(h)
}

/// Writes regular files into a tar as Go's `archive/tar` does (see the module doc).
pub struct GoTarWriter<W: Write> {
    out: W,
}

impl<W: Write> GoTarWriter<W> {
    pub fn new(out: W) -> Self {
        GoTarWriter { out }
    }

    /// Appends a file of `size` bytes read from `data` (which must hold exactly that).
    pub fn append(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        self.out.write_all(&go_ustar_header(name, mode, size)?)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: {copied} bytes where {size} were expected"),
            ));
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.out.write_all(&[0u8; BLOCK][..pad as usize])
    }

    /// Writes the end-of-archive blocks and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_header_is_valid_ustar() {
        let h = go_ustar_header("overlaybd.commit", 0o444, 12345).unwrap();
        let mut data = h.to_vec();
        data.extend(vec![7u8; 12345]);
        data.extend(vec![0u8; (512 - 12345 % 512) + 1024]);
        let mut a = tar::Archive::new(&data[..]);
        let mut n = 0;
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.path().unwrap().to_str().unwrap(), "overlaybd.commit");
            assert_eq!(e.header().mode().unwrap(), 0o444);
            assert_eq!(e.header().size().unwrap(), 12345);
            assert_eq!(e.header().mtime().unwrap(), 0);
            n += 1;
        }
        assert_eq!(n, 1);
    }

    /// The bytes of Go's `archive/tar` for `Header{Name: "a", Mode: 0644, Size: 3,
    /// Typeflag: '0'}` + "abc" + Close(), written down field by field.
    #[test]
    fn writer_matches_go_layout() {
        let mut w = GoTarWriter::new(Vec::new());
        w.append("a", 0o644, 3, &mut &b"abc"[..]).unwrap();
        w.append(".empty", 0o644, 0, &mut &b""[..]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len(), 512 + 512 + 512 + 1024);
        let h = &out[..512];
        assert_eq!(&h[..2], b"a\0");
        assert_eq!(&h[100..108], b"0000644\0");
        assert_eq!(&h[108..116], b"0000000\0");
        assert_eq!(&h[116..124], b"0000000\0");
        assert_eq!(&h[124..136], b"00000000003\0");
        assert_eq!(&h[136..148], b"00000000000\0");
        assert_eq!(h[156], b'0');
        assert!(h[157..257].iter().all(|&b| b == 0), "no link name");
        assert_eq!(&h[257..265], b"ustar\x0000");
        assert!(h[265..329].iter().all(|&b| b == 0), "no user or group name");
        assert_eq!(&h[329..337], b"0000000\0");
        assert_eq!(&h[337..345], b"0000000\0");
        assert!(h[345..].iter().all(|&b| b == 0), "no prefix");
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u32
                }
            })
            .sum();
        assert_eq!(&h[148..156], format!("{sum:06o}\0 ").as_bytes());
        assert_eq!(&out[512..515], b"abc");
        assert!(out[515..1024].iter().all(|&b| b == 0));
        assert_eq!(&out[1024..1031], b".empty\0");
        assert!(out[1536..].iter().all(|&b| b == 0));
        let names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a", ".empty"]);
    }

    /// What the octal fields cannot hold is an error, not a panic (the size
    /// field overflowed its slice at 8 GiB).
    #[test]
    fn what_ustar_cannot_hold_is_an_error() {
        let h = go_ustar_header("big", 0o644, MAX_USTAR_SIZE).unwrap();
        assert_eq!(&h[124..136], b"77777777777\0");
        for (name, size) in [("big", MAX_USTAR_SIZE + 1), ("big", u64::MAX)] {
            let e = go_ustar_header(name, 0o644, size).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{size}");
            assert!(e.to_string().contains(&format!("{size} bytes")), "{e}");
        }
        let long = "n".repeat(100);
        let e = go_ustar_header(&long, 0o644, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let mut w = GoTarWriter::new(Vec::new());
        let e = w
            .append("big", 0o644, MAX_USTAR_SIZE + 1, &mut &b""[..])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn short_data_is_an_error() {
        let mut w = GoTarWriter::new(Vec::new());
        let e = w.append("a", 0o644, 10, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
