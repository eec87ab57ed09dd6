//! `overlaybd-commit`: seal a writable layer into a layer blob.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use blockdev::commit::{commit_sealed, commit_warp, commit_writable, CommitOptions};
use blockdev::lsmt::WritableLayer;
use blockdev::zfile::{Algorithm, ZfileOptions};
use blockdev::Uuid;
use clap::Parser;
use obdtools::cli::{self, UsageExt};
use obdtools::signals::Signals;
use obdtools::usage_bail;

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
    /// With -z: wrap the output in a tar holding one entry, overlaybd.commit.
    /// Without -z it is ignored (with a warning), as upstream does.
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
    /// Upstream's upload of the commit to a registry blob URL while it is
    /// written: not supported (commit to a file, then push it, e.g. with the
    /// convertor). Accepted so that upstream's command lines get this answer.
    #[arg(long, value_name = "URL")]
    upload: Option<String>,
    /// With --upload (upstream): the upload block size in KB.
    #[arg(long = "upload_bs", value_name = "KB")]
    upload_bs: Option<String>,
    /// With --upload (upstream): the registry credentials file.
    #[arg(long = "cred_file_path", value_name = "FILEPATH")]
    cred_file_path: Option<PathBuf>,
    /// With --upload (upstream): the TLS key of a private registry.
    #[arg(long = "tls_key_path", value_name = "FILEPATH")]
    tls_key_path: Option<PathBuf>,
    /// With --upload (upstream): the TLS certificate of a private registry.
    #[arg(long = "tls_cert_path", value_name = "FILEPATH")]
    tls_cert_path: Option<PathBuf>,
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
    obdtools::cli::wait_for_layer_claims();
    let args = Args::parse();
    cli::init_logging(args.verbose);
    signals.run(|| run(args))
}

/// The longest `-m` message, in bytes (the header's user tag field).
const MAX_MESSAGE: usize = 256;

fn parse_uuid(v: &Option<String>, flag: &str) -> anyhow::Result<Option<Uuid>> {
    v.as_deref()
        .map(Uuid::parse)
        .transpose()
        .with_context(|| format!("bad {flag} value"))
        .usage()
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(url) = &args.upload {
        anyhow::bail!(
            "--upload {url}: uploading the commit to a registry is not supported; commit to a file and push that (the convertor uploads the layers it converts)"
        );
    }
    let upload_only: Vec<&str> = [
        (args.upload_bs.is_some(), "--upload_bs"),
        (args.cred_file_path.is_some(), "--cred_file_path"),
        (args.tls_key_path.is_some(), "--tls_key_path"),
        (args.tls_cert_path.is_some(), "--tls_cert_path"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if !upload_only.is_empty() {
        // As upstream: they only shape an upload.
        let verb = if upload_only.len() == 1 {
            "applies"
        } else {
            "apply"
        };
        tracing::warn!(
            "{} only {verb} with --upload; ignored",
            upload_only.join(", ")
        );
    }
    let turbo = args.turbo_oci || args.fastoci;
    if turbo && (args.seal || args.commit_sealed) {
        usage_bail!("--turboOCI cannot be combined with --seal or --commit_sealed");
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
            usage_bail!(
                "--seal seals DATA_FILE in place and writes no other file: it takes no {}",
                ignored.join(", ")
            );
        }
        let index = index
            .context("--seal needs DATA_FILE and INDEX_FILE")
            .usage()?;
        WritableLayer::open(&args.data_file, &index)
            .and_then(|l| l.seal())
            .with_context(|| format!("cannot seal {}", args.data_file.display()))?;
        cli::print_out(format_args!(
            "overlaybd-commit has sealed files SUCCESSFULLY"
        ));
        return Ok(());
    }
    let zfile = if args.zfile {
        let algorithm: Algorithm = args.algorithm.as_deref().unwrap_or("lz4").parse().usage()?;
        let kb = args.block_size.unwrap_or(4);
        let z = ZfileOptions {
            algorithm,
            block_size: kb
                .checked_mul(1024)
                .with_context(|| format!("invalid --bs {kb}: 4, 8, 16, 32 or 64 (KB)"))
                .usage()?,
            threads: cli::threads(args.threads),
            ..Default::default()
        };
        z.validate().context("invalid --bs").usage()?;
        Some(z)
    } else {
        if args.algorithm.is_some() || args.block_size.is_some() {
            cli::say(format_args!(
                "WARNING option '--bs' and '--algorithm' will be ignored without '-z'"
            ));
        }
        None
    };
    if let Some(m) = &args.message {
        if m.len() > MAX_MESSAGE {
            usage_bail!(
                "-m: the commit message is {} bytes; at most {MAX_MESSAGE} are allowed",
                m.len()
            );
        }
    }
    // Upstream wraps only ZFile output in a tar; a plain commit stays plain.
    if args.tar && zfile.is_none() {
        cli::say(format_args!(
            "WARNING option '-t' will be ignored without '-z': the output is a plain LSMT layer, as upstream's"
        ));
    }
    let opts = CommitOptions {
        tar: args.tar && zfile.is_some(),
        zfile,
        uuid: parse_uuid(&args.uuid, "--uuid")?,
        parent_uuid: parse_uuid(&args.parent_uuid, "--parent-uuid")?,
        user_tag: args.message.clone(),
        force: args.force,
        progress: Some(cli::progress_reporter("commit")),
    };
    let start = Instant::now();
    let (out, stats) = if args.commit_sealed {
        let out = index
            .context("--commit_sealed needs an output path")
            .usage()?;
        if let Some(extra) = &args.commit_file {
            usage_bail!(
                "--commit_sealed takes SEALED_FILE OUTPUT_FILE (the second path is the output); \
                 a third path was given: {}",
                extra.display()
            );
        }
        let s = commit_sealed(&args.data_file, &out, &opts)
            .with_context(|| format!("cannot commit {}", args.data_file.display()))?;
        (out, s)
    } else {
        let (Some(index), Some(out)) = (index, args.commit_file.clone()) else {
            usage_bail!("need DATA_FILE INDEX_FILE COMMIT_FILE (see --help)");
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
