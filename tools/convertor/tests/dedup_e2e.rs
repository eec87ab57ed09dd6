//! Layer and manifest deduplication end to end: the convertor binary against a real
//! docker-registry (started here) and a dedup database, both a MariaDB server started by
//! this test binary (`dedup_support`) and SQLite files.
//!
//! What a run did is read from its `dedup: ...` summary line and checked independently:
//! with `--reserve` the work directory shows which layers were really converted (they
//! leave writable files behind, reused ones only their downloaded commit file), the
//! registry's storage shows manifests and blob links, and the database rows are read back
//! by chain IDs computed here from the source config.

mod common;
#[path = "../../../crates/dedup/tests/dedup_support/mod.rs"]
mod dedup_support;

use common::convert::*;
use common::Registry;
use obdconvert::ConvertOptions;
use obddedup::{open, ConversionDatabase, LayerEntry, LayerKey, ManifestKey};
use obdoci::model::*;
use obdoci::{Descriptor, Digest, Reference};
use obdregistry::Repository;
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const VSIZE: &str = "4";

/// Where the dedup rows go.
enum Backend {
    Sqlite(PathBuf),
    Mysql(String),
}

impl Backend {
    fn sqlite(dir: &Path) -> Backend {
        Backend::Sqlite(dir.join("dedup.sqlite"))
    }

    /// A fresh database with the upstream tables on the shared MariaDB server.
    fn mariadb() -> Backend {
        let dsn = dedup_support::with_shared(|db| db.dsn(&db.fresh_database("e2e")));
        Backend::Mysql(dsn)
    }

    fn args(&self) -> Vec<String> {
        let (t, s) = match self {
            Backend::Sqlite(p) => ("sqlite", p.display().to_string()),
            Backend::Mysql(dsn) => ("mysql", dsn.clone()),
        };
        vec!["--db-type".into(), t.into(), "--db-str".into(), s]
    }

    /// The database as the convertor sees it with `--vsize 4`.
    fn open(&self) -> Box<dyn ConversionDatabase> {
        let opts = ConvertOptions {
            vsize_gb: VSIZE.parse().unwrap(),
            ..Default::default()
        };
        let key = opts.dedup_format_key().unwrap();
        let (t, s) = match self {
            Backend::Sqlite(p) => ("sqlite", p.display().to_string()),
            Backend::Mysql(dsn) => ("mysql", dsn.clone()),
        };
        open(t, &s, &key).unwrap().unwrap()
    }
}

/// The numbers of the convertor's `dedup: ...` line.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Summary {
    layers_converted: u64,
    layers_reused: u64,
    layers_mounted: u64,
    manifests_converted: u64,
    manifests_reused: u64,
    manifests_copied: u64,
    stale_rows: u64,
    conflicts: u64,
    db_errors: u64,
    registry_errors: u64,
}

impl Summary {
    fn parse(stdout: &str) -> Summary {
        let line = stdout
            .lines()
            .find(|l| l.starts_with("dedup: layers "))
            .unwrap_or_else(|| panic!("no dedup summary line in:\n{stdout}"));
        let counts = line.split('[').next().unwrap();
        let n: Vec<u64> = counts
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(n.len(), 10, "unexpected summary line: {line}");
        Summary {
            layers_converted: n[0],
            layers_reused: n[1],
            layers_mounted: n[2],
            manifests_converted: n[3],
            manifests_reused: n[4],
            manifests_copied: n[5],
            stale_rows: n[6],
            conflicts: n[7],
            db_errors: n[8],
            registry_errors: n[9],
        }
    }

    /// Nothing went wrong on the dedup side.
    fn assert_clean(&self) {
        assert_eq!(
            (self.conflicts, self.db_errors, self.registry_errors),
            (0, 0, 0),
            "{self:?}"
        );
    }
}

struct Run {
    stdout: String,
    stderr: String,
    secs: f64,
    summary: Summary,
}

fn check_output(args: &[String], o: Output, secs: f64) -> Run {
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "convertor {args:?} failed ({:?}):\nstdout: {stdout}\nstderr: {stderr}",
        o.status.code()
    );
    let summary = Summary::parse(&stdout);
    summary.assert_clean();
    Run {
        stdout,
        stderr,
        secs,
        summary,
    }
}

/// Runs the convertor (dedup decisions logged at info level) and requires success.
fn convert(args: &[String]) -> Run {
    let t0 = Instant::now();
    let o = convertor_logging(args, "info");
    check_output(args, o, t0.elapsed().as_secs_f64())
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// What happened to each layer, from a `--reserve` work directory.
#[derive(Debug, Default, PartialEq, Eq)]
struct Work {
    /// Converted: the layer leaves its writable files and layer config behind.
    converted: Vec<usize>,
    /// Reused and downloaded as its commit file (a converted layer above builds on it).
    downloaded: Vec<usize>,
    /// Reused, not downloaded (nothing above it was converted): an empty directory.
    untouched: Vec<usize>,
}

fn work_evidence(wd: &Path) -> Work {
    let mut w = Work::default();
    for m in std::fs::read_dir(wd).unwrap().flatten() {
        if !m.path().is_dir() {
            continue;
        }
        for l in std::fs::read_dir(m.path()).unwrap().flatten() {
            let p = l.path();
            if !p.is_dir() {
                continue;
            }
            let name = l.file_name().to_string_lossy().to_string();
            let i: usize = name[..4].parse().unwrap();
            let mut files: Vec<String> = std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect();
            files.sort();
            if files.iter().any(|f| f == "writable_data") {
                w.converted.push(i);
            } else if files.is_empty() {
                w.untouched.push(i);
            } else {
                assert_eq!(files, ["overlaybd.commit"], "{}", p.display());
                w.downloaded.push(i);
            }
        }
    }
    w.converted.sort();
    w.downloaded.sort();
    w.untouched.sort();
    w
}

/// Tag `v2` in the layout: image `v1` without its top layer. A different manifest (so
/// no manifest-level hit) whose layers' chain IDs are those of `v1`'s lower layers.
fn derive_without_top_layer(layout: &Path) {
    derive_image(layout, "v1", "v2", |m, ids| {
        m.layers.pop();
        ids.pop();
    });
}

/// Tag `to` in the layout: image `from` with its manifest's layers and its
/// config's diff_ids edited by `edit`.
fn derive_image(
    layout: &Path,
    from: &str,
    to: &str,
    edit: impl FnOnce(&mut Manifest, &mut Vec<Digest>),
) {
    use obdoci::layout::Layout;
    let l = Layout::open(layout).unwrap();
    let d = l.resolve(&Reference::Tag(from.into())).unwrap();
    let mut m: Manifest = serde_json::from_slice(&l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    let mut cfg = ImageConfig::parse("config", &l.read_blob(&m.config, 1 << 20).unwrap()).unwrap();
    let mut ids = cfg.diff_ids("config").unwrap();
    edit(&mut m, &mut ids);
    cfg.set_diff_ids(&ids);
    let cb = cfg.to_bytes();
    m.config = Descriptor::new(
        m.config.media_type.clone(),
        l.write_blob_bytes(&cb).unwrap(),
        cb.len() as u64,
    );
    let mb = serde_json::to_vec(&m).unwrap();
    let md = Descriptor::new(
        d.media_type.clone(),
        l.write_blob_bytes(&mb).unwrap(),
        mb.len() as u64,
    );
    l.tag(to, &md).unwrap();
}

fn get_json(repo: &Repository, r: &str) -> (Descriptor, Value) {
    let r = match r.parse::<Digest>() {
        Ok(d) => Reference::Digest(d),
        Err(_) => Reference::Tag(r.into()),
    };
    let (d, b) = repo.get_manifest(&r).unwrap();
    (d, serde_json::from_slice(&b).unwrap())
}

fn layer_digests(m: &Value) -> Vec<String> {
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Chain IDs of the source image's layers, from the definition (sha256 of
/// `"<parent chain id> <diff id>"`).
fn chain_ids(repo: &Repository, tag: &str) -> Vec<String> {
    let (_, m) = get_json(repo, tag);
    let cd: Descriptor = serde_json::from_value(m["config"].clone()).unwrap();
    let cfg: Value = serde_json::from_slice(&repo.read_blob(&cd, 1 << 20).unwrap()).unwrap();
    let mut chain: Vec<String> = Vec::new();
    for d in cfg["rootfs"]["diff_ids"].as_array().unwrap() {
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
    chain
}

fn blob_exists(repo: &Repository, digest: &str) -> bool {
    repo.blob_exists(&digest.parse().unwrap()).unwrap()
}

/// Every blob of manifest `m` (config and layers) is in `repo`.
fn assert_complete(repo: &Repository, m: &Value) {
    let mut all = layer_digests(m);
    all.push(m["config"]["digest"].as_str().unwrap().to_string());
    for d in all {
        assert!(blob_exists(repo, &d), "{d} missing in {}", repo.name());
    }
}

/// The layer rows of `repo` name exactly the converted layers.
fn assert_layer_rows(
    db: &dyn ConversionDatabase,
    host: &str,
    repo: &str,
    chain: &[String],
    layers: &[String],
) {
    for (c, l) in chain.iter().zip(layers) {
        let row = db
            .get_layer_entry_for_repo(LayerKey {
                host,
                repository: repo,
                chain_id: c,
            })
            .unwrap()
            .unwrap_or_else(|| panic!("no row for layer {c} in {repo}"));
        assert_eq!(&row.converted_digest, l, "row of {c} in {repo}");
    }
}

fn manifest_row(
    db: &dyn ConversionDatabase,
    host: &str,
    repo: &str,
    src: &Digest,
    mt: &str,
) -> Option<String> {
    db.get_manifest_entry_for_repo(ManifestKey {
        host,
        repository: repo,
        original_digest: src.as_str(),
        media_type: mt,
    })
    .unwrap()
    .map(|r| r.converted_digest)
}

/// The whole story on one backend: convert, convert again (manifest re-tagged), lose a
/// converted blob (reconverted, stale rows replaced), convert copies of the image in
/// other repositories (layers mounted; manifest copied).
fn reuse_flow(backend: Backend, t: &Path) {
    let reg = Registry::plain();
    let host = reg.host();
    let images = t.join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    skopeo_push(&layout, "v1", &host, "app/layers");
    let app = reg.client("app/layers");
    let chain = chain_ids(&app, "v1");
    let n = chain.len();
    assert_eq!(n, 4);
    let (src_desc, _) = get_json(&app, "v1");
    let db = backend.open();

    let wd = |name: &str| t.join(name).display().to_string();
    let run_tag = |repo: &str, input: &str, extra: &[&str], work: &str| -> Run {
        let mut a = strings(&[
            "-r",
            &format!("{host}/{repo}"),
            "-i",
            input,
            "--plain",
            "--vsize",
            VSIZE,
            "--reserve",
            "-d",
            work,
        ]);
        a.extend(backend.args());
        a.extend(strings(extra));
        convert(&a)
    };
    let run = |repo: &str, extra: &[&str], work: &str| run_tag(repo, "v1", extra, work);

    // 1. First conversion: every layer converted, rows recorded after the push.
    let r1 = run("app/layers", &["-o", "obd1"], &wd("w1"));
    assert_eq!(
        (r1.summary.layers_converted, r1.summary.layers_reused),
        (4, 0),
        "{}",
        r1.stdout
    );
    assert!(
        r1.stdout.contains("(1 manifest, 4 layers)"),
        "{}",
        r1.stdout
    );
    assert_eq!(
        (r1.summary.manifests_converted, r1.summary.manifests_reused),
        (1, 0)
    );
    assert_eq!(
        work_evidence(Path::new(&wd("w1"))),
        Work {
            converted: (0..n).collect(),
            ..Default::default()
        }
    );
    let (d1, m1) = get_json(&app, "obd1");
    let layers = layer_digests(&m1);
    assert_layer_rows(db.as_ref(), &host, "app/layers", &chain, &layers);
    assert_eq!(
        manifest_row(
            db.as_ref(),
            &host,
            "app/layers",
            &src_desc.digest,
            MT_DOCKER_MANIFEST
        ),
        Some(d1.digest.to_string())
    );

    // 2. Same image, another tag: the manifest is re-tagged, nothing converted or pushed.
    let revisions = reg.manifest_revisions("app/layers");
    let r2 = run("app/layers", &["-o", "obd2"], &wd("w2"));
    assert_eq!(
        r2.summary,
        Summary {
            manifests_reused: 1,
            ..Default::default()
        },
        "{}",
        r2.stdout
    );
    assert_eq!(
        work_evidence(Path::new(&wd("w2"))),
        Work::default(),
        "no layer work at all"
    );
    // The result line says what happened, not "0 layers".
    assert!(
        r2.stdout
            .contains("(1 manifest reused from the dedup database)"),
        "{}",
        r2.stdout
    );
    let (d2, _) = get_json(&app, "obd2");
    assert_eq!(d2.digest, d1.digest);
    assert_eq!(reg.manifest_revisions("app/layers"), revisions);
    println!(
        "dedup e2e ({}): first conversion {:.2} s (4 layers converted), second {:.2} s (manifest reused)",
        match backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Mysql(_) => "mariadb",
        },
        r1.secs,
        r2.secs
    );

    // 3. A converted blob disappears from the repository: the manifest row (its manifest
    //    is no longer complete) and that layer's row are stale; only that layer is
    //    converted again, on top of the reused layers below it (downloaded as its
    //    lowers), with the same result.
    let k = 2;
    reg.delete_blob("app/layers", &layers[k]);
    assert!(!blob_exists(&app, &layers[k]));
    let r3 = run("app/layers", &["-o", "obd3"], &wd("w3"));
    assert_eq!(
        r3.summary,
        Summary {
            layers_converted: 1,
            layers_reused: 3,
            manifests_converted: 1,
            stale_rows: 2,
            ..Default::default()
        },
        "{}\n{}",
        r3.stdout,
        r3.stderr
    );
    assert!(
        r3.stderr.contains(&format!(
            "dedup: deleted stale row: layer {} → {}",
            chain[k], layers[k]
        )),
        "{}",
        r3.stderr
    );
    assert!(
        r3.stderr.contains("dedup: deleted stale row: manifest"),
        "{}",
        r3.stderr
    );
    assert_eq!(
        work_evidence(Path::new(&wd("w3"))),
        Work {
            converted: vec![k],
            downloaded: (0..k).collect(),
            untouched: (k + 1..n).collect(),
        }
    );
    let (d3, m3) = get_json(&app, "obd3");
    assert_eq!(d3.digest, d1.digest, "deterministic: the same image again");
    assert!(blob_exists(&app, &layers[k]), "the layer was pushed again");
    assert_complete(&app, &m3);
    assert_layer_rows(db.as_ref(), &host, "app/layers", &chain, &layers);
    assert_eq!(
        manifest_row(
            db.as_ref(),
            &host,
            "app/layers",
            &src_desc.digest,
            MT_DOCKER_MANIFEST
        ),
        Some(d1.digest.to_string())
    );
    // And the result is the source image's filesystem.
    let files: Vec<PathBuf> = layers
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let size = m3["layers"][i]["size"].as_u64().unwrap();
            let desc = Descriptor::new(MT_DOCKER_LAYER_TAR, d.parse().unwrap(), size);
            let f = t.join(format!("layer{i}.tar"));
            std::fs::write(&f, app.read_blob(&desc, 1 << 30).unwrap()).unwrap();
            f
        })
        .collect();
    let tree = flatten_and_scan(&files, t);
    assert_same_tree(&tree, &reference_tree(&layout, "v1", None));

    // 4. The image copied into another repository, converted with OCI media types: no
    //    OCI manifest anywhere, but every layer is mounted from app/layers.
    skopeo_push(&layout, "v1", &host, "third/layers");
    let third = reg.client("third/layers");
    for l in &layers {
        assert!(!blob_exists(&third, l));
    }
    let r4 = run("third/layers", &["-o", "oci", "--oci"], &wd("w4"));
    assert_eq!(
        r4.summary,
        Summary {
            layers_reused: 4,
            layers_mounted: 4,
            manifests_converted: 1,
            ..Default::default()
        },
        "{}",
        r4.stdout
    );
    assert_eq!(
        work_evidence(Path::new(&wd("w4"))),
        Work {
            untouched: (0..n).collect(),
            ..Default::default()
        },
        "nothing converted, nothing downloaded"
    );
    let (d4, m4) = get_json(&third, "oci");
    assert_eq!(d4.media_type, MT_OCI_MANIFEST);
    assert_eq!(
        layer_digests(&m4),
        layers,
        "same layer blobs as the Docker flavour"
    );
    assert_complete(&third, &m4);
    assert_layer_rows(db.as_ref(), &host, "third/layers", &chain, &layers);

    // 5. Another image made of v1's lower layers, in another repository: no manifest
    //    hit, every layer mounted from a repository holding it, none converted or
    //    downloaded; the result is that image's filesystem.
    derive_without_top_layer(&layout);
    skopeo_push(&layout, "v2", &host, "lower/layers");
    let lower = reg.client("lower/layers");
    let r5 = run_tag("lower/layers", "v2", &["-o", "obd"], &wd("w5"));
    assert_eq!(
        r5.summary,
        Summary {
            layers_reused: 3,
            layers_mounted: 3,
            manifests_converted: 1,
            ..Default::default()
        },
        "{}",
        r5.stdout
    );
    assert_eq!(
        work_evidence(Path::new(&wd("w5"))),
        Work {
            untouched: (0..n - 1).collect(),
            ..Default::default()
        }
    );
    let (_, m5) = get_json(&lower, "obd");
    assert_eq!(layer_digests(&m5), layers[..n - 1]);
    assert_complete(&lower, &m5);
    let files: Vec<PathBuf> = m5["layers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let desc: Descriptor = serde_json::from_value(l.clone()).unwrap();
            let f = t.join(format!("lower{i}.tar"));
            std::fs::write(&f, lower.read_blob(&desc, 1 << 30).unwrap()).unwrap();
            f
        })
        .collect();
    let tree = flatten_and_scan(&files, t);
    assert_same_tree(&tree, &reference_tree(&layout, "v2", None));

    // 6. Another copy, Docker media types: the converted manifest of app/layers is copied
    //    (its blobs mounted, its bytes pushed unchanged) and tagged.
    skopeo_push(&layout, "v1", &host, "other/layers");
    let other = reg.client("other/layers");
    let r6 = run("other/layers", &["-o", "obd"], &wd("w6"));
    assert_eq!(
        r6.summary,
        Summary {
            manifests_reused: 1,
            manifests_copied: 1,
            ..Default::default()
        },
        "{}",
        r6.stdout
    );
    let (d6, m6) = get_json(&other, "obd");
    assert_eq!(d6.digest, d1.digest);
    assert_complete(&other, &m6);
    assert_eq!(
        manifest_row(
            db.as_ref(),
            &host,
            "other/layers",
            &src_desc.digest,
            MT_DOCKER_MANIFEST
        ),
        Some(d1.digest.to_string())
    );
}

#[test]
fn reuse_sqlite() {
    let t = tempfile::tempdir().unwrap();
    reuse_flow(Backend::sqlite(t.path()), t.path());
}

#[test]
fn reuse_mariadb() {
    let t = tempfile::tempdir().unwrap();
    reuse_flow(Backend::mariadb(), t.path());
}

/// A reused layer is verified when it is downloaded: a converted blob whose bytes in the
/// registry are corrupt fails its digest check and the layer is converted again.
#[test]
fn corrupt_converted_layer_is_converted_again() {
    let t = tempfile::tempdir().unwrap();
    let backend = Backend::sqlite(t.path());
    let reg = Registry::plain();
    let host = reg.host();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    skopeo_push(&images.join("layers"), "v1", &host, "app/layers");
    let app = reg.client("app/layers");
    let run = |tag: &str, work: &str| {
        let mut a = strings(&[
            "-r",
            &format!("{host}/app/layers"),
            "-i",
            "v1",
            "--plain",
            "--vsize",
            VSIZE,
            "-o",
            tag,
            "--reserve",
            "-d",
            &t.path().join(work).display().to_string(),
        ]);
        a.extend(backend.args());
        convert(&a)
    };
    run("obd1", "w1");
    let (d1, m1) = get_json(&app, "obd1");
    let layers = layer_digests(&m1);
    // Layer 3 is gone (so it is converted, on top of layers 0-2, which are downloaded);
    // layer 0's stored bytes are corrupt (same size).
    reg.delete_blob("app/layers", &layers[3]);
    let data = reg.blob_data_path(&layers[0]);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let r = run("obd2", "w2");
    assert_eq!(
        (r.summary.layers_converted, r.summary.layers_reused),
        (2, 2),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.contains("cannot download its converted layer")
            && r.stderr.contains("digest mismatch"),
        "{}",
        r.stderr
    );
    assert_eq!(
        work_evidence(&t.path().join("w2")),
        Work {
            converted: vec![0, 3],
            downloaded: vec![1, 2],
            untouched: vec![],
        }
    );
    let (d2, _) = get_json(&app, "obd2");
    assert_eq!(d2.digest, d1.digest);
}

/// A layer row whose size is not the size of its blob (a row written by hand, or by a
/// broken tool) is not reused: a manifest naming the blob with that size cannot be pulled
/// (overlaybd reads the blob by the size its descriptor gives). The registry says the
/// size when asked whether the blob is there; the row is deleted and the layer converted
/// again, and the image has the sizes of a run without the bad row.
#[test]
fn a_layer_row_with_another_size_is_not_reused() {
    let t = tempfile::tempdir().unwrap();
    let backend = Backend::sqlite(t.path());
    let reg = Registry::plain();
    let host = reg.host();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    skopeo_push(&images.join("layers"), "v1", &host, "app/layers");
    let app = reg.client("app/layers");
    let run = |tag: &str, work: &str, extra: &[&str]| {
        let mut a = strings(&[
            "-r",
            &format!("{host}/app/layers"),
            "-i",
            "v1",
            "--plain",
            "--vsize",
            VSIZE,
            "-o",
            tag,
            "--reserve",
            "-d",
            &t.path().join(work).display().to_string(),
        ]);
        a.extend(strings(extra));
        a.extend(backend.args());
        convert(&a)
    };
    run("obd1", "w1", &["--oci"]);
    let (_, m1) = get_json(&app, "obd1");
    let layers = layer_digests(&m1);
    let top = &m1["layers"][3];
    let size = top["size"].as_u64().unwrap();
    let chain = chain_ids(&app, "v1");
    let db = backend.open();
    let right = LayerEntry {
        host: host.clone(),
        repository: "app/layers".into(),
        chain_id: chain[3].clone(),
        converted_digest: layers[3].clone(),
        data_size: size,
    };
    assert!(db.delete_layer_entry(&right).unwrap());
    let wrong = LayerEntry {
        data_size: size + 512,
        ..right
    };
    assert!(matches!(
        db.create_layer_entry(&wrong).unwrap(),
        obddedup::StoreOutcome::Inserted
    ));

    // Docker media types this time: a manifest miss, whose layers are all looked up; the
    // top one is not downloaded unless it is converted.
    let r = run("obd2", "w2", &[]);
    let (_, m2) = get_json(&app, "obd2");
    for (i, (a, b)) in m1["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m2["layers"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(
            (&a["digest"], &a["size"]),
            (&b["digest"], &b["size"]),
            "layer {i}\n{}\n{}",
            r.stdout,
            r.stderr
        );
    }
    assert_eq!(r.summary.stale_rows, 1, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        (r.summary.layers_converted, r.summary.layers_reused),
        (1, 3),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let key = LayerKey {
        host: &host,
        repository: "app/layers",
        chain_id: &chain[3],
    };
    assert_eq!(
        db.get_layer_entry_for_repo(key)
            .unwrap()
            .map(|e| e.data_size),
        Some(size),
        "the row was replaced by the converted layer's"
    );
    assert_complete(&app, &m2);
}

/// Tag `liar` in the layout: image `latest` whose config claims another diff_id
/// for layer 1 (a well-formed digest of other content).
fn derive_lying_diff_id(layout: &Path) {
    derive_image(layout, "latest", "liar", |_, ids| {
        ids[1] = Digest::of(b"not this layer");
    });
}

/// The chain IDs of tag `liar`, from its (lying) config.
fn lying_chain_ids(layout: &Path) -> Vec<Digest> {
    use obdoci::layout::Layout;
    let l = Layout::open(layout).unwrap();
    let d = l.resolve(&Reference::Tag("liar".into())).unwrap();
    let m: Manifest = serde_json::from_slice(&l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    let cfg = ImageConfig::parse("config", &l.read_blob(&m.config, 1 << 20).unwrap()).unwrap();
    obdoci::chain_ids(&cfg.diff_ids("config").unwrap())
}

/// Dedup rows are keyed by chain IDs computed from the config's diff_ids. A
/// config that lies about a layer would store its conversion under another
/// layer's key, for every later image with that key to reuse; so with a
/// database, each converted layer's uncompressed stream must match its diff_id
/// (native and TurboOCI), and the run fails naming the layer. Without a
/// database the image converts as upstream's convertor converts it.
#[test]
fn lying_diff_ids_fail_a_dedup_conversion() {
    let t = tempfile::tempdir().unwrap();
    let backend = Backend::sqlite(t.path());
    let reg = Registry::plain();
    let host = reg.host();
    // `sample`: two gzip layers, which TurboOCI takes too.
    let layout = t.path().join("images");
    build_images("sample", &layout, &[]);
    derive_lying_diff_id(&layout);
    let src = format!("oci:{}", layout.display());
    for output in [["-o", "obd"], ["--turboOCI", "turbo"]] {
        let mut a = strings(&[
            "-r",
            &src,
            "-i",
            "liar",
            "--output-repository",
            &format!("{host}/app/liar"),
            "--plain",
            "--vsize",
            VSIZE,
            "-d",
            &t.path().join("w").display().to_string(),
        ]);
        a.extend(strings(&output));
        let mut with_db = a.clone();
        with_db.extend(backend.args());
        let o = convertor_logging(&with_db, "warn");
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{output:?}: {e}");
        assert!(e.contains("rootfs.diff_ids"), "{output:?}: {e}");
        assert!(
            e.contains(&Digest::of(b"not this layer").to_string()),
            "{e}"
        );
        if output[0] == "-o" {
            // No row under the key the lie makes (layer 0's, honest, may be stored).
            let chain = lying_chain_ids(&layout);
            let row = backend
                .open()
                .get_layer_entry_for_repo(LayerKey {
                    host: &host,
                    repository: "app/liar",
                    chain_id: chain[1].as_str(),
                })
                .unwrap();
            assert!(row.is_none(), "{row:?}");
        }
        let o = convertor_logging(&a, "warn");
        assert!(
            o.status.success(),
            "{output:?} without a database: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A multi-platform index: every platform manifest is reused on the second run and the
/// converted index, rebuilt from them, is the same.
#[test]
fn index_reuse_sqlite() {
    let t = tempfile::tempdir().unwrap();
    let backend = Backend::sqlite(t.path());
    let reg = Registry::plain();
    let host = reg.host();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    skopeo_push(&images.join("multi"), "multi", &host, "app/multi");
    let run = |tag: &str| {
        let mut a = strings(&[
            "-r",
            &format!("{host}/app/multi"),
            "-i",
            "multi",
            "--plain",
            "--vsize",
            VSIZE,
            "-o",
            tag,
            "-d",
            &t.path().join("w").display().to_string(),
        ]);
        a.extend(backend.args());
        convert(&a)
    };
    let r1 = run("m1");
    assert_eq!(
        (r1.summary.manifests_converted, r1.summary.manifests_reused),
        (2, 0),
        "{}",
        r1.stdout
    );
    assert!(r1.summary.layers_converted > 0);
    assert!(r1.stdout.contains("(2 manifests, "), "{}", r1.stdout);
    let r2 = run("m2");
    assert_eq!(
        r2.summary,
        Summary {
            manifests_reused: 2,
            ..Default::default()
        },
        "{}",
        r2.stdout
    );
    assert!(
        r2.stdout
            .contains("(2 manifests reused from the dedup database)"),
        "{}",
        r2.stdout
    );
    let repo = reg.client("app/multi");
    let (i1, idx) = get_json(&repo, "m1");
    let (i2, _) = get_json(&repo, "m2");
    assert_eq!(i1.media_type, MT_OCI_INDEX);
    assert_eq!(i1.digest, i2.digest);
    for m in idx["manifests"].as_array().unwrap() {
        let (_, child) = get_json(&repo, m["digest"].as_str().unwrap());
        assert_complete(&repo, &child);
    }
}

/// Two convertor processes convert the same image at the same time with one database:
/// both succeed with the same output, the rows are written once, no conflict.
fn race(backend: Backend, t: &Path) {
    let reg = Registry::plain();
    let host = reg.host();
    let images = t.join("images");
    build_images("testset", &images, &[]);
    skopeo_push(&images.join("layers"), "v1", &host, "race/layers");
    let repo = reg.client("race/layers");
    let args = |tag: &str| {
        let mut a = strings(&[
            "-r",
            &format!("{host}/race/layers"),
            "-i",
            "v1",
            "--plain",
            "--vsize",
            VSIZE,
            "-o",
            tag,
            "-d",
            &t.join(format!("w-{tag}")).display().to_string(),
        ]);
        a.extend(backend.args());
        a
    };
    let (a, b) = (args("a"), args("b"));
    let t0 = Instant::now();
    let spawn = |a: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_convertor"))
            .args(a)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    let secs = t0.elapsed().as_secs_f64();
    let (ra, rb) = (check_output(&a, oa, secs), check_output(&b, ob, secs));
    for r in [&ra, &rb] {
        assert_eq!(
            r.summary.layers_converted + r.summary.layers_reused + 4 * r.summary.manifests_reused,
            4,
            "{}",
            r.stdout
        );
    }
    let (da, ma) = get_json(&repo, "a");
    let (db_, _) = get_json(&repo, "b");
    assert_eq!(da.digest, db_.digest, "both convertors made the same image");
    let chain = chain_ids(&repo, "v1");
    let db = backend.open();
    assert_layer_rows(
        db.as_ref(),
        &host,
        "race/layers",
        &chain,
        &layer_digests(&ma),
    );
    for c in &chain {
        assert_eq!(db.get_cross_repo_layer_entries(&host, c).unwrap().len(), 1);
    }
    assert_complete(&repo, &ma);
    println!(
        "dedup race: both done in {secs:.2} s; a: {:?}; b: {:?}",
        ra.summary, rb.summary
    );
}

#[test]
fn racing_convertors_sqlite() {
    let t = tempfile::tempdir().unwrap();
    race(Backend::sqlite(t.path()), t.path());
}

#[test]
fn racing_convertors_mariadb() {
    let t = tempfile::tempdir().unwrap();
    race(Backend::mariadb(), t.path());
}

/// A bad `--db-type/--db-str` stops the convertor at once with one line naming the
/// problem: no registry connection, no work directory, no output directory.
#[test]
fn bad_db_settings_fail_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    // A "registry" that records whether anyone connected.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    fake.set_nonblocking(true).unwrap();
    let repo = format!("127.0.0.1:{}/app/img", fake.local_addr().unwrap().port());
    let closed_port = common::free_port();
    let (mysql_port, empty_db) = dedup_support::with_shared(|db| {
        use mysql::prelude::Queryable;
        db.root_conn(None)
            .unwrap()
            .query_drop("CREATE DATABASE e2e_no_tables")
            .unwrap();
        (db.port, "e2e_no_tables")
    });
    let good_db = dedup_support::with_shared(|db| db.fresh_database("e2e_bad"));
    let a_file = t.path().join("a-file");
    std::fs::write(&a_file, b"").unwrap();
    let layout_out = t.path().join("layout-out");
    let secret = "s3cr3t-pw";

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "malformed DSN",
            strings(&[
                "--db-type",
                "mysql",
                "--db-str",
                &format!("obd:{secret}@tcp(127.0.0.1:3306"),
            ]),
            "invalid MySQL --db-str",
        ),
        (
            "unknown DSN parameter",
            strings(&[
                "--db-type",
                "mysql",
                "--db-str",
                &format!("obd:{secret}@tcp(127.0.0.1:3306)/db?bogus=1"),
            ]),
            "invalid MySQL --db-str",
        ),
        (
            "unreachable server",
            strings(&[
                "--db-type",
                "mysql",
                "--db-str",
                &format!("obd:{secret}@tcp(127.0.0.1:{closed_port})/db"),
            ]),
            "cannot connect to MySQL",
        ),
        (
            "wrong password",
            strings(&[
                "--db-type",
                "mysql",
                "--db-str",
                &format!(
                    "{}:{secret}@tcp(127.0.0.1:{mysql_port})/{good_db}",
                    dedup_support::TEST_USER
                ),
            ]),
            "check the user and password",
        ),
        (
            "database without the tables",
            strings(&[
                "--db-type",
                "mysql",
                "--db-str",
                &format!(
                    "{}:{}@tcp(127.0.0.1:{mysql_port})/{empty_db}",
                    dedup_support::TEST_USER,
                    dedup_support::TEST_PASSWORD
                ),
            ]),
            "not ready for dedup",
        ),
        (
            "mysql without --db-str",
            strings(&["--db-type", "mysql"]),
            "--db-type mysql needs --db-str",
        ),
        (
            "unknown --db-type",
            strings(&["--db-type", "postgres", "--db-str", "x"]),
            "unknown --db-type",
        ),
        (
            "unwritable SQLite path",
            strings(&["--db-type", "sqlite", "--db-str", "/proc/obd-dedup.sqlite"]),
            "/proc/obd-dedup.sqlite",
        ),
        (
            "SQLite path below a file",
            strings(&[
                "--db-type",
                "sqlite",
                "--db-str",
                &a_file.join("dedup.sqlite").display().to_string(),
            ]),
            "cannot use SQLite database",
        ),
        (
            "OCI layout destination",
            strings(&[
                "--db-type",
                "sqlite",
                "--db-str",
                &t.path().join("ok.sqlite").display().to_string(),
                "--output-repository",
                &format!("oci:{}", layout_out.display()),
            ]),
            "needs a registry destination",
        ),
    ];
    // The underlying reason (the DSN parser's, the server's, SQLite's) is printed exactly
    // once: the database errors leave it to their source.
    let reasons = [
        ("malformed DSN", "no '/' before the database name"),
        ("unreachable server", "Connection refused"),
        ("wrong password", "Access denied for user"),
        (
            "database without the tables",
            "doesn't exist (MySQL error 1146)",
        ),
        ("unwritable SQLite path", "unable to open database file"),
    ];
    for (i, (name, db_args, expected)) in cases.iter().enumerate() {
        let work = t.path().join(format!("work{i}"));
        let mut a = strings(&["-r", &repo, "-i", "v1", "-o", "obd", "--plain", "-d"]);
        a.push(work.display().to_string());
        a.extend(db_args.iter().cloned());
        let t0 = Instant::now();
        let o = convertor_logging(&a, "warn");
        let secs = t0.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&o.stderr);
        println!("{name}: {:.0} ms: {}", secs * 1e3, stderr.trim());
        // Settings that cannot work whatever the database holds are usage
        // errors (exit 2, as clap's); a database that refuses is not.
        let usage = [
            "malformed DSN",
            "unknown DSN parameter",
            "mysql without --db-str",
            "unknown --db-type",
            "OCI layout destination",
        ]
        .contains(name);
        let code = if usage { 2 } else { 1 };
        assert_eq!(o.status.code(), Some(code), "{name}: {stderr}");
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line expected:\n{stderr}");
        assert!(
            lines[0].starts_with("convertor: error: "),
            "{name}: {stderr}"
        );
        assert!(
            lines[0].contains(expected),
            "{name}: expected {expected:?} in {stderr}"
        );
        if let Some((_, reason)) = reasons.iter().find(|(n, _)| n == name) {
            assert_eq!(
                lines[0].matches(reason).count(),
                1,
                "{name}: {reason:?} once expected in {stderr}"
            );
        }
        assert!(
            !lines[0].contains(secret),
            "{name}: password shown: {stderr}"
        );
        assert!(
            !lines[0].contains(dedup_support::TEST_PASSWORD),
            "{name}: {stderr}"
        );
        assert!(o.stdout.is_empty(), "{name}");
        assert!(!work.exists(), "{name}: work directory created");
        assert!(
            matches!(fake.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{name}: the convertor connected to the registry"
        );
        assert!(secs < 1.0, "{name}: took {secs:.2} s to fail");
    }
    assert!(!layout_out.exists());
    assert!(!t.path().join("ok.sqlite").exists());
}

/// Rows are keyed by `convert::FORMAT_VERSION`: a build whose output differs from
/// older builds must use a new format version, or it would reuse their layers under its
/// own (an image mixing layers of two builds). This pins what format `overlaybd-rs/1`
/// produces for the small sample image with default options. If it fails after a change
/// of the converted bytes (not of `tests/images/build.py sample`), bump `FORMAT_VERSION`
/// and then update the digest here. (The digest is the manifest's: it changed once
/// without a format bump when `oci:` destinations started to get OCI media types; the
/// layers and the config stayed byte for byte the same.)
#[test]
fn output_format_version_pins_the_output() {
    const FORMAT: &str = "overlaybd-rs/1";
    const SAMPLE_DIGEST: &str =
        "sha256:52f2d22bc90bdb275abf5fb192f6d983ca5219dcc0a27e2b90c869187b14b872";
    let t = tempfile::tempdir().unwrap();
    let sample = t.path().join("sample");
    build_images("sample", &sample, &[]);
    let out = convert_ok(&[
        "-r",
        &format!("oci:{}", sample.display()),
        "-i",
        "latest",
        "-o",
        "pin",
        "-d",
        &t.path().join("w").display().to_string(),
    ]);
    assert_eq!(obdconvert::FORMAT_VERSION, FORMAT);
    assert!(
        out.contains(SAMPLE_DIGEST),
        "the converted output changed ({out}): bump convert::FORMAT_VERSION and update this test"
    );
}
