//! Sealed LSMT blobs: header, trailer and index, read through a layer stack.
//! The entry point is `obdfuzz::lsmt_sealed` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::lsmt_sealed(data));
