//! Images in tar files (`oci-archive:`, `docker-archive:`): members read in place
//! through an index of the archive, and archives written as a stream.
//!
//! Reading: [`TarIndex::build`] walks the headers once (ustar and GNU headers, GNU long
//! names, PAX `path`/`linkpath`/`size`), seeking over the data, and records where each
//! regular member's data starts and how long it is; symbolic and hard links resolve to
//! their targets (`docker save` archives link `<id>/layer.tar` to the layer file). The
//! members are then read where they are through a [`ReadAt`] source: the archive file
//! itself, or for a `.tar.gz` a random-access gzip reader. Nothing is unpacked. A member
//! running past the end of the file, or an archive ending without its end-of-archive
//! block of zeros, is reported as a truncated archive.
//!
//! Writing: [`TarWriter`] appends members with fixed metadata (ustar headers, mode
//! 0644, uid/gid 0, mtime 0) to a temporary file in the destination's directory,
//! optionally through gzip. [`TarWriter::finish`] ends the archive (two zero blocks),
//! syncs it and renames it over the destination, so the destination is either the
//! complete archive or left as it was; a writer dropped unfinished removes its file.

use super::digest::Sha256Writer;
use super::{Digest, Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BLOCK: u64 = 512;

/// Random-access reads of an archive's (uncompressed) bytes.
pub trait ReadAt: Send + Sync {
    /// Read into `buf` at `offset`; returns the bytes read (short only at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Total size in bytes.
    fn size(&self) -> u64;
}

/// A plain file as a [`ReadAt`] source.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// What `src` reads, copied into an unnamed temporary file in `scratch`
    /// (created if missing), removed when dropped, and rewound (a spooled
    /// archive may be read on as a stream, to decompress it); `read_err` makes
    /// the error of a failed copy.
    fn copy_to_scratch(
        src: &mut dyn Read,
        scratch: &Path,
        read_err: impl FnOnce(io::Error) -> Error,
    ) -> Result<FileSource> {
        std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
        let mut tmp = tempfile::tempfile_in(scratch).map_err(|e| Error::io(scratch, e))?;
        let size = io::copy(src, &mut tmp).map_err(read_err)?;
        tmp.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(scratch, e))?;
        Ok(FileSource { file: tmp, size })
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

impl FileSource {
    /// The archive at `path` as uncompressed tar bytes: the file itself, or for a
    /// gzip-compressed archive (`.tar.gz`, recognised by its magic bytes) its content
    /// decompressed into an unnamed temporary file in `scratch`, removed when dropped.
    ///
    /// An archive that is not a regular file (a pipe: `docker-archive:/dev/stdin`)
    /// can be read only once, from the start: it is copied into an unnamed temporary
    /// file in `scratch` first.
    pub fn open_archive(path: &Path, scratch: &Path) -> Result<FileSource> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let plain = if meta.is_file() {
            FileSource {
                file,
                size: meta.len(),
            }
        } else if meta.is_dir() {
            return Err(Error::io(
                path,
                io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "is a directory, not an archive file",
                ),
            ));
        } else {
            Self::copy_to_scratch(&mut file, scratch, |e| Error::io(path, e))?
        };
        let mut magic = [0u8; 2];
        let n = plain
            .read_at(&mut magic, 0)
            .map_err(|e| Error::io(path, e))?;
        if n < 2 || magic != [0x1f, 0x8b] {
            return Ok(plain);
        }
        let mut dec = PaddedGz::new(io::BufReader::new(plain.file));
        Self::copy_to_scratch(&mut dec, scratch, |e| {
            if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::InvalidInput {
                Error::Invalid {
                    what: path.display().to_string(),
                    reason: format!("truncated or corrupt gzip-compressed archive: {e}"),
                }
            } else {
                Error::io(path, e)
            }
        })
    }
}

/// The data of a gzip file of one or more members, which may end in zero bytes (a
/// tape-style padded `.tar.gz`, which `gzip -t` and `tar -tz` take): anything else
/// after a member is an `InvalidInput` error.
struct PaddedGz<R: io::BufRead> {
    /// The member being read; `None` once the data ended.
    member: Option<flate2::bufread::GzDecoder<R>>,
}

impl<R: io::BufRead> PaddedGz<R> {
    fn new(r: R) -> Self {
        PaddedGz {
            member: Some(flate2::bufread::GzDecoder::new(r)),
        }
    }
}

impl<R: io::BufRead> Read for PaddedGz<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(member) = self.member.as_mut() else {
                return Ok(0);
            };
            let n = member.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The member ended: another one, zero padding to the end, or the end.
            let mut rest = self.member.take().expect("checked above").into_inner();
            let next = rest.fill_buf()?;
            if next.is_empty() {
                return Ok(0);
            }
            if next[0] != 0 {
                self.member = Some(flate2::bufread::GzDecoder::new(rest));
                continue;
            }
            loop {
                let chunk = rest.fill_buf()?;
                if chunk.is_empty() {
                    return Ok(0);
                }
                if chunk.iter().any(|&b| b != 0) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "data after the zero padding that follows the gzip data",
                    ));
                }
                let len = chunk.len();
                rest.consume(len);
            }
        }
    }
}

/// A `Read + Seek` view of a [`ReadAt`] source (for the tar header walk).
struct Cursor<'a> {
    src: &'a dyn ReadAt,
    pos: u64,
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => {
                self.pos = p;
                return Ok(p);
            }
            SeekFrom::Current(d) => (self.pos, d),
            SeekFrom::End(d) => (self.src.size(), d),
        };
        self.pos = base
            .0
            .checked_add_signed(base.1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

#[derive(Clone, Debug)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symbolic or hard link, resolved to the archive path it points at.
    Link(String),
}

/// Where the regular members of a tar archive are.
pub struct TarIndex {
    src: Arc<dyn ReadAt>,
    what: String,
    members: HashMap<String, Member>,
}

impl std::fmt::Debug for TarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TarIndex({}, {} members)", self.what, self.members.len())
    }
}

/// `a/./b/../c` → `a/c`, leading `/` and `./` dropped; `None` if it climbs out.
pub fn clean_path(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// A message of the tar reader, which quotes header fields it cannot parse (the bytes
/// of a file that is no tar): all but printable ASCII becomes `?`, so that no raw
/// bytes reach a terminal, and it is cut at 160 characters.
fn printable(e: &impl std::fmt::Display) -> String {
    const MAX: usize = 160;
    let s = e.to_string();
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

impl TarIndex {
    /// Index the archive in `src`; `what` names it in errors (usually its path).
    pub fn build(src: Arc<dyn ReadAt>, what: &str) -> Result<TarIndex> {
        let bad = |reason: String| Error::Invalid {
            what: what.to_string(),
            reason,
        };
        let size = src.size();
        let mut members = HashMap::new();
        let mut end = 0u64;
        {
            let mut ar = tar::Archive::new(Cursor {
                src: src.as_ref(),
                pos: 0,
            });
            let entries = ar
                .entries_with_seek()
                .map_err(|e| bad(format!("not a tar archive: {}", printable(&e))))?;
            for e in entries {
                let e = e.map_err(|e| {
                    let e = printable(&e);
                    bad(if end == 0 {
                        format!("not a tar archive: {e}")
                    } else {
                        format!("not a tar archive, or truncated after byte {end}: {e}")
                    })
                })?;
                let (offset, len) = (e.raw_file_position(), e.size());
                let data_end = offset.checked_add(len).filter(|&x| x <= size);
                let raw_name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let Some(data_end) = data_end else {
                    return Err(bad(format!(
                        "truncated archive: member {raw_name:?} needs {len} bytes at offset {offset}, the file has {size}"
                    )));
                };
                end = data_end.div_ceil(BLOCK) * BLOCK;
                let Some(name) = clean_path(&raw_name) else {
                    continue;
                };
                let link = || {
                    e.link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned())
                };
                let m = match e.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        Member::File { offset, size: len }
                    }
                    tar::EntryType::Symlink => {
                        let Some(target) = link() else { continue };
                        let joined = if target.starts_with('/') {
                            target
                        } else {
                            match name.rsplit_once('/') {
                                Some((dir, _)) => format!("{dir}/{target}"),
                                None => target,
                            }
                        };
                        match clean_path(&joined) {
                            Some(t) => Member::Link(t),
                            None => continue,
                        }
                    }
                    tar::EntryType::Link => match link().as_deref().and_then(clean_path) {
                        Some(t) => Member::Link(t),
                        None => continue,
                    },
                    _ => continue,
                };
                members.insert(name, m);
            }
        }
        // A complete archive ends with (at least) one block of zeros.
        if end + BLOCK > size {
            return Err(bad(format!(
                "truncated archive: it ends at byte {size} without the end-of-archive block"
            )));
        }
        Ok(TarIndex {
            src,
            what: what.to_string(),
            members,
        })
    }

    /// The archive, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Offset and size of a regular member (links followed), if present.
    pub fn find(&self, name: &str) -> Option<(u64, u64)> {
        let mut cur = clean_path(name)?;
        for _ in 0..16 {
            match self.members.get(&cur)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(t) => cur = t.clone(),
            }
        }
        None
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    fn not_found(&self, name: &str) -> Error {
        Error::NotFound(format!("{name} in {}", self.what))
    }

    /// Size of a member.
    pub fn size_of(&self, name: &str) -> Result<u64> {
        self.find(name)
            .map(|(_, s)| s)
            .ok_or_else(|| self.not_found(name))
    }

    /// Stream a member.
    pub fn open(&self, name: &str) -> Result<MemberReader> {
        let (offset, size) = self.find(name).ok_or_else(|| self.not_found(name))?;
        Ok(MemberReader {
            src: self.src.clone(),
            pos: offset,
            end: offset + size,
        })
    }

    /// Read a whole member of at most `limit` bytes.
    pub fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let size = self.size_of(name)?;
        if size > limit {
            return Err(Error::TooLarge {
                what: format!("{name} in {}", self.what),
                size,
                limit,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open(name)?
            .read_to_end(&mut out)
            .map_err(|e| Error::io(&self.what, e))?;
        Ok(out)
    }

    /// The first bytes of a member (for sniffing its compression).
    pub fn head(&self, name: &str, n: usize) -> Result<Vec<u8>> {
        let (offset, size) = self.find(name).ok_or_else(|| self.not_found(name))?;
        let mut buf = vec![0u8; n.min(size as usize)];
        let mut got = 0;
        while got < buf.len() {
            let k = self
                .src
                .read_at(&mut buf[got..], offset + got as u64)
                .map_err(|e| Error::io(&self.what, e))?;
            if k == 0 {
                break;
            }
            got += k;
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// A member's bytes, read in place.
pub struct MemberReader {
    src: Arc<dyn ReadAt>,
    pos: u64,
    end: u64,
}

impl Read for MemberReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let k = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = self.src.read_at(&mut buf[..k], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ended inside a member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

enum Out {
    Plain(BufWriter<File>),
    Gzip(Box<flate2::write::GzEncoder<BufWriter<File>>>),
}

impl Out {
    fn w(&mut self) -> &mut dyn Write {
        match self {
            Out::Plain(w) => w,
            Out::Gzip(w) => w,
        }
    }
}

/// The file an archive written to `dest` replaces: `dest` itself, or, when `dest` is a
/// symbolic link, the file the link (chain) points to, as `cp` and shell redirection
/// write through a link: the link stays and its target gets the new content. A
/// dangling link names the file to create, whose directory must exist.
pub fn write_target(dest: &Path) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    // Linux's own limit on links followed in one lookup.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {}
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound && p == dest => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                if dir.is_dir() {
                    return Ok(p);
                }
                return Err(Error::io(
                    dest,
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "a symbolic link to {}, whose directory does not exist",
                            p.display()
                        ),
                    ),
                ));
            }
            Err(e) => return Err(Error::io(&p, e)),
        }
        let target = std::fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
        p = match p.parent() {
            Some(d) if target.is_relative() => d.join(target),
            _ => target,
        };
    }
    Err(Error::io(
        dest,
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many levels of symbolic links",
        ),
    ))
}

/// Writes a tar archive to a temporary file and puts it in place when finished.
pub struct TarWriter {
    dest: PathBuf,
    tmp: crate::tempfiles::Temp,
    out: Out,
}

impl TarWriter {
    /// Start an archive that [`finish`](Self::finish) will put at `dest` (at the file
    /// it points to if it is a symbolic link: see [`write_target`]); `gzip`
    /// compresses the whole archive.
    pub fn create(dest: &Path, gzip: bool) -> Result<TarWriter> {
        let dest = write_target(dest)?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = crate::layout::temp_for(
            dir,
            Some(&dest),
            tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".partial"),
        )
        .map_err(|e| Error::io(dir, e))?;
        let f = tmp.as_file().try_clone().map_err(|e| Error::io(&dest, e))?;
        let w = BufWriter::with_capacity(1 << 20, f);
        let out = if gzip {
            Out::Gzip(Box::new(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::default(),
            )))
        } else {
            Out::Plain(w)
        };
        Ok(TarWriter { dest, tmp, out })
    }

    fn header(name: &str, size: u64, kind: tar::EntryType, mode: u32) -> Result<tar::Header> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).map_err(|e| Error::Invalid {
            what: format!("archive member name {name:?}"),
            reason: e.to_string(),
        })?;
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(kind);
        h.set_cksum();
        Ok(h)
    }

    fn io(&self, e: io::Error) -> Error {
        Error::io(self.tmp.path(), e)
    }

    /// A directory entry (`blobs/`).
    pub fn append_dir(&mut self, name: &str) -> Result<()> {
        let h = Self::header(name, 0, tar::EntryType::Directory, 0o755)?;
        self.out.w().write_all(h.as_bytes()).map_err(|e| self.io(e))
    }

    /// A member holding exactly `size` bytes of `data`; returns their digest. `data`
    /// ending early or running long fails (the archive is then unusable).
    pub fn append(
        &mut self,
        name: &str,
        size: u64,
        data: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Digest> {
        let h = Self::header(name, size, tar::EntryType::Regular, 0o644)?;
        let w = self.out.w();
        w.write_all(h.as_bytes())
            .map_err(|e| Error::io(self.tmp.path(), e))?;
        let mut hash = Sha256Writer::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < size {
            let k = buf.len().min((size - done).min(usize::MAX as u64) as usize);
            let n = match data.read(&mut buf[..k]) {
                Ok(0) => {
                    return Err(Error::SizeMismatch {
                        what: format!("{name} written to {}", self.dest.display()),
                        expected: size,
                        actual: done,
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::from_io(name, e)),
            };
            hash.update(&buf[..n]);
            self.out
                .w()
                .write_all(&buf[..n])
                .map_err(|e| Error::io(self.tmp.path(), e))?;
            done += n as u64;
            progress(done);
        }
        let mut probe = [0u8; 1];
        if matches!(data.read(&mut probe), Ok(n) if n > 0) {
            return Err(Error::TooLong {
                what: format!("{name} written to {}", self.dest.display()),
                expected: size,
            });
        }
        let pad = (BLOCK - size % BLOCK) % BLOCK;
        self.out
            .w()
            .write_all(&[0u8; BLOCK as usize][..pad as usize])
            .map_err(|e| Error::io(self.tmp.path(), e))?;
        Ok(hash.finish().0)
    }

    /// A member holding `bytes`.
    pub fn append_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<Digest> {
        self.append(name, bytes.len() as u64, &mut &bytes[..], &mut |_| {})
    }

    /// End the archive, sync it and rename it to the destination. Returns its size.
    pub fn finish(mut self) -> Result<u64> {
        self.out
            .w()
            .write_all(&[0u8; 2 * BLOCK as usize])
            .map_err(|e| Error::io(self.tmp.path(), e))?;
        let tmp_path = self.tmp.path().to_path_buf();
        let buffered = match self.out {
            Out::Plain(w) => w,
            Out::Gzip(g) => g.finish().map_err(|e| Error::io(&tmp_path, e))?,
        };
        let f = buffered
            .into_inner()
            .map_err(|e| Error::io(&tmp_path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp_path, e))?;
        let size = f.metadata().map_err(|e| Error::io(&tmp_path, e))?.len();
        drop(f);
        self.tmp
            .persist(&self.dest)
            .map_err(|e| Error::io(&self.dest, e.error))?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    /// A `.tar.gz` of several members, and one padded with zeros as tapes pad
    /// (which `gzip -t` and `tar -tz` take), is read whole; anything but zeros
    /// after the gzip data is an error that names the archive.
    #[test]
    fn gzip_archives_with_members_and_zero_padding() {
        let dir = tempfile::tempdir().unwrap();
        let tar = sample();
        let (a, b) = tar.split_at(1000);
        let mut two = gzip(a);
        two.extend(gzip(b));
        let mut padded = two.clone();
        padded.extend(vec![0u8; 10240 - padded.len() % 10240]);
        for (name, bytes) in [("two.tar.gz", &two), ("padded.tar.gz", &padded)] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let src = FileSource::open_archive(&p, dir.path()).unwrap();
            let mut back = vec![0u8; src.size() as usize];
            src.read_at(&mut back, 0).unwrap();
            assert!(back == tar, "{name}");
        }
        for (head, tail, want) in [
            (&padded, &[0u8, 0, 0, 7][..], "data after the zero padding"),
            (&two, b"this is not gzip data", "invalid gzip header"),
        ] {
            let p = dir.path().join("bad.tar.gz");
            let mut bad = head.clone();
            bad.extend_from_slice(tail);
            std::fs::write(&p, &bad).unwrap();
            let Err(e) = FileSource::open_archive(&p, dir.path()) else {
                panic!("{tail:?} taken");
            };
            let msg = e.to_string();
            assert!(msg.contains("bad.tar.gz") && msg.contains(want), "{msg}");
        }
    }

    fn index_of(bytes: Vec<u8>) -> Result<TarIndex> {
        struct Mem(Vec<u8>);
        impl ReadAt for Mem {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                let o = (offset as usize).min(self.0.len());
                let n = buf.len().min(self.0.len() - o);
                buf[..n].copy_from_slice(&self.0[o..o + n]);
                Ok(n)
            }
            fn size(&self) -> u64 {
                self.0.len() as u64
            }
        }
        TarIndex::build(Arc::new(Mem(bytes)), "test.tar")
    }

    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("./a/file.txt", b"hello");
        // A long name (GNU long-name member).
        let long = format!("{}/x", "d".repeat(150));
        add(&long, b"long");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "id/layer.tar", "../a/file.txt")
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hard", "a/file.txt").unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn index_reads_members_and_links() {
        let idx = index_of(sample()).unwrap();
        assert_eq!(idx.read("a/file.txt", 100).unwrap(), b"hello");
        assert_eq!(idx.read("/a/./file.txt", 100).unwrap(), b"hello");
        assert_eq!(idx.read("id/layer.tar", 100).unwrap(), b"hello");
        assert_eq!(idx.read("hard", 100).unwrap(), b"hello");
        let long = format!("{}/x", "d".repeat(150));
        assert_eq!(idx.read(&long, 100).unwrap(), b"long");
        assert_eq!(idx.head("a/file.txt", 2).unwrap(), b"he");
        assert!(matches!(idx.read("nope", 10), Err(Error::NotFound(_))));
        assert!(matches!(
            idx.read("a/file.txt", 2),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn truncation_is_detected() {
        let full = sample();
        // Cut inside the data of the first member, at a header boundary, and just
        // before the end-of-archive blocks.
        let data_end = full
            .windows(5)
            .position(|w| w == b"hello")
            .expect("data present");
        let last_member_end = full.len() - 1024;
        for cut in [data_end + 2, 512, last_member_end] {
            let e = index_of(full[..cut].to_vec()).unwrap_err().to_string();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
            assert!(e.starts_with("test.tar: "), "{e}");
        }
        let e = index_of(b"this is not a tar archive at all".repeat(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a tar archive"), "{e}");
        // Bytes that are no tar header are not quoted raw.
        let mut x = 0x9e37_79b9_u32;
        let noise: Vec<u8> = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        let e = index_of(noise).unwrap_err().to_string();
        assert!(e.starts_with("test.tar: not a tar archive: "), "{e}");
        assert!(e.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "{e:?}");
    }

    #[test]
    fn writer_is_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.tar");
        std::fs::write(&dest, b"old").unwrap();
        {
            let mut w = TarWriter::create(&dest, false).unwrap();
            w.append_bytes("x", b"1").unwrap();
            // Dropped unfinished: the old file stays, no temporary file is left.
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        for gzip in [false, true] {
            let mut w = TarWriter::create(&dest, gzip).unwrap();
            w.append_dir("blobs/").unwrap();
            let d = w.append_bytes("blobs/a", b"content").unwrap();
            assert_eq!(d, Digest::of(b"content"));
            let e = w.append("short", 10, &mut &b"123"[..], &mut |_| {});
            assert!(matches!(e, Err(Error::SizeMismatch { .. })));
            drop(w);
            let mut w = TarWriter::create(&dest, gzip).unwrap();
            w.append_bytes("blobs/a", b"content").unwrap();
            w.finish().unwrap();
            let raw = std::fs::read(&dest).unwrap();
            let plain = if gzip {
                let mut v = Vec::new();
                flate2::read::GzDecoder::new(&raw[..])
                    .read_to_end(&mut v)
                    .unwrap();
                v
            } else {
                raw
            };
            let idx = index_of(plain).unwrap();
            assert_eq!(idx.read("blobs/a", 100).unwrap(), b"content");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
