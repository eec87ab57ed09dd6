//! Write small seed inputs for the binary-format fuzz targets into
//! `DIR/<target>/`: layers made with the same writers that produce real
//! layers (so they are byte-compatible with upstream's), kept to a few KiB
//! so the fuzzer mutates structure rather than bulk data.
//!
//! Usage: cargo run -p overlaybd-fuzzing --example make_seeds -- DIR
//! (`scripts/fuzz.sh seeds` runs it and adds the tar seeds.)

use std::path::Path;

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::nbd::proto::*;
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::Uuid;

fn write(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), data).unwrap();
}

/// A writable layer of `vsize` bytes holding a few small writes, in `w`.
fn layer(w: &Path, sparse: bool, vsize: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let (data, index) = (w.join("data"), w.join("index"));
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&index);
    create_writable(
        &data,
        &index,
        &CreateOptions {
            virtual_size: vsize,
            sparse,
            parent_uuid: None,
            uuid: Some(Uuid::parse("6d5b0bd2-0000-4000-8000-000000000001").unwrap()),
        },
    )
    .unwrap();
    let l = WritableLayer::open(&data, &index).unwrap();
    for (i, off) in [0u64, 4096, 65536, vsize - 1024].into_iter().enumerate() {
        let block: Vec<u8> = (0..512).map(|b| (b * 7 + i * 13) as u8).collect();
        l.write(&block, off).unwrap();
    }
    l.write_zeroes(8192, 4096).unwrap();
    l.discard(16384, 512).unwrap();
    drop(l);
    (data, index)
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: make_seeds DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();

    // Writable layers: (data length LE u16) + data + index, as lsmt_writable reads.
    let (data, index) = layer(w, false, 1 << 20);
    let (d, i) = (
        std::fs::read(&data).unwrap(),
        std::fs::read(&index).unwrap(),
    );
    let mut seed = (d.len() as u16).to_le_bytes().to_vec();
    seed.extend_from_slice(&d);
    seed.extend_from_slice(&i);
    assert!(d.len() < 1 << 16);
    write(&dir, "lsmt_writable", "append-mode.bin", &seed);

    // Sealed, ZFile (lz4 and zstd, with and without checksums) and tar-wrapped.
    let out = w.join("out");
    let commit = |name: &str, opts: CommitOptions| -> Vec<u8> {
        let _ = std::fs::remove_file(&out);
        commit_writable(&data, &index, &out, &opts).unwrap();
        let b = std::fs::read(&out).unwrap();
        eprintln!("{name}: {} bytes", b.len());
        b
    };
    let sealed = commit("sealed", CommitOptions::default());
    write(&dir, "lsmt_sealed", "sealed.lsmt", &sealed);
    write(&dir, "tar_wrapper", "sealed.lsmt", &sealed);
    let z = |algorithm, verify| ZfileOptions {
        algorithm,
        block_size: 4096,
        verify,
        overwrite_header: true,
        threads: 1,
    };
    for (name, algo, verify) in [
        ("lz4.zfile", Algorithm::Lz4, true),
        ("zstd.zfile", Algorithm::Zstd, true),
        ("lz4-noverify.zfile", Algorithm::Lz4, false),
    ] {
        let b = commit(
            name,
            CommitOptions {
                zfile: Some(z(algo, verify)),
                ..Default::default()
            },
        );
        write(&dir, "zfile", name, &b);
    }
    let wrapped = commit(
        "lz4.zfile.tar",
        CommitOptions {
            zfile: Some(z(Algorithm::Lz4, true)),
            tar: true,
            ..Default::default()
        },
    );
    write(&dir, "tar_wrapper", "lz4.zfile.tar", &wrapped);
    let wrapped = commit(
        "sealed.lsmt.tar",
        CommitOptions {
            tar: true,
            ..Default::default()
        },
    );
    write(&dir, "tar_wrapper", "sealed.lsmt.tar", &wrapped);

    // config.json: lowers, an upper, a TurboOCI lower, a result file.
    write(
        &dir,
        "config_json",
        "full.json",
        br#"{"repoBlobUrl":"","lowers":[{"file":"/l/base.lsmt"},{"file":"rel/layer1.zfile","digest":"sha256:00"},{"file":"/l/t.fs.meta","targetFile":"/l/t.tar","gzipIndex":"/l/gzip.meta"}],"upper":{"data":"/w/data","index":"/w/index"},"resultFile":"/w/result"}"#,
    );
    write(&dir, "config_json", "minimal.json", br#"{"lowers":[]}"#);

    // NBD: a full session after the built-in handshake (first byte 2):
    // read, write, block status, trim, flush, disconnect.
    let mut s = vec![2u8];
    let req = |typ: u16, flags: u16, handle: u64, off: u64, len: u32| {
        RequestHeader {
            flags,
            typ,
            handle,
            offset: off,
            length: len,
        }
        .encode()
        .to_vec()
    };
    s.extend(req(CMD_READ, 0, 1, 0, 4096));
    s.extend(req(CMD_WRITE, CMD_FLAG_FUA, 2, 512, 8));
    s.extend([1, 2, 3, 4, 5, 6, 7, 8]);
    s.extend(req(CMD_BLOCK_STATUS, 0, 3, 0, 1 << 20));
    s.extend(req(CMD_TRIM, 0, 4, 4096, 4096));
    s.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 0, 512));
    s.extend(req(CMD_FLUSH, 0, 6, 0, 0));
    s.extend(req(CMD_DISC, 0, 7, 0, 0));
    write(&dir, "nbd_request", "session.bin", &s);
    // The raw handshake with options (first byte 0: no prefix).
    let mut h = vec![0u8];
    h.extend(3u32.to_be_bytes());
    let mut opt = |code: u32, data: &[u8]| {
        h.extend(IHAVEOPT.to_be_bytes());
        h.extend(code.to_be_bytes());
        h.extend((data.len() as u32).to_be_bytes());
        h.extend(data);
    };
    opt(OPT_LIST, &[]);
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend(1u32.to_be_bytes());
    meta.extend((BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend(BASE_ALLOCATION.as_bytes());
    opt(OPT_SET_META_CONTEXT, &meta);
    opt(OPT_INFO, &[0, 0, 0, 0, 0, 1, 0, 3]);
    opt(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    write(&dir, "nbd_request", "handshake.bin", &h);
}
