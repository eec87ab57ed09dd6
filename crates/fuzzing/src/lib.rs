//! Fuzz entry points: one function per parser that reads untrusted bytes.
//!
//! Each takes arbitrary bytes, runs them through the real parser and then
//! through what a caller does with the result (reads, lookups, applying to
//! a filesystem), and must return without panicking, hanging or allocating
//! beyond what the formats' own limits allow, whatever the input. Errors
//! are the expected outcome for most inputs and are ignored.
//!
//! Used by the cargo-fuzz targets in `fuzz/` (long runs, `scripts/fuzz.sh`)
//! and by `tests/deterministic.rs` (a fixed-iteration run over mutated seeds
//! and every saved regression input, part of the normal test suite).

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use blockdev::config::ImageConfig;
use blockdev::lsmt::{SealedLayer, WritableLayer};
use blockdev::source::{MemSource, ReadAt};
use blockdev::zfile::ZFileReader;
use blockdev::{BlockDevice, MemDevice, Stack};

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target by name (the names of the cargo-fuzz binaries and of the
/// seed and regression directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_request", nbd_request),
    ("tar_reader", tar_reader),
    ("tar_apply", tar_apply),
    ("zfile", zfile),
    ("lsmt_sealed", lsmt_sealed),
    ("lsmt_writable", lsmt_writable),
    ("tar_wrapper", tar_wrapper),
    ("config_json", config_json),
    ("erofs_image", erofs_image),
    ("gzip_index", gzip_index),
    ("oci_manifest", oci_manifest),
    ("www_authenticate", www_authenticate),
    ("docker_config", docker_config),
    ("turbo_layer", turbo_layer),
];

/// Largest amount of decoded data a target reads back from one input.
const READ_BUDGET: u64 = 4 << 20;

fn src(data: &[u8], name: &str) -> Arc<MemSource> {
    Arc::new(MemSource::new(data.to_vec(), name))
}

/// The NBD server's handshake and request parser fed client bytes. The
/// first byte chooses whether a valid handshake prefix (with or without
/// structured replies) comes first, so the transmission-phase parser is
/// reached quickly; its bit 2 makes the export read-only.
pub fn nbd_request(data: &[u8]) {
    use blockdev::nbd::proto::*;
    fn handshake(structured: bool) -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        let mut opt = |code: u32, data: &[u8]| {
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&code.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
        };
        if structured {
            opt(OPT_STRUCTURED_REPLY, &[]);
        }
        opt(OPT_GO, &[0, 0, 0, 0, 0, 0]);
        v
    }
    let export = blockdev::nbd::Export {
        name: "fuzz".into(),
        description: String::new(),
        size: 1 << 30,
        read_only: data.first().is_some_and(|b| b & 4 != 0),
    };
    let input = match data.first() {
        Some(b) if b & 3 == 1 => [handshake(false), data[1..].to_vec()].concat(),
        Some(b) if b & 3 == 2 => [handshake(true), data[1..].to_vec()].concat(),
        _ => data.to_vec(),
    };
    blockdev::nbd::process_client_bytes(&input, &export);
}

/// The layer tar reader (ustar, PAX, GNU long names, GNU and PAX sparse):
/// every entry and all its data are read.
pub fn tar_reader(data: &[u8]) {
    let mut r = obdfs::tar::TarReader::new(data);
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(Some(e)) = r.next_entry() {
        let _ = (e.path_lossy(), e.segments());
        let mut left = r.remaining();
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if r.read_data(&mut buf[..n]).is_err() {
                return;
            }
            left -= n as u64;
        }
    }
}

/// A fresh 8 MiB ext4 made once per process.
fn ext4_template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(8 << 20));
        obdfs::mkfs(dev.clone(), &obdfs::MkfsOptions::default()).expect("mkfs of the template");
        dev.contents()
    })
}

/// Apply the bytes as a layer tar to a small fresh ext4: path resolution,
/// whiteouts, hard links, sparse files, xattrs and size limits on hostile
/// entries.
pub fn tar_apply(data: &[u8]) {
    let t = ext4_template();
    let dev = Arc::new(MemDevice::new(t.len()));
    dev.write_at(t, 0).expect("copy the template");
    let opts = obdfs::ApplyOptions {
        cache_bytes: 4 << 20,
        ..Default::default()
    };
    let _ = obdfs::apply_tar(dev, data, opts);
}

/// Read up to [`READ_BUDGET`] bytes of `r` in pieces, from the start and
/// from the end.
fn read_some(r: &dyn ReadAt) {
    let size = r.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size.min(READ_BUDGET / 2) {
        match r.read_at(&mut buf, off) {
            Ok(0) | Err(_) => break,
            Ok(n) => off += n as u64,
        }
    }
    let tail = size.saturating_sub(READ_BUDGET / 2).max(off);
    let mut off = tail;
    while off < size {
        match r.read_at(&mut buf, off) {
            Ok(0) | Err(_) => break,
            Ok(n) => off += n as u64,
        }
    }
}

/// A ZFile: header, trailer and jump table, then decompression (with the
/// per-block checksums when the file has them).
pub fn zfile(data: &[u8]) {
    let Ok(z) = ZFileReader::open(Box::new(MemSource::new(data.to_vec(), "fuzz.zfile"))) else {
        return;
    };
    let _ = (z.info(), z.algorithm(), z.original_size());
    read_some(&z);
}

/// Read a device around its mapped ranges, whole, and its block status.
fn exercise_device(dev: &dyn BlockDevice, ranges: &[(u64, u64)]) {
    let size = dev.size();
    let mut buf = vec![0u8; 64 << 10];
    let mut budget = READ_BUDGET;
    let mut read = |off: u64, len: u64| {
        let len = len.min(buf.len() as u64).min(size.saturating_sub(off));
        if len == 0 || budget < len {
            return;
        }
        budget -= len;
        let _ = dev.read_at(&mut buf[..len as usize], off);
    };
    read(0, 64 << 10);
    read(size.saturating_sub(4096), 4096);
    for &(off, len) in ranges.iter().take(64) {
        read(off.saturating_sub(512), len + 1024);
    }
    // Past the end is an error, not a panic.
    let _ = dev.read_at(&mut [0u8; 512], size);
}

fn ranges_of(entries: &[blockdev::lsmt::format::Mapping]) -> Vec<(u64, u64)> {
    use blockdev::lsmt::format::SECTOR;
    entries
        .iter()
        .map(|m| (m.offset * SECTOR, m.length as u64 * SECTOR))
        .collect()
}

/// A sealed LSMT blob: header, trailer and index validation, then reads
/// through a layer stack and its block status.
pub fn lsmt_sealed(data: &[u8]) {
    let Ok(layer) = SealedLayer::open(src(data, "fuzz.lsmt")) else {
        return;
    };
    let ranges = ranges_of(layer.index().entries());
    let Ok(stack) = Stack::from_layers(vec![layer], None) else {
        return;
    };
    let _ = stack.allocation(0, stack.size().min(1 << 40));
    exercise_device(&stack, &ranges);
}

/// A writable LSMT layer: the first two bytes (little endian) give the
/// length of the data file, the rest is its index file. Both are written to
/// a temporary directory (the layer reads files), opened read-only and read.
pub fn lsmt_writable(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (d, i) = data[2..].split_at(split);
    let (dp, ip) = (scratch_file("data"), scratch_file("index"));
    if std::fs::write(&dp, d).is_err() || std::fs::write(&ip, i).is_err() {
        return;
    }
    if let Ok(layer) = WritableLayer::open_read_only(&dp, &ip) {
        let ranges = ranges_of(&layer.entries());
        if let Ok(stack) = Stack::from_layers(Vec::new(), Some(layer)) {
            exercise_device(&stack, &ranges);
        }
    }
}

/// A file named `name` in a process-wide scratch directory (in /dev/shm when
/// there is one), one per thread: targets may run in parallel in tests.
fn scratch_file(name: &str) -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory")
    });
    let tag = format!("{:?}", std::thread::current().id());
    let tag: String = tag.chars().filter(char::is_ascii_digit).collect();
    dir.path().join(format!("{name}-{tag}"))
}

/// A layer blob as a registry serves it: the tar wrapper (PAX size
/// records, header checksums), then ZFile or plain LSMT inside, read
/// through a layer stack.
pub fn tar_wrapper(data: &[u8]) {
    let Ok(layer) = blockdev::layer::open_layer_source(src(data, "fuzz.tar")) else {
        return;
    };
    let ranges = ranges_of(layer.index().entries());
    if let Ok(stack) = Stack::from_layers(vec![layer], None) {
        exercise_device(&stack, &ranges);
    }
}

/// An overlaybd `config.json` (lowers, upper, TurboOCI targets).
pub fn config_json(data: &[u8]) {
    let mut text = String::new();
    if (&data[..]).read_to_string(&mut text).is_err() {
        text = String::from_utf8_lossy(data).into_owned();
    }
    if let Ok(c) = ImageConfig::parse(&text, Path::new("/fuzz/config.json")) {
        let _ = c.lower_sources();
    }
}

/// An EROFS image (a TurboOCI layer's filesystem): open, verify the whole
/// tree (reading every file, symlink and xattr), then the per-call API a
/// filesystem front end uses.
pub fn erofs_image(data: &[u8]) {
    use obdfs::erofs::{ErofsReader, VerifyLimits};
    let dev = Arc::new(MemDevice::new(data.len()));
    dev.write_at(data, 0).expect("the device holds the input");
    let Ok(r) = ErofsReader::open(dev) else {
        return;
    };
    let _ = r.verify(&VerifyLimits {
        max_inodes: 100_000,
        max_data_bytes: 1 << 24,
    });
    let root = r.root_nid();
    let mut pos = 0;
    for _ in 0..64 {
        let Ok(ents) = r.readdir(root, pos) else {
            break;
        };
        let Some(last) = ents.last() else { break };
        pos = last.next_pos;
        for e in &ents {
            let mut b = [0u8; 4096];
            let _ = r.read(e.nid, 0, &mut b);
            let _ = r.readlink(e.nid);
            let _ = r.xattrs(e.nid);
            if let Ok(i) = r.inode(e.nid) {
                let _ = r.extents(&i);
                let _ = r.lookup(e.nid, b"x");
            }
        }
    }
    let _ = r.lookup_path(b"a/b/c");
}

/// The gzip random-access index of TurboOCI layers (`gzip.meta`) with the
/// gzip blob it indexes, read through [`blockdev::gzindex::GzFile`].
///
/// Input: one flag byte, the index length (u16 little endian), the index,
/// then the blob. Flag bit 0 rewrites the header's recorded index and blob
/// sizes to the real ones, bit 1 recomputes the header checksum: without
/// them nearly every mutation would stop at the first check.
pub fn gzip_index(data: &[u8]) {
    use blockdev::gzindex::{photon_crc32c, GzFile, HEADER_SIZE};
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let split = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (index, blob) = data[3..].split_at(split);
    let mut index = index.to_vec();
    if index.len() >= HEADER_SIZE {
        if flags & 1 != 0 {
            index[33..41].copy_from_slice(&(blob.len() as i64).to_le_bytes());
            let n = index.len() as i64;
            index[41..49].copy_from_slice(&n.to_le_bytes());
        }
        if flags & 2 != 0 {
            let crc = photon_crc32c(&index[..HEADER_SIZE - 4]);
            index[HEADER_SIZE - 4..HEADER_SIZE].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let ip = scratch_file("gzip.meta");
    if std::fs::write(&ip, &index).is_err() {
        return;
    }
    let Ok(gz) = GzFile::open(src(blob, "fuzz.tar.gz"), &ip) else {
        return;
    };
    let _ = (gz.header(), gz.entries().len());
    // Around every access point, then from the start and the end.
    let mut buf = vec![0u8; 4096];
    let points: Vec<u64> = gz.entries().iter().take(16).map(|e| e.de_pos).collect();
    for p in points {
        let _ = gz.read_at(&mut buf, p.saturating_sub(100));
    }
    read_some(&gz);
}

/// OCI/Docker manifests, indexes and image configs as a registry or an OCI
/// layout serves them, and what the convertor does with them: the media
/// type sniffed, each model parsed and written back (which must parse
/// again), platform work-directory names (one short safe path component),
/// `rootfs.diff_ids` read and replaced. Also references, tags and digests.
pub fn oci_manifest(data: &[u8]) {
    use obdoci::model::{parse_json, sniff_media_type, to_json, ImageConfig, Index, Manifest};
    fn check_platform(d: &obdoci::Descriptor) {
        let _ = d.is_attestation();
        if let Some(p) = &d.platform {
            let n = p.dir_name();
            assert!(
                n.len() <= obdoci::model::Platform::DIR_NAME_MAX
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
                "unsafe platform directory name {n:?}"
            );
        }
    }
    let _ = sniff_media_type(data);
    if let Ok(m) = parse_json::<Manifest>("fuzz", data) {
        let out = to_json(&m);
        parse_json::<Manifest>("fuzz", &out).expect("a written manifest parses again");
        m.layers.iter().chain([&m.config]).for_each(check_platform);
    }
    if let Ok(i) = parse_json::<Index>("fuzz", data) {
        let out = to_json(&i);
        parse_json::<Index>("fuzz", &out).expect("a written index parses again");
        i.manifests.iter().for_each(check_platform);
    }
    if let Ok(mut c) = ImageConfig::parse("fuzz", data) {
        if let Ok(ids) = c.diff_ids("fuzz") {
            c.set_diff_ids(&ids);
            let again = ImageConfig::parse("fuzz", &c.to_bytes()).expect("a written config parses");
            assert_eq!(again.diff_ids("fuzz").expect("diff_ids just written"), ids);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = obdoci::ImageRef::parse(s);
        let _ = obdoci::reference::validate_tag(s);
        let _ = s.parse::<obdoci::Digest>();
    }
}

/// A registry's `WWW-Authenticate` header (RFC 7235 challenges).
pub fn www_authenticate(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for c in obdregistry::auth::parse_challenges(&text) {
        let _ = (c.scheme.len(), c.params.get("realm"));
    }
}

/// Docker's client configuration (`~/.docker/config.json`) looked up for a
/// few registry names.
pub fn docker_config(data: &[u8]) {
    for host in ["docker.io", "localhost:5000", "r.example", ""] {
        let _ = obdregistry::dockercfg::parse(data, host);
    }
}

/// A sealed TurboOCI layer (`*.fs.meta`: LSMT whose tag-1 entries point into
/// the layer tar) with its target: the first two bytes (little endian) give
/// the length of the meta blob, the rest is the target. Every mapped range
/// is read through the warp layer (metadata from the blob, file data from
/// the target).
pub fn turbo_layer(data: &[u8]) {
    use blockdev::lsmt::format::SECTOR;
    use blockdev::warp::WarpLayer;
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (meta, target) = data[2..].split_at(split);
    let Ok(meta) = SealedLayer::open_warp(src(meta, "fuzz.fs.meta")) else {
        return;
    };
    let Ok(w) = WarpLayer::with_target(meta, src(target, "fuzz.tar")) else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut budget = READ_BUDGET;
    for m in w.identity_entries().iter().take(64) {
        let len = (m.length as u64 * SECTOR).min(buf.len() as u64);
        if budget < len {
            break;
        }
        budget -= len;
        let _ = w.read_logical(&mut buf[..len as usize], m.offset * SECTOR);
    }
}
