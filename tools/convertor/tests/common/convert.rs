//! Helpers for convertor end-to-end tests: building the test images, pushing them with
//! skopeo, running the convertor binary, flattening converted layers through our stack
//! and comparing the resulting ext4 with the source image's reference tree.
#![allow(dead_code)]

use super::require_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/build.py")
}

/// `build.py <cmd> <out> [args]`.
pub fn build_images(cmd: &str, out: &Path, extra: &[&str]) {
    require_bin("python3");
    require_bin("zstd");
    let o = Command::new("python3")
        .arg(build_script())
        .arg(cmd)
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build.py {cmd} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Copy `oci:<layout>:<tag>` to `docker://<host>/<repo>:<tag>` with skopeo, unchanged.
pub fn skopeo_push(layout: &Path, tag: &str, host: &str, repo: &str) {
    require_bin("skopeo");
    let o = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--quiet",
        ])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{host}/{repo}:{tag}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn convertor<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    convertor_logging(args, "warn")
}

/// Owned arguments: `base` followed by `extra`.
pub fn args_with(base: &[&str], extra: &[&str]) -> Vec<String> {
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// The convertor with `RUST_LOG=<log>` (e.g. `info` to see dedup decisions).
pub fn convertor_logging<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convertor"))
        .args(args)
        .env("RUST_LOG", log)
        .output()
        .unwrap()
}

/// Run the convertor and require success.
pub fn convert_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = convertor(args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "convertor {args:?} failed ({:?}):\nstdout: {out}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The reference tree of an image (layers merged by build.py, independently of us).
pub fn reference_tree(layout: &Path, tag: &str, platform: Option<&str>) -> serde_json::Value {
    let mut c = Command::new("python3");
    c.arg(build_script()).arg("tree").arg(layout).arg(tag);
    if let Some(p) = platform {
        c.args(["--platform", p]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Flatten committed layer blobs (bottom first) into a sparse raw image through our
/// layer stack, check it with `e2fsck -fn`, mount it read-only and return its tree.
pub fn flatten_and_scan(layers: &[PathBuf], work: &Path) -> serde_json::Value {
    require_bin("e2fsck");
    let img = work.join("flat.img");
    let _ = std::fs::remove_file(&img);
    let stack = blockdev::Stack::open_read_only(layers, None).expect("open converted layers");
    stack.write_raw_image(&img).expect("flatten");
    drop(stack);
    let o = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck -fn rejected the converted filesystem:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&img)
        .arg(&mnt)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let fuse = if mounted {
        false
    } else {
        require_bin("fuse2fs");
        let o = Command::new("fuse2fs")
            .arg(&img)
            .arg(&mnt)
            .args(["-o", "ro,fakeroot"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "neither mount -o loop nor fuse2fs could mount the image: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        true
    };
    let o = Command::new("python3")
        .arg(build_script())
        .arg("scan")
        .arg(&mnt)
        .output()
        .unwrap();
    let _ = Command::new(if fuse { "fusermount" } else { "umount" })
        .args(if fuse { vec!["-u"] } else { vec![] })
        .arg(&mnt)
        .status();
    let _ = std::fs::remove_file(&img);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[allow(unused_imports)]
pub use testutil::assert_same_tree;

/// Copy `tag` of an OCI layout into a registry byte for byte with our client (skopeo's
/// OCI transport refuses Docker manifest lists inside a layout).
pub fn push_layout_tag(layout: &Path, tag: &str, repo: &obdregistry::Repository) {
    use obdoci::{layout::Layout, model, Descriptor, Reference};
    use obdregistry::BlobSource;
    fn copy(l: &Layout, d: &Descriptor, repo: &obdregistry::Repository, tag: Option<&str>) {
        let bytes = l.read_blob(d, 1 << 24).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mt = model::sniff_media_type(&bytes).unwrap();
        if model::is_index(&mt) {
            for c in v["manifests"].as_array().unwrap() {
                let cd: Descriptor = serde_json::from_value(c.clone()).unwrap();
                copy(l, &cd, repo, None);
            }
        } else {
            let mut blobs = vec![v["config"].clone()];
            blobs.extend(v["layers"].as_array().unwrap().iter().cloned());
            for b in blobs {
                let bd: Descriptor = serde_json::from_value(b).unwrap();
                let data = l.read_blob(&bd, 1 << 30).unwrap();
                repo.push_blob(&bd, BlobSource::Bytes(&data), None, None)
                    .unwrap();
            }
        }
        let r = match tag {
            Some(t) => Reference::Tag(t.into()),
            None => Reference::Digest(d.digest.clone()),
        };
        repo.put_manifest(&r, &mt, &bytes).unwrap();
    }
    let l = Layout::open(layout).unwrap();
    let d = l.resolve(&Reference::Tag(tag.into())).unwrap();
    copy(&l, &d, repo, Some(tag));
}
