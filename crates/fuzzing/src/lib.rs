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
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (d, i) = data[2..].split_at(split);
    // One pair of files per thread: targets may run in parallel in tests.
    let tag = format!("{:?}", std::thread::current().id());
    let tag: String = tag.chars().filter(char::is_ascii_digit).collect();
    let (dp, ip) = (
        dir.path().join(format!("data-{tag}")),
        dir.path().join(format!("index-{tag}")),
    );
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
