//! Reads with structured replies: unmapped ranges come back as hole chunks
//! and are never read from the device; `DF` gets one chunk; simple replies
//! carry the zeros.

mod nbd_common;

use std::sync::{Arc, Mutex};

use blockdev::device::push_extent;
use blockdev::nbd::client::{Client, ClientOptions};
use blockdev::nbd::proto::*;
use blockdev::nbd::ServerConfig;
use blockdev::{BlockDevice, Extent, MemDevice};
use nbd_common::*;

/// The test device, reporting [`DATA_RANGES`] as its only data and
/// recording every read that reaches it.
struct Recording {
    inner: Arc<MemDevice>,
    reads: Mutex<Vec<(u64, u64)>>,
}

impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.reads.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.trim(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> blockdev::Result<Vec<Extent>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        for &(o, l) in DATA_RANGES {
            let (s, e) = (o.max(pos), (o + l).min(end));
            if s < e {
                push_extent(&mut out, pos, s - pos, true);
                push_extent(&mut out, s, e - s, false);
                pos = e;
            }
        }
        push_extent(&mut out, pos, end - pos, true);
        Ok(out)
    }
}

fn structured() -> ClientOptions {
    ClientOptions {
        structured: true,
        ..ClientOptions::default()
    }
}

#[test]
fn unmapped_ranges_are_hole_chunks_and_never_read() {
    let mem = test_device();
    let dev = Arc::new(Recording {
        inner: mem.clone(),
        reads: Mutex::new(Vec::new()),
    });
    let srv = start(dev.clone(), ServerConfig::default());
    let mut c = Client::connect(&srv.ep, &structured()).unwrap();
    assert!(c.structured);
    let want = |off: u64, len: u64| {
        let mut v = vec![0u8; len as usize];
        mem.read_at(&mut v, off).unwrap();
        v
    };
    let (d, h) = (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE);

    // data 0..4K, hole up to 1 MiB, data from 1 MiB
    let r = c.call(CMD_READ, 0, 0, 2 << 20, &[]).unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(
        r.chunks,
        vec![
            (d, 0, 4096),
            (h, 4096, (1 << 20) - 4096),
            (d, 1 << 20, 1 << 20)
        ]
    );
    assert!(r.data == want(0, 2 << 20));

    // all zero: one hole chunk, also with DF
    for flags in [0, CMD_FLAG_DF] {
        let r = c.call(CMD_READ, flags, 5 << 20, 1 << 20, &[]).unwrap();
        assert_eq!(r.chunks, vec![(h, 5 << 20, 1 << 20)], "flags {flags:#x}");
        assert!(r.data.iter().all(|&b| b == 0));
    }

    // DF on a mixed range: one data chunk holding the zeros too
    let r = c
        .call(CMD_READ, CMD_FLAG_DF, (9 << 20) - 4096, 72 << 10, &[])
        .unwrap();
    assert_eq!(r.chunks, vec![(d, (9 << 20) - 4096, 72 << 10)]);
    assert!(r.data == want((9 << 20) - 4096, 72 << 10));

    // Pipelined reads in one batch, each answered with its own chunks.
    let hs: Vec<u64> = [(0u64, 8192u32), (8 << 20, 4096), ((32 << 20) - 4096, 4096)]
        .iter()
        .map(|&(o, l)| c.send(CMD_READ, 0, o, l, &[]).unwrap())
        .collect();
    c.flush_requests().unwrap();
    for _ in &hs {
        let r = c.recv().unwrap();
        let k = hs.iter().position(|&x| x == r.handle).unwrap();
        let expect = match k {
            0 => vec![(d, 0, 4096), (h, 4096, 4096)],
            1 => vec![(h, 8 << 20, 4096)],
            _ => vec![(d, (32 << 20) - 4096, 4096)],
        };
        assert_eq!(r.chunks, expect, "request {k}");
    }
    c.disconnect().unwrap();

    // No read ever touched a range outside the data.
    for &(o, l) in dev.reads.lock().unwrap().iter() {
        assert!(
            DATA_RANGES.iter().any(|&(a, n)| o >= a && o + l <= a + n),
            "read {o}+{l} reached into a hole"
        );
    }

    // Simple replies carry the zeros.
    let mut c = Client::connect(&srv.ep, &ClientOptions::default()).unwrap();
    assert!(!c.structured);
    assert!(c.read(0, 2 << 20).unwrap() == want(0, 2 << 20));
    c.disconnect().unwrap();
}

/// One `Reply` reused across reads (`Client::recv_into`, as the benchmark
/// does): each reply holds exactly its own bytes, zeros of a hole never
/// keep an earlier read's data, and an error leaves no data behind.
#[test]
fn a_reused_reply_never_keeps_earlier_data() {
    let mem = test_device();
    let dev = Arc::new(Recording {
        inner: mem.clone(),
        reads: Mutex::new(Vec::new()),
    });
    let srv = start(dev, ServerConfig::default());
    let want = |off: u64, len: u32| {
        let mut v = vec![0u8; len as usize];
        mem.read_at(&mut v, off).unwrap();
        v
    };
    for opts in [structured(), ClientOptions::default()] {
        let mut c = Client::connect(&srv.ep, &opts).unwrap();
        let mut r = blockdev::nbd::client::Reply::default();
        // data, then a hole of the same size, then data and hole mixed,
        // then a read past the end, then data again
        let reads: [(u64, u32); 5] = [
            (1 << 20, 8192),
            (5 << 20, 8192),
            ((1 << 20) - 4096, 8192),
            (32 << 20, 4096),
            ((32 << 20) - 8192, 8192),
        ];
        for (i, &(off, len)) in reads.iter().enumerate() {
            let h = c.send(CMD_READ, 0, off, len, &[]).unwrap();
            c.flush_requests().unwrap();
            c.recv_into(&mut r).unwrap();
            assert_eq!(r.handle, h);
            if i == 3 {
                assert_ne!(r.error, 0, "read past the end must fail");
                assert!(r.data.is_empty(), "error reply kept data");
                continue;
            }
            assert_eq!(r.error, 0, "read {i}");
            assert!(r.data == want(off, len), "read {i} ({opts:?})");
            if opts.structured && i == 1 {
                assert_eq!(r.chunks, vec![(REPLY_TYPE_OFFSET_HOLE, off, len as u64)]);
            }
        }
        c.disconnect().unwrap();
    }
}
