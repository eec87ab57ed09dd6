//! Images in archive files, as [`ImageStore`]s: `oci-archive:` (an OCI image layout in
//! a tar, optionally gzip-compressed on input) and `docker-archive:` (the `docker save`
//! format, see [`obdoci::docker_archive`]).
//!
//! Sources are read in place through an index of the tar ([`obdoci::archive::TarIndex`]);
//! a `.tar.gz` is first decompressed into an unnamed scratch file. A docker archive has
//! no manifest: [`DockerArchiveStore`] makes a Docker schema 2 manifest from the image's
//! config and layer files, which is what `docker load`/skopeo do too.
//!
//! Destinations ([`ArchiveOutput`]) collect the converted image in an OCI layout in a
//! scratch directory (committed layers are hard-linked there, not copied) and write the
//! archive only in [`ImageStore::finish`], after the whole conversion succeeded: the
//! destination file is replaced atomically, so a failed run leaves it as it was.

use super::annotations::{ANNOTATION_TURBO_TARGET_DIGEST, ANNOTATION_TURBO_TARGET_MEDIA_TYPE};
use super::store::{ImageStore, LayoutStore};
use super::Abort;
use super::{Error, Result};
use obdoci::archive::{FileSource, ReadAt, TarIndex, TarWriter};
use obdoci::digest::VerifyReader;
use obdoci::docker_archive::{self as da, ManifestItem};
use obdoci::layout::Layout;
use obdoci::model::{
    parse_json, sniff_media_type, to_json, Descriptor, ImageConfig, Index, Manifest,
    ANNOTATION_REF_NAME, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER_GZIP, MT_DOCKER_LAYER_TAR, MT_DOCKER_LAYER_ZSTD, MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
};
use obdoci::reference::{ArchiveImage, DockerName};
use obdoci::{self as oci, Digest, ImageRef, Reference};
use obdregistry::{BlobSource, ProgressFn};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn invalid(what: &str, reason: impl Into<String>) -> Error {
    Error::Oci(oci::Error::Invalid {
        what: what.to_string(),
        reason: reason.into(),
    })
}

fn read_only(name: &str) -> Error {
    Error::Unsupported(format!(
        "{name} is opened as a source; it cannot be written"
    ))
}

/// Index the archive at `path` (decompressing a `.tar.gz` into `scratch`).
fn index_archive(path: &Path, scratch: &Path) -> Result<TarIndex> {
    let src: Arc<dyn ReadAt> = Arc::new(FileSource::open_archive(path, scratch)?);
    Ok(TarIndex::build(src, &path.display().to_string())?)
}

/// Stream member `member` of `tar` as the blob `desc`, checking its size first and its
/// digest while it is read.
fn open_member(
    tar: &TarIndex,
    member: &str,
    desc: &Descriptor,
    name: &str,
) -> Result<VerifyReader<obdoci::archive::MemberReader>> {
    let size = tar.size_of(member)?;
    if size != desc.size {
        return Err(Error::Oci(oci::Error::SizeMismatch {
            what: format!("{member} (blob {}) in {}", desc.digest, tar.what()),
            expected: desc.size,
            actual: size,
        }));
    }
    Ok(VerifyReader::new(
        tar.open(member)?,
        desc.digest.clone(),
        desc.size,
        format!("{member} in {name}"),
    ))
}

fn read_verified(r: &mut dyn Read, desc: &Descriptor, limit: u64, what: &str) -> Result<Vec<u8>> {
    if desc.size > limit {
        return Err(Error::Oci(oci::Error::TooLarge {
            what: what.to_string(),
            size: desc.size,
            limit,
        }));
    }
    let mut out = Vec::with_capacity(desc.size as usize);
    r.read_to_end(&mut out)
        .map_err(|e| Error::Oci(oci::Error::from_io(what, e)))?;
    Ok(out)
}

/// An OCI image layout in a tar file (`oci-archive:FILE[:TAG]`), read-only.
pub struct OciArchiveStore {
    path: PathBuf,
    tar: TarIndex,
    index: Index,
}

impl OciArchiveStore {
    pub fn open(path: &Path, scratch: &Path) -> Result<OciArchiveStore> {
        let tar = index_archive(path, scratch)?;
        let what = path.display().to_string();
        if !tar.contains("index.json") {
            let hint = if tar.contains(da::MANIFEST_JSON) {
                " (it holds a manifest.json: a docker save archive? use docker-archive:)"
            } else {
                ""
            };
            return Err(invalid(
                &what,
                format!("not an OCI archive: no index.json{hint}"),
            ));
        }
        let bytes = tar.read("index.json", MAX_MANIFEST_SIZE)?;
        let index: Index = parse_json(&format!("index.json in {what}"), &bytes)?;
        Ok(OciArchiveStore {
            path: path.to_path_buf(),
            tar,
            index,
        })
    }

    fn member(&self, d: &Digest) -> String {
        let (alg, hex) = d.as_str().split_once(':').unwrap_or(("sha256", d.hex()));
        format!("blobs/{alg}/{hex}")
    }

    fn open_blob_reader(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        let m = self.member(&desc.digest);
        if !self.tar.contains(&m) {
            return Err(invalid(
                &self.path.display().to_string(),
                format!(
                    "blob {} is referenced but the archive does not hold {m}",
                    desc.digest
                ),
            ));
        }
        Ok(Box::new(open_member(&self.tar, &m, desc, &self.name())?))
    }
}

impl ImageStore for OciArchiveStore {
    fn name(&self) -> String {
        format!("oci-archive:{}", self.path.display())
    }
    fn default_reference(&self) -> Result<Option<Reference>> {
        match self.index.manifests.as_slice() {
            [only] => Ok(Some(Reference::Digest(only.digest.clone()))),
            [] => Err(invalid(
                &self.path.display().to_string(),
                "index.json lists no image",
            )),
            many => {
                let tags: Vec<&str> = many
                    .iter()
                    .filter_map(|d| d.annotation(ANNOTATION_REF_NAME))
                    .collect();
                Err(invalid(
                    &self.path.display().to_string(),
                    format!(
                        "the archive holds {} images; name one as oci-archive:FILE:TAG (tags: {})",
                        many.len(),
                        tags.join(", ")
                    ),
                ))
            }
        }
    }
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        let found = self.index.manifests.iter().find(|d| match r {
            Reference::Tag(t) => d.annotation(ANNOTATION_REF_NAME) == Some(t.as_str()),
            Reference::Digest(g) => &d.digest == g,
        });
        let d = match (found, r) {
            (Some(d), _) => d.clone(),
            (None, Reference::Digest(g)) => {
                let m = self.member(g);
                let size = self.tar.size_of(&m).map_err(|_| {
                    Error::Oci(oci::Error::NotFound(format!("{g} in {}", self.name())))
                })?;
                Descriptor::new("", g.clone(), size)
            }
            (None, Reference::Tag(t)) => {
                return Err(Error::Oci(oci::Error::NotFound(format!(
                    "tag {t:?} in {}",
                    self.name()
                ))))
            }
        };
        let bytes = self.fetch_manifest(&d)?;
        let mut desc = Descriptor::new(d.media_type.clone(), d.digest.clone(), d.size);
        if desc.media_type.is_empty() {
            desc.media_type = sniff_media_type(&bytes).unwrap_or_default();
        }
        Ok((desc, bytes))
    }
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.read_blob(desc, MAX_MANIFEST_SIZE)
    }
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        let what = format!("blob {} in {}", desc.digest, self.name());
        read_verified(&mut self.open_blob_reader(desc)?, desc, limit, &what)
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.open_blob_reader(desc)
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.tar.contains(&self.member(&desc.digest)))
    }
    fn push_blob(&self, _: &Descriptor, _: BlobSource<'_>, _: Option<ProgressFn>) -> Result<()> {
        Err(read_only(&self.name()))
    }
    fn push_manifest(&self, _: Option<&str>, _: &Descriptor, _: &[u8]) -> Result<()> {
        Err(read_only(&self.name()))
    }
}

/// A `docker save` archive (`docker-archive:FILE[:NAME:TAG|:@N]`), read-only: one of
/// its images, with a manifest made from its config and layer files.
pub struct DockerArchiveStore {
    path: PathBuf,
    tar: TarIndex,
    manifest: (Descriptor, Vec<u8>),
    /// Blob digest → archive member.
    members: HashMap<Digest, String>,
    /// Compressed layers kept at a path that is not their digest: their digest is
    /// hashed from the member itself, so only their `rootfs.diff_ids` entry vouches
    /// for their content.
    self_hashed: HashSet<Digest>,
}

impl DockerArchiveStore {
    pub fn open(path: &Path, want: Option<&ArchiveImage>, scratch: &Path) -> Result<Self> {
        let tar = index_archive(path, scratch)?;
        let what = path.display().to_string();
        if !tar.contains(da::MANIFEST_JSON) {
            let hint = if tar.contains("index.json") {
                " (it holds an index.json: an OCI archive? use oci-archive:)"
            } else {
                ""
            };
            return Err(invalid(
                &what,
                format!("not a docker save archive: no manifest.json{hint}"),
            ));
        }
        let items = da::parse_manifest_json(
            &format!("manifest.json in {what}"),
            &tar.read(da::MANIFEST_JSON, MAX_MANIFEST_SIZE)?,
        )?;
        let item = &items[da::select(&items, want, &what)?];
        let missing = |m: &str, role: &str| {
            invalid(
                &what,
                format!("manifest.json names {role} {m:?}, which the archive does not hold"),
            )
        };
        if !tar.contains(&item.config) {
            return Err(missing(&item.config, "the config"));
        }
        let cfg_bytes = tar.read(&item.config, MAX_CONFIG_SIZE)?;
        let cfg_what = format!("{} in {what}", item.config);
        let diff_ids = ImageConfig::parse(&cfg_what, &cfg_bytes)?.diff_ids(&cfg_what)?;
        if diff_ids.len() != item.layers.len() {
            return Err(invalid(
                &what,
                format!(
                    "manifest.json lists {} layers but the config {} has {} diff_ids",
                    item.layers.len(),
                    item.config,
                    diff_ids.len()
                ),
            ));
        }
        let config = Descriptor::of_bytes(MT_DOCKER_CONFIG, &cfg_bytes);
        let mut members = HashMap::new();
        members.insert(config.digest.clone(), item.config.clone());
        let mut layers = Vec::with_capacity(item.layers.len());
        let mut self_hashed = HashSet::new();
        for (l, diff_id) in item.layers.iter().zip(&diff_ids) {
            if !tar.contains(l) {
                return Err(missing(l, "the layer"));
            }
            let size = tar.size_of(l)?;
            let head = tar.head(l, 4)?;
            let mt = match head.as_slice() {
                [0x1f, 0x8b, ..] => MT_DOCKER_LAYER_GZIP,
                [0x28, 0xb5, 0x2f, 0xfd] => MT_DOCKER_LAYER_ZSTD,
                _ => MT_DOCKER_LAYER_TAR,
            };
            // The digest: from a content-addressed path, the diff id for an
            // uncompressed layer (checked while the layer is read), else hashed now.
            let from_path = obdoci::archive::clean_path(l)
                .and_then(|p| p.strip_prefix("blobs/sha256/").map(str::to_string))
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            let digest = match from_path {
                Some(d) => d,
                None if mt == MT_DOCKER_LAYER_TAR => diff_id.clone(),
                None => {
                    let d = obdoci::digest::hash_reader(tar.open(l)?)
                        .map_err(|e| Error::Oci(oci::Error::from_io(&what, e)))?
                        .0;
                    self_hashed.insert(d.clone());
                    d
                }
            };
            members.insert(digest.clone(), l.clone());
            layers.push(Descriptor::new(mt, digest, size));
        }
        let m = Manifest {
            schema_version: 2,
            media_type: Some(MT_DOCKER_MANIFEST.into()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: None,
            extra: Default::default(),
        };
        let bytes = to_json(&m);
        Ok(DockerArchiveStore {
            path: path.to_path_buf(),
            tar,
            manifest: (Descriptor::of_bytes(MT_DOCKER_MANIFEST, &bytes), bytes),
            members,
            self_hashed,
        })
    }

    fn open_blob_reader(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        let m = self.members.get(&desc.digest).ok_or_else(|| {
            Error::Oci(oci::Error::NotFound(format!(
                "blob {} in {}",
                desc.digest,
                self.name()
            )))
        })?;
        Ok(Box::new(open_member(&self.tar, m, desc, &self.name())?))
    }
}

impl ImageStore for DockerArchiveStore {
    fn name(&self) -> String {
        format!("docker-archive:{}", self.path.display())
    }
    fn digest_vouches_for(&self, layer: &Descriptor) -> bool {
        !self.self_hashed.contains(&layer.digest)
    }
    fn default_reference(&self) -> Result<Option<Reference>> {
        Ok(Some(Reference::Digest(self.manifest.0.digest.clone())))
    }
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        match r {
            Reference::Digest(d) if d == &self.manifest.0.digest => Ok(self.manifest.clone()),
            _ => Err(Error::Invalid(format!(
                "{}: pick its image with docker-archive:FILE:NAME:TAG or :@N, not {r}",
                self.name()
            ))),
        }
    }
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.resolve(&Reference::Digest(desc.digest.clone()))
            .map(|(_, b)| b)
    }
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        let what = format!("blob {} in {}", desc.digest, self.name());
        read_verified(&mut self.open_blob_reader(desc)?, desc, limit, &what)
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.open_blob_reader(desc)
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool> {
        Ok(self.members.contains_key(&desc.digest))
    }
    fn push_blob(&self, _: &Descriptor, _: BlobSource<'_>, _: Option<ProgressFn>) -> Result<()> {
        Err(read_only(&self.name()))
    }
    fn push_manifest(&self, _: Option<&str>, _: &Descriptor, _: &[u8]) -> Result<()> {
        Err(read_only(&self.name()))
    }
}

/// A blob file read into an archive being written, failing its reads once the
/// conversion stops (a large archive takes a while to write).
struct Stoppable<'a> {
    inner: std::fs::File,
    abort: &'a Abort,
}

impl Read for Stoppable<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.abort.is_set() {
            return Err(crate::abort::stopped_read());
        }
        self.inner.read(buf)
    }
}

/// What kind of archive an [`ArchiveOutput`] writes.
#[derive(Clone, Debug)]
pub enum ArchiveKind {
    /// `oci-archive:FILE[:TAG]`: every image pushed with a tag is in `index.json`,
    /// named by that tag (`org.opencontainers.image.ref.name`), as in an `oci:`
    /// layout; `gzip` compresses the archive.
    Oci { gzip: bool },
    /// `docker-archive:FILE[:NAME:TAG]`; the name, if given, is the image's `RepoTags`.
    Docker { name: Option<DockerName> },
}

/// An archive being written: blobs and manifests collect in a scratch OCI layout, and
/// [`ImageStore::finish`] writes the archive of the images pushed under a tag (a
/// docker archive holds one).
pub struct ArchiveOutput {
    path: PathBuf,
    kind: ArchiveKind,
    layout: LayoutStore,
    _scratch: tempfile::TempDir,
    /// The top-level images and the tags they were pushed with, in push order.
    roots: Mutex<Vec<(Descriptor, String)>>,
}

impl ArchiveOutput {
    /// Start an archive at `path`, collecting its content under `scratch` (created if
    /// missing). The directory of `path` must exist; a `path` that is a symbolic link
    /// is written through (its target is replaced, the link stays), and the directory
    /// checked is its target's.
    pub fn create(path: &Path, kind: ArchiveKind, scratch: &Path) -> Result<ArchiveOutput> {
        let target = obdoci::archive::write_target(path)?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            ));
        }
        if path.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "is a directory: name the archive file to write",
                ),
            ));
        }
        // The archive is written beside `path` at the end: a directory that takes no
        // new file fails now, not after the whole conversion.
        obdoci::layout::check_can_create_in(dir)?;
        std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(crate::workdir::ARCHIVE_SCRATCH_PREFIX)
            .tempdir_in(scratch)
            .map_err(|e| Error::io(scratch, e))?;
        let layout = LayoutStore::new(Layout::open_or_create(tmp.path())?);
        Ok(ArchiveOutput {
            path: path.to_path_buf(),
            kind,
            layout,
            _scratch: tmp,
            roots: Mutex::new(Vec::new()),
        })
    }

    fn layout(&self) -> &Layout {
        self.layout.layout()
    }

    fn blob_file(&self, d: &Descriptor) -> Result<(std::fs::File, u64)> {
        let p = self.layout().blob_path(&d.digest);
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        Ok((f, len))
    }

    /// Append blob `d` as `member`; a stop (`abort`) ends it between reads.
    /// `appended` is told each member written.
    fn add_blob(
        &self,
        w: &mut TarWriter,
        member: &str,
        d: &Descriptor,
        abort: &Abort,
        appended: &mut dyn FnMut(&str),
    ) -> Result<()> {
        if abort.is_set() {
            return Err(Error::Interrupted);
        }
        let (f, len) = self.blob_file(d)?;
        let mut r = Stoppable { inner: f, abort };
        let got = match w.append(member, len, &mut r, &mut |_| {}) {
            Err(_) if abort.is_set() => return Err(Error::Interrupted),
            r => r?,
        };
        if got != d.digest {
            return Err(Error::Oci(oci::Error::DigestMismatch {
                what: format!("{member} written to {}", self.path.display()),
                expected: d.digest.to_string(),
                actual: got.to_string(),
            }));
        }
        appended(member);
        Ok(())
    }

    /// Every blob the image `root` consists of (manifests, configs, layers, and the
    /// source layers TurboOCI layers read), once each.
    fn blobs_of(&self, root: &Descriptor, out: &mut Vec<Descriptor>) -> Result<()> {
        if out.iter().any(|d| d.digest == root.digest) {
            return Ok(());
        }
        out.push(root.bare());
        let bytes = self.layout().read_blob(root, MAX_MANIFEST_SIZE)?;
        let mt = sniff_media_type(&bytes).unwrap_or_else(|| root.media_type.clone());
        if obdoci::model::is_index(&mt) {
            let idx: Index = parse_json("converted index", &bytes)?;
            for c in &idx.manifests {
                self.blobs_of(c, out)?;
            }
        } else {
            let m: Manifest = parse_json("converted manifest", &bytes)?;
            for d in std::iter::once(&m.config).chain(&m.layers) {
                if !out.iter().any(|o| o.digest == d.digest) {
                    out.push(d.bare());
                }
            }
            // A TurboOCI layer reads its file data from the source layer it names,
            // which the pipeline put beside the image, as in an `oci:` layout.
            for l in &m.layers {
                let Some(t) = l.annotation(ANNOTATION_TURBO_TARGET_DIGEST) else {
                    continue;
                };
                let digest: Digest = t.parse().map_err(|_| {
                    invalid(
                        "converted manifest",
                        format!("layer {} names a target that is no digest: {t:?}", l.digest),
                    )
                })?;
                if !out.iter().any(|o| o.digest == digest) {
                    let (_, size) = self.blob_file(&Descriptor::new("", digest.clone(), 0))?;
                    let mt = l
                        .annotation(ANNOTATION_TURBO_TARGET_MEDIA_TYPE)
                        .unwrap_or_default();
                    out.push(Descriptor::new(mt, digest, size));
                }
            }
        }
        Ok(())
    }

    fn write_oci(
        &self,
        roots: &[(Descriptor, String)],
        gzip: bool,
        abort: &Abort,
        appended: &mut dyn FnMut(&str),
    ) -> Result<u64> {
        let mut blobs = Vec::new();
        let mut entries = Vec::new();
        for (root, tag) in roots {
            self.blobs_of(root, &mut blobs)?;
            let mut entry = root.clone();
            entry.annotations = Some(BTreeMap::from([(
                ANNOTATION_REF_NAME.to_string(),
                tag.clone(),
            )]));
            entries.push(entry);
        }
        let index = Index {
            schema_version: 2,
            media_type: Some(MT_OCI_INDEX.into()),
            artifact_type: None,
            manifests: entries,
            subject: None,
            annotations: None,
            extra: Default::default(),
        };
        let mut w = TarWriter::create(&self.path, gzip)?;
        w.append_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        w.append_bytes("index.json", &to_json(&index))?;
        w.append_dir("blobs/")?;
        w.append_dir("blobs/sha256/")?;
        for b in &blobs {
            self.add_blob(
                &mut w,
                &format!("blobs/sha256/{}", b.digest.hex()),
                b,
                abort,
                appended,
            )?;
        }
        Ok(w.finish()?)
    }

    fn write_docker(
        &self,
        root: &Descriptor,
        name: Option<&DockerName>,
        abort: &Abort,
        appended: &mut dyn FnMut(&str),
    ) -> Result<u64> {
        let bytes = self.layout().read_blob(root, MAX_MANIFEST_SIZE)?;
        let mt = sniff_media_type(&bytes).unwrap_or_else(|| root.media_type.clone());
        if obdoci::model::is_index(&mt) {
            return Err(Error::Unsupported(format!(
                "docker-archive:{}: a docker save archive holds one platform's image, and this image is a multi-platform index; write an oci-archive: instead",
                self.path.display()
            )));
        }
        let m: Manifest = parse_json("converted manifest", &bytes)?;
        let config_member = format!("{}.json", m.config.digest.hex());
        let layer_members: Vec<String> = m
            .layers
            .iter()
            .map(|l| format!("{}.tar", l.digest.hex()))
            .collect();
        let item = ManifestItem {
            config: config_member.clone(),
            repo_tags: name.map(|n| vec![n.to_string()]),
            layers: layer_members.clone(),
            extra: Default::default(),
        };
        let mut w = TarWriter::create(&self.path, false)?;
        self.add_blob(&mut w, &config_member, &m.config, abort, appended)?;
        for (l, member) in m.layers.iter().zip(&layer_members) {
            self.add_blob(&mut w, member, l, abort, appended)?;
        }
        w.append_bytes(da::MANIFEST_JSON, &to_json(&vec![item]))?;
        if let (Some(n), Some(top)) = (name, m.layers.last()) {
            let repos = da::repositories(&[(n.clone(), top.digest.hex().to_string())]);
            w.append_bytes(da::REPOSITORIES, &repos)?;
        }
        Ok(w.finish()?)
    }

    /// [`ImageStore::finish`], telling `appended` each blob member written.
    fn write(&self, abort: &Abort, appended: &mut dyn FnMut(&str)) -> Result<Option<u64>> {
        let roots = self.roots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if roots.is_empty() {
            // Nothing was pushed (--no-upload): the destination stays as it was.
            return Ok(None);
        }
        // Stopped (Ctrl-C) before or while the archive is written: it is not put in
        // place, the destination stays as it was.
        if abort.is_set() {
            return Err(Error::Interrupted);
        }
        let size = match &self.kind {
            ArchiveKind::Oci { gzip } => self.write_oci(&roots, *gzip, abort, appended)?,
            ArchiveKind::Docker { name } => match roots.as_slice() {
                [(root, _)] => self.write_docker(root, name.as_ref(), abort, appended)?,
                _ => {
                    return Err(Error::Unsupported(format!(
                        "docker-archive:{}: this destination holds one image, and {} were converted; write an oci-archive: or oci: destination",
                        self.path.display(),
                        roots.len()
                    )))
                }
            },
        };
        Ok(Some(size))
    }
}

impl ImageStore for ArchiveOutput {
    fn name(&self) -> String {
        match &self.kind {
            ArchiveKind::Oci { .. } => format!("oci-archive:{}", self.path.display()),
            ArchiveKind::Docker { .. } => format!("docker-archive:{}", self.path.display()),
        }
    }
    fn resolve(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        self.layout.resolve(r)
    }
    fn fetch_manifest(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.layout.fetch_manifest(desc)
    }
    fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        self.layout.read_blob(desc, limit)
    }
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.layout.open_blob(desc)
    }
    fn blob_exists(&self, desc: &Descriptor) -> Result<bool> {
        self.layout.blob_exists(desc)
    }
    fn push_blob(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        self.layout.push_blob(desc, src, progress)
    }
    fn push_own_file(
        &self,
        desc: &Descriptor,
        path: &Path,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        self.layout.push_own_file(desc, path, progress)
    }
    fn push_manifest(&self, tag: Option<&str>, desc: &Descriptor, bytes: &[u8]) -> Result<()> {
        self.layout.push_manifest(None, desc, bytes)?;
        if let Some(t) = tag {
            let mut roots = self.roots.lock().unwrap_or_else(|e| e.into_inner());
            roots.retain(|(_, other)| other != t);
            roots.push((desc.clone(), t.into()));
        }
        Ok(())
    }
    fn finish(&self, abort: &Abort) -> Result<Option<u64>> {
        self.write(abort, &mut |_| {})
    }
}

/// Open an archive [`ImageRef`] as a source (`create` false) or a destination; `None`
/// for other transports. `scratch` holds temporary data (decompressed input, the
/// output being collected); `gzip` compresses an `oci-archive:` destination.
pub fn open_archive(
    r: &ImageRef,
    create: bool,
    scratch: &Path,
    gzip: bool,
) -> Result<Option<Arc<dyn ImageStore>>> {
    Ok(Some(match (r, create) {
        (ImageRef::OciArchive { path, .. }, false) => {
            Arc::new(OciArchiveStore::open(path, scratch)?)
        }
        (ImageRef::DockerArchive { path, name }, false) => {
            Arc::new(DockerArchiveStore::open(path, name.as_ref(), scratch)?)
        }
        (ImageRef::OciArchive { path, .. }, true) => Arc::new(ArchiveOutput::create(
            path,
            ArchiveKind::Oci { gzip },
            scratch,
        )?),
        (ImageRef::DockerArchive { path, name }, true) => {
            let name = match name {
                None => None,
                Some(ArchiveImage::Tagged(n)) => Some(n.clone()),
                Some(ArchiveImage::Index(_)) => {
                    return Err(Error::Invalid(format!(
                        "{r}: @N picks an image of an archive being read; name the image to write as docker-archive:FILE:NAME:TAG"
                    )))
                }
            };
            Arc::new(ArchiveOutput::create(
                path,
                ArchiveKind::Docker { name },
                scratch,
            )?)
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obdoci::model::{MT_OCI_CONFIG, MT_OCI_LAYER_TAR, MT_OCI_MANIFEST};

    /// An archive destination holding one image (a 3 MiB layer) under tag `t`.
    fn one_image(dest: &Path, scratch: &Path) -> ArchiveOutput {
        let out = ArchiveOutput::create(dest, ArchiveKind::Oci { gzip: false }, scratch).unwrap();
        let layer = vec![7u8; 3 << 20];
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let (l, c) = (
            Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer),
            Descriptor::of_bytes(MT_OCI_CONFIG, config),
        );
        out.push_blob(&l, BlobSource::Bytes(&layer), None).unwrap();
        out.push_blob(&c, BlobSource::Bytes(config), None).unwrap();
        let m = Manifest {
            schema_version: 2,
            media_type: Some(MT_OCI_MANIFEST.into()),
            artifact_type: None,
            config: c,
            layers: vec![l],
            subject: None,
            annotations: None,
            extra: Default::default(),
        };
        let bytes = to_json(&m);
        out.push_manifest(
            Some("t"),
            &Descriptor::of_bytes(MT_OCI_MANIFEST, &bytes),
            &bytes,
        )
        .unwrap();
        out
    }

    /// A Ctrl-C that comes while the converted image is written into the archive (or
    /// just before) stops it: the run fails as interrupted and the destination keeps
    /// its old content, no `.partial` file left. The archive was written and put in
    /// place regardless, and the run ended with success after saying it was stopping.
    #[test]
    fn a_stop_leaves_the_destination_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.tar");
        std::fs::write(&dest, b"old").unwrap();
        let out = one_image(&dest, &d.path().join("scratch"));
        let abort = Abort::new();
        abort.set();
        let e = out.finish(&abort).unwrap_err();
        assert!(e.is_interrupted(), "{e}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        // While a blob is copied: its next read fails.
        let abort = Abort::new();
        let f = std::fs::File::open(&dest).unwrap();
        let mut r = Stoppable {
            inner: f,
            abort: &abort,
        };
        let mut buf = [0u8; 2];
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        abort.set();
        let e = r.read(&mut buf).unwrap_err();
        assert_ne!(e.kind(), std::io::ErrorKind::Interrupted, "not retried");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "out.tar and the scratch directory: {left:?}");
        // Not stopped: the archive replaces the file.
        let size = out.finish(&Abort::new()).unwrap().unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), size);
        assert!(size > 3 << 20);
    }

    /// A Ctrl-C between two blobs of an archive being written (the archive's
    /// temporary file open, a blob in it) stops it as one before: the run fails as
    /// interrupted, the destination keeps its old content and no temporary file is
    /// left beside it; an OCI archive (plain and gzip) and a docker archive alike.
    #[test]
    fn a_stop_between_two_blobs_leaves_the_destination_as_it_was() {
        for kind in [
            ArchiveKind::Oci { gzip: false },
            ArchiveKind::Oci { gzip: true },
            ArchiveKind::Docker { name: None },
        ] {
            let d = tempfile::tempdir().unwrap();
            let dest = d.path().join("out.tar");
            std::fs::write(&dest, b"old").unwrap();
            let scratch = d.path().join("scratch");
            let mut out = one_image(&dest, &scratch);
            out.kind = kind.clone();
            let abort = Abort::new();
            let mut written = Vec::new();
            let e = out
                .write(&abort, &mut |member| {
                    written.push(member.to_string());
                    // The temporary archive is there while it is written.
                    let partial = std::fs::read_dir(d.path())
                        .unwrap()
                        .filter(|e| {
                            e.as_ref()
                                .unwrap()
                                .file_name()
                                .to_string_lossy()
                                .ends_with(".partial")
                        })
                        .count();
                    assert_eq!(partial, 1, "{kind:?}");
                    abort.set();
                })
                .unwrap_err();
            assert!(e.is_interrupted(), "{kind:?}: {e}");
            assert_eq!(
                written.len(),
                1,
                "{kind:?}: stopped after one blob: {written:?}"
            );
            assert_eq!(std::fs::read(&dest).unwrap(), b"old", "{kind:?}");
            let mut left: Vec<_> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            assert_eq!(left, ["out.tar", "scratch"], "{kind:?}");
        }
    }
}
