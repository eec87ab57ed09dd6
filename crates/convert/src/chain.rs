//! The per-layer overlaybd chain, in-process, equivalent to upstream's
//! `overlaybd-create` → `overlaybd-apply` → `overlaybd-commit -z -t` for one layer:
//!
//! 1. create a writable LSMT layer (`writable_data`, `writable_index`): the virtual
//!    size for the bottom layer, taken from the lowers above it;
//! 2. open the stack lowers + writable layer; on the bottom layer with `--mkfs`, make
//!    the ext4; apply the layer tar (whiteouts, hard links, xattrs, ...);
//! 3. commit the writable layer to `overlaybd.commit`: ZFile (lz4 and 4 KiB blocks
//!    unless `--algorithm`/`--bs` say otherwise, CRC) wrapped in a tar, with uuid = UUID(chain id) and parent = UUID(previous
//!    chain id).
//!
//! Steps 1–2 ([`prepare_layer`], then [`Prepared::apply`]) and 3 ([`commit_layer`])
//! are separate so that the pipeline can commit layer i while layer i+1 is applied on
//! top of layer i's writable files.
//!
//! `config.json` (the overlaybd image config that `overlaybd-apply` would read) is
//! written beside them for inspection with our other tools.
//!
//! A sparse layer committed with 4 KiB ZFile blocks is kept packed unless asked
//! otherwise ([`LayerJob::packed`]): its data is compressed into ZFile blocks as it
//! is written ([`PackedStore`]) and the commit copies them, so the raw data never
//! goes to a file; the commit is byte for byte the one of the data file. Such a
//! layer has no data and index files (nor `config.json`) to look at.

use super::{Error, Result};
use blockdev::commit::{commit_packed, commit_writable, CommitOptions, CommitStats};
use blockdev::lsmt::packed::PackedStore;
use blockdev::lsmt::writable::create_packed;
use blockdev::lsmt::{create_writable, CreateOptions, WritableLayer};
use blockdev::stack::LowerSource;
use blockdev::zfile::ZfileOptions;
use blockdev::{BlockDevice, Stack, Uuid};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One layer's inputs.
pub struct LayerJob<'a> {
    /// The layer's own directory.
    pub dir: &'a Path,
    /// The layers below, bottom first: committed files, or the previous layer's
    /// writable files while its commit is still running.
    pub lowers: &'a [LowerSource],
    /// Virtual size in bytes for a layer with no lowers; 0 otherwise.
    pub virtual_size: u64,
    /// Make an ext4 before applying (bottom layer with `--mkfs`).
    pub mkfs: bool,
    /// How the ext4 is made and the tar applied (`--engine`).
    pub engine: &'a dyn obdfs::Engine,
    pub sparse: bool,
    /// Keep a sparse layer's data packed ([`PackedStore`]: compressed as written,
    /// copied by the commit) instead of in a data file; needs `sparse` and 4 KiB
    /// ZFile blocks, else ignored. Off when the work files are kept (`--reserve`):
    /// a packed layer has no data and index files to look at.
    pub packed: bool,
    pub uuid: Uuid,
    pub parent_uuid: Option<Uuid>,
    /// How the commit compresses (`--algorithm`, `--bs`).
    pub zfile: ZfileOptions,
}

pub const COMMIT_FILE: &str = "overlaybd.commit";
pub const DATA_FILE: &str = "writable_data";
pub const INDEX_FILE: &str = "writable_index";
/// A packed layer's side file ([`PackedStore`]).
pub const PACKED_FILE: &str = "writable_data.packed";

/// One layer's work files and what its commit records.
#[derive(Debug)]
pub struct LayerFiles {
    /// The writable layer (a packed layer: its side file, and no index file).
    pub data: PathBuf,
    pub index: PathBuf,
    /// The data of a packed layer.
    pub packed: Option<Arc<PackedStore>>,
    /// The commit file to write.
    pub out: PathBuf,
    pub uuid: Uuid,
    pub parent_uuid: Option<Uuid>,
    pub zfile: ZfileOptions,
}

/// A layer whose tar has been applied to its writable files, ready to commit.
pub struct Applied {
    pub files: LayerFiles,
    pub apply: obdfs::ApplyStats,
}

impl Applied {
    /// This layer as a lower of the next one while it is being committed.
    pub fn as_lower(&self) -> LowerSource {
        match &self.files.packed {
            Some(p) => LowerSource::Packed(p.clone()),
            None => LowerSource::Writable {
                data: self.files.data.clone(),
                index: self.files.index.clone(),
            },
        }
    }
}

/// A layer's writable files, created and opened on top of its lowers ([`prepare_layer`]),
/// waiting for its tar ([`Prepared::apply`]). The bottom layer's ext4 is made by
/// [`prepare_layer`] when asked, so that it is done while the tar is still being
/// downloaded; otherwise with the apply.
pub struct Prepared {
    stack: Arc<dyn BlockDevice>,
    /// The engine's apply makes the ext4 first (not done ahead).
    engine_mkfs: bool,
    files: LayerFiles,
}

/// Create the writable layer of `job` and open it on its lowers; with `mkfs_now` (and
/// `job.mkfs`), make the ext4 right away. The device sees the same writes in the same
/// order either way: the engine's apply with `mkfs` is its mkfs followed by the apply.
pub fn prepare_layer(job: &LayerJob<'_>, mkfs_now: bool) -> Result<Prepared> {
    let packed = job.packed
        && job.sparse
        && u64::from(job.zfile.block_size) == blockdev::lsmt::packed::BLOCK;
    let data = job.dir.join(if packed { PACKED_FILE } else { DATA_FILE });
    let index = job.dir.join(INDEX_FILE);
    let out = job.dir.join(COMMIT_FILE);
    for p in [&data, &index, &out] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    let create = CreateOptions {
        virtual_size: job.virtual_size,
        sparse: job.sparse,
        parent_uuid: job.parent_uuid,
        uuid: Some(job.uuid),
    };
    let (stack, store): (Arc<dyn BlockDevice>, _) = if packed {
        let store = create_packed(&data, &create, &job.zfile)?;
        let lowers = Stack::open_lowers(job.lowers)?;
        let upper = WritableLayer::open_packed(store.clone(), false)?.scratch();
        (
            Arc::new(Stack::with_lowers(lowers, Some(upper))?),
            Some(store),
        )
    } else {
        create_writable(&data, &index, &create)?;
        write_image_config(job, &data, &index)?;
        let stack = Stack::open_sources(
            job.lowers,
            Some((&data, &index)),
            // Scratch: committed, then deleted; no fsync on flush.
            |data, index| WritableLayer::open(data, index).map(WritableLayer::scratch),
        )?;
        (Arc::new(stack), None)
    };
    let mut engine_mkfs = job.mkfs;
    if job.mkfs && mkfs_now {
        job.engine.mkfs(stack.clone())?;
        engine_mkfs = false;
    }
    Ok(Prepared {
        stack,
        engine_mkfs,
        files: LayerFiles {
            data,
            index,
            packed: store,
            out,
            uuid: job.uuid,
            parent_uuid: job.parent_uuid,
            zfile: job.zfile.clone(),
        },
    })
}

impl Prepared {
    /// Apply one (decompressed) tar stream to the layer with `engine` (the job's), after
    /// its mkfs if that is still to do. `on_apply` gets tar bytes consumed.
    pub fn apply(
        self,
        engine: &dyn obdfs::Engine,
        tar: &mut dyn Read,
        on_apply: &mut dyn FnMut(u64),
    ) -> Result<Applied> {
        let mut cb = |s: &obdfs::ApplyStats| on_apply(s.tar_bytes);
        let apply = engine.apply(
            self.stack.clone(),
            obdfs::Job {
                mkfs: self.engine_mkfs,
                tar,
                progress: Some(&mut cb),
            },
        )?;
        self.stack.flush()?;
        Ok(Applied {
            files: self.files,
            apply,
        })
    }
}

/// Commit an applied layer to `overlaybd.commit`: ZFile (the job's algorithm and block
/// size, CRC) wrapped in a tar, with its uuid and parent uuid.
pub fn commit_layer(
    a: &LayerFiles,
    progress: Option<blockdev::commit::Progress>,
) -> Result<CommitStats> {
    let opts = CommitOptions {
        zfile: Some(a.zfile.clone()),
        tar: true,
        uuid: Some(a.uuid),
        parent_uuid: a.parent_uuid,
        user_tag: None,
        force: true,
        progress,
    };
    Ok(match &a.packed {
        Some(store) => {
            let layer = WritableLayer::open_packed(store.clone(), true)?;
            commit_packed(&layer, &a.out, &opts)?
        }
        None => commit_writable(&a.data, &a.index, &a.out, &opts)?,
    })
}

/// The overlaybd image config of this step, as upstream's convertor writes it
/// (a lower still being committed is named by the commit file it becomes).
fn write_image_config(job: &LayerJob<'_>, data: &Path, index: &Path) -> Result<()> {
    let lowers: Vec<_> = job
        .lowers
        .iter()
        .map(|l| match l {
            LowerSource::File(p) => serde_json::json!({ "file": p }),
            LowerSource::Writable { data, .. } => serde_json::json!({
                "file": data.parent().unwrap_or(Path::new(".")).join(COMMIT_FILE)
            }),
            LowerSource::Packed(store) => serde_json::json!({
                "file": store.path().parent().unwrap_or(Path::new(".")).join(COMMIT_FILE)
            }),
            LowerSource::Warp { file, target }
            | LowerSource::WritableWarp {
                data: file, target, ..
            } => {
                let mut v = serde_json::Map::new();
                if let Some(g) = &target.gzip_index {
                    v.insert("gzipIndex".into(), serde_json::json!(g));
                }
                v.insert("file".into(), serde_json::json!(file));
                v.insert("targetFile".into(), serde_json::json!(target.file));
                serde_json::Value::Object(v)
            }
        })
        .collect();
    let cfg = serde_json::json!({
        "repoBlobUrl": "",
        "lowers": lowers,
        "upper": { "index": index, "data": data },
        "resultFile": "",
    });
    let p = job.dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("in-memory JSON"))
        .map_err(|e| Error::io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small layer tar: a directory, two files (one spanning several blocks) and a
    /// symbolic link.
    fn layer_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, data).unwrap();
        };
        add("etc/", tar::EntryType::Directory, b"", None);
        add("etc/hello", tar::EntryType::Regular, b"hello\n", None);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        add("etc/big", tar::EntryType::Regular, &big, None);
        add("etc/link", tar::EntryType::Symlink, b"", Some("hello"));
        b.into_inner().unwrap()
    }

    fn job<'a>(dir: &'a Path, engine: &'a dyn obdfs::Engine) -> LayerJob<'a> {
        LayerJob {
            dir,
            lowers: &[],
            virtual_size: 64 << 30,
            mkfs: true,
            engine,
            sparse: true,
            packed: false,
            uuid: Uuid::from_chain_id(
                "sha256:1111111111111111111111111111111111111111111111111111111111111111",
            )
            .unwrap(),
            parent_uuid: None,
            zfile: ZfileOptions {
                threads: 1,
                ..Default::default()
            },
        }
    }

    /// A layer on top of [`layer_tar`]: a whiteout, a replaced file, a new
    /// multi-MiB file and a directory.
    fn upper_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_100);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        add("etc/.wh.hello", tar::EntryType::Regular, b"");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        add("etc/big", tar::EntryType::Regular, &big);
        add("opt/", tar::EntryType::Directory, b"");
        // More than 8 MiB: the sealed index cuts such runs at 16383 sectors, inside
        // a block.
        let huge: Vec<u8> = (0..20_000_000u32)
            .map(|i| (i / 7 % 256) as u8 ^ (i >> 20) as u8)
            .collect();
        add("opt/huge", tar::EntryType::Regular, &huge);
        b.into_inner().unwrap()
    }

    /// Two stacked layers applied and committed with their data packed give the
    /// same writable behaviour and the same commits, byte for byte, as with data
    /// files, for lz4 and zstd; the packed lower reads as the reopened data file.
    #[test]
    fn packed_layers_commit_to_the_same_bytes() {
        let engine = obdfs::Libext2fs::default();
        for algorithm in [
            blockdev::zfile::Algorithm::Lz4,
            blockdev::zfile::Algorithm::Zstd,
        ] {
            let mut commits = Vec::new();
            for packed in [false, true] {
                let tmp = tempfile::tempdir().unwrap();
                let (d0, d1) = (tmp.path().join("0"), tmp.path().join("1"));
                std::fs::create_dir_all(&d0).unwrap();
                std::fs::create_dir_all(&d1).unwrap();
                let mut j0 = job(&d0, &engine);
                j0.packed = packed;
                j0.zfile.algorithm = algorithm;
                j0.zfile.threads = 2;
                let a0 = prepare_layer(&j0, true)
                    .unwrap()
                    .apply(&engine, &mut &layer_tar()[..], &mut |_| {})
                    .unwrap();
                assert_eq!(a0.files.packed.is_some(), packed);
                let lowers = [a0.as_lower()];
                let mut j1 = job(&d1, &engine);
                j1.lowers = &lowers;
                j1.mkfs = false;
                j1.virtual_size = 0;
                j1.packed = packed;
                j1.zfile.algorithm = algorithm;
                j1.parent_uuid = Some(j0.uuid);
                let a1 = prepare_layer(&j1, false)
                    .unwrap()
                    .apply(&engine, &mut &upper_tar()[..], &mut |_| {})
                    .unwrap();
                assert_eq!(a1.apply.entries, 4);
                commit_layer(&a0.files, None).unwrap();
                commit_layer(&a1.files, None).unwrap();
                commits.push((
                    std::fs::read(&a0.files.out).unwrap(),
                    std::fs::read(&a1.files.out).unwrap(),
                ));
                assert!(
                    std::fs::metadata(&a1.files.data).is_ok(),
                    "the layer's data (file or side file) exists"
                );
                assert_eq!(a1.files.data.ends_with(PACKED_FILE), packed);
            }
            assert!(commits[0].0.len() > 4096);
            assert!(
                commits[0].0 == commits[1].0,
                "{algorithm:?}: layer 0 commit differs"
            );
            assert!(
                commits[0].1 == commits[1].1,
                "{algorithm:?}: layer 1 commit differs"
            );
        }
    }

    /// The bottom layer's mkfs done ahead ([`prepare_layer`] with `mkfs_now`, as the
    /// pipeline does while the layer downloads) gives the same writable files and the
    /// same commit, byte for byte, as the mkfs done by the apply.
    #[test]
    fn mkfs_ahead_gives_the_same_layer() {
        let engine = obdfs::Libext2fs::default();
        let tar = layer_tar();
        let mut outputs = Vec::new();
        for ahead in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let j = job(tmp.path(), &engine);
            let prepared = prepare_layer(&j, ahead).unwrap();
            let mut read = 0;
            let applied = prepared
                .apply(&engine, &mut &tar[..], &mut |n| read = n)
                .unwrap();
            assert_eq!(applied.apply.entries, 4);
            assert!(
                read >= tar.len() as u64 - 1024,
                "tar bytes reported: {read}"
            );
            commit_layer(&applied.files, None).unwrap();
            let index = std::fs::read(&applied.files.index).unwrap();
            let commit = std::fs::read(&applied.files.out).unwrap();
            outputs.push((index, commit));
        }
        assert!(!outputs[0].1.is_empty());
        assert_eq!(outputs[0].0, outputs[1].0, "writable index differs");
        assert_eq!(outputs[0].1, outputs[1].1, "commit differs");
    }
}
