//! TurboOCI (warp) layers: commit byte-identical to upstream, reading
//! through targets, and clear errors for bad targets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::commit::{commit_warp, CommitOptions};
use blockdev::layer::open_blob;
use blockdev::lsmt::writable::{create_warp, TAG_TARGET};
use blockdev::lsmt::{SealedLayer, WritableLayer};
use blockdev::warp::{TargetSource, WarpLayer};
use blockdev::zfile::ZfileOptions;
use blockdev::{BlockDevice, Stack};

fn fx(p: &str) -> PathBuf {
    testutil::turbo_fixtures().join(p)
}

/// Rebuild the writable warp pair behind a fixture's sealed `.lsmt`: tag-0
/// data written at its offsets, tag-1 entries mapped into the target.
fn rebuild_writable(lsmt: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let (blob, _) = open_blob(lsmt).unwrap();
    let sealed = SealedLayer::open_warp(blob).unwrap();
    let (data, index) = (dir.join("writable_data"), dir.join("writable_index"));
    create_warp(&data, &index, sealed.info().virtual_size, None).unwrap();
    let w = WritableLayer::open_warp(&data, &index, None, false).unwrap();
    for m in sealed.index().entries() {
        let (off, len) = (m.offset * 512, m.length as u64 * 512);
        if m.tag == TAG_TARGET {
            w.map_target(off, len, m.moffset * 512).unwrap();
        } else {
            let mut buf = vec![0u8; len as usize];
            sealed.read_mapped(&mut buf, m.moffset).unwrap();
            w.write(&buf, off).unwrap();
        }
    }
    w.flush().unwrap();
    (data, index)
}

#[test]
fn warp_commit_matches_upstream_byte_for_byte() {
    for case in ["ext4-gzip", "ext4-gzip-2"] {
        let dir = tempfile::tempdir().unwrap();
        let (data, index) = rebuild_writable(&fx(&format!("{case}/ext4.fs.meta.lsmt")), dir.path());
        let plain = dir.path().join("plain.lsmt");
        commit_warp(&data, &index, &plain, &CommitOptions::default()).unwrap();
        let want = std::fs::read(fx(&format!("{case}/ext4.fs.meta.lsmt"))).unwrap();
        assert!(
            std::fs::read(&plain).unwrap() == want,
            "{case}: .lsmt differs"
        );
        let z = dir.path().join("ext4.fs.meta");
        let opts = CommitOptions {
            zfile: Some(ZfileOptions::default()),
            ..Default::default()
        };
        commit_warp(&data, &index, &z, &opts).unwrap();
        let want = std::fs::read(fx(&format!("{case}/ext4.fs.meta"))).unwrap();
        assert!(
            std::fs::read(&z).unwrap() == want,
            "{case}: ext4.fs.meta differs"
        );
    }
}

fn input_tar() -> PathBuf {
    testutil::fixtures().join("input.tar")
}

#[test]
fn warp_lower_reads_file_data_from_the_tar_gzip_or_plain() {
    let gz = WarpLayer::open(
        &fx("ext4-gzip/ext4.fs.meta"),
        &TargetSource::gzip(fx("ext4-gzip/layer.tar.gz"), fx("ext4-gzip/gzip.meta")),
    )
    .unwrap();
    let plain = WarpLayer::open(
        &fx("ext4-tar/ext4.fs.meta"),
        &TargetSource::tar(input_tar()),
    )
    .unwrap();
    let tar = std::fs::read(input_tar()).unwrap();
    // The first tag-1 entry: usr/share/doc/bash/CHANGES.gz at tar offset 2560.
    let m = *gz
        .meta()
        .index()
        .entries()
        .iter()
        .find(|m| m.tag == TAG_TARGET)
        .unwrap();
    assert_eq!(m.moffset * 512, 2560);
    for w in [&gz, &plain] {
        let mut buf = vec![0u8; m.length as usize * 512];
        w.read_logical(&mut buf, m.offset * 512).unwrap();
        assert_eq!(&buf[..], &tar[2560..2560 + buf.len()]);
    }
    // A whole stack of both layers reads the same everywhere they map.
    let s1 = Stack::with_lowers(vec![blockdev::stack::Lower::Warp(gz)], None).unwrap();
    let s2 = Stack::with_lowers(vec![blockdev::stack::Lower::Warp(plain)], None).unwrap();
    assert_eq!(s1.size(), 64 << 30);
    let mut a = vec![0u8; 8 << 20];
    let mut b = vec![0u8; 8 << 20];
    s1.read_at(&mut a, 0).unwrap();
    s2.read_at(&mut b, 0).unwrap();
    assert!(a == b);
}

#[test]
fn target_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    // A tar shorter than what the layer maps.
    let short = dir.path().join("short.tar");
    std::fs::write(&short, &std::fs::read(input_tar()).unwrap()[..1 << 20]).unwrap();
    let e = WarpLayer::open(&fx("ext4-tar/ext4.fs.meta"), &TargetSource::tar(&short))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("past the end of the layer tar") && e.contains("short.tar"),
        "{e}"
    );
    assert!(e.contains("ext4.fs.meta"), "{e}");
    // A gzip target without its index.
    let e = WarpLayer::open(
        &fx("ext4-gzip/ext4.fs.meta"),
        &TargetSource::tar(fx("ext4-gzip/layer.tar.gz")),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gzipIndex"), "{e}");
    // Mapping past the end of the target of a writable layer.
    let (data, index) = (dir.path().join("d"), dir.path().join("i"));
    create_warp(&data, &index, 1 << 30, None).unwrap();
    let t: Arc<dyn blockdev::source::ReadAt> = TargetSource::tar(input_tar()).open().unwrap();
    let w = WritableLayer::open_warp(&data, &index, Some(t), false).unwrap();
    let e = w
        .map_target(0, 8192, 5_376_000 - 4096)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the end of the layer tar"), "{e}");
    let e = w.map_target(0, 1000, 0).unwrap_err().to_string();
    assert!(e.contains("multiple of 512"), "{e}");
    // A plain device has no target.
    let m = blockdev::MemDevice::new(1 << 20);
    assert!(m.map_target(0, 512, 0).is_err());
}

#[test]
fn writable_warp_roundtrip_through_a_stack() {
    let dir = tempfile::tempdir().unwrap();
    let (data, index) = (dir.path().join("d"), dir.path().join("i"));
    create_warp(&data, &index, 1 << 30, None).unwrap();
    let tar = std::fs::read(input_tar()).unwrap();
    {
        let t = TargetSource::tar(input_tar()).open().unwrap();
        let w = WritableLayer::open_warp(&data, &index, Some(t), false).unwrap();
        let s = Stack::with_lowers(Vec::new(), Some(w)).unwrap();
        s.write_at(&[7u8; 4096], 8192).unwrap();
        s.map_target(1 << 20, 1 << 20, 512).unwrap();
        s.flush().unwrap();
    }
    // Reopened: tag-0 from the data file, tag-1 from the tar.
    let t = TargetSource::tar(input_tar()).open().unwrap();
    let w = WritableLayer::open_warp(&data, &index, Some(t), true).unwrap();
    let s = Stack::with_lowers(Vec::new(), Some(w)).unwrap();
    let mut b = vec![0u8; 4096];
    s.read_at(&mut b, 8192).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    let mut b = vec![0u8; 1 << 20];
    s.read_at(&mut b, 1 << 20).unwrap();
    assert_eq!(&b[..], &tar[512..512 + (1 << 20)]);
    // The data file has no header: the write sits at its own offset.
    let raw = std::fs::read(&data).unwrap();
    assert!(raw[8192..12288].iter().all(|&x| x == 7));
    assert!(raw[..8192].iter().all(|&x| x == 0));
}
