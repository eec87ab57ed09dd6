//! Filesystem mode (`--fs`) over a damaged filesystem: a damaged inode
//! fails alone, with `EIO`, and its name is still listed (`ENOENT` would
//! tell the client that the name does not exist, and glibc ends a listing
//! at an `ENOENT` from getdents).

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use obdfuse::tree::FileTree;

use common::*;

/// The directory damaged, in the fixture stack.
const DIR: &str = "usr/share/doc/python3";

/// The names in `dir`, through readdir.
fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// `debugfs -w -R CMD disk`.
fn debugfs(disk: &Path, cmd: &str) {
    run_ok(
        Command::new(tool("debugfs"))
            .args(["-w", "-R", cmd])
            .arg(disk),
    );
}

#[test]
fn a_damaged_inode_fails_alone_with_eio_and_its_name_is_listed() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let (data, index) = sparse_upper(t.path(), 64);
    let mut args: Vec<&OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    let mut fs_args = vec!["--fs".as_ref()];
    fs_args.extend(&args);
    let want = {
        let f = Fuse::background(&fs_args, &t.path().join("clean"));
        let n = names(&f.mp.join(DIR));
        f.unmount();
        n
    };
    for n in [
        "README.Debian",
        "index.html",
        "_static",
        "changelog.Debian.gz",
    ] {
        assert!(want.contains(n), "{n} not in {want:?}");
    }

    // Damage the ext4 through block mode, into the upper layer: a file not
    // in use, a symlink and a directory of no valid file type, a file
    // whose extent points past the end of the disk.
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    let f = Fuse::background(&args, &t.path().join("blk"));
    let d = format!("/{DIR}");
    debugfs(&f.disk(), &format!("sif {d}/README.Debian links_count 0"));
    debugfs(&f.disk(), &format!("sif {d}/index.html mode 0170777"));
    debugfs(&f.disk(), &format!("sif {d}/_static mode 0170755"));
    debugfs(
        &f.disk(),
        &format!("sif {d}/changelog.Debian.gz block[5] 0xF0000000"),
    );
    // A size no ext4 file can have (a flipped bit): it was served, and
    // reading the file went on with zeros without end.
    debugfs(
        &f.disk(),
        &format!("sif {d}/changelog.Debian.amd64.gz size 0x800000000000000"),
    );
    f.unmount();

    let log = t.path().join("log");
    let mut a = vec!["--fs".as_ref(), "--log".as_ref(), log.as_os_str()];
    a.extend(&args);
    let f = Fuse::background(&a, &t.path().join("fs"));
    let dir = f.mp.join(DIR);
    // readdirplus (the first listing), then again once the kernel dropped
    // what it cached.
    assert_eq!(names(&dir), want);
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert_eq!(names(&dir), want);

    // Every damaged name fails with EIO, however it is reached; the rest
    // of the directory is whole.
    for n in [
        "README.Debian",
        "index.html",
        "_static",
        "changelog.Debian.amd64.gz",
    ] {
        let p = dir.join(n);
        assert_eq!(
            errno_of(std::fs::symlink_metadata(&p)),
            Some(libc::EIO),
            "{n}"
        );
        assert_eq!(errno_of(std::fs::File::open(&p)), Some(libc::EIO), "{n}");
        assert_eq!(errno_of(std::fs::read_link(&p)), Some(libc::EIO), "{n}");
        assert_eq!(errno_of(std::fs::read_dir(&p)), Some(libc::EIO), "{n}");
    }
    let e = std::fs::read(dir.join("changelog.Debian.gz")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(std::fs::read(dir.join("copyright")).unwrap().len(), 16122);
    assert_eq!(
        errno_of(std::fs::symlink_metadata(dir.join("no-such-name"))),
        Some(libc::ENOENT)
    );

    // `ls -la` lists every name, says which it cannot access, and fails.
    let o = Command::new(tool("ls"))
        .arg("-la")
        .arg(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{out}");
    for n in &want {
        assert!(out.contains(n.as_str()), "{n} missing:\n{out}");
    }
    assert_eq!(err.matches("Input/output error").count(), 4, "{err}");
    f.unmount();

    // One warning per damaged inode, naming what is wrong.
    let text = std::fs::read_to_string(&log).unwrap();
    for (what, times) in [
        ("inode 700 is not in use", 1),
        ("inode 719 has file type 170777", 1),
        ("inode 701 has file type 170755", 1),
    ] {
        assert_eq!(text.matches(what).count(), times, "{what}:\n{text}");
    }
    assert!(text.contains("beyond the device size"), "{text}");
    assert_eq!(
        text.matches("has size 576460752303423488, more than an ext4 file can hold")
            .count(),
        1,
        "{text}"
    );
}

/// The EROFS tree over an image with one inode of no valid file type.
#[test]
fn a_damaged_erofs_inode_fails_alone_with_eio() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for n in ["a", "b", "c"] {
        std::fs::write(src.join(n), n.repeat(100)).unwrap();
    }
    std::os::unix::fs::symlink("a", src.join("link")).unwrap();
    let img = t.path().join("img");
    // No superblock checksum: it covers the inodes of so small an image.
    run_ok(
        Command::new(tool("mkfs.erofs"))
            .arg("-Enosbcrc")
            .arg(&img)
            .arg(&src),
    );
    let bytes = std::fs::read(&img).unwrap();
    let dev = |b: &[u8]| -> Arc<dyn blockdev::BlockDevice> {
        let d = blockdev::MemDevice::new(b.len());
        blockdev::BlockDevice::write_at(&d, b, 0).unwrap();
        Arc::new(d)
    };
    let clean = obdfuse::erofs::ErofsTree::open(dev(&bytes), 1 << 20).unwrap();
    let root = clean.root();
    let nid = clean.lookup(root, b"b").unwrap();
    let want: Vec<Vec<u8>> = clean
        .dir(root)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.name.clone())
        .collect();
    // i_mode is at byte 4 of both inode layouts.
    let sb = clean.reader().superblock();
    let at = ((sb.meta_blkaddr as u64) << sb.blkszbits) + nid * 32 + 4;
    let mut bad = bytes.clone();
    bad[at as usize..at as usize + 2].copy_from_slice(&0o170644u16.to_le_bytes());

    let tree = obdfuse::erofs::ErofsTree::open(dev(&bad), 1 << 20).unwrap();
    let listed: Vec<Vec<u8>> = tree
        .dir(root)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(listed, want);
    let eio = Err(fuser::Errno::EIO);
    assert_eq!(tree.lookup(root, b"b").map(|_| ()), eio);
    assert_eq!(tree.attr(nid).map(|_| ()), eio);
    assert_eq!(tree.read(nid, 0, 10).map(|_| ()), eio);
    assert_eq!(tree.read_link(nid).map(|_| ()), eio);
    assert_eq!(tree.xattrs(nid).map(|_| ()), eio);
    assert!(matches!(tree.entry_attr(nid), Ok(None)));
    // The rest is whole; a name that is not there is ENOENT.
    let a = tree.lookup(root, b"a").unwrap();
    assert_eq!(tree.read(a, 0, 1000).unwrap(), b"a".repeat(100));
    assert!(matches!(tree.entry_attr(a), Ok(Some(_))));
    assert_eq!(
        tree.lookup(root, b"no-such-name").map(|_| ()),
        Err(fuser::Errno::ENOENT)
    );
}
