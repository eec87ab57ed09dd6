//! The gzip random-access index (gzip.meta) with its gzip blob.
//! The entry point is `obdfuzz::gzip_index` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::gzip_index(data));
