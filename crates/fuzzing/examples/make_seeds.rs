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

/// The largest input `scripts/fuzz.sh` gives the image targets (erofs_image,
/// gzip_index; the others get 64 KiB).
const MAX_LEN: usize = 256 << 10;

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

    // EROFS: a TurboOCI layer filesystem of a small tar (files, a symlink, a
    // hard link, a device, an xattr), file data mapped in from the tar.
    write(&dir, "erofs_image", "sample.erofs", &erofs_seed());

    // gzip index + blob: flag byte (3: fix up sizes and checksum), index
    // length, index, blob.
    // Words and hex digits picked at random: several deflate blocks, so
    // several access points.
    let words: Vec<String> = (0..300u32)
        .map(|i| format!("w{:x}", i.wrapping_mul(2_654_435_761) >> 12))
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut text = Vec::new();
    while text.len() < 160_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 5 < 2 {
            // Random hex digits: literals, which end deflate blocks sooner.
            text.extend(format!("{:016x}", x.wrapping_mul(0x2545_f491_4f6c_dd1d)).bytes());
        } else {
            text.extend_from_slice(words[(x % 300) as usize].as_bytes());
        }
        text.push(if x & 0x1f00 == 0 { b'\n' } else { b' ' });
    }
    // A flush every 16 KiB ends a deflate block there: access points
    // (blocks of gzip(1) would be larger than a seed should be).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    for piece in text.chunks(16 << 10) {
        std::io::Write::write_all(&mut gz, piece).unwrap();
        std::io::Write::flush(&mut gz).unwrap();
    }
    let blob = gz.finish().unwrap();
    let mut index = std::io::Cursor::new(Vec::new());
    let info = blockdev::gzindex::build(
        &blob[..],
        Path::new("seed.tar.gz"),
        &mut index,
        blockdev::gzindex::MIN_SPAN,
    )
    .unwrap();
    let index = index.into_inner();
    eprintln!("gzip index: {info:?}, blob {} bytes", blob.len());
    for (name, flags) in [("fixup.bin", 3u8), ("exact.bin", 0u8)] {
        let mut seed = vec![flags];
        seed.extend((index.len() as u16).to_le_bytes());
        seed.extend(&index);
        seed.extend(&blob);
        assert!(
            index.len() < 1 << 16 && seed.len() <= MAX_LEN,
            "seed too big"
        );
        write(&dir, "gzip_index", name, &seed);
    }

    // OCI/Docker documents.
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    write(
        &dir,
        "oci_manifest",
        "oci-manifest.json",
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":7023}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":32654,"annotations":{{"a":"b"}}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{}","size":16724,"urls":["http://x/y"]}}],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1}},"annotations":{{"k":"v"}},"x-extra":[1,2.5,null]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('d')
        )
        .as_bytes(),
    );
    write(
        &dir,
        "oci_manifest",
        "docker-manifest.json",
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":1457,"digest":"{}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":3370706,"digest":"{}"}}]}}"#,
            d('e'),
            d('f')
        )
        .as_bytes(),
    );
    write(
        &dir,
        "oci_manifest",
        "index.json",
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8","os.features":["f"],"os.version":"1"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":2,"platform":{{"architecture":"unknown","os":"unknown"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest","vnd.docker.reference.digest":"{}"}}}}],"artifactType":"application/x"}}"#,
            d('1'),
            d('2'),
            d('1')
        )
        .as_bytes(),
    );
    write(
        &dir,
        "oci_manifest",
        "config.json",
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}","{}"]}},"history":[{{"created":"2024-01-01T00:00:00Z","created_by":"x"}}]}}"#,
            d('3'),
            d('4')
        )
        .as_bytes(),
    );
    write(
        &dir,
        "oci_manifest",
        "reference.txt",
        b"localhost:5000/library/redis",
    );

    // WWW-Authenticate headers.
    for (name, h) in [
        (
            "bearer.txt",
            &br#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#[..],
        ),
        ("basic.txt", br#"Basic realm="Registry Realm""#),
        (
            "multi.txt",
            br#"Basic realm="x", Bearer realm="https://a/t", error="insufficient_scope", k=v, q="a\"b\\c""#,
        ),
    ] {
        write(&dir, "www_authenticate", name, h);
    }

    // TurboOCI: an EROFS warp layer of a small tar, committed, with the tar
    // as its target (meta length LE u16, meta, tar).
    let tarbytes = small_tar();
    let blob = w.join("layer.tar");
    std::fs::write(&blob, &tarbytes).unwrap();
    let (td, ti) = (w.join("turbo_data"), w.join("turbo_index"));
    obdfs::turbo::create_layer(&td, &ti, 64 << 20, false).unwrap();
    obdfs::turbo::apply_layer(
        &obdfs::turbo::TurboApply {
            blob: blob.clone(),
            gz_index: w.join("gzip.meta"),
            lowers: Vec::new(),
            upper_data: td.clone(),
            upper_index: ti.clone(),
            mkfs: false,
            fstype: obdfs::turbo::FsType::Erofs,
        },
        None,
    )
    .unwrap();
    let meta = w.join("erofs.fs.meta");
    blockdev::commit::commit_warp(&td, &ti, &meta, &CommitOptions::default()).unwrap();
    let meta = std::fs::read(&meta).unwrap();
    eprintln!(
        "turbo meta: {} bytes, tar {} bytes",
        meta.len(),
        tarbytes.len()
    );
    let mut seed = (meta.len() as u16).to_le_bytes().to_vec();
    assert!(meta.len() < 1 << 16);
    seed.extend_from_slice(&meta);
    seed.extend_from_slice(&tarbytes);
    write(&dir, "turbo_layer", "erofs.bin", &seed);

    // Docker client configuration.
    write(
        &dir,
        "docker_config",
        "config.json",
        br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"localhost:5000":{"username":"a","password":"b"},"r.example":{"auth":"!!"}},"credHelpers":{"gcr.io":"gcloud"},"credsStore":"desktop"}"#,
    );
}

/// A device that copies the tar bytes it is told to map (what a TurboOCI
/// layer stack serves from the target file).
struct MapDevice {
    mem: blockdev::MemDevice,
    tar: Vec<u8>,
}

impl blockdev::BlockDevice for MapDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.mem.trim(offset, len)
    }
    fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> blockdev::Result<()> {
        let t = target_offset as usize;
        let n = (len as usize).min(self.tar.len().saturating_sub(t));
        self.mem.write_at(&self.tar[t..t + n], offset)
    }
}

/// A small layer tar: files, a symlink, a hard link, a device, an xattr.
fn small_tar() -> Vec<u8> {
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
    for i in 0..20 {
        add(
            &format!("many/entry-{i:02}"),
            tar::EntryType::Regular,
            b"x",
            None,
        );
    }
    let mut tarbytes = b.into_inner().unwrap();
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
    tarbytes
}

fn erofs_seed() -> Vec<u8> {
    let tarbytes = small_tar();
    let dev = std::sync::Arc::new(MapDevice {
        mem: blockdev::MemDevice::new(1 << 20),
        tar: tarbytes.clone(),
    });
    obdfs::erofs::build_layer(dev.clone(), &tarbytes[..], &Default::default()).unwrap();
    let mut img = dev.mem.contents();
    // Up to the last block holding data.
    let end = img
        .chunks(4096)
        .rposition(|c| c.iter().any(|&b| b != 0))
        .map_or(4096, |i| (i + 1) * 4096);
    img.truncate(end);
    eprintln!("erofs: {} bytes", img.len());
    img
}
