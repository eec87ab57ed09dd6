//! Benchmark helpers: deterministic, realistically compressible layer data.

/// `len` bytes that compress roughly like filesystem content (about 2:1
/// with lz4): runs of text-like bytes mixed with pseudo-random ones.
pub fn layer_like_data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    let words: [&[u8]; 8] = [
        b"the ",
        b"overlaybd ",
        b"layer ",
        b"block ",
        b"\0\0\0\0\0\0\0\0",
        b"ext4 ",
        b"data ",
        b"zfile ",
    ];
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x % 8) as usize]);
        }
    }
    out.truncate(len);
    out
}

/// A synthetic OCI layer tar: `files` regular files (sizes from a few
/// bytes to ~200 KiB, about 8 KiB on average) in a tree of directories
/// 3 levels deep, with some symlinks and hard links, like a distribution's
/// /usr. Deterministic.
pub fn synthetic_layer(files: usize, seed: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ndirs = (files / 40).max(1);
    let mut dirs = Vec::new();
    let hdr = |ty: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    for d in 0..ndirs {
        let p = format!("usr/share/pkg-{:03}/sub-{:02}/", d / 20, d % 20);
        if d % 20 == 0 {
            let parent = format!("usr/share/pkg-{:03}/", d / 20);
            b.append_data(
                &mut hdr(tar::EntryType::Directory, 0o755, 0),
                &parent,
                &[][..],
            )
            .unwrap();
        }
        b.append_data(&mut hdr(tar::EntryType::Directory, 0o755, 0), &p, &[][..])
            .unwrap();
        dirs.push(p);
    }
    let data = layer_like_data(256 << 10, seed);
    for i in 0..files {
        let dir = &dirs[i % ndirs];
        let r = next();
        let size = match r % 10 {
            0..=5 => (r >> 8) % 4096,
            6..=8 => (r >> 8) % 32768,
            _ => (r >> 8) % (200 << 10),
        } as usize;
        let name = format!("{dir}file-{i:06}-{}.txt", r % 1000);
        match r % 50 {
            0 => {
                let mut h = hdr(tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name("../README").unwrap();
                b.append_data(&mut h, &name, &[][..]).unwrap();
            }
            _ => {
                let mut h = hdr(tar::EntryType::Regular, 0o644, size as u64);
                b.append_data(&mut h, &name, &data[..size]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}
