//! `WritableLayer::freeze`, for a process that exits without closing its
//! layer while other threads write to it: every write that succeeded is in
//! the files (a copy taken at once, as the process would leave them, opens
//! with all of it), and every later write fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};

const BLOCK: usize = 4096;
/// Blocks each writer thread cycles over (its own range).
const BLOCKS: u64 = 64;
const THREADS: u64 = 4;

/// What the writer threads have done, under one lock so that a snapshot
/// sees each write either under way or finished.
#[derive(Clone, Default)]
struct Writes {
    /// The last write of each block that succeeded: offset → (thread, n).
    done: std::collections::BTreeMap<u64, (u64, u64)>,
    /// The write each thread has started and not seen return: (offset, n).
    in_flight: [Option<(u64, u64)>; THREADS as usize],
}

fn pattern(thread: u64, n: u64) -> Vec<u8> {
    let seed = (thread << 32 | n).to_le_bytes();
    (0..BLOCK).map(|i| seed[i % 8] ^ (i / 8) as u8).collect()
}

#[test]
fn writes_that_succeeded_before_freeze_are_saved_and_later_ones_fail() {
    let t = tempfile::tempdir().unwrap();
    for sparse in [false, true] {
        let (d, i) = (
            t.path().join(format!("d{sparse}")),
            t.path().join(format!("i{sparse}")),
        );
        create_writable(
            &d,
            &i,
            &CreateOptions {
                virtual_size: 16 << 20,
                sparse,
                ..Default::default()
            },
        )
        .unwrap();
        let layer = Arc::new(WritableLayer::open(&d, &i).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Writes::default()));
        let writers: Vec<_> = (0..THREADS)
            .map(|th| {
                let (layer, stop, writes) = (layer.clone(), stop.clone(), writes.clone());
                std::thread::spawn(move || {
                    let mut failed = 0u64;
                    for n in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let off = (th * BLOCKS + n % BLOCKS) * BLOCK as u64;
                        writes.lock().unwrap().in_flight[th as usize] = Some((off, n));
                        let result = layer.write(&pattern(th, n), off);
                        let mut w = writes.lock().unwrap();
                        w.in_flight[th as usize] = None;
                        match result {
                            Ok(()) => {
                                assert_eq!(failed, 0, "a write succeeded after one was refused");
                                w.done.insert(off, (th, n));
                            }
                            Err(blockdev::Error::ReadOnly) => failed += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        // Let them write a while (the index batch is far from full).
        while writes.lock().unwrap().done.len() < 100 {
            std::thread::yield_now();
        }
        layer.freeze().unwrap();
        let at_freeze = writes.lock().unwrap().clone();
        // Every write from now on fails.
        assert!(matches!(
            layer.write(&[1u8; BLOCK], 0),
            Err(blockdev::Error::ReadOnly)
        ));
        assert!(matches!(
            layer.discard(0, BLOCK as u64),
            Err(blockdev::Error::ReadOnly)
        ));
        // The files as an exit right now leaves them (no drop, no flush).
        let (cd, ci) = (
            t.path().join(format!("cd{sparse}")),
            t.path().join(format!("ci{sparse}")),
        );
        std::fs::copy(&d, &cd).unwrap();
        std::fs::copy(&i, &ci).unwrap();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        // Nothing that started after the freeze succeeded. A write under
        // way as it returned may have returned since: if it succeeded, it
        // was accepted before the freeze, so the copy must hold it too.
        let saved = writes.lock().unwrap().done.clone();
        for (off, last) in &saved {
            if at_freeze.done.get(off) != Some(last) {
                assert_eq!(
                    at_freeze.in_flight[last.0 as usize],
                    Some((*off, last.1)),
                    "sparse {sparse}: thread {} #{} at {off} succeeded after the freeze",
                    last.0,
                    last.1
                );
            }
        }

        let copy = WritableLayer::open_read_only(&cd, &ci).unwrap();
        let mut back = vec![0u8; BLOCK];
        for (off, (th, n)) in &saved {
            copy.read_logical(&mut back, *off).unwrap();
            // A sparse layer writes in place: a write that was under way
            // and then refused may have left its data, as a failed write
            // may (an appending layer writes elsewhere, so never).
            let refused_later = || sparse && back == pattern(*th, n + BLOCKS);
            assert!(
                back == pattern(*th, *n) || refused_later(),
                "sparse {sparse}: the write of thread {th} #{n} at {off} is not saved"
            );
        }
    }
}
