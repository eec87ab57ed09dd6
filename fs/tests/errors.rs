//! Error text: every failure is one line whose causes appear once each (an
//! error's Display never repeats what its `source()` returns), and paths
//! from the tar are shortened however long they are.

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, MemDevice};
use common::*;
use testutil::assert_clean_chain;

fn apply(dev: &Arc<dyn BlockDevice>, r: impl std::io::Read) -> obdfs::Error {
    obdfs::apply_tar(dev.clone(), r, obdfs::ApplyOptions::default()).unwrap_err()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

fn fresh() -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    dev
}

/// `tar` applied by the upstream-compatible engine (turboOCI-apply) to a
/// fresh 64 MiB ext4 of its own making.
fn photon(tar: Vec<u8>) -> obdfs::Result<obdfs::ApplyStats> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    obdfs::photon::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    obdfs::photon::apply_tar(dev, &tar[..], obdfs::ApplyOptions::default())
}

/// A tar of one empty file at `deep` followed by a 300-byte name, too long
/// for ext4 (the path in a PAX header).
fn long_name_tar(deep: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let path = format!("{deep}{}", "n".repeat(300));
    b.append_pax_extensions([("path", path.as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o644);
    b.append_data(&mut h, "placeholder", &b""[..]).unwrap();
    b.into_inner().unwrap()
}

/// A tar of one hard link `hl` to `target` (in a PAX header).
fn hard_link_tar(target: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("linkpath", target.as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_data(&mut h, "hl", &b""[..]).unwrap();
    b.into_inner().unwrap()
}

/// A tar cut inside a file's data.
#[test]
fn truncated_stream_says_so_once() {
    let dev = fresh();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4000);
    h.set_mode(0o644);
    b.append_data(&mut h, "dir/file", &vec![1u8; 4000][..])
        .unwrap();
    let data = b.into_inner().unwrap();
    let e = apply(&dev, &data[..1000]);
    let chain = assert_clean_chain(&e);
    assert!(chain.starts_with("tar entry 'dir/file'"), "{chain}");
    assert_eq!(count(&chain, "unexpected end of the stream"), 1, "{chain}");
    assert_eq!(count(&chain, "malformed tar stream"), 1, "{chain}");
}

/// A reader that fails after `ok` bytes.
struct Failing {
    data: Vec<u8>,
    pos: usize,
    ok: usize,
}

impl std::io::Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.ok {
            return Err(std::io::Error::other("the network went away"));
        }
        let n = buf
            .len()
            .min(self.ok - self.pos)
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The stream's own read error (a decompressor, a socket).
#[test]
fn read_error_is_one_cause() {
    let dev = fresh();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(100_000);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &vec![1u8; 100_000][..]).unwrap();
    let data = b.into_inner().unwrap();
    let e = apply(
        &dev,
        Failing {
            data,
            pos: 0,
            ok: 10_000,
        },
    );
    let chain = assert_clean_chain(&e);
    assert_eq!(count(&chain, "the network went away"), 1, "{chain}");
    assert!(chain.contains("tar stream past byte 10000"), "{chain}");
}

/// A device that fails every write after the filesystem is made.
struct BrokenDisk(MemDevice, std::sync::atomic::AtomicBool);

impl BlockDevice for BrokenDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(blockdev::Error::io(
                "/dev/broken",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.0.trim(offset, len)
    }
}

/// The device's I/O error under a libext2fs failure: each layer once.
#[test]
fn device_error_is_one_cause() {
    let disk = Arc::new(BrokenDisk(
        MemDevice::new(64 << 20),
        std::sync::atomic::AtomicBool::new(false),
    ));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    disk.1.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(8 << 20);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &vec![1u8; 8 << 20][..]).unwrap();
    let data = b.into_inner().unwrap();
    let e = apply(&dev, &data[..]);
    let chain = assert_clean_chain(&e);
    assert_eq!(count(&chain, "/dev/broken"), 1, "{chain}");
    assert_eq!(count(&chain, "Input/output error"), 1, "{chain}");
}

/// A 100,000-level path (and link target) makes a short line.
#[test]
fn long_paths_are_shortened() {
    let dev = fresh();
    let deep = "d/".repeat(100_000);
    // The last component is too long for ext4: refused before any
    // directory is made.
    let e = apply(&dev, &long_name_tar(&deep)[..]);
    let chain = assert_clean_chain(&e);
    assert!(
        chain.len() < 600,
        "{} bytes: {}",
        chain.len(),
        &chain[..600]
    );
    assert!(chain.starts_with("tar entry 'd/d/"), "{chain}");
    assert!(chain.contains("nnnn'"), "the tail is kept: {chain}");
    assert!(chain.contains("300 bytes"), "{chain}");

    let e = apply(&dev, &hard_link_tar(&format!("{deep}t"))[..]);
    let chain = assert_clean_chain(&e);
    assert!(chain.len() < 600, "{} bytes", chain.len());
    assert!(chain.starts_with("tar entry 'hl'"), "{chain}");
}

/// A directory the tar does not declare (a missing parent, or one a symlink
/// on the path names) is refused like a last component when its name is over
/// 255 bytes: it was made with the length stored modulo 256, a zero-length
/// name that e2fsck reports and the kernel's ext4 fails the listing on.
#[test]
fn long_parent_names_are_refused() {
    let long = "p".repeat(256);
    let tar_of = |entries: &[(&str, tar::EntryType, &str)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut pax = vec![("path", path.as_bytes())];
            if !link.is_empty() {
                pax.push(("linkpath", link.as_bytes()));
            }
            b.append_pax_extensions(pax).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(0);
            b.append_data(&mut h, "placeholder", &b""[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    let below = format!("{long}/f");
    let through_link = format!("/{long}");
    for (what, tar) in [
        (
            "missing parent",
            tar_of(&[(below.as_str(), tar::EntryType::Regular, "")]),
        ),
        (
            "symlink target",
            tar_of(&[
                ("s", tar::EntryType::Symlink, through_link.as_str()),
                ("s/f", tar::EntryType::Regular, ""),
            ]),
        ),
    ] {
        let dev = fresh();
        let e = apply(&dev, &tar[..]);
        let chain = assert_clean_chain(&e);
        assert!(
            chain.contains("256 bytes long (ext4 allows 255)"),
            "{what}: {chain}"
        );
    }
    // 255 bytes are fine.
    let ok = format!("{}/f", "p".repeat(255));
    let dev = fresh();
    obdfs::apply_tar(
        dev.clone(),
        &tar_of(&[(ok.as_str(), tar::EntryType::Regular, "")])[..],
        obdfs::ApplyOptions::default(),
    )
    .unwrap();
}

/// Errors from a real image file on disk name it once.
#[test]
fn missing_image_is_one_cause() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev = mkfs_image(&img, 64 << 20);
    drop(dev);
    let e = match blockdev::RawFileDevice::open_rw(dir.path().join("nope")) {
        Err(e) => e,
        Ok(_) => panic!("opened a missing file"),
    };
    assert!(
        std::error::Error::source(&e).is_some(),
        "the I/O error is kept as the source"
    );
    let chain = assert_clean_chain(&e);
    assert_eq!(count(&chain, "nope"), 1, "{chain}");
    assert_eq!(count(&chain, "No such file"), 1, "{chain}");
}

/// The upstream-compatible engine (TurboOCI ext4) refuses what the native one
/// refuses instead of corrupting the filesystem: a hard link to a directory
/// (a second name for a directory, which e2fsck reports) and a name longer
/// than the 255 bytes a directory entry holds (it was cut to its length
/// modulo 256).
#[test]
fn photon_refuses_hard_links_to_directories_and_long_names() {
    let tar_of = |entries: &[(&str, tar::EntryType, &str)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_size(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            b.append_data(&mut h, path, &b""[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    // The whole chain of causes, as the tools print it.
    let text = |e: obdfs::Error| {
        let mut s = e.to_string();
        let mut c = std::error::Error::source(&e);
        while let Some(x) = c {
            s += &format!(": {x}");
            c = x.source();
        }
        s
    };
    let e = photon(tar_of(&[
        ("bin/", tar::EntryType::Directory, ""),
        ("etc/", tar::EntryType::Directory, ""),
        ("etc/hd", tar::EntryType::Link, "bin"),
    ]))
    .map_err(text)
    .unwrap_err();
    assert!(
        e.contains("etc/hd") && e.contains("hard link target '/bin' is a directory"),
        "{e}"
    );
    let long = format!("etc/{}", "a".repeat(300));
    let e = photon(tar_of(&[
        ("etc/", tar::EntryType::Directory, ""),
        (long.as_str(), tar::EntryType::Directory, ""),
    ]))
    .map_err(text)
    .unwrap_err();
    assert!(
        e.contains("a name is 300 bytes long (ext4 allows 255)"),
        "{e}"
    );
    // 255 bytes are fine.
    let ok = format!("etc/{}", "a".repeat(255));
    photon(tar_of(&[
        ("etc/", tar::EntryType::Directory, ""),
        (ok.as_str(), tar::EntryType::Directory, ""),
    ]))
    .unwrap();
}

/// The native engine refuses symlink targets symlink(2) refuses, with the
/// words the EROFS engine uses: empty, and longer than a block less one byte.
#[test]
fn bad_symlink_targets_are_refused() {
    let tar_of = |target_len: usize| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        if target_len == 0 {
            b.append_data(&mut h, "s", &b""[..]).unwrap();
        } else {
            b.append_link(&mut h, "s", "x".repeat(target_len)).unwrap();
        }
        b.into_inner().unwrap()
    };
    let e = assert_clean_chain(&apply(&fresh(), &tar_of(0)[..]));
    assert!(e.contains("symbolic link with an empty target"), "{e}");
    let e = assert_clean_chain(&apply(&fresh(), &tar_of(5000)[..]));
    assert!(
        e.contains("symbolic link target of 5000 bytes is too long (limit 4095)"),
        "{e}"
    );
    obdfs::apply_tar(fresh(), &tar_of(4095)[..], obdfs::ApplyOptions::default())
        .expect("a 4095-byte target");
}

/// The upstream-compatible engine (turboOCI-apply) names a symlink target
/// longer than ext4 takes (a block less one byte) and the entry, as the
/// native engine does, instead of libext2fs's bare "Invalid argument passed
/// to ext2 library"; the target is measured as upstream stores it, cleaned
/// (`y/` 2048 times is 4095 bytes then).
#[test]
fn photon_refuses_symlink_targets_longer_than_a_block() {
    let tar_of = |target: &str| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "a/", &b""[..]).unwrap();
        b.append_pax_extensions([("linkpath", target.as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_data(&mut h, "a/b", &b""[..]).unwrap();
        b.into_inner().unwrap()
    };
    let e = photon(tar_of(&"x".repeat(5000))).unwrap_err();
    let chain = assert_clean_chain(&e);
    assert_eq!(
        chain,
        "tar entry 'a/b': symbolic link target of 5000 bytes is too long (limit 4095)"
    );
    photon(tar_of(&"x".repeat(4095))).expect("a 4095-byte target");
    photon(tar_of(&"y/".repeat(2048))).expect("a target 4095 bytes long once cleaned");
}

/// The upstream-compatible engine (turboOCI-apply) shortens the paths it
/// quotes too: a 3,000-level path whose last name is too long for ext4,
/// and a hard link to such a path that does not exist, each make a short
/// line (they quoted the whole path: 200 KB at 100,000 levels, which blocks
/// a tool whose stderr pipe is read only once it exits).
#[test]
fn photon_long_paths_are_shortened() {
    // As many directories as the 64 MiB filesystem has inodes for.
    let deep = "d/".repeat(3_000);
    let chain = assert_clean_chain(&photon(long_name_tar(&deep)).unwrap_err());
    assert!(
        chain.len() < 600,
        "{} bytes: {}",
        chain.len(),
        &chain[..600]
    );
    assert!(
        chain.contains("a name is 300 bytes long (ext4 allows 255)"),
        "{chain}"
    );

    let chain = assert_clean_chain(&photon(hard_link_tar(&format!("{deep}t"))).unwrap_err());
    assert!(
        chain.len() < 600,
        "{} bytes: {}",
        chain.len(),
        &chain[..600]
    );
    assert!(
        chain.starts_with("tar entry 'hl'") && chain.contains("d/d/"),
        "{chain}"
    );
}

/// The upstream-compatible engine splits a full leaf of a hashed directory
/// when a name does not fit: a corrupt leaf whose entries stop 4 bytes short
/// of the block end (which the lookup before it accepts) is reported as a
/// corrupt directory, not read past the block (a panic).
#[test]
fn photon_refuses_to_split_a_corrupt_hashed_directory_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let dev: Arc<dyn BlockDevice> =
        Arc::new(blockdev::RawFileDevice::create(&img, 64 << 20).unwrap());
    obdfs::photon::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    let tar_of = |names: &[String]| {
        let mut b = tar::Builder::new(Vec::new());
        for n in names {
            let mut h = tar::Header::new_gnu();
            let kind = if n.ends_with('/') {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            };
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, n, &b""[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    // 30 names of 200 bytes need more than one block: /d becomes hashed
    // (block 0 the index root, the others leaves).
    let mut names = vec!["d/".to_string()];
    names.extend((0..30).map(|i| format!("d/{i:0200}")));
    obdfs::photon::apply_tar(
        dev.clone(),
        &tar_of(&names)[..],
        obdfs::ApplyOptions::default(),
    )
    .unwrap();
    let path = img.to_str().unwrap();
    let stat = run(testutil::tool("debugfs"), &["-R", "stat /d", path]);
    assert!(stat.contains("Flags: 0x81000"), "/d is not hashed:\n{stat}");
    // Every leaf: 341 entries of 12 bytes (4-byte names, no room left),
    // ending at byte 4092 instead of 4096.
    let mut b = vec![0u8; 4096];
    for i in 0..341 {
        let o = i * 12;
        b[o..o + 4].copy_from_slice(&11u32.to_le_bytes());
        b[o + 4..o + 6].copy_from_slice(&12u16.to_le_bytes());
        b[o + 6] = 4;
        b[o + 7] = 1;
        b[o + 8..o + 12].copy_from_slice(format!("n{i:03}").as_bytes());
    }
    let size: u64 = stat
        .split("Size: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("Size in debugfs stat");
    for lblk in 1..size / 4096 {
        let bmap = run(
            testutil::tool("debugfs"),
            &["-R", &format!("bmap /d {lblk}"), path],
        );
        let leaf: u64 = bmap
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bmap: {bmap}"));
        dev.write_at(&b, leaf * 4096).unwrap();
    }
    dev.flush().unwrap();
    let e = obdfs::photon::apply_tar(
        dev,
        &tar_of(&["d/new".to_string()])[..],
        obdfs::ApplyOptions::default(),
    )
    .unwrap_err();
    let e = assert_clean_chain(&e);
    assert!(
        e.contains("directory inode") && e.contains("corrupt"),
        "{e}"
    );
}

/// A base with inodes larger than the 1 KiB this crate handles (stock
/// mke2fs -I 2048) is refused when opened, naming the size, by both
/// engines (each inode read asserted the size: a panic).
#[test]
fn inodes_larger_than_1_kib_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(3);
    b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
    let t = b.into_inner().unwrap();
    for photon in [false, true] {
        let img = dir.path().join(format!("big-inodes-{photon}.img"));
        let dev = mke2fs_image(&img, 64 << 20, &["-t", "ext4", "-b", "4096", "-I", "2048"]);
        let r = if photon {
            obdfs::photon::apply_tar(dev, &t[..], obdfs::ApplyOptions::default())
        } else {
            obdfs::apply_tar(dev, &t[..], obdfs::ApplyOptions::default())
        };
        let e = assert_clean_chain(&r.unwrap_err());
        assert!(
            e.contains("inode size 2048") && e.contains("1024"),
            "photon {photon}: {e}"
        );
    }
}

/// The upstream-compatible engine on a 64 KiB-block base (stock mke2fs -b
/// 65536): a record length of 65536 is stored as 65535 (or 0), which the
/// hashed-directory code read as is. A directory grows to several blocks
/// (indexed, leaves split), a second layer empties it (each leaf is left
/// with one unused entry spanning the block) and adds names: they went
/// into such a leaf, which was "corrupt" (a record length of 65535).
#[test]
fn photon_on_64_kib_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let opts = ["-t", "ext4", "-b", "65536", "-O", "^metadata_csum"];
    let dev = mke2fs_image(&img, 256 << 20, &opts);
    assert_eq!(dumpe2fs_header(&img)["Block size"], "65536");
    let tar_of = |names: &[String]| {
        let mut b = tar::Builder::new(Vec::new());
        for n in names {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(if n.ends_with('/') {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, n, &b""[..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    let apply = |names: &[String]| {
        obdfs::photon::apply_tar(
            dev.clone(),
            &tar_of(names)[..],
            obdfs::ApplyOptions::default(),
        )
        .map_err(|e| assert_clean_chain(&e))
        .unwrap();
        dev.flush().unwrap();
    };
    let ls = |img: &std::path::Path| {
        let out = run(
            testutil::tool("debugfs"),
            &["-R", "ls -p /d", img.to_str().unwrap()],
        );
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect();
        v.sort();
        v
    };
    // 208-byte entries: about 315 a block, so /d is indexed and its leaves split.
    let mut names = vec!["d/".to_string()];
    names.extend((0..1000).map(|i| format!("d/{i:0200}")));
    apply(&names);
    e2fsck_clean(&img);
    let stat = run(
        testutil::tool("debugfs"),
        &["-R", "stat /d", img.to_str().unwrap()],
    );
    assert!(stat.contains("Flags: 0x81000"), "/d is not hashed:\n{stat}");
    assert_eq!(ls(&img).len(), 1000);
    let mut names = vec!["d/.wh..wh..opq".to_string()];
    names.extend((0..20).map(|i| format!("d/new{i}")));
    apply(&names);
    drop(dev);
    e2fsck_clean(&img);
    let mut want: Vec<String> = (0..20).map(|i| format!("new{i}")).collect();
    want.sort();
    assert_eq!(ls(&img), want);
}

/// A block-mapped (ext3) file is read through its indirect trees: a sparse
/// file with data in the direct, single, double and triple indirect ranges
/// reads back exactly from its runs; a corrupt `i_size` of 2^48 bytes
/// changes nothing (the walk went block by block up to `i_size`: here 16
/// million lookups and then "file too big", with 4 KiB blocks a billion),
/// and an indirect pointer outside the filesystem is an error.
#[test]
fn block_mapped_files_are_walked_as_trees() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let f = std::fs::File::create(&src).unwrap();
    // 1 KiB blocks: direct 0-11, single 12-267, double 268-65803, triple after.
    let at = [0u64, 5, 100, 1024, 40_000, 66_560, 71_679];
    for (i, blk) in at.iter().enumerate() {
        f.write_all_at(&[i as u8 + 1; 1024], blk * 1024).unwrap();
    }
    drop(f);
    let want = std::fs::read(&src).unwrap();
    let img = dir.path().join("ext3.img");
    let debugfs = |req: &str| {
        run(
            testutil::tool("debugfs"),
            &["-w", "-R", req, img.to_str().unwrap()],
        )
    };
    let runs_of = |img: &std::path::Path| {
        let dev: Arc<dyn BlockDevice> = Arc::new(blockdev::RawFileDevice::open(img).unwrap());
        let mut fs = obdfs::ext2fs::Ext2Fs::open_read_only(dev, 1 << 20).unwrap();
        let ino = fs.lookup(2, b"f").unwrap().unwrap();
        let mut inode = fs.read_inode(ino).unwrap();
        fs.block_map(ino, &mut inode)
    };
    drop(mke2fs_image(&img, 16 << 20, &["-t", "ext3", "-b", "1024"]));
    debugfs(&format!("write {} f", src.display()));
    let runs = runs_of(&img).unwrap();
    let image = std::fs::read(&img).unwrap();
    let mut got = vec![0u8; want.len()];
    for r in &runs {
        let (l, p, n) = (
            r.lblk as usize * 1024,
            r.pblk as usize * 1024,
            r.len as usize * 1024,
        );
        got[l..l + n].copy_from_slice(&image[p..p + n]);
    }
    assert!(runs.len() >= at.len(), "{runs:?}");
    assert!(got == want, "the runs read back the file: {runs:?}");

    debugfs("sif f size 0xFFFFFFFFFFFF");
    assert_eq!(runs_of(&img).unwrap(), runs, "a corrupt i_size");

    debugfs("sif f block[TIND] 99999999");
    let e = format!("{}", runs_of(&img).unwrap_err());
    assert!(
        e.contains("outside the filesystem") && e.contains("corrupt"),
        "{e}"
    );
}
