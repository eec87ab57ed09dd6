//! Test services (docker-registry, token server, PKI, proxy: the registry crate's test
//! harness, shared) and convertor helpers.
#![allow(dead_code)]

#[path = "../../../../crates/registry/tests/common/mod.rs"]
mod services;

pub mod convert;

pub use services::*;
