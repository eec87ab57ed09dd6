//! Apply layer tars and check the result against independent oracles:
//! `e2fsck -fn`, a manifest of the ext4 tree read with debugfs, a reference
//! unpack of the tars by Python's tarfile with OCI whiteout rules, and the
//! trees upstream overlaybd-apply produced from the same input.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// input.tar on a new --mkfs layer (a writable LSMT upper, no lowers):
/// clean, equal to the tar, and equal to what upstream's apply produced.
#[test]
fn input_tar_on_mkfs_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dev, data, index) = stack_with_upper(d, &[], 64 << 30);
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    let input = fixtures().join("input.tar");
    let stats = apply_file(&dev, &input).unwrap();
    assert_eq!(stats.entries, 711);
    assert_eq!(stats.tar_bytes, std::fs::metadata(&input).unwrap().len());
    drop(dev);

    let img = d.join("flat.img");
    flatten(&[], Some((&data, &index)), &img);
    e2fsck_clean(&img);
    reference_manifest(&[input], &d.join("ref.json"));
    image_manifest(&img, &d.join("ours.json"));
    assert_same_tree(&d.join("ref.json"), &d.join("ours.json"), &[]);

    let up = d.join("upstream.img");
    flatten(&[fixtures().join("mkfs/commit.lz4.zfile")], None, &up);
    image_manifest(&up, &d.join("upstream.json"));
    assert_same_tree(&d.join("upstream.json"), &d.join("ours.json"), &[]);

    // The superblock fields apply leaves alone match upstream's too.
    let (ours, theirs) = (dumpe2fs_header(&img), dumpe2fs_header(&up));
    for k in [
        "Filesystem features",
        "Inode count",
        "Block count",
        "Free inodes",
        "Last write time",
    ] {
        assert_eq!(ours.get(k), theirs.get(k), "{k}");
    }
}

/// input.tar on upstream's base layer ext4_64 (uninit_bg groups, a journal):
/// clean, equal to the tar and to upstream's result on the same base.
#[test]
fn input_tar_on_upstream_base_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = fixtures().join("baselayer/ext4_64");
    let (dev, data, index) = stack_with_upper(d, std::slice::from_ref(&base), 0);
    let input = fixtures().join("input.tar");
    apply_file(&dev, &input).unwrap();
    drop(dev);

    let img = d.join("flat.img");
    flatten(std::slice::from_ref(&base), Some((&data, &index)), &img);
    e2fsck_clean(&img);
    reference_manifest(&[input], &d.join("ref.json"));
    image_manifest(&img, &d.join("ours.json"));
    assert_same_tree(&d.join("ref.json"), &d.join("ours.json"), &[]);

    let up = d.join("upstream.img");
    flatten(&[base, fixtures().join("baselayer/commit.lsmt")], None, &up);
    image_manifest(&up, &d.join("upstream.json"));
    assert_same_tree(&d.join("upstream.json"), &d.join("ours.json"), &[]);

    // The base's group descriptors keep their uninit_bg flags consistent
    // (e2fsck checks the checksums); the journal is untouched and clean.
    let h = dumpe2fs_header(&img);
    assert!(h["Filesystem features"].contains("uninit_bg"));
    assert!(h["Filesystem features"].contains("has_journal"));
    assert!(!h["Filesystem features"].contains("needs_recovery"));
}

/// The hand-made layer set, applied in order on a fresh mkfs: after every
/// layer the tree equals the reference unpack of the layers so far.
#[test]
fn layer_set_matches_reference_after_every_layer() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("fs.img");
    let dev = mkfs_image(&img, 8 << 30);
    for (i, layer) in set.layers.iter().enumerate() {
        apply_file(&dev, layer).unwrap_or_else(|e| panic!("{}: {e}", layer.display()));
        e2fsck_clean(&img);
        let refj = d.join(format!("ref{i}.json"));
        let ours = d.join(format!("ours{i}.json"));
        reference_manifest(&set.layers[..=i], &refj);
        image_manifest(&img, &ours);
        assert_same_tree(&refj, &ours, &[]);
    }
    // Sparse members keep their holes: 60 x 4 KiB of data (plus at most
    // two extent-tree blocks) in a file of almost 4 MiB.
    let stat = run(
        testutil::tool("debugfs"),
        &["-R", "stat /sparse/pax10.img", img.to_str().unwrap()],
    );
    let blocks: u64 = stat
        .split("Blockcount: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("Blockcount in debugfs stat");
    assert!(blocks <= (60 + 2) * 8, "sparse file uses {blocks} sectors");
}

/// Lower directories hashed by e2fsck -D (htree, as the kernel or mke2fs
/// -d leave big directories): later layers go through libext2fs's htree
/// insertion and stay consistent.
#[test]
fn layer_set_on_hashed_directories() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("fs.img");
    let dev = mkfs_image(&img, 4 << 30);
    apply_file(&dev, &set.layers[0]).unwrap();
    // -D rebuilds every directory of more than one block as an htree.
    let st = std::process::Command::new(testutil::tool("e2fsck"))
        .args(["-fyD", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        st.status.code().unwrap_or(8) <= 1,
        "e2fsck -fyD failed: {st:?}"
    );
    let stat = run(
        testutil::tool("debugfs"),
        &["-R", "stat /many", img.to_str().unwrap()],
    );
    assert!(
        stat.contains("Flags: 0x81000"),
        "/many is not hashed:\n{stat}"
    );
    for layer in &set.layers[1..] {
        apply_file(&dev, layer).unwrap();
    }
    e2fsck_clean(&img);
    reference_manifest(&set.layers, &d.join("ref.json"));
    image_manifest(&img, &d.join("ours.json"));
    assert_same_tree(&d.join("ref.json"), &d.join("ours.json"), &[]);
}

/// Bases made by stock mke2fs with features upstream's mkfs does not use:
/// metadata_csum (checksummed inodes, directory blocks, bitmaps) with
/// inline_data, 1 KiB blocks (several directory blocks per page), and ext3
/// (block-mapped files with indirect blocks, a journal).
#[test]
fn layer_set_on_foreign_mke2fs_bases() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reference_manifest(&set.layers, &d.join("ref.json"));
    let bases: [&[&str]; 3] = [
        &["-t", "ext4", "-O", "metadata_csum,inline_data"],
        &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"],
        &["-t", "ext3"],
    ];
    for (n, opts) in bases.iter().enumerate() {
        let img = d.join(format!("fs{n}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        let mut args = vec!["-q", "-F"];
        args.extend_from_slice(opts);
        args.push(img.to_str().unwrap());
        run(testutil::tool("mke2fs"), &args);
        let dev: std::sync::Arc<dyn blockdev::BlockDevice> =
            std::sync::Arc::new(blockdev::RawFileDevice::open_rw(&img).unwrap());
        for layer in &set.layers {
            apply_file(&dev, layer)
                .unwrap_or_else(|e| panic!("mke2fs {opts:?}: {}: {e}", layer.display()));
        }
        drop(dev);
        e2fsck_clean(&img);
        let ours = d.join(format!("ours{n}.json"));
        image_manifest(&img, &ours);
        assert_same_tree(&d.join("ref.json"), &ours, &[]);
        std::fs::remove_file(&img).unwrap();
    }
}

/// A layer larger than the filesystem fails with a clear error.
#[test]
fn full_filesystem_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 16 << 20);
    let mut b = tar::Builder::new(Vec::new());
    let big = vec![7u8; 20 << 20];
    let mut h = tar::Header::new_gnu();
    h.set_size(big.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "big", &big[..]).unwrap();
    let data = b.into_inner().unwrap();
    let err = obdfs::apply_tar(dev, &data[..], obdfs::ApplyOptions::default()).unwrap_err();
    let msg = testutil::assert_clean_chain(&err);
    assert!(
        msg.contains("tar entry 'big'") && msg.contains("filesystem full"),
        "{msg}"
    );
}

/// An opaque marker at the root keeps the filesystem's lost+found.
#[test]
fn opaque_root_keeps_lost_and_found() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 1 << 30);
    apply_file(&dev, &set.layers[0]).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o644);
    b.append_data(&mut h, ".wh..wh..opq", &b""[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "only", &b"new"[..]).unwrap();
    let data = b.into_inner().unwrap();
    obdfs::apply_tar(dev, &data[..], obdfs::ApplyOptions::default()).unwrap();
    e2fsck_clean(&img);
    let ls = run(
        testutil::tool("debugfs"),
        &["-R", "ls /", img.to_str().unwrap()],
    );
    let names: Vec<&str> = ls
        .split_whitespace()
        .filter(|w| w.chars().any(|c| c.is_alphabetic()))
        .collect();
    assert!(
        names.contains(&"lost+found") && names.contains(&"only") && !names.contains(&"etc"),
        "{ls}"
    );
}

/// The same layers give the same bytes every time.
#[test]
fn apply_is_deterministic() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for n in 0..2 {
        let img = dir.path().join(format!("fs{n}.img"));
        let dev = mkfs_image(&img, 4 << 30);
        for layer in &set.layers {
            apply_file(&dev, layer).unwrap();
        }
        drop(dev);
        digests.push(sparse_digest(&img));
    }
    assert_eq!(digests[0], digests[1]);
}

/// Malicious layers fail with a clear error naming the entry.
#[test]
fn malicious_layers_are_refused() {
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    for (n, (tar, want)) in set.malicious.iter().enumerate() {
        let img = dir.path().join(format!("fs{n}.img"));
        let dev = mkfs_image(&img, 1 << 30);
        apply_file(&dev, &set.layers[0]).unwrap();
        let err = apply_file(&dev, tar).expect_err(&format!("{} was accepted", tar.display()));
        let msg = testutil::assert_clean_chain(&err);
        assert!(
            msg.contains(want),
            "{}: error '{msg}' lacks '{want}'",
            tar.display()
        );
        assert!(
            msg.starts_with("tar entry '"),
            "{}: error '{msg}' does not name the entry",
            tar.display()
        );
        drop(dev);
        std::fs::remove_file(&img).unwrap();
    }
}

/// Broken streams are errors with the offset, not panics.
#[test]
fn broken_streams_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 1 << 30);
    let input = std::fs::read(fixtures().join("input.tar")).unwrap();
    // Cut inside a file's data.
    let err = obdfs::apply_tar(
        dev.clone(),
        &input[..100_000],
        obdfs::ApplyOptions::default(),
    )
    .unwrap_err();
    let msg = testutil::assert_clean_chain(&err);
    assert!(
        msg.starts_with("tar entry 'usr/") && msg.contains("unexpected end of the stream"),
        "{msg}"
    );
    // Not a tar at all.
    let garbage = vec![0x5au8; 4096];
    let err =
        obdfs::apply_tar(dev.clone(), &garbage[..], obdfs::ApplyOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("malformed tar stream at byte 0"),
        "{err}"
    );
    // An empty stream is an empty layer.
    let s = obdfs::apply_tar(dev, &b""[..], obdfs::ApplyOptions::default()).unwrap();
    assert_eq!(s.entries, 0);
}

/// A device without an ext4 filesystem is refused clearly.
#[test]
fn no_filesystem_is_a_clear_error() {
    let dev: std::sync::Arc<dyn blockdev::BlockDevice> =
        std::sync::Arc::new(blockdev::MemDevice::new(64 << 20));
    let err = obdfs::apply_tar(dev, &b""[..], obdfs::ApplyOptions::default()).unwrap_err();
    let msg = testutil::assert_clean_chain(&err);
    assert!(
        msg.contains("open the ext4 filesystem") && msg.contains("magic"),
        "{msg}"
    );
    // With the likely cause: the stack lacks its mkfs'ed base layer.
    assert!(
        msg.contains("no ext4 superblock") && msg.contains("missing its base layer"),
        "{msg}"
    );
}

/// Debian's base layer has `var/run -> /run`; a later layer writing
/// `var/run/foo` puts it at `/run/foo` (as containerd does), with the link
/// coming from a committed, sealed lower layer.
#[test]
fn debian_var_run_link_in_a_sealed_lower_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tar_of = |build: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    };
    let dir_entry = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, &b""[..]).unwrap();
    };
    let base = tar_of(&|b| {
        dir_entry(b, "run/");
        dir_entry(b, "var/");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "var/run", "/run").unwrap();
    });
    let top = tar_of(&|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "var/run/foo", &b"foo\n"[..]).unwrap();
    });
    std::fs::write(d.join("base.tar"), &base).unwrap();
    std::fs::write(d.join("top.tar"), &top).unwrap();

    let l1 = d.join("l1");
    std::fs::create_dir(&l1).unwrap();
    let (dev, data, index) = stack_with_upper(&l1, &[], 1 << 30);
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    apply_file(&dev, &d.join("base.tar")).unwrap();
    drop(dev);
    let sealed = d.join("base.lsmt");
    blockdev::commit::commit_writable(&data, &index, &sealed, &Default::default()).unwrap();

    let l2 = d.join("l2");
    std::fs::create_dir(&l2).unwrap();
    let (dev, data, index) = stack_with_upper(&l2, std::slice::from_ref(&sealed), 0);
    apply_file(&dev, &d.join("top.tar")).unwrap();
    drop(dev);
    let img = d.join("flat.img");
    flatten(&[sealed], Some((&data, &index)), &img);
    e2fsck_clean(&img);
    reference_manifest(
        &[d.join("base.tar"), d.join("top.tar")],
        &d.join("ref.json"),
    );
    image_manifest(&img, &d.join("ours.json"));
    assert_same_tree(&d.join("ref.json"), &d.join("ours.json"), &[]);
    let i = img.to_str().unwrap();
    assert_eq!(
        run(testutil::tool("debugfs"), &["-R", "cat /run/foo", i]),
        "foo\n"
    );
    let stat = run(testutil::tool("debugfs"), &["-R", "stat /var/run", i]);
    assert!(stat.contains("Type: symlink"), "{stat}");
}

/// A hard link to its own name (`tar cf x.tar f f`) changes nothing: the file
/// stays, in the layer that made it and in a layer above, as GNU tar and
/// erofs-utils have it (it failed: "hard link target does not exist", the
/// file having been removed to make room for the link).
#[test]
fn a_hard_link_to_itself_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tars = testutil::self_link_tars(d);
    let img = d.join("fs.img");
    apply_each_as_reference(d, &img, &tars, |_, ours| {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ours).unwrap()).unwrap();
        assert_eq!(m["z/in"]["size"], 7, "{m}");
        assert_eq!(
            m["z/in"]["link"], m["h"]["link"],
            "one file, two names: {m}"
        );
    });
}

/// Applies `tars` in order onto a fresh ext4 at `img`; after each layer the
/// image is e2fsck-clean and holds the tree the layers so far unpack to
/// (manifests written into `d`), and `check(i, manifest)` looks further.
fn apply_each_as_reference(
    d: &Path,
    img: &Path,
    tars: &[PathBuf],
    mut check: impl FnMut(usize, &Path),
) {
    let dev = mkfs_image(img, 1 << 30);
    for (i, t) in tars.iter().enumerate() {
        apply_file(&dev, t).unwrap_or_else(|e| panic!("{}: {e}", t.display()));
        e2fsck_clean(img);
        let (refj, ours) = (
            d.join(format!("ref{i}.json")),
            d.join(format!("ours{i}.json")),
        );
        reference_manifest(&tars[..=i], &refj);
        image_manifest(img, &ours);
        assert_same_tree(&refj, &ours, &[]);
        check(i, &ours);
    }
}

/// A layer's entry for the root directory sets the root's owner, mode, time
/// and xattrs, in the bottom layer and above; `/.` is skipped, as libtar
/// skips it. (The entry was skipped: the root stayed 0755, root, mkfs time.)
#[test]
fn the_root_entry_sets_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tars = testutil::root_entry_tars(d);
    let img = d.join("fs.img");
    apply_each_as_reference(d, &img, &tars, |i, _| {
        let (mode, uid, gid, mtime, xattrs) = testutil::ext4_root(&img);
        assert_eq!(
            (mode, uid, gid, mtime, xattrs.join(" ").as_str()),
            testutil::EXT4_ROOT_AFTER[i],
            "root after layer {i}"
        );
    });
}

/// An entry naming the root that is not a directory is refused with a line
/// naming it (libtar would empty the root to put a file there).
#[test]
fn a_root_entry_that_is_not_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    testutil::root_as_file_tar(&d.join("t.tar"));
    let img = d.join("fs.img");
    let dev = mkfs_image(&img, 1 << 30);
    let e = apply_file(&dev, &d.join("t.tar")).unwrap_err().to_string();
    assert!(e.contains("'.'") && e.contains("not a directory"), "{e}");
}
