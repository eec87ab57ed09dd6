//! Output formats: what a converted image is made of. The pipeline ([`crate::pipeline`])
//! walks the source image, fetches every source layer once and schedules the layers; an
//! [`OutputFormat`] says what becomes of them. One run can build several formats from
//! the same downloads (`--overlaybd A --turboOCI B`).
//!
//! The contract, in the order the pipeline uses it:
//! * before any work: [`OutputFormat::check`] (its options) and
//!   [`OutputFormat::check_layer`] (every source layer of every manifest);
//! * per platform manifest: [`OutputFormat::begin`] makes a [`LayerChain`], the state of
//!   one bottom-up layer stack (its lowers);
//! * per layer, bottom-up and one at a time: [`LayerChain::apply`] consumes the source
//!   layer ([`LayerInput`]: a stream that follows the download, or the complete file) and
//!   returns a [`SealJob`]. A format with a [`OutputFormat::lookahead`] gets each layer's
//!   input that many layers early in [`OutputFormat::prepare`], which may start reading
//!   it on threads of its own while the layers below are applied. The pipeline runs the
//!   seal on another thread while the next layer is applied on top of this one's
//!   unsealed files, then tells the chain ([`LayerChain::sealed`]) so it can swap that
//!   lower for the sealed file;
//! * a layer found in the dedup database is taken over as [`OutputFormat::reuse`] says:
//!   by descriptor alone, or by downloading its converted blob, then
//!   [`LayerChain::reused`]; or it is converted again;
//! * what to push: each [`Sealed`] blob with its descriptor; the source layers too when
//!   the format references them ([`OutputFormat::references_source_layers`]); and
//!   [`OutputFormat::base_layers`] below the image's layers;
//! * the manifest and config are finished by the pipeline from the layers' descriptors
//!   and diff IDs ([`LayerOut`]), with [`OutputFormat::artifact_type`] for `--referrer`;
//! * dedup rows are namespaced by [`OutputFormat::dedup_format_key`], so formats never
//!   share rows.
//!
//! Implementations: [`native::NativeFormat`] (overlaybd layers, ZFile in a tar) and
//! [`turbo::TurboFormat`] (TurboOCI v1: filesystem metadata mapping file data into the
//! original layer blobs, which stay in the repository).

pub mod gotar;
pub mod native;
pub mod turbo;

use crate::dedup::Reused;
use crate::follow::Follow;
use crate::Abort;
use crate::{Error, Result};
use obdoci::{Descriptor, Digest};
use std::any::Any;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use native::NativeFormat;
pub use turbo::TurboFormat;

/// Every format's [`OutputFormat::name`] (the names a run's files may carry).
pub const FORMAT_NAMES: &[&str] = &["overlaybd", "turboOCI"];

/// An output image format.
pub trait OutputFormat: Send + Sync {
    /// Short name: names the format in messages and, when a run builds several
    /// formats, its subdirectory of each layer's work directory.
    fn name(&self) -> &'static str;

    /// `artifactType` of converted manifests and indexes (`--referrer`).
    fn artifact_type(&self) -> &'static str;

    /// The dedup database namespace of this format with its options: everything that
    /// changes the converted bytes.
    fn dedup_format_key(&self) -> Result<String>;

    /// Checks the format's options before any work.
    fn check(&self) -> Result<()>;

    /// Refuses a source layer this format cannot convert (checked for every layer of a
    /// manifest before any of its work); the error says why (the caller names the
    /// layer).
    fn check_layer(&self, layer: &Descriptor) -> std::result::Result<(), String>;

    /// Whether the converted image reads the source layers at run time: they must then
    /// be in the destination repository too (mounted or copied there).
    fn references_source_layers(&self) -> bool {
        false
    }

    /// How a layer found in the dedup database is taken over. `needed_as_lower`: a layer
    /// above it is converted and applies on top of it.
    fn reuse(&self, needed_as_lower: bool) -> Reuse;

    /// How many layers above the one being applied [`OutputFormat::prepare`] gets early
    /// (0, the default: none, each layer is read by its apply).
    fn lookahead(&self) -> usize {
        0
    }

    /// A layer's input, handed over before the layers below it are applied (at most
    /// [`OutputFormat::lookahead`] layers ahead, in order): the format may start reading
    /// it on threads of its own, with bounded memory, and leave what it started in
    /// `input` ([`LayerInput::set_prepared`]) for [`LayerChain::apply`]. The result must
    /// not depend on whether or when a layer was prepared.
    fn prepare(&self, _job: &LayerJob<'_>, _input: &mut LayerInput<'_>) -> Result<()> {
        Ok(())
    }

    /// Per-manifest setup: the chain that applies this manifest's layers.
    fn begin<'a>(&'a self, job: &ManifestJob<'a>) -> Result<Box<dyn LayerChain + 'a>>;

    /// Layers this format adds below the image's layers (the base layer with
    /// `--mkfs=false`): descriptor and file, pushed and prepended to the manifest's
    /// layers and the config's diff IDs (diff ID = digest). `mdir` is the manifest's
    /// work directory.
    fn base_layers(&self, mdir: &Path) -> Result<Vec<(Descriptor, PathBuf)>>;
}

/// How a layer converted before is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// By its descriptor alone; [`LayerChain::reused`] gets no file.
    Descriptor,
    /// Download the converted blob (verified) into the layer's directory under this
    /// name and give it to [`LayerChain::reused`].
    Download(&'static str),
    /// Convert the layer again.
    Convert,
}

/// One platform manifest's layers.
pub struct ManifestJob<'a> {
    /// The manifest's work directory.
    pub dir: &'a Path,
    /// The source layers, bottom first.
    pub layers: &'a [Descriptor],
    /// Chain IDs of the source layers (from the config's diff IDs).
    pub chain_ids: &'a [Digest],
}

/// One layer of a [`ManifestJob`].
pub struct LayerJob<'a> {
    /// Index of the layer, bottom = 0.
    pub index: usize,
    /// The source layer.
    pub layer: &'a Descriptor,
    /// This format's directory for the layer (created, possibly holding leftovers of an
    /// earlier run).
    pub dir: &'a Path,
}

/// The per-manifest state of a format: the stack of layers converted so far.
pub trait LayerChain: Send {
    /// Applies the layer on top of the layers before it. Called bottom-up, one layer at
    /// a time; `progress` gets the bytes of input consumed.
    fn apply(
        &mut self,
        job: &LayerJob<'_>,
        input: LayerInput<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Applied>;

    /// Work on the bottom layer that needs none of its input (the native format's
    /// mkfs), done while its source is still on the way; `job` is layer 0's. Called at
    /// most once, before the first [`LayerChain::apply`], only when layer 0 is
    /// converted.
    fn prime(&mut self, _job: &LayerJob<'_>) -> Result<()> {
        Ok(())
    }

    /// The seal of layer `index` finished ([`SealJob::seal`]); layers applied from now on
    /// read it from the sealed file.
    fn sealed(&mut self, index: usize, sealed: &Sealed);

    /// A layer converted before (see [`OutputFormat::reuse`]): `file` is its converted
    /// blob when the format asked for a download. Returns what goes into the manifest.
    fn reused(&mut self, job: &LayerJob<'_>, hit: &Reused, file: Option<&Path>)
        -> Result<LayerOut>;
}

/// A byte-position callback.
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// An applied layer, to seal.
pub struct Applied {
    pub seal: Box<dyn SealJob>,
    /// Bytes of input the apply consumed (for progress).
    pub input_bytes: u64,
}

/// Sealing an applied layer into the blob to push. Runs on its own thread while the
/// next layer is applied; at most one seal per chain runs at a time.
pub trait SealJob: Send {
    /// `progress` gets bytes done.
    fn seal(self: Box<Self>, progress: ProgressFn) -> Result<Sealed>;
}

/// A sealed layer: the blob to push and what the manifest and config say about it.
#[derive(Clone, Debug)]
pub struct Sealed {
    pub out: LayerOut,
    /// The blob file (`out.desc` describes it).
    pub blob: PathBuf,
    /// Work files to remove once no layer reads them (unless `--reserve`).
    pub scratch: Vec<PathBuf>,
    /// For the progress line.
    pub note: String,
}

/// A layer of the converted manifest.
#[derive(Clone, Debug)]
pub struct LayerOut {
    /// The layer descriptor (media type, digest, size, annotations).
    pub desc: Descriptor,
    /// Its `rootfs.diff_ids` entry: the digest of the uncompressed layer.
    pub diff_id: Digest,
}

/// A downloaded source blob shared by the formats that use it: removed when the last
/// of them drops it (unless kept, with `--reserve`).
#[derive(Debug)]
pub struct BlobFile {
    path: PathBuf,
    keep: bool,
}

impl BlobFile {
    pub(crate) fn new(path: PathBuf, keep: bool) -> Arc<BlobFile> {
        Arc::new(BlobFile { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a source layer's bytes are for one format's apply.
pub(crate) enum SourceBlob {
    /// In the source store's own directory (an OCI layout): read and verified there.
    Local(PathBuf),
    /// Being downloaded into a file (verified when the download ends).
    Downloading { file: Arc<BlobFile>, follow: Follow },
}

/// The source layer as a format's [`LayerChain::apply`] gets it: take it as a stream
/// (decompress while it downloads) or as the complete file.
pub struct LayerInput<'a> {
    pub(crate) src: &'a dyn crate::ImageStore,
    pub(crate) layer: &'a Descriptor,
    pub(crate) blob: Option<SourceBlob>,
    pub(crate) abort: &'a Abort,
    /// What [`OutputFormat::prepare`] started.
    pub(crate) prepared: Option<Box<dyn Any + Send>>,
    /// The layer's `rootfs.diff_ids` entry, when the uncompressed stream must be
    /// checked against it: with a dedup database, whose rows are keyed by chain IDs
    /// computed from these entries (a config that lies about them would otherwise
    /// store a converted layer under another layer's key, for every later image
    /// with that key to reuse), and for a layer whose digest does not vouch for its
    /// content ([`crate::ImageStore::digest_vouches_for`]).
    pub(crate) diff_id: Option<Digest>,
}

impl LayerInput<'_> {
    /// The stop signal of the conversion.
    pub fn abort(&self) -> &Abort {
        self.abort
    }

    /// The `rootfs.diff_ids` entry the uncompressed layer must match, if it is
    /// to be checked (taken: one reader checks it).
    pub fn take_diff_id(&mut self) -> Option<Digest> {
        self.diff_id.take()
    }

    /// Leaves what [`OutputFormat::prepare`] started for [`LayerChain::apply`].
    pub fn set_prepared<T: Any + Send>(&mut self, prepared: T) {
        self.prepared = Some(Box::new(prepared));
    }

    /// What [`OutputFormat::prepare`] left (if it left a `T`).
    pub fn take_prepared<T: Any + Send>(&mut self) -> Option<T> {
        let p = self.prepared.take()?;
        match p.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(p) => {
                self.prepared = Some(p);
                None
            }
        }
    }

    /// The source blob (compressed, as stored) as a stream that follows the download
    /// and fails at its end if the blob does not match its digest.
    pub fn stream(&mut self) -> Result<Box<dyn Read + Send>> {
        Ok(self.stream_and_file()?.0)
    }

    /// The source blob as a stream (as [`LayerInput::stream`]) together with the file
    /// that holds the complete blob once the stream has ended.
    pub fn stream_and_file(&mut self) -> Result<StreamAndFile> {
        match self.blob.take() {
            Some(SourceBlob::Local(p)) => Ok((self.src.open_blob(self.layer)?, p, None)),
            Some(SourceBlob::Downloading { file, follow }) => {
                let f = std::fs::File::open(file.path()).map_err(|e| Error::io(file.path(), e))?;
                let path = file.path().to_path_buf();
                let r = HoldingReader {
                    inner: follow.reader(f, self.abort.clone()),
                    _file: file.clone(),
                };
                Ok((Box::new(r), path, Some(file)))
            }
            None => Err(taken()),
        }
    }

    /// The complete source blob as a file, its digest verified; the handle keeps a
    /// downloaded file from being removed while it is held.
    pub fn file(&mut self) -> Result<(PathBuf, Option<Arc<BlobFile>>)> {
        match self.blob.take() {
            Some(SourceBlob::Local(p)) => {
                crate::pipeline::verify_file(&p, self.layer)?;
                Ok((p, None))
            }
            Some(SourceBlob::Downloading { file, follow }) => {
                follow.wait(self.abort).map_err(Error::Stream)?;
                Ok((file.path().to_path_buf(), Some(file)))
            }
            None => Err(taken()),
        }
    }
}

/// [`LayerInput::stream_and_file`]: the stream, the path of the blob's file, and the
/// handle that keeps a downloaded file from being removed while it is held.
pub type StreamAndFile = (Box<dyn Read + Send>, PathBuf, Option<Arc<BlobFile>>);

fn taken() -> Error {
    Error::Invalid("internal error: a layer input was taken twice".into())
}

/// A stream that keeps its downloaded file alive.
struct HoldingReader<R> {
    inner: R,
    _file: Arc<BlobFile>,
}

impl<R: Read> Read for HoldingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}
