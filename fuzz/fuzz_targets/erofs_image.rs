//! Fuzz the EROFS reader with arbitrary images: open, verify the whole
//! tree (reading every file, symlink and xattr), then the per-call API a
//! filesystem front end uses. Errors are expected; panics, hangs and
//! huge allocations are bugs. A good seed is any image our writer makes
//! (see `fs/tests/erofs_robust.rs`, which runs the same checks on damaged
//! copies of one in the normal test suite).
#![no_main]

use std::sync::Arc;

use blockdev::{BlockDevice, MemDevice};
use libfuzzer_sys::fuzz_target;
use obdfs::erofs::{ErofsReader, VerifyLimits};

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(MemDevice::new(data.len()));
    dev.write_at(data, 0).unwrap();
    let Ok(r) = ErofsReader::open(dev) else {
        return;
    };
    let _ = r.verify(&VerifyLimits {
        max_inodes: 100_000,
        max_data_bytes: 1 << 24,
    });
    let root = r.root_nid();
    let mut pos = 0;
    for _ in 0..64 {
        let Ok(ents) = r.readdir(root, pos) else { break };
        let Some(last) = ents.last() else { break };
        pos = last.next_pos;
        for e in &ents {
            let mut b = [0u8; 4096];
            let _ = r.read(e.nid, 0, &mut b);
            let _ = r.readlink(e.nid);
            let _ = r.xattrs(e.nid);
            if let Ok(i) = r.inode(e.nid) {
                let _ = r.extents(&i);
                let _ = r.lookup(e.nid, b"x");
            }
        }
    }
    let _ = r.lookup_path(b"a/b/c");
});
