//! A short, deterministic fuzz run of every target, part of the normal test
//! suite: each saved regression input (`fuzz/regressions/<target>/`), each
//! seed (`fuzz/seeds/<target>/`), and a fixed number of mutations of the
//! seeds from a fixed random sequence. A panic names the target and writes
//! the input to `target/fuzz-failures/` for `cargo fuzz run <target> FILE`.
//! Long coverage-guided runs: `scripts/fuzz.sh`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// xorshift64*: the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    7,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1ff,
    0x200,
    0x1000,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 44,
    1 << 50,
    (1 << 63) - 8,
    i64::MAX as u64,
    u64::MAX,
];

/// One mutation of `input` (several stacked edits), splicing from `pool`.
fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len >= 8 => {
                // An interesting integer, 2/4/8 bytes, either endianness.
                let w = [2, 4, 8][rng.below(3)];
                let i = rng.below(len - w + 1);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let b = if rng.below(2) == 0 {
                    x.to_le_bytes()
                } else {
                    x.to_be_bytes()
                };
                let b = if rng.below(2) == 0 {
                    &b[..w]
                } else {
                    &b[8 - w..]
                };
                v[i..i + w].copy_from_slice(b);
            }
            3 if len > 0 => {
                // ASCII digits (tar numbers, PAX records, JSON).
                let i = rng.below(len);
                let s = INTERESTING[rng.below(INTERESTING.len())].to_string();
                let s = if rng.below(2) == 0 {
                    s
                } else {
                    format!("{:o}", s.len())
                };
                for (k, c) in s.bytes().enumerate() {
                    if i + k < len {
                        v[i + k] = c;
                    }
                }
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = a + rng.below((len - a).min(4096)) + 1;
                v.drain(a..b.min(len));
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let n = rng.below((len - a).min(1024)) + 1;
                let chunk = v[a..(a + n).min(len)].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            6 => v.truncate(rng.below(len + 1)),
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let n = rng.below((other.len() - a).min(2048)) + 1;
                    let at = rng.below(len + 1);
                    let end = (at + n).min(len);
                    v.splice(at..end, other[a..(a + n).min(other.len())].iter().copied());
                }
            }
            _ => {
                let at = rng.below(len + 1);
                let n = rng.below(16) + 1;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
        }
    }
    v
}

fn run_one(name: &str, what: &str, f: obdfuzz::Target, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}-{}.bin", what.replace('/', "_")));
        std::fs::write(&file, input).unwrap();
        panic!(
            "fuzz target {name} panicked on {what}; input saved to {} (reproduce: cd fuzz && cargo +nightly fuzz run {name} {})",
            file.display(),
            file.display()
        );
    }
}

/// Seeds of a target (tar_apply shares tar_reader's).
fn seeds_of(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = if name == "tar_apply" {
        "tar_reader"
    } else {
        name
    };
    files(&root().join("seeds").join(dir))
}

fn run_target(name: &str, mutations: usize) {
    let f = obdfuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap();
    for (file, input) in files(&root().join("regressions").join(name)) {
        run_one(name, &format!("regression {file}"), f, &input);
    }
    let seeds = seeds_of(name);
    assert!(!seeds.is_empty(), "no seeds for {name} in fuzz/seeds");
    let pool: Vec<Vec<u8>> = seeds.iter().map(|s| s.1.clone()).collect();
    for (file, input) in &seeds {
        run_one(name, &format!("seed {file}"), f, input);
    }
    // A fixed sequence per target (FNV-1a of its name).
    let mut rng = Rng(name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }));
    for i in 0..mutations {
        let (file, base) = &seeds[i % seeds.len()];
        let m = mutate(&mut rng, base, &pool);
        run_one(name, &format!("mutation {i} of {file}"), f, &m);
    }
}

#[test]
fn nbd_request() {
    run_target("nbd_request", 3000);
}

#[test]
fn tar_reader() {
    run_target("tar_reader", 3000);
}

#[test]
fn tar_apply() {
    run_target("tar_apply", 600);
}

#[test]
fn zfile() {
    run_target("zfile", 2000);
}

#[test]
fn lsmt_sealed() {
    run_target("lsmt_sealed", 2000);
}

#[test]
fn lsmt_writable() {
    run_target("lsmt_writable", 1000);
}

#[test]
fn tar_wrapper() {
    run_target("tar_wrapper", 2000);
}

#[test]
fn config_json() {
    run_target("config_json", 3000);
}

/// Every target has a test above and seeds.
#[test]
fn every_target_is_covered() {
    let src = include_str!("deterministic.rs");
    for (name, _) in obdfuzz::TARGETS {
        assert!(
            src.contains(&format!("run_target(\"{name}\"")),
            "{name} has no deterministic run"
        );
        assert!(!seeds_of(name).is_empty(), "{name} has no seeds");
    }
}
