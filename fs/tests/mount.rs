//! Kernel view of applied layers: the ext4 image is loop-mounted read-only
//! and its tree compared with the reference unpack and with `umoci unpack`.
//! These tests need root (loop devices, umoci restoring owners, device
//! nodes and trusted.* xattrs); they fail, not skip, without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loop-mounts ext4 images and runs umoci, which needs root; run it as root (CI does)"
    );
}

/// A read-only loop mount, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(img: &Path, at: &Path) -> Mount {
        Mount::with(img, at, "loop,ro")
    }

    fn with(img: &Path, at: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        run(
            testutil::tool("mount"),
            &[
                "-o",
                opts,
                "-t",
                "ext4",
                img.to_str().unwrap(),
                at.to_str().unwrap(),
            ],
        );
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn apply_all(img: &Path, layers: &[PathBuf]) {
    let dev = mkfs_image(img, 4 << 30);
    for l in layers {
        apply_file(&dev, l).unwrap_or_else(|e| panic!("{}: {e}", l.display()));
    }
}

#[test]
fn loop_mount_matches_reference_unpack() {
    require_root();
    let set = layer_set();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("fs.img");
    apply_all(&img, &set.layers);
    reference_manifest(&set.layers, &d.join("ref.json"));
    {
        let _m = Mount::new(&img, &d.join("mnt"));
        dir_manifest(&d.join("mnt"), &d.join("mnt.json"));
    }
    assert_same_tree(&d.join("ref.json"), &d.join("mnt.json"), &[]);

    // input.tar on upstream's base layer, seen by the kernel.
    let base = fixtures().join("baselayer/ext4_64");
    let (dev, data, index) = stack_with_upper(d, std::slice::from_ref(&base), 0);
    let input = fixtures().join("input.tar");
    apply_file(&dev, &input).unwrap();
    drop(dev);
    let flat = d.join("base.img");
    flatten(&[base], Some((&data, &index)), &flat);
    reference_manifest(&[input], &d.join("ref-input.json"));
    {
        let _m = Mount::new(&flat, &d.join("mnt2"));
        dir_manifest(&d.join("mnt2"), &d.join("mnt2.json"));
    }
    assert_same_tree(&d.join("ref-input.json"), &d.join("mnt2.json"), &[]);
}

#[test]
fn loop_mount_matches_umoci_unpack() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let set = d.join("layers");
    run(
        "python3",
        &[
            scripts().join("make-layers.py").to_str().unwrap(),
            "--umoci",
            set.to_str().unwrap(),
        ],
    );
    let layers: Vec<PathBuf> = std::fs::read_to_string(set.join("layers.txt"))
        .unwrap()
        .lines()
        .map(|l| set.join(l))
        .collect();
    let oci = d.join("oci");
    let mut args = vec![
        scripts()
            .join("oci-layout.py")
            .to_str()
            .unwrap()
            .to_string(),
        oci.to_str().unwrap().to_string(),
        "test".to_string(),
    ];
    args.extend(layers.iter().map(|p| p.to_str().unwrap().to_string()));
    run(
        "python3",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let bundle = d.join("bundle");
    run(
        testutil::tool("umoci"),
        &[
            "unpack",
            "--image",
            &format!("{}:test", oci.display()),
            bundle.to_str().unwrap(),
        ],
    );
    dir_manifest(&bundle.join("rootfs"), &d.join("umoci.json"));

    let img = d.join("fs.img");
    apply_all(&img, &layers);
    {
        let _m = Mount::new(&img, &d.join("mnt"));
        dir_manifest(&d.join("mnt"), &d.join("mnt.json"));
    }
    // umoci drops trusted.overlay.* xattrs, and stamps directories with the
    // unpack time when it creates them implicitly or adds entries to them;
    // we keep the tar's time (or 0), which is deterministic.
    assert_same_tree(
        &d.join("umoci.json"),
        &d.join("mnt.json"),
        &[
            "--ignore-xattr",
            "trusted.overlay.opaque",
            "--ignore-dir-mtime",
        ],
    );
}

/// The largest size the kernel lets a file on `img` have (its s_maxbytes),
/// found with ftruncate on a scratch copy mounted read-write.
fn kernel_max_file_size(img: &Path, mnt: &Path) -> u64 {
    let scratch = img.with_extension("scratch");
    std::fs::copy(img, &scratch).unwrap();
    let max = {
        let _m = Mount::with(&scratch, mnt, "loop");
        let f = std::fs::File::create(mnt.join("probe")).unwrap();
        let (mut lo, mut hi) = (0u64, i64::MAX as u64);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match f.set_len(mid) {
                Ok(()) => lo = mid,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
                    hi = mid - 1;
                }
            }
        }
        lo
    };
    std::fs::remove_file(&scratch).unwrap();
    max
}

/// apply's file size limit is the kernel's, on filesystems with extents
/// (4 KiB and 1 KiB blocks) and with block-mapped files (with and without
/// huge_file): a sparse file ending exactly there applies, e2fsck agrees
/// and the kernel reads its last bytes; one byte more is refused.
#[test]
fn maximum_file_size_is_the_kernels() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let variants: [&[&str]; 4] = [
        &[],
        &["-t", "ext4", "-b", "1024"],
        &["-t", "ext3"],
        &["-t", "ext4", "-O", "^extent,^64bit"],
    ];
    for (n, opts) in variants.iter().enumerate() {
        let img = d.join(format!("fs{n}.img"));
        let dev = if opts.is_empty() {
            mkfs_image(&img, 128 << 20)
        } else {
            mke2fs_image(&img, 128 << 20, opts)
        };
        drop(dev);
        let max = kernel_max_file_size(&img, &d.join("mnt"));
        let dev: std::sync::Arc<dyn blockdev::BlockDevice> =
            std::sync::Arc::new(blockdev::RawFileDevice::open_rw(&img).unwrap());
        let over = sparse_tar("over", max + 1, &[(max - 3, 4)]);
        let err = obdfs::apply_tar(dev.clone(), &over[..], obdfs::ApplyOptions::default())
            .expect_err(&format!("{opts:?}: a file of {} bytes applied", max + 1));
        let msg = testutil::assert_clean_chain(&err);
        assert!(msg.contains("maximum file size"), "{msg}");
        let edge = sparse_tar("edge", max, &[(max - 4, 4)]);
        obdfs::apply_tar(dev.clone(), &edge[..], obdfs::ApplyOptions::default())
            .unwrap_or_else(|e| panic!("{opts:?}: a file of {max} bytes: {e}"));
        drop(dev);
        e2fsck_clean(&img);
        {
            let m = d.join("mnt");
            let _m = Mount::new(&img, &m);
            let f = std::fs::File::open(m.join("edge")).unwrap();
            assert_eq!(f.metadata().unwrap().len(), max, "{opts:?}");
            let mut tail = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, max - 8).unwrap();
            assert_eq!(tail, [0, 0, 0, 0, 0x5a, 0x5a, 0x5a, 0x5a], "{opts:?}");
        }
        std::fs::remove_file(&img).unwrap();
    }
}
