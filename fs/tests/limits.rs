//! Entries whose numbers do not fit the filesystem: sparse files past ext4's
//! maximum file size, device numbers past what an inode can store. They
//! must be refused with one line naming the entry, never truncated into a
//! corrupt image; values at the limit must still apply cleanly.

mod common;

use std::sync::Arc;

use blockdev::BlockDevice;
use common::*;

fn apply_bytes(dev: &Arc<dyn BlockDevice>, tar: &[u8]) -> obdfs::Result<obdfs::ApplyStats> {
    obdfs::apply_tar(dev.clone(), tar, obdfs::ApplyOptions::default())
}

fn assert_refused(err: obdfs::Error, name: &str, what: &str) {
    let msg = testutil::assert_clean_chain(&err);
    assert!(
        msg.starts_with(&format!("tar entry '{name}'")) && msg.contains(what),
        "error '{msg}' does not name the entry or lacks '{what}'"
    );
    assert!(!msg.contains('\n'), "more than one line: {msg}");
}

/// Offsets of 2^44 (just past 4 KiB-block ext4's (2^32 - 1) blocks), 2^50
/// and 2^63 - 8, and a logical size of 2^62: each is refused before any of
/// it is written, and the filesystem stays consistent.
#[test]
fn sparse_entries_past_the_maximum_file_size_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(u64, Vec<(u64, u64)>); 4] = [
        ((1 << 44) + 4, vec![(1 << 44, 4)]),
        ((1 << 50) + 4, vec![(1 << 50, 4)]),
        ((1 << 63) - 4, vec![((1 << 63) - 8, 4)]),
        (1 << 62, vec![(0, 4)]),
    ];
    for (n, (size, map)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("fs{n}.img"));
        let dev = mkfs_image(&img, 1 << 30);
        let tar = sparse_tar("big", *size, map);
        let err = apply_bytes(&dev, &tar).expect_err(&format!("size {size} map {map:?} applied"));
        assert_refused(err, "big", "maximum file size");
        drop(dev);
        e2fsck_clean(&img);
        std::fs::remove_file(&img).unwrap();
    }
}

/// The largest file ext4 holds with 4 KiB blocks, (2^32 - 1) blocks, is
/// written with its last byte in logical block 2^32 - 2, and e2fsck agrees.
#[test]
fn sparse_entry_at_the_maximum_file_size_applies() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 1 << 30);
    let max = ((1u64 << 32) - 1) * 4096;
    apply_bytes(&dev, &sparse_tar("edge", max, &[(max - 4, 4)])).unwrap();
    drop(dev);
    e2fsck_clean(&img);
    let i = img.to_str().unwrap();
    let stat = run(testutil::tool("debugfs"), &["-R", "stat /edge", i]);
    assert!(stat.contains(&format!("Size: {max}")), "{stat}");
    // The data is in the last logical block, not wrapped to block 0.
    let bmap = run(
        testutil::tool("debugfs"),
        &["-R", &format!("bmap /edge {}", (1u64 << 32) - 2), i],
    );
    let pblk: u64 = bmap.trim().parse().unwrap();
    assert_ne!(pblk, 0, "last block not mapped");
    let first = run(testutil::tool("debugfs"), &["-R", "bmap /edge 0", i]);
    assert_eq!(first.trim(), "0", "block 0 is mapped");
    let mut buf = [0u8; 4096];
    let f = std::fs::File::open(&img).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, pblk * 4096).unwrap();
    assert_eq!(&buf[4092..], &[0x5a; 4]);
    assert!(buf[..4092].iter().all(|&b| b == 0));
}

/// The limit follows the filesystem: 1 KiB blocks hold (2^32 - 1) KiB, and
/// block-mapped (ext3) files without huge_file at most 2^32 sectors.
#[test]
fn the_limit_follows_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    // 8 TiB + 4: fine with 4 KiB blocks and extents, too big for 1 KiB
    // blocks and for block-mapped files.
    let off = 1u64 << 43;
    let tar = sparse_tar("big", off + 4, &[(off, 4)]);
    for (n, opts) in [
        &["-t", "ext4", "-b", "1024"][..],
        &["-t", "ext3"][..],
        &["-t", "ext4", "-O", "^extent,^64bit"][..],
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("fs{n}.img"));
        let dev = mke2fs_image(&img, 1 << 30, opts);
        let err = apply_bytes(&dev, &tar).expect_err(&format!("{opts:?}: applied"));
        assert_refused(err, "big", "maximum file size");
        drop(dev);
        e2fsck_clean(&img);
        std::fs::remove_file(&img).unwrap();
    }
    let img = dir.path().join("fs4k.img");
    let dev = mkfs_image(&img, 1 << 30);
    apply_bytes(&dev, &tar).unwrap();
    drop(dev);
    e2fsck_clean(&img);
}

/// A file of 2 GiB or more on a filesystem without the large_file feature
/// (ext2 as old mke2fs made it) turns the feature on, as Linux and
/// libext2fs do, instead of leaving e2fsck a fix to make.
#[test]
fn large_files_set_the_large_file_feature() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mke2fs_image(&img, 64 << 20, &["-t", "ext2", "-O", "^large_file"]);
    assert!(!dumpe2fs_header(&img)["Filesystem features"].contains("large_file"));
    apply_bytes(&dev, &sparse_tar("big", 3 << 30, &[(2 << 30, 4)])).unwrap();
    drop(dev);
    e2fsck_clean(&img);
    assert!(dumpe2fs_header(&img)["Filesystem features"].contains("large_file"));
}

fn device_tar(name: &str, major: u64, minor: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o600);
    h.set_size(0);
    // set_device_major/minor take u32: write larger numbers in base-256.
    let field = |f: &mut [u8], v: u64| {
        if v < 0o7777777 {
            let s = format!("{v:07o}\0");
            f.copy_from_slice(s.as_bytes());
        } else {
            f.copy_from_slice(&v.to_be_bytes());
            f[0] = 0x80;
        }
    };
    {
        let g = h.as_gnu_mut().unwrap();
        field(&mut g.dev_major, major);
        field(&mut g.dev_minor, minor);
    }
    h.set_cksum();
    b.append_data(&mut h, name, &b""[..]).unwrap();
    b.into_inner().unwrap()
}

/// Linux device numbers have a 12-bit major and a 20-bit minor (and tar's
/// base-256 fields can hold far more): anything larger is refused instead
/// of being stored as some other device.
#[test]
fn device_numbers_that_do_not_fit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 1 << 30);
    for (major, minor) in [(4096, 0), (0, 1 << 20), (1 << 32, 1), (1, (1 << 32) + 5)] {
        let err = apply_bytes(&dev, &device_tar("dev", major, minor))
            .expect_err(&format!("{major}:{minor} applied"));
        let msg = testutil::assert_clean_chain(&err);
        assert!(msg.contains("device number"), "{major}:{minor}: {msg}");
        assert!(msg.contains("'dev'"), "{major}:{minor}: {msg}");
    }
    // The largest numbers that fit round-trip.
    apply_bytes(&dev, &device_tar("max", 4095, (1 << 20) - 1)).unwrap();
    drop(dev);
    e2fsck_clean(&img);
    let stat = run(
        testutil::tool("debugfs"),
        &["-R", "stat /max", img.to_str().unwrap()],
    );
    assert!(
        stat.contains("Device major/minor number: 4095:1048575"),
        "{stat}"
    );
}
