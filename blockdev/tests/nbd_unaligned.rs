//! Reads at byte offsets that are not multiples of 512, through the layer
//! stack's extents and through NBD structured replies, return exactly the
//! stack's bytes.

mod nbd_common;
mod small_layer;

use std::sync::Arc;

use blockdev::commit::CommitOptions;
use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::ServerConfig;
use blockdev::{BlockDevice, Stack};
use nbd_common::*;
use small_layer::committed_layer;

/// A stack of one committed layer mapping data at [4096, 8192) and
/// [64 KiB, 64 KiB + 1000) (rounded to sectors) of a 1 MiB disk.
fn stack(dir: &std::path::Path) -> Stack {
    let writes = [
        (4096, pseudo_random(1, 4096)),
        (64 << 10, pseudo_random(2, 1024)),
    ];
    let out = committed_layer(dir, "layer.lsmt", &writes, &CommitOptions::default());
    Stack::open_read_only(&[out], None).unwrap()
}

/// (offset, len) pairs crossing data/hole boundaries at odd offsets.
const READS: &[(u64, u32)] = &[
    (8192 - 8, 16),
    (4096 - 94, 511),
    (4096 - 1, 2),
    (4100, 4096),
    (8191, 1),
    ((64 << 10) + 1000, 100),
    ((64 << 10) - 3, 1030),
    (1, 70000),
];

#[test]
fn extents_cover_exactly_the_bytes_asked_for() {
    let t = tempfile::tempdir().unwrap();
    let s = stack(t.path());
    for &(off, len) in READS {
        let ext = s.extents(off, len as u64).unwrap();
        assert_eq!(ext.first().map(|e| e.offset), Some(off), "{off}+{len}");
        let mut pos = off;
        for e in &ext {
            assert_eq!(e.offset, pos, "{off}+{len}: {ext:?}");
            pos += e.len;
        }
        assert_eq!(pos, off + len as u64, "{off}+{len}: {ext:?}");
    }
}

#[test]
fn structured_replies_to_unaligned_reads_carry_the_stack_bytes() {
    let t = tempfile::tempdir().unwrap();
    let s = Arc::new(stack(t.path()));
    let srv = start(s.clone(), ServerConfig::default());
    for df in [false, true] {
        let mut c = Client::connect(
            &srv.ep,
            &ClientOptions {
                structured: true,
                ..ClientOptions::default()
            },
        )
        .unwrap();
        for &(off, len) in READS {
            let mut want = vec![0u8; len as usize];
            s.read_at(&mut want, off).unwrap();
            let flags = if df {
                blockdev::nbd::proto::CMD_FLAG_DF
            } else {
                0
            };
            let r = c
                .call(blockdev::nbd::proto::CMD_READ, flags, off, len, &[])
                .unwrap();
            assert_eq!(r.error, 0, "{off}+{len}");
            assert!(r.data == want, "{off}+{len} (DF {df}): wrong bytes");
        }
        c.disconnect().unwrap();
    }
    srv.stop();
}
