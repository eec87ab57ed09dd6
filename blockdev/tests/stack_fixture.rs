//! The upstream base layer plus upstream's commit of `input.tar`, read as a
//! stack, must be an ext4 that e2fsck accepts and that holds the tar's files.

use blockdev::Stack;

#[test]
fn fixture_stack_is_a_clean_ext4_with_the_tar_contents() {
    let f = testutil::fixtures();
    let stack = Stack::open(
        &[f.join("baselayer/ext4_64"), f.join("baselayer/commit.lsmt")],
        None,
    )
    .unwrap();
    assert_eq!(blockdev::BlockDevice::size(&stack), 64 << 30);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let copied = stack.write_raw_image(&raw).unwrap();
    assert!(copied > 1 << 20 && copied < 1 << 30, "copied {copied}");
    testutil::e2fsck(&raw).unwrap_or_else(|e| panic!("e2fsck failed:\n{e}"));

    let got = dir.path().join("got");
    testutil::rdump(&raw, &got);
    let want = dir.path().join("want");
    testutil::gnu_extract(&[&f.join("input.tar")], &want);
    let d = testutil::diff_trees(&testutil::tree(&got), &testutil::tree(&want), |p| {
        p.starts_with("lost+found")
    });
    assert!(d.is_empty(), "{} differences:\n{}", d.len(), d.join("\n"));
}

#[test]
fn zfile_and_plain_lowers_read_the_same() {
    let f = testutil::fixtures();
    let a = Stack::open(&[f.join("baselayer/commit.lsmt")], None).unwrap();
    let b = Stack::open(&[f.join("baselayer/commit.lz4.zfile.tar")], None).unwrap();
    let c = Stack::open(&[f.join("baselayer/commit.zstd.zfile")], None).unwrap();
    for (off, len) in a
        .allocation(0, 64 << 30)
        .into_iter()
        .filter(|x| x.2)
        .map(|x| (x.0, x.1))
    {
        let mut x = vec![0u8; len as usize];
        let mut y = vec![0u8; len as usize];
        let mut z = vec![0u8; len as usize];
        blockdev::BlockDevice::read_at(&a, &mut x, off).unwrap();
        blockdev::BlockDevice::read_at(&b, &mut y, off).unwrap();
        blockdev::BlockDevice::read_at(&c, &mut z, off).unwrap();
        assert!(x == y && y == z, "range {off}+{len}");
    }
}
