//! Read throughput through the NBD server versus reading the same layer
//! stack in-process; prints each NBD figure as a ratio of the in-process one.
//!
//! `cargo run --release -p blockdev --example nbd_bench -- [--span MiB] [--ops N] [--rounds R] [--structured] [--cold] [--workers N] LAYER...`
//!
//! Each round measures, one after the other: sequential reads of up to 1 MiB
//! in-process and through NBD (8 in flight), then random 4 KiB reads
//! in-process (one at a time, and 16 at a time through `read_many`: the
//! faster of the two is the baseline), through NBD with 1 and with 16
//! requests in flight. The client reads reply data into one reused buffer
//! ([`Client::recv_into`]). The CPU time per random read (client and server
//! together: both run in this process) shows how much of the difference is
//! work and how much waiting. The medians of `R` rounds (default 5) are
//! printed with their spread, so that other load on the machine shows up as
//! spread, not as a wrong ratio. With `--cold`, the random reads start from an empty page
//! cache for the layer files (`posix_fadvise(DONTNEED)` on them only), so
//! they measure device reads. Last, the random reads with 16 in flight go
//! to the same server and client serving a memory device instead, whose
//! reads cost next to nothing: the ceiling of the connection itself, as a
//! ratio of the same in-process baseline (a device read cannot make the
//! stack's figure higher). scripts/bench-nbd.sh runs it.

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::nbd::client::{Client, ClientOptions, Reply};
use blockdev::nbd::proto::CMD_READ;
use blockdev::nbd::{Endpoint, Listener, Server, ServerConfig};
use blockdev::stack::Stack;
use blockdev::BlockDevice;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// CPU seconds used by this process so far (every thread: the client and
/// the server run in this process).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given; nothing else
    // is shared.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds used by the calling thread so far.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: clock_gettime fills the zeroed timespec it is given.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts
    };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Drop the page cache of the layer files (only theirs).
fn evict(layers: &[PathBuf]) {
    for l in layers {
        if let Ok(f) = std::fs::File::open(l) {
            // SAFETY: fadvise on a valid fd owned by `f`; no memory is shared.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

struct Figures {
    local_seq: Vec<f64>,
    nbd_seq: Vec<f64>,
    local_rand: Vec<f64>,
    local_batch: Vec<f64>,
    nbd_qd1: Vec<f64>,
    nbd_qd16: Vec<f64>,
    /// CPU microseconds per random read: in-process, NBD 16 in flight
    /// (the client's share, the rest is the server's).
    cpu_local: Vec<f64>,
    cpu_qd16: Vec<f64>,
    cpu_qd16_client: Vec<f64>,
}

/// Random 4 KiB reads at `offsets` through `c` with `qd` in flight; IOPS.
fn random_reads(c: &mut Client, offsets: &[u64], qd: usize) -> f64 {
    let mut reply = Reply::default();
    let t0 = Instant::now();
    let (mut inflight, mut i) = (0usize, 0usize);
    while i < offsets.len() || inflight > 0 {
        while inflight < qd && i < offsets.len() {
            c.send(CMD_READ, 0, offsets[i], 4096, &[]).unwrap();
            inflight += 1;
            i += 1;
        }
        c.flush_requests().unwrap();
        // Take every reply that has arrived before sending more, as an
        // asynchronous client does: one write per burst. The data lands in
        // one reused buffer, as a client reading into its caller's buffers
        // does.
        loop {
            c.recv_into(&mut reply).unwrap();
            assert_eq!((reply.error, reply.data.len()), (0, 4096));
            inflight -= 1;
            if c.buffered() == 0 {
                break;
            }
        }
    }
    offsets.len() as f64 / t0.elapsed().as_secs_f64()
}

/// The same random reads (16 in flight) from a server whose device is
/// memory: what the connection itself allows, reads costing next to nothing.
fn transport_ceiling(cfg: &ServerConfig, opts: &ClientOptions, ops: usize, rounds: usize) -> f64 {
    const SIZE: usize = 64 << 20;
    let dev = Arc::new(blockdev::device::MemDevice::new(SIZE));
    let dir = tempfile::tempdir().expect("tempdir");
    let ep = Endpoint::Unix(dir.path().join("mem.sock"));
    let listener = Listener::bind(&ep).expect("bind");
    let server = Server::new(dev, cfg.clone());
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve(&listener).expect("serve"));
    let mut c = Client::connect(&ep, opts).expect("connect");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let offsets: Vec<u64> = (0..ops)
                .map(|_| xorshift(&mut seed) % (SIZE as u64 / 4096) * 4096)
                .collect();
            random_reads(&mut c, &offsets, 16)
        })
        .collect();
    c.disconnect().unwrap();
    stop.shutdown();
    t.join().unwrap();
    median(&mut v)
}

fn main() {
    let mut span: u64 = 512 << 20;
    let mut ops: usize = 20_000;
    let mut rounds: usize = 5;
    let mut structured = false;
    let mut cold = false;
    let mut workers = ServerConfig::default().workers_per_connection;
    let mut busy_poll = ServerConfig::default().busy_poll;
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--span" => {
                span = args
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("--span MiB")
                    << 20
            }
            "--ops" => ops = args.next().and_then(|v| v.parse().ok()).expect("--ops N"),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds R")
            }
            "--busy-poll-us" => {
                busy_poll = Duration::from_micros(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--busy-poll-us N"),
                )
            }
            "--structured" => structured = true,
            "--cold" => cold = true,
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--workers N")
            }
            _ => layers.push(a.into()),
        }
    }
    if layers.is_empty() {
        eprintln!(
            "usage: nbd_bench [--span MiB] [--ops N] [--rounds R] [--structured] [--cold] [--workers N] [--busy-poll-us N] LAYER..."
        );
        std::process::exit(2);
    }
    let stack = Arc::new(Stack::open_read_only(&layers, None).unwrap_or_else(|e| {
        eprintln!("nbd_bench: {e}");
        std::process::exit(1)
    }));
    // Benchmark the mapped data (reads of holes never touch a file).
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut left = span;
    for (o, l, data) in stack.allocation(0, stack.size()) {
        if data && left > 0 {
            let l = l.min(left);
            extents.push((o, l));
            left -= l;
        }
    }
    let span: u64 = extents.iter().map(|e| e.1).sum();
    if span == 0 {
        eprintln!("nbd_bench: the stack maps no data");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ep = Endpoint::Unix(dir.path().join("bench.sock"));
    let listener = Listener::bind(&ep).expect("bind");
    let cfg = ServerConfig {
        read_only: true,
        workers_per_connection: workers,
        busy_poll,
        ..ServerConfig::default()
    };
    let server = Server::with_allocation(stack.clone(), stack.clone(), cfg.clone());
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve(&listener).expect("serve"));
    println!(
        "stack: {} layer(s), {} bytes; reading {} MiB of mapped data in {} extents; {} random 4 KiB reads in it; {} rounds; {} replies{}",
        layers.len(),
        stack.size(),
        span >> 20,
        extents.len(),
        ops,
        rounds,
        if structured { "structured" } else { "simple" },
        if cold { "; random reads from a cold page cache" } else { "" }
    );

    let chunk = 1u64 << 20;
    let pieces: Vec<(u64, u32)> = extents
        .iter()
        .flat_map(|&(o, l)| {
            (0..l.div_ceil(chunk)).map(move |i| (o + i * chunk, chunk.min(l - i * chunk) as u32))
        })
        .collect();
    let blocks: Vec<u64> = extents
        .iter()
        .flat_map(|&(o, l)| (o.div_ceil(4096)..(o + l) / 4096).map(|b| b * 4096))
        .collect();
    let opts = ClientOptions {
        structured,
        ..ClientOptions::default()
    };
    let mut c = Client::connect(&ep, &opts).expect("connect");
    let mut buf = vec![0u8; chunk as usize];
    let local_pass = |buf: &mut [u8]| {
        let mut sum = 0u64;
        for &(o, n) in &pieces {
            stack.read_at(&mut buf[..n as usize], o).unwrap();
            sum = sum.wrapping_add(buf[..n as usize].iter().map(|&b| b as u64).sum::<u64>());
        }
        sum
    };
    local_pass(&mut buf); // warm the page cache for both contenders
    let mut f = Figures {
        local_seq: Vec::new(),
        nbd_seq: Vec::new(),
        local_rand: Vec::new(),
        local_batch: Vec::new(),
        nbd_qd1: Vec::new(),
        nbd_qd16: Vec::new(),
        cpu_local: Vec::new(),
        cpu_qd16: Vec::new(),
        cpu_qd16_client: Vec::new(),
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..rounds {
        // Sequential, requests of up to 1 MiB over the mapped extents.
        let t0 = Instant::now();
        let sum_local = local_pass(&mut buf);
        f.local_seq.push(span as f64 / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let mut sum_nbd = 0u64;
        let mut next = 0;
        let mut inflight = 0;
        while next < pieces.len() || inflight > 0 {
            while inflight < 8 && next < pieces.len() {
                c.send(CMD_READ, 0, pieces[next].0, pieces[next].1, &[])
                    .unwrap();
                next += 1;
                inflight += 1;
            }
            c.flush_requests().unwrap();
            let r = c.recv().unwrap();
            assert_eq!(r.error, 0);
            sum_nbd = sum_nbd.wrapping_add(r.data.iter().map(|&b| b as u64).sum::<u64>());
            inflight -= 1;
        }
        f.nbd_seq.push(span as f64 / t0.elapsed().as_secs_f64());
        assert_eq!(sum_local, sum_nbd, "NBD data differs from in-process data");

        // Random 4 KiB reads, aligned, within the mapped extents; a new
        // sequence each round, the same for every contender.
        let offsets: Vec<u64> = (0..ops)
            .map(|_| blocks[(xorshift(&mut seed) % blocks.len() as u64) as usize])
            .collect();
        // In-process: one read at a time, and 16 at a time through
        // `read_many` (what the server does with 16 requests in flight);
        // the faster of the two is the baseline. Heap buffers, as a reader
        // would use.
        let mut bufs = vec![0u8; 16 * 4096];
        if cold {
            evict(&layers);
        }
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for &o in &offsets {
            stack.read_at(&mut bufs[..4096], o).unwrap();
        }
        f.local_rand.push(ops as f64 / t0.elapsed().as_secs_f64());
        f.cpu_local.push((cpu_seconds() - c0) * 1e6 / ops as f64);
        if cold {
            evict(&layers);
        }
        let t0 = Instant::now();
        for group in offsets.chunks(16) {
            let mut reqs: Vec<(u64, &mut [u8])> =
                group.iter().copied().zip(bufs.chunks_mut(4096)).collect();
            for r in stack.read_many(&mut reqs) {
                r.unwrap();
            }
        }
        f.local_batch.push(ops as f64 / t0.elapsed().as_secs_f64());
        let rand_nbd = |c: &mut Client, qd: usize| {
            if cold {
                evict(&layers);
            }
            random_reads(c, &offsets, qd)
        };
        let q1 = rand_nbd(&mut c, 1);
        let (c0, t0) = (cpu_seconds(), thread_cpu_seconds());
        let q16 = rand_nbd(&mut c, 16);
        f.cpu_qd16.push((cpu_seconds() - c0) * 1e6 / ops as f64);
        f.cpu_qd16_client
            .push((thread_cpu_seconds() - t0) * 1e6 / ops as f64);
        f.nbd_qd1.push(q1);
        f.nbd_qd16.push(q16);
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.0}-{:.0}", lo, hi)
    };
    let mib = |x: f64| x / (1 << 20) as f64;
    let (ls, ns) = (median(&mut f.local_seq), median(&mut f.nbd_seq));
    println!(
        "sequential reads ≤1 MiB: in-process {:8.1} MiB/s | NBD (8 in flight) {:8.1} MiB/s | ratio {:.2}",
        mib(ls),
        mib(ns),
        ns / ls
    );
    let (lr, lb, q1, q16) = (
        median(&mut f.local_rand),
        median(&mut f.local_batch),
        median(&mut f.nbd_qd1),
        median(&mut f.nbd_qd16),
    );
    let base = lr.max(lb);
    println!(
        "random 4 KiB reads in-process: one at a time {lr:.0} IOPS | 16 at a time (read_many) {lb:.0} IOPS; the faster is the baseline"
    );
    println!(
        "random 4 KiB reads through NBD: 1 in flight {:.0} IOPS (ratio {:.2}) | 16 in flight {:.0} IOPS (ratio {:.2})",
        q1,
        q1 / base,
        q16,
        q16 / base
    );
    println!(
        "spread over {rounds} rounds (min-max IOPS): in-process {} / {} | NBD 1 in flight {} | NBD 16 in flight {}",
        spread(&f.local_rand),
        spread(&f.local_batch),
        spread(&f.nbd_qd1),
        spread(&f.nbd_qd16)
    );
    println!(
        "CPU per random read: in-process (one at a time) {:.2} µs | NBD 16 in flight {:.2} µs, of which the client {:.2} µs",
        median(&mut f.cpu_local),
        median(&mut f.cpu_qd16),
        median(&mut f.cpu_qd16_client)
    );
    c.disconnect().unwrap();
    stop.shutdown();
    t.join().unwrap();
    let ceiling = transport_ceiling(&cfg, &opts, ops, rounds);
    println!(
        "transport ceiling (the same server and client, a memory device): 16 in flight {ceiling:.0} IOPS = {:.2} of the in-process baseline",
        ceiling / base
    );
}
