//! `overlaybd-fuse`: mount an overlaybd layer stack through FUSE.
//!
//! The doc comments of the argument structs are clap's `--help` text, where `[:TAG]`
//! means an optional part, not an intra-doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use blockdev::io::{set_default_backend, IoBackend};
use clap::{Parser, Subcommand};
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
                  Stop with Ctrl-C, SIGTERM or `fusermount -u MOUNTPOINT`."
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

    /// Return once the mount is ready and keep serving in the background.
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

    /// File I/O backend: io_uring, pread, or auto.
    #[arg(long, value_name = "uring|pread|auto", default_value = "auto")]
    io: IoBackend,

    /// Debug logging (OVERLAYBD_LOG overrides).
    #[arg(short, long)]
    verbose: bool,

    #[command(flatten)]
    remote: obdimage::cli::RemoteArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    // (Checked here, not by clap: the daemon runs without --background.)
    if a.log.is_some() && !a.background && !daemon {
        let _ = writeln!(
            std::io::stderr(),
            "overlaybd-fuse: error: --log needs --background (in the foreground, messages go to stderr)"
        );
        return ExitCode::from(2);
    }
    let r = if a.background && !daemon {
        start_background(&a)
    } else {
        run(&a, daemon)
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if daemon {
                // The parent relays this line.
                print_out(format_args!("error: {e:#}"));
            } else {
                let _ = writeln!(std::io::stderr(), "overlaybd-fuse: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(a: &MountArgs, daemon: bool) -> Result<()> {
    set_default_backend(a.io);
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
            // Detach from the parent's pipe and working directory.
            if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(&null);
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
            nix::sys::signal::Signal::try_from(s)
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
/// ready (or fails).
fn start_background(a: &MountArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|x| x != "--background")
        .collect();
    let stderr = match &a.log {
        Some(p) => Stdio::from(open_log(p)?),
        None => Stdio::null(),
    };
    let mut child = Command::new(exe)
        .args(args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .context("cannot start the daemon")?;
    let out = child.stdout.take().expect("piped stdout");
    let mut ready = None;
    let mut errors = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading the daemon's status")?;
        if let Some(r) = line.strip_prefix("ready ") {
            ready = Some(r.to_string());
            break;
        }
        errors.push(line.strip_prefix("error: ").unwrap_or(&line).to_string());
    }
    match ready {
        Some(line) => {
            print_out(format_args!("{line} (daemon pid {})", child.id()));
            Ok(())
        }
        None => {
            let st = child.wait().context("waiting for the daemon")?;
            if errors.is_empty() {
                bail!("the daemon exited ({st}) before the mount was ready");
            }
            bail!("{}", errors.join("; "))
        }
    }
}
