//! What a mount serves: a layer stack described by layer files, an overlaybd
//! `config.json`, or a converted image in an OCI layout, plus an optional
//! writable upper.
//!
//! The seam for other sources is [`LayerBlob`]: a lower layer is either a
//! local file or any [`ReadAt`] presenting the blob bytes as stored (tar
//! wrapper, ZFile and LSMT are peeled by `blockdev::layer::open_layer_source`,
//! exactly as for files). A lazily
//! fetched registry blob (HTTP range requests behind a `ReadAt`) is the
//! second kind and needs nothing else from this module.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::layer::{open_layer, open_layer_source};
use blockdev::lsmt::{SealedLayer, WritableLayer};
use blockdev::source::ReadAt;
use blockdev::stack::{Lower, Stack};
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

/// A layer stack to mount.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Lower layers, bottom first.
    pub lowers: Vec<LayerBlob>,
    /// Writable upper: data and index files.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// A one-line description for messages.
    pub description: String,
}

impl ImageSpec {
    /// Interpret the command line's sources: one `config.json` (lowers and
    /// upper), one `oci:DIR[:TAG]` (a converted image), or layer files
    /// (bottom first). `upper` adds (or, for a config, replaces) the
    /// writable layer.
    pub fn from_args(inputs: &[String], upper: Option<(PathBuf, PathBuf)>) -> Result<ImageSpec> {
        if inputs.is_empty() {
            return Err(Error::Usage(
                "no layers, config.json or oci:DIR given".into(),
            ));
        }
        if inputs.len() == 1 {
            let a = &inputs[0];
            if let Some(rest) = a.strip_prefix("oci:") {
                let (dir, tag) = crate::oci::split_ref(rest);
                let files = crate::oci::layer_blobs(&dir, tag.as_deref())?;
                let description = format!(
                    "image oci:{}{} ({} layers)",
                    dir.display(),
                    tag.map(|t| format!(":{t}")).unwrap_or_default(),
                    files.len()
                );
                return Ok(ImageSpec {
                    lowers: files.into_iter().map(LayerBlob::File).collect(),
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
                let upper = upper.or(cfg.upper.map(|u| (u.data, u.index)));
                return Ok(ImageSpec {
                    description: format!("image config {a} ({} lowers)", cfg.lowers.len()),
                    lowers: cfg.lowers.into_iter().map(LayerBlob::File).collect(),
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
            lowers.push(LayerBlob::File(p.to_path_buf()));
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
            .map(|l| l.open().map(Lower::Sealed))
            .collect::<Result<Vec<_>>>()?;
        let upper = match &self.upper {
            Some((d, i)) => {
                let open = if writable {
                    WritableLayer::open
                } else {
                    WritableLayer::open_read_only
                };
                Some(open(d, i).map_err(|source| Error::Stack {
                    what: format!(
                        "cannot open the upper layer {} / {}",
                        d.display(),
                        i.display()
                    ),
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
