//! `--engine kernel` of overlaybd-create / overlaybd-apply: a layer made by
//! mkfs.ext4 and the kernel's ext4 through FUSE and a loop device, read back
//! through our stack reader; Ctrl-C and a non-root user. Needs root (CI
//! runs as root); fails, not skips, without it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
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

/// The `watchdog PID watches DIR` debug line of a run: the watchdog's pid.
fn watchdog_pid(log: &str) -> Option<i32> {
    log.lines().find_map(|l| {
        l.split_once("watchdog ")?
            .1
            .split_once(" watches ")?
            .0
            .parse()
            .ok()
    })
}

/// Whether `pid` is (still) a kernel-engine watchdog.
fn is_watchdog(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with(obdkernel::watchdog::ARG0.as_bytes()))
}

/// What of a kernel-engine run is still set up below `work`: mounts, loop
/// devices backed by a file there, entries. Empty when nothing is.
fn leftovers(work: &Path) -> Vec<String> {
    let w = work.to_str().unwrap();
    let mut left: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(w))
        .map(|l| format!("mount: {l}"))
        .collect();
    for d in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = std::fs::read_to_string(d.path().join("loop/backing_file")) {
            if b.contains(w) {
                left.push(format!("loop device {:?} on {}", d.file_name(), b.trim()));
            }
        }
    }
    for e in std::fs::read_dir(work).unwrap().flatten() {
        left.push(format!("entry: {}", e.path().display()));
    }
    left
}

/// The loop devices backed by a file below `work` (sysfs names).
fn loops_below(work: &Path) -> Vec<std::ffi::OsString> {
    let w = work.to_str().unwrap();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|d| {
            std::fs::read_to_string(d.path().join("loop/backing_file")).is_ok_and(|b| b.contains(w))
        })
        .map(|d| d.file_name())
        .collect()
}

/// Of the loop devices `names` (once backed by the disk file below `work`),
/// those still bound to it: by its path, or, once the FUSE mount it is on was
/// detached (`umount -l`), by the path sysfs gives a file on a detached
/// mount, `/disk` (which [`leftovers`] cannot tell from another file).
fn still_bound(names: &[std::ffi::OsString], work: &Path) -> Vec<String> {
    let w = work.to_str().unwrap();
    // The disk file is `disk` at the root of the FUSE mount.
    let detached = "/disk";
    names
        .iter()
        .filter_map(|n| {
            let p = Path::new("/sys/block").join(n).join("loop/backing_file");
            let b = std::fs::read_to_string(p).ok()?;
            let b = b.trim_end_matches('\n');
            (b.contains(w) || b == detached).then(|| format!("loop device {n:?} on {b}"))
        })
        .collect()
}

/// A tar of one directory and `files` files of `mib` MiB each (data that
/// does not compress, so that it goes to the disk), written to `to` as it
/// is made.
fn write_big_layer(to: &mut dyn Write, files: usize, mib: usize) -> std::io::Result<()> {
    let mut b = tar::Builder::new(to);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "big/", &[][..])?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..files {
        let mut data = vec![0u8; mib << 20];
        for c in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("big/f{i}"), &data[..])?;
    }
    b.into_inner().map(|_| ())
}

/// SIGKILL a kernel-engine `overlaybd-apply` once `ready` says so (given
/// its pid and the log so far), then: the run is reaped, and within a
/// bound its watchdog has taken down the FUSE and ext4 mounts and the loop
/// device, removed the work directory and exited. The time that took.
fn kill_and_expect_the_watchdog_to_clean_up(
    env: &[(&str, std::ffi::OsString)],
    feed: impl FnOnce(std::process::ChildStdin) -> Option<std::process::ChildStdin> + Send + 'static,
    ready: impl Fn(i32, &str) -> bool,
) -> std::time::Duration {
    kill_with_and_expect_the_watchdog_to_clean_up(env, feed, ready, |pid| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    })
}

/// [`kill_and_expect_the_watchdog_to_clean_up`], the run (the leader of a
/// process group of its own) killed by `kill` (given its pid) instead of a
/// SIGKILL.
fn kill_with_and_expect_the_watchdog_to_clean_up(
    env: &[(&str, std::ffi::OsString)],
    feed: impl FnOnce(std::process::ChildStdin) -> Option<std::process::ChildStdin> + Send + 'static,
    ready: impl Fn(i32, &str) -> bool,
    kill: impl FnOnce(i32),
) -> std::time::Duration {
    use std::time::{Duration, Instant};
    require_root();
    // The run dies of the signals it does not take (a hangup): not inherited
    // ignored (CI under `nohup`).
    testutil::default_stop_signals();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("tmp");
    std::fs::create_dir(&work).unwrap();
    let img = d.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let mut c = Command::new(APPLY)
        .args(["--verbose", "--engine", "kernel", "--mkfs", "--raw", "-"])
        .arg(&img)
        .env("TMPDIR", &work)
        .env("RUST_LOG", "debug,fuser=warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = c.id() as i32;
    let stdin = c.stdin.take().unwrap();
    // What `feed` gives back stays open until the end of the test.
    let feeder = std::thread::spawn(move || feed(stdin));
    // The log, read on a thread: the watchdog keeps stderr open until it is
    // done, so its end is not the run's end.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let err = c.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let start = Instant::now();
    loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(20)) {
            seen.push_str(&line);
            seen.push('\n');
        }
        if ready(pid, &seen) {
            break;
        }
        assert!(
            c.try_wait().unwrap().is_none(),
            "overlaybd-apply ended before it was killed:\n{seen}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "overlaybd-apply never got ready to be killed:\n{seen}"
        );
    }
    let watchdog = watchdog_pid(&seen).unwrap_or_else(|| panic!("no watchdog started:\n{seen}"));
    assert!(is_watchdog(watchdog), "{seen}");
    assert!(!leftovers(&work).is_empty(), "nothing was set up:\n{seen}");
    let loops = loops_below(&work);
    kill(pid);
    let killed = Instant::now();
    let bound = Duration::from_secs(30);
    let mut status = None;
    let mut left = leftovers(&work);
    while killed.elapsed() < bound {
        if status.is_none() {
            status = c.try_wait().unwrap();
        }
        left = leftovers(&work);
        left.extend(still_bound(&loops, &work));
        if status.is_some() && left.is_empty() && !is_watchdog(watchdog) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    while let Ok(line) = rx.try_recv() {
        seen.push_str(&line);
        seen.push('\n');
    }
    if status.is_none() || !left.is_empty() {
        // A dead FUSE mount would hang the removal of the temporary
        // directory (and a stuck run its feeder): leave both.
        let kept = dir.keep();
        eprintln!(
            "kept {} for scripts/kernel-engine-cleanup.sh",
            kept.display()
        );
    } else {
        // The run is gone: its end of the stream is closed.
        let _ = feeder.join();
    }
    assert!(
        status.is_some(),
        "the killed run was not reaped in {bound:?}:\n{seen}"
    );
    assert!(
        left.is_empty(),
        "left behind after {bound:?}: {left:#?}\n{seen}"
    );
    assert!(
        !is_watchdog(watchdog),
        "the watchdog is still there:\n{seen}"
    );
    eprintln!("cleaned up {took:?} after SIGKILL");
    took
}

#[test]
fn sigkill_mid_apply_is_cleaned_up_by_the_watchdog() {
    // Half a layer, then the stream stalls: the run is mid-apply, the ext4
    // mounted, when it is killed.
    kill_and_expect_the_watchdog_to_clean_up(
        &[],
        |mut stdin| {
            let tar = layer();
            let _ = stdin.write_all(&tar[..tar.len() / 2]);
            Some(stdin)
        },
        |_, log| log.contains("mounted at"),
    );
}

/// Whether a thread of `pid` waits in state D for the writeback of the
/// ext4 (the unmount at the end of the layer syncs it through the loop
/// device and FUSE).
fn waiting_for_writeback(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let in_d = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('D'));
            in_d && std::fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.starts_with("wb_wait"))
        })
}

#[test]
fn sigkill_while_writing_back_is_cleaned_up_by_the_watchdog() {
    // A layer of incompressible data: the run is killed while its unmount
    // waits for the writeback, which without the watchdog leaves it stuck
    // in state D for good (its FUSE server died with it).
    kill_and_expect_the_watchdog_to_clean_up(
        &[],
        |mut stdin| {
            let _ = write_big_layer(&mut stdin, 24, 32);
            None
        },
        |pid, _| waiting_for_writeback(pid),
    );
}

/// A terminal's hangup (SIGHUP to its foreground process group, which the
/// run does not take: it dies at once, everything set up) that comes while
/// the watchdog starts, before it could leave the run's process group: it
/// must not end the watchdog too. A preloaded library holds the watchdog for
/// 3 s before its `main` (as a loaded machine may hold an exec), and says so.
#[test]
fn a_hangup_while_the_watchdog_starts_is_cleaned_up_by_it() {
    require_root();
    let lib = tempfile::tempdir().unwrap();
    let src = lib.path().join("hold.c");
    std::fs::write(
        &src,
        format!(
            r#"#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void hold(int argc, char **argv, char **envp) {{
    const char *mark = getenv("HOLD_MARK");
    (void)envp;
    if (argc < 1 || !mark || strcmp(argv[0], "{arg0}") != 0) return;
    int fd = open(mark, O_CREAT | O_EXCL | O_WRONLY, 0644);
    if (fd < 0) return;
    close(fd);
    sleep(3);
}}
"#,
            arg0 = obdkernel::watchdog::ARG0
        ),
    )
    .unwrap();
    let so = lib.path().join("hold.so");
    testutil::run_ok(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&so)
            .arg(&src),
    );
    let mark = lib.path().join("held");
    let held = mark.clone();
    kill_with_and_expect_the_watchdog_to_clean_up(
        &[("LD_PRELOAD", so.into()), ("HOLD_MARK", mark.into())],
        |mut stdin| {
            let tar = layer();
            let _ = stdin.write_all(&tar[..tar.len() / 2]);
            Some(stdin)
        },
        move |_, log| held.exists() && watchdog_pid(log).is_some(),
        |pid| {
            nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap()
        },
    );
}

/// The real `losetup` (the first in PATH).
fn real_losetup() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("losetup"))
        .find(|p| p.is_file())
        .expect("losetup is not in PATH")
}

#[test]
fn sigkill_while_losetup_attaches_leaves_no_loop_device() {
    // The run's `losetup --find --show DISK` outlives the run: one that
    // opened the disk file before the kill attaches a loop device to it
    // after the kill. This one (a stand-in that holds the file open and
    // attaches it 3 s later, as a slow losetup on a loaded machine would)
    // is what the watchdog must wait for before its last look.
    let fake = tempfile::tempdir().unwrap();
    let script = fake.path().join("losetup");
    std::fs::write(
        &script,
        format!(
            r#"#!/usr/bin/env python3
import fcntl, os, sys, time
a = sys.argv[1:]
if a[:2] == ["--find", "--show"]:
    fd = os.open(a[2], os.O_RDWR)
    open(os.path.join(os.environ["FAKE_DIR"], "opened"), "w").close()
    time.sleep(3)
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    dev = "/dev/loop%d" % fcntl.ioctl(ctl, 0x4C82)  # LOOP_CTL_GET_FREE
    lfd = os.open(dev, os.O_RDWR)
    fcntl.ioctl(lfd, 0x4C00, fd)  # LOOP_SET_FD
    os.close(lfd)
    try:
        os.close(fd)  # the flush fails on the aborted FUSE connection
    except OSError:
        pass
    with open(os.path.join(os.environ["FAKE_DIR"], "attached.tmp"), "w") as f:
        f.write(dev)
    os.rename(f.name, os.path.join(os.environ["FAKE_DIR"], "attached"))
    print(dev)  # to the dead run: a broken pipe
    sys.exit(0)
os.execv({real:?}, ["losetup"] + a)
"#,
            real = real_losetup().to_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut path = std::ffi::OsString::from(fake.path());
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let opened = fake.path().join("opened");
    kill_and_expect_the_watchdog_to_clean_up(
        &[("PATH", path), ("FAKE_DIR", fake.path().into())],
        |mut stdin| {
            let _ = stdin.write_all(&layer());
            Some(stdin)
        },
        move |_, _| opened.exists(),
    );
    // The stand-in attaches 3 s after the kill; give it time.
    let attached = fake.path().join("attached");
    let start = std::time::Instant::now();
    while !attached.exists() && start.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dev = std::fs::read_to_string(&attached).expect("the stand-in losetup never attached");
    let name = Path::new(dev.trim()).file_name().unwrap().to_owned();
    let backing = Path::new("/sys/block")
        .join(&name)
        .join("loop/backing_file");
    if let Ok(b) = std::fs::read_to_string(&backing) {
        let _ = Command::new("losetup").arg("-d").arg(dev.trim()).status();
        panic!(
            "{} was left attached to {} after the watchdog cleaned up",
            dev.trim(),
            b.trim()
        );
    }
}

#[test]
fn a_normal_run_leaves_no_watchdog_behind() {
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
    c.stdin.take().unwrap().write_all(&layer()).unwrap();
    // The output ends when the run and its watchdog have both closed it.
    let out = c.wait_with_output().unwrap();
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    let watchdog = watchdog_pid(&log).unwrap_or_else(|| panic!("no watchdog started:\n{log}"));
    assert!(!is_watchdog(watchdog), "watchdog {watchdog} left running");
    assert!(!log.contains("overlaybd-kernel-watchdog:"), "{log}");
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
}

/// A run in a PID namespace of its own whose /proc is still the parent
/// namespace's (`unshare --pid --fork` without `--mount-proc`, as some
/// sandboxes start jobs): its pid (what `getppid` gives its watchdog) is
/// another process's number in /proc, or none. Its watchdog must not take
/// it for dying: it took down the FUSE mount under the live run ("mkfs.ext4
/// ... does not exist", then a 5 s wait for the watchdog at the end).
#[test]
fn a_run_in_a_pid_namespace_without_its_own_proc_is_left_alone() {
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
    // The run's pid in its namespace: a number no process has in /proc.
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = (max - 2000..max - 1000)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    // Not the last command of the script: sh forks it (an exec would make
    // it the namespace's pid 1).
    let script = r#"echo "$1" > /proc/sys/kernel/ns_last_pid || exit 1; shift; "$@"; exit $?"#;
    let mut c = Command::new("unshare")
        .args(["--pid", "--fork", "sh", "-c", script, "sh"])
        .arg((pid - 1).to_string())
        .args([APPLY, "--engine", "kernel", "--mkfs", "--raw", "-"])
        .arg(&img)
        .env("TMPDIR", &work)
        .env("RUST_LOG", "debug,fuser=warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A run that failed early closed its end: its log says why.
    let _ = c.stdin.take().unwrap().write_all(&layer());
    let out = c.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_ok(&out);
    assert!(watchdog_pid(&log).is_some(), "no watchdog started:\n{log}");
    assert!(!log.contains("overlaybd-kernel-watchdog:"), "{log}");
    assert!(!log.contains("did not exit"), "{log}");
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
}

/// Start a watchdog for `dir` as the engine does (the tool again, as
/// [`obdkernel::watchdog::ARG0`], told its run's pid), from a shell that
/// then dies of SIGKILL having told it nothing; what the watchdog said.
fn watchdog_of_a_killed_shell(dir: &Path) -> String {
    let script = format!(
        r#"( export {env}=$$; exec -a {arg0} "$0" "$1" ) & sleep 0.2; kill -9 $$"#,
        env = obdkernel::watchdog::ENV,
        arg0 = obdkernel::watchdog::ARG0
    );
    let c = Command::new("bash")
        .args(["-c", &script, APPLY])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The output ends when the shell and the watchdog have both exited.
    let out = testutil::output_within(c, std::time::Duration::from_secs(60));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A watchdog whose run died with nothing of it set up has nothing to say;
/// one that found only the work directory says that it removed it, not
/// that it took down mounts.
#[test]
fn the_watchdog_says_what_it_took_down() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().canonicalize().unwrap();
    let said = watchdog_of_a_killed_shell(&work.join("overlaybd-kernel-none"));
    assert_eq!(said, "", "the watchdog spoke with nothing set up");
    let w = work.join("overlaybd-kernel-empty");
    for d in [w.clone(), w.join("disk"), w.join("root")] {
        std::fs::create_dir(d).unwrap();
    }
    let said = watchdog_of_a_killed_shell(&w);
    assert!(!w.exists(), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("removed the directory"), "{said}");
    for word in ["abort", "unmount", "detach", "cleaned"] {
        assert!(!said.contains(word), "{said}");
    }
}

/// `big.tar` (two files of 32 MiB) and a `config.json` whose upper is
/// `UPPER_DIR/data` and `UPPER_DIR/index`, in `d`.
fn big_layer_and_config(d: &Path, upper_dir: &str) {
    let mut tar = std::fs::File::create(d.join("big.tar")).unwrap();
    write_big_layer(&mut tar, 2, 32).unwrap();
    drop(tar);
    std::fs::write(
        d.join("config.json"),
        format!(
            r#"{{"lowers": [], "upper": {{"data": "{upper_dir}/data", "index": "{upper_dir}/index"}}}}"#
        ),
    )
    .unwrap();
}

/// `prlimit LIMIT ARGS...` in `d`, with the kernel engine's work directory
/// `d/tmp` (made here, returned) and without RUST_LOG: its exit code and
/// stderr.
fn under_limit(d: &Path, limit: &str, args: &[&str]) -> (Option<i32>, String, PathBuf) {
    let work = d.join("tmp");
    std::fs::create_dir(&work).unwrap();
    let out = Command::new("prlimit")
        .arg(limit)
        .args(args)
        .current_dir(d)
        .env("TMPDIR", &work)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (out.status.code(), err_text(&out), work)
}

/// The lines of `e` saying `error:`.
fn error_lines(e: &str) -> Vec<&str> {
    e.lines().filter(|l| l.contains("error:")).collect()
}

/// A full disk under the upper layer (here a 40 MiB tmpfs, in a mount
/// namespace of the test's own) fails a kernel-engine apply with its one
/// error line; the FUSE server says the first failed request and how many
/// more failed, not one line each (there were dozens).
#[test]
fn a_full_disk_under_the_kernel_engine_is_said_in_a_few_lines() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_layer_and_config(d, "x");
    std::fs::create_dir(d.join("x")).unwrap();
    let script = "mount -t tmpfs -o size=40M tmpfs x \
        || { echo 'no tmpfs mount here' >&2; exit 77; }\n\
        \"$CREATE\" x/data x/index 64 --mkfs >/dev/null || exit 3\n\
        mkdir x/tmp && TMPDIR=$PWD/x/tmp exec \"$APPLY\" --engine kernel big.tar config.json\n";
    let o = Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .env("CREATE", CREATE)
        .env("APPLY", APPLY)
        .env_remove("RUST_LOG")
        .current_dir(d)
        .output()
        .unwrap();
    let e = err_text(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let errors = error_lines(&e);
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("No space left on device"), "{e}");
    assert!(e.lines().count() <= 3, "{e}");
    assert!(e.contains("more device requests failed"), "{e}");
}

/// Under a file size limit (`ulimit -f`, which some CI sandboxes set)
/// smaller than the disk, the mkfs.ext4 the kernel engine runs (with this
/// limit: it inherits it) fails with "File too large": the error names the
/// limit, as the tools' own do.
#[test]
fn a_file_size_limit_under_the_kernel_engine_mkfs_is_named() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (code, e, work) = under_limit(
        dir.path(),
        "--fsize=50000000",
        &[CREATE, "data", "index", "1", "--mkfs", "--engine", "kernel"],
    );
    assert_eq!(code, Some(1), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("mkfs.ext4") && e.contains("File too large"),
        "{e}"
    );
    assert!(
        e.contains("file size limit (ulimit -f) of 50000000 bytes"),
        "{e}"
    );
    assert_nothing_left(&work);
}

/// Under a file size limit smaller than what a layer writes (a file of the
/// layer itself, or the upper layer's data the FUSE server writes), the run
/// fails with "File too large", and the error names the limit (it said only
/// "File too large").
#[test]
fn a_file_size_limit_under_the_kernel_engine_upper_is_named() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_layer_and_config(d, ".");
    testutil::run_ok(
        Command::new(CREATE)
            .args(["data", "index", "64", "--mkfs"])
            .current_dir(d),
    );
    let (code, e, work) = under_limit(
        d,
        "--fsize=20000000",
        &[APPLY, "--engine", "kernel", "big.tar", "config.json"],
    );
    assert_eq!(code, Some(1), "{e}");
    let errors = error_lines(&e);
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("File too large")
            && errors[0].contains("file size limit (ulimit -f) is 20000000 bytes"),
        "{e}"
    );
    assert_nothing_left(&work);
}

/// Out of file descriptors (`ulimit -n 8`), the kernel engine is available
/// all the same: the error says that the run ran out of them, the limit and
/// how to raise it, not "the kernel engine is not available".
#[test]
fn too_few_file_descriptors_are_not_an_unavailable_engine() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (code, e, work) = under_limit(
        dir.path(),
        "--nofile=8",
        &[
            CREATE, "data", "index", "1", "--mkfs", "-s", "--engine", "kernel",
        ],
    );
    assert_eq!(code, Some(1), "{e}");
    assert!(!e.contains("not available"), "{e}");
    let error = e.lines().find(|l| l.contains("error:")).unwrap_or_default();
    assert!(
        error.contains("Too many open files")
            && error.contains("ulimit -n")
            && error.contains(" 8"),
        "{e}"
    );
    assert_nothing_left(&work);
}
