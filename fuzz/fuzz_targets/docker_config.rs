//! Docker client configuration files (config.json auths, helpers).
//! The entry point is `obdfuzz::docker_config` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::docker_config(data));
