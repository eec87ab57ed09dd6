//! Shutdown and failure behaviour with the real kernel FUSE: signals and
//! `fusermount -u` unmount and exit 0, a busy mount is detached and served
//! until released, a killed daemon leaves a mountpoint `fusermount -u`
//! recovers, and clients get errno values, never a hang.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn layers_args(layers: &[std::path::PathBuf]) -> Vec<&std::ffi::OsStr> {
    layers.iter().map(|p| p.as_os_str()).collect()
}

#[test]
fn sigterm_and_sigint_unmount_and_exit_zero() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mp = t.path().join(format!("mp-{sig}"));
        let mut f = Fuse::foreground(&layers_args(&layers), &mp);
        assert_eq!(std::fs::metadata(f.disk()).unwrap().len(), 64 << 30);
        kill(Pid::from_raw(f.pid()), sig).unwrap();
        let o = f.wait();
        assert_ok(&o);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(&format!("stopped by {sig}")), "{out}");
        assert!(!is_mounted(&mp), "{sig} left {} mounted", mp.display());
    }
}

/// A stop signal the daemon was started with ignored stays ignored: SIGHUP
/// under `nohup` (the terminal closing must not unmount) and SIGINT in a
/// script's background job. The mount keeps serving; SIGTERM still stops it.
#[test]
fn signals_started_ignored_stay_ignored() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    for (ignored, sig) in [("HUP", Signal::SIGHUP), ("INT", Signal::SIGINT)] {
        let mp = t.path().join(format!("mp-{sig}"));
        let mut f = Fuse::foreground_ignoring(ignored, &layers_args(&layers), &mp);
        kill(Pid::from_raw(f.pid()), sig).unwrap();
        // A daemon that took the signal has unmounted well within this.
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(is_mounted(&mp), "{sig} unmounted though ignored");
        assert_eq!(std::fs::metadata(f.disk()).unwrap().len(), 64 << 30);
        kill(Pid::from_raw(f.pid()), Signal::SIGTERM).unwrap();
        let o = f.wait();
        assert_ok(&o);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("stopped by SIGTERM"), "{out}");
        assert!(!is_mounted(&mp));
    }
}

#[test]
fn fusermount_u_stops_the_daemon_with_status_zero() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mut f = Fuse::foreground(&layers_args(&layers), &t.path().join("mp"));
    f.unmount();
    let o = f.wait();
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("unmounted"));
}

#[test]
fn busy_mount_is_detached_on_sigterm_and_served_until_released() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&layers_args(&layers), &mp);
    let disk = File::open(f.disk()).unwrap();
    let mut sb = [0u8; 2];
    kill(Pid::from_raw(f.pid()), Signal::SIGTERM).unwrap();
    // The open file keeps the (now detached) mount alive and readable:
    // reading the ext4 magic blocks until the daemon answers.
    disk.read_exact_at(&mut sb, 1024 + 56).unwrap();
    assert_eq!(u16::from_le_bytes(sb), 0xEF53);
    // Wait (without a timer) for the detach: the daemon's stderr says it.
    let mut err = String::new();
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(f.child.as_mut().unwrap().stderr.take().unwrap());
    while !err.contains("detached") {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "no detach message: {err}");
        err.push_str(&l);
    }
    assert!(!is_mounted(&mp), "still mounted after the detach");
    disk.read_exact_at(&mut sb, 1024 + 56).unwrap();
    assert_eq!(u16::from_le_bytes(sb), 0xEF53);
    drop(disk);
    let o = f.wait();
    // The daemon's stderr was taken above: what it said after the detach is in `r`.
    use std::io::Read;
    let _ = r.read_to_string(&mut err);
    assert!(
        o.status.success(),
        "the daemon failed ({}) after the detach:\n{err}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A broken stderr (a `| tee` ended by the same Ctrl-C) does not end the
/// signal thread: the busy mount's SIGTERM detaches it (its line cannot be
/// written), and a second SIGTERM still exits at once, while the detached
/// mount is in use. (`eprintln!` panicked in that thread, and the second
/// signal was never taken: the daemon served on.)
#[test]
fn a_broken_stderr_does_not_stop_the_signal_thread() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&layers_args(&layers), &mp);
    // The read end closed: every write to stderr fails with EPIPE.
    drop(f.child.as_mut().unwrap().stderr.take());
    let disk = File::open(f.disk()).unwrap();
    let pid = Pid::from_raw(f.pid());
    kill(pid, Signal::SIGTERM).unwrap();
    let start = std::time::Instant::now();
    while is_mounted(&mp) {
        assert!(start.elapsed().as_secs() < 20, "not detached");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A second request (not a copy of the first: later than obdsignals::TOGETHER).
    std::thread::sleep(std::time::Duration::from_millis(200));
    kill(pid, Signal::SIGTERM).unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "the second SIGTERM did not end the daemon"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(disk);
    assert_eq!(status.code(), Some(143));
}

#[test]
fn killed_daemon_leaves_a_mountpoint_that_fusermount_recovers() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&layers_args(&layers), &mp);
    let disk = File::open(f.disk()).unwrap();
    kill(Pid::from_raw(f.pid()), Signal::SIGKILL).unwrap();
    let pid = f.pid();
    let o = f.wait();
    assert!(!o.status.success());
    // Clients get ENOTCONN, not a hang.
    let mut b = [0u8; 4096];
    let e = disk.read_at(&mut b, 1 << 30).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "pid {pid}: {e}");
    let e = std::fs::read_dir(&mp).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    drop(disk);
    // Mounting again names the fix.
    let o = Command::new(fuse_bin())
        .arg("mount")
        .args(&layers)
        .arg(&mp)
        .output()
        .unwrap();
    let e = err_text(&o);
    assert!(e.contains("fusermount -u"), "{e}");
    // fusermount -u recovers the mountpoint, which mounts again.
    run_ok(Command::new(tool("fusermount")).arg("-u").arg(&mp));
    assert!(!is_mounted(&mp));
    let f = Fuse::background(&layers_args(&layers), &mp);
    assert_eq!(std::fs::metadata(f.disk()).unwrap().len(), 64 << 30);
    f.unmount();
}

#[test]
fn bad_sources_fail_with_one_line_and_mount_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let missing = t.path().join("nope.blob");
    let notdir = t.path().join("file");
    std::fs::write(&notdir, b"x").unwrap();
    let garbage = t.path().join("garbage.blob");
    std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![missing.clone().into(), mp.clone().into()],
            "no such file",
        ),
        // A mistyped relative path is a missing file, not a registry host `layers`.
        (
            vec!["layers/base.lsmt".into(), mp.clone().into()],
            "layers/base.lsmt: no such file",
        ),
        (vec![t.path().into(), mp.clone().into()], "not a layer file"),
        (
            vec![garbage.clone().into(), mp.clone().into()],
            "garbage.blob",
        ),
        (
            vec![fixture_layers()[0].clone().into(), notdir.clone().into()],
            "not a directory",
        ),
        (
            vec![
                format!("oci:{}", t.path().display()).into(),
                mp.clone().into(),
            ],
            "not an OCI image layout",
        ),
        (vec![mp.clone().into()], "mountpoint"),
    ];
    for (args, want) in cases {
        for bg in [false, true] {
            let mut c = Command::new(fuse_bin());
            c.arg("mount");
            if bg {
                c.arg("--background");
            }
            let o = c.args(&args).output().unwrap();
            let e = err_text(&o);
            assert!(e.contains(want), "{args:?}: {e}");
            assert_eq!(e.trim().lines().count(), 1, "{e}");
            assert!(!is_mounted(&mp));
        }
    }
}

/// A second mount on a live FUSE mountpoint is refused (stacked, one
/// `fusermount -u` took both down); the first mount keeps serving.
#[test]
fn a_second_mount_on_a_live_mountpoint_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&layers_args(&layers), &mp);
    let o = Command::new(fuse_bin())
        .arg("mount")
        .args(layers_args(&layers))
        .arg(&mp)
        .output()
        .unwrap();
    let e = err_text(&o);
    assert!(e.contains("already mounted there"), "{e}");
    assert_eq!(std::fs::metadata(f.disk()).unwrap().len(), 64 << 30);
    f.unmount();
    assert_ok(&f.wait());
    assert!(!is_mounted(&mp));
}

/// Mounting over a directory that holds files works (as mount does) but says
/// that they are hidden meanwhile; they are there again after the unmount.
#[test]
fn a_mount_over_files_warns_that_they_are_hidden() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    std::fs::write(mp.join("mine"), b"kept").unwrap();
    let mut f = Fuse::foreground(&layers_args(&layers), &mp);
    assert!(!mp.join("mine").exists());
    f.unmount();
    let o = f.wait();
    assert_ok(&o);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not empty") && e.contains("hidden"), "{e}");
    assert_eq!(std::fs::read(mp.join("mine")).unwrap(), b"kept");
    // An empty mountpoint gets no such warning.
    let empty = t.path().join("empty");
    let mut f = Fuse::foreground(&layers_args(&layers), &empty);
    f.unmount();
    let o = f.wait();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("not empty"));
}

/// Read the daemon's stderr until a line contains `want`; returns what was read.
fn stderr_until(f: &mut Fuse, want: &str) -> String {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(f.child.as_mut().unwrap().stderr.take().unwrap());
    let mut err = String::new();
    while !err.contains(want) {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "no {want:?} in: {err}");
        err.push_str(&l);
    }
    f.child.as_mut().unwrap().stderr = Some(r.into_inner());
    err
}

/// A second signal exits without waiting for a busy mount, but only after
/// saving the upper's index: writes that completed survive (the upper made
/// without `-s`, whose index entries are kept in memory until flushed), and
/// the status says which signal (128 + its number).
#[test]
fn a_second_signal_saves_completed_writes_and_exits_with_128_plus_signal() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let (data, index) = (t.path().join("data"), t.path().join("index"));
    run_ok(
        Command::new(workspace_bin("overlaybd-create"))
            .arg(&data)
            .arg(&index)
            .arg("64"),
    );
    let layers = fixture_layers();
    let mut args = layers_args(&layers);
    args.extend(["--upper".as_ref(), data.as_os_str(), index.as_os_str()]);
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&args, &mp);
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let at = 40u64 << 30;
    {
        let w = File::options().write(true).open(f.disk()).unwrap();
        w.write_all_at(&payload, at).unwrap();
    }
    // An open file keeps the mount busy: the first signal only detaches it.
    let busy = File::open(f.disk()).unwrap();
    kill(Pid::from_raw(f.pid()), Signal::SIGTERM).unwrap();
    stderr_until(&mut f, "detached");
    kill(Pid::from_raw(f.pid()), Signal::SIGTERM).unwrap();
    let o = f.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("completed writes saved"), "{err}");
    drop(busy);

    let mut ro = args.clone();
    ro.insert(0, "--read-only".as_ref());
    let f = Fuse::background(&ro, &t.path().join("ro"));
    let mut back = vec![0u8; payload.len()];
    File::open(f.disk())
        .unwrap()
        .read_exact_at(&mut back, at)
        .unwrap();
    assert!(back == payload, "the completed writes were lost");
    f.unmount();

    // Without an upper there is nothing to save: SIGHUP twice gives 129.
    let mut f = Fuse::foreground(&layers_args(&layers), &t.path().join("mp2"));
    let busy = File::open(f.disk()).unwrap();
    kill(Pid::from_raw(f.pid()), Signal::SIGHUP).unwrap();
    stderr_until(&mut f, "detached");
    kill(Pid::from_raw(f.pid()), Signal::SIGHUP).unwrap();
    let o = f.wait();
    assert_eq!(o.status.code(), Some(128 + libc::SIGHUP));
    drop(busy);
}

/// `cmd`'s output (stdin closed), failing the test when it runs longer than
/// `secs` (it is killed then): [`testutil::output_within`].
#[track_caller]
fn output_within(cmd: &mut Command, secs: u64) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    testutil::output_within(child, std::time::Duration::from_secs(secs))
}

/// A FIFO given as the upper (in every mode), as the config or as a lower
/// that a config names is refused at once, naming it; a `--log` FIFO is
/// never waited for: refused when nothing reads it, used when something does.
#[test]
fn fifos_are_refused_or_used_without_hanging() {
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let fifo = |name: &str| {
        let p = t.path().join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    };
    let (f1, f2, fj) = (fifo("f1"), fifo("f2"), fifo("f.json"));
    let config = t.path().join("c.json");
    std::fs::write(
        &config,
        format!(r#"{{"lowers": [{{"file": "{}"}}]}}"#, f2.display()),
    )
    .unwrap();
    let base = fixture_layers()[0].clone();
    let cases: Vec<(Vec<&std::ffi::OsStr>, String)> = vec![
        (
            vec![
                "--read-only".as_ref(),
                base.as_os_str(),
                "--upper".as_ref(),
                f1.as_os_str(),
                f2.as_os_str(),
            ],
            format!("{}: not a layer file: it is a FIFO", f1.display()),
        ),
        (
            vec![
                base.as_os_str(),
                "--upper".as_ref(),
                f1.as_os_str(),
                f2.as_os_str(),
            ],
            format!("{}: not a layer file: it is a FIFO", f1.display()),
        ),
        (
            vec![fj.as_os_str()],
            format!("{}: not an image config file: it is a FIFO", fj.display()),
        ),
        (
            vec![config.as_os_str()],
            format!("{}: not a layer file: it is a FIFO", f2.display()),
        ),
    ];
    for (args, want) in cases {
        for bg in [false, true] {
            let mut c = Command::new(fuse_bin());
            c.arg("mount");
            if bg {
                c.arg("--background");
            }
            let o = output_within(c.args(&args).arg(&mp), 20);
            let e = err_text(&o);
            assert!(e.contains(&want), "{args:?}: {e}");
            assert!(!is_mounted(&mp));
        }
    }

    // --log FIFO with no reader: refused at once.
    let o = output_within(
        Command::new(fuse_bin())
            .args(["mount", "--background", "--log"])
            .arg(&f1)
            .arg(&base)
            .arg(&mp),
        20,
    );
    let e = err_text(&o);
    assert!(e.contains("no process reads"), "{e}");
    assert!(!is_mounted(&mp));
    // With a reader it gets the daemon's messages.
    let reader = {
        let f1 = f1.clone();
        std::thread::spawn(move || std::fs::read_to_string(f1).unwrap())
    };
    // The reader opens the FIFO in its own time: until then it is refused.
    let f = loop {
        let o = output_within(
            Command::new(fuse_bin())
                .args(["mount", "--background", "--log"])
                .arg(&f1)
                .arg(&base)
                .arg(&mp),
            20,
        );
        if o.status.success() {
            break Fuse {
                mp: mp.clone(),
                child: None,
                ready: String::from_utf8_lossy(&o.stdout).into_owned(),
            };
        }
        assert!(err_text(&o).contains("no process reads"));
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    f.unmount();
    let log = reader.join().unwrap();
    assert!(log.contains("unmounted"), "{log}");
}

/// The daemon's `--log` gets the line saying how the mount ended (at the
/// default log level), as the foreground prints it.
#[test]
fn the_log_file_gets_the_unmount_line() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let log = t.path().join("log");
    for (sig, want) in [
        (None, "unmounted"),
        (Some(Signal::SIGTERM), "stopped by SIGTERM"),
    ] {
        let mp = t.path().join(format!("mp-{}", sig.is_some()));
        let mut args = vec!["--log".as_ref(), log.as_os_str()];
        args.extend(layers_args(&layers));
        let f = Fuse::background(&args, &mp);
        let pid: i32 = f
            .ready
            .split("daemon pid ")
            .nth(1)
            .and_then(|s| s.trim_end_matches([')', '\n']).parse().ok())
            .unwrap_or_else(|| panic!("no daemon pid in {:?}", f.ready));
        match sig {
            None => f.unmount(),
            Some(s) => kill(Pid::from_raw(pid), s).unwrap(),
        }
        // The line is written just before the daemon exits.
        let line = format!(
            "overlaybd-fuse: {} {want}",
            mp.canonicalize().unwrap().display()
        );
        let t0 = std::time::Instant::now();
        let mut text = String::new();
        while !text.lines().any(|l| l == line) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "no {line:?} in the log: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
            text = std::fs::read_to_string(&log).unwrap();
        }
    }
}

/// A failure after the mount was ready (here: the final flush of a
/// writable upper whose filesystem is full) reaches the daemon's `--log` as
/// one error line. The daemon printed it to its stdout, which the parent
/// relays only until the mount is ready (then /dev/null): the log said
/// nothing, and nothing else told that the writes were lost.
#[test]
fn the_log_file_gets_a_failure_after_the_mount_was_ready() {
    let t = tempfile::tempdir().unwrap();
    // A 4 MiB tmpfs for the upper (the tests run as root).
    let small = t.path().join("small");
    std::fs::create_dir(&small).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&small),
    );
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _small = Unmount(&small);
    // An append-mode upper: its index entries are written at the flush.
    let (data, index) = (small.join("data"), small.join("index"));
    run_ok(
        Command::new(workspace_bin("overlaybd-create"))
            .arg(&data)
            .arg(&index)
            .arg("64"),
    );
    let log = t.path().join("log");
    let mp = t.path().join("mp");
    let layers = fixture_layers();
    let mut args = vec![
        "--log".as_ref(),
        log.as_os_str(),
        "--upper".as_ref(),
        data.as_os_str(),
        index.as_os_str(),
    ];
    args.extend(layers_args(&layers));
    let f = Fuse::background(&args, &mp);
    let pid: i32 = f
        .ready
        .split("daemon pid ")
        .nth(1)
        .and_then(|s| s.trim_end_matches([')', '\n']).parse().ok())
        .unwrap_or_else(|| panic!("no daemon pid in {:?}", f.ready));
    // Fill the tmpfs with data: the writes past it fail, the index
    // entries of those that went in cannot be written.
    let disk = File::options().write(true).open(f.disk()).unwrap();
    let block = vec![0x5au8; 256 << 10];
    for i in 0..32u64 {
        let _ = disk.write_all_at(&block, i * block.len() as u64);
    }
    drop(disk);
    f.unmount();
    let t0 = std::time::Instant::now();
    while kill(Pid::from_raw(pid), None).is_ok() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the daemon did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("overlaybd-fuse: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].contains("cannot flush the upper layer")
            && errors[0].contains(&*index.to_string_lossy())
            && errors[0].contains("No space left on device"),
        "{text}"
    );
    assert!(!text.contains("upper layer flushed"), "{text}");
}

/// A "registry" that accepts connections and never answers: its port, and
/// a channel that gets () for each connection.
fn silent_registry_watched() -> (u16, std::sync::mpsc::Receiver<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            held.push(c);
            let _ = tx.send(());
        }
    });
    (port, rx)
}

/// The port of a registry that accepts connections and never answers.
fn silent_registry() -> u16 {
    silent_registry_watched().0
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // "pid (comm) state ppid ...": comm may hold spaces, not ')'.
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A stop signal to `--background` while it waits for the daemon (here:
/// fetching a manifest that never comes) stops the daemon too, which must
/// not mount later unseen; the status is 128 + the signal's number.
#[test]
fn a_signal_while_waiting_for_the_daemon_stops_it() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let (port, connected) = silent_registry_watched();
    let image = format!("127.0.0.1:{port}/x:y");
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let mut parent = Command::new(fuse_bin())
            .args(["mount", "--background", "--plain", &image])
            .arg(&mp)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The daemon is asking the registry.
        connected
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the daemon never connected");
        let daemons = children_of(parent.id());
        assert_eq!(daemons.len(), 1, "{daemons:?}");
        kill(Pid::from_raw(parent.id() as i32), sig).unwrap();
        let t0 = std::time::Instant::now();
        while parent.try_wait().unwrap().is_none() {
            if t0.elapsed() > std::time::Duration::from_secs(20) {
                let _ = parent.kill();
                panic!("{sig}: still waiting after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = parent.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(128 + sig as i32), "{sig}: {e}");
        assert!(
            e.contains(&format!("{sig}: stopped the daemon")),
            "{sig}: {e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        // Gone, and reaped (by the parent).
        let daemon = daemons[0];
        assert!(
            !std::path::Path::new(&format!("/proc/{daemon}")).exists(),
            "{sig}: the daemon {daemon} is still there"
        );
        assert!(!is_mounted(&mp));
    }
}

/// `--timeout` bounds each request of the mount itself (the manifest), not
/// only the reads: against a registry that never answers, the mount fails
/// after its attempts (1 + `--retries`) have each had that long, saying so.
#[test]
fn timeout_bounds_the_mount_time_requests_of_a_silent_registry() {
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let image = format!("127.0.0.1:{}/x:y", silent_registry());
    let t0 = std::time::Instant::now();
    // Two attempts of 2 s and a backoff: about 4.5 s (the registry client's
    // own 60 s per attempt would take two minutes).
    let o = output_within(
        Command::new(fuse_bin())
            .args(["mount", "--background", "--plain", "--timeout", "2"])
            .args(["--retries", "1", &image])
            .arg(&mp),
        30,
    );
    let e = err_text(&o);
    assert!(e.contains("no answer within 2 s, 2 attempts"), "{e}");
    assert!(t0.elapsed() >= std::time::Duration::from_secs(4), "{e}");
    // One error line, the last; before it the daemon's retry warning, as in
    // the foreground (relayed since --background without --log shows the
    // daemon's messages until the mount is ready).
    let lines: Vec<&str> = e.trim().lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.contains("error:")).count(),
        1,
        "{e}"
    );
    assert!(
        lines.last().unwrap().contains("overlaybd-fuse: error:"),
        "{e}"
    );
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.contains("WARN") && l.contains("retrying")),
        "{e}"
    );
    assert!(!is_mounted(&mp));
}
