//! TurboOCI v1 output of the convertor (`--turboOCI`, `--fstype ext4|erofs`) end to end:
//! a multi-layer Docker image (gzip and uncompressed layers, whiteouts, opaque dirs,
//! hardlinks, symlinks, xattrs, devices) is pushed to a real docker-registry, converted
//! to native and TurboOCI images in one run, and checked field by field against what
//! upstream's convertor writes. The TurboOCI stack is flattened through our layer stack
//! with the original blobs as targets (gzip ones read through their gzip.meta) and must
//! give the source image's tree: ext4 through `e2fsck -fn` and a loop mount, EROFS
//! through the kernel's erofs driver. A registry-free case converts upstream's
//! fixture layers from an OCI layout and compares `gzip.meta` and `<fs>.fs.meta` with
//! upstream's bytes.

mod common;

use blockdev::stack::LowerSource;
use blockdev::warp::TargetSource;
use common::convert::*;
use common::Registry;
use obdconvert::annotations::*;
use obdoci::model::*;
use obdoci::{Descriptor, Digest, Reference};
use obdregistry as registry;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn get_json(repo: &registry::Repository, tag: &str) -> (Descriptor, Value) {
    let (d, b) = repo.get_manifest(&Reference::Tag(tag.into())).unwrap();
    (d, serde_json::from_slice(&b).unwrap())
}

fn blob(repo: &registry::Repository, desc: &Value) -> Vec<u8> {
    let d: Descriptor = serde_json::from_value(desc.clone()).unwrap();
    repo.read_blob(&d, 1 << 30).unwrap()
}

fn sha(b: &[u8]) -> String {
    Digest::of(b).to_string()
}

/// The files of a `turboOCIv1.tar.gz` (name, bytes), in order, and the raw tar.
fn unpack(gz: &[u8]) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    let mut out = Vec::new();
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        // Go's header: name, mode, size, type only.
        assert_eq!(h.mode().unwrap(), 0o644);
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!(h.uid().unwrap(), 0);
        assert_eq!(h.entry_type(), tar::EntryType::Regular);
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        out.push((e.path().unwrap().display().to_string(), b));
    }
    (out, tar)
}

/// Checks a converted TurboOCI manifest against its source and writes, per layer, its
/// metadata file, gzip.meta and source blob into `dir`; returns the lowers to stack.
fn check_turbo(
    repo: &registry::Repository,
    src: &Value,
    out: &Value,
    fs: &str,
    dir: &Path,
) -> Vec<LowerSource> {
    assert_eq!(out["mediaType"], MT_DOCKER_MANIFEST);
    assert_eq!(out["config"]["mediaType"], MT_DOCKER_CONFIG);
    let sl = src["layers"].as_array().unwrap();
    let ol = out["layers"].as_array().unwrap();
    assert_eq!(sl.len(), ol.len(), "one TurboOCI layer per source layer");
    let scfg: Value = serde_json::from_slice(&blob(repo, &src["config"])).unwrap();
    let ocfg: Value = serde_json::from_slice(&blob(repo, &out["config"])).unwrap();
    let meta_name = format!("{fs}.fs.meta");
    let mut lowers = Vec::new();
    std::fs::create_dir_all(dir).unwrap();
    for (i, (s, l)) in sl.iter().zip(ol).enumerate() {
        assert_eq!(l["mediaType"], MT_DOCKER_LAYER_GZIP, "layer {i}");
        let digest = l["digest"].as_str().unwrap();
        let size = l["size"].as_u64().unwrap();
        let ann = l["annotations"].as_object().unwrap();
        assert_eq!(ann.len(), 5, "{ann:?}");
        assert_eq!(ann[ANNOTATION_BLOB_DIGEST], digest);
        assert_eq!(ann[ANNOTATION_BLOB_SIZE], size.to_string());
        assert_eq!(ann[ANNOTATION_VERSION], "0.1.0-turbo.ociv1");
        assert_eq!(ann[ANNOTATION_TURBO_TARGET_DIGEST], s["digest"]);
        // The source blob: still in the repository, gzip or tar as sniffed.
        let source = blob(repo, s);
        let gzip = source.starts_with(&[0x1f, 0x8b]);
        let want_mt = if gzip {
            MT_DOCKER_LAYER_GZIP
        } else {
            MT_DOCKER_LAYER_TAR
        };
        assert_eq!(
            ann[ANNOTATION_TURBO_TARGET_MEDIA_TYPE], want_mt,
            "layer {i}"
        );
        let gz = blob(repo, l);
        assert_eq!(sha(&gz), digest);
        let (files, tar) = unpack(&gz);
        assert_eq!(
            ocfg["rootfs"]["diff_ids"][i],
            sha(&tar),
            "diff_id = sha256(tar)"
        );
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<&str> = if gzip {
            vec![&meta_name, ".turbo.ociv1", "gzip.meta"]
        } else {
            vec![&meta_name, ".turbo.ociv1"]
        };
        assert_eq!(names, want, "layer {i}");
        assert!(files[1].1.is_empty(), "the marker is empty");
        assert_eq!(&files[0].1[..8], b"ZFile\0\x01\0", "{meta_name} is a ZFile");
        if gzip {
            assert_eq!(&files[2].1[..8], b"ddgzidx\0");
        }
        let ld = dir.join(format!("{i}"));
        std::fs::create_dir_all(&ld).unwrap();
        for (n, b) in &files {
            std::fs::write(ld.join(n), b).unwrap();
        }
        let src_file = ld.join("layer.blob");
        std::fs::write(&src_file, &source).unwrap();
        let target = if gzip {
            TargetSource::gzip(&src_file, ld.join("gzip.meta"))
        } else {
            TargetSource::tar(&src_file)
        };
        lowers.push(LowerSource::Warp {
            file: ld.join(&meta_name),
            target,
        });
    }
    assert_eq!(
        ocfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        ol.len()
    );
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("rootfs");
        v
    };
    assert_eq!(strip(&ocfg), strip(&scfg), "every other config field kept");
    lowers
}

/// Flattens a TurboOCI stack into a sparse raw image; for ext4 `e2fsck -fn` must pass;
/// mounts it (loop, read-only) and returns its tree.
fn flatten_turbo(lowers: &[LowerSource], fs: &str, work: &Path) -> Value {
    let opened = lowers.iter().map(|l| l.open().unwrap()).collect();
    let stack = blockdev::Stack::with_lowers(opened, None).unwrap();
    let img = work.join(format!("flat-{fs}.img"));
    let _ = std::fs::remove_file(&img);
    stack.write_raw_image(&img).unwrap();
    drop(stack);
    if fs == "ext4" {
        testutil::e2fsck(&img).unwrap_or_else(|e| panic!("e2fsck -fn: {e}"));
    }
    let tree = {
        let m = testutil::LoopMount::new(fs, &img, &work.join(format!("mnt-{fs}")));
        let o = Command::new("python3")
            .arg(build_script())
            .arg("scan")
            .arg(&m.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    std::fs::remove_file(&img).unwrap();
    tree
}

#[test]
fn turbo_and_native_in_one_run_through_registry() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("turbo");
    // A Docker image: pushed byte for byte with our client (skopeo's OCI transport
    // does not take Docker manifests from a layout).
    let repo = reg.client("test/turbo");
    push_layout_tag(&layout, "v1", &repo);
    let repo_arg = format!("{}/test/turbo", reg.host());
    let wd = t.path().join("work");
    let wd_s = wd.to_str().unwrap();
    let base = [
        "-r", &repo_arg, "-i", "v1", "--plain", "--vsize", "4", "-d", wd_s,
    ];
    let out = convert_ok(
        &[
            &base[..],
            &["--overlaybd", "v1_obd", "--turboOCI", "v1_turbo"],
        ]
        .concat(),
    );
    assert!(out.contains("v1_turbo") && out.contains("v1_obd"), "{out}");
    assert!(!wd.exists(), "work dir removed without --reserve");
    let (_, src) = get_json(&repo, "v1");
    let (td, turbo) = get_json(&repo, "v1_turbo");
    let reference = reference_tree(&layout, "v1", None);

    let lowers = check_turbo(&repo, &src, &turbo, "ext4", &t.path().join("t"));
    let tree = flatten_turbo(&lowers, "ext4", t.path());
    assert_same_tree(&tree, &reference);

    // The native image of the same run still flattens to the same tree.
    let (_, obd) = get_json(&repo, "v1_obd");
    let nd = t.path().join("n");
    std::fs::create_dir_all(&nd).unwrap();
    let files: Vec<PathBuf> = obd["layers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let f = nd.join(format!("{i}.commit"));
            std::fs::write(&f, blob(&repo, l)).unwrap();
            f
        })
        .collect();
    assert_same_tree(&flatten_and_scan(&files, t.path()), &reference);

    // Reproducible, also when converted alone, and --fastoci is the same flag.
    convert_ok(&[&base[..], &["--fastoci", "v1_turbo2"]].concat());
    assert_eq!(get_json(&repo, "v1_turbo2").0.digest, td.digest);

    // EROFS metadata layers: the kernel mounts the flattened stack.
    convert_ok(&[&base[..], &["--turboOCI", "v1_erofs", "--fstype", "erofs"]].concat());
    let (_, erofs) = get_json(&repo, "v1_erofs");
    let lowers = check_turbo(&repo, &src, &erofs, "erofs", &t.path().join("e"));
    let tree = flatten_turbo(&lowers, "erofs", t.path());
    assert_same_tree(&tree, &reference);

    // --referrer: OCI types, artifactType and subject.
    convert_ok(&[&base[..], &["--turboOCI", "v1_ref", "--referrer"]].concat());
    let (rd, r) = get_json(&repo, "v1_ref");
    assert_eq!(rd.media_type, MT_OCI_MANIFEST);
    assert_eq!(
        r["artifactType"],
        "application/vnd.containerd.overlaybd.turbo.v1+json"
    );
    assert_eq!(
        r["subject"]["digest"],
        get_json(&repo, "v1").0.digest.to_string()
    );
    for l in r["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], MT_OCI_LAYER_GZIP);
        // The target media type keeps the source's (Docker) family.
        assert!(l["annotations"][ANNOTATION_TURBO_TARGET_MEDIA_TYPE]
            .as_str()
            .unwrap()
            .starts_with("application/vnd.docker."));
    }

    // Dedup: TurboOCI rows are reused by TurboOCI runs and never by native ones.
    let db = t.path().join("dedup.sqlite");
    let db_s = db.to_str().unwrap();
    let dd = ["--db-type", "sqlite", "--db-str", db_s];
    let first = convert_ok(&[&base[..], &dd[..], &["--turboOCI", "v1_dd1"]].concat());
    assert!(first.contains("layers 4 converted, 0 reused"), "{first}");
    let again = convert_ok(&[&base[..], &dd[..], &["--turboOCI", "v1_dd2"]].concat());
    assert!(again.contains("manifests 0 converted, 1 reused"), "{again}");
    assert_eq!(get_json(&repo, "v1_dd2").0.digest, td.digest);
    let native = convert_ok(&[&base[..], &dd[..], &["--overlaybd", "v1_dd3"]].concat());
    assert!(native.contains("layers 4 converted, 0 reused"), "{native}");
    assert!(
        native.contains("manifests 1 converted, 0 reused"),
        "{native}"
    );

    // Another repository on the same registry: the source layers are mounted there,
    // since the runtime reads them from the image's own repository.
    let other = format!("{}/test/turbo-out", reg.host());
    convert_ok(
        &[
            &base[..],
            &["--turboOCI", "t", "--output-repository", &other],
        ]
        .concat(),
    );
    let orepo = reg.client("test/turbo-out");
    let (_, o) = get_json(&orepo, "t");
    assert_eq!(o["layers"], turbo["layers"]);
    for s in src["layers"].as_array().unwrap() {
        let d: Digest = s["digest"].as_str().unwrap().parse().unwrap();
        assert!(orepo.blob_exists(&d).unwrap(), "source layer {d} kept");
    }
}

#[test]
fn turbo_bad_input_is_one_line() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    // The testset's "layers" image has a zstd layer.
    skopeo_push(&images.join("layers"), "v1", &reg.host(), "test/zstd");
    let repo_arg = format!("{}/test/zstd", reg.host());
    let wd = t.path().join("work");
    let base = [
        "-r",
        &repo_arg,
        "-i",
        "v1",
        "--plain",
        "--vsize",
        "4",
        "-d",
        wd.to_str().unwrap(),
    ];
    let o = convertor(&[&base[..], &["--turboOCI", "z"]].concat());
    let e = testutil::err_text(&o);
    assert!(e.contains("zstd") && e.contains("sha256:"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!reg.tag_link_exists("test/zstd", "z"), "nothing pushed");

    let o = convertor(&[&base[..], &["--turboOCI", "x", "--fstype", "xfs"]].concat());
    let e = testutil::err_text(&o);
    assert!(e.contains("xfs"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    let o = convertor(
        &[
            &base[..],
            &["--turboOCI", "x", "--fstype", "erofs", "--mkfs=false"],
        ]
        .concat(),
    );
    let e = testutil::err_text(&o);
    assert!(e.contains("erofs"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// A layer that is neither gzip nor tar (declared gzip), a gzip layer that ends in the
/// middle of its stream (stored with the digest of its truncated bytes, so only the
/// inflate can tell), a tar whose last entry claims more data than the tar holds, and
/// gzip layers of more than one member (which TurboOCI's gzip index cannot cover):
/// each stops the conversion with one line naming the layer; nothing is written to the
/// destination.
#[test]
fn turbo_bad_layers_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let garbage = vec![0x5au8; 4096];
    let gz = std::fs::read(testutil::turbo_fixtures().join("ext4-gzip/layer.tar.gz")).unwrap();
    let short_gz = gz[..gz.len() / 2].to_vec();
    // A tar of one 100 KB file, cut 10 KB into the file's data.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("big.bin").unwrap();
    h.set_size(100_000);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &vec![7u8; 100_000][..]).unwrap();
    let long_tar = b.into_inner().unwrap()[..512 + 10_240].to_vec();
    // Multi-member gzip (concatenated members, RFC 1952): a tar of three 1000-byte files
    // cut between two entries and inside one, each part its own member. TurboOCI cannot
    // index past the first member: before, the first cut gave an image of the first file
    // only and the second one a misleading "unexpected end of the stream".
    let mut b = tar::Builder::new(Vec::new());
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(1000);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &vec![i as u8 + 1; 1000][..]).unwrap();
    }
    let three = b.into_inner().unwrap();
    let members = |cut: usize| {
        let gz = |part: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut e, part).unwrap();
            e.finish().unwrap()
        };
        [gz(&three[..cut]), gz(&three[cut..])].concat()
    };
    let multi = "multi-member gzip is not supported for TurboOCI";
    let convert = |src: &Path, dst: &Path, work: &str| {
        convertor(&layout_turbo_args(src, dst, &t.path().join(work), &[]))
    };
    for (name, bytes, want) in [
        ("garbage", garbage, "neither a gzip blob nor a tar"),
        ("short-gzip", short_gz, "ends early"),
        ("long-entry", long_tar, "unexpected end of the stream"),
        ("members-between-entries", members(1536), multi),
        ("members-inside-an-entry", members(1000), multi),
    ] {
        let blob = t.path().join(name);
        std::fs::write(&blob, &bytes).unwrap();
        let src = t.path().join(format!("src-{name}"));
        fixture_layout(&src, &[(blob.clone(), blob.clone())]);
        let dst = t.path().join(format!("dst-{name}"));
        let o = convert(&src, &dst, &format!("work-{name}"));
        let e = testutil::err_text(&o);
        assert!(!o.status.success(), "{name}");
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.contains(Digest::of(&bytes).hex()), "{name}: {e}");
        // The error, and the cleanup line (the layout the run made goes again).
        let (cleanup, errors): (Vec<&str>, Vec<&str>) = e
            .trim()
            .lines()
            .partition(|l| l.starts_with("convertor: cleanup: "));
        assert_eq!(errors.len(), 1, "{name}: {e}");
        assert_eq!(cleanup.len(), 1, "{name}: {e}");
        assert!(!dst.exists(), "{name}: the run made it");
        let tagged = std::fs::read_to_string(dst.join("index.json")).unwrap_or_default();
        assert!(
            !tagged.contains("turbo"),
            "{name}: nothing tagged: {tagged}"
        );
        let blobs = std::fs::read_dir(dst.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "{name}: nothing pushed");
        // Above a good layer, the bad one is read ahead while the good one applies:
        // the same error, for layer 2, and nothing tagged (the good layer's blobs may
        // be pushed by then).
        let src = t.path().join(format!("src2-{name}"));
        let good = testutil::turbo_fixtures().join("ext4-gzip/layer.tar.gz");
        let good_tar = testutil::fixtures().join("input.tar");
        fixture_layout(&src, &[(good, good_tar), (blob.clone(), blob.clone())]);
        let dst = t.path().join(format!("dst2-{name}"));
        let o = convert(&src, &dst, &format!("work2-{name}"));
        assert!(!o.status.success(), "{name}");
        let e = testutil::err_text(&o);
        let last = e
            .trim()
            .lines()
            .rfind(|l| !l.starts_with("convertor: cleanup: "))
            .unwrap_or_default();
        assert!(last.contains(want), "{name}: {e}");
        assert!(last.contains("layer 2/2"), "{name}: {e}");
        assert!(last.contains(Digest::of(&bytes).hex()), "{name}: {e}");
        let tagged = std::fs::read_to_string(dst.join("index.json")).unwrap_or_default();
        assert!(!tagged.contains("turbo"), "{name}: {tagged}");
        assert!(!dst.exists(), "{name}: the run made it");
    }
}

/// A gzip layer with bytes after its gzip member (not another member) is refused by the
/// native conversion, as upstream's Go gzip reader refuses it, and by TurboOCI the same
/// way (its gzip index would ignore them): one line naming the layer and what follows.
#[test]
fn turbo_refuses_trailing_garbage_as_native_does() {
    let t = tempfile::tempdir().unwrap();
    let gz = std::fs::read(testutil::turbo_fixtures().join("ext4-gzip/layer.tar.gz")).unwrap();
    let bytes = [&gz[..], b"trailing garbage"].concat();
    let blob = t.path().join("trailing.tar.gz");
    std::fs::write(&blob, &bytes).unwrap();
    let src = t.path().join("src");
    fixture_layout(&src, &[(blob, testutil::fixtures().join("input.tar"))]);
    // TurboOCI's gzip index reads the whole blob and counts what follows the member;
    // the native inflater stops at the first bytes, so it gives no count (it said "10
    // bytes" of these 16: the bytes it happened to read).
    let at = gz.len();
    let native_want =
        format!("data that is not gzip follows the last gzip member (at compressed byte {at})");
    let turbo_want = format!(
        "16 bytes of data that is not gzip follow the last gzip member (at compressed byte {at})"
    );
    for (name, output) in [("native", "--overlaybd"), ("turbo", "--turboOCI")] {
        let dst = t.path().join(format!("dst-{name}"));
        let mut a = layout_turbo_args(&src, &dst, &t.path().join(format!("w-{name}")), &[]);
        // The same arguments, for the format of this round.
        let at = a.iter().position(|x| x == "--turboOCI").unwrap();
        a[at] = output.to_string();
        let o = convertor(&a);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{name}: {}",
            testutil::err_text(&o)
        );
        let e = testutil::err_text(&o);
        let line = e
            .lines()
            .find(|l| l.contains("error:"))
            .unwrap_or_else(|| panic!("{name}: no error line: {e}"));
        // (zlib-rs, when the build has no ISA-L, says "invalid gzip header" natively.)
        let want = if name == "native" {
            &native_want
        } else {
            &turbo_want
        };
        assert!(
            line.contains(&format!(": {want}"))
                || (name == "native" && line.contains("invalid gzip header")),
            "{name}: {e}"
        );
        assert!(
            line.contains("layer 1/1") && line.contains(Digest::of(&bytes).hex()),
            "{name}: {e}"
        );
        assert!(!dst.exists(), "{name}: the run made it");
    }
}

/// `convertor` arguments that convert tag `v1` of the layout `src` into the TurboOCI
/// image `turbo` in the layout `dst`, working in `work`, plus `extra`.
fn layout_turbo_args(src: &Path, dst: &Path, work: &Path, extra: &[&str]) -> Vec<String> {
    args_with(
        &[
            "-r",
            &format!("oci:{}", src.display()),
            "-i",
            "v1",
            "--output-repository",
            &format!("oci:{}", dst.display()),
            "--turboOCI",
            "turbo",
            "-d",
            work.to_str().unwrap(),
        ],
        extra,
    )
}

/// Writes a one-manifest OCI layout holding `layers` (gzip blob, uncompressed tar).
fn fixture_layout(dir: &Path, layers: &[(PathBuf, PathBuf)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> (String, u64) {
        let d = Digest::of(b);
        std::fs::write(blobs.join(d.hex()), b).unwrap();
        (d.to_string(), b.len() as u64)
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (gz, tar) in layers {
        let (d, n) = put(&std::fs::read(gz).unwrap());
        descs.push(serde_json::json!({"mediaType": MT_OCI_LAYER_GZIP, "digest": d, "size": n}));
        diff_ids.push(sha(&std::fs::read(tar).unwrap()));
    }
    let cfg = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (cd, cn) = put(cfg.to_string().as_bytes());
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cd, "size": cn}, "layers": descs});
    let (md, mn) = put(m.to_string().as_bytes());
    let idx = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": MT_OCI_MANIFEST,
        "digest": md, "size": mn, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), idx.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn same_file(ours: &Path, upstream: &Path) {
    let (a, b) = (
        std::fs::read(ours).unwrap(),
        std::fs::read(upstream).unwrap(),
    );
    assert!(
        a == b,
        "{} ({} bytes) differs from upstream's {} ({} bytes)",
        ours.display(),
        a.len(),
        upstream.display(),
        b.len()
    );
}

/// Upstream's fixture layers (ext4-gzip + ext4-gzip-2; the same blobs for EROFS)
/// converted from an OCI layout into another one, with the default --vsize 64 and
/// --mkfs: every `gzip.meta` and `<fs>.fs.meta` the convertor builds equals upstream's.
#[test]
fn turbo_layers_equal_upstreams_golden_files() {
    let fx = testutil::turbo_fixtures();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fixture_layout(
        &src,
        &[
            (
                fx.join("ext4-gzip/layer.tar.gz"),
                testutil::fixtures().join("input.tar"),
            ),
            (
                fx.join("ext4-gzip-2/layer.tar.gz"),
                fx.join("ext4-gzip-2/layer.tar"),
            ),
        ],
    );
    for (fs, cases) in [
        ("erofs", ["erofs-gzip", "erofs-gzip-2"]),
        ("ext4", ["ext4-gzip", "ext4-gzip-2"]),
    ] {
        let wd = t.path().join(format!("work-{fs}"));
        let dst = t.path().join(format!("dst-{fs}"));
        convert_ok(&layout_turbo_args(
            &src,
            &dst,
            &wd,
            &["--fstype", fs, "--reserve"],
        ));
        let mdirs: Vec<PathBuf> = std::fs::read_dir(&wd)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(mdirs.len(), 1, "{mdirs:?}");
        let mut ldirs: Vec<PathBuf> = std::fs::read_dir(&mdirs[0])
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        ldirs.sort();
        assert_eq!(ldirs.len(), 2);
        for (d, case) in ldirs.iter().zip(cases) {
            for f in [format!("{fs}.fs.meta"), "gzip.meta".to_string()] {
                same_file(&d.join(&f), &fx.join(case).join(&f));
            }
            assert!(d.join("turboOCIv1.tar.gz").is_file());
        }
        // The source layers were copied into the destination layout with the image.
        for (gz, _) in [
            fx.join("ext4-gzip/layer.tar.gz"),
            fx.join("ext4-gzip-2/layer.tar.gz"),
        ]
        .iter()
        .map(|p| (p, ()))
        {
            let d = Digest::of(&std::fs::read(gz).unwrap());
            assert!(
                dst.join("blobs/sha256").join(d.hex()).is_file(),
                "{d} in {fs} dst"
            );
        }
        std::fs::remove_dir_all(&wd).unwrap();
    }
}
