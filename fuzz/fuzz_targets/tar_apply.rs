//! Layer tars applied to a small ext4 (paths, links, whiteouts, sparse files, limits).
//! The entry point is `obdfuzz::tar_apply` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::tar_apply(data));
