//! Helpers for the FUSE integration tests: running `overlaybd-fuse`, the
//! tools it works with, loop mounts, and teardown that always unmounts.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub use testutil::{assert_ok, assert_same_tree, err_text, fixtures, run_ok, tool};

/// The binary under test.
pub fn fuse_bin() -> &'static str {
    env!("CARGO_BIN_EXE_overlaybd-fuse")
}

/// A binary of another workspace package (convertor, overlaybd-create, ...),
/// built into the same target directory as this test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    // The profile of this test build: target/<profile>/deps/<test>.
    let release = dir.file_name().is_some_and(|n| n == "release");
    assert!(
        p.exists(),
        "{} is not built; run `cargo build{} --workspace --bins` (cargo test --workspace builds it)",
        p.display(),
        if release { " --release" } else { "" }
    );
    p
}

/// A new sparse writable layer of `gib` GiB (`overlaybd-create -s`) in
/// `dir`: its data and index files.
pub fn sparse_upper(dir: &Path, gib: u64) -> (PathBuf, PathBuf) {
    let (data, index) = (dir.join("data"), dir.join("index"));
    run_ok(
        Command::new(workspace_bin("overlaybd-create"))
            .arg("-s")
            .arg(&data)
            .arg(&index)
            .arg(gib.to_string()),
    );
    (data, index)
}

/// The reference stack of the upstream fixtures: the base layer and the
/// committed layer holding `input.tar`, as pushed (tar-wrapped lz4 ZFile).
pub fn fixture_layers() -> Vec<PathBuf> {
    let b = fixtures().join("baselayer");
    vec![b.join("ext4_64"), b.join("commit.lz4.zfile.tar")]
}

/// `tests/images/build.py`.
pub fn build_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/build.py")
}

/// `build.py <args>`, returning stdout.
pub fn build_py_run(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    run_ok(Command::new(tool("python3")).arg(build_py()).args(args)).stdout
}

/// Build `build.py <kind>` into `dir` and convert `layout:tag` to `tag_obd`
/// with the convertor; returns the OCI layout holding both.
pub fn converted_image(kind: &str, dir: &Path, sub: &str, tag: &str) -> PathBuf {
    build_py_run(&[kind.as_ref(), dir.as_os_str()]);
    let layout = dir.join(sub);
    run_ok(
        Command::new(workspace_bin("convertor"))
            .arg("-r")
            .arg(format!("oci:{}", layout.display()))
            .args(["-i", tag, "-o", &format!("{tag}_obd")])
            .arg("-d")
            .arg(dir.join("work")),
    );
    layout
}

/// The tree of a directory as build.py sees it (content, mode, owner, mtime,
/// xattrs, symlinks, devices, hard-link groups) as JSON.
pub fn scan(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&build_py_run(&["scan".as_ref(), dir.as_os_str()])).unwrap()
}

/// The reference tree of `tag` in an OCI layout (layers merged by build.py).
pub fn reference_tree(layout: &Path, tag: &str) -> serde_json::Value {
    serde_json::from_slice(&build_py_run(&[
        "tree".as_ref(),
        layout.as_os_str(),
        tag.as_ref(),
    ]))
    .unwrap()
}

/// Whether `path` is a mountpoint (listed in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// A mounted `overlaybd-fuse`; unmounts (and reaps a foreground daemon) on drop.
pub struct Fuse {
    pub mp: PathBuf,
    pub child: Option<Child>,
    pub ready: String,
}

impl Fuse {
    /// `overlaybd-fuse mount --background ARGS... MP`.
    pub fn background(args: &[&std::ffi::OsStr], mp: &Path) -> Fuse {
        Self::background_env(args, mp, &[])
    }

    /// The same, with what the mount command printed (its warnings).
    pub fn background_output(args: &[&std::ffi::OsStr], mp: &Path) -> (Fuse, std::process::Output) {
        Self::background_env_output(args, mp, &[])
    }

    /// The same with environment variables (e.g. `OVERLAYBD_LOG`) set.
    pub fn background_env(args: &[&std::ffi::OsStr], mp: &Path, env: &[(&str, &str)]) -> Fuse {
        Self::background_env_output(args, mp, env).0
    }

    fn background_env_output(
        args: &[&std::ffi::OsStr],
        mp: &Path,
        env: &[(&str, &str)],
    ) -> (Fuse, std::process::Output) {
        std::fs::create_dir_all(mp).unwrap();
        let o = run_ok(
            Command::new(fuse_bin())
                .arg("mount")
                .arg("--background")
                .args(args)
                .arg(mp)
                .envs(env.iter().copied()),
        );
        assert!(is_mounted(mp), "not mounted after --background returned");
        let f = Fuse {
            mp: mp.to_path_buf(),
            child: None,
            ready: String::from_utf8_lossy(&o.stdout).into_owned(),
        };
        (f, o)
    }

    /// `overlaybd-fuse mount ARGS... MP` in the foreground; returns once it
    /// printed its ready line.
    pub fn foreground(args: &[&std::ffi::OsStr], mp: &Path) -> Fuse {
        let mut cmd = Command::new(fuse_bin());
        cmd.arg("mount").args(args).arg(mp);
        Self::spawn(cmd, mp)
    }

    /// [`foreground`](Self::foreground), started with the signal `sig`
    /// (`HUP`, `INT`, ...) ignored, as `nohup` or a script's `cmd &` do.
    pub fn foreground_ignoring(sig: &str, args: &[&std::ffi::OsStr], mp: &Path) -> Fuse {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("trap '' {sig}; exec \"$0\" mount \"$@\""))
            .arg(fuse_bin())
            .args(args)
            .arg(mp);
        Self::spawn(cmd, mp)
    }

    fn spawn(mut cmd: Command, mp: &Path) -> Fuse {
        // Foreground daemons are stopped with signals.
        testutil::default_stop_signals();
        std::fs::create_dir_all(mp).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.contains("serving") {
            let o = child.wait_with_output().unwrap();
            panic!(
                "overlaybd-fuse did not get ready: {line}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Fuse {
            mp: mp.to_path_buf(),
            child: Some(child),
            ready: line,
        }
    }

    pub fn disk(&self) -> PathBuf {
        self.mp.join("disk")
    }

    /// The daemon's pid (foreground only).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Wait for a foreground daemon to exit and return its output (the
    /// mount, if still there, is cleaned up when `self` is dropped).
    pub fn wait(&mut self) -> Output {
        self.child.take().unwrap().wait_with_output().unwrap()
    }

    /// Unmount with `fusermount -u` (the daemon then exits). A client that was
    /// just stopped (a fuse2fs daemon, a loop device being torn down) may hold the
    /// disk open a moment longer: "busy" is retried for a few seconds.
    pub fn unmount(&self) {
        let o = retry_busy(|| {
            Command::new(tool("fusermount"))
                .arg("-u")
                .arg(&self.mp)
                .output()
        });
        assert!(
            o.status.success(),
            "unmounting {} failed: {}",
            self.mp.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if is_mounted(&self.mp) {
            let _ = Command::new("fusermount").arg("-u").arg(&self.mp).status();
        }
        if is_mounted(&self.mp) {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        }
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Runs an unmount command until it stops failing with "busy" (for up to 5 s):
/// right after a client closed the disk (a fuse2fs daemon exiting, udev or blkid
/// probing a fresh loop device) the mount can stay busy for a moment on a loaded
/// machine. Returns the last attempt's output.
fn retry_busy(mut unmount: impl FnMut() -> std::io::Result<Output>) -> Output {
    let mut attempts = 0;
    loop {
        let o = unmount().unwrap();
        attempts += 1;
        if o.status.success()
            || attempts == 50
            || !String::from_utf8_lossy(&o.stderr).contains("busy")
        {
            return o;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A kernel mount (loop device or fuse2fs); unmounted on drop.
pub struct KernelMount {
    pub mp: PathBuf,
    fuse: bool,
}

impl KernelMount {
    /// `mount -o loop,OPTS IMAGE MP`.
    pub fn loop_mount(image: &Path, mp: &Path, opts: &str) -> KernelMount {
        std::fs::create_dir_all(mp).unwrap();
        run_ok(
            Command::new(tool("mount"))
                .args(["-o", &format!("loop,{opts}")])
                .arg(image)
                .arg(mp),
        );
        KernelMount {
            mp: mp.to_path_buf(),
            fuse: false,
        }
    }

    /// `fuse2fs -o ro IMAGE MP`.
    pub fn fuse2fs(image: &Path, mp: &Path) -> KernelMount {
        std::fs::create_dir_all(mp).unwrap();
        run_ok(
            Command::new(tool("fuse2fs"))
                .arg(image)
                .arg(mp)
                .args(["-o", "ro"]),
        );
        KernelMount {
            mp: mp.to_path_buf(),
            fuse: true,
        }
    }

    /// Unmount now, failing the test if that fails.
    pub fn unmount(mut self) {
        self.do_unmount(true);
    }

    fn do_unmount(&mut self, check: bool) {
        if !is_mounted(&self.mp) {
            return;
        }
        let out = retry_busy(|| {
            if self.fuse {
                Command::new("fusermount").arg("-u").arg(&self.mp).output()
            } else {
                Command::new("umount").arg(&self.mp).output()
            }
        });
        if check {
            assert!(
                out.status.success(),
                "unmounting {} failed: {}",
                self.mp.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        } else if is_mounted(&self.mp) {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        self.do_unmount(false);
    }
}

/// Everything `lstat` says about every path under `root`, the root itself
/// (as ".") included, and the inode numbers `readdir` gives (`d_ino`).
pub fn stat_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let line = |m: &std::fs::Metadata| {
        format!(
            "ino={} mode={:o} nlink={} uid={} gid={} size={} blocks={} rdev={:x} \
                     atime={}.{:09} mtime={}.{:09} ctime={}.{:09}",
            m.ino(),
            m.mode(),
            m.nlink(),
            m.uid(),
            m.gid(),
            m.size(),
            m.blocks(),
            m.rdev(),
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )
    };
    out.insert(".".into(), line(&std::fs::symlink_metadata(root).unwrap()));
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(rel, format!("{} d_ino={}", line(&m), e.ino()));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

pub fn assert_same_stats(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) {
    let mut d = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => d.push(format!("missing: {k}")),
            Some(g) if g != w => d.push(format!("{k}:\n  fuse   {g}\n  kernel {w}")),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        d.push(format!("unexpected: {k}"));
    }
    assert!(d.is_empty(), "{} differences:\n{}", d.len(), d.join("\n"));
}
