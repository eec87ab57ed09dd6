//! `overlaybd-create`: create a writable overlaybd layer (data + index files).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use blockdev::lsmt::{create_writable, CreateOptions};
use blockdev::Uuid;
use clap::Parser;
use obdtools::cli::{self, UsageExt};
use obdtools::engine::{EngineArgs, EngineKind};
use obdtools::signals::Signals;
use obdtools::usage_bail;

/// Create a writable overlaybd layer: a data file and an index file.
///
/// The layer is stacked on lower layers later (overlaybd-apply's
/// config.json) and sealed with overlaybd-commit.
#[derive(Parser, Debug)]
#[command(name = "overlaybd-create", version)]
struct Args {
    /// Parent layer uuid recorded in the header (8-4-4-4-12 hex).
    #[arg(short = 'u', value_name = "PARENT_UUID")]
    parent_uuid: Option<String>,
    /// Create a sparse writable layer: data lives at its logical offset in a
    /// sparse data file and the index file stays empty.
    #[arg(short = 's')]
    sparse: bool,
    /// Create a writable TurboOCI (warp) layer: INDEX_FILE gets an LSMT
    /// index header, DATA_FILE is a headerless sparse file of VSIZE holding
    /// filesystem metadata at its own offsets; file data is later mapped into
    /// the layer tar by turboOCI-apply. -s and -u are ignored, as upstream.
    #[arg(long = "turboOCI")]
    turbo_oci: bool,
    /// Deprecated alias of --turboOCI.
    #[arg(long)]
    fastoci: bool,
    /// Create a raw image instead: the data file becomes a plain (sparse) file of VSIZE GiB;
    /// the index file is created empty.
    #[arg(long)]
    raw: bool,
    /// Make an ext4 filesystem in the new layer (for the bottom layer of an
    /// image): upstream's deterministic libext2fs mkfs, or `mkfs.ext4`
    /// with `--engine kernel` (and `--mkfs-options`).
    #[arg(long)]
    mkfs: bool,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print debug logs.
    #[arg(long)]
    verbose: bool,
    /// Data file to create (must not exist).
    data_file: PathBuf,
    /// Index file to create (must not exist).
    index_file: PathBuf,
    /// Virtual size in GB (GiB); 0 means "take it from the lower layers".
    vsize: u64,
}

fn main() -> ExitCode {
    // Before anything: this process may be the kernel engine's watchdog.
    obdtools::engine::init_watchdog();
    // Then: no thread may start with the signals unblocked.
    let signals = Signals::install("overlaybd-create");
    let args = Args::parse();
    cli::init_logging(args.verbose);
    signals.run(|| run(args, &signals))
}

fn run(args: Args, signals: &Signals) -> anyhow::Result<()> {
    let vsize = args
        .vsize
        .checked_mul(1 << 30)
        .filter(|v| *v < 1 << 58)
        .with_context(|| format!("virtual size {} GB is too large", args.vsize))
        .usage()?;
    if args.mkfs && vsize == 0 {
        usage_bail!("--mkfs needs a virtual size greater than 0");
    }
    // Larger filesystems write GBs of bitmaps into the layer (mkfs.ext4 of
    // the kernel engine has limits of its own). A TurboOCI layer's ext4 is
    // made by libext2fs (obdfs::photon) whatever --engine says.
    let turbo = (args.turbo_oci || args.fastoci) && !args.raw;
    let too_large = || {
        anyhow::Error::new(cli::Usage(anyhow::anyhow!(
            "--mkfs makes an ext4 of at most {} GB (64 TiB), not {} GB: {}",
            obdfs::mkfs::MAX_SIZE >> 30,
            args.vsize,
            obdfs::mkfs::MAX_SIZE_WHY
        )))
    };
    let mkfs_too_large = args.mkfs && vsize > obdfs::mkfs::MAX_SIZE;
    if mkfs_too_large && (turbo || args.engine.engine == EngineKind::Libext2fs) {
        return Err(too_large());
    }
    // Never replaced, as upstream (O_EXCL); said before any work. A file
    // made meanwhile is still refused when created.
    for p in [&args.data_file, &args.index_file] {
        if std::fs::symlink_metadata(p).is_ok() {
            bail!(
                "{} already exists: overlaybd-create makes new files only (remove it or choose another path)",
                p.display()
            );
        }
    }
    // A signal removes the new files: half made (say, before mkfs ended), they
    // would look like a finished layer. Nothing was there a moment ago.
    signals.remove_on_signal(vec![args.data_file.clone(), args.index_file.clone()]);
    let engine = match args.mkfs {
        true => {
            // The kernel engine unmounts before it stops: the first signal
            // cancels it (the files are then removed as on any failure).
            let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let engine = args
                .engine
                .build_with("overlaybd-create", cancel.clone(), None)?;
            // --engine-fallback may have given the libext2fs engine.
            if mkfs_too_large && obdtools::engine::mkfs_by_libext2fs(&*engine) {
                return Err(too_large());
            }
            if engine.name() == obdkernel::NAME {
                signals.cancel_first(cancel);
            }
            engine
        }
        false
            if args.engine.engine != EngineKind::Libext2fs
                || args.engine.mkfs_options.is_some() =>
        {
            usage_bail!("--engine kernel and --mkfs-options only apply with --mkfs")
        }
        false => std::sync::Arc::new(obdfs::Libext2fs::default()),
    };
    // libext2fs's mkfs of many TiB writes GBs of bitmaps (seconds to half a
    // minute): shown once it takes more than 2 s.
    let mkfs_progress = |dev: &std::sync::Arc<dyn blockdev::BlockDevice>| {
        let total = obdfs::mkfs::write_estimate(dev.size());
        cli::WriteProgress::new(dev.clone(), "mkfs: block group bitmaps", total)
    };
    let mkfs = |dev: std::sync::Arc<dyn blockdev::BlockDevice>| -> anyhow::Result<()> {
        let progress = obdtools::engine::mkfs_by_libext2fs(&*engine).then(|| mkfs_progress(&dev));
        let dev = match &progress {
            Some(p) => p.clone(),
            None => dev,
        };
        let made = engine.mkfs(dev);
        finish_progress(progress, made.is_ok());
        made.with_context(|| format!("mkfs failed ({} engine)", engine.name()))
    };
    if (args.turbo_oci || args.fastoci) && args.raw {
        tracing::warn!(
            "--raw and --turboOCI: a raw image is made, as upstream does; --turboOCI is ignored"
        );
    }
    if turbo {
        if vsize == 0 {
            usage_bail!("a TurboOCI layer needs a virtual size greater than 0");
        }
        // The ext4 of a TurboOCI layer is made by the upstream-compatible
        // engine (obdfs::photon), as upstream's fork of libext2fs makes it.
        let mut progress = None;
        let made = obdfs::turbo::create_layer_through(
            &args.data_file,
            &args.index_file,
            vsize,
            args.mkfs,
            |dev| {
                let p = mkfs_progress(&dev);
                progress = Some(p.clone());
                p
            },
        );
        finish_progress(progress, made.is_ok());
        made.with_context(|| {
            format!(
                "cannot create TurboOCI layer {} + {}",
                args.data_file.display(),
                args.index_file.display()
            )
        })?;
        signals.remove_on_signal(Vec::new());
        cli::print_out(format_args!(
            "overlaybd-create has created files SUCCESSFULLY"
        ));
        return Ok(());
    }
    if args.raw {
        // Files this run created are removed again if it fails (a retry would
        // find them in the way).
        let mut created: Vec<&std::path::Path> = Vec::new();
        let r = (|| -> anyhow::Result<()> {
            for p in [&args.data_file, &args.index_file] {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p)
                    .with_context(|| format!("cannot create {}", p.display()))?;
                created.push(p);
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&args.data_file)
                .with_context(|| format!("cannot open {}", args.data_file.display()))?;
            f.set_len(vsize).map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::FileTooLarge {
                    anyhow::anyhow!(blockdev::io::too_large_to_make("a file", vsize))
                } else {
                    anyhow::Error::new(e)
                };
                why.context(format!("cannot size {}", args.data_file.display()))
            })?;
            if args.mkfs {
                let dev = blockdev::RawFileDevice::open_rw(&args.data_file)?;
                mkfs(std::sync::Arc::new(dev))?;
            }
            Ok(())
        })();
        if r.is_err() {
            for p in created {
                let _ = std::fs::remove_file(p);
            }
        }
        r?;
        signals.remove_on_signal(Vec::new());
        cli::print_out(format_args!(
            "overlaybd-create has created files SUCCESSFULLY"
        ));
        return Ok(());
    }
    let parent_uuid = args
        .parent_uuid
        .as_deref()
        .map(Uuid::parse)
        .transpose()
        .context("bad -u value")
        .usage()?;
    let opts = CreateOptions {
        virtual_size: vsize,
        sparse: args.sparse,
        parent_uuid,
        uuid: None,
    };
    create_writable(&args.data_file, &args.index_file, &opts).with_context(|| {
        format!(
            "cannot create layer {} + {}",
            args.data_file.display(),
            args.index_file.display()
        )
    })?;
    if args.mkfs {
        let result = blockdev::Stack::open(&[], Some((&args.data_file, &args.index_file)))
            .map_err(anyhow::Error::from)
            .map(std::sync::Arc::new)
            .and_then(|s| {
                mkfs(s.clone())?;
                // Like upstream, no fsync: the layer becomes durable when committed.
                if let Some(u) = s.upper() {
                    u.save_index().context("cannot save the layer index")?;
                }
                Ok(())
            });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&args.data_file);
            let _ = std::fs::remove_file(&args.index_file);
            return Err(e);
        }
    }
    signals.remove_on_signal(Vec::new());
    cli::print_out(format_args!(
        "overlaybd-create has created files SUCCESSFULLY"
    ));
    Ok(())
}

/// A mkfs's progress ends: completed and cleared after success; after a
/// failure only taken off the screen, before the error is said (not
/// reported as complete).
fn finish_progress(progress: Option<std::sync::Arc<cli::WriteProgress>>, done: bool) {
    match progress {
        Some(p) if done => p.finish(),
        Some(_) => cli::clear_progress(),
        None => {}
    }
}
