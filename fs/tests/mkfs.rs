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

/// A device that forwards everything but hides its allocation map (the
/// default [`BlockDevice::extents`]: all data), so mkfs takes the path that
/// reads every inode table and zeroes what is not zero — the code path
/// every mkfs took before mkfs learned to skip ranges known to be zero.
struct Opaque(Arc<dyn BlockDevice>);

impl BlockDevice for Opaque {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.0.trim(offset, len)
    }
}

/// mkfs on a fresh sparse layer, committed with a fixed uuid: the bytes of
/// the sealed layer (its data and its index, i.e. exactly which ranges
/// mkfs wrote) for the fast path and for the scanning oracle.
#[test]
fn mkfs_fast_path_commits_the_same_layer_as_the_scanning_path() {
    use blockdev::commit::{commit_writable, CommitOptions};
    let dir = tempfile::tempdir().unwrap();
    let uuid = blockdev::Uuid::parse("6d5b0bd2-0000-4000-8000-000000000001").unwrap();
    for gib in [1u64, 8, 64] {
        let mut blobs = Vec::new();
        for scan in [false, true] {
            let d = dir.path().join(format!("{gib}-{scan}"));
            std::fs::create_dir(&d).unwrap();
            let (dev, data, index) = stack_with_upper(&d, &[], gib << 30);
            // The fast path must not read the inode tables at all: a fresh
            // layer maps nothing there.
            if !scan {
                assert!(dev.extents(0, gib << 30).unwrap().iter().all(|e| e.zero));
            }
            let dev: Arc<dyn BlockDevice> = if scan { Arc::new(Opaque(dev)) } else { dev };
            obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
            drop(dev);
            let out = d.join("commit");
            commit_writable(
                &data,
                &index,
                &out,
                &CommitOptions {
                    uuid: Some(uuid),
                    ..Default::default()
                },
            )
            .unwrap();
            blobs.push(std::fs::read(&out).unwrap());
        }
        assert!(
            blobs[0] == blobs[1],
            "{gib} GiB: the committed mkfs layers differ ({} vs {} bytes)",
            blobs[0].len(),
            blobs[1].len()
        );
        if gib == 8 {
            let flat = dir.path().join("flat8.img");
            flatten(&[dir.path().join("8-false/commit")], None, &flat);
            e2fsck_clean(&flat);
        }
    }
}

/// Inode table ranges `(byte offset, bytes)` from `dumpe2fs`.
fn inode_tables(img: &std::path::Path) -> Vec<(u64, u64)> {
    let out = run(testutil::tool("dumpe2fs"), &[img.to_str().unwrap()]);
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Inode table at "))
        .map(|r| {
            let r = r.split_whitespace().next().unwrap();
            let (a, b) = r.split_once('-').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            (a * 4096, (b - a + 1) * 4096)
        })
        .collect()
}

/// On a device that holds old data, mkfs still zeroes the inode tables:
/// the result equals mkfs on a fresh sparse file, byte for byte.
#[test]
fn mkfs_zeroes_old_data_in_inode_tables() {
    let dir = tempfile::tempdir().unwrap();
    let size = 512u64 << 20;
    let fresh = dir.path().join("fresh.img");
    mkfs_image(&fresh, size);
    let tables = inode_tables(&fresh);
    assert_eq!(tables.len(), 4, "{tables:?}");
    let dirty = dir.path().join("dirty.img");
    {
        let f = std::fs::File::create(&dirty).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        for (i, (off, len)) in tables.iter().enumerate() {
            // garbage at the start, the middle and the end of each table
            for at in [*off, off + len / 2 + 4096 * i as u64, off + len - 8192] {
                f.write_all_at(&[0xa5u8; 8192], at).unwrap();
            }
        }
    }
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::open_rw(&dirty).unwrap());
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    drop(dev);
    e2fsck_clean(&dirty);
    // Same nonzero blocks at the same offsets.
    assert_eq!(
        sparse_digest(&fresh),
        sparse_digest(&dirty),
        "mkfs over old data differs from mkfs on a fresh file"
    );
}
