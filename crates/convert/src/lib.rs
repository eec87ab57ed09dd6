//! The image convertor: pull an OCI/Docker image, turn every layer into an overlaybd
//! layer, push the overlaybd image. A reimplementation of upstream's userspace
//! `convertor` (accelerated-container-image `cmd/convertor`), with the per-layer chain
//! (create → mkfs/apply → commit) done in-process through `blockdev` and `obdfs`.
//!
//! Flow for one source reference:
//! * an index is converted child by child (attestations dropped, nested indexes
//!   recursed), at most `concurrency_limit` platform manifests at once;
//! * per manifest: layers download in parallel (digest-verified), then are decompressed
//!   and applied strictly bottom-up; each committed layer uploads while the next one is
//!   applied; then config and manifest are written;
//! * every manifest and index is pushed only once the whole tree has converted, the
//!   top-level object last and under the output tag, so a failed run pushes no manifest.
//!
//! Work directory (`--dir`, default `tmp_conv`):
//! ```text
//! <dir>/<n>-<os_arch[_variant]>-<manifest hex>/     per platform manifest
//!     NNNN_sha256:<source layer digest>/            per layer
//!         layer.blob (downloaded source blob), layer.tar (--reserve only),
//!         config.json, writable_data, writable_index, overlaybd.commit
//!     config.json, manifest.json                    --dump-manifest (kept)
//! <dir>/index.json                                  --dump-manifest, index sources
//! ```
//! Layer data is removed when a manifest finishes unless `--reserve`. Several
//! convertors can share `--dir`: see [`workdir`] (the binary works in a private
//! `.run-*` subdirectory unless it keeps files there).
//!
//! With a dedup database ([`Converter::with_dedup`], see [`dedup`]) a manifest converted
//! before is re-tagged instead, and layers converted before are downloaded as their
//! commit files instead of being converted.

pub mod abort;
pub mod annotations;
pub mod archive;
pub mod chain;
pub mod dedup;
mod follow;
pub mod format;
pub mod pipeline;
pub mod progress;
pub mod store;
mod tarstream;
pub mod workdir;

pub use abort::Abort;
pub use dedup::DedupTarget;
pub use format::{NativeFormat, OutputFormat, TurboFormat};
pub use obdfs::turbo::FsType;
use obdoci::ErrorKind;
pub use pipeline::{ConvertOutcome, Converter, Output};
pub use store::{open_store, open_store_in, ImageStore, LayoutStore, RegistryStore};
pub use workdir::WorkDir;

use std::path::PathBuf;

/// Conversion errors. Causes are kept as sources; show an error with
/// [`obdoci::error::Chain`] to get them on one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] obdregistry::Error),
    #[error(transparent)]
    Oci(#[from] obdoci::Error),
    #[error(transparent)]
    Blockdev(#[from] blockdev::Error),
    #[error(transparent)]
    Fs(#[from] obdfs::Error),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// Reading a blob stream failed; the stream's error names the store and the blob.
    #[error(transparent)]
    Stream(std::io::Error),
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        inner: Box<Error>,
    },
    /// A worker thread could not be started (the OS refused: thread or memory limits).
    #[error("{what}")]
    Spawn {
        what: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind of the first `io::Error` among `e`'s causes, if it has one.
fn io_kind_in(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io_kind(io));
        }
        cur = c.source();
    }
    None
}

/// The kind of an I/O error, looking into a registry or OCI error it carries.
fn io_kind(e: &std::io::Error) -> ErrorKind {
    let inner = e.get_ref();
    if let Some(r) = inner.and_then(|i| i.downcast_ref::<obdregistry::Error>()) {
        return r.kind();
    }
    if let Some(o) = inner.and_then(|i| i.downcast_ref::<obdoci::Error>()) {
        return o.kind();
    }
    ErrorKind::of_io(e)
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Adds `c` as context, except to an interruption, which stays as it is: it is not a
    /// failure of its own and is reported as "interrupted" or dropped in favour of the
    /// failure that caused it.
    pub fn context(self, c: impl Into<String>) -> Error {
        if self.is_interrupted() {
            self
        } else {
            Error::Context {
                context: c.into(),
                inner: Box::new(self),
            }
        }
    }

    /// What kind of failure this is, from its root cause.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Registry(e) => e.kind(),
            Error::Oci(e) => e.kind(),
            Error::Blockdev(blockdev::Error::Corrupt { .. } | blockdev::Error::Json { .. }) => {
                ErrorKind::Corrupt
            }
            Error::Blockdev(e) => io_kind_in(e).unwrap_or(ErrorKind::Io),
            Error::Fs(e) => io_kind_in(e).unwrap_or(ErrorKind::Invalid),
            Error::Io { error, .. } | Error::Stream(error) | Error::Spawn { error, .. } => {
                io_kind(error)
            }
            Error::Context { inner, .. } => inner.kind(),
            Error::Unsupported(_) | Error::Invalid(_) => ErrorKind::Invalid,
            Error::Interrupted => ErrorKind::Interrupted,
        }
    }

    /// Whether the root cause is an interruption (Ctrl-C or a sibling's failure).
    pub fn is_interrupted(&self) -> bool {
        self.kind() == ErrorKind::Interrupted
    }
}

/// Options of a conversion (upstream's flags, same meaning).
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Work directory (`-d/--dir`).
    pub workdir: PathBuf,
    /// OCI media types for the output (`--oci`); forced by `referrer`.
    pub oci: bool,
    /// Add `subject` and `artifactType` (`--referrer`).
    pub referrer: bool,
    /// Make the filesystem in the bottom layer (`--mkfs`, default true).
    pub mkfs: bool,
    /// Virtual device size in GB (`--vsize`, default 64), for the bottom layer.
    pub vsize_gb: u64,
    /// Append-mode instead of sparse writable files (`--disable-sparse`).
    pub disable_sparse: bool,
    /// Keep the work directory (`--reserve`).
    pub reserve: bool,
    /// Convert but push nothing (`--no-upload`).
    pub no_upload: bool,
    /// Write config/manifest/index JSON into the work directory (`--dump-manifest`).
    pub dump_manifest: bool,
    /// Platform manifests converted at once; 0 = unlimited (`--concurrency-limit`).
    pub concurrency_limit: usize,
    /// Parallel layer downloads per manifest.
    pub download_concurrency: usize,
    /// Parallel layer uploads per manifest and output: a sealed layer is pushed while
    /// the layers before it are still uploading (blobs are independent; the manifest
    /// lists them in order whatever order they land in).
    pub upload_concurrency: usize,
    /// The prebuilt base layer used when `mkfs` is false.
    pub baselayer: PathBuf,
    /// How filesystems are made and layers applied (`--engine`; libext2fs by
    /// default).
    pub engine: std::sync::Arc<dyn obdfs::Engine>,
    /// ZFile compression of committed layers (`--algorithm lz4|zstd`).
    pub zfile_algorithm: ZfileAlgorithm,
    /// ZFile block size in KiB (`--bs 4|8|16|32|64`).
    pub zfile_block_kib: u32,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            workdir: PathBuf::from("tmp_conv"),
            oci: false,
            referrer: false,
            mkfs: true,
            vsize_gb: 64,
            disable_sparse: false,
            reserve: false,
            no_upload: false,
            dump_manifest: false,
            concurrency_limit: 4,
            download_concurrency: 4,
            upload_concurrency: 3,
            baselayer: PathBuf::from("/opt/overlaybd/baselayers/ext4_64"),
            engine: std::sync::Arc::new(obdfs::Libext2fs::default()),
            zfile_algorithm: ZfileAlgorithm::Lz4,
            zfile_block_kib: 4,
        }
    }
}

/// Largest `--vsize` in GB: what a writable layer's index can address (2^50 - 1
/// sectors: the last offset marks padding), in whole GB.
pub const MAX_VSIZE_GB: u64 = (blockdev::lsmt::format::MAX_OFFSET * 512) >> 30;

/// Largest `--vsize` in GB with `--mkfs` by libext2fs ([`obdfs::mkfs::MAX_SIZE`]).
pub const MAX_MKFS_VSIZE_GB: u64 = obdfs::mkfs::MAX_SIZE >> 30;

/// Why [`MAX_MKFS_VSIZE_GB`] is the limit, for messages.
pub const MKFS_SIZE_WHY: &str = obdfs::mkfs::MAX_SIZE_WHY;

/// Version of the bytes this convertor produces. Bump it whenever a change (in the
/// LSMT/ZFile writers, mkfs, apply, the tar wrapper, ...) changes the output for the
/// same input, so the dedup database never hands out layers made by another version.
pub const FORMAT_VERSION: &str = "overlaybd-rs/1";

pub use blockdev::zfile::Algorithm as ZfileAlgorithm;

impl ConvertOptions {
    /// The ZFile options of committed layers; a block size other than 4, 8, 16, 32 or
    /// 64 KiB is refused with an error naming `--bs`.
    pub fn zfile_options(&self) -> Result<blockdev::zfile::ZfileOptions> {
        zfile_options(self.zfile_algorithm, self.zfile_block_kib)
    }

    /// The dedup format key of native overlaybd output with these options:
    /// [`FORMAT_VERSION`] plus every option that changes the converted bytes. With
    /// `--mkfs=false` the base layer's content is part of the key, since every layer is
    /// applied on top of it. (Each [`OutputFormat`] has its own key.)
    pub fn dedup_format_key(&self) -> Result<String> {
        NativeFormat::new(self).dedup_format_key()
    }
}

/// ZFile options from `--algorithm` and `--bs` (KiB); a block size other than 4, 8,
/// 16, 32 or 64 KiB is refused with an error naming `--bs`.
pub(crate) fn zfile_options(
    algorithm: ZfileAlgorithm,
    block_kib: u32,
) -> Result<blockdev::zfile::ZfileOptions> {
    let bad = || {
        Error::Invalid(format!(
            "--bs {block_kib}: the ZFile block size must be 4, 8, 16, 32 or 64 (KiB)"
        ))
    };
    let z = blockdev::zfile::ZfileOptions {
        algorithm,
        block_size: block_kib.checked_mul(1024).ok_or_else(bad)?,
        ..Default::default()
    };
    z.validate().map_err(|_| bad())?;
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config.json that does not parse is corrupt, as other corrupt blockdev input.
    #[test]
    fn unparsable_config_json_is_corrupt() {
        let e = blockdev::ImageConfig::parse("{", std::path::Path::new("c.json")).unwrap_err();
        assert_eq!(Error::Blockdev(e).kind(), ErrorKind::Corrupt);
    }

    /// A thread that cannot be started is a local failure whose OS error is
    /// the source, printed once after what failed.
    #[test]
    fn spawn_failures_keep_the_os_error() {
        let e = Error::Spawn {
            what: "cannot start a download thread",
            error: std::io::Error::from_raw_os_error(nix::libc::EAGAIN),
        }
        .context("layer 1");
        assert_eq!(e.kind(), ErrorKind::Io);
        let Error::Context { inner, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(inner.to_string(), "cannot start a download thread");
        let os = std::error::Error::source(inner.as_ref())
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the OS error is the source");
        assert_eq!(os.raw_os_error(), Some(nix::libc::EAGAIN));
        assert_eq!(
            obdoci::error::Chain(&e).to_string(),
            format!("layer 1: cannot start a download thread: {os}")
        );
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn dedup_format_key_holds_the_output_changing_options() {
        let base = ConvertOptions::default();
        let k = base.dedup_format_key().unwrap();
        assert!(k.starts_with(&format!("{FORMAT_VERSION};")), "{k}");
        let changed = [
            ConvertOptions {
                vsize_gb: 4,
                ..base.clone()
            },
            ConvertOptions {
                referrer: true,
                ..base.clone()
            },
            ConvertOptions {
                disable_sparse: true,
                ..base.clone()
            },
            ConvertOptions {
                zfile_algorithm: ZfileAlgorithm::Zstd,
                ..base.clone()
            },
            ConvertOptions {
                zfile_block_kib: 16,
                ..base.clone()
            },
        ];
        for o in &changed {
            assert_ne!(o.dedup_format_key().unwrap(), k, "{o:?}");
        }
        // Options that only change how the work is done share the key; manifest rows
        // are keyed by their media type, so --oci needs no part of its own.
        let same = ConvertOptions {
            oci: true,
            reserve: true,
            dump_manifest: true,
            concurrency_limit: 1,
            workdir: "/elsewhere".into(),
            ..base.clone()
        };
        assert_eq!(same.dedup_format_key().unwrap(), k);

        // --mkfs=false: keyed by the base layer's content.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"base one").unwrap();
        std::fs::write(&b, b"base two").unwrap();
        let nomkfs = |p: &std::path::Path| ConvertOptions {
            mkfs: false,
            baselayer: p.to_path_buf(),
            ..base.clone()
        };
        let ka = nomkfs(&a).dedup_format_key().unwrap();
        let hex = obdoci::Digest::of(b"base one").hex()[..16].to_string();
        assert!(ka.ends_with(&format!(";base={hex}")), "{ka}");
        assert_ne!(nomkfs(&b).dedup_format_key().unwrap(), ka);
        let e = nomkfs(&dir.path().join("missing"))
            .dedup_format_key()
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        // Every key is accepted by the database.
        let db = dir.path().join("db.sqlite");
        obddedup::open("sqlite", db.to_str().unwrap(), &ka)
            .unwrap()
            .unwrap();
    }
}
