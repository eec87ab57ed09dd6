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
    // Relative paths stay relative to the current directory, as upstream opens
    // them (not to the config's directory).
    assert_eq!(
        (u.data, u.index, u.target),
        (PathBuf::from("d"), PathBuf::from("i"), None)
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

/// A layer blob of an OCI layout that is a FIFO is refused naming it, at
/// once (the open waited for a writer: `overlaybd-fuse oci:DIR` hung).
#[test]
fn a_fifo_blob_in_an_oci_layout_is_refused() {
    use obdoci::layout::Layout;
    use obdoci::Descriptor;
    let t = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(t.path()).unwrap();
    let layer = layout.write_blob_bytes(b"not read").unwrap();
    let config = layout.write_blob_bytes(b"{}").unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer.to_string(), "size": 8,
                    "annotations": {"containerd.io/snapshot/overlaybd/blob-digest":
                                    layer.to_string()}}],
    }))
    .unwrap();
    let d = layout.write_blob_bytes(&manifest).unwrap();
    let desc = Descriptor::new(
        "application/vnd.oci.image.manifest.v1+json",
        d,
        manifest.len() as u64,
    );
    layout.tag("v1", &desc).unwrap();
    let blob = layout.blob_path(&layer);
    std::fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let arg = format!("oci:{}:v1", t.path().display());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = ImageSpec::from_args(&[arg], None, &Default::default()).map(|_| ());
        let _ = tx.send(r);
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("opening the layout still blocked after 10 s")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&blob.display().to_string()) && e.contains("it is a FIFO"),
        "{e}"
    );
}

/// A config.json naming more lowers than can be stacked (255) is refused before
/// any of them is opened: each open layer holds a file and its index (~35 KB
/// for a small ZFile), so a 10 MB config of 190,000 lowers took gigabytes, or
/// ran out of file descriptors, before the count was checked. Here the last
/// lower is not a layer at all: it must not be reached.
#[test]
fn too_many_lowers_are_refused_before_any_opens() {
    let t = tempfile::tempdir().unwrap();
    let good = testutil::fixtures().join("baselayer/commit.lz4.zfile");
    let junk = t.path().join("junk");
    std::fs::write(&junk, b"not a layer").unwrap();
    let mut files = vec![good.display().to_string(); 299];
    files.push(junk.display().to_string());
    let lowers: Vec<String> = files
        .iter()
        .map(|f| format!(r#"{{"file":"{f}"}}"#))
        .collect();
    let cfg = t.path().join("config.json");
    std::fs::write(&cfg, format!(r#"{{"lowers":[{}]}}"#, lowers.join(","))).unwrap();
    for args in [vec![cfg.display().to_string()], files] {
        let e = ImageSpec::from_args(&args, None, &Default::default())
            .unwrap()
            .open(false)
            .unwrap_err();
        let e = testutil::assert_clean_chain(&e);
        assert!(
            e.contains("300 lower layers; at most 255 can be stacked"),
            "{e}"
        );
    }
}
