//! Registry WWW-Authenticate challenge headers.
//! The entry point is `obdfuzz::www_authenticate` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::www_authenticate(data));
