//! `overlaybd-zfile`: compress a file to ZFile, or extract one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blockdev::commit::{zfile_compress_file, zfile_decompress_file};
use blockdev::layer::open_zfile;
use blockdev::zfile::{verify_blocks, Algorithm, ZfileOptions};
use clap::Parser;
use obdtools::cli::{self, UsageExt};
use obdtools::signals::Signals;

/// Create or extract a ZFile (random-access compressed file).
///
/// `overlaybd-zfile SRC DST` compresses SRC into DST; with only one path the
/// data is read from standard input and written to that path.
/// `overlaybd-zfile -x SRC DST` decompresses. Unlike overlaybd-commit -z, the
/// header is not rewritten at the end (flags 0x13), as upstream's tool does.
#[derive(Parser, Debug)]
#[command(name = "overlaybd-zfile", version)]
struct Args {
    /// Wrap the compressed output in a tar (-x and --verify recognise a
    /// tar-wrapped ZFile without -t).
    #[arg(short = 't')]
    tar: bool,
    /// Extract (decompress) SOURCE_FILE into TARGET_FILE.
    #[arg(short = 'x')]
    extract: bool,
    /// Check every block checksum of SOURCE_FILE and exit.
    #[arg(long, conflicts_with_all = ["target_file", "extract", "force"])]
    verify: bool,
    /// Replace the target if it exists.
    #[arg(short = 'f')]
    force: bool,
    /// Compression algorithm: lz4 or zstd [default: lz4].
    #[arg(long)]
    algorithm: Option<String>,
    /// Block size in KB: 4, 8, 16, 32 or 64 [default: 4].
    #[arg(long = "bs")]
    block_size: Option<u32>,
    /// Compression threads; 0 = every core [default: 0]. The output bytes do not
    /// depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Print debug logs.
    #[arg(long)]
    verbose: bool,
    /// Source file.
    source_file: PathBuf,
    /// Target file.
    target_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // First: no thread may start with the signals unblocked.
    let signals = Signals::install("overlaybd-zfile");
    let args = Args::parse();
    cli::init_logging(args.verbose);
    signals.run(|| run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.verify || args.extract {
        let given: Vec<&str> = [
            ("--algorithm", args.algorithm.is_some()),
            ("--bs", args.block_size.is_some()),
            ("--threads", args.threads.is_some()),
        ]
        .iter()
        .filter(|(_, g)| *g)
        .map(|(f, _)| *f)
        .collect();
        if !given.is_empty() {
            tracing::warn!(
                "{} {} only to compression; ignored with {}",
                given.join(", "),
                if given.len() == 1 { "applies" } else { "apply" },
                if args.verify { "--verify" } else { "-x" }
            );
        }
    }
    if args.verify {
        let r = open_zfile(&args.source_file)?;
        verify_blocks(&r)
            .with_context(|| format!("{} is not a valid zfile blob", args.source_file.display()))?;
        cli::print_out(format_args!(
            "{} is a valid zfile blob.",
            args.source_file.display()
        ));
        return Ok(());
    }
    if args.extract {
        let dst = args
            .target_file
            .as_ref()
            .context("decompression needs SOURCE_FILE and TARGET_FILE (stdin is not supported)")
            .usage()?;
        let n = zfile_decompress_file(&args.source_file, dst, args.force)?;
        cli::print_out(format_args!(
            "decompressed {} into {} ({})",
            args.source_file.display(),
            dst.display(),
            cli::human(n)
        ));
        return Ok(());
    }
    let algorithm: Algorithm = args.algorithm.as_deref().unwrap_or("lz4").parse().usage()?;
    let kb = args.block_size.unwrap_or(4);
    let opts = ZfileOptions {
        algorithm,
        block_size: kb
            .checked_mul(1024)
            .with_context(|| format!("invalid --bs {kb}: 4, 8, 16, 32 or 64 (KB)"))
            .usage()?,
        overwrite_header: false,
        threads: cli::threads(args.threads.unwrap_or(0)),
        ..Default::default()
    };
    opts.validate().context("invalid --bs").usage()?;
    let (src, dst) = match &args.target_file {
        Some(t) => (Some(args.source_file.as_path()), t.clone()),
        None => (None, args.source_file.clone()),
    };
    if src.is_none() {
        // An output that will be refused is said before standard input is
        // waited for.
        blockdev::commit::check_output(&dst, args.force, &[])?;
        check_stdin(&dst)?;
    }
    let n = zfile_compress_file(src, &dst, opts, args.tar, args.force)?;
    cli::print_out(format_args!(
        "compressed {} into {} ({})",
        src.map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdin".into()),
        dst.display(),
        cli::human(n)
    ));
    Ok(())
}

/// The one-path form compresses standard input into `dst`. Given for
/// `overlaybd-zfile SRC` (the target forgotten), it must neither wait on a
/// terminal nor, with -f, replace `dst` with an empty stream's ZFile
/// (`< /dev/null`, a failed download piped in). Peeking keeps the bytes in
/// the process's shared stdin buffer, where the compression reads them.
fn check_stdin(dst: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    const FORM: &str = "to compress a file: overlaybd-zfile SOURCE_FILE TARGET_FILE";
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        obdtools::usage_bail!(
            "standard input is a terminal: with one path, overlaybd-zfile compresses standard input into it; {FORM}"
        );
    }
    let empty = loop {
        match stdin.lock().fill_buf() {
            Ok(b) => break b.is_empty(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("cannot read standard input"),
        }
    };
    if empty {
        anyhow::bail!(
            "standard input is empty (0 bytes): nothing to compress into {}, which is left as it was (with one path, overlaybd-zfile compresses standard input; {FORM})",
            dst.display()
        );
    }
    Ok(())
}
