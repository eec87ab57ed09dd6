//! Layer blobs in their tar wrapper, with ZFile or plain LSMT inside.
//! The entry point is `obdfuzz::tar_wrapper` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::tar_wrapper(data));
