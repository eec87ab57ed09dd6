//! How the tools refuse what they cannot do. Usage errors found after
//! argument parsing (options that need another option, values out of range,
//! arguments the wrong way round) exit 2, as clap's own do; runtime failures
//! exit 1. One line on stderr names what is wrong.

use std::process::Command;

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_overlaybd-apply");
const COMMIT: &str = env!("CARGO_BIN_EXE_overlaybd-commit");
const ZFILE: &str = env!("CARGO_BIN_EXE_overlaybd-zfile");
const TURBO: &str = env!("CARGO_BIN_EXE_turboOCI-apply");

/// A sparse 1 GB writable layer `data` + `index` in `dir`.
fn sparse_layer(dir: &std::path::Path) {
    let (code, err) = run(Command::new(CREATE)
        .current_dir(dir)
        .args(["data", "index", "1", "-s"]));
    assert_eq!(code, Some(0), "{err}");
}

fn run(cmd: &mut Command) -> (Option<i32>, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2_and_runtime_failures_exit_1() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);

    // overlaybd-create: --mkfs on a 0 GB device, kernel-engine options
    // without the kernel engine; nothing is created.
    for (args, want) in [
        (
            vec!["-s", "0", "--mkfs"],
            "--mkfs needs a virtual size greater than 0",
        ),
        (
            vec!["-s", "1", "--mkfs", "--mkfs-options", "-I 512"],
            "--mkfs-options and --mount-options need --engine kernel",
        ),
    ] {
        let (code, err) = run(Command::new(CREATE)
            .arg(p("data"))
            .arg(p("index"))
            .args(&args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!p("data").exists() && !p("index").exists(), "{args:?}");
    }

    // overlaybd-apply: the same refusal, also written to the result file
    // (the snapshotter reads it), and the same exit code.
    let (code, err) = run(Command::new(CREATE)
        .arg(p("data"))
        .arg(p("index"))
        .args(["-s", "1"]));
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(p("layer.tar"), [0u8; 1024]).unwrap();
    let cfg = p("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [],
            "upper": {"index": p("index"), "data": p("data")},
            "resultFile": p("result")})
        .to_string(),
    )
    .unwrap();
    let (code, err) = run(Command::new(APPLY)
        .arg(p("layer.tar"))
        .arg(&cfg)
        .args(["--mount-options", "ro"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need --engine kernel"), "{err}");
    let result = std::fs::read_to_string(p("result")).unwrap();
    assert!(
        result.starts_with("failed:") && result.contains("need --engine kernel"),
        "{result}"
    );

    // A runtime failure: the tar is not there.
    let (code, err) = run(Command::new(APPLY).arg(p("missing.tar")).arg(&cfg));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.tar"), "{err}");
}

/// Values that cannot work and arguments that are missing, found by the tools
/// themselves rather than by clap: exit 2 with one line naming the option,
/// and nothing is written.
#[test]
fn bad_values_exit_2_in_every_tool() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sparse_layer(d.path());
    std::fs::write(p("layer.tar"), [0u8; 1024]).unwrap();
    std::fs::write(
        p("config.json"),
        serde_json::json!({"lowers": [],
            "upper": {"index": p("index"), "data": p("data"), "target": p("layer.tar")},
            "resultFile": p("result")})
        .to_string(),
    )
    .unwrap();
    let (data, index, out) = (p("data"), p("index"), p("out"));
    let (out2, tar, cfg) = (p("out2"), p("layer.tar"), p("config.json"));
    let long = "m".repeat(257);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (COMMIT, vec!["-z", "--bs", "3", &data, &index, &out], "--bs"),
        (
            COMMIT,
            vec!["-z", "--algorithm", "gzip", &data, &index, &out],
            "gzip",
        ),
        (COMMIT, vec!["--uuid", "xyz", &data, &index, &out], "--uuid"),
        (
            COMMIT,
            vec!["-p", "xyz", &data, &index, &out],
            "--parent-uuid",
        ),
        (COMMIT, vec!["-m", &long, &data, &index, &out], "-m"),
        (COMMIT, vec![&data, &index], "COMMIT_FILE"),
        (COMMIT, vec!["--commit_sealed", &data], "output path"),
        // The second path is the output: a third would be ignored (upstream
        // ignores it), and the index given as the second overwritten with -f.
        (
            COMMIT,
            vec!["--commit_sealed", "-f", &data, &out, &out2],
            "--commit_sealed takes SEALED_FILE OUTPUT_FILE",
        ),
        (COMMIT, vec!["--seal", "-z", &data, &index], "--seal"),
        (
            COMMIT,
            vec!["--turboOCI", "--commit_sealed", &data, &out],
            "--turboOCI",
        ),
        (ZFILE, vec!["--bs", "3", &data, &out], "--bs"),
        (ZFILE, vec!["--algorithm", "gzip", &data, &out], "gzip"),
        (ZFILE, vec!["-x", &data], "TARGET_FILE"),
        (CREATE, vec!["-u", "xyz", &out, &out2, "1"], "-u"),
        (CREATE, vec!["--turboOCI", &out, &out2, "0"], "virtual size"),
        (
            CREATE,
            vec!["--engine", "kernel", &out, &out2, "1"],
            "--mkfs",
        ),
        (APPLY, vec!["--checksum", "abc", &tar, &cfg], "--checksum"),
        (TURBO, vec!["--fstype", "xfs", &tar, &cfg], "--fstype"),
    ];
    for (tool, args, want) in cases {
        let (code, err) = run(Command::new(tool).args(&args));
        assert_eq!(code, Some(2), "{tool} {args:?}: {err}");
        assert!(err.contains(want), "{tool} {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{tool} {args:?}: {err}");
        assert!(
            !d.path().join("out").exists() && !d.path().join("out2").exists(),
            "{tool} {args:?}"
        );
    }
    // The appliers also say so in the result file.
    let result = std::fs::read_to_string(p("result")).unwrap();
    assert!(
        result.starts_with("failed:") && result.contains("--fstype"),
        "{result}"
    );
}

/// Upstream's flags for what we do not do (overlaybd-commit's registry
/// upload, turboOCI-apply's tar-header export and import) are recognised and
/// refused by name (exit 1, nothing written), not rejected by the parser as
/// unknown; the upload's companions alone are ignored with a warning, as
/// upstream ignores them without --upload.
#[test]
fn upstreams_unsupported_flags_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sparse_layer(d.path());
    let (data, index, out) = (p("data"), p("index"), p("out"));

    let (code, err) = run(Command::new(COMMIT).args([
        "-z",
        "--upload",
        "https://registry.example/v2/x/blobs/uploads/",
        "--upload_bs",
        "1024",
        &data,
        &index,
        &out,
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--upload") && err.contains("not supported"),
        "{err}"
    );
    assert!(!d.path().join("out").exists());

    let (code, err) = run(Command::new(COMMIT).args([
        "--cred_file_path",
        "/nonexistent",
        "--tls_cert_path",
        "/nonexistent",
        &data,
        &index,
        &out,
    ]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("--cred_file_path, --tls_cert_path only apply with --upload"),
        "{err}"
    );
    assert!(d.path().join("out").exists());
    let (code, err) =
        run(Command::new(COMMIT).args(["-f", "--upload_bs", "1024", &data, &index, &out]));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("--upload_bs only applies with --upload"),
        "{err}"
    );

    std::fs::write(p("layer.tar"), [0u8; 1024]).unwrap();
    for flag in ["--export", "--import"] {
        let (code, err) = run(Command::new(TURBO).args([flag, &p("layer.tar"), &p("headers")]));
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(err.contains(flag) && err.contains("not supported"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!d.path().join("headers").exists());
    }
}

/// The layer and the config.json given the wrong way round: the message says
/// so (the config "is a tar archive") and names the order; exit 2, and the
/// layer is not touched.
#[test]
fn a_layer_given_as_the_config_names_the_order() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let tar = testutil::fixtures().join("input.tar");
    let tar = tar.to_str().unwrap();
    std::fs::write(p("config.json"), "{}").unwrap();
    let gz = p("layer.tgz");
    let o = Command::new("gzip")
        .arg("-c")
        .arg(tar)
        .stdout(std::fs::File::create(&gz).unwrap())
        .status()
        .unwrap();
    assert!(o.success());
    for (tool, name) in [(APPLY, "overlaybd-apply"), (TURBO, "turboOCI-apply")] {
        for (layer, kind) in [(tar, "a tar archive"), (gz.as_str(), "gzip data")] {
            let (code, err) = run(Command::new(tool).args([&p("config.json"), layer]));
            assert_eq!(code, Some(2), "{tool} {layer}: {err}");
            assert!(
                err.contains(&format!(
                    "(it is {kind}: the layer comes first, then the config.json: {name} LAYER CONFIG)"
                )),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
    // A config that is merely broken keeps exit 1 and no hint.
    std::fs::write(p("bad.json"), "{").unwrap();
    let (code, err) = run(Command::new(APPLY).args([tar, &p("bad.json")]));
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("comes first"), "{err}");
}

/// An output that exists is refused saying so, and how to replace it where the
/// tool can (commit and zfile: -f), not as a bare "File exists (os error
/// 17)"; overlaybd-create never replaces files and says so before any work.
#[test]
fn an_existing_output_is_named_with_the_way_out() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sparse_layer(d.path());
    std::fs::write(p("out"), "keep").unwrap();
    for (tool, args) in [
        (COMMIT, vec![p("data"), p("index"), p("out")]),
        (COMMIT, vec!["-z".into(), p("data"), p("index"), p("out")]),
        (ZFILE, vec![p("index"), p("out")]),
    ] {
        let (code, err) = run(Command::new(tool).args(&args));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{}: the output already exists (force, -f, replaces it)",
                p("out")
            )),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_to_string(p("out")).unwrap(), "keep");
    }
    for (args, existing) in [
        (vec![p("data"), p("new"), "1".into()], p("data")),
        (
            vec![p("new"), p("index"), "1".into(), "--raw".into()],
            p("index"),
        ),
        (
            vec![p("new"), p("index"), "1".into(), "--turboOCI".into()],
            p("index"),
        ),
    ] {
        let (code, err) = run(Command::new(CREATE).args(&args));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{existing} already exists: overlaybd-create makes new files only"
            )),
            "{args:?}: {err}"
        );
        assert!(!d.path().join("new").exists(), "{args:?}");
    }
}

/// `overlaybd-zfile PATH` (one path) compresses standard input into PATH.
/// Typed for `overlaybd-zfile SRC` (the target forgotten), it must not wait
/// for a terminal, nor, with -f, replace the file with the compression of an
/// empty stream (`< /dev/null` in CI, a failed download piped in): the
/// file stays as it was and the message says what the one-path form does.
#[test]
fn zfile_from_standard_input_refuses_a_terminal_and_an_empty_stream() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("layer.tar"), "keep").unwrap();
    // `< /dev/null`, and a pipe closed without data.
    for stdin in [std::process::Stdio::null(), std::process::Stdio::piped()] {
        let mut c = Command::new(ZFILE)
            .args(["-f", &p("layer.tar")])
            .stdin(stdin)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(c.stdin.take());
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "overlaybd-zfile: error: standard input is empty (0 bytes): nothing to compress into {}, which is left as it was (with one path, overlaybd-zfile compresses standard input; to compress a file: overlaybd-zfile SOURCE_FILE TARGET_FILE)",
                p("layer.tar")
            )
        );
        assert_eq!(std::fs::read_to_string(p("layer.tar")).unwrap(), "keep");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }
    // An existing output without -f is refused at once, before standard
    // input (a pipe nobody writes to yet) is waited for.
    let c = Command::new(ZFILE)
        .arg(p("layer.tar"))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = testutil::output_within(c, std::time::Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the output already exists (force, -f, replaces it)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(p("layer.tar")).unwrap(), "keep");
    // A terminal on standard input: a usage error at once, nothing written
    // (`script` gives the tool a pseudo-terminal).
    let o = Command::new("script")
        .args(["-qec", &format!("{ZFILE} {}", p("new.zfile")), "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("overlaybd-zfile: error: standard input is a terminal: with one path, overlaybd-zfile compresses standard input into it; to compress a file: overlaybd-zfile SOURCE_FILE TARGET_FILE"),
        "{out}"
    );
    assert!(!d.path().join("new.zfile").exists());
    // Data on standard input is compressed as before.
    let mut c = Command::new(ZFILE)
        .arg(p("new.zfile"))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), b"data").unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, err) = run(Command::new(ZFILE).args(["-x", &p("new.zfile"), &p("back")]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read(p("back")).unwrap(), b"data");
}

/// Runs `cmd`, killing it after 60 s (a hang fails the test instead of
/// stopping the suite).
fn run_bounded(cmd: &mut Command) -> (Option<i32>, String) {
    let c = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = testutil::output_within(c, std::time::Duration::from_secs(60));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// An ext4 over 64 TiB writes 1/16384 of its size as bitmaps (every 128 MiB
/// block group has its own: 64 GiB and minutes at 1 PiB; at 64 PiB
/// libext2fs's ext2fs_initialize loops forever). `--mkfs` with such a size is
/// a usage error that says the limit and why, and mkfs itself refuses such a
/// device (`overlaybd-apply --mkfs` onto a layer created that large), at
/// once.
#[test]
fn mkfs_past_its_size_limit_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    // Just past the limit, 1 PiB (ran for minutes, writing GBs), 64 PiB and
    // the largest virtual size overlaybd-create takes.
    for gb in ["65537", "1048576", "67108864", "268435455"] {
        let (code, err) =
            run_bounded(Command::new(CREATE).args(["--mkfs", &p("data"), &p("index"), gb]));
        assert_eq!(code, Some(2), "{gb}: {err}");
        assert_eq!(
            err.trim_end(),
            format!("overlaybd-create: error: --mkfs makes an ext4 of at most 65536 GB (64 TiB), not {gb} GB: every 128 MiB block group needs its own 8 KiB of bitmaps: 1/16384 of the size is written, 4 GiB at 64 TiB"),
        );
        assert!(!d.path().join("data").exists() && !d.path().join("index").exists());
    }
    // A TurboOCI layer's ext4 is made by libext2fs (obdfs::photon) whatever
    // --engine says: refused with --engine kernel too (it failed at the mkfs).
    let (code, err) = run_bounded(Command::new(CREATE).args([
        "--turboOCI",
        "--mkfs",
        "--engine",
        "kernel",
        &p("data"),
        &p("index"),
        "65537",
    ]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at most 65536 GB"), "{err}");
    assert!(!d.path().join("data").exists() && !d.path().join("index").exists());
    // A layer of 64 TiB + 1 GiB (created without a filesystem), given
    // --mkfs by overlaybd-apply: mkfs refuses the device.
    let (code, err) = run(Command::new(CREATE).args([&p("data"), &p("index"), "65537"]));
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(p("layer.tar"), [0u8; 1024]).unwrap();
    std::fs::write(
        p("config.json"),
        serde_json::json!({"lowers": [],
            "upper": {"index": p("index"), "data": p("data")},
            "resultFile": p("result")})
        .to_string(),
    )
    .unwrap();
    let (code, err) =
        run_bounded(Command::new(APPLY).args(["--mkfs", &p("layer.tar"), &p("config.json")]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("device of 70369817919488 bytes is too large for mkfs (at most 70368744177664 bytes, 64 TiB: every 128 MiB block group needs its own 8 KiB of bitmaps"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// An output in a directory that does not exist is named as such, as
/// overlaybd-create names it, not as a bare "No such file or directory",
/// which reads as if the input were missing.
#[test]
fn an_output_in_a_missing_directory_names_the_directory() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sparse_layer(d.path());
    let out = p("nodir/out");
    let want = format!(
        "cannot create {out}: the directory {} does not exist",
        p("nodir")
    );
    let blob = testutil::fixtures().join("baselayer/commit.lz4.zfile");
    let blob = blob.to_str().unwrap();
    for (tool, args) in [
        (COMMIT, vec![p("data"), p("index"), out.clone()]),
        (
            COMMIT,
            vec!["-z".into(), p("data"), p("index"), out.clone()],
        ),
        (ZFILE, vec![p("index"), out.clone()]),
        (ZFILE, vec!["-x".into(), blob.into(), out.clone()]),
    ] {
        let (code, err) = run(Command::new(tool).args(&args));
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert!(!d.path().join("nodir").exists());
}
