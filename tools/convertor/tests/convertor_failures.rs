//! Convertor runs against registries with TLS, htpasswd and token auth, and the
//! failure cases: wrong password, unknown tag, corrupt source blob, registry going
//! down mid-push, Ctrl-C. Every failure must be one clear error line, a non-zero exit
//! and no manifest pushed.

mod common;

use common::convert::*;
use common::{Auth, Pki, Proxy, Registry, RegistryOpts, Stall, TokenServer};
use obdoci::{Descriptor, Reference};
use obdregistry::{self as registry, ClientOptions, Credentials};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn tls_htpasswd_conversion_and_wrong_password() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Htpasswd {
            user: "alice".into(),
            password: "pa:ss".into(),
        },
    });
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    let copts = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: Credentials::parse("alice:pa:ss"),
        ..Default::default()
    };
    let repo = registry::Registry::new(&reg.host(), &copts)
        .unwrap()
        .repository("sec/sample");
    push_layout_tag(&images, "latest", &repo);
    let r = format!("{}/sec/sample", reg.host());
    let ca = pki.path("ca.crt");
    let ca_s = ca.to_str().unwrap();
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();

    let o = convertor(&[
        "-r",
        &r,
        "-i",
        "latest",
        "-o",
        "obd",
        "-u",
        "alice:wrong",
        "--root-ca",
        ca_s,
        "-d",
        wd_s,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("authentication failed") && !e.contains("wrong"),
        "{e}"
    );
    assert_eq!(e.lines().filter(|l| l.contains("error")).count(), 1, "{e}");
    assert!(!reg.tag_link_exists("sec/sample", "obd"));

    // Without the CA the TLS handshake fails clearly; with it, conversion works.
    let o = convertor(&[
        "-r",
        &r,
        "-i",
        "latest",
        "-o",
        "obd",
        "-u",
        "alice:pa:ss",
        "-d",
        wd_s,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_of(&o).contains(&reg.host()), "{}", stderr_of(&o));
    convert_ok(&[
        "-r",
        &r,
        "-i",
        "latest",
        "-o",
        "obd",
        "-u",
        "alice:pa:ss",
        "--root-ca",
        ca_s,
        "--vsize",
        "2",
        "-d",
        wd_s,
    ]);
    let (d, _) = repo.get_manifest(&Reference::Tag("obd".into())).unwrap();
    // --cert-dir gives the same image.
    let cd = t.path().join("certs");
    std::fs::create_dir_all(&cd).unwrap();
    std::fs::copy(&ca, cd.join("ca.crt")).unwrap();
    convert_ok(&[
        "-r",
        &r,
        "-i",
        "latest",
        "-o",
        "obd2",
        "-u",
        "alice:pa:ss",
        "--cert-dir",
        cd.to_str().unwrap(),
        "--vsize",
        "2",
        "-d",
        wd_s,
    ]);
    let (d2, _) = repo.get_manifest(&Reference::Tag("obd2".into())).unwrap();
    assert_eq!(d.digest, d2.digest);

    // Without -u, credentials come from Docker's config.json.
    let dc = t.path().join("docker");
    std::fs::create_dir_all(&dc).unwrap();
    std::fs::write(
        dc.join("config.json"),
        format!(
            r#"{{"auths":{{"https://{}/v1/":{{"auth":"YWxpY2U6cGE6c3M="}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_convertor"))
        .args([
            "-r",
            &r,
            "-i",
            "latest",
            "-o",
            "obd3",
            "--root-ca",
            ca_s,
            "--vsize",
            "2",
            "-d",
            wd_s,
        ])
        .env("DOCKER_CONFIG", &dc)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let (d3, _) = repo.get_manifest(&Reference::Tag("obd3".into())).unwrap();
    assert_eq!(d.digest, d3.digest);
}

#[test]
fn token_auth_conversion() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let ts = TokenServer::start(&pki, "bob", "tok-pass");
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Token { realm: ts.realm() },
    });
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    let copts = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: Credentials::parse("bob:tok-pass"),
        ..Default::default()
    };
    let repo = registry::Registry::new(&reg.host(), &copts)
        .unwrap()
        .repository("tok/sample");
    push_layout_tag(&images, "latest", &repo);
    let r = format!("{}/tok/sample", reg.host());
    let ca = pki.path("ca.crt");
    let wd = t.path().join("w");
    convert_ok(&[
        "-r",
        &r,
        "-i",
        "latest",
        "--overlaybd",
        "obd",
        "-u",
        "bob:tok-pass",
        "--root-ca",
        ca.to_str().unwrap(),
        "--vsize",
        "2",
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert!(repo.get_manifest(&Reference::Tag("obd".into())).is_ok());
    let o = convertor(&[
        "-r",
        &r,
        "-i",
        "latest",
        "--overlaybd",
        "obd3",
        "-u",
        "bob:nope",
        "--root-ca",
        ca.to_str().unwrap(),
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("rejected the credentials"),
        "{}",
        stderr_of(&o)
    );
}

#[test]
fn unknown_tag_and_corrupt_blob() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    skopeo_push(&images, "latest", &reg.host(), "f/sample");
    let r = format!("{}/f/sample", reg.host());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();

    let o = convertor(&["-r", &r, "-i", "nope", "-o", "obd", "--plain", "-d", wd_s]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains("not found") && e.contains("nope"), "{e}");

    // Corrupt the first layer blob inside the registry's storage (same length).
    let repo = reg.client("f/sample");
    let (_, m) = repo.get_manifest(&Reference::Tag("latest".into())).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
    // Flips the middle byte of a stored blob (flipping it again restores the blob).
    let flip_middle = |d: &Descriptor| {
        let p = reg.blob_data_path(d.digest.as_str());
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        std::fs::write(&p, &b).unwrap();
    };
    let l0: Descriptor = serde_json::from_value(m["layers"][0].clone()).unwrap();
    flip_middle(&l0);
    let revs = reg.manifest_revisions("f/sample");
    let o = convertor(&["-r", &r, "-i", "latest", "-o", "obd", "--plain", "-d", wd_s]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("digest mismatch") && e.contains(l0.digest.as_str()),
        "{e}"
    );
    assert!(!reg.tag_link_exists("f/sample", "obd"));
    assert_eq!(
        reg.manifest_revisions("f/sample"),
        revs,
        "no manifest pushed"
    );
    assert!(!wd.exists(), "work dir cleaned up after failure");

    // The same with the second layer, after the first one converted: the same
    // one-line error, for that layer.
    flip_middle(&l0);
    let l1: Descriptor = serde_json::from_value(m["layers"][1].clone()).unwrap();
    flip_middle(&l1);
    let o = convertor(&["-r", &r, "-i", "latest", "-o", "obd", "--plain", "-d", wd_s]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("digest mismatch") && e.contains(l1.digest.as_str()) && e.contains("layer 2/2"),
        "{e}"
    );
    // Progress lines of the first layer, then the error on one line.
    assert_eq!(e.matches("error").count(), 1, "one error line: {e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!reg.tag_link_exists("f/sample", "obd"));
    assert!(!wd.exists(), "work dir cleaned up after failure");
}

#[test]
fn registry_down_mid_push() {
    let mut reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    let layout = images.join("layers");
    // Source: the local layout; destination: the registry behind a proxy that dies
    // after 1 MB of requests, i.e. during the first layer upload.
    let proxy = Proxy::start(reg.port, Some(1 << 20), None);
    let src = format!("oci:{}", layout.display());
    let dst = format!("127.0.0.1:{}/down/layers", proxy.port);
    let wd = t.path().join("w");
    let t0 = Instant::now();
    let o = convertor(&[
        "-r",
        &src,
        "-i",
        "v1",
        "--output-repository",
        &dst,
        "-o",
        "obd",
        "--plain",
        "--vsize",
        "2",
        "-d",
        wd.to_str().unwrap(),
    ]);
    assert!(proxy.is_dead(), "the proxy never saw 1 MB");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("uploading layer") && e.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    reg.restart();
    assert!(!reg.tag_link_exists("down/layers", "obd"));
    assert_eq!(
        reg.manifest_revisions("down/layers"),
        0,
        "no manifest pushed"
    );
}

#[test]
fn ctrl_c_exits_130_and_cleans_up() {
    interrupted_run("INT", 130, false, Slow::Crawl);
}

/// SIGTERM (a service manager, `timeout`) exits 143, the shell convention, and
/// cleans up too, also when nobody reads stdout/stderr any more (a closed SSH
/// session): output must never panic.
#[test]
fn sigterm_exits_143_and_cleans_up_with_output_closed() {
    interrupted_run("TERM", 143, true, Slow::Crawl);
}

/// Ctrl-C while a download hangs on a silent registry connection stops the run at
/// once: the read that waits for the stall timeout (here the default, 60 s) is not
/// waited for.
#[test]
fn ctrl_c_during_a_stalled_download_stops_at_once() {
    interrupted_run("INT", 130, false, Slow::Stalled);
}

/// Ctrl-C while the registry does not answer the run's first request (the
/// manifest) stops the run at once too: the request is not waited for until
/// the stall timeout.
#[test]
fn ctrl_c_while_the_registry_does_not_answer_stops_at_once() {
    interrupted_run("INT", 130, false, Slow::Silent);
}

/// How the registry is slow when the signal comes.
enum Slow {
    /// Downloads crawl at 200 KB/s.
    Crawl,
    /// The first download to pass 200 KB goes silent.
    Stalled,
    /// The registry's first answer never comes.
    Silent,
}

fn interrupted_run(signal: &str, code: i32, close_output: bool, slow: Slow) {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("testset", &images, &[]);
    skopeo_push(&images.join("layers"), "v1", &reg.host(), "int/layers");
    // Through the proxy the run is still busy when the signal comes.
    let proxy = match slow {
        Slow::Crawl => Proxy::start(reg.port, None, Some(200_000)),
        Slow::Stalled => Proxy::start_stalling(reg.port, Stall::ToClient, 200_000),
        Slow::Silent => Proxy::start_stalling(reg.port, Stall::ToClient, 0),
    };
    let r = format!("127.0.0.1:{}/int/layers", proxy.port);
    let wd = t.path().join("w");
    let mut child = Command::new(env!("CARGO_BIN_EXE_convertor"))
        .args([
            "-r",
            &r,
            "-i",
            "v1",
            "-o",
            "obd",
            "--plain",
            "-d",
            wd.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if close_output {
        drop(child.stdout.take());
        drop(child.stderr.take());
    }
    match slow {
        Slow::Crawl => std::thread::sleep(Duration::from_millis(1500)),
        Slow::Stalled | Slow::Silent => {
            let t0 = Instant::now();
            while !proxy.has_stalled() {
                assert!(t0.elapsed() < Duration::from_secs(30), "no stall");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(
        wd.exists() || matches!(slow, Slow::Silent),
        "conversion should be under way"
    );
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let t0 = Instant::now();
    let o = child.wait_with_output().unwrap();
    // Far below the 60 s stall timeout (the bound only keeps a slow machine from
    // failing the test).
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?} to stop",
        t0.elapsed()
    );
    assert_eq!(o.status.code(), Some(code), "{}", stderr_of(&o));
    if !close_output {
        let e = stderr_of(&o);
        assert!(e.contains("interrupted"), "{e}");
        assert!(!e.contains("panicked"), "{e}");
    }
    assert!(!wd.exists(), "work dir cleaned up");
    assert!(!reg.tag_link_exists("int/layers", "obd"));
}

#[test]
fn registry_briefly_down_is_retried() {
    let mut reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    skopeo_push(&images, "latest", &reg.host(), "flap/sample");
    reg.stop();
    let r = format!("{}/flap/sample", reg.host());
    let wd = t.path().join("w");
    let child = Command::new(env!("CARGO_BIN_EXE_convertor"))
        .args([
            "-r",
            &r,
            "-i",
            "latest",
            "-o",
            "obd",
            "--plain",
            "--vsize",
            "2",
            "-d",
            wd.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Retries back off 0.5 + 1 + 2 s; the registry is back after about 1 s.
    std::thread::sleep(Duration::from_millis(800));
    reg.restart();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("retrying"), "{}", stderr_of(&o));
    assert!(reg.tag_link_exists("flap/sample", "obd"));
}

/// A converted image given as the source again is refused with one line
/// naming a layer (its blobs have a tar media type, and would otherwise be
/// applied as tars), before anything is downloaded or pushed.
#[test]
fn converting_a_converted_image_is_refused() {
    let reg = Registry::plain();
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    skopeo_push(&images, "latest", &reg.host(), "c/sample");
    let r = format!("{}/c/sample", reg.host());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    for (from, to, extra) in [
        ("latest", "obd", &[][..]),
        ("latest", "turbo", &["--turboOCI", "turbo"][..]),
    ] {
        let mut args = vec!["-r", &r, "-i", from, "--plain", "-d", wd_s];
        if extra.is_empty() {
            args.extend(["-o", to]);
        } else {
            args.extend(extra);
        }
        let o = convertor(&args);
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
    let repo = reg.client("c/sample");
    for tag in ["obd", "turbo"] {
        let (_, m) = repo.get_manifest(&Reference::Tag(tag.into())).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
        let first = m["layers"][0]["digest"].as_str().unwrap().to_string();
        let revs = reg.manifest_revisions("c/sample");
        let o = convertor(&["-r", &r, "-i", tag, "-o", "again", "--plain", "-d", wd_s]);
        assert_eq!(o.status.code(), Some(1), "{tag}");
        let e = stderr_of(&o);
        assert!(
            e.contains("converted already") && e.contains(&first),
            "{tag}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{tag}: one line: {e}");
        assert!(!reg.tag_link_exists("c/sample", "again"));
        assert_eq!(
            reg.manifest_revisions("c/sample"),
            revs,
            "no manifest pushed"
        );
        assert!(!wd.exists(), "work dir cleaned up after the refusal");
    }
}
