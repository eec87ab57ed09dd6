//! Where images are read from and written to: a registry repository or an OCI layout
//! directory, behind one trait so the pipeline does not care which.

use super::{Error, Result};
use obdoci::layout::Layout;
use obdoci::{self as oci, Descriptor, ImageRef, Reference};
use obdregistry::{self as registry, BlobSource, ClientOptions, ProgressFn, Repository};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A place holding images.
pub trait ImageStore: Send + Sync {
    /// Human-readable name for messages (`host/repo` or `oci:PATH`).
    fn name(&self) -> String;
    /// Resolve a tag or digest to a manifest or index and its bytes.
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)>;
    /// Fetch a manifest/index by descriptor (verified).
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>>;
    /// Read a small blob (verified), at most `limit` bytes.
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>>;
    /// Stream a blob; the stream fails at its end if the content does not match.
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>>;
    /// Whether `layer`'s digest vouches for its content (it names the content, as a
    /// registry's or a layout's blobs do). A layer whose digest the store computed
    /// from the content itself is checked against its `rootfs.diff_ids` entry
    /// while it is uncompressed instead.
    fn digest_vouches_for(&self, _layer: &Descriptor) -> bool {
        true
    }
    /// A local file holding the blob, if the store is local (no copy needed).
    fn local_blob_path(&self, _desc: &Descriptor) -> Option<PathBuf> {
        None
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool>;
    /// Registry host (as typed, with `:port`) and repository, for a registry store
    /// (blobs can be mounted between repositories of one host).
    fn registry_repository(&self) -> Option<(String, String)> {
        None
    }
    /// Make a blob of another repository of the same host available here without
    /// copying it (cross-repository mount). Returns whether it is now present.
    fn mount_blob(&self, _desc: &Descriptor, _from_repo: &str) -> Result<bool> {
        Ok(false)
    }
    /// Store a blob unless present.
    fn push_blob(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        progress: Option<ProgressFn>,
    ) -> Result<()>;
    /// Store a blob file this run produced and hashed itself (`desc` was computed from
    /// its bytes and nothing has written it since: a layer sealed in the run's private
    /// work directory), unless present. Stores that verify what they take may skip
    /// hashing it again.
    fn push_own_file(
        &self,
        desc: &Descriptor,
        path: &Path,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        self.push_blob(desc, BlobSource::File(path), progress)
    }
    /// Store a manifest/index, under `tag` if given (by digest otherwise).
    fn push_manifest(&self, tag: Option<&str>, desc: &Descriptor, bytes: &[u8]) -> Result<()>;
    /// The image to read when none is named (an archive holding one image).
    fn default_reference(&self) -> Result<Option<Reference>> {
        Ok(None)
    }
    /// Complete the destination once everything is pushed: an archive is written here
    /// (returns its size). Stores written as they go have nothing to do. Once `abort`
    /// is set (Ctrl-C), this fails as interrupted and leaves the destination as it was.
    fn finish(&self, _abort: &crate::Abort) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Open the store an [`ImageRef`] names. Layout destinations are created if missing.
/// (For a registry repository that is also used for dedup, make the
/// [`Repository`] yourself and wrap it in a [`RegistryStore`].) Archives use a scratch
/// directory under the system's temporary directory; see [`open_store_in`].
pub fn open_store(
    r: &ImageRef,
    client: &ClientOptions,
    create: bool,
) -> Result<Arc<dyn ImageStore>> {
    open_store_in(r, client, create, &std::env::temp_dir(), false)
}

/// [`open_store`] with the scratch directory of archives (decompressed input, output
/// collected before the archive is written; the convertor's work directory) and
/// whether an `oci-archive:` destination is gzip-compressed.
pub fn open_store_in(
    r: &ImageRef,
    client: &ClientOptions,
    create: bool,
    scratch: &std::path::Path,
    gzip: bool,
) -> Result<Arc<dyn ImageStore>> {
    Ok(match r {
        ImageRef::Registry { host, repository } => {
            let reg = registry::Registry::new(host, client)?;
            Arc::new(RegistryStore::new(reg.repository(repository)))
        }
        ImageRef::Layout { path, .. } => {
            let l = if create {
                Layout::open_or_create(path)?
            } else {
                Layout::open(path)?
            };
            Arc::new(LayoutStore::new(l))
        }
        ImageRef::OciArchive { .. } | ImageRef::DockerArchive { .. } => {
            crate::archive::open_archive(r, create, scratch, gzip)?
                .ok_or_else(|| Error::Invalid(format!("{r}: not an archive")))?
        }
    })
}

/// A repository in a registry.
pub struct RegistryStore {
    repo: Repository,
}

impl RegistryStore {
    pub fn new(repo: Repository) -> RegistryStore {
        RegistryStore { repo }
    }

    /// The registry client behind this store.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }
}

impl ImageStore for RegistryStore {
    fn name(&self) -> String {
        format!("{}/{}", self.repo.registry().host(), self.repo.name())
    }
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        Ok(self.repo.get_manifest(r)?)
    }
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let (_, b) = self
            .repo
            .get_manifest(&Reference::Digest(desc.digest.clone()))?;
        Ok(b)
    }
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        Ok(self.repo.read_blob(desc, limit)?)
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.repo.open_blob(desc)?))
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.repo.blob_exists(&desc.digest)?)
    }
    fn registry_repository(&self) -> Option<(String, String)> {
        Some((
            self.repo.registry().host().to_string(),
            self.repo.name().to_string(),
        ))
    }
    fn mount_blob(&self, desc: &Descriptor, from_repo: &str) -> Result<bool> {
        Ok(self.repo.mount_blob(desc, from_repo)?)
    }
    fn push_blob(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        self.repo.push_blob(desc, src, None, progress)?;
        Ok(())
    }
    fn push_manifest(&self, tag: Option<&str>, desc: &Descriptor, bytes: &[u8]) -> Result<()> {
        let r = match tag {
            Some(t) => Reference::Tag(t.to_string()),
            None => Reference::Digest(desc.digest.clone()),
        };
        self.repo.put_manifest(&r, &desc.media_type, bytes)?;
        Ok(())
    }
}

/// An OCI image layout directory.
pub struct LayoutStore {
    layout: Layout,
}

impl LayoutStore {
    pub fn new(layout: Layout) -> LayoutStore {
        LayoutStore { layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl ImageStore for LayoutStore {
    fn name(&self) -> String {
        format!("oci:{}", self.layout.root().display())
    }
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        let d = self.layout.resolve(r)?;
        let bytes = self.layout.read_blob(&d, oci::model::MAX_MANIFEST_SIZE)?;
        let mut desc = Descriptor::new(d.media_type.clone(), d.digest.clone(), d.size);
        if desc.media_type.is_empty() {
            desc.media_type = oci::model::sniff_media_type(&bytes).unwrap_or_default();
        }
        Ok((desc, bytes))
    }
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        Ok(self.layout.read_blob(desc, oci::model::MAX_MANIFEST_SIZE)?)
    }
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        Ok(self.layout.read_blob(desc, limit)?)
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.layout.open_blob(desc)?))
    }
    fn local_blob_path(&self, desc: &Descriptor) -> Option<PathBuf> {
        let p = self.layout.blob_path(&desc.digest);
        p.is_file().then_some(p)
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.layout.has_blob(&desc.digest))
    }
    fn push_blob(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        match src {
            BlobSource::Bytes(b) => {
                let d = self.layout.write_blob_bytes(b)?;
                if d != desc.digest {
                    return Err(Error::Oci(oci::Error::DigestMismatch {
                        what: format!("blob written to {}", self.name()),
                        expected: desc.digest.to_string(),
                        actual: d.to_string(),
                    }));
                }
            }
            BlobSource::File(p) => self.layout.import_file(p, desc)?,
        }
        if let Some(p) = progress {
            p(desc.size);
        }
        Ok(())
    }
    fn push_own_file(
        &self,
        desc: &Descriptor,
        path: &Path,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        self.layout.import_own_file(path, desc)?;
        if let Some(p) = progress {
            p(desc.size);
        }
        Ok(())
    }
    fn push_manifest(&self, tag: Option<&str>, desc: &Descriptor, bytes: &[u8]) -> Result<()> {
        self.layout.write_blob_bytes(bytes)?;
        if let Some(t) = tag {
            self.layout.tag(t, desc)?;
        }
        Ok(())
    }
}
