//! Layer decompression (the convertor and `overlaybd-apply`): the format is sniffed from the first bytes (gzip `1f 8b`,
//! zstd `28 b5 2f fd`, otherwise an uncompressed tar), not taken from the media type.
//! bzip2 and xz layers are refused with a clear error.
//!
//! gzip is inflated by ISA-L when the build found it ([`crate::isal`], Debian
//! `libisal-dev`), else by zlib-rs; `OBD_INFLATE=zlib-rs` in the environment picks
//! zlib-rs anyway (to compare, or to rule ISA-L out).

use std::io::{self, BufRead, BufReader, Read};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Classify by magic bytes.
pub fn sniff(head: &[u8]) -> io::Result<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if head.starts_with(b"BZh") {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bzip2-compressed layers are not supported",
        ))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "xz-compressed layers are not supported",
        ))
    } else {
        Ok(Compression::None)
    }
}

/// The gzip inflater [`decoder`] uses: `"isa-l"` or `"zlib-rs"`.
pub fn gzip_inflater() -> &'static str {
    #[cfg(isal)]
    if std::env::var("OBD_INFLATE").map_or(true, |v| v != "zlib-rs") {
        return "isa-l";
    }
    "zlib-rs"
}

/// Wrap `r` in the decoder its first bytes call for. Returns the decoder and the kind.
pub fn decoder<'a, R: Read + 'a>(r: R) -> io::Result<(Box<dyn Read + 'a>, Compression)> {
    let mut br = BufReader::with_capacity(1 << 20, r);
    let head = br.fill_buf()?;
    let kind = sniff(head)?;
    let out: Box<dyn Read + 'a> = match kind {
        #[cfg(isal)]
        Compression::Gzip if gzip_inflater() == "isa-l" => {
            Box::new(crate::isal::GzDecoder::new(br)?)
        }
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
        Compression::None => Box::new(br),
    };
    Ok((out, kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniff_and_decode_each_format() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data[..100_000]).unwrap();
        let mut g = gz.finish().unwrap();
        // A second gzip member must be decoded too.
        let mut gz2 = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz2.write_all(&data[100_000..]).unwrap();
        g.extend(gz2.finish().unwrap());
        let z = zstd::encode_all(&data[..], 3).unwrap();
        for (input, kind) in [
            (g, Compression::Gzip),
            (z, Compression::Zstd),
            (data.clone(), Compression::None),
        ] {
            let (mut d, k) = decoder(&input[..]).unwrap();
            assert_eq!(k, kind);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{kind}");
        }
        assert!(decoder(&b"BZh91AY"[..]).is_err());
    }
}
