//! Criterion benchmarks: ZFile compression (commit -z) and stack reads.

use std::path::Path;

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::{BlockDevice, Stack};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use overlaybd_benches::layer_like_data;

const LAYER: usize = 64 << 20;

fn make_layer(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (d, i) = (dir.join("data"), dir.join("index"));
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: 1 << 30,
            sparse: true,
            ..Default::default()
        },
    )
    .unwrap();
    let w = WritableLayer::open(&d, &i).unwrap();
    let data = layer_like_data(LAYER, 7);
    for (k, c) in data.chunks(1 << 20).enumerate() {
        // spread the data a little, as ext4 does
        w.write(c, (k as u64) * (3 << 20)).unwrap();
    }
    w.flush().unwrap();
    (d, i)
}

fn commit_bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = make_layer(dir.path());
    let mut g = c.benchmark_group("commit");
    g.throughput(Throughput::Bytes(LAYER as u64));
    g.sample_size(10);
    for (name, algo) in [
        ("lz4", Some(Algorithm::Lz4)),
        ("zstd", Some(Algorithm::Zstd)),
        ("plain", None),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let out = dir.path().join("out");
                let _ = std::fs::remove_file(&out);
                commit_writable(
                    &d,
                    &i,
                    &out,
                    &CommitOptions {
                        zfile: algo.map(|a| ZfileOptions {
                            algorithm: a,
                            ..Default::default()
                        }),
                        tar: true,
                        ..Default::default()
                    },
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn read_bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = make_layer(dir.path());
    let lz = dir.path().join("lz4");
    commit_writable(
        &d,
        &i,
        &lz,
        &CommitOptions {
            zfile: Some(ZfileOptions::default()),
            ..Default::default()
        },
    )
    .unwrap();
    let plain = dir.path().join("plain");
    commit_writable(&d, &i, &plain, &CommitOptions::default()).unwrap();
    let mut g = c.benchmark_group("stack_read");
    g.sample_size(10);
    for (name, path) in [("lz4_lower", &lz), ("plain_lower", &plain)] {
        let s = Stack::open(std::slice::from_ref(path), None).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        g.throughput(Throughput::Bytes(64 << 20));
        g.bench_function(format!("{name}_seq_1MiB"), |b| {
            b.iter(|| {
                for k in 0..64u64 {
                    s.read_at(&mut buf, (k % 64) * (3 << 20)).unwrap();
                }
            })
        });
        let mut small = vec![0u8; 4096];
        g.throughput(Throughput::Bytes(4096 * 4096));
        g.bench_function(format!("{name}_rand_4KiB"), |b| {
            b.iter(|| {
                let mut x: u64 = 88172645463325252;
                for _ in 0..4096 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let blk = x % (64 * 3 * 256);
                    s.read_at(&mut small, blk * 4096).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, commit_bench, read_bench);
criterion_main!(benches);
