//! Lazy mode through the real kernel FUSE: an image converted by our
//! convertor into a real docker-registry is mounted by reference, its blobs
//! fetched on demand. Bytes fetched are counted by a TCP proxy in front of
//! the registry (independently of the daemon's own counters).

mod common;
#[path = "../../registry/tests/common/mod.rs"]
mod services;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use services::{Proxy, Registry};
use sha2::{Digest as _, Sha256};

const REPO: &str = "lazy/bench";

/// A registry holding `build.py bench` (tag `bench`) and its overlaybd
/// conversion (`bench_obd`) made by our convertor.
struct Image {
    reg: Registry,
    layout: PathBuf,
    /// The converted image's layer digests and sizes.
    layers: Vec<(String, u64)>,
    /// The converted image's manifest digest.
    digest: String,
}

impl Image {
    fn new(dir: &Path) -> Image {
        let reg = Registry::plain();
        let layout = dir.join("img");
        build_py_run(&[
            "bench".as_ref(),
            layout.as_os_str(),
            "--size-mb".as_ref(),
            "24".as_ref(),
        ]);
        run_ok(
            Command::new(tool("skopeo"))
                .args([
                    "copy",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    "--quiet",
                ])
                .arg(format!("oci:{}:bench", layout.display()))
                .arg(format!("docker://{}/{REPO}:bench", reg.host())),
        );
        run_ok(
            Command::new(workspace_bin("convertor"))
                .args(["-r", &format!("{}/{REPO}", reg.host())])
                .args(["-i", "bench", "-o", "bench_obd", "--plain", "--vsize", "1"])
                .arg("-d")
                .arg(dir.join("work")),
        );
        let (desc, bytes) = reg
            .client(REPO)
            .get_manifest(&obdoci::Reference::Tag("bench_obd".into()))
            .unwrap();
        let m: obdoci::Manifest = serde_json::from_slice(&bytes).unwrap();
        let layers = m
            .layers
            .iter()
            .map(|l| (l.digest.to_string(), l.size))
            .collect();
        Image {
            reg,
            layout,
            layers,
            digest: desc.digest.to_string(),
        }
    }

    fn blob_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }

    fn reference(&self) -> serde_json::Value {
        reference_tree(&self.layout, "bench")
    }
}

/// `overlaybd-fuse mount --background ARGS HOST/REPO:bench_obd MP` with
/// info logging into `log`.
fn mount(host: &str, mp: &Path, log: &Path, args: &[&str]) -> Fuse {
    let image = format!("{host}/{REPO}:bench_obd");
    let mut a: Vec<&std::ffi::OsStr> = vec!["--plain".as_ref(), "--log".as_ref(), log.as_os_str()];
    a.extend(args.iter().map(std::ffi::OsStr::new));
    a.push(image.as_ref());
    Fuse::background_env(&a, mp, &[("OVERLAYBD_LOG", "info")])
}

/// Unmount and wait for the daemon (named in the ready line) to exit, so
/// its cache directory is free again.
fn unmount_and_wait(f: &Fuse) {
    let pid: u32 = f
        .ready
        .split("daemon pid ")
        .nth(1)
        .and_then(|s| s.trim_end_matches([')', '\n']).parse().ok())
        .unwrap_or_else(|| panic!("no daemon pid in {:?}", f.ready));
    f.unmount();
    let t0 = Instant::now();
    // Gone, or a zombie (its parent exited; init may not reap it at once).
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("State:") && !l.contains("Z (zombie)"))
        })
    };
    while running() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The regular files of a reference tree: path -> (size, sha256).
fn files(reference: &serde_json::Value) -> BTreeMap<String, (u64, String)> {
    reference
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["type"] == "file")
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v["size"].as_u64().unwrap(),
                    v["sha256"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

fn sha256_of(p: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(p)?)))
}

/// `ls -lR`: every directory listed, every entry stat'ed.
fn ls_r(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        n += 1;
        if m.is_dir() {
            n += ls_r(&e.path());
        }
    }
    n
}

/// Bytes the files of a directory occupy on disk.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn one_file_and_a_listing_fetch_a_small_fraction_and_everything_equals_the_reference() {
    let t = tempfile::tempdir().unwrap();
    let img = Image::new(t.path());
    let reference = img.reference();
    let proxy = Proxy::start(img.reg.port, None, None);
    let host = format!("127.0.0.1:{}", proxy.port);
    let log = t.path().join("fuse.log");
    // The default cache is a private temporary directory, unlinked once
    // the blobs are open: nothing is left behind.
    let tmp = t.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let image_ref = format!("{host}/{REPO}:bench_obd");
    let f = Fuse::background_env(
        &[
            "--fs".as_ref(),
            "--plain".as_ref(),
            "--log".as_ref(),
            log.as_os_str(),
            image_ref.as_ref(),
        ],
        &t.path().join("mp"),
        &[("OVERLAYBD_LOG", "info"), ("TMPDIR", tmp.to_str().unwrap())],
    );
    assert!(f.ready.contains("lazily fetched"), "{}", f.ready);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let at_mount = proxy.bytes_to_clients();

    // ls -lR, then one small file.
    let entries = ls_r(&f.mp);
    assert!(entries > 50, "{entries} entries");
    let listed = proxy.bytes_to_clients();
    let all = files(&reference);
    let (small, (size, sum)) = all
        .iter()
        .filter(|(_, (s, _))| *s > 0)
        .min_by_key(|(_, (s, _))| *s)
        .unwrap();
    assert_eq!(&sha256_of(&f.mp.join(small)).unwrap(), sum, "{small}");
    let one_file = proxy.bytes_to_clients();
    let image = img.blob_bytes();
    eprintln!(
        "lazy: image {image} bytes; mount {at_mount}, ls -lR of {entries} entries {}, \
         cat {small} ({size} bytes) {}: {one_file} bytes fetched ({:.1}%)",
        listed - at_mount,
        one_file - listed,
        one_file as f64 * 100.0 / image as f64
    );
    assert!(
        one_file * 10 < image,
        "{one_file} bytes fetched of a {image}-byte image"
    );

    // Everything read through the mount equals the source image; each
    // chunk came once (the cache holds it all).
    assert_same_tree(&scan(&f.mp), &reference);
    let total = proxy.bytes_to_clients();
    eprintln!("lazy: whole tree read: {total} bytes fetched");
    assert!(total < image + (1 << 20), "{total} fetched for {image}");
    unmount_and_wait(&f);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("lazy: fetched"), "{log}");
    // The unmount line, as in the foreground, sums the fetches up.
    assert!(
        log.lines().any(|l| l.starts_with("overlaybd-fuse: ")
            && l.contains(" unmounted; registry: ")
            && l.contains(" bytes fetched in ")),
        "{log}"
    );
}

#[test]
fn the_cache_keeps_to_its_budget_and_a_warm_cache_fetches_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = Image::new(t.path());
    let reference = img.reference();
    let proxy = Proxy::start(img.reg.port, None, None);
    let host = format!("127.0.0.1:{}", proxy.port);
    let log = t.path().join("fuse.log");

    // The whole tree through a 1 MiB cache.
    let small = t.path().join("small-cache");
    let f = mount(
        &host,
        &t.path().join("mp"),
        &log,
        &[
            "--fs",
            "--cache-size",
            "1M",
            "--cache-dir",
            small.to_str().unwrap(),
        ],
    );
    assert_same_tree(&scan(&f.mp), &reference);
    let on_disk = allocated(&small);
    // Chunk data within the budget; the flag files are a block each.
    assert!(
        on_disk <= (1 << 20) + 2 * 4096 * img.layers.len() as u64,
        "{on_disk} bytes in the cache directory"
    );
    unmount_and_wait(&f);

    // A persistent cache: what one mount fetched, the next one reuses.
    let warm = t.path().join("warm-cache");
    let cache_args = ["--fs", "--cache-dir", warm.to_str().unwrap()];
    let (name, (_, sum)) = files(&reference).into_iter().next_back().unwrap();
    let f = mount(&host, &t.path().join("mp"), &log, &cache_args);
    assert_eq!(sha256_of(&f.mp.join(&name)).unwrap(), sum);
    unmount_and_wait(&f);
    let before = proxy.bytes_to_clients();
    let f = mount(&host, &t.path().join("mp"), &log, &cache_args);
    let at_mount = proxy.bytes_to_clients() - before;
    assert_eq!(sha256_of(&f.mp.join(&name)).unwrap(), sum);
    let reading = proxy.bytes_to_clients() - before - at_mount;
    eprintln!("lazy: warm mount fetched {at_mount} bytes (the manifest), reading {name} {reading}");
    // Only the manifest (and HTTP headers) at mount, nothing for the file.
    assert!(
        at_mount < 16 << 10,
        "{at_mount} bytes fetched at a warm mount"
    );
    assert_eq!(reading, 0);
    unmount_and_wait(&f);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("kept from an earlier run"), "{log}");
}

#[test]
fn registry_down_mid_read_gives_eio_and_the_mount_recovers() {
    let t = tempfile::tempdir().unwrap();
    let mut img = Image::new(t.path());
    let reference = img.reference();
    let all = files(&reference);
    let log = t.path().join("fuse.log");
    let host = img.reg.host();
    let f = mount(
        &host,
        &t.path().join("mp"),
        &log,
        &["--fs", "--retries", "1", "--timeout", "5"],
    );
    // One file read while the registry is up.
    let mut by_size: Vec<_> = all.iter().collect();
    by_size.sort_by_key(|(_, (s, _))| *s);
    let (first, (_, first_sum)) = by_size[by_size.len() / 2];
    let (big, (_, big_sum)) = by_size[by_size.len() - 1];
    assert_eq!(&sha256_of(&f.mp.join(first)).unwrap(), first_sum);

    img.reg.stop();
    let t0 = Instant::now();
    let e = sha256_of(&f.mp.join(big)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{big}: {e}");
    eprintln!("lazy: registry down: EIO after {:?}", t0.elapsed());
    // The daemon is still there and serves what it has.
    assert!(is_mounted(&f.mp));
    assert_eq!(&sha256_of(&f.mp.join(first)).unwrap(), first_sum);

    img.reg.restart();
    assert_eq!(&sha256_of(&f.mp.join(big)).unwrap(), big_sum);
    unmount_and_wait(&f);
    let log = std::fs::read_to_string(&log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("cannot fetch bytes"))
        .unwrap_or_else(|| panic!("no log line for the failed fetch:\n{log}"));
    assert!(line.contains(&host), "{line}");
}

#[test]
fn a_corrupted_blob_gives_eio_on_the_read_and_a_log_line() {
    let t = tempfile::tempdir().unwrap();
    let img = Image::new(t.path());
    // The top layer's stored bytes change in the middle (ZFile data, with
    // per-block CRCs); the size stays.
    let (top, size) = img.layers.last().unwrap().clone();
    let p = img.reg.blob_data_path(&top);
    let mut stored = std::fs::read(&p).unwrap();
    assert_eq!(stored.len() as u64, size);
    stored[size as usize / 2] ^= 0x5a;
    std::fs::write(&p, &stored).unwrap();

    let log = t.path().join("fuse.log");
    let f = mount(&img.reg.host(), &t.path().join("mp"), &log, &[]);
    let o = Command::new(tool("dd"))
        .arg(format!("if={}", f.disk().display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "dd read the whole disk");
    let e = err_text(&o);
    assert!(e.contains("Input/output error"), "{e}");
    // The daemon survives; the disk's start (other blocks) still reads.
    assert!(is_mounted(&f.mp));
    let mut head = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(f.disk())
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    unmount_and_wait(&f);
    let log = std::fs::read_to_string(&log).unwrap();
    // A warning names the blob and the failed check. (Another warning naming
    // the blob may come first: the refetch of the damaged chunks, when the
    // whole-blob digest was not verified yet.)
    let short = &top["sha256:".len().."sha256:".len() + 12];
    let says_check = |l: &str| l.contains("CRC") || l.contains("checksum") || l.contains("digest");
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(short) && says_check(l)),
        "no log line naming blob {top} and its failed check:\n{log}"
    );
}

#[test]
fn overlaybd_nbd_serves_the_registry_image_lazily() {
    // The other front end takes the same sources (here by digest): nbdcopy
    // pulls the disk through it (sparse, by block status); the copy is the
    // source image.
    let t = tempfile::tempdir().unwrap();
    let img = Image::new(t.path());
    let sock = t.path().join("nbd.sock");
    let mut child = Command::new(workspace_bin("overlaybd-nbd"))
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--plain")
        .arg(format!("{}/{REPO}@{}", img.reg.host(), img.digest))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let mut child = Reap(child);
    assert!(
        line.contains("lazily fetched") && line.contains("read-only"),
        "{line}"
    );
    let raw = t.path().join("disk.raw");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run_ok(Command::new(tool("nbdcopy")).arg(&uri).arg(&raw));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
    run_ok(Command::new(tool("e2fsck")).arg("-fn").arg(&raw));
    let m = KernelMount::loop_mount(&raw, &t.path().join("loop"), "ro");
    assert_same_tree(&scan(&m.mp), &img.reference());
    m.unmount();
}

#[test]
fn a_registry_behind_tls_and_a_password_takes_the_convertors_flags() {
    let t = tempfile::tempdir().unwrap();
    let pki = services::Pki::new(&t.path().join("pki"));
    let reg = Registry::start(services::RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: services::Auth::Htpasswd {
            user: "alice".into(),
            password: "s3cret".into(),
        },
    });
    let layout = t.path().join("img");
    build_py_run(&["sample".as_ref(), layout.as_os_str()]);
    run_ok(
        Command::new(tool("skopeo"))
            .args([
                "copy",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--dest-creds",
                "alice:s3cret",
                "--quiet",
            ])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/sec/sample:latest", reg.host())),
    );
    let ca = pki.path("ca.crt");
    run_ok(
        Command::new(workspace_bin("convertor"))
            .args(["-r", &format!("{}/sec/sample", reg.host())])
            .args(["-i", "latest", "-o", "latest_obd", "-u", "alice:s3cret"])
            .arg("--root-ca")
            .arg(&ca)
            .arg("-d")
            .arg(t.path().join("work")),
    );
    let image = format!("{}/sec/sample:latest_obd", reg.host());
    let mp = t.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    // Without credentials, or without the CA: one line, nothing mounted.
    for (args, want) in [
        (vec!["--root-ca", ca.to_str().unwrap()], "-u"),
        (vec!["-u", "alice:s3cret"], "certificate"),
    ] {
        let o = Command::new(fuse_bin())
            .args(["mount", "--fs"])
            .args(&args)
            .arg(&image)
            .arg(&mp)
            .output()
            .unwrap();
        let e = err_text(&o);
        assert!(!o.status.success() && e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(!is_mounted(&mp));
    }
    let f = Fuse::background(
        &[
            "--fs".as_ref(),
            "-u".as_ref(),
            "alice:s3cret".as_ref(),
            "--root-ca".as_ref(),
            ca.as_os_str(),
            image.as_ref(),
        ],
        &mp,
    );
    assert_same_tree(&scan(&f.mp), &reference_tree(&layout, "latest"));
    f.unmount();
}
