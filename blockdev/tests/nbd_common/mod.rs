//! Shared helpers for the NBD server tests: start a server on a temporary
//! Unix socket, locate the Debian NBD client tools, make test data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use blockdev::nbd::{Endpoint, Listener, ServeStats, Server, ServerConfig, ShutdownHandle};
use blockdev::BlockDevice;

pub struct Running {
    pub handle: ShutdownHandle,
    pub thread: Option<JoinHandle<ServeStats>>,
    pub ep: Endpoint,
    pub socket: PathBuf,
    pub export: String,
    pub dir: tempfile::TempDir,
}

impl Running {
    /// `nbd+unix://` URI of the export.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }

    /// Shut down and return the server's counters.
    pub fn stop(mut self) -> ServeStats {
        self.handle.shutdown();
        self.thread
            .take()
            .expect("server thread")
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

pub fn start(dev: Arc<dyn BlockDevice>, cfg: ServerConfig) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let listener = Listener::bind(&Endpoint::Unix(socket.clone())).expect("bind socket");
    serve(listener, socket, dir, dev, cfg)
}

/// A server on a TCP port of 127.0.0.1.
pub fn start_tcp(dev: Arc<dyn BlockDevice>, cfg: ServerConfig) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener =
        Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).expect("bind TCP port");
    let unused = dir.path().join("unused");
    serve(listener, unused, dir, dev, cfg)
}

/// Serve `dev` on `listener` on a thread of its own.
fn serve(
    listener: Listener,
    socket: PathBuf,
    dir: tempfile::TempDir,
    dev: Arc<dyn BlockDevice>,
    cfg: ServerConfig,
) -> Running {
    let ep = listener.endpoint();
    let export = cfg.export_name.clone();
    let server = Server::new(dev, cfg);
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.serve(&listener).expect("serve"));
    Running {
        handle,
        thread: Some(thread),
        ep,
        socket,
        export,
        dir,
    }
}

/// Path of a required client tool; panics with an install hint if absent.
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    let pkg = match name {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "qemu-img" | "qemu-io" => "qemu-utils",
        _ => "?",
    };
    panic!("required NBD client `{name}` not found in PATH; install the Debian package {pkg}");
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Data ranges `(offset, len)` the test image gets; everything else is zero.
pub const DATA_RANGES: &[(u64, u64)] = &[
    (0, 4096),
    (1 << 20, 3 << 20),
    (9 << 20, 64 << 10),
    ((32 << 20) - 8192, 8192),
];

/// A 32 MiB memory device holding pseudo-random data in [`DATA_RANGES`].
pub fn test_device() -> Arc<blockdev::MemDevice> {
    let dev = blockdev::MemDevice::new(32 << 20);
    for (i, &(off, len)) in DATA_RANGES.iter().enumerate() {
        dev.write_at(&pseudo_random(i as u64 + 11, len as usize), off)
            .expect("fill test device");
    }
    Arc::new(dev)
}

/// Bytes actually allocated on disk for a file.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

#[allow(unused_imports)]
pub use testutil::run_ok;
