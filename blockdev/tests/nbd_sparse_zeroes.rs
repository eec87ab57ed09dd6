//! NBD_CMD_WRITE_ZEROES into a stack with a sparse upper keeps the upper
//! sparse: where no lower holds data the upper's range is punched (it reads
//! as zeros), and only the blocks over lower data get real zeros.

mod nbd_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::CMD_WRITE_ZEROES;
use blockdev::nbd::ServerConfig;
use blockdev::{BlockDevice, Stack};
use nbd_common::*;

const MIB: u64 = 1 << 20;
const VSIZE: u64 = 512 * MIB;

/// Lower data: `(offset, len)` ranges, some straddling the zeroed range's
/// edges and one inside it at an offset that is not 4 KiB aligned.
const LOWER: &[(u64, u64)] = &[
    (MIB - 8192, 16384),
    (100 * MIB + 1536, 3 * 512),
    (300 * MIB, 2 * MIB),
    (400 * MIB - 4096, 8192),
];
/// The zeroed range: unaligned at both ends.
const ZERO: (u64, u64) = (MIB + 512, 400 * MIB - MIB - 512 - 1024);

fn create(d: &Path, i: &Path, sparse: bool, vsize: u64) {
    create_writable(
        d,
        i,
        &CreateOptions {
            virtual_size: vsize,
            sparse,
            ..Default::default()
        },
    )
    .unwrap();
}

/// A committed lower layer holding [`LOWER`].
fn lower(dir: &Path) -> PathBuf {
    let (d, i) = (dir.join("l.data"), dir.join("l.index"));
    create(&d, &i, false, VSIZE);
    {
        let s = Stack::open(&[], Some((&d, &i))).unwrap();
        for (k, &(o, l)) in LOWER.iter().enumerate() {
            s.write_at(&pseudo_random(k as u64 + 1, l as usize), o)
                .unwrap();
        }
        s.flush().unwrap();
    }
    let out = dir.join("l.commit");
    commit_writable(&d, &i, &out, &CommitOptions::default()).unwrap();
    out
}

/// The expected content of `[off, off + len)`: lower data, upper data at
/// 200 MiB, zeros in [`ZERO`].
fn expected(off: u64, len: u64, upper: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    let mut put = |o: u64, d: &[u8]| {
        for (k, &b) in d.iter().enumerate() {
            let p = o + k as u64;
            if p >= off && p < off + len {
                v[(p - off) as usize] = b;
            }
        }
    };
    for (k, &(o, l)) in LOWER.iter().enumerate() {
        put(o, &pseudo_random(k as u64 + 1, l as usize));
    }
    put(200 * MIB, upper);
    put(ZERO.0, &vec![0u8; ZERO.1 as usize]);
    v
}

fn check(dev: &dyn BlockDevice, upper: &[u8]) {
    // Everything around the lower data and the upper write, and samples.
    let spans = [
        (0, 4 * MIB),
        (100 * MIB - MIB, 2 * MIB),
        (200 * MIB - MIB, 3 * MIB),
        (300 * MIB - MIB, 4 * MIB),
        (400 * MIB - 2 * MIB, 4 * MIB),
    ];
    for (o, l) in spans {
        let mut got = vec![0xeeu8; l as usize];
        dev.read_at(&mut got, o).unwrap();
        assert!(got == expected(o, l, upper), "content at {o}+{l}");
    }
}

#[test]
fn write_zeroes_into_a_sparse_upper_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let low = lower(dir.path());
    let (d, i) = (dir.path().join("u.data"), dir.path().join("u.index"));
    create(&d, &i, true, 0);
    let upper = pseudo_random(99, MIB as usize);
    {
        let stack = Arc::new(Stack::open(std::slice::from_ref(&low), Some((&d, &i))).unwrap());
        stack.write_at(&upper, 200 * MIB).unwrap();
        let srv = start(stack.clone(), ServerConfig::default());
        let mut c = Client::connect(&srv.ep, &ClientOptions::default()).unwrap();
        let (mut o, end) = (ZERO.0, ZERO.0 + ZERO.1);
        while o < end {
            let n = (end - o).min(256 * MIB);
            let r = c.call(CMD_WRITE_ZEROES, 0, o, n as u32, &[]).unwrap();
            assert_eq!(r.error, 0, "write zeroes at {o}+{n}");
            o += n;
        }
        c.disconnect().unwrap();
        srv.stop();
        stack.flush().unwrap();
        // The upper's megabyte of data is punched; only the blocks over
        // lower data hold zeros.
        let alloc = allocated_bytes(&d);
        assert!(alloc < 4 * MIB, "sparse upper holds {alloc} bytes");
        check(&*stack, &upper);
    }
    // Reopened, the holes read the lowers, which have nothing there.
    let stack = Stack::open(&[low], Some((&d, &i))).unwrap();
    check(&stack, &upper);
}
