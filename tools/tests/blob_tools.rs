//! overlaybd-create / overlaybd-commit / overlaybd-zfile as users run them.

use std::path::Path;
use std::process::{Command, Output};
use testutil::{assert_ok, err_text};

fn run(bin: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn tool")
}

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const COMMIT: &str = env!("CARGO_BIN_EXE_overlaybd-commit");
const ZFILE: &str = env!("CARGO_BIN_EXE_overlaybd-zfile");
const UUID: &str = "6d5b0bd2-0000-4000-8000-000000000001";

#[test]
fn commit_tool_reproduces_upstream_blobs() {
    let f = testutil::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let lsmt = f.join("baselayer/commit.lsmt");
    let lsmt = lsmt.to_str().unwrap();
    for (extra, want) in [
        (vec!["-z"], "baselayer/commit.lz4.zfile"),
        (
            vec!["-z", "--algorithm", "zstd"],
            "baselayer/commit.zstd.zfile",
        ),
        (vec!["-z", "-t"], "baselayer/commit.lz4.zfile.tar"),
        // the thread count never changes the bytes
        (vec!["-z", "--threads", "1"], "baselayer/commit.lz4.zfile"),
        (
            vec!["-z", "--algorithm", "zstd", "--threads", "3"],
            "baselayer/commit.zstd.zfile",
        ),
        (
            vec!["-z", "-t", "--compress_threads", "4"],
            "baselayer/commit.lz4.zfile.tar",
        ),
    ] {
        let out = dir.path().join("out");
        let mut a = vec!["--commit_sealed", lsmt, "out", "--uuid", UUID];
        a.extend(extra);
        assert_ok(&run(COMMIT, &a, dir.path()));
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(f.join(want)).unwrap(),
            "{want}"
        );
        std::fs::remove_file(out).unwrap();
    }
    // overlaybd-zfile: same blocks, header not rewritten
    assert_ok(&run(ZFILE, &[lsmt, "z"], dir.path()));
    let ours = std::fs::read(dir.path().join("z")).unwrap();
    let theirs = std::fs::read(f.join("baselayer/commit.lz4.zfile")).unwrap();
    assert_eq!((ours[32], theirs[32]), (0x13, 0x1b));
    assert!(ours[512..] == theirs[512..]);
    assert_ok(&run(ZFILE, &["--threads", "1", lsmt, "z1"], dir.path()));
    assert!(std::fs::read(dir.path().join("z1")).unwrap() == ours);
    assert_ok(&run(ZFILE, &["--verify", "z"], dir.path()));
    // Not a ZFile: a layer tar, an empty file.
    let tar = f.join("input.tar");
    let e = err_text(&run(
        ZFILE,
        &["--verify", tar.to_str().unwrap()],
        dir.path(),
    ));
    assert!(
        e.contains("input.tar: corrupt ZFile: not a ZFile, nor a tar-wrapped ZFile: a tar, but unexpected entry type '5'"),
        "{e}"
    );
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    let e = err_text(&run(ZFILE, &["--verify", "empty"], dir.path()));
    assert!(
        e.contains("empty: corrupt ZFile: the file is empty (0 bytes): not a ZFile"),
        "{e}"
    );
    // --verify takes one file: a second path is a usage error, not ignored.
    let o = run(ZFILE, &["--verify", "z", "z1"], dir.path());
    assert_eq!(o.status.code(), Some(2), "{}", err_text(&o));
    assert!(err_text(&o).contains("--verify"), "{}", err_text(&o));
    assert_ok(&run(ZFILE, &["-x", "z", "back"], dir.path()));
    assert!(std::fs::read(dir.path().join("back")).unwrap() == std::fs::read(lsmt).unwrap());
    // Compression options with -x or --verify are said to be ignored.
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = run(
        ZFILE,
        &["--verify", "z", "--bs", "3", "--algorithm", "x"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--algorithm, --bs apply only to compression"));
    let o = run(ZFILE, &["-x", "z", "back2", "--threads", "7"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--threads applies only to compression; ignored with -x"));
    // A block size that overflows says what is allowed.
    let o = run(ZFILE, &[lsmt, "z2", "--bs", "4294967295"], dir.path());
    assert!(
        err_text(&o).contains("4, 8, 16, 32 or 64"),
        "{}",
        err_text(&o)
    );
}

#[test]
fn create_commit_roundtrip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    // creating over existing files is refused
    let e = err_text(&run(CREATE, &["data", "index", "1"], d));
    assert!(e.contains("data") && e.contains("exists"), "{e}");
    let e = err_text(&run(CREATE, &["-s", "same", "same", "1"], d));
    assert!(e.contains("same path"), "{e}");
    assert!(!d.join("same").exists());
    // a missing directory is named, for the index as for the data file
    let e = err_text(&run(CREATE, &["-s", "d", "nodir/i", "64"], d));
    assert!(
        e.contains("cannot create nodir/i: the directory nodir does not exist"),
        "{e}"
    );
    let e = err_text(&run(CREATE, &["-s", "nodir/d", "i", "64"], d));
    assert!(
        e.contains("cannot create nodir/d: the directory nodir does not exist"),
        "{e}"
    );
    assert!(!d.join("d").exists() && !d.join("i").exists());
    // 20,000 GB is more than ext4 (CI's /tmp) holds in one file: refused with
    // the reason, and nothing left in the way of a retry
    let out = run(CREATE, &["-s", "huge", "hugei", "20000"], d);
    if !out.status.success() {
        let e = err_text(&out);
        assert!(e.contains("the filesystem cannot hold"), "{e}");
        assert!(!d.join("huge").exists() && !d.join("hugei").exists());
        assert_ok(&run(CREATE, &["-s", "huge", "hugei", "1"], d));
    }
    assert_ok(&run(
        COMMIT,
        &["data", "index", "layer", "-z", "-t", "--uuid", UUID],
        d,
    ));
    let l = blockdev::layer::open_layer(&d.join("layer")).unwrap();
    assert_eq!(l.info().uuid.to_string(), UUID.to_uppercase());
    assert_eq!(l.info().virtual_size, 1 << 30);
    let e = err_text(&run(COMMIT, &["data", "index", "layer"], d));
    assert!(e.contains("layer") && e.contains("exists"), "{e}");
    assert_ok(&run(COMMIT, &["-f", "data", "index", "layer"], d));
    let e = err_text(&run(COMMIT, &["data", "index", "x", "--uuid", "nope"], d));
    assert!(e.contains("invalid uuid 'nope'"), "{e}");
    let e = err_text(&run(COMMIT, &["data", "index", "x", "-z", "--bs", "3"], d));
    assert!(e.contains("block size"), "{e}");
    let e = err_text(&run(
        COMMIT,
        &["data", "index", "x", "-z", "--algorithm", "lzo"],
        d,
    ));
    assert!(e.contains("lzo"), "{e}");
    std::fs::write(d.join("junk"), vec![1u8; 10000]).unwrap();
    let e = err_text(&run(COMMIT, &["junk", "index", "x"], d));
    assert!(e.contains("junk") && e.contains("magic"), "{e}");
    assert!(!d.join("x").exists());
    let e = err_text(&run(ZFILE, &["-x", "junk", "y"], d));
    assert!(e.contains("junk") && e.contains("not a ZFile"), "{e}");
    // an output that is an input is refused, even with -f, and the input kept
    let before = std::fs::read(d.join("junk")).unwrap();
    for (tool, args) in [
        (ZFILE, vec!["-f", "junk", "junk"]),
        (ZFILE, vec!["-f", "junk", "./junk"]),
        (COMMIT, vec!["-f", "data", "index", "index"]),
    ] {
        let e = err_text(&run(tool, &args, d));
        assert!(e.contains("is the input file"), "{args:?}: {e}");
    }
    assert_eq!(std::fs::read(d.join("junk")).unwrap(), before);
    // -f never replaces what is not a regular file: a FIFO (or /dev/null)
    // stays what it is
    assert!(Command::new("mkfifo")
        .arg(d.join("fifo"))
        .status()
        .unwrap()
        .success());
    for (tool, args) in [
        (COMMIT, vec!["-f", "data", "index", "fifo"]),
        (ZFILE, vec!["-f", "junk", "fifo"]),
    ] {
        let e = err_text(&run(tool, &args, d));
        assert!(
            e.contains("fifo") && e.contains("is a FIFO"),
            "{args:?}: {e}"
        );
        let t = std::fs::symlink_metadata(d.join("fifo"))
            .unwrap()
            .file_type();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&t), "{args:?}");
    }
    assert_ok(&run(COMMIT, &["-f", "data", "index", "layer"], d));
    assert_ok(&run(ZFILE, &["-f", "layer", "layer.z"], d));
    let e = err_text(&run(ZFILE, &["-x", "-f", "layer.z", "layer.z"], d));
    assert!(e.contains("is the input file"), "{e}");
    // seal in place, then it opens as a sealed lower
    assert_ok(&run(CREATE, &["d2", "i2", "1"], d));
    // --seal writes no other file: output options are refused, not ignored
    let e = err_text(&run(COMMIT, &["--seal", "-z", "d2", "i2", "out"], d));
    assert!(e.contains("--seal") && e.contains("-z, COMMIT_FILE"), "{e}");
    assert!(!d.join("out").exists());
    assert_ok(&run(COMMIT, &["--seal", "d2", "i2"], d));
    blockdev::layer::open_layer(&d.join("d2")).unwrap();
    // a sealed data file is no longer writable: neither sealed again nor committed
    let len = std::fs::metadata(d.join("d2")).unwrap().len();
    for args in [vec!["--seal", "d2", "i2"], vec!["d2", "i2", "o2"]] {
        let e = err_text(&run(COMMIT, &args, d));
        assert!(e.contains("already sealed"), "{args:?}: {e}");
    }
    assert_eq!(std::fs::metadata(d.join("d2")).unwrap().len(), len);
    // an index cut inside its last entry (an interrupted append): that entry
    // is ignored with a warning, the others are committed
    assert_ok(&run(CREATE, &["d3", "i3", "1", "--mkfs"], d));
    let index = std::fs::read(d.join("i3")).unwrap();
    assert!(index.len() >= 4096 + 2 * 16, "{}", index.len());
    std::fs::write(d.join("i3t"), &index[..index.len() - 8]).unwrap();
    std::fs::write(d.join("i3w"), &index[..index.len() - 16]).unwrap();
    let out = run(COMMIT, &["d3", "i3t", "torn"], d);
    assert_ok(&out);
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(warn.contains("partial index entry"), "{warn}");
    assert_ok(&run(COMMIT, &["d3", "i3w", "whole"], d));
    assert_eq!(
        std::fs::read(d.join("torn")).unwrap(),
        std::fs::read(d.join("whole")).unwrap()
    );
}

#[test]
fn help_explains_flags() {
    for bin in [CREATE, COMMIT, ZFILE] {
        let o = Command::new(bin).arg("--help").output().unwrap();
        assert_ok(&o);
        let t = String::from_utf8_lossy(&o.stdout);
        assert!(t.contains("Usage"), "{t}");
    }
    let o = Command::new(COMMIT).arg("--help").output().unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "-z",
        "-t",
        "--algorithm",
        "--bs",
        "--uuid",
        "--parent-uuid",
        "--threads",
    ] {
        assert!(t.contains(flag), "--help lacks {flag}");
    }
}

/// A stdout that cannot be written (a full device; a reader that went away is
/// the same to the tool) does not turn finished work into a crash: the tools
/// exit 0 and print no panic.
#[test]
fn an_unwritable_stdout_is_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for (tool, args) in [
        (CREATE, vec!["-s", "data", "index", "1", "--mkfs"]),
        (COMMIT, vec!["data", "index", "layer"]),
        (ZFILE, vec!["layer", "layer.z"]),
        (ZFILE, vec!["--verify", "layer.z"]),
        (ZFILE, vec!["-x", "layer.z", "layer.x"]),
    ] {
        let o = Command::new(tool)
            .args(&args)
            .current_dir(d)
            .stdout(full())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !e.contains("panicked"),
            "{args:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read(d.join("layer")).unwrap(),
        std::fs::read(d.join("layer.x")).unwrap()
    );
}

/// On a terminal a commit's progress bar starts when there is something to
/// show: it used to draw a full bar of "0 B/0 B" first (and leave it on the
/// screen for an empty layer). `script` gives the commit a terminal.
#[test]
fn a_commit_on_a_terminal_draws_no_empty_bar() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(CREATE, &["-s", "data", "index", "1", "--mkfs"], d);
    run(CREATE, &["-s", "empty", "eindex", "1"], d);
    for (data, index) in [("data", "index"), ("empty", "eindex")] {
        let cmd = format!("'{COMMIT}' -z {data} {index} {data}.out");
        let o = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(d)
            .output()
            .expect("script (util-linux) runs");
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{said}");
        assert!(said.contains("committed"), "{said}");
        assert!(!said.contains("0 B/0 B"), "{data}: {said:?}");
    }
}

/// `overlaybd-zfile` reading a stream that stalls, interrupted: no partial output
/// is left (not even its temporary file), `-f` keeps the file that was there,
/// and a rerun works.
#[test]
fn an_interrupted_zfile_leaves_no_partial_output() {
    testutil::default_stop_signals();
    use nix::sys::signal::Signal;
    use std::io::Write;
    use std::process::Stdio;
    for (sig, force) in [(Signal::SIGINT, false), (Signal::SIGTERM, true)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("out.zf");
        if force {
            std::fs::write(&out, b"the previous good file").unwrap();
        }
        let mut args = vec!["--threads", "1", "out.zf"];
        if force {
            args.insert(0, "-f");
        }
        let mut c = Command::new(ZFILE)
            .args(&args)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // 4 MiB, then the stream stalls (stdin stays open until the end).
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(&vec![7u8; 4 << 20]).unwrap();
        testutil::wait_until(&mut c, "its temporary output", || {
            !testutil::temp_files(d).is_empty()
        });
        let line = testutil::interrupt(c, sig);
        drop(stdin);
        assert!(line.contains("removed the unfinished out.zf"), "{line}");
        assert_eq!(testutil::temp_files(d), Vec::<String>::new());
        if force {
            assert_eq!(std::fs::read(&out).unwrap(), b"the previous good file");
        } else {
            assert!(!out.exists());
        }
        // Nothing is in the way of a rerun.
        let o = Command::new(ZFILE)
            .args(&args)
            .current_dir(d)
            .stdin(std::fs::File::open(testutil::fixtures().join("input.tar")).unwrap())
            .output()
            .unwrap();
        assert_ok(&o);
        assert_ok(&run(ZFILE, &["--verify", "out.zf"], d));
    }
}

/// A SIGINT the tool was started with ignored (a script's background job)
/// stays ignored: the work goes on and completes.
#[test]
fn an_ignored_sigint_stays_ignored() {
    testutil::default_stop_signals();
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' INT; exec {ZFILE} --threads 1 out.zf"))
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 4 << 20]).unwrap();
    testutil::wait_until(&mut c, "its temporary output", || {
        !testutil::temp_files(d).is_empty()
    });
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    stdin.write_all(&vec![8u8; 1 << 20]).unwrap();
    drop(stdin);
    assert_ok(&c.wait_with_output().unwrap());
    assert_ok(&run(ZFILE, &["--verify", "out.zf"], d));
    assert_ok(&run(ZFILE, &["-x", "out.zf", "back"], d));
    assert_eq!(std::fs::metadata(d.join("back")).unwrap().len(), 5 << 20);
}

/// A commit interrupted half-way leaves no partial output, and with `-f` the
/// previous output stays whole until the new one is complete.
#[test]
fn an_interrupted_commit_leaves_no_partial_output() {
    testutil::default_stop_signals();
    use nix::sys::signal::Signal;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 128 MiB that zstd has work with: compressing it on one thread takes about
    // a second here, the signal is sent as soon as the output appears.
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let layer = blockdev::lsmt::WritableLayer::open(&d.join("data"), &d.join("index")).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 16 << 20];
    for i in 0..8u64 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 4 bits of entropy a byte: the compressor has work to do.
            for (j, c) in b.iter_mut().enumerate() {
                *c = b'a' + (x >> (4 * j)) as u8 % 16;
            }
        }
        layer.write(&buf, i * buf.len() as u64).unwrap();
    }
    layer.flush().unwrap();
    drop(layer);
    let commit = |force: bool| {
        let mut c = Command::new(COMMIT);
        if force {
            c.arg("-f");
        }
        c.args(["-z", "--algorithm", "zstd", "--threads", "1"])
            .args(["data", "index", "c.zf"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let mut c = commit(false).spawn().unwrap();
    testutil::wait_until(&mut c, "its temporary output", || {
        !testutil::temp_files(d).is_empty()
    });
    let line = testutil::interrupt(c, Signal::SIGINT);
    assert!(line.contains("removed the unfinished c.zf"), "{line}");
    assert_eq!(testutil::temp_files(d), Vec::<String>::new());
    assert!(!d.join("c.zf").exists());
    // A rerun is not refused; with -f, an interrupted commit keeps it.
    assert_ok(&commit(false).output().unwrap());
    let good = std::fs::read(d.join("c.zf")).unwrap();
    let mut c = commit(true).spawn().unwrap();
    testutil::wait_until(&mut c, "its temporary output", || {
        !testutil::temp_files(d).is_empty()
    });
    testutil::interrupt(c, Signal::SIGTERM);
    assert_eq!(testutil::temp_files(d), Vec::<String>::new());
    assert!(std::fs::read(d.join("c.zf")).unwrap() == good);
    assert_ok(&run(ZFILE, &["--verify", "c.zf"], d));
}

/// A failed write removes its unfinished output and, with `-f`, leaves the
/// file that was there as it was (it used to be removed first).
#[test]
fn a_failed_write_keeps_the_previous_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("dir")).unwrap();
    std::fs::write(d.join("out"), b"previous").unwrap();
    // Reading a directory fails once the output exists.
    let e = err_text(&run(ZFILE, &["-f", "dir", "out"], d));
    assert!(e.contains("dir: Is a directory"), "{e}");
    assert_eq!(std::fs::read(d.join("out")).unwrap(), b"previous");
    // A ZFile with a damaged block in the middle fails -x half-way.
    let lsmt = testutil::fixtures().join("baselayer/commit.lsmt");
    assert_ok(&run(ZFILE, &[lsmt.to_str().unwrap(), "z"], d));
    let mut z = std::fs::read(d.join("z")).unwrap();
    let at = z.len() / 2;
    z[at] ^= 0xff;
    std::fs::write(d.join("z"), &z).unwrap();
    let e = err_text(&run(ZFILE, &["-x", "-f", "z", "out"], d));
    assert!(e.contains("checksum mismatch"), "{e}");
    assert_eq!(std::fs::read(d.join("out")).unwrap(), b"previous");
    assert_eq!(testutil::temp_files(d), Vec::<String>::new());
    let mut names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["dir", "out", "z"]);
}

/// Under a file size limit (`ulimit -f`, which some CI sandboxes set) a
/// write past it fails as any failed write does: one line naming the file,
/// exit status 1, the unfinished output removed. SIGXFSZ used to kill the
/// tools without a word (exit status 153), leaving a commit's `.c.tmp-PID-N`
/// and a create's data and index files behind.
#[test]
fn a_file_size_limit_fails_the_write_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 4 MiB of data: the plain commit is bigger than the limit.
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let layer = blockdev::lsmt::WritableLayer::open(&d.join("data"), &d.join("index")).unwrap();
    layer.write(&vec![0x5a; 4 << 20], 0).unwrap();
    layer.flush().unwrap();
    drop(layer);
    // At most 2 MiB (`ulimit -f` counts 512-byte blocks in dash, 1 KiB
    // ones in bash).
    let limited = |bin: &str, args: &[&str]| {
        Command::new("sh")
            .args(["-c", "ulimit -f 2048 && exec \"$0\" \"$@\"", bin])
            .args(args)
            .current_dir(d)
            .output()
            .expect("spawn sh")
    };
    let o = limited(COMMIT, &["data", "index", "c"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = err_text(&o);
    assert!(e.contains("c: File too large"), "{e}");
    assert_eq!(e.lines().filter(|l| l.contains("error")).count(), 1, "{e}");
    assert_eq!(testutil::temp_files(d), Vec::<String>::new());
    assert!(!d.join("c").exists());

    // A 1 GB sparse layer cannot be made under the limit: nothing is left.
    // The message names the limit, not the filesystem.
    let o = limited(CREATE, &["-s", "d2", "i2", "1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = err_text(&o);
    assert!(e.contains("file size limit (ulimit -f)"), "{e}");
    assert!(!e.contains("the filesystem cannot hold"), "{e}");
    assert!(!d.join("d2").exists() && !d.join("i2").exists());
}

/// `-t` wraps ZFile output only, as upstream's overlaybd-commit (its tar
/// adaptor is set up for `-z` alone): without `-z` the output is the plain
/// LSMT layer, with a warning. With `--turboOCI -z` it wraps the warp ZFile,
/// as upstream accepts it.
#[test]
fn tar_wraps_zfile_output_only_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    assert_ok(&run(COMMIT, &["data", "index", "plain", "--uuid", UUID], d));
    let o = run(COMMIT, &["-t", "data", "index", "t", "--uuid", UUID], d);
    assert_ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("'-t' will be ignored without '-z'"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read(d.join("t")).unwrap() == std::fs::read(d.join("plain")).unwrap());

    assert_ok(&run(CREATE, &["wd", "wi", "1", "--turboOCI"], d));
    assert_ok(&run(COMMIT, &["-z", "--turboOCI", "wd", "wi", "w.z"], d));
    assert_ok(&run(
        COMMIT,
        &["-z", "-t", "--turboOCI", "wd", "wi", "w.z.tar"],
        d,
    ));
    let z = std::fs::read(d.join("w.z")).unwrap();
    let wrapped = std::fs::read(d.join("w.z.tar")).unwrap();
    assert!(wrapped.len() > z.len() && wrapped[..512].starts_with(b"overlaybd.pax"));
    assert_ok(&run(ZFILE, &["-x", "w.z", "w.raw"], d));
    assert_ok(&run(ZFILE, &["-x", "w.z.tar", "w.tar.raw"], d));
    assert!(std::fs::read(d.join("w.raw")).unwrap() == std::fs::read(d.join("w.tar.raw")).unwrap());
}

/// A signal during `overlaybd-create --mkfs` (seconds for a large sparse
/// layer) removes the data and index files it was making: left behind, they
/// looked like a finished layer without a filesystem (commit accepted them)
/// and a rerun was refused because they exist.
#[test]
fn an_interrupted_create_leaves_no_layer() {
    testutil::default_stop_signals();
    use nix::sys::signal::Signal;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // mkfs of a 1 TiB sparse layer takes a second or more here.
    let create = |more: &[&str]| {
        let mut c = Command::new(CREATE);
        c.args(["-s", "data", "index", "1024"])
            .args(more)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let mut c = create(&["--mkfs"]).spawn().unwrap();
        testutil::wait_until(&mut c, "the data file", || d.join("data").exists());
        let line = testutil::interrupt(c, sig);
        assert!(
            line.contains("removed the unfinished data, index"),
            "{line}"
        );
        assert!(
            !d.join("data").exists() && !d.join("index").exists(),
            "{sig}"
        );
    }
    // Nothing is in the way of a rerun.
    assert_ok(&create(&[]).output().unwrap());
}

/// `overlaybd-zfile -x` says what is wrong with a source that is no ZFile as
/// `--verify` does (an empty file, a layer tar), and neither waits on a FIFO
/// for a writer nor opens a directory: both name what the path is.
#[test]
fn zfile_sources_that_are_no_zfile_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty"), b"").unwrap();
    let tar = testutil::fixtures().join("input.tar");
    let tar = tar.to_str().unwrap();
    for (src, want) in [
        ("empty", "empty: corrupt ZFile: the file is empty (0 bytes): not a ZFile"),
        (
            tar,
            "input.tar: corrupt ZFile: not a ZFile, nor a tar-wrapped ZFile: a tar, but unexpected entry type '5'",
        ),
        (".", ".: not a ZFile: it is a directory"),
    ] {
        for args in [vec!["-x", src, "out"], vec!["--verify", src]] {
            let o = run(ZFILE, &args, d);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", err_text(&o));
            assert!(err_text(&o).contains(want), "{args:?}: {}", err_text(&o));
            assert!(!d.join("out").exists());
        }
    }
    let fifo = d.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for args in [vec!["-x", "fifo", "out"], vec!["--verify", "fifo"]] {
        // Should the tool open the FIFO, a writer comes and goes: it then reads
        // no bytes and the message below is not the one it gives.
        let f = fifo.clone();
        std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(f)));
        let o = run(ZFILE, &args, d);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", err_text(&o));
        assert!(
            err_text(&o).contains("fifo: not a ZFile: it is a FIFO")
                || err_text(&o).contains("fifo: not a layer file: it is a FIFO"),
            "{args:?}: {}",
            err_text(&o)
        );
    }
}

/// A writable layer's data and index files given the wrong way round: the
/// error says which file each one is.
#[test]
fn swapped_data_and_index_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["data", "index", "1"], d));
    let e = err_text(&run(COMMIT, &["index", "data", "out"], d));
    assert!(
        e.contains("index: corrupt LSMT writable layer: header flags 0x1 are not those of a data file (it is an index file: are the data and index files swapped?)"),
        "{e}"
    );
    let e = err_text(&run(COMMIT, &["data", "data", "out"], d));
    assert!(
        e.contains("(it is a data file: are the data and index files swapped?)"),
        "{e}"
    );
    assert!(!d.join("out").exists());
    // A sparse layer's index file is empty: given as the data file, it is
    // too small to be one, and the other path holds the data file's header.
    assert_ok(&run(CREATE, &["-s", "sdata", "sindex", "1"], d));
    let e = err_text(&run(COMMIT, &["sindex", "sdata", "out"], d));
    assert!(
        e.contains("sindex: corrupt LSMT writable layer: data file is only 0 bytes (and sdata is a data file: are the data and index files swapped?)"),
        "{e}"
    );
    assert!(!d.join("out").exists());
}

/// A layer whose writer is stopping (`fusermount -u` returns before the
/// overlaybd-fuse daemon has flushed the upper and exited) is waited for: a
/// commit that finds it claimed goes on once the claim ends, instead of
/// failing with "the layer is in use" (it did, in 4 of 6 runs of the
/// README's `fusermount -u /mnt/obd; overlaybd-commit ...`).
#[test]
fn a_commit_waits_for_a_writer_that_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let writer = blockdev::lsmt::WritableLayer::open(&d.join("data"), &d.join("index")).unwrap();
    let mut commit = Command::new(COMMIT)
        .args(["data", "index", "out"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the commit has the data file open, its claim is tried (or about
    // to be) while the writer holds the layer.
    let data = d.join("data").canonicalize().unwrap();
    let fds = format!("/proc/{}/fd", commit.id());
    let has_data_open = || {
        std::fs::read_dir(&fds).is_ok_and(|fds| {
            fds.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == data))
        })
    };
    while !has_data_open() {
        assert!(
            commit.try_wait().unwrap().is_none(),
            "the commit ended before it opened the layer: {}",
            err_text(&commit.wait_with_output().unwrap())
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(writer);
    let o = commit.wait_with_output().unwrap();
    assert_ok(&o);
    assert!(d.join("out").exists());
}

/// A layer held by a busy process (one that may let go soon) is waited
/// for: after a second the tool says on stderr what it waits for and who
/// holds it (one line), and goes on once the holder lets go.
#[test]
fn a_commit_says_after_a_second_that_it_waits() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let mut holder = python_holder(
        d,
        "end = time.monotonic() + 60\n\
         while time.monotonic() < end: pass\n",
    );
    let start = std::time::Instant::now();
    let mut commit = Command::new(COMMIT)
        .args(["data", "index", "out"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(commit.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let waited = start.elapsed();
    assert!(
        line.starts_with("overlaybd-commit: waiting up to 10 s for ")
            && line.contains(&format!(
                "data: in use by another process (pid {}, python3) ...",
                holder.id()
            )),
        "{line}"
    );
    assert!(waited >= blockdev::lsmt::CLAIM_NOTICE_AFTER, "{waited:?}");
    assert!(waited < std::time::Duration::from_secs(5), "{waited:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(commit.wait().unwrap().success(), "{rest}");
    // Said once.
    assert!(!rest.contains("waiting"), "{rest}");
    assert!(d.join("out").exists());
}

/// A holder that is busy (running, as a server flushing the layer before it
/// exits is) is waited for, past the second after which an idle one is not.
#[test]
fn a_commit_waits_for_a_busy_holder() {
    commit_waits_for_busy_holder(
        "end = time.monotonic() + 2.5\n\
         while time.monotonic() < end: pass\n",
    );
}

/// Runs `overlaybd-commit` on a layer a python3 holder claims, then runs
/// `then` (busy for about 2.5 s, then exits): the commit waits for it and
/// succeeds.
fn commit_waits_for_busy_holder(then: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let mut holder = python_holder(d, then);
    let start = std::time::Instant::now();
    let o = run(COMMIT, &["data", "index", "out"], d);
    assert_ok(&o);
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(holder.wait().unwrap().success());
    assert!(d.join("out").exists());
}

/// Python code that takes the claim on `data` (an exclusive `flock`), says
/// so, then runs `then`.
fn python_lock_code(then: &str) -> String {
    format!(
        "import fcntl, time\n\
         f = open('data', 'r+b')\n\
         fcntl.flock(f, fcntl.LOCK_EX)\n\
         print('locked', flush=True)\n\
         {then}"
    )
}

/// Starts a `python3` in `d` that takes the claim on `data`, then runs
/// `then` (Python code); returns once the claim is taken.
fn python_holder(d: &std::path::Path, then: &str) -> std::process::Child {
    testutil::locked_holder(d, "python3", &["-c", &python_lock_code(then)])
}

/// A holder that never lets go (a live process that is not exiting and
/// sleeps, as a server serving the layer) is not waited for past a second
/// and a half: the error names it, its pid and program, so the user knows
/// what to stop. (The holder is a process of its own: this test process
/// runs other tests on other threads, and a holder with a running thread
/// is waited for.)
#[test]
fn a_commit_of_a_layer_in_use_names_the_holder() {
    commit_fails_naming_idle_holder(None, |d| (python_holder(d, "time.sleep(60)\n"), "python3"));
}

/// Runs `overlaybd-commit` on a layer that `holder` (returning the holder
/// and its program's name) claims and then keeps, sleeping: the commit
/// fails after a second and a half without saying it waits, naming the
/// holder. The commit runs as `commit_uid` if given (the layer's files and
/// directory are then open to all).
fn commit_fails_naming_idle_holder(
    commit_uid: Option<u32>,
    holder: impl FnOnce(&std::path::Path) -> (std::process::Child, &'static str),
) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    if commit_uid.is_some() {
        for (p, mode) in [(d.to_path_buf(), 0o777), (d.join("data"), 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let (mut holder, name) = holder(d);
    let start = std::time::Instant::now();
    let mut commit = Command::new(COMMIT);
    commit.args(["data", "index", "out"]).current_dir(d);
    if let Some(uid) = commit_uid {
        commit.uid(uid).gid(uid);
    }
    let o = commit.output().expect("spawn tool");
    let took = start.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!o.status.success());
    let e = err_text(&o);
    assert!(!e.contains("waiting up to"), "{e}");
    // "held it for N s": 1 on an idle machine, more when the looks run late.
    let said = format!(
        "the layer is in use: another process (pid {}, {name}) is writing it; stop that first (it has held it for ",
        holder.id()
    );
    let held = e.split_once(&said).map(|(_, rest)| rest);
    let secs = held.and_then(|r| r.split_once(" s and is not exiting)"));
    assert!(
        secs.is_some_and(|(n, _)| n
            .parse::<u64>()
            .is_ok_and(|n| n >= 1 && n <= took.as_secs())),
        "{e}"
    );
    assert!(took >= blockdev::lsmt::CLAIM_NOTICE_AFTER, "{took:?}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    assert!(!d.join("out").exists());
}

/// A claim inherited by a child of the process that took it, which then
/// exited (as a server that forked, or here `flock(1)` on a shell's
/// descriptor): `/proc/locks` still names the dead process, the child holds
/// the lock. The child is found through its open files, named, and (idle)
/// not waited for.
#[test]
fn a_commit_names_the_child_that_inherited_the_claim() {
    // flock(1) takes the lock on the shell's descriptor and exits; the shell
    // (then sleep) keeps it.
    commit_fails_naming_idle_holder(None, |d| {
        let sh = testutil::INHERITED_FLOCK_SH;
        (testutil::locked_holder(d, "sh", &["-c", sh]), "sleep")
    });
}

/// A holder running as another user (a server started by root, the commit
/// run by a user who may read the layer): its open files are not the
/// commit's to look at, so the process `/proc/locks` records is taken at
/// its word, named, and (idle) not waited for.
#[test]
fn a_commit_names_a_holder_of_another_user() {
    commit_fails_naming_idle_holder(Some(65533), |d| {
        let code = python_lock_code("time.sleep(60)\n");
        let args = [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3", // not a shim under /root: nobody may run it
            "-c",
            &code,
        ];
        (testutil::locked_holder(d, "setpriv", &args), "python3")
    });
}

/// A holder the commit cannot see (outside its pid namespace, as a server on
/// the host is to a tool run in a container): `/proc/locks` does not list
/// it (older kernels list it as pid 0) and no process the commit can look
/// at holds the lock. Nothing says it runs on, so the commit waits its full
/// 10 s although the holder is idle, says after a second that it waits for
/// a process not visible here, and its error says so too and lists the
/// tools that may hold a layer.
#[test]
fn a_commit_waits_for_a_holder_outside_its_pid_namespace_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let mut holder = python_holder(d, "time.sleep(60)\n");
    let ns = ["--pid", "--fork", "--mount-proc"];
    let (o, took) = run_in_namespaces(d, &ns, "exec \"$COMMIT\" data index out").unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(!o.status.success());
    let e = err_text(&o);
    assert!(
        e.contains(
            "overlaybd-commit: waiting up to 10 s for data: in use by another process not \
             visible here (in another pid namespace: on the host or in another container; or \
             on another machine) ...\n"
        ),
        "{e}"
    );
    assert!(
        e.contains(
            "data: the layer is in use: another process not visible here (in another pid \
             namespace: on the host or in another container; or on another machine) is writing it (an overlaybd-nbd, \
             overlaybd-fuse, overlaybd-apply or overlaybd-commit); stop that first \
             (waited 10 s for it to let go)"
        ),
        "{e}"
    );
    assert!(!e.contains("(pid "), "{e}");
    assert!(took >= std::time::Duration::from_secs(10), "{took:?}");
    assert!(!d.join("out").exists());
}

/// Runs `script` with `sh` in `d` under `unshare` with `ns` (new
/// namespaces: "--pid --fork --mount-proc", "--mount"), `$CREATE`, `$COMMIT`
/// and `$HOLD` (Python code that claims `data`, says so and sleeps) in its
/// environment. Returns its output and how long it took, or `None`, said on
/// stderr, when the script exits with 77 (something it needs, a mount, is
/// not available here).
fn run_in_namespaces(d: &Path, ns: &[&str], script: &str) -> Option<(Output, std::time::Duration)> {
    let start = std::time::Instant::now();
    let o = Command::new("unshare")
        .args(ns)
        .args(["sh", "-c", script])
        .env("CREATE", CREATE)
        .env("COMMIT", COMMIT)
        .env("HOLD", python_lock_code("time.sleep(60)\n"))
        .current_dir(d)
        .output()
        .expect("spawn unshare");
    let took = start.elapsed();
    if o.status.code() == Some(77) {
        testutil::skip(err_text(&o).trim_end());
        return None;
    }
    Some((o, took))
}

/// The commit's error names an idle holder `name` (pid not known here) and
/// came before the wait's 10 s, without a notice of waiting.
fn assert_names_idle_holder(o: &Output, took: std::time::Duration, name: &str) {
    assert!(!o.status.success());
    let e = err_text(o);
    assert!(!e.contains("waiting up to"), "{e}");
    assert!(!e.contains("not visible here"), "{e}");
    let said = format!(", {name}) is writing it; stop that first (it has held it for ");
    assert!(
        e.contains("data: the layer is in use: another process (pid ") && e.contains(&said),
        "{e}"
    );
    assert!(took < std::time::Duration::from_secs(9), "{took:?}");
}

/// In a pid namespace of its own (a container), a claim inherited by a child
/// of the process that took it, which then exited, is not listed in
/// `/proc/locks` at all (the kernel cannot translate the gone process's
/// pid), though the child is in the namespace: it is found through its open
/// files and named, not said to be "not visible here" and waited for.
#[test]
fn a_commit_in_a_pid_namespace_names_the_child_that_inherited_the_claim() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&run(CREATE, &["-s", "data", "index", "1"], d));
    let script = format!(
        "sh -c '{}' &\n\
         until ! flock -n data true; do sleep 0.05; done\n\
         exec \"$COMMIT\" data index out\n",
        testutil::INHERITED_FLOCK_SH
    );
    let ns = ["--pid", "--fork", "--mount-proc"];
    let (o, took) = run_in_namespaces(d, &ns, &script).unwrap();
    assert_names_idle_holder(&o, took, "sleep");
    assert!(!d.join("out").exists());
}

/// `/proc/locks` keys a lock by the device of the file system's superblock,
/// which is not `stat`'s device on btrfs (each subvolume has its own) nor
/// on an overlayfs over two file systems (here two tmpfs, in a mount
/// namespace of the test's own): the holder is found all the same, named,
/// and (idle) not waited for, rather than said to be "not visible here".
#[test]
fn a_commit_names_the_holder_of_a_layer_on_an_overlayfs() {
    let dir = tempfile::tempdir().unwrap();
    let script = "mkdir lower upper m\n\
        mount -t tmpfs tmpfs lower && mount -t tmpfs tmpfs upper && \
        mkdir upper/u upper/w && \
        mount -t overlay overlay -o lowerdir=lower,upperdir=upper/u,workdir=upper/w m \
        || { echo 'no overlayfs of two tmpfs here' >&2; exit 77; }\n\
        set -e\n\
        cd m\n\
        \"$CREATE\" -s data index 1 >/dev/null\n\
        python3 -c \"$HOLD\" >/dev/null &\n\
        until ! flock -n data true; do sleep 0.05; done\n\
        set +e\n\
        \"$COMMIT\" data index out\n\
        rc=$?\n\
        test ! -e out || { echo 'out was made' >&2; exit 3; }\n\
        kill $!\n\
        exit $rc\n";
    let Some((o, took)) = run_in_namespaces(dir.path(), &["--mount"], script) else {
        return;
    };
    assert_names_idle_holder(&o, took, "python3");
}

/// A holder whose main thread sleeps while another of its threads works (a
/// server flushing the layer on a worker before it exits) is busy: it is
/// waited for, not failed after a second and a half.
#[test]
fn a_commit_waits_for_a_holder_busy_on_another_thread() {
    commit_waits_for_busy_holder(
        "import threading\n\
         def spin():\n\
         \x20   end = time.monotonic() + 2.5\n\
         \x20   while time.monotonic() < end: pass\n\
         t = threading.Thread(target=spin)\n\
         t.start()\n\
         t.join()\n",
    );
}
