//! Byte-compatibility tests against the files upstream's tools produced
//! (`../shared/fixtures/overlaybd-reference`, see its README).

use std::path::Path;

use blockdev::commit::{commit_sealed, commit_writable, zfile_compress_file, CommitOptions};
use blockdev::layer::{open_blob, open_layer};
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::source::ReadAt;
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::Uuid;

use testutil::fixtures;

const UUID: &str = "6d5b0bd2-0000-4000-8000-000000000001";

fn read_all(src: &dyn ReadAt) -> Vec<u8> {
    let mut v = vec![0u8; src.size() as usize];
    src.read_exact_at(&mut v, 0).unwrap();
    v
}

fn opts(zfile: Option<Algorithm>, tar: bool) -> CommitOptions {
    CommitOptions {
        zfile: zfile.map(|a| ZfileOptions {
            algorithm: a,
            ..Default::default()
        }),
        tar,
        uuid: Some(Uuid::parse(UUID).unwrap()),
        ..Default::default()
    }
}

#[test]
fn every_zfile_decompresses_to_the_lsmt_commit() {
    let f = fixtures();
    let lsmt = std::fs::read(f.join("baselayer/commit.lsmt")).unwrap();
    for name in [
        "baselayer/commit.lz4.zfile",
        "baselayer/commit.zstd.zfile",
        "baselayer/commit.lz4.zfile.tar",
    ] {
        let (blob, wrap) = open_blob(&f.join(name)).unwrap();
        assert!(wrap.zfile, "{name}");
        assert_eq!(wrap.tar.is_some(), name.ends_with(".tar"), "{name}");
        assert!(
            read_all(blob.as_ref()) == lsmt,
            "{name} differs from commit.lsmt"
        );
    }
    let mkfs: Vec<Vec<u8>> = [
        "mkfs/commit.lz4.zfile",
        "mkfs/commit.zstd.zfile",
        "mkfs/commit.lz4.zfile.tar",
    ]
    .iter()
    .map(|n| read_all(open_blob(&f.join(n)).unwrap().0.as_ref()))
    .collect();
    assert!(mkfs[0] == mkfs[1] && mkfs[1] == mkfs[2]);
    // and each is a valid sealed layer with the fixed uuid
    for n in [
        "baselayer/commit.lz4.zfile",
        "mkfs/commit.zstd.zfile.tar",
        "baselayer/ext4_64",
    ] {
        let n = if n.ends_with(".zstd.zfile.tar") {
            "mkfs/commit.lz4.zfile.tar"
        } else {
            n
        };
        let l = open_layer(&f.join(n)).unwrap();
        assert_eq!(l.info().virtual_size, 64 << 30, "{n}");
        if n != "baselayer/ext4_64" {
            assert_eq!(l.info().uuid, Uuid::parse(UUID).unwrap());
            assert!(l.info().parent_uuid.is_nil());
        }
    }
}

fn assert_same_file(ours: &Path, theirs: &Path) {
    let a = std::fs::read(ours).unwrap();
    let b = std::fs::read(theirs).unwrap();
    assert_eq!(
        a.len(),
        b.len(),
        "{} vs {}: sizes differ",
        ours.display(),
        theirs.display()
    );
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{} vs {}: first difference at byte {i}",
            ours.display(),
            theirs.display()
        );
    }
}

#[test]
fn commit_of_the_sealed_content_matches_upstream_bytes() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = f.join("baselayer/commit.lsmt");
    for (alg, tar, want) in [
        (None, false, "baselayer/commit.lsmt"),
        (Some(Algorithm::Lz4), false, "baselayer/commit.lz4.zfile"),
        (Some(Algorithm::Zstd), false, "baselayer/commit.zstd.zfile"),
        (Some(Algorithm::Lz4), true, "baselayer/commit.lz4.zfile.tar"),
    ] {
        let out = dir.path().join(want.replace('/', "_"));
        commit_sealed(&src, &out, &opts(alg, tar)).unwrap();
        assert_same_file(&out, &f.join(want));
    }
    // the mkfs layer, starting from its zstd form
    let out = dir.path().join("mkfs.tar");
    commit_sealed(
        &f.join("mkfs/commit.zstd.zfile"),
        &out,
        &opts(Some(Algorithm::Lz4), true),
    )
    .unwrap();
    assert_same_file(&out, &f.join("mkfs/commit.lz4.zfile.tar"));
}

/// Rebuild a sparse writable layer holding the commit's data, then commit it:
/// the writable path must produce upstream's bytes too.
#[test]
fn commit_of_a_sparse_writable_layer_matches_upstream_bytes() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (data, index) = (dir.path().join("data"), dir.path().join("index"));
    create_writable(
        &data,
        &index,
        &CreateOptions {
            virtual_size: 64 << 30,
            sparse: true,
            ..Default::default()
        },
    )
    .unwrap();
    let sealed = open_layer(&f.join("baselayer/commit.lsmt")).unwrap();
    {
        let w = WritableLayer::open(&data, &index).unwrap();
        for m in sealed.index().entries() {
            let mut buf = vec![0u8; m.length as usize * 512];
            sealed.read_mapped(&mut buf, m.moffset).unwrap();
            w.write(&buf, m.offset * 512).unwrap();
        }
        w.flush().unwrap();
    }
    for (alg, tar, want) in [
        (None, false, "baselayer/commit.lsmt"),
        (Some(Algorithm::Lz4), true, "baselayer/commit.lz4.zfile.tar"),
    ] {
        let out = dir.path().join(want.replace('/', "_"));
        commit_writable(&data, &index, &out, &opts(alg, tar)).unwrap();
        assert_same_file(&out, &f.join(want));
    }
}

#[test]
fn zfile_tool_output_differs_only_in_the_header() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("z");
    zfile_compress_file(
        Some(&f.join("baselayer/commit.lsmt")),
        &out,
        ZfileOptions {
            overwrite_header: false,
            ..Default::default()
        },
        false,
        false,
    )
    .unwrap();
    let ours = std::fs::read(&out).unwrap();
    let theirs = std::fs::read(f.join("baselayer/commit.lz4.zfile")).unwrap();
    assert_eq!(ours[32], 0x13);
    assert_eq!(theirs[32], 0x1b);
    assert_eq!(ours.len(), theirs.len());
    assert!(ours[512..] == theirs[512..]);
    // the non-overwritten header is still readable (via the trailer)
    let (blob, _) = open_blob(&out).unwrap();
    assert_eq!(blob.size(), 11_583_488);
}

/// Parallel compression writes exactly upstream's bytes whatever the
/// thread count (1 compresses on the caller's thread).
#[test]
fn every_thread_count_gives_upstreams_bytes() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = f.join("baselayer/commit.lsmt");
    for threads in 1..=4 {
        for (alg, tar, want) in [
            (Algorithm::Lz4, false, "baselayer/commit.lz4.zfile"),
            (Algorithm::Zstd, false, "baselayer/commit.zstd.zfile"),
            (Algorithm::Lz4, true, "baselayer/commit.lz4.zfile.tar"),
        ] {
            let out = dir
                .path()
                .join(format!("{threads}-{}", want.replace('/', "_")));
            let mut o = opts(Some(alg), tar);
            o.zfile.as_mut().unwrap().threads = threads;
            commit_sealed(&src, &out, &o).unwrap();
            assert_same_file(&out, &f.join(want));
        }
        let out = dir.path().join(format!("{threads}-zfile"));
        zfile_compress_file(
            Some(&src),
            &out,
            ZfileOptions {
                overwrite_header: false,
                threads,
                ..Default::default()
            },
            false,
            false,
        )
        .unwrap();
        let (ours, theirs) = (
            std::fs::read(&out).unwrap(),
            std::fs::read(f.join("baselayer/commit.lz4.zfile")).unwrap(),
        );
        assert!(
            ours[512..] == theirs[512..],
            "overlaybd-zfile, {threads} threads"
        );
    }
}

/// `verify_blocks` passes upstream's header-rewritten (0x1b) ZFile, whose reader uses
/// the header alone, and fails it once its trailer is damaged.
#[test]
fn verify_checks_the_trailer_of_header_rewritten_files() {
    use blockdev::layer::open_zfile;
    use blockdev::zfile::{verify_blocks, ZF_SPACE};
    let theirs = fixtures().join("baselayer/commit.lz4.zfile");
    let bytes = std::fs::read(&theirs).unwrap();
    assert_eq!(bytes[32], 0x1b, "the fixture's header was rewritten");
    let dir = tempfile::tempdir().unwrap();
    let open = |b: &[u8]| {
        let p = dir.path().join("z");
        std::fs::write(&p, b).unwrap();
        open_zfile(&p).unwrap()
    };
    verify_blocks(&open(&bytes)).unwrap();
    // A bit flipped in the trailer's index offset: still readable, not valid.
    let mut bad = bytes.clone();
    let at = bad.len() - ZF_SPACE + 40;
    bad[at] ^= 1;
    let e = verify_blocks(&open(&bad)).unwrap_err().to_string();
    assert!(e.contains("trailer"), "{e}");
}

/// `--commit_sealed` takes the virtual size and parent from the trailer, as every
/// reader of a sealed layer does, when the header says otherwise.
#[test]
fn commit_sealed_takes_the_trailers_virtual_size() {
    use blockdev::lsmt::SealedLayer;
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(f.join("baselayer/commit.lsmt")).unwrap();
    let vsize = u64::from_le_bytes(bytes[48..56].try_into().unwrap());
    bytes[48..56].copy_from_slice(&(vsize * 2).to_le_bytes());
    let src = dir.path().join("in.lsmt");
    std::fs::write(&src, &bytes).unwrap();
    let open = |p: &Path| {
        let (blob, _) = open_blob(p).unwrap();
        SealedLayer::open(blob).unwrap()
    };
    let input = open(&src);
    assert_eq!(
        (input.header().virtual_size, input.info().virtual_size),
        (vsize * 2, vsize)
    );
    let out = dir.path().join("out.lsmt");
    commit_sealed(&src, &out, &opts(None, false)).unwrap();
    let output = open(&out);
    assert_eq!(output.info().virtual_size, vsize);
    assert_eq!(output.header().virtual_size, vsize);
}
