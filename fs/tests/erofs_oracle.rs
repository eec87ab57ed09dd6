//! Byte-for-byte comparison with erofs-utils itself (the library upstream
//! overlaybd builds, driven as turboOCI-apply drives it), beyond the two
//! reference fixtures: every layer of the upstream-compatible variant of
//! the rich test set (`make-erofs-layers.py --upstream`) and of the fixture
//! pair must give the same metadata sectors and target mappings.
//!
//! Needs the oracle binary (`tests/fs/erofs-oracle/build.sh` over an
//! erofs-utils eec6f7a2 source tree), so it only runs on request:
//! `EROFS_ORACLE=/path/to/driver cargo test --release -p overlaybd-fs
//! --test erofs_oracle -- --ignored`.

mod erofs_common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use erofs_common::*;
use obdfs::erofs::{build_layer, BuildOptions};

/// Run the oracle on `tar` over the lower image `lower`.
fn oracle(bin: &Path, tar: &Path, lower: &Sectors, work: &Path) -> (Sectors, Maps) {
    let lower_img = work.join("lower.img");
    let arg = if lower.is_empty() {
        "-".to_string()
    } else {
        let mut f = std::fs::File::create(&lower_img).unwrap();
        for (sec, d) in lower {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(sec * 512)).unwrap();
            f.write_all(d).unwrap();
        }
        lower_img.to_str().unwrap().to_string()
    };
    let out = work.join("out");
    let o = std::process::Command::new(bin)
        .arg(tar)
        .arg(&arg)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "oracle on {}: {}",
        tar.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let raw = std::fs::read(out.with_extension("sectors")).unwrap();
    let mut secs = BTreeMap::new();
    for rec in raw.chunks(520) {
        let no = u64::from_le_bytes(rec[..8].try_into().unwrap());
        secs.insert(no, rec[8..].try_into().unwrap());
    }
    let mut maps: Maps = std::fs::read_to_string(out.with_extension("maps"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    maps.sort();
    (secs, maps)
}

fn compare_stack(bin: &Path, name: &str, tars: &[PathBuf]) {
    let work = tempfile::tempdir().unwrap();
    let (mut ours_lower, mut theirs_lower) = (Sectors::new(), Sectors::new());
    for (i, t) in tars.iter().enumerate() {
        let dev = RecordingDevice::new(ours_lower.clone());
        build_layer(
            dev.clone(),
            std::fs::File::open(t).unwrap(),
            &BuildOptions { incremental: i > 0 },
        )
        .unwrap();
        let (secs, maps) = oracle(bin, t, &theirs_lower, work.path());
        let d = diff_sectors(&dev.written(), &secs);
        assert!(d.is_empty(), "{name} layer {}: {}", i + 1, d.join("\n"));
        assert_eq!(dev.mappings(), maps, "{name} layer {}: mappings", i + 1);
        eprintln!(
            "{name} layer {}: {} sectors, {} mappings: identical",
            i + 1,
            secs.len(),
            maps.len()
        );
        ours_lower = dev.merged();
        theirs_lower.extend(secs);
    }
}

#[test]
#[ignore = "needs EROFS_ORACLE, an erofs-utils build (tests/fs/erofs-oracle/build.sh)"]
fn same_bytes_as_erofs_utils() {
    let bin = PathBuf::from(std::env::var_os("EROFS_ORACLE").expect("EROFS_ORACLE"));
    compare_stack(
        &bin,
        "fixture",
        &[
            testutil::fixtures().join("input.tar"),
            turbo_fixtures().join("ext4-gzip-2/layer.tar"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fs/make-erofs-layers.py");
    let st = std::process::Command::new("python3")
        .arg(&script)
        .arg("--upstream")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let tars: Vec<PathBuf> = ["layer1.tar", "layer2.tar", "layer3.tar"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    compare_stack(&bin, "rich --upstream", &tars);
    // More layers to compare, e.g. a tar of /usr/share and an upper layer:
    // EROFS_ORACLE_LAYERS=bottom.tar:upper.tar
    if let Some(extra) = std::env::var_os("EROFS_ORACLE_LAYERS") {
        let tars: Vec<PathBuf> = std::env::split_paths(&extra).collect();
        compare_stack(&bin, "EROFS_ORACLE_LAYERS", &tars);
    }
}
