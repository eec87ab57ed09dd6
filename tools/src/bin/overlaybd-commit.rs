//! `overlaybd-commit`: seal a writable layer into a layer blob.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use blockdev::commit::{commit_sealed, commit_warp, commit_writable, CommitOptions};
use blockdev::lsmt::WritableLayer;
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::Uuid;
use clap::Parser;
use obdtools::cli;
use obdtools::signals::Signals;

/// Commit a writable overlaybd layer: compact its data and index into one
/// sealed layer blob, optionally ZFile-compressed (-z) and tar-wrapped (-t)
/// as the convertor pushes it to a registry. The output equals upstream
/// overlaybd-commit's byte for byte.
#[derive(Parser, Debug)]
#[command(name = "overlaybd-commit", version)]
struct Args {
    /// Commit message stored in the header (at most 256 bytes).
    #[arg(short = 'm')]
    message: Option<String>,
    /// Uuid of the committed layer (8-4-4-4-12 hex); all zeros if absent.
    #[arg(long)]
    uuid: Option<String>,
    /// Parent uuid; defaults to the one recorded when the layer was created.
    #[arg(short = 'p', long = "parent-uuid")]
    parent_uuid: Option<String>,
    /// Compress the output to ZFile.
    #[arg(short = 'z')]
    zfile: bool,
    /// Wrap the output in a tar holding one entry, overlaybd.commit.
    #[arg(short = 't')]
    tar: bool,
    /// Replace the output file if it exists.
    #[arg(short = 'f')]
    force: bool,
    /// ZFile compression algorithm: lz4 or zstd (default lz4; needs -z).
    #[arg(long)]
    algorithm: Option<String>,
    /// ZFile block size in KB: 4, 8, 16, 32 or 64 (default 4; needs -z).
    #[arg(long = "bs")]
    block_size: Option<u32>,
    /// Commit a writable TurboOCI (warp) layer: file data stays mapped into
    /// the layer tar (tag-1 entries are kept), metadata is copied. Upstream
    /// stores no commit message and no parent uuid unless -p is given.
    #[arg(long = "turboOCI")]
    turbo_oci: bool,
    /// Deprecated alias of --turboOCI.
    #[arg(long)]
    fastoci: bool,
    /// Seal only: append the index and a trailer to DATA_FILE itself (no
    /// output file; no -z, -t, -m or uuids).
    #[arg(long)]
    seal: bool,
    /// DATA_FILE is an already sealed layer (plain, ZFile or tar-wrapped);
    /// the second path is the output.
    #[arg(long = "commit_sealed")]
    commit_sealed: bool,
    /// Threads compressing ZFile blocks with -z; 0 = every core. The output
    /// bytes do not depend on it. (`--compress_threads` is upstream's name.)
    #[arg(
        long = "threads",
        visible_alias = "compress_threads",
        default_value_t = 0
    )]
    threads: usize,
    /// Print debug logs.
    #[arg(long)]
    verbose: bool,
    /// Writable layer data file (or sealed layer with --commit_sealed).
    data_file: PathBuf,
    /// Writable layer index file (or the output with --commit_sealed).
    index_file: Option<PathBuf>,
    /// Output file (must not exist unless -f).
    commit_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // First: no thread may start with the signals unblocked.
    let signals = Signals::install("overlaybd-commit");
    let args = Args::parse();
    cli::init_logging(args.verbose);
    signals.run(|| run(args))
}

fn parse_uuid(v: &Option<String>, flag: &str) -> anyhow::Result<Option<Uuid>> {
    v.as_deref()
        .map(Uuid::parse)
        .transpose()
        .with_context(|| format!("bad {flag} value"))
}

fn run(args: Args) -> anyhow::Result<()> {
    let turbo = args.turbo_oci || args.fastoci;
    if turbo && (args.seal || args.commit_sealed || args.tar) {
        bail!("--turboOCI cannot be combined with --seal, --commit_sealed or -t");
    }
    let index = args.index_file.clone();
    if args.seal {
        // Sealing appends the index and a trailer to DATA_FILE: nothing else
        // is written, so options that shape an output would be ignored.
        let ignored: Vec<&str> = [
            (args.zfile, "-z"),
            (args.tar, "-t"),
            (args.algorithm.is_some(), "--algorithm"),
            (args.block_size.is_some(), "--bs"),
            (args.message.is_some(), "-m"),
            (args.uuid.is_some(), "--uuid"),
            (args.parent_uuid.is_some(), "--parent-uuid"),
            (args.commit_sealed, "--commit_sealed"),
            (args.commit_file.is_some(), "COMMIT_FILE"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if !ignored.is_empty() {
            bail!(
                "--seal seals DATA_FILE in place and writes no other file: it takes no {}",
                ignored.join(", ")
            );
        }
        let index = index.context("--seal needs DATA_FILE and INDEX_FILE")?;
        WritableLayer::open(&args.data_file, &index)
            .and_then(|l| l.seal())
            .with_context(|| format!("cannot seal {}", args.data_file.display()))?;
        cli::print_out(format_args!(
            "overlaybd-commit has sealed files SUCCESSFULLY"
        ));
        return Ok(());
    }
    let zfile = if args.zfile {
        let algorithm: Algorithm = args.algorithm.as_deref().unwrap_or("lz4").parse()?;
        let kb = args.block_size.unwrap_or(4);
        let z = ZfileOptions {
            algorithm,
            block_size: kb
                .checked_mul(1024)
                .with_context(|| format!("invalid --bs {kb}: 4, 8, 16, 32 or 64 (KB)"))?,
            threads: cli::threads(args.threads),
            ..Default::default()
        };
        z.validate().context("invalid --bs")?;
        Some(z)
    } else {
        if args.algorithm.is_some() || args.block_size.is_some() {
            cli::say(format_args!(
                "WARNING option '--bs' and '--algorithm' will be ignored without '-z'"
            ));
        }
        None
    };
    let opts = CommitOptions {
        zfile,
        tar: args.tar,
        uuid: parse_uuid(&args.uuid, "--uuid")?,
        parent_uuid: parse_uuid(&args.parent_uuid, "--parent-uuid")?,
        user_tag: args.message.clone(),
        force: args.force,
        progress: Some(cli::progress_reporter("commit")),
    };
    let start = Instant::now();
    let (out, stats) = if args.commit_sealed {
        let out = index.context("--commit_sealed needs an output path")?;
        let s = commit_sealed(&args.data_file, &out, &opts)
            .with_context(|| format!("cannot commit {}", args.data_file.display()))?;
        (out, s)
    } else {
        let (Some(index), Some(out)) = (index, args.commit_file.clone()) else {
            bail!("need DATA_FILE INDEX_FILE COMMIT_FILE (see --help)");
        };
        let commit = if turbo { commit_warp } else { commit_writable };
        let s = commit(&args.data_file, &index, &out, &opts).with_context(|| {
            format!(
                "cannot commit {} + {}",
                args.data_file.display(),
                index.display()
            )
        })?;
        (out, s)
    };
    cli::say(format_args!(
        "committed {} of data into {} ({}, {} in {:.2}s)",
        cli::human(stats.data_bytes),
        out.display(),
        cli::human(stats.output_size),
        cli::rate(stats.data_bytes, start),
        start.elapsed().as_secs_f64()
    ));
    cli::print_out(format_args!(
        "overlaybd-commit has committed files SUCCESSFULLY"
    ));
    Ok(())
}
