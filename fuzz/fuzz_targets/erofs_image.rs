//! EROFS images (TurboOCI layer filesystems).
//! The entry point is `obdfuzz::erofs_image` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::erofs_image(data));
