//! Offline conversion end to end: archives in and out (`oci-archive:`,
//! `docker-archive:`), made and consumed by skopeo and umoci, any source to any
//! destination; the `obdconv SRC DST` form between two registries with their own
//! credentials and ZFile options; containerd `hosts.toml` (a mirror, a CA, a header);
//! and bad archives failing with one line and nothing written.
//!
//! Every converted image is checked the same way: its layers (taken back out of the
//! destination by skopeo or our client) are flattened through our layer stack into an
//! ext4 that must pass `e2fsck -fn` and hold exactly the source image's reference tree,
//! and all routes give the same layer digests (the conversion is deterministic).

mod common;

use common::convert::*;
use common::{require_bin, Auth, Pki, Registry, RegistryOpts};
use obdoci::{Descriptor, Reference};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn skopeo(args: &[&str]) -> String {
    require_bin("skopeo");
    let o = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `docker save`-format archive of `src` made by skopeo (through a decompressed `dir:`,
/// since skopeo cannot put the zstd layer of the test image into a Docker manifest).
fn skopeo_docker_archive(src: &str, dest: &str, scratch: &Path) {
    let dir = scratch.join("skopeo-dir");
    let _ = std::fs::remove_dir_all(&dir);
    let d = format!("dir:{}", dir.display());
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-decompress",
        src,
        &d,
    ]);
    skopeo(&["copy", "--quiet", &d, &format!("docker-archive:{dest}")]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The layer blobs of `repo:tag` (plain HTTP, no auth), written to `dir`, bottom first.
fn registry_layers(repo: &obdregistry::Repository, tag: &str, dir: &Path) -> Vec<PathBuf> {
    let (_, b) = repo.get_manifest(&Reference::Tag(tag.into())).unwrap();
    let m: Value = serde_json::from_slice(&b).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let mut out = Vec::new();
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        let d: Descriptor = serde_json::from_value(l.clone()).unwrap();
        let p = dir.join(format!("{i}.commit"));
        std::fs::write(&p, repo.read_blob(&d, 1 << 30).unwrap()).unwrap();
        out.push(p);
    }
    out
}

fn digests(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| obdoci::Digest::of(&std::fs::read(f).unwrap()).to_string())
        .collect()
}

/// The converted layers' ZFile headers: (algorithm code, block size).
fn zfile_params(files: &[PathBuf]) -> Vec<(u8, u32)> {
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let mut ar = tar::Archive::new(&bytes[..]);
            let mut e = ar.entries().unwrap().next().unwrap().unwrap();
            let mut head = vec![0u8; 512];
            std::io::Read::read_exact(&mut e, &mut head).unwrap();
            let h = blockdev::zfile::ZHeader::decode(&head).unwrap();
            (h.algorithm, h.block_size)
        })
        .collect()
}

#[test]
fn archives_any_source_to_any_destination() {
    require_bin("umoci");
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    let want = reference_tree(&layout, "v1", None);
    skopeo_push(&layout, "v1", &reg.host(), "test/layers");
    let src_reg = format!("docker://{}/test/layers:v1", reg.host());
    let wd = t.path().join("work");
    let wd_s = wd.to_str().unwrap();
    let p = |n: &str| t.path().join(n).to_str().unwrap().to_string();

    // Archives made by another tool: skopeo's docker-archive (docker save format) and
    // oci-archive of the registry image.
    let docker_src = p("src-docker.tar");
    let oci_src = p("src-oci.tar");
    skopeo_docker_archive(
        &src_reg,
        &format!("{docker_src}:example.com/app:v1"),
        t.path(),
    );
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &src_reg,
        &format!("oci-archive:{oci_src}:v1"),
    ]);

    // 1. registry -> oci-archive.
    let out1 = p("out1.tar");
    let o = convert_ok(&[
        "-r",
        &format!("{}/test/layers", reg.host()),
        "-i",
        "v1",
        "--plain",
        "--output-repository",
        &format!("oci-archive:{out1}:obd"),
        "--vsize",
        "4",
        "-d",
        wd_s,
    ]);
    assert!(o.contains("pushed oci-archive:"), "{o}");
    assert!(!wd.exists(), "scratch data removed");
    let inspect: Value =
        serde_json::from_str(&skopeo(&["inspect", &format!("oci-archive:{out1}:obd")])).unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 4);
    // umoci reads the layout inside it.
    let unpacked = t.path().join("out1");
    std::fs::create_dir_all(&unpacked).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&out1)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let o = Command::new("umoci")
        .args(["stat", "--json", "--image"])
        .arg(format!("{}:obd", unpacked.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "umoci stat: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Back into the registry with skopeo, unchanged; then flattened.
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci-archive:{out1}:obd"),
        &format!("docker://{}/test/layers:from_oci_archive", reg.host()),
    ]);
    let repo = reg.client("test/layers");
    let l1 = registry_layers(&repo, "from_oci_archive", &t.path().join("l1"));
    let (_, b) = repo
        .get_manifest(&Reference::Tag("from_oci_archive".into()))
        .unwrap();
    let m: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        m["layers"][0]["annotations"][obdconvert::annotations::ANNOTATION_VERSION],
        "0.1.0",
        "an OCI archive keeps the layer annotations"
    );
    assert_same_tree(&flatten_and_scan(&l1, t.path()), &want);
    assert_eq!(
        zfile_params(&l1),
        vec![(1, 4096); 4],
        "lz4, 4 KiB by default"
    );

    // 2. skopeo's docker-archive -> docker-archive, picked by name.
    let out2 = p("out2.tar");
    let said = convert_ok(&[
        "-r",
        &format!("docker-archive:{docker_src}:example.com/app:v1"),
        "--output-repository",
        &format!("docker-archive:{out2}:localhost/app:obd"),
        "--vsize",
        "4",
        "-d",
        wd_s,
    ]);
    // The summary names the image as the archive does.
    assert!(
        said.contains(&format!("pushed docker-archive:{out2} (localhost/app:obd)")),
        "{said}"
    );
    // skopeo finds the image by the name we gave it.
    let inspect: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        &format!("docker-archive:{out2}:localhost/app:obd"),
    ]))
    .unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 4);
    let members = read_tar(Path::new(&out2));
    let dm: Value = serde_json::from_slice(
        &members
            .iter()
            .find(|(n, _)| n == "manifest.json")
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(dm[0]["RepoTags"], serde_json::json!(["localhost/app:obd"]));
    let repos: Value =
        serde_json::from_slice(&members.iter().find(|(n, _)| n == "repositories").unwrap().1)
            .unwrap();
    assert!(repos["localhost/app"]["obd"].is_string(), "{repos}");
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("docker-archive:{out2}"),
        &format!("docker://{}/test/layers:from_docker_archive", reg.host()),
    ]);
    let l2 = registry_layers(&repo, "from_docker_archive", &t.path().join("l2"));
    assert_eq!(digests(&l2), digests(&l1), "same layers whatever the route");

    // 3. oci-archive (gzip-compressed, made by skopeo) -> registry.
    let gz = p("src-oci.tar.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {oci_src} > {gz}"))
        .status()
        .unwrap();
    assert!(st.success());
    convert_ok(&[
        "-r",
        &format!("oci-archive:{gz}:v1"),
        "--plain",
        "--output-repository",
        &format!("{}/test/from-archive", reg.host()),
        "-o",
        "obd",
        "--vsize",
        "4",
        "-d",
        wd_s,
    ]);
    let l3 = registry_layers(
        &reg.client("test/from-archive"),
        "obd",
        &t.path().join("l3"),
    );
    assert_eq!(digests(&l3), digests(&l1));

    // 4. docker-archive (the one we wrote, read back) -> compressed oci-archive ->
    //    skopeo -> registry: archives chain.
    let out4 = p("out4.tar.gz");
    convert_ok(&[
        "-r",
        &format!("oci-archive:{oci_src}"),
        "--output-repository",
        &format!("oci-archive:{out4}"),
        "--compress",
        "--vsize",
        "4",
        "-d",
        wd_s,
    ]);
    let raw = std::fs::read(&out4).unwrap();
    assert_eq!(&raw[..2], b"\x1f\x8b", "--compress writes gzip");
    drop(raw);
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci-archive:{out4}"),
        &format!("docker://{}/test/layers:from_gz_archive", reg.host()),
    ]);
    let l4 = registry_layers(&repo, "from_gz_archive", &t.path().join("l4"));
    assert_eq!(digests(&l4), digests(&l1));

    // A multi-platform image cannot go into a docker archive: refused before any work.
    let multi = images.join("multi");
    let out5 = p("out5.tar");
    let o = convertor(&[
        "-r",
        &format!("oci:{}:multi", multi.display()),
        "--output-repository",
        &format!("docker-archive:{out5}"),
        "-d",
        wd_s,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("multi-platform"), "{err}");
    assert!(!Path::new(&out5).exists());
    // An OCI archive holds the converted index with every platform; skopeo copies all.
    let out6 = p("out6.tar");
    convert_ok(&[
        "-r",
        &format!("oci:{}:multi", multi.display()),
        "--output-repository",
        &format!("oci-archive:{out6}:multi_obd"),
        "--vsize",
        "4",
        "-d",
        wd_s,
    ]);
    let raw: Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{out6}:multi_obd"),
    ]))
    .unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(
        raw["manifests"].as_array().unwrap().len(),
        2,
        "amd64 + arm64: {raw}"
    );
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci-archive:{out6}:multi_obd"),
        &format!("docker://{}/test/multi:obd", reg.host()),
    ]);
    assert!(reg.tag_link_exists("test/multi", "obd"));
}

/// Writes the members of `(name, bytes)` as a tar file.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (n, d) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, n, &d[..]).unwrap();
    }
    b.finish().unwrap();
}

fn read_tar(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let n = e.path().unwrap().display().to_string();
        let mut d = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut d).unwrap();
        out.push((n, d));
    }
    out
}

#[test]
fn bad_archives_fail_with_one_line_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let p = |n: &str| t.path().join(n);
    let oci_src = p("src-oci.tar");
    let docker_src = p("src-docker.tar");
    let layout = format!("oci:{}:v1", images.join("layers").display());
    skopeo(&[
        "copy",
        "--quiet",
        &layout,
        &format!("oci-archive:{}:v1", oci_src.display()),
    ]);
    skopeo_docker_archive(
        &layout,
        &format!("{}:app:v1", docker_src.display()),
        t.path(),
    );
    let oci = read_tar(&oci_src);
    let docker = read_tar(&docker_src);
    let wd = p("work");
    let dest = p("dest.tar");

    let index: Value =
        serde_json::from_slice(&oci.iter().find(|(n, _)| n == "index.json").unwrap().1).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: Value =
        serde_json::from_slice(&oci.iter().find(|(n, _)| n.ends_with(&mdigest)).unwrap().1)
            .unwrap();
    let layer0 = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let dm: Value =
        serde_json::from_slice(&docker.iter().find(|(n, _)| n == "manifest.json").unwrap().1)
            .unwrap();
    let docker_layer0 = dm[0]["Layers"][0].as_str().unwrap().to_string();

    let truncated = p("truncated.tar");
    let full = std::fs::read(&oci_src).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let no_index = p("no-index.tar");
    write_tar(
        &no_index,
        &oci.iter()
            .filter(|(n, _)| n != "index.json")
            .cloned()
            .collect::<Vec<_>>(),
    );
    let missing_blob = p("missing-blob.tar");
    write_tar(
        &missing_blob,
        &oci.iter()
            .filter(|(n, _)| !n.ends_with(&layer0))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mismatch = p("mismatch.tar");
    let mut bad = oci.clone();
    for (n, d) in bad.iter_mut() {
        if n.ends_with(&layer0) {
            let k = d.len() / 2;
            d[k] ^= 0xff;
        }
    }
    write_tar(&mismatch, &bad);
    let docker_missing = p("docker-missing.tar");
    write_tar(
        &docker_missing,
        &docker
            .iter()
            .filter(|(n, _)| n != &docker_layer0)
            .cloned()
            .collect::<Vec<_>>(),
    );
    // A gzipped layer at a path that is not its digest (as `docker save` wrote
    // them) is hashed from itself: swapped for another layer's bytes, only its
    // diff_id in the config can tell.
    let docker_swapped = p("docker-swapped.tar");
    let other = p("other-layer.tar");
    write_tar(&other, &[("etc/other".into(), b"not the layer\n".to_vec())]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &std::fs::read(&other).unwrap()).unwrap();
    let gz = gz.finish().unwrap();
    write_tar(
        &docker_swapped,
        &docker
            .iter()
            .map(|(n, d)| {
                let d = if n == &docker_layer0 {
                    gz.clone()
                } else {
                    d.clone()
                };
                (n.clone(), d)
            })
            .collect::<Vec<_>>(),
    );

    let out = format!("oci-archive:{}", dest.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![format!("docker-archive:{}", docker_swapped.display())],
            "rootfs.diff_ids",
        ),
        (
            vec![format!("oci-archive:{}", truncated.display())],
            "truncated",
        ),
        (
            vec![format!("oci-archive:{}", no_index.display())],
            "no index.json",
        ),
        (
            vec![format!("oci-archive:{}", missing_blob.display())],
            "does not hold blobs/sha256/",
        ),
        (
            vec![format!("oci-archive:{}", mismatch.display())],
            "digest mismatch",
        ),
        (
            vec![format!("docker-archive:{}", docker_missing.display())],
            "does not hold",
        ),
        (
            vec![format!("docker-archive:{}", oci_src.display())],
            "no manifest.json",
        ),
    ];
    // Bad ZFile options are usage errors (exit code 2, as clap's other checks), in
    // both forms, and nothing is written.
    let src_arg = format!("oci-archive:{}", oci_src.display());
    for (flag, value, want) in [
        (
            "--bs",
            "3",
            "the ZFile block size must be 4, 8, 16, 32 or 64",
        ),
        ("--algorithm", "gzip", "possible values: lz4, zstd"),
    ] {
        for obdconv in [false, true] {
            let mut a: Vec<String> = Vec::new();
            if obdconv {
                a.extend(["obdconv".into(), flag.into(), value.into()]);
                a.extend([src_arg.clone(), out.clone()]);
            } else {
                a.extend(["-r".into(), src_arg.clone(), flag.into(), value.into()]);
                a.extend(["--output-repository".into(), out.clone()]);
            }
            a.extend(["-d".into(), wd.display().to_string()]);
            let o = convertor(&a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{a:?}: {err}");
            assert!(err.contains(flag) && err.contains(want), "{a:?}: {err}");
            assert!(!dest.exists(), "{a:?}: nothing written to the destination");
        }
    }
    for (args, want) in cases {
        let mut a: Vec<String> = vec!["-r".into()];
        a.extend(args.iter().cloned());
        a.extend([
            "--output-repository".into(),
            out.clone(),
            "--vsize".into(),
            "4".into(),
            "-d".into(),
            wd.display().to_string(),
        ]);
        let o = convertor(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{a:?}: {err}");
        // One line says what failed (progress lines of layers read before may precede it).
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{a:?}: one error line:\n{err}");
        assert_eq!(err.trim_end().lines().last(), Some(errors[0]), "{err}");
        assert!(err.contains(want), "{a:?}: expected {want:?} in: {err}");
        if !args[0].starts_with("dir:") {
            let file = args[0].split(':').nth(1).unwrap();
            assert!(
                err.contains(file) || want.starts_with("--") || want.starts_with("invalid"),
                "{a:?}: names the file: {err}"
            );
        }
        assert!(!dest.exists(), "{a:?}: nothing written to the destination");
        assert!(!err.contains("panicked"), "{err}");
    }
    // No scratch left behind in the work directory.
    let left: Vec<_> = std::fs::read_dir(&wd)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Starts a TLS registry with htpasswd auth.
fn auth_registry(pki: &Pki, user: &str, password: &str) -> Registry {
    Registry::start(RegistryOpts {
        tls: Some(pki),
        client_ca: false,
        auth: Auth::Htpasswd {
            user: user.into(),
            password: password.into(),
        },
    })
}

/// A client of `host` trusting the test CA, with credentials.
fn tls_client(
    pki: &Pki,
    host: &str,
    repo: &str,
    user: &str,
    password: &str,
) -> obdregistry::Repository {
    let o = obdregistry::ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: obdregistry::Credentials::parse(&format!("{user}:{password}")),
        ..Default::default()
    };
    obdregistry::Registry::new(host, &o)
        .unwrap()
        .repository(repo)
}

fn skopeo_push_auth(layout: &Path, tag: &str, dest: &str, creds: &str) {
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("--dest-creds={creds}"),
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{dest}"),
    ]);
}

#[test]
fn obdconv_between_registries_with_zstd_16k() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let src = auth_registry(&pki, "alice", "a-pass");
    let dst = auth_registry(&pki, "bob", "b-pass");
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    skopeo_push_auth(
        &layout,
        "v1",
        &format!("{}/team/app:v1", src.host()),
        "alice:a-pass",
    );
    let wd = t.path().join("work");
    let ca = pki.path("ca.crt");
    let o = convertor(&[
        "obdconv",
        &format!("{}/team/app:v1", src.host()),
        &format!("{}/other/app:obd", dst.host()),
        "-u",
        "alice:a-pass",
        "--dest-creds",
        "bob:b-pass",
        "--tlscacert",
        ca.to_str().unwrap(),
        "--algorithm",
        "zstd",
        "--bs",
        "16",
        "--vsize",
        "4",
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "obdconv failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let repo = tls_client(&pki, &dst.host(), "other/app", "bob", "b-pass");
    let files = registry_layers(&repo, "obd", &t.path().join("l"));
    assert_eq!(
        zfile_params(&files),
        vec![(2, 16384); 4],
        "zstd, 16 KiB blocks"
    );
    assert_same_tree(
        &flatten_and_scan(&files, t.path()),
        &reference_tree(&layout, "v1", None),
    );
    // Nothing was pushed to the source.
    assert!(!src.tag_link_exists("team/app", "obd"));
    // The source's credentials are not the destination's.
    let o = convertor(&[
        "obdconv",
        &format!("{}/team/app:v1", src.host()),
        &format!("{}/other/app:obd2", dst.host()),
        "-u",
        "alice:a-pass",
        "--tlscacert",
        ca.to_str().unwrap(),
        "--vsize",
        "4",
        "-d",
        wd.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!dst.tag_link_exists("other/app", "obd2"));
    // Usage errors are clap's, once ("error: " not doubled), exit 2.
    let o = convertor(&["obdconv", "oci:x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(err.contains("<DST>"), "{err}");
}

#[test]
fn hosts_toml_mirror_ca_and_header() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let mirror = auth_registry(&pki, "mirror-user", "m-pass");
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    skopeo_push_auth(
        &layout,
        "v1",
        &format!("{}/lib/app:v1", mirror.host()),
        "mirror-user:m-pass",
    );

    // The image is named by a host that does not exist; hosts.toml sends pulls to the
    // mirror, trusts its CA and authenticates with a static header. No -u, no --root-ca.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("mirror-user:m-pass");
    let hosts = t.path().join("certs.d");
    let hdir = hosts.join("registry.invalid:5000");
    std::fs::create_dir_all(&hdir).unwrap();
    std::fs::copy(pki.path("ca.crt"), hdir.join("mirror-ca.crt")).unwrap();
    let write = |header: bool| {
        let mut s = format!(
            "server = \"https://registry.invalid:5000\"\n\n[host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"mirror-ca.crt\"\n",
            mirror.host()
        );
        if header {
            s += &format!(
                "  [host.\"https://{}\".header]\n    authorization = \"Basic {basic}\"\n",
                mirror.host()
            );
        }
        std::fs::write(hdir.join("hosts.toml"), s).unwrap();
    };
    write(true);
    let wd = t.path().join("work");
    let out = t.path().join("out.tar");
    let args = |extra: &[&str]| -> Vec<String> {
        args_with(
            &[
                "-r",
                "docker://registry.invalid:5000/lib/app",
                "-i",
                "v1",
                "--output-repository",
                &format!("oci-archive:{}:obd", out.display()),
                "--vsize",
                "4",
                "-d",
                wd.to_str().unwrap(),
            ],
            extra,
        )
    };
    let run = |a: Vec<String>| convertor(&a);
    let o = run(args(&["--hosts-dir", hosts.to_str().unwrap()]));
    assert!(
        o.status.success(),
        "through the mirror: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    skopeo(&["inspect", &format!("oci-archive:{}:obd", out.display())]);
    std::fs::remove_file(&out).unwrap();

    // Without the header the mirror refuses (and the server, the next host, does not
    // exist); without hosts.toml the host is unknown.
    write(false);
    let o = run(args(&["--hosts-dir", hosts.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("mirror {}", mirror.host())) && err.contains("authentication failed"),
        "{err}"
    );
    let o = run(args(&[]));
    assert!(!o.status.success());
    assert!(!out.exists());
    // A broken hosts.toml is named with what is wrong.
    std::fs::write(
        hdir.join("hosts.toml"),
        "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n",
    )
    .unwrap();
    let o = run(args(&["--hosts-dir", hosts.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("hosts.toml") && err.contains("unknown capability"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// Archive destinations name their images as `oci:` layouts do: an `oci-archive:`
/// holds every image converted (the overlaybd and the TurboOCI one), each under the
/// tag the run printed; a docker archive, which names its one image by the
/// destination's NAME:TAG, refuses two images before any work and says when an
/// output tag is not written.
#[test]
fn archive_destinations_hold_what_the_run_reports() {
    let t = tempfile::tempdir().unwrap();
    build_images("sample", &t.path().join("img"), &[]);
    let src = format!("oci:{}", t.path().join("img").display());
    let run = |dst: &str, extra: &[&str]| {
        let wd = t.path().join("w");
        let mut a = vec![
            "-r",
            &src,
            "-i",
            "latest",
            "--output-repository",
            dst,
            "-d",
            wd.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_convertor"))
            .args(&a)
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let both = t.path().join("both.tar");
    let o = run(
        &format!("oci-archive:{}", both.display()),
        &["--overlaybd", "a", "--turboOCI", "b"],
    );
    assert!(o.status.success(), "{}", text(&o));
    for tag in ["a", "b"] {
        let raw = skopeo(&[
            "inspect",
            "--raw",
            &format!("oci-archive:{}:{tag}", both.display()),
        ]);
        assert!(raw.contains("layers"), "{tag}: {raw}");
    }
    // The output tag wins over the destination's, as the run prints and warns.
    let one = t.path().join("one.tar");
    let o = run(
        &format!("oci-archive:{}:foo", one.display()),
        &["-o", "obd"],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("pushed oci-archive:{}:obd", one.display())),
        "{out}"
    );
    skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}:obd", one.display()),
    ]);
    let docker = t.path().join("d.tar");
    let o = run(
        &format!("docker-archive:{}:app:v1", docker.display()),
        &["--overlaybd", "a", "--turboOCI", "b"],
    );
    let out = text(&o);
    assert!(
        !o.status.success() && out.contains("holds one image"),
        "{out}"
    );
    assert!(!docker.exists() && !t.path().join("w").exists());
    // A TurboOCI image alone is refused too: without its annotations and the
    // source layers beside it, nothing could read it.
    let o = run(
        &format!("docker-archive:{}:app:v1", docker.display()),
        &["--turboOCI", "b"],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("a TurboOCI image cannot be written to a docker archive"),
        "{out}"
    );
    assert!(!docker.exists() && !t.path().join("w").exists());
    let o = run(
        &format!("docker-archive:{}:app:v1", docker.display()),
        &["-o", "obd"],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("the output tag obd is not written"), "{out}");
    assert!(out.contains("app:v1"), "{out}");
}

/// A TurboOCI image reads its file data from the source layers (each metadata
/// layer's `turbo-oci/target-digest`), which the runtime finds beside the image:
/// an `oci-archive:` destination holds them, as an `oci:` destination does, so that
/// the archive unpacked is the same layout; without them the image cannot be read.
#[test]
fn turbo_oci_archive_holds_the_source_layers() {
    let t = tempfile::tempdir().unwrap();
    build_images("sample", &t.path().join("img"), &[]);
    let src = format!("oci:{}", t.path().join("img").display());
    let wd = t.path().join("w");
    let archive = t.path().join("turbo.tar");
    let layout = t.path().join("layout");
    for dst in [
        format!("oci-archive:{}", archive.display()),
        format!("oci:{}", layout.display()),
    ] {
        convert_ok(&[
            "-r",
            &src,
            "-i",
            "latest",
            "--output-repository",
            &dst,
            "--overlaybd",
            "obd",
            "--turboOCI",
            "turbo",
            "-d",
            wd.to_str().unwrap(),
        ]);
    }
    let members: std::collections::BTreeMap<String, Vec<u8>> =
        read_tar(&archive).into_iter().collect();
    let blob = |d: &str| members.get(&format!("blobs/sha256/{}", &d[7..]));
    let index: Value = serde_json::from_slice(&members["index.json"]).unwrap();
    let turbo = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "turbo")
        .expect("the TurboOCI image is in index.json");
    let manifest: Value =
        serde_json::from_slice(blob(turbo["digest"].as_str().unwrap()).unwrap()).unwrap();
    let targets: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(targets.len(), 2);
    for d in &targets {
        let bytes = blob(d).unwrap_or_else(|| panic!("the archive lacks the source layer {d}"));
        assert_eq!(&obdoci::Digest::of(bytes).to_string(), d);
    }
    // The archive holds what the layout destination holds, no more, no less.
    let mut in_layout: Vec<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("blobs/sha256/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    in_layout.sort();
    let in_archive: Vec<String> = members
        .keys()
        .filter(|k| k.starts_with("blobs/sha256/"))
        .cloned()
        .collect();
    assert_eq!(in_archive, in_layout);
}
