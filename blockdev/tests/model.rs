//! Random writes through stacks compared with a plain in-memory model.

use std::path::{Path, PathBuf};

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::{BlockDevice, Stack};
use proptest::prelude::*;

const VSIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..VSIZE - 1).prop_flat_map(|off| (Just(off), 1..=(VSIZE - off).min(70_000)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Op::Trim { off, len }),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Apply `ops` to the stack and the model. Trims only touch whole aligned
/// blocks and leave their content unspecified, so the model forgets them
/// and the comparison skips them.
fn apply(stack: &Stack, model: &mut [u8], unknown: &mut [bool], ops: &[Op], align: u64) {
    for o in ops {
        match *o {
            Op::Write { off, len, seed } => {
                let d = pattern(len, seed);
                stack.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                unknown[off as usize..(off + len) as usize].fill(false);
            }
            Op::Zero { off, len } => {
                stack.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                unknown[off as usize..(off + len) as usize].fill(false);
            }
            Op::Trim { off, len } => {
                stack.trim(off, len).unwrap();
                let a = off.div_ceil(align) * align;
                let b = (off + len) / align * align;
                if b > a {
                    unknown[a as usize..b as usize].fill(true);
                }
            }
        }
    }
}

fn check(stack: &Stack, model: &[u8], unknown: &[bool]) {
    let mut got = vec![0u8; VSIZE as usize];
    stack.read_at(&mut got, 0).unwrap();
    for i in 0..VSIZE as usize {
        if !unknown[i] && got[i] != model[i] {
            panic!("byte {i}: got {} want {}", got[i], model[i]);
        }
    }
    // unaligned reads agree with the aligned one
    let mut piece = vec![0u8; 10_001];
    stack.read_at(&mut piece, 3_333).unwrap();
    assert_eq!(&piece[..], &got[3_333..13_334]);
    // batched reads (aligned or not, across layers) agree too
    let spans: [(u64, usize); 6] = [
        (0, 4096),
        (512 * 37, 512 * 300),
        (3_333, 10_001),
        (VSIZE / 2, 65_536),
        (VSIZE - 8192, 8192),
        (4096 * 100, 4096 * 40),
    ];
    let mut bufs: Vec<Vec<u8>> = spans.iter().map(|&(_, l)| vec![0xeeu8; l]).collect();
    let mut reqs: Vec<(u64, &mut [u8])> = spans
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(o, _), b)| (o, &mut b[..]))
        .collect();
    for r in stack.read_many(&mut reqs) {
        r.unwrap();
    }
    drop(reqs);
    for (&(o, l), b) in spans.iter().zip(&bufs) {
        assert!(
            b[..] == got[o as usize..o as usize + l],
            "read_many at {o}+{l}"
        );
    }
    // the allocation map agrees with the data
    check_extents(stack, &got, 0, VSIZE);
    check_extents(stack, &got, 3_333, 100_001);
    check_extents(stack, &got, VSIZE - 777, 777);
}

/// `extents` covers exactly the range, in order, alternating kinds, and
/// every extent it calls zero reads as zeros.
fn check_extents(dev: &dyn BlockDevice, got: &[u8], off: u64, len: u64) {
    let ext = dev.extents(off, len).unwrap();
    let mut pos = off;
    for (k, e) in ext.iter().enumerate() {
        assert_eq!(e.offset, pos, "extents {ext:?}");
        assert!(e.len > 0, "empty extent in {ext:?}");
        if k > 0 {
            assert_ne!(ext[k - 1].zero, e.zero, "unmerged extents {ext:?}");
        }
        if e.zero {
            let b = &got[e.offset as usize..e.end() as usize];
            assert!(
                b.iter().all(|&x| x == 0),
                "extent {e:?} is called zero but holds data"
            );
        }
        pos = e.end();
    }
    assert_eq!(pos, off + len, "extents {ext:?} do not cover {off}+{len}");
}

fn new_upper(dir: &Path, n: usize, sparse: bool, vsize: u64) -> (PathBuf, PathBuf) {
    let d = dir.join(format!("data{n}"));
    let i = dir.join(format!("index{n}"));
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: vsize,
            sparse,
            ..Default::default()
        },
    )
    .unwrap();
    (d, i)
}

fn run_layers(layers: Vec<Vec<Op>>, sparse: bool, zfile: Option<Algorithm>) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; VSIZE as usize];
    let mut unknown = vec![false; VSIZE as usize];
    let mut lowers: Vec<PathBuf> = Vec::new();
    let align = if sparse { 4096 } else { 512 };
    for (n, ops) in layers.iter().enumerate() {
        let vsize = if n == 0 { VSIZE } else { 0 };
        let (d, i) = new_upper(dir.path(), n, sparse, vsize);
        {
            let stack = Stack::open(&lowers, Some((&d, &i))).unwrap();
            assert_eq!(stack.size(), VSIZE);
            apply(&stack, &mut model, &mut unknown, ops, align);
            check(&stack, &model, &unknown);
            stack.flush().unwrap();
        }
        // reopen: the writable layer alone persists everything but trims
        {
            let stack = Stack::open(&lowers, Some((&d, &i))).unwrap();
            check(&stack, &model, &unknown);
        }
        let out = dir.path().join(format!("layer{n}.commit"));
        let opts = CommitOptions {
            zfile: zfile.map(|a| ZfileOptions {
                algorithm: a,
                block_size: 8192,
                ..Default::default()
            }),
            tar: n % 2 == 1,
            ..Default::default()
        };
        commit_writable(&d, &i, &out, &opts).unwrap();
        lowers.push(out);
        let stack = Stack::open(&lowers, None).unwrap();
        check(&stack, &model, &unknown);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn append_layers_match_model(layers in prop::collection::vec(prop::collection::vec(op(), 1..25), 1..4)) {
        run_layers(layers, false, None);
    }

    #[test]
    fn sparse_layers_match_model(layers in prop::collection::vec(prop::collection::vec(op(), 1..25), 1..4)) {
        run_layers(layers, true, Some(Algorithm::Lz4));
    }

    #[test]
    fn zstd_lowers_match_model(layers in prop::collection::vec(prop::collection::vec(op(), 1..15), 2..4)) {
        run_layers(layers, false, Some(Algorithm::Zstd));
    }
}

#[test]
fn read_only_stack_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = new_upper(dir.path(), 0, false, VSIZE);
    let out = dir.path().join("c");
    commit_writable(&d, &i, &out, &CommitOptions::default()).unwrap();
    let s = Stack::open(&[out], None).unwrap();
    assert!(s.is_read_only());
    assert!(matches!(
        s.write_at(&[0; 512], 0),
        Err(blockdev::Error::ReadOnly)
    ));
    assert!(matches!(
        s.read_at(&mut [0; 512], VSIZE),
        Err(blockdev::Error::OutOfRange { .. })
    ));
}

#[test]
fn read_only_open_of_a_size_zero_upper_takes_the_lower_size() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, i0) = new_upper(dir.path(), 0, false, VSIZE);
    let low = dir.path().join("low");
    commit_writable(&d0, &i0, &low, &CommitOptions::default()).unwrap();
    let (d, i) = new_upper(dir.path(), 1, true, 0);
    let s = Stack::open_read_only(std::slice::from_ref(&low), Some((&d, &i))).unwrap();
    assert_eq!(s.size(), VSIZE);
    assert!(s.is_read_only());
    drop(s);
    // a writable open persists the size in the upper's header
    let s = Stack::open(&[low], Some((&d, &i))).unwrap();
    assert_eq!(s.upper().unwrap().virtual_size(), VSIZE);
}

#[test]
fn writable_layer_as_lower_reads_like_its_commit() {
    use blockdev::stack::LowerSource;
    let dir = tempfile::tempdir().unwrap();
    let (d0, i0) = new_upper(dir.path(), 0, true, VSIZE);
    {
        let s = Stack::open(&[], Some((&d0, &i0))).unwrap();
        for k in 0..40u64 {
            s.write_at(&pattern(3000 + k * 97, k as u8), k * 25_000)
                .unwrap();
        }
        s.flush().unwrap();
    }
    let c0 = dir.path().join("c0");
    commit_writable(&d0, &i0, &c0, &CommitOptions::default()).unwrap();
    let (d1, i1) = new_upper(dir.path(), 1, true, 0);
    let a = Stack::open_sources(
        &[LowerSource::Writable {
            data: d0.clone(),
            index: i0.clone(),
        }],
        Some((&d1, &i1)),
        blockdev::lsmt::WritableLayer::open,
    )
    .unwrap();
    assert_eq!(a.size(), VSIZE);
    a.write_at(&pattern(10_000, 9), 123_456).unwrap();
    a.flush().unwrap();
    drop(a);
    let b = Stack::open_read_only(&[c0], Some((&d1, &i1))).unwrap();
    let a = Stack::open_sources(
        &[LowerSource::Writable {
            data: d0,
            index: i0,
        }],
        Some((&d1, &i1)),
        blockdev::lsmt::WritableLayer::open_read_only,
    )
    .unwrap();
    let mut x = vec![0u8; VSIZE as usize];
    let mut y = vec![0u8; VSIZE as usize];
    a.read_at(&mut x, 0).unwrap();
    b.read_at(&mut y, 0).unwrap();
    assert!(x == y);
    assert_eq!(&x[123_456..133_456], &pattern(10_000, 9)[..]);
}

/// A stack of one new upper (`sparse` or not) and no lowers, in a temporary
/// directory, with the size of its write blocks: 4 KiB in a sparse upper, a
/// sector otherwise (a write covering less is a read-modify-write).
fn upper_only(sparse: bool) -> (tempfile::TempDir, Stack, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = new_upper(dir.path(), 0, sparse, VSIZE);
    let stack = Stack::open(&[], Some((&d, &i))).unwrap();
    (dir, stack, if sparse { 4096 } else { 512 })
}

/// Writes from several threads at once to disjoint bytes of the same blocks
/// (NBD clients on several connections of a multi-conn export, or
/// `--workers`): every write lands. A write that covers part of a block is a
/// read-modify-write of the whole block, so two of them on one block must not
/// interleave, or the later one writes back the earlier one's block as it
/// was before, undoing that write.
#[test]
fn concurrent_writes_to_disjoint_parts_of_a_block_all_land() {
    const THREADS: u64 = 4;
    const BLOCKS: u64 = 256;
    const ROUNDS: u64 = 8;
    for sparse in [true, false] {
        // In a non-sparse upper blocks are sectors: split those.
        let (_dir, stack, block) = upper_only(sparse);
        let part = block / THREADS;
        for round in 0..ROUNDS {
            let fill = |t: u64| (round * THREADS + t + 1) as u8;
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let stack = &stack;
                    s.spawn(move || {
                        let bytes = vec![fill(t); part as usize];
                        for b in 0..BLOCKS {
                            stack.write_at(&bytes, b * block + t * part).unwrap();
                        }
                    });
                }
            });
            let mut got = vec![0u8; (BLOCKS * block) as usize];
            stack.read_at(&mut got, 0).unwrap();
            for (k, chunk) in got.chunks(part as usize).enumerate() {
                let t = k as u64 % THREADS;
                assert!(
                    chunk.iter().all(|&x| x == fill(t)),
                    "sparse={sparse} round {round}: bytes {}+{part} (thread {t}'s) hold {:?}, not {}",
                    k as u64 * part,
                    &chunk[..8],
                    fill(t)
                );
            }
        }
    }
}

/// A write covering part of a block against a write to the whole block at the
/// same time (whole-block writes, or the middle blocks of a longer unaligned
/// write): in whichever order they land, the bytes only the whole-block write
/// covers hold its data. The partial write's read-modify-write must not take
/// the block as it was before the other write and put that back.
#[test]
fn a_partial_write_never_puts_back_what_a_concurrent_whole_block_write_replaced() {
    const BLOCKS: u64 = 255;
    const ROUNDS: u64 = 8;
    for sparse in [true, false] {
        let (_dir, stack, block) = upper_only(sparse);
        // The partial write's bytes in each block.
        let (q, part) = (block / 4, block / 4);
        for round in 0..ROUNDS {
            // Whole blocks written aligned (even rounds), or as the middle
            // block of an unaligned write over half of each neighbour (odd).
            let spanning = round % 2 == 1;
            let (old, whole, partial) = (
                3 * round as u8 + 1,
                3 * round as u8 + 2,
                3 * round as u8 + 3,
            );
            stack
                .write_at(&vec![old; (BLOCKS * block) as usize], 0)
                .unwrap();
            // Odd blocks are the contested ones.
            std::thread::scope(|s| {
                let stack = &stack;
                s.spawn(move || {
                    for b in (1..BLOCKS - 1).step_by(2) {
                        if spanning {
                            let bytes = vec![whole; (2 * block) as usize];
                            stack.write_at(&bytes, b * block - block / 2).unwrap();
                        } else {
                            stack
                                .write_at(&vec![whole; block as usize], b * block)
                                .unwrap();
                        }
                    }
                });
                s.spawn(move || {
                    for b in (1..BLOCKS - 1).step_by(2) {
                        stack
                            .write_at(&vec![partial; part as usize], b * block + q)
                            .unwrap();
                    }
                });
            });
            let mut got = vec![0u8; block as usize];
            for b in (1..BLOCKS - 1).step_by(2) {
                stack.read_at(&mut got, b * block).unwrap();
                for (k, &x) in got.iter().enumerate() {
                    let k = k as u64;
                    let ok = if (q..q + part).contains(&k) {
                        x == whole || x == partial
                    } else {
                        x == whole
                    };
                    assert!(
                        ok,
                        "sparse={sparse} round {round} (spanning={spanning}): block {b} byte {k} \
                         is {x}, not the whole-block write's {whole}"
                    );
                }
            }
        }
    }
}
