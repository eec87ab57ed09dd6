//! `overlaybd-apply`: apply an OCI layer tar to the ext4 filesystem of an
//! overlaybd image (lowers + writable upper described by a config.json).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use blockdev::{BlockDevice, ImageConfig};
use clap::Parser;
use obdoci::decompress;
use obdoci::Sha256Writer;
use obdtools::cli::{self, UsageExt};
use obdtools::engine::EngineArgs;
use obdtools::signals::{Signals, PARTIAL_LAYER};

/// Apply an OCI layer tar (plain, gzip or zstd; `-` reads stdin) to the
/// ext4 filesystem of an overlaybd image.
///
/// The image is described by an overlaybd config.json: `lowers[].file` (the
/// layers below, bottom first), `upper.data` / `upper.index` (the writable
/// layer that receives every change) and `resultFile` (where "success" or
/// "failed:" and the error is written). Unknown keys are ignored. By default the
/// filesystem is changed in userspace through libext2fs: nothing is mounted
/// and no root rights are needed. `--engine kernel` instead exposes the
/// image through FUSE, runs `mkfs.ext4` (with --mkfs), loop-mounts it and
/// unpacks the tar into the kernel's ext4, as upstream's embedded convertor
/// does; everything is unmounted again, also on errors and Ctrl-C.
#[derive(Parser, Debug)]
#[command(name = "overlaybd-apply", version)]
struct Args {
    /// Treat IMAGE_CONFIG as a raw ext4 image file to modify in place.
    #[arg(long)]
    raw: bool,
    /// Make a new ext4 filesystem on the image before applying.
    #[arg(long)]
    mkfs: bool,
    /// Convert a qcow2 image instead of a tar (not supported).
    #[arg(long = "from_qcow2")]
    from_qcow2: bool,
    /// qcow2 only: extract only rootfs partitions (accepted, unused).
    #[arg(long = "extract-rootfs", overrides_with = "no_extract_rootfs")]
    extract_rootfs: bool,
    /// qcow2 only: convert the entire disk (accepted, unused).
    #[arg(long = "no-extract-rootfs")]
    no_extract_rootfs: bool,
    /// Print debug logs.
    #[arg(long)]
    verbose: bool,
    /// overlaybd service config (accepted for compatibility; not needed).
    #[arg(long = "service_config_path", value_name = "FILEPATH")]
    service_config_path: Option<PathBuf>,
    /// Build a gzip index for TurboOCI (not supported).
    #[arg(long = "gz_index_path", value_name = "FILEPATH")]
    gz_index_path: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Expected sha256 (hex) of the uncompressed tar, verified before the layer
    /// is changed (the input is read twice; stdin is kept in a temporary file
    /// beside the upper layer); a mismatch is an error.
    #[arg(long)]
    checksum: Option<String>,
    /// The layer tar (plain, gzip or zstd), or `-` for standard input.
    input_path: PathBuf,
    /// The overlaybd image config.json (with --raw: a raw image file).
    image_config_path: PathBuf,
}

fn main() -> ExitCode {
    // Before anything: this process may be the kernel engine's watchdog.
    obdtools::engine::init_watchdog();
    // Then: no thread may start with the signals unblocked.
    let signals = Signals::install("overlaybd-apply");
    obdtools::cli::wait_for_layer_claims();
    let args = Args::parse();
    cli::init_logging(args.verbose);
    if args.raw {
        signals.on_signal(None, "the image is changed only in part");
        return signals.run(|| run(&args, None, &signals));
    }
    let cfg = match ImageConfig::load(&args.image_config_path) {
        Ok(c) => c,
        Err(e) => {
            // Arguments the wrong way round are a usage error (exit 2).
            if cli::report_config_load("overlaybd-apply", &args.image_config_path, &e) {
                return ExitCode::from(2);
            }
            return signals.failure();
        }
    };
    // Where the outcome goes must work before the layer is applied.
    if let Err(e) = cfg.check_result_file(&[&args.input_path, &args.image_config_path]) {
        cli::say(format_args!(
            "overlaybd-apply: error: {}: {}",
            args.image_config_path.display(),
            blockdev::error::Chain(&e)
        ));
        return signals.failure();
    }
    signals.on_signal(Some(&cfg), PARTIAL_LAYER);
    let result = run(&args, Some(&cfg), &signals);
    let msg = match &result {
        Ok(()) => "success".to_string(),
        Err(e) => format!("failed:{}", cli::error_line(e)),
    };
    if let Err(e) = signals.write_result(&cfg, &msg) {
        // The apply's own failure (e.g. a full disk) comes first.
        if let Err(a) = &result {
            cli::report("overlaybd-apply", a);
        }
        cli::say(format_args!(
            "overlaybd-apply: error: cannot write the result file: {}",
            blockdev::error::Chain(&e)
        ));
        return signals.failure();
    }
    signals.run(|| result)
}

fn run(args: &Args, cfg: Option<&ImageConfig>, signals: &Signals) -> anyhow::Result<()> {
    if args.from_qcow2 {
        bail!("--from_qcow2 is not supported");
    }
    if args.gz_index_path.is_some() {
        bail!("--gz_index_path (TurboOCI) is not supported yet");
    }
    if let Some(p) = &args.service_config_path {
        tracing::debug!("ignoring service config {}", p.display());
    }
    let expected = args
        .checksum
        .as_deref()
        .map(|c| {
            let c = c.strip_prefix("sha256:").unwrap_or(c).to_ascii_lowercase();
            if c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--checksum must be 64 hex digits (sha256), got '{c}'");
            }
            Ok(c)
        })
        .transpose()
        .usage()?;

    // The kernel engine unmounts before it stops: the first signal cancels it.
    let cancel = Arc::new(AtomicBool::new(false));
    let engine = args
        .engine
        .build_with("overlaybd-apply", cancel.clone(), None)?;
    if engine.name() == obdkernel::NAME {
        signals.cancel_first(cancel);
    }
    let dev: Arc<dyn BlockDevice> = match cfg {
        None => Arc::new(
            blockdev::RawFileDevice::open_rw(&args.image_config_path).with_context(|| {
                format!("cannot open raw image {}", args.image_config_path.display())
            })?,
        ),
        Some(cfg) => {
            if cfg.upper.is_none() {
                bail!(
                    "{}: the image has no writable upper layer (\"upper\": {{\"data\", \"index\"}})",
                    args.image_config_path.display()
                );
            }
            if args.mkfs && !cfg.lowers.is_empty() {
                // Upstream makes the filesystem all the same; say what it means.
                cli::say(format_args!(
                    "overlaybd-apply: warning: --mkfs with {} lower layer(s) in {}: the new, empty filesystem hides all of their files",
                    cfg.lowers.len(),
                    args.image_config_path.display()
                ));
            }
            blockdev::stack::open_shared(cfg).with_context(|| {
                format!(
                    "cannot open the image of {}",
                    args.image_config_path.display()
                )
            })?
        }
    };

    // A layer cannot be un-applied: with --checksum the whole input is read
    // and verified first (standard input kept in a temporary file beside the
    // layer), so an input that does not match never reaches the layer.
    let spooled = match &expected {
        Some(want) => {
            let spool_dir = match cfg.and_then(|c| c.upper.as_ref()) {
                Some(u) => parent_dir(&u.data),
                None => parent_dir(&args.image_config_path),
            };
            verify_checksum(&args.input_path, spool_dir, want)?
        }
        None => None,
    };
    let input = open_input(&args.input_path, spooled)?;
    let mut hashing = HashingReader {
        inner: input,
        hasher: expected.as_ref().map(|_| Sha256Writer::new()),
    };
    let start = Instant::now();
    let mut last = Instant::now();
    let mut progress = |s: &obdfs::ApplyStats| {
        if last.elapsed().as_secs() >= 2 {
            last = Instant::now();
            cli::say(format_args!(
                "overlaybd-apply: {} entries, {} of tar, {:.0} MB/s",
                s.entries,
                cli::human(s.tar_bytes),
                s.mb_per_sec()
            ));
        }
    };
    let job = obdfs::Job {
        mkfs: args.mkfs,
        tar: &mut hashing,
        progress: Some(&mut progress),
    };
    let stats = engine.apply(dev, job).with_context(|| {
        format!(
            "cannot apply {} ({} engine)",
            args.input_path.display(),
            engine.name()
        )
    })?;
    if let (Some(want), Some(h)) = (expected, hashing.hasher.take()) {
        let (got, _) = h.finish();
        let got = got.hex();
        if got != want {
            // It matched when verified before the apply.
            bail!(
                "{} changed while it was applied: sha256 checksum mismatch: expected {want}, got {got}; the layer holds part of it: discard it",
                input_name(&args.input_path)
            );
        }
    }
    cli::say(format_args!(
        "overlaybd-apply: applied {} entries ({} files, {} of data) in {:.2}s: {}, {:.0} files/s",
        stats.entries,
        stats.files,
        cli::human(stats.data_bytes),
        start.elapsed().as_secs_f64(),
        cli::rate(stats.tar_bytes, start),
        stats.files as f64 / start.elapsed().as_secs_f64().max(1e-6)
    ));
    cli::print_out(format_args!("overlaybd-apply done"));
    Ok(())
}

/// How messages name the input.
fn input_name(path: &Path) -> String {
    if path == Path::new("-") {
        "standard input".to_string()
    } else {
        path.display().to_string()
    }
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn empty_input(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: empty input: not a tar archive (0 bytes; an empty layer is a tar of two zero blocks)",
        input_name(path)
    )
}

/// Read the whole (decompressed) input and compare its sha256 with `want`.
/// Standard input is kept, as it came, in an unnamed temporary file in
/// `spool_dir`, returned rewound for the apply; a file is read again.
fn verify_checksum(
    path: &Path,
    spool_dir: &Path,
    want: &str,
) -> anyhow::Result<Option<std::fs::File>> {
    let mut spool = None;
    let mut tee = if path == Path::new("-") {
        let f = tempfile::tempfile_in(spool_dir).with_context(|| {
            format!(
                "cannot make a temporary file in {} to keep standard input while its checksum is verified",
                spool_dir.display()
            )
        })?;
        Tee {
            inner: Box::new(std::io::stdin().lock()) as Box<dyn Read>,
            copy: Some(spool.insert(f)),
        }
    } else {
        Tee {
            inner: Box::new(
                std::fs::File::open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
            copy: None,
        }
    };
    let cannot_read = || format!("cannot read {}", input_name(path));
    let (got, len) = {
        let (r, _) = decompress::decoder(&mut tee).with_context(cannot_read)?;
        obdoci::digest::hash_reader(r).with_context(cannot_read)?
    };
    // Whatever follows the compressed stream is kept too.
    std::io::copy(&mut tee, &mut std::io::sink()).with_context(cannot_read)?;
    if len == 0 {
        return Err(empty_input(path));
    }
    let got = got.hex();
    if got != want {
        bail!(
            "{}: sha256 checksum mismatch: expected {want}, got {got}; the layer was not changed",
            input_name(path)
        );
    }
    spool
        .map(|mut f| {
            f.seek(SeekFrom::Start(0))
                .context("cannot rewind the temporary copy of standard input")?;
            Ok(f)
        })
        .transpose()
}

/// Reads `inner`, writing what it read to `copy`.
struct Tee<'a> {
    inner: Box<dyn Read>,
    copy: Option<&'a mut std::fs::File>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = self.copy.as_mut() {
            c.write_all(&buf[..n]).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot keep standard input in a temporary file: {e}"),
                )
            })?;
        }
        Ok(n)
    }
}

/// Open the layer (file or stdin, or `spooled`: stdin kept by
/// [`verify_checksum`]) and undo its compression (gzip or zstd, found by
/// magic bytes; bzip2 and xz are refused), as the convertor does. An input of
/// no bytes at all is refused before the layer is touched: it is a failed
/// download (`curl -f URL | overlaybd-apply - cfg`) far more often than a layer,
/// and an empty layer is a tar of two zero blocks, as GNU tar insists.
fn open_input(path: &Path, spooled: Option<std::fs::File>) -> anyhow::Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(1 << 20, open_decoded(path, spooled)?);
    let first = loop {
        match r.fill_buf() {
            Ok(b) => break b.len(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", input_name(path))),
        }
    };
    if first == 0 {
        return Err(empty_input(path));
    }
    Ok(Box::new(r))
}

fn open_decoded(path: &Path, spooled: Option<std::fs::File>) -> anyhow::Result<Box<dyn Read>> {
    let raw: Box<dyn Read> = if let Some(f) = spooled {
        Box::new(f)
    } else if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )
    };
    let (r, kind) =
        decompress::decoder(raw).with_context(|| format!("cannot read {}", path.display()))?;
    tracing::debug!("{}: {kind}", path.display());
    Ok(r)
}

/// Hashes what passes through when a checksum was asked for.
struct HashingReader<R> {
    inner: R,
    hasher: Option<Sha256Writer>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}
