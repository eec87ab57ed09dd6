//! overlaybd config.json files.
//! The entry point is `obdfuzz::config_json` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::config_json(data));
