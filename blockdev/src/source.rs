//! Random-access byte sources and sequential sinks used by the formats.
//!
//! A layer blob may sit inside a tar wrapper and/or be ZFile-compressed;
//! [`ReadAt`] hides that: every reader of LSMT data sees plain blob bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::IoFile;

/// Positional reads from something of known size.
pub trait ReadAt: Send + Sync {
    /// Read into `buf` at `offset`; returns the bytes read (short only at end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;

    /// Total size in bytes.
    fn size(&self) -> u64;

    /// The file this data comes from, for error messages.
    fn path(&self) -> &Path;

    /// Read several ranges `(offset, buf)` exactly, each with its own
    /// result. Sources that can overlap the reads override this; the
    /// default reads them one by one.
    fn read_many_exact(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        reqs.iter_mut()
            .map(|(off, buf)| self.read_exact_at(buf, *off))
            .collect()
    }

    /// Forget any copy of `[offset, offset + len)` this source keeps (a
    /// cache of bytes fetched over the network), so that the next read
    /// fetches them again: for a reader whose own check of those bytes
    /// (a ZFile block's checksum) failed. Returns whether a read could now
    /// give other bytes; sources that read files as they are give `false`.
    fn refetch(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// Read exactly `buf.len()` bytes or fail naming the file.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n != buf.len() {
            return Err(short_read(
                self.path(),
                self.size(),
                None,
                offset,
                buf.len(),
                n,
            ));
        }
        Ok(())
    }
}

/// The error of a read of `len` bytes at `offset` of a source of `size`
/// bytes that got `got`: a range past the end (the format points there),
/// or data that ends early (the file shrank since it was opened). `base`:
/// where the source starts in its file, when known (a blob inside a tar
/// wrapper starts after the tar header), to give file offsets too.
fn short_read(
    path: &Path,
    size: u64,
    base: Option<u64>,
    offset: u64,
    len: usize,
    got: usize,
) -> Error {
    let end = offset.saturating_add(len as u64);
    let at_file = match base {
        Some(b) if b > 0 => format!(
            " (bytes {}..{} of the file)",
            b.saturating_add(offset),
            b.saturating_add(end)
        ),
        _ => String::new(),
    };
    let msg = if end > size {
        format!("truncated: wanted bytes {offset}..{end}{at_file}, but the blob is {size} bytes")
    } else {
        // A read that got nothing only shows that the data ends by its start.
        let stop = offset + got as u64;
        let ends = |shift: u64| {
            if got > 0 {
                format!("at byte {}", shift + stop)
            } else {
                format!("at or before byte {}", shift + stop)
            }
        };
        match base {
            Some(b) => format!(
                "truncated: wanted bytes {offset}..{end}{at_file}, but the file ends {}, \
                 before the blob's end at byte {} (did the file shrink?)",
                ends(b),
                b + size
            ),
            None => format!(
                "truncated: wanted bytes {offset}..{end}, but the data ends {}, \
                 before the blob's end at byte {size}",
                ends(0)
            ),
        }
    };
    Error::corrupt(path, "blob", msg)
}

/// A window `[base, base+len)` of a file.
#[derive(Debug, Clone)]
pub struct FileSlice {
    file: Arc<IoFile>,
    base: u64,
    len: u64,
}

impl FileSlice {
    /// The whole file.
    pub fn whole(file: Arc<IoFile>) -> Result<Self> {
        let len = file.len()?;
        Ok(FileSlice { file, base: 0, len })
    }

    /// A window of the file.
    pub fn new(file: Arc<IoFile>, base: u64, len: u64) -> Self {
        FileSlice { file, base, len }
    }

    pub fn file(&self) -> &Arc<IoFile> {
        &self.file
    }
}

impl ReadAt for FileSlice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.file.read_at(&mut buf[..n], self.base + offset)
    }

    /// As the default, with file offsets in the error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n != buf.len() {
            return Err(short_read(
                self.path(),
                self.len,
                Some(self.base),
                offset,
                buf.len(),
                n,
            ));
        }
        Ok(())
    }

    /// All reads in flight at once when the file uses io_uring.
    fn read_many_exact(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<()>> {
        let mut out: Vec<Option<Result<()>>> = Vec::with_capacity(reqs.len());
        let mut io: Vec<(u64, &mut [u8])> = Vec::with_capacity(reqs.len());
        let mut wanted = Vec::with_capacity(reqs.len());
        for (off, buf) in reqs.iter_mut() {
            let len = buf.len() as u64;
            if off.checked_add(len).is_none_or(|end| end > self.len) {
                out.push(Some(self.read_exact_at(buf, *off)));
            } else {
                out.push(None);
                wanted.push((out.len() - 1, len as usize, *off));
                io.push((self.base + *off, &mut buf[..]));
            }
        }
        let results = self.file.read_many(&mut io);
        for ((k, len, off), r) in wanted.into_iter().zip(results) {
            out[k] = Some(match r {
                Ok(n) if n == len => Ok(()),
                Ok(n) => Err(short_read(
                    self.path(),
                    self.len,
                    Some(self.base),
                    off,
                    len,
                    n,
                )),
                Err(e) => Err(e),
            });
        }
        out.into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    fn size(&self) -> u64 {
        self.len
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

/// A window `[base, base+len)` of any source (a blob inside a tar wrapper
/// that is read over the network, say).
#[derive(Clone)]
pub struct SubSource {
    inner: Arc<dyn ReadAt>,
    base: u64,
    len: u64,
}

impl SubSource {
    /// The window `[base, base+len)` of `inner`.
    pub fn new(inner: Arc<dyn ReadAt>, base: u64, len: u64) -> Self {
        SubSource { inner, base, len }
    }
}

impl std::fmt::Debug for SubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubSource")
            .field("path", &self.inner.path())
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

impl ReadAt for SubSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.inner.read_at(&mut buf[..n], self.base + offset)
    }

    fn refetch(&self, offset: u64, len: u64) -> bool {
        if offset >= self.len {
            return false;
        }
        self.inner
            .refetch(self.base + offset, len.min(self.len - offset))
    }

    fn size(&self) -> u64 {
        self.len
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// A sequential writer that can also patch bytes it already wrote.
pub trait BlobSink {
    /// Append bytes.
    fn put(&mut self, buf: &[u8]) -> Result<()>;

    /// Overwrite bytes at `pos` (relative to the start of this sink's data).
    fn put_at(&mut self, buf: &[u8], pos: u64) -> Result<()>;

    /// Bytes appended so far.
    fn position(&self) -> u64;

    /// Append `len` bytes that `fill` writes in place: `fill(piece, offset)`
    /// is called on consecutive pieces covering them, `offset` counting from
    /// their start. Sinks with a buffer of their own hand out pieces of it,
    /// saving a copy; the default fills a temporary buffer.
    fn put_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        let mut tmp = vec![0u8; len];
        fill(&mut tmp, 0)?;
        self.put(&tmp)
    }
}

/// A [`BlobSink`] writing into a file from byte `base` on, buffering appends.
#[derive(Debug)]
pub struct FileSink {
    file: IoFile,
    base: u64,
    pos: u64,
    /// Always `SINK_BUFFER` long; `buf[..used]` is waiting to be written.
    buf: Vec<u8>,
    used: usize,
}

const SINK_BUFFER: usize = 4 << 20;
/// Appends at least this large skip the buffer (one copy less).
const SINK_DIRECT: usize = 256 << 10;

impl FileSink {
    pub fn new(file: IoFile, base: u64) -> Self {
        FileSink {
            file,
            base,
            pos: 0,
            buf: vec![0u8; SINK_BUFFER],
            used: 0,
        }
    }

    /// Write out buffered bytes.
    pub fn flush_buffer(&mut self) -> Result<()> {
        if self.used > 0 {
            let at = self.base + self.pos - self.used as u64;
            self.file.write_all_at(&self.buf[..self.used], at)?;
            self.used = 0;
        }
        Ok(())
    }

    /// Flush and return the file.
    pub fn into_file(mut self) -> Result<IoFile> {
        self.flush_buffer()?;
        Ok(self.file)
    }

    pub fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }
}

/// Lends a sink to a writer that takes its sink by value (a ZFile writer over a file
/// that is written on after it).
impl<S: BlobSink + ?Sized> BlobSink for &mut S {
    fn put(&mut self, buf: &[u8]) -> Result<()> {
        (**self).put(buf)
    }
    fn put_at(&mut self, buf: &[u8], pos: u64) -> Result<()> {
        (**self).put_at(buf, pos)
    }
    fn position(&self) -> u64 {
        (**self).position()
    }
    fn put_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        (**self).put_filled(len, fill)
    }
}

impl BlobSink for FileSink {
    fn put(&mut self, data: &[u8]) -> Result<()> {
        if self.used + data.len() > SINK_BUFFER || data.len() >= SINK_DIRECT {
            self.flush_buffer()?;
        }
        if data.len() >= SINK_DIRECT {
            self.file.write_all_at(data, self.base + self.pos)?;
        } else {
            self.buf[self.used..self.used + data.len()].copy_from_slice(data);
            self.used += data.len();
        }
        self.pos += data.len() as u64;
        Ok(())
    }

    fn put_at(&mut self, data: &[u8], pos: u64) -> Result<()> {
        self.flush_buffer()?;
        self.file.write_all_at(data, self.base + pos)
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn put_filled(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            if self.used == SINK_BUFFER {
                self.flush_buffer()?;
            }
            let n = (SINK_BUFFER - self.used).min(len - done);
            fill(&mut self.buf[self.used..self.used + n], done)?;
            self.used += n;
            self.pos += n as u64;
            done += n;
        }
        Ok(())
    }
}

/// A [`BlobSink`] into memory (tests, small blobs).
#[derive(Debug, Default)]
pub struct VecSink(pub Vec<u8>);

impl BlobSink for VecSink {
    fn put(&mut self, buf: &[u8]) -> Result<()> {
        self.0.extend_from_slice(buf);
        Ok(())
    }

    fn put_at(&mut self, buf: &[u8], pos: u64) -> Result<()> {
        let p = pos as usize;
        if p + buf.len() > self.0.len() {
            self.0.resize(p + buf.len(), 0);
        }
        self.0[p..p + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn position(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Bytes in memory readable as a [`ReadAt`] (tests and tools).
#[derive(Debug, Clone)]
pub struct MemSource {
    pub data: Arc<Vec<u8>>,
    pub name: PathBuf,
}

impl MemSource {
    pub fn new(data: Vec<u8>, name: impl Into<PathBuf>) -> Self {
        MemSource {
            data: Arc::new(data),
            name: name.into(),
        }
    }
}

impl ReadAt for MemSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = self.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(len - offset) as usize;
        buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn path(&self) -> &Path {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short read names the real end of the file and the blob's expected
    /// end, in file offsets for a blob inside the file; a range past the
    /// blob names its size.
    #[test]
    fn short_reads_say_where_the_data_ends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("blob");
        std::fs::write(&p, vec![1u8; 10_000]).unwrap();
        let f = Arc::new(IoFile::open(&p).unwrap());
        let whole = FileSlice::whole(f.clone()).unwrap();
        let inner = FileSlice::new(f, 1000, 8000);
        // The file shrinks after it was opened.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(5000)
            .unwrap();
        let mut buf = vec![0u8; 2000];
        let e = whole.read_exact_at(&mut buf, 4000).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: corrupt blob: truncated: wanted bytes 4000..6000, but the file ends at \
                 byte 5000, before the blob's end at byte 10000 (did the file shrink?)",
                p.display()
            )
        );
        let e = inner.read_exact_at(&mut buf, 3500).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: corrupt blob: truncated: wanted bytes 3500..5500 (bytes 4500..6500 of \
                 the file), but the file ends at byte 5000, before the blob's end at byte \
                 9000 (did the file shrink?)",
                p.display()
            )
        );
        // read_many_exact says the same for its reads.
        let mut b2 = vec![0u8; 2000];
        let mut b3 = [0u8; 100];
        let r = inner.read_many_exact(&mut [(3500, &mut b2[..]), (0, &mut b3[..])]);
        assert_eq!(r[0].as_ref().unwrap_err().to_string(), e);
        assert!(r[1].is_ok());
        let e = inner.read_exact_at(&mut buf, 6000).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: corrupt blob: truncated: wanted bytes 6000..8000 (bytes 7000..9000 of \
                 the file), but the file ends at or before byte 7000, before the blob's end \
                 at byte 9000 (did the file shrink?)",
                p.display()
            )
        );
        let e = inner.read_exact_at(&mut buf, 8000).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: corrupt blob: truncated: wanted bytes 8000..10000 (bytes 9000..11000 of \
                 the file), but the blob is 8000 bytes",
                p.display()
            )
        );
        // A source that does not know its file offsets.
        let sub = SubSource::new(Arc::new(whole), 1000, 8000);
        let e = sub.read_exact_at(&mut buf, 3500).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: corrupt blob: truncated: wanted bytes 3500..5500, but the data ends at \
                 byte 4000, before the blob's end at byte 8000",
                p.display()
            )
        );
    }
}
