//! End-to-end conversions against a real docker-registry (and OCI layouts): images from
//! tests/images/build.py are pushed with skopeo, converted by the convertor binary, and
//! the result is checked field by field; every converted layer stack is flattened
//! through our blockdev stack into an ext4 that must pass `e2fsck -fn` and hold exactly
//! the tree of the source image merged by build.py.

mod common;

use common::convert::*;
use common::Registry;
use obdconvert::annotations::*;
use obdoci::model::*;
use obdoci::{Descriptor, Digest, Reference};
use obdregistry::{self as registry, ClientOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn client(reg: &Registry, repo: &str) -> registry::Repository {
    let o = ClientOptions {
        plain_http: true,
        ..Default::default()
    };
    registry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository(repo)
}

fn get_json(repo: &registry::Repository, r: &str) -> (Descriptor, Value) {
    let r = match r.parse::<Digest>() {
        Ok(d) => Reference::Digest(d),
        Err(_) => Reference::Tag(r.into()),
    };
    let (d, b) = repo.get_manifest(&r).unwrap();
    (d, serde_json::from_slice(&b).unwrap())
}

fn blob_json(repo: &registry::Repository, desc: &Value) -> Value {
    let d: Descriptor = serde_json::from_value(desc.clone()).unwrap();
    serde_json::from_slice(&repo.read_blob(&d, 1 << 24).unwrap()).unwrap()
}

/// Check one converted manifest against its source; download its layers into `dir`.
fn check_manifest(
    repo: &registry::Repository,
    src: &Value,
    out: &Value,
    oci: bool,
    dir: &Path,
) -> Vec<PathBuf> {
    let (mt, cmt, lmt) = if oci {
        (MT_OCI_MANIFEST, MT_OCI_CONFIG, MT_OCI_LAYER_TAR)
    } else {
        (MT_DOCKER_MANIFEST, MT_DOCKER_CONFIG, MT_DOCKER_LAYER_TAR)
    };
    assert_eq!(out["schemaVersion"], 2);
    assert_eq!(out["mediaType"], mt);
    assert_eq!(out["config"]["mediaType"], cmt);
    let sl = src["layers"].as_array().unwrap();
    let ol = out["layers"].as_array().unwrap();
    assert_eq!(sl.len(), ol.len(), "one overlaybd layer per source layer");
    // Source manifest annotations survive.
    assert_eq!(out["annotations"], src["annotations"]);
    let scfg = blob_json(repo, &src["config"]);
    let ocfg = blob_json(repo, &out["config"]);
    // Chain ids of the source diff ids, computed here from the definition.
    let mut chain: Vec<String> = Vec::new();
    for d in scfg["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap().to_string();
        let next = match chain.last() {
            None => d,
            Some(p) => {
                use sha2::Digest as _;
                format!("sha256:{:x}", sha2::Sha256::digest(format!("{p} {d}")))
            }
        };
        chain.push(next);
    }
    let uuid = |c: &str| {
        let h = &c[7..39];
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    let mut files = Vec::new();
    std::fs::create_dir_all(dir).unwrap();
    for (i, l) in ol.iter().enumerate() {
        assert_eq!(l["mediaType"], lmt);
        let digest = l["digest"].as_str().unwrap();
        let size = l["size"].as_u64().unwrap();
        let ann = l["annotations"].as_object().unwrap();
        assert_eq!(ann.len(), 3, "{ann:?}");
        assert_eq!(ann[ANNOTATION_BLOB_DIGEST], digest);
        assert_eq!(ann[ANNOTATION_BLOB_SIZE], size.to_string());
        assert_eq!(ann[ANNOTATION_VERSION], "0.1.0");
        assert_eq!(
            ocfg["rootfs"]["diff_ids"][i], digest,
            "diff_id = layer digest"
        );
        // The blob: a tar holding exactly one file, overlaybd.commit, a ZFile.
        let d: Descriptor = serde_json::from_value(l.clone()).unwrap();
        let bytes = repo.read_blob(&d, 1 << 30).unwrap();
        assert_eq!(Digest::of(&bytes).as_str(), digest);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            names.push(e.path().unwrap().display().to_string());
            let mut head = [0u8; 8];
            std::io::Read::read_exact(&mut e, &mut head).unwrap();
            assert_eq!(&head, b"ZFile\0\x01\0", "layer {i} is not a ZFile");
        }
        assert_eq!(names, ["overlaybd.commit"]);
        let f = dir.join(format!("{i}.commit"));
        std::fs::write(&f, &bytes).unwrap();
        // LSMT uuid = UUID(chain id), parent = UUID(previous chain id), as upstream.
        let layer = blockdev::layer::open_layer(&f).unwrap();
        let h = layer.header();
        assert_eq!(
            h.uuid.to_string().to_lowercase(),
            uuid(&chain[i]),
            "layer {i} uuid"
        );
        if i > 0 {
            assert_eq!(
                h.parent_uuid.to_string().to_lowercase(),
                uuid(&chain[i - 1]),
                "layer {i} parent"
            );
        } else {
            assert!(h.parent_uuid.is_nil(), "bottom layer has no parent");
        }
        files.push(f);
    }
    assert_eq!(
        ocfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        ol.len()
    );
    assert_eq!(ocfg["rootfs"]["type"], "layers");
    // Every other config field is kept exactly.
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("rootfs");
        v
    };
    assert_eq!(strip(&ocfg), strip(&scfg));
    files
}

#[test]
fn layers_image_through_registry() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    skopeo_push(&layout, "v1", &reg.host(), "test/layers");
    let repo_arg = format!("{}/test/layers", reg.host());
    let wd = t.path().join("work");
    let wd_s = wd.to_str().unwrap();
    let base = [
        "-r", &repo_arg, "-i", "v1", "--plain", "--vsize", "4", "-d", wd_s,
    ];
    let out = convert_ok(&[&base[..], &["--overlaybd", "v1_obd"]].concat());
    assert!(out.contains("pushed"), "{out}");
    assert!(!wd.exists(), "work dir removed without --reserve");

    let repo = client(&reg, "test/layers");
    let (_, src) = get_json(&repo, "v1");
    let (d1, obd) = get_json(&repo, "v1_obd");
    assert_eq!(d1.media_type, MT_DOCKER_MANIFEST);
    let files = check_manifest(&repo, &src, &obd, false, &t.path().join("l1"));

    // The flattened filesystem equals the source image.
    let tree = flatten_and_scan(&files, t.path());
    assert_same_tree(&tree, &reference_tree(&layout, "v1", None));

    // Reproducible: a second conversion gives the same digests.
    convert_ok(&[&base[..], &["-o", "v1_obd2"]].concat());
    let (d2, _) = get_json(&repo, "v1_obd2");
    assert_eq!(d1.digest, d2.digest);

    // By digest, OCI media types, with dumps and reserve.
    let digest_arg = {
        let (d, _) = get_json(&repo, "v1");
        d.digest.to_string()
    };
    let base_d = [
        "-r",
        &repo_arg,
        "-g",
        &digest_arg,
        "--plain",
        "--vsize",
        "4",
        "-d",
        wd_s,
    ];
    convert_ok(
        &[
            &base_d[..],
            &[
                "--overlaybd",
                "v1_oci",
                "--oci",
                "--dump-manifest",
                "--reserve",
            ],
        ]
        .concat(),
    );
    let (d3, oci) = get_json(&repo, "v1_oci");
    assert_eq!(d3.media_type, MT_OCI_MANIFEST);
    check_manifest(&repo, &src, &oci, true, &t.path().join("l3"));
    // Same layers as the Docker flavour: only media types differ.
    for (a, b) in obd["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(oci["layers"].as_array().unwrap())
    {
        assert_eq!(a["digest"], b["digest"]);
    }
    let mdirs: Vec<_> = std::fs::read_dir(&wd)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(mdirs.len(), 1, "{mdirs:?}");
    let m = &mdirs[0];
    assert!(m.file_name().unwrap().to_str().unwrap().starts_with("1--"));
    let dumped: Value =
        serde_json::from_slice(&std::fs::read(m.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(dumped, oci);
    let ldirs: Vec<_> = std::fs::read_dir(m)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(ldirs.len(), 4);
    for l in ldirs {
        for f in [
            "overlaybd.commit",
            "layer.tar",
            "writable_data",
            "writable_index",
            "config.json",
        ] {
            assert!(
                l.path().join(f).exists(),
                "{} lacks {f}",
                l.path().display()
            );
        }
    }
    std::fs::remove_dir_all(&wd).unwrap();

    // --dump-manifest without --reserve keeps the dumps (upstream deletes them).
    convert_ok(&[&base[..], &["-o", "v1_dump", "--dump-manifest"]].concat());
    let mdirs: Vec<_> = std::fs::read_dir(&wd)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(mdirs.len(), 1);
    let kept: Vec<_> = std::fs::read_dir(&mdirs[0])
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        kept.len(),
        2,
        "only config.json and manifest.json are kept: {kept:?}"
    );
    std::fs::remove_dir_all(&wd).unwrap();

    // --no-upload pushes nothing.
    let revs = reg.manifest_revisions("test/layers");
    convert_ok(
        &[
            &base[..],
            &["-o", "v1_none", "--no-upload", "--oci", "--referrer"],
        ]
        .concat(),
    );
    assert!(!reg.tag_link_exists("test/layers", "v1_none"));
    assert_eq!(reg.manifest_revisions("test/layers"), revs);
}

#[test]
fn multi_arch_indexes() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("multi");
    skopeo_push(&layout, "multi", &reg.host(), "test/multi");
    let repo = client(&reg, "test/multi");
    for tag in ["multi-docker", "nested"] {
        push_layout_tag(&layout, tag, &repo);
    }
    let repo_arg = format!("{}/test/multi", reg.host());
    let wd = t.path().join("work");
    let wd_s = wd.to_str().unwrap();

    // OCI index with an attestation, converted with --referrer.
    convert_ok(&[
        "-r",
        &repo_arg,
        "-i",
        "multi",
        "-o",
        "multi_obd",
        "--plain",
        "--vsize",
        "2",
        "-d",
        wd_s,
        "--referrer",
        "--concurrency-limit",
        "1",
    ]);
    let (sd, src) = get_json(&repo, "multi");
    let (od, out) = get_json(&repo, "multi_obd");
    assert_eq!(od.media_type, MT_OCI_INDEX);
    assert_eq!(out["artifactType"], ARTIFACT_TYPE_OVERLAYBD);
    assert_eq!(out["subject"]["digest"], sd.digest.as_str());
    assert_eq!(out["subject"]["mediaType"], MT_OCI_INDEX);
    assert_eq!(out["subject"]["size"], sd.size);
    assert_eq!(out["annotations"], src["annotations"]);
    let oc = out["manifests"].as_array().unwrap();
    let sc = src["manifests"].as_array().unwrap();
    assert_eq!(sc.len(), 4);
    assert_eq!(oc.len(), 2, "attestation and SBOM artifact dropped");
    for (o, s) in oc.iter().zip(sc) {
        assert_eq!(o["platform"], s["platform"]);
        assert_eq!(o["mediaType"], MT_OCI_MANIFEST);
        let (_, child) = get_json(&repo, o["digest"].as_str().unwrap());
        let (_, schild) = get_json(&repo, s["digest"].as_str().unwrap());
        assert_eq!(child["artifactType"], ARTIFACT_TYPE_OVERLAYBD);
        assert_eq!(child["subject"]["digest"], s["digest"]);
        assert_eq!(child["subject"]["size"], s["size"]);
        let files = check_manifest(&repo, &schild, &child, true, &t.path().join("m"));
        if o["platform"]["architecture"] == "arm64" {
            let tree = flatten_and_scan(&files, t.path());
            assert_same_tree(
                &tree,
                &reference_tree(&layout, "multi", Some("linux/arm64")),
            );
        }
    }

    // Docker manifest list without --oci: list type kept, Docker fields kept.
    convert_ok(&[
        "-r",
        &repo_arg,
        "-i",
        "multi-docker",
        "--overlaybd",
        "md_obd",
        "--plain",
        "--vsize",
        "2",
        "-d",
        wd_s,
    ]);
    let (_, src) = get_json(&repo, "multi-docker");
    let (od, out) = get_json(&repo, "md_obd");
    assert_eq!(od.media_type, MT_DOCKER_LIST);
    assert!(out.get("subject").is_none());
    for (o, s) in out["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .zip(src["manifests"].as_array().unwrap())
    {
        assert_eq!(o["platform"], s["platform"]);
        let (_, child) = get_json(&repo, o["digest"].as_str().unwrap());
        let (_, schild) = get_json(&repo, s["digest"].as_str().unwrap());
        check_manifest(&repo, &schild, &child, false, &t.path().join("d"));
        let cfg = blob_json(&repo, &child["config"]);
        assert_eq!(cfg["config"]["Healthcheck"]["Test"][1], "true");
        assert_eq!(cfg["docker_version"], "24.0.7");
    }

    // Nested index: the inner index is converted too and referenced by its new digest.
    convert_ok(&[
        "-r",
        &repo_arg,
        "-i",
        "nested",
        "-o",
        "nested_obd",
        "--plain",
        "--vsize",
        "2",
        "-d",
        wd_s,
        "--oci",
    ]);
    let (_, out) = get_json(&repo, "nested_obd");
    let inner = &out["manifests"][0];
    assert_eq!(inner["mediaType"], MT_OCI_INDEX);
    let (_, inner_doc) = get_json(&repo, inner["digest"].as_str().unwrap());
    assert_eq!(inner_doc["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(inner_doc["manifests"][0]["mediaType"], MT_OCI_MANIFEST);
    // The same source manifest converted twice in one run gives one digest.
    let (_, md) = get_json(&repo, "md_obd");
    let (_, again) = get_json(&repo, inner_doc["manifests"][0]["digest"].as_str().unwrap());
    let (_, md_child) = get_json(&repo, md["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(again["layers"], {
        let mut l = md_child["layers"].clone();
        for x in l.as_array_mut().unwrap() {
            x["mediaType"] = Value::from(MT_OCI_LAYER_TAR);
        }
        l
    });
}

#[test]
fn oci_layout_without_registry() {
    let t = tempfile::tempdir().unwrap();
    let sample = t.path().join("sample");
    build_images("sample", &sample, &[]);
    let wd = t.path().join("work");
    let src_arg = format!("oci:{}", sample.display());
    let out = convert_ok(&[
        "-r",
        &src_arg,
        "-i",
        "latest",
        "-o",
        "latest_obd",
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert!(out.contains("latest_obd"), "{out}");
    let l = obdoci::layout::Layout::open(&sample).unwrap();
    let d = l.resolve(&Reference::Tag("latest_obd".into())).unwrap();
    let m: Manifest = parse_json("m", &l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    let files: Vec<PathBuf> = m.layers.iter().map(|x| l.blob_path(&x.digest)).collect();
    let tree = flatten_and_scan(&files, t.path());
    assert_same_tree(&tree, &reference_tree(&sample, "latest", None));

    // Into a separate layout (created on the fly), tag taken from the destination.
    let other = t.path().join("other");
    let dst_arg = format!("oci:{}:converted", other.display());
    convert_ok(&[
        "-r",
        &src_arg,
        "-i",
        "latest",
        "--output-repository",
        &dst_arg,
        "-d",
        wd.to_str().unwrap(),
    ]);
    let l2 = obdoci::layout::Layout::open(&other).unwrap();
    let d2 = l2.resolve(&Reference::Tag("converted".into())).unwrap();
    assert_eq!(d2.digest, d.digest, "same image whatever the destination");
    for x in &m.layers {
        assert!(l2.has_blob(&x.digest));
    }
    assert!(l2.has_blob(&m.config.digest));

    // A layout gets OCI media types, whatever `--oci` says, so that the
    // containers/image tools read it.
    assert_eq!(m.media_type.as_deref(), Some(MT_OCI_MANIFEST));
    assert!(m.layers.iter().all(|x| x.media_type == MT_OCI_LAYER_TAR));
    let copied = t.path().join("skopeo-dir");
    let st = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            &format!("oci:{}:converted", other.display()),
        ])
        .arg(format!("dir:{}", copied.display()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo cannot read the converted layout");
    for x in &m.layers {
        assert!(copied.join(&x.digest.to_string()[7..]).exists());
    }
}

/// `--mkfs=false`: the layers go on top of upstream's own prebuilt base layer
/// (`ext4_64` from the fixtures), which is pushed as an extra bottom layer,
/// tar-wrapped as upstream's convertor does. Upstream's unit tests pin that blob's
/// digest, so ours must be the same.
#[test]
fn base_layer_instead_of_mkfs() {
    const UPSTREAM_BASELAYER_TAR: &str =
        "sha256:a8b5fca80efae55088290f3da8110d7742de55c2a378d5ab53226a483f390e21";
    let t = tempfile::tempdir().unwrap();
    let base = testutil::fixtures().join("baselayer/ext4_64");
    let sample = t.path().join("sample");
    build_images("sample", &sample, &[]);
    let out = t.path().join("out");
    let src = format!("oci:{}", sample.display());
    let dst = format!("oci:{}:nomkfs", out.display());
    let wd = t.path().join("w");
    convert_ok(&[
        "-r",
        &src,
        "-i",
        "latest",
        "--output-repository",
        &dst,
        "--mkfs=false",
        "--baselayer",
        base.to_str().unwrap(),
        "--oci",
        "-d",
        wd.to_str().unwrap(),
    ]);
    let l = obdoci::layout::Layout::open(&out).unwrap();
    let d = l.resolve(&Reference::Tag("nomkfs".into())).unwrap();
    let m: Manifest = parse_json("m", &l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    assert_eq!(m.layers.len(), 3, "base layer + 2 image layers");
    assert_eq!(m.layers[0].digest.as_str(), UPSTREAM_BASELAYER_TAR);
    let cfg: Value = serde_json::from_slice(&l.read_blob(&m.config, 1 << 20).unwrap()).unwrap();
    let ids: Vec<&str> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let digests: Vec<&str> = m.layers.iter().map(|x| x.digest.as_str()).collect();
    assert_eq!(ids, digests);
    // The base layer blob: one read-only entry holding the base file, no timestamps.
    let b = std::fs::read(l.blob_path(&m.layers[0].digest)).unwrap();
    let mut ar = tar::Archive::new(&b[..]);
    let entries: Vec<_> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut content).unwrap();
            (
                e.path().unwrap().display().to_string(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                content,
            )
        })
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, "overlaybd.commit");
    assert_eq!(entries[0].1, 0o444);
    assert_eq!(entries[0].2, 0);
    assert_eq!(entries[0].3, std::fs::read(&base).unwrap());
    assert_eq!(
        m.layers[0].annotation(ANNOTATION_BLOB_DIGEST),
        Some(m.layers[0].digest.as_str())
    );
    let files: Vec<PathBuf> = m.layers.iter().map(|x| l.blob_path(&x.digest)).collect();
    let tree = flatten_and_scan(&files, t.path());
    assert_same_tree(&tree, &reference_tree(&sample, "latest", None));
}
