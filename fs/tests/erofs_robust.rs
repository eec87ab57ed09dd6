//! Corrupt EROFS images give errors, never panics or huge allocations:
//! a deterministic proptest run that damages a real image (the fuzz
//! target `erofs_image` in `fuzz/` runs the same checks unbounded), and
//! specific corruptions with the message they must produce.

mod common;
mod erofs_common;

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::MemDevice;
use erofs_common::*;
use obdfs::erofs::{build_layer, BuildOptions, ErofsReader, VerifyLimits};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A small image built by our writer: dirs, files, symlinks, a device,
/// xattrs, a hard link, a directory of several blocks. The tar data is
/// copied to the mapped places, so the image is self-contained.
fn sample_image() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, ty: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(ty);
        h.set_mode(if ty == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        if ty == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    add("d/", tar::EntryType::Directory, b"", None);
    add("d/file", tar::EntryType::Regular, &[7u8; 5000], None);
    add("d/small", tar::EntryType::Regular, b"hello\n", None);
    add("d/link", tar::EntryType::Symlink, b"", Some("small"));
    add("d/hard", tar::EntryType::Link, b"", Some("d/small"));
    add("d/null", tar::EntryType::Char, b"", None);
    for i in 0..200 {
        add(
            &format!("big/entry-{i:04}"),
            tar::EntryType::Regular,
            b"x",
            None,
        );
    }
    let mut tarbytes = b.into_inner().unwrap();
    // A PAX xattr on one more file.
    let mut pb = tar::Builder::new(Vec::new());
    pb.append_pax_extensions([("SCHILY.xattr.user.k", &b"value"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o600);
    h.set_size(3);
    pb.append_data(&mut h, "d/xattr", &b"abc"[..]).unwrap();
    let extra = pb.into_inner().unwrap();
    tarbytes.truncate(tarbytes.len() - 1024);
    tarbytes.extend_from_slice(&extra);

    let dev = RecordingDevice::new(BTreeMap::new());
    build_layer(dev.clone(), &tarbytes[..], &BuildOptions::default()).unwrap();
    let mut img = vec![0u8; 0];
    for (sec, d) in dev.written() {
        let off = (sec * 512) as usize;
        if img.len() < off + 512 {
            img.resize(off + 512, 0);
        }
        img[off..off + 512].copy_from_slice(&d);
    }
    for (off, len, toff) in dev.mappings() {
        let (off, len, toff) = (off as usize, len as usize, toff as usize);
        if img.len() < off + len {
            img.resize(off + len, 0);
        }
        let n = len.min(tarbytes.len() - toff);
        img[off..off + n].copy_from_slice(&tarbytes[toff..toff + n]);
    }
    img.resize(img.len().div_ceil(4096) * 4096, 0);
    img
}

/// Everything a front end may do with an image; errors are fine, panics
/// are not.
fn exercise(img: &[u8]) -> Result<(), obdfs::erofs::Error> {
    let dev = Arc::new(MemDevice::new(img.len()));
    blockdev::BlockDevice::write_at(&*dev, img, 0).unwrap();
    let r = ErofsReader::open(dev)?;
    let limits = VerifyLimits {
        max_inodes: 100_000,
        max_data_bytes: 1 << 24,
    };
    let verified = r.verify(&limits);
    // Also the per-call API, whatever verify thought.
    let root = r.root_nid();
    let mut pos = 0;
    for _ in 0..64 {
        let ents = r.readdir(root, pos)?;
        let Some(last) = ents.last() else { break };
        pos = last.next_pos;
        for e in &ents {
            if let Ok(i) = r.inode(e.nid) {
                let mut b = [0u8; 512];
                let _ = r.read(e.nid, 0, &mut b);
                let _ = r.readlink(e.nid);
                let _ = r.listxattr(e.nid);
                let _ = r.getxattr(e.nid, b"user.k");
                let _ = r.extents(&i);
            }
        }
    }
    let _ = r.lookup_path(b"d/file");
    let _ = r.lookup(root, b"big");
    verified.map(|_| ())
}

#[test]
fn sample_image_verifies() {
    let img = sample_image();
    let dev = Arc::new(MemDevice::new(img.len()));
    blockdev::BlockDevice::write_at(&*dev, &img, 0).unwrap();
    let r = ErofsReader::open(dev).unwrap();
    let st = r.verify(&Default::default()).unwrap();
    assert_eq!((st.dirs, st.files, st.symlinks, st.others), (3, 203, 1, 1));
    assert_eq!(st.entries, 208);
    let n = r.lookup_path(b"d/xattr").unwrap().unwrap();
    assert_eq!(r.getxattr(n.nid, b"user.k").unwrap().unwrap(), b"value");
    let f = r.lookup_path(b"d/file").unwrap().unwrap();
    assert_eq!(r.read_all(&f, 1 << 20).unwrap(), vec![7u8; 5000]);
    exercise(&img).unwrap();
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let img = sample_image();
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: std::env::var("EROFS_ROBUST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    // Damage: some bytes overwritten (biased to the metadata, which sits
    // in the first blocks and the last ones), or the image truncated.
    let len = img.len();
    let strat = (
        prop::collection::vec((0..len, any::<u8>()), 1..16),
        prop::option::weighted(0.1, 1024..len),
        any::<bool>(),
    );
    runner
        .run(&strat, |(edits, cut, low)| {
            let mut m = img.clone();
            for (pos, v) in edits {
                let pos = if low { pos % 32768 } else { pos };
                m[pos] = v;
            }
            if let Some(c) = cut {
                m.truncate(c);
            }
            let _ = exercise(&m);
            Ok(())
        })
        .unwrap();
}

fn corrupt_err(img: &[u8]) -> String {
    match exercise(img) {
        Ok(()) => panic!("the damaged image was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn specific_corruptions_are_named() {
    let img = sample_image();
    let mut m = img.clone();
    m[1024] ^= 0xff;
    assert!(corrupt_err(&m).contains("bad superblock magic"));
    let mut m = img.clone();
    m[1024 + 12] = 30; // blkszbits
    assert!(corrupt_err(&m).contains("block size"));
    let mut m = img.clone();
    m[1024 + 14..1024 + 16].copy_from_slice(&0xfff0u16.to_le_bytes()); // root nid
    let e = corrupt_err(&m);
    assert!(e.contains("corrupt EROFS image"), "{e}");
    assert!(corrupt_err(&img[..2048]).contains("corrupt EROFS image"));
}

/// A tar member without data: (path, type, link target).
type Member<'a> = (&'a str, tar::EntryType, &'a str);

/// A tar of data-less members.
fn tar_of(entries: &[Member]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, ty, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*ty);
        h.set_mode(0o644);
        h.set_size(0);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        // Paths with ".." are written raw (the tar crate refuses them).
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn build_err(tar: &[u8], incremental: bool) -> String {
    let dev = RecordingDevice::new(BTreeMap::new());
    match build_layer(dev, tar, &BuildOptions { incremental }) {
        Ok(_) => panic!("the layer was accepted"),
        Err(e) => {
            // One line: the message and its causes.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

#[test]
fn bad_layers_are_refused_with_a_clear_message() {
    use tar::EntryType::{Directory, Link, Regular};
    let cases: &[(&[Member], &str)] = &[
        (
            &[("../evil", Regular, "")],
            "'../evil': path leaves the layer root",
        ),
        (
            &[("h", Link, "no/such/file")],
            "'h': hard link target 'no/such/file' does not exist",
        ),
        (
            &[("d/", Directory, ""), ("h", Link, "d")],
            "'h': hard link target 'd' is a directory",
        ),
        (
            &[
                ("bin/", Directory, ""),
                ("etc/", Directory, ""),
                ("etc/hd", Link, "bin"),
            ],
            "'etc/hd': hard link target 'bin' is a directory",
        ),
        (
            &[("f", Regular, ""), ("f/x", Regular, "")],
            "'f/x': 'f' is not a directory in this layer",
        ),
        (&[("./", Regular, "")], "the root must be a directory"),
    ];
    for (entries, want) in cases {
        let e = build_err(&tar_of(entries), false);
        assert!(e.contains(want), "got {e:?}, want {want:?}");
    }
    // Symlink targets symlink(2) refuses: empty, and longer than 4095 bytes
    // (a GNU long-link member carries it). 4095 bytes are fine.
    let e = build_err(&tar_of(&[("s", tar::EntryType::Symlink, "")]), false);
    assert!(e.contains("'s': symbolic link with an empty target"), "{e}");
    let symlink_tar = |len: usize| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, "long", "x".repeat(len)).unwrap();
        b.into_inner().unwrap()
    };
    let e = build_err(&symlink_tar(5000), false);
    assert!(
        e.contains("'long': symbolic link target of 5000 bytes is too long (limit 4095)"),
        "{e}"
    );
    let dev = RecordingDevice::new(BTreeMap::new());
    build_layer(dev, &symlink_tar(4095)[..], &BuildOptions::default())
        .expect("a 4095-byte symlink target");
    // A tar that ends inside a header.
    let mut t = tar_of(&[("a", Regular, "")]);
    t.truncate(300);
    let e = build_err(&t, false);
    assert!(
        e.contains("layer tar") && e.contains("malformed tar"),
        "{e}"
    );
    // An upper layer over something that is not EROFS.
    let e = build_err(&tar_of(&[("a", Regular, "")]), true);
    assert!(e.contains("bad superblock magic"), "{e}");
}

#[test]
fn sparse_members_are_refused() {
    // layer3 of the ext4 tests' set: old-GNU, PAX 0.1 and 1.0 sparse files.
    let set = common::layer_set();
    let f = std::fs::File::open(&set.layers[2]).unwrap();
    let dev = RecordingDevice::new(BTreeMap::new());
    let e = build_layer(dev, f, &BuildOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("sparse files cannot be mapped into an EROFS TurboOCI layer"),
        "{e}"
    );
}
