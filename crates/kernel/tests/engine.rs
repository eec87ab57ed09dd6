//! The kernel engine against real components: kernel FUSE, loop devices,
//! the kernel's ext4, mkfs.ext4, e2fsck, debugfs (through treecmp.py). These
//! tests need root; they fail, not skip, without it (CI runs as root).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::stack::LowerSource;
use blockdev::{BlockDevice, RawFileDevice, Stack};
use obdfs::{Engine, Job, Libext2fs};
use obdkernel::{Error, Kernel, KernelOptions, Requirements};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the kernel engine mounts FUSE, loop devices and ext4: run this test as root (CI does)"
    );
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fs")
}

/// The multi-layer test set of `tests/fs/make-layers.py`, made once.
struct LayerSet {
    _dir: tempfile::TempDir,
    layers: Vec<PathBuf>,
    malicious: Vec<(PathBuf, String)>,
    reference: PathBuf,
}

fn layer_set() -> &'static LayerSet {
    static SET: OnceLock<LayerSet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        testutil::run_ok(
            std::process::Command::new("python3")
                .arg(scripts().join("make-layers.py"))
                .arg(d),
        );
        let layers: Vec<PathBuf> = std::fs::read_to_string(d.join("layers.txt"))
            .unwrap()
            .lines()
            .map(|l| d.join(l))
            .collect();
        let malicious = std::fs::read_to_string(d.join("malicious.txt"))
            .unwrap()
            .lines()
            .map(|l| {
                let (f, e) = l.split_once('\t').unwrap();
                (d.join(f), e.to_string())
            })
            .collect();
        let mut args = vec!["reference".to_string()];
        args.extend(layers.iter().map(|p| p.to_str().unwrap().to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let reference = d.join("reference.json");
        std::fs::write(&reference, testutil::treecmp(&a)).unwrap();
        LayerSet {
            _dir: dir,
            layers,
            malicious,
            reference,
        }
    })
}

/// Kernel engine options with a private work directory under `d`, so that
/// leftovers can be looked for there.
fn kernel(d: &Path) -> (Kernel, PathBuf) {
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let k = Kernel::new(KernelOptions {
        work_dir: Some(work.clone()),
        ..Default::default()
    })
    .unwrap();
    (k, work)
}

fn apply(engine: &dyn Engine, dev: &Arc<dyn BlockDevice>, mkfs: bool, tar: &Path) {
    let mut f = std::fs::File::open(tar).unwrap();
    engine
        .apply(
            dev.clone(),
            Job {
                mkfs,
                tar: &mut f,
                progress: None,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {}: {e:?}", engine.name(), tar.display()));
}

/// Manifest of the ext4 image `img` (debugfs through treecmp.py).
fn image_manifest(img: &Path, out: &Path) {
    std::fs::write(out, testutil::treecmp(&["image", img.to_str().unwrap()])).unwrap();
}

/// The tree of the ext4 image `img` is the tree the `tars` unpacked in order
/// give (treecmp.py, manifests written into `d`); returns the image's manifest.
fn assert_same_as_reference<'a>(
    d: &Path,
    img: &Path,
    tars: impl Iterator<Item = &'a PathBuf>,
) -> PathBuf {
    let (ours, refj) = (d.join("ours.json"), d.join("ref.json"));
    image_manifest(img, &ours);
    let mut args = vec!["reference"];
    args.extend(tars.map(|t| t.to_str().unwrap()));
    std::fs::write(&refj, testutil::treecmp(&args)).unwrap();
    testutil::treecmp(&["compare", refj.to_str().unwrap(), ours.to_str().unwrap()]);
    ours
}

fn e2fsck_clean(img: &Path) {
    if let Err(out) = testutil::e2fsck(img) {
        panic!("e2fsck -fn {} is not clean:\n{out}", img.display());
    }
}

/// Nothing of the engine left: no mount below `work` (ext4 or FUSE), no
/// loop device on a file there, and the work directory itself empty.
fn assert_nothing_left(work: &Path) {
    let w = work.to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(w)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:#?}");
    let out = testutil::run_ok(std::process::Command::new("losetup").args([
        "-l",
        "-n",
        "-O",
        "NAME,BACK-FILE",
    ]));
    let loops = String::from_utf8_lossy(&out.stdout).into_owned();
    let left: Vec<&str> = loops.lines().filter(|l| l.contains(w)).collect();
    assert!(left.is_empty(), "loop devices left behind: {left:#?}");
    let entries: Vec<_> = std::fs::read_dir(work).unwrap().collect();
    assert!(entries.is_empty(), "work directory not empty: {entries:?}");
}

/// All layers through one engine onto a sparse raw image; its manifest.
fn all_layers(engine: &dyn Engine, img: &Path, manifest: &Path) {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(img, 4 << 30).unwrap());
    for (i, l) in layer_set().layers.iter().enumerate() {
        apply(engine, &dev, i == 0, l);
    }
    drop(dev);
    e2fsck_clean(img);
    image_manifest(img, manifest);
}

#[test]
fn kernel_engine_tree_equals_reference_and_libext2fs() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let set = layer_set();
    all_layers(&k, &d.join("kernel.img"), &d.join("kernel.json"));
    assert_nothing_left(&work);
    all_layers(
        &Libext2fs::default(),
        &d.join("lib.img"),
        &d.join("lib.json"),
    );
    let (kj, lj, rj) = (
        d.join("kernel.json"),
        d.join("lib.json"),
        set.reference.clone(),
    );
    testutil::treecmp(&["compare", rj.to_str().unwrap(), kj.to_str().unwrap()]);
    testutil::treecmp(&["compare", lj.to_str().unwrap(), kj.to_str().unwrap()]);
    // The kernel's mkfs.ext4 made it: upstream's embedded options.
    let out = testutil::run_ok(
        std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(d.join("kernel.img")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("has_journal"), "{text}");
    assert!(!text.contains("metadata_csum"), "{text}");
    assert!(text.contains("Filesystem UUID:          <none>"), "{text}");
}

/// A chain of writable layers, each applied by `engines[i % 2]`, read back
/// through our stack reader.
fn chain(d: &Path, engines: [&dyn Engine; 2]) -> PathBuf {
    let set = layer_set();
    let mut lowers: Vec<LowerSource> = Vec::new();
    for (i, l) in set.layers.iter().enumerate() {
        let data = d.join(format!("data{i}"));
        let index = d.join(format!("index{i}"));
        create_writable(
            &data,
            &index,
            &CreateOptions {
                virtual_size: if i == 0 { 8 << 30 } else { 0 },
                sparse: true,
                parent_uuid: None,
                uuid: None,
            },
        )
        .unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(
            Stack::open_sources(&lowers, Some((&data, &index)), WritableLayer::open).unwrap(),
        );
        apply(engines[i % 2], &dev, i == 0, l);
        drop(dev);
        lowers.push(LowerSource::Writable { data, index });
    }
    let flat = d.join("flat.img");
    Stack::open_sources(&lowers, None, WritableLayer::open_read_only)
        .unwrap()
        .write_raw_image(&flat)
        .unwrap();
    for i in 0..set.layers.len() {
        std::fs::remove_file(d.join(format!("data{i}"))).unwrap();
        std::fs::remove_file(d.join(format!("index{i}"))).unwrap();
    }
    flat
}

#[test]
fn kernel_layers_stack_with_libext2fs_layers() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let lib = Libext2fs::default();
    let set = layer_set();
    for (name, engines) in [
        ("kernel-first", [&k as &dyn Engine, &lib]),
        ("libext2fs-first", [&lib as &dyn Engine, &k]),
    ] {
        let sub = d.join(name);
        std::fs::create_dir(&sub).unwrap();
        let flat = chain(&sub, engines);
        e2fsck_clean(&flat);
        let m = sub.join("flat.json");
        image_manifest(&flat, &m);
        testutil::treecmp(&[
            "compare",
            set.reference.to_str().unwrap(),
            m.to_str().unwrap(),
        ]);
        std::fs::remove_file(&flat).unwrap();
    }
    assert_nothing_left(&work);
}

#[test]
fn mkfs_and_mount_options_reach_the_filesystem() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    let opts = KernelOptions {
        work_dir: Some(work.clone()),
        ..Default::default()
    }
    .with_fstype("ext4;noatime,discard;-I 512 -O metadata_csum -L obdtest")
    .unwrap();
    let k = Kernel::new(opts).unwrap();
    let img = d.join("fs.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 1 << 30).unwrap());
    // Seen from the progress callback, which runs while the ext4 is mounted.
    let seen = Mutex::new(String::new());
    let mut cb = |_: &obdfs::ApplyStats| {
        let w = work.to_str().unwrap().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if let Some(l) = info
            .lines()
            .find(|l| l.contains(&w) && l.contains(" ext4 "))
        {
            *seen.lock().unwrap() = l.to_string();
        }
    };
    let mut tar = std::fs::File::open(&layer_set().layers[0]).unwrap();
    k.apply(
        dev.clone(),
        Job {
            mkfs: true,
            tar: &mut tar,
            progress: Some(&mut cb),
        },
    )
    .unwrap();
    drop(dev);
    let line = seen.lock().unwrap().clone();
    let opts = line.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "noatime"),
        "noatime not in the mount's options: {line}"
    );
    let out = testutil::run_ok(std::process::Command::new("dumpe2fs").arg("-h").arg(&img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Inode size:\t          512"), "{text}");
    assert!(text.contains("Filesystem volume name:   obdtest"), "{text}");
    assert!(text.contains("metadata_csum"), "{text}");
    e2fsck_clean(&img);
    assert_nothing_left(&work);
}

/// A reader that hands out `good` bytes of a real layer and then fails, as
/// a broken download would.
struct FailAfter<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for FailAfter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("injected failure"));
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[test]
fn failures_mid_apply_leave_nothing_behind() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let set = layer_set();
    let img = d.join("fs.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 1 << 30).unwrap());

    // 1. The stream fails half-way through the first layer.
    let big = &set.layers[0];
    let len = std::fs::metadata(big).unwrap().len();
    let mut r = FailAfter {
        inner: std::fs::File::open(big).unwrap(),
        left: len / 2,
    };
    let e = k
        .apply(
            dev.clone(),
            Job {
                mkfs: true,
                tar: &mut r,
                progress: None,
            },
        )
        .unwrap_err();
    assert!(
        format!("{e}").contains("injected failure")
            || format!("{e:?}").contains("injected failure"),
        "{e:?}"
    );
    assert_nothing_left(&work);

    // 2. A corrupt header after good entries.
    let mut bad = std::fs::read(big).unwrap();
    bad.truncate(len as usize / 2 / 512 * 512);
    bad.extend_from_slice(&[0x5a; 512]);
    bad.extend_from_slice(&[0u8; 1024]);
    let e = k
        .apply(
            dev.clone(),
            Job {
                mkfs: true,
                tar: &mut bad.as_slice(),
                progress: None,
            },
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("malformed tar") || e.to_string().contains("tar"),
        "{e}"
    );
    assert_nothing_left(&work);

    // 3. A mkfs that fails (a bad option).
    let bad_mkfs = Kernel::new(KernelOptions {
        work_dir: Some(work.clone()),
        mkfs_options: vec!["-O".into(), "no_such_feature".into()],
        ..Default::default()
    })
    .unwrap();
    let e = bad_mkfs
        .apply(
            dev.clone(),
            Job {
                mkfs: true,
                tar: &mut std::io::empty(),
                progress: None,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("mkfs.ext4"), "{e}");
    assert_nothing_left(&work);

    // 4. A mount that fails (a bad option).
    let bad_mount = Kernel::new(KernelOptions {
        work_dir: Some(work.clone()),
        mount_options: Some("no_such_option".into()),
        ..Default::default()
    })
    .unwrap();
    let e = bad_mount
        .apply(
            dev.clone(),
            Job {
                mkfs: true,
                tar: &mut std::io::empty(),
                progress: None,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("mount"), "{e}");
    assert_nothing_left(&work);

    // 5. Layers that must be refused, refused with the libext2fs engine's
    // words, each on top of a fresh first layer.
    for (tar, want) in &set.malicious {
        apply(&k, &dev, true, big);
        let mut f = std::fs::File::open(tar).unwrap();
        let e = k
            .apply(
                dev.clone(),
                Job {
                    mkfs: false,
                    tar: &mut f,
                    progress: None,
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().contains(want.as_str()),
            "{}: {e}",
            tar.display()
        );
        assert_nothing_left(&work);
    }

    // 6. Cancelled (Ctrl-C) before the first entry.
    let flag = Arc::new(AtomicBool::new(true));
    let cancelled = Kernel::new(KernelOptions {
        work_dir: Some(work.clone()),
        cancel: Some(flag),
        ..Default::default()
    })
    .unwrap();
    let mut f = std::fs::File::open(big).unwrap();
    let e = cancelled
        .apply(
            dev.clone(),
            Job {
                mkfs: false,
                tar: &mut f,
                progress: None,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert_nothing_left(&work);
}

/// A device whose large writes fail once armed, as a full disk under the
/// upper layer fails the writeback of file data while the metadata still fits.
struct FullDisk {
    inner: RawFileDevice,
    armed: AtomicBool,
}

impl BlockDevice for FullDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        if self.armed.load(std::sync::atomic::Ordering::Relaxed) && buf.len() >= 64 << 10 {
            return Err(blockdev::Error::io(
                "/dev/full-upper",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.trim(offset, len)
    }
}

/// Writes the kernel's ext4 issues in writeback, after the engine's own
/// calls returned, fail the apply: ext4 logs such an error and drops it, and
/// the unmount succeeds, so only the FUSE side sees it.
#[test]
fn device_write_errors_fail_the_apply() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let disk = Arc::new(FullDisk {
        inner: RawFileDevice::create(d.join("fs.img"), 1 << 30).unwrap(),
        armed: AtomicBool::new(false),
    });
    let dev: Arc<dyn BlockDevice> = disk.clone();
    k.make_fs(dev.clone()).unwrap();
    assert_nothing_left(&work);

    // One 8 MiB file: its data reaches the device in large writeback writes.
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("big"), &data).unwrap();
    let tar = d.join("layer.tar");
    testutil::run_ok(
        std::process::Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("big"),
    );

    disk.armed.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut f = std::fs::File::open(&tar).unwrap();
    let e = k
        .apply_layer(dev.clone(), false, &mut f, None)
        .expect_err("an apply whose data could not be written must fail");
    let text = format!("{e}");
    assert!(
        text.contains("/dev/full-upper") && text.contains("No space left on device"),
        "{text}"
    );
    assert!(
        matches!(e, Error::Device { count, .. } if count > 0) || text.contains("tar entry"),
        "{e:?}"
    );
    assert_nothing_left(&work);
}

#[test]
fn missing_requirements_are_named() {
    require_root();
    for (req, want) in [
        (
            Requirements {
                fuse: "/nonexistent/fuse".into(),
                ..Default::default()
            },
            "/nonexistent/fuse",
        ),
        (
            Requirements {
                loop_control: "/nonexistent/loop-control".into(),
                ..Default::default()
            },
            "/nonexistent/loop-control",
        ),
        (
            Requirements {
                tools: vec!["mkfs.no-such-fs"],
                ..Default::default()
            },
            "mkfs.no-such-fs",
        ),
    ] {
        let e = Kernel::new(KernelOptions {
            requirements: req,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(want) && text.contains("libext2fs"), "{text}");
    }
    let e = KernelOptions::default().with_fstype("xfs;;").unwrap_err();
    assert!(e.to_string().contains("ext4 only"), "{e}");
}

/// A hard link to its own name (`tar cf x.tar f f`) changes nothing: the file
/// stays, in the layer that made it and in a layer above, as GNU tar and
/// erofs-utils have it (it failed: "hard link target does not exist", the
/// file having been removed to make room for the link).
#[test]
fn a_hard_link_to_itself_keeps_the_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let tars = testutil::self_link_tars(d);
    let img = d.join("kernel.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 1 << 30).unwrap());
    for (i, t) in tars.iter().enumerate() {
        apply(&k, &dev, i == 0, t);
    }
    drop(dev);
    assert_nothing_left(&work);
    e2fsck_clean(&img);
    let ours = assert_same_as_reference(d, &img, tars.iter());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ours).unwrap()).unwrap();
    assert_eq!(m["z/in"]["size"], 7, "{m}");
}

/// A layer's entry for the root directory (`./`, `./.`) gives the root its
/// owner, mode, mtime and xattrs, in the bottom layer and above, and `/.` is
/// skipped: the same root as the libext2fs engine and upstream's libtar
/// ([`testutil::EXT4_ROOT_AFTER`]). The entry was skipped before.
#[test]
fn the_root_entry_sets_the_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    let tars = testutil::root_entry_tars(d);
    let img = d.join("kernel.img");
    for (i, t) in tars.iter().enumerate() {
        let dev: Arc<dyn BlockDevice> = Arc::new(if i == 0 {
            RawFileDevice::create(&img, 1 << 30).unwrap()
        } else {
            RawFileDevice::open_rw(&img).unwrap()
        });
        apply(&k, &dev, i == 0, t);
        drop(dev);
        e2fsck_clean(&img);
        let (mode, uid, gid, mtime, xattrs) = testutil::ext4_root(&img);
        assert_eq!(
            (mode, uid, gid, mtime, xattrs.join(" ").as_str()),
            testutil::EXT4_ROOT_AFTER[i],
            "root after layer {i}"
        );
    }
    assert_nothing_left(&work);
    assert_same_as_reference(d, &img, tars.iter());
}

/// The mtime (seconds) of `path` in the ext4 image `img` (debugfs).
fn ext4_mtime(img: &Path, path: &str) -> u32 {
    let o = testutil::run_ok(
        std::process::Command::new(testutil::tool("debugfs"))
            .args(["-R", &format!("stat {path}")])
            .arg(img),
    );
    let stat = String::from_utf8_lossy(&o.stdout).into_owned();
    let m = stat
        .split(" mtime:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no mtime in debugfs stat {path}:\n{stat}"));
    u32::from_str_radix(m.trim_start_matches("0x").split(':').next().unwrap(), 16).unwrap()
}

/// The directories mkfs makes (the root and `lost+found`) have time 0, as
/// the libext2fs engine makes them, when the bottom layer does not give the
/// root a time: mkfs.ext4 stamped them with the clock, so the kernel
/// engine's images had the conversion's date on `/`, differing from the
/// libext2fs engine's tree and from one run to the next. Both for a mkfs
/// alone (`overlaybd-create --mkfs`) and for an apply that makes the ext4.
#[test]
fn the_directories_mkfs_makes_have_time_zero() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k, work) = kernel(d);
    // The bottom layer has no entry for the root.
    let tar = testutil::root_entry_tars(d)[3].clone();
    let lib_img = d.join("lib.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&lib_img, 1 << 30).unwrap());
    apply(&Libext2fs::default(), &dev, true, &tar);
    drop(dev);
    let want = [
        ext4_mtime(&lib_img, "/"),
        ext4_mtime(&lib_img, "/lost+found"),
    ];
    assert_eq!(want, [0, 0]);

    let img = d.join("kernel.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 1 << 30).unwrap());
    apply(&k, &dev, true, &tar);
    drop(dev);
    assert_nothing_left(&work);
    e2fsck_clean(&img);
    let got = [ext4_mtime(&img, "/"), ext4_mtime(&img, "/lost+found")];
    assert_eq!(got, want, "apply with mkfs: / and /lost+found");

    let img = d.join("mkfs.img");
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFileDevice::create(&img, 1 << 30).unwrap());
    k.make_fs(dev.clone()).unwrap();
    assert_nothing_left(&work);
    e2fsck_clean(&img);
    let got = [ext4_mtime(&img, "/"), ext4_mtime(&img, "/lost+found")];
    assert_eq!(got, want, "mkfs alone: / and /lost+found");
    apply(&k, &dev, false, &tar);
    drop(dev);
    assert_nothing_left(&work);
    let got = [ext4_mtime(&img, "/"), ext4_mtime(&img, "/lost+found")];
    assert_eq!(got, want, "mkfs, then an apply: / and /lost+found");
}

/// A work directory whose filesystem runs out of inodes while the engine makes its
/// mountpoints fails the apply naming the directory it could not create, and
/// leaves nothing behind (the engine's `overlaybd-kernel-*` directory was left).
#[test]
fn a_work_dir_out_of_inodes_leaves_nothing_behind() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    // The tmpfs root and the engine's directory take the two inodes: its
    // mountpoints below it cannot be made.
    testutil::run_ok(std::process::Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        "size=1m,nr_inodes=2",
        "none",
        work.to_str().unwrap(),
    ]));
    let k = Kernel::new(KernelOptions {
        work_dir: Some(work.clone()),
        ..Default::default()
    })
    .unwrap();
    let dev: Arc<dyn BlockDevice> =
        Arc::new(RawFileDevice::create(d.join("fs.img"), 1 << 30).unwrap());
    let mut f = std::fs::File::open(&layer_set().layers[0]).unwrap();
    let e = k.apply(
        dev,
        Job {
            mkfs: true,
            tar: &mut f,
            progress: None,
        },
    );
    // Names only: a `DirEntry` keeps the directory open, and the tmpfs busy.
    let entries: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    testutil::run_ok(std::process::Command::new("umount").arg(&work));
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("cannot create") && e.contains("overlaybd-kernel-"),
        "{e}"
    );
    assert!(
        entries.is_empty(),
        "left in the work directory: {entries:?}"
    );
}
