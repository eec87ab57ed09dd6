//! ZFile header, trailer, jump table and block decompression.
//! The entry point is `obdfuzz::zfile` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::zfile(data));
