//! The command line of `overlaybd-fuse mount`: usage errors exit 2 (as
//! clap's own), runtime failures 1; flags that do not apply are named in
//! one warning; messages say each thing once and give the right sizes.

mod common;

use std::ffi::OsString;
use std::process::{Command, Output};

use common::*;

/// `overlaybd-fuse mount ARGS...` (with `--background` first when `bg`).
fn mount(bg: bool, args: &[OsString]) -> Output {
    let mut c = Command::new(fuse_bin());
    c.arg("mount");
    if bg {
        c.arg("--background");
    }
    c.args(args).output().unwrap()
}

fn os(v: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    v.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// The stderr lines that contain `needle`.
fn lines_with(stderr: &[u8], needle: &str) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Usage errors found after parsing exit 2 with one `overlaybd-fuse:
/// error:` line, like the ones clap finds (bad values of --timeout,
/// --chunk-size, --client-cert); a missing file, a mountpoint that is not
/// a directory and an unreachable registry exit 1. In the foreground and
/// with --background alike.
#[test]
fn usage_errors_exit_2_and_runtime_failures_exit_1() {
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let base = fixture_layers()[0].clone();
    let config = t.path().join("c.json");
    std::fs::write(
        &config,
        format!(r#"{{"lowers": [{{"file": "{}"}}]}}"#, base.display()),
    )
    .unwrap();
    let missing = t.path().join("nope.lsmt");
    let file = t.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    // One exact line each (the whole of stderr).
    let usage: Vec<(Vec<OsString>, String)> = vec![
        (
            os(&[&base]),
            "give the layers (or config.json, oci:DIR[:TAG] or an image reference) and then the mountpoint".into(),
        ),
        (
            os(&[&"oci:/x", &base, &mp]),
            "oci:/x: an image (oci:DIR[:TAG] or HOST/REPO[:TAG|@DIGEST]) must be the only source \
             (got 2 sources; give layer files, or one config.json, or one image)"
                .into(),
        ),
        (
            os(&[&base, &"registry.example.com/app:v1", &mp]),
            "registry.example.com/app:v1: an image (oci:DIR[:TAG] or HOST/REPO[:TAG|@DIGEST]) must \
             be the only source (got 2 sources; give layer files, or one config.json, or one image)"
                .into(),
        ),
        (
            os(&[&config, &base, &mp]),
            format!(
                "{}: a config.json must be the only source (got 2 sources; give layer files, \
                 or one config.json, or one image)",
                config.display()
            ),
        ),
        (
            os(&[&"oci:", &mp]),
            "oci:DIR[:TAG] needs the layout's directory".into(),
        ),
    ];
    for (args, want) in &usage {
        for bg in [false, true] {
            let o = mount(bg, args);
            let e = err_text(&o);
            assert_eq!(o.status.code(), Some(2), "{args:?} bg={bg}: {e}");
            assert_eq!(e, format!("overlaybd-fuse: error: {want}\n"), "{args:?}");
        }
    }
    // --log without --background (checked by hand too).
    let o = mount(false, &os(&[&"--log", &t.path().join("log"), &base, &mp]));
    assert_eq!(o.status.code(), Some(2), "{}", err_text(&o));
    // Values clap checks: the same code.
    for (flag, value, says) in [
        ("--timeout", "0", "0 is not in 1..=3600"),
        ("--chunk-size", "3K", "not a power of two of at least 4K"),
        (
            "--client-cert",
            "only-a-cert",
            "expected cert-file:key-file",
        ),
    ] {
        let o = mount(false, &os(&[&flag, &value, &base, &mp]));
        let e = err_text(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {e}");
        assert!(e.contains(says), "{flag} {value}: {e}");
    }
    // Runtime failures.
    let runtime: Vec<(Vec<OsString>, String)> = vec![
        (
            os(&[&missing, &mp]),
            format!("{}: no such file", missing.display()),
        ),
        (
            os(&[&base, &file]),
            format!("{}: the mountpoint is not a directory", file.display()),
        ),
        (
            os(&[&"--plain", &"--retries", &"0", &"127.0.0.1:1/x:y", &mp]),
            "cannot fetch the manifest of 127.0.0.1:1/x:y".into(),
        ),
    ];
    for (args, want) in &runtime {
        for bg in [false, true] {
            let o = mount(bg, args);
            let e = err_text(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?} bg={bg}: {e}");
            assert_eq!(lines_with(&o.stderr, "error:").len(), 1, "{e}");
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
    assert!(!is_mounted(&mp));
}

/// Registry flags given with local sources are named in one warning (the
/// mount goes on); given with a registry image, they draw none. --meta-cache
/// without --fs is named too.
#[test]
fn flags_that_do_not_apply_are_named_once() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let want = "overlaybd-fuse: warning: -u/--username, --chunk-size, --timeout only apply to a \
                registry image (HOST/REPO[:TAG]): ignored";
    for bg in [false, true] {
        let mp = t.path().join(format!("mp-{bg}"));
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--timeout".as_ref(),
            "5".as_ref(),
            "--chunk-size".as_ref(),
            "1M".as_ref(),
            "-u".as_ref(),
            "a:b".as_ref(),
        ];
        args.extend(layers.iter().map(|p| p.as_os_str()));
        let (stderr, f) = if bg {
            let (f, o) = Fuse::background_output(&args, &mp);
            (o.stderr, f)
        } else {
            let mut f = Fuse::foreground(&args, &mp);
            f.unmount();
            let o = f.wait();
            assert_ok(&o);
            (o.stderr, f)
        };
        assert_eq!(lines_with(&stderr, "warning"), [want], "bg={bg}");
        if bg {
            assert_eq!(std::fs::metadata(f.disk()).unwrap().len(), 64 << 30);
            f.unmount();
        }
    }
    // --meta-cache in block mode, with the registry flag --plain.
    let mp = t.path().join("mp");
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["--meta-cache".as_ref(), "1M".as_ref(), "--plain".as_ref()];
    args.extend(layers.iter().map(|p| p.as_os_str()));
    let mut f = Fuse::foreground(&args, &mp);
    f.unmount();
    let o = f.wait();
    assert_eq!(
        lines_with(&o.stderr, "warning"),
        [
            "overlaybd-fuse: warning: --plain only applies to a registry image (HOST/REPO[:TAG]): ignored",
            "overlaybd-fuse: warning: --meta-cache only applies with --fs: ignored"
        ]
    );
    // With a registry image they apply: no warning (the registry is not there).
    let o = mount(
        false,
        &os(&[
            &"--plain",
            &"--retries",
            &"0",
            &"--timeout",
            &"5",
            &"127.0.0.1:1/x:y",
            &mp,
        ]),
    );
    let e = err_text(&o);
    assert!(lines_with(&o.stderr, "warning:").is_empty(), "{e}");
}

/// Mounting over files warns once, in the foreground and with
/// --background (whose daemon's stderr is not the terminal).
#[test]
fn the_not_empty_warning_is_said_once() {
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
    for bg in [false, true] {
        let mp = t.path().join(format!("mp-{bg}"));
        std::fs::create_dir(&mp).unwrap();
        std::fs::write(mp.join("mine"), b"kept").unwrap();
        let want = format!(
            "{}: the mountpoint is not empty: what it holds is hidden while the image is mounted",
            mp.display()
        );
        let stderr = if bg {
            let (f, o) = Fuse::background_output(&args, &mp);
            f.unmount();
            o.stderr
        } else {
            let mut f = Fuse::foreground(&args, &mp);
            f.unmount();
            let o = f.wait();
            assert_ok(&o);
            o.stderr
        };
        let got = lines_with(&stderr, "not empty");
        assert_eq!(got.len(), 1, "bg={bg}: {got:?}");
        assert!(got[0].ends_with(&want), "{got:?}");
    }
}

/// An open error names the file once: "cannot read image config X: ...",
/// "cannot open layer: X: corrupt ...", never "X: X: ...".
#[test]
fn open_errors_name_the_file_once() {
    let t = tempfile::tempdir().unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let missing = t.path().join("missing.json");
    let cut = t.path().join("cut.tar");
    let whole = std::fs::read(&fixture_layers()[1]).unwrap();
    std::fs::write(&cut, &whole[..100_000]).unwrap();
    let tiny = t.path().join("tiny.lsmt");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    // A config.json naming a layer that is not there: both are named.
    let gone = t.path().join("gone.lsmt");
    let config = t.path().join("config.json");
    std::fs::write(
        &config,
        format!(r#"{{"lowers": [{{"file": "{}"}}]}}"#, gone.display()),
    )
    .unwrap();
    let cases = [
        (
            &missing,
            format!(
                "cannot read image config {}: No such file or directory (os error 2)",
                missing.display()
            ),
        ),
        (
            &cut,
            format!(
                "cannot open layer: {}: corrupt tar wrapper: entry claims {} bytes at offset \
                 1536 but the file has 100000",
                cut.display(),
                // The blob inside the tar wrapper.
                std::fs::metadata(fixtures().join("baselayer/commit.lz4.zfile"))
                    .unwrap()
                    .len(),
            ),
        ),
        (
            &tiny,
            format!(
                "cannot open layer: {}: corrupt LSMT: blob is 100 bytes, too small for a header \
                 and a trailer",
                tiny.display()
            ),
        ),
        (
            &config,
            format!(
                "image config {}: cannot open layer {}: No such file or directory (os error 2)",
                config.display(),
                gone.display()
            ),
        ),
    ];
    for (src, want) in &cases {
        for bg in [false, true] {
            let o = mount(bg, &os(&[src, &mp]));
            let e = err_text(&o);
            assert_eq!(o.status.code(), Some(1), "{e}");
            assert_eq!(e, format!("overlaybd-fuse: error: {want}\n"), "bg={bg}");
            assert_eq!(e.matches(&*src.to_string_lossy()).count(), 1, "{e}");
        }
    }
}

/// A layer file that shrinks while mounted: the read fails with EIO and
/// the warning gives the file's real end and the blob's expected end, in
/// file offsets (the blob starts after the tar header).
#[test]
fn a_layer_that_shrinks_while_mounted_is_reported_with_its_real_size() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixture_layers();
    let base = t.path().join("base");
    let top = t.path().join("top.tar");
    std::fs::copy(&fx[0], &base).unwrap();
    std::fs::copy(&fx[1], &top).unwrap();
    let full = std::fs::metadata(&top).unwrap().len();
    let mp = t.path().join("mp");
    let mut f = Fuse::foreground(&[base.as_os_str(), top.as_os_str()], &mp);
    const CUT: u64 = 2_000_000;
    std::fs::File::options()
        .write(true)
        .open(&top)
        .unwrap()
        .set_len(CUT)
        .unwrap();
    // Read the first 64 MiB: the committed layer's data past the cut fails.
    let o = Command::new(tool("dd"))
        .arg(format!("if={}", f.disk().display()))
        .args(["of=/dev/null", "bs=1M", "count=64", "iflag=direct"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the read past the cut succeeded");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    f.unmount();
    let o = f.wait();
    let warned = lines_with(&o.stderr, "truncated");
    assert!(!warned.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    // The blob is the tar entry: 512-byte header blocks before it, padding
    // and two zero blocks after.
    let entry_end = |l: &str| -> u64 {
        let tail = l.split("before the blob's end at byte ").nth(1).unwrap();
        tail.split(' ').next().unwrap().parse().unwrap()
    };
    for l in &warned {
        assert!(
            l.contains(&format!(
                "{}: corrupt blob: truncated: wanted bytes ",
                top.display()
            )),
            "{l}"
        );
        assert!(l.ends_with("(did the file shrink?)"), "{l}");
        let end = entry_end(l);
        assert!(end > CUT && end <= full, "{l}");
        // "wanted bytes A..B (bytes C..D of the file)": C - A is where the blob starts.
        let nums: Vec<u64> = l
            .split("wanted bytes ")
            .nth(1)
            .unwrap()
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(4)
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(nums[2] - nums[0], 1536, "{l}");
        assert_eq!(nums[3] - nums[1], 1536, "{l}");
        // A read across the cut got the bytes before it; one past it got
        // nothing, which shows only that the file ends by its start.
        let across = format!("but the file ends at byte {CUT}, before the blob's end at byte ");
        let past = format!(
            "but the file ends at or before byte {}, before the blob's end at byte ",
            nums[2]
        );
        if nums[2] < CUT {
            assert!(nums[3] > CUT && l.contains(&across), "{l}");
        } else {
            assert!(l.contains(&past), "{l}");
        }
    }
}

/// Restores the mode /dev/fuse had when dropped (also when the test fails).
struct DevFuseMode(u32);

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0)).unwrap();
    }
}

/// A user who may not open /dev/fuse cannot mount through fusermount3
/// either (it opens the device with the user's rights): the error says so
/// and what to do, in one line, exit code 1. /dev/fuse is made 0660 for
/// the test when others may open it, and restored.
#[test]
fn a_user_who_may_not_open_dev_fuse_is_told_what_to_do() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o7777;
    let _restore = DevFuseMode(mode);
    if mode & 0o006 != 0 {
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o660)).unwrap();
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mp = t.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    std::os::unix::fs::chown(&mp, Some(65534), None).unwrap();
    for bg in [false, true] {
        let mut c = Command::new(tool("setpriv"));
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(fuse_bin())
            .arg("mount");
        if bg {
            c.arg("--background");
        }
        let o = c.arg(&fixture_layers()[0]).arg(&mp).output().unwrap();
        let e = err_text(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let want = format!(
            "overlaybd-fuse: error: {}: cannot mount: this user may not open /dev/fuse (c",
            mp.display()
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(
            e.contains(
                "nor can fusermount3 for it; make /dev/fuse accessible (crw-rw-rw-, as most \
                 distributions ship it: `chmod 0666 /dev/fuse`; or give the user its group, \
                 with mode 0660), or run as root: Permission denied (os error 13)"
            ),
            "{e}"
        );
        assert!(!is_mounted(&mp));
    }
}

/// A committed 1 MiB layer with the given uuids.
fn uuid_layer(
    dir: &std::path::Path,
    name: &str,
    uuid: blockdev::Uuid,
    parent: Option<blockdev::Uuid>,
) -> std::path::PathBuf {
    let (d, i) = (dir.join(format!("{name}.d")), dir.join(format!("{name}.i")));
    let create = blockdev::lsmt::CreateOptions {
        virtual_size: 1 << 20,
        ..Default::default()
    };
    blockdev::lsmt::create_writable(&d, &i, &create).unwrap();
    let out = dir.join(name);
    let commit = blockdev::commit::CommitOptions {
        uuid: Some(uuid),
        parent_uuid: parent,
        ..Default::default()
    };
    blockdev::commit::commit_writable(&d, &i, &out, &commit).unwrap();
    out
}

/// The daemon's warnings from before the mount is ready (here: layers out
/// of order) reach the terminal with --background and no --log, once, as in
/// the foreground; its stderr was /dev/null, so they were lost.
#[test]
fn background_daemon_warnings_reach_the_terminal() {
    let t = tempfile::tempdir().unwrap();
    let u = |c: char| {
        blockdev::Uuid::from_chain_id(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    };
    let l0 = uuid_layer(t.path(), "l0", u('a'), None);
    let l1 = uuid_layer(t.path(), "l1", u('b'), Some(u('a')));
    let l2 = uuid_layer(t.path(), "l2", u('c'), Some(u('b')));
    let args = [l0.as_os_str(), l2.as_os_str(), l1.as_os_str()];
    let (f, o) = Fuse::background_output(&args, &t.path().join("mp"));
    f.unmount();
    let got = lines_with(&o.stderr, "out of order");
    assert_eq!(got.len(), 1, "{}", err_text(&o));
    assert!(got[0].contains("layer 2 records its parent as"), "{got:?}");
    // The ready line is still the only line on stdout.
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
}

/// `OVERLAYBD_IO` chooses the file I/O backend of a mount without `--io`, as it
/// does for every user of the library (the README's "I/O backends"); `--io`
/// overrides it. A default `--io auto` used to override the variable. Seen from
/// outside: a daemon that set up io_uring holds a ring's file descriptor,
/// `anon_inode:[io_uring]`; one that reads with pread does not.
#[test]
fn overlaybd_io_chooses_the_backend_unless_io_is_given() {
    if !blockdev::uring::test_gate() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().unwrap();
    let layers = fixture_layers();
    let cases = [
        ("pread", None, false),
        ("uring", None, true),
        ("pread", Some("uring"), true),
        ("uring", Some("pread"), false),
    ];
    for (i, (env, flag, ring)) in cases.into_iter().enumerate() {
        let mut args: Vec<&std::ffi::OsStr> = layers.iter().map(|p| p.as_os_str()).collect();
        if let Some(f) = flag {
            args.extend([std::ffi::OsStr::new("--io"), std::ffi::OsStr::new(f)]);
        }
        let mp = t.path().join(format!("mp{i}"));
        let f = Fuse::background_env(&args, &mp, &[("OVERLAYBD_IO", env)]);
        let pid: u32 = f
            .ready
            .split("daemon pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no daemon pid in {:?}", f.ready));
        // A read, so that a daemon that would use the ring has used it.
        let mut sb = [0u8; 4096];
        std::fs::File::open(f.disk())
            .unwrap()
            .read_exact_at(&mut sb, 0)
            .unwrap();
        let n = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.as_os_str() == std::ffi::OsStr::new("anon_inode:[io_uring]"))
            .count();
        f.unmount();
        assert_eq!(
            n > 0,
            ring,
            "OVERLAYBD_IO={env} --io {flag:?}: {n} io_uring descriptors"
        );
    }
}
