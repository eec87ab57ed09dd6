//! `turboOCI-apply`: apply an OCI layer blob to a TurboOCI layer, mapping
//! file data into the blob instead of copying it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use blockdev::ImageConfig;
use clap::Parser;
use obdfs::turbo::{apply_layer, BlobKind, FsType, TurboApply};
use obdtools::cli;
use obdtools::signals::{Signals, PARTIAL_LAYER};

/// Apply an OCI layer blob (gzip or uncompressed tar) to the writable
/// TurboOCI layer of an overlaybd image, as upstream's turboOCI-apply.
///
/// For a gzip blob the gzip random-access index is written first
/// (--gz_index_path). The tar is then applied to the ext4 of the image:
/// directories, inodes, xattrs, symlinks and whiteouts are written into the
/// layer, while each regular file's blocks are mapped to the file's data in
/// the uncompressed tar (LSMT tag-1 entries). IMAGE_CONFIG is an overlaybd
/// config.json whose upper is the writable layer from `overlaybd-create
/// --turboOCI` with `"target"` = the blob; TurboOCI lowers are given as
/// `{"gzipIndex", "file", "targetFile", "targetDigest"}`. Commit the result
/// with `overlaybd-commit -z --turboOCI`.
///
/// With --fstype erofs the layer's filesystem is EROFS instead (the layer
/// file upstream names erofs.fs.meta): the bottom layer (no lowers) creates
/// it, every later layer extends the lowers' image; --mkfs is not used.
#[derive(Parser, Debug)]
#[command(name = "turboOCI-apply", version)]
struct Args {
    /// Make a new ext4 filesystem before applying.
    #[arg(long)]
    mkfs: bool,
    /// Filesystem type: ext4 or erofs.
    #[arg(long, default_value = "ext4")]
    fstype: String,
    /// Print debug logs.
    #[arg(long)]
    verbose: bool,
    /// overlaybd service config (accepted for compatibility; not needed).
    #[arg(long = "service_config_path", value_name = "FILEPATH")]
    service_config_path: Option<PathBuf>,
    /// Where to write the gzip index when the blob is gzip.
    #[arg(
        long = "gz_index_path",
        value_name = "FILEPATH",
        default_value = "gzip.meta"
    )]
    gz_index_path: PathBuf,
    /// Upstream: apply a tar of headers only (made by --export) to
    /// generate the TurboOCI layer. Not supported.
    #[arg(long)]
    import: bool,
    /// Upstream: write the tar headers of INPUT_PATH into the file
    /// IMAGE_CONFIG_PATH instead of applying. Not supported.
    #[arg(long)]
    export: bool,
    /// The layer blob: gzip-compressed or uncompressed tar.
    input_path: PathBuf,
    /// The overlaybd image config.json.
    image_config_path: PathBuf,
}

fn main() -> ExitCode {
    // First: no thread may start with the signals unblocked.
    let signals = Signals::install("turboOCI-apply");
    obdtools::cli::wait_for_layer_claims();
    let args = Args::parse();
    cli::init_logging(args.verbose);
    // --export names an output where the config goes: refused before the
    // config is read (no result file is written).
    if args.import || args.export {
        let flag = if args.export { "--export" } else { "--import" };
        cli::say(format_args!(
            "turboOCI-apply: error: {flag} (tar headers only) is not supported: apply the whole layer blob"
        ));
        return signals.failure();
    }
    let cfg = match ImageConfig::load(&args.image_config_path) {
        Ok(c) => c,
        Err(e) => {
            // Arguments the wrong way round are a usage error (exit 2).
            if cli::report_config_load("turboOCI-apply", &args.image_config_path, &e) {
                return ExitCode::from(2);
            }
            return signals.failure();
        }
    };
    // Where the outputs go must work, and destroy no input, before the layer is
    // applied.
    let inputs = [args.input_path.as_path(), args.image_config_path.as_path()];
    if let Err(e) = check_outputs(&args, &cfg, &inputs) {
        cli::say(format_args!(
            "turboOCI-apply: error: {}: {}",
            args.image_config_path.display(),
            blockdev::error::Chain(&e)
        ));
        return signals.failure();
    }
    // The gzip index is written beside its path and removed on a signal.
    signals.on_signal(Some(&cfg), PARTIAL_LAYER);
    let result = run(&args, &cfg);
    let msg = match &result {
        Ok(()) => "success".to_string(),
        Err(e) => format!("failed:{}", cli::error_line(e)),
    };
    if let Err(e) = signals.write_result(&cfg, &msg) {
        if let Err(a) = &result {
            cli::report("turboOCI-apply", a);
        }
        cli::say(format_args!(
            "turboOCI-apply: error: cannot write the result file: {}",
            blockdev::error::Chain(&e)
        ));
        return signals.failure();
    }
    signals.run(|| result)
}

/// The result file ([`ImageConfig::check_result_file`]) and `--gz_index_path`, which
/// must not be one of the files the apply reads or writes (the blob, the config, the
/// layers' files, the result file): it is replaced when the blob is gzip.
fn check_outputs(args: &Args, cfg: &ImageConfig, inputs: &[&Path]) -> blockdev::Result<()> {
    cfg.check_result_file(inputs)?;
    let gz = &args.gz_index_path;
    let others: Vec<&Path> = inputs
        .iter()
        .copied()
        .chain(cfg.result_file.as_deref())
        .collect();
    if let Some(f) = cfg.same_as_layer_file(gz, &others) {
        return Err(blockdev::Error::Invalid(format!(
            "--gz_index_path {} is {}, which this apply reads or writes: give the index a path of its own",
            gz.display(),
            f.display()
        )));
    }
    blockdev::io::check_replaceable(gz)
}

fn run(args: &Args, cfg: &ImageConfig) -> anyhow::Result<()> {
    let Some(fstype) = FsType::parse(&args.fstype) else {
        obdtools::usage_bail!("unknown --fstype '{}' (ext4 or erofs)", args.fstype);
    };
    if fstype == FsType::Erofs && args.mkfs {
        tracing::warn!("--mkfs does not apply to --fstype erofs; ignored (as upstream)");
    }
    if let Some(p) = &args.service_config_path {
        tracing::debug!("ignoring service config {}", p.display());
    }
    let Some(upper) = &cfg.upper else {
        bail!(
            "{}: the image has no writable upper layer",
            args.image_config_path.display()
        );
    };
    if upper.target.is_none() {
        bail!(
            "{}: the upper layer has no \"target\"; TurboOCI needs a layer made by `overlaybd-create --turboOCI` and the blob as upper.target",
            args.image_config_path.display()
        );
    }
    let job = TurboApply {
        blob: args.input_path.clone(),
        gz_index: args.gz_index_path.clone(),
        lowers: cfg.lower_sources(),
        upper_data: upper.data.clone(),
        upper_index: upper.index.clone(),
        mkfs: args.mkfs,
        fstype,
    };
    let start = Instant::now();
    let mut last = Instant::now();
    let mut progress = |s: &obdfs::ApplyStats| {
        if last.elapsed().as_secs() >= 2 {
            last = Instant::now();
            cli::say(format_args!(
                "turboOCI-apply: {} entries, {} of tar",
                s.entries,
                cli::human(s.tar_bytes)
            ));
        }
    };
    let report = apply_layer(&job, Some(&mut progress))
        .with_context(|| format!("cannot apply {}", args.input_path.display()))?;
    if let (BlobKind::Gzip, Some(i)) = (report.kind, &report.gzip_index) {
        cli::say(format_args!(
            "turboOCI-apply: gzip index {} ({} access points, {} uncompressed)",
            args.gz_index_path.display(),
            i.entries,
            cli::human(i.uncompressed_size)
        ));
    }
    let s = &report.stats;
    cli::say(format_args!(
        "turboOCI-apply: applied {} entries ({} files, {} of file data referenced) in {:.2}s",
        s.entries,
        s.files,
        cli::human(s.data_bytes),
        start.elapsed().as_secs_f64()
    ));
    if let Some(e) = &report.erofs {
        cli::say(format_args!(
            "turboOCI-apply: EROFS: {} new inodes, {} of metadata, {} blocks",
            e.inodes,
            cli::human(e.meta_bytes),
            e.blocks
        ));
    }
    cli::print_out(format_args!("turboOCI-apply done"));
    Ok(())
}
