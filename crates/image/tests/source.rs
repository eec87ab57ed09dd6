//! The source seam: a layer given as any `ReadAt` (here: the blob's bytes in
//! memory, as a registry blob fetched by range would be) opens to the same
//! disk as the layer file, tar wrapper and ZFile included.

use std::path::PathBuf;
use std::sync::Arc;

use blockdev::source::MemSource;
use blockdev::BlockDevice;
use obdimage::{ImageSpec, LayerBlob, LowerSpec};

#[test]
fn a_layer_read_through_readat_equals_the_file() {
    let b = testutil::fixtures().join("baselayer");
    let files = [b.join("ext4_64"), b.join("commit.lz4.zfile.tar")];
    let args: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let from_files = ImageSpec::from_args(&args, None, &Default::default())
        .unwrap()
        .open(false)
        .unwrap();
    let lowers = files
        .iter()
        .map(|p| {
            LowerSpec::layer(LayerBlob::Source(Arc::new(MemSource::new(
                std::fs::read(p).unwrap(),
                p.clone(),
            ))))
        })
        .collect();
    let spec = ImageSpec {
        lowers,
        upper: None,
        description: "in memory".into(),
        fetch_stats: None,
    };
    let from_mem = spec.open(false).unwrap();
    assert_eq!(from_files.size(), from_mem.size());
    let mut a = vec![0u8; 4 << 20];
    let mut c = vec![1u8; 4 << 20];
    for off in [0u64, 1 << 20, 128 << 20, 1 << 30] {
        from_files.read_at(&mut a, off).unwrap();
        from_mem.read_at(&mut c, off).unwrap();
        assert!(a == c, "differ at {off}");
    }
    // The ext4 superblock magic is there.
    from_mem.read_at(&mut a[..2], 1024 + 56).unwrap();
    assert_eq!(&a[..2], &[0x53, 0xef]);
}

#[test]
fn config_json_names_lowers_and_upper() {
    let t = tempfile::tempdir().unwrap();
    let b = testutil::fixtures().join("baselayer");
    let cfg = t.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"lowers":[{{"file":"{}"}}],"upper":{{"data":"d","index":"i"}}}}"#,
            b.join("ext4_64").display()
        ),
    )
    .unwrap();
    let s = ImageSpec::from_args(&[cfg.display().to_string()], None, &Default::default()).unwrap();
    assert_eq!(s.lowers.len(), 1);
    let u = s.upper.unwrap();
    assert_eq!(
        (u.data, u.index, u.target),
        (t.path().join("d"), t.path().join("i"), None)
    );
    let s = ImageSpec::from_args(
        &[cfg.display().to_string()],
        Some((PathBuf::from("/x/d"), PathBuf::from("/x/i"))),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(s.upper.unwrap().data, PathBuf::from("/x/d"));
    let e =
        ImageSpec::from_args(&["/no/such/layer".into()], None, &Default::default()).unwrap_err();
    assert!(
        e.to_string().contains("/no/such/layer: no such file"),
        "{e}"
    );
    // A directory is no layer file.
    let e = ImageSpec::from_args(&[t.path().display().to_string()], None, &Default::default())
        .unwrap_err();
    assert!(e.to_string().contains("not a layer file"), "{e}");
}
