//! What a mount serves: a layer stack described by layer files, an overlaybd
//! `config.json` (TurboOCI lowers and upper included), or a converted image
//! (native or TurboOCI) in an OCI layout or a registry (read lazily), plus
//! an optional writable upper.
//!
//! The seam for other sources is [`LayerBlob`]: a lower layer is either a
//! local file or any [`ReadAt`] presenting the blob bytes as stored (tar
//! wrapper, ZFile and LSMT are peeled by `blockdev::layer::open_blob_source`,
//! exactly as for files). A TurboOCI lower ([`LowerSpec::target`]) adds its
//! target, the uncompressed layer tar, again as paths or as any [`ReadAt`].
//! A lazily fetched registry blob ([`crate::remote::RemoteBlob`], HTTP range
//! requests behind a `ReadAt`) needs nothing else from this module.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::io::IoFile;
use blockdev::layer::{open_layer, open_layer_source};
use blockdev::lsmt::{SealedLayer, WritableLayer};
use blockdev::source::{FileSlice, ReadAt};
use blockdev::stack::{Lower, Stack};
use blockdev::warp::{TargetSource, WarpLayer};
use blockdev::ImageConfig;

use crate::chunkcache::ChunkCache;
use crate::error::{Error, Result};
use crate::layers::{lowers, LayerDesc};
use crate::layout::{split_ref, LayoutStore};
use crate::reference::RemoteRef;
use crate::remote::{FetchOptions, FetchStats, RegistryStore};

/// How to reach a registry and where to cache what is fetched.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Registry client options (TLS, credentials, retries).
    pub client: obdregistry::ClientOptions,
    /// How blobs are fetched.
    pub fetch: FetchOptions,
    /// The chunk cache directory (a temporary one if `None`).
    pub cache_dir: Option<PathBuf>,
    /// The chunk cache's budget in bytes.
    pub cache_size: u64,
    /// Fetch and cache granularity.
    pub chunk_size: u64,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            client: Default::default(),
            fetch: Default::default(),
            cache_dir: None,
            cache_size: 1 << 30,
            chunk_size: 64 << 10,
        }
    }
}

/// The bytes of one lower layer.
#[derive(Clone)]
pub enum LayerBlob {
    /// A layer file: sealed LSMT, ZFile, either of them tar-wrapped.
    File(PathBuf),
    /// The same formats read through any random-access source.
    Source(Arc<dyn ReadAt>),
}

impl std::fmt::Debug for LayerBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerBlob::File(p) => write!(f, "File({})", p.display()),
            LayerBlob::Source(s) => write!(f, "Source({}, {} bytes)", s.path().display(), s.size()),
        }
    }
}

impl LayerBlob {
    /// The blob's bytes as stored.
    pub fn source(&self) -> Result<Arc<dyn ReadAt>> {
        match self {
            LayerBlob::File(p) => {
                let f = blockdev::io::check_regular(p, "a layer file")
                    .and_then(|()| IoFile::open(p))
                    .map_err(stack_err("cannot open layer", p))?;
                let s = FileSlice::whole(Arc::new(f)).map_err(stack_err("cannot open layer", p))?;
                Ok(Arc::new(s))
            }
            LayerBlob::Source(s) => Ok(s.clone()),
        }
    }

    fn name(&self) -> PathBuf {
        match self {
            LayerBlob::File(p) => p.clone(),
            LayerBlob::Source(s) => s.path().to_path_buf(),
        }
    }

    /// Open the sealed layer inside.
    pub fn open(&self) -> Result<SealedLayer> {
        match self {
            LayerBlob::File(p) => open_layer(p).map_err(stack_err("cannot open layer", p)),
            LayerBlob::Source(s) => {
                open_layer_source(s.clone()).map_err(stack_err("cannot open layer", s.path()))
            }
        }
    }
}

/// An [`Error::Stack`] saying `what` about `path`: `what PATH: cause`, or
/// `what: cause` when the cause already begins with the path (an I/O or
/// format error on that file), so that the path is said once.
fn stack_err<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(blockdev::Error) -> Error + 'a {
    move |source| {
        let named = source
            .to_string()
            .strip_prefix(&*path.to_string_lossy())
            .is_some_and(|rest| rest.starts_with(':'));
        Error::Stack {
            what: if named {
                what.to_string()
            } else {
                format!("{what} {}", path.display())
            },
            source,
        }
    }
}

/// `n` and `what`, plural unless `n` is 1 ("1 layer", "3 layers").
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The target of a TurboOCI layer: the layer tar its file data lives in.
#[derive(Clone)]
pub enum Target {
    /// A local blob (tar, or gzip with its `gzip.meta`), as config.json names it.
    Paths(TargetSource),
    /// Already the uncompressed tar stream.
    Tar(Arc<dyn ReadAt>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Paths(t) => write!(f, "Paths({t:?})"),
            Target::Tar(s) => write!(f, "Tar({}, {} bytes)", s.path().display(), s.size()),
        }
    }
}

impl Target {
    /// Open the uncompressed tar stream.
    pub fn open(&self) -> Result<Arc<dyn ReadAt>> {
        match self {
            Target::Paths(t) => t
                .open()
                .map_err(stack_err("cannot open the TurboOCI target", &t.file)),
            Target::Tar(s) => Ok(s.clone()),
        }
    }
}

/// One lower layer: a native overlaybd layer, or the metadata layer of a
/// TurboOCI layer with its target.
#[derive(Debug, Clone)]
pub struct LowerSpec {
    /// The layer blob (for TurboOCI, the `<fs>.fs.meta`).
    pub blob: LayerBlob,
    /// TurboOCI: where the file data lives.
    pub target: Option<Target>,
}

impl LowerSpec {
    /// A native layer.
    pub fn layer(blob: LayerBlob) -> Self {
        LowerSpec { blob, target: None }
    }

    /// Open the layer for a stack.
    pub fn open(&self) -> Result<Lower> {
        let Some(t) = &self.target else {
            return self.blob.open().map(Lower::Sealed);
        };
        let target = t.open()?;
        let w = WarpLayer::open_source(self.blob.source()?, target)
            .map_err(stack_err("cannot open TurboOCI layer", &self.blob.name()))?;
        Ok(Lower::Warp(w))
    }
}

/// A writable upper layer: data and index files, and for a TurboOCI upper
/// (`overlaybd-create --turboOCI`) its target.
#[derive(Debug, Clone)]
pub struct UpperSpec {
    pub data: PathBuf,
    pub index: PathBuf,
    pub target: Option<TargetSource>,
}

/// Whether a lone command-line source names an image (`oci:DIR[:TAG]`, or
/// a registry reference: not an existing file, not a `.json`, and parses
/// as `host/repo[:tag|@digest]`) rather than a layer file or config.
pub fn is_image_argument(a: &str) -> bool {
    a.starts_with("oci:") || registry_ref(a).is_some()
}

/// A missing path that reads as a registry reference: its first component
/// names a host as Docker's rule has it (a `.` or `:` in it, or `localhost`),
/// so that a mistyped layer path (`layers/base.lsmt`) is reported as a missing
/// file instead of being fetched from a host called `layers`.
fn registry_ref(a: &str) -> Option<RemoteRef> {
    let host = a.split('/').next().unwrap_or_default();
    let hostlike = host.contains('.') || host.contains(':') || host == "localhost";
    if !hostlike || !a.contains('/') || Path::new(a).exists() || is_config_file(Path::new(a)) {
        return None;
    }
    RemoteRef::parse(a).ok()
}

/// For a request that ran out of time: how long each attempt had and how
/// many there were (the options that set them: `--timeout`, `--retries`).
fn timed_out_note(e: &obdregistry::Error, opts: &obdregistry::ClientOptions) -> String {
    if !e.is_timeout() {
        return String::new();
    }
    format!(
        " (no answer within {} s, {} attempts; see --timeout and --retries)",
        opts.stall_timeout.as_secs_f64(),
        u64::from(opts.retries) + 1
    )
}

/// Refuse a command-line source that is not an existing regular file where
/// a layer file is expected: a FIFO, a directory or a device would block or
/// fail when the layer is opened ([`blockdev::io::check_regular_with`]).
pub fn check_layer_file(a: &str) -> Result<()> {
    use blockdev::io::NotRegular;
    blockdev::io::check_regular_with(Path::new(a), |why| {
        Some(Error::Usage(match why {
            NotRegular::Missing => format!(
                "{a}: no such file (a registry image is named HOST/REPO[:TAG], its host with a '.' or ':', or localhost)"
            ),
            NotRegular::Is(kind) => format!(
                "{a}: not a layer file: it is {kind} (sources are layer files, one config.json, one \
                 oci:DIR[:TAG], or one image reference HOST/REPO[:TAG|@DIGEST])"
            ),
        }))
    })
}

/// Whether a lone command-line source is an overlaybd `config.json`: its
/// name ends in `.json` (any case), or it is a regular file whose first
/// non-blank byte is `{` (no layer file starts so).
pub fn is_config_file(p: &Path) -> bool {
    if p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        return true;
    }
    if !p.is_file() {
        return false;
    }
    let mut head = [0u8; 64];
    let n = std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    head[..n]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// A layer stack to mount.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Lower layers, bottom first.
    pub lowers: Vec<LowerSpec>,
    /// Writable upper.
    pub upper: Option<UpperSpec>,
    /// A one-line description for messages.
    pub description: String,
    /// For a registry image: the fetch counters.
    pub fetch_stats: Option<Arc<FetchStats>>,
}

impl ImageSpec {
    /// Interpret the command line's sources: one `config.json` (lowers and
    /// upper), one `oci:DIR[:TAG]` (a converted image), one image reference
    /// (`host/repo:tag`, `host/repo@sha256:...`: any single argument that is
    /// neither an existing file nor an `oci:` path), or layer files (bottom
    /// first). `upper` adds (or, for a config, replaces) the writable layer.
    pub fn from_args(
        inputs: &[String],
        upper: Option<(PathBuf, PathBuf)>,
        remote: &RemoteOptions,
    ) -> Result<ImageSpec> {
        let upper = upper.map(|(data, index)| UpperSpec {
            data,
            index,
            target: None,
        });
        if inputs.is_empty() {
            return Err(Error::Usage(
                "no layers, config.json, oci:DIR or image reference given".into(),
            ));
        }
        if inputs.len() == 1 {
            let a = &inputs[0];
            if let Some(rest) = a.strip_prefix("oci:") {
                let (dir, tag) = split_ref(rest);
                let store = LayoutStore::open(&dir)?;
                let layers = store.layers(tag.as_deref())?;
                let (lowers, kind) = lowers(&layers, &store)?;
                let description = format!(
                    "{kind} image oci:{}{} ({})",
                    dir.display(),
                    tag.map(|t| format!(":{t}")).unwrap_or_default(),
                    count(lowers.len(), "layer")
                );
                return Ok(ImageSpec {
                    lowers,
                    upper,
                    description,
                    fetch_stats: None,
                });
            }
            if let Some(r) = registry_ref(a) {
                return Self::from_registry(&r, upper, remote);
            }
            if is_config_file(Path::new(a)) {
                let p = Path::new(a);
                let cfg = ImageConfig::load(p).map_err(stack_err("cannot read image config", p))?;
                // A lower that is missing (or not a file) is named with the config
                // that names it.
                let what = format!("image config {a}: cannot open layer");
                for f in &cfg.lowers {
                    std::fs::metadata(f)
                        .map_err(|e| blockdev::Error::io(f, e))
                        .and_then(|_| blockdev::io::check_regular(f, "a layer file"))
                        .map_err(stack_err(&what, f))?;
                }
                let upper = upper.or(cfg.upper.clone().map(|u| UpperSpec {
                    data: u.data,
                    index: u.index,
                    target: u.target,
                }));
                let turbo = cfg.lower_targets.iter().any(|t| t.is_some());
                let lowers = cfg
                    .lowers
                    .iter()
                    .zip(&cfg.lower_targets)
                    .map(|(f, t)| LowerSpec {
                        blob: LayerBlob::File(f.clone()),
                        target: t.clone().map(Target::Paths),
                    })
                    .collect::<Vec<_>>();
                return Ok(ImageSpec {
                    description: format!(
                        "image config {a} ({})",
                        count(lowers.len(), if turbo { "TurboOCI lower" } else { "lower" })
                    ),
                    lowers,
                    upper,
                    fetch_stats: None,
                });
            }
        }
        let mut lowers = Vec::new();
        for a in inputs {
            check_layer_file(a)?;
            lowers.push(LowerSpec::layer(LayerBlob::File(PathBuf::from(a))));
        }
        Ok(ImageSpec {
            description: format!("layer stack ({})", count(lowers.len(), "layer")),
            lowers,
            upper,
            fetch_stats: None,
        })
    }

    /// A converted image in a registry: its manifest (through an index to
    /// this machine's platform) is fetched now, its blobs lazily.
    pub fn from_registry(
        r: &RemoteRef,
        upper: Option<UpperSpec>,
        remote: &RemoteOptions,
    ) -> Result<ImageSpec> {
        let reg_err = |what: String| {
            move |source: obdregistry::Error| Error::Registry {
                what: format!("{what}{}", timed_out_note(&source, &remote.client)),
                source,
            }
        };
        let registry = obdregistry::Registry::new(&r.host, &remote.client).map_err(reg_err(
            format!("{}: cannot set up the registry client", r.host),
        ))?;
        let repo = registry.repository(&r.repository);
        let mut reference = r.reference.clone();
        let mut layers: Option<Vec<LayerDesc>> = None;
        for _ in 0..4 {
            let (desc, bytes) = repo
                .get_manifest(&reference)
                .map_err(reg_err(format!("cannot fetch the manifest of {r}")))?;
            let what = format!("{r}: {}", desc.digest);
            let oci_err = |source| Error::Oci {
                what: what.clone(),
                source,
            };
            if obdoci::model::is_index(&desc.media_type) {
                let idx: obdoci::Index =
                    obdoci::model::parse_json(&what, &bytes).map_err(oci_err)?;
                let pick = crate::layers::pick_manifest(&idx).ok_or_else(|| {
                    Error::Usage(format!(
                        "{what}: the index has no linux/{} image",
                        crate::layers::host_arch()
                    ))
                })?;
                reference = obdoci::Reference::Digest(pick.digest.clone());
                continue;
            }
            let m: obdoci::Manifest = obdoci::model::parse_json(&what, &bytes).map_err(oci_err)?;
            layers = Some(m.layers.iter().map(LayerDesc::from).collect());
            break;
        }
        let layers =
            layers.ok_or_else(|| Error::Usage(format!("{r}: indexes nested too deeply")))?;
        let cache = ChunkCache::new(
            remote.cache_dir.as_deref(),
            remote.cache_size,
            remote.chunk_size,
        )?;
        let stats = Arc::new(FetchStats::default());
        let store = RegistryStore::new(repo, cache.clone(), remote.fetch.clone(), stats.clone());
        let (lowers, kind) = lowers(&layers, &store)?;
        // Every blob is open: a temporary cache directory can go now.
        cache.unlink_temporary();
        tracing::info!("lazy: {r} opened: {}", stats.summary());
        Ok(ImageSpec {
            description: format!(
                "{kind} image {r} ({}, lazily fetched)",
                count(lowers.len(), "layer")
            ),
            lowers,
            upper,
            fetch_stats: Some(stats),
        })
    }

    /// Open the stack. The upper (if any) is opened for writing only when
    /// `writable`.
    pub fn open(&self, writable: bool) -> Result<Arc<Stack>> {
        // Before any layer opens (or a thread starts for each).
        blockdev::stack::check_lower_count(self.lowers.len()).map_err(|source| Error::Stack {
            what: format!("cannot stack {}", self.description),
            source,
        })?;
        // Layers open concurrently: for a registry image each one costs
        // round trips (header, trailer, index).
        let lowers = if self.fetch_stats.is_some() && self.lowers.len() > 1 {
            std::thread::scope(|s| {
                let opening: Vec<_> = self
                    .lowers
                    .iter()
                    .map(|l| s.spawn(move || l.open()))
                    .collect();
                opening
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect::<Result<Vec<_>>>()
            })?
        } else {
            self.lowers
                .iter()
                .map(LowerSpec::open)
                .collect::<Result<Vec<_>>>()?
        };
        let upper = match &self.upper {
            Some(u) => {
                let (d, i) = (&u.data, &u.index);
                let what = || {
                    format!(
                        "cannot open the upper layer {} / {}",
                        d.display(),
                        i.display()
                    )
                };
                let layer = match &u.target {
                    Some(t) => {
                        let target = Target::Paths(t.clone()).open()?;
                        WritableLayer::open_warp(d, i, Some(target), !writable)
                    }
                    None if writable => WritableLayer::open(d, i),
                    None => WritableLayer::open_read_only(d, i),
                };
                Some(layer.map_err(|source| Error::Stack {
                    what: what(),
                    source,
                })?)
            }
            None => None,
        };
        let stack = Stack::with_lowers(lowers, upper).map_err(|source| Error::Stack {
            what: format!("cannot stack {}", self.description),
            source,
        })?;
        Ok(Arc::new(stack))
    }
}
