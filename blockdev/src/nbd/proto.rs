//! NBD wire format: constants, message layouts and pure parsers.
//!
//! Everything on the wire is big-endian. The phases this module covers:
//!
//! * Handshake (fixed newstyle). Server: `NBDMAGIC` (u64), `IHAVEOPT` (u64),
//!   handshake flags (u16). Client: flags (u32). Then options, each
//!   `IHAVEOPT` (u64), option (u32), data length (u32), data; answered by
//!   option replies `0x3e889045565a9` (u64), option (u32), reply type (u32),
//!   length (u32), data. `NBD_OPT_EXPORT_NAME` is answered instead by size
//!   (u64), transmission flags (u16) and 124 zero bytes (omitted with
//!   `NO_ZEROES`).
//! * Transmission. Request (28 bytes): magic `0x25609513` (u32), command
//!   flags (u16), type (u16), handle (u64), offset (u64), length (u32),
//!   followed by `length` bytes of payload for `NBD_CMD_WRITE` only.
//!   Simple reply (16 bytes): magic `0x67446698` (u32), error (u32), handle
//!   (u64), then the data of a successful `NBD_CMD_READ`. Structured reply
//!   chunk (20 bytes): magic `0x668e33ef` (u32), flags (u16), type (u16),
//!   handle (u64), payload length (u32), payload.
//!
//! The parsers here are pure functions from bytes to values (no I/O), so
//! they can be fuzzed directly; [`check_request`] decides, for a parsed
//! request header and the negotiated session, which command to run or which
//! NBD error to answer with.

use std::fmt;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second server magic and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the client may ask to skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_REP_INFO` information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Largest READ/WRITE payload we accept (advertised as the maximum payload).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option data we read into memory; larger options are skipped.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// NBD error values (the only ones allowed on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Decode a wire value; unknown values are treated as `EINVAL` (as the
    /// protocol asks clients to do).
    pub fn from_code(v: u32) -> Errno {
        match v {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

/// Map a device error to the NBD error a client should see.
pub fn errno_of(e: &crate::Error) -> Errno {
    use crate::Error;
    let os = |err: &std::io::Error| match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Errno::NoSpc,
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => Errno::Perm,
        Some(libc::EINVAL) => Errno::Inval,
        _ => Errno::Io,
    };
    match e {
        Error::ReadOnly => Errno::Perm,
        Error::OutOfRange { .. } | Error::Invalid(_) => Errno::Inval,
        Error::Io { source, .. } => os(source),
        Error::RawIo(source) => os(source),
        Error::Corrupt { .. } | Error::Json { .. } | Error::Compress { .. } => Errno::Io,
    }
}

/// A violation that ends the session (no reply can be sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("message truncated: need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
}

/// A request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        if self.typ == CMD_WRITE {
            self.length as u64
        } else {
            0
        }
    }

    /// Encode (used by the test/bench client).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Parse the 28-byte request header. A wrong magic is fatal: the stream
/// can no longer be framed.
pub fn parse_request_header(b: &[u8]) -> Result<RequestHeader, ProtoError> {
    if b.len() < REQUEST_LEN {
        return Err(ProtoError::Short {
            need: REQUEST_LEN,
            have: b.len(),
        });
    }
    let magic = be32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(RequestHeader {
        flags: be16(&b[4..6]),
        typ: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: be32(&b[24..28]),
    })
}

/// What was negotiated for one connection, as far as requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// Writes are refused with `EPERM`.
    pub read_only: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected for the export in use.
    pub meta_allocation: bool,
}

impl Session {
    /// Transmission flags advertised for this session.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A request that gets an error reply (the session goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub msg: String,
}

fn reject(errno: Errno, msg: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        msg: msg.into(),
    }
}

/// Decide what to do with a request: the command to run, or the error to
/// answer. Follows the protocol's "SHOULD" error choices: unknown command or
/// flag → `EINVAL`; read/trim/block-status beyond the end → `EINVAL`;
/// write/write-zeroes beyond the end → `ENOSPC`; writes on a read-only
/// export → `EPERM`; payload over [`MAX_PAYLOAD`] → `EINVAL`.
pub fn check_request(h: &RequestHeader, s: &Session) -> Result<Command, Rejection> {
    let allowed = match h.typ {
        CMD_READ => CMD_FLAG_FUA | if s.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_DISC | CMD_FLUSH => CMD_FLAG_FUA,
        t => return Err(reject(Errno::Inval, format!("unknown command {t}"))),
    };
    if h.flags & !allowed != 0 {
        return Err(reject(
            Errno::Inval,
            format!(
                "command flags {:#x} not valid for command {}",
                h.flags & !allowed,
                h.typ
            ),
        ));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = h
        .offset
        .checked_add(h.length as u64)
        .is_some_and(|end| end <= s.size);
    let range_err = |errno| {
        reject(
            errno,
            format!(
                "range {}+{} is beyond the export size {}",
                h.offset, h.length, s.size
            ),
        )
    };
    let writes = || -> Result<(), Rejection> {
        if s.read_only {
            Err(reject(Errno::Perm, "export is read-only"))
        } else {
            Ok(())
        }
    };
    match h.typ {
        CMD_READ => {
            if h.length > MAX_PAYLOAD {
                return Err(reject(
                    Errno::Inval,
                    format!(
                        "read of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                        h.length
                    ),
                ));
            }
            if !in_range {
                return Err(range_err(Errno::Inval));
            }
            Ok(Command::Read {
                offset: h.offset,
                len: h.length,
                df: h.flags & CMD_FLAG_DF != 0,
            })
        }
        CMD_WRITE => {
            writes()?;
            if h.length > MAX_PAYLOAD {
                return Err(reject(
                    Errno::Inval,
                    format!(
                        "write of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                        h.length
                    ),
                ));
            }
            if !in_range {
                return Err(range_err(Errno::NoSpc));
            }
            Ok(Command::Write {
                offset: h.offset,
                len: h.length,
                fua,
            })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            if h.offset != 0 || h.length != 0 {
                return Err(reject(Errno::Inval, "flush with nonzero offset or length"));
            }
            Ok(Command::Flush)
        }
        CMD_TRIM => {
            writes()?;
            if !in_range {
                return Err(range_err(Errno::Inval));
            }
            Ok(Command::Trim {
                offset: h.offset,
                len: h.length,
                fua,
            })
        }
        CMD_WRITE_ZEROES => {
            writes()?;
            if !in_range {
                return Err(range_err(Errno::NoSpc));
            }
            Ok(Command::WriteZeroes {
                offset: h.offset,
                len: h.length,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            })
        }
        CMD_BLOCK_STATUS => {
            if !s.structured || !s.meta_allocation {
                return Err(reject(
                    Errno::Inval,
                    "block status without a negotiated metadata context",
                ));
            }
            if !in_range {
                return Err(range_err(Errno::Inval));
            }
            Ok(Command::BlockStatus {
                offset: h.offset,
                len: h.length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => unreachable!("command type filtered above"),
    }
}

/// Option data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parse `NBD_OPT_INFO`/`NBD_OPT_GO` data:
/// name length (u32), name, request count (u16), requests (u16 each).
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, String> {
    let mut r = Cursor::new(data);
    let nlen = r.u32()? as usize;
    if nlen > MAX_STRING {
        return Err(format!("export name of {nlen} bytes is too long"));
    }
    let name = r.string(nlen)?;
    let n = r.u16()? as usize;
    let mut requests = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Option data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parse meta-context option data: export name length (u32), name, query
/// count (u32), then per query its length (u32) and text.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, String> {
    let mut r = Cursor::new(data);
    let nlen = r.u32()? as usize;
    if nlen > MAX_STRING {
        return Err(format!("export name of {nlen} bytes is too long"));
    }
    let export = r.string(nlen)?;
    let n = r.u32()? as usize;
    // Every query takes at least 4 bytes, so `n` is bounded by the data.
    if n > r.remaining() / 4 {
        return Err(format!("{n} queries cannot fit in the option data"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        let qlen = r.u32()? as usize;
        if qlen > MAX_STRING {
            return Err(format!("query of {qlen} bytes is too long"));
        }
        let q = r.string(qlen)?;
        if !q.contains(':') {
            return Err(format!("query '{q}' has no namespace"));
        }
        queries.push(q);
    }
    r.finish()?;
    Ok(MetaRequest { export, queries })
}

/// Contexts a query list selects (`set`) or lists (`!set`) on this server.
pub fn match_meta_contexts(queries: &[String], set: bool) -> bool {
    if queries.is_empty() {
        // LIST with no query: everything; SET with no query: nothing.
        return !set;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
}

/// Encode an option reply header plus payload.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Fill a simple reply header into `b[..16]`.
pub fn put_simple_reply(b: &mut [u8], errno: u32, handle: u64) {
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
}

/// Fill a structured reply chunk header into `b[..20]`.
pub fn put_structured_reply(b: &mut [u8], flags: u16, typ: u16, handle: u64, len: u32) {
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A whole structured chunk with `payload`.
pub fn structured_chunk(flags: u16, typ: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; STRUCTURED_REPLY_LEN];
    put_structured_reply(&mut v, flags, typ, handle, payload.len() as u32);
    v.extend_from_slice(payload);
    v
}

/// A structured `NBD_REPLY_TYPE_ERROR` chunk (final).
pub fn structured_error(handle: u64, errno: Errno, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&errno.code().to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, &p)
}

/// A structured `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (final).
pub fn block_status_chunk(handle: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 8 * extents.len());
    p.extend_from_slice(&context.to_be_bytes());
    for &(len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    structured_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, &p)
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Bounds-checked reader over option data.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.remaining() < n {
            return Err(format!(
                "option data truncated: need {n} more bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take(4).map(be32)
    }
    fn string(&mut self, n: usize) -> Result<String, String> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "string is not UTF-8".to_string())?;
        if s.contains('\0') {
            return Err("string contains NUL".into());
        }
        Ok(s.to_string())
    }
    fn finish(&self) -> Result<(), String> {
        if self.remaining() != 0 {
            return Err(format!(
                "{} unexpected trailing bytes in option data",
                self.remaining()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sess() -> Session {
        Session {
            size: 1 << 20,
            read_only: false,
            structured: true,
            meta_allocation: true,
        }
    }

    fn hdr(typ: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            typ,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn magic_values_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn header_roundtrip_and_bad_magic() {
        let h = hdr(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let b = h.encode();
        assert_eq!(parse_request_header(&b).unwrap(), h);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(
            parse_request_header(&bad),
            Err(ProtoError::BadMagic(_))
        ));
        assert!(matches!(
            parse_request_header(&b[..27]),
            Err(ProtoError::Short { .. })
        ));
    }

    #[test]
    fn errors_follow_the_spec() {
        let s = sess();
        let e = |h| check_request(&h, &s).unwrap_err().errno;
        assert_eq!(e(hdr(CMD_READ, 0, (1 << 20) - 10, 11)), Errno::Inval);
        assert_eq!(e(hdr(CMD_WRITE, 0, (1 << 20) - 10, 11)), Errno::NoSpc);
        assert_eq!(e(hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1)), Errno::NoSpc);
        assert_eq!(e(hdr(CMD_TRIM, 0, u64::MAX, 2)), Errno::Inval);
        assert_eq!(e(hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1)), Errno::Inval);
        assert_eq!(e(hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Errno::Inval);
        assert_eq!(e(hdr(99, 0, 0, 0)), Errno::Inval);
        assert_eq!(e(hdr(CMD_CACHE, 0, 0, 0)), Errno::Inval);
        assert_eq!(e(hdr(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1)), Errno::Inval);
        assert_eq!(e(hdr(CMD_FLUSH, 0, 1, 0)), Errno::Inval);
        let ro = Session {
            read_only: true,
            ..s
        };
        assert_eq!(
            check_request(&hdr(CMD_WRITE, 0, 0, 1), &ro)
                .unwrap_err()
                .errno,
            Errno::Perm
        );
        assert_eq!(
            check_request(&hdr(CMD_TRIM, 0, 0, 1), &ro)
                .unwrap_err()
                .errno,
            Errno::Perm
        );
        let plain = Session {
            structured: false,
            meta_allocation: false,
            ..s
        };
        assert_eq!(
            check_request(&hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &plain)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(
            check_request(&hdr(CMD_BLOCK_STATUS, 0, 0, 1), &plain)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        assert_eq!(
            check_request(&hdr(CMD_READ, CMD_FLAG_FUA, 4096, 4096), &s).unwrap(),
            Command::Read {
                offset: 4096,
                len: 4096,
                df: false
            }
        );
        assert_eq!(
            check_request(&hdr(CMD_WRITE, 0, (1 << 20) - 1, 1), &s).unwrap(),
            Command::Write {
                offset: (1 << 20) - 1,
                len: 1,
                fua: false
            }
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut huge = d.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.export, "");
        assert_eq!(r.queries, vec![BASE_ALLOCATION.to_string()]);
        assert!(match_meta_contexts(&r.queries, true));
        assert!(!match_meta_contexts(&[], true));
        assert!(match_meta_contexts(&[], false));
        assert!(match_meta_contexts(&["base:".into()], false));
        assert!(!match_meta_contexts(&["base:".into()], true));
        assert!(!match_meta_contexts(&["qemu:dirty-bitmap:x".into()], true));
        let mut many = d.clone();
        many[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&many).is_err());
    }
}
