//! What a mount serves: a layer stack described by layer files, an overlaybd
//! `config.json` (TurboOCI lowers and upper included), or a converted image
//! (native or TurboOCI) in an OCI layout, plus an optional writable upper.
//!
//! The seam for other sources is [`LayerBlob`]: a lower layer is either a
//! local file or any [`ReadAt`] presenting the blob bytes as stored (tar
//! wrapper, ZFile and LSMT are peeled by `blockdev::layer::open_blob_source`,
//! exactly as for files). A TurboOCI lower ([`LowerSpec::target`]) adds its
//! target, the uncompressed layer tar, again as paths or as any [`ReadAt`].
//! A lazily fetched registry blob (HTTP range requests behind a `ReadAt`)
//! needs nothing else from this module.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::io::IoFile;
use blockdev::layer::{open_layer, open_layer_source};
use blockdev::lsmt::{SealedLayer, WritableLayer};
use blockdev::source::{FileSlice, ReadAt};
use blockdev::stack::{Lower, Stack};
use blockdev::warp::{TargetSource, WarpLayer};
use blockdev::ImageConfig;

use crate::error::{Error, Result};

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
                let f = IoFile::open(p).map_err(|source| Error::Stack {
                    what: format!("cannot open layer {}", p.display()),
                    source,
                })?;
                let s = FileSlice::whole(Arc::new(f)).map_err(|source| Error::Stack {
                    what: format!("cannot open layer {}", p.display()),
                    source,
                })?;
                Ok(Arc::new(s))
            }
            LayerBlob::Source(s) => Ok(s.clone()),
        }
    }

    fn name(&self) -> String {
        match self {
            LayerBlob::File(p) => p.display().to_string(),
            LayerBlob::Source(s) => s.path().display().to_string(),
        }
    }

    /// Open the sealed layer inside.
    pub fn open(&self) -> Result<SealedLayer> {
        match self {
            LayerBlob::File(p) => open_layer(p).map_err(|source| Error::Stack {
                what: format!("cannot open layer {}", p.display()),
                source,
            }),
            LayerBlob::Source(s) => open_layer_source(s.clone()).map_err(|source| Error::Stack {
                what: format!("cannot open layer {}", s.path().display()),
                source,
            }),
        }
    }
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
            Target::Paths(t) => t.open().map_err(|source| Error::Stack {
                what: format!("cannot open the TurboOCI target {}", t.file.display()),
                source,
            }),
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
        let w =
            WarpLayer::open_source(self.blob.source()?, target).map_err(|source| Error::Stack {
                what: format!("cannot open TurboOCI layer {}", self.blob.name()),
                source,
            })?;
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

/// A layer stack to mount.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Lower layers, bottom first.
    pub lowers: Vec<LowerSpec>,
    /// Writable upper.
    pub upper: Option<UpperSpec>,
    /// A one-line description for messages.
    pub description: String,
}

impl ImageSpec {
    /// Interpret the command line's sources: one `config.json` (lowers and
    /// upper), one `oci:DIR[:TAG]` (a converted image), or layer files
    /// (bottom first). `upper` adds (or, for a config, replaces) the
    /// writable layer.
    pub fn from_args(inputs: &[String], upper: Option<(PathBuf, PathBuf)>) -> Result<ImageSpec> {
        let upper = upper.map(|(data, index)| UpperSpec {
            data,
            index,
            target: None,
        });
        if inputs.is_empty() {
            return Err(Error::Usage(
                "no layers, config.json or oci:DIR given".into(),
            ));
        }
        if inputs.len() == 1 {
            let a = &inputs[0];
            if let Some(rest) = a.strip_prefix("oci:") {
                let (dir, tag) = crate::oci::split_ref(rest);
                let layers = crate::oci::layers(&dir, tag.as_deref())?;
                let store = crate::oci::LayoutStore::new(&dir);
                let (lowers, kind) = crate::image::lowers(&layers, &store)?;
                let description = format!(
                    "{kind} image oci:{}{} ({} layers)",
                    dir.display(),
                    tag.map(|t| format!(":{t}")).unwrap_or_default(),
                    lowers.len()
                );
                return Ok(ImageSpec {
                    lowers,
                    upper,
                    description,
                });
            }
            if a.ends_with(".json") {
                let p = Path::new(a);
                let cfg = ImageConfig::load(p).map_err(|source| Error::Stack {
                    what: format!("cannot read image config {a}"),
                    source,
                })?;
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
                        "image config {a} ({} {}lowers)",
                        lowers.len(),
                        if turbo { "TurboOCI " } else { "" }
                    ),
                    lowers,
                    upper,
                });
            }
        }
        let mut lowers = Vec::new();
        for a in inputs {
            let p = Path::new(a);
            if !p.is_file() {
                return Err(Error::Usage(format!(
                    "{a}: not a layer file (sources are layer files, one config.json, or one oci:DIR[:TAG])"
                )));
            }
            lowers.push(LowerSpec::layer(LayerBlob::File(p.to_path_buf())));
        }
        Ok(ImageSpec {
            description: format!("layer stack ({} layers)", lowers.len()),
            lowers,
            upper,
        })
    }

    /// Open the stack. The upper (if any) is opened for writing only when
    /// `writable`.
    pub fn open(&self, writable: bool) -> Result<Arc<Stack>> {
        let lowers = self
            .lowers
            .iter()
            .map(LowerSpec::open)
            .collect::<Result<Vec<_>>>()?;
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
