//! The handshake (fixed newstyle option haggling) and request framing,
//! written against `Read`/`Write` so they can run over sockets, in tests
//! over byte buffers, and under the fuzzer.
//!
//! Layout of the messages is described in [`super::proto`].

use std::io::{self, Read, Write};

use super::proto::*;

/// What the server exports (one export per server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Export name; the empty name (the default export) also selects it.
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Refuse writes with `EPERM` and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

impl Export {
    /// Whether a client-supplied name selects this export.
    pub fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// Why a connection ended without an orderly close.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol violation")]
    Proto(#[from] ProtoError),
    #[error("client asked for unknown export '{0}' with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// The server has no room for another session (NBD_OPT_EXPORT_NAME
    /// cannot be answered with an error, so the connection is closed).
    #[error("no room for another session")]
    Busy,
}

/// Result of option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// Transmission phase starts with this session.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT` (or closed the connection between options).
    Closed,
}

fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed inside a {}-byte message", buf.len()),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Read and drop `n` bytes without buffering them all.
pub fn discard<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed after {copied} of {n} payload bytes"),
        ));
    }
    Ok(())
}

fn reply<W: Write>(w: &mut W, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&encode_option_reply(option, typ, data))
}

fn info_reply<W: Write>(w: &mut W, option: u32, info: u16, data: &[u8]) -> io::Result<()> {
    let mut p = Vec::with_capacity(2 + data.len());
    p.extend_from_slice(&info.to_be_bytes());
    p.extend_from_slice(data);
    reply(w, option, REP_INFO, &p)
}

/// Run the server side of the fixed-newstyle handshake.
///
/// Supports `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
/// `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`
/// (`base:allocation`); everything else is answered `NBD_REP_ERR_UNSUP`.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Negotiated, ConnError> {
    negotiate_admit(r, w, export, &mut || true)
}

/// [`negotiate`], asking `admit` for a session slot when the client wants
/// to enter transmission: a refused `NBD_OPT_GO` gets `NBD_REP_ERR_POLICY`
/// (the client may try again or give up), a refused
/// `NBD_OPT_EXPORT_NAME` ends with [`ConnError::Busy`]. `admit` is called
/// at most once per successful return (its slot belongs to the session).
pub fn negotiate_admit<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &Export,
    admit: &mut dyn FnMut() -> bool,
) -> Result<Negotiated, ConnError> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    w.flush()?;

    let mut cf = [0u8; 4];
    if !read_exact_or_eof(r, &mut cf)? {
        return Ok(Negotiated::Closed);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::BadClientFlags(client_flags).into());
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut session = Session {
        size: export.size,
        read_only: export.read_only,
        structured: false,
        meta_allocation: false,
    };

    loop {
        let mut h = [0u8; 16];
        if !read_exact_or_eof(r, &mut h)? {
            return Ok(Negotiated::Closed);
        }
        let magic = be64(&h[0..8]);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic(magic).into());
        }
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            discard(r, len as u64)?;
            if opt == OPT_EXPORT_NAME {
                return Err(ConnError::UnknownExport(format!("<{len}-byte name>")));
            }
            reply(
                w,
                opt,
                REP_ERR_TOO_BIG,
                format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}").as_bytes(),
            )?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export.matches(&name) {
                    return Err(ConnError::UnknownExport(name));
                }
                if !admit() {
                    return Err(ConnError::Busy);
                }
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&export.size.to_be_bytes());
                m.extend_from_slice(&session.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&m)?;
                w.flush()?;
                return Ok(Negotiated::Transmission(session));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = reply(w, opt, REP_ACK, &[]).and_then(|_| w.flush());
                return Ok(Negotiated::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let mut p = Vec::new();
                    p.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(export.name.as_bytes());
                    p.extend_from_slice(export.description.as_bytes());
                    reply(w, opt, REP_SERVER, &p)?;
                    reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(msg) => reply(w, opt, REP_ERR_INVALID, msg.as_bytes())?,
                Ok(req) if !export.matches(&req.name) => reply(
                    w,
                    opt,
                    REP_ERR_UNKNOWN,
                    format!(
                        "unknown export '{}' (this server exports '{}')",
                        req.name, export.name
                    )
                    .as_bytes(),
                )?,
                Ok(_) if opt == OPT_GO && !admit() => reply(
                    w,
                    opt,
                    REP_ERR_POLICY,
                    b"the server has reached its session limit; try again later",
                )?,
                Ok(req) => {
                    let mut e = Vec::with_capacity(10);
                    e.extend_from_slice(&export.size.to_be_bytes());
                    e.extend_from_slice(&session.transmission_flags().to_be_bytes());
                    info_reply(w, opt, INFO_EXPORT, &e)?;
                    if req.requests.contains(&INFO_NAME) {
                        info_reply(w, opt, INFO_NAME, export.name.as_bytes())?;
                    }
                    if req.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                        info_reply(w, opt, INFO_DESCRIPTION, export.description.as_bytes())?;
                    }
                    if req.requests.contains(&INFO_BLOCK_SIZE) {
                        let mut b = Vec::with_capacity(12);
                        b.extend_from_slice(&1u32.to_be_bytes());
                        b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                        b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        info_reply(w, opt, INFO_BLOCK_SIZE, &b)?;
                    }
                    reply(w, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        w.flush()?;
                        return Ok(Negotiated::Transmission(session));
                    }
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    session.structured = true;
                    reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    session.meta_allocation = false;
                }
                if !session.structured {
                    reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"metadata contexts need structured replies first",
                    )?;
                } else {
                    match parse_meta_request(&data) {
                        Err(msg) => reply(w, opt, REP_ERR_INVALID, msg.as_bytes())?,
                        Ok(req) if !export.matches(&req.export) => reply(
                            w,
                            opt,
                            REP_ERR_UNKNOWN,
                            format!("unknown export '{}'", req.export).as_bytes(),
                        )?,
                        Ok(req) => {
                            if match_meta_contexts(&req.queries, set) {
                                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                                let mut p = Vec::new();
                                p.extend_from_slice(&id.to_be_bytes());
                                p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                reply(w, opt, REP_META_CONTEXT, &p)?;
                                if set {
                                    session.meta_allocation = true;
                                }
                            }
                            reply(w, opt, REP_ACK, &[])?;
                        }
                    }
                }
            }
            OPT_STARTTLS => reply(w, opt, REP_ERR_UNSUP, b"TLS is not supported")?,
            _ => reply(
                w,
                opt,
                REP_ERR_UNSUP,
                format!("option {opt} is not supported").as_bytes(),
            )?,
        }
        w.flush()?;
    }
}

/// One request read off the wire during transmission.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The client closed the connection between requests.
    Eof,
    /// A valid request; `payload` holds the data of a write.
    Request {
        handle: u64,
        cmd: Command,
        payload: Vec<u8>,
    },
    /// A request to answer with an error (any write payload was consumed).
    Rejected {
        handle: u64,
        typ: u16,
        rejection: Rejection,
    },
}

/// Read the next request (header plus write payload) and validate it.
///
/// Errors mean the stream can no longer be framed (bad magic, connection
/// closed mid-request); rejections keep the session going. Memory is only
/// allocated for payloads that passed [`check_request`] (at most
/// [`MAX_PAYLOAD`]); other payloads are skipped.
pub fn read_incoming<R: Read>(r: &mut R, s: &Session) -> Result<Incoming, ConnError> {
    match read_request_header(r)? {
        None => Ok(Incoming::Eof),
        Some(h) => read_request_body(r, &h, s),
    }
}

/// The first half of [`read_incoming`]: the next request's header, `None`
/// at the end of the stream (before a header starts). The server looks at
/// it to reserve memory for the reply before the payload is read.
pub fn read_request_header<R: Read>(r: &mut R) -> Result<Option<RequestHeader>, ConnError> {
    let mut hb = [0u8; REQUEST_LEN];
    if !read_exact_or_eof(r, &mut hb)? {
        return Ok(None);
    }
    Ok(Some(parse_request_header(&hb)?))
}

/// The second half of [`read_incoming`]: validate header `h` and read (or
/// skip) its payload.
pub fn read_request_body<R: Read>(
    r: &mut R,
    h: &RequestHeader,
    s: &Session,
) -> Result<Incoming, ConnError> {
    match check_request(h, s) {
        Ok(cmd) => {
            let payload = if let Command::Write { len, .. } = cmd {
                let mut p = vec![0u8; len as usize];
                r.read_exact(&mut p)?;
                p
            } else {
                Vec::new()
            };
            Ok(Incoming::Request {
                handle: h.handle,
                cmd,
                payload,
            })
        }
        Err(rejection) => {
            discard(r, h.payload_len())?;
            Ok(Incoming::Rejected {
                handle: h.handle,
                typ: h.typ,
                rejection,
            })
        }
    }
}

/// Feed arbitrary client bytes through the handshake and request parser,
/// as the fuzz target does; returns how many requests were parsed. Never
/// panics and never allocates more than the protocol limits allow.
pub fn process_client_bytes(input: &[u8], export: &Export) -> usize {
    let mut r = input;
    let mut out = Vec::new();
    let session = match negotiate(&mut r, &mut out, export) {
        Ok(Negotiated::Transmission(s)) => s,
        _ => return 0,
    };
    let mut n = 0;
    while let Ok(inc) = read_incoming(&mut r, &session) {
        if inc == Incoming::Eof {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            name: "disk".into(),
            description: "test".into(),
            size: 1 << 20,
            read_only: false,
        }
    }

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Split server output into option replies (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = &out[18..];
        while p.len() >= 20 && be64(p) == OPT_REPLY_MAGIC {
            let len = be32(&p[16..20]) as usize;
            v.push((be32(&p[8..12]), be32(&p[12..16]), p[20..20 + len].to_vec()));
            p = &p[20 + len..];
        }
        v
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_with_structured_and_meta() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        input.extend(opt(OPT_SET_META_CONTEXT, &meta));
        input.extend(opt(OPT_GO, &go("disk", &[INFO_BLOCK_SIZE, INFO_NAME])));
        let mut r = &input[..];
        let mut out = Vec::new();
        let n = negotiate(&mut r, &mut out, &export()).unwrap();
        let Negotiated::Transmission(s) = n else {
            panic!("expected transmission")
        };
        assert!(s.structured && s.meta_allocation);
        assert_eq!(&out[0..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        let reps = replies(&out);
        assert_eq!(reps[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        assert_eq!(reps[1].1, REP_META_CONTEXT);
        assert_eq!(&reps[1].2[4..], b"base:allocation");
        assert_eq!(reps[2].1, REP_ACK);
        // INFO_EXPORT: size and flags.
        assert_eq!(reps[3].1, REP_INFO);
        assert_eq!(be16(&reps[3].2), INFO_EXPORT);
        assert_eq!(be64(&reps[3].2[2..]), 1 << 20);
        let flags = be16(&reps[3].2[10..]);
        assert_ne!(flags & TFLAG_SEND_DF, 0);
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(reps.last().unwrap().1, REP_ACK);
        assert!(r.is_empty());
    }

    #[test]
    fn unknown_export_and_options_get_errors() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_GO, &go("nope", &[])));
        input.extend(opt(99, b"xyz"));
        input.extend(opt(OPT_LIST, b"x"));
        input.extend(opt(OPT_SET_META_CONTEXT, &[]));
        input.extend(opt(OPT_GO, &[0, 0])); // truncated
        input.extend(opt(OPT_ABORT, &[]));
        let mut r = &input[..];
        let mut out = Vec::new();
        assert_eq!(
            negotiate(&mut r, &mut out, &export()).unwrap(),
            Negotiated::Closed
        );
        let types: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            vec![
                REP_ERR_UNKNOWN,
                REP_ERR_UNSUP,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
    }

    #[test]
    fn export_name_and_bad_client_flags() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b""));
        let mut r = &input[..];
        let mut out = Vec::new();
        let n = negotiate(&mut r, &mut out, &export()).unwrap();
        assert!(matches!(n, Negotiated::Transmission(_)));
        assert_eq!(out.len(), 18 + 10, "no zero padding with NO_ZEROES");

        let input = 0x80u32.to_be_bytes();
        let mut r = &input[..];
        assert!(matches!(
            negotiate(&mut r, &mut Vec::new(), &export()),
            Err(ConnError::Proto(ProtoError::BadClientFlags(0x80)))
        ));

        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"other"));
        let mut r = &input[..];
        assert!(matches!(
            negotiate(&mut r, &mut Vec::new(), &export()),
            Err(ConnError::UnknownExport(_))
        ));
    }

    #[test]
    fn rejected_write_payload_is_skipped() {
        let s = Session {
            size: 4096,
            read_only: true,
            structured: false,
            meta_allocation: false,
        };
        let mut input = RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            handle: 1,
            offset: 0,
            length: 5,
        }
        .encode()
        .to_vec();
        input.extend_from_slice(b"hello");
        input.extend_from_slice(
            &RequestHeader {
                flags: 0,
                typ: CMD_READ,
                handle: 2,
                offset: 0,
                length: 5,
            }
            .encode(),
        );
        let mut r = &input[..];
        match read_incoming(&mut r, &s).unwrap() {
            Incoming::Rejected {
                handle, rejection, ..
            } => {
                assert_eq!(handle, 1);
                assert_eq!(rejection.errno, Errno::Perm);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            read_incoming(&mut r, &s).unwrap(),
            Incoming::Request { handle: 2, .. }
        ));
        assert_eq!(read_incoming(&mut r, &s).unwrap(), Incoming::Eof);
    }
}
