//! `--engine kernel` of overlaybd-create / overlaybd-apply: a layer made by
//! mkfs.ext4 and the kernel's ext4 through FUSE and a loop device, read back
//! through our stack reader; Ctrl-C and a non-root user. Needs root (CI
//! runs as root); fails, not skips, without it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testutil::{assert_ok, err_text};

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_overlaybd-apply");

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "--engine kernel mounts FUSE, loop devices and ext4: run this test as root (CI does)"
    );
}

/// A small layer: files, a directory, a symlink, a hard link, xattrs.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o4755
        });
        h.set_uid(1000);
        h.set_gid(70000);
        h.set_mtime(1_600_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"", None);
    add(
        "etc/hosts",
        tar::EntryType::Regular,
        b"127.0.0.1 localhost\n",
        None,
    );
    add("bin/", tar::EntryType::Directory, b"", None);
    add(
        "bin/tool",
        tar::EntryType::Regular,
        &vec![7u8; 300_000],
        None,
    );
    add("bin/tool2", tar::EntryType::Link, b"", Some("bin/tool"));
    add("bin/sh", tar::EntryType::Symlink, b"", Some("tool"));
    b.into_inner().unwrap()
}

fn tree_of_tar(d: &Path, tar: &[u8]) -> PathBuf {
    let t = d.join("layer.tar");
    std::fs::write(&t, tar).unwrap();
    let out = d.join("ref.json");
    std::fs::write(&out, testutil::treecmp(&["reference", t.to_str().unwrap()])).unwrap();
    out
}

#[test]
fn create_and_apply_with_the_kernel_engine() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("tmp");
    std::fs::create_dir(&work).unwrap();
    let data = d.join("data");
    let index = d.join("index");
    assert_ok(
        &Command::new(CREATE)
            .args([
                data.to_str().unwrap(),
                index.to_str().unwrap(),
                "1",
                "-s",
                "--mkfs",
            ])
            .args(["--engine", "kernel", "--mkfs-options", "-L cli-made"])
            .env("TMPDIR", &work)
            .output()
            .unwrap(),
    );
    let cfg = d.join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"lowers": [], "upper": {{"data": "{}", "index": "{}"}}, "resultFile": "{}"}}"#,
            data.display(),
            index.display(),
            d.join("result").display()
        ),
    )
    .unwrap();
    let tar = layer();
    let mut c = Command::new(APPLY)
        .args(["--engine", "kernel", "--mount-options", "noatime", "-"])
        .arg(&cfg)
        .env("TMPDIR", &work)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(&tar).unwrap();
    let out = c.wait_with_output().unwrap();
    assert_ok(&out);
    assert_eq!(
        std::fs::read_to_string(d.join("result")).unwrap(),
        "success"
    );

    let flat = d.join("flat.img");
    blockdev::Stack::open_read_only(&[], Some((&data, &index)))
        .unwrap()
        .write_raw_image(&flat)
        .unwrap();
    if let Err(e) = testutil::e2fsck(&flat) {
        panic!("e2fsck -fn: {e}");
    }
    let dump = testutil::run_ok(
        Command::new(testutil::tool("dumpe2fs"))
            .arg("-h")
            .arg(&flat),
    );
    assert!(String::from_utf8_lossy(&dump.stdout).contains("cli-made"));
    let got = d.join("got.json");
    std::fs::write(&got, testutil::treecmp(&["image", flat.to_str().unwrap()])).unwrap();
    let want = tree_of_tar(d, &tar);
    testutil::treecmp(&["compare", want.to_str().unwrap(), got.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work dir left"
    );

    // Engine options without the kernel engine are refused.
    let out = Command::new(APPLY)
        .args(["--mkfs-options", "-I 512", "--raw", "-"])
        .arg(&flat)
        .output()
        .unwrap();
    assert!(err_text(&out).contains("need --engine kernel"));
}

/// Nothing of the engine left below `work`.
fn assert_nothing_left(work: &Path) {
    let w = work.to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(w), "mounts left behind:\n{mounts}");
    let out = testutil::run_ok(Command::new("losetup").args(["-l", "-n", "-O", "BACK-FILE"]));
    let loops = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!loops.contains(w), "loop devices left behind:\n{loops}");
    assert_eq!(std::fs::read_dir(work).unwrap().count(), 0, "work dir left");
}

#[test]
fn ctrl_c_mid_apply_unmounts_everything() {
    testutil::default_stop_signals();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("tmp");
    std::fs::create_dir(&work).unwrap();
    let img = d.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mut c = Command::new(APPLY)
        .args(["--verbose", "--engine", "kernel", "--mkfs", "--raw", "-"])
        .arg(&img)
        .env("TMPDIR", &work)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Half a layer, then the stream stalls as a slow download would.
    let tar = layer();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(&tar[..tar.len() / 2]).unwrap();
    let mut err = BufReader::new(c.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("overlaybd-apply ended before mounting:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains("mounted at") {
            break;
        }
    }
    assert!(std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(work.to_str().unwrap()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    // Close the stream only once the signal is seen, so that the end of
    // the input is not mistaken for the cause of the stop.
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains("stopping") {
            break;
        }
    }
    drop(stdin);
    let status = c.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    seen.push_str(&rest);
    // 128 + SIGINT, as the libext2fs engine and the other tools.
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
    assert!(!seen.contains("panicked"), "{seen}");
    assert_nothing_left(&work);
}

#[test]
fn a_non_root_user_is_told_what_is_missing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", APPLY])
        .args(["--engine", "kernel", "--raw", "-"])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = err_text(&out);
    assert!(
        e.contains("needs root") && e.contains("--engine libext2fs"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}
