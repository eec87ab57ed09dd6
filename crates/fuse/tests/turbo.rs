//! Filesystem mode over TurboOCI stacks, through the real kernel FUSE:
//! layers made with upstream's command lines (`overlaybd-create --turboOCI`,
//! `turboOCI-apply [--fstype erofs]`, `overlaybd-commit -z --fastoci`) from
//! the fixture gzip blobs, stacked by a config.json whose lowers are
//! `{gzipIndex, file, targetFile, targetDigest}`. The FUSE tree equals what
//! the kernel's own driver (`mount -t erofs` / ext4 on a loop device) shows
//! on the flattened stack, attribute for attribute, and the reference tree
//! of the two layer tars. The same layers packed as a TurboOCI image in an
//! OCI layout (`oci:DIR:TAG`) serve the same tree, and so does that image
//! pushed to a docker-registry and mounted by reference (lazily).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sha2::Digest as _;

fn fx(p: &str) -> PathBuf {
    testutil::turbo_fixtures().join(p)
}

/// The fixture's two gzip layer blobs (bottom first) and their digests.
fn blobs() -> [(PathBuf, String); 2] {
    [
        (
            fx("ext4-gzip/layer.tar.gz"),
            "sha256:77ad7703c0bdc0d0498cc02fe565c8ff23fe87975ef2d5ec4e9059034e06f948".into(),
        ),
        (
            fx("ext4-gzip-2/layer.tar.gz"),
            "sha256:ac91f170fd64725f7469966566647eb1d8611c3333222b250a9c1ff065dda4a0".into(),
        ),
    ]
}

/// A TurboOCI layer chain in `work` (one dir per layer, as the Go convertor
/// lays it out); returns the layer dirs, bottom first.
fn build_chain(work: &Path, fstype: &str) -> Vec<PathBuf> {
    let meta = format!("{fstype}.fs.meta");
    let mut lowers: Vec<serde_json::Value> = Vec::new();
    let mut dirs = Vec::new();
    for (i, (blob, digest)) in blobs().iter().enumerate() {
        let d = work.join(format!("{i:04}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(blob, d.join("layer.tar")).unwrap();
        let mut create = Command::new(workspace_bin("overlaybd-create"));
        create
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .args(["-s", "64", "--turboOCI"]);
        if i == 0 && fstype == "ext4" {
            create.arg("--mkfs");
        }
        run_ok(&mut create);
        let cfg = d.join("config.json");
        let j = serde_json::json!({
            "repoBlobUrl": "",
            "lowers": lowers,
            "upper": {"index": d.join("writable_index"), "data": d.join("writable_data"),
                      "target": d.join("layer.tar")},
            "resultFile": "",
        });
        std::fs::write(&cfg, j.to_string()).unwrap();
        let mut apply = Command::new(workspace_bin("turboOCI-apply"));
        apply
            .arg(d.join("layer.tar"))
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta"));
        if fstype != "ext4" {
            apply.args(["--fstype", fstype]);
        }
        run_ok(&mut apply);
        run_ok(
            Command::new(workspace_bin("overlaybd-commit"))
                .arg(d.join("writable_data"))
                .arg(d.join("writable_index"))
                .arg(d.join(&meta))
                .args(["-z", "--fastoci"]),
        );
        std::fs::remove_file(d.join("writable_data")).unwrap();
        std::fs::remove_file(d.join("writable_index")).unwrap();
        lowers.push(serde_json::json!({
            "gzipIndex": d.join("gzip.meta"), "file": d.join(&meta),
            "targetFile": d.join("layer.tar"), "targetDigest": digest,
        }));
        dirs.push(d);
    }
    let j = serde_json::json!({"repoBlobUrl": "", "lowers": lowers, "resultFile": ""});
    std::fs::write(work.join("config.json"), j.to_string()).unwrap();
    dirs
}

/// `treecmp.py reference` of the two layer tars.
fn reference(dir: &Path) -> PathBuf {
    let p = dir.join("ref.json");
    let out = testutil::treecmp(&[
        "reference",
        testutil::fixtures().join("input.tar").to_str().unwrap(),
        fx("ext4-gzip-2/layer.tar").to_str().unwrap(),
    ]);
    std::fs::write(&p, out).unwrap();
    p
}

/// Compare a mounted tree with the reference (lost+found is ext4's own).
fn assert_reference(mp: &Path, want: &Path, work: &Path) {
    let got = work.join(format!(
        "got-{}.json",
        mp.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&got, testutil::treecmp(&["dir", mp.to_str().unwrap()])).unwrap();
    testutil::treecmp(&["compare", got.to_str().unwrap(), want.to_str().unwrap()]);
}

/// Flatten the stack of `config` into a sparse raw image.
fn flatten(config: &Path, img: &Path) {
    obdfuse::ImageSpec::from_args(&[config.display().to_string()], None, &Default::default())
        .unwrap()
        .open(false)
        .unwrap()
        .write_raw_image(img)
        .unwrap();
}

fn check_stack(fstype: &str) {
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    build_chain(&work, fstype);
    let config = work.join("config.json");
    let f = Fuse::background(
        &["--fs".as_ref(), config.as_os_str()],
        &t.path().join("fuse"),
    );
    assert!(
        f.ready.contains(&format!("({fstype} files)")),
        "{}",
        f.ready
    );
    assert!(f.ready.contains("TurboOCI"), "{}", f.ready);
    let img = t.path().join("flat.img");
    flatten(&config, &img);
    let k = testutil::LoopMount::new(fstype, &img, &t.path().join("kernel"));

    assert_same_stats(&stat_tree(&f.mp), &stat_tree(&k.dir));
    assert_same_tree(&scan(&f.mp), &scan(&k.dir));
    let want = reference(t.path());
    assert_reference(&f.mp, &want, t.path());
    // The second layer's edits are there: replaced file, whiteout, opaque
    // dir, hard link to the replaced file.
    let bash = f.mp.join("usr/share/doc/bash");
    assert!(!bash.join("inputrc.arrows").exists());
    let rbash = std::fs::metadata(bash.join("RBASH")).unwrap();
    assert_eq!(rbash.len(), 1920);
    let names: Vec<_> = std::fs::read_dir(f.mp.join("usr/share/doc/git/contrib/stats"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["after-opaque.txt"]);
    let st = nix::sys::statvfs::statvfs(&f.mp).unwrap();
    let want_st = nix::sys::statvfs::statvfs(&k.dir).unwrap();
    assert_eq!(
        (st.block_size(), st.blocks(), st.blocks_free()),
        (
            want_st.block_size(),
            want_st.blocks(),
            want_st.blocks_free()
        )
    );
    drop(k);
    f.unmount();
}

#[test]
fn fs_mode_over_an_erofs_turbooci_stack_equals_mount_t_erofs() {
    check_stack("erofs");
}

#[test]
fn fs_mode_over_an_ext4_turbooci_stack_equals_the_loop_mount() {
    check_stack("ext4");
}

/// `turboOCIv1.tar.gz` as the Go convertor packs it: `<fs>.fs.meta`,
/// `.turbo.ociv1` and `gzip.meta`, headers with name, mode, size only.
fn turbo_blob(fs_meta: &Path, gzip_meta: &Path) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    let name = fs_meta.file_name().unwrap().to_str().unwrap().to_string();
    for (n, data) in [
        (name, std::fs::read(fs_meta).unwrap()),
        (".turbo.ociv1".to_string(), Vec::new()),
        ("gzip.meta".to_string(), std::fs::read(gzip_meta).unwrap()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(&n).unwrap();
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn put_blob(layout: &Path, data: &[u8]) -> (String, u64) {
    let hex = hex::encode(sha2::Sha256::digest(data));
    let p = layout.join("blobs/sha256").join(&hex);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::File::create(&p).unwrap().write_all(data).unwrap();
    (format!("sha256:{hex}"), data.len() as u64)
}

/// An OCI layout holding the original blobs and a TurboOCI image `tag`
/// over them (the shapes of upstream-convertor.md §2: gzip layer media
/// type, version/blob-digest/blob-size/target-digest/target-media-type
/// annotations).
fn turbo_layout(layout: &Path, layers: &[(PathBuf, PathBuf)], tag: &str) {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut descs = Vec::new();
    for ((fs_meta, gzip_meta), (blob, target)) in layers.iter().zip(blobs()) {
        let (d, _) = put_blob(layout, &std::fs::read(&blob).unwrap());
        assert_eq!(d, target);
        let tb = turbo_blob(fs_meta, gzip_meta);
        let (digest, size) = put_blob(layout, &tb);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
            "annotations": {
                "containerd.io/snapshot/overlaybd/version": "0.1.0-turbo.ociv1",
                "containerd.io/snapshot/overlaybd/blob-digest": digest,
                "containerd.io/snapshot/overlaybd/blob-size": size.to_string(),
                "containerd.io/snapshot/overlaybd/turbo-oci/target-digest": target,
                "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type":
                    "application/vnd.oci.image.layer.v1.tar+gzip",
            }
        }));
    }
    let (cfg, cfg_size) = put_blob(layout, br#"{"architecture":"amd64","os":"linux"}"#);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": descs,
    });
    let (md, ms) = put_blob(layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
}

#[test]
fn a_turbooci_image_in_an_oci_layout_serves_the_reference_tree() {
    // Upstream's own layers (the fixture files), packed into an image.
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let layers: Vec<(PathBuf, PathBuf)> = ["erofs-gzip", "erofs-gzip-2"]
        .iter()
        .map(|c| {
            (
                fx(&format!("{c}/erofs.fs.meta")),
                fx(&format!("{c}/gzip.meta")),
            )
        })
        .collect();
    turbo_layout(&layout, &layers, "v1_turbo");
    let src = format!("oci:{}:v1_turbo", layout.display());
    let f = Fuse::background(&["--fs".as_ref(), src.as_ref()], &t.path().join("mp"));
    assert!(f.ready.contains("TurboOCI image"), "{}", f.ready);
    assert!(f.ready.contains("(erofs files)"), "{}", f.ready);
    let want = reference(t.path());
    assert_reference(&f.mp, &want, t.path());
    f.unmount();

    // Block mode serves the same stack's disk: the kernel mounts it.
    let f = Fuse::background(&[src.as_ref()], &t.path().join("blk"));
    let k = testutil::LoopMount::new("erofs", &f.disk(), &t.path().join("kernel"));
    assert_reference(&k.dir, &want, t.path());
    drop(k);
    f.unmount();

    // The ext4 pair too.
    let layout = t.path().join("layout-ext4");
    let layers: Vec<(PathBuf, PathBuf)> = ["ext4-gzip", "ext4-gzip-2"]
        .iter()
        .map(|c| {
            (
                fx(&format!("{c}/ext4.fs.meta")),
                fx(&format!("{c}/gzip.meta")),
            )
        })
        .collect();
    turbo_layout(&layout, &layers, "v1_turbo");
    let src = format!("oci:{}:v1_turbo", layout.display());
    let f = Fuse::background(&["--fs".as_ref(), src.as_ref()], &t.path().join("mp4"));
    assert!(f.ready.contains("(ext4 files)"), "{}", f.ready);
    assert_reference(&f.mp, &want, t.path());
    f.unmount();
}

#[test]
fn a_turbooci_layer_with_a_damaged_blob_is_refused_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let layers: Vec<(PathBuf, PathBuf)> = ["erofs-gzip", "erofs-gzip-2"]
        .iter()
        .map(|c| {
            (
                fx(&format!("{c}/erofs.fs.meta")),
                fx(&format!("{c}/gzip.meta")),
            )
        })
        .collect();
    turbo_layout(&layout, &layers, "v1");
    // Remove the bottom layer's original blob: the image cannot be served.
    let (_, target) = &blobs()[0];
    let p = layout
        .join("blobs/sha256")
        .join(target.strip_prefix("sha256:").unwrap());
    std::fs::remove_file(&p).unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let o = Command::new(fuse_bin())
        .args(["mount", "--fs"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&mp)
        .output()
        .unwrap();
    let e = err_text(&o);
    assert!(e.contains(target.as_str()) && e.contains("missing"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!is_mounted(&mp));
}

#[path = "../../registry/tests/common/mod.rs"]
mod services;

#[test]
fn a_turbooci_image_in_a_registry_is_read_lazily() {
    // The original layers pushed as they are, the TurboOCI image over them
    // pushed by skopeo; mounted by reference through a counting proxy.
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let layers: Vec<(PathBuf, PathBuf)> = ["erofs-gzip", "erofs-gzip-2"]
        .iter()
        .map(|c| {
            (
                fx(&format!("{c}/erofs.fs.meta")),
                fx(&format!("{c}/gzip.meta")),
            )
        })
        .collect();
    turbo_layout(&layout, &layers, "v1_turbo");
    let reg = services::Registry::plain();
    let repo = reg.client("lazy/turbo");
    let mut image_bytes = 0;
    for (blob, digest) in blobs() {
        let data = std::fs::read(&blob).unwrap();
        let d = obdoci::Descriptor::of_bytes("application/vnd.oci.image.layer.v1.tar+gzip", &data);
        assert_eq!(d.digest.to_string(), digest);
        repo.push_blob(&d, obdregistry::BlobSource::Bytes(&data), None, None)
            .unwrap();
        image_bytes += data.len() as u64;
    }
    run_ok(
        Command::new(tool("skopeo"))
            .args([
                "copy",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--quiet",
            ])
            .arg(format!("oci:{}:v1_turbo", layout.display()))
            .arg(format!("docker://{}/lazy/turbo:v1_turbo", reg.host())),
    );
    let proxy = services::Proxy::start(reg.port, None, None);
    let image = format!("127.0.0.1:{}/lazy/turbo:v1_turbo", proxy.port);
    let f = Fuse::background(
        &["--fs".as_ref(), "--plain".as_ref(), image.as_ref()],
        &t.path().join("mp"),
    );
    assert!(f.ready.contains("TurboOCI image"), "{}", f.ready);
    assert!(f.ready.contains("lazily fetched"), "{}", f.ready);
    assert!(f.ready.contains("(erofs files)"), "{}", f.ready);
    // One small file: a part of the gzip targets (through gzip.meta's
    // checkpoints), plus the small metadata blobs read whole at mount.
    let rbash = std::fs::read(f.mp.join("usr/share/doc/bash/RBASH")).unwrap();
    assert_eq!(rbash.len(), 1920);
    let one_file = proxy.bytes_to_clients();
    eprintln!("lazy TurboOCI: {one_file} bytes fetched for one file; targets {image_bytes} bytes");
    assert!(
        one_file * 10 < image_bytes,
        "{one_file} bytes fetched of {image_bytes}"
    );
    let want = reference(t.path());
    assert_reference(&f.mp, &want, t.path());
    f.unmount();
}

/// A file of an EROFS TurboOCI layer whose mtime is before 1970 (EROFS keeps
/// it as the two's complement of the negative seconds, as erofs-utils writes
/// a negative PAX mtime and `turboOCI-apply` a GNU base-256 one) shows that
/// time, as the kernel's driver does. Building its attributes overflowed the
/// time (`UNIX_EPOCH` + 2^64 - 1 seconds): the file, and the listing of its
/// directory, failed with EIO.
#[test]
fn an_erofs_file_older_than_1970_shows_its_time() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("0000");
    std::fs::create_dir_all(&d).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(3);
    h.as_old_mut().mtime = [0xff; 12];
    b.append_data(&mut h, "old", &b"old"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(3);
    b.append_pax_extensions([("mtime", &b"-1234567890.5"[..])])
        .unwrap();
    b.append_data(&mut h, "older", &b"pax"[..]).unwrap();
    let tar_bytes = b.into_inner().unwrap();
    std::fs::write(d.join("layer.tar"), &tar_bytes).unwrap();
    run_ok(
        Command::new(workspace_bin("overlaybd-create"))
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .args(["-s", "1", "--turboOCI"]),
    );
    let cfg = d.join("config.json");
    let j = serde_json::json!({
        "lowers": [],
        "upper": {"index": d.join("writable_index"), "data": d.join("writable_data"),
                  "target": d.join("layer.tar")},
        "resultFile": "",
    });
    std::fs::write(&cfg, j.to_string()).unwrap();
    run_ok(
        Command::new(workspace_bin("turboOCI-apply"))
            .arg(d.join("layer.tar"))
            .arg(&cfg)
            .args(["--fstype", "erofs"]),
    );
    run_ok(
        Command::new(workspace_bin("overlaybd-commit"))
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .arg(d.join("erofs.fs.meta"))
            .args(["-z", "--fastoci"]),
    );
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar_bytes)));
    let config = t.path().join("config.json");
    let j = serde_json::json!({"lowers": [{
        "file": d.join("erofs.fs.meta"), "targetFile": d.join("layer.tar"), "targetDigest": digest,
    }], "resultFile": ""});
    std::fs::write(&config, j.to_string()).unwrap();
    let f = Fuse::background(
        &["--fs".as_ref(), config.as_os_str()],
        &t.path().join("fuse"),
    );
    assert!(f.ready.contains("(erofs files)"), "{}", f.ready);
    let at = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(f.mp.join(p)).unwrap();
        (md.mtime(), md.mtime_nsec())
    };
    assert_eq!(at("old"), (-1, 0));
    assert_eq!(at("older"), (-1_234_567_891, 500_000_000));
    let mut names: Vec<_> = std::fs::read_dir(&f.mp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["old", "older"]);
    assert_eq!(std::fs::read(f.mp.join("older")).unwrap(), b"pax");
    f.unmount();
}
