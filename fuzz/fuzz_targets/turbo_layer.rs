//! Sealed TurboOCI layers (`*.fs.meta`) with their layer tar as target.
//! The entry point is `obdfuzz::turbo_layer` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::turbo_layer(data));
