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
//! Steps 1–2 ([`apply_layer`]) and 3 ([`commit_layer`]) are separate so that the
//! pipeline can commit layer i while layer i+1 is applied on top of layer i's
//! writable files.
//!
//! `config.json` (the overlaybd image config that `overlaybd-apply` would read) is
//! written beside them for inspection with our other tools.

use super::{Error, Result};
use blockdev::commit::{commit_writable, CommitOptions, CommitStats};
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
    pub uuid: Uuid,
    pub parent_uuid: Option<Uuid>,
    /// How the commit compresses (`--algorithm`, `--bs`).
    pub zfile: ZfileOptions,
}

pub const COMMIT_FILE: &str = "overlaybd.commit";
pub const DATA_FILE: &str = "writable_data";
pub const INDEX_FILE: &str = "writable_index";

/// A layer whose tar has been applied to its writable files, ready to commit.
pub struct Applied {
    pub data: PathBuf,
    pub index: PathBuf,
    pub out: PathBuf,
    pub uuid: Uuid,
    pub parent_uuid: Option<Uuid>,
    pub zfile: ZfileOptions,
    pub apply: obdfs::ApplyStats,
}

impl Applied {
    /// This layer as a lower of the next one while it is being committed.
    pub fn as_lower(&self) -> LowerSource {
        LowerSource::Writable {
            data: self.data.clone(),
            index: self.index.clone(),
        }
    }
}

/// Create the writable layer and apply one (decompressed) tar stream to it.
/// `on_apply` gets tar bytes consumed.
pub fn apply_layer(
    job: &LayerJob<'_>,
    tar: &mut dyn Read,
    on_apply: &mut dyn FnMut(u64),
) -> Result<Applied> {
    let data = job.dir.join(DATA_FILE);
    let index = job.dir.join(INDEX_FILE);
    let out = job.dir.join(COMMIT_FILE);
    for p in [&data, &index, &out] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    create_writable(
        &data,
        &index,
        &CreateOptions {
            virtual_size: job.virtual_size,
            sparse: job.sparse,
            parent_uuid: job.parent_uuid,
            uuid: Some(job.uuid),
        },
    )?;
    write_image_config(job, &data, &index)?;
    let stack: Arc<dyn BlockDevice> = Arc::new(Stack::open_sources(
        job.lowers,
        Some((&data, &index)),
        // Scratch: committed, then deleted; no fsync on flush.
        |data, index| WritableLayer::open(data, index).map(WritableLayer::scratch),
    )?);
    let mut cb = |s: &obdfs::ApplyStats| on_apply(s.tar_bytes);
    let apply = job.engine.apply(
        stack.clone(),
        obdfs::Job {
            mkfs: job.mkfs,
            tar,
            progress: Some(&mut cb),
        },
    )?;
    stack.flush()?;
    Ok(Applied {
        data,
        index,
        out,
        uuid: job.uuid,
        parent_uuid: job.parent_uuid,
        zfile: job.zfile.clone(),
        apply,
    })
}

/// Commit an applied layer to `overlaybd.commit`: ZFile (the job's algorithm and block
/// size, CRC) wrapped in a tar, with its uuid and parent uuid.
pub fn commit_layer(
    a: &Applied,
    progress: Option<blockdev::commit::Progress>,
) -> Result<CommitStats> {
    Ok(commit_writable(
        &a.data,
        &a.index,
        &a.out,
        &CommitOptions {
            zfile: Some(a.zfile.clone()),
            tar: true,
            uuid: Some(a.uuid),
            parent_uuid: a.parent_uuid,
            user_tag: None,
            force: true,
            progress,
        },
    )?)
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
