//! A small committed layer for tests: a 1 MiB writable layer created,
//! written and committed with the given options; its writable files removed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::{BlockDevice, Stack};

/// Commit `writes` (offset, bytes) into `dir/name` with `opts`.
pub fn committed_layer(
    dir: &Path,
    name: &str,
    writes: &[(u64, Vec<u8>)],
    opts: &CommitOptions,
) -> PathBuf {
    let (d, i) = (dir.join(format!("{name}.d")), dir.join(format!("{name}.i")));
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    if !writes.is_empty() {
        let s = Stack::open(&[], Some((&d, &i))).unwrap();
        for (off, bytes) in writes {
            s.write_at(bytes, *off).unwrap();
        }
        s.flush().unwrap();
    }
    let out = dir.join(name);
    commit_writable(&d, &i, &out, opts).unwrap();
    std::fs::remove_file(d).unwrap();
    std::fs::remove_file(i).unwrap();
    out
}
