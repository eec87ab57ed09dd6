//! TurboOCI with `--fstype erofs` through the binaries, with upstream's
//! exact command lines (fixture README): `overlaybd-create --turboOCI` (no
//! --mkfs), `turboOCI-apply --gz_index_path ... --fstype erofs`,
//! `overlaybd-commit -z --fastoci`. The committed `erofs.fs.meta` (ZFile)
//! and the plain `.lsmt` equal upstream's byte for byte, for the bottom and
//! the upper layer; the stack, flattened through our layer stack (lowers
//! read through gzip.meta), mounts as EROFS and shows the reference tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::stack::LowerSource;
use blockdev::warp::TargetSource;
use blockdev::Stack;
use obdfs::erofs::ErofsReader;
use testutil::run_ok;

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_turboOCI-apply");
const COMMIT: &str = env!("CARGO_BIN_EXE_overlaybd-commit");

fn fx(p: &str) -> PathBuf {
    testutil::turbo_fixtures().join(p)
}

/// One layer dir as the Go convertor lays it out for --fstype erofs.
fn run_layer(d: &Path, blob: &Path, lowers: &[serde_json::Value]) {
    std::fs::create_dir_all(d).unwrap();
    std::fs::copy(blob, d.join("layer.tar")).unwrap();
    run_ok(
        Command::new(CREATE)
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .args(["-s", "64", "--turboOCI"]),
    );
    let cfg = d.join("config.json");
    let j = serde_json::json!({
        "repoBlobUrl": "",
        "lowers": lowers,
        "upper": {"index": d.join("writable_index"), "data": d.join("writable_data"), "target": d.join("layer.tar")},
        "resultFile": d.join("result"),
    });
    std::fs::write(&cfg, j.to_string()).unwrap();
    let out = run_ok(
        Command::new(APPLY)
            .arg(d.join("layer.tar"))
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta"))
            .args(["--fstype", "erofs"]),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("turboOCI-apply done"));
    assert_eq!(
        std::fs::read_to_string(d.join("result")).unwrap(),
        "success"
    );
    run_ok(
        Command::new(COMMIT)
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .arg(d.join("overlaybd.commit"))
            .args(["-z", "--fastoci"]),
    );
    std::fs::rename(d.join("overlaybd.commit"), d.join("erofs.fs.meta")).unwrap();
    run_ok(
        Command::new(COMMIT)
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .arg(d.join("erofs.fs.meta.lsmt"))
            .arg("--fastoci"),
    );
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        x == y,
        "{} ({} bytes) differs from upstream's {} ({} bytes)",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
}

#[test]
fn erofs_layers_equal_upstreams_and_mount() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("0000"), dir.path().join("0001"));
    run_layer(&d0, &fx("ext4-gzip/layer.tar.gz"), &[]);
    let lower0 = serde_json::json!({
        "gzipIndex": d0.join("gzip.meta"), "file": d0.join("erofs.fs.meta"),
        "targetFile": d0.join("layer.tar"), "targetDigest": "sha256:77ad7703c0bdc0d0498cc02fe565c8ff23fe87975ef2d5ec4e9059034e06f948"});
    run_layer(&d1, &fx("ext4-gzip-2/layer.tar.gz"), &[lower0]);
    for (d, case) in [(&d0, "erofs-gzip"), (&d1, "erofs-gzip-2")] {
        for f in ["erofs.fs.meta", "erofs.fs.meta.lsmt", "gzip.meta"] {
            same_file(&d.join(f), &fx(&format!("{case}/{f}")));
        }
    }

    // Flatten through our stack: the metadata from the layers, the file
    // data from the gzip blobs through gzip.meta.
    let lower = |d: &Path| LowerSource::Warp {
        file: d.join("erofs.fs.meta"),
        target: TargetSource::gzip(d.join("layer.tar"), d.join("gzip.meta")),
    };
    let opened = [lower(&d0), lower(&d1)]
        .iter()
        .map(|l| l.open().unwrap())
        .collect();
    let stack = Arc::new(Stack::with_lowers(opened, None).unwrap());
    // Our reader straight on the stack.
    let r = ErofsReader::open(stack.clone()).unwrap();
    let st = r.verify(&Default::default()).unwrap();
    assert_eq!(st.entries, 712);
    let f = r
        .lookup_path(b"usr/share/doc/bash/CHANGES.gz")
        .unwrap()
        .unwrap();
    let want = std::fs::read(testutil::fixtures().join("input.tar")).unwrap();
    assert_eq!(
        r.read_all(&f, 1 << 20).unwrap(),
        &want[2560..2560 + 126_824]
    );
    // The kernel on the flattened image.
    let img = dir.path().join("flat.img");
    stack.write_raw_image(&img).unwrap();
    let refm = dir.path().join("ref.json");
    std::fs::write(
        &refm,
        testutil::treecmp(&[
            "reference",
            testutil::fixtures().join("input.tar").to_str().unwrap(),
            fx("ext4-gzip-2/layer.tar").to_str().unwrap(),
        ]),
    )
    .unwrap();
    let kern = dir.path().join("kernel.json");
    {
        let m = testutil::LoopMount::new("erofs", &img, &dir.path().join("mnt"));
        std::fs::write(&kern, testutil::treecmp(&["dir", m.dir.to_str().unwrap()])).unwrap();
    }
    testutil::treecmp(&["compare", kern.to_str().unwrap(), refm.to_str().unwrap()]);
}
