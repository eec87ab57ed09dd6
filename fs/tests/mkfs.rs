//! mkfs: e2fsck-clean, upstream's feature set and layout, deterministic.

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, RawFileDevice};
use common::*;

#[test]
fn mkfs_is_clean_and_matches_upstream_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 64 << 30).unwrap());
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    drop(dev);
    e2fsck_clean(&img);
    let h = dumpe2fs_header(&img);
    for key in [
        "Filesystem features",
        "Inode count",
        "Block count",
        "Reserved block count",
        "Reserved GDT blocks",
        "Blocks per group",
        "Inodes per group",
        "Inode size",
        "Default directory hash",
        "Backup block groups",
        "Maximum mount count",
        "Filesystem UUID",
        "Filesystem flags",
    ] {
        assert!(h.contains_key(key), "dumpe2fs lacks {key}: {h:?}");
    }
    assert_eq!(
        sorted_words(&h["Filesystem features"]),
        sorted_words(
            "ext_attr resize_inode dir_index sparse_super2 filetype extent 64bit flex_bg \
             sparse_super large_file huge_file dir_nlink extra_isize"
        )
    );
    assert_eq!(h["Filesystem UUID"], "<none>");
    assert_eq!(h["Last write time"], "Thu Jan  1 00:00:00 1970");
    assert!(!h.contains_key("Filesystem created"), "mkfs time must be 0");
}

#[test]
fn mkfs_matches_the_upstream_fixture_header() {
    // The upstream mkfs fixture (mkfs + input.tar applied) flattened: the
    // fields mkfs alone decides must be identical.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 64 << 30).unwrap());
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    drop(dev);
    let ours = dumpe2fs_header(&img);
    let flat = dir.path().join("upstream.img");
    flatten(&[fixtures().join("mkfs/commit.lz4.zfile")], None, &flat);
    let upstream = dumpe2fs_header(&flat);
    for key in [
        "Filesystem features",
        "Filesystem flags",
        "Filesystem UUID",
        "Inode count",
        "Block count",
        "Reserved block count",
        "Reserved GDT blocks",
        "Blocks per group",
        "Inodes per group",
        "Inode blocks per group",
        "Inode size",
        "Required extra isize",
        "Desired extra isize",
        "Default directory hash",
        "Backup block groups",
        "Maximum mount count",
        "Lifetime writes",
        "First inode",
        "Group descriptor size",
        "Last write time",
    ] {
        assert_eq!(ours.get(key), upstream.get(key), "dumpe2fs field {key}");
    }
}

#[test]
fn mkfs_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let mut sums = Vec::new();
    for n in 0..2 {
        let img = dir.path().join(format!("fs{n}.img"));
        let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 8 << 30).unwrap());
        obdfs::mkfs(dev, &obdfs::MkfsOptions::default()).unwrap();
        sums.push(sparse_digest(&img));
    }
    assert_eq!(sums[0], sums[1]);
}
