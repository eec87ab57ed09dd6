//! Accepting connections under abuse: clients that connect and never finish
//! the handshake time out and cannot lock others out; only established
//! sessions count against `max_connections`.

mod nbd_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::*;
use blockdev::nbd::{Endpoint, ServerConfig};
use blockdev::BlockDevice;
use nbd_common::*;

fn tcp(ep: &Endpoint) -> TcpStream {
    let Endpoint::Tcp(a) = ep else { unreachable!() };
    TcpStream::connect(a).unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        export: String::new(),
        structured: true,
        block_status: false,
    }
}

/// A real client reads correct data.
fn assert_serves(ep: &Endpoint, dev: &dyn BlockDevice) {
    let mut c = Client::connect(ep, &opts()).expect("a real client is locked out");
    let (off, len) = DATA_RANGES[1];
    let got = c.read(off, len as u32).unwrap();
    let mut want = vec![0u8; len as usize];
    dev.read_at(&mut want, off).unwrap();
    assert!(got == want, "wrong data");
    c.disconnect().unwrap();
}

/// Whether the server closed `s` (EOF or reset) once the greeting, if any,
/// is read. The test-side timeout only keeps a broken server from hanging
/// the test; it is not what is being tested.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => panic!("{e}"),
        }
    }
}

/// 300 TCP connections that never send a byte (more than the default 256
/// sessions) do not keep a real client out, with the default settings.
#[test]
fn idle_connections_do_not_lock_out_clients() {
    let dev = test_device();
    let srv = start_tcp(dev.clone(), ServerConfig::default());
    let idle: Vec<TcpStream> = (0..300).map(|_| tcp(&srv.ep)).collect();
    assert_serves(&srv.ep, dev.as_ref());
    assert_serves(&srv.ep, dev.as_ref());
    drop(idle);
    srv.stop();
}

/// An unfinished handshake is closed after `handshake_timeout`, also when
/// the client trickles bytes to keep it alive.
#[test]
fn unfinished_handshakes_time_out() {
    let dev = test_device();
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = start_tcp(dev.clone(), cfg);
    let mut silent = tcp(&srv.ep);
    let mut hello = [0u8; 18];
    silent.read_exact(&mut hello).unwrap();
    assert!(
        closed_by_server(&mut silent),
        "an idle handshake stayed open"
    );

    // Client flags, then an option header one byte at a time.
    let mut trickle = tcp(&srv.ep);
    trickle.read_exact(&mut hello).unwrap();
    let mut bytes = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 200]);
    bytes.extend_from_slice(&[0; 200]);
    let mut closed = false;
    for b in bytes {
        if trickle.write_all(&[b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        closed || closed_by_server(&mut trickle),
        "a trickling handshake stayed open"
    );
    srv.stop();
    // A session that completed its handshake is not timed out by it. The
    // client's own handshake must end within the timeout, here a bound for a
    // few round trips on a loaded machine rather than the 300 ms above (under
    // load the handshake took longer than that, and the server closed it,
    // once in 20 runs); the session then stays idle for longer.
    let handshake_timeout = Duration::from_secs(2);
    let cfg = ServerConfig {
        handshake_timeout,
        ..ServerConfig::default()
    };
    let srv = start_tcp(dev.clone(), cfg);
    let mut c = Client::connect(&srv.ep, &opts()).unwrap();
    std::thread::sleep(handshake_timeout + Duration::from_millis(500));
    let (off, len) = DATA_RANGES[0];
    assert_eq!(c.read(off, len as u32).unwrap().len(), len as usize);
    c.disconnect().unwrap();
    srv.stop();
}

/// With room for 4 unfinished handshakes, the oldest is dropped for a new
/// connection, so a flood of idle connections cannot fill the server.
#[test]
fn the_oldest_unfinished_handshake_makes_room() {
    let dev = test_device();
    let cfg = ServerConfig {
        max_handshakes: 4,
        ..ServerConfig::default()
    };
    let srv = start_tcp(dev.clone(), cfg);
    let mut idle: Vec<TcpStream> = (0..10).map(|_| tcp(&srv.ep)).collect();
    assert_serves(&srv.ep, dev.as_ref());
    // The first six were dropped; the last four (or fewer, the real client
    // took a slot) may still wait.
    for s in idle.iter_mut().take(6) {
        assert!(closed_by_server(s), "an old idle handshake was kept");
    }
    srv.stop();
}

/// `max_connections` counts sessions in transmission: a client past the
/// limit gets an error reply to NBD_OPT_GO, and a slot freed by a client
/// that leaves is reused.
#[test]
fn established_sessions_are_limited() {
    let dev = test_device();
    let cfg = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let srv = start_tcp(dev.clone(), cfg);
    let a = Client::connect(&srv.ep, &opts()).unwrap();
    let mut b = Client::connect(&srv.ep, &opts()).unwrap();
    let e = match Client::connect(&srv.ep, &opts()) {
        Ok(_) => panic!("a third session was admitted"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("NBD_OPT_GO failed"), "{e}");
    // Idle connections in the handshake do not count.
    let _idle: Vec<TcpStream> = (0..5).map(|_| tcp(&srv.ep)).collect();
    let (off, len) = DATA_RANGES[0];
    b.read(off, len as u32).unwrap();
    a.disconnect().unwrap();
    // The server frees the slot when it sees the disconnect.
    let mut ok = None;
    for _ in 0..200 {
        if let Ok(c) = Client::connect(&srv.ep, &opts()) {
            ok = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let mut c = ok.expect("the freed session slot was not reused");
    c.read(off, len as u32).unwrap();
    srv.stop();
}
