//! The TurboOCI v1 format (upstream's `--turboOCI` / `--fastoci`): the source layer blobs
//! stay in the repository as they are; each converted layer is a small metadata layer
//! whose filesystem maps file data into the original blob.
//!
//! Per source layer (gzip or uncompressed tar; zstd is refused, it cannot be read by
//! offset), as upstream's `turboOCI_builder.go` runs its tools:
//! 1. a writable warp layer (`overlaybd-create -s <vsize> --turboOCI [--mkfs]`): vsize is
//!    `--vsize` with `--mkfs`, else 64, for every layer; the ext4 is made on the bottom
//!    layer with `--mkfs` (never for EROFS);
//! 2. the blob applied in reference mode ([`obdfs::turbo::apply_read_ahead`], upstream's
//!    `turboOCI-apply`) in one pass while it downloads: a gzip blob is inflated once,
//!    `gzip.meta` (the gzip random-access index) built on the way, a few layers
//!    ahead of the apply ([`OutputFormat::lookahead`]: the apply needs only the tar's
//!    headers, so the inflating of several layers runs on all cores);
//!    directories, inodes, symlinks, xattrs and whiteouts written into the layer, each
//!    regular file's data a *target* mapping (LSMT tag 1) into the uncompressed tar;
//! 3. sealed ([`blockdev::commit::commit_warp`], `overlaybd-commit -z --fastoci`): a
//!    ZFile (lz4, 4 KiB) of the warp LSMT, uuid all zeros, named `<fs>.fs.meta`;
//! 4. the pushed blob `turboOCIv1.tar.gz` = gzip of a Go-style tar ([`super::gotar`],
//!    mode 0644) of `<fs>.fs.meta`, the empty marker `.turbo.ociv1` and, for gzip
//!    sources, `gzip.meta`.
//!
//! Layer descriptor: gzip layer media type (Docker or OCI per `--oci`), annotations
//! `version: 0.1.0-turbo.ociv1`, `blob-digest`, `blob-size`, `turbo-oci/target-digest`
//! (the source layer's digest) and `turbo-oci/target-media-type` (the source's family,
//! tar or gzip as sniffed); diff ID = sha256 of the uncompressed `turboOCIv1.tar.gz`.
//! With `--mkfs=false` upstream's prebuilt base layer is the bottom lower and is pushed,
//! raw (not tar-wrapped), as the first layer. The runtime reads the source layers from
//! the image's own repository, so the pipeline keeps them there.
//!
//! Not byte-identical to upstream: the gzip of `turboOCIv1.tar.gz` (Go's deflate, here
//! zlib's at the same level 6), so layer digests differ while the tar inside, its diff
//! ID, is the same for the same `<fs>.fs.meta`.

use super::gotar::GoTarWriter;
use super::native::{check_baselayer, key_options, native_layer_descriptor};
use super::{
    Applied, BlobFile, LayerChain, LayerInput, LayerJob, LayerOut, ManifestJob, OutputFormat,
    ProgressFn, Reuse, SealJob, Sealed,
};
use crate::annotations::*;
use crate::dedup::Reused;
use crate::{ConvertOptions, Error, Result, FORMAT_VERSION};
use blockdev::commit::{commit_warp, CommitOptions};
use blockdev::stack::LowerSource;
use blockdev::warp::TargetSource;
use blockdev::zfile::ZfileOptions;
use obdfs::turbo::{BlobKind, Durability, FsType, ReadAhead, TurboApply};
use obdoci::digest::{hash_reader, HashingWriter};
use obdoci::model::*;
use obdoci::{Descriptor, Digest};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The pushed layer blob.
pub const TURBO_LAYER_FILE: &str = "turboOCIv1.tar.gz";
/// The empty marker file inside it.
pub const TURBO_MARKER: &str = ".turbo.ociv1";
/// The gzip index inside it (gzip sources).
pub const GZIP_META: &str = "gzip.meta";

const DATA_FILE: &str = "writable_data";
const INDEX_FILE: &str = "writable_index";

/// The TurboOCI v1 output format.
#[derive(Clone, Debug)]
pub struct TurboFormat {
    oci: bool,
    referrer: bool,
    mkfs: bool,
    vsize_gb: u64,
    fstype: FsType,
    baselayer: PathBuf,
}

impl TurboFormat {
    /// TurboOCI with `fstype` (`--fstype`: ext4 or erofs) and the conversion options.
    pub fn new(o: &ConvertOptions, fstype: FsType) -> TurboFormat {
        TurboFormat {
            oci: o.oci || o.referrer,
            referrer: o.referrer,
            mkfs: o.mkfs,
            vsize_gb: o.vsize_gb,
            fstype,
            baselayer: o.baselayer.clone(),
        }
    }

    /// `--fstype` as upstream spells it: "" or "ext4", "erofs"; anything else is an
    /// error naming the value.
    pub fn parse_fstype(s: &str) -> Result<FsType> {
        FsType::parse(s).ok_or_else(|| {
            Error::Invalid(format!(
                "--fstype {s:?}: expected ext4 or erofs (the filesystem of TurboOCI layers; overlaybd layers are ext4), or ext4;MOUNT_OPTS;MKFS_OPTS for --engine kernel"
            ))
        })
    }

    fn layer_media_type(&self) -> &'static str {
        if self.oci {
            MT_OCI_LAYER_GZIP
        } else {
            MT_DOCKER_LAYER_GZIP
        }
    }

    /// The descriptor of a TurboOCI layer blob made from `source`.
    fn layer_descriptor(
        &self,
        d: Digest,
        size: u64,
        source: &Descriptor,
        gzip: bool,
    ) -> Descriptor {
        let mut ann = blob_annotations(&d, size, TURBO_OCI_VERSION);
        ann.insert(
            ANNOTATION_TURBO_TARGET_DIGEST.to_string(),
            source.digest.to_string(),
        );
        ann.insert(
            ANNOTATION_TURBO_TARGET_MEDIA_TYPE.to_string(),
            target_media_type(&source.media_type, gzip).to_string(),
        );
        let mut desc = Descriptor::new(self.layer_media_type(), d, size);
        desc.annotations = Some(ann);
        desc
    }

    fn virtual_size(&self) -> u64 {
        if self.mkfs {
            self.vsize_gb << 30
        } else {
            64 << 30
        }
    }
}

/// `turbo-oci/target-media-type`: the source layer's family (Docker or OCI) with tar or
/// gzip as the blob is.
pub fn target_media_type(source_mt: &str, gzip: bool) -> &'static str {
    match (source_mt.starts_with("application/vnd.docker."), gzip) {
        (true, true) => MT_DOCKER_LAYER_GZIP,
        (true, false) => MT_DOCKER_LAYER_TAR,
        (false, true) => MT_OCI_LAYER_GZIP,
        (false, false) => MT_OCI_LAYER_TAR,
    }
}

impl OutputFormat for TurboFormat {
    fn name(&self) -> &'static str {
        "turboOCI"
    }

    fn artifact_type(&self) -> &'static str {
        ARTIFACT_TYPE_TURBO
    }

    /// `overlaybd-rs/1+turbooci;vsize=..;mkfs=..;referrer=..;fstype=..[;base=..]`:
    /// never equal to a native key, so the formats never share rows.
    fn dedup_format_key(&self) -> Result<String> {
        let mut opts = key_options(self.vsize_gb, self.mkfs, self.referrer, &self.baselayer)?;
        let fs = match self.fstype {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        };
        opts.push(("fstype", fs.to_string()));
        let refs: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Ok(obddedup::format_key(
            &format!("{FORMAT_VERSION}+turbooci"),
            &refs,
        ))
    }

    fn check(&self) -> Result<()> {
        if !self.mkfs && self.fstype == FsType::Erofs {
            return Err(Error::Invalid(
                "--mkfs=false stacks upstream's ext4 base layer, which EROFS TurboOCI layers \
                 cannot be built on; use --mkfs (the default) with --fstype erofs"
                    .into(),
            ));
        }
        check_baselayer(self.mkfs, &self.baselayer)
    }

    fn check_layer(&self, layer: &Descriptor) -> std::result::Result<(), String> {
        let mt = layer.media_type.as_str();
        if mt == MT_DOCKER_LAYER_ZSTD || mt == MT_OCI_LAYER_ZSTD {
            // The caller names the layer.
            return Err(format!(
                "zstd-compressed ({mt}): TurboOCI reads layers by offset and needs \
                 gzip or uncompressed tar layers"
            ));
        }
        Ok(())
    }

    fn references_source_layers(&self) -> bool {
        true
    }

    /// A layer below a converted one is converted again (its lower needs the source
    /// blob, and conversion is cheap); others are taken over from their pushed blob,
    /// which is downloaded for its diff ID and whether the source was gzip.
    fn reuse(&self, needed_as_lower: bool) -> Reuse {
        if needed_as_lower {
            Reuse::Convert
        } else {
            Reuse::Download(TURBO_LAYER_FILE)
        }
    }

    /// Layers above the one being applied are inflated and indexed meanwhile (the
    /// apply needs only their tar headers, at most 8 MiB of them per layer are held):
    /// one more than there are cores, so the inflating, most of the work, keeps every
    /// core busy until the last layer (on 2 cores, 3 ahead: a 4-layer image 0.61 s,
    /// 2 ahead: 0.70 s, where the last layer inflated alone).
    fn lookahead(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (cores + 1).clamp(2, 8)
    }

    /// Starts reading the layer's blob ([`obdfs::turbo::read_ahead`]): inflated on a
    /// thread of its own, `gzip.meta` built on the way, the tar's headers kept for the
    /// apply.
    fn prepare(&self, job: &LayerJob<'_>, input: &mut LayerInput<'_>) -> Result<()> {
        let ahead = ReadingLayer::start(job, input)?;
        input.set_prepared(ahead);
        Ok(())
    }

    fn begin<'a>(&'a self, _job: &ManifestJob<'a>) -> Result<Box<dyn LayerChain + 'a>> {
        let mut lowers = Vec::new();
        if !self.mkfs {
            lowers.push((None, LowerSource::File(self.baselayer.clone())));
        }
        Ok(Box::new(TurboChain {
            fmt: self,
            lowers,
            held: Vec::new(),
        }))
    }

    /// `--mkfs=false`: upstream's base layer file, pushed as it is (upstream does not
    /// tar-wrap it for TurboOCI), native layer media type and annotations.
    fn base_layers(&self, _mdir: &Path) -> Result<Vec<(Descriptor, PathBuf)>> {
        if self.mkfs {
            return Ok(Vec::new());
        }
        let base = &self.baselayer;
        let f = File::open(base).map_err(|e| {
            Error::io(base, e).context("--mkfs=false needs upstream's prebuilt base layer")
        })?;
        let (d, size) = hash_reader(f).map_err(|e| Error::io(base, e))?;
        Ok(vec![(
            native_layer_descriptor(self.oci, d, size),
            base.clone(),
        )])
    }
}

/// The layers of one manifest as TurboOCI layers.
struct TurboChain<'a> {
    fmt: &'a TurboFormat,
    /// Bottom first; each with the index of its layer (`None`: the base layer).
    lowers: Vec<(Option<usize>, LowerSource)>,
    /// Downloaded source blobs: the targets of the lowers, kept until the manifest ends.
    held: Vec<Arc<BlobFile>>,
}

/// A layer's blob being read ahead of its apply.
struct ReadingLayer {
    ahead: ReadAhead,
    blob: PathBuf,
    gz_index: PathBuf,
    /// Keeps a downloaded blob until the chain holds it.
    hold: Option<Arc<BlobFile>>,
}

impl ReadingLayer {
    fn start(job: &LayerJob<'_>, input: &mut LayerInput<'_>) -> Result<ReadingLayer> {
        // One pass over the blob as it downloads (verified at its end): inflated once,
        // the gzip index built on the way, the tar's headers kept for the apply.
        let diff_id = input.take_diff_id().map(|d| d.to_string());
        let (stream, blob, hold) = input.stream_and_file()?;
        let gz_index = job.dir.join(GZIP_META);
        remove_stale(&gz_index)?;
        let ahead = obdfs::turbo::read_ahead_checked(&blob, &gz_index, stream, diff_id)
            .map_err(|e| Error::Fs(e).context("TurboOCI apply"))?;
        Ok(ReadingLayer {
            ahead,
            blob,
            gz_index,
            hold,
        })
    }
}

fn remove_stale(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

impl LayerChain for TurboChain<'_> {
    fn apply(
        &mut self,
        job: &LayerJob<'_>,
        mut input: LayerInput<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Applied> {
        let f = self.fmt;
        let reading = match input.take_prepared::<ReadingLayer>() {
            Some(r) => r,
            None => ReadingLayer::start(job, &mut input)?,
        };
        let ReadingLayer {
            ahead,
            blob,
            gz_index,
            hold,
        } = reading;
        self.held.extend(hold);
        let dir = job.dir;
        let data = dir.join(DATA_FILE);
        let index = dir.join(INDEX_FILE);
        let meta = dir.join(f.fstype.meta_file_name());
        for p in [&data, &index, &meta] {
            remove_stale(p)?;
        }
        let mkfs = job.index == 0 && f.mkfs && f.fstype == FsType::Ext4;
        obdfs::turbo::create_layer(&data, &index, f.virtual_size(), mkfs)?;
        let turbo = TurboApply {
            blob: blob.clone(),
            gz_index: gz_index.clone(),
            lowers: self.lowers.iter().map(|(_, l)| l.clone()).collect(),
            upper_data: data.clone(),
            upper_index: index.clone(),
            mkfs: false,
            fstype: f.fstype,
        };
        let mut cb = |s: &obdfs::ApplyStats| progress(s.tar_bytes);
        let report =
            obdfs::turbo::apply_read_ahead(&turbo, ahead, Durability::Scratch, Some(&mut cb))
                .map_err(|e| Error::Fs(e).context("TurboOCI apply"))?;
        // Bytes after the gzip member: the gzip index (as upstream's) ignores them, but a
        // gzip reader refuses the blob (Go's, upstream's native conversion, ours): so
        // does TurboOCI, rather than make an image of a blob nothing else reads.
        if let Some(i) = report
            .gzip_index
            .as_ref()
            .filter(|i| i.gzip_size > i.member_size)
        {
            return Err(Error::Invalid(format!(
                "{} bytes of data that is not gzip follow the last gzip member (at compressed byte {})",
                i.gzip_size - i.member_size,
                i.member_size
            )));
        }
        let gzip = report.kind == BlobKind::Gzip;
        let target = if gzip {
            TargetSource::gzip(&blob, &gz_index)
        } else {
            TargetSource::tar(&blob)
        };
        self.lowers.push((
            Some(job.index),
            LowerSource::WritableWarp {
                data: data.clone(),
                index: index.clone(),
                target,
            },
        ));
        Ok(Applied {
            seal: Box::new(TurboSeal {
                fmt: f.clone(),
                source: job.layer.clone(),
                dir: dir.to_path_buf(),
                data,
                index,
                meta,
                gzip,
                stats: report.stats,
            }),
            input_bytes: job.layer.size,
        })
    }

    /// The lower of layer `index` becomes its sealed `<fs>.fs.meta` (the chain knows
    /// the file: the blob pushed is the packed tar).
    fn sealed(&mut self, index: usize, _sealed: &Sealed) {
        let name = self.fmt.fstype.meta_file_name();
        if let Some((_, l)) = self.lowers.iter_mut().find(|(i, _)| *i == Some(index)) {
            if let LowerSource::WritableWarp { data, target, .. } = l {
                let file = data.with_file_name(name);
                *l = LowerSource::Warp {
                    file,
                    target: target.clone(),
                };
            }
        }
    }

    fn reused(
        &mut self,
        job: &LayerJob<'_>,
        hit: &Reused,
        file: Option<&Path>,
    ) -> Result<LayerOut> {
        let Some(file) = file else {
            return Err(Error::Invalid(format!(
                "internal error: reused TurboOCI layer {} without its blob",
                hit.digest
            )));
        };
        let (diff_id, names) = read_turbo_layer(file)?;
        let gzip = names.iter().any(|n| n == GZIP_META);
        let _ = std::fs::remove_file(file);
        Ok(LayerOut {
            desc: self
                .fmt
                .layer_descriptor(hit.digest.clone(), hit.size, job.layer, gzip),
            diff_id,
        })
    }
}

/// A TurboOCI layer blob's diff ID (sha256 of its tar) and entry names; an error names
/// the file when it is not a gzip tar.
pub fn read_turbo_layer(path: &Path) -> Result<(Digest, Vec<String>)> {
    let bad = |e: io::Error| Error::io(path, e).context("reading a TurboOCI layer blob");
    let f = File::open(path).map_err(bad)?;
    let mut gz = flate2::read::MultiGzDecoder::new(io::BufReader::new(f));
    let mut hasher = HashingWriter::new(Vec::new());
    io::copy(&mut gz, &mut hasher).map_err(bad)?;
    let tar = std::mem::take(&mut hasher.inner);
    let (d, _) = hasher.hash.finish();
    let mut names = Vec::new();
    let mut pos = 0usize;
    while pos + 512 <= tar.len() {
        let h = &tar[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name_len = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        names.push(String::from_utf8_lossy(&h[..name_len]).into_owned());
        let size_text: String = h[124..136]
            .iter()
            .take_while(|&&b| b != 0 && b != b' ')
            .map(|&b| b as char)
            .collect();
        let size = u64::from_str_radix(size_text.trim(), 8).map_err(|_| {
            Error::Invalid(format!(
                "{}: tar entry {:?} has a bad size field",
                path.display(),
                names.last()
            ))
        })?;
        pos += 512 + (size.div_ceil(512) * 512) as usize;
    }
    Ok((d, names))
}

/// Commits an applied TurboOCI layer and packs `turboOCIv1.tar.gz`.
struct TurboSeal {
    fmt: TurboFormat,
    source: Descriptor,
    dir: PathBuf,
    data: PathBuf,
    index: PathBuf,
    meta: PathBuf,
    gzip: bool,
    stats: obdfs::ApplyStats,
}

impl SealJob for TurboSeal {
    fn seal(self: Box<Self>, progress: ProgressFn) -> Result<Sealed> {
        let p = blockdev::commit::Progress(Arc::new(move |done, _total| progress(done)));
        // As `overlaybd-commit -z --fastoci`: lz4 ZFile, 4 KiB blocks, no uuid.
        let z = ZfileOptions::default();
        commit_warp(
            &self.data,
            &self.index,
            &self.meta,
            &CommitOptions {
                zfile: Some(z),
                tar: false,
                uuid: None,
                parent_uuid: None,
                user_tag: None,
                force: true,
                progress: Some(p),
            },
        )?;
        let marker = self.dir.join(TURBO_MARKER);
        File::create(&marker).map_err(|e| Error::io(&marker, e))?;
        let mut files = vec![
            (self.fmt.fstype.meta_file_name(), self.meta.clone()),
            (TURBO_MARKER, marker),
        ];
        if self.gzip {
            files.push((GZIP_META, self.dir.join(GZIP_META)));
        }
        let out = self.dir.join(TURBO_LAYER_FILE);
        let (diff_id, d, size) = pack(&out, &files)?;
        let meta_size = std::fs::metadata(&self.meta)
            .map_err(|e| Error::io(&self.meta, e))?
            .len();
        Ok(Sealed {
            out: LayerOut {
                desc: self.fmt.layer_descriptor(d, size, &self.source, self.gzip),
                diff_id,
            },
            blob: out,
            scratch: vec![self.data.clone(), self.index.clone()],
            note: format!(
                "{} files referenced ({:.1} MB), {} {:.1} KB, {}",
                self.stats.files,
                self.stats.data_bytes as f64 / 1e6,
                self.fmt.fstype.meta_file_name(),
                meta_size as f64 / 1e3,
                if self.gzip {
                    "gzip source"
                } else {
                    "tar source"
                }
            ),
        })
    }
}

/// Writes `turboOCIv1.tar.gz`: gzip (level 6, no name, mtime 0) of a Go-style tar of
/// `files` (name in the tar, file), mode 0644. Returns the tar's digest (the diff ID),
/// and the blob's digest and size.
fn pack(out: &Path, files: &[(&str, PathBuf)]) -> Result<(Digest, Digest, u64)> {
    let ioe = |e: io::Error| Error::io(out, e);
    let f = File::create(out).map_err(ioe)?;
    let blob = HashingWriter::new(BufWriter::new(f));
    let gz = flate2::GzBuilder::new()
        .operating_system(255)
        .write(blob, flate2::Compression::new(6));
    let mut tar = GoTarWriter::new(HashingWriter::new(gz));
    for (name, p) in files {
        let mut src = File::open(p).map_err(|e| Error::io(p, e))?;
        let size = src.metadata().map_err(|e| Error::io(p, e))?.len();
        tar.append(name, 0o644, size, &mut src as &mut dyn Read)
            .map_err(|e| Error::io(p, e))?;
    }
    let tar = tar.finish().map_err(ioe)?;
    let (diff_id, _) = tar.hash.finish();
    let mut blob = tar.inner.finish().map_err(ioe)?;
    blob.flush().map_err(ioe)?;
    let (d, size) = blob.hash.finish();
    Ok((diff_id, d, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_media_type_follows_the_source_family() {
        assert_eq!(
            target_media_type(MT_DOCKER_LAYER_GZIP, true),
            MT_DOCKER_LAYER_GZIP
        );
        assert_eq!(
            target_media_type(MT_DOCKER_LAYER_GZIP, false),
            MT_DOCKER_LAYER_TAR
        );
        assert_eq!(target_media_type(MT_OCI_LAYER_TAR, true), MT_OCI_LAYER_GZIP);
        assert_eq!(
            target_media_type(MT_OCI_LAYER_GZIP, false),
            MT_OCI_LAYER_TAR
        );
    }

    #[test]
    fn pack_is_a_go_tar_in_gzip_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, vec![3u8; 1000]).unwrap();
        std::fs::write(&b, b"").unwrap();
        let out = dir.path().join(TURBO_LAYER_FILE);
        let files = [("ext4.fs.meta", a), (TURBO_MARKER, b)];
        let (diff_id, d, size) = pack(&out, &files).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(Digest::of(&bytes), d);
        let (id2, names) = read_turbo_layer(&out).unwrap();
        assert_eq!(id2, diff_id);
        assert_eq!(names, ["ext4.fs.meta", TURBO_MARKER]);
        // Reproducible.
        let out2 = dir.path().join("again.tar.gz");
        assert_eq!(pack(&out2, &files).unwrap().1, d);
        // Not gzip: one error naming the file.
        let e = read_turbo_layer(&files[0].1).unwrap_err();
        assert!(obdoci::error::Chain(&e).to_string().contains("/a"), "{e}");
    }

    #[test]
    fn keys_never_meet_native_keys() {
        let o = ConvertOptions::default();
        let t = TurboFormat::new(&o, FsType::Ext4)
            .dedup_format_key()
            .unwrap();
        let e = TurboFormat::new(&o, FsType::Erofs)
            .dedup_format_key()
            .unwrap();
        let n = o.dedup_format_key().unwrap();
        assert_ne!(t, n);
        assert_ne!(t, e);
        assert!(t.starts_with(&format!("{FORMAT_VERSION}+turbooci;")), "{t}");
    }

    #[test]
    fn bad_fstype_and_erofs_without_mkfs_are_refused() {
        let e = TurboFormat::parse_fstype("xfs").unwrap_err();
        assert!(e.to_string().contains("xfs"), "{e}");
        let o = ConvertOptions {
            mkfs: false,
            ..Default::default()
        };
        let e = TurboFormat::new(&o, FsType::Erofs).check().unwrap_err();
        assert!(e.to_string().contains("erofs"), "{e}");
        let zstd = Descriptor::new(MT_OCI_LAYER_ZSTD, Digest::of(b"x"), 1);
        let e = TurboFormat::new(&ConvertOptions::default(), FsType::Ext4)
            .check_layer(&zstd)
            .unwrap_err();
        assert!(e.contains("zstd"), "{e}");
        // The pipeline names the layer ("layer sha256:...: ..."): not again here.
        assert!(!e.contains(&zstd.digest.to_string()), "{e}");
    }
}
