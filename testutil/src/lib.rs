//! Test oracles shared by the workspace's integration tests.
//!
//! Everything here drives real tools (`e2fsck`, `debugfs`, GNU `tar`) and
//! compares real directory trees; nothing is mocked.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The upstream golden fixtures directory: `$OVERLAYBD_FIXTURES`, else
/// `../shared/fixtures/overlaybd-reference` next to the checkout, else
/// `/work/shared/fixtures/overlaybd-reference`.
pub fn fixtures() -> PathBuf {
    let rel = "shared/fixtures/overlaybd-reference";
    let candidates: Vec<PathBuf> = match std::env::var_os("OVERLAYBD_FIXTURES") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(rel),
            Path::new("/work").join(rel),
        ],
    };
    candidates
        .iter()
        .find(|p| p.join("README.md").exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!("upstream fixtures not found (tried {candidates:?}; set OVERLAYBD_FIXTURES)")
        })
}

/// The TurboOCI golden fixtures (`turbooci-reference`), next to
/// [`fixtures`] (`$OVERLAYBD_TURBO_FIXTURES` overrides).
pub fn turbo_fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("OVERLAYBD_TURBO_FIXTURES") {
        return PathBuf::from(p);
    }
    let p = fixtures().join("../turbooci-reference");
    assert!(
        p.join("README.md").exists(),
        "TurboOCI fixtures not found at {} (set OVERLAYBD_TURBO_FIXTURES)",
        p.display()
    );
    p
}

/// Find a system tool or fail with an install hint.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("required tool `{name}` is not installed (see .ci/run for the packages)");
}

/// Run `e2fsck -fn` on an image; `Err` carries its output when unclean.
pub fn e2fsck(image: &Path) -> Result<String, String> {
    let out = Command::new(tool("e2fsck"))
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Copy the whole filesystem of `image` into `dest` with `debugfs rdump`
/// (as root it keeps owners, modes and times).
pub fn rdump(image: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    let out = Command::new(tool("debugfs"))
        .arg("-R")
        .arg(format!("rdump / {}", dest.display()))
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs rdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Extract tars in order with GNU tar (numeric owners, xattrs), no whiteout handling.
pub fn gnu_extract(tars: &[&Path], dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for t in tars {
        let st = Command::new(tool("tar"))
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(t)
            .arg("-C")
            .arg(dest)
            .status()
            .expect("run tar");
        assert!(st.success(), "tar -x {} failed", t.display());
    }
}

/// What we compare about one tree entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// mtime in seconds (rdump does not keep nanoseconds).
    pub mtime: i64,
    pub size: u64,
    /// Content hash for files, target for symlinks, rdev for devices.
    pub detail: String,
}

/// A short, stable (FNV-1a) hash of `data`, for comparing contents in tests.
pub fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Walk `root` into a map of relative path -> [`Node`].
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let (kind, detail) = if ft.is_symlink() {
            (
                'l',
                fs::read_link(&p).unwrap().to_string_lossy().into_owned(),
            )
        } else if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_file() {
            ('-', fnv(&fs::read(&p).unwrap()))
        } else if ft.is_char_device() {
            ('c', format!("{:x}", md.rdev()))
        } else if ft.is_block_device() {
            ('b', format!("{:x}", md.rdev()))
        } else if ft.is_fifo() {
            ('p', String::new())
        } else {
            ('s', String::new())
        };
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: if kind == 'l' { 0 } else { md.mtime() },
                size: if kind == '-' { md.size() } else { 0 },
                detail,
            },
        );
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// Differences between two trees, ignoring paths for which `ignore` is true.
pub fn diff_trees(
    got: &BTreeMap<String, Node>,
    want: &BTreeMap<String, Node>,
    ignore: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, w) in want {
        if ignore(k) {
            continue;
        }
        match got.get(k) {
            None => d.push(format!("missing: {k}")),
            Some(g) if g != w => d.push(format!("differs: {k}\n  got  {g:?}\n  want {w:?}")),
            _ => {}
        }
    }
    for k in got.keys() {
        if !ignore(k) && !want.contains_key(k) {
            d.push(format!("unexpected: {k}"));
        }
    }
    d
}

/// Compare two JSON trees (path -> attributes, as `tests/images/build.py
/// tree`/`scan` print them), listing every differing path.
pub fn assert_same_tree(actual: &serde_json::Value, expected: &serde_json::Value) {
    let a = actual.as_object().expect("a JSON object of paths");
    let e = expected.as_object().expect("a JSON object of paths");
    let mut diffs = Vec::new();
    for (k, v) in e {
        match a.get(k) {
            None => diffs.push(format!("missing: {k}")),
            Some(x) if x != v => {
                diffs.push(format!("differs: {k}\n  expected {v}\n  actual   {x}"))
            }
            _ => {}
        }
    }
    for k in a.keys() {
        if !e.contains_key(k) {
            diffs.push(format!("unexpected: {k}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Run a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert_ok(&out);
    out
}

/// Assert that a finished command succeeded, showing its output otherwise.
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The stderr of a command that must have failed cleanly (no panic).
pub fn err_text(o: &Output) -> String {
    assert!(!o.status.success(), "unexpected success");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "panic: {e}");
    e
}

/// Names of the unfinished outputs in `dir`: `.NAME.tmp-PID-N`, as the
/// tools write a file before they rename it into place.
pub fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// Waits until `ready()` holds (`what`: e.g. "its temporary output") while
/// `child` runs: fails if `child` ends first or after a minute.
pub fn wait_until(child: &mut std::process::Child, what: &str, ready: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the tool ended ({s}) while waiting for {what}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "waited a minute for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The output of `child` once it exits; killed, failing the test, if it
/// still runs after `limit` (a hang fails the test instead of stopping the
/// suite). Its standard input, if piped, stays open until it exits.
#[track_caller]
pub fn output_within(mut child: std::process::Child, limit: std::time::Duration) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "the tool still ran after {limit:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// For a test that cannot run on this machine (`why` says what is missing):
/// prints `skipped: WHY` so the test can return, or fails the test when the
/// environment variable `CI` is set (not empty, `false` or `0`): CI
/// machines have what the tests need (`.ci/run` sets `CI`), and a test that
/// skips there tests nothing.
#[track_caller]
pub fn skip(why: &str) {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{why}, and CI is set: this test fails instead of skipping"
    );
    eprintln!("skipped: {why}");
}

/// Starts `program` with `args` in `dir` and returns once it has printed the
/// line "locked" (it holds the lock the test needs).
pub fn locked_holder(dir: &Path, program: &str, args: &[&str]) -> std::process::Child {
    let mut holder = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let mut locked = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut locked,
    )
    .unwrap();
    assert_eq!(locked, "locked\n", "{program} did not take the lock");
    holder
}

/// A `sh -c` script for [`locked_holder`] whose lock on `data` is inherited:
/// flock(1) takes it on the shell's descriptor and exits; the shell, then
/// `sleep`, keeps it (`/proc/locks` still records flock's pid).
pub const INHERITED_FLOCK_SH: &str = "exec 9<>data; flock -x 9 && echo locked; exec sleep 60";

/// Sends `sig` to `child` and waits for it: it must exit with 128 + `sig`
/// (130, 143), its stderr ending in one line that says it was interrupted
/// by `sig` (no panic, no other such line). Returns that line.
pub fn interrupt(child: std::process::Child, sig: nix::sys::signal::Signal) -> String {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, sig).unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(128 + sig as i32),
        "{}: {e}",
        out.status
    );
    assert!(!e.contains("panicked"), "panic: {e}");
    let said: Vec<&str> = e.lines().filter(|l| l.contains("interrupted")).collect();
    assert_eq!(said.len(), 1, "{e}");
    assert_eq!(e.lines().last(), Some(said[0]), "{e}");
    assert!(said[0].contains(&format!("interrupted by {sig}")), "{e}");
    said[0].to_string()
}

/// An error and its causes joined with ": ", as `anyhow`'s `{:#}` and the
/// tools print them.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Assert that no error in the chain repeats its cause in its own text (the
/// cause is printed once, by whoever walks `source()`), and return the
/// chain as [`error_chain`] prints it.
pub fn assert_clean_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(s) = c.source() {
            let (text, cause) = (c.to_string(), s.to_string());
            assert!(
                cause.is_empty() || !text.contains(&cause),
                "error text repeats its cause: '{text}' contains '{cause}' (chain: {})",
                error_chain(e)
            );
        }
        cur = c.source();
    }
    error_chain(e)
}

/// `tests/fs/treecmp.py` of the workspace.
pub fn treecmp_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fs/treecmp.py")
}

/// Run `treecmp.py ARGS` (`reference TAR...`, `dir DIR`, `compare A B
/// [--ignore-xattr X ...]`); returns its stdout, panics with its output
/// when it fails (for `compare`: when the trees differ).
pub fn treecmp(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(treecmp_script())
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "treecmp {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("treecmp prints UTF-8 JSON")
}

/// A read-only loop mount (`mount -t FSTYPE -o loop,ro`), unmounted when
/// dropped, also when the test panics; `-o loop` sets autoclear, so the
/// loop device goes with the mount.
pub struct LoopMount {
    pub dir: PathBuf,
}

impl LoopMount {
    pub fn new(fstype: &str, img: &Path, dir: &Path) -> LoopMount {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", fstype, "-o", "loop,ro"])
            .arg(img)
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t {fstype} {} failed: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.dir).status();
        if !matches!(st, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Two layer tars with hard links to their own names, as `tar cf x.tar f f`
/// writes one for the second `f` (erofs-utils and GNU tar keep the file; the
/// reference unpack of `treecmp.py` too): `self-link-0.tar` has `z/in`, a link
/// `z/in` -> `z/in`, a second name `h` and again `z/in` -> `./z/in`;
/// `self-link-1.tar` links a lower layer's `z/in` to itself and adds `n`.
/// Written into `dir`; returns their paths, bottom first.
pub fn self_link_tars(dir: &Path) -> [PathBuf; 2] {
    let paths = [dir.join("self-link-0.tar"), dir.join("self-link-1.tar")];
    let script = r#"
import sys, tarfile, io
def member(t, name, kind, data=b"", link=""):
    i = tarfile.TarInfo(name)
    i.type, i.mtime, i.linkname = kind, 1600000000, link
    i.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    i.size = len(data)
    t.addfile(i, io.BytesIO(data) if data else None)
with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as t:
    member(t, "z/", tarfile.DIRTYPE)
    member(t, "z/in", tarfile.REGTYPE, b"inside\n")
    member(t, "z/in", tarfile.LNKTYPE, link="z/in")
    member(t, "h", tarfile.LNKTYPE, link="z/in")
    member(t, "z/in", tarfile.LNKTYPE, link="./z/in")
with tarfile.open(sys.argv[2], "w", format=tarfile.USTAR_FORMAT) as t:
    member(t, "z/in", tarfile.LNKTYPE, link="z/in")
    member(t, "n", tarfile.REGTYPE, b"new\n")
"#;
    assert_ok(&run_ok(
        Command::new("python3").args(["-c", script]).args(&paths),
    ));
    paths
}

/// Four layer tars whose entries for the root directory carry distinctive
/// metadata, spelled the ways tars spell the root (PAX format, so xattrs
/// ride as `SCHILY.xattr.*`):
/// * `root-0.tar`: `./` (mode 0700, uid 1000, gid 1001, mtime 1111111111,
///   `user.root=base`), then a file `f`;
/// * `root-1.tar`: `g`, then `./.` (0750, 2000:2001, 1222222222,
///   `user.root=top`);
/// * `root-2.tar`: `/.` (0705, 3000:3001, 1333333333, `user.root=slash`)
///   and a file `h`: an absolute name, which libtar (upstream's ext4
///   appliers) skips and erofs-utils applies to the root;
/// * `root-3.tar`: a file `i` and no root entry.
///
/// Written into `dir`; returns their paths, bottom first.
pub fn root_entry_tars(dir: &Path) -> [PathBuf; 4] {
    let paths = [0, 1, 2, 3].map(|i| dir.join(format!("root-{i}.tar")));
    let script = r#"
import sys, tarfile, io
def member(t, name, kind, mode=0o644, owner=(0, 0), mtime=1600000000, xattrs=None, data=b""):
    i = tarfile.TarInfo(name)
    i.type, i.mode, i.mtime = kind, mode, mtime
    i.uid, i.gid = owner
    i.size = len(data)
    if xattrs:
        i.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    t.addfile(i, io.BytesIO(data) if data else None)
D, F = tarfile.DIRTYPE, tarfile.REGTYPE
def layer(path, build):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        build(t)
layer(sys.argv[1], lambda t: (
    member(t, "./", D, 0o700, (1000, 1001), 1111111111, {"user.root": "base"}),
    member(t, "f", F, data=b"f\n")))
layer(sys.argv[2], lambda t: (
    member(t, "g", F, data=b"g\n"),
    member(t, "./.", D, 0o750, (2000, 2001), 1222222222, {"user.root": "top"})))
layer(sys.argv[3], lambda t: (
    member(t, "/.", D, 0o705, (3000, 3001), 1333333333, {"user.root": "slash"}),
    member(t, "h", F, data=b"h\n")))
layer(sys.argv[4], lambda t: member(t, "i", F, data=b"i\n"))
"#;
    assert_ok(&run_ok(
        Command::new("python3").args(["-c", script]).args(&paths),
    ));
    paths
}

/// Writes at `path` a layer tar whose only entry names the root (`.`) but
/// is a regular file: every engine must refuse it.
pub fn root_as_file_tar(path: &Path) {
    let script = r#"
import sys, tarfile, io
with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as t:
    i = tarfile.TarInfo(".")
    i.size, i.mode = 2, 0o644
    t.addfile(i, io.BytesIO(b"x\n"))
"#;
    assert_ok(&run_ok(
        Command::new("python3").args(["-c", script]).arg(path),
    ));
}

/// The root's (mode, uid, gid, mtime, xattrs) after each layer of
/// [`root_entry_tars`] on the ext4 engines, as upstream's libtar
/// (overlaybd-apply, turboOCI-apply) leaves it: a relative root entry
/// (`./`, `./.`) gives the root its owner, mode, mtime and xattrs in any
/// layer; an absolute one (`/.`) and a layer without one leave it as it was.
pub const EXT4_ROOT_AFTER: [(u32, u32, u32, u32, &str); 4] = [
    (0o040700, 1000, 1001, 1111111111, "user.root=base"),
    (0o040750, 2000, 2001, 1222222222, "user.root=top"),
    (0o040750, 2000, 2001, 1222222222, "user.root=top"),
    (0o040750, 2000, 2001, 1222222222, "user.root=top"),
];

/// (mode with type bits, uid, gid, mtime seconds, xattrs as `name=value`).
pub type Ext4Root = (u32, u32, u32, u32, Vec<String>);

/// The root directory of the ext4 image `img` as `debugfs` shows it:
/// (mode with type bits, uid, gid, mtime seconds, xattrs as `name=value`
/// strings in debugfs's order).
pub fn ext4_root(img: &Path) -> Ext4Root {
    let run = |req: &str| {
        let o = run_ok(Command::new(tool("debugfs")).args(["-R", req]).arg(img));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let stat = run("stat /");
    let field = |key: &str| -> String {
        stat.split(key)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {key} in debugfs stat /:\n{stat}"))
            .to_string()
    };
    assert_eq!(field("Type:"), "directory", "{stat}");
    let mode = u32::from_str_radix(&field("Mode:"), 8).unwrap();
    let uid = field("User:").parse().unwrap();
    let gid = field("Group:").parse().unwrap();
    let mtime = field(" mtime:");
    let secs = mtime.trim_start_matches("0x").split(':').next().unwrap();
    let mtime = u32::from_str_radix(secs, 16).unwrap();
    let xattrs = run("ea_list /")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            let name = k.split_whitespace().next()?;
            Some(format!("{name}={}", v.trim().trim_matches('"')))
        })
        .collect();
    (0o040000 | mode, uid, gid, mtime, xattrs)
}

/// A directory (a mount point) as the kernel shows it, in the shape of
/// [`ext4_root`]: xattrs read with Python's `os.listxattr`/`os.getxattr`.
pub fn dir_root(dir: &Path) -> Ext4Root {
    let m = fs::symlink_metadata(dir).unwrap();
    let script = "import os, sys\n\
        p = sys.argv[1]\n\
        print(' '.join(k + '=' + os.getxattr(p, k, follow_symlinks=False).decode() \
        for k in sorted(os.listxattr(p, follow_symlinks=False))))";
    let o = run_ok(Command::new("python3").args(["-c", script]).arg(dir));
    let xattrs = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (m.mode(), m.uid(), m.gid(), m.mtime() as u32, xattrs)
}

/// Restores the default action of SIGINT, SIGTERM and SIGHUP in this test
/// process when it was started with them ignored (under `nohup`, or as a
/// script's background job): the binaries under test inherit the
/// dispositions and keep an ignored stop signal ignored, so a test that
/// stops one with a signal calls this first. Once per process.
pub fn default_stop_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: SIG_DFL installs no handler function, so no code runs in
            // signal context; the test process takes these signals' default.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    });
}
