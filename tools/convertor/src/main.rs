//! `convertor`: convert an OCI/Docker image into an overlaybd image, registry to
//! registry (or to/from a local OCI image layout). Flags follow upstream's userspace
//! convertor (accelerated-container-image `cmd/convertor`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use obdconvert::progress::Progress;
use obdconvert::{
    open_store, Abort, ConvertOptions, ConvertOutcome, Converter, DedupTarget, ImageStore,
    NativeFormat, Output, OutputFormat, RegistryStore, TurboFormat,
};
use obddedup::resolve::Dedup;
use obdoci::{Digest, ImageRef, Reference};
use obdregistry::{ClientOptions, Credentials, Registry, Repository};

/// Convert an OCI image into an overlaybd image and push it.
///
/// Every layer is pulled, applied onto an ext4 filesystem inside an overlaybd
/// layer stack, committed (ZFile lz4, tar-wrapped) and pushed; the converted
/// manifest (and index for multi-platform images) goes to the same repository
/// under the output tag. Input and output may also be a local OCI image layout:
/// `-r oci:DIR` (e.g. `convertor -r oci:./img -i latest -o latest_obd`).
#[derive(Parser, Debug)]
#[command(name = "convertor", version)]
struct Args {
    /// Repository of the input and output image, without tag: `host[:port]/path`
    /// (e.g. localhost:5000/redis; not normalised, the first component is the host),
    /// or `oci:DIR[:tag]` for an OCI image layout directory.
    #[arg(short = 'r', long)]
    repository: String,
    /// Registry credentials `user:password` (split at the first ':'); `user` alone
    /// or `:password` means anonymous. Without -u, credentials for each registry are
    /// taken from Docker's config.json (auths, credHelpers, credsStore) if present.
    #[arg(short = 'u', long, value_name = "USER[:PASSWORD]")]
    username: Option<String>,
    /// Use plain HTTP instead of HTTPS for every registry.
    #[arg(long)]
    plain: bool,
    /// Debug logging.
    #[arg(long)]
    verbose: bool,
    /// Tag of the input image.
    #[arg(short = 'i', long = "input-tag")]
    input_tag: Option<String>,
    /// Digest of the input image (used when no input tag is given).
    #[arg(short = 'g', long = "input-digest")]
    input_digest: Option<String>,
    /// Output tag; the same as --overlaybd (used only when none of --overlaybd,
    /// --turboOCI and --fastoci is given).
    #[arg(short = 'o', long = "output-tag")]
    output_tag: Option<String>,
    /// Work directory; per-manifest data is removed afterwards unless --reserve.
    #[arg(short = 'd', long = "dir", default_value = "tmp_conv")]
    dir: PathBuf,
    /// Write OCI media types (default: Docker schema 2).
    #[arg(long)]
    oci: bool,
    /// Filesystem of TurboOCI layers: ext4 or erofs (native output is always
    /// ext4). With `--engine kernel`, `ctr obdconv`'s form
    /// `ext4;MOUNT_OPTS;MKFS_OPTS` gives the mount and mkfs.ext4 options.
    #[arg(long, default_value = "ext4")]
    fstype: String,
    #[command(flatten)]
    engine: obdtools::engine::EngineArgs,
    /// Make the ext4 in the bottom layer; `--mkfs=false` uses upstream's prebuilt
    /// base layer /opt/overlaybd/baselayers/ext4_64 instead.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    mkfs: bool,
    /// Virtual block device size in GB (with --mkfs).
    #[arg(long, default_value_t = 64)]
    vsize: u64,
    /// Output tag of the overlaybd (native) image.
    #[arg(long)]
    overlaybd: Option<String>,
    /// Output tag of a TurboOCI v1 image: small metadata layers (ext4 or EROFS, see
    /// --fstype) that map file data into the original layer blobs, which stay in the
    /// repository. With --overlaybd too, both images come from one run.
    #[arg(long = "turboOCI")]
    turbo_oci: Option<String>,
    /// Deprecated alias of --turboOCI (--turboOCI wins when both are given).
    #[arg(long)]
    fastoci: Option<String>,
    #[arg(long = "db-str", value_name = "DSN|PATH", help = obddedup::DB_STR_HELP)]
    db_str: Option<String>,
    #[arg(long = "db-type", default_value = "", value_name = "TYPE", help = obddedup::DB_TYPE_HELP)]
    db_type: String,
    /// Maximum platform manifests converted at once (0 = unlimited).
    #[arg(long = "concurrency-limit", default_value_t = 4)]
    concurrency_limit: usize,
    /// Append-mode instead of sparse writable layer files.
    #[arg(long = "disable-sparse")]
    disable_sparse: bool,
    /// Add `subject` (the source) and `artifactType` to converted manifests and
    /// indexes, for the referrers API. Implies --oci.
    #[arg(long)]
    referrer: bool,
    /// Directory with `*.crt` root CAs and `*.cert`/`*.key` client pairs (repeatable).
    #[arg(long = "cert-dir", value_name = "DIR")]
    cert_dir: Vec<PathBuf>,
    /// Extra root CA PEM file (repeatable).
    #[arg(long = "root-ca", value_name = "FILE")]
    root_ca: Vec<PathBuf>,
    /// Client certificate `cert-file:key-file` (repeatable; the first is used).
    #[arg(long = "client-cert", value_name = "CERT:KEY")]
    client_cert: Vec<String>,
    /// Skip TLS certificate verification.
    #[arg(long)]
    insecure: bool,
    /// Keep the work directory (layer tars, writable and commit files).
    #[arg(long)]
    reserve: bool,
    /// Convert but push nothing (no layers, configs, manifests or indexes).
    #[arg(long = "no-upload")]
    no_upload: bool,
    /// Write config.json and manifest.json per manifest, and index.json, into --dir
    /// (kept after the run).
    #[arg(long = "dump-manifest")]
    dump_manifest: bool,
    /// Push the result to this repository instead of --repository
    /// (`host/path` or `oci:DIR[:tag]`). Credentials and TLS flags apply to both.
    #[arg(long = "output-repository", value_name = "REPO")]
    output_repository: Option<String>,
    /// The prebuilt base layer used with `--mkfs=false` (an overlaybd layer holding
    /// an empty ext4).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/opt/overlaybd/baselayers/ext4_64"
    )]
    baselayer: PathBuf,
    /// Upload blobs in chunks of this many MiB instead of one request each.
    #[arg(long = "push-chunk-size", value_name = "MIB")]
    push_chunk_size: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    obdtools::cli::init_logging(args.verbose);
    let abort = Abort::new();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (a, i) = (abort.clone(), interrupted.clone());
        let count = AtomicUsize::new(0);
        let _ = ctrlc::set_handler(move || {
            i.store(true, Ordering::SeqCst);
            a.set();
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                eprintln!(
                    "convertor: interrupted; cleaning up (press Ctrl-C again to quit at once)"
                );
            } else {
                std::process::exit(130);
            }
        });
    }
    let res = run(args, abort);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if interrupted.load(Ordering::SeqCst) {
                eprintln!("convertor: interrupted");
                ExitCode::from(130)
            } else {
                obdtools::cli::report("convertor", &e);
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: Args, abort: Abort) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let src_ref = ImageRef::parse(&args.repository).context("-r/--repository")?;
    let dst_ref = match &args.output_repository {
        Some(r) => ImageRef::parse(r).context("--output-repository")?,
        None => src_ref.clone(),
    };
    // As upstream: --turboOCI wins over --fastoci; -o only when neither output flag is
    // given.
    let turbo_tag = args.turbo_oci.clone().or(args.fastoci.clone());
    // `ctr obdconv`'s `ext4;MOUNT_OPTS;MKFS_OPTS` configures the kernel engine.
    let engine_fstype = args.fstype.contains(';').then_some(args.fstype.as_str());
    let engine = args
        .engine
        .build_with("convertor", abort.flag(), engine_fstype)?;
    let fstype = TurboFormat::parse_fstype(if engine_fstype.is_some() {
        "ext4"
    } else {
        &args.fstype
    })?;
    if turbo_tag.is_none() && args.fstype != "ext4" && engine_fstype.is_none() {
        tracing::warn!(
            "--fstype {} is only used by TurboOCI output; the overlaybd image is ext4",
            args.fstype
        );
    }
    if turbo_tag.is_some() && args.overlaybd.is_none() && args.output_tag.is_some() {
        tracing::warn!("-o/--output-tag is ignored with --turboOCI (use --overlaybd for both)");
    }
    let source = match (&args.input_tag, &args.input_digest, &src_ref) {
        (Some(t), _, _) => Reference::tag(t).context("-i/--input-tag")?,
        (None, Some(d), _) => Reference::Digest(d.parse::<Digest>().context("-g/--input-digest")?),
        (None, None, ImageRef::Layout { tag: Some(t), .. }) => Reference::tag(t)?,
        (None, None, _) => bail!("no input image: give -i/--input-tag or -g/--input-digest"),
    };
    let native_tag = match (&args.overlaybd, &args.output_tag, &dst_ref, &turbo_tag) {
        (Some(t), _, _, _) | (None, Some(t), _, None) => Some(t.clone()),
        (None, None, ImageRef::Layout { tag: Some(t), .. }, None)
            if args.output_repository.is_some() =>
        {
            Some(t.clone())
        }
        (None, _, _, Some(_)) => None,
        _ => bail!("no output tag: give --overlaybd TAG, --turboOCI TAG or -o/--output-tag TAG"),
    };
    for t in native_tag.iter().chain(&turbo_tag) {
        obdoci::reference::validate_tag(t).context("output tag")?;
    }
    if args.vsize == 0 {
        bail!("--vsize must be at least 1 (GB)");
    }

    let mut client_certs = Vec::new();
    for cc in &args.client_cert {
        let Some((c, k)) = cc.split_once(':') else {
            bail!("--client-cert {cc:?}: expected cert-file:key-file");
        };
        client_certs.push((PathBuf::from(c), PathBuf::from(k)));
    }
    let client = ClientOptions {
        plain_http: args.plain,
        insecure: args.insecure,
        root_cas: args.root_ca.clone(),
        cert_dirs: args.cert_dir.clone(),
        client_certs,
        credentials: args.username.as_deref().and_then(Credentials::parse),
        chunk_size: args.push_chunk_size.map(|m| m.max(1) << 20),
        cancel: Some(abort.flag()),
        docker_config: args.username.is_none(),
        ..Default::default()
    };
    if args.username.is_some() && client.credentials.is_none() {
        tracing::warn!("-u without 'user:password': using anonymous access");
    }
    let opts = ConvertOptions {
        workdir: args.dir.clone(),
        oci: args.oci || args.referrer,
        referrer: args.referrer,
        mkfs: args.mkfs,
        vsize_gb: args.vsize,
        disable_sparse: args.disable_sparse,
        reserve: args.reserve,
        no_upload: args.no_upload,
        dump_manifest: args.dump_manifest,
        concurrency_limit: args.concurrency_limit,
        baselayer: args.baselayer.clone(),
        engine,
        ..Default::default()
    };
    let mut formats: Vec<(Arc<dyn OutputFormat>, String)> = Vec::new();
    if let Some(t) = &native_tag {
        formats.push((Arc::new(NativeFormat::new(&opts)), t.clone()));
    }
    if let Some(t) = &turbo_tag {
        formats.push((Arc::new(TurboFormat::new(&opts, fstype)), t.clone()));
    }
    // Before any work: a bad database setting fails here, with nothing touched. Each
    // format has its own rows (its dedup format key).
    let mut dedups = Vec::new();
    for (f, _) in &formats {
        dedups.push(open_dedup(&args, &dst_ref, f.as_ref())?);
    }
    // A registry destination's repository client also serves the dedup lookups.
    let open =
        |r: &ImageRef, create: bool| -> anyhow::Result<(Arc<dyn ImageStore>, Option<Repository>)> {
            let opened = match r {
                ImageRef::Registry { host, repository } => Registry::new(host, &client)
                    .map(|reg| {
                        let repo = reg.repository(repository);
                        let store: Arc<dyn ImageStore> = Arc::new(RegistryStore::new(repo.clone()));
                        (store, Some(repo))
                    })
                    .map_err(obdconvert::Error::from),
                ImageRef::Layout { .. } => open_store(r, &client, create).map(|s| (s, None)),
            };
            opened.with_context(|| format!("opening {r}"))
        };
    let (src, src_repo) = open(&src_ref, false)?;
    let (dst, dst_repo) = if dst_ref == src_ref {
        (src.clone(), src_repo)
    } else {
        open(&dst_ref, true)?
    };
    let progress = Progress::new(std::io::stderr().is_terminal(), false);
    let conv = Converter::new(src.clone(), dst.clone(), opts, progress.clone(), abort);
    let outputs: Vec<Output> = formats
        .into_iter()
        .zip(&dedups)
        .map(|((f, tag), dd)| {
            let o = Output::new(f, tag);
            match (dd, &dst_repo) {
                (Some((d, _)), Some(repo)) => o.with_dedup(DedupTarget::new(d.clone(), repo)),
                _ => o,
            }
        })
        .collect();
    let outs = conv.convert_outputs(&source, outputs);
    if outs.is_err() {
        for (d, what) in dedups.iter().flatten() {
            // What dedup did before the failure (rows of pushed layers stay valid).
            eprintln!("dedup (run failed): {} [{what}]", d.stats());
        }
    }
    let outs = outs?;
    let secs = t0.elapsed().as_secs_f64();
    for (out, dd) in outs.iter().zip(&dedups) {
        let verb = if out.pushed {
            "pushed"
        } else {
            "converted (not uploaded)"
        };
        let what = if outs.len() > 1 {
            format!(" [{}]", out.format)
        } else {
            String::new()
        };
        println!(
            "{verb} {}:{} {} ({} manifest{}, {} layers) in {secs:.1} s{what}",
            dst.name(),
            out.tag,
            out.descriptor.digest,
            out.manifests,
            if out.manifests == 1 { "" } else { "s" },
            out.layers
        );
        if let Some((_, what)) = dd {
            if let Some(line) = dedup_summary(out, what) {
                println!("{line}");
            }
        }
    }
    for l in progress.summary() {
        eprintln!("{l}");
    }
    Ok(())
}

/// Opens the dedup database of `--db-type/--db-str` (`None`: no dedup) and describes it.
fn open_dedup(
    args: &Args,
    dst: &ImageRef,
    format: &dyn OutputFormat,
) -> anyhow::Result<Option<(Arc<Dedup>, String)>> {
    let db_error = |e: obddedup::DbError| anyhow::Error::new(e).context("dedup database");
    let db_str = args.db_str.as_deref().unwrap_or("");
    if obddedup::select_kind(&args.db_type, db_str)
        .map_err(db_error)?
        .is_none()
    {
        return Ok(None);
    }
    if let ImageRef::Layout { .. } = dst {
        bail!("dedup database: deduplication needs a registry destination, not {dst}");
    }
    let key = format
        .dedup_format_key()
        .context("computing the dedup format key")?;
    let db = obddedup::open(&args.db_type, db_str, &key)
        .map_err(db_error)?
        .context("dedup database: enabled but not opened")?;
    let what = format!("{}, format {key}", db.describe());
    tracing::info!("dedup: using {what}");
    Ok(Some((Arc::new(Dedup::new(db)), what)))
}

/// The end-of-run dedup line: what was converted and what reused, from the pipeline's
/// counts, and what the database lookups did.
fn dedup_summary(out: &ConvertOutcome, db: &str) -> Option<String> {
    let s = out.dedup?;
    Some(format!(
        "dedup: layers {} converted, {} reused ({} mounted); manifests {} converted, {} reused ({} copied); \
         {} stale rows deleted, {} conflicts, {} db errors, {} registry errors [{db}]",
        out.layers_converted,
        out.layers_reused,
        s.layer_hits_mounted,
        out.manifests - out.manifests_reused,
        out.manifests_reused,
        s.manifest_hits_copied,
        s.stale_rows_deleted,
        s.conflicts,
        s.db_errors,
        s.registry_errors,
    ))
}
