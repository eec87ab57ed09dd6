//! overlaybd-create --mkfs / overlaybd-apply / overlaybd-commit as the
//! convertor runs them: layers streamed on stdin, compressed or not, stacked
//! on committed lowers; results checked with e2fsck and against GNU tar.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use testutil::{assert_ok, err_text};

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_overlaybd-apply");
const COMMIT: &str = env!("CARGO_BIN_EXE_overlaybd-commit");

fn run(bin: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn tool")
}

fn run_stdin(bin: &str, args: &[&str], cwd: &Path, input: &[u8]) -> Output {
    let mut c = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tool");
    let mut stdin = c.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = c.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn write_config(dir: &Path, name: &str, lowers: &[&str], data: &str, index: &str) -> PathBuf {
    let lowers: Vec<String> = lowers
        .iter()
        .map(|l| {
            format!(
                r#"{{"file": "{}", "digest": "sha256:ignored"}}"#,
                dir.join(l).display()
            )
        })
        .collect();
    let cfg = format!(
        r#"{{"repoBlobUrl": "", "lowers": [{}], "upper": {{"data": "{}", "index": "{}"}},
            "resultFile": "{}", "accelerationLayer": false}}"#,
        lowers.join(","),
        dir.join(data).display(),
        dir.join(index).display(),
        dir.join(format!("{name}.result")).display()
    );
    let p = dir.join(format!("{name}.json"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn result(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.result"))).unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A second layer: a new file, a whiteout of a lower file, an opaque dir.
fn second_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, "usr/share/doc/new-file", &b"added\n"[..])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o644);
    b.append_data(&mut h, "usr/share/doc/bash/.wh.CHANGES.gz", &b""[..])
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn mkfs_apply_commit_stack_from_stdin() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = std::fs::read(f.join("input.tar")).unwrap();

    // Layer 0: a --mkfs writable layer; input.tar arrives gzipped on stdin.
    assert_ok(&run(CREATE, &["-s", "data0", "index0", "64", "--mkfs"], d));
    let cfg0 = write_config(d, "cfg0", &[], "data0", "index0");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&input).unwrap();
    let out = run_stdin(
        APPLY,
        &["-", cfg0.to_str().unwrap()],
        d,
        &gz.finish().unwrap(),
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("overlaybd-apply done"));
    assert_eq!(result(d, "cfg0"), "success");
    assert_ok(&run(COMMIT, &["data0", "index0", "layer0", "-z"], d));

    // Layer 1 on top of the committed layer 0: zstd on stdin, with checksum.
    let l1 = second_layer();
    assert_ok(&run(CREATE, &["-s", "data1", "index1", "0"], d));
    let cfg1 = write_config(d, "cfg1", &["layer0"], "data1", "index1");
    let zst = zstd::encode_all(&l1[..], 3).unwrap();
    let sum = sha256_hex(&l1);
    let out = run_stdin(
        APPLY,
        &["--checksum", &sum, "-", cfg1.to_str().unwrap()],
        d,
        &zst,
    );
    assert_ok(&out);
    assert_eq!(result(d, "cfg1"), "success");

    // The stacked filesystem: clean, and the tree GNU tar makes of
    // input.tar, minus the whited-out file, plus the new one.
    let s = blockdev::Stack::open_read_only(
        &[d.join("layer0")],
        Some((&d.join("data1"), &d.join("index1"))),
    )
    .unwrap();
    let img = d.join("flat.img");
    s.write_raw_image(&img).unwrap();
    if let Err(e) = testutil::e2fsck(&img) {
        panic!("e2fsck: {e}");
    }
    let l1_path = d.join("layer1.tar");
    std::fs::write(&l1_path, &l1).unwrap();
    let want_dir = d.join("want");
    testutil::gnu_extract(&[&f.join("input.tar"), &l1_path], &want_dir);
    std::fs::remove_file(want_dir.join("usr/share/doc/bash/.wh.CHANGES.gz")).unwrap();
    std::fs::remove_file(want_dir.join("usr/share/doc/bash/CHANGES.gz")).unwrap();
    let got_dir = d.join("got");
    testutil::rdump(&img, &got_dir);
    let (got, want) = (testutil::tree(&got_dir), testutil::tree(&want_dir));
    // Directory times change when GNU tar adds or removes entries, and
    // rdump does not keep symlink times; compare the rest.
    let strip = |t: std::collections::BTreeMap<String, testutil::Node>| {
        t.into_iter()
            .map(|(k, mut v)| {
                if v.kind == 'd' {
                    v.mtime = 0;
                }
                (k, v)
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let diffs = testutil::diff_trees(&strip(got), &strip(want), |p| p.starts_with("lost+found"));
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// Relative paths in config.json are relative to the current directory, as
/// upstream's tools open them: upstream's convertor (and ours with `--reserve`)
/// runs in one directory and writes `tmp_conv/<manifest>/<layer>/...` paths
/// into `tmp_conv/<manifest>/<layer>/config.json`, then runs the tools from
/// that directory. Taken relative to the config's directory, they named
/// `tmp_conv/.../tmp_conv/...` and the apply failed.
#[test]
fn config_paths_are_relative_to_the_current_directory() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (l0, l1) = ("tmp_conv/1-m/0000_l0", "tmp_conv/1-m/0001_l1");
    for l in [l0, l1] {
        std::fs::create_dir_all(d.join(l)).unwrap();
    }
    let data = |l: &str| format!("{l}/writable_data");
    let index = |l: &str| format!("{l}/writable_index");
    let config = |l: &str, lowers: &str| {
        let p = d.join(l).join("config.json");
        std::fs::write(
            &p,
            format!(
                r#"{{"repoBlobUrl": "", "lowers": [{lowers}], "upper": {{"data": "{}", "index": "{}"}}, "resultFile": "{l}/result"}}"#,
                data(l),
                index(l)
            ),
        )
        .unwrap();
        format!("{l}/config.json")
    };
    assert_ok(&run(
        CREATE,
        &["-s", &data(l0), &index(l0), "1", "--mkfs"],
        d,
    ));
    let input = f.join("input.tar");
    let out = run(APPLY, &[input.to_str().unwrap(), &config(l0, "")], d);
    assert_ok(&out);
    let result = |l: &str| std::fs::read_to_string(d.join(l).join("result")).unwrap();
    assert_eq!(result(l0), "success");
    let commit = format!("{l0}/overlaybd.commit");
    assert_ok(&run(COMMIT, &[&data(l0), &index(l0), &commit], d));

    // The next layer names the committed one as its lower, the same way.
    assert_ok(&run(CREATE, &["-s", &data(l1), &index(l1), "0"], d));
    let tar = d.join("layer1.tar");
    std::fs::write(&tar, second_layer()).unwrap();
    let cfg1 = config(l1, &format!(r#"{{"file": "{commit}"}}"#));
    assert_ok(&run(APPLY, &[tar.to_str().unwrap(), &cfg1], d));
    assert_eq!(result(l1), "success");
    let s = blockdev::Stack::open_read_only(
        &[d.join(&commit)],
        Some((&d.join(data(l1)), &d.join(index(l1)))),
    )
    .unwrap();
    let img = d.join("flat.img");
    s.write_raw_image(&img).unwrap();
    let got = d.join("got");
    testutil::rdump(&img, &got);
    assert_eq!(
        std::fs::read(got.join("usr/share/doc/new-file")).unwrap(),
        b"added\n"
    );
    assert!(got.join("usr/share/doc/bash").is_dir());
    assert!(!got.join("usr/share/doc/bash/CHANGES.gz").exists());
}

#[test]
fn apply_errors_reach_the_result_file() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1", "--mkfs"], d));
    let cfg = write_config(d, "cfg", &[], "data", "index");
    let cfg = cfg.to_str().unwrap();

    // Not a tar.
    let e = err_text(&run_stdin(APPLY, &["-", cfg], d, &[0x42; 2048]));
    assert!(e.contains("malformed tar stream"), "{e}");
    assert!(
        result(d, "cfg").starts_with("failed:"),
        "{}",
        result(d, "cfg")
    );

    // Checksum mismatch: verified before the layer is touched, from a file or
    // from stdin (gzipped), the layer left as it was.
    let input = f.join("input.tar");
    let layer_state = || {
        let m = std::fs::metadata(d.join("data")).unwrap();
        (
            m.modified().unwrap(),
            m.len(),
            std::fs::read(d.join("index")).unwrap(),
        )
    };
    let before = layer_state();
    let e = err_text(&run(
        APPLY,
        &["--checksum", &"0".repeat(64), input.to_str().unwrap(), cfg],
        d,
    ));
    assert!(
        e.contains("input.tar: sha256 checksum mismatch")
            && e.contains("the layer was not changed"),
        "{e}"
    );
    assert!(result(d, "cfg").contains("checksum mismatch"));
    let tar = std::fs::read(&input).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let e = err_text(&run_stdin(
        APPLY,
        &["--checksum", &"0".repeat(64), "-", cfg],
        d,
        &gz,
    ));
    assert!(
        e.contains("standard input: sha256 checksum mismatch"),
        "{e}"
    );
    assert!(result(d, "cfg").contains("checksum mismatch"));
    assert!(
        before == layer_state(),
        "a tar failing its checksum changed the layer"
    );
    // The filesystem is still the empty one mkfs made.
    let s =
        blockdev::Stack::open_read_only(&[], Some((&d.join("data"), &d.join("index")))).unwrap();
    let img = d.join("flat.img");
    s.write_raw_image(&img).unwrap();
    drop(s);
    if let Err(e) = testutil::e2fsck(&img) {
        panic!("e2fsck: {e}");
    }
    let got = d.join("got");
    testutil::rdump(&img, &got);
    let names: Vec<_> = std::fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["lost+found"],
        "files of the refused tar are in the layer"
    );
    std::fs::remove_file(&img).unwrap();
    // The right checksum from stdin (kept in a temporary file while verified).
    let files = || {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let files_before = files();
    let out = run_stdin(APPLY, &["--checksum", &sha256_hex(&tar), "-", cfg], d, &gz);
    assert_ok(&out);
    assert_eq!(result(d, "cfg"), "success");
    assert_eq!(files(), files_before, "a temporary file was left");

    // A path escaping the root.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.as_gnu_mut().unwrap().name[..6].copy_from_slice(b"../../");
    h.as_gnu_mut().unwrap().name[6..10].copy_from_slice(b"evil");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let e = err_text(&run_stdin(APPLY, &["-", cfg], d, &b.into_inner().unwrap()));
    assert!(
        e.contains("'../../evil'") && e.contains("leaves the layer root"),
        "{e}"
    );

    // Unsupported modes and a missing upper.
    let e = err_text(&run(
        APPLY,
        &["--from_qcow2", input.to_str().unwrap(), cfg],
        d,
    ));
    assert!(e.contains("qcow2"), "{e}");
    std::fs::write(d.join("noupper.json"), r#"{"lowers": []}"#).unwrap();
    let e = err_text(&run(APPLY, &[input.to_str().unwrap(), "noupper.json"], d));
    assert!(e.contains("no writable upper"), "{e}");

    // A result file that cannot be written fails the run before the layer changes.
    let text = std::fs::read_to_string(cfg).unwrap();
    let missing = d.join("no-such-dir/cfg.result");
    let text = text.replace(
        d.join("cfg.result").to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    std::fs::write(d.join("badresult.json"), text).unwrap();
    // (The data file is a sparse 1 GiB: its modification time stands for it.)
    let state = || {
        (
            std::fs::metadata(d.join("data"))
                .unwrap()
                .modified()
                .unwrap(),
            std::fs::read(d.join("index")).unwrap(),
        )
    };
    let before = state();
    let e = err_text(&run(APPLY, &[input.to_str().unwrap(), "badresult.json"], d));
    assert!(
        e.contains("no-such-dir/cfg.result") && e.contains("its directory does not exist"),
        "{e}"
    );
    assert!(before == state(), "the layer was changed");
    // A result file that is one of the apply's inputs would be overwritten with
    // "success": refused, the input untouched.
    let tar_copy = d.join("layer.tar");
    std::fs::copy(&input, &tar_copy).unwrap();
    for (victim, name) in [(tar_copy.clone(), "layer.tar"), (d.join("index"), "index")] {
        let text = std::fs::read_to_string(cfg).unwrap().replace(
            d.join("cfg.result").to_str().unwrap(),
            victim.to_str().unwrap(),
        );
        std::fs::write(d.join("selfresult.json"), text).unwrap();
        let want = std::fs::read(&victim).unwrap();
        let e = err_text(&run(APPLY, &["layer.tar", "selfresult.json"], d));
        assert!(
            e.contains(&format!("resultFile: is {name}"))
                || e.contains(&format!("resultFile: is {}", victim.display())),
            "{name}: {e}"
        );
        assert!(e.contains("writing the result would destroy it"), "{e}");
        assert!(
            std::fs::read(&victim).unwrap() == want,
            "{name} was changed"
        );
    }
    assert!(before == state(), "the layer was changed");
}

/// A 0-byte input is a failed download, not a layer: refused before the layer
/// is touched (also with --mkfs), the result file says why. A tar of just the
/// two zero end blocks is an empty layer and stays valid.
#[test]
fn empty_input_is_refused_but_an_empty_tar_is_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1", "--mkfs"], d));
    let cfg = write_config(d, "cfg", &[], "data", "index");
    let cfg = cfg.to_str().unwrap();
    let state = || {
        let m = std::fs::metadata(d.join("data")).unwrap();
        (
            m.modified().unwrap(),
            m.len(),
            std::fs::read(d.join("index")).unwrap(),
        )
    };
    let before = state();
    std::fs::write(d.join("e.tar"), b"").unwrap();
    for mkfs in [false, true] {
        let mut args = vec!["e.tar", cfg];
        if mkfs {
            args.insert(0, "--mkfs");
        }
        let e = err_text(&run(APPLY, &args, d));
        assert!(e.contains("e.tar: empty input: not a tar archive"), "{e}");
        let r = result(d, "cfg");
        assert!(r.starts_with("failed:") && r.contains("empty input"), "{r}");
    }
    // `false | overlaybd-apply - cfg`, and a gzip stream of nothing.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"").unwrap();
    for input in [Vec::new(), gz.finish().unwrap()] {
        let e = err_text(&run_stdin(APPLY, &["-", cfg], d, &input));
        assert!(
            e.contains("standard input: empty input: not a tar archive"),
            "{e}"
        );
        assert!(result(d, "cfg").starts_with("failed:"));
    }
    assert!(before == state(), "the layer was changed");

    // An empty layer: two zero blocks.
    std::fs::write(d.join("empty-layer.tar"), [0u8; 1024]).unwrap();
    assert_ok(&run(APPLY, &["empty-layer.tar", cfg], d));
    assert_eq!(result(d, "cfg"), "success");
    let s =
        blockdev::Stack::open_read_only(&[], Some((&d.join("data"), &d.join("index")))).unwrap();
    let img = d.join("flat.img");
    s.write_raw_image(&img).unwrap();
    if let Err(e) = testutil::e2fsck(&img) {
        panic!("e2fsck: {e}");
    }
}

/// --mkfs over lower layers reformats, as upstream does, but says that every
/// lower's files are hidden; without lowers it says nothing.
#[test]
fn mkfs_over_lowers_warns() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.tar"), [0u8; 1024]).unwrap();
    assert_ok(&run(CREATE, &["-s", "data", "index", "0"], d));
    let lower = f.join("baselayer/ext4_64");
    let cfg = write_config(d, "cfg", &[lower.to_str().unwrap()], "data", "index");
    let out = run(APPLY, &["--mkfs", "empty.tar", cfg.to_str().unwrap()], d);
    assert_ok(&out);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("warning: --mkfs with 1 lower layer(s)")
            && e.contains("cfg.json")
            && e.contains("hides all of their files"),
        "{e}"
    );
    assert_eq!(result(d, "cfg"), "success");
    let s = blockdev::Stack::open_read_only(
        std::slice::from_ref(&lower),
        Some((&d.join("data"), &d.join("index"))),
    )
    .unwrap();
    let img = d.join("flat.img");
    s.write_raw_image(&img).unwrap();
    if let Err(e) = testutil::e2fsck(&img) {
        panic!("e2fsck: {e}");
    }

    assert_ok(&run(CREATE, &["-s", "data1", "index1", "1"], d));
    let cfg1 = write_config(d, "cfg1", &[], "data1", "index1");
    let out = run(APPLY, &["--mkfs", "empty.tar", cfg1.to_str().unwrap()], d);
    assert_ok(&out);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!e.contains("warning"), "{e}");
}

#[test]
fn raw_image_with_mkfs() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["--raw", "--mkfs", "img", "unused", "2"], d));
    let input = f.join("input.tar");
    assert_ok(&run(APPLY, &["--raw", input.to_str().unwrap(), "img"], d));
    // --mkfs on apply starts over: the first layer's files are gone.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o600);
    b.append_data(&mut h, "only", &b"yes"[..]).unwrap();
    assert_ok(&run_stdin(
        APPLY,
        &["--raw", "--mkfs", "-", "img"],
        d,
        &b.into_inner().unwrap(),
    ));
    let img = d.join("img");
    if let Err(e) = testutil::e2fsck(&img) {
        panic!("e2fsck: {e}");
    }
    let got = d.join("got");
    testutil::rdump(&img, &got);
    let t = testutil::tree(&got);
    let names: Vec<&String> = t.keys().filter(|k| !k.starts_with("lost+found")).collect();
    assert_eq!(names, ["only"]);
    // A failed create leaves none of its files behind: an index path that exists,
    // a size the filesystem cannot hold.
    std::fs::write(d.join("taken"), b"x").unwrap();
    let e = err_text(&run(CREATE, &["--raw", "new-img", "taken", "2"], d));
    assert!(e.contains("taken") && e.contains("already exists"), "{e}");
    assert!(!d.join("new-img").exists(), "new-img left behind");
    let e = err_text(&run(
        CREATE,
        &["--raw", "huge-img", "huge-idx", "100000000"],
        d,
    ));
    assert!(
        e.contains("cannot size") && e.contains("cannot hold a file of") && e.contains("16 TiB"),
        "{e}"
    );
    assert!(!d.join("huge-img").exists() && !d.join("huge-idx").exists());
}

/// An apply interrupted while its layer streams in stops at once: the result
/// file says it failed (a previous run's "success" is not left there), one
/// line on stderr, exit 128 + the signal.
#[test]
fn an_interrupted_apply_marks_the_result_failed() {
    testutil::default_stop_signals();
    use nix::sys::signal::Signal;
    let f = testutil::fixtures();
    let tar = std::fs::read(f.join("input.tar")).unwrap();
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_ok(&run(CREATE, &["-s", "data", "index", "1", "--mkfs"], d));
        let cfg = write_config(d, "img", &[], "data", "index");
        std::fs::write(d.join("img.result"), "success").unwrap();
        let mut c = Command::new(APPLY)
            .arg("-")
            .arg(&cfg)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Most of the layer, then the stream stalls: once the pipe took it
        // all, the apply has read it and waits for more.
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(&tar[..tar.len() * 2 / 3]).unwrap();
        let line = testutil::interrupt(c, sig);
        drop(stdin);
        assert!(line.contains("the layer is applied only in part"), "{line}");
        assert!(line.contains("result file marked failed"), "{line}");
        let r = result(d, "img");
        assert!(
            r.starts_with(&format!("failed:interrupted by {sig}")),
            "{r}"
        );
    }
}

/// An upper whose file system fills up (here a small tmpfs, in a mount
/// namespace of the test's own, filled so that the layer's data fits and
/// its index does not, or half of the data fits) fails the apply, said
/// once: the layer's drop, which tries to save the index again, also logged
/// "failed to save the index of .../data" before the tool's own error.
#[test]
fn a_full_upper_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1500 directories with a file each: spread over the block groups, they
    // make 3000 index entries (48 KB of index) besides 13 MB of data.
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..1500 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, format!("d{i}/"), &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1000);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("d{i}/f"), &[i as u8; 1000][..])
            .unwrap();
    }
    std::fs::write(d.join("layer.tar"), b.into_inner().unwrap()).unwrap();
    // How much the data file grows, on a disk with room.
    std::fs::create_dir(d.join("ref")).unwrap();
    assert_ok(&run(CREATE, &["ref/data", "ref/index", "64", "--mkfs"], d));
    let before = std::fs::metadata(d.join("ref/data")).unwrap().len();
    let cfg = write_config(d, "ref", &[], "ref/data", "ref/index");
    assert_ok(&run(APPLY, &["layer.tar", cfg.to_str().unwrap()], d));
    let grown = std::fs::metadata(d.join("ref/data")).unwrap().len() - before;
    for (room, full) in [(grown, "x/index"), (grown / 8192 * 4096, "x/data")] {
        let cfg = write_config(d, "full", &[], "x/data", "x/index");
        let _ = std::fs::create_dir(d.join("x"));
        let script = "mount -t tmpfs -o size=32M tmpfs x \
            || { echo 'no tmpfs mount here' >&2; exit 77; }\n\
            \"$CREATE\" x/data x/index 64 --mkfs >/dev/null || exit 3\n\
            head -c $(( $(stat -f -c '%a*%S' x) - ROOM )) /dev/zero > x/filler\n\
            exec \"$APPLY\" layer.tar \"$CFG\"\n";
        let o = Command::new("unshare")
            .args(["--mount", "sh", "-c", script])
            .env("CREATE", CREATE)
            .env("APPLY", APPLY)
            .env("CFG", &cfg)
            .env("ROOM", room.to_string())
            .current_dir(d)
            .output()
            .expect("spawn unshare");
        if o.status.code() == Some(77) {
            testutil::skip(err_text(&o).trim_end());
            return;
        }
        let e = err_text(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains(&format!("{full}: No space left on device")),
            "{full} should be the file that does not fit: {e}"
        );
        assert_eq!(e.matches("failed to save the index").count(), 0, "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(result(d, "full").starts_with("failed:"));
    }
}
