//! Reply memory is bounded: a client that sends large reads and never reads
//! the replies pins at most its connection's budget however many workers
//! the connection has, a well-behaved client is still served meanwhile, the
//! server-wide budget bounds several such clients together, and requests
//! larger than the budget are still served, one at a time.

mod nbd_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::CMD_READ;
use blockdev::nbd::{ServerConfig, ShutdownHandle};
use blockdev::BlockDevice;
use nbd_common::*;

const MIB: u64 = 1 << 20;

/// A 1 GiB device whose byte at `p` is `p % 251`, stored nowhere.
struct Pattern;

fn pattern_byte(p: u64) -> u8 {
    (p % 251) as u8
}

impl BlockDevice for Pattern {
    fn size(&self) -> u64 {
        1 << 30
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(offset + i as u64);
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> blockdev::Result<()> {
        Err(blockdev::Error::Invalid("read-only".into()))
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> blockdev::Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

fn simple() -> ClientOptions {
    ClientOptions::default()
}

/// A client that sends `n` reads of `len` bytes and never reads a reply.
fn stall(srv: &Running, n: u64, len: u64) -> Client {
    let mut c = Client::connect(&srv.ep, &simple()).expect("connect");
    for i in 0..n {
        c.send(CMD_READ, 0, (i * len) % (1 << 30), len as u32, &[])
            .unwrap();
    }
    c.flush_requests().unwrap();
    c
}

/// Wait (at most a minute: a bound, not a measurement) until the server's
/// connections hold at least `bytes` of reply memory.
fn wait_for_reply_memory(h: &ShutdownHandle, bytes: u64) {
    let t = Instant::now();
    while h.reply_memory() < bytes {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the stalled clients never got {bytes} bytes of replies built (holding {})",
            h.reply_memory()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A well-behaved client reads `len` bytes at `off` and gets the right data.
fn assert_read(srv: &Running, off: u64, len: u32) {
    let mut c = Client::connect(&srv.ep, &ClientOptions::default()).expect("connect");
    let got = c.read(off, len).expect("read");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(off + i as u64)),
        "wrong data at {off}"
    );
    c.disconnect().unwrap();
}

#[test]
fn a_client_not_reading_its_replies_pins_at_most_its_budget() {
    let budget = 16 * MIB;
    let srv = start(
        Arc::new(Pattern),
        ServerConfig {
            workers_per_connection: 16,
            reply_memory_per_connection: budget,
            shutdown_grace: Duration::from_secs(1),
            ..ServerConfig::default()
        },
    );
    // 64 reads of 4 MiB: 256 MiB of replies, far more than the socket
    // buffers hold. Three fit in the budget; without it each of the 16
    // workers built one and waited to send it.
    let c = stall(&srv, 64, 4 * MIB);
    wait_for_reply_memory(&srv.handle, 12 * MIB);
    // Another connection is served meanwhile, with a large read too.
    assert_read(&srv, 3 * MIB + 5, 4 << 20);
    assert_read(&srv, 700 * MIB + 1, 4096);
    let stats = srv.stop();
    drop(c);
    assert!(
        stats.peak_reply_memory <= budget + 8 * MIB,
        "{} bytes of replies held at once (budget {budget} bytes per connection)",
        stats.peak_reply_memory
    );
}

#[test]
fn the_server_budget_bounds_several_stalled_clients() {
    let (per_conn, total) = (16 * MIB, 20 * MIB);
    let srv = start(
        Arc::new(Pattern),
        ServerConfig {
            workers_per_connection: 8,
            reply_memory_per_connection: per_conn,
            reply_memory: total,
            shutdown_grace: Duration::from_secs(1),
            ..ServerConfig::default()
        },
    );
    let a = stall(&srv, 16, 4 * MIB);
    wait_for_reply_memory(&srv.handle, 12 * MIB);
    let b = stall(&srv, 16, 4 * MIB);
    wait_for_reply_memory(&srv.handle, 16 * MIB);
    // Room is left for a small read.
    assert_read(&srv, 5, 64 << 10);
    let stats = srv.stop();
    drop((a, b));
    assert!(
        stats.peak_reply_memory <= total,
        "{} bytes of replies held at once (server budget {total} bytes)",
        stats.peak_reply_memory
    );
}

#[test]
fn reads_larger_than_the_budget_are_served_one_at_a_time() {
    let srv = start(
        Arc::new(Pattern),
        ServerConfig {
            workers_per_connection: 4,
            reply_memory_per_connection: MIB,
            ..ServerConfig::default()
        },
    );
    let mut c = Client::connect(&srv.ep, &simple()).unwrap();
    let len = 4 * MIB;
    let handles: Vec<u64> = (0..8)
        .map(|i| c.send(CMD_READ, 0, i * len + 3, len as u32, &[]).unwrap())
        .collect();
    c.flush_requests().unwrap();
    for _ in &handles {
        let r = c.recv().unwrap();
        assert_eq!(r.error, 0);
        let off = (r.handle - handles[0]) * len + 3;
        assert!(r
            .data
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(off + i as u64)));
    }
    c.disconnect().unwrap();
    let stats = srv.stop();
    // One 4 MiB reply (and its headers) at a time.
    assert!(
        stats.peak_reply_memory < len + 4096,
        "{}",
        stats.peak_reply_memory
    );
}
