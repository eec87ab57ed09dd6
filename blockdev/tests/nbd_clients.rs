//! The NBD server against real clients from Debian: nbdinfo, nbdcopy,
//! qemu-img and qemu-io (packages libnbd-bin and qemu-utils).

mod nbd_common;

use std::process::Command;
use std::sync::Arc;

use blockdev::nbd::ServerConfig;
use blockdev::{BlockDevice, MemDevice};
use nbd_common::*;

fn cfg(name: &str, read_only: bool) -> ServerConfig {
    ServerConfig {
        export_name: name.into(),
        description: "test export".into(),
        read_only,
        ..ServerConfig::default()
    }
}

fn whole(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn nbdinfo_reports_size_flags_list_and_map() {
    let dev = test_device();
    for read_only in [false, true] {
        let srv = start(dev.clone(), cfg("layer", read_only));
        let out = run_ok(Command::new(tool("nbdinfo")).arg("--json").arg(srv.uri()));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["protocol"], "newstyle-fixed");
        assert_eq!(j["structured"], true);
        let e = &j["exports"][0];
        assert_eq!(e["export-name"], "layer");
        assert_eq!(e["description"], "test export");
        assert_eq!(e["export-size"], dev.size());
        assert_eq!(e["is_read_only"], read_only);
        assert_eq!(e["can_flush"], true);
        assert_eq!(e["can_trim"], !read_only);
        assert_eq!(e["can_zero"], !read_only);
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["block_size_maximum"], 32 << 20);
        assert_eq!(e["contexts"][0], "base:allocation");

        let list = run_ok(Command::new(tool("nbdinfo")).arg("--list").arg(srv.uri()));
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("export=\"layer\""), "{list}");

        // The map must show exactly the data ranges written (64 KiB granules).
        let map = run_ok(
            Command::new(tool("nbdinfo"))
                .args(["--map", "--json"])
                .arg(srv.uri()),
        );
        let m: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let data: Vec<(u64, u64)> = m
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["type"].as_u64() == Some(0))
            .map(|x| (x["offset"].as_u64().unwrap(), x["length"].as_u64().unwrap()))
            .collect();
        let expect: Vec<(u64, u64)> = DATA_RANGES
            .iter()
            .map(|&(o, l)| {
                let g = 64 << 10;
                let s = o / g * g;
                (s, (o + l).div_ceil(g) * g - s)
            })
            .collect();
        assert_eq!(data, expect);
        srv.stop();
    }
}

#[test]
fn nbdcopy_whole_export_is_byte_identical_and_sparse() {
    let dev = test_device();
    let srv = start(dev.clone(), cfg("", true));
    let out = srv.dir.path().join("copy.raw");
    run_ok(Command::new(tool("nbdcopy")).arg(srv.uri()).arg(&out));
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied.len() as u64, dev.size());
    assert!(copied == whole(dev.as_ref()), "nbdcopy output differs");
    let data: u64 = DATA_RANGES.iter().map(|r| r.1).sum();
    let alloc = allocated_bytes(&out);
    assert!(
        alloc < data + (1 << 20),
        "copy is not sparse: {alloc} bytes allocated for {data} bytes of data"
    );
    // Many requests in flight, no block status (every byte read).
    let out2 = srv.dir.path().join("copy2.raw");
    run_ok(
        Command::new(tool("nbdcopy"))
            .args(["--requests=16", "--no-extents"])
            .arg(srv.uri())
            .arg(&out2),
    );
    assert!(std::fs::read(&out2).unwrap() == copied);
    let stats = srv.stop();
    assert!(stats.connections >= 2 && stats.requests > 32, "{stats:?}");
}

#[test]
fn qemu_img_compare_and_convert() {
    let dev = test_device();
    let srv = start(dev.clone(), cfg("x", true));
    let raw = srv.dir.path().join("expected.raw");
    std::fs::write(&raw, whole(dev.as_ref())).unwrap();
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(srv.uri()),
    );
    // A one-byte difference must be found (so the comparison is real).
    let mut changed = std::fs::read(&raw).unwrap();
    changed[(9 << 20) + 5] ^= 0x40;
    let raw2 = srv.dir.path().join("changed.raw");
    std::fs::write(&raw2, &changed).unwrap();
    let st = Command::new(tool("qemu-img"))
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&raw2)
        .arg(srv.uri())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "qemu-img compare missed a difference");

    let conv = srv.dir.path().join("conv.raw");
    run_ok(
        Command::new(tool("qemu-img"))
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri())
            .arg(&conv),
    );
    assert!(std::fs::read(&conv).unwrap() == whole(dev.as_ref()));
    srv.stop();
}

#[test]
fn writes_from_nbdcopy_and_qemu_io_reach_the_device() {
    let dev = Arc::new(MemDevice::new(16 << 20));
    let srv = start(dev.clone(), cfg("w", false));
    // nbdcopy a local image into the export.
    let src = srv.dir.path().join("src.raw");
    let mut img = vec![0u8; 16 << 20];
    img[3 << 20..5 << 20].copy_from_slice(&pseudo_random(5, 2 << 20));
    img[100..200].copy_from_slice(&pseudo_random(6, 100));
    std::fs::write(&src, &img).unwrap();
    run_ok(Command::new(tool("nbdcopy")).arg(&src).arg(srv.uri()));
    assert!(dev.contents() == img, "device differs after nbdcopy upload");

    // qemu-io: pattern write, write-zeroes, discard, FUA write, flush.
    run_ok(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw"])
            .arg(srv.uri())
            .args(["-c", "write -P 0x5a 6M 1M"])
            .args(["-c", "write -z 3M 512k"])
            .args(["-c", "discard 4M 64k"])
            .args(["-c", "write -f -P 0x11 100 10"])
            .args(["-c", "flush"])
            .args(["-c", "read -P 0x5a 6M 1M"]),
    );
    img[6 << 20..7 << 20].fill(0x5a);
    img[3 << 20..(3 << 20) + (512 << 10)].fill(0);
    img[4 << 20..(4 << 20) + (64 << 10)].fill(0);
    img[100..110].fill(0x11);
    assert!(dev.contents() == img, "device differs after qemu-io writes");
    srv.stop();
}

#[test]
fn read_only_export_refuses_writes() {
    let dev = test_device();
    let before = dev.contents();
    let srv = start(dev.clone(), cfg("", true));
    let out = Command::new(tool("qemu-io"))
        .args(["-f", "raw"])
        .arg(srv.uri())
        .args(["-c", "write -P 0x5a 0 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("read-only"),
        "write to a read-only export was not refused: {text}"
    );
    assert!(dev.contents() == before);
    srv.stop();
}
