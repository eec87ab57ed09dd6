//! Fuzz the NBD server's handshake and request parser with arbitrary client
//! bytes. The first byte chooses whether a valid handshake prefix (with or
//! without structured replies) is prepended so the fuzzer also reaches the
//! transmission-phase parser quickly.
#![no_main]

use blockdev::nbd::proto::*;
use blockdev::nbd::{process_client_bytes, Export};
use libfuzzer_sys::fuzz_target;

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
    }
    opt(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    v
}

fuzz_target!(|data: &[u8]| {
    let export = Export {
        name: "fuzz".into(),
        description: String::new(),
        size: 1 << 30,
        read_only: data.first().is_some_and(|b| b & 4 != 0),
    };
    let input = match data.first() {
        Some(b) if b & 3 == 1 => [handshake(false), data[1..].to_vec()].concat(),
        Some(b) if b & 3 == 2 => [handshake(true), data[1..].to_vec()].concat(),
        _ => data.to_vec(),
    };
    process_client_bytes(&input, &export);
});
