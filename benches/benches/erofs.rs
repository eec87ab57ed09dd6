//! Criterion benchmarks of the EROFS TurboOCI writer: building a bottom
//! layer's metadata from a tar, and an upper layer over it; next to the ext4
//! TurboOCI path (mkfs + apply in reference mode) on the same tar.
//!
//! The tar is `$EROFS_BENCH_TAR` when set (`scripts/bench-erofs.sh` tars
//! /usr/share for it), else a synthetic 20,000-file layer. Each run also
//! prints the metadata size against the tar size.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use blockdev::{BlockDevice, Result as BdResult};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use obdfs::erofs::{build_layer, BuildOptions};
use overlaybd_benches::synthetic_layer;

/// A sparse in-memory device that keeps what is written (the next layer
/// reads it) and counts target mappings.
#[derive(Default)]
struct SparseDev {
    sectors: Mutex<BTreeMap<u64, Box<[u8; 512]>>>,
}

impl BlockDevice for SparseDev {
    fn size(&self) -> u64 {
        64 << 30
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BdResult<()> {
        let s = self.sectors.lock().unwrap();
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let (sec, o) = (pos / 512, (pos % 512) as usize);
            let n = (512 - o).min((end - pos) as usize);
            let b = (pos - offset) as usize;
            match s.get(&sec) {
                Some(d) => buf[b..b + n].copy_from_slice(&d[o..o + n]),
                None => buf[b..b + n].fill(0),
            }
            pos += n as u64;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BdResult<()> {
        // The EROFS writer only writes whole, aligned sectors.
        assert!(offset.is_multiple_of(512) && buf.len().is_multiple_of(512));
        let mut s = self.sectors.lock().unwrap();
        for (i, c) in buf.chunks(512).enumerate() {
            let mut d = Box::new([0u8; 512]);
            d.copy_from_slice(c);
            s.insert(offset / 512 + i as u64, d);
        }
        Ok(())
    }
    fn flush(&self) -> BdResult<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> BdResult<()> {
        Ok(())
    }
    fn map_target(&self, _: u64, _: u64, _: u64) -> BdResult<()> {
        Ok(())
    }
}

/// An upper layer over `base`: every 10th file replaced, every 10th
/// (other) one whited out, plus new files.
fn upper_layer(base: &[u8]) -> Vec<u8> {
    let mut a = tar::Archive::new(base);
    let mut b = tar::Builder::new(Vec::new());
    for (i, e) in a.entries().unwrap().enumerate() {
        let e = e.unwrap();
        let path = e.path().unwrap().into_owned();
        let h = e.header().clone();
        if h.entry_type().is_dir() {
            let mut h = h.clone();
            b.append_data(&mut h, &path, &[][..]).unwrap();
        } else if i % 10 == 3 {
            let mut h = tar::Header::new_gnu();
            h.set_size(100);
            h.set_mode(0o644);
            b.append_data(&mut h, &path, &[b'x'; 100][..]).unwrap();
        } else if i % 10 == 7 {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let wh = path.with_file_name(format!(".wh.{name}"));
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_mode(0o644);
            b.append_data(&mut h, &wh, &[][..]).unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn erofs_bench(c: &mut Criterion) {
    let tar = match std::env::var_os("EROFS_BENCH_TAR") {
        Some(p) => std::fs::read(p).expect("read EROFS_BENCH_TAR"),
        None => synthetic_layer(20_000, 11),
    };
    let upper = upper_layer(&tar);

    // Sizes, once.
    let dev = Arc::new(SparseDev::default());
    let t0 = std::time::Instant::now();
    let st = build_layer(dev.clone(), &tar[..], &BuildOptions::default()).unwrap();
    let el = t0.elapsed();
    eprintln!(
        "bottom layer: tar {} B, {} entries, {} files mapped ({} B); EROFS metadata {} B = {:.2}% of the tar; {:.0} entries/s",
        tar.len(),
        st.entries,
        st.mapped_files,
        st.mapped_bytes,
        st.meta_bytes,
        st.meta_bytes as f64 * 100.0 / tar.len() as f64,
        st.entries as f64 / el.as_secs_f64()
    );
    let base = dev.sectors.lock().unwrap().clone();
    let up = build_layer(dev.clone(), &upper[..], &BuildOptions { incremental: true }).unwrap();
    eprintln!(
        "upper layer: tar {} B, {} entries; EROFS metadata {} B",
        upper.len(),
        up.entries,
        up.meta_bytes
    );

    // ext4 TurboOCI on the same tar: mkfs + apply, file data mapped.
    let ext4 = Arc::new(SparseDev::default());
    let t0 = std::time::Instant::now();
    obdfs::mkfs(ext4.clone(), &obdfs::MkfsOptions::default()).unwrap();
    let after_mkfs = ext4.sectors.lock().unwrap().len() as u64 * 512;
    obdfs::turbo::apply_reference(ext4.clone(), &tar[..], None).unwrap();
    let el4 = t0.elapsed();
    let ext4_meta = ext4.sectors.lock().unwrap().len() as u64 * 512;
    eprintln!(
        "ext4 TurboOCI bottom layer: metadata {} B = {:.2}% of the tar ({} B from mkfs) in {:.2}s; EROFS is {:.1}x smaller",
        ext4_meta,
        ext4_meta as f64 * 100.0 / tar.len() as f64,
        after_mkfs,
        el4.as_secs_f64(),
        ext4_meta as f64 / st.meta_bytes as f64
    );
    drop(ext4);

    let mut g = c.benchmark_group("erofs");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("bottom layer", |b| {
        b.iter(|| {
            let dev = Arc::new(SparseDev::default());
            build_layer(dev, &tar[..], &BuildOptions::default()).unwrap()
        })
    });
    g.bench_function("ext4 bottom layer (mkfs + apply)", |b| {
        b.iter(|| {
            let dev = Arc::new(SparseDev::default());
            obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
            obdfs::turbo::apply_reference(dev, &tar[..], None).unwrap()
        })
    });
    g.throughput(Throughput::Bytes(upper.len() as u64));
    g.bench_function("upper layer", |b| {
        b.iter(|| {
            let dev = Arc::new(SparseDev {
                sectors: Mutex::new(base.clone()),
            });
            build_layer(dev, &upper[..], &BuildOptions { incremental: true }).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, erofs_bench);
criterion_main!(benches);
