//! The dedup database against real backends: a MariaDB server started by this test binary
//! (one per process, a fresh database per test) and SQLite files. The same generic suite runs on
//! both; backend-specific error handling is tested below it.

#[path = "dedup_support/mod.rs"]
mod dedup_support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use obddedup::{
    open, ConversionDatabase, DbError, LayerEntry, LayerKey, ManifestEntry, ManifestKey,
    StoreOutcome,
};

const HOST: &str = "registry.example:5000";
const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MT: &str = "application/vnd.docker.distribution.manifest.v2+json";
const FORMAT: &str = "overlaybd-rs/1";

fn digest(n: u64) -> String {
    format!("sha256:{n:064x}")
}

fn layer(repo: &str, chain: u64, blob: u64, size: u64) -> LayerEntry {
    LayerEntry {
        host: HOST.into(),
        repository: repo.into(),
        chain_id: digest(chain),
        converted_digest: digest(blob),
        data_size: size,
    }
}

fn manifest(repo: &str, src: u64, out: u64, mt: &str) -> ManifestEntry {
    ManifestEntry {
        host: HOST.into(),
        repository: repo.into(),
        original_digest: digest(src),
        media_type: mt.into(),
        converted_digest: digest(out),
        data_size: 1000 + out,
    }
}

/// A fresh database on one backend, plus raw SQL access for playing an upstream convertor.
trait Fixture: Sync {
    fn db_type(&self) -> &'static str;
    fn db_str(&self) -> String;
    fn open(&self, format: &str) -> Box<dyn ConversionDatabase> {
        open(self.db_type(), &self.db_str(), format)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.db_type()))
            .expect("a database")
    }
    /// Executes one statement with string parameters.
    fn raw_exec(&self, sql: &str, params: &[&str]);
    /// Runs a `select count(*) ...`.
    fn raw_count(&self, sql: &str, params: &[&str]) -> i64;
}

struct SqliteFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SqliteFixture {
    fn new() -> SqliteFixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.sqlite");
        SqliteFixture { _dir: dir, path }
    }
    fn conn(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.path).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }
}

impl Fixture for SqliteFixture {
    fn db_type(&self) -> &'static str {
        "sqlite"
    }
    fn db_str(&self) -> String {
        self.path.to_str().unwrap().into()
    }
    fn raw_exec(&self, sql: &str, params: &[&str]) {
        self.conn()
            .execute(sql, rusqlite::params_from_iter(params))
            .unwrap();
    }
    fn raw_count(&self, sql: &str, params: &[&str]) -> i64 {
        self.conn()
            .query_row(sql, rusqlite::params_from_iter(params), |r| r.get(0))
            .unwrap()
    }
}

struct MariaFixture {
    db: String,
    dsn: String,
    socket: PathBuf,
}

impl MariaFixture {
    fn new() -> MariaFixture {
        let (db, dsn) = dedup_support::with_shared(|m| {
            let db = m.fresh_database("t");
            let dsn = m.dsn(&db);
            (db, dsn)
        });
        MariaFixture {
            db,
            dsn,
            socket: dedup_support::shared().socket,
        }
    }
    fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(
            mysql::OptsBuilder::new()
                .socket(Some(self.socket.to_string_lossy().into_owned()))
                .user(Some("root"))
                .db_name(Some(self.db.clone())),
        )
        .unwrap()
    }
}

fn mysql_params(params: &[&str]) -> mysql::Params {
    mysql::Params::Positional(params.iter().map(|p| mysql::Value::from(*p)).collect())
}

impl Fixture for MariaFixture {
    fn db_type(&self) -> &'static str {
        "mysql"
    }
    fn db_str(&self) -> String {
        self.dsn.clone()
    }
    fn raw_exec(&self, sql: &str, params: &[&str]) {
        self.conn().exec_drop(sql, mysql_params(params)).unwrap();
    }
    fn raw_count(&self, sql: &str, params: &[&str]) -> i64 {
        self.conn()
            .exec_first::<i64, _, _>(sql, mysql_params(params))
            .unwrap()
            .unwrap()
    }
}

fn lkey<'a>(repo: &'a str, chain: &'a str) -> LayerKey<'a> {
    LayerKey {
        host: HOST,
        repository: repo,
        chain_id: chain,
    }
}

fn mkey<'a>(repo: &'a str, src: &'a str, mt: &'a str) -> ManifestKey<'a> {
    ManifestKey {
        host: HOST,
        repository: repo,
        original_digest: src,
        media_type: mt,
    }
}

// ---------------------------------------------------------------------------------------------
// The generic suite.

fn layer_crud(f: &dyn Fixture) {
    let db = f.open(FORMAT);
    let chain = digest(1);
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        None
    );
    assert!(db
        .get_cross_repo_layer_entries(HOST, &chain)
        .unwrap()
        .is_empty());

    let a = layer("app", 1, 0xa, 4096);
    let b = layer("lib/base", 1, 0xa, 4096);
    let other_host = LayerEntry {
        host: "other.example".into(),
        ..layer("app", 1, 0xb, 1)
    };
    for e in [&a, &b, &other_host] {
        assert_eq!(db.create_layer_entry(e).unwrap(), StoreOutcome::Inserted);
    }
    assert_eq!(
        db.create_layer_entry(&layer("app", 2, 0xc, u64::MAX >> 1))
            .unwrap(),
        StoreOutcome::Inserted
    );

    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(2)))
            .unwrap()
            .unwrap()
            .data_size,
        u64::MAX >> 1
    );
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("nope", &chain)).unwrap(),
        None
    );
    let mut cross = db.get_cross_repo_layer_entries(HOST, &chain).unwrap();
    cross.sort_by(|x, y| x.repository.cmp(&y.repository));
    assert_eq!(
        cross,
        vec![a.clone(), b.clone()],
        "other host's row excluded"
    );

    // Only the row as it is stored is deleted.
    assert!(!db.delete_layer_entry(&layer("app", 1, 0xb, 4096)).unwrap());
    assert!(!db.delete_layer_entry(&layer("app", 1, 0xa, 4097)).unwrap());
    assert!(db.delete_layer_entry(&a).unwrap());
    assert!(!db.delete_layer_entry(&a).unwrap());
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        None
    );
    assert_eq!(
        db.get_cross_repo_layer_entries(HOST, &chain).unwrap(),
        vec![b]
    );
    // Deleting one key leaves the others.
    assert!(db
        .get_layer_entry_for_repo(lkey("app", &digest(2)))
        .unwrap()
        .is_some());
}

fn manifest_crud(f: &dyn Fixture) {
    let db = f.open(FORMAT);
    let src = digest(7);
    let m1 = manifest("app", 7, 0x70, MT);
    let m2 = manifest("app", 7, 0x71, DOCKER_MT);
    let m3 = manifest("mirror/app", 7, 0x70, MT);
    for e in [&m1, &m2, &m3] {
        assert_eq!(db.create_manifest_entry(e).unwrap(), StoreOutcome::Inserted);
    }
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &src, MT))
            .unwrap(),
        Some(m1.clone())
    );
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &src, DOCKER_MT))
            .unwrap(),
        Some(m2.clone())
    );
    let mut cross = db.get_cross_repo_manifest_entries(HOST, MT, &src).unwrap();
    cross.sort_by(|x, y| x.repository.cmp(&y.repository));
    assert_eq!(cross, vec![m1.clone(), m3.clone()]);
    assert!(!db
        .delete_manifest_entry(&manifest("app", 7, 0x71, MT))
        .unwrap());
    assert!(!db
        .delete_manifest_entry(&ManifestEntry {
            data_size: 1,
            ..m1.clone()
        })
        .unwrap());
    assert!(db.delete_manifest_entry(&m1).unwrap());
    assert!(!db.delete_manifest_entry(&m1).unwrap());
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &src, MT))
            .unwrap(),
        None
    );
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &src, DOCKER_MT))
            .unwrap(),
        Some(m2)
    );
    assert_eq!(
        db.get_cross_repo_manifest_entries(HOST, MT, &src).unwrap(),
        vec![m3]
    );
}

fn duplicate_and_conflicting_stores(f: &dyn Fixture) {
    let db = f.open(FORMAT);
    let e = layer("app", 1, 0xa, 10);
    assert_eq!(db.create_layer_entry(&e).unwrap(), StoreOutcome::Inserted);
    assert_eq!(
        db.create_layer_entry(&e).unwrap(),
        StoreOutcome::AlreadyPresent
    );
    let other = layer("app", 1, 0xb, 10);
    assert_eq!(
        db.create_layer_entry(&other).unwrap(),
        StoreOutcome::Conflict {
            existing: e.clone()
        }
    );
    let other_size = layer("app", 1, 0xa, 11);
    assert_eq!(
        db.create_layer_entry(&other_size).unwrap(),
        StoreOutcome::Conflict {
            existing: e.clone()
        }
    );
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(1)))
            .unwrap(),
        Some(e)
    );

    let m = manifest("app", 2, 0x20, MT);
    assert_eq!(
        db.create_manifest_entry(&m).unwrap(),
        StoreOutcome::Inserted
    );
    assert_eq!(
        db.create_manifest_entry(&m).unwrap(),
        StoreOutcome::AlreadyPresent
    );
    assert_eq!(
        db.create_manifest_entry(&manifest("app", 2, 0x21, MT))
            .unwrap(),
        StoreOutcome::Conflict { existing: m }
    );
}

/// Rows of another format key, and rows written by an upstream convertor (bare digests), are
/// misses for us and never deleted by us; our rows are invisible to upstream's queries.
fn format_isolation_and_upstream_rows(f: &dyn Fixture) {
    let v1 = f.open("overlaybd-rs/1");
    let v2 = f.open("overlaybd-rs/2");
    let chain = digest(1);
    let src = digest(5);

    // Upstream convertor's exact INSERTs.
    f.raw_exec(
        "insert into overlaybd_layers(host, repo, chain_id, data_digest, data_size) values(?, ?, ?, ?, 77)",
        &[HOST, "app", &chain, &digest(0xf)],
    );
    f.raw_exec(
        "insert into overlaybd_manifests(host, repo, src_digest, out_digest, data_size, mediatype) values(?, ?, ?, ?, 88, ?)",
        &[HOST, "app", &src, &digest(0xe), MT],
    );
    assert_eq!(
        v1.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        None
    );
    assert!(v1
        .get_cross_repo_layer_entries(HOST, &chain)
        .unwrap()
        .is_empty());
    assert_eq!(
        v1.get_manifest_entry_for_repo(mkey("app", &src, MT))
            .unwrap(),
        None
    );
    // Their very values under our format: not their rows.
    assert!(!v1.delete_layer_entry(&layer("app", 1, 0xf, 77)).unwrap());
    assert!(!v1
        .delete_manifest_entry(&ManifestEntry {
            data_size: 88,
            ..manifest("app", 5, 0xe, MT)
        })
        .unwrap());

    // Same keys for us: no primary-key clash with the upstream rows.
    let ours = layer("app", 1, 0xa, 10);
    assert_eq!(
        v1.create_layer_entry(&ours).unwrap(),
        StoreOutcome::Inserted
    );
    assert_eq!(
        v1.create_manifest_entry(&manifest("app", 5, 0x50, MT))
            .unwrap(),
        StoreOutcome::Inserted
    );
    // Another format version: its own rows, never ours.
    assert_eq!(
        v2.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        None
    );
    let v2_row = layer("app", 1, 0xb, 20);
    assert_eq!(
        v2.create_layer_entry(&v2_row).unwrap(),
        StoreOutcome::Inserted
    );
    assert_eq!(
        v2.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        Some(v2_row.clone())
    );
    assert_eq!(
        v1.get_layer_entry_for_repo(lkey("app", &chain)).unwrap(),
        Some(ours)
    );
    assert!(v2.delete_layer_entry(&v2_row).unwrap());
    assert!(v1
        .get_layer_entry_for_repo(lkey("app", &chain))
        .unwrap()
        .is_some());

    // Upstream's own lookups still see exactly their one row each.
    assert_eq!(
        f.raw_count(
            "select count(*) from overlaybd_layers where host=? and chain_id=?",
            &[HOST, &chain]
        ),
        1
    );
    assert_eq!(
        f.raw_count(
            "select count(*) from overlaybd_manifests where host=? and src_digest=? and mediatype=?",
            &[HOST, &src, MT]
        ),
        1
    );
    assert_eq!(
        f.raw_count(
            "select count(*) from overlaybd_layers where chain_id=?",
            &[&format!("overlaybd-rs/1#{chain}")]
        ),
        1,
        "our row is stored under the documented namespaced key"
    );
}

fn bad_values_are_rejected_before_the_query(f: &dyn Fixture) {
    let db = f.open(FORMAT);
    let long_repo = "r".repeat(256);
    let e = db
        .create_layer_entry(&layer(&long_repo, 1, 2, 3))
        .unwrap_err();
    assert!(
        matches!(
            e,
            DbError::BadValue {
                what: "repository",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("255"), "{e}");
    let e = db
        .get_layer_entry_for_repo(lkey("app", "not-a-digest"))
        .unwrap_err();
    assert!(e.to_string().contains("chain id"), "{e}");
    let e = db
        .create_layer_entry(&LayerEntry {
            data_size: u64::MAX,
            ..layer("app", 1, 2, 3)
        })
        .unwrap_err();
    assert!(e.to_string().contains("data size"), "{e}");
    assert_eq!(
        f.raw_count("select count(*) from overlaybd_layers", &[]),
        0,
        "nothing written"
    );
}

/// 8 threads store the same 40 keys in different orders, once through one shared handle and
/// once with a handle (connection pool) each: every key is inserted exactly once, the others
/// see AlreadyPresent, nobody fails.
fn threads_race_on_the_same_keys(f: &dyn Fixture) {
    const THREADS: usize = 8;
    const KEYS: u64 = 40;
    for shared in [true, false] {
        let base = if shared { 1000 } else { 2000 };
        let one: Arc<dyn ConversionDatabase> = Arc::from(f.open(FORMAT));
        let handles: Vec<Arc<dyn ConversionDatabase>> = (0..THREADS)
            .map(|_| {
                if shared {
                    one.clone()
                } else {
                    Arc::from(f.open(FORMAT))
                }
            })
            .collect();
        let barrier = Arc::new(Barrier::new(THREADS));
        let outcomes: Vec<(u64, u64)> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .enumerate()
                .map(|(t, db)| {
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        let (mut ins, mut present) = (0, 0);
                        for i in 0..KEYS {
                            // Rotate the order per thread so that threads collide at different keys.
                            let k = base + (i + t as u64 * 5) % KEYS;
                            let l = db.create_layer_entry(&layer("app", k, k + 1, k)).unwrap();
                            let m = db
                                .create_manifest_entry(&manifest("app", k, k + 1, MT))
                                .unwrap();
                            for o in [l == StoreOutcome::Inserted, m == StoreOutcome::Inserted] {
                                if o {
                                    ins += 1
                                } else {
                                    present += 1
                                }
                            }
                            assert!(!matches!(l, StoreOutcome::Conflict { .. }));
                        }
                        (ins, present)
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let inserted: u64 = outcomes.iter().map(|o| o.0).sum();
        let present: u64 = outcomes.iter().map(|o| o.1).sum();
        assert_eq!(inserted, 2 * KEYS, "shared={shared}: {outcomes:?}");
        assert_eq!(present, 2 * KEYS * (THREADS as u64 - 1), "shared={shared}");
        for k in base..base + KEYS {
            assert_eq!(
                one.get_layer_entry_for_repo(lkey("app", &digest(k)))
                    .unwrap()
                    .unwrap()
                    .converted_digest,
                digest(k + 1)
            );
        }
    }
}

/// Two processes (this test binary re-executed) store the same keys at the same moment.
fn processes_race_on_the_same_keys(f: &dyn Fixture) {
    let _ = f.open(FORMAT); // tables exist before the children start
    let dir = tempfile::tempdir().unwrap();
    let keys = 60;
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "race_child",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("DEDUP_RACE_DB_TYPE", f.db_type())
                .env("DEDUP_RACE_DB_STR", f.db_str())
                .env("DEDUP_RACE_DIR", dir.path())
                .env("DEDUP_RACE_ID", i.to_string())
                .env("DEDUP_RACE_KEYS", keys.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(0..2).all(|i| dir.path().join(format!("ready-{i}")).exists()) {
        assert!(Instant::now() < deadline, "race children did not get ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let mut inserted = 0;
    let mut present = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "race child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("RACE-RESULT ").map(|x| x.1))
            .unwrap_or_else(|| panic!("no RACE-RESULT line in child output:\n{stdout}"));
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(|kv| kv.split_once('=').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(nums[2], 0, "conflicts: {line}");
        inserted += nums[0];
        present += nums[1];
    }
    assert_eq!(
        inserted,
        2 * keys,
        "each key inserted by exactly one process"
    );
    assert_eq!(present, 2 * keys);
    assert_eq!(
        f.raw_count("select count(*) from overlaybd_layers", &[]),
        keys as i64
    );
}

/// Helper process for `processes_race_on_the_same_keys`; does nothing unless started by it.
#[test]
#[ignore = "helper process, started by the process race tests"]
fn race_child() {
    let Ok(db_type) = std::env::var("DEDUP_RACE_DB_TYPE") else {
        eprintln!("race_child: not started by a race test; nothing to do");
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    let dir = PathBuf::from(env("DEDUP_RACE_DIR"));
    let id = env("DEDUP_RACE_ID");
    let keys: u64 = env("DEDUP_RACE_KEYS").parse().unwrap();
    let db = open(&db_type, &env("DEDUP_RACE_DB_STR"), FORMAT)
        .unwrap()
        .unwrap();
    std::fs::write(dir.join(format!("ready-{id}")), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("go").exists() {
        assert!(Instant::now() < deadline, "no go signal");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (mut ins, mut present, mut conflict) = (0, 0, 0);
    for k in 0..keys {
        let k = 5000 + k;
        for o in [
            db.create_layer_entry(&layer("app", k, k + 1, k)).unwrap() == StoreOutcome::Inserted,
            db.create_manifest_entry(&manifest("app", k, k + 1, MT))
                .unwrap()
                == StoreOutcome::Inserted,
        ] {
            if o {
                ins += 1
            } else {
                present += 1
            }
        }
        if let StoreOutcome::Conflict { .. } =
            db.create_layer_entry(&layer("app", k, k + 1, k)).unwrap()
        {
            conflict += 1;
        }
    }
    println!("RACE-RESULT inserted={ins} present={present} conflicts={conflict}");
}

/// A registry for [`a_stale_row_rewritten_meanwhile_is_kept`]: the converted blobs and
/// manifests `gone` are missing, and asking about one lets "another process" rewrite its
/// row first (`rewrite`, raw SQL) with a good value, as a second convertor that found
/// the row stale, deleted it and recorded its own conversion would.
struct RewritingRegistry<'a> {
    f: &'a dyn Fixture,
    gone: Vec<String>,
    /// Per missing digest: the statement and parameters that rewrite its row.
    rewrite: Vec<(String, &'static str, Vec<String>)>,
}

impl obddedup::resolve::DedupRegistry for RewritingRegistry<'_> {
    type Error = String;
    fn blob_exists(&self, _: &str, digest: &str, _: u64) -> Result<bool, String> {
        self.exists(digest)
    }
    fn mount_blob(&self, _: &str, _: &str, _: &str) -> Result<bool, String> {
        Ok(false)
    }
    fn manifest_exists(&self, _: &str, digest: &str) -> Result<bool, String> {
        self.exists(digest)
    }
    fn copy_manifest(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<obddedup::resolve::CopyOutcome, String> {
        Ok(obddedup::resolve::CopyOutcome::NotCopied)
    }
}

impl RewritingRegistry<'_> {
    fn exists(&self, digest: &str) -> Result<bool, String> {
        for (d, sql, params) in &self.rewrite {
            if d == digest {
                let p: Vec<&str> = params.iter().map(String::as_str).collect();
                self.f.raw_exec(sql, &p);
            }
        }
        Ok(!self.gone.iter().any(|g| g == digest))
    }
}

/// A row found stale (its blob or manifest missing) is deleted only as it was read: a row
/// another process wrote meanwhile under the same key, naming a good object, stays (and
/// is used by the next lookup). A stale row nobody touched is still deleted.
fn a_stale_row_rewritten_meanwhile_is_kept(f: &dyn Fixture) {
    use obddedup::resolve::{Dedup, LayerLookup, ManifestLookup, Target};
    let dd = Dedup::new(f.open(FORMAT));
    let db = dd.db();
    let app = Target {
        host: HOST,
        repository: "app",
    };
    // Layers: chain 1's row is rewritten (another blob and size), chain 2's is not.
    for e in [layer("app", 1, 0xa, 10), layer("app", 2, 0xc, 30)] {
        assert_eq!(db.create_layer_entry(&e).unwrap(), StoreOutcome::Inserted);
    }
    let good = layer("app", 1, 0xb, 20);
    // Manifest 5's row is rewritten, manifest 6's is not.
    for e in [manifest("app", 5, 0x50, MT), manifest("app", 6, 0x60, MT)] {
        assert_eq!(
            db.create_manifest_entry(&e).unwrap(),
            StoreOutcome::Inserted
        );
    }
    let good_m = manifest("app", 5, 0x51, MT);
    let reg = RewritingRegistry {
        f,
        gone: vec![digest(0xa), digest(0xc), digest(0x50), digest(0x60)],
        rewrite: vec![
            (
                digest(0xa),
                "update overlaybd_layers set data_digest=?, data_size=? where data_digest=?",
                vec![digest(0xb), "20".into(), digest(0xa)],
            ),
            (
                digest(0x50),
                "update overlaybd_manifests set out_digest=?, data_size=? where out_digest=?",
                vec![digest(0x51), good_m.data_size.to_string(), digest(0x50)],
            ),
        ],
    };
    assert_eq!(dd.lookup_layer(&reg, app, &digest(1)), LayerLookup::Miss);
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(1)))
            .unwrap(),
        Some(good.clone()),
        "the row written meanwhile is kept"
    );
    assert_eq!(dd.lookup_layer(&reg, app, &digest(2)), LayerLookup::Miss);
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(2)))
            .unwrap(),
        None
    );
    assert_eq!(
        dd.lookup_manifest(&reg, app, &digest(5), MT),
        ManifestLookup::Miss
    );
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &digest(5), MT))
            .unwrap(),
        Some(good_m.clone()),
        "the row written meanwhile is kept"
    );
    assert_eq!(
        dd.lookup_manifest(&reg, app, &digest(6), MT),
        ManifestLookup::Miss
    );
    assert_eq!(
        db.get_manifest_entry_for_repo(mkey("app", &digest(6), MT))
            .unwrap(),
        None
    );
    assert_eq!(dd.stats().stale_rows_deleted, 2);
    // The kept rows are used.
    assert!(matches!(
        dd.lookup_layer(&reg, app, &digest(1)),
        LayerLookup::Hit { size: 20, .. }
    ));
    assert!(matches!(
        dd.lookup_manifest(&reg, app, &digest(5), MT),
        ManifestLookup::Hit { .. }
    ));
}

macro_rules! suite {
    ($module:ident, $fixture:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn layer_crud() {
                super::layer_crud(&$fixture);
            }
            #[test]
            fn manifest_crud() {
                super::manifest_crud(&$fixture);
            }
            #[test]
            fn duplicate_and_conflicting_stores() {
                super::duplicate_and_conflicting_stores(&$fixture);
            }
            #[test]
            fn format_isolation_and_upstream_rows() {
                super::format_isolation_and_upstream_rows(&$fixture);
            }
            #[test]
            fn bad_values_are_rejected_before_the_query() {
                super::bad_values_are_rejected_before_the_query(&$fixture);
            }
            #[test]
            fn threads_race_on_the_same_keys() {
                super::threads_race_on_the_same_keys(&$fixture);
            }
            #[test]
            fn a_stale_row_rewritten_meanwhile_is_kept() {
                super::a_stale_row_rewritten_meanwhile_is_kept(&$fixture);
            }
            #[test]
            fn processes_race_on_the_same_keys() {
                super::processes_race_on_the_same_keys(&$fixture);
            }
        }
    };
}

suite!(sqlite, SqliteFixture::new());
suite!(mariadb, MariaFixture::new());

// ---------------------------------------------------------------------------------------------
// Opening: bad settings fail up front with a clear message and without the password.

/// The error of opening, with its causes, as the convertor prints it (no error's text
/// repeats its source's).
fn open_err(db_type: &str, db_str: &str) -> String {
    match open(db_type, db_str, FORMAT) {
        Ok(_) => panic!("opening {db_type} {db_str:?} succeeded"),
        Err(e) => testutil::assert_clean_chain(&e),
    }
}

#[test]
fn no_flags_means_no_dedup() {
    assert!(open("", "", FORMAT).unwrap().is_none());
}

#[test]
fn mysql_bad_password_names_the_user_not_the_password() {
    let m = dedup_support::shared();
    let db = dedup_support::with_shared(|s| s.fresh_database("t"));
    let dsn = format!(
        "{}:wrong-Secret-9@tcp(127.0.0.1:{})/{db}",
        dedup_support::TEST_USER,
        m.port
    );
    let e = open_err("mysql", &dsn);
    assert!(
        e.contains("cannot connect to MySQL obd@tcp(127.0.0.1:"),
        "{e}"
    );
    assert_eq!(e.matches("Access denied").count(), 1, "{e}");
    assert!(e.contains("check the user and password in --db-str"), "{e}");
    assert!(!e.contains("wrong-Secret-9"), "{e}");
}

#[test]
fn mysql_unreachable_server_fails_fast() {
    // A port nobody listens on (bound and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let e = open_err(
        "mysql",
        &format!("u:hunter22@tcp(127.0.0.1:{port})/conversioncache?timeout=3s"),
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        e.contains(&format!(
            "cannot connect to MySQL u@tcp(127.0.0.1:{port})/conversioncache"
        )),
        "{e}"
    );
    assert!(!e.contains("hunter22"), "{e}");
}

#[test]
fn mysql_missing_database_and_tables() {
    let m = dedup_support::shared();
    let e = open_err(
        "mysql",
        &format!(
            "obd:{}@tcp(127.0.0.1:{})/no_such_db",
            dedup_support::TEST_PASSWORD,
            m.port
        ),
    );
    assert_eq!(e.matches("Unknown database 'no_such_db'").count(), 1, "{e}");
    assert!(e.contains("scripts/mysql-setup.sh --db"), "{e}");
    assert!(!e.contains(dedup_support::TEST_PASSWORD), "{e}");

    let empty = dedup_support::with_shared(|s| {
        let mut c = s.root_conn(None).unwrap();
        c.query_drop("CREATE DATABASE empty_db").unwrap();
        s.dsn("empty_db")
    });
    let e = open_err("", &empty);
    assert!(e.contains("table overlaybd_layers does not exist"), "{e}");
    assert!(e.contains("scripts/mysql-setup.sh"), "{e}");
    assert_eq!(
        e.matches("doesn't exist (MySQL error 1146)").count(),
        1,
        "{e}"
    );
}

#[test]
fn mysql_over_unix_socket() {
    let m = dedup_support::shared();
    let db = dedup_support::with_shared(|s| s.fresh_database("t"));
    let dsn = format!(
        "{}:{}@unix({})/{db}",
        dedup_support::TEST_USER,
        dedup_support::TEST_PASSWORD,
        m.socket.display()
    );
    let d = open("", &dsn, FORMAT).unwrap().unwrap();
    assert!(
        d.describe().starts_with("mysql obd@unix("),
        "{}",
        d.describe()
    );
    assert_eq!(
        d.create_layer_entry(&layer("app", 1, 2, 3)).unwrap(),
        StoreOutcome::Inserted
    );
}

#[test]
fn bad_db_str_and_type_errors() {
    let e = open_err("mysql", "obd:s3cr3t@tcp(127.0.0.1:3306)");
    assert!(
        e.contains("invalid MySQL --db-str") && !e.contains("s3cr3t"),
        "{e}"
    );
    let e = open_err("mysql", "");
    assert!(e.contains("--db-type mysql needs --db-str"), "{e}");
    let e = open_err("redis", "x");
    assert!(e.contains("unknown --db-type \"redis\""), "{e}");
}

/// A DSN naming a service that is not MySQL fails within `timeout=`, saying
/// so: a silent one (no greeting) and one that answers something else.
#[test]
fn mysql_dsn_of_another_service() {
    use std::io::Write;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let talker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (sp, tp) = (
        silent.local_addr().unwrap().port(),
        talker.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    std::thread::spawn(move || {
        for mut c in talker.incoming().flatten() {
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let t = std::time::Instant::now();
    let e = open_err("mysql", &format!("u:p@tcp(127.0.0.1:{sp})/db?timeout=1s"));
    assert!(e.contains("no greeting within 1.0 s"), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    let e = open_err("mysql", &format!("u:p@tcp(127.0.0.1:{tp})/db?timeout=1s"));
    assert!(e.contains("not a MySQL greeting"), "{e}");
}

/// A DSN naming a service that hangs up before greeting: the socket's error
/// is the source (callers can downcast to it), not repeated in the message.
#[test]
fn mysql_dsn_of_a_service_that_hangs_up() {
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closer.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in closer.incoming() {
            drop(c);
        }
    });
    let e = match open(
        "mysql",
        &format!("u:p@tcp(127.0.0.1:{port})/db?timeout=1s"),
        FORMAT,
    ) {
        Ok(_) => panic!("opening a MySQL DSN of a service that hangs up succeeded"),
        Err(e) => e,
    };
    let DbError::MysqlNoGreeting {
        error: Some(io), ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(io.kind(), std::io::ErrorKind::UnexpectedEof, "{io}");
    let source = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the socket's error is the source");
    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
    let text = e.to_string();
    assert!(
        text.contains("the connection ended before a greeting (is it a MySQL or MariaDB server?"),
        "{text}"
    );
    assert!(!text.contains(&io.to_string()), "{text}");
}

#[test]
fn sqlite_unusable_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/dedup.db");
    let e = open_err("sqlite", missing.to_str().unwrap());
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("does not exist"),
        "{e}"
    );

    let e = open_err("", dir.path().to_str().unwrap());
    assert!(e.contains("is a directory"), "{e}");

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let e = open_err("sqlite", junk.to_str().unwrap());
    assert!(
        e.contains(junk.to_str().unwrap()) && e.contains("not a database"),
        "{e}"
    );
}

/// A new SQLite file in a directory that cannot be written (here a read-only
/// bind mount: the tests run as root, which file modes do not stop) fails
/// naming the directory and the system's reason, before SQLite tries.
#[test]
fn sqlite_in_a_read_only_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mount = |args: &[&str]| {
        let st = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "mount {args:?}");
    };
    let ro_s = ro.to_str().unwrap();
    mount(&["--bind", ro_s, ro_s]);
    struct Unmount<'a>(&'a str);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(ro_s);
    mount(&["-o", "remount,bind,ro", ro_s]);
    let db = ro.join("dedup.db");
    let e = open_err("sqlite", db.to_str().unwrap());
    assert_eq!(
        e,
        format!(
            "cannot create SQLite database {}: directory {ro_s} is not writable by this process (SQLite creates the file and its -wal and -shm files there): Read-only file system (os error 30)",
            db.display()
        )
    );
    assert!(!db.exists());
}

#[test]
fn sqlite_file_is_shared_and_persistent() {
    let f = SqliteFixture::new();
    {
        let db = f.open(FORMAT);
        assert_eq!(
            db.create_layer_entry(&layer("app", 1, 2, 3)).unwrap(),
            StoreOutcome::Inserted
        );
    }
    let db = f.open(FORMAT);
    assert!(db.describe().contains("dedup.sqlite"));
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(1)))
            .unwrap(),
        Some(layer("app", 1, 2, 3))
    );
    let mode: String = f
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

/// `scripts/mysql-setup.sh` creates the database, tables and an account the convertor can use
/// over TCP; running it twice changes nothing.
#[test]
fn mysql_setup_script() {
    let m = dedup_support::shared();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mysql-setup.sh");
    let password = "a'b\\c@d:e/f";
    for _ in 0..2 {
        let out = Command::new("bash")
            .arg(&script)
            .args([
                "--db",
                "setup_test",
                "--user",
                "obd_setup",
                "--user-host",
                "127.0.0.1",
                "--",
            ])
            .arg(format!("--socket={}", m.socket.display()))
            .args(["-u", "root"])
            .env("OBD_DEDUP_DB_PASSWORD", password)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mysql-setup.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dsn = format!("obd_setup:{password}@tcp(127.0.0.1:{})/setup_test", m.port);
    let db = open("mysql", &dsn, FORMAT).unwrap().unwrap();
    let entry = manifest("app", 1, 2, MT);
    assert_eq!(
        db.create_manifest_entry(&entry).unwrap(),
        StoreOutcome::Inserted
    );
    assert!(db.delete_manifest_entry(&entry).unwrap());
    // The account has exactly SELECT, INSERT, DELETE: no DROP.
    let mut c = mysql::Conn::new(
        mysql::OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(m.port)
            .user(Some("obd_setup"))
            .pass(Some(password))
            .db_name(Some("setup_test")),
    )
    .unwrap();
    assert!(c.query_drop("DROP TABLE overlaybd_layers").is_err());
    let keys: HashSet<String> = c
        .query::<String, _>(
            "SELECT index_name FROM information_schema.statistics WHERE table_schema='setup_test'",
        )
        .unwrap()
        .into_iter()
        .collect();
    for k in [
        "PRIMARY",
        "index_registry_chainId",
        "index_registry_src_digest",
    ] {
        assert!(keys.contains(k), "{k} missing: {keys:?}");
    }
}

#[test]
#[should_panic(expected = "apt-get install mariadb-server")]
fn missing_server_binary_is_a_clear_failure() {
    dedup_support::find_binary("mariadbd-that-does-not-exist");
}

/// A long conversion run survives a database restart: the pool reconnects to the restarted
/// server and carries on.
#[test]
fn mysql_reconnects_after_a_server_restart() {
    let mut m = dedup_support::MariaDb::start();
    let name = m.fresh_database("t");
    let db = open("mysql", &m.dsn(&name), FORMAT).unwrap().unwrap();
    assert_eq!(
        db.create_layer_entry(&layer("app", 1, 2, 3)).unwrap(),
        StoreOutcome::Inserted
    );
    m.restart();
    assert_eq!(
        db.get_layer_entry_for_repo(lkey("app", &digest(1)))
            .unwrap(),
        Some(layer("app", 1, 2, 3))
    );
    assert_eq!(
        db.create_layer_entry(&layer("app", 4, 5, 6)).unwrap(),
        StoreOutcome::Inserted
    );
}

/// Dedup's registry for runs whose lookups never get past the database.
struct NoRegistry;

impl obddedup::resolve::DedupRegistry for NoRegistry {
    type Error = String;
    fn blob_exists(&self, _: &str, _: &str, _: u64) -> Result<bool, String> {
        Err("not expected".into())
    }
    fn mount_blob(&self, _: &str, _: &str, _: &str) -> Result<bool, String> {
        Err("not expected".into())
    }
    fn manifest_exists(&self, _: &str, _: &str) -> Result<bool, String> {
        Err("not expected".into())
    }
    fn copy_manifest(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<obddedup::resolve::CopyOutcome, String> {
        Err("not expected".into())
    }
}

/// A server that stops answering (a network partition, a paused VM) costs a conversion one
/// statement's wait, not one per statement: each waited out its read timeout on every
/// attempt and reconnection (about 9 of them), for every lookup and store of every layer,
/// so that a 4-layer image took 27 read timeouts (30 minutes at the default 60 s) to
/// convert without dedup. After the first statement that times out, the run stops using
/// the database.
#[test]
fn mysql_server_that_stops_answering_is_given_up_on() {
    use obddedup::resolve::{Dedup, LayerLookup, Target};
    let m = dedup_support::MariaDb::start();
    let name = m.fresh_database("t");
    let dsn = format!(
        "{}?timeout=500ms&readTimeout=500ms&writeTimeout=500ms",
        m.dsn(&name)
    );
    let dd = Dedup::new(open("mysql", &dsn, FORMAT).unwrap().unwrap());
    let target = Target {
        host: HOST,
        repository: "app",
    };
    m.pause();
    let t0 = Instant::now();
    for i in 0..8 {
        let chain = digest(i);
        assert_eq!(
            dd.lookup_layer(&NoRegistry, target, &chain),
            LayerLookup::Miss
        );
        assert!(!dd.record_layer(target, &chain, &digest(100 + i), 10));
    }
    let secs = t0.elapsed().as_secs_f64();
    m.resume();
    let s = dd.stats();
    assert_eq!(s.db_errors, 1, "only the first statement was tried: {s}");
    assert!(
        secs < 15.0,
        "16 statements on a server that does not answer took {secs:.1} s ({s})"
    );
}

/// A test CA and a server certificate for 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=obd dedup test CA",
    ];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&a);
    let mut a = vec!["req", "-subj", "/CN=127.0.0.1"];
    a.extend(ec);
    a.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
}

/// Opens the database named by DEDUP_CHILD_DB_STR in a fresh process (so that environment
/// variables such as SSL_CERT_FILE apply) and stores one row.
#[test]
#[ignore = "helper process, started by the TLS test"]
fn open_child() {
    let Ok(dsn) = std::env::var("DEDUP_CHILD_DB_STR") else {
        eprintln!("open_child: not started by a test; nothing to do");
        return;
    };
    let db = open("mysql", &dsn, FORMAT)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap();
    assert_eq!(
        db.create_layer_entry(&layer("child", 1, 2, 3)).unwrap(),
        StoreOutcome::Inserted
    );
    println!("OPEN-CHILD-OK");
}

fn open_in_child(dsn: &str, ssl_cert_file: Option<&Path>) -> Result<(), String> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "open_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("DEDUP_CHILD_DB_STR", dsn)
    .env_remove("SSL_CERT_FILE");
    if let Some(f) = ssl_cert_file {
        cmd.env("SSL_CERT_FILE", f);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("OPEN-CHILD-OK") {
        Ok(())
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `tls=` as go-sql-driver: against a server that requires TLS, `skip-verify` and `preferred`
/// connect, `true` verifies the chain against the system store (fails for a private CA, works
/// once SSL_CERT_FILE names it), `false` is refused by the server. Against a server without
/// TLS, `preferred` falls back to plain and `true` fails clearly.
#[test]
fn mysql_tls_modes() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let m = dedup_support::MariaDb::start_with(&[
        format!("--ssl-ca={}", p("ca.pem")),
        format!("--ssl-cert={}", p("server.pem")),
        format!("--ssl-key={}", p("server.key")),
        "--require-secure-transport=ON".into(),
    ]);
    let name = m.fresh_database("tls");
    let dsn = |tls: &str| format!("{}?tls={tls}", m.dsn(&name));

    for mode in ["skip-verify", "preferred"] {
        let db = open("mysql", &dsn(mode), FORMAT)
            .unwrap_or_else(|e| panic!("tls={mode}: {e}"))
            .unwrap();
        assert!(matches!(
            db.create_layer_entry(&layer(mode, 1, 2, 3)).unwrap(),
            StoreOutcome::Inserted
        ));
    }
    // Refused by the server (MariaDB answers "Access denied" to plain connections here).
    let e = open_err("mysql", &dsn("false"));
    assert!(e.contains("cannot connect to MySQL"), "{e}");
    let e = open_err("mysql", &dsn("true"));
    assert!(
        e.contains("cannot connect") && e.to_lowercase().contains("cert"),
        "{e}"
    );
    open_in_child(&dsn("true"), Some(&certs.path().join("ca.pem")))
        .unwrap_or_else(|e| panic!("tls=true with SSL_CERT_FILE=ca.pem: {e}"));
    let rows = open("mysql", &dsn("skip-verify"), FORMAT)
        .unwrap()
        .unwrap()
        .get_cross_repo_layer_entries(HOST, &digest(1))
        .unwrap();
    assert_eq!(
        rows.len(),
        3,
        "skip-verify, preferred and the child: {rows:?}"
    );

    // The shared server has no TLS.
    let plain = dedup_support::with_shared(|s| {
        let db = s.fresh_database("t");
        s.dsn(&db)
    });
    assert!(open("mysql", &format!("{plain}?tls=preferred"), FORMAT).is_ok());
    let e = open_err("mysql", &format!("{plain}?tls=true"));
    assert!(e.contains("does not offer TLS"), "{e}");
}
