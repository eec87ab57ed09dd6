//! sha256 digests (`sha256:<hex>`), streaming hashing and verification, chain ids.

use super::stream::{copy, CopyError};
use super::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

/// A content digest. Only `sha256` is supported (the only algorithm registries use for
/// images in practice); the value is validated on parse.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        let ok = s.len() == 71
            && s.starts_with("sha256:")
            && s[7..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Digest(s.to_string()))
        } else {
            Err(Error::InvalidDigest(s.to_string()))
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(s: String) -> Result<Digest> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Incremental sha256 that also counts bytes.
#[derive(Default, Clone)]
pub struct Sha256Writer {
    hasher: Sha256,
    len: u64,
}

impl Sha256Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_sha256(self.hasher.finalize().into()), self.len)
    }
}

impl Write for Sha256Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes what it passes on to `inner`.
pub struct HashingWriter<W> {
    pub inner: W,
    pub hash: Sha256Writer,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256Writer::new(),
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hash a whole reader (e.g. a file we wrote ourselves). Returns digest and length.
pub fn hash_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
    let mut h = Sha256Writer::new();
    copy(&mut r, &mut h, &|| false, &mut |_| {}).map_err(CopyError::into_io)?;
    Ok(h.finish())
}

/// Chain ids of a list of diff ids, as in the OCI image spec:
/// `chain[0] = diff[0]`, `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reject() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(d.as_str().to_uppercase().parse::<Digest>().is_err());
        assert!("sha512:00".parse::<Digest>().is_err());
        let j = serde_json::to_string(&d).unwrap();
        let back: Digest = serde_json::from_str(&j).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"md5:1\"").is_err());
    }

    #[test]
    fn chain_id_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let ch = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(ch[0], a);
        // Independently: sha256 over the ASCII text "<a> <b>".
        let mut h = Sha256::new();
        h.update(a.as_str());
        h.update(" ");
        h.update(b.as_str());
        let ab = Digest::from_sha256(h.finalize().into());
        assert_eq!(ch[1], ab);
        assert_eq!(ch[2], Digest::of(format!("{} {}", ab, c).as_bytes()));
    }
}

/// A reader that hashes what passes through and, at end of stream, checks the expected
/// size and digest. A mismatch (or more data than expected) is an `InvalidData` error
/// whose message names `what`.
pub struct VerifyReader<R> {
    inner: R,
    hasher: Option<Sha256Writer>,
    expected: Digest,
    /// `None`: only the digest is checked.
    expected_size: Option<u64>,
    /// Bytes read in all, once the end was reached.
    total: u64,
    what: String,
}

impl<R: Read> VerifyReader<R> {
    pub fn new(inner: R, expected: Digest, expected_size: u64, what: impl Into<String>) -> Self {
        VerifyReader {
            inner,
            hasher: Some(Sha256Writer::new()),
            expected,
            expected_size: Some(expected_size),
            total: 0,
            what: what.into(),
        }
    }

    /// A reader that checks only the digest at the end (an uncompressed
    /// layer against its `rootfs.diff_ids` entry: no size is recorded).
    pub fn digest_only(inner: R, expected: Digest, what: impl Into<String>) -> Self {
        VerifyReader {
            expected_size: None,
            ..Self::new(inner, expected, 0, what)
        }
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.hasher.as_ref().map_or(self.total, |h| h.len())
    }
}

impl<R: Read> Read for VerifyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(h) = self.hasher.as_mut() else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            h.update(&buf[..n]);
            if let Some(expected) = self.expected_size.filter(|&e| h.len() > e) {
                return Err(corrupt(Error::TooLong {
                    what: self.what.clone(),
                    expected,
                }));
            }
            return Ok(n);
        }
        let (d, len) = self.hasher.take().expect("checked above").finish();
        self.total = len;
        if let Some(expected) = self.expected_size.filter(|&e| e != len) {
            return Err(corrupt(Error::SizeMismatch {
                what: self.what.clone(),
                expected,
                actual: len,
            }));
        }
        if d != self.expected {
            return Err(corrupt(Error::DigestMismatch {
                what: self.what.clone(),
                expected: self.expected.to_string(),
                actual: d.to_string(),
            }));
        }
        Ok(0)
    }
}

/// A content mismatch as the `InvalidData` I/O error a reader returns; [`Error::from_io`]
/// gets the [`Error`] back.
fn corrupt(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod verify_tests {
    use super::*;

    #[test]
    fn verify_reader_accepts_and_rejects() {
        let data = b"hello world".to_vec();
        let d = Digest::of(&data);
        let mut out = Vec::new();
        VerifyReader::new(&data[..], d.clone(), 11, "blob")
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
        let e = VerifyReader::new(&b"hello worle"[..], d.clone(), 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        let e = VerifyReader::new(&data[..], d.clone(), 10, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = VerifyReader::new(&data[..5], d, 11, "blob")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("size mismatch"), "{e}");
    }
}
