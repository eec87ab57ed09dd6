//! Running a FUSE filesystem on a mountpoint until it is unmounted.
//!
//! [`serve`] mounts, reports readiness, serves requests on several threads
//! and returns once the mount is gone: after `fusermount -u`/`umount`, or
//! after SIGINT/SIGTERM/SIGHUP, which unmount it (lazily when it is busy, so
//! a loop device or an open file keeps working until released). A second
//! signal exits at once with status 128 + the signal's number, after saving
//! what a writable mount must keep ([`serve_saving`]). A daemon that is
//! killed leaves a dead mountpoint ("Transport endpoint is not connected")
//! that `fusermount -u` removes. A stop signal the process was started with
//! ignored (SIGHUP under `nohup`, SIGINT in a script's `cmd &`) stays ignored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, Filesystem, MountOption, Session, SessionACL, SessionUnmounter};
use nix::sys::signal::Signal;

use crate::error::{Error, Result};

/// A line to stderr that never panics: a closed or broken stderr (a `| tee`
/// ended by the same Ctrl-C, a dropped SSH session) must not end the signal
/// thread, which `eprintln!` would.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The signals that stop a mount: unmount it, a second one exits.
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Where.
    pub mountpoint: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
    /// Threads serving requests (at least 1).
    pub threads: usize,
    /// Let other users than the mounting one in (`allow_other`; for a
    /// non-root user this needs `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Let the kernel check permissions against the stored modes and owners.
    pub default_permissions: bool,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The mount was removed from outside (`fusermount -u`, `umount`).
    Unmounted,
    /// A signal asked us to stop and we unmounted.
    Signal(i32),
}

/// Refuse a mountpoint that is not a usable directory, naming the fix for a
/// dead FUSE mount left by a killed daemon. Silent: mounting ([`serve`],
/// [`spawn`]) warns about a mountpoint that is not empty
/// ([`warn_if_not_empty`]), so that a caller checking early does not make
/// it say so twice.
pub fn check_mountpoint(mp: &Path) -> Result<()> {
    // stat may be answered from the kernel's attribute cache even when the
    // daemon behind a FUSE mount is gone; opening the directory is not.
    let md = std::fs::metadata(mp);
    let usable = match &md {
        Ok(m) if m.is_dir() => std::fs::read_dir(mp).map(|_| ()),
        _ => Ok(()),
    };
    match md.and_then(|m| usable.map(|()| m)) {
        Ok(md) if md.is_dir() && is_fuse_mount_root(mp, &md) => Err(Error::Usage(format!(
            "{}: a FUSE filesystem is already mounted there; unmount it first (`fusermount -u {}`) or choose another directory",
            mp.display(),
            mp.display()
        ))),
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(Error::Usage(format!(
            "{}: the mountpoint is not a directory",
            mp.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(Error::Usage(format!(
            "{}: a dead FUSE mount is still there (its daemon was killed); \
             remove it with `fusermount -u {}`",
            mp.display(),
            mp.display()
        ))),
        Err(e) => Err(Error::io(mp, "cannot use the mountpoint", e)),
    }
}

/// Warn that what `mp` holds is hidden while mounted, if it holds anything.
pub fn warn_if_not_empty(mp: &Path) {
    if std::fs::read_dir(mp).is_ok_and(|mut d| d.next().is_some()) {
        tracing::warn!(
            "{}: the mountpoint is not empty: what it holds is hidden while the image is mounted",
            mp.display()
        );
    }
}

/// Whether `mp` (a directory, `md` its metadata) is the root of a FUSE mount:
/// another device than its parent's, and a FUSE filesystem. Mounting over it
/// would stack two mounts that one unmount takes down together.
fn is_fuse_mount_root(mp: &Path, md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = mp
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let other_dev = parent
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|pm| pm.dev() != md.dev());
    other_dev
        && nix::sys::statfs::statfs(mp)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
}

/// Mount `fs` as `cfg` says, call `ready` once the kernel can send requests,
/// and serve until the mount goes away.
pub fn serve<F: Filesystem>(fs: F, cfg: &MountConfig, ready: impl FnOnce()) -> Result<Ended> {
    serve_saving(fs, cfg, ready, None)
}

/// Makes every write a mount has completed durable and refuses later ones
/// (see [`serve_saving`]).
pub type Save = Box<dyn FnOnce() -> Result<()> + Send>;

/// [`serve`], with `save` (for a writable mount) called by a second stop
/// signal before the process exits: that exit does not wait for the mount
/// to go, nor for [`serve`] to return to its caller, who would otherwise
/// save the writes. The exit status is 128 + the signal's number once
/// `save` succeeded (or without one), 1 when it failed.
pub fn serve_saving<F: Filesystem>(
    fs: F,
    cfg: &MountConfig,
    ready: impl FnOnce(),
    save: Option<Save>,
) -> Result<Ended> {
    let mp = &cfg.mountpoint;
    check_mountpoint(mp)?;
    warn_if_not_empty(mp);
    // Block the stop signals before any thread starts, so that every thread
    // inherits the mask and only the signal thread below receives them.
    let sigs = obdsignals::block(&STOP_SIGNALS)
        .map_err(|e| Error::io(mp, "cannot block SIGINT/SIGTERM/SIGHUP", e.into()))?;
    let stops = obdsignals::Stops::new(&sigs)
        .map_err(|e| Error::io(mp, "cannot watch for SIGINT/SIGTERM/SIGHUP", e.into()))?;

    let mut session = new_session(fs, cfg)?;
    let unmounter = session.unmount_callable();
    let got = Arc::new(AtomicI32::new(0));
    {
        let got = got.clone();
        let mp = mp.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(stops, unmounter, &mp, &got, save))
            .map_err(|e| Error::io(&cfg.mountpoint, "cannot start the signal thread", e))?;
    }
    ready();
    session_end(session.run()).map_err(|e| Error::io(mp, "serving the mount failed", e))?;
    Ok(match got.load(Ordering::SeqCst) {
        0 => Ended::Unmounted,
        s => Ended::Signal(s),
    })
}

/// The end of a session's serving threads (fuser's `run`), with the kernel's
/// abort of the connection taken for what it is: the end of the mount. When
/// the mount goes (an unmount, or the last user of a lazily detached one
/// letting go) the kernel aborts the connection; a thread waiting for a
/// request then reads ENODEV, which fuser takes for the end, but a read
/// that was taking a request off the queue at that moment fails with
/// ECONNABORTED, which fuser returns as a failure (the daemon exited 1 once
/// the last user of a detached mount let go, in 2 of 300 runs).
fn session_end(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        r => r,
    }
}

fn signal_loop(
    mut stops: obdsignals::Stops,
    mut unmounter: SessionUnmounter,
    mp: &Path,
    got: &AtomicI32,
    mut save: Option<Save>,
) {
    while let Ok(sig) = stops.wait() {
        if got.swap(sig as i32, Ordering::SeqCst) != 0 {
            quick_exit(sig, save.take());
        }
        tracing::info!("{sig}: unmounting {}", mp.display());
        if let Err(e) = unmounter.unmount() {
            // Said once done, so that whoever reads it sees the mount gone.
            detach(mp);
            say!(
                "overlaybd-fuse: {}: {e}; detached it lazily (served until its last user lets go)",
                mp.display()
            );
        }
    }
}

/// Exit at once on a second stop signal `sig`, after `save` (see
/// [`serve_saving`]). Further signals stay blocked (pending) meanwhile, so a
/// third one cannot cut the save short.
fn quick_exit(sig: Signal, save: Option<Save>) -> ! {
    let code = 128 + sig as i32;
    match save.map(|save| save()) {
        None => {
            say!("overlaybd-fuse: {sig} again: exiting without waiting for the mount");
            std::process::exit(code)
        }
        Some(Ok(())) => {
            say!(
                "overlaybd-fuse: {sig} again: completed writes saved; exiting without waiting for the mount"
            );
            std::process::exit(code)
        }
        Some(Err(e)) => {
            say!(
                "overlaybd-fuse: {sig} again: {}; exiting without waiting for the mount: writes may be lost",
                blockdev::error::Chain(&e)
            );
            std::process::exit(1)
        }
    }
}

/// How long [`unmount_when_idle`] retries a busy mount by default.
pub const BUSY_RETRY: Duration = Duration::from_secs(5);

/// `umount2(mp)`, retried for at most `limit` while it fails with EBUSY.
///
/// A mount can stay busy for a moment after its owner closed the last file
/// in it: a child process that another thread is starting holds a copy of
/// every descriptor until it execs, and udev probes a loop device after each
/// change. Fails with the last error (EPERM for a non-root user, who must
/// go through fusermount).
pub fn unmount_when_idle(mp: &Path, limit: Duration) -> nix::Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match nix::mount::umount2(mp, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if start.elapsed() < limit => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// Lazy unmount: `umount2(MNT_DETACH)` as root, `fusermount3 -u -z` otherwise.
pub fn detach(mp: &Path) {
    if nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return;
    }
    for tool in ["fusermount3", "fusermount"] {
        if let Ok(st) = Command::new(tool).args(["-u", "-z", "--"]).arg(mp).status() {
            if st.success() {
                return;
            }
        }
    }
    tracing::error!("cannot detach {}", mp.display());
}

/// A FUSE session for `fs` mounted as `cfg` says.
fn new_session<F: Filesystem>(fs: F, cfg: &MountConfig) -> Result<Session<F>> {
    let mp = &cfg.mountpoint;
    let mut opts = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("overlaybd".into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        if cfg.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if cfg.default_permissions {
        opts.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = opts;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));

    Session::new(fs, mp, &config).map_err(|e| match dev_fuse_denied() {
        // fuser does not go through fusermount3 then, and it would not help:
        // fusermount3 opens /dev/fuse with the user's rights too ("failed to
        // open /dev/fuse: Permission denied"), the device's mode being how
        // an administrator grants FUSE to users.
        Some(dev) => Error::io(
            mp,
            format!(
                "cannot mount: this user may not open /dev/fuse ({dev}), nor can fusermount3 \
                 for it; make /dev/fuse accessible (crw-rw-rw-, as most distributions ship it: \
                 `chmod 0666 /dev/fuse`; or give the user its group, with mode 0660), or run \
                 as root"
            ),
            e,
        ),
        None => Error::io(
            mp,
            "cannot mount (is /dev/fuse usable? as a non-root user fusermount3 must be installed)",
            e,
        ),
    })
}

/// When this process may not open /dev/fuse (a non-root user, the device
/// 0600 or group-restricted): its mode and owner, `crw------- root:root`.
fn dev_fuse_denied() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    const DEV: &str = "/dev/fuse";
    let denied = std::fs::File::options()
        .read(true)
        .write(true)
        .open(DEV)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    if !denied {
        return None;
    }
    let Ok(md) = std::fs::metadata(DEV) else {
        return Some("its mode unknown".into());
    };
    let bits: String = (0..9)
        .map(|i| {
            let on = md.mode() & (0o400 >> i) != 0;
            match (on, i % 3) {
                (false, _) => '-',
                (true, 0) => 'r',
                (true, 1) => 'w',
                (true, _) => 'x',
            }
        })
        .collect();
    let name = |id: u32, user: bool| {
        let n = if user {
            nix::unistd::User::from_uid(id.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        } else {
            nix::unistd::Group::from_gid(id.into())
                .ok()
                .flatten()
                .map(|g| g.name)
        };
        n.unwrap_or_else(|| id.to_string())
    };
    Some(format!(
        "c{bits} {}:{}",
        name(md.uid(), true),
        name(md.gid(), false)
    ))
}

/// A mount served by background threads, for a program that uses the mount
/// itself (a loop device over `MOUNTPOINT/disk`, say) and decides when it
/// ends: no signal handling here, the owner stops it with [`Background::stop`]
/// (or by dropping it, which unmounts, lazily when the mount is still busy).
pub struct Background {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

/// Mount `fs` as `cfg` says and serve it on background threads until
/// [`Background::stop`].
pub fn spawn<F: Filesystem + Send + 'static>(fs: F, cfg: &MountConfig) -> Result<Background> {
    check_mountpoint(&cfg.mountpoint)?;
    warn_if_not_empty(&cfg.mountpoint);
    let session = new_session(fs, cfg)?
        .spawn()
        .map_err(|e| Error::io(&cfg.mountpoint, "cannot start the FUSE threads", e))?;
    Ok(Background {
        session: Some(session),
        mountpoint: cfg.mountpoint.clone(),
    })
}

impl Background {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount and wait for the serving threads to end. Fails (and detaches
    /// the mount lazily) when the mount is still in use.
    pub fn stop(mut self) -> Result<()> {
        let session = self.session.take().expect("stopped only once");
        unmount_and_join(session, &self.mountpoint).map_err(|e| {
            detach(&self.mountpoint);
            Error::io(
                &self.mountpoint,
                "cannot unmount (detached lazily: it goes once its last user lets go)",
                e,
            )
        })
    }
}

/// Unmount (waiting out a briefly busy mount) and join the serving threads,
/// which end when they find the mount gone. A non-root user's umount2 fails
/// with EPERM: fuser then goes through fusermount.
fn unmount_and_join(session: fuser::BackgroundSession, mp: &Path) -> std::io::Result<()> {
    match unmount_when_idle(mp, BUSY_RETRY) {
        Ok(()) => session_end(session.join()),
        Err(nix::errno::Errno::EPERM) => session_end(session.umount_and_join()),
        Err(e) => Err(e.into()),
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Unmounting ends the serving threads. When that fails the mount
            // is busy: detach it and leave the threads serving its last user.
            if let Err(e) = unmount_and_join(session, &self.mountpoint) {
                tracing::warn!(
                    "{}: cannot unmount: {e}; detaching",
                    self.mountpoint.display()
                );
                detach(&self.mountpoint);
            }
        }
    }
}
