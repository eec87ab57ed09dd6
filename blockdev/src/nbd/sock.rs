//! Receiving from a connection's socket without spurious wake-ups.
//!
//! A task asleep in a blocking `recv` on a Unix socket is woken by every
//! wake-up on the socket's wait queue, and that queue also carries the
//! "writable again" wake-up the kernel sends each time the peer consumes
//! bytes this side sent (`unix_write_space`). A client waiting for replies
//! was thus woken each time the server read its requests, and a server
//! waiting for requests each time the client read its replies: a context
//! switch on the sleeper's CPU and, on a virtual machine, an
//! inter-processor interrupt paid by the waker. A `poll(POLLIN)` waiter is
//! woken only for the events it asked for, so both sides wait there and
//! then take what arrived with a non-blocking `recv`.

use std::io;
use std::os::unix::io::RawFd;

/// `recv` with `MSG_DONTWAIT` on `fd`: what is there, or `WouldBlock`.
pub(crate) fn recv_nowait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
    // duration of the call, and `recv` writes nothing else; `fd` is any
    // number (one that is not an open socket fails with EBADF or ENOTSOCK).
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive into `buf` from the socket `fd`, waiting in `poll(POLLIN)` while
/// nothing is there; as a blocking `read` (0 at the end of the stream, or
/// after a `shutdown` of the socket).
pub(crate) fn recv_waiting(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        match recv_nowait(fd, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // POLLIN, POLLHUP or POLLERR: the next `recv` says which.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn waits_for_data_and_sees_the_end_of_the_stream() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            recv_nowait(a.as_raw_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(b"abc").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        assert_eq!(recv_waiting(a.as_raw_fd(), &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert_eq!(recv_waiting(a.as_raw_fd(), &mut buf).unwrap(), 0);
        t.join().unwrap();
    }

    #[test]
    fn a_shutdown_ends_the_wait() {
        let (a, _b) = UnixStream::pair().unwrap();
        let a2 = a.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            a2.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let mut buf = [0u8; 8];
        assert_eq!(recv_waiting(a.as_raw_fd(), &mut buf).unwrap(), 0);
        t.join().unwrap();
    }

    /// This thread's voluntary context switches so far.
    fn voluntary_switches() -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_waiting_reader_is_not_woken_when_the_peer_reads_what_it_sent() {
        // A client sends 20 requests and waits for the reply; the server
        // reads the requests one at a time, pausing between them, then
        // answers. Each of those reads frees what the client sent, which
        // wakes a client asleep in a blocking `recv` (20 wake-ups); asleep
        // in `poll(POLLIN)` it wakes once, for the reply.
        const N: usize = 20;
        let (mut client, mut server) = UnixStream::pair().unwrap();
        for i in 0..N {
            client.write_all(&[i as u8; 28]).unwrap();
        }
        let t = std::thread::spawn(move || {
            let mut req = [0u8; 28];
            for _ in 0..N {
                std::thread::sleep(Duration::from_millis(5));
                std::io::Read::read_exact(&mut server, &mut req).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
            server.write_all(b"reply").unwrap();
            server
        });
        let before = voluntary_switches();
        let mut buf = [0u8; 8];
        assert_eq!(recv_waiting(client.as_raw_fd(), &mut buf).unwrap(), 5);
        let woken = voluntary_switches() - before;
        t.join().unwrap();
        assert!(
            woken <= 3,
            "woken {woken} times while the peer read {N} requests"
        );
    }
}
