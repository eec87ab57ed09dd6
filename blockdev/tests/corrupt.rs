//! Corrupt or truncated inputs give clear errors naming the file, never a
//! panic or a huge allocation.

mod small_layer;

use std::path::{Path, PathBuf};

use blockdev::commit::{commit_writable, CommitOptions};
use blockdev::layer::open_layer;
use blockdev::lsmt::format::{HeaderTrailer, Mapping, HT_SPACE, MAX_MOFFSET};
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::zfile::ZfileOptions;
use blockdev::{BlockDevice, Stack};
use small_layer::committed_layer;

fn small_layer(dir: &Path, zfile: bool) -> PathBuf {
    let opts = CommitOptions {
        zfile: zfile.then(ZfileOptions::default),
        ..Default::default()
    };
    committed_layer(
        dir,
        if zfile { "layer.zfile" } else { "layer.lsmt" },
        &[(4096, vec![0x5a; 64 << 10]), (512 << 10, vec![0xa5; 8192])],
        &opts,
    )
}

fn expect_err(path: &Path, needle: &str) {
    let e = match open_layer(path) {
        Ok(l) => {
            // some corruptions only show when reading
            let s = Stack::from_layers(vec![l], None).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let e = s.read_at(&mut buf, 0).expect_err("corruption not detected");
            testutil::assert_clean_chain(&e)
        }
        Err(e) => testutil::assert_clean_chain(&e),
    };
    assert!(
        e.contains(&path.display().to_string()),
        "error does not name the file: {e}"
    );
    assert!(e.contains(needle), "expected '{needle}' in: {e}");
}

fn mutate(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    std::fs::write(dst, b).unwrap();
}

#[test]
fn sealed_layer_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_layer(dir.path(), false);
    open_layer(&good).unwrap();
    let bad = dir.path().join("bad.lsmt");
    let len = std::fs::metadata(&good).unwrap().len() as usize;
    let trailer = len - HT_SPACE;

    mutate(&good, &bad, |b| b.truncate(len - 100));
    expect_err(&bad, "trailer");
    mutate(&good, &bad, |b| b.truncate(1000));
    expect_err(&bad, "too small");
    mutate(&good, &bad, |b| b[0] = b'X');
    expect_err(&bad, "magic");
    // index said to start past the trailer
    mutate(&good, &bad, |b| {
        let mut t = HeaderTrailer::decode(&b[trailer..]).unwrap();
        t.index_offset = len as u64 * 2;
        b[trailer..].copy_from_slice(&t.encode());
    });
    expect_err(&bad, "does not fit");
    // absurd entry count: refused before allocating
    mutate(&good, &bad, |b| {
        let mut t = HeaderTrailer::decode(&b[trailer..]).unwrap();
        t.index_size = u64::MAX / 16;
        b[trailer..].copy_from_slice(&t.encode());
    });
    expect_err(&bad, "exceeds the maximum");
    // a virtual size that is not whole sectors, or beyond what LSMT addresses
    for vsize in [1000, u64::MAX] {
        mutate(&good, &bad, |b| {
            let mut t = HeaderTrailer::decode(&b[trailer..]).unwrap();
            t.virtual_size = vsize;
            b[trailer..].copy_from_slice(&t.encode());
        });
        expect_err(
            &bad,
            &format!("virtual size {vsize} is not a multiple of 512"),
        );
    }
    // a virtual size smaller than what the index maps (header and trailer
    // both patched, as a tool would): the layer is not a 4 KiB disk
    mutate(&good, &bad, |b| {
        for at in [0, trailer] {
            let mut h = HeaderTrailer::decode(&b[at..]).unwrap();
            h.virtual_size = 4096;
            b[at..at + HT_SPACE].copy_from_slice(&h.encode());
        }
    });
    expect_err(
        &bad,
        "index entry 0 maps bytes 4096..69632 beyond the virtual size of 4096 bytes",
    );
    // ... also compressed: the ZFile holds the same LSMT blob
    let zbad = dir.path().join("bad.zfile");
    let mut w = blockdev::zfile::ZFileWriter::new(
        blockdev::source::VecSink::default(),
        ZfileOptions::default(),
    )
    .unwrap();
    w.write(&std::fs::read(&bad).unwrap()).unwrap();
    std::fs::write(&zbad, w.finish().unwrap().0).unwrap();
    expect_err(&zbad, "beyond the virtual size of 4096 bytes");
    // an entry whose data lies beyond the data area
    mutate(&good, &bad, |b| {
        let t = HeaderTrailer::decode(&b[trailer..]).unwrap();
        let io = t.index_offset as usize;
        let mut m = Mapping::decode(&b[io..io + 16]);
        m.moffset = 1 << 40;
        b[io..io + 16].copy_from_slice(&m.encode());
    });
    // (in bytes, like every other offset in these messages)
    let data_end = HeaderTrailer::decode(&std::fs::read(&good).unwrap()[trailer..])
        .unwrap()
        .index_offset;
    expect_err(
        &bad,
        &format!(
            "index entry 0 maps layer bytes 562949953421312..562949953486848 outside the data area (bytes 4096..{data_end})"
        ),
    );
    // ... also at the largest mapped offset, whose byte offset does not
    // fit in 64 bits
    mutate(&good, &bad, |b| {
        let t = HeaderTrailer::decode(&b[trailer..]).unwrap();
        let io = t.index_offset as usize;
        let mut m = Mapping::decode(&b[io..io + 16]);
        m.moffset = MAX_MOFFSET;
        b[io..io + 16].copy_from_slice(&m.encode());
    });
    expect_err(
        &bad,
        "index entry 0 maps layer bytes 18446744073709551104..18446744073709616640 outside",
    );
    // overlapping / unsorted entries
    mutate(&good, &bad, |b| {
        let t = HeaderTrailer::decode(&b[trailer..]).unwrap();
        let io = t.index_offset as usize;
        let m0 = Mapping::decode(&b[io..io + 16]);
        let mut m1 = Mapping::decode(&b[io + 16..io + 32]);
        m1.offset = m0.offset;
        b[io + 16..io + 32].copy_from_slice(&m1.encode());
    });
    expect_err(
        &bad,
        "index entry 1 (device bytes 4096..12288) overlaps or is out of order with the previous one (which ends at byte 69632)",
    );
}

#[test]
fn zfile_layer_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_layer(dir.path(), true);
    open_layer(&good).unwrap();
    let bad = dir.path().join("bad.zfile");
    let len = std::fs::metadata(&good).unwrap().len() as usize;
    mutate(&good, &bad, |b| b.truncate(len - 50));
    expect_err(&bad, "does not fit");
    mutate(&good, &bad, |b| b[600] ^= 0x40);
    expect_err(&bad, "checksum");
    // a jump-table entry claiming an enormous block
    mutate(&good, &bad, |b| {
        let io = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
        b[io..io + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    expect_err(&bad, "checksum mismatch");
}

#[test]
fn writable_layer_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = (dir.path().join("d"), dir.path().join("i"));
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    // an index entry pointing past the end of the data file
    let mut idx = std::fs::read(&i).unwrap();
    idx.extend_from_slice(&Mapping::new(0, 8, 1 << 30).encode());
    std::fs::write(&i, &idx).unwrap();
    let e = WritableLayer::open(&d, &i).unwrap_err().to_string();
    assert!(
        e.contains(&i.display().to_string())
            && e.contains(
                "entry 0 maps data file bytes 549755813888..549755817984 outside the data file (data at bytes 4096..4096, the file is 4096 bytes)"
            ),
        "{e}"
    );
    // an entry beyond the virtual size (1 MiB) of the layer
    let mut idx = std::fs::read(&i).unwrap();
    idx.truncate(HT_SPACE);
    idx.extend_from_slice(&Mapping::new(2048, 8, 8).encode());
    std::fs::write(&i, &idx).unwrap();
    {
        let mut data = std::fs::read(&d).unwrap();
        data.resize(HT_SPACE + 4096, 0);
        std::fs::write(&d, data).unwrap();
    }
    let e = WritableLayer::open(&d, &i).unwrap_err().to_string();
    assert!(
        e.contains(&i.display().to_string())
            && e.contains(
                "entry 0 maps bytes 1048576..1052672 beyond the virtual size of 1048576 bytes"
            ),
        "{e}"
    );
    // a data file that is not an LSMT file
    std::fs::write(&d, vec![0u8; 8192]).unwrap();
    let e = WritableLayer::open(&d, &i).unwrap_err().to_string();
    assert!(
        e.contains(&d.display().to_string()) && e.contains("magic"),
        "{e}"
    );
    let e = commit_writable(&d, &i, &dir.path().join("o"), &CommitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("magic"), "{e}");
    assert!(!dir.path().join("o").exists());
    // a missing file
    let e = testutil::assert_clean_chain(&open_layer(&dir.path().join("nope")).unwrap_err());
    assert!(e.contains("nope") && e.contains("No such file"), "{e}");
}

/// A writable layer whose header claims a virtual size its index cannot
/// address (a flipped top bit of the size, say) is refused when opened:
/// accepted, a write past 2^59 bytes was stored under an offset cut to the
/// index's 50 bits and came back over the start of the disk after a reopen.
#[test]
fn writable_layer_with_an_impossible_virtual_size() {
    use blockdev::lsmt::format::{MAX_OFFSET, SECTOR};
    let dir = tempfile::tempdir().unwrap();
    let set_vsize = |p: &Path, vsize: u64| {
        let mut b = std::fs::read(p).unwrap();
        let mut h = HeaderTrailer::decode(&b).unwrap();
        h.virtual_size = vsize;
        b[..HT_SPACE].copy_from_slice(&h.encode());
        std::fs::write(p, b).unwrap();
    };
    for sparse in [false, true] {
        let (d, i) = (
            dir.path().join(format!("d{sparse}")),
            dir.path().join(format!("i{sparse}")),
        );
        create_writable(
            &d,
            &i,
            &CreateOptions {
                virtual_size: 1 << 20,
                sparse,
                ..Default::default()
            },
        )
        .unwrap();
        // The largest size every sector of which an index entry can map is fine.
        set_vsize(&d, MAX_OFFSET * SECTOR);
        WritableLayer::open(&d, &i).unwrap();
        for vsize in [1 << 63, (MAX_OFFSET + 1) * SECTOR, (1 << 20) + 1] {
            set_vsize(&d, vsize);
            let e = testutil::assert_clean_chain(&WritableLayer::open(&d, &i).unwrap_err());
            assert!(
                e.contains(&d.display().to_string())
                    && e.contains(&format!("virtual size {vsize} is not a multiple of 512")),
                "{e}"
            );
            let o = dir.path().join("o");
            let e = commit_writable(&d, &i, &o, &CommitOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("virtual size"), "{e}");
            assert!(!o.exists());
        }
    }
    // A warp layer's size is in its index file's header.
    let (d, i) = (dir.path().join("wd"), dir.path().join("wi"));
    blockdev::lsmt::writable::create_warp(&d, &i, 1 << 20, None).unwrap();
    set_vsize(&i, 1 << 63);
    let e =
        testutil::assert_clean_chain(&WritableLayer::open_warp(&d, &i, None, true).unwrap_err());
    assert!(
        e.contains(&i.display().to_string()) && e.contains("virtual size 9223372036854775808"),
        "{e}"
    );
}

/// A writable layer is not created with a virtual size its index cannot address:
/// opening it would refuse it (see above), so the files would be useless.
#[test]
fn writable_layer_is_not_created_with_an_impossible_virtual_size() {
    use blockdev::lsmt::format::{MAX_OFFSET, SECTOR};
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = (dir.path().join("d"), dir.path().join("i"));
    for vsize in [(MAX_OFFSET + 1) * SECTOR, 1 << 63] {
        let e = create_writable(
            &d,
            &i,
            &CreateOptions {
                virtual_size: vsize,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "virtual size {vsize} is not a multiple of 512 up to"
            )),
            "{e}"
        );
        assert!(!d.exists() && !i.exists());
        let e = blockdev::lsmt::writable::create_warp(&d, &i, vsize, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "virtual size {vsize} is not a multiple of 512 up to"
            )),
            "{e}"
        );
        assert!(!d.exists() && !i.exists());
    }
    // The largest addressable size is created, and opens.
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: MAX_OFFSET * SECTOR,
            ..Default::default()
        },
    )
    .unwrap();
    WritableLayer::open(&d, &i).unwrap();
}

/// A data file with the index of another layer (the uuids differ) is refused
/// instead of committing garbage; a sparse layer's index file must exist.
#[test]
fn writable_files_of_different_layers() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    for (d, i) in [("da", "ia"), ("db", "ib")] {
        create_writable(
            &p(d),
            &p(i),
            &CreateOptions {
                virtual_size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
    }
    WritableLayer::open(&p("da"), &p("ia")).unwrap();
    let e = testutil::assert_clean_chain(&WritableLayer::open(&p("da"), &p("ib")).unwrap_err());
    assert!(
        e.contains(&p("ib").display().to_string())
            && e.contains("index of another layer")
            && e.contains(&p("da").display().to_string()),
        "{e}"
    );
    let e = commit_writable(&p("da"), &p("ib"), &p("o"), &CommitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("index of another layer"), "{e}");
    assert!(!p("o").exists());
    create_writable(
        &p("ds"),
        &p("is"),
        &CreateOptions {
            virtual_size: 1 << 20,
            sparse: true,
            ..Default::default()
        },
    )
    .unwrap();
    WritableLayer::open(&p("ds"), &p("is")).unwrap();
    let e = testutil::assert_clean_chain(
        &WritableLayer::open(&p("ds"), &p("no-such-index")).unwrap_err(),
    );
    assert!(
        e.contains("no-such-index") && e.contains("No such file"),
        "{e}"
    );
    let e = WritableLayer::open(&p("ds"), dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

/// An upper smaller than its lowers cannot hold their filesystem: said so when
/// the stack opens, not as a read beyond the device later.
#[test]
fn upper_smaller_than_its_lowers() {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = (dir.path().join("d"), dir.path().join("i"));
    create_writable(
        &d,
        &i,
        &CreateOptions {
            virtual_size: 1 << 30,
            sparse: true,
            ..Default::default()
        },
    )
    .unwrap();
    let lower = testutil::fixtures().join("baselayer/ext4_64");
    let e = blockdev::Stack::open(std::slice::from_ref(&lower), Some((&d, &i)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("smaller than its lower layers' 68719476736 bytes"),
        "{e}"
    );
    // As large or 0 (take the lowers') is fine.
    let (d0, i0) = (dir.path().join("d0"), dir.path().join("i0"));
    create_writable(
        &d0,
        &i0,
        &CreateOptions {
            sparse: true,
            ..Default::default()
        },
    )
    .unwrap();
    blockdev::Stack::open(&[lower], Some((&d0, &i0))).unwrap();
}

#[test]
fn tar_wrapper_claiming_too_much_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = blockdev::tarwrap::header_blocks(10 << 20).to_vec();
    b.extend_from_slice(&[0u8; 4096]);
    let p = dir.path().join("w.tar");
    std::fs::write(&p, b).unwrap();
    let e = open_layer(&p).unwrap_err().to_string();
    assert!(e.contains("w.tar") && e.contains("10485760"), "{e}");
}

/// More lowers than can be stacked are refused before any is opened (the last
/// one here is no layer: it is never reached), not after opening them all.
#[test]
fn too_many_lowers_are_refused_before_any_opens() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_layer(dir.path(), true);
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a layer").unwrap();
    let mut lowers = vec![good; 299];
    lowers.push(junk);
    let e = testutil::assert_clean_chain(&Stack::open(&lowers, None).unwrap_err());
    assert!(
        e.contains("300 lower layers; at most 255 can be stacked"),
        "{e}"
    );
}
