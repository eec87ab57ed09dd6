//! Helpers of the EROFS tests: a recording sparse device, the TurboOCI
//! fixtures' LSMT files decoded with their tags, image assembly.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockdev::lsmt::format::{decode_entries, HeaderTrailer, HT_SPACE, SECTOR};
use blockdev::{BlockDevice, Result as BdResult};

pub const S: usize = 512;
pub type Sectors = BTreeMap<u64, [u8; S]>;
/// Target mappings: (device offset, length, offset in the tar).
pub type Maps = Vec<(u64, u64, u64)>;
/// One layer to assemble: its metadata sectors, its mappings, its tar.
pub type LayerParts<'a> = (&'a Sectors, &'a [(u64, u64, u64)], &'a Path);

/// The TurboOCI reference fixtures.
pub fn turbo_fixtures() -> PathBuf {
    testutil::turbo_fixtures()
}

/// A sparse 64 GiB device: reads see `base` (the lower layers) under what
/// was written; writes and target mappings are recorded.
pub struct RecordingDevice {
    pub size: u64,
    pub base: Sectors,
    pub written: Mutex<Sectors>,
    pub mappings: Mutex<Vec<(u64, u64, u64)>>,
}

impl RecordingDevice {
    pub fn new(base: Sectors) -> Arc<RecordingDevice> {
        Arc::new(RecordingDevice {
            size: 64 << 30,
            base,
            written: Mutex::new(BTreeMap::new()),
            mappings: Mutex::new(Vec::new()),
        })
    }

    pub fn written(&self) -> Sectors {
        self.written.lock().unwrap().clone()
    }

    pub fn mappings(&self) -> Vec<(u64, u64, u64)> {
        let mut m = self.mappings.lock().unwrap().clone();
        m.sort();
        m
    }

    /// base + written, as one sector map (the layer stack's metadata).
    pub fn merged(&self) -> Sectors {
        let mut m = self.base.clone();
        m.extend(self.written());
        m
    }
}

impl BlockDevice for RecordingDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BdResult<()> {
        blockdev::device::check_range(offset, buf.len() as u64, self.size)?;
        let w = self.written.lock().unwrap();
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let sec = pos / SECTOR;
            let o = (pos % SECTOR) as usize;
            let n = (S - o).min((end - pos) as usize);
            let b = (pos - offset) as usize;
            match w.get(&sec).or_else(|| self.base.get(&sec)) {
                Some(s) => buf[b..b + n].copy_from_slice(&s[o..o + n]),
                None => buf[b..b + n].fill(0),
            }
            pos += n as u64;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BdResult<()> {
        assert_eq!(offset % SECTOR, 0, "unaligned write at {offset}");
        assert_eq!(
            buf.len() % S,
            0,
            "partial-sector write of {} bytes",
            buf.len()
        );
        let mut w = self.written.lock().unwrap();
        for (i, c) in buf.chunks(S).enumerate() {
            w.insert(offset / SECTOR + i as u64, c.try_into().unwrap());
        }
        Ok(())
    }
    fn flush(&self) -> BdResult<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> BdResult<()> {
        unreachable!("the EROFS writer never trims")
    }
    fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> BdResult<()> {
        assert!(
            offset.is_multiple_of(SECTOR)
                && len.is_multiple_of(SECTOR)
                && target_offset.is_multiple_of(SECTOR)
        );
        self.mappings
            .lock()
            .unwrap()
            .push((offset, len, target_offset));
        Ok(())
    }
}

/// A TurboOCI `.fs.meta.lsmt` decoded with its tags: the tag-0 sectors
/// (device sector -> bytes) and the tag-1 mappings (offset, len, target
/// offset), all in bytes.
pub fn read_turbo_lsmt(path: &Path) -> (Sectors, Vec<(u64, u64, u64)>) {
    let f = std::fs::read(path).unwrap();
    let tr = HeaderTrailer::decode(&f[f.len() - HT_SPACE..]).expect("trailer");
    let start = tr.index_offset as usize;
    let raw = &f[start..start + tr.index_size as usize * 16];
    let mut tag0 = BTreeMap::new();
    let mut tag1 = Vec::new();
    for m in decode_entries(raw) {
        if m.is_padding() {
            continue;
        }
        assert!(!m.zeroed);
        match m.tag {
            0 => {
                for k in 0..m.length as u64 {
                    let src = ((m.moffset + k) * SECTOR) as usize;
                    tag0.insert(m.offset + k, f[src..src + S].try_into().unwrap());
                }
            }
            1 => tag1.push((
                m.offset * SECTOR,
                m.length as u64 * SECTOR,
                m.moffset * SECTOR,
            )),
            t => panic!("unexpected tag {t}"),
        }
    }
    (tag0, tag1)
}

/// Runs of sector numbers, for messages.
pub fn runs(secs: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in secs {
        match out.last_mut() {
            Some((a, n)) if *a + *n == s => *n += 1,
            _ => out.push((s, 1)),
        }
    }
    out.into_iter()
        .map(|(a, n)| (a * SECTOR, n * SECTOR))
        .collect()
}

/// Describe how two sector maps differ (empty when equal).
pub fn diff_sectors(got: &Sectors, want: &Sectors) -> Vec<String> {
    let mut out = Vec::new();
    let only_got = runs(got.keys().copied().filter(|k| !want.contains_key(k)));
    let only_want = runs(want.keys().copied().filter(|k| !got.contains_key(k)));
    if !only_got.is_empty() {
        out.push(format!(
            "written but not in the reference (byte offset, len): {only_got:?}"
        ));
    }
    if !only_want.is_empty() {
        out.push(format!("in the reference but not written: {only_want:?}"));
    }
    for (k, w) in want {
        if let Some(g) = got.get(k) {
            if g != w {
                let i = (0..S).find(|&i| g[i] != w[i]).unwrap();
                out.push(format!(
                    "sector at byte {} differs first at +{i}: got {:02x?} want {:02x?}",
                    k * SECTOR,
                    &g[i..(i + 16).min(S)],
                    &w[i..(i + 16).min(S)]
                ));
                if out.len() > 20 {
                    break;
                }
            }
        }
    }
    out
}

/// Write sectors into a sparse raw file and the tar data at the mapped
/// places: the flattened image of a TurboOCI EROFS stack.
pub fn assemble(out: &Path, layers: &[LayerParts<'_>]) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(out).unwrap();
    let mut end = 0u64;
    for (sectors, maps, tar) in layers {
        for (off, data) in runs_with_data(sectors) {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&data).unwrap();
            end = end.max(off + data.len() as u64);
        }
        let mut t = std::fs::File::open(tar).unwrap();
        for &(off, len, toff) in maps.iter() {
            let mut buf = vec![0u8; len as usize];
            t.seek(SeekFrom::Start(toff)).unwrap();
            let mut n = 0;
            while n < buf.len() {
                let k = t.read(&mut buf[n..]).unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&buf).unwrap();
            end = end.max(off + len);
        }
    }
    f.set_len(end.div_ceil(4096) * 4096).unwrap();
}

fn runs_with_data(s: &Sectors) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (k, d) in s {
        let off = k * SECTOR;
        match out.last_mut() {
            Some((o, v)) if *o + v.len() as u64 == off => v.extend_from_slice(d),
            _ => out.push((off, d.to_vec())),
        }
    }
    out
}

/// The tree of an EROFS image read with our reader, as a `treecmp.py`
/// manifest (path -> type, mode, uid, gid, mtime, xattrs, size + sha256,
/// target, rdev, link).
pub fn reader_manifest(r: &obdfs::erofs::ErofsReader) -> serde_json::Value {
    use obdfs::erofs::format::mode;
    use sha2::{Digest, Sha256};
    let mut entries: Vec<(String, obdfs::erofs::Inode)> = Vec::new();
    let mut stack = vec![(String::new(), r.root_nid())];
    while let Some((prefix, nid)) = stack.pop() {
        for e in r.read_dir(nid).unwrap() {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let name = String::from_utf8(e.name.clone()).expect("utf-8 names in tests");
            let path = format!("{prefix}{name}");
            let ino = r.inode(e.nid).unwrap();
            assert_eq!(
                ino.dirent_type(),
                e.file_type,
                "{path}: dirent type does not match the inode"
            );
            if ino.is_dir() {
                stack.push((format!("{path}/"), e.nid));
            }
            entries.push((path, ino));
        }
    }
    let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, i) in &entries {
        groups.entry(i.nid).or_default().push(p.clone());
    }
    let mut man = serde_json::Map::new();
    for (p, i) in &entries {
        let kind = match i.file_type() {
            mode::S_IFREG => "f",
            mode::S_IFDIR => "d",
            mode::S_IFLNK => "l",
            mode::S_IFCHR => "c",
            mode::S_IFBLK => "b",
            mode::S_IFIFO => "p",
            _ => "s",
        };
        let mut xattrs = serde_json::Map::new();
        let mut xs = r.xattrs_of(i).unwrap();
        xs.sort();
        for (k, v) in xs {
            xattrs.insert(String::from_utf8(k).unwrap(), hex(&v).into());
        }
        let mut e = serde_json::json!({
            "type": kind,
            "mode": i.mode & 0o7777,
            "uid": i.uid,
            "gid": i.gid,
            "mtime": format!("{}.{:09}", i.mtime as i64, i.mtime_nsec),
            "xattrs": xattrs,
        });
        match kind {
            "f" => {
                let data = r.read_all(i, 1 << 30).unwrap();
                e["size"] = data.len().into();
                e["sha256"] = hex(&Sha256::digest(&data)).into();
            }
            "l" => e["target"] = hex(&r.readlink(i.nid).unwrap()).into(),
            "c" | "b" => {
                let (ma, mi) = i.device();
                e["rdev"] = serde_json::json!([ma, mi]);
            }
            _ => {}
        }
        let g = &groups[&i.nid];
        if kind != "d" && g.len() > 1 {
            e["link"] = g.iter().min().unwrap().clone().into();
        }
        man.insert(p.clone(), e);
    }
    serde_json::Value::Object(man)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run `treecmp.py ARGS` and return its stdout.
pub fn treecmp_run(args: &[&str]) -> String {
    testutil::treecmp(args)
}

/// Compare two manifest files with `treecmp.py compare`; panics with the
/// differences.
pub fn assert_same_manifest(a: &Path, b: &Path, extra: &[&str]) {
    let mut args = vec!["compare", a.to_str().unwrap(), b.to_str().unwrap()];
    args.extend_from_slice(extra);
    testutil::treecmp(&args);
}

/// A read-only loop mount of an EROFS image.
pub struct ErofsMount(testutil::LoopMount);

impl ErofsMount {
    pub fn new(img: &Path, dir: &Path) -> ErofsMount {
        ErofsMount(testutil::LoopMount::new("erofs", img, dir))
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }
}
