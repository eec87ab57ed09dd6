//! The NBD client against a hostile server: short, oversized and
//! inconsistent replies in the handshake and in transmission are errors
//! (`InvalidData`), never panics or huge allocations.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::*;
use blockdev::nbd::Endpoint;

/// What the fake server does after the handshake with the client's first
/// request: its reply bytes.
type Reply = Box<dyn Fn(u64, u64, u32) -> Vec<u8> + Send>;

/// Serve one client on a Unix socket: a normal handshake (structured
/// replies acknowledged, `NBD_INFO_EXPORT` given unless `info` overrides
/// it), then `reply(handle, offset, length)` for the first request, then
/// close.
fn fake_server(dir: &std::path::Path, info: Option<Vec<u8>>, reply: Reply) -> Endpoint {
    let path: PathBuf = dir.join("nbd.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        let opt_reply = |s: &mut std::os::unix::net::UnixStream, opt: u32, typ: u32, d: &[u8]| {
            let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(d);
            s.write_all(&b).unwrap();
        };
        loop {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            match opt {
                OPT_GO => {
                    let export = info.clone().unwrap_or_else(|| {
                        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
                        e.extend_from_slice(&(1u64 << 20).to_be_bytes());
                        e.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
                        e
                    });
                    opt_reply(&mut s, opt, REP_INFO, &export);
                    opt_reply(&mut s, opt, REP_ACK, &[]);
                    break;
                }
                _ => opt_reply(&mut s, opt, REP_ACK, &[]),
            }
        }
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap());
        let length = u32::from_be_bytes(req[24..28].try_into().unwrap());
        let _ = s.write_all(&reply(handle, offset, length));
        // Then hang up.
    });
    Endpoint::Unix(path)
}

/// A structured reply chunk header.
fn chunk(flags: u16, typ: u16, handle: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn opts() -> ClientOptions {
    ClientOptions {
        export: String::new(),
        structured: true,
        block_status: true,
    }
}

fn expect_invalid(name: &str, r: std::io::Result<impl std::fmt::Debug>) {
    match r {
        Ok(v) => panic!("{name}: accepted: {v:?}"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::InvalidData,
            "{name}: wrong error: {e}"
        ),
    }
}

#[test]
fn malformed_structured_chunks_are_errors() {
    const DONE: u16 = REPLY_FLAG_DONE;
    let cases: Vec<(&str, Reply)> = vec![
        (
            "data chunk shorter than its offset",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, 4, &[0; 4])),
        ),
        (
            "empty data chunk",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, 0, &[])),
        ),
        (
            "data chunk at offset 2^64-1",
            Box::new(|h, _, _| {
                let mut p = u64::MAX.to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 16]);
                chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, 24, &p)
            }),
        ),
        (
            "data chunk before the request",
            Box::new(|h, off, _| {
                let mut p = (off.wrapping_sub(1)).to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 16]);
                chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, 24, &p)
            }),
        ),
        (
            "data chunk past the request",
            Box::new(|h, off, len| {
                let mut p = (off + len as u64 - 4).to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 16]);
                chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, 24, &p)
            }),
        ),
        (
            "hole chunk without its length",
            Box::new(|h, off, _| chunk(DONE, REPLY_TYPE_OFFSET_HOLE, h, 8, &off.to_be_bytes())),
        ),
        (
            "hole past the request",
            Box::new(|h, off, len| {
                let mut p = off.to_be_bytes().to_vec();
                p.extend_from_slice(&(len + 1).to_be_bytes());
                chunk(DONE, REPLY_TYPE_OFFSET_HOLE, h, 12, &p)
            }),
        ),
        (
            "error chunk of 3 bytes",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_ERROR, h, 3, &[0, 0, 5])),
        ),
        (
            "error chunk with a message longer than the chunk",
            Box::new(|h, _, _| {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&100u16.to_be_bytes());
                p.extend_from_slice(b"abc");
                chunk(DONE, REPLY_TYPE_ERROR, h, p.len() as u32, &p)
            }),
        ),
        (
            "error chunk with error 0",
            Box::new(|h, _, _| {
                let mut p = 0u32.to_be_bytes().to_vec();
                p.extend_from_slice(&0u16.to_be_bytes());
                chunk(DONE, REPLY_TYPE_ERROR, h, 6, &p)
            }),
        ),
        (
            "none chunk with a payload",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_NONE, h, 4, &[0; 4])),
        ),
        (
            "a 4 GiB chunk",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_OFFSET_DATA, h, u32::MAX, &[0; 64])),
        ),
        (
            "unknown chunk type",
            Box::new(|h, _, _| chunk(DONE, 77, h, 0, &[])),
        ),
        (
            "a reply for another handle",
            Box::new(|h, _, _| chunk(DONE, REPLY_TYPE_NONE, h + 1, 0, &[])),
        ),
        (
            "a simple reply with the wrong magic",
            Box::new(|h, _, _| {
                let mut b = 0x1234_5678u32.to_be_bytes().to_vec();
                b.extend_from_slice(&0u32.to_be_bytes());
                b.extend_from_slice(&h.to_be_bytes());
                b
            }),
        ),
    ];
    for (name, reply) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ep = fake_server(dir.path(), None, reply);
        let mut c = Client::connect(&ep, &opts()).unwrap();
        assert!(c.structured, "{name}");
        expect_invalid(name, c.read(4096, 4096));
    }
}

#[test]
fn malformed_block_status_is_an_error() {
    let cases: Vec<(&str, Reply)> = vec![
        (
            "block status chunk of 2 bytes",
            Box::new(|h, _, _| chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, 2, &[0, 1])),
        ),
        (
            "block status with half a descriptor",
            Box::new(|h, _, _| {
                chunk(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    h,
                    8,
                    &[0, 0, 0, 1, 0, 0, 16, 0],
                )
            }),
        ),
    ];
    for (name, reply) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ep = fake_server(dir.path(), None, reply);
        let mut c = Client::connect(&ep, &opts()).unwrap();
        expect_invalid(name, c.block_status(0, 4096));
    }
}

#[test]
fn malformed_handshake_replies_are_errors() {
    for (name, info) in [
        ("a 2-byte export info", INFO_EXPORT.to_be_bytes().to_vec()),
        ("an empty info", Vec::new()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ep = fake_server(dir.path(), Some(info), Box::new(|_, _, _| Vec::new()));
        expect_invalid(name, Client::connect(&ep, &opts()).map(|c| c.size));
    }
}
