//! The layer tar reader (ustar, PAX, GNU long names, GNU and PAX sparse).
//! The entry point is `obdfuzz::tar_reader` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::tar_reader(data));
