//! Block mode through the real kernel FUSE: the exported disk is an ext4
//! that a loop mount and fuse2fs read, writable sessions commit with
//! overlaybd-commit, and the disk's bytes equal the stack's.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;

/// The reference fixture's files (input.tar extracted by GNU tar).
fn input_tar_tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, testutil::Node> {
    let want = dir.join("want");
    testutil::gnu_extract(&[&fixtures().join("input.tar")], &want);
    testutil::tree(&want)
}

#[test]
fn loop_mount_of_the_disk_holds_the_layer_files() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    let f = Fuse::background(&args, &t.path().join("mp"));
    assert!(f.ready.contains("read-only"), "{}", f.ready);
    let md = std::fs::metadata(f.disk()).unwrap();
    assert_eq!(md.len(), 64 << 30);
    // Read-only: opening for writing is refused with EROFS.
    let e = File::options().write(true).open(f.disk()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // e2fsck reads the whole metadata through FUSE.
    testutil::e2fsck(&f.disk()).unwrap();

    let m = KernelMount::loop_mount(&f.disk(), &t.path().join("loop"), "ro");
    let got = testutil::tree(&m.mp);
    let want = input_tar_tree(t.path());
    let d = testutil::diff_trees(&got, &want, |p| p.starts_with("lost+found"));
    assert!(d.is_empty(), "{}", d.join("\n"));
    m.unmount();
    f.unmount();
}

#[test]
fn disk_bytes_equal_the_stack_at_odd_offsets() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let stack = blockdev::Stack::open_read_only(&layers, None).unwrap();
    let args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    let f = Fuse::background(&args, &t.path().join("mp"));
    let disk = File::open(f.disk()).unwrap();
    use blockdev::BlockDevice;
    // Superblock, group descriptors, somewhere inside the data, unaligned
    // ranges, and the very end of the disk.
    let size = stack.size();
    for (off, len) in [
        (0u64, 8192usize),
        (1024 + 7, 3000),
        (4096 * 1000 + 511, 300_000),
        (33 << 20, 1 << 20),
        (size - 4096, 4096),
        (size - 100, 100),
    ] {
        let mut a = vec![0u8; len];
        let mut b = vec![1u8; len];
        stack.read_at(&mut a, off).unwrap();
        disk.read_exact_at(&mut b, off).unwrap();
        assert!(a == b, "bytes differ at {off}+{len}");
    }
    // Reading at the end returns 0 bytes, not an error.
    let mut buf = [0u8; 16];
    assert_eq!(disk.read_at(&mut buf, size).unwrap(), 0);
    drop(disk);
    f.unmount();
}

#[test]
fn fuse2fs_reads_the_disk_without_a_loop_device() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    let f = Fuse::background(&args, &t.path().join("mp"));
    let m = KernelMount::fuse2fs(&f.disk(), &t.path().join("f2"));
    let got = testutil::tree(&m.mp);
    let want = input_tar_tree(t.path());
    let d = testutil::diff_trees(&got, &want, |p| p.starts_with("lost+found"));
    assert!(d.is_empty(), "{}", d.join("\n"));
    m.unmount();
    f.unmount();
}

#[test]
fn converted_oci_image_mounts_by_tag() {
    let t = tempfile::tempdir().unwrap();
    let layout = converted_image("sample", &t.path().join("img"), "", "latest");
    let src = format!("oci:{}:latest_obd", layout.display());
    let f = Fuse::background(&[src.as_ref()], &t.path().join("mp"));
    assert!(f.ready.contains("layers"), "{}", f.ready);
    let m = KernelMount::loop_mount(&f.disk(), &t.path().join("loop"), "ro");
    assert_same_tree(&scan(&m.mp), &reference_tree(&layout, "latest"));
    m.unmount();
    f.unmount();

    // The source image (not converted) is refused with a clear message.
    let o = Command::new(fuse_bin())
        .arg("mount")
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(t.path().join("mp"))
        .output()
        .unwrap();
    let e = err_text(&o);
    assert!(e.contains("not an overlaybd image"), "{e}");
    assert!(!is_mounted(&t.path().join("mp")));
}

#[test]
fn writable_session_is_committed_and_read_back() {
    let t = tempfile::tempdir().unwrap();
    let (data, index) = sparse_upper(t.path(), 64);
    let layers = fixture_layers();
    let mut args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    let mut f = Fuse::foreground(&args, &t.path().join("mp"));
    assert!(f.ready.contains("writable"), "{}", f.ready);

    // Byte-level: write, punch a hole (unaligned edges), zero a range, fsync.
    let scratch = (64u64 << 30) - (8 << 20);
    {
        let mut disk = File::options()
            .read(true)
            .write(true)
            .open(f.disk())
            .unwrap();
        let blocks = |d: &File| std::os::unix::fs::MetadataExt::blocks(&d.metadata().unwrap());
        let before = blocks(&disk);
        disk.seek(SeekFrom::Start(scratch)).unwrap();
        disk.write_all(&vec![0xabu8; 1 << 20]).unwrap();
        disk.sync_all().unwrap();
        // du follows what the upper now maps.
        assert_eq!(blocks(&disk), before + (1 << 20) / 512);
        run_ok(
            Command::new(tool("fallocate"))
                .args(["--punch-hole", "--keep-size", "-o"])
                .arg((scratch + 1000).to_string())
                .args(["-l", "20000"])
                .arg(f.disk()),
        );
        run_ok(
            Command::new(tool("fallocate"))
                .args(["--zero-range", "--keep-size", "-o"])
                .arg((scratch + 500_000).to_string())
                .args(["-l", "4096"])
                .arg(f.disk()),
        );
        let mut back = vec![0u8; 1 << 20];
        disk.seek(SeekFrom::Start(scratch)).unwrap();
        disk.read_exact(&mut back).unwrap();
        let mut want = vec![0xabu8; 1 << 20];
        want[1000..21000].fill(0);
        want[500_000..504_096].fill(0);
        assert!(
            back == want,
            "punched/zeroed ranges do not read back as zeros"
        );
        // The disk cannot grow.
        let e = disk.set_len(1).unwrap_err();
        assert!(e.raw_os_error().is_some(), "{e}");
    }

    // Filesystem-level: change files through a loop mount.
    let lp = t.path().join("loop");
    let m = KernelMount::loop_mount(&f.disk(), &lp, "rw");
    std::fs::write(lp.join("hello.txt"), b"written through overlaybd-fuse\n").unwrap();
    std::fs::remove_dir_all(lp.join("usr/share/doc/git")).unwrap();
    m.unmount();
    f.unmount();
    let o = f.wait();
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("upper layer flushed"));

    // Seal the upper as upstream's tools would and read the result back.
    let blob = t.path().join("layer.blob");
    run_ok(
        Command::new(workspace_bin("overlaybd-commit"))
            .args(["-z", "-t"])
            .arg(&data)
            .arg(&index)
            .arg(&blob),
    );
    let mut all: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    all.push(blob.as_os_str());
    let f2 = Fuse::background(&all, &t.path().join("mp2"));
    testutil::e2fsck(&f2.disk()).unwrap();
    let m = KernelMount::loop_mount(&f2.disk(), &t.path().join("loop2"), "ro");
    assert_eq!(
        std::fs::read(m.mp.join("hello.txt")).unwrap(),
        b"written through overlaybd-fuse\n"
    );
    let got = testutil::tree(&m.mp);
    let want = input_tar_tree(t.path());
    let d = testutil::diff_trees(&got, &want, |p| {
        p.starts_with("lost+found")
            || p == "hello.txt"
            || p == "usr/share/doc" // its mtime changed with the removal
            || p.starts_with("usr/share/doc/git")
    });
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert!(!m.mp.join("usr/share/doc/git").exists());
    let mut sealed = vec![0u8; 4096];
    File::open(f2.disk())
        .unwrap()
        .read_exact_at(&mut sealed, scratch + 1000)
        .unwrap();
    assert!(sealed.iter().all(|&b| b == 0));
    m.unmount();
    f2.unmount();
}

/// A hole punched over blocks a lower layer holds data in reads as zeros
/// after the upper is reopened (and after a commit), as it did in the session:
/// a loop device turns the kernel's write-zeroes into a punch-hole, and ext4
/// zeroes parts of unwritten extents that way, so the lower layer's bytes
/// coming back would be data in files that should read as zeros.
#[test]
fn a_punched_hole_over_lower_data_stays_zeros_after_remount() {
    let t = tempfile::tempdir().unwrap();
    let (data, index) = sparse_upper(t.path(), 64);
    let layers = fixture_layers();
    let mut args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    // The first backup superblock and group descriptors (group 1): data in
    // the base layer. Whole blocks, and an unaligned range around them.
    let (at, len) = (128u64 << 20, 16384u64);
    let read = |disk: &std::path::Path| {
        let mut b = vec![0u8; 3 * len as usize];
        File::open(disk)
            .unwrap()
            .read_exact_at(&mut b, at - len)
            .unwrap();
        b
    };
    let f = Fuse::background(&args, &t.path().join("mp"));
    let before = read(&f.disk());
    assert!(before[len as usize..].iter().any(|&b| b != 0));
    for (off, l) in [(at, len), (at + len + 100, len - 200)] {
        run_ok(
            Command::new(tool("fallocate"))
                .args(["--punch-hole", "--keep-size", "-o"])
                .arg(off.to_string())
                .arg("-l")
                .arg(l.to_string())
                .arg(f.disk()),
        );
    }
    let mut want = before.clone();
    want[len as usize..2 * len as usize].fill(0);
    want[2 * len as usize + 100..3 * len as usize - 100].fill(0);
    assert!(
        read(&f.disk()) == want,
        "punched ranges do not read as zeros"
    );
    f.unmount();
    let f = Fuse::background(&args, &t.path().join("mp"));
    assert!(
        read(&f.disk()) == want,
        "punched ranges read as zeros only until the upper was reopened"
    );
    f.unmount();
}

#[test]
fn seek_data_and_hole_follow_the_allocation_map() {
    use nix::unistd::{lseek, Whence};
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let stack = blockdev::Stack::open_read_only(&layers, None).unwrap();
    use blockdev::BlockDevice;
    let size = stack.size();
    // Data ranges of the stack, merged.
    let mut want: Vec<(u64, u64)> = Vec::new();
    for (o, l, data) in stack.allocation(0, size) {
        if data {
            match want.last_mut() {
                Some(w) if w.1 == o => w.1 = o + l,
                _ => want.push((o, o + l)),
            }
        }
    }
    assert!(want.len() > 1);
    let args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    let f = Fuse::background(&args, &t.path().join("mp"));
    let disk = File::open(f.disk()).unwrap();
    // du tells what the layers hold: st_blocks counts the data ranges,
    // st_size stays the virtual size.
    let st = std::os::unix::fs::MetadataExt::blocks(&disk.metadata().unwrap());
    let mapped: u64 = want.iter().map(|(a, b)| b - a).sum();
    assert!(mapped < size / 2, "{mapped} of {size}");
    assert_eq!(st, mapped.div_ceil(512));
    assert_eq!(disk.metadata().unwrap().len(), size);
    let mut got = Vec::new();
    let mut pos = 0i64;
    loop {
        let d = match lseek(&disk, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {pos}: {e}"),
        };
        let h = lseek(&disk, d, Whence::SeekHole).unwrap();
        assert!(h > d);
        got.push((d as u64, h as u64));
        pos = h;
        if h as u64 >= size {
            break;
        }
    }
    assert_eq!(got, want);
    // The data ranges hold everything: a sparse copy of just them is the
    // same ext4 (e2fsck clean).
    let copy = t.path().join("copy.raw");
    let out = File::create(&copy).unwrap();
    out.set_len(size).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for (a, b) in got {
        let mut p = a;
        while p < b {
            let n = ((b - p) as usize).min(buf.len());
            disk.read_exact_at(&mut buf[..n], p).unwrap();
            out.write_all_at(&buf[..n], p).unwrap();
            p += n as u64;
        }
    }
    drop(out);
    testutil::e2fsck(&copy).unwrap();
    drop(disk);
    f.unmount();
}
