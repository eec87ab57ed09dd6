//! Publishing: finishing converted manifests (config with the new diff IDs, base layers,
//! `--referrer` fields) and indexes, keeping source layers in the destination for formats
//! that read them, and pushing the manifests and indexes at the very end, children
//! first, the top-level objects under their tags.

use super::walk::replace_target;
use super::Run;
use crate::format::LayerOut;
use crate::{Error, Result};
use obdoci::model::*;
use obdoci::{Descriptor, Digest};
use obdregistry::BlobSource;
use std::fs;
use std::path::Path;

/// A manifest or index to push once everything converted.
pub(super) struct Pending {
    /// Index of the output it belongs to.
    pub output: usize,
    pub tag: Option<String>,
    pub desc: Descriptor,
    pub bytes: Vec<u8>,
    /// Source manifest digest, to record the pushed manifest in the dedup database.
    pub dedup_source: Option<Digest>,
}

impl Run<'_> {
    pub(super) fn out_manifest_type(&self) -> &'static str {
        if self.c.opts.oci {
            MT_OCI_MANIFEST
        } else {
            MT_DOCKER_MANIFEST
        }
    }

    pub(super) fn queue(&self, p: Pending) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p);
    }

    /// Pushes every queued manifest and index in order (none with `--no-upload`) and
    /// records converted manifests in the dedup database.
    pub(super) fn push_pending(&self) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if self.c.opts.no_upload {
            return Ok(());
        }
        for p in &pending {
            self.check_abort()?;
            self.c
                .dst
                .push_manifest(p.tag.as_deref(), &p.desc, &p.bytes)
                .map_err(|e| {
                    e.context(format!(
                        "pushing {} {} to {}",
                        p.desc.media_type,
                        p.tag.as_deref().unwrap_or(p.desc.digest.as_str()),
                        self.c.dst.name()
                    ))
                })?;
            if let (Some(dd), Some(src)) = (&self.outputs[p.output].out.dedup, &p.dedup_source) {
                dd.record_manifest(src, &p.desc);
            }
        }
        Ok(())
    }

    /// A work file name for output `k`: `name` itself in a single-output run,
    /// `<stem>-<format>.<ext>` otherwise.
    fn output_file_name(&self, k: usize, name: &str) -> String {
        if !self.multi() {
            return name.to_string();
        }
        match name.rsplit_once('.') {
            Some((stem, ext)) => format!("{stem}-{}.{ext}", self.format(k).name()),
            None => format!("{name}-{}", self.format(k).name()),
        }
    }

    /// The converted index of output `k` (its children already converted).
    pub(super) fn finish_index(
        &self,
        k: usize,
        desc: &Descriptor,
        mut out: Index,
        top: bool,
    ) -> Result<Descriptor> {
        if self.c.opts.referrer {
            out.artifact_type = Some(self.format(k).artifact_type().to_string());
            out.subject = Some(desc.bare());
        }
        if self.c.opts.oci || out.media_type.is_none() {
            // An index without mediaType is an OCI index; say so instead of pushing
            // an empty media type (upstream defect).
            out.media_type = Some(MT_OCI_INDEX.to_string());
        }
        let mt = out.media_type.clone().unwrap_or_default();
        let out_bytes = to_json(&out);
        if self.c.opts.dump_manifest {
            let name = if top {
                "index.json".to_string()
            } else {
                format!("index-{}.json", desc.digest.hex())
            };
            let p = self.c.opts.workdir.join(self.output_file_name(k, &name));
            fs::write(&p, &out_bytes).map_err(|e| Error::io(&p, e))?;
        }
        let new_desc = Descriptor::of_bytes(mt, &out_bytes);
        self.queue(Pending {
            output: k,
            tag: top.then(|| self.outputs[k].out.tag.clone()),
            desc: new_desc.clone(),
            bytes: out_bytes,
            dedup_source: None,
        });
        Ok(replace_target(desc, &new_desc))
    }

    /// The converted manifest of output `k` from its converted layers: base layers
    /// pushed and prepended, config with the new diff IDs pushed, the manifest queued.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_manifest(
        &self,
        k: usize,
        mdir: &Path,
        label: &str,
        desc: &Descriptor,
        m: &Manifest,
        cfg: &ImageConfig,
        layers: Vec<LayerOut>,
        top: bool,
    ) -> Result<Descriptor> {
        let opts = &self.c.opts;
        let fmt = self.format(k);
        let mut new_layers = Vec::new();
        let mut ids = Vec::new();
        for (base_desc, base_file) in fmt.base_layers(mdir)? {
            if !opts.no_upload {
                self.c
                    .dst
                    .push_blob(&base_desc, BlobSource::File(&base_file), None)
                    .map_err(|e| e.context("pushing the base layer"))?;
            }
            ids.push(base_desc.digest.clone());
            new_layers.push(base_desc);
        }
        for l in layers {
            ids.push(l.diff_id);
            new_layers.push(l.desc);
        }
        let mut cfg = cfg.clone();
        cfg.set_diff_ids(&ids);
        let cfg_out = cfg.to_bytes();
        let cfg_mt = if opts.oci {
            MT_OCI_CONFIG
        } else {
            MT_DOCKER_CONFIG
        };
        let cfg_desc = Descriptor::of_bytes(cfg_mt, &cfg_out);
        let out_mt = self.out_manifest_type();
        let mut nm = m.clone();
        nm.media_type = Some(out_mt.to_string());
        nm.config = cfg_desc.clone();
        nm.layers = new_layers;
        if opts.referrer {
            nm.artifact_type = Some(fmt.artifact_type().to_string());
            nm.subject = Some(desc.bare());
        }
        let m_out = to_json(&nm);
        let m_desc = Descriptor::of_bytes(out_mt, &m_out);
        if opts.dump_manifest {
            for (name, b) in [("config.json", &cfg_out), ("manifest.json", &m_out)] {
                let p = mdir.join(self.output_file_name(k, name));
                fs::write(&p, b).map_err(|e| Error::io(&p, e))?;
            }
        }
        if !opts.no_upload {
            self.c
                .dst
                .push_blob(&cfg_desc, BlobSource::Bytes(&cfg_out), None)
                .map_err(|e| e.context(format!("pushing config {}", cfg_desc.digest)))?;
        }
        self.queue(Pending {
            output: k,
            tag: top.then(|| self.outputs[k].out.tag.clone()),
            desc: m_desc.clone(),
            bytes: m_out,
            dedup_source: Some(desc.digest.clone()),
        });
        self.c.progress.println(&format!(
            "{label} converted {} → {} ({} layers){}",
            desc.digest,
            m_desc.digest,
            m.layers.len(),
            self.suffix(k)
        ));
        Ok(replace_target(desc, &m_desc))
    }

    /// For formats that read the source layers at run time: makes every source layer
    /// present in the destination where that needs no copy (it is there already, or a
    /// cross-repository mount on the same registry brings it) and returns, per layer,
    /// whether it must still be copied (uploaded from its downloaded blob). Nothing is
    /// done with `--no-upload` or when the destination is the source.
    pub(super) fn source_layers_to_copy(&self, layers: &[Descriptor]) -> Result<Vec<bool>> {
        let (src, dst) = (&self.c.src, &self.c.dst);
        if self.c.opts.no_upload
            || std::ptr::addr_eq(std::sync::Arc::as_ptr(src), std::sync::Arc::as_ptr(dst))
        {
            return Ok(vec![false; layers.len()]);
        }
        let from = match (src.registry_repository(), dst.registry_repository()) {
            (Some((sh, sr)), Some((dh, _))) if sh == dh => Some(sr),
            _ => None,
        };
        layers
            .iter()
            .map(|l| {
                let ctx = |e: Error| {
                    e.context(format!(
                        "keeping source layer {} in {}",
                        l.digest,
                        dst.name()
                    ))
                };
                if dst.blob_exists(l).map_err(ctx)? {
                    return Ok(false);
                }
                if let Some(from) = &from {
                    if dst.mount_blob(l, from).map_err(ctx)? {
                        tracing::info!(
                            "mounted source layer {} from {from} into {}",
                            l.digest,
                            dst.name()
                        );
                        return Ok(false);
                    }
                }
                Ok(true)
            })
            .collect()
    }
}
