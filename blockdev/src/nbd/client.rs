//! A small NBD client: fixed-newstyle `NBD_OPT_GO`, optional structured
//! replies and `base:allocation`, pipelined requests.
//!
//! It exists for the robustness tests (which must send requests real
//! clients never send) and for the benchmark's random-read load; the
//! acceptance tests use Debian's `nbdinfo`, `nbdcopy` and `qemu-img`.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use super::proto::*;
use super::server::Endpoint;

/// One reply to a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success, else an NBD error value.
    pub error: u32,
    /// Read data (reassembled), or block-status descriptors as raw bytes.
    pub data: Vec<u8>,
    /// Error message of a structured error chunk.
    pub message: String,
    /// Content chunks of a structured read reply, in arrival order:
    /// `(chunk type, offset, length)` (`REPLY_TYPE_OFFSET_DATA` or
    /// `REPLY_TYPE_OFFSET_HOLE`).
    pub chunks: Vec<(u16, u64, u64)>,
}

/// Options for [`Client::connect`].
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub export: String,
    pub structured: bool,
    pub block_status: bool,
}

/// A connected client in transmission phase.
pub struct Client {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    /// Export size.
    pub size: u64,
    /// Transmission flags the server sent.
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    pending_reads: HashMap<u64, (u64, u32)>,
    next_handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn rd<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// A socket's read side that waits for data in `poll(POLLIN)`, not in a
/// blocking `recv`, so that the server's reads of our requests do not wake
/// us while we wait for replies ([`super::sock`]).
struct PollIn<S>(S);

impl<S: Read + AsRawFd> Read for PollIn<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        super::sock::recv_waiting(self.0.as_raw_fd(), buf)
    }
}

impl Client {
    /// Open a raw byte stream to `ep` (for sending malformed input).
    pub fn raw(ep: &Endpoint) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok(match ep {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p)?;
                (Box::new(PollIn(s.try_clone()?)), Box::new(s))
            }
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                (Box::new(PollIn(s.try_clone()?)), Box::new(s))
            }
        })
    }

    /// Connect and negotiate with `NBD_OPT_GO`.
    pub fn connect(ep: &Endpoint, o: &ClientOptions) -> io::Result<Client> {
        let (r, w) = Self::raw(ep)?;
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let hello: [u8; 18] = rd(&mut r)?;
        if be64(&hello[0..8]) != NBDMAGIC || be64(&hello[8..16]) != IHAVEOPT {
            return Err(bad("server did not send NBDMAGIC/IHAVEOPT"));
        }
        w.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut structured = false;
        if o.structured {
            let (t, _) = option(&mut r, &mut w, OPT_STRUCTURED_REPLY, &[])?;
            structured = t == REP_ACK;
        }
        if structured && o.block_status {
            let mut d = Vec::new();
            d.extend_from_slice(&(o.export.len() as u32).to_be_bytes());
            d.extend_from_slice(o.export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option(&mut r, &mut w, OPT_SET_META_CONTEXT, &d)?;
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(o.export.len() as u32).to_be_bytes());
        d.extend_from_slice(o.export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let (t, infos) = option(&mut r, &mut w, OPT_GO, &d)?;
        if t != REP_ACK {
            return Err(bad(format!("NBD_OPT_GO failed with reply type {t:#x}")));
        }
        let e = infos
            .iter()
            .find(|i| i.len() == 12 && be16(i) == INFO_EXPORT)
            .ok_or_else(|| bad("no NBD_INFO_EXPORT in reply to NBD_OPT_GO"))?;
        Ok(Client {
            r,
            w,
            size: be64(&e[2..10]),
            flags: be16(&e[10..12]),
            structured,
            pending_reads: HashMap::new(),
            next_handle: 1,
        })
    }

    /// Queue a request without waiting; returns its handle.
    pub fn send(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let h = RequestHeader {
            flags,
            typ,
            handle,
            offset,
            length,
        };
        self.w.write_all(&h.encode())?;
        self.w.write_all(payload)?;
        if typ == CMD_READ {
            self.pending_reads.insert(handle, (offset, length));
        }
        Ok(handle)
    }

    /// Push queued requests to the server.
    pub fn flush_requests(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// Bytes already received but not yet consumed by [`Client::recv`]:
    /// when nonzero, another reply has started to arrive.
    pub fn buffered(&self) -> usize {
        self.r.buffer().len()
    }

    /// Wait for the next complete reply (any handle).
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut r = Reply::default();
        self.recv_into(&mut r)?;
        Ok(r)
    }

    /// [`Client::recv`] into `out`, reusing its buffers: read data goes
    /// straight from the stream into `out.data`, as a client reading into
    /// its caller's buffer does (no allocation per reply once `out.data`
    /// has the size of the reads).
    pub fn recv_into(&mut self, out: &mut Reply) -> io::Result<()> {
        out.error = 0;
        out.message.clear();
        out.chunks.clear();
        let magic = u32::from_be_bytes(rd(&mut self.r)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest: [u8; 12] = rd(&mut self.r)?;
                out.error = be32(&rest[0..4]);
                out.handle = be64(&rest[4..12]);
                match self.pending_reads.remove(&out.handle) {
                    Some((_, len)) if out.error == 0 => {
                        // Every byte is overwritten below.
                        if out.data.len() != len as usize {
                            out.data.clear();
                            out.data.resize(len as usize, 0);
                        }
                        self.r.read_exact(&mut out.data)?;
                    }
                    _ => out.data.clear(),
                }
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC => self.recv_structured(out),
            m => Err(bad(format!("bad reply magic {m:#x}"))),
        }
    }

    fn recv_structured(&mut self, out: &mut Reply) -> io::Result<()> {
        let mut first = true;
        // Whether `out.data` has been set up for this read.
        let mut sized = false;
        loop {
            if !first {
                let magic = u32::from_be_bytes(rd(&mut self.r)?);
                if magic != STRUCTURED_REPLY_MAGIC {
                    return Err(bad(format!("bad chunk magic {magic:#x}")));
                }
            }
            let h: [u8; 16] = rd(&mut self.r)?;
            let flags = be16(&h[0..2]);
            let typ = be16(&h[2..4]);
            let handle = be64(&h[4..12]);
            let len = be32(&h[12..16]) as u64;
            if !first && handle != out.handle {
                return Err(bad("interleaved structured replies are not handled"));
            }
            first = false;
            out.handle = handle;
            let read = self.pending_reads.get(&handle).copied();
            // Every length is checked against what the chunk type allows
            // before anything is allocated or sliced.
            let (lo, hi) = chunk_len_bounds(typ, read.map(|r| r.1));
            if len < lo || len > hi {
                return Err(bad(format!(
                    "structured reply chunk of type {typ} has length {len} (allowed {lo}..={hi})"
                )));
            }
            // Data and holes must fall inside the read they answer.
            let place = |off: u64, n: u64| -> io::Result<usize> {
                let (roff, rlen) =
                    read.ok_or_else(|| bad("data chunk for a request that is not a read"))?;
                match (off.checked_sub(roff), off.checked_add(n)) {
                    (Some(start), Some(end)) if end <= roff + rlen as u64 => Ok(start as usize),
                    _ => Err(bad(format!(
                        "chunk {off}+{n} is outside the request {roff}+{rlen}"
                    ))),
                }
            };
            match typ {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let off = u64::from_be_bytes(rd(&mut self.r)?);
                    let n = if typ == REPLY_TYPE_OFFSET_DATA {
                        len - 8
                    } else {
                        be32(&rd::<4>(&mut self.r)?) as u64
                    };
                    if n == 0 {
                        return Err(bad("empty data or hole chunk"));
                    }
                    let start = place(off, n)?;
                    if !sized {
                        // Parts no chunk covers read as zeros.
                        out.data.clear();
                        out.data.resize(read.map_or(0, |r| r.1) as usize, 0);
                        sized = true;
                    }
                    let dst = &mut out.data[start..start + n as usize];
                    if typ == REPLY_TYPE_OFFSET_DATA {
                        self.r.read_exact(dst)?;
                    } else {
                        dst.fill(0);
                    }
                    out.chunks.push((typ, off, n));
                }
                _ => {
                    let mut p = vec![0u8; len as usize];
                    self.r.read_exact(&mut p)?;
                    match typ {
                        REPLY_TYPE_BLOCK_STATUS => {
                            if !(p.len() - 4).is_multiple_of(8) {
                                return Err(bad("block status chunk with a partial descriptor"));
                            }
                            out.data.clear();
                            out.data.extend_from_slice(&p[4..]);
                            sized = true;
                        }
                        t if t & 0x8000 != 0 => {
                            let error = be32(&p[0..4]);
                            let ml = be16(&p[4..6]) as usize;
                            let tail = if t == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
                            if error == 0 {
                                return Err(bad("error chunk with error value 0"));
                            }
                            if 6 + ml + tail > p.len()
                                || (matches!(t, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET)
                                    && 6 + ml + tail != p.len())
                            {
                                return Err(bad(format!(
                                    "error chunk of {} bytes with a {ml}-byte message",
                                    p.len()
                                )));
                            }
                            out.error = error;
                            out.message = String::from_utf8_lossy(&p[6..6 + ml]).into_owned();
                        }
                        t => return Err(bad(format!("unknown chunk type {t}"))),
                    }
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                self.pending_reads.remove(&handle);
                if out.error != 0 || !sized {
                    out.data.clear();
                }
                return Ok(());
            }
        }
    }

    /// Send one request and wait for its reply.
    pub fn call(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        let h = self.send(typ, flags, offset, length, payload)?;
        self.flush_requests()?;
        let r = self.recv()?;
        if r.handle != h {
            return Err(bad("reply for another handle"));
        }
        Ok(r)
    }

    /// Read `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let r = self.call(CMD_READ, 0, offset, len, &[])?;
        if r.error != 0 {
            return Err(io::Error::other(format!(
                "read failed with NBD error {}",
                r.error
            )));
        }
        Ok(r.data)
    }

    /// Write `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        Ok(self
            .call(CMD_WRITE, 0, offset, data.len() as u32, data)?
            .error)
    }

    /// Block status descriptors `(length, flags)` for a range.
    pub fn block_status(&mut self, offset: u64, len: u32) -> io::Result<Vec<(u32, u32)>> {
        let r = self.call(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        if r.error != 0 {
            return Err(io::Error::other(format!(
                "block status failed with NBD error {}",
                r.error
            )));
        }
        Ok(r.data
            .chunks_exact(8)
            .map(|c| (be32(&c[0..4]), be32(&c[4..8])))
            .collect())
    }

    /// Send `NBD_CMD_DISC` and close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        self.flush_requests()
    }
}

/// Largest block status chunk accepted (8 M descriptors).
const MAX_BLOCK_STATUS_CHUNK: u64 = 4 + (8 << 23);
/// Longest error message the protocol allows.
const MAX_ERROR_MESSAGE: u64 = 4096;

/// The lengths a structured reply chunk of type `typ` may have, given the
/// length of the read it answers (if it answers a read).
fn chunk_len_bounds(typ: u16, read_len: Option<u32>) -> (u64, u64) {
    match typ {
        REPLY_TYPE_NONE => (0, 0),
        REPLY_TYPE_OFFSET_DATA => (8, 8 + read_len.unwrap_or(0) as u64),
        REPLY_TYPE_OFFSET_HOLE => (12, 12),
        REPLY_TYPE_BLOCK_STATUS => (4, MAX_BLOCK_STATUS_CHUNK),
        t if t & 0x8000 != 0 => (6, 6 + MAX_ERROR_MESSAGE + 8),
        // Unknown non-error types are refused after the length check.
        _ => (0, 0),
    }
}

/// Send one option and collect its replies until a final one; returns the
/// final reply type and the data of the `NBD_REP_INFO` replies.
fn option<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    opt: u32,
    data: &[u8],
) -> io::Result<(u32, Vec<Vec<u8>>)> {
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()?;
    let mut infos = Vec::new();
    loop {
        let h: [u8; 20] = rd(r)?;
        if be64(&h[0..8]) != OPT_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let typ = be32(&h[12..16]);
        let len = be32(&h[16..20]) as usize;
        if len > 1 << 20 {
            return Err(bad("option reply too long"));
        }
        let mut p = vec![0u8; len];
        r.read_exact(&mut p)?;
        match typ {
            REP_INFO => infos.push(p),
            REP_SERVER | REP_META_CONTEXT => {}
            t => return Ok((t, infos)),
        }
    }
}
