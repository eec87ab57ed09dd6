//! Shared code of the overlaybd command-line tools: [`cli`], helpers of the thin
//! binaries (logging, error reporting, sizes, progress); [`engine`], the
//! `--engine` options; [`signals`], SIGINT/SIGTERM in the tools that write
//! files (unfinished outputs removed, the result file marked failed).
//!
//! The libraries behind the convertor live in their own crates (`crates/`):
//! `obdoci` (OCI image model and layouts), `obdregistry` (distribution client),
//! `obddedup` (dedup database), `obdconvert` (the conversion pipeline).

pub mod cli;
pub mod engine;
pub mod signals;
