//! Deduplication end to end: the convertor binary against a real docker-registry and a
//! real database (SQLite file, and a MariaDB started by the test). Asserts on the
//! convertor's end-of-run `dedup:` summary line and on the registry contents.

mod common;
mod dedup_support;

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use common::convert::*;
use common::Registry;
use obdtools::oci::{Descriptor, Digest, Manifest, Reference};
use obdtools::registry::{self, ClientOptions};

fn client(reg: &Registry, repo: &str) -> registry::Repository {
    let o = ClientOptions {
        plain_http: true,
        ..Default::default()
    };
    registry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository(repo)
}

fn manifest(repo: &registry::Repository, tag: &str) -> (Descriptor, Manifest) {
    let (d, b) = repo.get_manifest(&Reference::Tag(tag.into())).unwrap();
    (d, serde_json::from_slice(&b).unwrap())
}

/// Run a conversion; returns (stdout, the `dedup:` summary line, seconds).
fn convert_db(
    reg: &Registry,
    repo: &str,
    wd: &Path,
    db: &[&str],
    extra: &[&str],
) -> (String, String, f64) {
    let r = format!("{}/{repo}", reg.host());
    let mut args = vec![
        "-r",
        &r,
        "-i",
        "v1",
        "--plain",
        "--vsize",
        "4",
        "-d",
        wd.to_str().unwrap(),
    ];
    args.extend_from_slice(db);
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let o = convertor(&args);
    let secs = t0.elapsed().as_secs_f64();
    let (out, err) = texts(&o);
    assert!(
        o.status.success(),
        "convertor {args:?} failed:\n{out}\n{err}"
    );
    let summary = err
        .lines()
        .find(|l| l.starts_with("dedup: "))
        .unwrap_or_else(|| panic!("no dedup summary in:\n{err}"))
        .to_string();
    (out, summary, secs)
}

fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `<n> <what>` from a summary line, e.g. count(s, "converted") in the layer part.
fn count(summary: &str, part: &str, what: &str) -> u64 {
    let key = format!("{part}:");
    let sect = summary
        .split(';')
        .find_map(|s| s.split_once(&key).map(|x| x.1))
        .unwrap_or_else(|| panic!("no '{part}' in {summary}"));
    for item in sect.split(',') {
        if let Some(n) = item.trim().strip_suffix(what) {
            if let Ok(n) = n.trim().parse() {
                return n;
            }
        }
    }
    panic!("no '{what}' in '{part}' of {summary}")
}

fn stale(summary: &str) -> u64 {
    let (_, rest) = summary.rsplit_once(';').unwrap();
    rest.split(',')
        .find_map(|i| i.trim().strip_suffix("stale rows deleted"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stale count in {summary}"))
}

/// Tag `v2` in the layout: image `v1` without its top layer. A different manifest (so
/// no manifest-level hit) whose layers' chain ids are those of `v1`'s lower layers.
fn derive_without_top_layer(layout: &Path) {
    use obdtools::oci::layout::Layout;
    use obdtools::oci::model::ImageConfig;
    let l = Layout::open(layout).unwrap();
    let d = l.resolve(&Reference::Tag("v1".into())).unwrap();
    let mut m: Manifest = serde_json::from_slice(&l.read_blob(&d, 1 << 20).unwrap()).unwrap();
    let mut cfg = ImageConfig::parse("config", &l.read_blob(&m.config, 1 << 20).unwrap()).unwrap();
    let mut ids = cfg.diff_ids("config").unwrap();
    ids.pop();
    cfg.set_diff_ids(&ids);
    m.layers.pop();
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
    l.tag("v2", &md).unwrap();
}

/// Every scenario of the issue against one database (given as convertor flags).
fn scenarios(db: &[&str]) {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    for repo in ["dd/a", "dd/c"] {
        skopeo_push(&layout, "v1", &reg.host(), repo);
    }
    // dd/b holds a different image sharing all but the top layer with dd/a's.
    derive_without_top_layer(&layout);
    skopeo_push(&layout, "v2", &reg.host(), "dd/b-src");
    let st = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--quiet",
        ])
        .arg(format!("docker://{}/dd/b-src:v2", reg.host()))
        .arg(format!("docker://{}/dd/b:v1", reg.host()))
        .status()
        .unwrap();
    assert!(st.success(), "skopeo copy v2 -> dd/b:v1");
    let wd = t.path().join("work");
    let a = client(&reg, "dd/a");
    let n = manifest(&a, "v1").1.layers.len() as u64;
    assert!(n >= 3, "test image has {n} layers");

    // 1. First conversion converts every layer and records it.
    let (_, s1, t1) = convert_db(&reg, "dd/a", &wd, db, &["--overlaybd", "obd1"]);
    assert_eq!(count(&s1, "layers", "converted"), n, "{s1}");
    assert_eq!(count(&s1, "layers", "recorded"), n, "{s1}");
    assert_eq!(count(&s1, "manifests", "recorded"), 1, "{s1}");
    let (d1, m1) = manifest(&a, "obd1");

    // 2. Second conversion: the manifest is reused (re-tagged), nothing converted.
    let (_, s2, t2) = convert_db(&reg, "dd/a", &wd, db, &["--overlaybd", "obd2"]);
    assert_eq!(count(&s2, "manifests", "reused in repo"), 1, "{s2}");
    assert_eq!(count(&s2, "layers", "converted"), 0, "{s2}");
    assert_eq!(manifest(&a, "obd2").0.digest, d1.digest);
    eprintln!("first conversion {t1:.2} s, second (dedup hit) {t2:.2} s");

    // 3. OCI output: a different manifest, but every layer is reused in place.
    let (_, s3, _) = convert_db(&reg, "dd/a", &wd, db, &["--overlaybd", "obd-oci", "--oci"]);
    assert_eq!(count(&s3, "layers", "reused in repo"), n, "{s3}");
    assert_eq!(count(&s3, "layers", "converted"), 0, "{s3}");
    let m3 = manifest(&a, "obd-oci").1;
    let digests = |m: &Manifest| {
        m.layers
            .iter()
            .map(|l| l.digest.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(digests(&m3), digests(&m1));

    // 4. A converted blob (before any other repository holds it) deleted from the registry: that layer is converted again,
    //    its stale rows are deleted, and the result is identical (deterministic).
    let victim: Digest = m1.layers[1].digest.clone();
    let url = format!("http://{}/v2/dd/a/blobs/{victim}", reg.host());
    let st = std::process::Command::new("curl")
        .args([
            "-sf",
            "-X",
            "DELETE",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&st.stdout), "202", "blob delete");
    assert!(!a.blob_exists(&victim).unwrap());
    let (_, s6, _) = convert_db(&reg, "dd/a", &wd, db, &["--overlaybd", "obd3"]);
    assert_eq!(count(&s6, "layers", "converted"), 1, "{s6}");
    assert_eq!(count(&s6, "layers", "reused in repo"), n - 1, "{s6}");
    assert!(stale(&s6) >= 2, "manifest and layer rows deleted: {s6}");
    assert_eq!(manifest(&a, "obd3").0.digest, d1.digest);
    assert!(a.blob_exists(&victim).unwrap(), "blob pushed again");
    let (_, s7, _) = convert_db(&reg, "dd/a", &wd, db, &["--overlaybd", "obd4"]);
    assert_eq!(count(&s7, "manifests", "reused in repo"), 1, "{s7}");

    // 5. Another repository and another image made of v1's lower n-1 layers: no
    //    manifest hit, every layer is mounted from dd/a instead of converted, and the
    //    result is a correct image (flattened and compared with its source tree).
    let b = client(&reg, "dd/b");
    let (_, s5, _) = convert_db(&reg, "dd/b", &wd, db, &["--overlaybd", "obd", "--oci"]);
    assert_eq!(count(&s5, "manifests", "converted"), 1, "{s5}");
    assert_eq!(count(&s5, "layers", "mounted"), n - 1, "{s5}");
    assert_eq!(count(&s5, "layers", "converted"), 0, "{s5}");
    let m5 = manifest(&b, "obd").1;
    let mut files = Vec::new();
    for (i, l) in m5.layers.iter().enumerate() {
        assert_eq!(l.digest, m1.layers[i].digest, "layer {i}");
        let p = t.path().join(format!("b{i}"));
        std::fs::write(&p, b.read_blob(l, 1 << 30).unwrap()).unwrap();
        files.push(p);
    }
    let tree = flatten_and_scan(&files, t.path());
    assert_same_tree(&tree, &reference_tree(&layout, "v2", None));

    // 6. Docker output in a third repository: the whole manifest is copied across.
    let (_, s5, _) = convert_db(&reg, "dd/c", &wd, db, &["--overlaybd", "obd"]);
    assert_eq!(count(&s5, "manifests", "copied"), 1, "{s5}");
    assert_eq!(count(&s5, "layers", "converted"), 0, "{s5}");
    assert_eq!(manifest(&client(&reg, "dd/c"), "obd").0.digest, d1.digest);

    // 7. Two convertors racing on the same image both succeed with identical output.
    skopeo_push(&layout, "v1", &reg.host(), "dd/race");
    let r = format!("{}/dd/race", reg.host());
    let w1 = t.path().join("w1");
    let w2 = t.path().join("w2");
    let run = |wd: &Path, tag: &str| {
        let mut args = vec![
            "-r",
            &r,
            "-i",
            "v1",
            "--plain",
            "--vsize",
            "4",
            "-d",
            wd.to_str().unwrap(),
            "--overlaybd",
            tag,
        ];
        args.extend_from_slice(db);
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            convertor(&a)
        })
    };
    let (h1, h2) = (run(&w1, "x"), run(&w2, "y"));
    for o in [h1.join().unwrap(), h2.join().unwrap()] {
        let (out, err) = texts(&o);
        assert!(o.status.success(), "racing convertor failed:\n{out}\n{err}");
    }
    let race = client(&reg, "dd/race");
    assert_eq!(manifest(&race, "x").0.digest, manifest(&race, "y").0.digest);
}

#[test]
fn sqlite_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("dedup.sqlite");
    scenarios(&["--db-type", "sqlite", "--db-str", db.to_str().unwrap()]);
}

#[test]
fn mariadb_dedup() {
    let dsn = dedup_support::with_shared(|m| {
        let name = m.fresh_database("e2e");
        m.dsn(&name)
    });
    scenarios(&["--db-type", "mysql", "--db-str", &dsn]);
}

#[test]
fn bad_database_settings_fail_before_any_work() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let wd = t.path().join("work");
    let r = format!("{}/nothing/here", reg.host());
    let wrong_pw = dedup_support::with_shared(|m| {
        let name = m.fresh_database("bad");
        format!(
            "{}:wrong@tcp(127.0.0.1:{})/{name}",
            dedup_support::TEST_USER,
            m.port
        )
    });
    let missing_dir = t.path().join("no/such/dir/db.sqlite");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--db-type", "mysql", "--db-str", "root:pw@tcp(127.0.0.1/db"],
            "--db-str",
        ),
        (
            vec![
                "--db-type",
                "mysql",
                "--db-str",
                "u:secret@tcp(127.0.0.1:1)/db",
            ],
            "127.0.0.1:1",
        ),
        (
            vec!["--db-type", "mysql", "--db-str", &wrong_pw],
            "access denied",
        ),
        (
            vec![
                "--db-type",
                "sqlite",
                "--db-str",
                missing_dir.to_str().unwrap(),
            ],
            "no/such/dir",
        ),
        (vec!["--db-type", "postgres", "--db-str", "x"], "postgres"),
        (vec!["--db-type", "mysql"], "--db-str"),
    ];
    for (db, needle) in cases {
        let mut args = vec![
            "-r",
            &r,
            "-i",
            "v1",
            "--plain",
            "-d",
            wd.to_str().unwrap(),
            "-o",
            "out",
        ];
        args.extend_from_slice(&db);
        let t0 = Instant::now();
        let o = convertor(&args);
        let secs = t0.elapsed().as_secs_f64();
        let (_, err) = texts(&o);
        assert!(!o.status.success(), "{db:?} accepted");
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{db:?}: expected '{needle}' in: {err}"
        );
        assert!(
            !err.contains("secret") && !err.contains("wrong@"),
            "password leaked: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !wd.exists(),
            "{db:?}: work directory created before the check"
        );
        eprintln!("{db:?}: failed in {secs:.2} s: {}", err.trim());
    }
}
