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

/// A registry destination that is down, or that refuses the credentials, is found
/// before any layer is converted (one request checks it), not at the first upload;
/// the error names the registry.
#[test]
fn a_bad_destination_registry_fails_before_any_conversion() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Htpasswd {
            user: "alice".into(),
            password: "secret".into(),
        },
    });
    let images = t.path().join("images");
    build_images("sample", &images, &[]);
    let src = format!("oci:{}", images.display());
    let ca = pki.path("ca.crt");
    let wd = t.path().join("w");
    let run = |dst: &str, extra: &[&str]| {
        let mut a = args_with(
            &[
                "-r",
                &src,
                "-i",
                "latest",
                "--output-repository",
                dst,
                "-o",
                "obd",
                "--vsize",
                "2",
                "-d",
                wd.to_str().unwrap(),
            ],
            extra,
        );
        a.extend(["--root-ca".into(), ca.display().to_string()]);
        let o = convertor(&a);
        assert_eq!(o.status.code(), Some(1), "{a:?}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        assert!(
            !e.contains("converted") && !e.contains("layer 1"),
            "{a:?}: no layer is converted first: {e}"
        );
        assert!(!wd.exists(), "{a:?}: work dir left");
        e
    };
    // Nothing listens there (connection refused).
    let down = format!("127.0.0.1:{}", common::free_port());
    let e = run(&format!("{down}/x/app"), &["--plain"]);
    assert!(
        e.contains(&down)
            && e.contains("checked before converting")
            && e.contains(
                "(nothing listens there: check the host and port, and that the registry runs)"
            ),
        "{e}"
    );
    // Wrong credentials for the destination.
    let dst = format!("{}/x/app", reg.host());
    // The hint names the flag that gave them.
    let e = run(&dst, &["--dest-creds", "alice:wrong"]);
    assert!(
        e.contains(&reg.host())
            && e.contains("authentication failed")
            && e.contains("check the --dest-creds user:password"),
        "{e}"
    );
    let e = run(&dst, &["-u", "alice:wrong"]);
    assert!(
        e.contains("authentication failed") && e.contains("check the -u user:password"),
        "{e}"
    );
    // No credentials at all.
    let e = run(&dst, &[]);
    assert!(
        e.contains(&reg.host())
            && e.contains("authentication failed")
            && e.contains("no credentials given"),
        "{e}"
    );
    // The right ones: converted and pushed.
    convert_ok(&args_with(
        &[
            "-r",
            &src,
            "-i",
            "latest",
            "--output-repository",
            &dst,
            "-o",
            "obd",
            "--vsize",
            "2",
            "-d",
            wd.to_str().unwrap(),
            "--root-ca",
            ca.to_str().unwrap(),
        ],
        &["--dest-creds", "alice:secret"],
    ));
    assert!(reg.tag_link_exists("x/app", "obd"));
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
    testutil::default_stop_signals();
    interrupted_run("INT", 130, false, Slow::Crawl);
}

/// SIGTERM (a service manager, `timeout`) exits 143, the shell convention, and
/// cleans up too, also when nobody reads stdout/stderr any more (a closed SSH
/// session): output must never panic.
#[test]
fn sigterm_exits_143_and_cleans_up_with_output_closed() {
    testutil::default_stop_signals();
    interrupted_run("TERM", 143, true, Slow::Crawl);
}

/// Ctrl-C while a download hangs on a silent registry connection stops the run at
/// once: the read that waits for the stall timeout (here the default, 60 s) is not
/// waited for.
#[test]
fn ctrl_c_during_a_stalled_download_stops_at_once() {
    testutil::default_stop_signals();
    interrupted_run("INT", 130, false, Slow::Stalled);
}

/// Ctrl-C while the registry does not answer the run's first request (the
/// manifest) stops the run at once too: the request is not waited for until
/// the stall timeout.
#[test]
fn ctrl_c_while_the_registry_does_not_answer_stops_at_once() {
    testutil::default_stop_signals();
    interrupted_run("INT", 130, false, Slow::Silent);
}

/// Started with SIGINT ignored (a script's `convertor ... &`, which a Ctrl-C
/// meant for the script's foreground must not stop), the run leaves it
/// ignored; SIGTERM still stops it (143). The "registry" takes the
/// connection and never answers, so the run is waiting when the signals come.
#[test]
fn an_ignored_sigint_stays_ignored() {
    testutil::default_stop_signals();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let r = format!(
        "127.0.0.1:{}/int/layers",
        silent.local_addr().unwrap().port()
    );
    let t = tempfile::tempdir().unwrap();
    let wd = t.path().join("w");
    let mut child = Command::new("sh")
        .args(["-c", "trap '' INT; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_convertor"))
        .args(["-r", &r, "-i", "v1", "-o", "obd", "--plain", "-d"])
        .arg(&wd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its request is waiting for the answer.
    let (_conn, _) = silent.accept().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    // A run that took the signal has stopped well within this.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run stopped on an ignored SIGINT"
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("SIGTERM: stopping"),
        "{}",
        stderr_of(&o)
    );
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
    testutil::default_stop_signals();
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

/// An answer of [`BodyStaller`]: (path suffix, status, content type, body).
type Answer = (String, u16, &'static str, Vec<u8>);

/// A registry of one repository `x` (tag `v1`) whose answer to the first GET
/// of a path containing `stall_on` is its head, `Content-Length` and the first 10
/// bytes of its body, and then silence; every other request gets the matching
/// `(path suffix, status, content type, body)` of `answers`, or a 404.
struct BodyStaller {
    port: u16,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BodyStaller {
    fn start(answers: Vec<Answer>, stall_on: &str) -> BodyStaller {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let (flag, stall_on) = (stalled.clone(), stall_on.to_string());
        let answers = Arc::new(answers);
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (flag, stall_on, answers) = (flag.clone(), stall_on.clone(), answers.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let get = line.starts_with("GET ");
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        // The rest of the head (no request here has a body).
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let (status, ctype, body) = if path == "/v2/" {
                            (200, "application/json", b"{}".to_vec())
                        } else {
                            answers
                                .iter()
                                .find(|(p, ..)| path.ends_with(p.as_str()))
                                .map(|(_, s, c, b)| (*s, *c, b.clone()))
                                .unwrap_or((404, "application/json", b"{}".to_vec()))
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        if get && path.contains(&stall_on) && !flag.swap(true, Ordering::SeqCst) {
                            let _ = w.write_all(head.as_bytes());
                            let _ = w.write_all(&body[..10.min(body.len())]);
                            let _ = w.flush();
                            // Silent, the connection held open.
                            std::thread::sleep(Duration::from_secs(600));
                            return;
                        }
                        if w.write_all(head.as_bytes()).is_err() || w.write_all(&body).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        BodyStaller { port, stalled }
    }
}

/// `{"mediaType": ..., ...}` JSON and its digest.
fn json_blob(v: serde_json::Value) -> (Vec<u8>, String) {
    use sha2::Digest as _;
    let b = serde_json::to_vec(&v).unwrap();
    let d = format!("sha256:{:x}", sha2::Sha256::digest(&b));
    (b, d)
}

/// Ctrl-C while the registry has sent an answer's head and then stalls its body
/// (a manifest, an index, the config, an error answer's body) stops the run at
/// once, exit 130, nothing written: the read that waits for the stall timeout
/// (here the default, 60 s) is not waited for.
#[test]
fn ctrl_c_during_a_stalled_answer_body_stops_at_once() {
    testutil::default_stop_signals();
    const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    let (config, config_d) = json_blob(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"]}
    }));
    let (manifest, manifest_d) = json_blob(serde_json::json!({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef", "size": 1024}]
    }));
    let (index, _) = json_blob(serde_json::json!({
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{"mediaType": MT_MANIFEST, "digest": manifest_d, "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }));
    let by_digest = format!("/manifests/{manifest_d}");
    let config_blob = format!("/blobs/{config_d}");
    let cases: Vec<(&str, Vec<Answer>, &str)> = vec![
        (
            "manifest",
            vec![("/manifests/v1".into(), 200, MT_MANIFEST, manifest.clone())],
            "/manifests/v1",
        ),
        (
            "platform manifest of an index",
            vec![
                ("/manifests/v1".into(), 200, MT_INDEX, index.clone()),
                (by_digest.clone(), 200, MT_MANIFEST, manifest.clone()),
            ],
            &by_digest,
        ),
        (
            "config",
            vec![
                ("/manifests/v1".into(), 200, MT_MANIFEST, manifest.clone()),
                (
                    format!("/blobs/{config_d}"),
                    200,
                    "application/octet-stream",
                    config.clone(),
                ),
            ],
            &config_blob,
        ),
        (
            "error answer",
            vec![(
                "/manifests/v1".into(),
                404,
                "application/json",
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
                    .to_vec(),
            )],
            "/manifests/v1",
        ),
    ];
    for (what, answers, stall_on) in cases {
        let reg = BodyStaller::start(answers, stall_on);
        let t = tempfile::tempdir().unwrap();
        let wd = t.path().join("w");
        let out = t.path().join("out");
        let child = Command::new(env!("CARGO_BIN_EXE_convertor"))
            .args([
                "-r",
                &format!("127.0.0.1:{}/x", reg.port),
                "-i",
                "v1",
                "-o",
                "obd",
            ])
            .args(["--plain", "--vsize", "2", "-d", wd.to_str().unwrap()])
            .arg("--output-repository")
            .arg(format!("oci:{}", out.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !reg.stalled.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(30), "{what}: no stall");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let t0 = Instant::now();
        let o = child.wait_with_output().unwrap();
        // Far below the 60 s stall timeout (the bound only keeps a slow machine from
        // failing the test).
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what}: took {:?} to stop",
            t0.elapsed()
        );
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(130), "{what}: {e}");
        assert!(
            e.contains("interrupted") && !e.contains("panicked"),
            "{what}: {e}"
        );
        assert!(!wd.exists(), "{what}: work dir cleaned up");
        assert!(!out.exists(), "{what}: nothing written");
    }
}

/// The hints of TLS failures name the flags of the form that was run: the `-r`
/// form's `--plain`, `--root-ca`/`--cert-dir` and `--insecure`, the `obdconv`
/// form's `--plain-http`, `--tlscacert` and `-k/--skip-verify` (it used to be told
/// of flags it does not have).
#[test]
fn tls_hints_name_the_flags_of_the_form_run() {
    let t = tempfile::tempdir().unwrap();
    let pki = Pki::new(&t.path().join("pki"));
    let tls = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::None,
    });
    let plain = Registry::plain();
    let out = format!("oci:{}:obd", t.path().join("out").display());
    let wd = t.path().join("w");
    let wd_s = wd.to_str().unwrap();
    for (reg, r_form, obdconv_form) in [
        (
            &tls,
            "TLS verification failed; pass the registry's CA with --root-ca or --cert-dir, or use --insecure)",
            "TLS verification failed; pass the registry's CA with --tlscacert, or use -k/--skip-verify)",
        ),
        (
            &plain,
            "the registry does not speak TLS here; use --plain for plain HTTP)",
            "the registry does not speak TLS here; use --plain-http for plain HTTP)",
        ),
    ] {
        let src = format!("{}/hint/app", reg.host());
        let out_dir = t.path().join("out");
        let o = convertor(&[
            "-r",
            &src,
            "-i",
            "latest",
            "--output-repository",
            &format!("oci:{}", out_dir.display()),
            "-o",
            "obd",
            "-d",
            wd_s,
        ]);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.starts_with("convertor: error: ") && e.contains(r_form), "{e}");
        let o = convertor(&["obdconv", &format!("{src}:latest"), &out, "-d", wd_s]);
        let e = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.starts_with("convertor obdconv: error: ") && e.contains(obdconv_form),
            "{e}"
        );
    }
}
