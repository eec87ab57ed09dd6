//! `overlaybd-fuse`: mount an overlaybd layer stack through FUSE.
//!
//! The doc comments of the argument structs are clap's `--help` text, where `[:TAG]`
//! means an optional part, not an intra-doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blockdev::io::{set_default_backend, IoBackend};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use obdfuse::session::STOP_SIGNALS;
use obdfuse::{Ended, ImageSpec, Mode, MountConfig, MountRequest};

/// Set in the environment of the daemon started by `--background`.
const DAEMON_ENV: &str = "OVERLAYBD_FUSE_DAEMON";

#[derive(Parser, Debug)]
#[command(
    name = "overlaybd-fuse",
    version,
    about = "Mount an overlaybd layer stack or converted image through FUSE",
    long_about = "Mount an overlaybd layer stack or converted image through FUSE, without \
                  root (fusermount3 is used), NBD or a loop device.\n\n\
                  Block mode (default) shows the virtual disk as MOUNTPOINT/disk; mount it \
                  with `mount -o loop` (root) or `fuse2fs -o ro` (no root). With --fs the \
                  files of the filesystem inside (ext4, or EROFS from TurboOCI --fstype erofs \
                  images; detected from the superblock) are served directly, read-only.\n\n\
                  Stop with Ctrl-C, SIGTERM, SIGHUP or `fusermount -u MOUNTPOINT`."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mount and serve until unmounted or signalled.
    Mount(MountArgs),
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// Layer files (sealed LSMT, ZFile, tar-wrapped; bottom first), or one
    /// overlaybd config.json, or one converted image oci:DIR[:TAG], or one
    /// converted image in a registry HOST/REPO[:TAG|@sha256:DIGEST] (read
    /// lazily); then the mountpoint (an existing directory).
    #[arg(required = true, num_args = 1.., value_name = "SOURCE... MOUNTPOINT")]
    args: Vec<String>,

    /// Writable upper layer (made by overlaybd-create): writes, discards and
    /// fsync go there; seal it afterwards with overlaybd-commit.
    #[arg(long, num_args = 2, value_names = ["DATA", "INDEX"])]
    upper: Option<Vec<PathBuf>>,

    /// Serve the files of the filesystem inside (ext4 or EROFS) instead of
    /// the disk (read-only).
    #[arg(long)]
    fs: bool,

    /// With --fs: cache at most this much metadata (inodes, directories,
    /// block maps; bytes, or with a K, M or G suffix); what the kernel
    /// forgets is dropped too.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = obdimage::cli::parse_size)]
    meta_cache: u64,

    /// Never write, even with an upper layer.
    #[arg(long)]
    read_only: bool,

    /// Return once the mount is ready and keep serving in the background
    /// (Ctrl-C, SIGTERM or SIGHUP before that stops the daemon too).
    #[arg(long)]
    background: bool,

    /// With --background: append the daemon's log messages to this file
    /// (created if missing). It may be a FIFO, which must have a reader
    /// already (it is not waited for), or /dev/null.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,

    /// Threads serving FUSE requests (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    threads: usize,

    /// Let other users access the mount (a non-root user needs
    /// user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    allow_other: bool,

    /// File I/O backend: uring (every read and write), pread (none), or auto
    /// (batches of reads through io_uring when the kernel allows it). Default:
    /// the environment variable OVERLAYBD_IO, else auto.
    #[arg(long, value_name = "uring|pread|auto")]
    io: Option<IoBackend>,

    /// Debug logging (OVERLAYBD_LOG overrides).
    #[arg(short, long)]
    verbose: bool,

    #[command(flatten)]
    remote: obdimage::cli::RemoteArgs,
}

/// Set in the daemon when the mount is ready and it detaches from the
/// parent's pipe: from then on its failures go to stderr (the `--log` file),
/// not to the parent, which no longer reads them.
static DETACHED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    // A write to the upper layer past `ulimit -f` fails with EFBIG (EIO to
    // the writer) instead of SIGXFSZ killing the server, mount left behind.
    let _ = obdsignals::fail_writes_past_file_size_limit();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Cmd::Mount(a) = cli.cmd;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("OVERLAYBD_LOG").unwrap_or_else(|_| {
            // fuser warns about requests we leave to the kernel's defaults
            // and about unmounting what fusermount already unmounted.
            tracing_subscriber::EnvFilter::new(if a.verbose {
                "debug"
            } else {
                "warn,fuser=error"
            })
        });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    // A server stopped just before may still be flushing a writable upper.
    blockdev::lsmt::set_claim_wait(blockdev::lsmt::TOOL_CLAIM_WAIT);
    // Say so when that wait is for a layer that really is in use.
    blockdev::lsmt::set_claim_notice(Some(|m| {
        let _ = writeln!(std::io::stderr(), "overlaybd-fuse: {m}");
    }));
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    if daemon {
        // The parent blocks these while it waits for us to get ready, and
        // the mask is inherited: until serving (which handles them), they
        // must stop us, as the parent's stop_daemon expects.
        let _ = SigSet::from_iter(STOP_SIGNALS).thread_unblock();
    }
    // The daemon's arguments were checked (and warned about) by its parent.
    if !daemon {
        let m = matches
            .subcommand_matches("mount")
            .expect("mount is the only subcommand");
        match check_usage(&a, m) {
            Ok(warnings) => {
                for w in warnings {
                    let _ = writeln!(std::io::stderr(), "overlaybd-fuse: warning: {w}");
                }
            }
            Err(msg) => {
                let _ = writeln!(std::io::stderr(), "overlaybd-fuse: error: {msg}");
                return ExitCode::from(2);
            }
        }
    }
    let r = if a.background && !daemon {
        start_background(&a)
    } else {
        run(&a, daemon).map(|()| ExitCode::SUCCESS)
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // Each cause once (a cause that repeats its context is dropped).
            let line = obdimage::error::Chain(e.as_ref());
            if daemon && !DETACHED.load(Ordering::Relaxed) {
                // The parent relays this line.
                print_out(format_args!("error: {line}"));
            } else if daemon {
                // After the mount was ready: the parent is gone and stdout
                // is /dev/null; stderr is the --log file.
                let _ = writeln!(std::io::stderr(), "overlaybd-fuse: error: {line}");
            } else {
                let _ = writeln!(std::io::stderr(), "overlaybd-fuse: error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The usage errors clap cannot see (exit code 2, as clap's own, with the
/// message returned here); runtime failures (a file that cannot be opened,
/// a registry that does not answer, a failed mount) exit 1 later. Returns
/// warnings about flags that are given (`m`: the command line) but do not
/// apply.
fn check_usage(a: &MountArgs, m: &clap::ArgMatches) -> std::result::Result<Vec<String>, String> {
    // (Checked here, not by clap: the daemon runs without --background.)
    if a.log.is_some() && !a.background {
        return Err("--log needs --background (in the foreground, messages go to stderr)".into());
    }
    let Some((_, sources)) = a.args.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err("give the layers (or config.json, oci:DIR[:TAG] or an image reference) and then the mountpoint".into());
    };
    obdimage::cli::check_sources(sources)?;
    let mut warnings = Vec::new();
    let remote_given = obdimage::cli::remote_flags_given(m);
    if !remote_given.is_empty() && !obdimage::cli::is_registry_source(sources) {
        warnings.push(obdimage::cli::ignored_remote_flags(&remote_given));
    }
    if !a.fs && m.value_source("meta_cache") == Some(clap::parser::ValueSource::CommandLine) {
        warnings.push("--meta-cache only applies with --fs: ignored".into());
    }
    Ok(warnings)
}

fn run(a: &MountArgs, daemon: bool) -> Result<()> {
    // Without --io, OVERLAYBD_IO (or auto) applies, as in every user of blockdev.
    if let Some(io) = a.io {
        set_default_backend(io);
    }
    if a.args.len() < 2 {
        bail!("give the layers (or config.json, oci:DIR[:TAG] or an image reference) and then the mountpoint");
    }
    let (sources, mp) = a.args.split_at(a.args.len() - 1);
    let mp = PathBuf::from(&mp[0]);
    obdfuse::session::check_mountpoint(&mp)?;
    let mp = mp
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve the mountpoint", mp.display()))?;
    let upper = a.upper.as_ref().map(|v| (v[0].clone(), v[1].clone()));
    let spec = ImageSpec::from_args(sources, upper, &a.remote.options()?)?;
    let fetch_stats = spec.fetch_stats.clone();
    let mode = if a.fs { Mode::Fs } else { Mode::Block };
    let req = MountRequest {
        writable: spec.upper.is_some() && !a.read_only && mode == Mode::Block,
        spec,
        mode,
        mount: MountConfig {
            mountpoint: mp.clone(),
            read_only: true,
            threads: a.threads,
            allow_other: a.allow_other,
            default_permissions: false,
            fsname: "overlaybd".into(),
        },
        cache_bytes: usize::try_from(a.meta_cache).unwrap_or(usize::MAX),
    };
    let ended = obdfuse::mount(&req, |r| {
        let what = match mode {
            Mode::Block => format!("{}/{}", mp.display(), obdfuse::block::DISK_NAME),
            Mode::Fs => format!(
                "{} ({} files)",
                mp.display(),
                r.fs.map(|f| f.to_string()).unwrap_or_default()
            ),
        };
        let line = format!(
            "overlaybd-fuse: serving {} ({} bytes, {}) at {what}; stop with Ctrl-C or `fusermount -u {}`",
            r.description,
            r.disk_size,
            if r.writable { "writable" } else { "read-only" },
            mp.display()
        );
        if daemon {
            print_out(format_args!("ready {line}"));
            // Detach from the parent's pipe and working directory (without
            // --log, stderr is that pipe too: the parent relays the messages
            // from before the mount was ready).
            DETACHED.store(true, Ordering::Relaxed);
            if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(&null);
                if a.log.is_none() {
                    let _ = nix::unistd::dup2_stderr(&null);
                }
            }
            let _ = std::env::set_current_dir("/");
        } else {
            print_out(format_args!("{line}"));
        }
    })?;
    let how = match ended {
        Ended::Unmounted => "unmounted".to_string(),
        Ended::Signal(s) => format!(
            "stopped by {}",
            Signal::try_from(s)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| s.to_string())
        ),
    };
    let fetched = fetch_stats
        .map(|s| format!("; registry: {}", s.summary()))
        .unwrap_or_default();
    let line = format!(
        "overlaybd-fuse: {} {how}{}{fetched}",
        mp.display(),
        if req.writable {
            "; upper layer flushed"
        } else {
            ""
        }
    );
    if daemon {
        // Its stdout is gone; stderr is the --log file.
        let _ = writeln!(std::io::stderr(), "{line}");
    } else {
        print_out(format_args!("{line}"));
    }
    Ok(())
}

/// Print a line to stdout (flushed); dropped if stdout is closed or broken (a
/// reader that went away must not turn a served mount into a failure).
fn print_out(line: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}").and_then(|_| o.flush());
}

/// Open the `--log` file for appending, without waiting: a FIFO that no
/// process reads fails at once (its plain open would block until one does).
fn open_log(p: &Path) -> Result<std::fs::File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::File::options()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => anyhow!(
                "--log {}: a FIFO (or socket) that no process reads; start its reader first",
                p.display()
            ),
            _ => anyhow!(e).context(format!("cannot open the log file {}", p.display())),
        })?;
    // Blocking writes again: a FIFO's slow reader delays log lines, rather
    // than making the daemon drop them.
    fcntl(&f, FcntlArg::F_GETFL)
        .and_then(|fl| {
            let fl = OFlag::from_bits_truncate(fl) - OFlag::O_NONBLOCK;
            fcntl(&f, FcntlArg::F_SETFL(fl))
        })
        .with_context(|| format!("cannot set up the log file {}", p.display()))?;
    Ok(f)
}

/// Start this program again as a daemon and wait until it reports the mount
/// ready (or fails). SIGINT, SIGTERM or SIGHUP meanwhile stops the daemon
/// (it must not mount later, unseen) and ends with 128 + the signal's number.
fn start_background(a: &MountArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|x| x != "--background")
        .collect();
    // The daemon's status lines come on its stdout. Without --log its stderr
    // is the same pipe until the mount is ready, so that its warnings then
    // (layers out of order, a mountpoint that is not empty) are relayed here;
    // with --log they go there, and this one is said here too.
    let (status, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map(|(r, w)| (std::fs::File::from(r), std::fs::File::from(w)))
        .context("cannot make a pipe for the daemon")?;
    let stderr = match &a.log {
        Some(p) => {
            if let Some(mp) = a.args.last().map(Path::new) {
                if obdfuse::session::check_mountpoint(mp).is_ok() {
                    obdfuse::session::warn_if_not_empty(mp);
                }
            }
            Stdio::from(open_log(p)?)
        }
        None => Stdio::from(
            status_w
                .try_clone()
                .context("cannot make a pipe for the daemon")?,
        ),
    };
    // Blocked before the daemon starts, so that none of them can end this
    // process with the daemon left behind; they are read from a signalfd
    // while waiting. (The daemon inherits the mask and unblocks them.)
    let stops = obdsignals::block(&STOP_SIGNALS).context("cannot block SIGINT/SIGTERM/SIGHUP")?;
    let sfd = SignalFd::with_flags(&stops, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("cannot watch for SIGINT/SIGTERM/SIGHUP")?;
    let mut child = Command::new(exe)
        .args(args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(status_w)
        .stderr(stderr)
        // Its own process group: a Ctrl-C at the terminal later is not for it.
        .process_group(0)
        .spawn()
        .context("cannot start the daemon")?;
    // (The Command, with this process's copies of the pipe's write end, is
    // gone: the pipe ends when the daemon exits or detaches.)
    match wait_for_daemon(status, &sfd) {
        Ok(Status::Ready(line)) => {
            print_out(format_args!("{line} (daemon pid {})", child.id()));
            Ok(ExitCode::SUCCESS)
        }
        Ok(Status::Exited(errors)) => {
            let st = child.wait().context("waiting for the daemon")?;
            if errors.is_empty() {
                bail!("the daemon exited ({st}) before the mount was ready");
            }
            bail!("{}", errors.join("; "))
        }
        Ok(Status::Stopped(sig)) => {
            let how = stop_daemon(&mut child);
            let _ = writeln!(
                std::io::stderr(),
                "overlaybd-fuse: {sig}: stopped the daemon (pid {}{how}) before the mount was ready",
                child.id()
            );
            Ok(ExitCode::from(128 + sig as u8))
        }
        Err(e) => {
            stop_daemon(&mut child);
            Err(e)
        }
    }
}

/// How waiting for the daemon ended.
enum Status {
    /// It reported the mount ready: its line.
    Ready(String),
    /// It exited first, after reporting these errors.
    Exited(Vec<String>),
    /// A stop signal came first.
    Stopped(Signal),
}

/// Read the daemon's status lines from `out` until it reports ready or
/// exits, or a stop signal arrives on `sfd`.
fn wait_for_daemon(mut out: impl Read + AsFd, sfd: &SignalFd) -> Result<Status> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pending = Vec::new();
    let mut errors = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(out.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => r.context("waiting for the daemon")?,
        };
        let [signalled, readable] = fds.map(|f| f.revents().is_some_and(|r| !r.is_empty()));
        if signalled {
            if let Some(info) = sfd.read_signal().context("reading a signal")? {
                let sig = i32::try_from(info.ssi_signo)
                    .ok()
                    .and_then(|s| Signal::try_from(s).ok())
                    .unwrap_or(Signal::SIGTERM);
                return Ok(Status::Stopped(sig));
            }
        }
        if !readable {
            continue;
        }
        let n = match out.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.context("reading the daemon's status")?,
        };
        if n == 0 {
            if !pending.is_empty() {
                errors.push(String::from_utf8_lossy(&pending).into_owned());
            }
            return Ok(Status::Exited(errors));
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw[..i]).into_owned();
            if let Some(r) = line.strip_prefix("ready ") {
                return Ok(Status::Ready(r.to_string()));
            }
            match line.strip_prefix("error: ") {
                Some(e) => errors.push(e.to_string()),
                // The daemon's log (its stderr, without --log), said as it comes.
                None => {
                    let _ = writeln!(std::io::stderr(), "{line}");
                }
            }
        }
    }
}

/// How long a daemon stopped before it was ready gets to exit after SIGTERM
/// (it unmounts if it had mounted) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Stop the daemon and wait for it: SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]. Returns what had to be done beyond SIGTERM, for the
/// message.
fn stop_daemon(child: &mut Child) -> &'static str {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_GRACE {
        if !matches!(child.try_wait(), Ok(None)) {
            return "";
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    ", killed: it did not stop on SIGTERM"
}
