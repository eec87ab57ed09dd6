//! What a run adds to OCI image layout destinations, so that a run that fails or is
//! interrupted can take it back ([`undo_all`]) and leave each layout as it found it.
//!
//! [`start`] opens a journal for a layout directory before it is opened for writing.
//! From then on [`crate::layout::Layout`] records in it what it creates there: the
//! directory itself (and its missing parents), or, in a directory that held no layout,
//! the layout's own files (`oci-layout`, `index.json`, `blobs/sha256`); and every blob
//! that was not there before. [`undo_all`] then removes, under the layout's lock:
//!
//! * a layout the run created (its directory, or its files in a directory that
//!   existed), if no image is tagged in it: another process may have tagged one
//!   meanwhile, and then it stays;
//! * otherwise the blobs the run added that no image of `index.json` references
//!   (the manifests, indexes, configs and layers reachable from it, and blobs named by
//!   their annotations, such as a TurboOCI layer's target). A blob that was there
//!   before the run, or that an image references (another image may share a layer),
//!   stays, as does every file the run did not create.
//!
//! [`keep_all`] closes the journals of a run that succeeded. Both are process-wide, so
//! that a signal thread about to exit the process can call [`undo_all`].

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::model::{Descriptor, Index, MAX_MANIFEST_SIZE};
use crate::Digest;

/// What the process added to one layout directory.
#[derive(Debug)]
struct Journal {
    root: PathBuf,
    /// The topmost directory among `root` and its parents that did not exist when the
    /// journal started (`None`: `root` existed).
    created_dir: Option<PathBuf>,
    /// Files and directories made in a `root` that existed, in the order made.
    created: Vec<PathBuf>,
    /// Blobs written that were not there before.
    blobs: Vec<Digest>,
}

struct State {
    journals: Vec<Journal>,
    /// Roots whose journals [`undo_all`] or [`keep_all`] closed: they take no new
    /// blob (until [`start`]ed again).
    closed: Vec<PathBuf>,
}

static STATE: Mutex<State> = Mutex::new(State {
    journals: Vec::new(),
    closed: Vec::new(),
});

fn state() -> MutexGuard<'static, State> {
    // Every change under the lock is one push, drain or field update.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts recording what this process adds to the layout at `root` (before it is
/// created or opened for writing). Starting it again changes nothing.
pub fn start(root: &Path) {
    let mut st = state();
    st.closed.retain(|c| c != root);
    if st.journals.iter().any(|j| j.root == root) {
        return;
    }
    let mut created_dir = None;
    if fs::symlink_metadata(root).is_err() {
        let mut top = root.to_path_buf();
        for a in root.ancestors().skip(1) {
            if a.as_os_str().is_empty() || fs::symlink_metadata(a).is_ok() {
                break;
            }
            top = a.to_path_buf();
        }
        created_dir = Some(top);
    }
    st.journals.push(Journal {
        root: root.to_path_buf(),
        created_dir,
        created: Vec::new(),
        blobs: Vec::new(),
    });
}

/// Records that `path` (a file or directory of the layout) was created in `root`.
pub(crate) fn created(root: &Path, path: &Path) {
    if let Some(j) = state().journals.iter_mut().find(|j| j.root == root) {
        j.created.push(path.to_path_buf());
    }
}

/// Whether a blob may still be added to `root`: not once its journal was closed
/// (the run is being undone, or quitting).
pub(crate) fn may_add(root: &Path) -> io::Result<()> {
    if state().closed.iter().any(|c| c == root) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("{}: interrupted: no new blob", root.display()),
        ));
    }
    Ok(())
}

/// Records that blob `d`, absent before, was added to `root`.
pub(crate) fn added_blob(root: &Path, d: &Digest) {
    if let Some(j) = state().journals.iter_mut().find(|j| j.root == root) {
        j.blobs.push(d.clone());
    }
}

/// Closes every journal: the run succeeded and keeps what it added.
pub fn keep_all() {
    let mut st = state();
    let roots: Vec<PathBuf> = st.journals.drain(..).map(|j| j.root).collect();
    st.closed.extend(roots);
}

/// Takes back what the process added to every journaled layout (see the module
/// documentation) and closes the journals. Returns one line per layout changed,
/// saying what was removed (or what could not be).
pub fn undo_all() -> Vec<String> {
    let journals = {
        let mut st = state();
        let journals = std::mem::take(&mut st.journals);
        st.closed.extend(journals.iter().map(|j| j.root.clone()));
        journals
    };
    journals
        .into_iter()
        .filter_map(|j| match undo(&j) {
            Ok(done) => done,
            Err(e) => Some(format!(
                "could not take back what this run added to {}: {}",
                j.root.display(),
                crate::error::Chain(&e)
            )),
        })
        .collect()
}

fn undo(j: &Journal) -> crate::Result<Option<String>> {
    // Nothing added (the layout could not even be opened, say): nothing to take back,
    // and nothing to read (its index.json may be what the run failed on).
    let added = j.created_dir.is_some() || !j.created.is_empty() || !j.blobs.is_empty();
    if !added || fs::symlink_metadata(&j.root).is_err() {
        return Ok(None);
    }
    let layout = crate::layout::Layout::unopened(&j.root);
    let _lock = crate::layout::lock_dir(&j.root)?;
    let index_path = j.root.join("index.json");
    let index: Option<Index> = match fs::read(&index_path) {
        Ok(bytes) => Some(crate::model::parse_json(
            &index_path.display().to_string(),
            &bytes,
        )?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(crate::Error::io(&index_path, e)),
    };
    let tagged = index.as_ref().is_some_and(|i| !i.manifests.is_empty());
    if let (false, Some(top)) = (tagged, &j.created_dir) {
        fs::remove_dir_all(&j.root).map_err(|e| crate::Error::io(&j.root, e))?;
        // The parents made for it, if nothing else came into them meanwhile.
        for a in j.root.ancestors().skip(1) {
            if !a.starts_with(top) || fs::remove_dir(a).is_err() {
                break;
            }
        }
        return Ok(Some(format!(
            "removed {} (created by this run)",
            top.display()
        )));
    }
    let referenced = match &index {
        Some(i) => referenced_blobs(&layout, i),
        None => HashSet::new(),
    };
    let mut removed = 0usize;
    let mut seen = HashSet::new();
    for d in &j.blobs {
        if !seen.insert(d) || referenced.contains(d) {
            continue;
        }
        match fs::remove_file(layout.blob_path(d)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::Error::io(layout.blob_path(d), e)),
        }
    }
    if !tagged && !j.created.is_empty() {
        // The layout's own files, made by this run in a directory that existed.
        for p in j.created.iter().rev() {
            let _ = match fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => fs::remove_dir(p),
                Ok(_) => fs::remove_file(p),
                Err(_) => Ok(()),
            };
        }
        return Ok(Some(format!(
            "removed the OCI layout this run made in {} ({})",
            j.root.display(),
            blobs(removed)
        )));
    }
    Ok((removed > 0).then(|| {
        format!(
            "removed {} this run added to {} (no image there uses them)",
            blobs(removed),
            j.root.display()
        )
    }))
}

fn blobs(n: usize) -> String {
    format!("{n} blob{}", if n == 1 { "" } else { "s" })
}

/// The blobs the images of `index` use: every descriptor reachable from its entries
/// through the manifests and indexes in the layout (their `manifests`, `config`,
/// `layers`, `blobs` and `subject`), and digests named by their annotations. A blob
/// that cannot be read or parsed ends its branch.
fn referenced_blobs(layout: &crate::layout::Layout, index: &Index) -> HashSet<Digest> {
    let mut seen = HashSet::new();
    let mut todo: Vec<serde_json::Value> = index
        .manifests
        .iter()
        .filter_map(|d| serde_json::to_value(d).ok())
        .collect();
    while let Some(v) = todo.pop() {
        if let Some(ann) = v.get("annotations").and_then(|a| a.as_object()) {
            seen.extend(
                ann.values()
                    .filter_map(|s| s.as_str()?.parse::<Digest>().ok()),
            );
        }
        let Some(d) = v
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse::<Digest>().ok())
        else {
            continue;
        };
        if !seen.insert(d.clone()) {
            continue;
        }
        let mt = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
        let size = v.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
        if is_layer(mt) || size > MAX_MANIFEST_SIZE {
            continue;
        }
        let Ok(bytes) = layout.read_blob(&Descriptor::new(mt, d, size), MAX_MANIFEST_SIZE) else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if let Some(ann) = doc.get("annotations").and_then(|a| a.as_object()) {
            seen.extend(
                ann.values()
                    .filter_map(|s| s.as_str()?.parse::<Digest>().ok()),
            );
        }
        for key in ["manifests", "layers", "blobs"] {
            if let Some(list) = doc.get(key).and_then(|l| l.as_array()) {
                todo.extend(list.iter().cloned());
            }
        }
        for key in ["config", "subject"] {
            if let Some(one) = doc.get(key) {
                todo.push(one.clone());
            }
        }
    }
    seen
}

/// Layer blobs hold no descriptors: they are not read.
fn is_layer(media_type: &str) -> bool {
    media_type.contains(".layer.") || media_type.contains(".rootfs.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::model::MT_OCI_MANIFEST;

    fn listing(d: &Path) -> Vec<String> {
        let mut out: Vec<String> = walk(d)
            .into_iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        out.sort();
        out
    }

    fn walk(d: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
        out
    }

    /// A manifest blob referencing `layers`, tagged `tag`.
    fn tag_image(l: &Layout, tag: &str, layers: &[&Digest]) {
        let m = serde_json::json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": layers[0], "size": 1},
            "layers": layers.iter().map(|d| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d, "size": 1})).collect::<Vec<_>>()})
        .to_string();
        let d = l.write_blob_bytes(m.as_bytes()).unwrap();
        l.tag(tag, &Descriptor::new(MT_OCI_MANIFEST, d, m.len() as u64))
            .unwrap();
    }

    /// One test: the journals are process-wide.
    #[test]
    fn undo_takes_back_only_what_was_added_and_is_unused() {
        let t = tempfile::tempdir().unwrap();

        // A layout that existed, with an image: blobs added and used by no image go;
        // a blob that was there, and one added that an image (tagged meanwhile, as
        // by another process) uses, stay.
        let old = t.path().join("old");
        let l = Layout::open_or_create(&old).unwrap();
        let there = l.write_blob_bytes(b"there").unwrap();
        tag_image(&l, "old", &[&there]);
        start(&old);
        let l = Layout::open_or_create(&old).unwrap();
        l.write_blob_bytes(b"there").unwrap();
        let orphan = l.write_blob_bytes(b"orphan").unwrap();
        let (streamed, _) = l.write_blob_stream(&b"streamed"[..], None).unwrap();
        let shared = l.write_blob_bytes(b"shared").unwrap();
        let file = t.path().join("file");
        fs::write(&file, b"linked").unwrap();
        let (linked, len) = crate::digest::hash_reader(fs::File::open(&file).unwrap()).unwrap();
        l.import_file(&file, &Descriptor::new("x", linked.clone(), len))
            .unwrap();
        tag_image(&Layout::open(&old).unwrap(), "other", &[&shared]);

        // A new layout in a new directory; one in a directory that held a file.
        let top = t.path().join("new");
        let new = top.join("a/b");
        start(&new);
        Layout::open_or_create(&new)
            .unwrap()
            .write_blob_bytes(b"x")
            .unwrap();
        let plain = t.path().join("plain");
        fs::create_dir(&plain).unwrap();
        fs::write(plain.join("mine"), b"x").unwrap();
        start(&plain);
        Layout::open_or_create(&plain)
            .unwrap()
            .write_blob_bytes(b"y")
            .unwrap();

        let said = undo_all();
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].contains("removed 3 blobs"), "{said:?}");
        assert!(
            said[1] == format!("removed {} (created by this run)", top.display()),
            "{said:?}"
        );
        assert!(said[2].starts_with("removed the OCI layout"), "{said:?}");
        for d in [&orphan, &streamed, &linked] {
            assert!(!l.has_blob(d), "{d}");
        }
        for d in [&there, &shared] {
            assert!(l.has_blob(d), "{d}");
        }
        assert!(!top.exists());
        assert_eq!(listing(&plain), ["mine"]);
        // Closed: no new blob in a layout being undone.
        assert!(l.write_blob_bytes(b"late").is_err());

        // A created layout in which an image was tagged meanwhile stays, less the
        // blobs it does not use; a run that succeeded keeps everything.
        start(&top);
        let l = Layout::open_or_create(&top).unwrap();
        let used = l.write_blob_bytes(b"used").unwrap();
        let unused = l.write_blob_bytes(b"unused").unwrap();
        tag_image(&l, "v", &[&used]);
        let said = undo_all();
        assert!(said[0].contains("removed 1 blob "), "{said:?}");
        assert!(l.has_blob(&used) && !l.has_blob(&unused));
        start(&top);
        let kept = l.write_blob_bytes(b"kept").unwrap();
        keep_all();
        assert!(undo_all().is_empty());
        assert!(l.has_blob(&kept));
    }
}
