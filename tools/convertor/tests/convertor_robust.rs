//! The convertor's work directory and its behaviour towards an unlucky operator
//! (issue #15): convertors sharing `-d`, leftovers of a killed run, a `--reserve`
//! run that needs the directory alone, closed output streams, flags validated before
//! any work, and failures reported as one line that names what is wrong. Local OCI
//! layouts in and out, so no registry is needed.

mod common;

use common::convert::*;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_convertor")
}

/// The digest a successful run printed (`pushed oci:...:tag sha256:...`).
fn pushed_digest(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr_of(o));
    out.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in {out:?}"))
        .to_string()
}

/// `sample` (two small layers) as an OCI layout in `dir`.
fn sample(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    build_images("sample", &images, &[]);
    images
}

fn args<'a>(src: &'a str, out: &'a str, wd: &'a str) -> Vec<&'a str> {
    vec![
        "-r",
        src,
        "-i",
        "latest",
        "--output-repository",
        out,
        "-o",
        "obd",
        "--vsize",
        "2",
        "-d",
        wd,
    ]
}

/// A conversion of `src` into `out` that must fail with exit code 1: its stderr.
fn fails(src: &str, out: &str, wd: &Path) -> String {
    let o = Command::new(bin())
        .args(args(src, out, wd.to_str().unwrap()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    stderr_of(&o)
}

/// The entries of a directory (empty if it does not exist).
fn entries(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The blobs written in a layout's `blobs/sha256` directory `d`: its entries but
/// the temporary files and the write probe (dot files).
fn written_blobs(d: &Path) -> usize {
    entries(d).iter().filter(|n| !n.starts_with('.')).count()
}

#[test]
fn convertors_sharing_a_work_dir_do_not_disturb_each_other() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    // Three at once on the same -d (the default tmp_conv of a CI job directory).
    let outs: Vec<String> = (0..3)
        .map(|i| format!("oci:{}", t.path().join(format!("out{i}")).display()))
        .collect();
    let children: Vec<_> = outs
        .iter()
        .map(|o| {
            Command::new(bin())
                .args(args(&src, o, wd_s))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> = children
        .into_iter()
        .map(|c| pushed_digest(&c.wait_with_output().unwrap()))
        .collect();
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "same input, same output: {digests:?}"
    );
    assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
}

#[test]
fn leftovers_of_a_killed_run_are_removed_by_the_next() {
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let src = format!("oci:{}", images.join("layers").display());
    let out = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let mut a = args(&src, &out, wd_s);
    a[3] = "v1";
    let mut child = Command::new(bin())
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // kill -9 once its private directory exists.
    while !entries(&wd).iter().any(|e| e.starts_with(".run-")) {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("finished ({s}) before it could be killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = entries(&wd);
    assert!(left.iter().any(|e| e.starts_with(".run-")), "{left:?}");
    // A leftover with layer files in it, as a run killed later leaves.
    let stale = wd.join(".run-4000000-7/1-linux_amd64-00/0001_sha256:00");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("writable_data"), vec![1u8; 1 << 20]).unwrap();

    let o = Command::new(bin()).args(&a).output().unwrap();
    pushed_digest(&o);
    assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
}

#[test]
fn reserve_needs_the_work_dir_alone_and_reuses_its_leftovers() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let mut reserve = args(&src, &out, wd_s);
    reserve.push("--reserve");

    // Another convertor (here: this test, as it would) works in the directory.
    std::fs::create_dir_all(&wd).unwrap();
    let held = std::fs::File::open(&wd).unwrap();
    // SAFETY: flock on a descriptor we own; no memory is involved.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH) }, 0);
    let o = Command::new(bin()).args(&reserve).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains(&format!(
            "work directory {wd_s} is in use by another convertor (pid {})",
            std::process::id()
        )),
        "{e}"
    );
    drop(held);

    let first = pushed_digest(&Command::new(bin()).args(&reserve).output().unwrap());
    let kept = entries(&wd);
    assert!(
        kept.iter().any(|e| e.starts_with("1-")),
        "--reserve keeps the manifest directory: {kept:?}"
    );
    // While it is there, a run without --reserve still works beside it.
    let plain = args(&src, &out, wd_s);
    assert_eq!(
        pushed_digest(&Command::new(bin()).args(&plain).output().unwrap()),
        first
    );
    // Again over the kept files (as after a killed --reserve run): replaced.
    assert_eq!(
        pushed_digest(&Command::new(bin()).args(&reserve).output().unwrap()),
        first
    );
}

#[test]
fn closed_output_streams_do_not_stop_a_run() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = t.path().join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let mut child = Command::new(bin())
        .args(args(&src, &out_s, wd.to_str().unwrap()))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both read ends closed (a dropped SSH session, `| head`): every write fails.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(out.join("index.json").is_file());
    assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
}

#[test]
fn flags_are_validated_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = t.path().join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = args(&src, &out_s, wd_s);
        a.truncate(a.len() - 4); // without --vsize 2
        a.extend_from_slice(&["-d", wd_s]);
        a.extend_from_slice(extra);
        Command::new(bin()).args(&a).output().unwrap()
    };
    for (flag, value) in [
        ("--vsize", "0"),
        ("--vsize", "536870913"),
        ("--push-chunk-size", "0"),
        ("--push-chunk-size", "1025"),
        ("--stall-timeout", "0"),
        ("--stall-timeout", "3601"),
    ] {
        let o = run(&[flag, value]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{flag} {value}: {}",
            stderr_of(&o)
        );
        assert!(stderr_of(&o).contains(flag), "{}", stderr_of(&o));
    }
    // A writable layer's index addresses 2^50 - 1 sectors (the last offset marks
    // padding), and opening one of a larger size fails: the largest --vsize is the
    // whole GB below, 2^29 - 1, refused as a flag (where --mkfs's 64 TiB limit does
    // not apply, 2^29 was taken and its layer refused mid-run).
    let o = run(&["--vsize", "536870912"]);
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("--vsize") && e.contains("1..=536870911"), "{e}");
    // A registry port out of range is a bad reference, not a network error to retry.
    let o = Command::new(bin())
        .args([
            "-r",
            "127.0.0.1:99999/x",
            "-i",
            "latest",
            "-o",
            "obd",
            "--plain",
            "-d",
            wd_s,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "a usage error: {}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("invalid registry port \"99999\""),
        "{}",
        stderr_of(&o)
    );
    // An archive destination in a directory that takes no new file (procfs): refused
    // before any layer is converted, not when the archive is written at the end.
    let o = Command::new(bin())
        .args(args(&src, "oci-archive:/proc/out.tar", wd_s))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains("oci-archive:/proc/out.tar") && e.contains("cannot create a file here"),
        "{e}"
    );
    assert!(!e.contains("converted") && !e.contains("layer 1"), "{e}");
    // `obdconv` with a layout and no tag names its own arguments, not flags it
    // does not have.
    for (a, b, want) in [
        (src.clone(), format!("{out_s}:t"), "SRC"),
        (format!("{src}:latest"), out_s.clone(), "DST"),
    ] {
        let o = Command::new(bin())
            .args(["obdconv", &a, &b, "--dir", wd_s])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
        let e = stderr_of(&o);
        assert!(
            e.contains(&format!("{want} ")) && e.contains("oci:DIR:TAG") && !e.contains("--"),
            "{e}"
        );
    }
    // The same tag for both outputs: one image would replace the other.
    let o = run(&["--vsize", "2", "--overlaybd", "obd", "--turboOCI", "obd"]);
    assert_eq!(o.status.code(), Some(2), "a usage error: {}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains("would both be tagged obd") && !e.contains("layer 1"),
        "{e}"
    );
    assert!(!out.exists(), "the destination was created");
    // --oci (or --referrer, which implies it) with a docker-archive destination, which
    // holds Docker schema 2 only: a usage error naming both, in both forms, with
    // nothing written.
    let da = t.path().join("out-docker.tar");
    let da_s = format!("docker-archive:{}", da.display());
    for (a, flag) in [
        (args_with(&args(&src, &da_s, wd_s), &["--oci"]), "--oci"),
        (
            args_with(&args(&src, &da_s, wd_s), &["--referrer"]),
            "--referrer",
        ),
        (
            args_with(
                &["obdconv", &format!("{src}:latest"), &da_s, "-d", wd_s],
                &["--oci"],
            ),
            "--oci",
        ),
    ] {
        let o = Command::new(bin()).args(&a).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {e}");
        assert!(
            e.contains(flag) && e.contains(&da_s) && e.contains("Docker schema 2"),
            "{a:?}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
        assert!(!da.exists() && !wd.exists(), "{a:?}: nothing done");
    }
    // An archive destination that is a directory: said so before any work.
    let dir_s = format!("oci-archive:{}/", t.path().display());
    let o = Command::new(bin())
        .args(args(&src, &dir_s, wd_s))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(e.contains("is a directory"), "{e}");
    assert!(!e.contains("converted") && !e.contains("layer 1"), "{e}");
    // A work directory that is a file: said so, naming the flag.
    let file = t.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = Command::new(bin())
        .args(args(&src, &out_s, file.to_str().unwrap()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("work directory (-d/--dir)") && e.contains("not a directory"),
        "{e}"
    );
    // A device larger than the work directory's filesystem allows as a sparse file
    // (16 TiB on ext4): refused up front, not at layer 1 with "File too large".
    // (60000 GB: under mkfs's own limit of 64 TiB, which is checked first.)
    let fits = {
        let p = t.path().join("probe");
        let r = std::fs::File::create(&p).and_then(|f| f.set_len(60_000 << 30));
        let _ = std::fs::remove_file(&p);
        r.is_ok()
    };
    if !fits {
        let o = run(&["--vsize", "60000"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
        let e = stderr_of(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.contains("--vsize 60000") && e.contains("File too large"),
            "{e}"
        );
        assert!(!e.contains("layer 1"), "before any layer: {e}");
    } else {
        eprintln!(
            "the filesystem of {} holds 60000 GB sparse files: part skipped",
            t.path().display()
        );
    }
    assert!(!out.exists(), "nothing written");
    assert!(!wd.exists());
}

/// An OCI layout in `dir` whose one layer is a gzip stream cut short (its digest
/// right, so the failure is in decompression); returns the layer's digest.
fn layout_with_truncated_layer(dir: &Path) -> String {
    use sha2::{Digest as _, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = format!("sha256:{:x}", Sha256::digest(b));
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let mut tb = tar::Builder::new(Vec::new());
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    tb.append_data(&mut h, "f", &data[..]).unwrap();
    let tarbytes = tb.into_inner().unwrap();
    let raw = dir.join("layer.tar");
    std::fs::write(&raw, &tarbytes).unwrap();
    let gz = Command::new("gzip").arg("-c").arg(&raw).output().unwrap();
    assert!(gz.status.success());
    std::fs::remove_file(&raw).unwrap();
    let cut = &gz.stdout[..gz.stdout.len() / 2];
    let layer = put(cut);
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tarbytes));
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    .to_string();
    let config_d = put(config.as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer, "size": cut.len()}]})
    .to_string();
    let manifest_d = put(manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_d, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    layer
}

/// Failures are one line naming what failed, each cause once.
#[test]
fn failures_are_one_line_without_repeats() {
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("bad");
    let layer = layout_with_truncated_layer(&bad);
    let src = format!("oci:{}", bad.display());
    let out = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let e = fails(&src, &out, &wd);
    let lines: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{e}");
    let line = lines[0];
    assert!(line.starts_with("convertor: error: "), "{line}");
    assert!(line.contains(&layer) && line.contains("deflate"), "{line}");
    let parts: Vec<&str> = line.split(": ").filter(|p| p.len() > 8).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} repeated in {line}");
    }
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
    assert!(!wd.exists());
    // The destination layout this run created is gone again: it held no image.
    assert!(
        !t.path().join("out").exists(),
        "{:?}",
        entries(&t.path().join("out"))
    );
    // One that existed before stays, with what it held.
    let kept = t.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("mine"), b"x").unwrap();
    let kept_s = format!("oci:{}", kept.display());
    fails(&src, &kept_s, &wd);
    assert_eq!(entries(&kept), ["mine"], "as it was: no layout files");
}

/// A descriptor whose media type contradicts its content (an index entry that calls a
/// manifest an index) is named as such, not reported as an index without manifests.
#[test]
fn a_media_type_that_contradicts_the_content_is_named() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let index_path = images.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let m = &mut index["manifests"][0];
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    m["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    let digest = m["digest"].as_str().unwrap().to_string();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let src = format!("oci:{}", images.display());
    let out = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let e = fails(&src, &out, &wd);
    assert!(
        e.contains(&digest)
            && e.contains(
                "the descriptor's media type is application/vnd.oci.image.index.v1+json \
                 but the content is application/vnd.oci.image.manifest.v1+json"
            ),
        "{e}"
    );
    assert!(!e.contains("no image manifests"), "{e}");
}

/// A manifest that is not one (valid JSON of the wrong shape, its digest right) is named
/// once in the error line, not once by each layer of context.
#[test]
fn a_bad_manifest_is_named_once() {
    use sha2::{Digest as _, Sha256};
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let bad = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":5}"#;
    let digest = format!("sha256:{:x}", Sha256::digest(bad));
    std::fs::write(images.join("blobs/sha256").join(&digest[7..]), bad).unwrap();
    let index_path = images.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]["digest"] = digest.clone().into();
    index["manifests"][0]["size"] = bad.len().into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let src = format!("oci:{}", images.display());
    let out = format!("oci:{}", t.path().join("out").display());
    let e = fails(&src, &out, &t.path().join("w"));
    assert_eq!(e.matches(&digest).count(), 1, "{e}");
    assert!(e.contains("invalid JSON"), "{e}");
}

/// A tmpfs of `mb` MB mounted at a new directory in `dir`, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, mb: u32) -> SmallFs {
        let p = dir.join("small");
        std::fs::create_dir(&p).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mounting a tmpfs (the tests run as root): {}",
            stderr_of(&o)
        );
        SmallFs(p)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// When the destination fills up, the error is that (the first push that failed),
/// not what the abort it causes does to the layers still being applied (their tar
/// streams end early, which read as corrupt source layers).
#[test]
fn a_full_destination_is_reported_as_such() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_images("bench", &src, &["--size-mb", "60"]);
    let small = SmallFs::mount(t.path(), 3);
    let src = format!("oci:{}", src.display());
    for round in 0..3 {
        let out = format!("oci:{}", small.0.join(format!("out{round}")).display());
        let wd = t.path().join("w");
        let mut a = args(&src, &out, wd.to_str().unwrap());
        a[3] = "bench";
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
        let e = stderr_of(&o);
        let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "round {round}: {e}");
        let line = errors[0];
        assert!(
            line.contains("uploading layer") && line.contains("No space left on device"),
            "round {round}: {line}"
        );
        assert!(!line.contains("tar"), "round {round}: {line}");
    }
}

/// Under a file size limit (`ulimit -f`, which some CI sandboxes set) a
/// write past it fails the run as a full disk does: exit status 1, one line
/// saying "File too large" (here the sparse layer files do not fit), and the
/// run's work directory and destination removed. SIGXFSZ used to kill the
/// run without a word (exit status 153), its work directory left behind.
#[test]
fn a_file_size_limit_fails_the_run_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let src = format!("oci:{}", sample(t.path()).display());
    let out = t.path().join("out");
    let wd = t.path().join("w");
    // At most 2 MiB (`ulimit -f` counts 512-byte blocks in dash, 1 KiB ones
    // in bash): less than the 2 GB sparse layer files.
    let o = Command::new("sh")
        .args(["-c", "ulimit -f 2048 && exec \"$0\" \"$@\"", bin()])
        .args(args(
            &src,
            &format!("oci:{}", out.display()),
            wd.to_str().unwrap(),
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = stderr_of(&o);
    let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("File too large"), "{e}");
    // It names the limit, not the work directory's filesystem.
    assert!(errors[0].contains("file size limit (ulimit -f)"), "{e}");
    assert!(!errors[0].contains("filesystem cannot hold"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!wd.exists(), "{:?}", entries(&wd));
    assert!(!out.exists(), "{:?}", entries(&out));
}

/// A layout destination that cannot be written (here on a read-only mount) is refused
/// before any layer is converted, also when it is the source converted in place, not
/// at the first upload after every layer was converted.
#[test]
fn an_unwritable_layout_destination_fails_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let small = SmallFs::mount(t.path(), 16);
    let img = small.0.join("img");
    let o = Command::new("cp")
        .arg("-a")
        .arg(&images)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&small.0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let img_s = format!("oci:{}", img.display());
    let src_s = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let in_place = [
        "-r", &img_s, "-i", "latest", "-o", "obd", "--vsize", "2", "-d", wd_s,
    ];
    for a in [
        in_place.to_vec(),
        args(&img_s, &img_s, wd_s),
        args(&src_s, &img_s, wd_s),
    ] {
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{a:?}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
        assert!(
            e.contains(&img_s) && e.to_lowercase().contains("read-only"),
            "{a:?}: {e}"
        );
        assert!(!e.contains("apply") && !e.contains("layer 1"), "{a:?}: {e}");
    }
    assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
}

/// `--no-upload` pushes nothing, and a new layout destination is not even created.
#[test]
fn no_upload_creates_no_destination() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = t.path().join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let mut a = args(&src, &out_s, wd.to_str().unwrap());
    a.push("--no-upload");
    let o = Command::new(bin()).args(&a).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("converted (not uploaded)"), "{stdout}");
    assert!(!out.exists(), "created: {:?}", entries(&out));
    // Converting a layout in place with --no-upload leaves it as it was.
    let before = std::fs::read(images.join("index.json")).unwrap();
    let blobs = entries(&images.join("blobs/sha256")).len();
    let mut a = args(&src, &src, wd.to_str().unwrap());
    a.push("--no-upload");
    let o = Command::new(bin()).args(&a).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(std::fs::read(images.join("index.json")).unwrap(), before);
    assert_eq!(entries(&images.join("blobs/sha256")).len(), blobs);
    assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
}

/// `--dump-manifest` into a work directory used before: the per-manifest folder this
/// run writes (upstream's name, the same as the earlier run's) holds only this run's
/// files; what else is in the work directory stays.
#[test]
fn dump_manifest_into_a_used_work_dir_keeps_no_stale_files() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out_s = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let run = |extra: &[&str]| {
        let a = args_with(&args(&src, &out_s, wd_s), extra);
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert!(o.status.success(), "{a:?}: {}", stderr_of(&o));
    };
    // Two outputs: per-output dump names (config-overlaybd.json, ...).
    run(&[
        "--dump-manifest",
        "--overlaybd",
        "obd",
        "--turboOCI",
        "turbo",
    ]);
    let mdirs: Vec<String> = entries(&wd)
        .into_iter()
        .filter(|n| wd.join(n).is_dir())
        .collect();
    assert_eq!(mdirs.len(), 1, "{mdirs:?}");
    let mdir = wd.join(&mdirs[0]);
    assert!(
        mdir.join("manifest-turboOCI.json").is_file(),
        "{:?}",
        entries(&mdir)
    );
    // Left by hand or by other runs: in the folder, and beside it.
    std::fs::write(mdir.join("stale.json"), b"{}").unwrap();
    std::fs::create_dir_all(mdir.join("0000_stale")).unwrap();
    std::fs::write(wd.join("notes.txt"), b"mine").unwrap();
    std::fs::create_dir_all(wd.join("7-linux_amd64-other")).unwrap();
    std::fs::write(wd.join("7-linux_amd64-other/manifest.json"), b"{}").unwrap();
    run(&["--dump-manifest"]);
    let mut kept = entries(&mdir);
    kept.sort();
    assert_eq!(
        kept,
        ["config.json", "manifest.json"],
        "only this run's dumps"
    );
    assert_eq!(std::fs::read(wd.join("notes.txt")).unwrap(), b"mine");
    assert!(wd.join("7-linux_amd64-other/manifest.json").is_file());
}

/// `--dump-manifest` into a work directory used before: the top-level index dumps of
/// earlier runs (`index.json`, `index-<hex>.json` of a nested index, `index-<format>.json`
/// of a run that built several formats) are removed before this run writes its own, so
/// the folder does not mix runs; other files there stay, even with similar names.
#[test]
fn dump_manifest_removes_earlier_index_dumps() {
    let t = tempfile::tempdir().unwrap();
    let testset = t.path().join("testset");
    build_images("testset", &testset, &[]);
    let multi = format!("oci:{}", testset.join("multi").display());
    let images = sample(t.path());
    let single = format!("oci:{}", images.display());
    let out_s = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let run = |src: &str, tag: &str, outputs: &[&str]| {
        let mut a = vec![
            "-r",
            src,
            "-i",
            tag,
            "--output-repository",
            &out_s,
            "--vsize",
            "2",
            "-d",
            wd_s,
            "--dump-manifest",
        ];
        a.extend(outputs);
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert!(o.status.success(), "{a:?}: {}", stderr_of(&o));
    };
    let top_files = || {
        let mut v: Vec<String> = entries(&wd)
            .into_iter()
            .filter(|n| wd.join(n).is_file())
            .collect();
        v.sort();
        v
    };
    let nested_dump = |n: &String| n.starts_with("index-") && n.len() == "index-.json".len() + 64;
    // An index of an index: index.json and index-<hex>.json.
    run(&multi, "nested", &["-o", "obd"]);
    let first = top_files();
    assert!(
        first.contains(&"index.json".to_string()) && first.iter().any(nested_dump),
        "{first:?}"
    );
    let mine = [
        "index.json.bak",
        "index-notes.json",
        "myindex.json",
        "notes.txt",
    ];
    for n in mine {
        std::fs::write(wd.join(n), b"mine").unwrap();
    }
    // A plain index, two formats: index-overlaybd.json and index-turboOCI.json only.
    run(
        &multi,
        "multi",
        &["--overlaybd", "obd", "--turboOCI", "turbo"],
    );
    let mut want: Vec<String> = ["index-overlaybd.json", "index-turboOCI.json"]
        .iter()
        .chain(&mine)
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(top_files(), want);
    // One image: no index dump at all.
    run(&single, "latest", &["-o", "obd"]);
    let mut want: Vec<String> = mine.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(top_files(), want);
    for n in mine {
        assert_eq!(std::fs::read(wd.join(n)).unwrap(), b"mine", "{n}");
    }
}

/// An OCI layout in `dir` holding one image (`latest`) of `n` small uncompressed layers.
fn layout_with_layers(dir: &Path, n: usize) {
    use sha2::{Digest as _, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = format!("sha256:{:x}", Sha256::digest(b));
        std::fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..n {
        let mut tb = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        tb.append_data(&mut h, format!("f{i}"), &b"x\n"[..])
            .unwrap();
        let bytes = tb.into_inner().unwrap();
        let d = put(&bytes);
        diff_ids.push(d.clone());
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d, "size": bytes.len()}));
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    .to_string();
    let config_d = put(config.as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_d, "size": config.len()},
        "layers": layers})
    .to_string();
    let manifest_d = put(manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_d, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The result line counts in words: `1 manifest, 1 layer`, `1 manifest, 2 layers`.
#[test]
fn the_result_line_counts_in_words() {
    let t = tempfile::tempdir().unwrap();
    for (n, want) in [(1, "(1 manifest, 1 layer)"), (2, "(1 manifest, 2 layers)")] {
        let src = t.path().join(format!("src{n}"));
        layout_with_layers(&src, n);
        let src_s = format!("oci:{}", src.display());
        let out_s = format!("oci:{}", t.path().join(format!("out{n}")).display());
        let wd = t.path().join("w");
        let o = Command::new(bin())
            .args(args(&src_s, &out_s, wd.to_str().unwrap()))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{stdout}\n{}", stderr_of(&o));
        assert!(stdout.contains(want), "{n} layers: {stdout}");
    }
}

/// More layers than overlaybd stacks (255) is known from the manifest: refused before
/// any layer is converted, not when layer 257 finds 256 layers below it.
#[test]
fn too_many_layers_are_refused_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let deep = t.path().join("deep");
    layout_with_layers(&deep, 256);
    let src = format!("oci:{}", deep.display());
    let out = t.path().join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let e = fails(&src, &out_s, &wd);
    // The error, and the empty layout the run made going again.
    assert_eq!(e.lines().count(), 2, "{e}");
    assert_eq!(
        e.lines().last().unwrap(),
        format!(
            "convertor: cleanup: removed {} (created by this run)",
            out.display()
        )
    );
    assert!(
        e.contains("the image has 256 layers; at most 255 can be stacked"),
        "{e}"
    );
    assert!(!e.contains("apply") && !e.contains("layer 1"), "{e}");
    assert!(!out.exists() && !wd.exists());
    // Without --mkfs, the base layer is at the bottom of the stack too.
    let shallower = t.path().join("shallower");
    layout_with_layers(&shallower, 255);
    let base = t.path().join("base");
    std::fs::write(&base, b"a base layer").unwrap();
    let src = format!("oci:{}", shallower.display());
    let mut a = args(&src, &out_s, wd.to_str().unwrap());
    a.extend(["--mkfs=false", "--baselayer", base.to_str().unwrap()]);
    let o = Command::new(bin()).args(&a).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains("the image has 255 layers and the base layer; at most 255 can be stacked"),
        "{e}"
    );
    assert!(!e.contains("apply") && !e.contains("layer 1"), "{e}");
    assert!(!out.exists() && !wd.exists());
}

/// `--mkfs=false` without upstream's base layer fails before any work, saying where it
/// was looked for and how to give it (`--baselayer`) or do without it (`--mkfs`).
#[test]
fn a_missing_base_layer_says_how_to_give_it() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = t.path().join("out");
    let wd = t.path().join("w");
    let missing = t.path().join("no-such-base");
    let out_s = format!("oci:{}", out.display());
    let mut a = args(&src, &out_s, wd.to_str().unwrap());
    a.extend(["--mkfs=false", "--baselayer", missing.to_str().unwrap()]);
    let o = Command::new(bin()).args(&a).output().unwrap();
    let e = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
    assert!(e.contains("--baselayer") && e.contains("--mkfs"), "{e}");
    assert!(!out.exists() && !wd.exists());
}

/// An OCI layout named without `oci:` (`-r ./sample`) is not tried as a registry
/// (retries, then a DNS error): refused at once with the right spelling. Registry
/// references stay registry references even when a directory of that name exists.
#[test]
fn a_path_without_a_transport_gets_a_hint() {
    let t = tempfile::tempdir().unwrap();
    sample(t.path());
    std::fs::create_dir_all(t.path().join("ts")).unwrap();
    std::fs::rename(t.path().join("images"), t.path().join("ts/multi")).unwrap();
    std::fs::write(t.path().join("app.tar"), b"x").unwrap();
    let abs = t.path().join("ts/multi").display().to_string();
    let run = |a: &[&str]| {
        let o = Command::new(bin())
            .current_dir(t.path())
            .args(a)
            .args(["-d", "w"])
            .output()
            .unwrap();
        // A usage error, as in the obdconv form below.
        assert_eq!(o.status.code(), Some(2), "{a:?}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
        assert!(!e.contains("retrying") && !e.contains("dns"), "{a:?}: {e}");
        e
    };
    for (r, hint) in [
        ("./ts/multi", "did you mean oci:./ts/multi?"),
        ("ts/multi", "did you mean oci:ts/multi?"),
        (abs.as_str(), &format!("did you mean oci:{abs}?")),
        (
            "./app.tar",
            "did you mean docker-archive:./app.tar or oci-archive:./app.tar?",
        ),
        (
            "./nothing/here",
            "a filesystem path, not a registry reference",
        ),
    ] {
        let e = run(&["-r", r, "-i", "latest", "-o", "obd"]);
        assert!(e.contains(&format!("-r/--repository {r}: ")), "{e}");
        assert!(e.contains(hint), "{r}: {e}");
        let e = run(&[
            "-r",
            "oci:ts/multi",
            "-i",
            "latest",
            "-o",
            "obd",
            "--output-repository",
            r,
        ]);
        assert!(e.contains(&format!("--output-repository {r}: ")), "{e}");
        assert!(e.contains(hint), "{r}: {e}");
    }
    let o = Command::new(bin())
        .current_dir(t.path())
        .args(["obdconv", "ts/multi:latest", "oci:out:obd", "-d", "w"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(
        e.contains("SRC ts/multi:latest") && e.contains("did you mean oci:ts/multi:latest?"),
        "{e}"
    );
    // A registry reference whose name is also a local directory is still a registry
    // reference (here an unreachable one: a refused connection, not a hint).
    std::fs::create_dir_all(t.path().join("localhost:1/ts/multi")).unwrap();
    std::fs::write(t.path().join("localhost:1/ts/multi/oci-layout"), b"{}").unwrap();
    let o = Command::new(bin())
        .current_dir(t.path())
        .args(["-r", "localhost:1/ts/multi", "-i", "latest", "-o", "obd"])
        .args(["--plain", "-d", "w"])
        .output()
        .unwrap();
    let e = stderr_of(&o);
    assert!(
        !e.contains("did you mean") && e.contains("localhost:1"),
        "{e}"
    );
    assert!(!t.path().join("out").exists());
}

/// An archive destination that exists is replaced (a script's re-run), atomically (a
/// new file renamed over it: the old one is never written into), and said so; a new
/// one is not said to replace anything.
#[test]
fn an_existing_archive_destination_is_replaced_and_said_so() {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    for (kind, file) in [
        ("oci-archive", "out.tar"),
        ("docker-archive", "out-docker.tar"),
    ] {
        let out = t.path().join(file);
        let dst = format!("{kind}:{}", out.display());
        let run = || {
            let o = Command::new(bin())
                .args(args(&src, &dst, wd.to_str().unwrap()))
                .output()
                .unwrap();
            assert!(o.status.success(), "{dst}: {}", stderr_of(&o));
            stderr_of(&o)
        };
        let e = run();
        assert!(!e.contains("replaced"), "{dst}: a new file: {e}");
        let first = std::fs::read(&out).unwrap();
        // An old file there, kept open as a script's reader would: it stays as it was.
        std::fs::write(&out, b"old contents").unwrap();
        let old = std::fs::File::open(&out).unwrap();
        let old_ino = old.metadata().unwrap().ino();
        let e = run();
        assert!(
            e.contains(&format!("{dst}: replaced the existing file")),
            "{dst}: {e}"
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            first,
            "{dst}: the same archive"
        );
        assert_ne!(
            std::fs::metadata(&out).unwrap().ino(),
            old_ino,
            "renamed into place"
        );
        assert_eq!(
            std::io::read_to_string(old).unwrap(),
            "old contents",
            "{dst}: the old file was not written into"
        );
        let left: Vec<_> = entries(t.path())
            .into_iter()
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// An archive destination that is a symbolic link is written through, as `cp` and shell
/// redirection do: the file it points to (here by a relative link to another directory)
/// gets the archive and the link stays; a dangling link creates its target; a dangling
/// link into a missing directory fails before any work, naming it. No `.partial` is
/// left beside the link or the target.
#[test]
fn an_archive_destination_that_is_a_symbolic_link_is_written_through() {
    use std::os::unix::fs::symlink;
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    let real = t.path().join("real");
    let links = t.path().join("links");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&links).unwrap();
    for kind in ["oci-archive", "docker-archive"] {
        let run = |out: &Path| {
            let dst = format!("{kind}:{}", out.display());
            let o = Command::new(bin())
                .args(args(&src, &dst, wd.to_str().unwrap()))
                .output()
                .unwrap();
            (o.status.code(), stderr_of(&o))
        };
        let plain = t.path().join(format!("{kind}-plain.tar"));
        assert_eq!(run(&plain).0, Some(0));
        let want = std::fs::read(&plain).unwrap();
        // A link to an existing file.
        let target = real.join(format!("{kind}.tar"));
        std::fs::write(&target, b"old contents").unwrap();
        let link = links.join(format!("{kind}.tar"));
        symlink(format!("../real/{kind}.tar"), &link).unwrap();
        let (code, e) = run(&link);
        assert_eq!(code, Some(0), "{e}");
        assert!(e.contains("replaced the existing file"), "{e}");
        assert!(
            link.symlink_metadata().unwrap().file_type().is_symlink(),
            "{kind}: the link stays a link"
        );
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(format!("../real/{kind}.tar"))
        );
        assert!(
            std::fs::read(&target).unwrap() == want,
            "{kind}: the target holds the archive"
        );
        // A dangling link (through a second link): its target is created.
        let target2 = real.join(format!("{kind}-new.tar"));
        let mid = links.join(format!("{kind}-mid"));
        symlink(&target2, &mid).unwrap();
        let link2 = links.join(format!("{kind}-new.tar"));
        symlink(&mid, &link2).unwrap();
        let (code, e) = run(&link2);
        assert_eq!(code, Some(0), "{e}");
        assert!(!e.contains("replaced"), "{kind}: nothing was replaced: {e}");
        assert!(link2.symlink_metadata().unwrap().file_type().is_symlink());
        assert!(mid.symlink_metadata().unwrap().file_type().is_symlink());
        assert!(
            std::fs::read(&target2).unwrap() == want,
            "{kind}: created through the link"
        );
        // A dangling link into a missing directory: a clear error, nothing written.
        let link3 = links.join(format!("{kind}-nowhere.tar"));
        symlink(t.path().join("missing/x.tar"), &link3).unwrap();
        let (code, e) = run(&link3);
        assert_eq!(code, Some(1), "{e}");
        assert!(
            e.contains(&format!("{}", link3.display()))
                && e.contains("missing/x.tar")
                && e.contains("whose directory does not exist"),
            "{e}"
        );
        assert!(link3.symlink_metadata().unwrap().file_type().is_symlink());
    }
    for d in [&real, &links, &t.path().to_path_buf()] {
        let left: Vec<_> = entries(d)
            .into_iter()
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", d.display());
    }
}

/// An archive read from a pipe (`cat x.tar | convertor -r oci-archive:/dev/stdin`) is
/// copied into the work directory first, plain or gzip-compressed, instead of failing
/// with "Illegal seek".
#[test]
fn an_archive_can_be_piped_in() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let want = pushed_digest(
        &Command::new(bin())
            .args(args(
                &format!("oci:{}", images.display()),
                &format!("oci:{}", t.path().join("direct").display()),
                t.path().join("w").to_str().unwrap(),
            ))
            .output()
            .unwrap(),
    );
    let tar = t.path().join("sample.tar");
    let o = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&images)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let gz = t.path().join("sample.tar.gz");
    let o = Command::new("gzip").arg("-k").arg(&tar).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    for (i, input) in [&tar, &gz].into_iter().enumerate() {
        let out = t.path().join(format!("out{i}"));
        let wd = t.path().join("w");
        let mut a = args(
            "oci-archive:/dev/stdin",
            &format!("oci:{}", out.display()),
            wd.to_str().unwrap(),
        )
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a[3] = "latest".into();
        // A pipe, not the file itself (a file on stdin would be seekable).
        let mut child = Command::new(bin())
            .args(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let bytes = std::fs::read(input).unwrap();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&bytes);
        });
        let o = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert_eq!(pushed_digest(&o), want, "{}", input.display());
        assert!(!wd.exists(), "left behind: {:?}", entries(&wd));
    }
}

/// Images in an OCI layout are named as skopeo names them: `oci:DIR:REF` splits at the
/// first ':', and REF (or -i) may be any OCI reference name, such as the
/// `example.com/app:1.0` containers/image writes or `v1.0+build`.
#[test]
fn oci_reference_names_select_images() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let index_path = images.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let m = index["manifests"][0].clone();
    for name in ["v1.0+build", "example.com/app:1.0"] {
        let mut e = m.clone();
        e["annotations"]["org.opencontainers.image.ref.name"] = name.into();
        index["manifests"].as_array_mut().unwrap().push(e);
    }
    std::fs::write(&index_path, index.to_string()).unwrap();
    let wd = t.path().join("w");
    let out = t.path().join("out");
    let plain = format!("oci:{}", images.display());
    let want = pushed_digest(
        &Command::new(bin())
            .args(args(
                &plain,
                &format!("oci:{}", out.display()),
                wd.to_str().unwrap(),
            ))
            .output()
            .unwrap(),
    );
    let named = format!("oci:{}:example.com/app:1.0", images.display());
    let out_named = format!("oci:{}:obd+1", out.display());
    for (src, tag) in [
        (plain.as_str(), "v1.0+build"),
        (named.as_str(), "example.com/app:1.0"),
    ] {
        let o = Command::new(bin())
            .args([
                "-r",
                src,
                "-i",
                tag,
                "--output-repository",
                &out_named,
                "--vsize",
                "2",
                "-d",
            ])
            .arg(&wd)
            .output()
            .unwrap();
        assert_eq!(pushed_digest(&o), want, "{src} -i {tag}");
    }
    // The tag in the reference alone selects the image too.
    let o = Command::new(bin())
        .args([
            "-r",
            &named,
            "--output-repository",
            &out_named,
            "--vsize",
            "2",
            "-d",
        ])
        .arg(&wd)
        .output()
        .unwrap();
    assert_eq!(pushed_digest(&o), want);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert!(names.contains(&"obd+1"), "{names:?}");
    // A registry keeps docker's tag rule.
    let o = Command::new(bin())
        .args(["-r", "localhost:1/x", "-i", "v1.0+build", "-o", "obd", "-d"])
        .arg(&wd)
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr_of(&o).contains("-i/--input-tag"),
        "{}",
        stderr_of(&o)
    );
}

/// Every path below `d` (recursively), relative to it.
fn all_below(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![d.to_path_buf()];
    while let Some(p) = todo.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let q = e.path();
            out.push(q.strip_prefix(d).unwrap().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(q);
            }
        }
    }
    out
}

/// A second stop signal quits at once, and still removes the run's work files:
/// the unfinished commit file being written and, unless the run keeps its files
/// (`--reserve`), its private directory (both were left for the next run).
#[test]
fn a_second_signal_quits_without_leaving_work_files() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_images("bench", &src, &["--size-mb", "60"]);
    let src = format!("oci:{}", src.display());
    for reserve in [false, true] {
        let out = format!("oci:{}", t.path().join(format!("out-{reserve}")).display());
        let wd = t.path().join(format!("w-{reserve}"));
        let mut a = args(&src, &out, wd.to_str().unwrap());
        a[3] = "bench";
        if reserve {
            a.push("--reserve");
        }
        let child = Command::new(bin())
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both signals once a commit file is being written (SIGINT, then SIGTERM
        // while the run is still cleaning up: two SIGINTs sent at once may arrive
        // as one).
        let committing = || {
            all_below(&wd)
                .iter()
                .any(|p| p.contains(".overlaybd.commit.tmp-"))
        };
        let mut child = child;
        while !committing() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("finished ({s}) before a commit was seen");
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let o = child.wait_with_output().unwrap();
        let e = stderr_of(&o);
        assert!(e.contains("SIGTERM again: quitting now"), "{e}");
        assert_eq!(o.status.code(), Some(143), "{e}");
        let left = all_below(&wd);
        assert!(
            !left.iter().any(|p| p.contains(".tmp-")),
            "reserve {reserve}: unfinished files left: {left:?}"
        );
        // Nor in the destination layout (a blob or index.json being written).
        let out_dir = t.path().join(format!("out-{reserve}"));
        let in_out = all_below(&out_dir);
        assert!(
            !in_out
                .iter()
                .any(|p| p.contains("/.tmp") || p.starts_with(".tmp") || p.ends_with(".partial")),
            "reserve {reserve}: temporary files left in the destination: {in_out:?}"
        );
        if !reserve {
            assert!(
                !left.iter().any(|p| p.starts_with(".run-")),
                "the run's private directory is left: {left:?}"
            );
        }
    }
}

/// A second stop signal taken while the run is already cleaning up after the first
/// waits for that clean-up, then quits saying what it removed (it used to quit in
/// the middle of it, or without the line saying what was removed: seen once in CI).
/// The signals thread is held up by a full stderr pipe, so that the run's clean-up
/// is done (or under way) before it takes the second signal.
#[test]
fn a_second_signal_during_the_clean_up_waits_for_it_and_says_what_was_removed() {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_images("bench", &src, &["--size-mb", "60"]);
    let src = format!("oci:{}", src.display());
    let top = t.path().join("new");
    let out = top.join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let mut a = args(&src, &out_s, wd.to_str().unwrap());
    a[3] = "bench";
    // Close-on-exec: a child another test spawns meanwhile must not keep the
    // write end open (the read to the end below waits for every copy to close).
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // A write end of its own (a new open file description, so that O_NONBLOCK is
    // not the child's too), to fill the pipe with.
    let mut filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
        .unwrap();
    let mut r = std::fs::File::from(r);
    let mut child = Command::new(bin())
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::from(w))
        .spawn()
        .unwrap();
    // Read what the child says until a layer blob is written.
    let mut said = Vec::new();
    let blobs = out.join("blobs/sha256");
    let set_nonblocking = |f: &std::fs::File, on: bool| {
        let flags = if on {
            nix::fcntl::OFlag::O_NONBLOCK
        } else {
            nix::fcntl::OFlag::empty()
        };
        nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    };
    set_nonblocking(&r, true);
    let mut buf = vec![0u8; 1 << 16];
    while written_blobs(&blobs) < 1 {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("finished ({s}) before it was stopped");
        }
        while let Ok(n) = r.read(&mut buf) {
            said.extend_from_slice(&buf[..n]);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // Fill the pipe: the child's next line waits until the test reads again.
    for chunk in [4096, 1] {
        while filler.write(&vec![b'\n'; chunk]).is_ok() {}
    }
    drop(filler);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // Meanwhile the run stops and takes back what it added.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    set_nonblocking(&r, false);
    r.read_to_end(&mut said).unwrap();
    let status = child.wait().unwrap();
    let e = String::from_utf8_lossy(&said).to_string();
    let lines: Vec<&str> = e.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(status.code(), Some(143), "{e}");
    assert!(!top.exists(), "left: {:?}", listing(&top));
    assert!(!wd.exists(), "left: {:?}", listing(&wd));
    assert_eq!(
        lines[lines.len() - 2..],
        [
            "convertor: SIGTERM again: quitting now".to_string(),
            format!(
                "convertor: cleanup: removed {} (created by this run)",
                top.display()
            )
        ],
        "{e}"
    );
}

/// A malformed image reference, tag or digest is a usage error: exit 2, in the
/// `-r` form as in the `obdconv` form, with one line naming the argument, before
/// any work (it was 1 with -r and 2 as obdconv's DST).
#[test]
fn malformed_references_are_usage_errors_in_every_form() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out = t.path().join("out");
    let out_s = format!("oci:{}", out.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let with = |base: &[&str], extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            with(
                &["-r", "127.0.0.1:99999/x", "-i", "latest", "-o", "obd"],
                &[],
            ),
            "-r/--repository",
            "invalid registry port",
        ),
        (
            with(
                &["-r", &src, "-i", "latest", "-o", "obd"],
                &["--output-repository", "dir:/tmp/x"],
            ),
            "--output-repository",
            "unknown transport",
        ),
        (
            with(
                &["-r", &src, "-i", "no spaces", "-o", "obd"],
                &["--output-repository", &out_s],
            ),
            "-i/--input-tag",
            "no spaces",
        ),
        (
            with(
                &["-r", &src, "-g", "sha256:xyz", "-o", "obd"],
                &["--output-repository", &out_s],
            ),
            "-g/--input-digest",
            "sha256:xyz",
        ),
        (
            with(
                &["-r", &src, "-i", "latest", "-o", "bad tag"],
                &["--output-repository", &out_s],
            ),
            "output tag",
            "bad tag",
        ),
        (
            with(
                &["-r", "dir:/tmp/x", "-i", "latest", "-o", "obd"],
                &["--output-repository", &out_s],
            ),
            "-r/--repository",
            "unknown transport",
        ),
        (
            with(
                &[
                    "obdconv",
                    "127.0.0.1:99999/x:latest",
                    &format!("{out_s}:obd"),
                ],
                &[],
            ),
            "SRC",
            "invalid registry port",
        ),
        (
            with(&["obdconv", &format!("{src}:latest"), "dir:/tmp/x"], &[]),
            "DST",
            "unknown transport",
        ),
        (
            with(
                &["-r", &src, "-i", "latest", "-o", "obd"],
                &["--output-repository", &out_s, "--mkfs-options", "-I 512"],
            ),
            "--mkfs-options",
            "need --engine kernel",
        ),
    ];
    for (mut a, arg, want) in cases {
        a.extend(["-d".to_string(), wd_s.to_string()]);
        let o = Command::new(bin()).args(&a).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
        assert!(e.contains(arg) && e.contains(want), "{a:?}: {e}");
        assert!(!out.exists() && !wd.exists(), "{a:?}: nothing done");
    }
}

/// `--vsize` is checked by the parser in the `obdconv` form as in the `-r` form: 1 to
/// 2^29 GB (what LSMT indexes address), a usage error (exit 2) naming it before any
/// work. The `obdconv` form used to take any value: too large, it failed later (exit 1)
/// making sparse files, or went on with `--disable-sparse`. With `--mkfs` (the
/// default) past 64 TiB, what libext2fs's mkfs makes, it is refused before any work
/// too (it failed at the mkfs, or on a filesystem without such large files, making
/// them).
#[test]
fn obdconv_checks_vsize_as_the_r_form_does() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}:latest", images.display());
    let out = t.path().join("out");
    let dst = format!("oci:{}:obd", out.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    for v in ["0", "536870913", "65537"] {
        for form in [
            vec!["obdconv", &src, &dst, "--vsize", v, "-d", wd_s],
            vec![
                "-r",
                &src,
                "--output-repository",
                &dst,
                "--vsize",
                v,
                "-d",
                wd_s,
            ],
        ] {
            let o = Command::new(bin()).args(&form).output().unwrap();
            let e = stderr_of(&o);
            assert_eq!(o.status.code(), Some(2), "{form:?}: {e}");
            assert!(e.contains("--vsize") && e.contains(v), "{form:?}: {e}");
            if v == "65537" {
                assert!(e.contains("at most 65536 GB"), "{form:?}: {e}");
            }
            assert!(!out.exists() && !wd.exists(), "{form:?}: nothing done");
        }
    }
}

/// The ext4 of a TurboOCI layer is made by libext2fs (`obdfs::photon`, as upstream's
/// fork of it) whatever `--engine` says, so `--vsize` past 64 TiB is refused before any
/// work with `--engine kernel` too (the check skipped it: the conversion began and
/// failed at the bottom layer's mkfs, exit 1). `--engine-fallback`: the kernel engine
/// need not be available here.
#[test]
fn turbooci_ext4_past_the_mkfs_limit_is_refused_with_any_engine() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}:latest", images.display());
    let out = t.path().join("out");
    let dst = format!("oci:{}:x", out.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    for native in [&[][..], &["--overlaybd", "n"]] {
        let mut form = vec!["-r", &src, "--output-repository", &dst, "--turboOCI", "t"];
        form.extend(native);
        form.extend(["--engine", "kernel", "--engine-fallback"]);
        form.extend(["--vsize", "65537", "-d", wd_s]);
        let o = Command::new(bin()).args(&form).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{form:?}: {e}");
        assert!(
            e.contains("--vsize 65537") && e.contains("at most 65536 GB"),
            "{form:?}: {e}"
        );
        assert!(!out.exists() && !wd.exists(), "{form:?}: nothing done");
    }
}

/// The `obdconv` form's messages all start `convertor obdconv:`: its usage errors found
/// while parsing, those found later, and runtime errors; the `-r` form's `convertor:`.
#[test]
fn obdconv_errors_name_the_obdconv_form() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let out_s = format!("oci:{}", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        // Usage errors: in SRC, and a flag that does not fit DST.
        (
            args_with(&["obdconv", "dir:/tmp/x", &format!("{out_s}:obd")], &[]),
            2,
            "convertor obdconv: error: SRC",
        ),
        (
            args_with(
                &["obdconv", &format!("{src}:latest"), &format!("{out_s}:obd")],
                &["--compress"],
            ),
            2,
            "convertor obdconv: error: --compress",
        ),
        // A runtime error: no such image in the source layout.
        (
            args_with(
                &["obdconv", &format!("{src}:nosuch"), &format!("{out_s}:obd")],
                &[],
            ),
            1,
            "convertor obdconv: error: ",
        ),
        (
            args_with(
                &["-r", &src, "-i", "nosuch", "-o", "obd"],
                &["--output-repository", &out_s],
            ),
            1,
            "convertor: error: ",
        ),
    ];
    for (mut a, code, want) in cases {
        a.extend(["-d".to_string(), wd_s.to_string()]);
        let o = Command::new(bin()).args(&a).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(code), "{a:?}: {e}");
        assert!(e.starts_with(want), "{a:?}: {e}");
        assert!(
            e.lines()
                .all(|l| l.starts_with(want.split(" error").next().unwrap())),
            "{a:?}: {e}"
        );
    }
}

/// What is below `d`, sorted, with each file's size: a directory's state to compare
/// before and after a run (empty if `d` does not exist).
fn listing(d: &Path) -> Vec<String> {
    let mut l: Vec<String> = all_below(d)
        .into_iter()
        .map(|p| match std::fs::metadata(d.join(&p)) {
            Ok(m) if m.is_file() => format!("{p} {}", m.len()),
            _ => p,
        })
        .collect();
    l.sort();
    l
}

/// `cp -a from to`.
fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
}

/// Damages the middle of layer `layer` of the image `tag` (its `platform`'s
/// manifest, for an index) in the OCI layout `dir`: its conversion fails part-way.
fn corrupt_layer(dir: &Path, tag: &str, platform: Option<&str>, layer: usize) {
    let read = |d: &str| -> serde_json::Value {
        let p = dir.join("blobs/sha256").join(&d[7..]);
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = read_json(&dir.join("index.json"));
    let top = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let mut manifest = read(top["digest"].as_str().unwrap());
    if let Some(arch) = platform {
        let m = manifest["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .unwrap()
            .clone();
        manifest = read(m["digest"].as_str().unwrap());
    }
    let d = manifest["layers"][layer]["digest"].as_str().unwrap();
    let p = dir.join("blobs/sha256").join(&d[7..]);
    let mut b = std::fs::read(&p).unwrap();
    let mid = b.len() / 2;
    for x in &mut b[mid..mid + 2000] {
        *x ^= 0x5a;
    }
    std::fs::write(&p, b).unwrap();
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// A failed run takes back what it added to its destination and work directory:
/// a layout directory it created goes (with the parents it made), in a directory
/// that existed only the files it added go (the blobs of the layers it converted
/// before the failure, the layout files it made in a directory that was no layout),
/// an archive destination is not written, and a work directory keeps only what it
/// held. Sources: a single image whose last layer is corrupt part-way, and a
/// multi-platform image whose second platform's layer is corrupt (converted one
/// platform at a time, so the first one's layers were written).
#[test]
fn a_failed_run_leaves_destination_and_work_dir_as_found() {
    testutil::default_stop_signals();
    let t = tempfile::tempdir().unwrap();
    let bench = t.path().join("bench");
    build_images("bench", &bench, &["--size-mb", "20"]);
    corrupt_layer(&bench, "bench", None, 3);
    let testset = t.path().join("testset");
    build_images("testset", &testset, &[]);
    let multi = testset.join("multi");
    corrupt_layer(&multi, "multi", Some("arm64"), 0);
    let images = sample(t.path());
    // A work directory that exists, with a file of its own.
    let wd = t.path().join("w");
    std::fs::create_dir(&wd).unwrap();
    std::fs::write(wd.join("mine"), b"x").unwrap();
    let wd_before = listing(&wd);
    let mut n = 0;
    let mut run = |src: &Path, tag: &str, dst: &str, extra: &[&str]| -> String {
        let src = format!("oci:{}", src.display());
        let new_wd = t.path().join(format!("new-w{n}"));
        n += 1;
        let mut e = String::new();
        for w in [&wd, &new_wd] {
            let mut a = args(&src, dst, w.to_str().unwrap());
            a[3] = tag;
            a.extend_from_slice(extra);
            let o = Command::new(bin()).args(&a).output().unwrap();
            e = stderr_of(&o);
            assert_eq!(o.status.code(), Some(1), "{a:?}: {e}");
            assert!(!e.contains("cleanup: could not"), "{a:?}: {e}");
        }
        assert_eq!(listing(&wd), wd_before, "the work directory that existed");
        assert!(!new_wd.exists(), "left: {:?}", listing(&new_wd));
        e
    };
    // Converted in place: the source layout keeps exactly its files.
    let before = listing(&bench);
    let bench_s = format!("oci:{}", bench.display());
    let e = run(&bench, "bench", &bench_s, &[]);
    assert_eq!(listing(&bench), before);
    assert!(e.contains(" blobs this run added to "), "{e}");
    for (src, tag, extra) in [
        (&bench, "bench", &[][..]),
        (&multi, "multi", &["--concurrency-limit", "1"][..]),
    ] {
        // A new layout, in directories that do not exist either.
        let top = t.path().join("new");
        let new = format!("oci:{}", top.join("a/out").display());
        let e = run(src, tag, &new, extra);
        assert!(!top.exists(), "{tag}: left: {:?}", listing(&top));
        assert!(
            e.contains(&format!("convertor: cleanup: removed {}", top.display())),
            "{tag}: {e}"
        );
        // A layout holding another image.
        let old = t.path().join("old");
        copy_dir(&images, &old);
        let before = listing(&old);
        let old_s = format!("oci:{}", old.display());
        let e = run(src, tag, &old_s, extra);
        assert_eq!(listing(&old), before, "{tag}");
        // The blobs of the layers converted before the failure. (The platforms of
        // `multi` start in no fixed order: when arm64's starts first, amd64's never
        // writes any.)
        let last = e.lines().last().unwrap();
        assert!(
            (tag == "multi" && last.starts_with("convertor: error: "))
                || (last.starts_with("convertor: cleanup: removed ")
                    && last.contains(" blobs this run added to ")
                    && last.contains(old.to_str().unwrap())),
            "{tag}: {e}"
        );
        std::fs::remove_dir_all(&old).unwrap();
        // A directory that was no layout keeps only its own file.
        let plain = t.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        std::fs::write(plain.join("mine"), b"x").unwrap();
        let before = listing(&plain);
        run(src, tag, &format!("oci:{}", plain.display()), extra);
        assert_eq!(listing(&plain), before, "{tag}");
        std::fs::remove_dir_all(&plain).unwrap();
        // An archive.
        let dir = t.path().join("archives");
        std::fs::create_dir(&dir).unwrap();
        let tar = format!("oci-archive:{}", dir.join("out.tar").display());
        run(src, tag, &tar, extra);
        assert!(listing(&dir).is_empty(), "{tag}: {:?}", listing(&dir));
        std::fs::remove_dir(&dir).unwrap();
    }
}

/// A run stopped by a signal (SIGINT; or SIGINT and SIGTERM, the second of which
/// quits at once without running destructors) leaves its destination and work
/// directory as it found them too, once a layer blob was written: a new layout
/// directory goes with the parents the run made, a layout that existed keeps
/// exactly its files, an archive is not written; a new work directory goes, one
/// that existed keeps its own file, and with --reserve the work files stay and
/// the last line says where.
#[test]
fn an_interrupted_run_leaves_destination_and_work_dir_as_found() {
    testutil::default_stop_signals();
    use nix::sys::signal::{kill, Signal};
    let t = tempfile::tempdir().unwrap();
    let bench = t.path().join("bench");
    build_images("bench", &bench, &["--size-mb", "120"]);
    let src = format!("oci:{}", bench.display());
    let images = sample(t.path());
    for (k, signals) in [vec![Signal::SIGINT], vec![Signal::SIGINT, Signal::SIGTERM]]
        .into_iter()
        .enumerate()
    {
        let code = 128 + *signals.last().unwrap() as i32;
        let base = t.path().join(format!("sig{k}"));
        std::fs::create_dir(&base).unwrap();
        // Runs until `started` holds, then gets the signals: its stderr.
        let stop = |dst: &str, wd: &Path, extra: &[&str], started: &dyn Fn() -> bool| {
            let mut a = args(&src, dst, wd.to_str().unwrap());
            a[3] = "bench";
            a.extend_from_slice(extra);
            let mut child = Command::new(bin())
                .args(&a)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            while !started() {
                if let Some(s) = child.try_wait().unwrap() {
                    panic!("{a:?}: finished ({s}) before it was stopped");
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            for s in &signals {
                kill(pid, *s).unwrap();
            }
            let o = child.wait_with_output().unwrap();
            let e = stderr_of(&o);
            assert_eq!(o.status.code(), Some(code), "{a:?}: {e}");
            assert!(!e.contains("cleanup: could not"), "{a:?}: {e}");
            e
        };
        // A new layout in a new directory; a new work directory.
        let top = base.join("new");
        let out = top.join("out");
        let wd = base.join("w-new");
        let blobs = out.join("blobs/sha256");
        let e = stop(&format!("oci:{}", out.display()), &wd, &[], &|| {
            written_blobs(&blobs) > 0
        });
        assert!(!top.exists(), "{signals:?}: left: {:?}", listing(&top));
        assert!(!wd.exists(), "{signals:?}: left: {:?}", listing(&wd));
        assert!(
            e.lines().last().unwrap()
                == format!(
                    "convertor: cleanup: removed {} (created by this run)",
                    top.display()
                ),
            "{signals:?}: {e}"
        );
        // A layout that held an image; a work directory with a file of its own.
        let old = base.join("old");
        copy_dir(&images, &old);
        let before = listing(&old);
        let n = entries(&old.join("blobs/sha256")).len();
        let wd = base.join("w-old");
        std::fs::create_dir(&wd).unwrap();
        std::fs::write(wd.join("mine"), b"x").unwrap();
        let e = stop(&format!("oci:{}", old.display()), &wd, &[], &|| {
            written_blobs(&old.join("blobs/sha256")) > n
        });
        assert_eq!(listing(&old), before, "{signals:?}: {e}");
        assert_eq!(entries(&wd), ["mine"], "{signals:?}");
        assert!(e.contains(" this run added to "), "{signals:?}: {e}");
        // An archive, with --reserve: the work files stay, and the run says where.
        let dir = base.join("archives");
        std::fs::create_dir(&dir).unwrap();
        let wd = base.join("w-reserve");
        let tar = format!("oci-archive:{}", dir.join("out.tar").display());
        let e = stop(&tar, &wd, &["--reserve"], &|| {
            all_below(&wd)
                .iter()
                .any(|p| p.contains(".overlaybd.commit.tmp-"))
        });
        assert!(listing(&dir).is_empty(), "{signals:?}: {:?}", listing(&dir));
        assert!(
            e.lines().last().unwrap()
                == format!("convertor: cleanup: work files kept in {}", wd.display()),
            "{signals:?}: {e}"
        );
        assert!(!entries(&wd).is_empty());
    }
}

/// An archive destination that is the source archive is a usage error (exit 2) before
/// any work, in both forms: written whole at the end, it would hold only the converted
/// image. The source's own tag in the same OCI layout (however its path is spelled)
/// converts in place, as upstream, with a warning that the source keeps no tag.
#[test]
fn a_destination_that_would_replace_the_source() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let spelled = format!("oci:{}/./", images.display());
    let archive = t.path().join("app.tar");
    let o = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&images)
        .args(["oci-layout", "index.json", "blobs"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let archive_bytes = std::fs::read(&archive).unwrap();
    let a = |s: &str| format!("oci-archive:{}", archive.display()) + s;
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let refused: Vec<Vec<String>> = vec![
        vec!["obdconv".into(), a(""), a(":obd")],
        vec![
            "-r".into(),
            a(""),
            "--output-repository".into(),
            format!("docker-archive:{}:app:obd", archive.display()),
        ],
    ];
    for mut c in refused {
        c.extend(["-d".into(), wd_s.into()]);
        let o = Command::new(bin()).args(&c).output().unwrap();
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{c:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{c:?}: {e}");
        assert!(e.contains("losing the source"), "{c:?}: {e}");
        assert!(!wd.exists(), "{c:?}: nothing done");
    }
    assert_eq!(std::fs::read(&archive).unwrap(), archive_bytes);
    // In place in a layout, the path spelled another way: converted, with a warning.
    let tagged = |tag: &str| -> String {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(images.join("index.json")).unwrap()).unwrap();
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .map(|m| m["digest"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let source = tagged("latest");
    let o = Command::new(bin())
        .args([
            "-r",
            &src,
            "-i",
            "latest",
            "--output-repository",
            &spelled,
            "-o",
            "latest",
            "--vsize",
            "2",
            "-d",
            wd_s,
        ])
        .output()
        .unwrap();
    let converted = pushed_digest(&o);
    let e = stderr_of(&o);
    assert!(
        e.contains("the output tag latest is the source image's tag"),
        "{e}"
    );
    assert_ne!(converted, source);
    assert_eq!(tagged("latest"), converted);
}

/// Tags in `images` (the sample layout) an OCI index named `multi` that lists the
/// sample image (as linux/amd64, `entry` merged into its descriptor) and `extra`.
fn sample_in_an_index(
    images: &Path,
    entry: serde_json::Value,
    extra: Vec<serde_json::Value>,
) -> String {
    use sha2::{Digest as _, Sha256};
    let index_path = images.join("index.json");
    let mut top = read_json(&index_path);
    let mut m = top["manifests"][0].clone();
    m.as_object_mut().unwrap().remove("annotations");
    m["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    for (k, v) in entry.as_object().unwrap() {
        m[k] = v.clone();
    }
    let mut manifests = vec![m];
    manifests.extend(extra);
    let index = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})
    .to_string();
    let d = format!("sha256:{:x}", Sha256::digest(index.as_bytes()));
    std::fs::write(images.join("blobs/sha256").join(&d[7..]), &index).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"}}));
    std::fs::write(&index_path, top.to_string()).unwrap();
    d
}

/// The converted index of a `sample_in_an_index` layout, converted into `out`.
fn convert_multi(images: &Path, out: &Path, wd: &Path) -> serde_json::Value {
    let o = Command::new(bin())
        .args([
            "-r",
            &format!("oci:{}", images.display()),
            "-i",
            "multi",
            "--output-repository",
            &format!("oci:{}", out.display()),
            "-o",
            "obd",
            "--vsize",
            "2",
            "-d",
        ])
        .arg(wd)
        .output()
        .unwrap();
    let d = pushed_digest(&o);
    read_json(&out.join("blobs/sha256").join(&d[7..]))
}

/// A source index entry that embeds its manifest (`data`) does not pass that data on:
/// the converted entry names another manifest, which the source's bytes do not match.
#[test]
fn embedded_data_of_a_source_index_entry_is_not_kept() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    sample_in_an_index(&images, serde_json::json!({"data": "e30="}), vec![]);
    let out = convert_multi(&images, &t.path().join("out"), &t.path().join("w"));
    let m = &out["manifests"][0];
    assert_eq!(m["platform"]["architecture"], "amd64");
    assert!(m.get("data").is_none(), "{out}");
}
/// An index entry of a media type that is neither a manifest nor an index (a Helm
/// chart's config, a future format) is ignored, as the image spec says an unknown
/// `mediaType` in an index must be: the platforms beside it are converted.
#[test]
fn an_index_entry_of_an_unknown_media_type_is_ignored() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let blob = b"{\"name\":\"chart\"}";
    let bd = {
        use sha2::{Digest as _, Sha256};
        format!("sha256:{:x}", Sha256::digest(blob))
    };
    std::fs::write(images.join("blobs/sha256").join(&bd[7..]), blob).unwrap();
    sample_in_an_index(
        &images,
        serde_json::json!({}),
        vec![serde_json::json!({
            "mediaType": "application/vnd.cncf.helm.config.v1+json",
            "digest": bd, "size": blob.len()})],
    );
    let out = convert_multi(&images, &t.path().join("out"), &t.path().join("w"));
    let m = out["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{out}");
    assert_eq!(m[0]["platform"]["architecture"], "amd64");
}

/// A nested index that is an artifact (its `artifactType` set, e.g. a signature bundle
/// or an SBOM index listing artifact manifests) is dropped from the converted index, as
/// artifact manifests are, instead of failing the run for having no image to convert.
#[test]
fn a_nested_artifact_index_is_dropped() {
    use sha2::{Digest as _, Sha256};
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let put = |b: &[u8]| {
        let d = format!("sha256:{:x}", Sha256::digest(b));
        std::fs::write(images.join("blobs/sha256").join(&d[7..]), b).unwrap();
        serde_json::json!({"digest": d, "size": b.len()})
    };
    let empty = put(b"{}");
    let sbom = put(b"{\"spdxVersion\":\"SPDX-2.3\"}");
    let mut config = empty.clone();
    config["mediaType"] = "application/vnd.oci.empty.v1+json".into();
    let mut layer = sbom;
    layer["mediaType"] = "application/spdx+json".into();
    let artifact = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/spdx+json", "config": config, "layers": [layer]})
    .to_string();
    let mut a = put(artifact.as_bytes());
    a["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    let bundle = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "artifactType": "application/vnd.example.sbom-bundle", "manifests": [a]})
    .to_string();
    let mut b = put(bundle.as_bytes());
    b["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    sample_in_an_index(&images, serde_json::json!({}), vec![b]);
    let out = convert_multi(&images, &t.path().join("out"), &t.path().join("w"));
    let m = out["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{out}");
    assert_eq!(m[0]["platform"]["architecture"], "amd64");
}

/// A BuildKit attestation manifest whose index entry lost its
/// `vnd.docker.reference.type` annotation (its platform `unknown/unknown` left) is
/// still recognised by its in-toto layers and dropped, not converted as an image
/// whose layer media type is refused.
#[test]
fn an_attestation_without_its_annotation_is_dropped() {
    use sha2::{Digest as _, Sha256};
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let put = |b: &[u8]| {
        let d = format!("sha256:{:x}", Sha256::digest(b));
        std::fs::write(images.join("blobs/sha256").join(&d[7..]), b).unwrap();
        serde_json::json!({"digest": d, "size": b.len()})
    };
    let mut config = put(br#"{"architecture":"unknown","os":"unknown","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#);
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let mut layer = put(br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#);
    layer["mediaType"] = "application/vnd.in-toto+json".into();
    layer["annotations"] =
        serde_json::json!({"in-toto.io/predicate-type": "https://spdx.dev/Document"});
    let att = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": [layer]})
    .to_string();
    let mut a = put(att.as_bytes());
    a["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    a["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
    sample_in_an_index(&images, serde_json::json!({}), vec![a]);
    let out = convert_multi(&images, &t.path().join("out"), &t.path().join("w"));
    let m = out["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{out}");
    assert_eq!(m[0]["platform"]["architecture"], "amd64");
}

/// A docker-archive destination takes an index of one image and its attestation
/// (BuildKit's default output): that image is converted. An index of two images is
/// still refused before any work.
#[test]
fn a_docker_archive_takes_an_index_of_one_image() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let first = read_json(&images.join("index.json"))["manifests"][0].clone();
    let mut att = first.clone();
    att["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
    att["annotations"] = serde_json::json!({
        "vnd.docker.reference.type": "attestation-manifest",
        "vnd.docker.reference.digest": first["digest"]});
    sample_in_an_index(&images, serde_json::json!({}), vec![att]);
    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    let run = |dst: &Path| {
        Command::new(bin())
            .args([
                "-r",
                &src,
                "-i",
                "multi",
                "--output-repository",
                &format!("docker-archive:{}:app:1", dst.display()),
                "--vsize",
                "2",
                "-d",
            ])
            .arg(&wd)
            .output()
            .unwrap()
    };
    let one = t.path().join("one.tar");
    let o = run(&one);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(one.is_file());
    // Two images: refused, nothing written.
    let index_path = images.join("index.json");
    let mut top = read_json(&index_path);
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != "multi");
    std::fs::write(&index_path, top.to_string()).unwrap();
    let mut two = first.clone();
    two["platform"] = serde_json::json!({"architecture": "arm64", "os": "linux"});
    sample_in_an_index(&images, serde_json::json!({}), vec![two]);
    let refused = t.path().join("two.tar");
    let o = run(&refused);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("multi-platform index"),
        "{}",
        stderr_of(&o)
    );
    assert!(!refused.exists());
}

/// `--referrer` into another repository than the source's says that the referrers
/// will not be found: their subjects (the source manifests) are not there, and
/// referrers are looked up in the subject's repository. Into the source's own
/// repository it says nothing.
#[test]
fn referrers_written_elsewhere_than_their_subjects_are_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    let other = format!("oci:{}", t.path().join("other").display());
    let warning = "--referrer: the converted images name their source manifests";
    for (dst, warned) in [(other.as_str(), true), (src.as_str(), false)] {
        let o = Command::new(bin())
            .args(args_with(&args(&src, dst, wd_s), &["--referrer"]))
            .output()
            .unwrap();
        let e = stderr_of(&o);
        assert!(o.status.success(), "{dst}: {e}");
        assert_eq!(e.contains(warning), warned, "{dst}: {e}");
    }
}

/// An index that lists one manifest several times (as two platforms, and an entry
/// repeated), or lists it beside a nested index that lists it too, has it converted
/// once: one "converted" line, one manifest counted. The converted index keeps every
/// entry, each with its own platform, all naming the one converted manifest.
#[test]
fn a_manifest_listed_twice_is_converted_once() {
    use sha2::{Digest as _, Sha256};
    let t = tempfile::tempdir().unwrap();
    let images = sample(t.path());
    let first = read_json(&images.join("index.json"))["manifests"][0].clone();
    let mut arm = first.clone();
    arm.as_object_mut().unwrap().remove("annotations");
    arm["platform"] = serde_json::json!({"architecture": "arm64", "os": "linux"});
    let mut amd = arm.clone();
    amd["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let multi = sample_in_an_index(&images, serde_json::json!({}), vec![arm, amd.clone()]);
    // `outer`: the index above and the manifest itself.
    let index_path = images.join("index.json");
    let mut top = read_json(&index_path);
    let multi_entry = top["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["digest"] == multi.as_str())
        .unwrap()
        .clone();
    let mut nested = multi_entry.clone();
    nested.as_object_mut().unwrap().remove("annotations");
    let outer = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [nested, amd]})
    .to_string();
    let od = format!("sha256:{:x}", Sha256::digest(outer.as_bytes()));
    std::fs::write(images.join("blobs/sha256").join(&od[7..]), &outer).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": od, "size": outer.len(),
            "annotations": {"org.opencontainers.image.ref.name": "outer"}}));
    std::fs::write(&index_path, top.to_string()).unwrap();

    let src = format!("oci:{}", images.display());
    let wd = t.path().join("w");
    for (i, tag) in ["multi", "outer"].into_iter().enumerate() {
        let out = t.path().join(format!("out{i}"));
        let dst = format!("oci:{}", out.display());
        let mut a = args(&src, &dst, wd.to_str().unwrap());
        a[3] = tag;
        let o = Command::new(bin()).args(&a).output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        let read = |d: &str| read_json(&out.join("blobs/sha256").join(&d[7..]));
        let index = read(&pushed_digest(&o));
        let stderr = stderr_of(&o);
        let converted: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("] converted sha256:"))
            .collect();
        assert_eq!(converted.len(), 1, "{tag}: {stderr}");
        assert!(stdout.contains("(1 manifest, 2 layers)"), "{tag}: {stdout}");
        let entries = index["manifests"].as_array().unwrap();
        let m = if tag == "multi" {
            assert_eq!(entries.len(), 3, "{index}");
            let archs: Vec<&str> = entries
                .iter()
                .map(|e| e["platform"]["architecture"].as_str().unwrap())
                .collect();
            assert_eq!(archs, ["amd64", "arm64", "amd64"]);
            entries[0]["digest"].clone()
        } else {
            assert_eq!(entries.len(), 2, "{index}");
            let inner = read(entries[0]["digest"].as_str().unwrap());
            assert_eq!(inner["manifests"].as_array().unwrap().len(), 3, "{inner}");
            assert_eq!(inner["manifests"][0]["digest"], entries[1]["digest"]);
            entries[1]["digest"].clone()
        };
        for e in entries
            .iter()
            .filter(|e| e["mediaType"] != "application/vnd.oci.image.index.v1+json")
        {
            assert_eq!(e["digest"], m, "{index}");
            assert!(e.get("annotations").is_none(), "{index}");
        }
        assert_ne!(m, first["digest"]);
        assert_eq!(
            read(m.as_str().unwrap())["layers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
