//! Property tests: arbitrary client bytes never crash the parser; random
//! request sequences against a live server agree with a plain byte-vector
//! model (data and error codes).

mod nbd_common;

use std::sync::Arc;

use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::*;
use blockdev::nbd::{process_client_bytes, Export, ServerConfig};
use blockdev::MemDevice;
use nbd_common::start;
use proptest::prelude::*;

fn export() -> Export {
    Export {
        name: "e".into(),
        description: String::new(),
        size: 1 << 20,
        read_only: false,
    }
}

/// A valid handshake prefix (flags, optional structured replies and
/// block status, GO) so that random tails reach the request parser.
fn handshake(structured: bool) -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    let mut opt = |code: u32, data: &[u8]| {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    if structured {
        opt(OPT_STRUCTURED_REPLY, &[]);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        opt(OPT_SET_META_CONTEXT, &m);
    }
    opt(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    v
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        prop_oneof![any::<u64>(), 0u64..(2 << 20)],
        prop_oneof![any::<u32>(), 0u32..8192],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(flags, typ, handle, offset, length, tail)| {
            let mut v = RequestHeader {
                flags,
                typ,
                handle,
                offset,
                length,
            }
            .encode()
            .to_vec();
            v.extend(tail);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_handshake_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        process_client_bytes(&bytes, &export());
    }

    #[test]
    fn arbitrary_requests_never_panic(
        structured in any::<bool>(),
        reqs in prop::collection::vec(request(), 0..8),
    ) {
        let mut input = handshake(structured);
        for r in &reqs {
            input.extend_from_slice(r);
        }
        let n = process_client_bytes(&input, &export());
        // The first request is parsed whenever it is complete on the wire
        // (a write's payload may be cut short by the end of input).
        if let Some(first) = reqs.first() {
            let h = parse_request_header(first).unwrap();
            let after: usize = reqs.iter().map(|r| r.len()).sum::<usize>() - REQUEST_LEN;
            if h.payload_len() <= after as u64 {
                prop_assert!(n >= 1);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u32),
    Write(u64, Vec<u8>),
    Trim(u64, u32),
    Zero(u64, u32),
    Flush,
}

const SIZE: u64 = 256 << 10;

fn op() -> impl Strategy<Value = Op> {
    let off = prop_oneof![0..SIZE, (SIZE - 4096)..(SIZE + 4096)];
    prop_oneof![
        (off.clone(), 0u32..20000).prop_map(|(o, l)| Op::Read(o, l)),
        (off.clone(), prop::collection::vec(any::<u8>(), 0..10000))
            .prop_map(|(o, d)| Op::Write(o, d)),
        (off.clone(), 0u32..20000).prop_map(|(o, l)| Op::Trim(o, l)),
        (off, 0u32..20000).prop_map(|(o, l)| Op::Zero(o, l)),
        Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn request_sequences_match_a_byte_vector_model(
        structured in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let dev = Arc::new(MemDevice::new(SIZE as usize));
        let srv = start(dev.clone(), ServerConfig::default());
        let mut c = Client::connect(
            &srv.ep,
            &ClientOptions { export: String::new(), structured, block_status: false },
        ).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let fits = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= SIZE);
        for op in ops {
            match op {
                Op::Read(o, l) => {
                    let r = c.call(CMD_READ, 0, o, l, &[]).unwrap();
                    if fits(o, l as u64) {
                        prop_assert_eq!(r.error, 0);
                        prop_assert!(r.data == model[o as usize..(o + l as u64) as usize]);
                    } else {
                        prop_assert_eq!(r.error, 22);
                    }
                }
                Op::Write(o, d) => {
                    let r = c.call(CMD_WRITE, 0, o, d.len() as u32, &d).unwrap();
                    if fits(o, d.len() as u64) {
                        prop_assert_eq!(r.error, 0);
                        model[o as usize..o as usize + d.len()].copy_from_slice(&d);
                    } else {
                        prop_assert_eq!(r.error, 28);
                    }
                }
                Op::Trim(o, l) | Op::Zero(o, l) if !fits(o, l as u64) => {
                    let typ = if matches!(op, Op::Trim(..)) { CMD_TRIM } else { CMD_WRITE_ZEROES };
                    let r = c.call(typ, 0, o, l, &[]).unwrap();
                    prop_assert_eq!(r.error, if typ == CMD_TRIM { 22 } else { 28 });
                }
                Op::Trim(o, l) | Op::Zero(o, l) => {
                    let typ = if matches!(op, Op::Trim(..)) { CMD_TRIM } else { CMD_WRITE_ZEROES };
                    let r = c.call(typ, 0, o, l, &[]).unwrap();
                    prop_assert_eq!(r.error, 0);
                    // MemDevice trims to zeros, so both read back as zeros here.
                    model[o as usize..(o + l as u64) as usize].fill(0);
                }
                Op::Flush => prop_assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).unwrap().error, 0),
            }
        }
        c.disconnect().unwrap();
        srv.stop();
        prop_assert!(dev.contents() == model);
    }
}
