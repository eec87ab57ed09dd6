//! Our EROFS reader on images made by another tool: Debian's mkfs.erofs
//! (erofs-utils 1.5) from a directory tree, in its default layout (inline
//! tail data, shared xattrs), chunk-based (block maps), without inline data
//! and compressed (whose file data we refuse, clearly). The tree we read
//! must equal the source directory.

mod erofs_common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use erofs_common::*;
use obdfs::erofs::format::DataLayout;
use obdfs::erofs::{ErofsReader, Error};

/// The source tree: every file type, sizes around the block size, hard
/// links, long symlinks, xattrs shared by several files, owners, modes,
/// nanosecond mtimes, a directory of several blocks.
const MAKE_TREE: &str = r##"
import os, sys
r = sys.argv[1]
def w(p, data, mode=0o644, uid=0, gid=0, ns=0):
    p = os.path.join(r, p)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, mode); os.chown(p, uid, gid)
    os.utime(p, ns=(1_600_000_000 * 10**9 + ns, 1_600_000_000 * 10**9 + ns))
for i, n in enumerate([0, 1, 100, 4095, 4096, 4097, 5000, 70_000, 300_000]):
    w("files/size-%d" % n, bytes((i * 7 + k) % 251 for k in range(n)), ns=i)
w("files/suid", b"#!/bin/sh\n", 0o4755, 1000, 1000)
w("files/bigid", b"ids\n", 0o600, 100_000, 70_000)
os.link(os.path.join(r, "files/size-5000"), os.path.join(r, "files/hard"))
os.symlink("size-100", os.path.join(r, "files/short-link"))
os.symlink("/" + "d" * 300, os.path.join(r, "files/long-link"))
os.mknod(os.path.join(r, "files/chr"), 0o020644, os.makedev(300, 70_000))
os.mknod(os.path.join(r, "files/blk"), 0o060600, os.makedev(8, 1))
os.mkfifo(os.path.join(r, "files/fifo"))
for i in range(5):
    p = os.path.join(r, "files/size-%d" % [0, 1, 100, 4095, 4096][i])
    os.setxattr(p, "user.shared", b"the same value on five files")
    os.setxattr(p, "trusted.t%d" % i, b"own %d" % i)
os.setxattr(os.path.join(r, "files"), "user.dir", b"\x00\xff binary")
os.setxattr(os.path.join(r, "files/suid"), "security.capability",
            bytes.fromhex("0100000200200000000000000000000000000000"))
for i in range(600):
    w("many/entry-%04d-%s" % (i, "x" * (i % 40)), b"%d\n" % i)
os.chmod(os.path.join(r, "many"), 0o1777)
for d in ["files", "many"]:
    os.utime(os.path.join(r, d), ns=(1_600_000_100 * 10**9 + 5, 1_600_000_100 * 10**9 + 5))
"##;

fn mkfs(img: &Path, src: &Path, opts: &[&str]) {
    let o = Command::new(testutil::tool("mkfs.erofs"))
        .args(opts)
        .args(["--preserve-mtime", "--quiet"])
        .arg(img)
        .arg(src)
        .output()
        .expect("run mkfs.erofs");
    assert!(
        o.status.success(),
        "mkfs.erofs {opts:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn open(img: &Path) -> ErofsReader {
    let dev = Arc::new(blockdev::RawFileDevice::open(img).unwrap());
    ErofsReader::open(dev).unwrap()
}

#[test]
fn reader_reads_mkfs_erofs_images() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let o = Command::new("python3")
        .args(["-c", MAKE_TREE])
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = tmp.path().join("src.json");
    std::fs::write(&want, treecmp_run(&["dir", src.to_str().unwrap()])).unwrap();

    for (name, opts) in [
        ("default", &[][..]),
        ("chunked", &["--chunksize=4096"][..]),
        ("noinline", &["-Enoinline_data"][..]),
        ("all-inline-xattrs", &["-x", "-1"][..]),
    ] {
        let img = tmp.path().join(format!("{name}.img"));
        mkfs(&img, &src, opts);
        let r = open(&img);
        r.verify(&Default::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // The layouts each variant is here for.
        let f = r.lookup_path(b"files/size-5000").unwrap().unwrap();
        let want_layout = match name {
            "chunked" => DataLayout::ChunkBased,
            "noinline" => DataLayout::FlatPlain,
            _ => DataLayout::FlatInline,
        };
        assert_eq!(f.layout, want_layout, "{name}");
        if name == "default" {
            // user.shared is on five files: a shared xattr (the ibody
            // header's shared count).
            let i = r.lookup_path(b"files/size-0").unwrap().unwrap();
            let isize = if i.extended { 64 } else { 32 };
            let mut h = [0u8; 12];
            r.device()
                .read_at(&mut h, r.iloc(i.nid).unwrap() + isize)
                .unwrap();
            assert_eq!(h[4], 1, "one shared xattr");
        }
        let got = tmp.path().join(format!("{name}.json"));
        let mut man = reader_manifest(&r);
        if name == "all-inline-xattrs" {
            // -x -1 disables xattrs altogether.
            for v in man.as_object_mut().unwrap().values_mut() {
                v["xattrs"] = serde_json::json!({});
            }
            let mut w: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&want).unwrap()).unwrap();
            for v in w.as_object_mut().unwrap().values_mut() {
                v["xattrs"] = serde_json::json!({});
            }
            let w2 = tmp.path().join("src-noxattr.json");
            std::fs::write(&w2, w.to_string()).unwrap();
            std::fs::write(&got, man.to_string()).unwrap();
            assert_same_manifest(&got, &w2, &[]);
            continue;
        }
        std::fs::write(&got, man.to_string()).unwrap();
        assert_same_manifest(&got, &want, &[]);
    }

    // Compressed data: directories and metadata read, file data refused
    // with a clear "unsupported" error.
    let img = tmp.path().join("lz4.img");
    mkfs(&img, &src, &["-zlz4"]);
    let r = open(&img);
    let f = r.lookup_path(b"files/size-70000").unwrap().unwrap();
    assert_eq!(f.size, 70_000);
    let mut b = [0u8; 16];
    match r.read_data(&f, 0, &mut b) {
        Err(Error::Unsupported(m)) => assert!(m.contains("compressed"), "{m}"),
        other => panic!("compressed data: {other:?}"),
    }
    assert_eq!(r.read_dir(r.root_nid()).unwrap().len(), 4);
}
