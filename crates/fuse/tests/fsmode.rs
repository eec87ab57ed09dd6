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
    let layers = obdimage::layout::LayoutStore::open(&layout)
        .unwrap()
        .layer_files(Some("v1_obd"))
        .unwrap();
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
    assert_eq!(
        (st.blocks(), st.blocks_free(), st.files_free()),
        (want.blocks(), want.blocks_free(), want.files_free())
    );
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
    let (data, index) = sparse_upper(t.path(), 1);
    let blob = t.path().join("empty.blob");
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
    // The likely cause, and where to look.
    assert!(e.contains("reads as zeros"), "{e}");
    assert!(
        e.contains("missing its base layer") && e.contains("overlaybd-create --mkfs"),
        "{e}"
    );
    assert!(!is_mounted(&mp));
}

/// Everything a tree says, walking it through the `FileTree` calls the FUSE
/// server makes (attributes, entries, lookups, link targets, xattrs, the
/// first bytes of each file).
fn walk<T: obdfuse::tree::FileTree>(t: &T) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(t.root(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        let list = t.dir(dir).unwrap();
        for e in &list.entries {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let p = format!("{path}/{name}");
            assert_eq!(t.lookup(dir, &e.name).unwrap(), e.ino, "{p}");
            let a = t.attr(e.ino).unwrap();
            let mut line = format!("{p} {a:?} {:?}", t.xattrs(e.ino).unwrap());
            match a.kind {
                fuser::FileType::Directory => stack.push((e.ino, p)),
                fuser::FileType::Symlink => {
                    line += &format!(" -> {:?}", t.read_link(e.ino).unwrap())
                }
                fuser::FileType::RegularFile => {
                    let d = t.read(e.ino, 0, 4096).unwrap();
                    line += &format!(" {}", testutil::fnv(&d));
                }
                _ => {}
            }
            out.push(line);
        }
    }
    out
}

#[test]
fn a_small_metadata_cache_stays_within_its_budget() {
    let stack: std::sync::Arc<dyn blockdev::BlockDevice> =
        std::sync::Arc::new(blockdev::Stack::open_read_only(&fixture_layers(), None).unwrap());
    let big = obdfuse::ext4::Ext4Tree::open(stack.clone()).unwrap();
    let want = walk(&big);
    assert!(want.len() > 700, "{}", want.len());
    // More than the largest single entry (a directory of 600 names).
    let budget = 64 << 10;
    let small = obdfuse::ext4::Ext4Tree::open_with_cache(stack, budget).unwrap();
    // Twice: the second walk reads again what was evicted.
    for _ in 0..2 {
        assert_eq!(walk(&small), want);
    }
    let s = small.cache_stats();
    assert!(s.peak_weight <= budget as u64, "{s:?}");
    assert!(s.evicted > 1000, "{s:?}");
    let b = big.cache_stats();
    assert!(b.evicted == 0 && b.peak_weight > 4 * budget as u64, "{b:?}");
    // What the kernel forgets goes.
    let before = small.cache_stats().entries;
    use obdfuse::tree::FileTree;
    for ino in 1..10_000u64 {
        small.forget(ino);
    }
    let after = small.cache_stats();
    assert!(
        before > 0 && after.entries == 0 && after.weight == 0,
        "{after:?}"
    );
}

/// `ls -lR` through a mount with a tiny metadata cache: the same listing
/// every time, the cache never above its budget, and inodes the kernel
/// drops (drop_caches) are forgotten by the daemon too.
#[test]
fn ls_lr_through_a_tiny_cache_is_bounded_and_forgets() {
    let t = tempfile::tempdir().unwrap();
    let log = t.path().join("log");
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    run_ok(
        Command::new(fuse_bin())
            .env("OVERLAYBD_LOG", "info")
            .args([
                "mount",
                "--background",
                "--fs",
                "--meta-cache",
                "64K",
                "--log",
            ])
            .arg(&log)
            .args(&layers)
            .arg(&mp),
    );
    let f = Fuse {
        mp: mp.clone(),
        child: None,
        ready: String::new(),
    };
    let ls = || run_ok(Command::new(tool("ls")).arg("-lRn").arg(&f.mp)).stdout;
    let first = ls();
    assert!(first.len() > 20_000);
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    assert!(ls() == first);
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    f.unmount();
    // The daemon logs its cache counters when the session ends.
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("metadata cache:") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let line = text
        .lines()
        .find(|l| l.contains("metadata cache:"))
        .unwrap_or_else(|| panic!("no cache line in the log:\n{text}"));
    let num = |after: &str| -> u64 {
        let i = line
            .find(after)
            .unwrap_or_else(|| panic!("{after} in {line}"))
            + after.len();
        line[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(num("(peak ") <= 64 << 10, "{line}");
    assert_eq!(num(" of "), 64 << 10, "{line}");
    assert!(num("), ") > 0, "nothing evicted: {line}");
    assert!(num("evicted, ") > 0, "nothing forgotten: {line}");
}

/// `lseek(SEEK_DATA / SEEK_HOLE)` on a sparse file of the image: holes are
/// the blocks no ext4 extent maps and the blocks of an extent that no layer
/// of the stack maps (they read as zeros); `cp --sparse=always` keeps them.
#[test]
fn fs_mode_seek_data_and_hole_find_the_holes_of_a_sparse_file() {
    use nix::unistd::{lseek, Whence};
    use std::os::unix::fs::{FileExt, MetadataExt};

    const K: u64 = 1024;
    let t = tempfile::tempdir().unwrap();
    let (data, index) = sparse_upper(t.path(), 64);
    // Data at [0, 64K) and [512K, 768K) of a 2 MiB file.
    let src = t.path().join("src");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(2048 * K).unwrap();
    f.write_all_at(&vec![0xab; 64 * K as usize], 0).unwrap();
    f.write_all_at(&vec![0xcd; 256 * K as usize], 512 * K)
        .unwrap();
    drop(f);

    let layers = fixture_layers();
    let mut args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    let b = Fuse::background(&args, &t.path().join("blk"));
    let disk = b.disk();
    let cmd = format!("write {} /sparse", src.display());
    run_ok(
        Command::new(tool("debugfs"))
            .args(["-w", "-R", &cmd])
            .arg(&disk),
    );
    let mut sb = [0u8; 4];
    let d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    d.read_exact_at(&mut sb, 1024 + 24).unwrap();
    let bs = 1024u64 << u32::from_le_bytes(sb);
    // Unmap the file's blocks of [640K, 704K) from the stack (punch the
    // disk there): ext4 still maps them, they read as zeros.
    for lblk in (640 * K / bs)..(704 * K / bs) {
        let o = run_ok(
            Command::new(tool("debugfs"))
                .args(["-R", &format!("bmap /sparse {lblk}")])
                .arg(&disk),
        );
        let pblk: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(pblk > 0);
        nix::fcntl::fallocate(
            &d,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (pblk * bs) as i64,
            bs as i64,
        )
        .unwrap();
    }
    drop(d);
    b.unmount();

    let mut fs_args = vec!["--fs".as_ref()];
    fs_args.extend(&args);
    let f = Fuse::background(&fs_args, &t.path().join("fs"));
    let p = f.mp.join("sparse");
    let file = std::fs::File::open(&p).unwrap();
    let seek = |o: u64, w: Whence| lseek(&file, o as i64, w).map(|r| r as u64);
    let (data, hole) = (Whence::SeekData, Whence::SeekHole);
    assert_eq!(seek(0, data), Ok(0));
    assert_eq!(seek(0, hole), Ok(64 * K));
    assert_eq!(seek(100, hole), Ok(64 * K));
    assert_eq!(seek(64 * K, data), Ok(512 * K));
    assert_eq!(seek(70 * K, hole), Ok(70 * K));
    assert_eq!(seek(512 * K, hole), Ok(640 * K));
    assert_eq!(seek(640 * K, data), Ok(704 * K));
    assert_eq!(seek(650 * K, hole), Ok(650 * K));
    assert_eq!(seek(704 * K, hole), Ok(768 * K));
    assert_eq!(seek(768 * K, data), Err(nix::errno::Errno::ENXIO));
    assert_eq!(seek(2000 * K, hole), Ok(2000 * K));
    assert_eq!(seek(2048 * K, hole), Err(nix::errno::Errno::ENXIO));
    // What reads back agrees.
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len() as u64, 2048 * K);
    assert!(bytes[..64 * K as usize].iter().all(|&x| x == 0xab));
    assert!(bytes[64 * K as usize..512 * K as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(bytes[512 * K as usize..640 * K as usize]
        .iter()
        .all(|&x| x == 0xcd));
    assert!(bytes[640 * K as usize..704 * K as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(bytes[704 * K as usize..768 * K as usize]
        .iter()
        .all(|&x| x == 0xcd));
    // cp copies it sparse.
    let copy = t.path().join("copy");
    run_ok(
        Command::new(tool("cp"))
            .arg("--sparse=always")
            .arg(&p)
            .arg(&copy),
    );
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    assert!(
        std::fs::metadata(&copy).unwrap().blocks() * 512 <= 256 * K,
        "not sparse"
    );
    drop(file);
    f.unmount();
}

/// POSIX ACLs are served (the FUSE connection says it handles them): the
/// kernel answers `getxattr` of `system.posix_acl_*` only then, and checks
/// permissions against them only then. Without it, listxattr named the ACL
/// and getxattr failed with EOPNOTSUPP.
#[test]
fn fs_mode_serves_posix_acls() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let t = tempfile::tempdir().unwrap();
    let (data, index) = sparse_upper(t.path(), 64);
    // user::rw-, user:1234:r--, group::r--, mask::r--, other::---
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1234),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let (src, value) = (t.path().join("src"), t.path().join("acl"));
    std::fs::write(&src, b"acl'd").unwrap();
    std::fs::write(&value, &acl).unwrap();

    let layers = fixture_layers();
    let mut args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    let b = Fuse::background(&args, &t.path().join("blk"));
    let disk = b.disk();
    for cmd in [
        format!("write {} /acl", src.display()),
        format!("ea_set -f {} /acl system.posix_acl_access", value.display()),
        format!("ea_set -f {} / system.posix_acl_default", value.display()),
        "sif /acl mode 0100640".to_string(),
    ] {
        run_ok(
            Command::new(tool("debugfs"))
                .args(["-w", "-R", &cmd])
                .arg(&disk),
        );
    }
    b.unmount();

    let mut fs_args = vec!["--fs".as_ref(), "--allow-other".as_ref()];
    fs_args.extend(&args);
    let f = Fuse::background(&fs_args, &t.path().join("fs"));
    let get = |p: &Path, name: &str| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated and live across the call;
        // the kernel writes at most `buf.len()` bytes into `buf`.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf.truncate(r as usize);
        Ok(buf)
    };
    let file = f.mp.join("acl");
    assert_eq!(std::fs::read(&file).unwrap(), b"acl'd");
    assert_eq!(
        get(&file, "system.posix_acl_access").unwrap(),
        acl,
        "the access ACL"
    );
    assert_eq!(
        get(&f.mp, "system.posix_acl_default").unwrap(),
        acl,
        "the root's default ACL"
    );
    let e = get(&f.mp, "system.posix_acl_access").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "{e}");
    // The kernel checks permissions against the ACL: user 1234 may read the
    // file (0640, owner root: the mode alone would refuse it), user 1235 not.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cat_as = |uid: u32| {
        Command::new(tool("cat"))
            .arg(&file)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let o = cat_as(1234);
    assert!(
        o.status.success(),
        "user 1234 is granted read by the ACL: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout, b"acl'd");
    let o = cat_as(1235);
    assert!(!o.status.success(), "user 1235 has no entry: other::---");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    f.unmount();
}
