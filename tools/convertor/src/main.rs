//! `convertor`: convert an OCI/Docker image into an overlaybd image, from and to a
//! registry, an OCI image layout, an OCI archive or a `docker save` archive. Flags
//! follow upstream's userspace convertor (accelerated-container-image `cmd/convertor`);
//! `convertor obdconv SRC DST` takes `ctr obdconv`'s form and flags (see [`obdconv`]).

mod obdconv;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use nix::sys::signal::Signal;
use obdconvert::progress::Progress;
use obdconvert::{
    open_store_in, Abort, ConvertOptions, ConvertOutcome, Converter, DedupTarget, ImageStore,
    LayoutStore, NativeFormat, Output, OutputFormat, RegistryStore, TurboFormat, WorkDir,
};
use obddedup::resolve::Dedup;
use obdoci::layout::Layout;
use obdoci::{Digest, ImageRef, Reference};
use obdregistry::{ClientOptions, Credentials, FlagNames, Registry, Repository};
use obdtools::cli::{print_out, say, UsageExt};
use obdtools::usage_bail;

/// Convert an OCI image into an overlaybd image and push it.
///
/// Every layer is pulled, applied onto an ext4 filesystem inside an overlaybd
/// layer stack, committed (ZFile, lz4 unless --algorithm, tar-wrapped) and pushed;
/// the converted manifest (and index for multi-platform images) goes to the same
/// repository under the output tag, or to --output-repository.
///
/// Images are named as skopeo names them: `[docker://]HOST/REPO` (a registry),
/// `oci:DIR[:TAG]` (an OCI image layout directory), `oci-archive:FILE[:TAG]` (an OCI
/// layout in a tar; `.tar.gz` is read too) and `docker-archive:FILE[:NAME:TAG|:@N]`
/// (`docker save` format). For example
/// `convertor -r docker-archive:app.tar --output-repository oci-archive:app-obd.tar -o obd`.
/// An archive destination is written only when the whole conversion succeeded.
///
/// `convertor obdconv SRC DST [flags]` is the `ctr obdconv` form: see
/// `convertor obdconv --help`.
#[derive(Parser, Debug)]
#[command(name = "convertor", version)]
pub(crate) struct Args {
    /// Repository of the input (and, without --output-repository, output) image,
    /// without tag: `[docker://]host[:port]/path` (e.g. localhost:5000/redis; not
    /// normalised, the first component is the host), `oci:DIR[:REF]`,
    /// `oci-archive:FILE[:REF]` (split at the first ':', as skopeo does; REF is an OCI
    /// reference name such as `v1.0+build` or `example.com/app:1.0`) or
    /// `docker-archive:FILE[:NAME:TAG|:@N]`.
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
    /// Tag of the input image (in an OCI layout or archive: its reference name, e.g.
    /// `v1.0+build`).
    #[arg(short = 'i', long = "input-tag")]
    input_tag: Option<String>,
    /// Digest of the input image (used when no input tag is given; with -i it is
    /// ignored, with a warning)
    #[arg(short = 'g', long = "input-digest")]
    input_digest: Option<String>,
    /// Output tag; the same as --overlaybd (used only when none of --overlaybd,
    /// --turboOCI and --fastoci is given).
    #[arg(short = 'o', long = "output-tag")]
    output_tag: Option<String>,
    /// Work directory; per-manifest data is removed afterwards unless --reserve.
    /// Convertors sharing it work in private subdirectories; --reserve and
    /// --dump-manifest keep files in it and need it to themselves.
    #[arg(short = 'd', long = "dir", default_value = "tmp_conv")]
    dir: PathBuf,
    /// Write OCI media types (default: Docker schema 2 into a registry; an `oci:` or
    /// `oci-archive:` destination always gets OCI types; refused with a `docker-archive:`
    /// destination, which holds Docker schema 2 only).
    #[arg(long)]
    oci: bool,
    /// Filesystem of TurboOCI layers: ext4 or erofs (native output is always
    /// ext4). With `--engine kernel`, `ctr obdconv`'s form
    /// `ext4;MOUNT_OPTS;MKFS_OPTS` gives the mount and mkfs.ext4 options.
    #[arg(long, default_value = "ext4")]
    fstype: String,
    #[command(flatten)]
    engine: obdtools::engine::EngineArgs,
    /// Make the ext4 in the bottom layer; `--mkfs=false` stacks the prebuilt base
    /// layer of --baselayer (upstream's /opt/overlaybd/baselayers/ext4_64) instead.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    mkfs: bool,
    /// Virtual block device size in GB (with --mkfs), 1 to 536870911 (what the
    /// LSMT format can address; with --mkfs at most 65536, 64 TiB); the work
    /// directory's filesystem must hold sparse files that large unless
    /// --disable-sparse.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=obdconvert::MAX_VSIZE_GB))]
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
    /// containerd's registry host configuration: `<DIR>/<host[:port]>/hosts.toml`
    /// (`server`, `[host."URL"]` mirrors with `capabilities`, `ca`, `client`,
    /// `skip_verify`, `override_path`, `header`), as in /etc/containerd/certs.d.
    #[arg(long = "hosts-dir", value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
    /// Keep the work directory (layer tars, writable and commit files).
    #[arg(long)]
    reserve: bool,
    /// Convert but push nothing (no layers, configs, manifests or indexes).
    #[arg(long = "no-upload")]
    no_upload: bool,
    /// Write config.json and manifest.json per manifest, and index.json, into --dir
    /// (kept after the run; an earlier run's index*.json dumps there are removed first).
    #[arg(long = "dump-manifest")]
    dump_manifest: bool,
    /// Push the result to this repository instead of --repository: any transport
    /// (`host/path`, `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:NAME:TAG]`). TLS flags apply to both; credentials too
    /// unless --dest-creds is given.
    #[arg(long = "output-repository", value_name = "REPO")]
    output_repository: Option<String>,
    /// Credentials `user:password` for the destination registry only (the source
    /// keeps -u).
    #[arg(long = "dest-creds", value_name = "USER:PASSWORD")]
    dest_creds: Option<String>,
    /// Gzip-compress an oci-archive: destination (.tar.gz). (An oci-archive:
    /// destination always gets OCI media types, as if --oci were given.)
    #[arg(long)]
    compress: bool,
    /// ZFile compression of the overlaybd layers: lz4 (upstream's default) or zstd.
    #[arg(long, default_value = "lz4", value_name = "lz4|zstd", value_parser = ["lz4", "zstd"])]
    algorithm: String,
    /// ZFile block size in KiB: 4 (default), 8, 16, 32 or 64.
    #[arg(long = "bs", default_value_t = 4, value_name = "KIB", value_parser = zfile_block_kib)]
    block_size: u32,
    /// The prebuilt base layer used with `--mkfs=false` (an overlaybd layer holding
    /// an empty ext4).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/opt/overlaybd/baselayers/ext4_64"
    )]
    baselayer: PathBuf,
    /// Upload blobs in chunks of this many MiB (1 to 1024), one request each
    /// (streamed from the file), instead of one request per blob.
    #[arg(long = "push-chunk-size", value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    push_chunk_size: Option<u64>,
    /// Fail a registry connection on which nothing moves for this many seconds
    /// (1 to 3600): no answer, no more of a download, or an upload the registry
    /// stops taking. Retried like other network errors; downloads resume.
    #[arg(long = "stall-timeout", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    stall_timeout: u64,
}

/// `--bs`: a ZFile block size in KiB (a usage error otherwise, exit code 2, as
/// clap's other checks).
pub(crate) fn zfile_block_kib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (4 | 8 | 16 | 32 | 64)) => Ok(n),
        _ => Err("the ZFile block size must be 4, 8, 16, 32 or 64 (KiB)".into()),
    }
}

/// The name the run's messages start with: `convertor`, or `convertor obdconv` for the
/// `ctr obdconv` form (its usage and runtime errors alike).
static PROG: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn prog() -> &'static str {
    PROG.get().copied().unwrap_or("convertor")
}

fn main() -> ExitCode {
    // Before anything: this process may be the kernel engine's watchdog.
    obdtools::engine::init_watchdog();
    let obdconv_form = std::env::args_os().nth(1).is_some_and(|a| a == "obdconv");
    let _ = PROG.set(if obdconv_form {
        obdconv::PROG
    } else {
        "convertor"
    });
    // A write past `ulimit -f` fails with EFBIG, one line and the usual
    // clean-up, instead of SIGXFSZ killing the run (exit 153, no message,
    // the work directory left behind).
    let _ = obdsignals::fail_writes_past_file_size_limit();
    // Block SIGINT/SIGTERM before any thread starts (threads inherit the mask):
    // only the signal thread below receives them (obdsignals::Stops).
    // Those it was started with ignored stay ignored (a script's `convertor &`).
    let blocked = obdsignals::block(&[Signal::SIGINT, Signal::SIGTERM]).ok();
    // A bug must still end in one line, not a stack trace (stderr may be gone).
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        say(format_args!(
            "{}: internal error (a bug; please report it): {}{at}",
            prog(),
            msg.replace('\n', " ")
        ));
    }));
    let args = if obdconv_form {
        match obdconv::parse(std::env::args_os().skip(1)) {
            Ok(a) => a,
            Err(e) => {
                obdtools::cli::report(prog(), &e);
                return ExitCode::from(2);
            }
        }
    } else {
        Args::parse()
    };
    obdtools::cli::init_logging(args.verbose);
    let abort = Abort::new();
    // The signal that stopped the run (0: none).
    let stopped_by = Arc::new(AtomicI32::new(0));
    // The signals watched and the requests the signals thread has read.
    let mut watched = None;
    if let Some(sigs) = blocked {
        let (a, by) = (abort.clone(), stopped_by.clone());
        let stops = obdsignals::Stops::new(&sigs);
        if let Ok(stops) = &stops {
            watched = Some((sigs, stops.requests()));
        }
        let spawned = stops.map(|mut stops| {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    while let Ok(sig) = stops.wait() {
                        if by.swap(sig as i32, Ordering::SeqCst) == 0 {
                            a.set();
                            say(format_args!(
                                "{}: {sig}: stopping and cleaning up (again to quit at once)",
                                prog()
                            ));
                        } else {
                            // No destructor runs now: remove the run's work files and
                            // unfinished outputs first, after a clean-up under way
                            // (which must not be cut short), and say what both did.
                            let cleaned = cleaned();
                            let mut done = cleaned.clone();
                            done.extend(obdconvert::workdir::remove_for_exit());
                            say(format_args!("{}: {sig} again: quitting now", prog()));
                            say_cleanup(&done);
                            // With the lock held: the run's own end cannot say more.
                            std::process::exit(128 + sig as i32);
                        }
                    }
                })
        });
        if !matches!(spawned, Ok(Ok(_))) {
            let _ = sigs.thread_unblock();
        }
    }
    let res = run(args, abort);
    let stopped = stopped_by.load(Ordering::SeqCst) != 0;
    let mut cleaned = cleaned();
    let again = |(sigs, requests): &(nix::sys::signal::SigSet, Arc<AtomicUsize>)| {
        requests.load(Ordering::SeqCst) > 1 || obdsignals::pending(sigs).unwrap_or(false)
    };
    if stopped && res.is_err() && watched.as_ref().is_some_and(again) {
        // A second stop signal came while the run was cleaning up: the signals
        // thread quits, as it says, once it has the lock (a moment; this thread
        // goes on if it does not). A run that completed ends as such.
        drop(cleaned);
        std::thread::sleep(std::time::Duration::from_secs(5));
        cleaned = self::cleaned();
    }
    let code = match (res, stopped_by.load(Ordering::SeqCst)) {
        (Ok(()), _) => ExitCode::SUCCESS,
        (Err(_), sig) if sig != 0 => {
            say(format_args!("{}: interrupted", prog()));
            ExitCode::from((128 + sig) as u8)
        }
        (Err(e), _) => obdtools::cli::fail(prog(), e),
    };
    say_cleanup(&std::mem::take(&mut *cleaned));
    // Kept until the process ends: a stop signal from now on changes nothing
    // (its thread waits for the lock), as the run's last lines are said.
    let _held = std::mem::ManuallyDrop::new(cleaned);
    code
}

/// Whether `a` and `b` name the same file or directory (both resolved when they
/// exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether `a` and `b` are the same repository (tags aside): one registry repository,
/// or one layout directory or OCI archive file.
fn same_repository(a: &ImageRef, b: &ImageRef) -> bool {
    match (a, b) {
        (
            ImageRef::Registry { host, repository },
            ImageRef::Registry {
                host: h,
                repository: r,
            },
        ) => host == h && repository == r,
        (ImageRef::Layout { path, .. }, ImageRef::Layout { path: p, .. })
        | (ImageRef::OciArchive { path, .. }, ImageRef::OciArchive { path: p, .. }) => {
            same_file(path, p)
        }
        _ => false,
    }
}

fn run(args: Args, abort: Abort) -> anyhow::Result<()> {
    let t0 = Instant::now();
    not_a_path("-r/--repository", &args.repository).usage()?;
    let src_ref = ImageRef::parse(&args.repository)
        .context("-r/--repository")
        .usage()?;
    let dst_ref = match &args.output_repository {
        Some(r) => {
            not_a_path("--output-repository", r).usage()?;
            ImageRef::parse(r).context("--output-repository").usage()?
        }
        None if src_ref.is_archive() => usage_bail!(
            "{src_ref}: an archive is read, not rewritten; give the destination with --output-repository"
        ),
        None => src_ref.clone(),
    };
    if args.compress && !matches!(dst_ref, ImageRef::OciArchive { .. }) {
        usage_bail!("--compress applies to an oci-archive: destination, not {dst_ref}");
    }
    if let ImageRef::DockerArchive { .. } = dst_ref {
        // A docker archive has no manifest of its own: `docker load` and skopeo read
        // Docker schema 2 from it, never OCI media types.
        for (set, flag) in [(args.oci, "--oci"), (args.referrer, "--referrer")] {
            if set {
                usage_bail!(
                    "{flag} cannot be written to {dst_ref}: a docker-archive holds Docker schema 2 manifests only; write an oci-archive: or oci: destination for OCI media types"
                );
            }
        }
    }
    if args.referrer && !same_repository(&src_ref, &dst_ref) {
        tracing::warn!(
            "--referrer: the converted images name their source manifests in {src_ref} as their subject, and {dst_ref} does not hold those: referrers are looked up in the subject's repository, where these will not be listed"
        );
    }
    let zfile_algorithm: obdconvert::ZfileAlgorithm =
        args.algorithm.parse().context("--algorithm").usage()?;
    // As upstream: --turboOCI wins over --fastoci; -o only when neither output flag is
    // given.
    let turbo_tag = args.turbo_oci.clone().or(args.fastoci.clone());
    // `ctr obdconv`'s `ext4;MOUNT_OPTS;MKFS_OPTS` configures the kernel engine.
    let engine_fstype = args.fstype.contains(';').then_some(args.fstype.as_str());
    let engine = args
        .engine
        .build_with(prog(), abort.flag(), engine_fstype)?;
    let fstype = TurboFormat::parse_fstype(if engine_fstype.is_some() {
        "ext4"
    } else {
        &args.fstype
    })
    .usage()?;
    if turbo_tag.is_none() && args.fstype != "ext4" && engine_fstype.is_none() {
        tracing::warn!(
            "--fstype {} is only used by TurboOCI output; the overlaybd image is ext4",
            args.fstype
        );
    }
    if turbo_tag.is_some() && args.overlaybd.is_none() && args.output_tag.is_some() {
        tracing::warn!("-o/--output-tag is ignored with --turboOCI (use --overlaybd for both)");
    }
    if let (Some(i), Some(g)) = (&args.input_tag, &args.input_digest) {
        // As upstream: the digest is only used when no tag is given.
        tracing::warn!(
            "-g/--input-digest {g} is ignored: the image tagged {i} (-i/--input-tag) is converted; give only -g to convert by digest"
        );
    }
    if let (Some(i), Some(t)) = (&args.input_tag, src_ref.tag()) {
        if i != t {
            tracing::warn!("-i/--input-tag {i} is used, not the tag {t} in -r/--repository");
        }
    }
    // An OCI layout or archive names images by OCI reference names (`v1.0+build`,
    // `example.com/app:1.0`), a registry and a docker archive by tags.
    let ref_name = |r: &ImageRef, t: &str| match r {
        ImageRef::Layout { .. } | ImageRef::OciArchive { .. } => Reference::ref_name(t),
        _ => Reference::tag(t),
    };
    // None: the image an archive holds (known once it is opened).
    let source = match (&args.input_tag, &args.input_digest, &src_ref) {
        (Some(t), _, r) => Some(ref_name(r, t).context("-i/--input-tag").usage()?),
        (None, Some(d), _) => Some(Reference::Digest(
            d.parse::<Digest>().context("-g/--input-digest").usage()?,
        )),
        (None, None, ImageRef::Layout { tag: Some(t), .. })
        | (None, None, ImageRef::OciArchive { tag: Some(t), .. }) => {
            Some(Reference::Tag(t.clone()))
        }
        (None, None, r) if r.is_archive() => None,
        (None, None, _) => usage_bail!(
            "no input image: give -i/--input-tag or -g/--input-digest, or the tag with the source (oci:DIR:TAG; with obdconv also HOST/REPO:TAG)"
        ),
    };
    let native_tag = match (&args.overlaybd, &args.output_tag, &dst_ref, &turbo_tag) {
        (Some(t), _, _, _) | (None, Some(t), _, None) => Some(t.clone()),
        (None, None, r, None) if args.output_repository.is_some() && r.tag().is_some() => {
            Some(r.tag().unwrap_or_default().to_string())
        }
        // An archive holds one image; its name is in the destination if anywhere.
        (None, None, r, None) if r.is_archive() => Some("latest".to_string()),
        (None, _, _, Some(_)) => None,
        _ => usage_bail!(
            "no output tag: give --overlaybd TAG, --turboOCI TAG or -o/--output-tag TAG"
        ),
    };
    for t in native_tag.iter().chain(&turbo_tag) {
        ref_name(&dst_ref, t).context("output tag").usage()?;
    }
    check_source_kept(
        &src_ref,
        source.as_ref(),
        &dst_ref,
        native_tag.iter().chain(&turbo_tag),
    )?;
    if let (Some(n), Some(t)) = (&native_tag, &turbo_tag) {
        if n == t {
            usage_bail!(
                "the overlaybd and the TurboOCI image would both be tagged {t}, and the second would replace the first: give them different tags"
            );
        }
    }
    if let ImageRef::DockerArchive { name, .. } = &dst_ref {
        if native_tag.is_some() && turbo_tag.is_some() {
            usage_bail!(
                "{dst_ref}: a docker archive holds one image, and --overlaybd with --turboOCI makes two: write an oci-archive: or oci: destination"
            );
        }
        // A TurboOCI layer is read through its annotations (which blob holds its
        // files' data, and where) from the source layers beside it: a docker archive
        // keeps neither.
        if turbo_tag.is_some() {
            usage_bail!(
                "{dst_ref}: a TurboOCI image cannot be written to a docker archive, which keeps no layer annotations and no source layers for it to read its files' data from: write an oci-archive: or oci: destination"
            );
        }
        // Its image is named by the destination (RepoTags), not by the output tag.
        let given = args.overlaybd.as_ref().or(args.output_tag.as_ref());
        match name {
            Some(obdoci::reference::ArchiveImage::Tagged(n)) => {
                if let Some(t) = given.filter(|t| **t != n.tag) {
                    tracing::warn!(
                        "{dst_ref}: the image is named {}:{} (the destination's NAME:TAG); the output tag {t} is not written",
                        n.repository,
                        n.tag
                    );
                }
            }
            _ => tracing::warn!(
                "{dst_ref}: the image is written without a name (no RepoTags); name it with docker-archive:FILE:NAME:TAG"
            ),
        }
    } else if let (Some(n), Some(d)) = (&native_tag, dst_ref.tag()) {
        if args.output_repository.is_some() && turbo_tag.is_none() && n != d {
            tracing::warn!(
                "the output is tagged {n} (--overlaybd/-o), not {d} as --output-repository says"
            );
        }
    }
    if args.vsize == 0 {
        usage_bail!("--vsize must be at least 1 (GB)");
    }
    // The bottom layer's ext4 made by libext2fs has a size limit of its own (the
    // kernel engine's mkfs.ext4 too): an overlaybd image's unless the kernel engine
    // makes it, a TurboOCI ext4 image's always (obdfs::photon, whatever --engine).
    let libext2fs_mkfs = (native_tag.is_some() && obdtools::engine::mkfs_by_libext2fs(&*engine))
        || (turbo_tag.is_some() && fstype == obdconvert::FsType::Ext4);
    if args.mkfs && libext2fs_mkfs && args.vsize > obdconvert::MAX_MKFS_VSIZE_GB {
        usage_bail!(
            "--vsize {}: --mkfs makes an ext4 of at most {} GB (64 TiB): {}",
            args.vsize,
            obdconvert::MAX_MKFS_VSIZE_GB,
            obdconvert::MKFS_SIZE_WHY
        );
    }

    let mut client_certs = Vec::new();
    for cc in &args.client_cert {
        let Some((c, k)) = cc.split_once(':') else {
            usage_bail!("--client-cert {cc:?}: expected cert-file:key-file");
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
        chunk_size: args.push_chunk_size.map(|m| m << 20),
        cancel: Some(abort.flag()),
        docker_config: args.username.is_none(),
        hosts_dir: args.hosts_dir.clone(),
        stall_timeout: std::time::Duration::from_secs(args.stall_timeout),
        flags: if prog() == obdconv::PROG {
            obdconv::flag_names()
        } else {
            FlagNames::default()
        },
        ..Default::default()
    };
    let dst_client = match &args.dest_creds {
        None => client.clone(),
        Some(c) => ClientOptions {
            credentials: Some(
                Credentials::parse(c)
                    .with_context(|| format!("--dest-creds {c:?}: expected user:password"))
                    .usage()?,
            ),
            docker_config: false,
            flags: FlagNames {
                credentials: "--dest-creds",
                ..client.flags.clone()
            },
            ..client.clone()
        },
    };
    if args.username.is_some() && client.credentials.is_none() {
        tracing::warn!("-u without 'user:password': using anonymous access");
    }
    let mut opts = ConvertOptions {
        workdir: args.dir.clone(),
        // An OCI layout (directory or archive) holds OCI media types: skopeo
        // (containers/image) reads no other manifest type from one.
        oci: args.oci
            || args.referrer
            || matches!(
                dst_ref,
                ImageRef::OciArchive { .. } | ImageRef::Layout { .. }
            ),
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
        zfile_algorithm,
        zfile_block_kib: args.block_size,
        ..Default::default()
    };
    opts.zfile_options().usage()?;
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
    // The work directory: locked, a private subdirectory unless files are kept in
    // it, leftovers of killed runs removed; cleaned up when `wd` is dropped.
    let wd = WorkDir::acquire(&args.dir, args.reserve || args.dump_manifest)?;
    if !args.disable_sparse {
        let len = args.vsize << 30;
        wd.check_sparse_size(len)
            .with_context(|| match blockdev::io::file_size_limit() {
                Some(limit) if limit < len => format!(
                    "--vsize {}: the {} GB sparse layer files are larger than this process's \
                 file size limit (ulimit -f) of {limit} bytes; raise the limit, or use a \
                 smaller --vsize or --disable-sparse",
                    args.vsize, args.vsize
                ),
                _ => format!(
                    "--vsize {}: the work directory's filesystem cannot hold the {} GB sparse \
                 layer files; use a smaller --vsize, another -d/--dir or --disable-sparse",
                    args.vsize, args.vsize
                ),
            })?;
    }
    opts.workdir = wd.path().to_path_buf();
    // A registry destination's repository client also serves the dedup lookups.
    let open = |r: &ImageRef,
                client: &ClientOptions,
                create: bool|
     -> anyhow::Result<(Arc<dyn ImageStore>, Option<Repository>)> {
        let opened = match r {
            ImageRef::Registry { host, repository } => Registry::new(host, client)
                .map(|reg| {
                    let repo = reg.repository(repository);
                    let store: Arc<dyn ImageStore> = Arc::new(RegistryStore::new(repo.clone()));
                    (store, Some(repo))
                })
                .map_err(obdconvert::Error::from),
            _ => open_store_in(r, client, create, wd.path(), args.compress).map(|s| (s, None)),
        };
        opened.with_context(|| format!("opening {r}"))
    };
    let (src, src_repo) = open(&src_ref, &client, false)?;
    let mut source = match source {
        Some(s) => s,
        None => src
            .default_reference()?
            .with_context(|| format!("{src_ref}: name the input image with -i/--input-tag"))?,
    };
    if let ImageRef::DockerArchive { .. } = dst_ref {
        // One platform's image per docker archive: an index of one image (BuildKit's
        // default: the image and its attestation) gives that image; an index of
        // several is refused before any work.
        let (d, bytes) = src
            .resolve(&source)
            .with_context(|| format!("reading {src_ref}"))?;
        if obdoci::model::is_index(&d.media_type) {
            let idx: obdoci::model::Index =
                obdoci::model::parse_json(&format!("index {src_ref}@{}", d.digest), &bytes)?;
            let images: Vec<_> = idx
                .manifests
                .iter()
                .filter(|c| {
                    obdconvert::pipeline::skipped_entry(c).is_none() && c.artifact_type.is_none()
                })
                .collect();
            match images[..] {
                [one] if !obdoci::model::is_index(&one.media_type) => {
                    tracing::info!(
                        "{src_ref}: index {} holds one image, {}: converting it",
                        d.digest,
                        one.digest
                    );
                    source = Reference::Digest(one.digest.clone());
                }
                _ => bail!(
                    "{dst_ref}: a docker save archive holds one platform's image, and {src_ref} is a multi-platform index; write oci-archive: or oci: instead"
                ),
            }
        }
    }
    // What this run adds to a layout destination goes again if the run fails: the
    // layout itself if the run created it, else the blobs no image uses.
    let mut undo = Undo {
        armed: true,
        kept: (args.reserve || args.dump_manifest).then(|| wd.path().to_path_buf()),
    };
    if let ImageRef::Layout { path, .. } = &dst_ref {
        if !args.no_upload {
            obdoci::journal::start(path);
        }
    }
    let (dst, dst_repo) = match &dst_ref {
        // --no-upload: a layout destination is neither created nor written.
        ImageRef::Layout { path, .. } if args.no_upload => {
            let store: Arc<dyn ImageStore> = Arc::new(LayoutStore::new(Layout::unopened(path)));
            (store, None)
        }
        _ if dst_ref == src_ref && args.dest_creds.is_none() => {
            if let ImageRef::Layout { path, .. } = &dst_ref {
                // Converting in place: the layout is written too, so it must be
                // writable (checked now, not at the first blob pushed).
                Layout::open_writable(path).with_context(|| format!("opening {dst_ref}"))?;
            }
            (src.clone(), src_repo)
        }
        _ => open(&dst_ref, &dst_client, true)?,
    };
    // A registry destination that is down or refuses our credentials is found now, in
    // one request, not at the first layer's upload after that layer was converted.
    if let Some(repo) = dst_repo.as_ref().filter(|_| !args.no_upload) {
        repo.check_push_access()
            .with_context(|| format!("destination {dst_ref} (checked before converting)"))?;
    }
    let progress = Progress::new(std::io::stderr().is_terminal(), false);
    let conv = Converter::new(
        src.clone(),
        dst.clone(),
        opts,
        progress.clone(),
        abort.clone(),
    );
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
            say(format_args!("dedup (run failed): {} [{what}]", d.stats()));
        }
    }
    let outs = outs?;
    // An archive destination is written whole to a temporary file beside it and renamed
    // into place: an existing file of that name is replaced (re-runs of a script), and
    // said so. A symbolic link is written through: its target is replaced (none for a
    // dangling link), the link stays.
    let replaced = match &dst_ref {
        ImageRef::OciArchive { path, .. } | ImageRef::DockerArchive { path, .. } => path.exists(),
        _ => false,
    };
    let written = dst
        .finish(&abort)
        .with_context(|| format!("writing {}", dst.name()))?;
    if let Some(size) = written {
        tracing::info!("wrote {} ({size} bytes)", dst.name());
        if replaced {
            say(format_args!(
                "{}: {}: replaced the existing file",
                prog(),
                dst.name()
            ));
        }
    }
    undo.keep();
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
        // A docker archive names its image by the destination's NAME:TAG (its
        // RepoTags), or not at all: the output tag is not in it.
        let written_as = match &dst_ref {
            ImageRef::DockerArchive { name, .. } => match name {
                Some(obdoci::reference::ArchiveImage::Tagged(n)) => {
                    format!("{} ({}:{})", dst.name(), n.repository, n.tag)
                }
                _ => format!("{} (untagged)", dst.name()),
            },
            _ => format!("{}:{}", dst.name(), out.tag),
        };
        print_out(format_args!(
            "{verb} {written_as} {} ({}) in {secs:.1} s{what}",
            out.descriptor.digest,
            result_counts(out)
        ));
        if let Some((_, what)) = dd {
            if let Some(line) = dedup_summary(out, what) {
                print_out(format_args!("{line}"));
            }
        }
    }
    for l in progress.summary() {
        say(format_args!("{l}"));
    }
    Ok(())
}

/// Refuses (a usage error) an archive destination that is the source archive: it is
/// written whole at the end and would hold only the converted image. Warns about an
/// output tag equal to the source's tag in the same registry repository or OCI layout:
/// upstream converts in place so, and scripts may mean it, but the source image then
/// keeps no tag there (and a later run of the same command finds an overlaybd image).
fn check_source_kept<'a>(
    src: &ImageRef,
    source: Option<&Reference>,
    dst: &ImageRef,
    out_tags: impl Iterator<Item = &'a String>,
) -> anyhow::Result<()> {
    let archive_path = |r: &ImageRef| match r {
        ImageRef::OciArchive { path, .. } | ImageRef::DockerArchive { path, .. } => {
            Some(path.clone())
        }
        _ => None,
    };
    if let (Some(s), Some(d)) = (archive_path(src), archive_path(dst)) {
        if same_file(&s, &d) {
            usage_bail!(
                "{dst}: the destination is the source archive {}: it is written whole at the end and would hold only the converted image, losing the source; write another file",
                s.display()
            );
        }
        return Ok(());
    }
    // (Archives were handled above.)
    let Some(Reference::Tag(src_tag)) = source.filter(|_| same_repository(src, dst)) else {
        return Ok(());
    };
    if let Some(t) = out_tags.into_iter().find(|t| *t == src_tag) {
        tracing::warn!(
            "{dst}: the output tag {t} is the source image's tag: the converted image replaces the source image there, which then has no tag (only its digest reaches it)"
        );
    }
    Ok(())
}

/// Refuses a filesystem path given where an image is named without a transport
/// (`-r ./sample` for `-r oci:./sample`), which would otherwise be taken for a
/// registry and fail only after retries, as a DNS error: a name starting with `/`,
/// `./` or `../`, or a relative path to an OCI layout directory whose first component
/// cannot be a registry host (no `.` or `:`, not `localhost`). Registry references
/// are left alone, even when a directory of that name exists.
pub(crate) fn not_a_path(what: &str, s: &str) -> anyhow::Result<()> {
    use std::path::Path;
    if obdoci::reference::names_transport(s) {
        return Ok(());
    }
    let explicit = s == "." || s == ".." || ["/", "./", "../"].iter().any(|p| s.starts_with(p));
    let first = s.split('/').next().unwrap_or_default();
    let may_be_host = first.contains('.') || first.contains(':') || first == "localhost";
    if !explicit && may_be_host {
        return Ok(());
    }
    // The path named, or without a trailing `:TAG` (obdconv's SRC and DST).
    let tagless = s
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map(|(p, _)| p);
    let path = [Some(s), tagless]
        .into_iter()
        .flatten()
        .map(Path::new)
        .find(|p| p.exists());
    match path {
        Some(p) if p.join("oci-layout").is_file() => {
            bail!("{what} {s}: an OCI image layout directory, not a registry reference: did you mean oci:{s}?")
        }
        Some(p) if explicit && p.is_file() => bail!(
            "{what} {s}: a file, not a registry reference: did you mean docker-archive:{s} or oci-archive:{s}?"
        ),
        _ if explicit => bail!(
            "{what} {s}: a filesystem path, not a registry reference ([docker://]HOST[:PORT]/REPOSITORY); \
             name a local image as oci:DIR, oci-archive:FILE or docker-archive:FILE"
        ),
        _ => Ok(()),
    }
}

/// A failed or interrupted run's clean-up, when dropped unless the run succeeded
/// ([`Undo::keep`]): what the run added to a layout destination is taken back
/// ([`obdoci::journal::undo_all`]); what was removed, and where work files were kept
/// (`--reserve`, `--dump-manifest`), is said after the error line ([`say_cleanup`]).
/// Declared before the converter and the destination, so that it runs after they are gone.
struct Undo {
    armed: bool,
    /// The work directory the run keeps its files in.
    kept: Option<PathBuf>,
}

impl Undo {
    fn keep(&mut self) {
        self.armed = false;
        obdoci::journal::keep_all();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Held while taking back: a second stop signal's exit waits for it.
        let mut cleaned = cleaned();
        let mut done = obdoci::journal::undo_all();
        if let Some(p) = self
            .kept
            .as_ref()
            .filter(|p| std::fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_some()))
        {
            done.push(format!("work files kept in {}", p.display()));
        }
        // Said after the error line.
        cleaned.extend(done);
    }
}

/// What [`Undo`] did, for [`say_cleanup`] after the error line. Its lock is also
/// the exit lock, held while [`Undo`] takes back what the run added, while the
/// run's last lines are said (and then until the process ends), and by a second
/// stop signal's exit: that exit neither cuts a clean-up short nor loses its line.
static CLEANED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn cleaned() -> std::sync::MutexGuard<'static, Vec<String>> {
    CLEANED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The one line saying what a failed or interrupted run removed or kept (nothing when
/// there is nothing to say).
fn say_cleanup(done: &[String]) {
    if !done.is_empty() {
        say(format_args!("{}: cleanup: {}", prog(), done.join("; ")));
    }
}

/// Opens the dedup database of `--db-type/--db-str` (`None`: no dedup) and describes it.
fn open_dedup(
    args: &Args,
    dst: &ImageRef,
    format: &dyn OutputFormat,
) -> anyhow::Result<Option<(Arc<Dedup>, String)>> {
    let db_error = |e: obddedup::DbError| anyhow::Error::new(e).context("dedup database");
    let db_str = args.db_str.as_deref().unwrap_or("");
    if obddedup::check_settings(&args.db_type, db_str)
        .map_err(db_error)
        .usage()?
        .is_none()
    {
        return Ok(None);
    }
    if !matches!(dst, ImageRef::Registry { .. }) {
        usage_bail!("dedup database: deduplication needs a registry destination, not {dst}");
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

/// `n` and the noun, singular for 1 (`1 layer`, `2 layers`).
fn counted(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// The result line's counts: the platform manifests and the layers converted, or that
/// the manifests were reused from the dedup database (re-tagged or copied: no layer work).
fn result_counts(out: &ConvertOutcome) -> String {
    let (m, reused) = (out.manifests, out.manifests_reused);
    if reused == 0 {
        format!(
            "{}, {}",
            counted(m, "manifest"),
            counted(out.layers, "layer")
        )
    } else if reused >= m {
        format!("{} reused from the dedup database", counted(m, "manifest"))
    } else {
        format!(
            "{}: {reused} reused from the dedup database, {} converted with {}",
            counted(m, "manifest"),
            m - reused,
            counted(out.layers, "layer")
        )
    }
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
