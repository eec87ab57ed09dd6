//! Opening a lower layer file whatever its wrapping.
//!
//! A lower may be a sealed LSMT blob, a ZFile holding one, and either may be
//! wrapped in a one-entry tar (`overlaybd.commit`). [`open_layer`] peels the
//! tar wrapper and the ZFile so the LSMT reader sees plain blob bytes.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::io::IoFile;
use crate::lsmt::SealedLayer;
use crate::source::{FileSlice, ReadAt, SubSource};
use crate::zfile::{is_zfile, ZFileReader};

/// How a layer file is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wrapping {
    /// Offset and length of the blob inside a tar wrapper, if any.
    pub tar: Option<(u64, u64)>,
    /// Whether the blob is ZFile-compressed.
    pub zfile: bool,
}

/// Open a (possibly tar-wrapped) ZFile.
pub fn open_zfile(path: &Path) -> Result<ZFileReader> {
    // A FIFO would block the open until a writer came; a directory says so.
    crate::io::check_regular(path, "a ZFile")?;
    let file = Arc::new(IoFile::open(path)?);
    let whole = FileSlice::whole(file.clone())?;
    if whole.size() == 0 {
        return Err(crate::Error::corrupt(
            path,
            "ZFile",
            "the file is empty (0 bytes): not a ZFile",
        ));
    }
    let tar = match crate::tarwrap::detect(&whole) {
        Ok(t) => t,
        // A tar, but not the one-file wrapper (say, a layer tar).
        Err(crate::Error::Corrupt {
            format: "tar wrapper",
            msg,
            ..
        }) => {
            return Err(crate::Error::corrupt(
                path,
                "ZFile",
                format!("not a ZFile, nor a tar-wrapped ZFile: a tar, but {msg}"),
            ))
        }
        Err(e) => return Err(e),
    };
    let slice = match tar {
        Some((base, len)) => FileSlice::new(file, base, len),
        None => whole,
    };
    if !is_zfile(&slice)? {
        let msg = if tar.is_some() {
            "not a tar-wrapped ZFile: the file in the tar is not a ZFile (bad header magic)"
        } else {
            "not a ZFile (bad header magic)"
        };
        return Err(crate::Error::corrupt(path, "ZFile", msg));
    }
    ZFileReader::open(Box::new(slice))
}

/// Open `path` and return the plain LSMT blob it holds, plus its wrapping.
pub fn open_blob(path: &Path) -> Result<(Arc<dyn ReadAt>, Wrapping)> {
    crate::io::check_regular(path, "a layer file")?;
    let file = Arc::new(IoFile::open(path)?);
    let whole = FileSlice::whole(file.clone())?;
    let tar = crate::tarwrap::detect(&whole)?;
    let slice = match tar {
        Some((base, len)) => FileSlice::new(file, base, len),
        None => whole,
    };
    if is_zfile(&slice)? {
        let z = ZFileReader::open(Box::new(slice))?;
        Ok((Arc::new(z), Wrapping { tar, zfile: true }))
    } else {
        Ok((Arc::new(slice), Wrapping { tar, zfile: false }))
    }
}

/// Open a sealed lower layer file (plain, ZFile, tar-wrapped).
pub fn open_layer(path: &Path) -> Result<SealedLayer> {
    let (blob, _) = open_blob(path)?;
    SealedLayer::open(blob)
}

/// The plain LSMT blob inside layer bytes read through any source (tar
/// wrapper and ZFile peeled as [`open_blob`] does), plus its wrapping.
pub fn open_blob_source(src: Arc<dyn ReadAt>) -> Result<(Arc<dyn ReadAt>, Wrapping)> {
    let tar = crate::tarwrap::detect(src.as_ref())?;
    let inner: Arc<dyn ReadAt> = match tar {
        Some((base, len)) => Arc::new(SubSource::new(src, base, len)),
        None => src,
    };
    if is_zfile(inner.as_ref())? {
        let len = inner.size();
        let z = ZFileReader::open(Box::new(SubSource::new(inner, 0, len)))?;
        Ok((Arc::new(z), Wrapping { tar, zfile: true }))
    } else {
        Ok((inner, Wrapping { tar, zfile: false }))
    }
}

/// Open a sealed lower layer from its bytes as stored, read through any
/// source (plain, ZFile, tar-wrapped: peeled as [`open_layer`] does).
pub fn open_layer_source(src: Arc<dyn ReadAt>) -> Result<SealedLayer> {
    SealedLayer::open(open_blob_source(src)?.0)
}
