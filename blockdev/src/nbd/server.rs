//! The NBD server: listener, per-connection threads and request execution.
//!
//! Each connection gets a thread (the connection thread itself), which runs
//! the handshake, then serves requests in batches: one request plus every
//! further one already received (every other batch only the first half of
//! them, so that a pipelining client works on replies while the rest
//! execute), executed in order, the batch's reads handed to the device
//! together ([`BlockDevice::read_many`]), and all the batch's replies
//! written at once. With `workers_per_connection` above 1,
//! that many threads take batches in turn, so replies may come out of order
//! (as the protocol allows). Reads answer unmapped ranges with hole chunks
//! when structured replies were negotiated. A client that stops reading
//! replies only blocks its own connection.
//!
//! Memory for replies is bounded. A worker takes room for each request
//! (its reply, or its write payload) before it reads the payload or builds
//! the reply, and gives it back when the batch's replies are sent: at most
//! [`ServerConfig::reply_memory_per_connection`] (default a little over 64
//! MiB: two of the largest, 32 MiB reads) per connection, all its workers together, and
//! [`ServerConfig::reply_memory`] (default 1 GiB) for the whole server. A
//! request bigger than that still runs when the connection (or the server)
//! holds nothing else, so none waits forever. So a client that sends large
//! reads and never reads the replies pins at most its connection's budget
//! (until `write_timeout` drops it), whatever `workers_per_connection` is,
//! and enough such clients to fill the server's budget make the others wait
//! (for at most `write_timeout`), not the machine run out of memory. Between
//! batches a worker keeps a reply buffer of at most its share of the
//! connection's budget and 5 MiB. Waiting for room ends when the
//! connection's send fails or when a stop's `shutdown_grace` is over.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handshake::{
    negotiate_admit, read_incoming, read_request_body, read_request_header, ConnError, Export,
    Incoming, Negotiated,
};
use super::proto::*;
use crate::device::{BlockDevice, Extent};
use crate::error::{Error, Result};

/// Reports which parts of a device hold data, for `NBD_CMD_BLOCK_STATUS`
/// (`base:allocation`).
pub trait Allocation: Send + Sync {
    /// Describe the range starting at `offset` as consecutive extents
    /// `(length, flags)` with `flags` a combination of [`STATE_HOLE`] and
    /// [`STATE_ZERO`]. The extents may cover less than `len` bytes (at least
    /// one byte), never more, and every length must be nonzero.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>>;
}

/// Allocation by inspection: reads the device and reports all-zero blocks
/// as holes. Works for any device; costs a read of the range.
pub struct ZeroScan {
    dev: Arc<dyn BlockDevice>,
    block: u64,
    max_scan: u64,
}

impl ZeroScan {
    /// Scan `dev` in 64 KiB blocks, at most 64 MiB per query.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        ZeroScan {
            dev,
            block: 64 << 10,
            max_scan: 64 << 20,
        }
    }
}

/// Whether a buffer is all zero bytes. The 64-byte chunks are OR-folded
/// without an early exit, which the compiler vectorises; no `unsafe`
/// reinterpretation is needed for speed.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

impl Allocation for ZeroScan {
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let end = offset + len.min(self.max_scan);
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut buf = vec![0u8; self.block as usize];
        let mut pos = offset;
        while pos < end {
            // Align blocks to absolute offsets so repeated queries agree.
            let next = ((pos / self.block) + 1) * self.block;
            let n = (next.min(end) - pos) as usize;
            self.dev.read_at(&mut buf[..n], pos)?;
            let flags = if is_zero(&buf[..n]) {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += n as u64,
                _ => out.push((n as u64, flags)),
            }
            pos += n as u64;
        }
        Ok(out)
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket path (an existing socket file is replaced).
    Unix(PathBuf),
    /// A TCP address such as `127.0.0.1:10809`.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
            Endpoint::Tcp(a) => write!(f, "nbd://{a}"),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// The listener, its path, and the path's (device, inode) once bound.
    Unix(UnixListener, PathBuf, Option<(u64, u64)>),
    Tcp(TcpListener),
}

/// The (device, inode) of the file at `p`.
fn socket_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Listener {
    /// Bind `ep`. A stale Unix socket file at the path (nobody accepts on
    /// it) is removed first; a live one, or any other existing file, is an
    /// error.
    pub fn bind(ep: &Endpoint) -> Result<Listener> {
        match ep {
            Endpoint::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if !m.file_type().is_socket() {
                        return Err(Error::io(
                            p,
                            io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                "exists and is not a socket; refusing to replace it",
                            ),
                        ));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(Error::io(
                            p,
                            io::Error::new(
                                io::ErrorKind::AddrInUse,
                                "another server is listening on this socket",
                            ),
                        ));
                    }
                    std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
                }
                let l = UnixListener::bind(p).map_err(|e| match p.parent() {
                    // ENOENT alone does not say that the directory is missing.
                    Some(dir)
                        if e.kind() == io::ErrorKind::NotFound
                            && !dir.as_os_str().is_empty()
                            && !dir.exists() =>
                    {
                        Error::io(
                            p,
                            io::Error::new(
                                io::ErrorKind::NotFound,
                                format!("the directory {} does not exist", dir.display()),
                            ),
                        )
                    }
                    _ => Error::io(p, e),
                })?;
                let id = socket_id(p);
                Ok(Listener::Unix(l, p.clone(), id))
            }
            Endpoint::Tcp(a) => {
                let l =
                    TcpListener::bind(a).map_err(|e| Error::io(format!("tcp listen {a}"), e))?;
                Ok(Listener::Tcp(l))
            }
        }
    }

    /// The endpoint actually bound (with the real port for `:0`).
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Listener::Unix(_, p, _) => Endpoint::Unix(p.clone()),
            Listener::Tcp(l) => Endpoint::Tcp(
                l.local_addr()
                    .expect("a bound TCP listener has a local address"),
            ),
        }
    }

    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l, ..) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l, ..) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    /// Accept a connection; its peer's name for messages: the client's
    /// address, or for a Unix socket (whose clients have no address)
    /// `unix:#ID` with the connection's number `id`.
    fn accept(&self, id: u64) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, ..) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), format!("unix:#{id}")))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                Ok((Stream::Tcp(s), a.to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only our own socket file: not one that replaced it meanwhile.
        if let Listener::Unix(_, p, Some(id)) = self {
            if socket_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
    }
}

/// A stream whose reads fail with `TimedOut` once a deadline has passed,
/// however the bytes trickle in (each read waits at most for the time
/// left). Without a deadline it is the plain stream, read through
/// [`BusyPoll`].
struct Deadline {
    s: Stream,
    deadline: Option<Instant>,
    poll: BusyPoll,
}

impl Deadline {
    /// Lift the deadline (the handshake is over).
    fn clear(&mut self) -> io::Result<()> {
        self.deadline = None;
        self.s.set_read_timeout(None)
    }
}

/// Waiting for the next requests by polling the socket for a short window
/// before sleeping in `poll` ([`ServerConfig::busy_poll`]; [`super::sock`]).
///
/// A client that pipelines sends its next requests as soon as it has read
/// the replies, a few microseconds later; sleeping meanwhile
/// costs a wake-up when they come, which on a virtual machine (an
/// inter-processor interrupt, the idle vCPU's exit) takes longer than the
/// reads themselves. Between polls the thread yields its CPU, so a client
/// running on the same CPU gets to send. The window is adaptive: after a
/// wait longer than twice the window (an idle or slow client) the next
/// wait sleeps at once, so an idle connection costs no CPU, and polling
/// comes back once requests follow each other closely again.
struct BusyPoll {
    window: Duration,
    /// Whether the last wait was short enough for polling to pay.
    pays: bool,
    /// Waits that polled first, and waits that slept at once, with a window
    /// (for the session's end in the log).
    polled: u64,
    slept: u64,
}

impl BusyPoll {
    fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            window,
            pays: !window.is_zero(),
            polled: 0,
            slept: 0,
        }
    }

    /// Read from `s`: poll it while the window lasts (if polling pays),
    /// then block.
    fn read(&mut self, s: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
        if self.window.is_zero() || buf.is_empty() {
            return s.recv_waiting(buf);
        }
        let t0 = Instant::now();
        if !self.pays {
            self.slept += 1;
        } else {
            self.polled += 1;
            loop {
                match s.recv_nowait(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => return r,
                }
                if t0.elapsed() >= self.window {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let r = s.recv_waiting(buf);
        self.pays = self.pays_after(t0.elapsed());
        r
    }

    /// Whether polling pays after a wait of `waited`.
    fn pays_after(&self, waited: Duration) -> bool {
        waited < 2 * self.window
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(d) = self.deadline else {
            return self.poll.read(&mut self.s, buf);
        };
        let timed_out =
            || io::Error::new(io::ErrorKind::TimedOut, "handshake not finished in time");
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.s.set_read_timeout(Some(left))?;
        match self.s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
            r => r,
        }
    }
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// `recv` with `MSG_DONTWAIT`: what is there, or `WouldBlock`.
    fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<usize> {
        super::sock::recv_nowait(self.fd(), buf)
    }

    /// A blocking read that sleeps in `poll(POLLIN)`, so that the client's
    /// reads of our replies do not wake us ([`super::sock`]).
    fn recv_waiting(&self, buf: &mut [u8]) -> io::Result<usize> {
        super::sock::recv_waiting(self.fd(), buf)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Export name (clients may also ask for the default, empty name).
    pub export_name: String,
    /// Description shown by `nbdinfo` / `NBD_OPT_LIST`.
    pub description: String,
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
    /// Threads per connection, taking batches of requests in turn (see
    /// `transmit`). 1 is fastest on small machines, where waking a thread on
    /// another CPU costs more than a read; more can help devices with slow
    /// reads when io_uring is not available to overlap them.
    pub workers_per_connection: usize,
    /// Sessions (connections past the handshake) served at once; a client
    /// asking for one more gets an error reply to `NBD_OPT_GO`.
    pub max_connections: usize,
    /// Connections still in the handshake at once; a new connection beyond
    /// this closes the oldest of them, so idle connections cannot lock
    /// clients out.
    pub max_handshakes: usize,
    /// Close a connection that has not finished its handshake after this
    /// long (in total, however slowly its bytes arrive).
    pub handshake_timeout: Duration,
    /// Give up on a client that does not read its replies for this long.
    pub write_timeout: Duration,
    /// How long a connection polls its socket for the next requests before
    /// it sleeps (adaptive: see `BusyPoll`); zero sleeps at once.
    pub busy_poll: Duration,
    /// After a shutdown, how long connections get to send the replies of
    /// requests already read; then the remaining ones are closed (a client
    /// that stopped reading its replies would otherwise hold the server for
    /// up to `write_timeout` per write).
    pub shutdown_grace: Duration,
    /// Bytes one connection's batches may hold at once (replies being built
    /// or sent, and write payloads), all its workers together: a worker
    /// waits for room before it takes a request, so a client that does not
    /// read its replies pins at most this much. A request bigger than this
    /// (up to 32 MiB) still runs when the connection holds nothing else.
    pub reply_memory_per_connection: u64,
    /// The same for all connections together; a request bigger than this
    /// runs when no connection holds anything.
    pub reply_memory: u64,
}

/// The default [`ServerConfig::shutdown_grace`].
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The default [`ServerConfig::busy_poll`].
pub const BUSY_POLL: Duration = Duration::from_micros(50);

/// The default [`ServerConfig::reply_memory_per_connection`]: two of the
/// largest reads (32 MiB) with their reply headers, or 16 batches of 4 MiB.
pub const REPLY_MEMORY_PER_CONNECTION: u64 = 2 * (MAX_PAYLOAD as u64 + (64 << 10));

/// The default [`ServerConfig::reply_memory`].
pub const REPLY_MEMORY: u64 = 1 << 30;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            workers_per_connection: 1,
            max_connections: 256,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(120),
            busy_poll: BUSY_POLL,
            shutdown_grace: SHUTDOWN_GRACE,
            reply_memory_per_connection: REPLY_MEMORY_PER_CONNECTION,
            reply_memory: REPLY_MEMORY,
        }
    }
}

/// Counters reported when [`Server::serve`] returns.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServeStats {
    pub connections: u64,
    pub requests: u64,
    pub protocol_errors: u64,
    /// The most reply memory ([`ServerConfig::reply_memory`]) held at once.
    pub peak_reply_memory: u64,
}

/// Stops a running [`Server::serve`] from another thread (e.g. a signal
/// handler thread).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Inner>);

impl ShutdownHandle {
    /// Stop accepting, stop reading new requests, let in-flight ones finish.
    pub fn shutdown(&self) {
        let conns = self.0.conns.lock().expect("connection table lock");
        self.0.stopping.store(true, Ordering::SeqCst);
        for s in conns.values() {
            s.shutdown(Shutdown::Read);
        }
    }

    /// Whether shutdown was requested.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    /// Reply memory ([`ServerConfig::reply_memory`]) the connections hold
    /// now: replies being built or sent, write payloads not yet written.
    pub fn reply_memory(&self) -> u64 {
        self.0.mem.state.lock().total
    }
}

struct Inner {
    dev: Arc<dyn BlockDevice>,
    alloc: Arc<dyn Allocation>,
    export: Export,
    cfg: ServerConfig,
    stopping: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    /// Connections in the handshake, oldest first.
    handshaking: Mutex<VecDeque<u64>>,
    /// Sessions past the handshake.
    sessions: AtomicU64,
    requests: AtomicU64,
    protocol_errors: AtomicU64,
    mem: ReplyMemory,
}

impl Inner {
    /// The connection is no longer in the handshake.
    fn handshake_done(&self, id: u64) {
        self.handshaking
            .lock()
            .expect("handshake list lock")
            .retain(|&x| x != id);
    }

    /// Take a session slot if one is free.
    fn admit(&self) -> bool {
        let max = self.cfg.max_connections.max(1) as u64;
        self.sessions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Memory held by batches (their replies, and write payloads until they
/// are written), counted per connection and for the whole server. A worker
/// takes room for a request before it reads the request's payload or
/// builds its reply, and gives it back once the replies are sent.
struct ReplyMemory {
    conn_limit: u64,
    server_limit: u64,
    state: parking_lot::Mutex<MemState>,
    freed: parking_lot::Condvar,
}

#[derive(Default)]
struct MemState {
    /// Held by all connections.
    total: u64,
    /// The most `total` was.
    peak: u64,
    /// The server closes its connections (the stop's grace is over): nobody
    /// waits for room any more.
    closing: bool,
}

/// One connection's share of [`ReplyMemory`]. Changed only under the
/// `ReplyMemory` lock (the atomics make it shareable, not lock-free).
#[derive(Default)]
struct ConnMemory {
    held: AtomicU64,
    /// The connection can no longer send (a reply write failed): its
    /// workers stop waiting for room.
    closed: AtomicBool,
}

impl ReplyMemory {
    fn new(cfg: &ServerConfig) -> ReplyMemory {
        ReplyMemory {
            conn_limit: cfg.reply_memory_per_connection,
            server_limit: cfg.reply_memory,
            state: parking_lot::Mutex::new(MemState::default()),
            freed: parking_lot::Condvar::new(),
        }
    }

    /// Whether `n` more bytes for `conn` fit now. Whoever holds nothing may
    /// always take one request, so none waits forever.
    fn fits(&self, st: &MemState, conn: &ConnMemory, n: u64) -> bool {
        let held = conn.held.load(Ordering::Relaxed);
        (held == 0 || held.saturating_add(n) <= self.conn_limit)
            && (st.total == 0 || st.total.saturating_add(n) <= self.server_limit)
    }

    fn add(st: &mut MemState, conn: &ConnMemory, n: u64) {
        conn.held.fetch_add(n, Ordering::Relaxed);
        st.total += n;
        st.peak = st.peak.max(st.total);
    }

    /// Take `n` bytes for `conn` if they fit now.
    fn try_take(&self, conn: &ConnMemory, n: u64) -> bool {
        let mut st = self.state.lock();
        if !self.fits(&st, conn, n) {
            return false;
        }
        Self::add(&mut st, conn, n);
        true
    }

    /// Take `n` bytes for `conn`, waiting until they fit; `false` (nothing
    /// taken) once the connection is closed or the server closes them all.
    fn take(&self, conn: &ConnMemory, n: u64) -> bool {
        let mut st = self.state.lock();
        loop {
            if st.closing || conn.closed.load(Ordering::Relaxed) {
                return false;
            }
            if self.fits(&st, conn, n) {
                Self::add(&mut st, conn, n);
                return true;
            }
            self.freed.wait(&mut st);
        }
    }

    /// Take `n` bytes for `conn` whether they fit or not (a reply that came
    /// out a little larger than reckoned).
    fn force(&self, conn: &ConnMemory, n: u64) {
        Self::add(&mut self.state.lock(), conn, n);
    }

    fn give(&self, conn: &ConnMemory, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.state.lock();
        conn.held.fetch_sub(n, Ordering::Relaxed);
        st.total -= n;
        drop(st);
        self.freed.notify_all();
    }

    /// `conn` can no longer send: wake its workers waiting for room.
    fn close(&self, conn: &ConnMemory) {
        let _st = self.state.lock();
        conn.closed.store(true, Ordering::Relaxed);
        self.freed.notify_all();
    }

    /// The server closes every connection: nobody waits for room any more.
    fn close_all(&self) {
        self.state.lock().closing = true;
        self.freed.notify_all();
    }

    fn peak(&self) -> u64 {
        self.state.lock().peak
    }
}

/// Bytes of [`ReplyMemory`] a worker holds for its batch, given back when
/// dropped (also when the worker panics).
struct Held<'a> {
    mem: &'a ReplyMemory,
    conn: &'a ConnMemory,
    n: u64,
    /// Of `n`, taken ahead for further requests of the batch and not yet
    /// reckoned to one (see [`RESERVE_BYTES`]).
    spare: u64,
}

impl Held<'_> {
    /// Hold exactly `n` bytes from now on: give back what the batch no
    /// longer needs, or take what its replies need beyond the reckoning.
    fn settle(&mut self, n: u64) {
        if n > self.n {
            self.mem.force(self.conn, n - self.n);
        } else {
            self.mem.give(self.conn, self.n - n);
        }
        self.n = n;
        self.spare = 0;
    }

    /// Room for a further request of the batch, `cost` bytes, if there is
    /// some now: from what was taken ahead, else taken (with
    /// [`RESERVE_BYTES`] more ahead when that fits), so that a batch of
    /// small requests locks the budget once, not once per request.
    fn take_more(&mut self, cost: u64) -> bool {
        if self.spare < cost {
            let ahead = cost.max(RESERVE_BYTES);
            let got = if self.mem.try_take(self.conn, ahead) {
                ahead
            } else if self.mem.try_take(self.conn, cost) {
                cost
            } else {
                return false;
            };
            self.n += got;
            self.spare += got;
        }
        self.spare -= cost;
        true
    }
}

/// Reply memory a batch takes ahead for its further requests at a time.
const RESERVE_BYTES: u64 = 256 << 10;

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.mem.give(self.conn, self.n);
    }
}

/// Reply memory reckoned for a request before it is read: its write
/// payload, or the reply to a read (data plus chunk headers) or to a block
/// status query (a descriptor per 512-byte sector, at most 64 Ki).
/// Whatever its reply really takes is settled after the batch ran.
fn reply_cost(h: &RequestHeader, s: &Session) -> u64 {
    const HEADERS: u64 = 64;
    match check_request(h, s) {
        Ok(Command::Read { len, .. } | Command::Write { len, .. }) => len as u64 + HEADERS,
        Ok(Command::BlockStatus { len, .. }) => (len as u64 / 512 + 1).min(1 << 16) * 8 + HEADERS,
        _ => HEADERS,
    }
}

/// An NBD server for one device.
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Serve `dev`; block status comes from [`ZeroScan`] unless
    /// [`Server::with_allocation`] gives a better source.
    pub fn new(dev: Arc<dyn BlockDevice>, cfg: ServerConfig) -> Server {
        let alloc: Arc<dyn Allocation> = Arc::new(ZeroScan::new(dev.clone()));
        Self::build(dev, alloc, cfg)
    }

    /// Serve `dev` with allocation information from `alloc`.
    pub fn with_allocation(
        dev: Arc<dyn BlockDevice>,
        alloc: Arc<dyn Allocation>,
        cfg: ServerConfig,
    ) -> Server {
        Self::build(dev, alloc, cfg)
    }

    fn build(dev: Arc<dyn BlockDevice>, alloc: Arc<dyn Allocation>, cfg: ServerConfig) -> Server {
        let export = Export {
            name: cfg.export_name.clone(),
            description: cfg.description.clone(),
            size: dev.size(),
            read_only: cfg.read_only || dev.is_read_only(),
        };
        let mem = ReplyMemory::new(&cfg);
        Server {
            inner: Arc::new(Inner {
                dev,
                alloc,
                export,
                cfg,
                stopping: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                handshaking: Mutex::new(VecDeque::new()),
                sessions: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                protocol_errors: AtomicU64::new(0),
                mem,
            }),
        }
    }

    /// The export as clients see it.
    pub fn export(&self) -> &Export {
        &self.inner.export
    }

    /// A handle to stop [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.inner.clone())
    }

    /// Accept and serve clients until shut down; then wait for every
    /// connection's in-flight requests, flush the device and return.
    pub fn serve(&self, listener: &Listener) -> Result<ServeStats> {
        let ep = listener.endpoint();
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(ep.to_string(), e))?;
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        while !self.inner.stopping.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call
            // and the count (1) matches; the fd is owned by `listener`.
            let r = unsafe { libc::poll(&mut pfd, 1, 100) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(ep.to_string(), e));
            }
            if r == 0 {
                threads.retain(|t| !t.is_finished());
                continue;
            }
            let (stream, peer) = match listener.accept(next_id) {
                Ok(x) => x,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!("accept on {ep}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            {
                // Room for this handshake: drop the oldest unfinished one
                // if needed (an idle client, most likely).
                let mut hs = self.inner.handshaking.lock().expect("handshake list lock");
                while hs.len() >= self.inner.cfg.max_handshakes.max(1) {
                    let Some(old) = hs.pop_front() else { break };
                    let conns = self.inner.conns.lock().expect("connection table lock");
                    if let Some(s) = conns.get(&old) {
                        tracing::info!(
                            "{peer}: {} handshakes unfinished; closing the oldest",
                            self.inner.cfg.max_handshakes
                        );
                        s.shutdown(Shutdown::Both);
                    }
                }
                hs.push_back(id);
            }
            if threads.len() > 2 * (self.inner.cfg.max_handshakes + self.inner.cfg.max_connections)
            {
                threads.retain(|t| !t.is_finished());
            }
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    serve_connection(&inner, id, stream, &peer);
                    inner.handshake_done(id);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.inner.handshake_done(id);
                    tracing::warn!("cannot start a thread for a connection: {e}");
                }
            }
        }
        // Make sure every connection sees the shutdown, including ones that
        // registered between the flag and now.
        self.shutdown_handle().shutdown();
        let deadline = Instant::now() + self.inner.cfg.shutdown_grace;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        {
            let conns = self.inner.conns.lock().expect("connection table lock");
            if !conns.is_empty() {
                tracing::warn!(
                    "closing {} connection(s) still busy {:?} after the stop (a client not reading its replies?)",
                    conns.len(),
                    self.inner.cfg.shutdown_grace
                );
                for s in conns.values() {
                    s.shutdown(Shutdown::Both);
                }
            }
        }
        // Workers waiting for reply memory give up too.
        self.inner.mem.close_all();
        for t in threads {
            let _ = t.join();
        }
        self.inner.dev.flush()?;
        Ok(ServeStats {
            connections: next_id,
            requests: self.inner.requests.load(Ordering::Relaxed),
            protocol_errors: self.inner.protocol_errors.load(Ordering::Relaxed),
            peak_reply_memory: self.inner.mem.peak(),
        })
    }
}

/// Replies of one batch are gathered up to about this many bytes before
/// they are written (a single read may be larger, up to `MAX_PAYLOAD`).
const BATCH_BYTES: u64 = 4 << 20;
/// Requests answered per batch at most.
const BATCH_REQUESTS: usize = 256;

fn serve_connection(inner: &Arc<Inner>, id: u64, stream: Stream, peer: &str) {
    let setup = || -> io::Result<(Stream, Stream)> {
        if let Stream::Tcp(t) = &stream {
            t.set_nodelay(true)?;
        }
        stream.set_write_timeout(Some(inner.cfg.write_timeout))?;
        Ok((stream.try_clone()?, stream.try_clone()?))
    };
    let (rstream, wstream) = match setup() {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("{peer}: cannot set up connection: {e}");
            return;
        }
    };
    {
        let mut conns = inner.conns.lock().expect("connection table lock");
        if inner.stopping.load(Ordering::SeqCst) {
            stream.shutdown(Shutdown::Both);
            return;
        }
        match stream.try_clone() {
            Ok(s) => {
                conns.insert(id, s);
            }
            Err(e) => {
                tracing::warn!("{peer}: {e}");
                return;
            }
        }
    }
    // From here on the socket is closed and the connection unregistered
    // however this thread ends, a panic included (the client would wait for
    // a reply forever otherwise).
    let _registered = Registered {
        inner,
        id,
        stream: &stream,
    };
    // Dropped for a newer connection before it was registered above (the
    // accept loop found nothing to close then)?
    let evicted = !inner
        .handshaking
        .lock()
        .expect("handshake list lock")
        .contains(&id);
    if evicted {
        return;
    }
    tracing::debug!("{peer}: connected");
    let result = run_connection(inner, id, rstream, wstream, peer);
    match result {
        Ok(()) => tracing::debug!("{peer}: disconnected"),
        Err(ConnError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            tracing::info!("{peer}: client went away: {e}")
        }
        Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
            tracing::info!("{peer}: closing connection: {e}")
        }
        Err(e) => {
            inner.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{peer}: closing connection: {}", crate::error::Chain(&e));
        }
    }
}

/// A connection in the server's table: on drop (also when its thread
/// panics) the socket is shut down in both directions and the connection
/// leaves the table and the handshake list.
struct Registered<'a> {
    inner: &'a Inner,
    id: u64,
    stream: &'a Stream,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.stream.shutdown(Shutdown::Both);
        // A poisoned lock must not turn an unwinding panic into an abort.
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.inner
            .handshaking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&x| x != self.id);
    }
}

/// Gives a session slot back when the session ends.
struct SessionSlot<'a>(&'a Inner);

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

fn run_connection(
    inner: &Arc<Inner>,
    id: u64,
    rstream: Stream,
    wstream: Stream,
    peer: &str,
) -> std::result::Result<(), ConnError> {
    // A timeout too large for the clock is as good as none: a year.
    let now = Instant::now();
    let deadline = Deadline {
        s: rstream,
        deadline: Some(
            now.checked_add(inner.cfg.handshake_timeout)
                .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
                .unwrap_or(now),
        ),
        poll: BusyPoll::new(inner.cfg.busy_poll),
    };
    let mut reader = BufReader::with_capacity(256 << 10, deadline);
    let mut writer = wstream;
    let mut admitted = false;
    let negotiated = negotiate_admit(&mut reader, &mut writer, &inner.export, &mut || {
        admitted = inner.admit();
        if !admitted {
            tracing::warn!(
                "{peer}: refusing a session: {} already open",
                inner.cfg.max_connections
            );
        }
        admitted
    });
    let _slot = admitted.then(|| SessionSlot(inner));
    inner.handshake_done(id);
    let session = match negotiated? {
        Negotiated::Closed => return Ok(()),
        Negotiated::Transmission(s) => s,
    };
    reader.get_mut().clear()?;
    tracing::debug!(
        "{peer}: transmission (structured replies: {}, block status: {})",
        session.structured,
        session.meta_allocation
    );
    transmit(inner, reader, writer, &session, peer)
}

/// The length of the whole request (header and write payload) `buf` starts
/// with, if all of it is there, so that reading it cannot block.
fn buffered_request_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < REQUEST_LEN {
        return None;
    }
    let typ = u16::from_be_bytes([buf[6], buf[7]]);
    let len = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]) as usize;
    let whole = REQUEST_LEN + if typ == CMD_WRITE { len } else { 0 };
    (buf.len() >= whole).then_some(whole)
}

/// Whether `buf` starts with a whole request.
fn request_buffered(buf: &[u8]) -> bool {
    buffered_request_len(buf).is_some()
}

/// The transmission phase. Requests are taken in batches (one request,
/// plus every further request already received, or half of them: see
/// [`read_batch`]); the batch's reads are
/// handed to the device at once ([`BlockDevice::read_many`], which overlaps
/// their I/O) and its replies go out with one write. There is no thread hop
/// per request: on a virtual machine a wake-up on another CPU can cost more
/// than the read itself, and a client that pipelines requests gets them
/// answered in bulk. `workers_per_connection` threads take turns: the one
/// holding the socket's read side takes a batch and lets go, so the next
/// batch is read and executed while this one executes.
fn transmit(
    inner: &Inner,
    reader: BufReader<Deadline>,
    writer: Stream,
    session: &Session,
    peer: &str,
) -> std::result::Result<(), ConnError> {
    let input = parking_lot::Mutex::new(Input {
        reader,
        end: None,
        split: true,
    });
    let output = parking_lot::Mutex::new(writer);
    let threads = inner.cfg.workers_per_connection.max(1);
    let mem = ConnMemory::default();
    let run = || serve_batches(inner, &mem, &input, &output, session, peer);
    let results: Vec<std::result::Result<(), ConnError>> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(run)).collect();
        let mut r = vec![run()];
        for h in helpers {
            r.push(h.join().unwrap_or(Ok(())));
        }
        r
    });
    let input = input.into_inner();
    let poll = &input.reader.get_ref().poll;
    if !poll.window.is_zero() {
        tracing::debug!(
            "{peer}: busy polling: {} waits polled, {} slept at once",
            poll.polled,
            poll.slept
        );
    }
    // The thread that saw the end of the stream recorded why.
    let end = input.end.unwrap_or(Ok(()));
    results.into_iter().find(|r| r.is_err()).unwrap_or(end)
}

/// The read side of a connection, shared by its threads.
struct Input {
    reader: BufReader<Deadline>,
    /// Whether the next batch may be split ([`read_batch`]).
    split: bool,
    /// Set when the stream ended: how.
    end: Option<std::result::Result<(), ConnError>>,
}

/// One thread of a connection: take a batch, execute it, send the replies,
/// until the stream ends. Errors returned are reply-writing errors.
///
/// The batch's requests hold reply memory ([`ReplyMemory`]) from before
/// they are read until their replies are sent. Between batches a worker
/// keeps its reply buffer only up to its share of the connection's budget
/// (and [`KEEP_BYTES`]), so idle workers do not pin what a burst of large
/// reads needed.
fn serve_batches(
    inner: &Inner,
    mem: &ConnMemory,
    input: &parking_lot::Mutex<Input>,
    output: &parking_lot::Mutex<Stream>,
    session: &Session,
    peer: &str,
) -> std::result::Result<(), ConnError> {
    let mut batch: Vec<Incoming> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let workers = inner.cfg.workers_per_connection.max(1) as u64;
    let keep = (inner.cfg.reply_memory_per_connection / workers).min(KEEP_BYTES) as usize;
    loop {
        batch.clear();
        let mut held = Held {
            mem: &inner.mem,
            conn: mem,
            n: 0,
            spare: 0,
        };
        let ended = {
            let mut inp = input.lock();
            if inp.end.is_some() {
                return Ok(());
            }
            let Input { reader, split, .. } = &mut *inp;
            let end = read_batch(inner, reader, session, &mut batch, split, &mut held);
            let ended = end.is_some();
            inp.end = end;
            ended
        };
        if !batch.is_empty() {
            run_batch(inner, session, &mut batch, &mut out, peer);
            // Write payloads are written: only the replies stay.
            batch.clear();
            held.settle(out.len() as u64);
            let mut w = output.lock();
            if let Err(e) = w.write_all(&out) {
                tracing::info!("{peer}: cannot send reply: {e}");
                // Wake the other threads: nobody is listening any more.
                w.shutdown(Shutdown::Both);
                inner.mem.close(mem);
                return Err(e.into());
            }
            drop(w);
            drop(held);
            // Only what a batch wrote is resident (a grown buffer's spare
            // capacity is not): a buffer is kept while every batch it held
            // fitted.
            if out.len() > keep {
                out = Vec::new();
            }
        }
        if ended {
            return Ok(());
        }
    }
}

/// Reply buffers larger than this are not kept between batches (a batch
/// gathers about [`BATCH_BYTES`], plus its last read).
const KEEP_BYTES: u64 = BATCH_BYTES + (1 << 20);

/// Read one request, then every further one already received (up to the
/// batch limits). Returns how the stream ended, if it did.
///
/// Each request first takes room for its reply (and write payload) in
/// `held` ([`ReplyMemory`]): the first one waits for it, with the socket's
/// read side to itself (the connection's other workers could only wait
/// too), before its payload is read; a further one that does not fit now
/// ends the batch.
///
/// When `split` is set and several requests are waiting, the batch takes
/// only the first half of them (and clears `split`; the next batch takes
/// the rest, and sets it again). Replies then go out in two writes per
/// round of a pipelining client: it reads the first half's replies and sends
/// their successors while the second half executes, so neither side waits
/// for the other's whole round. A client that sleeps while it waits pays a
/// wake-up for each round (tens of microseconds on a virtual machine), so
/// overlapping the two sides is worth the extra write.
fn read_batch(
    inner: &Inner,
    reader: &mut BufReader<Deadline>,
    session: &Session,
    batch: &mut Vec<Incoming>,
    split: &mut bool,
    held: &mut Held<'_>,
) -> Option<std::result::Result<(), ConnError>> {
    let mut bytes = 0u64;
    let mut limit = BATCH_REQUESTS;
    loop {
        let inc = if batch.is_empty() {
            match read_request_header(reader) {
                Ok(Some(h)) => {
                    let cost = reply_cost(&h, session);
                    if !inner.mem.take(held.conn, cost) {
                        // Closed while waiting: the worker whose send
                        // failed reports why.
                        return Some(Ok(()));
                    }
                    held.n += cost;
                    read_request_body(reader, &h, session)
                }
                Ok(None) => Ok(Incoming::Eof),
                Err(e) => Err(e),
            }
        } else {
            // The next request is all in the buffer (checked below).
            let cost = parse_request_header(reader.buffer())
                .map(|h| reply_cost(&h, session))
                .unwrap_or(0);
            if !held.take_more(cost) {
                return None;
            }
            read_incoming(reader, session)
        };
        let inc = match inc {
            Ok(i) => i,
            // Answer what was read before the stream ended.
            Err(_) if inner.stopping.load(Ordering::SeqCst) => return Some(Ok(())),
            Err(e) => return Some(Err(e)),
        };
        inner.requests.fetch_add(1, Ordering::Relaxed);
        match inc {
            Incoming::Eof
            | Incoming::Request {
                cmd: Command::Disconnect,
                ..
            } => return Some(Ok(())),
            Incoming::Request {
                cmd: Command::Read { len, .. },
                ..
            } => bytes += len as u64,
            _ => {}
        }
        batch.push(inc);
        if batch.len() == 1 {
            let waiting = 1 + requests_buffered(reader.buffer(), BATCH_REQUESTS);
            if *split && waiting >= SPLIT_MIN {
                limit = waiting / 2;
                *split = false;
            } else {
                *split = true;
            }
        }
        if batch.len() >= limit || bytes >= BATCH_BYTES || !request_buffered(reader.buffer()) {
            return None;
        }
    }
}

/// Batches are split in halves from this many waiting requests on.
const SPLIT_MIN: usize = 4;

/// How many whole requests (header and write payload) `buf` starts with,
/// counting up to `max`.
fn requests_buffered(mut buf: &[u8], max: usize) -> usize {
    let mut n = 0;
    while n < max {
        let Some(whole) = buffered_request_len(buf) else {
            break;
        };
        buf = &buf[whole..];
        n += 1;
    }
    n
}

/// Execute a batch in order into `out` (cleared first): runs of reads go to
/// the device together.
fn run_batch(
    inner: &Inner,
    session: &Session,
    batch: &mut [Incoming],
    out: &mut Vec<u8>,
    peer: &str,
) {
    out.clear();
    let dev = inner.dev.as_ref();
    let mut i = 0;
    while i < batch.len() {
        let mut j = i;
        while j < batch.len()
            && matches!(
                batch[j],
                Incoming::Request {
                    cmd: Command::Read { .. },
                    ..
                }
            )
        {
            j += 1;
        }
        if j > i {
            let reads: Vec<(u64, u64, u32, bool)> = batch[i..j]
                .iter()
                .map(|inc| match inc {
                    Incoming::Request {
                        handle,
                        cmd: Command::Read { offset, len, df },
                        ..
                    } => (*handle, *offset, *len, *df),
                    _ => unreachable!("only reads in this run"),
                })
                .collect();
            read_replies(dev, session, &reads, out);
            i = j;
            continue;
        }
        match &batch[i] {
            Incoming::Request {
                handle,
                cmd,
                payload,
            } => out.extend_from_slice(&execute(
                dev,
                inner.alloc.as_ref(),
                session,
                *handle,
                *cmd,
                payload,
            )),
            Incoming::Rejected {
                handle,
                typ,
                rejection,
            } => {
                tracing::debug!(
                    "{peer}: rejecting command {typ}: {} ({})",
                    rejection.msg,
                    rejection.errno
                );
                out.extend_from_slice(&error_reply(
                    session,
                    *handle,
                    rejection.errno,
                    &rejection.msg,
                ));
            }
            Incoming::Eof => {}
        }
        i += 1;
    }
}

/// Append the replies of consecutive reads `(handle, offset, len, df)` to
/// `out`, reading all their data with one [`BlockDevice::read_many`],
/// straight into `out`. In structured replies, ranges the device reports as
/// zero ([`BlockDevice::extents`]) become `NBD_REPLY_TYPE_OFFSET_HOLE`
/// chunks and are not read (one hole chunk when the whole range is zero;
/// with `DF`, a read that is not all zero is one data chunk). Simple
/// replies carry the data; devices fill what they know to be zero without
/// reading it.
fn read_replies(
    dev: &dyn BlockDevice,
    s: &Session,
    reads: &[(u64, u64, u32, bool)],
    out: &mut Vec<u8>,
) {
    // Where each reply starts in `out`, and the data to read:
    // (position in `out`, device offset, length, reply index).
    let mut starts = Vec::with_capacity(reads.len());
    let mut data: Vec<(usize, u64, usize, usize)> = Vec::new();
    for (k, &(handle, offset, len, df)) in reads.iter().enumerate() {
        starts.push(out.len());
        let len = len as u64;
        if len == 0 {
            if s.structured {
                out.extend_from_slice(&structured_chunk(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    handle,
                    &[],
                ));
            } else {
                put_simple(out, handle);
            }
            continue;
        }
        // A simple reply carries one data payload whatever the layout, and
        // devices fill what they know to be zero without reading it: no
        // need to look at the extents.
        if !s.structured {
            put_simple(out, handle);
            let at = out.len();
            out.resize(at + len as usize, 0);
            data.push((at, offset, len as usize, k));
            continue;
        }
        // Extents that do not cover the range exactly (a device breaking
        // its contract) are not trusted: the whole range is read.
        let ext = match dev.extents(offset, len) {
            Ok(e) if covers(&e, offset, len) => e,
            _ => vec![Extent {
                offset,
                len,
                zero: false,
            }],
        };
        let all_zero = ext.iter().all(|e| e.zero);
        if all_zero || (!df && ext.iter().any(|e| e.zero)) {
            // Chunk per extent, a hole chunk for each zero one (a single
            // hole chunk when all is zero, which DF allows too).
            let n = ext.len();
            for (i, e) in ext.iter().enumerate() {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                if e.zero {
                    put_hole_chunk(out, flags, handle, e.offset, e.len as u32);
                } else {
                    put_data_header(out, flags, handle, e.offset, e.len as u32);
                    data.push((out.len(), e.offset, e.len as usize, k));
                    out.resize(out.len() + e.len as usize, 0);
                }
            }
            continue;
        }
        // One data chunk for the whole range (zero-filled).
        put_data_header(out, REPLY_FLAG_DONE, handle, offset, len as u32);
        let at = out.len();
        out.resize(at + len as usize, 0);
        for e in ext.iter().filter(|e| !e.zero) {
            data.push((
                at + (e.offset - offset) as usize,
                e.offset,
                e.len as usize,
                k,
            ));
        }
    }
    // Read everything at once, into the replies; large batches in pieces
    // spread over the cores (decompressing a ZFile lower is CPU work).
    let results = {
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(data.len());
        let mut owner: Vec<usize> = Vec::with_capacity(data.len());
        let mut rest: &mut [u8] = &mut out[..];
        let mut base = 0usize;
        let total: usize = data.iter().map(|d| d.2).sum();
        let piece = if total >= PARALLEL_BYTES {
            PARALLEL_PIECE
        } else {
            usize::MAX
        };
        for &(pos, off, len, k) in &data {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(pos - base);
            let (mut buf, tail) = tail.split_at_mut(len);
            let mut off = off;
            while !buf.is_empty() {
                let n = buf.len().min(piece);
                let (head, more) = std::mem::take(&mut buf).split_at_mut(n);
                reqs.push((off, head));
                owner.push(k);
                off += n as u64;
                buf = more;
            }
            rest = tail;
            base = pos + len;
        }
        let threads = if total >= PARALLEL_BYTES {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_READ_THREADS)
                .min(reqs.len())
        } else {
            1
        };
        let results = read_parallel(dev, &mut reqs, threads);
        results.into_iter().zip(owner).collect::<Vec<_>>()
    };
    let mut failed: Vec<Option<Error>> = (0..reads.len()).map(|_| None).collect();
    for (r, k) in results {
        if let Err(e) = r {
            failed[k].get_or_insert(e);
        }
    }
    if failed.iter().all(Option::is_none) {
        return;
    }
    // Replace the replies of failed reads with errors.
    let mut rebuilt = Vec::with_capacity(out.len());
    for (k, f) in failed.into_iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(out.len());
        match f {
            Some(e) => {
                let errno = errno_of(&e);
                log_failure(errno, &crate::error::Chain(&e).to_string());
                rebuilt.extend_from_slice(&error_reply(s, reads[k].0, errno, &e.to_string()));
            }
            None => rebuilt.extend_from_slice(&out[starts[k]..end]),
        }
    }
    *out = rebuilt;
}

/// Whether `ext` are consecutive nonempty extents covering exactly
/// `[offset, offset+len)`.
fn covers(ext: &[Extent], offset: u64, len: u64) -> bool {
    let mut pos = offset;
    for e in ext {
        if e.offset != pos || e.len == 0 {
            return false;
        }
        pos += e.len;
    }
    !ext.is_empty() && pos == offset + len
}

/// Batches reading at least this much are read on several threads.
const PARALLEL_BYTES: usize = 1 << 20;
/// Pieces requests are cut into for that.
const PARALLEL_PIECE: usize = 256 << 10;
/// Threads reading one batch at most.
const MAX_READ_THREADS: usize = 4;

/// `dev.read_many(reqs)` on up to `threads` threads (consecutive shares
/// of similar size), results in order. Shares are taken by whichever thread
/// gets to them first, this one included, so a thread that cannot start or
/// starts late costs nothing.
fn read_parallel(
    dev: &dyn BlockDevice,
    reqs: &mut [(u64, &mut [u8])],
    threads: usize,
) -> Vec<Result<()>> {
    if threads <= 1 || reqs.len() < 2 {
        return dev.read_many(reqs);
    }
    type Share<'a, 'b> = Mutex<Option<&'a mut [(u64, &'b mut [u8])]>>;
    let per = reqs.len().div_ceil(threads);
    let shares: Vec<Share<'_, '_>> = reqs.chunks_mut(per).map(|c| Mutex::new(Some(c))).collect();
    let outs: Vec<Mutex<Vec<Result<()>>>> = shares.iter().map(|_| Mutex::new(Vec::new())).collect();
    let run = |i: usize| {
        let share = shares[i].lock().expect("share lock").take();
        if let Some(c) = share {
            *outs[i].lock().expect("result lock") = dev.read_many(c);
        }
    };
    std::thread::scope(|scope| {
        for i in 1..shares.len() {
            let run = &run;
            let _ = std::thread::Builder::new()
                .name("nbd-read".into())
                .spawn_scoped(scope, move || run(i));
        }
        for i in 0..shares.len() {
            run(i);
        }
    });
    outs.into_iter()
        .flat_map(|o| o.into_inner().expect("result lock"))
        .collect()
}

fn put_simple(out: &mut Vec<u8>, handle: u64) {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    put_simple_reply(&mut b, 0, handle);
    out.extend_from_slice(&b);
}

/// Header of an `OFFSET_DATA` chunk of `len` data bytes (the data follows).
fn put_data_header(out: &mut Vec<u8>, flags: u16, handle: u64, offset: u64, len: u32) {
    let mut h = [0u8; STRUCTURED_REPLY_LEN + 8];
    put_structured_reply(&mut h, flags, REPLY_TYPE_OFFSET_DATA, handle, len + 8);
    h[STRUCTURED_REPLY_LEN..].copy_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&h);
}

/// A whole `OFFSET_HOLE` chunk: offset (u64) and hole size (u32).
fn put_hole_chunk(out: &mut Vec<u8>, flags: u16, handle: u64, offset: u64, len: u32) {
    let mut h = [0u8; STRUCTURED_REPLY_LEN + 12];
    put_structured_reply(&mut h, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
    h[STRUCTURED_REPLY_LEN..STRUCTURED_REPLY_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    h[STRUCTURED_REPLY_LEN + 8..].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&h);
}

/// An error reply in the form the session calls for.
pub fn error_reply(s: &Session, handle: u64, errno: Errno, msg: &str) -> Vec<u8> {
    if s.structured {
        structured_error(handle, errno, msg)
    } else {
        let mut b = vec![0u8; SIMPLE_REPLY_LEN];
        put_simple_reply(&mut b, errno.code(), handle);
        b
    }
}

fn ok_reply(handle: u64) -> Vec<u8> {
    let mut b = vec![0u8; SIMPLE_REPLY_LEN];
    put_simple_reply(&mut b, 0, handle);
    b
}

fn write_zeroes_provisioned(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        dev.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Run one validated command against `dev` and build the complete reply.
pub fn execute(
    dev: &dyn BlockDevice,
    alloc: &dyn Allocation,
    s: &Session,
    handle: u64,
    cmd: Command,
    payload: &[u8],
) -> Vec<u8> {
    let fail = |e: &Error| {
        let errno = errno_of(e);
        let text = crate::error::Chain(e).to_string();
        log_failure(errno, &text);
        error_reply(s, handle, errno, &text)
    };
    let done =
        |r: Result<()>, fua: bool| match r.and_then(|_| if fua { dev.flush() } else { Ok(()) }) {
            Ok(()) => ok_reply(handle),
            Err(e) => fail(&e),
        };
    match cmd {
        Command::Read { offset, len, df } => {
            let mut out = Vec::new();
            read_replies(dev, s, &[(handle, offset, len, df)], &mut out);
            out
        }
        Command::Write { offset, fua, .. } => done(dev.write_at(payload, offset), fua),
        Command::Flush => done(dev.flush(), false),
        Command::Trim { offset, len, fua } => {
            if len == 0 {
                return ok_reply(handle);
            }
            done(dev.trim(offset, len as u64), fua)
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => {
            if len == 0 {
                return ok_reply(handle);
            }
            if no_hole {
                done(write_zeroes_provisioned(dev, offset, len as u64), fua)
            } else {
                done(dev.write_zeroes(offset, len as u64), fua)
            }
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let len = if len == 0 {
                // Unspecified by the protocol; answer about one byte.
                if offset >= s.size {
                    return error_reply(s, handle, Errno::Inval, "block status at end of export");
                }
                1
            } else {
                len
            };
            match alloc.extents(offset, len as u64) {
                Ok(ext) => {
                    let mut out: Vec<(u32, u32)> = Vec::new();
                    let mut total = 0u64;
                    for (l, f) in ext {
                        let l = l.min(len as u64 - total);
                        if l == 0 {
                            break;
                        }
                        total += l;
                        match out.last_mut() {
                            Some((ol, of)) if *of == f => *ol += l as u32,
                            _ => out.push((l as u32, f)),
                        }
                        if req_one || out.len() >= 1 << 16 || total >= len as u64 {
                            break;
                        }
                    }
                    if req_one {
                        out.truncate(1);
                    }
                    if out.is_empty() {
                        out.push((len, 0));
                    }
                    block_status_chunk(handle, BASE_ALLOCATION_ID, &out)
                }
                Err(e) => fail(&e),
            }
        }
        Command::Disconnect => Vec::new(),
    }
}

/// Block status of a layer stack from its merged LSMT indexes: ranges no
/// layer maps (or that a zeroed entry covers) are holes reading as zeros.
impl Allocation for crate::stack::Stack {
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(len).min(self.size());
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        for (o, l, data) in self.allocation(offset, end.saturating_sub(offset)) {
            // Sector-aligned answers may start before `offset` or end after `end`.
            let (s, e) = (o.max(pos), (o + l).min(end));
            if s >= e {
                continue;
            }
            if s > pos {
                // Not described: report as data (always safe).
                out.push((s - pos, 0));
            }
            let flags = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            match out.last_mut() {
                Some((ol, of)) if *of == flags => *ol += e - s,
                _ => out.push((e - s, flags)),
            }
            pos = e;
        }
        if out.is_empty() && end > offset {
            out.push((end - offset, 0));
        }
        Ok(out)
    }
}

/// Device failures (EIO: a corrupt or unreadable layer; ENOSPC) the operator
/// must hear of: logged as warnings, the first [`WARN_FAILURES`] of the
/// process, then at debug level so that a client retrying a bad block cannot
/// flood the log. Requests the client got wrong (EINVAL, EPERM on a
/// read-only export) are logged at debug level only.
fn log_failure(errno: Errno, text: &str) {
    static WARNED: AtomicU64 = AtomicU64::new(0);
    if matches!(errno, Errno::Io | Errno::NoSpc) {
        match WARNED.fetch_add(1, Ordering::Relaxed) {
            n if n < WARN_FAILURES => {
                tracing::warn!("request failed ({errno}): {text}");
                return;
            }
            WARN_FAILURES => tracing::warn!(
                "more requests failed; further failures are logged at debug level (OVERLAYBD_LOG=debug)"
            ),
            _ => {}
        }
    }
    tracing::debug!("request failed ({errno}): {text}");
}

/// How many device failures are logged as warnings.
const WARN_FAILURES: u64 = 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    /// The adaptive window: a wait polls while the last one was short, sleeps
    /// at once after one longer than twice the window, and polls again once
    /// requests follow each other closely. (The window is long, so that the
    /// waits' lengths hold on a loaded machine: the writer's pauses are well
    /// over twice the window, and data already there is read at once.)
    #[test]
    fn busy_polling_adapts_to_the_gaps_between_requests() {
        let window = Duration::from_millis(100);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        let mut p = BusyPoll::new(window);
        let mut buf = [0u8; 8];
        // Data `after` from now (`None`: already there), then one wait for it.
        let mut wait = |p: &mut BusyPoll, after: Option<Duration>| {
            let writer = match after {
                None => {
                    b.write_all(b"x").unwrap();
                    None
                }
                Some(d) => {
                    let mut w = b.try_clone().unwrap();
                    Some(std::thread::spawn(move || {
                        std::thread::sleep(d);
                        w.write_all(b"x").unwrap();
                    }))
                }
            };
            assert_eq!(p.read(&mut s, &mut buf).unwrap(), 1);
            if let Some(w) = writer {
                w.join().unwrap();
            }
            (p.polled, p.slept, p.pays)
        };
        let long = Some(3 * window);
        // A fresh session polls; a long wait stops polling for the next one.
        assert_eq!(wait(&mut p, long), (1, 0, false));
        assert_eq!(wait(&mut p, long), (1, 1, false));
        // A request already there: a short wait, so the next one polls again.
        assert_eq!(wait(&mut p, None), (1, 2, true));
        assert_eq!(wait(&mut p, None), (2, 2, true));
        // Without a window nothing is polled nor counted.
        let mut off = BusyPoll::new(Duration::ZERO);
        assert_eq!(wait(&mut off, None), (0, 0, false));
    }

    /// Every length and alignment, and a set byte anywhere (in the 64-byte
    /// chunks or the tail) is seen.
    #[test]
    fn is_zero_sees_every_byte() {
        let buf = vec![0u8; 300];
        for start in 0..70 {
            for len in 0..(300 - start) {
                let b = &buf[start..start + len];
                assert!(is_zero(b), "{start}+{len}");
                for k in 0..len {
                    let mut v = b.to_vec();
                    v[k] = 0x80;
                    assert!(!is_zero(&v), "{start}+{len}: byte {k}");
                }
            }
        }
    }

    fn read_request(handle: u64) -> [u8; REQUEST_LEN] {
        RequestHeader {
            flags: 0,
            typ: CMD_READ,
            handle,
            offset: handle * 4096,
            length: 4096,
        }
        .encode()
    }

    /// Sizes of the batches `read_batch` takes from `sends` (written to the
    /// socket one after the other, each taken in batches until none is left).
    fn batch_sizes(sends: &[usize]) -> Vec<usize> {
        let server = Server::new(Arc::new(MemDevice::new(1 << 20)), ServerConfig::default());
        let (mut client, conn) = UnixStream::pair().unwrap();
        let session = Session {
            size: 1 << 20,
            read_only: true,
            structured: false,
            meta_allocation: false,
        };
        let mut reader = BufReader::new(Deadline {
            s: Stream::Unix(conn),
            deadline: None,
            poll: BusyPoll::new(Duration::ZERO),
        });
        let conn_mem = ConnMemory::default();
        let (mut split, mut sizes, mut handle) = (true, Vec::new(), 0);
        for &n in sends {
            let mut bytes = Vec::new();
            for _ in 0..n {
                handle += 1;
                bytes.extend_from_slice(&read_request(handle));
            }
            client.write_all(&bytes).unwrap();
            let mut taken = 0;
            while taken < n {
                let mut batch = Vec::new();
                let mut held = Held {
                    mem: &server.inner.mem,
                    conn: &conn_mem,
                    n: 0,
                    spare: 0,
                };
                let end = read_batch(
                    &server.inner,
                    &mut reader,
                    &session,
                    &mut batch,
                    &mut split,
                    &mut held,
                );
                assert!(end.is_none());
                taken += batch.len();
                sizes.push(batch.len());
            }
            assert_eq!(taken, n);
        }
        sizes
    }

    #[test]
    fn a_round_of_waiting_requests_is_answered_in_two_halves() {
        // 16 waiting: 8 now, the other 8 next; then the next round splits
        // again. Fewer than SPLIT_MIN are never split.
        assert_eq!(batch_sizes(&[16, 16]), vec![8, 8, 8, 8]);
        assert_eq!(batch_sizes(&[5]), vec![2, 3]);
        assert_eq!(batch_sizes(&[3, 1, 2]), vec![3, 1, 2]);
        // A batch after a split takes everything waiting, whole.
        assert_eq!(batch_sizes(&[4, 6]), vec![2, 2, 3, 3]);
    }

    #[test]
    fn whole_requests_are_counted_with_their_write_payloads() {
        let write = RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            handle: 9,
            offset: 0,
            length: 10,
        }
        .encode();
        let mut buf = read_request(1).to_vec();
        buf.extend_from_slice(&write);
        buf.extend_from_slice(&[7u8; 10]);
        buf.extend_from_slice(&read_request(2));
        assert_eq!(requests_buffered(&buf, 256), 3);
        assert_eq!(requests_buffered(&buf, 2), 2);
        // The write's payload not all there yet: one whole request.
        assert_eq!(
            requests_buffered(&buf[..REQUEST_LEN + REQUEST_LEN + 9], 256),
            1
        );
        assert_eq!(requests_buffered(&buf[..REQUEST_LEN - 1], 256), 0);
    }
}
