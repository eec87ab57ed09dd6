//! TurboOCI through the binaries, with upstream's exact command lines
//! (fixture README): `overlaybd-create --turboOCI --mkfs`, `turboOCI-apply
//! --gz_index_path`, `overlaybd-commit -z --fastoci`; gzip.meta,
//! ext4.fs.meta and the plain `.fs.meta.lsmt` are byte-identical to
//! upstream's, and `overlaybd-nbd` serves the resulting TurboOCI stack (read
//! with nbdcopy, e2fsck-clean).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testutil::{err_text, run_ok};

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_turboOCI-apply");
const COMMIT: &str = env!("CARGO_BIN_EXE_overlaybd-commit");
const NBD: &str = env!("CARGO_BIN_EXE_overlaybd-nbd");

fn fx(p: &str) -> PathBuf {
    testutil::turbo_fixtures().join(p)
}

/// One layer dir as the Go convertor lays it out; returns the config written.
fn run_layer(d: &Path, blob: &Path, lowers: &[serde_json::Value], mkfs: bool) -> PathBuf {
    std::fs::create_dir_all(d).unwrap();
    std::fs::copy(blob, d.join("layer.tar")).unwrap();
    let mut c = Command::new(CREATE);
    c.arg(d.join("writable_data"))
        .arg(d.join("writable_index"))
        .args(["-s", "64", "--turboOCI"]);
    if mkfs {
        c.arg("--mkfs");
    }
    run_ok(&mut c);
    let cfg = d.join("config.json");
    let j = serde_json::json!({
        "repoBlobUrl": "",
        "lowers": lowers,
        "upper": {"index": d.join("writable_index"), "data": d.join("writable_data"), "target": d.join("layer.tar")},
        "resultFile": d.join("result"),
    });
    std::fs::write(&cfg, j.to_string()).unwrap();
    let out = run_ok(
        Command::new(APPLY)
            .arg(d.join("layer.tar"))
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("turboOCI-apply done"));
    assert_eq!(
        std::fs::read_to_string(d.join("result")).unwrap(),
        "success"
    );
    run_ok(
        Command::new(COMMIT)
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .arg(d.join("ext4.fs.meta"))
            .args(["-z", "--fastoci"]),
    );
    // The fixtures' extra plain commit (before Go removes the pair).
    run_ok(
        Command::new(COMMIT)
            .arg(d.join("writable_data"))
            .arg(d.join("writable_index"))
            .arg(d.join("ext4.fs.meta.lsmt"))
            .arg("--fastoci"),
    );
    cfg
}

/// A 64 GB TurboOCI upper with an ext4 (`data`, `index`) in `d`.
fn turbo_upper(d: &Path) {
    run_ok(
        Command::new(CREATE)
            .arg(d.join("data"))
            .arg(d.join("index"))
            .args(["64", "--turboOCI", "--mkfs"]),
    );
}

fn assert_same_file(ours: &Path, theirs: &Path) {
    let (a, b) = (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{} ({} bytes) differs from upstream's {} ({} bytes), first difference at {at:?}",
            ours.display(),
            a.len(),
            theirs.display(),
            b.len()
        );
    }
}

#[test]
fn upstream_command_lines_build_a_turbo_image_nbd_can_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, d1) = (dir.path().join("0000"), dir.path().join("0001"));
    run_layer(&d0, &fx("ext4-gzip/layer.tar.gz"), &[], true);
    let lower0 = serde_json::json!({
        "gzipIndex": d0.join("gzip.meta"), "file": d0.join("ext4.fs.meta"),
        "targetFile": d0.join("layer.tar"), "targetDigest": "sha256:77ad7703c0bdc0d0498cc02fe565c8ff23fe87975ef2d5ec4e9059034e06f948"});
    run_layer(
        &d1,
        &fx("ext4-gzip-2/layer.tar.gz"),
        std::slice::from_ref(&lower0),
        false,
    );
    for (d, case) in [(&d0, "ext4-gzip"), (&d1, "ext4-gzip-2")] {
        for f in ["gzip.meta", "ext4.fs.meta", "ext4.fs.meta.lsmt"] {
            assert_same_file(&d.join(f), &fx(&format!("{case}/{f}")));
        }
    }

    // overlaybd-nbd serves the two-layer TurboOCI stack; nbdcopy reads it.
    let lower1 = serde_json::json!({
        "gzipIndex": d1.join("gzip.meta"), "file": d1.join("ext4.fs.meta"),
        "targetFile": d1.join("layer.tar"), "targetDigest": "sha256:ac91f170fd64725f7469966566647eb1d8611c3333222b250a9c1ff065dda4a0"});
    let cfg = dir.path().join("serve.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [lower0, lower1]}).to_string(),
    )
    .unwrap();
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(NBD)
        .arg("serve")
        .arg(&cfg)
        .arg("--socket")
        .arg(&sock)
        .arg("--read-only")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(banner.contains("2 TurboOCI"), "{banner}");
    let raw = dir.path().join("flat.raw");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let copied = Command::new(testutil::tool("nbdcopy"))
        .arg(&uri)
        .arg(&raw)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    testutil::assert_ok(&copied);
    if let Err(out) = testutil::e2fsck(&raw) {
        panic!("e2fsck: {out}");
    }
    let rd = dir.path().join("rd");
    testutil::rdump(&raw, &rd);
    std::fs::remove_file(&raw).unwrap();
    let t = testutil::tree(&rd);
    let rbash = &t["usr/share/doc/bash/RBASH"];
    assert_eq!(rbash.size, 1920);
    assert_eq!(t["usr/share/doc/bash/RBASH.hardlink"], *rbash);
    assert_eq!(
        t["usr/share/doc/bash/README.symlink"].detail,
        "README.abs-guide"
    );
    assert!(!t.contains_key("usr/share/doc/bash/inputrc.arrows"));
    let stats: Vec<&String> = t
        .keys()
        .filter(|k| k.starts_with("usr/share/doc/git/contrib/stats/"))
        .collect();
    assert_eq!(stats, ["usr/share/doc/git/contrib/stats/after-opaque.txt"]);
    // A file of the bottom layer reads its bytes from the gzip blob.
    let want = std::fs::read(testutil::fixtures().join("input.tar")).unwrap();
    let changes = std::fs::read(rd.join("usr/share/doc/bash/CHANGES.gz")).unwrap();
    assert_eq!(&changes[..], &want[2560..2560 + 126824]);
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_ok(
        Command::new(CREATE)
            .arg(d.join("data"))
            .arg(d.join("index"))
            .args(["64", "--turboOCI"]),
    );
    let cfg = d.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": d.join("blob")}, "resultFile": d.join("result")}).to_string(),
    )
    .unwrap();
    let apply = |blob: &[u8], extra: &[&str]| {
        std::fs::write(d.join("blob"), blob).unwrap();
        let o = Command::new(APPLY)
            .arg(d.join("blob"))
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta"))
            .args(extra)
            .output()
            .unwrap();
        let e = err_text(&o);
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        e
    };
    let e = apply(&[0x55u8; 3000], &["--mkfs"]);
    assert!(e.contains("neither a gzip blob nor a tar"), "{e}");
    assert!(std::fs::read_to_string(d.join("result"))
        .unwrap()
        .starts_with("failed:"));
    // A symlink target longer than ext4 takes: the blob, the entry and what
    // is wrong (was libext2fs's "Invalid argument passed to ext2 library").
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("linkpath", "x".repeat(5000).as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_data(&mut h, "a/b", &b""[..]).unwrap();
    let e = apply(&b.into_inner().unwrap(), &["--mkfs"]);
    assert!(
        e.contains(d.join("blob").to_str().unwrap())
            && e.contains(
                "tar entry 'a/b': symbolic link target of 5000 bytes is too long (limit 4095)"
            ),
        "{e}"
    );
    let gz = std::fs::read(fx("ext4-gzip/layer.tar.gz")).unwrap();
    let e = apply(&gz[..100_000], &["--mkfs"]);
    assert!(e.contains("ends early"), "{e}");
    let e = apply(&gz, &["--fstype", "xfs"]);
    assert!(e.contains("unknown --fstype 'xfs'"), "{e}");
    // A lower whose tar is shorter than what it maps.
    let short = d.join("short.tar");
    std::fs::write(
        &short,
        &std::fs::read(testutil::fixtures().join("input.tar")).unwrap()[..100_000],
    )
    .unwrap();
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [{"file": fx("ext4-tar/ext4.fs.meta"), "targetFile": short}],
            "upper": {"index": d.join("index"), "data": d.join("data"), "target": d.join("blob")}})
        .to_string(),
    )
    .unwrap();
    let e = apply(&gz, &[]);
    assert!(e.contains("past the end of the layer tar"), "{e}");
    // A malformed targetDigest: refused by turboOCI-apply and overlaybd-nbd,
    // naming the config.
    for digest in ["xyz", "sha256:0000"] {
        std::fs::write(
            &cfg,
            serde_json::json!({"lowers": [{"file": fx("ext4-gzip/ext4.fs.meta"),
                "gzipIndex": fx("ext4-gzip/gzip.meta"),
                "targetFile": fx("ext4-gzip/layer.tar.gz"), "targetDigest": digest}],
                "upper": {"index": d.join("index"), "data": d.join("data"), "target": d.join("blob")}})
            .to_string(),
        )
        .unwrap();
        let want = format!("lower 0: \"targetDigest\" '{digest}' is not a layer digest");
        let e = apply(&gz, &[]);
        assert!(
            e.contains(cfg.to_str().unwrap()) && e.contains(&want),
            "{e}"
        );
        let o = Command::new(NBD)
            .arg("serve")
            .arg(&cfg)
            .arg("--socket")
            .arg(d.join("s.sock"))
            .arg("--read-only")
            .output()
            .unwrap();
        let e = err_text(&o);
        assert!(
            e.contains(cfg.to_str().unwrap()) && e.contains(&want),
            "{e}"
        );
    }
}

/// `--gz_index_path` and `resultFile` never destroy an input: naming the blob, the
/// config or the upper's files is refused before the apply, and a failed apply
/// leaves a file already at the index path as it was.
#[test]
fn outputs_never_replace_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    turbo_upper(d);
    std::fs::copy(fx("ext4-gzip/layer.tar.gz"), d.join("blob")).unwrap();
    let config = |result: &Path| {
        let cfg = d.join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": d.join("blob")}, "resultFile": result}).to_string(),
        )
        .unwrap();
        cfg
    };
    let apply = |cfg: &Path, gz: &Path| {
        Command::new(APPLY)
            .arg(d.join("blob"))
            .arg(cfg)
            .arg("--gz_index_path")
            .arg(gz)
            .output()
            .unwrap()
    };
    let cfg = config(&d.join("result"));
    let state =
        || [d.join("blob"), d.join("index"), cfg.clone()].map(|p| std::fs::read(p).unwrap());
    let before = state();
    for victim in [d.join("blob"), d.join("index"), cfg.clone()] {
        let e = err_text(&apply(&cfg, &victim));
        assert!(
            e.contains("--gz_index_path") && e.contains("which this apply reads or writes"),
            "{e}"
        );
        assert!(before == state(), "{} was changed", victim.display());
    }
    for victim in [d.join("blob"), d.join("data")] {
        let bad = config(&victim);
        let e = err_text(&apply(&bad, &d.join("gzip.meta")));
        assert!(e.contains("writing the result would destroy it"), "{e}");
    }
    let cfg = config(&d.join("result"));
    let before = state();
    assert!(before[2] == std::fs::read(&cfg).unwrap());
    // A FIFO at the index path is not replaced by the index.
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = err_text(&apply(&cfg, &fifo));
    assert!(e.contains("is a FIFO"), "{e}");
    let t = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&t));
    assert!(before == state());
    // A failed apply of a tar blob keeps what was at the index path.
    std::fs::write(d.join("gzip.meta"), b"precious").unwrap();
    let tar = std::fs::read(testutil::fixtures().join("input.tar")).unwrap();
    std::fs::write(d.join("blob"), &tar[..100_000]).unwrap();
    let e = err_text(&apply(&cfg, &d.join("gzip.meta")));
    assert!(e.contains("unexpected end"), "{e}");
    assert_eq!(std::fs::read(d.join("gzip.meta")).unwrap(), b"precious");
    // So does a failed apply of a gzip blob, and no temporary file is left.
    let gz = std::fs::read(fx("ext4-gzip/layer.tar.gz")).unwrap();
    std::fs::write(d.join("blob"), &gz[..gz.len() / 2]).unwrap();
    let e = err_text(&apply(&cfg, &d.join("gzip.meta")));
    assert!(e.contains("ends early"), "{e}");
    assert_eq!(std::fs::read(d.join("gzip.meta")).unwrap(), b"precious");
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    // A good one replaces it.
    std::fs::write(d.join("blob"), &gz).unwrap();
    let o = apply(&cfg, &d.join("gzip.meta"));
    assert!(o.status.success(), "{}", err_text(&o));
    assert_ne!(std::fs::read(d.join("gzip.meta")).unwrap(), b"precious");
}

/// An apply interrupted while the blob streams in (a FIFO that stalls):
/// its unfinished gzip index is removed, a file already at the index path
/// is kept, the result file says it failed, exit 128 + the signal.
#[test]
fn an_interrupted_apply_leaves_no_temporary_index() {
    testutil::default_stop_signals();
    use nix::sys::signal::Signal;
    use std::io::Write;
    let gz = std::fs::read(fx("ext4-gzip/layer.tar.gz")).unwrap();
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        turbo_upper(d);
        let blob = d.join("layer.tar");
        assert!(Command::new("mkfifo")
            .arg(&blob)
            .status()
            .unwrap()
            .success());
        let cfg = d.join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": &blob}, "resultFile": d.join("result")}).to_string(),
        )
        .unwrap();
        std::fs::write(d.join("result"), "success").unwrap();
        std::fs::write(d.join("gzip.meta"), b"precious").unwrap();
        let mut c = Command::new(APPLY)
            .arg(&blob)
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Half the blob, then the stream stalls (the FIFO stays open).
        let half = gz[..gz.len() / 2].to_vec();
        let fifo = blob.clone();
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            let _ = w.write_all(&half);
            w
        });
        testutil::wait_until(&mut c, "the temporary gzip index", || {
            !testutil::temp_files(d).is_empty()
        });
        let line = testutil::interrupt(c, sig);
        drop(writer.join().unwrap());
        assert!(line.contains("the layer is applied only in part"), "{line}");
        assert_eq!(testutil::temp_files(d), Vec::<String>::new());
        assert_eq!(std::fs::read(d.join("gzip.meta")).unwrap(), b"precious");
        let r = std::fs::read_to_string(d.join("result")).unwrap();
        assert!(
            r.starts_with(&format!("failed:interrupted by {sig}")),
            "{r}"
        );
    }
}

/// A gzip index whose file system is full (here a full tmpfs, in a mount
/// namespace of the test's own) fails the apply in one line that names the
/// index file; it said "cannot apply BLOB: layer blob: No space left on
/// device", naming neither the file that ran out of room nor where.
#[test]
fn a_full_gzip_index_disk_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    turbo_upper(d);
    let blob = fx("ext4-gzip/layer.tar.gz");
    let cfg = d.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": &blob}, "resultFile": d.join("result")}).to_string(),
    )
    .unwrap();
    std::fs::create_dir(d.join("x")).unwrap();
    let script = "mount -t tmpfs -o size=1M tmpfs x \
        || { echo 'no tmpfs mount here' >&2; exit 77; }\n\
        head -c $(( $(stat -f -c '%a*%S' x) )) /dev/zero > x/filler\n\
        \"$APPLY\" \"$BLOB\" \"$CFG\" --gz_index_path x/gzip.meta\n\
        rc=$?; ls -a x >&2; exit $rc\n";
    let o = Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .env("APPLY", APPLY)
        .env("BLOB", &blob)
        .env("CFG", &cfg)
        .current_dir(d)
        .output()
        .expect("spawn unshare");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = err_text(&o);
    let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("x/gzip.meta: No space left on device"),
        "{e}"
    );
    // Nothing but the filler is left on the full disk.
    assert!(e.ends_with(".\n..\nfiller\n"), "{e}");
    let r = std::fs::read_to_string(d.join("result")).unwrap();
    assert!(r.contains("x/gzip.meta: No space left on device"), "{r}");
}

/// A TurboOCI layer maps file data into its blob by offset. `/dev/zero` (or
/// any character device) and a directory are no blob: refused at once,
/// naming the path and what it is, in one line and in the result file (the
/// apply used to read `/dev/zero` forever). A FIFO still streams a blob
/// (see `an_interrupted_apply_leaves_no_temporary_index`).
#[test]
fn a_blob_that_is_a_device_or_a_directory_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    turbo_upper(d);
    for (blob, kind) in [
        (Path::new("/dev/zero"), "a character device"),
        (d, "a directory"),
    ] {
        let cfg = d.join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": blob}, "resultFile": d.join("result")}).to_string(),
        )
        .unwrap();
        let c = Command::new(APPLY)
            .arg(blob)
            .arg(&cfg)
            .arg("--gz_index_path")
            .arg(d.join("gzip.meta"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = testutil::output_within(c, std::time::Duration::from_secs(30));
        let e = err_text(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        let want = format!(
            "cannot apply {0}: layer blob: {0}: not a layer blob: it is {kind}",
            blob.display()
        );
        assert_eq!(e.trim_end(), format!("turboOCI-apply: error: {want}"));
        assert_eq!(
            std::fs::read_to_string(d.join("result")).unwrap(),
            format!("failed:{want}")
        );
        assert!(!d.join("gzip.meta").exists());
    }
}

/// A path far longer than PATH_MAX (100,000 directories, 200 KB) applies
/// as it does with overlaybd-apply, in a moment: its missing directories
/// were made by a `mkdir` of every prefix, each resolved from the root
/// (n^2 lookups: about 12 minutes here). With a name too long for ext4 at
/// its end, the error is one short line (it quoted the path whole, and a
/// 200 KB line blocked the tool on this unread pipe).
#[test]
fn a_path_of_100000_directories_applies_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let deep = "d/".repeat(100_000);
    for (last, want) in [("f", None), (&*"n".repeat(300), Some("300 bytes"))] {
        let _ = std::fs::remove_file(d.join("data"));
        let _ = std::fs::remove_file(d.join("index"));
        turbo_upper(d);
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", format!("{deep}{last}").as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "placeholder", &b"abc"[..]).unwrap();
        std::fs::write(d.join("blob"), b.into_inner().unwrap()).unwrap();
        let cfg = d.join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"lowers": [], "upper": {"index": d.join("index"), "data": d.join("data"), "target": d.join("blob")}, "resultFile": d.join("result")}).to_string(),
        )
        .unwrap();
        let c = Command::new(APPLY)
            .arg(d.join("blob"))
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = testutil::output_within(c, std::time::Duration::from_secs(60));
        match want {
            None => {
                testutil::assert_ok(&o);
                assert_eq!(
                    std::fs::read_to_string(d.join("result")).unwrap(),
                    "success"
                );
            }
            Some(want) => {
                let e = err_text(&o);
                assert_eq!(o.status.code(), Some(1), "{e}");
                assert_eq!(e.trim_end().lines().count(), 1, "{e}");
                assert!(
                    e.len() < 1000 && e.contains(want),
                    "{} bytes: {}",
                    e.len(),
                    &e[..1000]
                );
            }
        }
    }
}
