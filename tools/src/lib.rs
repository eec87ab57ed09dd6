//! Shared code for the overlaybd command-line tools.

pub mod cli;
pub mod dedup;
