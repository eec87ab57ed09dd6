//! Helper of `scripts/bench-fuse.sh`: reads a layer stack in-process or a
//! file that exposes the same disk (`overlaybd-fuse`'s `MOUNTPOINT/disk`,
//! nbdfuse's file) with one access pattern, and prints the throughput.
//!
//!   fuse_bench flatten OUT LAYER...
//!   fuse_bench read seq|rand [--file F] [--len BYTES] [--count N] [--threads T] LAYER...
//!
//! Sequential reads cover the first `--len` bytes of the disk in 1 MiB
//! requests; random reads are `--count` 4 KiB reads at aligned offsets that
//! hold data (taken from the stack's allocation map, same seed every run),
//! split over `--threads`. File reads use O_DIRECT where the file allows
//! it, so the page cache does not serve them.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blockdev::stack::Stack;
use blockdev::BlockDevice;

fn open_stack(layers: &[PathBuf]) -> Result<Stack> {
    Stack::open_read_only(layers, None).context("cannot open the layer stack")
}

/// A positional reader: the stack or a file.
enum Target {
    Stack(Arc<Stack>),
    File(File),
}

impl Target {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Target::Stack(s) => s.read_at(buf, off).context("stack read"),
            Target::File(f) => f.read_exact_at(buf, off).context("file read"),
        }
    }
}

fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let a = buf.as_ptr().align_offset(4096);
    &mut buf[a..a + len]
}

fn open_target(file: &Option<PathBuf>, stack: &Arc<Stack>) -> Result<Target> {
    Ok(match file {
        None => Target::Stack(stack.clone()),
        Some(p) => {
            let f = File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
                .or_else(|_| File::open(p))
                .with_context(|| format!("cannot open {}", p.display()))?;
            Target::File(f)
        }
    })
}

/// xorshift64*: a fixed pseudo-random sequence.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("flatten") if args.len() >= 3 => {
            let layers: Vec<PathBuf> = args[2..].iter().map(PathBuf::from).collect();
            let n = open_stack(&layers)?.write_raw_image(&PathBuf::from(&args[1]))?;
            println!("flattened {n} bytes of data");
            Ok(())
        }
        Some("read") if args.len() >= 3 => read(&args[1], &args[2..]),
        _ => bail!("usage: fuse_bench flatten OUT LAYER... | read seq|rand [--file F] [--len B] [--count N] [--threads T] LAYER..."),
    }
}

fn read(pattern: &str, rest: &[String]) -> Result<()> {
    let (mut file, mut len, mut count, mut threads) = (None, 1u64 << 30, 20_000u64, 1usize);
    let mut passes = 2u32;
    let mut layers = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--file" => file = Some(PathBuf::from(val()?)),
            "--len" => len = val()?.parse()?,
            "--count" => count = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--passes" => passes = val()?.parse()?,
            _ => layers.push(PathBuf::from(a)),
        }
    }
    let stack = Arc::new(open_stack(&layers)?);
    let mut last = (0, 0.0);
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        let bytes = one_pass(pattern, &file, &stack, len, count, threads)?;
        last = (bytes, start.elapsed().as_secs_f64());
    }
    let (bytes, s) = last;
    println!(
        "{:.1} MB/s {:.0} IOPS {:.3} s",
        bytes as f64 / s / 1e6,
        if pattern == "rand" {
            count as f64 / s
        } else {
            0.0
        },
        s
    );
    Ok(())
}

fn one_pass(
    pattern: &str,
    file: &Option<PathBuf>,
    stack: &Arc<Stack>,
    len: u64,
    count: u64,
    threads: usize,
) -> Result<u64> {
    Ok(match pattern {
        "seq" => {
            let t = open_target(file, stack)?;
            let len = len.min(stack.size());
            let mut raw = vec![0u8; (1 << 20) + 4096];
            let buf = aligned(&mut raw, 1 << 20);
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                t.read(&mut buf[..n], off)?;
                off += n as u64;
            }
            len
        }
        "rand" => {
            // Data-holding 4 KiB blocks, from the allocation map.
            let mut blocks: Vec<(u64, u64)> = Vec::new();
            let mut off = 0;
            while off < stack.size() {
                let l = (1u64 << 34).min(stack.size() - off);
                for (o, n, data) in stack.allocation(off, l) {
                    let (a, b) = (o.div_ceil(4096), (o + n) / 4096);
                    if data && b > a {
                        blocks.push((a, b - a));
                    }
                }
                off += l;
            }
            let total: u64 = blocks.iter().map(|b| b.1).sum();
            if total == 0 {
                bail!("the stack holds no data");
            }
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let offsets: Vec<u64> = (0..count)
                .map(|_| {
                    let mut k = next(&mut seed) % total;
                    for &(a, n) in &blocks {
                        if k < n {
                            return (a + k) * 4096;
                        }
                        k -= n;
                    }
                    unreachable!("k < total")
                })
                .collect();
            let chunks: Vec<Vec<u64>> = offsets
                .chunks(offsets.len().div_ceil(threads.max(1)))
                .map(<[u64]>::to_vec)
                .collect();
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = chunks
                    .into_iter()
                    .map(|c| {
                        let t = open_target(file, stack);
                        s.spawn(move || -> Result<()> {
                            let t = t?;
                            let mut raw = vec![0u8; 8192];
                            let buf = aligned(&mut raw, 4096);
                            for o in c {
                                t.read(buf, o)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().expect("reader thread")?;
                }
                Ok(())
            })?;
            count * 4096
        }
        p => bail!("unknown pattern {p}"),
    })
}
