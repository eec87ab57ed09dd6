//! Filesystem mode (`--fs`) through the real kernel FUSE: the tree served
//! from the stack's ext4 equals what the kernel's own ext4 shows on a loop
//! mount of the same disk, attribute for attribute.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Flatten the stack to a sparse raw image (in-process) and loop-mount it.
fn loop_mount_flat(layers: &[std::path::PathBuf], dir: &Path) -> KernelMount {
    let img = dir.join("flat.img");
    blockdev::Stack::open_read_only(layers, None)
        .unwrap()
        .write_raw_image(&img)
        .unwrap();
    KernelMount::loop_mount(&img, &dir.join("loop"), "ro")
}

#[test]
fn fs_mode_equals_the_kernel_ext4_on_a_converted_image() {
    let t = tempfile::tempdir().unwrap();
    // Hard links, xattrs (user, security.capability), devices, fifos,
    // symlinks, whiteouts and opaque directories across four layers.
    let layout = converted_image("testset", &t.path().join("img"), "layers", "v1");
    let src = format!("oci:{}:v1_obd", layout.display());
    let f = Fuse::background(&["--fs".as_ref(), src.as_ref()], &t.path().join("mp"));
    let layers = obdfuse::oci::layer_blobs(&layout, Some("v1_obd")).unwrap();
    let m = loop_mount_flat(&layers, t.path());

    let fuse_tree = scan(&f.mp);
    assert_same_tree(&fuse_tree, &scan(&m.mp));
    assert_same_tree(&fuse_tree, &reference_tree(&layout, "v1"));
    assert_same_stats(&stat_tree(&f.mp), &stat_tree(&m.mp));

    // Read-only, errno answers.
    let e = std::fs::write(f.mp.join("not-in-the-image"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::metadata(f.mp.join("no/such")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let st = nix::sys::statvfs::statvfs(&f.mp).unwrap();
    let want = nix::sys::statvfs::statvfs(&m.mp).unwrap();
    assert_eq!(st.block_size(), want.block_size());
    assert_eq!(st.files(), want.files());
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    m.unmount();
    f.unmount();
}

#[test]
fn fs_mode_serves_the_fixture_stack_and_tar_reads_it() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mut args: Vec<&std::ffi::OsStr> = vec!["--fs".as_ref()];
    args.extend(layers.iter().map(|p| p.as_os_str()));
    let f = Fuse::background(&args, &t.path().join("mp"));
    let want = t.path().join("want");
    testutil::gnu_extract(&[&fixtures().join("input.tar")], &want);
    let d = testutil::diff_trees(&testutil::tree(&f.mp), &testutil::tree(&want), |p| {
        p.starts_with("lost+found")
    });
    assert!(d.is_empty(), "{}", d.join("\n"));
    // GNU tar reads the whole tree through the mount.
    run_ok(
        Command::new(tool("tar"))
            .args(["-cf", "/dev/null", "-C"])
            .arg(&f.mp)
            .arg("usr"),
    );
    f.unmount();
}

#[test]
fn fs_mode_refuses_a_disk_without_a_filesystem() {
    let t = tempfile::tempdir().unwrap();
    let (data, index, blob) = (
        t.path().join("data"),
        t.path().join("index"),
        t.path().join("empty.blob"),
    );
    run_ok(
        Command::new(workspace_bin("overlaybd-create"))
            .arg("-s")
            .arg(&data)
            .arg(&index)
            .arg("1"),
    );
    run_ok(
        Command::new(workspace_bin("overlaybd-commit"))
            .arg(&data)
            .arg(&index)
            .arg(&blob),
    );
    let mp = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let o = Command::new(fuse_bin())
        .args(["mount", "--fs"])
        .arg(&blob)
        .arg(&mp)
        .output()
        .unwrap();
    let e = err_text(&o);
    assert!(e.contains("neither ext4 nor EROFS"), "{e}");
    assert!(!is_mounted(&mp));
}
