//! `overlaybd-nbd serve`'s command line follows overlaybd-fuse's
//! convention: usage errors exit 2 (whether clap or the tool finds them),
//! runtime failures 1; registry flags given with sources that are no
//! registry image are named in one warning; an open error names the file once.

use std::ffi::OsString;
use std::process::{Command, Output};

const NBD: &str = env!("CARGO_BIN_EXE_overlaybd-nbd");

fn serve(args: &[OsString]) -> Output {
    Command::new(NBD).arg("serve").args(args).output().unwrap()
}

fn os(v: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    v.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2_runtime_failures_1() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("s");
    let base = testutil::fixtures().join("baselayer/ext4_64");
    let config = t.path().join("c.json");
    std::fs::write(
        &config,
        format!(r#"{{"lowers": [{{"file": "{}"}}]}}"#, base.display()),
    )
    .unwrap();
    let usage: Vec<(Vec<OsString>, String)> = vec![
        (
            os(&[&"--raw", &base, &base, &"--socket", &sock]),
            "--raw takes exactly one image file, got 2".into(),
        ),
        (
            os(&[&base, &"oci:/x", &"--socket", &sock]),
            "oci:/x: an image (oci:DIR[:TAG] or HOST/REPO[:TAG|@DIGEST]) must be the only \
             source (got 2 sources; give layer files, or one config.json, or one image)"
                .into(),
        ),
        (
            os(&[&config, &base, &"--socket", &sock]),
            format!(
                "{}: a config.json must be the only source (got 2 sources; give layer \
                 files, or one config.json, or one image)",
                config.display()
            ),
        ),
    ];
    for (args, want) in &usage {
        let o = serve(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), format!("overlaybd-nbd: error: {want}\n"));
    }
    for (flag, value) in [
        ("--timeout", "0"),
        ("--chunk-size", "5K"),
        ("--client-cert", "x"),
    ] {
        let o = serve(&os(&[&flag, &value, &base, &"--socket", &sock]));
        assert_eq!(o.status.code(), Some(2), "{flag}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
    // Runtime failures: a missing layer, a config.json that is no JSON (named
    // once), an unreachable registry.
    let bad = t.path().join("bad.json");
    std::fs::write(&bad, b"{ nope").unwrap();
    let runtime: Vec<(Vec<OsString>, String)> = vec![
        (
            os(&[&t.path().join("nope.lsmt"), &"--socket", &sock]),
            format!("{}: no such file", t.path().join("nope.lsmt").display()),
        ),
        (
            os(&[&bad, &"--socket", &sock]),
            format!(
                "overlaybd-nbd: error: cannot read the image config: {}: corrupt config.json: ",
                bad.display()
            ),
        ),
        (
            os(&[
                &"--plain",
                &"--retries",
                &"0",
                &"127.0.0.1:1/x:y",
                &"--socket",
                &sock,
            ]),
            "cannot fetch the manifest of 127.0.0.1:1/x:y".into(),
        ),
    ];
    for (args, want) in &runtime {
        let o = serve(args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains(want), "{e}");
        assert_eq!(e.lines().filter(|l| l.contains("error")).count(), 1, "{e}");
        // A file is named once ("X: X: ..." said it twice).
        let first = args[0].to_string_lossy();
        if !first.starts_with('-') {
            assert_eq!(e.matches(&*first).count(), 1, "{e}");
        }
    }
}

/// Registry flags with layer files: one warning naming them, then the
/// server goes on (here it fails later, on a missing socket directory).
#[test]
fn registry_flags_with_layer_files_are_named_once() {
    let t = tempfile::tempdir().unwrap();
    let base = testutil::fixtures().join("baselayer/ext4_64");
    let o = serve(&os(&[
        &"--timeout",
        &"9",
        &"--insecure",
        &base,
        &"--socket",
        &t.path().join("no/such/dir/s"),
    ]));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let warned: Vec<&str> = e.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(
        warned,
        [
            "overlaybd-nbd: warning: --insecure, --timeout only apply to a registry image \
          (HOST/REPO[:TAG]): ignored"
        ],
        "{e}"
    );
}

/// A `--socket` path in a directory that does not exist says so, naming the
/// directory (ENOENT alone read as if the socket file itself were missing).
#[test]
fn a_socket_in_a_missing_directory_names_the_directory() {
    let t = tempfile::tempdir().unwrap();
    let base = testutil::fixtures().join("baselayer/ext4_64");
    let dir = t.path().join("no/such");
    let sock = dir.join("s.sock");
    let o = serve(&os(&[&base, &"--socket", &sock]));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!(
            "{}: the directory {} does not exist",
            sock.display(),
            dir.display()
        )),
        "{e}"
    );
}
