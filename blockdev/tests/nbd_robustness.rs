//! Requests real clients never send, broken handshakes, clients that vanish
//! mid-request, many parallel readers, and shutdown with requests in flight.

mod nbd_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::*;
use blockdev::nbd::ServerConfig;
use blockdev::{BlockDevice, MemDevice};
use nbd_common::*;

fn opts(structured: bool) -> ClientOptions {
    ClientOptions {
        export: String::new(),
        structured,
        block_status: structured,
    }
}

/// After whatever happened, a well-behaved client still reads correct data.
fn assert_serves(srv: &Running, dev: &dyn BlockDevice) {
    let mut c = Client::connect(&srv.ep, &opts(true)).expect("connect after abuse");
    let (off, len) = DATA_RANGES[1];
    let got = c.read(off, len as u32).expect("read after abuse");
    let mut want = vec![0u8; len as usize];
    dev.read_at(&mut want, off).unwrap();
    assert!(got == want, "server returned wrong data after abuse");
    c.disconnect().unwrap();
}

#[test]
fn bad_requests_get_the_right_errors() {
    let dev = test_device();
    let srv = start(dev.clone(), ServerConfig::default());
    let size = dev.size();
    for structured in [false, true] {
        let mut c = Client::connect(&srv.ep, &opts(structured)).unwrap();
        assert_eq!(c.size, size);
        assert_eq!(c.structured, structured);
        let e = |c: &mut Client, typ, flags, off, len, payload: &[u8]| {
            c.call(typ, flags, off, len, payload).unwrap().error
        };
        // Out of range.
        assert_eq!(
            e(&mut c, CMD_READ, 0, size - 10, 11, &[]),
            Errno::Inval.code()
        );
        assert_eq!(
            e(&mut c, CMD_READ, 0, u64::MAX - 1, 4, &[]),
            Errno::Inval.code()
        );
        assert_eq!(
            e(&mut c, CMD_WRITE, 0, size - 2, 4, &[1, 2, 3, 4]),
            Errno::NoSpc.code()
        );
        assert_eq!(
            e(&mut c, CMD_WRITE_ZEROES, 0, size, 1, &[]),
            Errno::NoSpc.code()
        );
        assert_eq!(e(&mut c, CMD_TRIM, 0, size, 4096, &[]), Errno::Inval.code());
        // Unknown command and flags.
        assert_eq!(e(&mut c, 42, 0, 0, 0, &[]), Errno::Inval.code());
        assert_eq!(e(&mut c, CMD_CACHE, 0, 0, 4096, &[]), Errno::Inval.code());
        assert_eq!(
            e(&mut c, CMD_READ, 0x100, 0, 4096, &[]),
            Errno::Inval.code()
        );
        assert_eq!(e(&mut c, CMD_FLUSH, 0, 4096, 0, &[]), Errno::Inval.code());
        // Oversized lengths: the write payload is consumed, the stream stays in sync.
        assert_eq!(
            e(&mut c, CMD_READ, 0, 0, MAX_PAYLOAD + 1, &[]),
            Errno::Inval.code()
        );
        let big = vec![7u8; MAX_PAYLOAD as usize + 4096];
        assert_eq!(
            e(&mut c, CMD_WRITE, 0, 0, big.len() as u32, &big),
            Errno::Inval.code()
        );
        if !structured {
            assert_eq!(
                e(&mut c, CMD_BLOCK_STATUS, 0, 0, 4096, &[]),
                Errno::Inval.code()
            );
        }
        // The device is untouched and the connection still works.
        let got = c.read(0, 4096).unwrap();
        let mut want = vec![0u8; 4096];
        dev.read_at(&mut want, 0).unwrap();
        assert_eq!(got, want);
        // A zero-length read is answered (with no data).
        let r = c.call(CMD_READ, 0, 0, 0, &[]).unwrap();
        assert_eq!((r.error, r.data.len()), (0, 0));
        c.disconnect().unwrap();
    }
    // Read-only exports refuse every kind of write with EPERM.
    let ro = start(
        dev.clone(),
        ServerConfig {
            read_only: true,
            ..ServerConfig::default()
        },
    );
    let mut c = Client::connect(&ro.ep, &opts(true)).unwrap();
    assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
    for typ in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        let payload = if typ == CMD_WRITE {
            vec![1u8; 512]
        } else {
            vec![]
        };
        let r = c.call(typ, 0, 0, 512, &payload).unwrap();
        assert_eq!(r.error, Errno::Perm.code(), "command {typ}");
        assert!(r.message.contains("read-only"), "{:?}", r.message);
    }
    assert_serves(&ro, dev.as_ref());
}

#[test]
fn block_status_follows_the_data() {
    let dev = test_device();
    let srv = start(dev.clone(), ServerConfig::default());
    let mut c = Client::connect(&srv.ep, &opts(true)).unwrap();
    // 0..64K data, then zeros up to 1 MiB.
    let ext = c.block_status(0, 1 << 20).unwrap();
    assert_eq!(
        ext,
        vec![
            (64 << 10, 0),
            ((1 << 20) - (64 << 10), STATE_HOLE | STATE_ZERO)
        ]
    );
    let one = c
        .call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20, &[])
        .unwrap();
    assert_eq!(one.data.len(), 8);
    let r = c.call(CMD_BLOCK_STATUS, 0, dev.size(), 1, &[]).unwrap();
    assert_eq!(r.error, Errno::Inval.code());
    c.disconnect().unwrap();
}

#[test]
fn broken_handshakes_and_vanishing_clients_do_not_hurt_others() {
    let dev = test_device();
    let srv = start(dev.clone(), ServerConfig::default());

    // Connect and hang up at once.
    drop(Client::raw(&srv.ep).unwrap());
    // Garbage instead of client flags / options.
    for garbage in [
        &b"\xff\xff\xff\xff"[..],
        b"\x00\x00\x00\x01IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x00",
        b"\x00\x00\x00\x01IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = UnixStream::connect(&srv.socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        let _ = s.write_all(garbage);
        // Half-close: the server sees end of input and must drop us.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // Pseudo-random bytes after a valid handshake.
    for seed in 0..8 {
        let (mut r, mut w) = Client::raw(&srv.ep).unwrap();
        let mut hello = [0u8; 18];
        r.read_exact(&mut hello).unwrap();
        let _ = w.write_all(&pseudo_random(seed, 4096));
    }
    // A write whose payload never fully arrives: 1 MiB announced, 1000 bytes sent.
    {
        let mut c = Client::connect(&srv.ep, &opts(false)).unwrap();
        c.send(CMD_WRITE, 0, 0, 1 << 20, &[1u8; 1000]).unwrap();
        c.flush_requests().unwrap();
    }
    // A client that queues many big reads and disconnects without reading.
    {
        let mut c = Client::connect(&srv.ep, &opts(true)).unwrap();
        for i in 0..16 {
            c.send(CMD_READ, 0, i << 20, 1 << 20, &[]).unwrap();
        }
        c.flush_requests().unwrap();
    }
    // Still serving, and the device was not written by the broken write.
    assert_serves(&srv, dev.as_ref());
    assert!(dev.contents()[..4096] == pseudo_random(11, 4096)[..]);
    let stats = srv.stop();
    assert!(stats.protocol_errors >= 4, "{stats:?}");
}

#[test]
fn sixty_four_parallel_readers() {
    parallel_readers(ServerConfig::default());
}

/// Several threads per connection take batches in turn; every reply is
/// still the right one.
#[test]
fn sixty_four_parallel_readers_three_threads_per_connection() {
    parallel_readers(ServerConfig {
        workers_per_connection: 3,
        ..ServerConfig::default()
    });
}

fn parallel_readers(cfg: ServerConfig) {
    let dev = test_device();
    let srv = start(dev.clone(), cfg);
    let contents = Arc::new(dev.contents());
    let size = dev.size();
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let ep = srv.ep.clone();
            let contents = contents.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&ep, &opts(t % 2 == 0)).unwrap();
                let r = pseudo_random(t + 100, 8 * 32);
                // 32 reads, 8 in flight at a time, checked against the contents.
                for batch in r.chunks(8 * 8) {
                    let mut want = std::collections::HashMap::new();
                    for q in batch.chunks(8) {
                        let x = u64::from_le_bytes(q.try_into().unwrap());
                        let len = 512 + (x % (256 << 10)) as u32;
                        let off = (x >> 20) % (size - len as u64);
                        let h = c.send(CMD_READ, 0, off, len, &[]).unwrap();
                        want.insert(h, (off as usize, len as usize));
                    }
                    c.flush_requests().unwrap();
                    for _ in 0..want.len() {
                        let rep = c.recv().unwrap();
                        assert_eq!(rep.error, 0);
                        let (o, l) = want[&rep.handle];
                        assert!(rep.data == contents[o..o + l], "thread {t}: wrong data");
                    }
                }
                c.disconnect().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread failed");
    }
    let stats = srv.stop();
    assert_eq!(stats.connections, 64);
    assert_eq!(stats.protocol_errors, 0);
}

/// A device whose reads are slow and which counts flushes.
struct Slow {
    inner: MemDevice,
    flushes: AtomicU64,
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        std::thread::sleep(Duration::from_millis(300));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.trim(offset, len)
    }
}

#[test]
fn shutdown_finishes_in_flight_requests_and_flushes() {
    let dev = Arc::new(Slow {
        inner: MemDevice::new(1 << 20),
        flushes: AtomicU64::new(0),
    });
    let srv = start(dev.clone(), ServerConfig::default());
    let mut c = Client::connect(&srv.ep, &opts(false)).unwrap();
    assert_eq!(c.write(8192, b"persist me").unwrap(), 0);
    for i in 0..4 {
        c.send(CMD_READ, 0, i * 4096, 4096, &[]).unwrap();
    }
    c.flush_requests().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let handle = srv.handle.clone();
    let stopper = std::thread::spawn(move || handle.shutdown());
    // All four in-flight reads are still answered.
    for _ in 0..4 {
        let r = c.recv().expect("in-flight read lost at shutdown");
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len(), 4096);
    }
    stopper.join().unwrap();
    let socket = srv.socket.clone();
    srv.stop();
    assert!(
        dev.flushes.load(Ordering::SeqCst) >= 1,
        "device not flushed"
    );
    let mut b = [0u8; 10];
    dev.inner.read_at(&mut b, 8192).unwrap();
    assert_eq!(&b, b"persist me");
    // Once stopped, the socket is gone and nobody can connect.
    assert!(!socket.exists());
    assert!(Client::connect(&blockdev::nbd::Endpoint::Unix(socket), &opts(false)).is_err());
}

/// A device whose reads panic (a bug somewhere below the server).
struct Panicking(Arc<MemDevice>);

impl BlockDevice for Panicking {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, _buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        panic!("test device: read at {offset}");
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.0.trim(offset, len)
    }
}

/// `f` on another thread, failing the test if it takes over 10 s.
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: still waiting after 10 s"))
}

/// A connection thread that panics still closes its client's socket (the
/// client hung forever waiting for a reply) and leaves the connection table;
/// the server goes on serving and stops cleanly.
#[test]
fn a_panicking_connection_closes_its_socket() {
    let dev: Arc<dyn BlockDevice> = Arc::new(Panicking(test_device()));
    let srv = start(dev, ServerConfig::default());
    for _ in 0..2 {
        let ep = srv.ep.clone();
        let r = within_10s("reply to a read that panics", move || {
            let mut c = Client::connect(&ep, &opts(false)).expect("connect");
            c.read(0, 4096).map(|_| ())
        });
        assert!(r.is_err(), "a read that panicked succeeded");
    }
    within_10s("shutdown", move || srv.stop());
}

/// A handshake timeout too large for the clock (it overflowed `Instant` and
/// panicked every connection thread) is as good as none.
#[test]
fn a_huge_handshake_timeout_does_not_overflow() {
    let dev = test_device();
    let srv = start(
        dev.clone(),
        ServerConfig {
            handshake_timeout: Duration::MAX,
            ..ServerConfig::default()
        },
    );
    let ep = srv.ep.clone();
    let (off, len) = DATA_RANGES[1];
    let got = within_10s("a read", move || {
        let mut c = Client::connect(&ep, &opts(true)).expect("connect");
        c.read(off, len as u32).expect("read")
    });
    let mut want = vec![0u8; len as usize];
    dev.read_at(&mut want, off).unwrap();
    assert!(got == want);
    srv.stop();
}

/// A client that stops reading its replies does not hold a stopping server
/// for the write timeout (minutes): after the grace period its connection
/// is closed and the server stops.
#[test]
fn a_client_that_stops_reading_does_not_hold_the_shutdown() {
    let dev = test_device();
    let srv = start(
        dev,
        ServerConfig {
            shutdown_grace: Duration::from_secs(1),
            ..ServerConfig::default()
        },
    );
    let mut c = Client::connect(&srv.ep, &opts(false)).unwrap();
    // 64 MiB of replies, far more than the socket buffers hold; never read.
    for i in 0..32u64 {
        c.send(CMD_READ, 0, (i % 8) << 20, 2 << 20, &[]).unwrap();
    }
    c.flush_requests().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    within_10s("stop with a client not reading", move || srv.stop());
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    drop(c);
}

/// A session waiting for its next request (its thread asleep in `poll`, or
/// busy polling) ends at once when its client goes away and when the server
/// stops (long before the stop's grace period), on a Unix socket and on
/// TCP; a client waiting for a reply then sees the end of the stream.
#[test]
fn idle_sessions_end_promptly_on_disconnect_and_on_stop() {
    for tcp in [false, true] {
        for busy_poll in [Duration::ZERO, ServerConfig::default().busy_poll] {
            let what = format!("tcp {tcp}, busy_poll {busy_poll:?}");
            let dev = test_device();
            let cfg = ServerConfig {
                max_connections: 1,
                shutdown_grace: Duration::from_secs(60),
                busy_poll,
                ..ServerConfig::default()
            };
            let srv = if tcp {
                start_tcp(dev, cfg)
            } else {
                start(dev, cfg)
            };
            // The only session slot: a second client gets in only once the
            // server has seen the first one's socket close.
            let mut first = Client::connect(&srv.ep, &opts(false)).unwrap();
            first.read(0, 4096).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
            let ep = srv.ep.clone();
            let mut c = within_10s(&format!("{what}: admitted after a disconnect"), move || {
                let t0 = std::time::Instant::now();
                loop {
                    if let Ok(mut c) = Client::connect(&ep, &opts(false)) {
                        if c.read(0, 4096).is_ok() {
                            return c;
                        }
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(5),
                        "the session of a client that went away still holds its slot"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            // Idle; the server stops; the client sees the end.
            std::thread::sleep(Duration::from_millis(100));
            let t0 = std::time::Instant::now();
            within_10s(&format!("{what}: stop with an idle session"), move || {
                srv.stop()
            });
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "{what}: an idle session held the stop for {:?}",
                t0.elapsed()
            );
            let e = within_10s(&format!("{what}: end of stream"), move || {
                c.recv().unwrap_err()
            });
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{what}: {e}");
        }
    }
}
