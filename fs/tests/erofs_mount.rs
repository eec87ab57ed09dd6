//! Our EROFS TurboOCI layers, flattened with their tars (data at the
//! mapped places), mount with the kernel and show the reference unpack of
//! their layers; our reader shows the same tree without the kernel.

mod erofs_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use erofs_common::*;
use obdfs::erofs::{build_layer, BuildOptions, ErofsReader};

/// Build `tars` as a stack of EROFS layers; returns each layer's written
/// sectors and mappings.
fn build_stack(tars: &[PathBuf]) -> Vec<(Sectors, Maps)> {
    let mut lower: Sectors = BTreeMap::new();
    let mut out = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let dev = RecordingDevice::new(lower.clone());
        let f = std::fs::File::open(t).unwrap();
        build_layer(dev.clone(), f, &BuildOptions { incremental: i > 0 })
            .unwrap_or_else(|e| panic!("building {}: {e}", t.display()));
        lower = dev.merged();
        out.push((dev.written(), dev.mappings()));
    }
    out
}

/// Flatten, compare what our reader shows with the reference unpack;
/// with `kernel`, mount it and compare what the kernel shows too, then run
/// `mounted` on the mount point. `extra` goes to `treecmp.py compare`.
/// Returns the number of paths.
fn check_stack(
    name: &str,
    tars: &[PathBuf],
    extra: &[&str],
    kernel: Option<&dyn Fn(&Path)>,
) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let layers = build_stack(tars);
    let img = tmp.path().join(format!("{name}.img"));
    let parts: Vec<LayerParts> = layers
        .iter()
        .zip(tars)
        .map(|((s, m), t)| (s, m.as_slice(), t.as_path()))
        .collect();
    assemble(&img, &parts);

    let refm = tmp.path().join("ref.json");
    let mut args = vec!["reference"];
    args.extend(tars.iter().map(|t| t.to_str().unwrap()));
    let reference = treecmp_run(&args);
    let paths = serde_json::from_str::<serde_json::Value>(&reference)
        .unwrap()
        .as_object()
        .unwrap()
        .len();
    std::fs::write(&refm, reference).unwrap();

    // Our reader, no kernel.
    let dev = Arc::new(blockdev::RawFileDevice::open(&img).unwrap());
    let r = ErofsReader::open(dev).unwrap();
    r.verify(&Default::default())
        .unwrap_or_else(|e| panic!("{name}: verify: {e}"));
    let ours = tmp.path().join("reader.json");
    std::fs::write(&ours, reader_manifest(&r).to_string()).unwrap();
    assert_same_manifest(&ours, &refm, extra);

    let Some(mounted) = kernel else {
        return paths;
    };
    // The kernel.
    let kern = tmp.path().join("kernel.json");
    {
        let m = ErofsMount::new(&img, &tmp.path().join("mnt"));
        std::fs::write(&kern, treecmp_run(&["dir", m.dir().to_str().unwrap()])).unwrap();
        mounted(m.dir());
    }
    assert_same_manifest(&kern, &refm, extra);
    // fsck.erofs (erofs-utils 1.5, scripts/deps.sh): an independent checker.
    {
        let o = std::process::Command::new(testutil::tool("fsck.erofs"))
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "fsck.erofs {name}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    paths
}

#[test]
fn fixture_layers_mount_and_match_the_reference_unpack() {
    let n = check_stack(
        "fixture",
        &[
            testutil::fixtures().join("input.tar"),
            turbo_fixtures().join("ext4-gzip-2/layer.tar"),
        ],
        &[],
        Some(&|_: &Path| {}),
    );
    assert_eq!(n, 712);
}

/// The EROFS test layer set, generated once per test process.
fn erofs_layers() -> Vec<PathBuf> {
    static SET: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fs/make-erofs-layers.py");
        let key = testutil::fnv(&std::fs::read(&script).unwrap());
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("erofs-layers-{key}"));
        if !dir.join("layers.txt").exists() {
            let new = tempfile::Builder::new()
                .prefix("erofs-layers-new")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .unwrap()
                .keep();
            let st = std::process::Command::new("python3")
                .arg(&script)
                .arg(&new)
                .status()
                .unwrap();
            assert!(st.success());
            if std::fs::rename(&new, &dir).is_err() {
                std::fs::remove_dir_all(&new).unwrap();
            }
        }
        std::fs::read_to_string(dir.join("layers.txt"))
            .unwrap()
            .lines()
            .map(|l| dir.join(l))
            .collect()
    })
    .clone()
}

#[test]
fn rich_layers_mount_and_match_the_reference_unpack() {
    let layers = erofs_layers();
    // Upstream strips overlayfs' opaque xattr (its layers must not carry
    // overlay semantics); the reference unpack keeps it as a plain xattr.
    let ignore = ["--ignore-xattr", "trusted.overlay.opaque"];
    // The lower stacks through our reader only; the whole stack through
    // the kernel too.
    for n in 1..layers.len() {
        check_stack(&format!("rich{n}"), &layers[..n], &ignore, None);
    }
    let mounted = |mnt: &Path| {
        use std::os::unix::fs::MetadataExt;
        // Layers 2 and 3 each link a lower layer's file: its link count
        // counts them.
        let tool = std::fs::metadata(mnt.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.nlink(), 4);
        for l in ["tool-link", "tool-link2", "tool-link3"] {
            let m = std::fs::metadata(mnt.join("usr/bin").join(l)).unwrap();
            assert_eq!((m.ino(), m.nlink()), (tool.ino(), 4), "{l}");
        }
        // Root-reserved xattr space is not an xattr.
        assert!(xattr_names(mnt).is_empty());
        // Layer 3 declares the root.
        let root = std::fs::metadata(mnt).unwrap();
        assert_eq!(
            (root.mode() & 0o7777, root.mtime(), root.mtime_nsec()),
            (0o751, 1_600_000_060, 7)
        );
    };
    check_stack("rich", &layers, &ignore, Some(&mounted));
}

fn xattr_names(p: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: `c` is a NUL-terminated path and `buf` a writable buffer of
    // the length we pass.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// A tar of (path, contents) files and (path/, None) directories.
fn small_tar(path: &Path, entries: &[(&str, Option<&[u8]>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_600_000_000);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, name, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

#[test]
fn opaque_root_hides_the_lower_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    small_tar(
        &a,
        &[
            ("etc/", None),
            ("etc/old", Some(b"old")),
            ("top", Some(b"x")),
        ],
    );
    small_tar(&b, &[(".wh..wh..opq", Some(b"")), ("new", Some(b"new"))]);
    let n = check_stack("opaque-root", &[a, b], &[], Some(&|_: &Path| {}));
    assert_eq!(n, 1);
}

/// A later entry of one layer replaces an earlier one of the same path
/// (the later entry wins, as the native and the ext4 engines apply it):
/// a file by a directory declared with a trailing slash (`z`, `z/`,
/// `z/in`), a directory by a file, and a lower layer's file by a
/// directory. The directory entry was refused ("'z' is not a directory in
/// this layer").
#[test]
fn later_entries_replace_earlier_ones_of_another_type() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    small_tar(
        &a,
        &[
            ("z", Some(b"file first")),
            ("z/", None),
            ("z/in", Some(b"inside")),
            ("w/", None),
            ("w/x", Some(b"x")),
            ("w", Some(b"a file now")),
            ("y", Some(b"lower file")),
        ],
    );
    small_tar(&b, &[("y/", None), ("y/in", Some(b"upper")), ("z", None)]);
    check_stack("replace", std::slice::from_ref(&a), &[], None);
    let n = check_stack("replace2", &[a, b], &[], Some(&|_: &Path| {}));
    assert_eq!(n, 5);
}

/// A hard link to its own name (`tar cf x.tar f f`) changes nothing: the file
/// stays, in the layer that made it and in a layer above, as erofs-utils
/// (since "tar: fix self-hardlink handling") and GNU tar have it. It was
/// refused ("hard link target 'z/in' does not exist").
#[test]
fn a_hard_link_to_itself_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let [t0, t1] = testutil::self_link_tars(dir.path());
    // One file of two names (`z/in`, `h`), and no link added by the self-links.
    let nlink = |m: &Path| {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(m.join("z/in")).unwrap().nlink(), 2);
    };
    let n = check_stack("self-link", std::slice::from_ref(&t0), &[], Some(&nlink));
    assert_eq!(n, 3);
    let n = check_stack("self-link2", &[t0, t1], &[], Some(&nlink));
    assert_eq!(n, 4);
}

/// A layer's entry for the root directory gives the root its owner, mode,
/// mtime and xattrs, in the bottom layer and above, as erofs-utils'
/// `tarerofs_parse_tar` has it: `./`, `./.` and also `/` (which libtar, and
/// so the ext4 engines, skip). A layer without one keeps the lower root's
/// metadata (our OCI choice for directories a layer does not declare;
/// erofs-utils gives the new root 0777, owner 0, the build time and no
/// xattrs). Checked on the kernel's mount and by fsck.erofs.
#[test]
fn the_root_entry_sets_the_root() {
    const AFTER: [(u32, u32, u32, u32, &str); 4] = [
        (0o040700, 1000, 1001, 1111111111, "user.root=base"),
        (0o040750, 2000, 2001, 1222222222, "user.root=top"),
        (0o040705, 3000, 3001, 1333333333, "user.root=slash"),
        (0o040705, 3000, 3001, 1333333333, "user.root=slash"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tars = testutil::root_entry_tars(dir.path());
    for i in 0..tars.len() {
        let root = |m: &Path| {
            let (mode, uid, gid, mtime, xattrs) = testutil::dir_root(m);
            assert_eq!(
                (mode, uid, gid, mtime, xattrs.join(" ").as_str()),
                AFTER[i],
                "root after layer {i}"
            );
        };
        let n = check_stack(&format!("root{i}"), &tars[..=i], &[], Some(&root));
        assert_eq!(n, i + 1);
    }
}

/// A path below a symbolic link to a directory, as erofs-utils builds it:
/// when a lower layer made the link, the new layer's `a/f` makes a new
/// directory `a` (0755) that replaces the link, and the link's target is
/// untouched; when the same layer made it, the layer is refused
/// (erofs-utils: EIO). (The ext4 engines differ: README, "The root entry
/// and symlinked parents, per engine".)
#[test]
fn a_path_below_a_symlink_replaces_a_lower_link_with_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tar_of = |path: &Path, build: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        std::fs::write(path, b.into_inner().unwrap()).unwrap();
    };
    let link = |b: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "d/", &b""[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "a", "d").unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(2);
        b.append_data(&mut h, "a/f", &b"f\n"[..]).unwrap();
    };
    let (lower, upper, same) = (d.join("lower.tar"), d.join("upper.tar"), d.join("same.tar"));
    tar_of(&lower, &|b| link(b));
    tar_of(&upper, &|b| file(b));
    tar_of(&same, &|b| {
        link(b);
        file(b)
    });

    let dev = RecordingDevice::new(Default::default());
    let e = build_layer(
        dev,
        std::fs::File::open(&same).unwrap(),
        &BuildOptions { incremental: false },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("a/f") && e.contains("not a directory"), "{e}");

    let tars = [lower, upper];
    let layers = build_stack(&tars);
    let img = d.join("img");
    let parts: Vec<LayerParts> = layers
        .iter()
        .zip(&tars)
        .map(|((s, m), t)| (s, m.as_slice(), t.as_path()))
        .collect();
    assemble(&img, &parts);
    {
        let m = ErofsMount::new(&img, &d.join("mnt"));
        let a = std::fs::symlink_metadata(m.dir().join("a")).unwrap();
        assert!(a.is_dir(), "{a:?}");
        assert_eq!(std::fs::read(m.dir().join("a/f")).unwrap(), b"f\n");
        assert_eq!(std::fs::read_dir(m.dir().join("d")).unwrap().count(), 0);
    }
    let o = std::process::Command::new(testutil::tool("fsck.erofs"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// Times before 1970 are kept: a PAX `mtime=-1234567890.5` (GNU tar, Go's
/// archive/tar and Python write such records for files older than the
/// epoch) and a GNU header's base-256 `-1`. EROFS keeps `i_mtime` in 64
/// bits that the kernel reads as a signed time, and erofs-utils stores a
/// negative PAX mtime as it is; the layer was refused ("negative mtime").
#[test]
fn mtimes_before_1970_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("old.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(3);
    b.append_pax_extensions([("mtime", &b"-1234567890.5"[..])])
        .unwrap();
    b.append_data(&mut h, "pax", &b"pax"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(3);
    h.as_old_mut().mtime = [0xff; 12];
    b.append_data(&mut h, "gnu", &b"gnu"[..]).unwrap();
    std::fs::write(&t, b.into_inner().unwrap()).unwrap();

    let times = |m: &Path| {
        use std::os::unix::fs::MetadataExt;
        let at = |p: &str| {
            let md = std::fs::symlink_metadata(m.join(p)).unwrap();
            (md.mtime(), md.mtime_nsec())
        };
        assert_eq!(at("pax"), (-1_234_567_891, 500_000_000));
        assert_eq!(at("gnu"), (-1, 0));
    };
    let n = check_stack("pre-1970", &[t], &["--ignore-dir-mtime"], Some(&times));
    assert_eq!(n, 2);
}
