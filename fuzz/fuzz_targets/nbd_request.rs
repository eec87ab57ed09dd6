//! The NBD server's handshake and request parser fed arbitrary client bytes.
//! The entry point is `obdfuzz::nbd_request` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::nbd_request(data));
