//! OCI image layout directories (image-spec `image-layout.md`):
//!
//! ```text
//! <root>/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! <root>/index.json            an image index; entries tagged with
//!                              "org.opencontainers.image.ref.name": "<tag>"
//! <root>/blobs/sha256/<hex>    content-addressed blobs
//! ```
//!
//! Blobs are written to a temporary file under `blobs/` and renamed into place once
//! their digest is known, so readers never see partial blobs. `index.json` is replaced
//! atomically the same way.

use super::digest::{hash_reader, HashingWriter, VerifyReader};
use super::model::{
    parse_json, sniff_media_type, to_json, Descriptor, Index, ANNOTATION_REF_NAME, MT_OCI_INDEX,
};
use super::stream::copy;
use super::{Digest, Error, Reference, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// An OCI image layout directory.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    index_lock: Mutex<()>,
}

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

impl Layout {
    /// Open an existing layout.
    pub fn open(root: &Path) -> Result<Layout> {
        let marker = root.join(LAYOUT_FILE);
        refuse_irregular(&marker)?;
        let bytes = fs::read(&marker).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                let reason = match fs::metadata(root) {
                    Err(_) => "no such directory",
                    Ok(m) if !m.is_dir() => "not a directory",
                    Ok(_) => "not an OCI image layout (no oci-layout file)",
                };
                Error::Invalid {
                    what: root.display().to_string(),
                    reason: reason.into(),
                }
            } else if e.kind() == io::ErrorKind::NotADirectory {
                Error::Invalid {
                    what: root.display().to_string(),
                    reason: "not a directory".into(),
                }
            } else {
                Error::io(&marker, e)
            }
        })?;
        let v: serde_json::Value = parse_json(&marker.display().to_string(), &bytes)?;
        if v.get("imageLayoutVersion").and_then(|x| x.as_str()) != Some("1.0.0") {
            return Err(Error::Invalid {
                what: marker.display().to_string(),
                reason: "unsupported imageLayoutVersion (expected 1.0.0)".into(),
            });
        }
        Ok(Layout {
            root: root.to_path_buf(),
            index_lock: Mutex::new(()),
        })
    }

    /// Open a layout to write into, creating an empty one if the directory has none;
    /// fails if it cannot be written ([`Layout::check_writable`]).
    /// In a journaled directory ([`crate::journal::start`]) the files and directories
    /// it makes are recorded.
    pub fn open_or_create(root: &Path) -> Result<Layout> {
        if root.join(LAYOUT_FILE).exists() {
            return Self::open_writable(root);
        }
        if fs::metadata(root).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::Invalid {
                what: root.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        let blobs = root.join("blobs").join("sha256");
        let made = |p: &Path| {
            if fs::symlink_metadata(p).is_err() {
                crate::journal::created(root, p);
            }
        };
        if root.is_dir() {
            made(&root.join("blobs"));
            made(&blobs);
        }
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        let l = Layout {
            root: root.to_path_buf(),
            index_lock: Mutex::new(()),
        };
        // Another process creating the same layout may have tagged an image
        // in it already: its index is kept.
        let _g = lock_dir(root)?;
        if !root.join("index.json").exists() {
            made(&root.join("index.json"));
            l.write_index(&Index {
                schema_version: 2,
                media_type: Some(MT_OCI_INDEX.into()),
                artifact_type: None,
                manifests: vec![],
                subject: None,
                annotations: None,
                extra: Default::default(),
            })?;
        }
        made(&root.join(LAYOUT_FILE));
        write_atomic(&root.join(LAYOUT_FILE), LAYOUT_CONTENT)?;
        l.check_writable()?;
        Ok(l)
    }

    /// Open an existing layout to write into: [`Layout::open`], then
    /// [`Layout::check_writable`].
    pub fn open_writable(root: &Path) -> Result<Layout> {
        let l = Self::open(root)?;
        l.check_writable()?;
        Ok(l)
    }

    /// A handle on the layout at `root` that neither reads nor creates anything there:
    /// for a destination that is named but not written (a run that pushes nothing).
    /// Reads through it fail as they would in a layout without images.
    pub fn unopened(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            index_lock: Mutex::new(()),
        }
    }

    /// Checks that blobs can be added and `index.json` replaced, by creating (and
    /// removing) a temporary file in `blobs/sha256` and in the root: a read-only mount
    /// or a directory without write permission fails here, before any work, not at the
    /// first blob written.
    pub fn check_writable(&self) -> Result<()> {
        let blobs = self.root.join("blobs").join("sha256");
        if !blobs.is_dir() {
            fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        }
        check_can_create_in(&blobs)?;
        check_can_create_in(&self.root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub fn read_index(&self) -> Result<Index> {
        let p = self.root.join("index.json");
        refuse_irregular(&p)?;
        let bytes = fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::Invalid {
                what: self.root.display().to_string(),
                reason: "not an OCI image layout (no index.json)".into(),
            },
            _ => Error::io(&p, e),
        })?;
        parse_json(&p.display().to_string(), &bytes)
    }

    fn write_index(&self, idx: &Index) -> Result<()> {
        write_atomic(&self.root.join("index.json"), &to_json(idx))
    }

    /// Find a manifest by tag (`index.json` ref name) or digest.
    pub fn resolve(&self, r: &Reference) -> Result<Descriptor> {
        let idx = self.read_index()?;
        match r {
            Reference::Tag(t) => idx
                .manifests
                .into_iter()
                .find(|d| d.annotation(ANNOTATION_REF_NAME) == Some(t.as_str()))
                .ok_or_else(|| {
                    Error::NotFound(format!("tag {t:?} in OCI layout {}", self.root.display()))
                }),
            Reference::Digest(dg) => {
                if let Some(d) = idx.manifests.into_iter().find(|d| &d.digest == dg) {
                    return Ok(d);
                }
                let p = self.blob_path(dg);
                let meta = fs::metadata(&p).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Error::NotFound(format!("{dg} in OCI layout {}", self.root.display()))
                    } else {
                        Error::io(&p, e)
                    }
                })?;
                let bytes = self.read_blob(
                    &Descriptor::new("", dg.clone(), meta.len()),
                    super::model::MAX_MANIFEST_SIZE,
                )?;
                let mt = sniff_media_type(&bytes).ok_or_else(|| Error::Invalid {
                    what: format!("{dg} in OCI layout {}", self.root.display()),
                    reason: "not a manifest or index".into(),
                })?;
                Ok(Descriptor::new(mt, dg.clone(), meta.len()))
            }
        }
    }

    /// Open a blob for streaming; the reader checks size and digest at its end.
    pub fn open_blob(&self, desc: &Descriptor) -> Result<VerifyReader<File>> {
        let p = self.blob_path(&desc.digest);
        // Before opening: opening a FIFO would wait for a writer.
        refuse_irregular(&p)?;
        let f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::NotFound(format!(
                    "blob {} in OCI layout {}",
                    desc.digest,
                    self.root.display()
                ))
            } else {
                Error::io(&p, e)
            }
        })?;
        // Replaced since it was looked at: a directory opens, and fails only
        // at its first read, without a path.
        if f.metadata().is_ok_and(|m| !m.is_file()) {
            return Err(Error::io(
                &p,
                io::Error::new(io::ErrorKind::InvalidData, "is not a regular file"),
            ));
        }
        Ok(VerifyReader::new(
            f,
            desc.digest.clone(),
            desc.size,
            format!("blob {} in OCI layout {}", desc.digest, self.root.display()),
        ))
    }

    /// Read a whole (small) blob, verifying it.
    pub fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        if desc.size > limit {
            return Err(Error::TooLarge {
                what: format!("blob {}", desc.digest),
                size: desc.size,
                limit,
            });
        }
        let mut r = self.open_blob(desc)?;
        let mut out = Vec::with_capacity(desc.size as usize);
        r.read_to_end(&mut out)
            .map_err(|e| Error::from_io(self.blob_path(&desc.digest), e))?;
        Ok(out)
    }

    /// Store bytes as a blob.
    pub fn write_blob_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        if !self.has_blob(&d) {
            let p = self.blob_path(&d);
            crate::journal::may_add(&self.root).map_err(|e| Error::io(&p, e))?;
            write_atomic(&p, bytes)?;
            crate::journal::added_blob(&self.root, &d);
        }
        Ok(d)
    }

    /// Store a stream as a blob; if `expected` is given, the content must match it.
    pub fn write_blob_stream(
        &self,
        mut r: impl Read,
        expected: Option<&Descriptor>,
    ) -> Result<(Digest, u64)> {
        let dir = self.root.join("blobs").join("sha256");
        let mut tmp =
            temp_for(&dir, None, &mut tempfile::Builder::new()).map_err(|e| Error::io(&dir, e))?;
        let tmp_path = tmp.path().to_path_buf();
        let mut w = HashingWriter::new(tmp.as_file_mut());
        copy(&mut r, &mut w, &|| false, &mut |_| {})
            .map_err(|e| Error::from_io(&tmp_path, e.into_io()))?;
        let (d, len) = w.hash.finish();
        if let Some(exp) = expected {
            if exp.digest != d {
                return Err(Error::DigestMismatch {
                    what: "blob written to OCI layout".into(),
                    expected: exp.digest.to_string(),
                    actual: d.to_string(),
                });
            }
        }
        let dest = self.blob_path(&d);
        let new = !dest.exists();
        crate::journal::may_add(&self.root).map_err(|e| Error::io(&dest, e))?;
        tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        if new {
            crate::journal::added_blob(&self.root, &d);
        }
        Ok((d, len))
    }

    /// Store a file we produced (e.g. a committed layer) as a blob. It is hashed while
    /// being copied; a hard link is used instead of a copy when `desc` is known and the
    /// file is on the same filesystem.
    pub fn import_file(&self, path: &Path, desc: &Descriptor) -> Result<()> {
        self.import(path, desc, true)
    }

    /// [`Layout::import_file`] for a file whose descriptor the caller computed from its
    /// bytes and that nothing has written since (a layer this process sealed in its
    /// private work directory): a hard link is checked for its size only, not hashed
    /// again. A copy is hashed as it is written, as always.
    pub fn import_own_file(&self, path: &Path, desc: &Descriptor) -> Result<()> {
        self.import(path, desc, false)
    }

    fn import(&self, path: &Path, desc: &Descriptor, verify_link: bool) -> Result<()> {
        let dest = self.blob_path(&desc.digest);
        if dest.is_file() {
            return Ok(());
        }
        crate::journal::may_add(&self.root).map_err(|e| Error::io(&dest, e))?;
        if fs::hard_link(path, &dest).is_ok() {
            crate::journal::added_blob(&self.root, &desc.digest);
            // What we linked must be exactly the blob described.
            let mismatch = if verify_link {
                let f = File::open(&dest).map_err(|e| Error::io(&dest, e))?;
                let (d, len) = hash_reader(f).map_err(|e| Error::io(&dest, e))?;
                (d != desc.digest || len != desc.size).then(|| d.to_string())
            } else {
                let len = fs::metadata(&dest).map_err(|e| Error::io(&dest, e))?.len();
                (len != desc.size).then(|| format!("a file of {len} bytes, not {}", desc.size))
            };
            if let Some(actual) = mismatch {
                let _ = fs::remove_file(&dest);
                return Err(Error::DigestMismatch {
                    what: path.display().to_string(),
                    expected: desc.digest.to_string(),
                    actual,
                });
            }
            return Ok(());
        }
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        self.write_blob_stream(f, Some(desc))?;
        Ok(())
    }

    /// Point `tag` at `desc` in `index.json`, replacing any previous entry for that tag.
    /// The index is read, changed and replaced under the layout's lock
    /// (an exclusive `flock` on its directory), so that processes tagging images in one layout at once
    /// keep each other's tags.
    pub fn tag(&self, tag: &str, desc: &Descriptor) -> Result<()> {
        let _g = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _l = lock_dir(&self.root)?;
        let mut idx = self.read_index()?;
        idx.manifests
            .retain(|d| d.annotation(ANNOTATION_REF_NAME) != Some(tag));
        let mut d = desc.bare();
        d.platform = desc.platform.clone();
        let mut ann = BTreeMap::new();
        ann.insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
        d.annotations = Some(ann);
        idx.manifests.push(d);
        self.write_index(&idx)
    }
}

/// Checks that a new file can be created in `dir`, by creating (and removing) a
/// probe file: a read-only mount or a directory without write permission fails
/// with "cannot create a file here", before any work is done for a file to be
/// written there at the end. The probe is a listed temporary file
/// ([`crate::tempfiles`]), so that a process quitting at once meanwhile does not
/// leave it behind.
pub fn check_can_create_in(dir: &Path) -> Result<()> {
    // Made here, not by `tempfile::Builder`, whose error would name the probe's
    // random path too ("... at path \"DIR/.write-probe.PID.XXXXXX\"").
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(".write-probe.{}.{nanos}", std::process::id()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            Error::io(
                dir,
                io::Error::new(e.kind(), format!("cannot create a file here: {e}")),
            )
        })?;
    let listed = tempfile::TempPath::try_from_path(&path)
        .and_then(|p| crate::tempfiles::Temp::track(tempfile::NamedTempFile::from_parts(file, p)));
    match listed {
        Ok(probe) => probe.close(),
        Err(e) => {
            // Not listed (the process is quitting): removed all the same.
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
    .map_err(|e| Error::io(&path, e))
}

/// Refuse `p` if it exists and is not a regular file (or a link to one):
/// a FIFO would block the open until a writer comes, a directory or device
/// is no blob. A missing path passes (the open says so).
fn refuse_irregular(p: &Path) -> Result<()> {
    match fs::metadata(p) {
        Ok(m) if !m.is_file() => Err(Error::io(
            p,
            io::Error::new(io::ErrorKind::InvalidData, "is not a regular file"),
        )),
        _ => Ok(()),
    }
}

/// The cross-process lock of the layout at `root`: an exclusive `flock` on its
/// directory, held until the returned value is dropped. Taken by every change
/// of `index.json`.
pub(crate) fn lock_dir(root: &Path) -> Result<Flock<File>> {
    let dir = File::open(root).map_err(|e| Error::io(root, e))?;
    Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, errno)| {
        Error::io(
            root,
            io::Error::other(format!("cannot lock the layout: {errno}")),
        )
    })
}

/// A temporary file in `dir` that becomes `dest` (renamed over it): created as
/// `File::create` creates files, mode 0666 less the umask (tempfile's own default
/// is 0600, which other users and services reading the layout could not read), or
/// with the mode `dest` has when it exists, so that replacing it changes no
/// permissions. It is listed for [`crate::tempfiles::abandon_all`] while it
/// exists.
pub(crate) fn temp_for(
    dir: &Path,
    dest: Option<&Path>,
    builder: &mut tempfile::Builder<'_, '_>,
) -> std::io::Result<crate::tempfiles::Temp> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = crate::tempfiles::Temp::track(
        builder
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)?,
    )?;
    if let Some(m) = dest.and_then(|d| std::fs::metadata(d).ok()) {
        tmp.as_file().set_permissions(m.permissions())?;
    }
    Ok(tmp)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp =
        temp_for(dir, Some(path), &mut tempfile::Builder::new()).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MT_OCI_MANIFEST;

    /// Files the layout writes get the modes of ordinarily created files (0666
    /// less the umask), not tempfile's 0600, and a replaced `index.json` keeps
    /// its mode.
    #[test]
    fn written_files_are_readable_by_others_and_keep_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let t = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(t.path()).unwrap();
        let d = l.write_blob_bytes(b"{}").unwrap();
        let (d2, _) = l.write_blob_stream(&b"[]"[..], None).unwrap();
        let desc = Descriptor::new(MT_OCI_MANIFEST, d.clone(), 2);
        l.tag("v1", &desc).unwrap();
        for p in [
            t.path().join("index.json"),
            t.path().join("oci-layout"),
            l.blob_path(&d),
            l.blob_path(&d2),
        ] {
            assert_eq!(mode(&p), 0o666 & !umask, "{}", p.display());
        }
        let idx = t.path().join("index.json");
        std::fs::set_permissions(&idx, std::fs::Permissions::from_mode(0o640)).unwrap();
        l.tag("v2", &desc).unwrap();
        assert_eq!(mode(&idx), 0o640);
    }

    /// A directory that takes no new file is named, with the OS error, and not
    /// the probe's random name (tempfile's error adds it).
    #[test]
    fn a_directory_that_takes_no_file_is_named_without_the_probe() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("gone");
        let e = check_can_create_in(&missing).unwrap_err();
        assert_eq!(
            crate::error::Chain(&e).to_string(),
            format!(
                "{}: cannot create a file here: No such file or directory (os error 2)",
                missing.display()
            )
        );
    }

    /// `import_file` hashes what it links; `import_own_file` links the caller's own
    /// file (the same inode, nothing copied) and checks its size only.
    #[test]
    fn imported_files_are_linked_and_checked() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(&t.path().join("lay")).unwrap();
        let file = t.path().join("sealed");
        std::fs::write(&file, b"layer bytes").unwrap();
        let (d, len) = hash_reader(File::open(&file).unwrap()).unwrap();
        let right = Descriptor::new(MT_OCI_MANIFEST, d.clone(), len);
        // A descriptor of other bytes of the same size.
        let (other, _) = hash_reader(&b"other bytes"[..]).unwrap();
        let wrong = Descriptor::new(MT_OCI_MANIFEST, other.clone(), len);
        let short = Descriptor::new(MT_OCI_MANIFEST, other.clone(), len - 1);
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();

        assert!(matches!(
            l.import_file(&file, &wrong),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(!l.has_blob(&other));
        assert!(matches!(
            l.import_own_file(&file, &short),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(!l.has_blob(&other));

        l.import_own_file(&file, &right).unwrap();
        assert_eq!(ino(&l.blob_path(&d)), ino(&file));
        assert_eq!(l.read_blob(&right, 100).unwrap(), b"layer bytes");
        // Present already: nothing to do.
        l.import_file(&file, &right).unwrap();
    }

    #[test]
    fn opening_a_missing_layout_says_what_is_missing() {
        let t = tempfile::tempdir().unwrap();
        let why = |p: &Path| match Layout::open(p) {
            Err(Error::Invalid { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(why(&t.path().join("nope")), "no such directory");
        let file = t.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(why(&file), "not a directory");
        assert_eq!(
            why(t.path()),
            "not an OCI image layout (no oci-layout file)"
        );
        // A destination that is a file is named as such, not by a path below it.
        match Layout::open_or_create(&file) {
            Err(Error::Invalid { what, reason }) => {
                assert_eq!(
                    (what.as_str(), reason.as_str()),
                    (file.to_str().unwrap(), "not a directory")
                )
            }
            other => panic!("{other:?}"),
        }
        // A layout without index.json.
        std::fs::write(t.path().join(LAYOUT_FILE), LAYOUT_CONTENT).unwrap();
        match Layout::open(t.path()).unwrap().read_index() {
            Err(Error::Invalid { reason, .. }) => {
                assert_eq!(reason, "not an OCI image layout (no index.json)")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_write_tag_resolve() {
        let t = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(t.path()).unwrap();
        let m = br#"{"schemaVersion":2,"config":{"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
        let d = l.write_blob_bytes(m).unwrap();
        let desc = Descriptor::new(MT_OCI_MANIFEST, d.clone(), m.len() as u64);
        l.tag("v1", &desc).unwrap();
        l.tag("v1", &desc).unwrap();
        let l2 = Layout::open(t.path()).unwrap();
        assert_eq!(l2.read_index().unwrap().manifests.len(), 1);
        let r = l2.resolve(&Reference::Tag("v1".into())).unwrap();
        assert_eq!(r.digest, d);
        let r = l2.resolve(&Reference::Digest(d.clone())).unwrap();
        assert_eq!(r.media_type, MT_OCI_MANIFEST);
        assert!(matches!(
            l2.resolve(&Reference::Tag("nope".into())),
            Err(Error::NotFound(_))
        ));
        // A corrupted blob is detected when read.
        fs::write(l2.blob_path(&d), b"garbage garbage garbage").unwrap();
        let e = l2.read_blob(&desc, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("mismatch"), "{e}");
        // A directory where a blob should be: refused naming the path.
        fs::remove_file(l2.blob_path(&d)).unwrap();
        fs::create_dir(l2.blob_path(&d)).unwrap();
        let e = l2.open_blob(&desc).err().expect("a directory is no blob");
        let text = crate::error::Chain(&e).to_string();
        assert!(
            text.contains(&d.as_str()[7..]) && text.contains("not a regular file"),
            "{text}"
        );
    }

    /// Writers that share a layout, each with a layout of its own as separate
    /// processes have, keep each other's tags: `index.json` is changed under
    /// the layout's lock.
    #[test]
    fn concurrent_taggers_keep_every_tag() {
        let t = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(t.path()).unwrap();
        let d = l.write_blob_bytes(b"{}").unwrap();
        let desc = Descriptor::new(MT_OCI_MANIFEST, d, 2);
        std::thread::scope(|s| {
            for w in 0..6 {
                let (root, desc) = (t.path(), &desc);
                s.spawn(move || {
                    let l = Layout::open(root).unwrap();
                    for i in 0..25 {
                        l.tag(&format!("w{w}-{i}"), desc).unwrap();
                    }
                });
            }
        });
        assert_eq!(l.read_index().unwrap().manifests.len(), 6 * 25);
    }

    #[test]
    fn not_a_layout() {
        let t = tempfile::tempdir().unwrap();
        let e = Layout::open(t.path()).unwrap_err();
        assert!(e.to_string().contains("not an OCI image layout"), "{e}");
    }
}
