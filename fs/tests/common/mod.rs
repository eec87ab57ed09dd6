//! Helpers shared by the integration tests: e2fsprogs and the Python tree
//! tools of `tests/fs`, fixture flattening, image digests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::{BlockDevice, RawFileDevice, Stack};

/// Run a tool and return its stdout; panic with its output on failure.
pub fn run(cmd: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let cmd = cmd.as_ref();
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Assert that `e2fsck -fn` finds nothing to fix.
pub fn e2fsck_clean(img: &Path) {
    if let Err(out) = testutil::e2fsck(img) {
        panic!("e2fsck -fn {} reported problems:\n{out}", img.display());
    }
}

/// `dumpe2fs -h` as a map of "Field name" -> value.
pub fn dumpe2fs_header(img: &Path) -> BTreeMap<String, String> {
    let out = run(testutil::tool("dumpe2fs"), &["-h", img.to_str().unwrap()]);
    let mut m = BTreeMap::new();
    for line in out.lines() {
        if let Some((k, v)) = line.split_once(':') {
            m.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    m
}

/// Words of a string, sorted.
pub fn sorted_words(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
    v.sort();
    v
}

/// The upstream fixtures.
pub fn fixtures() -> PathBuf {
    testutil::fixtures()
}

/// `tests/fs` of the workspace (the Python generators and tree tools).
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fs")
}

/// Flatten lower layers (and an optional upper) into a sparse raw image.
pub fn flatten(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, out: &Path) {
    let s = Stack::open_read_only(lowers, upper).unwrap();
    s.write_raw_image(out).unwrap();
}

/// A fresh sparse writable layer in `dir` stacked on `lowers`.
pub fn stack_with_upper(
    dir: &Path,
    lowers: &[PathBuf],
    vsize: u64,
) -> (Arc<dyn BlockDevice>, PathBuf, PathBuf) {
    let data = dir.join("data");
    let index = dir.join("index");
    create_writable(
        &data,
        &index,
        &CreateOptions {
            virtual_size: vsize,
            sparse: true,
            parent_uuid: None,
            uuid: None,
        },
    )
    .unwrap();
    let s = Stack::open(lowers, Some((&data, &index))).unwrap();
    (Arc::new(s), data, index)
}

/// A new sparse raw image of `size` bytes with a fresh mkfs.
pub fn mkfs_image(path: &Path, size: u64) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(path, size).unwrap());
    obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).unwrap();
    dev
}

/// Apply a tar file to a device.
pub fn apply_file(dev: &Arc<dyn BlockDevice>, tar: &Path) -> obdfs::Result<obdfs::ApplyStats> {
    let f = std::fs::File::open(tar).unwrap();
    obdfs::apply_tar(dev.clone(), f, obdfs::ApplyOptions::default())
}

fn treecmp() -> String {
    scripts().join("treecmp.py").to_str().unwrap().to_string()
}

/// Write the manifest of an ext4 image (via debugfs) to `out`.
pub fn image_manifest(img: &Path, out: &Path) {
    let m = run("python3", &[&treecmp(), "image", img.to_str().unwrap()]);
    std::fs::write(out, m).unwrap();
}

/// Write the manifest of a real directory to `out`.
pub fn dir_manifest(dir: &Path, out: &Path) {
    let m = run("python3", &[&treecmp(), "dir", dir.to_str().unwrap()]);
    std::fs::write(out, m).unwrap();
}

/// Write the manifest of the reference unpack of `layers` to `out`.
pub fn reference_manifest(layers: &[PathBuf], out: &Path) {
    let mut args = vec![treecmp(), "reference".to_string()];
    args.extend(layers.iter().map(|p| p.to_str().unwrap().to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = run("python3", &a);
    std::fs::write(out, m).unwrap();
}

/// Assert that two manifests are equal (the tool prints the differences).
pub fn assert_same_tree(a: &Path, b: &Path, extra: &[&str]) {
    let mut args = vec![
        treecmp(),
        "compare".into(),
        a.to_str().unwrap().into(),
        b.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new("python3")
        .args(&args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "trees differ ({} vs {}):\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The multi-layer test set, generated once per test process.
pub struct LayerSet {
    pub dir: PathBuf,
    pub layers: Vec<PathBuf>,
    /// (tar, expected error substring)
    pub malicious: Vec<(PathBuf, String)>,
}

pub fn layer_set() -> &'static LayerSet {
    static SET: OnceLock<LayerSet> = OnceLock::new();
    SET.get_or_init(|| {
        // The generator is deterministic: keep its output in the target
        // dir, keyed by the script's contents, instead of one copy per run.
        let script = scripts().join("make-layers.py");
        let key = testutil::fnv(&std::fs::read(&script).unwrap());
        let tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = tmpdir.join(format!("obdfs-layers-{key}"));
        if !dir.join("layers.txt").exists() {
            let new = tempfile::Builder::new()
                .prefix("obdfs-layers-new")
                .tempdir_in(tmpdir)
                .unwrap()
                .keep();
            run(
                "python3",
                &[script.to_str().unwrap(), new.to_str().unwrap()],
            );
            if std::fs::rename(&new, &dir).is_err() {
                // Another test process got there first.
                std::fs::remove_dir_all(&new).unwrap();
            }
        }
        let layers = std::fs::read_to_string(dir.join("layers.txt"))
            .unwrap()
            .lines()
            .map(|l| dir.join(l))
            .collect();
        let malicious = std::fs::read_to_string(dir.join("malicious.txt"))
            .unwrap()
            .lines()
            .map(|l| {
                let (f, e) = l.split_once('\t').unwrap();
                (dir.join(f), e.to_string())
            })
            .collect();
        LayerSet {
            dir,
            layers,
            malicious,
        }
    })
}

/// A digest of a sparse image's logical content (non-zero 4 KiB blocks and
/// their offsets), reading only its data ranges.
pub fn sparse_digest(img: &Path) -> String {
    let f = blockdev::io::IoFile::open(img).unwrap();
    let mut h: u64 = 0xcbf29ce484222325;
    let mut buf = vec![0u8; 1 << 20];
    for (s, e) in f.data_ranges(0).unwrap() {
        let mut off = s & !4095;
        while off < e {
            let n = (((e - off) as usize).min(buf.len())).div_ceil(4096) * 4096;
            let got = f.read_at(&mut buf[..n], off).unwrap();
            if got == 0 {
                break;
            }
            for (i, blk) in buf[..got].chunks(4096).enumerate() {
                if blk.iter().any(|&b| b != 0) {
                    for &x in (off + i as u64 * 4096).to_le_bytes().iter().chain(blk) {
                        h ^= x as u64;
                        h = h.wrapping_mul(0x100000001b3);
                    }
                }
            }
            off += got as u64;
        }
    }
    format!("{h:016x}")
}

/// A PAX (GNU sparse 0.1) layer with one sparse file `name` of logical size
/// `size` whose data segments are `map` (each filled with `0x5a`).
pub fn sparse_tar(name: &str, size: u64, map: &[(u64, u64)]) -> Vec<u8> {
    let stored: u64 = map.iter().map(|s| s.1).sum();
    let map_text = map
        .iter()
        .map(|(o, l)| format!("{o},{l}"))
        .collect::<Vec<_>>()
        .join(",");
    let size_text = size.to_string();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("GNU.sparse.major", &b"0"[..]),
        ("GNU.sparse.minor", &b"1"[..]),
        ("GNU.sparse.name", name.as_bytes()),
        ("GNU.sparse.size", size_text.as_bytes()),
        ("GNU.sparse.map", map_text.as_bytes()),
    ])
    .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(stored);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let data = vec![0x5au8; stored as usize];
    b.append_data(&mut h, format!("GNUSparseFile.0/{name}"), &data[..])
        .unwrap();
    b.into_inner().unwrap()
}

/// A sparse image of `size` bytes formatted by stock `mke2fs` with `opts`.
pub fn mke2fs_image(path: &Path, size: u64, opts: &[&str]) -> Arc<dyn BlockDevice> {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let mut args = vec!["-q", "-F"];
    args.extend_from_slice(opts);
    args.push(path.to_str().unwrap());
    run(testutil::tool("mke2fs"), &args);
    Arc::new(RawFileDevice::open_rw(path).unwrap())
}
