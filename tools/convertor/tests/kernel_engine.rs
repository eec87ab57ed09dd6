//! `convertor --engine kernel`: the test image converted with mkfs.ext4 and
//! the kernel's ext4 (layers exposed through FUSE and loop devices), with
//! `ctr obdconv`'s `--fstype "ext4;MOUNT_OPTS;MKFS_OPTS"`. The converted
//! layers are flattened through our stack reader into an ext4 that passes
//! `e2fsck -fn` and holds the source image's tree, as the libext2fs engine's
//! conversion of the same image does. Needs root (CI runs as root).

mod common;

use common::convert::*;
use obdoci::model::*;
use obdoci::Reference;
use std::path::PathBuf;
use testutil::assert_same_tree;

fn layers_of(layout: &std::path::Path, tag: &str) -> Vec<PathBuf> {
    let l = obdoci::layout::Layout::open(layout).unwrap();
    let d = l.resolve(&Reference::Tag(tag.into())).unwrap();
    let m: Manifest = parse_json("m", &l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    m.layers.iter().map(|x| l.blob_path(&x.digest)).collect()
}

#[test]
fn kernel_engine_conversion_equals_the_source_and_libext2fs() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "--engine kernel needs root; run this test as root (CI does)"
    );
    let t = tempfile::tempdir().unwrap();
    let sample = t.path().join("sample");
    build_images("sample", &sample, &[]);
    let src = format!("oci:{}", sample.display());
    let wd = t.path().join("work");
    for (tag, extra) in [
        (
            "kernel_obd",
            vec![
                "--engine",
                "kernel",
                "--fstype",
                "ext4;discard,noatime;-I 256",
            ],
        ),
        ("lib_obd", vec![]),
    ] {
        let mut args = vec![
            "-r",
            &src,
            "-i",
            "latest",
            "-o",
            tag,
            "-d",
            wd.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = convert_ok(&args);
        assert!(out.contains(tag), "{out}");
    }
    let want = reference_tree(&sample, "latest", None);
    let kdir = t.path().join("k");
    std::fs::create_dir(&kdir).unwrap();
    let kernel = flatten_and_scan(&layers_of(&sample, "kernel_obd"), &kdir);
    assert_same_tree(&kernel, &want);
    let ldir = t.path().join("l");
    std::fs::create_dir(&ldir).unwrap();
    let lib = flatten_and_scan(&layers_of(&sample, "lib_obd"), &ldir);
    assert_same_tree(&kernel, &lib);
    // The `ctr obdconv` form: its mount and mkfs options select the kernel engine.
    let out = convert_ok(&[
        "obdconv",
        &format!("{src}:latest"),
        &format!("{src}:obdconv_obd"),
        "--fstype",
        "ext4;discard,noatime;-I 256",
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert!(out.contains("obdconv_obd"), "{out}");
    let odir = t.path().join("o");
    std::fs::create_dir(&odir).unwrap();
    let obdconv = flatten_and_scan(&layers_of(&sample, "obdconv_obd"), &odir);
    assert_same_tree(&obdconv, &want);
    // The engines' bytes differ, so their layers must not share dedup keys.
    assert_ne!(
        layers_of(&sample, "kernel_obd"),
        layers_of(&sample, "lib_obd")
    );
}
