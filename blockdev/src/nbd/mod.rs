//! A userspace NBD (Network Block Device) server for any [`BlockDevice`].
//!
//! Protocol: fixed-newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`/
//! `EXPORT_NAME`/`ABORT`, structured replies, the `base:allocation`
//! metadata context; commands `READ`, `WRITE`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES`, `BLOCK_STATUS` and `DISC`. The wire layouts are in
//! [`proto`]; the handshake and request framing in [`handshake`]; sockets,
//! threads and request execution in [`server`]; a small client for tests
//! and benchmarks in [`client`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use blockdev::nbd::{Endpoint, Listener, Server, ServerConfig};
//! let dev = Arc::new(blockdev::MemDevice::new(1 << 20));
//! let server = Server::new(dev, ServerConfig::default());
//! let listener = Listener::bind(&Endpoint::Unix("/tmp/nbd.sock".into())).unwrap();
//! server.serve(&listener).unwrap(); // until server.shutdown_handle().shutdown()
//! ```
//!
//! [`BlockDevice`]: crate::BlockDevice

pub mod client;
pub mod handshake;
pub mod proto;
pub mod server;
mod sock;

pub use handshake::{process_client_bytes, Export};
pub use server::{
    Allocation, Endpoint, Listener, ServeStats, Server, ServerConfig, ShutdownHandle, ZeroScan,
    BUSY_POLL, REPLY_MEMORY, REPLY_MEMORY_PER_CONNECTION,
};
