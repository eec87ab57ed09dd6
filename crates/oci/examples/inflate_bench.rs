//! Inflate files with the layer decoder (`OBD_INFLATE=zlib-rs` to compare):
//! `cargo run --release -p overlaybd-oci --example inflate_bench -- FILE...`
use std::io::Read;
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let files: Vec<Vec<u8>> = std::env::args()
        .skip(1)
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        for f in &files {
            let (mut d, _) = obdoci::decompress::decoder(&f[..])?;
            loop {
                let k = d.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{}: {n} bytes in {s:.3} s, {:.0} MB/s",
            obdoci::decompress::gzip_inflater(),
            n as f64 / s / 1e6
        );
    }
    Ok(())
}
