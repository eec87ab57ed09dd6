//! The gzip index (`gzip.meta`): byte-identical to upstream's, and random
//! reads through it give the uncompressed tar.

use std::path::{Path, PathBuf};

use blockdev::gzindex::{self, GzFile};
use blockdev::source::ReadAt;

fn fixtures() -> PathBuf {
    testutil::turbo_fixtures()
}

fn input_tar() -> PathBuf {
    testutil::fixtures().join("input.tar")
}

fn check_case(case: &str, tar: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let blob = fixtures().join(case).join("layer.tar.gz");
    let out = dir.path().join("gzip.meta");
    let info = gzindex::build_file(&blob, &out).unwrap();
    let ours = std::fs::read(&out).unwrap();
    let theirs = std::fs::read(fixtures().join(case).join("gzip.meta")).unwrap();
    assert_eq!(ours.len(), theirs.len(), "{case}: gzip.meta size");
    assert!(ours == theirs, "{case}: gzip.meta differs from upstream's");
    let plain = std::fs::read(tar).unwrap();
    assert_eq!(info.uncompressed_size, plain.len() as u64);
    // One pass: the tar handed out while the index is built, the blob
    // arriving in small pieces and read out in odd sizes, gives the same
    // index and the tar.
    let gz_bytes = std::fs::read(&blob).unwrap();
    let trickle = Trickle(&gz_bytes[..], 1000);
    let mut ix = gzindex::Indexer::new(
        trickle,
        &blob,
        std::io::Cursor::new(Vec::new()),
        gzindex::DEFAULT_SPAN,
    )
    .unwrap();
    let mut tar_out = Vec::new();
    let mut buf = [0u8; 777];
    // Stop reading part way: finish inflates the rest itself.
    while tar_out.len() < plain.len() * 2 / 3 {
        let n = ix.read_uncompressed(&mut buf).unwrap();
        assert!(n > 0);
        tar_out.extend_from_slice(&buf[..n]);
    }
    assert!(
        tar_out[..] == plain[..tar_out.len()],
        "{case}: streamed tar"
    );
    let (info2, w) = ix.finish().unwrap();
    assert_eq!(info2, info);
    assert!(w.into_inner() == theirs, "{case}: streamed gzip.meta");
    let mut ix = gzindex::Indexer::new(
        Trickle(&gz_bytes[..], 3000),
        &blob,
        std::io::Cursor::new(Vec::new()),
        gzindex::DEFAULT_SPAN,
    )
    .unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut ix, &mut all).unwrap();
    assert!(all == plain, "{case}: the whole tar through Read");
    assert!(ix.finish().unwrap().1.into_inner() == theirs);
    // Random reads through upstream's index equal the tar.
    let gz = GzFile::open_paths(&blob, &fixtures().join(case).join("gzip.meta")).unwrap();
    assert_eq!(gz.size(), plain.len() as u64);
    let mut x = 12345u64;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % plain.len() as u64;
        let len = ((x >> 8) % 300_000) as usize;
        let mut buf = vec![0u8; len];
        let n = gz.read_at(&mut buf, off).unwrap();
        let want = &plain[off as usize..(off as usize + len).min(plain.len())];
        assert_eq!(&buf[..n], want, "{case}: read {len} at {off}");
    }
}

/// A reader handing out at most `.1` bytes per read (a download arriving).
struct Trickle<'a>(&'a [u8], usize);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = buf.len().min(self.1).min(self.0.len());
        buf[..k].copy_from_slice(&self.0[..k]);
        self.0 = &self.0[k..];
        Ok(k)
    }
}

#[test]
fn gzip_meta_matches_upstream_ext4_gzip() {
    check_case("ext4-gzip", &input_tar());
}

#[test]
fn gzip_meta_matches_upstream_ext4_gzip_2() {
    check_case("ext4-gzip-2", &fixtures().join("ext4-gzip-2/layer.tar"));
}

#[test]
fn truncated_gzip_blob_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixtures().join("ext4-gzip/layer.tar.gz")).unwrap();
    let blob = dir.path().join("short.tar.gz");
    std::fs::write(&blob, &full[..full.len() / 2]).unwrap();
    let out = dir.path().join("gzip.meta");
    let e = gzindex::build_file(&blob, &out).unwrap_err().to_string();
    assert!(
        e.contains("short.tar.gz") && e.contains("ends early"),
        "{e}"
    );
    assert!(!out.exists(), "a failed build leaves no index behind");
    // Not gzip at all.
    let plain = dir.path().join("plain.bin");
    std::fs::write(&plain, vec![7u8; 5000]).unwrap();
    let e = gzindex::build_file(&plain, &out).unwrap_err().to_string();
    assert!(e.contains("plain.bin") && e.contains("invalid gzip"), "{e}");
}

/// A multi-member gzip (members concatenated, RFC 1952) is refused when
/// its first member ends, before the uncompressed stream reports its end:
/// the index covers one member only (upstream's too), so the rest of the
/// layer would be silently missing. Other trailing bytes stay accepted.
#[test]
fn multi_member_gzip_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one = std::fs::read(fixtures().join("ext4-gzip-2/layer.tar.gz")).unwrap();
    let plain = std::fs::read(fixtures().join("ext4-gzip-2/layer.tar")).unwrap();
    let two = [&one[..], &one[..]].concat();
    let blob = dir.path().join("two-members.tar.gz");
    std::fs::write(&blob, &two).unwrap();
    let out = dir.path().join("gzip.meta");
    let e = gzindex::build_file(&blob, &out).unwrap_err().to_string();
    assert!(
        e.contains("two-members.tar.gz") && e.contains("multi-member gzip is not supported"),
        "{e}"
    );
    assert!(
        e.contains(&format!("compressed offset {}", one.len())),
        "{e}"
    );
    assert!(!out.exists(), "a failed build leaves no index behind");
    // Streaming: the first member's bytes, then the error instead of the end.
    for piece in [1, 7, 4096] {
        let mut ix = gzindex::Indexer::new(
            Trickle(&two[..], piece),
            &blob,
            std::io::Cursor::new(Vec::new()),
            gzindex::DEFAULT_SPAN,
        )
        .unwrap();
        let mut got = Vec::new();
        let e = std::io::Read::read_to_end(&mut ix, &mut got).unwrap_err();
        assert!(e.to_string().contains("multi-member"), "{piece}: {e}");
        assert!(got.len() <= plain.len() && got[..] == plain[..got.len()]);
    }
    // Trailing bytes that are not a gzip member are counted, as upstream does.
    let padded = dir.path().join("padded.tar.gz");
    std::fs::write(&padded, [&one[..], &[0u8; 100][..]].concat()).unwrap();
    let info = gzindex::build_file(&padded, &out).unwrap();
    assert_eq!(info.gzip_size, one.len() as u64 + 100);
    assert_eq!(info.uncompressed_size, plain.len() as u64);
    // Where the member ends is told, so that a caller can refuse them (the convertor).
    assert_eq!(info.member_size, one.len() as u64);
    let info = gzindex::build_file(&fixtures().join("ext4-gzip-2/layer.tar.gz"), &out).unwrap();
    assert_eq!(
        (info.member_size, info.gzip_size),
        (one.len() as u64, one.len() as u64)
    );
}

#[test]
fn corrupt_index_files_are_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let blob = fixtures().join("ext4-gzip/layer.tar.gz");
    let good = std::fs::read(fixtures().join("ext4-gzip/gzip.meta")).unwrap();
    let idx = dir.path().join("bad.meta");
    let open = |bytes: &[u8]| {
        std::fs::write(&idx, bytes).unwrap();
        GzFile::open_paths(&blob, &idx).unwrap_err().to_string()
    };
    for (what, bytes, want) in [
        ("short", good[..100].to_vec(), "smaller than"),
        ("truncated", good[..good.len() - 10].to_vec(), "file size"),
        (
            "magic",
            [b"XXgzidx\0".as_slice(), &good[8..]].concat(),
            "magic",
        ),
        (
            "crc",
            {
                let mut b = good.clone();
                b[30] ^= 1;
                b
            },
            "checksum",
        ),
        (
            "table",
            {
                let mut b = good.clone();
                let n = b.len();
                b[n - 5] ^= 0xff;
                b
            },
            "entry table",
        ),
    ] {
        let e = open(&bytes);
        assert!(e.contains("bad.meta") && e.contains(want), "{what}: {e}");
    }
    // An index for another blob.
    let other = fixtures().join("ext4-gzip-2/layer.tar.gz");
    let e = GzFile::open_paths(&other, &fixtures().join("ext4-gzip/gzip.meta"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("2806383"), "{e}");
    // A damaged window is reported when read.
    let mut b = good.clone();
    b[400] ^= 0xff;
    std::fs::write(&idx, &b).unwrap();
    let gz = GzFile::open_paths(&blob, &idx).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = gz.read_at(&mut buf, 1_100_000).unwrap_err().to_string();
    assert!(e.contains("bad.meta") && e.contains("window"), "{e}");
}

/// The first access point must be the start of the stream: a read before
/// an index's first point had nothing to start inflating from (and panicked
/// with a subtraction overflow).
#[test]
fn first_access_point_past_the_start_is_rejected() {
    use gzindex::{Header, ENTRY_SIZE, HEADER_SIZE, WINDOW};
    let dir = tempfile::tempdir().unwrap();
    let blob = fixtures().join("ext4-gzip/layer.tar.gz");
    let good = std::fs::read(fixtures().join("ext4-gzip/gzip.meta")).unwrap();
    let mut h = Header::decode(good[..HEADER_SIZE].try_into().unwrap());
    // One access point at uncompressed offset 100, with a raw window and a
    // raw entry table (dict_compress_algo 0).
    let table_at = HEADER_SIZE + WINDOW;
    h.dict_compress_algo = 0;
    h.index_num = 1;
    h.index_start = table_at as i64;
    h.index_area_len = ENTRY_SIZE as i64;
    h.index_file_size = (table_at + ENTRY_SIZE) as i64;
    let mut b = h.encode().to_vec();
    b.resize(table_at, 0);
    b.extend_from_slice(&100u64.to_le_bytes()); // uncompressed offset
    b.extend_from_slice(&10u64.to_le_bytes()); // compressed offset
    b.extend_from_slice(&(HEADER_SIZE as u64).to_le_bytes()); // window offset
    b.push(0); // bits
    b.extend_from_slice(&(WINDOW as u32).to_le_bytes());
    let idx = dir.path().join("late-start.meta");
    std::fs::write(&idx, &b).unwrap();
    let e = match GzFile::open_paths(&blob, &idx) {
        Ok(gz) => {
            let mut buf = vec![0u8; 10];
            let r = gz.read_at(&mut buf, 0);
            panic!("opened; a read at 0 gave {r:?}");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("late-start.meta") && e.contains("entry 0") && e.contains("uncompressed 100"),
        "{e}"
    );
}

/// Sizes in an index header are bounded before anything is allocated for
/// them: an uncompressed size no gzip blob of this size can hold, and an
/// entry table larger than its entries take (a sparse terabyte file: the
/// table was allocated whole, and the allocation aborted the process).
#[test]
fn index_sizes_are_bounded_before_allocating() {
    use gzindex::{Header, HEADER_SIZE};
    let dir = tempfile::tempdir().unwrap();
    let blob = fixtures().join("ext4-gzip/layer.tar.gz");
    let blob_size = std::fs::metadata(&blob).unwrap().len() as i64;
    let good = std::fs::read(fixtures().join("ext4-gzip/gzip.meta")).unwrap();
    let idx = dir.path().join("huge.meta");

    let mut h = Header::decode(good[..HEADER_SIZE].try_into().unwrap());
    h.uncompressed_size = blob_size * 2000;
    std::fs::write(&idx, [&h.encode()[..], &good[HEADER_SIZE..]].concat()).unwrap();
    let e = GzFile::open_paths(&blob, &idx).unwrap_err().to_string();
    assert!(e.contains("huge.meta") && e.contains("can hold"), "{e}");

    let mut h = Header::decode(good[..HEADER_SIZE].try_into().unwrap());
    let len = 1i64 << 40;
    h.index_area_len = len;
    h.index_file_size = h.index_start + len;
    let f = std::fs::File::create(&idx).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &h.encode(), 0).unwrap();
    f.set_len(h.index_file_size as u64).unwrap();
    drop(f);
    let e = GzFile::open_paths(&blob, &idx).unwrap_err().to_string();
    assert!(e.contains("huge.meta") && e.contains("entry table"), "{e}");
}
