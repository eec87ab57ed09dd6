//! TurboOCI ("warp") layers: LSMT layers whose file data stays in the
//! original OCI layer tar.
//!
//! A sealed warp layer (`<fs>.fs.meta`, made by `overlaybd-commit
//! --turboOCI`) is an ordinary sealed LSMT blob (possibly ZFile-compressed)
//! whose index entries keep their tag byte: tag 0 entries hold filesystem
//! metadata in the blob itself, tag 1 entries point at `moffset * 512` in
//! the layer's **target**, the uncompressed layer tar. Nothing in the blob
//! marks it as a warp layer: a config lower is one when it names a
//! `targetFile` (and, for a gzip layer, the `gzipIndex` that makes the gzip
//! blob readable at any offset, see [`crate::gzindex`]).
//!
//! The writable form (`overlaybd-create --turboOCI`) is a mode of
//! [`WritableLayer`](crate::lsmt::WritableLayer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gzindex::{self, GzFile};
use crate::io::IoFile;
use crate::layer::open_blob;
use crate::lsmt::format::{sector_bytes, Mapping, SECTOR};
use crate::lsmt::index::{pieces, Piece};
use crate::lsmt::writable::{TAG_FS_META, TAG_TARGET};
use crate::lsmt::SealedLayer;
use crate::source::{FileSlice, ReadAt};

/// Where a warp layer's target (its uncompressed layer tar) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSource {
    /// The layer blob: a tar, or a gzip blob when `gzip_index` is given.
    pub file: PathBuf,
    /// The `gzip.meta` index of a gzip blob.
    pub gzip_index: Option<PathBuf>,
}

impl TargetSource {
    /// An uncompressed tar target.
    pub fn tar(file: impl Into<PathBuf>) -> Self {
        TargetSource {
            file: file.into(),
            gzip_index: None,
        }
    }

    /// A gzip blob read through its index.
    pub fn gzip(file: impl Into<PathBuf>, index: impl Into<PathBuf>) -> Self {
        TargetSource {
            file: file.into(),
            gzip_index: Some(index.into()),
        }
    }

    /// Open the target as the uncompressed tar stream.
    pub fn open(&self) -> Result<Arc<dyn ReadAt>> {
        if let Some(idx) = &self.gzip_index {
            return Ok(Arc::new(GzFile::open_paths(&self.file, idx)?));
        }
        crate::io::check_regular(&self.file, "a layer tar")?;
        let f = Arc::new(IoFile::open(&self.file)?);
        let src = FileSlice::whole(f)?;
        let mut head = [0u8; 2];
        let n = src.read_at(&mut head, 0)?;
        if gzindex::is_gzip(&head[..n]) {
            return Err(Error::Invalid(format!(
                "target {} is gzip-compressed but no gzipIndex is given to read it",
                self.file.display()
            )));
        }
        Ok(Arc::new(src))
    }
}

/// An opened sealed warp layer with its target.
pub struct WarpLayer {
    meta: SealedLayer,
    target: Arc<dyn ReadAt>,
}

impl std::fmt::Debug for WarpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarpLayer")
            .field("meta", &self.meta)
            .field("target", &self.target.path())
            .finish()
    }
}

impl WarpLayer {
    /// Open the sealed warp layer `file` (plain, ZFile or tar-wrapped) with
    /// its target. Every tag-1 entry must lie inside the target.
    pub fn open(file: &Path, target: &TargetSource) -> Result<WarpLayer> {
        let (blob, _) = open_blob(file)?;
        let meta = SealedLayer::open_warp(blob)?;
        let target = target.open()?;
        Self::with_target(meta, target)
    }

    /// Open a sealed warp layer from its bytes as stored, read through any
    /// source (plain, ZFile, tar-wrapped), with its target already opened
    /// as the uncompressed layer tar.
    pub fn open_source(meta: Arc<dyn ReadAt>, target: Arc<dyn ReadAt>) -> Result<WarpLayer> {
        let (blob, _) = crate::layer::open_blob_source(meta)?;
        Self::with_target(SealedLayer::open_warp(blob)?, target)
    }

    /// Pair an opened warp layer with an opened target.
    pub fn with_target(meta: SealedLayer, target: Arc<dyn ReadAt>) -> Result<WarpLayer> {
        let tsize = target.size();
        for (i, m) in meta.index().entries().iter().enumerate() {
            if m.tag == TAG_TARGET && sector_bytes(m.mend()) > u128::from(tsize) {
                return Err(Error::corrupt(
                    meta.source().path(),
                    "TurboOCI layer",
                    format!(
                        "index entry {i} maps target bytes {}..{} past the end of the layer tar {} ({tsize} bytes)",
                        sector_bytes(m.moffset),
                        sector_bytes(m.mend()),
                        target.path().display()
                    ),
                ));
            }
        }
        Ok(WarpLayer { meta, target })
    }

    pub fn meta(&self) -> &SealedLayer {
        &self.meta
    }

    pub fn target(&self) -> &Arc<dyn ReadAt> {
        &self.target
    }

    /// The index as seen by a stack: every entry maps onto itself, so the
    /// stack hands reads back to [`Self::read_logical`].
    pub fn identity_entries(&self) -> Vec<Mapping> {
        self.meta
            .index()
            .entries()
            .iter()
            .map(|m| Mapping {
                moffset: m.offset,
                tag: 0,
                ..*m
            })
            .collect()
    }

    /// Read `buf` (sector aligned) at logical byte `offset` of this layer:
    /// tag-0 ranges from the meta blob, tag-1 ranges from the target,
    /// unmapped ranges as zeros.
    pub fn read_logical(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = offset / SECTOR;
        let n = buf.len() as u64 / SECTOR;
        let maps = self.meta.index().lookup(s, n);
        for p in pieces(s, n, &maps) {
            match p {
                Piece::Hole { offset: o, len } => {
                    let a = ((o - s) * SECTOR) as usize;
                    buf[a..a + (len * SECTOR) as usize].fill(0);
                }
                Piece::Mapped(m) => {
                    let a = ((m.offset - s) * SECTOR) as usize;
                    let b = &mut buf[a..a + m.length as usize * SECTOR as usize];
                    if m.zeroed {
                        b.fill(0);
                    } else if m.tag == TAG_FS_META {
                        self.meta.read_mapped(b, m.moffset)?;
                    } else {
                        self.target.read_exact_at(b, m.moffset * SECTOR)?;
                    }
                }
            }
        }
        Ok(())
    }
}
