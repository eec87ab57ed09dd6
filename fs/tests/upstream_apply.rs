//! The upstream-compatible engine (`obdfs::photon`) also reproduces
//! upstream's overlaybd layers byte for byte: run as upstream's
//! `overlaybd-apply` runs (libtar writing the file bytes through libext2fs,
//! photon's 128 KiB buffer file in front of the image), onto a sparse
//! writable layer (`overlaybd-create -s`), both reference layers of
//! `overlaybd-reference` come out identical: `mkfs/` (a new ext4 from
//! upstream's mkfs, then input.tar) and `baselayer/` (input.tar on upstream's
//! `ext4_64` base, made by mke2fs with uninit_bg and a journal).
//!
//! The overlaybd convertor keeps the native engine (`obdfs::apply`), which is
//! several times faster; this pins how far the compatible engine reaches.

mod common;

use std::path::Path;
use std::sync::Arc;

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::uuid::Uuid;
use blockdev::zfile::ZfileOptions;
use blockdev::{BlockDevice, Stack};
use common::*;

/// The layer uuid every reference commit was made with.
const UUID: &str = "6d5b0bd2-0000-4000-8000-000000000001";

fn assert_same_file(ours: &Path, theirs: &Path) {
    let (a, b) = (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{} ({} bytes) differs from {} ({} bytes), first difference at {at:?}",
            ours.display(),
            a.len(),
            theirs.display(),
            b.len()
        );
    }
}

/// `overlaybd-create -s data index 64 [--mkfs]`, `overlaybd-apply input.tar`
/// with `lowers`, then `overlaybd-commit [-z] --uuid U`.
fn make(dir: &Path, lowers: &[std::path::PathBuf], mkfs: bool) {
    let (data, index) = (dir.join("data"), dir.join("index"));
    let opts = CreateOptions {
        virtual_size: 64 << 30,
        sparse: true,
        parent_uuid: None,
        uuid: None,
    };
    create_writable(&data, &index, &opts).unwrap();
    if mkfs {
        let s = Stack::open(lowers, Some((&data, &index))).unwrap();
        obdfs::photon::mkfs(Arc::new(s), &obdfs::MkfsOptions::default()).unwrap();
    }
    let s: Arc<dyn BlockDevice> = Arc::new(Stack::open(lowers, Some((&data, &index))).unwrap());
    let tar = std::fs::File::open(fixtures().join("input.tar")).unwrap();
    obdfs::photon::apply_tar(s.clone(), tar, obdfs::ApplyOptions::default()).unwrap();
    s.flush().unwrap();
    drop(s);
    let uuid = Some(Uuid::parse(UUID).unwrap());
    let plain = CommitOptions {
        uuid,
        ..Default::default()
    };
    commit_writable(&data, &index, &dir.join("commit.lsmt"), &plain).unwrap();
    let z = CommitOptions {
        uuid,
        zfile: Some(ZfileOptions::default()),
        ..Default::default()
    };
    commit_writable(&data, &index, &dir.join("commit.lz4.zfile"), &z).unwrap();
}

#[test]
fn overlaybd_apply_on_a_mkfs_layer_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), &[], true);
    assert_same_file(
        &dir.path().join("commit.lz4.zfile"),
        &fixtures().join("mkfs/commit.lz4.zfile"),
    );
}

#[test]
fn overlaybd_apply_on_the_upstream_base_layer_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), &[fixtures().join("baselayer/ext4_64")], false);
    for f in ["commit.lsmt", "commit.lz4.zfile"] {
        assert_same_file(
            &dir.path().join(f),
            &fixtures().join(format!("baselayer/{f}")),
        );
    }
}
