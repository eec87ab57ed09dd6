//! Usage errors found after argument parsing (options that need another
//! option, values out of range) exit 2, as clap's own do; runtime failures
//! exit 1. One line on stderr names what is wrong.

use std::process::Command;

const CREATE: &str = env!("CARGO_BIN_EXE_overlaybd-create");
const APPLY: &str = env!("CARGO_BIN_EXE_overlaybd-apply");

fn run(cmd: &mut Command) -> (Option<i32>, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2_and_runtime_failures_exit_1() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);

    // overlaybd-create: --mkfs on a 0 GB device, kernel-engine options
    // without the kernel engine; nothing is created.
    for (args, want) in [
        (
            vec!["-s", "0", "--mkfs"],
            "--mkfs needs a virtual size greater than 0",
        ),
        (
            vec!["-s", "1", "--mkfs", "--mkfs-options", "-I 512"],
            "--mkfs-options and --mount-options need --engine kernel",
        ),
    ] {
        let (code, err) = run(Command::new(CREATE)
            .arg(p("data"))
            .arg(p("index"))
            .args(&args));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!p("data").exists() && !p("index").exists(), "{args:?}");
    }

    // overlaybd-apply: the same refusal, also written to the result file
    // (the snapshotter reads it), and the same exit code.
    let (code, err) = run(Command::new(CREATE)
        .arg(p("data"))
        .arg(p("index"))
        .args(["-s", "1"]));
    assert_eq!(code, Some(0), "{err}");
    std::fs::write(p("layer.tar"), [0u8; 1024]).unwrap();
    let cfg = p("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"lowers": [],
            "upper": {"index": p("index"), "data": p("data")},
            "resultFile": p("result")})
        .to_string(),
    )
    .unwrap();
    let (code, err) = run(Command::new(APPLY)
        .arg(p("layer.tar"))
        .arg(&cfg)
        .args(["--mount-options", "ro"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need --engine kernel"), "{err}");
    let result = std::fs::read_to_string(p("result")).unwrap();
    assert!(
        result.starts_with("failed:") && result.contains("need --engine kernel"),
        "{result}"
    );

    // A runtime failure: the tar is not there.
    let (code, err) = run(Command::new(APPLY).arg(p("missing.tar")).arg(&cfg));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.tar"), "{err}");
}
