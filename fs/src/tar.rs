//! A streaming reader for OCI layer tars (ustar, PAX, GNU and v7).
//!
//! Layout: a tar stream is a sequence of 512-byte headers, each followed by
//! its data padded to 512 bytes, and ends with two zero blocks. A header
//! holds `name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8]
//! typeflag[1] linkname[100] magic[6] version[2] uname[32] gname[32]
//! devmajor[8] devminor[8]` and then either the ustar `prefix[155]` or, in
//! GNU headers, `atime ctime offset longnames unused sparse[4*24]
//! isextended realsize`. Numbers are octal text or, with the top bit of the
//! first byte set, big-endian base-256.
//!
//! Extension entries modify the entry that follows them: `x` (PAX records
//! `"<len> <key>=<value>\n"`: path, linkpath, size, uid, gid, mtime with
//! nanoseconds, `SCHILY.xattr.<name>`, `GNU.sparse.*`), `L`/`K` (GNU long
//! name/link), and `g` (PAX global, ignored as containerd does). Sparse
//! files come as GNU type `S` (map in the header plus extension blocks) or
//! as PAX GNU sparse 0.0, 0.1 and 1.0 (1.0 keeps its map at the start of the
//! data). Precedence follows Go's `archive/tar`, the reader containerd and
//! umoci use: PAX records override header fields, GNU long names override
//! both, and `GNU.sparse.name` overrides everything.
//!
//! Sizes read from the stream are checked before anything is allocated:
//! extension records are limited to 1 MiB and sparse maps to 1M entries.

use std::io::Read;

use crate::error::{quote, Error, Result};
use crate::ext2fs::inode::Timestamp;

/// Tar block size.
pub const BLOCK: usize = 512;
/// Largest PAX / GNU long-name record accepted (as Go's archive/tar).
const MAX_SPECIAL: u64 = 1 << 20;
/// Largest number of sparse map entries accepted.
const MAX_SPARSE_ENTRIES: usize = 1 << 20;

/// What an entry creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file (types `0`, NUL, `7`, GNU sparse `S`).
    File,
    /// Hard link to `link` (type `1`).
    HardLink,
    /// Symbolic link to `link` (type `2`).
    Symlink,
    /// Character device (type `3`).
    Char,
    /// Block device (type `4`).
    Block,
    /// Directory (type `5`, GNU dumpdir `D`).
    Dir,
    /// FIFO (type `6`).
    Fifo,
}

/// One archive member, with extension headers applied.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path as stored (not cleaned).
    pub path: Vec<u8>,
    /// Link target for hard and symbolic links.
    pub link: Vec<u8>,
    /// Entry type.
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (nanoseconds only from PAX).
    pub mtime: Timestamp,
    /// Logical file size (the real size for sparse files).
    pub size: u64,
    /// Device major number (0 unless a device; not range-checked beyond
    /// being non-negative: what fits depends on the filesystem).
    pub devmajor: u64,
    /// Device minor number (as `devmajor`).
    pub devminor: u64,
    /// Extended attributes from `SCHILY.xattr.*`, in record order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For sparse files, the `(offset, length)` data segments in file order;
    /// the stored data is their concatenation.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Offset of the entry's first header in the stream.
    pub offset: u64,
}

impl Entry {
    /// The path as text for messages (lossy UTF-8, long paths shortened
    /// by [`quote`]).
    pub fn path_lossy(&self) -> String {
        quote(&self.path)
    }

    /// The data segments of a regular file: the sparse map, or one segment
    /// covering the whole file.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        match &self.sparse {
            Some(m) => m.clone(),
            None if self.size > 0 => vec![(0, self.size)],
            None => Vec::new(),
        }
    }
}

/// Most bytes read (and ignored) after the end-of-archive blocks: a pipe's
/// writer is let finish its padding, an endless stream is not read forever.
pub const DRAIN_LIMIT: u64 = 64 << 20;

/// Streaming tar reader.
pub struct TarReader<R: Read> {
    r: R,
    pos: u64,
    /// Stored data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    done: bool,
    /// Most bytes read after the end-of-archive blocks ([`DRAIN_LIMIT`]).
    drain_limit: u64,
}

#[derive(Default)]
struct Pending {
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl<R: Read> TarReader<R> {
    /// A reader over `r` (wrap slow readers in a `BufReader`).
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            pos: 0,
            remaining: 0,
            padding: 0,
            done: false,
            drain_limit: DRAIN_LIMIT,
        }
    }

    /// Read at most `bytes` after the end-of-archive blocks (0: stop there,
    /// for a caller that reads the rest of the stream itself).
    pub fn drain_limit(mut self, bytes: u64) -> Self {
        self.drain_limit = bytes;
        self
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Bytes consumed from the stream so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Stored data bytes of the current entry not yet read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    fn tar_err(&self, offset: u64, msg: impl Into<String>) -> Error {
        Error::Tar {
            offset,
            msg: msg.into(),
        }
    }

    /// Fill `buf`; returns false on a clean EOF before the first byte.
    fn read_raw(&mut self, buf: &mut [u8], eof_ok: bool) -> Result<bool> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => {
                    if n == 0 && eof_ok && self.pos == 0 {
                        // Upstream's libtar applies it as an empty layer (and so do
                        // we), but a layer of 0 bytes is more often a lost one than
                        // an empty one (that is an archive of two zero blocks).
                        tracing::warn!(
                            "the layer tar is empty (0 bytes): applied as an empty layer"
                        );
                    }
                    if n == 0 && eof_ok {
                        return Ok(false);
                    }
                    return Err(self.tar_err(self.pos, "unexpected end of the stream"));
                }
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Read {
                        offset: self.pos,
                        source: e,
                    })
                }
            }
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 64 * 1024];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_raw(&mut buf[..k], false)?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes of the current entry's stored data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.remaining {
            return Err(self.tar_err(self.pos, "read past the end of the entry data"));
        }
        self.read_raw(buf, false)?;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    /// Skip what is left of the current entry (data and padding).
    fn finish_entry(&mut self) -> Result<()> {
        let n = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.skip(n)
    }

    /// Set up data accounting for an entry with `size` stored bytes.
    fn start_data(&mut self, size: u64) {
        self.remaining = size;
        self.padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    }

    /// Read a whole extension entry's data (at most [`MAX_SPECIAL`] bytes).
    fn read_special(&mut self, size: u64, what: &str, at: u64) -> Result<Vec<u8>> {
        if size > MAX_SPECIAL {
            return Err(self.tar_err(
                at,
                format!("{what} of {size} bytes exceeds the 1 MiB limit"),
            ));
        }
        let mut v = vec![0u8; size as usize];
        self.start_data(size);
        self.read_data(&mut v)?;
        self.finish_entry()?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive. Unread data of
    /// the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        self.finish_entry()?;
        let mut pending = Pending::default();
        let mut first_offset = None;
        loop {
            let at = self.pos;
            let mut h = [0u8; BLOCK];
            if !self.read_raw(&mut h, true)? {
                // EOF at a header boundary without an end marker: accept, as
                // Go's archive/tar does.
                return self.end(first_offset.is_some(), at);
            }
            if h.iter().all(|&b| b == 0) {
                // One zero block: a second one (or EOF) ends the archive.
                let mut h2 = [0u8; BLOCK];
                if self.read_raw(&mut h2, true)? && h2.iter().any(|&b| b != 0) {
                    return Err(self.tar_err(at, "zero block followed by data (corrupt archive)"));
                }
                return self.end(first_offset.is_some(), at);
            }
            first_offset.get_or_insert(at);
            verify_checksum(&h).map_err(|m| self.tar_err(at, m))?;
            let typeflag = h[156];
            let size = parse_numeric(&h[124..136])
                .map_err(|m| self.tar_err(at, format!("size field: {m}")))?;
            if size < 0 {
                return Err(self.tar_err(at, "negative size"));
            }
            let size = size as u64;
            match typeflag {
                b'x' => {
                    let data = self.read_special(size, "PAX header", at)?;
                    pending.pax = parse_pax(&data).map_err(|m| self.tar_err(at, m))?;
                    continue;
                }
                b'g' => {
                    let data = self.read_special(size, "PAX global header", at)?;
                    parse_pax(&data).map_err(|m| self.tar_err(at, m))?;
                    tracing::debug!("ignoring PAX global header at byte {at}");
                    continue;
                }
                b'L' | b'K' => {
                    let mut data = self.read_special(size, "GNU long name", at)?;
                    if let Some(z) = data.iter().position(|&b| b == 0) {
                        data.truncate(z);
                    }
                    if typeflag == b'L' {
                        pending.long_name = Some(data);
                    } else {
                        pending.long_link = Some(data);
                    }
                    continue;
                }
                _ => {}
            }
            let entry = self.build_entry(&h, size, pending, first_offset.unwrap_or(at), at)?;
            return Ok(Some(entry));
        }
    }

    fn end(&mut self, pending_headers: bool, at: u64) -> Result<Option<Entry>> {
        if pending_headers {
            return Err(self.tar_err(
                at,
                "archive ends after an extension header without its entry",
            ));
        }
        self.done = true;
        // Drain the rest so a writer feeding us through a pipe finishes
        // (tar pads its output to whole records), but not forever: an
        // endless stream (`/dev/zero`) is left once the limit is read.
        let mut buf = [0u8; 64 * 1024];
        let end = self.pos;
        loop {
            if self.pos - end >= self.drain_limit {
                if self.drain_limit > 0 {
                    tracing::warn!(
                        "more than {} MiB follow the end of the archive at offset {end}; \
                         they are not part of the layer",
                        self.drain_limit >> 20
                    );
                }
                break;
            }
            match self.r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => self.pos += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Read {
                        offset: self.pos,
                        source: e,
                    })
                }
            }
        }
        Ok(None)
    }

    fn build_entry(
        &mut self,
        h: &[u8; BLOCK],
        size: u64,
        p: Pending,
        offset: u64,
        at: u64,
    ) -> Result<Entry> {
        let num = |r: std::ops::Range<usize>, what: &str| -> Result<i64> {
            parse_numeric(&h[r]).map_err(|m| Error::Tar {
                offset: at,
                msg: format!("{what} field: {m}"),
            })
        };
        let magic = &h[257..263];
        let version = &h[263..265];
        let ustar = magic == b"ustar\0" && version == b"00";
        let mut path = cstr(&h[0..100]).to_vec();
        if ustar {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(&path);
                path = full;
            }
        }
        let mut link = cstr(&h[157..257]).to_vec();
        let mut typeflag = h[156];
        let mut mode = (num(100..108, "mode")? as u32) & 0o7777;
        let mut uid = num(108..116, "uid")?;
        let mut gid = num(116..124, "gid")?;
        let mut mtime = Timestamp {
            sec: num(136..148, "mtime")?,
            nsec: 0,
        };
        let devmajor = num(329..337, "devmajor")?;
        let devminor = num(337..345, "devminor")?;
        let mut logical_size = size;
        let mut xattrs = Vec::new();
        let mut sparse_name = None;
        let mut gnu_sparse = SparsePax::default();

        // A PAX record's decimal number, or why it is none.
        let dec = |name: &str, v: &[u8]| {
            parse_dec(v).ok_or_else(|| {
                let v_text = String::from_utf8_lossy(v);
                self.tar_err(at, format!("PAX {name} '{v_text}' {}", dec_problem(v)))
            })
        };
        // A name record with a NUL byte, refused as Go's archive/tar refuses
        // it: no file can have that name (GNU tar cuts it at the NUL).
        let name = |key: &str, v: &[u8]| {
            if v.contains(&0) {
                return Err(self.tar_err(
                    at,
                    format!(
                        "PAX {key} '{}' contains a NUL byte",
                        String::from_utf8_lossy(v).replace('\0', "\\0")
                    ),
                ));
            }
            Ok(v.to_vec())
        };
        // PAX records override the header.
        for (k, v) in &p.pax {
            let vs = || String::from_utf8_lossy(v).into_owned();
            match k.as_slice() {
                b"path" => path = name("path", v)?,
                b"linkpath" => link = name("linkpath", v)?,
                b"size" => logical_size = dec("size", v)?,
                b"uid" => uid = dec("uid", v)? as i64,
                b"gid" => gid = dec("gid", v)? as i64,
                b"mtime" => {
                    mtime = parse_pax_time(v).ok_or_else(|| {
                        self.tar_err(
                            at,
                            format!(
                                "PAX mtime '{}' is not a time ([-]seconds[.fraction], seconds within 64 bits)",
                                vs()
                            ),
                        )
                    })?
                }
                b"GNU.sparse.name" => sparse_name = Some(name("GNU.sparse.name", v)?),
                b"GNU.sparse.major" => gnu_sparse.major = Some(vs()),
                b"GNU.sparse.minor" => gnu_sparse.minor = Some(vs()),
                b"GNU.sparse.size" => gnu_sparse.size = Some(vs()),
                b"GNU.sparse.realsize" => gnu_sparse.realsize = Some(vs()),
                b"GNU.sparse.map" => gnu_sparse.map = Some(vs()),
                b"GNU.sparse.offset" => gnu_sparse.offsets.push(vs()),
                b"GNU.sparse.numbytes" => gnu_sparse.numbytes.push(vs()),
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((name.to_vec(), v.clone()));
                    }
                }
            }
        }
        // PAX size overrides the stored size too (it is the real one).
        let mut stored = if p.pax.iter().any(|(k, _)| k == b"size") {
            logical_size
        } else {
            size
        };
        if let Some(n) = p.long_name {
            path = n;
        }
        if let Some(l) = p.long_link {
            link = l;
        }
        if typeflag == 0 && path.last() == Some(&b'/') {
            typeflag = b'5';
        }
        let kind = match typeflag {
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'V' => {
                // A volume label: no file; skip it like GNU tar.
                self.start_data(stored);
                return self
                    .next_entry()?
                    .ok_or_else(|| self.tar_err(at, "archive ends after a volume label"));
            }
            t => {
                return Err(Error::Entry {
                    path: quote(&path),
                    msg: format!(
                        "unsupported tar entry type '{}' at byte {at}",
                        char::from(t).escape_default()
                    ),
                })
            }
        };
        // Header-only types carry no data whatever the size field says.
        if !matches!(kind, Kind::File) || typeflag == b'D' {
            if typeflag == b'D' {
                self.start_data(stored);
                self.finish_entry()?;
            }
            stored = 0;
            logical_size = 0;
        }
        if uid < 0 || uid > u32::MAX as i64 || gid < 0 || gid > u32::MAX as i64 {
            return Err(self.tar_err(at, format!("uid/gid {uid}/{gid} out of range")));
        }
        // Only device entries carry device numbers.
        let (devmajor, devminor) = if matches!(kind, Kind::Char | Kind::Block) {
            if devmajor < 0 || devminor < 0 {
                return Err(
                    self.tar_err(at, format!("negative device number {devmajor}:{devminor}"))
                );
            }
            (devmajor as u64, devminor as u64)
        } else {
            (0, 0)
        };
        self.start_data(stored);
        mode &= 0o7777;

        let mut sparse = None;
        if typeflag == b'S' {
            let (map, real) = self.read_old_gnu_sparse(h, at)?;
            logical_size = real;
            sparse = Some(map);
        } else if let Some(ver) = gnu_sparse.version() {
            if let Some(n) = sparse_name {
                path = n;
            }
            if let Some(s) = gnu_sparse.size.as_ref().or(gnu_sparse.realsize.as_ref()) {
                logical_size = s
                    .parse()
                    .map_err(|_| self.tar_err(at, format!("GNU.sparse size '{s}'")))?;
            }
            let map = if ver == (1, 0) {
                self.read_sparse_map_1x0(at)?
            } else {
                gnu_sparse.map_0x(at)?
            };
            sparse = Some(map);
        }
        if let Some(map) = &sparse {
            validate_sparse(map, logical_size, self.remaining).map_err(|m| self.tar_err(at, m))?;
        }
        Ok(Entry {
            path,
            link,
            kind,
            mode,
            uid: uid as u32,
            gid: gid as u32,
            mtime,
            size: logical_size,
            devmajor,
            devminor,
            xattrs,
            sparse,
            offset,
        })
    }

    /// Old GNU sparse: 4 map entries in the header, 21 per extension block.
    fn read_old_gnu_sparse(&mut self, h: &[u8; BLOCK], at: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut map = Vec::new();
        let push_entries = |block: &[u8],
                            n: usize,
                            map: &mut Vec<(u64, u64)>|
         -> std::result::Result<(), String> {
            for i in 0..n {
                let e = &block[i * 24..i * 24 + 24];
                if e[0] == 0 {
                    break;
                }
                let off = parse_numeric(&e[0..12]).map_err(|m| format!("sparse offset: {m}"))?;
                let len = parse_numeric(&e[12..24]).map_err(|m| format!("sparse length: {m}"))?;
                if off < 0 || len < 0 {
                    return Err("negative sparse entry".into());
                }
                map.push((off as u64, len as u64));
            }
            Ok(())
        };
        push_entries(&h[386..482], 4, &mut map).map_err(|m| self.tar_err(at, m))?;
        let real =
            parse_numeric(&h[483..495]).map_err(|m| self.tar_err(at, format!("realsize: {m}")))?;
        let mut extended = h[482] != 0;
        // Extension blocks come before the data and are not counted in it.
        let data_remaining = self.remaining;
        let data_padding = self.padding;
        while extended {
            if map.len() > MAX_SPARSE_ENTRIES {
                return Err(self.tar_err(at, "too many sparse map entries"));
            }
            let mut b = [0u8; BLOCK];
            self.read_raw(&mut b, false)?;
            push_entries(&b[..504], 21, &mut map).map_err(|m| self.tar_err(at, m))?;
            extended = b[504] != 0;
        }
        self.remaining = data_remaining;
        self.padding = data_padding;
        if real < 0 {
            return Err(self.tar_err(at, "negative realsize"));
        }
        Ok((map, real as u64))
    }

    /// PAX sparse 1.0: decimal numbers, one per line, at the start of the
    /// data, padded to a block: count, then offset/length pairs.
    fn read_sparse_map_1x0(&mut self, at: u64) -> Result<Vec<(u64, u64)>> {
        let mut text: Vec<u8> = Vec::new();
        let mut consumed = 0usize;
        let mut numbers = Vec::new();
        let mut want: Option<usize> = None;
        loop {
            // Parse complete lines available so far.
            while let Some(nl) = text[consumed..].iter().position(|&b| b == b'\n') {
                let line = &text[consumed..consumed + nl];
                let v = parse_dec(line)
                    .ok_or_else(|| self.tar_err(at, "bad number in the sparse map"))?;
                consumed += nl + 1;
                match want {
                    None => {
                        if v as usize > MAX_SPARSE_ENTRIES {
                            return Err(self.tar_err(at, "too many sparse map entries"));
                        }
                        want = Some(2 * v as usize)
                    }
                    Some(_) => numbers.push(v),
                }
                if want == Some(numbers.len()) {
                    // The map occupies whole blocks of the data.
                    let used = text.len();
                    debug_assert!(used.is_multiple_of(BLOCK));
                    let map = numbers.chunks(2).map(|c| (c[0], c[1])).collect();
                    return Ok(map);
                }
            }
            if text.len() > (MAX_SPARSE_ENTRIES * 2 + 1) * 21 {
                return Err(self.tar_err(at, "sparse map too large"));
            }
            let mut b = [0u8; BLOCK];
            self.read_data(&mut b)
                .map_err(|_| self.tar_err(at, "sparse map runs past the entry data"))?;
            text.extend_from_slice(&b);
        }
    }
}

#[derive(Default)]
struct SparsePax {
    major: Option<String>,
    minor: Option<String>,
    size: Option<String>,
    realsize: Option<String>,
    map: Option<String>,
    offsets: Vec<String>,
    numbytes: Vec<String>,
}

impl SparsePax {
    /// The GNU sparse PAX version, if this is a sparse entry.
    fn version(&self) -> Option<(u32, u32)> {
        match (self.major.as_deref(), self.minor.as_deref()) {
            (Some("1"), Some("0")) => Some((1, 0)),
            (Some("0"), Some("0")) | (Some("0"), Some("1")) => Some((0, 1)),
            (Some(_), _) | (_, Some(_)) => None,
            (None, None) if self.map.is_some() || !self.offsets.is_empty() => Some((0, 1)),
            _ => None,
        }
    }

    /// Map of formats 0.0 (repeated offset/numbytes) and 0.1 (one list).
    fn map_0x(&self, at: u64) -> Result<Vec<(u64, u64)>> {
        let err = |m: &str| Error::Tar {
            offset: at,
            msg: m.to_string(),
        };
        let nums: Vec<u64> = if let Some(m) = &self.map {
            if m.is_empty() {
                Vec::new()
            } else {
                m.split(',')
                    .map(|s| s.parse().map_err(|_| err("bad number in GNU.sparse.map")))
                    .collect::<Result<_>>()?
            }
        } else {
            if self.offsets.len() != self.numbytes.len() {
                return Err(err("GNU.sparse.offset/numbytes records do not pair up"));
            }
            let mut v = Vec::new();
            for (o, n) in self.offsets.iter().zip(&self.numbytes) {
                v.push(o.parse().map_err(|_| err("bad GNU.sparse.offset"))?);
                v.push(n.parse().map_err(|_| err("bad GNU.sparse.numbytes"))?);
            }
            v
        };
        if !nums.len().is_multiple_of(2) {
            return Err(err("odd number of values in the sparse map"));
        }
        if nums.len() / 2 > MAX_SPARSE_ENTRIES {
            return Err(err("too many sparse map entries"));
        }
        Ok(nums.chunks(2).map(|c| (c[0], c[1])).collect())
    }
}

/// Sparse segments must be in order, not overlap, stay within the file, and
/// add up to the stored data.
fn validate_sparse(map: &[(u64, u64)], size: u64, stored: u64) -> std::result::Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        if off < end {
            return Err(format!(
                "sparse segments overlap or are out of order at offset {off}"
            ));
        }
        end = off.checked_add(len).ok_or("sparse segment overflows")?;
        if end > size {
            return Err(format!(
                "sparse segment {off}+{len} is beyond the file size {size}"
            ));
        }
        total += len;
    }
    if total != stored {
        return Err(format!(
            "sparse map describes {total} data bytes but the entry stores {stored}"
        ));
    }
    Ok(())
}

/// The bytes up to the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

/// Header checksum: the unsigned (or, for old writers, signed) byte sum with
/// the checksum field counted as spaces.
fn verify_checksum(h: &[u8; BLOCK]) -> std::result::Result<(), String> {
    let want = parse_numeric(&h[148..156]).map_err(|m| format!("checksum field: {m}"))?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as i64;
        signed += b as i8 as i64;
    }
    if want == unsigned || want == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {want}, computed {unsigned}); not a tar stream or corrupt"
        ))
    }
}

/// Parse an octal or base-256 numeric field.
pub fn parse_numeric(f: &[u8]) -> std::result::Result<i64, String> {
    if let Some(&first) = f.first() {
        if first & 0x80 != 0 {
            // Base-256: two's complement big-endian, first byte's top bit is
            // the marker (0x80 positive, 0xff negative).
            let neg = first & 0x40 != 0;
            let mut v: i128 = if neg { -1 } else { 0 };
            for (i, &b) in f.iter().enumerate() {
                let b = if i == 0 {
                    b & 0x7f | if neg { 0x80 } else { 0 }
                } else {
                    b
                };
                v = (v << 8) | b as i128;
                if v > i64::MAX as i128 || v < i64::MIN as i128 {
                    return Err("base-256 number out of range".into());
                }
            }
            return Ok(v as i64);
        }
    }
    let t: &[u8] = {
        let s = f
            .iter()
            .position(|&b| b != b' ' && b != 0)
            .unwrap_or(f.len());
        let e = f
            .iter()
            .rposition(|&b| b != b' ' && b != 0)
            .map_or(s, |p| p + 1);
        &f[s..e.max(s)]
    };
    if t.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for &b in t {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!(
                "invalid octal number '{}'",
                String::from_utf8_lossy(t)
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((b - b'0') as i64))
            .ok_or("octal number out of range")?;
    }
    Ok(v)
}

/// Parse a non-negative decimal number.
fn parse_dec(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Why `link` cannot be the target of a symbolic link whose filesystem takes
/// targets of at most `limit` bytes (symlink(2) refuses an empty one), if it
/// cannot.
pub fn symlink_target_problem(link: &[u8], limit: usize) -> Option<String> {
    if link.is_empty() {
        Some("symbolic link with an empty target".into())
    } else if link.len() > limit {
        Some(format!(
            "symbolic link target of {} bytes is too long (limit {limit})",
            link.len()
        ))
    } else {
        None
    }
}

/// Why [`parse_dec`] refused `v`.
fn dec_problem(v: &[u8]) -> &'static str {
    if v.is_empty() {
        "is empty"
    } else if !v.iter().all(u8::is_ascii_digit) {
        "is not a decimal number"
    } else {
        "is too large (more than 64 bits)"
    }
}

/// Parse a PAX time `[-]sec[.frac]`.
pub fn parse_pax_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (sec, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if sec.is_empty()
        || !sec.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let sec: i64 = sec.parse().ok()?;
    let mut ns: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        ns += (d - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    if neg {
        // -1.5 means 1.5 s before the epoch: sec -2, nsec 0.5e9.
        if ns > 0 {
            Some(Timestamp {
                sec: -sec - 1,
                nsec: 1_000_000_000 - ns,
            })
        } else {
            Some(Timestamp { sec: -sec, nsec: 0 })
        }
    } else {
        Some(Timestamp { sec, nsec: ns })
    }
}

/// Parse PAX records `"<len> <key>=<value>\n"`.
/// PAX records as (key, value) pairs.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

fn parse_pax(mut d: &[u8]) -> std::result::Result<PaxRecords, String> {
    let mut out = Vec::new();
    // GNU sparse 0.0 repeats offset/numbytes; keep every record in order.
    while !d.is_empty() {
        if d.iter().all(|&b| b == 0) {
            break;
        }
        let sp = d
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len = parse_dec(&d[..sp]).ok_or("PAX record with a bad length")? as usize;
        if len <= sp + 1 || len > d.len() {
            return Err("PAX record length out of range".into());
        }
        let rec = &d[sp + 1..len];
        if rec.last() != Some(&b'\n') {
            return Err("PAX record does not end with a newline".into());
        }
        let rec = &rec[..rec.len() - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        let key = &rec[..eq];
        if key.is_empty() {
            return Err("PAX record with an empty key".into());
        }
        out.push((key.to_vec(), rec[eq + 1..].to_vec()));
        d = &d[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(data: &[u8]) -> Vec<(Entry, Vec<u8>)> {
        let mut r = TarReader::new(data);
        let mut v = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            let mut d = vec![0u8; r.remaining() as usize];
            r.read_data(&mut d).unwrap();
            v.push((e, d));
        }
        v
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_numeric(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_numeric(b"  755 \0").unwrap(), 0o755);
        assert_eq!(parse_numeric(b"\0\0\0\0").unwrap(), 0);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap(),
            1 << 32
        );
        assert_eq!(parse_numeric(&[0xff; 8]).unwrap(), -1);
        assert!(parse_numeric(b"12x4").is_err());
        assert_eq!(
            parse_pax_time(b"1700000000.123456789").unwrap(),
            Timestamp {
                sec: 1_700_000_000,
                nsec: 123_456_789
            }
        );
        assert_eq!(
            parse_pax_time(b"-1.5").unwrap(),
            Timestamp {
                sec: -2,
                nsec: 500_000_000
            }
        );
        assert_eq!(
            parse_pax_time(b"12").unwrap(),
            Timestamp { sec: 12, nsec: 0 }
        );
        assert!(parse_pax_time(b"1e5").is_none());
    }

    #[test]
    fn long_names_pax_and_xattrs_with_tar_crate() {
        let long = "d/".repeat(80) + "file-with-a-long-name";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(2000);
        h.set_mtime(1234567890);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        // PAX entry with xattrs and a nanosecond mtime.
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v\0bin"[..]),
            ("mtime", &b"1600000000.5"[..]),
            ("path", "p\u{e9}/dir".as_bytes()),
        ])
        .unwrap();
        b.append_data(&mut h, "ignored", &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "s", "t/".repeat(70)).unwrap();
        let data = b.into_inner().unwrap();
        let v = entries(&data);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].0.path, long.as_bytes());
        assert_eq!(v[0].0.mode, 0o4755);
        assert_eq!((v[0].0.uid, v[0].0.gid), (1000, 2000));
        assert_eq!(v[0].0.mtime.sec, 1234567890);
        assert_eq!(v[0].1, b"hello");
        assert_eq!(v[1].0.kind, Kind::Dir);
        assert_eq!(v[1].0.path, "p\u{e9}/dir".as_bytes());
        assert_eq!(
            v[1].0.xattrs,
            vec![(b"user.k".to_vec(), b"v\0bin".to_vec())]
        );
        assert_eq!(
            v[1].0.mtime,
            Timestamp {
                sec: 1_600_000_000,
                nsec: 500_000_000
            }
        );
        assert_eq!(v[2].0.kind, Kind::Symlink);
        assert_eq!(v[2].0.link, "t/".repeat(70).as_bytes());
    }

    /// What follows the end-of-archive blocks is read (a pipe's writer
    /// finishes), up to a limit: an endless stream of zeros (`/dev/zero`)
    /// is an empty archive, not a read that never ends.
    #[test]
    fn an_endless_stream_after_the_end_is_read_only_so_far() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let len = data.len() as u64;
        let tail = 3 << 20;
        let padded = data.as_slice().chain(std::io::repeat(0).take(tail));
        let mut r = TarReader::new(padded);
        assert_eq!(r.next_entry().unwrap().unwrap().path, b"f");
        assert!(r.next_entry().unwrap().is_none());
        assert_eq!(r.position(), len + tail);

        // (An end to the stream, so that without a limit the test fails
        // rather than hangs.)
        let mut r = TarReader::new(std::io::repeat(0).take(4 * DRAIN_LIMIT));
        assert!(r.next_entry().unwrap().is_none());
        assert!(r.position() >= DRAIN_LIMIT, "{}", r.position());
        assert!(r.position() < DRAIN_LIMIT + (1 << 20), "{}", r.position());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let data = vec![b'x'; 1024];
        let mut r = TarReader::new(&data[..]);
        let e = r.next_entry().unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // Truncated data.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4000);
        b.append_data(&mut h, "f", &vec![1u8; 4000][..]).unwrap();
        let data = b.into_inner().unwrap();
        let mut r = TarReader::new(&data[..1500]);
        r.next_entry().unwrap().unwrap();
        let mut d = vec![0u8; 4000];
        let e = r.read_data(&mut d).unwrap_err().to_string();
        assert!(e.contains("unexpected end"), "{e}");
    }

    /// A tar of one empty file `f` with the PAX records `recs`.
    fn pax_tar(recs: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_pax_extensions(recs.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        b.append_data(&mut h, "f", &[][..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn bad_pax_numbers_say_what_is_wrong() {
        let cases = [
            ("size", "12x", "PAX size '12x' is not a decimal number"),
            ("size", "", "PAX size '' is empty"),
            (
                "size",
                "99999999999999999999",
                "is too large (more than 64 bits)",
            ),
            ("uid", "-5", "PAX uid '-5' is not a decimal number"),
            ("uid", "4294967296", "uid/gid 4294967296/0 out of range"),
            ("mtime", "1.2.3", "PAX mtime '1.2.3' is not a time"),
        ];
        for (k, v, want) in cases {
            let data = pax_tar(&[(k, v)]);
            let e = TarReader::new(&data[..])
                .next_entry()
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
        // The largest valid ids pass.
        let data = pax_tar(&[("uid", "4294967295"), ("gid", "70000")]);
        let e = TarReader::new(&data[..]).next_entry().unwrap().unwrap();
        assert_eq!((e.uid, e.gid), (4_294_967_295, 70_000));
    }

    /// A PAX `path`, `linkpath` or `GNU.sparse.name` with a NUL byte is
    /// refused, naming the record, as Go's archive/tar refuses it (GNU tar
    /// cuts the name there). It was taken whole: the name went into the
    /// ext4 directory with its NUL (e2fsck: "has illegal characters in its
    /// name"), an entry no path can reach.
    #[test]
    fn pax_names_with_a_nul_byte_are_refused() {
        for key in ["path", "linkpath", "GNU.sparse.name"] {
            let mut recs = vec![(key, "ab\0cd")];
            if key == "GNU.sparse.name" {
                recs.extend([("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")]);
            }
            let data = pax_tar(&recs);
            let e = TarReader::new(&data[..])
                .next_entry()
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("PAX {key} 'ab")), "{key}: {e}");
            assert!(e.contains("NUL byte"), "{key}: {e}");
        }
    }

    #[test]
    fn oversized_pax_is_refused_before_allocation() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(1 << 40);
        h.set_path("pax").unwrap();
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[0u8; 1024]);
        let mut r = TarReader::new(&data[..]);
        let e = r.next_entry().unwrap_err().to_string();
        assert!(e.contains("1 MiB"), "{e}");
    }
}
