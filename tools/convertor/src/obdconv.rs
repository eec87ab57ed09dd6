//! `convertor obdconv SRC DST`: the form and flags of upstream's embedded convertor
//! (`ctr obdconv`, accelerated-container-image `cmd/ctr/overlaybd_conv.go`), without
//! containerd, TCMU or root. SRC and DST are any transports the convertor takes, so the
//! destination can be another repository or registry, with its own credentials
//! (`--dest-creds`). The flags map onto the convertor's own ([`Args`]).

use super::Args;
use anyhow::{bail, Context};
use clap::Parser;
use obdoci::{ImageName, ImageRef, Reference};
use obdregistry::FlagNames;
use std::ffi::OsString;
use std::path::PathBuf;

/// The name this form's messages start with.
pub const PROG: &str = "convertor obdconv";

/// This form's flags, as the registry client's error hints name them.
pub fn flag_names() -> FlagNames {
    FlagNames {
        credentials: "-u",
        plain_http: "--plain-http",
        tls_ca: "--tlscacert",
        insecure: "-k/--skip-verify",
    }
}

/// Convert SRC into an overlaybd image at DST, as `ctr obdconv SRC DST` does.
///
/// SRC and DST: `[docker://]HOST/REPO[:TAG|@DIGEST]`, `oci:DIR[:TAG]`,
/// `oci-archive:FILE[:TAG]` (a `.tar.gz` is read too) or
/// `docker-archive:FILE[:NAME:TAG|:@N]`. A registry DST without a tag gets `latest`.
///
/// Differences from `ctr obdconv`: no containerd image store is read or written (use
/// the transports); `--refresh` is accepted and has no effect (tokens are fetched as
/// registries ask); `--http-dump` and `--http-trace` turn on debug logging of the
/// registry client instead of dumping raw HTTP.
#[derive(Parser, Debug)]
#[command(name = "convertor obdconv", bin_name = "convertor obdconv", version)]
struct ObdconvArgs {
    /// The image to convert.
    src: String,
    /// Where to write the overlaybd image.
    dst: String,
    /// Skip TLS verification of registries.
    #[arg(short = 'k', long = "skip-verify")]
    skip_verify: bool,
    /// Use plain HTTP for registries.
    #[arg(long = "plain-http")]
    plain_http: bool,
    /// Registry credentials `user:password` (for SRC, and for DST unless --dest-creds).
    #[arg(short = 'u', long = "user", value_name = "USER[:PASSWORD]")]
    user: Option<String>,
    /// Credentials `user:password` for the DST registry only.
    #[arg(long = "dest-creds", value_name = "USER:PASSWORD")]
    dest_creds: Option<String>,
    /// Path to a TLS root CA file.
    #[arg(long = "tlscacert", value_name = "FILE")]
    tlscacert: Option<PathBuf>,
    /// Path to a TLS client certificate (with --tlskey).
    #[arg(long = "tlscert", value_name = "FILE")]
    tlscert: Option<PathBuf>,
    /// Path to the TLS client key (with --tlscert).
    #[arg(long = "tlskey", value_name = "FILE")]
    tlskey: Option<PathBuf>,
    /// containerd's registry host configuration directory: `<dir>/<host>/hosts.toml`
    /// (mirrors, CAs, client certificates, skip_verify, headers), e.g.
    /// /etc/containerd/certs.d.
    #[arg(long = "hosts-dir", value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
    /// Filesystem of the image: ext4 (the native overlaybd image is always ext4).
    /// `ctr obdconv`'s `ext4;MOUNT_OPTS;MKFS_OPTS` converts with the kernel engine
    /// (mkfs.ext4 and a mounted ext4, as `ctr obdconv`; needs root).
    #[arg(long, default_value = "ext4")]
    fstype: String,
    /// Dedup database: a MySQL DSN `user:pass@tcp(host:port)/db`.
    #[arg(long = "dbstr", value_name = "DSN")]
    dbstr: Option<String>,
    /// ZFile compression: lz4 or zstd.
    #[arg(long, default_value = "lz4", value_name = "lz4|zstd", value_parser = ["lz4", "zstd"])]
    algorithm: String,
    /// ZFile block size in KiB: 4, 8, 16, 32 or 64.
    #[arg(long = "bs", default_value_t = 4, value_name = "KIB", value_parser = crate::zfile_block_kib)]
    bs: u32,
    /// Virtual block device size in GB, 1 to 536870911 (what the LSMT format can
    /// address; with --mkfs at most 65536, 64 TiB).
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=obdconvert::MAX_VSIZE_GB))]
    vsize: u64,
    /// Accepted for compatibility; no effect.
    #[arg(long)]
    refresh: bool,
    /// Debug logging of registry requests (ctr dumps raw HTTP).
    #[arg(long = "http-dump")]
    http_dump: bool,
    /// Debug logging of registry requests (ctr traces connections).
    #[arg(long = "http-trace")]
    http_trace: bool,
    /// Write OCI media types (default: Docker schema 2; refused with a docker-archive: DST).
    #[arg(long)]
    oci: bool,
    /// Gzip-compress an oci-archive: DST.
    #[arg(long)]
    compress: bool,
    /// Work directory.
    #[arg(short = 'd', long = "dir", default_value = "tmp_conv")]
    dir: PathBuf,
}

/// Parse `obdconv SRC DST [flags]` (the arguments after the program name) into the
/// convertor's arguments.
pub(crate) fn parse(argv: impl Iterator<Item = OsString>) -> anyhow::Result<Args> {
    let o = match ObdconvArgs::try_parse_from(argv) {
        Ok(o) => o,
        Err(e) if e.use_stderr() => {
            // clap's own report (its "error: " prefix, usage and hint), exit 2.
            let _ = e.print();
            std::process::exit(2);
        }
        Err(e) => {
            // --help, --version
            let _ = e.print();
            std::process::exit(0);
        }
    };
    super::not_a_path("SRC", &o.src)?;
    super::not_a_path("DST", &o.dst)?;
    let src = ImageName::parse(&o.src).context("SRC")?;
    let dst = ImageName::parse(&o.dst).context("DST")?;
    let store_arg = |n: &ImageName| n.store.to_string();
    let mut argv: Vec<OsString> = vec![
        "convertor".into(),
        "-r".into(),
        store_arg(&src).into(),
        "--output-repository".into(),
        store_arg(&dst).into(),
        "-d".into(),
        o.dir.clone().into(),
    ];
    match &src.reference {
        Some(Reference::Tag(t)) => argv.extend(["-i".into(), t.into()]),
        Some(Reference::Digest(d)) => argv.extend(["-g".into(), d.to_string().into()]),
        None if matches!(src.store, ImageRef::Registry { .. }) => {
            argv.extend(["-i".into(), "latest".into()])
        }
        None if matches!(src.store, ImageRef::Layout { tag: None, .. }) => {
            bail!("SRC {}: name the image in the layout: oci:DIR:TAG", o.src)
        }
        None => {}
    }
    match (&dst.reference, &dst.store) {
        (Some(Reference::Tag(t)), _) => argv.extend(["-o".into(), t.into()]),
        (Some(Reference::Digest(_)), _) => {
            bail!("DST {}: a destination takes a tag, not a digest", o.dst)
        }
        (None, ImageRef::Registry { .. }) => argv.extend(["-o".into(), "latest".into()]),
        (None, ImageRef::Layout { tag: None, .. }) => {
            bail!("DST {}: give the tag to write: oci:DIR:TAG", o.dst)
        }
        (None, _) => {}
    }
    let mut a = Args::try_parse_from(argv).context("obdconv arguments")?;
    a.insecure = o.skip_verify;
    a.plain = o.plain_http;
    a.username = o.user;
    a.dest_creds = o.dest_creds;
    a.root_ca = o.tlscacert.into_iter().collect();
    match (o.tlscert, o.tlskey) {
        (Some(c), Some(k)) => a.client_cert = vec![format!("{}:{}", c.display(), k.display())],
        (None, None) => {}
        _ => bail!("--tlscert and --tlskey go together"),
    }
    a.hosts_dir = o.hosts_dir;
    if o.fstype.contains(';') {
        // Mount and mkfs options: `ctr obdconv` makes and fills the ext4 with the
        // kernel's tools, which is what they configure.
        a.engine.engine = obdtools::engine::EngineKind::Kernel;
    }
    a.fstype = o.fstype;
    if let Some(dsn) = o.dbstr {
        a.db_type = "mysql".into();
        a.db_str = Some(dsn);
    }
    a.algorithm = o.algorithm;
    a.block_size = o.bs;
    a.vsize = o.vsize;
    a.verbose = o.http_dump || o.http_trace;
    a.oci = o.oci;
    a.compress = o.compress;
    Ok(a)
}
