//! A watchdog process that takes down what a run killed with SIGKILL left
//! set up: the FUSE mount of the disk file, the loop device on it, the ext4
//! mounted from that and the work directory.
//!
//! A run cannot clean up after SIGKILL (the OOM killer, `kill -9`), and it
//! may not even finish dying: a thread writing through the loop device to
//! the FUSE server (a thread of the same, dead, process) stays in state D,
//! and with it the process, its file descriptors and its mounts. So each
//! [`Export`](crate::Export) starts a small process of its own: the program
//! itself again (`/proc/self/exe`, `argv[0]` [`ARG0`], the work directory
//! as its argument) with [`ENV`] set, which [`init`], called first thing in
//! `main`, turns into the watchdog. It runs in a session of its own (a
//! signal to the run's process group or terminal does not reach it), reads
//! what comes up (the FUSE mount, the loop device, the ext4 mount) from a
//! pipe, and:
//! * on "done" (the run took everything down itself, also after Ctrl-C)
//!   exits at once: the run reaps it;
//! * once the run is dying (see `run_is_dying`) does what
//!   `scripts/kernel-engine-cleanup.sh` does, for its own directory only:
//!   aborts the FUSE connection through fusectl (found in mountinfo: the
//!   dead mount itself is never looked at, a stat would hang), unmounts the
//!   ext4 lazily, detaches the loop devices backed by its disk file; once
//!   the run and the tools it started (any process naming the directory: a
//!   `losetup` that opened the disk file before the abort still attaches
//!   it) are gone, at most `GONE_WAIT`, does that again; then unmounts
//!   FUSE lazily and removes the (empty) directories. The abort fails the
//!   stuck write, so the run's last thread exits and the run is reaped by
//!   its parent as usual.
//!
//! The watchdog never acts while the run is alive: it acts only when every
//! thread of the run has exited (it was reparented), when the run's main
//! thread is a zombie, or when SIGKILL is pending for a thread of the run
//! (a pending SIGKILL cannot be blocked, handled or undone). A pipe closed
//! without "done" is only a hint to look more often.
//!
//! A program that uses the engine without calling [`init`] (a test binary)
//! gets no watchdog: re-executing it would start the program again.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use obdfuse::block::DISK_NAME;

/// Set (to the run's process id) in the watchdog's environment.
pub const ENV: &str = "OVERLAYBD_KERNEL_WATCHDOG";

/// The watchdog's `argv[0]`, as `ps` shows it.
pub const ARG0: &str = "overlaybd-kernel-watchdog";

/// How often the watchdog looks at the run.
const TICK: Duration = Duration::from_millis(200);

/// Every how many looks the watchdog reads each thread of the run, not only
/// its main thread (see `run_is_dying`).
const THREAD_SWEEP: u32 = 5;

/// How long after the pipe closed without "done" the watchdog waits for the
/// run to be seen dying before it leaves without touching anything.
const EOF_GRACE: Duration = Duration::from_secs(60);

/// How long the watchdog waits for the run, and the tools it started, to be
/// gone after the first clean-up, before it looks again.
const GONE_WAIT: Duration = Duration::from_secs(10);

/// The mount of fusectl, whose `N/abort` ends FUSE connection `N`.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Whether [`init`] ran in this process (and it is not a watchdog).
static ARMED: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main` of every program that may use the kernel
/// engine, before any thread starts: in the watchdog process the engine
/// starts, it serves as that watchdog and exits; otherwise it returns and
/// lets the engine start watchdogs.
pub fn init() {
    if let Some((run, dir)) = watched_run() {
        std::process::exit(serve(run, &dir));
    }
    ARMED.store(true, Ordering::Relaxed);
}

/// The run to watch and its work directory, when this process is a
/// watchdog: started as [`ARG0`] with [`ENV`] set to the run's pid.
fn watched_run() -> Option<(Pid, PathBuf)> {
    let pid: i32 = std::env::var(ENV).ok()?.parse().ok()?;
    let mut args = std::env::args_os();
    if args.next()? != ARG0 {
        return None;
    }
    let dir = PathBuf::from(args.next()?);
    Some((Pid::from_raw(pid), dir))
}

/// What the run tells its watchdog: one tag byte, a path, a NUL. The
/// watchdog acts on what it finds in mountinfo and sysfs for its directory;
/// what it is told says what to look for (a told loop device is detached
/// only while still backed by the disk file: it may have been reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// FUSE is mounted at this path.
    Fuse,
    /// This loop device is attached to the disk file.
    Loop,
    /// The ext4 is mounted at this path.
    Root,
    /// Everything is taken down: exit.
    Done,
}

impl Tag {
    fn byte(self) -> u8 {
        match self {
            Tag::Fuse => b'F',
            Tag::Loop => b'L',
            Tag::Root => b'R',
            Tag::Done => b'E',
        }
    }

    fn of(b: u8) -> Option<Tag> {
        [Tag::Fuse, Tag::Loop, Tag::Root, Tag::Done]
            .into_iter()
            .find(|t| t.byte() == b)
    }
}

// ----- the run's side -------------------------------------------------------

/// The run's handle on its watchdog: dropping it says "done" and reaps it.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Start a watchdog for the work directory `dir` (canonical); `None`
    /// (logged) when this program did not call [`init`] or the start failed.
    pub(crate) fn start(dir: &Path) -> Option<Watchdog> {
        if !ARMED.load(Ordering::Relaxed) {
            tracing::debug!(
                "no watchdog for {}: the program did not call obdkernel::watchdog::init()",
                dir.display()
            );
            return None;
        }
        // The watchdog starts in the run's process group and session, and
        // leaves them (`serve`) only once its `main` runs: a signal sent to
        // the group meanwhile (a terminal's hangup, Ctrl-C, Ctrl-\) must
        // not end it. So it starts with every signal blocked (the mask
        // passes through the spawn and the exec), and discards what came
        // once it is in its own session. This thread's mask is back as it
        // was right after the spawn.
        let mask = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK);
        let spawned = Command::new("/proc/self/exe")
            .arg0(ARG0)
            .arg(dir)
            .env(ENV, std::process::id().to_string())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        if let Ok(mask) = mask {
            let _ = mask.thread_set_mask();
        }
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let hint = crate::error::fd_limit_hint(&e)
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                tracing::warn!(
                    "cannot start the watchdog ({e}{hint}): if this run is killed with SIGKILL, run scripts/kernel-engine-cleanup.sh {}",
                    dir.display()
                );
                return None;
            }
        };
        tracing::debug!("watchdog {} watches {}", child.id(), dir.display());
        Some(Watchdog {
            pipe: child.stdin.take(),
            child,
        })
    }

    fn tell(&mut self, tag: Tag, path: &Path) {
        let Some(p) = self.pipe.as_mut() else { return };
        let mut rec = vec![tag.byte()];
        rec.extend_from_slice(path.as_os_str().as_bytes());
        rec.push(0);
        if let Err(e) = p.write_all(&rec) {
            tracing::warn!("the watchdog {} is gone: {e}", self.child.id());
            self.pipe = None;
        }
    }

    /// FUSE serves the disk file at `mountpoint`.
    pub(crate) fn fuse_mounted(&mut self, mountpoint: &Path) {
        self.tell(Tag::Fuse, mountpoint);
    }

    /// `dev` is attached to the disk file.
    pub(crate) fn loop_attached(&mut self, dev: &Path) {
        self.tell(Tag::Loop, dev);
    }

    /// The ext4 is mounted at `root`.
    pub(crate) fn root_mounted(&mut self, root: &Path) {
        self.tell(Tag::Root, root);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.tell(Tag::Done, Path::new(""));
        self.pipe = None;
        // It exits on "done" (or on the closed pipe): reap it, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    tracing::warn!("the watchdog {} did not exit: killing it", self.child.id());
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

// ----- the watchdog's side --------------------------------------------------

/// What the watchdog was told.
#[derive(Debug, Default)]
struct Told {
    loops: Vec<PathBuf>,
    fuse: bool,
    root: bool,
}

enum Msg {
    Note(Tag, PathBuf),
    Closed,
}

fn say(msg: std::fmt::Arguments<'_>) {
    // stderr may be a closed pipe by now: nothing to do about it.
    let _ = writeln!(std::io::stderr(), "{ARG0}: {msg}");
}

/// The watchdog's life: read what the run tells, look at the run every
/// [`TICK`], clean up once it is dying. The exit status.
fn serve(run: Pid, dir: &Path) -> i32 {
    // Out of the run's session and process group: Ctrl-C, a terminal
    // hangup or a kill of the group reach the run only; and without a
    // controlling terminal, writing to one never stops it (SIGTTOU). It
    // cannot fail: the watchdog was not started as a group leader (so not
    // with `process_group(0)`).
    let _ = nix::unistd::setsid();
    // It started with every signal blocked (`Watchdog::start`): what was
    // sent to the run's process group until now is pending. Discard it:
    // the run got it too, and may have died of it.
    if let Ok(pending) = SignalFd::with_flags(&SigSet::all(), SfdFlags::SFD_NONBLOCK) {
        while let Ok(Some(_)) = pending.read_signal() {}
    }
    // Nor does a plain kill end it before the run: it ends with the run.
    let mut quiet = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        quiet.add(s);
    }
    let _ = quiet.thread_set_mask();
    let _ = nix::sys::prctl::set_name(c"obd-watchdog");

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(std::io::stdin().lock());
        loop {
            let mut rec = Vec::new();
            match r.read_until(0, &mut rec) {
                Ok(n) if n > 1 && rec.last() == Some(&0) => {
                    rec.pop();
                    let tag = rec.remove(0);
                    if let Some(tag) = Tag::of(tag) {
                        let path = PathBuf::from(OsString::from_vec(rec));
                        if tx.send(Msg::Note(tag, path)).is_err() {
                            return;
                        }
                    }
                }
                _ => {
                    let _ = tx.send(Msg::Closed);
                    return;
                }
            }
        }
    });

    let proc_run = run_in_proc(run);
    let mut told = Told::default();
    let mut closed_at: Option<Instant> = None;
    let mut looks: u32 = 0;
    loop {
        looks = looks.wrapping_add(1);
        if closed_at.is_none() {
            match rx.recv_timeout(TICK) {
                Ok(Msg::Note(Tag::Done, _)) => return 0,
                Ok(Msg::Note(Tag::Loop, p)) => told.loops.push(p),
                Ok(Msg::Note(Tag::Fuse, _)) => told.fuse = true,
                Ok(Msg::Note(Tag::Root, _)) => told.root = true,
                Ok(Msg::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    closed_at = Some(Instant::now())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        } else {
            std::thread::sleep(TICK / 4);
        }
        if run_is_dying(run, proc_run, looks.is_multiple_of(THREAD_SWEEP)) {
            break;
        }
        if closed_at.is_some_and(|t| t.elapsed() > EOF_GRACE) {
            say(format_args!(
                "the run (pid {run}) closed its pipe without saying done and is not dying; leaving {} as it is",
                dir.display()
            ));
            return 1;
        }
    }
    if !dir.is_absolute()
        || !dir
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"overlaybd-kernel-"))
    {
        say(format_args!(
            "{}: not an overlaybd-kernel-* directory; not touching it",
            dir.display()
        ));
        return 1;
    }
    let mut errors = Vec::new();
    let mut did = Did::default();
    take_down(dir, &told, &mut errors, &mut did);
    // The tools the run started (losetup, mount, mkfs.ext4) outlive it: one
    // that opened the disk file before the abort may still attach a loop
    // device to it or mount the ext4, and a loop device still in use by the
    // stuck thread, or whose detach raced with its auto-clear, may still be
    // there. Once the run and every process naming the directory are gone,
    // look again, while FUSE is still mounted: a loop device on the disk
    // file is found by its backing file's path only as long as the file is
    // reachable there.
    let start = Instant::now();
    while (nix::unistd::getppid() == run || names_dir(dir)) && start.elapsed() < GONE_WAIT {
        std::thread::sleep(TICK / 4);
    }
    take_down(dir, &told, &mut errors, &mut did);
    let fuse_point = dir.join("disk");
    if (told.fuse || mounts().iter().any(|m| m.point == fuse_point))
        && lazy_unmount(&fuse_point, &mut errors)
    {
        did.note("unmounted FUSE");
    }
    if remove_dirs(dir, &mut errors) {
        did.note("removed the directory");
    }
    let left = leftovers(dir);
    if left.is_empty() {
        // Nothing to say when nothing was there (the run had taken it all
        // down, or set nothing up, before it died).
        if let Some(what) = did.list() {
            say(format_args!(
                "the run (pid {run}) died with {} set up; {what}",
                dir.display()
            ));
        }
        0
    } else {
        for e in &errors {
            say(format_args!("{e}"));
        }
        say(format_args!(
            "the run (pid {run}) died with its work directory set up; left behind: {}; see scripts/kernel-engine-cleanup.sh",
            left.join(", ")
        ));
        1
    }
}

/// The run's pid as /proc shows it (its `PPid` in `/proc/self/status`),
/// when the run is still the watchdog's parent. It is not `run` when /proc
/// was mounted for another PID namespace than this process's
/// (`unshare --pid --fork` without `--mount-proc`): `/proc/{run}` is then
/// another process, or none. `None` when /proc does not show the parent.
fn run_in_proc(run: Pid) -> Option<Pid> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ppid: i32 = field(&status, "PPid:")?.parse().ok()?;
    // The run was still the parent after the read (a parent never comes
    // back), so the number read is the run's.
    (ppid > 0 && nix::unistd::getppid() == run).then(|| Pid::from_raw(ppid))
}

/// Whether the run `run` (`proc_run` in /proc, see [`run_in_proc`]), the
/// watchdog's parent, is dying or gone. Never true for a run that is alive,
/// even stopped or traced. With `threads`, every thread's pending signals are
/// read too, not only the main thread's: that costs a read per thread (a
/// convertor has dozens), so it is done every [`THREAD_SWEEP`] looks only.
fn run_is_dying(run: Pid, proc_run: Option<Pid>, threads: bool) -> bool {
    // Reparented: every thread of the run has exited.
    if nix::unistd::getppid() != run {
        return true;
    }
    // Not in /proc: only its end can be seen.
    let Some(proc_run) = proc_run else {
        return false;
    };
    // The run is still the parent, so its pid is its own while it is read,
    // and its /proc entry is there (a zombie's too): one that cannot be read
    // says nothing.
    let proc = PathBuf::from(format!("/proc/{proc_run}"));
    let Ok(status) = std::fs::read_to_string(proc.join("status")) else {
        return false;
    };
    // The main thread exited (exit_group or a fatal signal) and the process
    // waits for a last thread: a zombie leader.
    if matches!(field(&status, "State:"), Some(s) if s.starts_with('Z') || s.starts_with('X')) {
        return true;
    }
    // SIGKILL queued for the process or one of its threads (one stuck in D
    // never dequeues it).
    let kill_bit = 1u64 << (Signal::SIGKILL as u32 - 1);
    let pending = |s: &str| {
        ["SigPnd:", "ShdPnd:"].iter().any(|k| {
            field(s, k)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .is_some_and(|m| m & kill_bit != 0)
        })
    };
    if pending(&status) {
        return true;
    }
    // The SIGKILL queued for every thread is seen in the main thread's set
    // above, unless the main thread took it and is stuck on its way out (in
    // D, not yet a zombie): then another thread's set shows it.
    if !threads {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(proc.join("task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| pending(&s)))
}

/// What the watchdog took down, in order, each once.
#[derive(Debug, Default)]
struct Did(Vec<String>);

impl Did {
    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        if !self.0.contains(&what) {
            self.0.push(what);
        }
    }

    /// "a, b and c"; `None` when nothing was done.
    fn list(&self) -> Option<String> {
        let (last, rest) = self.0.split_last()?;
        Some(if rest.is_empty() {
            last.clone()
        } else {
            format!("{} and {last}", rest.join(", "))
        })
    }
}

/// The value of the `/proc/PID/status` line starting with `key`.
fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// One line of `/proc/self/mountinfo`: the device and the mount point.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    major: u32,
    minor: u32,
    point: PathBuf,
    fstype: String,
}

fn mounts() -> Vec<MountEntry> {
    std::fs::read("/proc/self/mountinfo")
        .map(|b| parse_mountinfo(&b))
        .unwrap_or_default()
}

/// Parse mountinfo: `ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE SRC SUPER`.
fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let f: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let dev = std::str::from_utf8(f.get(2)?).ok()?;
            let (major, minor) = dev.split_once(':')?;
            let sep = f.iter().position(|x| *x == b"-")?;
            Some(MountEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                point: PathBuf::from(OsString::from_vec(unescape(f.get(4)?))),
                fstype: String::from_utf8_lossy(f.get(sep + 1)?).into_owned(),
            })
        })
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Whether a process other than this one has an argument naming `dir` or
/// a path below it: a tool the run started (`losetup --find --show
/// DIR/disk/disk`, `mount ... DIR/root`, `mkfs.ext4 ... DIR/disk/disk`).
fn names_dir(dir: &Path) -> bool {
    // This process's own name in /proc (not `process::id()`, its number in
    // its own PID namespace, which /proc may not show): its argument names
    // the directory too.
    let me = std::fs::read_link("/proc/self").unwrap_or_default();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|p| {
            let n = p.file_name();
            n.as_bytes().iter().all(u8::is_ascii_digit) && Path::new(&n) != me
        })
        .any(|p| {
            std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|a| Path::new(OsStr::from_bytes(a)).starts_with(dir))
            })
        })
}

/// Abort the FUSE connection, unmount the ext4 and detach the loop devices,
/// in that order, leaving FUSE mounted (aborted); what failed goes to
/// `errors`, what was done to `did`.
fn take_down(dir: &Path, told: &Told, errors: &mut Vec<String>, did: &mut Did) {
    let fuse_point = dir.join("disk");
    let root_point = dir.join("root");
    let all = mounts();
    for m in all
        .iter()
        .filter(|m| m.point == fuse_point && m.fstype.starts_with("fuse"))
    {
        match abort_fuse(m) {
            Ok(()) => did.note("aborted the FUSE connection"),
            Err(e) => errors.push(format!(
                "{}: cannot abort FUSE connection {}: {e}",
                fuse_point.display(),
                m.minor
            )),
        }
    }
    if (told.root || all.iter().any(|m| m.point == root_point)) && lazy_unmount(&root_point, errors)
    {
        did.note("unmounted the ext4");
    }
    for dev in detach_loops(dir, told, errors) {
        did.note(format!("detached {}", dev.display()));
    }
}

/// What is still there of `dir`: its mounts, the loop devices on its disk
/// file, the directory.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut left: Vec<String> = mounts()
        .into_iter()
        .filter(|m| m.point.starts_with(dir))
        .map(|m| format!("the mount {}", m.point.display()))
        .collect();
    left.extend(
        loops_on(&dir.join("disk").join(DISK_NAME), &[])
            .into_iter()
            .map(|d| format!("loop device {}", d.display())),
    );
    if dir.exists() {
        left.push(format!("the directory {}", dir.display()));
    }
    left
}

/// `echo 1 > /sys/fs/fuse/connections/N/abort`, mounting fusectl if needed.
fn abort_fuse(m: &MountEntry) -> std::io::Result<()> {
    if m.major != 0 {
        return Err(std::io::Error::other(format!(
            "device {}:{} is not an anonymous device",
            m.major, m.minor
        )));
    }
    let abort = Path::new(FUSECTL).join(m.minor.to_string()).join("abort");
    if !abort.exists() && !mounts().iter().any(|x| x.point == Path::new(FUSECTL)) {
        nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
    }
    std::fs::write(&abort, b"1")
}

/// `umount -l POINT`, unless it is no longer mounted; whether it unmounted.
fn lazy_unmount(point: &Path, errors: &mut Vec<String>) -> bool {
    match umount2(point, MntFlags::MNT_DETACH) {
        Ok(()) => true,
        // Not a mount point (any more): taken down meanwhile.
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => false,
        Err(e) => {
            errors.push(format!("{}: cannot unmount: {e}", point.display()));
            false
        }
    }
}

/// The loop devices whose backing file is `file`: the ones told, and any
/// other (attached before the run could tell).
fn loops_on(file: &Path, told: &[PathBuf]) -> Vec<PathBuf> {
    let mut devs: Vec<PathBuf> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.file_name())
        .filter(|n| n.as_bytes().starts_with(b"loop"))
        .map(|n| Path::new("/dev").join(n))
        .chain(told.iter().cloned())
        .filter(|dev| backing_file(dev).as_deref() == Some(file))
        .collect();
    devs.sort();
    devs.dedup();
    devs
}

/// The backing file of loop device `dev` (from sysfs: the file itself is
/// not looked at).
fn backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?;
    let p = Path::new("/sys/block").join(name).join("loop/backing_file");
    let b = std::fs::read(p).ok()?;
    let b = b.strip_suffix(b"\n").unwrap_or(&b);
    Some(PathBuf::from(OsStr::from_bytes(b)))
}

/// `losetup -d` each loop device on the disk file; those detached.
fn detach_loops(dir: &Path, told: &Told, errors: &mut Vec<String>) -> Vec<PathBuf> {
    let file = dir.join("disk").join(DISK_NAME);
    let mut detached = Vec::new();
    for dev in loops_on(&file, &told.loops) {
        match crate::export::run_tool(Command::new("losetup").arg("-d").arg(&dev)) {
            Ok(_) => detached.push(dev),
            Err(e) => errors.push(e.to_string()),
        }
    }
    detached
}

/// Remove the mount points and the directory
/// ([`crate::export::remove_work_dirs`]); whether any was there to remove.
fn remove_dirs(dir: &Path, errors: &mut Vec<String>) -> bool {
    let r = crate::export::remove_work_dirs(dir);
    errors.extend(
        r.failed
            .iter()
            .map(|(p, e)| format!("{}: cannot remove: {e}", p.display())),
    );
    r.removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_device_point_and_type() {
        let text = b"36 25 0:31 / /tmp/a\\040b/overlaybd-kernel-x/disk rw,nosuid - fuse.overlaybd-kernel overlaybd-kernel rw\n\
                     40 36 7:3 / /tmp/x/root rw shared:1 - ext4 /dev/loop3 rw\n\
                     garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m,
            vec![
                MountEntry {
                    major: 0,
                    minor: 31,
                    point: "/tmp/a b/overlaybd-kernel-x/disk".into(),
                    fstype: "fuse.overlaybd-kernel".into(),
                },
                MountEntry {
                    major: 7,
                    minor: 3,
                    point: "/tmp/x/root".into(),
                    fstype: "ext4".into(),
                },
            ]
        );
    }

    #[test]
    fn unescape_keeps_a_lone_backslash() {
        assert_eq!(unescape(b"a\\134b\\0"), b"a\\b\\0");
        assert_eq!(unescape(b"\\011x"), b"\tx");
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nState:\tZ (zombie)\nShdPnd:\t0000000000000100\n";
        assert_eq!(field(s, "State:"), Some("Z (zombie)"));
        assert_eq!(field(s, "ShdPnd:"), Some("0000000000000100"));
        assert_eq!(field(s, "SigPnd:"), None);
    }

    #[test]
    fn what_was_done_is_listed_once_each() {
        let mut did = Did::default();
        assert_eq!(did.list(), None);
        did.note("a");
        assert_eq!(did.list().as_deref(), Some("a"));
        did.note("b");
        did.note("a");
        did.note("c");
        assert_eq!(did.list().as_deref(), Some("a, b and c"));
    }

    #[test]
    fn tags_round_trip() {
        for t in [Tag::Fuse, Tag::Loop, Tag::Root, Tag::Done] {
            assert_eq!(Tag::of(t.byte()), Some(t));
        }
        assert_eq!(Tag::of(b'?'), None);
    }
}
