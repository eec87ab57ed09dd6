//! OCI/Docker manifests, indexes, image configs, references.
//! The entry point is `obdfuzz::oci_manifest` (crates/fuzzing), which the normal
//! test suite also runs over mutated seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| obdfuzz::oci_manifest(data));
