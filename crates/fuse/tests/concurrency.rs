//! Several FUSE requests are served at once: a device that lets a read
//! finish only once `N` reads are inside it at the same time can only be
//! read through the mount if the server runs them in parallel (a serial
//! server would never let a second read in, and the guard below turns that
//! into EIO instead of a hang).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockdev::{BlockDevice, MemDevice};
use obdfuse::block::DiskFs;
use obdfuse::session::{serve, MountConfig};

const READERS: usize = 4;

/// Reads wait at a rendezvous of `READERS` while armed (only reads that
/// touch `gated` byte ranges, when it is not empty).
struct Rendezvous {
    inner: Arc<MemDevice>,
    gated: Vec<(u64, u64)>,
    armed: AtomicBool,
    /// Set once the rendezvous timed out: every later read fails too, so a
    /// kernel retry cannot pass the test.
    failed: AtomicBool,
    inside: Mutex<usize>,
    cv: Condvar,
}

impl BlockDevice for Rendezvous {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(blockdev::Error::Invalid(
                "reads were not served concurrently".into(),
            ));
        }
        let end = offset + buf.len() as u64;
        let gated = self.gated.is_empty() || self.gated.iter().any(|&(a, b)| offset < b && a < end);
        if gated && self.armed.load(Ordering::SeqCst) {
            let mut n = self.inside.lock().unwrap();
            *n += 1;
            self.cv.notify_all();
            // A deadlock guard, not a timing assertion: a serial server
            // never gets here with READERS reads at once.
            let (n, timeout) = self
                .cv
                .wait_timeout_while(n, Duration::from_secs(30), |n| *n < READERS)
                .unwrap();
            drop(n);
            if timeout.timed_out() {
                self.failed.store(true, Ordering::SeqCst);
                return Err(blockdev::Error::Invalid(
                    "reads were not served concurrently".into(),
                ));
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> blockdev::Result<()> {
        Err(blockdev::Error::ReadOnly)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> blockdev::Result<()> {
        Err(blockdev::Error::ReadOnly)
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

fn config(mp: &std::path::Path) -> MountConfig {
    MountConfig {
        mountpoint: mp.to_path_buf(),
        read_only: true,
        threads: READERS,
        allow_other: false,
        default_permissions: false,
        fsname: "overlaybd-test".into(),
    }
}

#[test]
fn block_mode_serves_reads_in_parallel() {
    let t = tempfile::tempdir().unwrap();
    let mp: PathBuf = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let mem = MemDevice::new(64 << 20);
    for i in 0..READERS {
        mem.write_at(&[i as u8 + 1; 4096], (i as u64) << 24)
            .unwrap();
    }
    let dev = Arc::new(Rendezvous {
        inner: Arc::new(mem),
        gated: Vec::new(),
        armed: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        inside: Mutex::new(0),
        cv: Condvar::new(),
    });
    let cfg = config(&mp);
    let fs = DiskFs::new(dev.clone(), false, 0, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || serve(fs, &cfg, || tx.send(()).unwrap()));
    rx.recv().unwrap();
    let disk = mp.join("disk");
    dev.armed.store(true, Ordering::SeqCst);
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let f = std::fs::File::open(disk).unwrap();
                let mut b = [0u8; 4096];
                f.read_exact_at(&mut b, (i as u64) << 24).map(|()| b[0])
            })
        })
        .collect();
    let got: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    dev.armed.store(false, Ordering::SeqCst);
    std::process::Command::new("fusermount")
        .arg("-u")
        .arg(&mp)
        .status()
        .unwrap();
    server.join().unwrap().unwrap();
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(g.expect("read through the mount"), i as u8 + 1);
    }
}

#[test]
fn fs_mode_reads_file_data_in_parallel() {
    // An ext4 in memory with one file per reader.
    let mem = Arc::new(MemDevice::new(64 << 20));
    obdfs::mkfs(mem.clone(), &obdfs::MkfsOptions::default()).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..READERS {
        let data = vec![i as u8 + 1; 512 << 10];
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    obdfs::apply_tar(mem.clone(), &tar[..], obdfs::ApplyOptions::default()).unwrap();
    // Where the files' data lives: only reads there wait at the rendezvous,
    // so metadata reads (under libext2fs's lock) never do.
    let mut gated = Vec::new();
    {
        let mut fs = obdfs::ext2fs::Ext2Fs::open_read_only(mem.clone(), 1 << 20).unwrap();
        let bs = fs.block_size();
        for i in 0..READERS {
            let ino = fs.lookup(2, format!("f{i}").as_bytes()).unwrap().unwrap();
            let mut inode = fs.read_inode(ino).unwrap();
            for r in fs.block_map(ino, &mut inode).unwrap() {
                gated.push((r.pblk * bs, (r.pblk + r.len) * bs));
            }
        }
    }
    assert!(!gated.is_empty());
    let dev = Arc::new(Rendezvous {
        inner: mem,
        gated,
        armed: AtomicBool::new(true),
        failed: AtomicBool::new(false),
        inside: Mutex::new(0),
        cv: Condvar::new(),
    });
    let t = tempfile::tempdir().unwrap();
    let mp: PathBuf = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let fs = obdfuse::tree::TreeFs::new(obdfuse::ext4::Ext4Tree::open(dev.clone()).unwrap());
    let cfg = config(&mp);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || serve(fs, &cfg, || tx.send(()).unwrap()));
    rx.recv().unwrap();
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let p = mp.join(format!("f{i}"));
            std::thread::spawn(move || std::fs::read(p).map(|d| (d.len(), d[0], d[d.len() - 1])))
        })
        .collect();
    let got: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    std::process::Command::new("fusermount")
        .arg("-u")
        .arg(&mp)
        .status()
        .unwrap();
    server.join().unwrap().unwrap();
    for (i, g) in got.into_iter().enumerate() {
        let v = i as u8 + 1;
        assert_eq!(g.expect("read through the mount"), (512 << 10, v, v));
    }
}
