//! Per-layer scheduling of one platform manifest, for every output that converts it:
//!
//! ```text
//!  download workers (a few at once)        per output: chain thread          per output: uploader
//!  ─────────────────────────────────       ───────────────────────────       ──────────────────────
//!  layer i: converted blobs of dedup  ──►  i: apply onto layers < i     ──►  push sealed blob i,
//!           hits (per output), then        (seal of i-1 runs meanwhile       record its dedup row;
//!           the source blob once,          on its own thread), then          copy source layers the
//!           followed by every output       seal i on a thread                format reads
//!           that converts layer i
//! ```
//!
//! Dedup lookups come first: a layer found in an output's database is taken over as its
//! format says ([`OutputFormat::reuse`](crate::format::OutputFormat::reuse)); it is
//! downloaded only if the format needs its converted blob. The source blob is fetched
//! once if any output converts the layer: the outputs follow the same download (a stream
//! that waits for more bytes, or the complete file). A failure anywhere stops everything;
//! the first real failure is reported.

use super::Run;
use crate::dedup::Reused;
use crate::follow::Growing;
use crate::format::{
    BlobFile, LayerChain, LayerInput, LayerJob, LayerOut, ManifestJob, Reuse, Sealed, SourceBlob,
};
use crate::progress::Stage;
use crate::{Error, Result};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use obdoci::error::Chain;
use obdoci::stream::{copy, CopyError};
use obdoci::{Descriptor, Digest};
use obdregistry::BlobSource;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

/// What one output does with one layer.
#[derive(Clone)]
enum Plan {
    Convert,
    /// Take over a dedup hit ([`Reuse::Descriptor`] or [`Reuse::Download`]).
    Reuse(Reused, Reuse),
}

/// What an output's chain gets for a layer from the download workers.
enum Ready {
    /// Convert it from this source blob.
    Source(SourceBlob),
    /// Take it over (with its converted blob, if the format asked for it).
    Reused(Reused, Option<PathBuf>),
}

/// A layer as an output's chain takes it.
enum Staged<'a> {
    /// Take it over (see [`Ready::Reused`]).
    Reused(Reused, Option<PathBuf>),
    /// Apply it from `input` (prepared ahead by formats that read ahead); `copy`: the
    /// source blob to copy into the destination afterwards.
    Source {
        input: LayerInput<'a>,
        copy: Option<(PathBuf, Option<Arc<BlobFile>>)>,
    },
}

/// What an output's uploader gets (with the layer's index).
enum Done {
    Built(usize, Sealed),
    Reused(usize, LayerOut),
    /// Copy this source layer into the destination, from this file (held until then).
    CopySource(usize, PathBuf, Option<Arc<BlobFile>>),
    /// Work files no layer reads any more (kept with `--reserve`).
    Remove(Vec<PathBuf>),
    /// Every layer is applied: no apply reads the sealed blobs as lowers any more, so
    /// each is removed once pushed (not at the end of the run, while nothing else is
    /// left to do).
    Applied,
}

/// One blob for an uploader's pushers.
struct Upload {
    i: usize,
    desc: Descriptor,
    path: PathBuf,
    /// A converted layer (else a source layer the format references).
    built: bool,
    /// Keeps a downloaded source blob until it is copied.
    _hold: Option<Arc<BlobFile>>,
}

impl Run<'_> {
    /// Converts the layers of one manifest for the outputs `todo`: per output, the
    /// layers of the converted manifest in order.
    pub(super) fn convert_layers(
        &self,
        mdir: &Path,
        label: &str,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        chain: &[Digest],
        todo: &[usize],
    ) -> Result<Vec<Vec<LayerOut>>> {
        let dirs: Vec<PathBuf> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| mdir.join(format!("{i:04}_{}", l.digest)))
            .collect();
        // One format: its files go straight into the layer directory (upstream's
        // layout); several: one subdirectory per format.
        let fdirs: Vec<Vec<PathBuf>> = todo
            .iter()
            .map(|&k| {
                dirs.iter()
                    .map(|d| {
                        if self.multi() {
                            d.join(self.format(k).name())
                        } else {
                            d.clone()
                        }
                    })
                    .collect()
            })
            .collect();
        for d in dirs.iter().chain(fdirs.iter().flatten()) {
            fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let mut copy = Vec::new();
        let mut plans = Vec::new();
        for &k in todo {
            let c = if self.format(k).references_source_layers() {
                self.source_layers_to_copy(layers)?
            } else {
                vec![false; layers.len()]
            };
            // Dedup lookups for every layer first: whether a hit is needed as the lower
            // of a converted layer decides how it is taken over. A layer whose source
            // must be copied into the destination is converted (it is downloaded anyway).
            let hits: Vec<Option<Reused>> = self
                .lookup_layers(k, chain)
                .into_iter()
                .zip(&c)
                .map(|(h, &copy)| h.filter(|_| !copy))
                .collect();
            let last_miss = hits.iter().rposition(Option::is_none);
            plans.push(
                hits.into_iter()
                    .enumerate()
                    .map(|(i, h)| match h {
                        None => Plan::Convert,
                        Some(h) => match self.format(k).reuse(last_miss.is_some_and(|m| i < m)) {
                            Reuse::Convert => Plan::Convert,
                            r => Plan::Reuse(h, r),
                        },
                    })
                    .collect(),
            );
            copy.push(c);
        }
        let l = Layers {
            run: self,
            mdir,
            label,
            layers,
            diff_ids,
            chain,
            todo,
            dirs,
            fdirs,
            plans,
            copy,
        };
        let outs = l.run()?;
        for &k in todo {
            self.outputs[k]
                .stats
                .layers
                .fetch_add(layers.len(), Ordering::Relaxed);
        }
        Ok(outs)
    }

    /// Dedup lookups of every layer (by chain ID) for output `k`, a few at once.
    fn lookup_layers(&self, k: usize, chain: &[Digest]) -> Vec<Option<Reused>> {
        let Some(dd) = &self.outputs[k].out.dedup else {
            return vec![None; chain.len()];
        };
        let found: Vec<Mutex<Option<Reused>>> = chain.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self
                .c
                .opts
                .download_concurrency
                .clamp(1, chain.len().max(1))
            {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chain.len() || self.c.abort.is_set() {
                        break;
                    }
                    let hit = dd.lookup_layer(&chain[i]);
                    *found[i].lock().unwrap_or_else(|e| e.into_inner()) = hit;
                });
            }
        });
        found
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

/// The layer work of one manifest (see the module doc). Outputs are numbered `j` in
/// `todo` order (output `todo[j]` of the run).
struct Layers<'r, 'c> {
    run: &'r Run<'c>,
    mdir: &'r Path,
    label: &'r str,
    layers: &'r [Descriptor],
    /// The config's `rootfs.diff_ids`, one per layer.
    diff_ids: &'r [Digest],
    chain: &'r [Digest],
    todo: &'r [usize],
    /// Per layer: its work directory (holds the downloaded source blob).
    dirs: Vec<PathBuf>,
    /// Per output, per layer: the format's directory.
    fdirs: Vec<Vec<PathBuf>>,
    plans: Vec<Vec<Plan>>,
    /// Per output, per layer: copy the source layer into the destination.
    copy: Vec<Vec<bool>>,
}

type ReadyChannel = (Sender<Result<Ready>>, Receiver<Result<Ready>>);

impl Layers<'_, '_> {
    fn n(&self) -> usize {
        self.layers.len()
    }

    /// `[1 linux_amd64] layer 3/7` (with ` (<format>)` in multi-output runs).
    fn name(&self, j: usize, i: usize) -> String {
        format!(
            "{} layer {}/{}{}",
            self.label,
            i + 1,
            self.n(),
            self.run.suffix(self.todo[j])
        )
    }

    /// The progress group of output `j`'s stages.
    fn group(&self, j: usize) -> &'static str {
        if self.run.multi() {
            self.run.format(self.todo[j]).name()
        } else {
            ""
        }
    }

    fn run(&self) -> Result<Vec<Vec<LayerOut>>> {
        let (n, m) = (self.n(), self.todo.len());
        let chans: Vec<Vec<ReadyChannel>> = (0..m)
            .map(|_| (0..n).map(|_| bounded(1)).collect())
            .collect();
        let next = AtomicUsize::new(0);
        let workers = self.run.c.opts.download_concurrency.max(1).min(n);
        let abort = &self.run.c.abort;
        // The first real failure of any thread; the others then stop as interrupted.
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            if !e.is_interrupted() {
                failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
            abort.set();
        };
        let (chans, fail) = (&chans, &fail);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let txs: Vec<&Sender<Result<Ready>>> = (0..m).map(|j| &chans[j][i].0).collect();
                    let r = if abort.is_set() {
                        Err(Error::Interrupted)
                    } else {
                        self.get_layer(i, &txs, fail)
                    };
                    if let Err(e) = r {
                        fail(e);
                        // Sends nothing where the layer was already handed over.
                        for tx in txs {
                            let _ = tx.try_send(Err(Error::Interrupted));
                        }
                    }
                });
            }
            let mut running = Vec::new();
            for (j, chan) in chans.iter().enumerate() {
                // Sealed layers are pushed on another thread while the next layer is
                // applied.
                let (up_tx, up_rx) = unbounded::<Done>();
                let uploader = s.spawn(move || self.upload_loop(j, up_rx, fail));
                let rxs: Vec<&Receiver<Result<Ready>>> = chan.iter().map(|c| &c.1).collect();
                // A failure is recorded as it happens (before the abort it causes
                // makes other outputs' chains fail too).
                let chain = s.spawn(move || {
                    self.run_chain(s, j, &rxs, up_tx).map_err(|e| {
                        if e.is_interrupted() {
                            e
                        } else {
                            fail(e);
                            Error::Interrupted
                        }
                    })
                });
                running.push((chain, uploader));
            }
            let mut results = Vec::new();
            for (chain, uploader) in running {
                let c = chain
                    .join()
                    .unwrap_or_else(|_| Err(Error::Invalid("layer thread panicked".into())))
                    .map_err(|e| {
                        if e.is_interrupted() {
                            e
                        } else {
                            fail(e);
                            Error::Interrupted
                        }
                    });
                let u = uploader
                    .join()
                    .unwrap_or_else(|_| Err(Error::Invalid("upload thread panicked".into())))
                    .map_err(|e| {
                        if !e.is_interrupted() {
                            fail(e);
                        }
                        Error::Interrupted
                    });
                results.push((c, u));
            }
            if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(e);
            }
            results
                .into_iter()
                .map(|(c, u)| {
                    c?;
                    u
                })
                .collect()
        })
    }

    /// Applies output `j`'s layers bottom-up as they arrive; each layer is sealed on its
    /// own thread while the next one is applied on top of its unsealed files (at most
    /// one seal at a time), and handed to the uploader as soon as it is sealed; its work
    /// files go once the layer above is applied.
    fn run_chain<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        j: usize,
        rxs: &[&Receiver<Result<Ready>>],
        up: Sender<Done>,
    ) -> Result<()> {
        let k = self.todo[j];
        let run = self.run;
        let stats = &run.outputs[k].stats;
        let job = ManifestJob {
            dir: self.mdir,
            layers: self.layers,
            chain_ids: self.chain,
        };
        let mut chain = run.format(k).begin(&job)?;
        type Sealing<'a> = (usize, ScopedJoinHandle<'a, Result<Sealed>>);
        // Waits for the running seal (which hands its layer to the uploader), tells the
        // chain, and has the layer's work files removed.
        let finish = |c: &mut Option<Sealing<'_>>, chain: &mut dyn LayerChain| -> Result<()> {
            if let Some((i, h)) = c.take() {
                let sealed = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Invalid("seal thread panicked".into())))
                    .map_err(self.layer_context(i))?;
                chain.sealed(i, &sealed);
                stats.layers_converted.fetch_add(1, Ordering::Relaxed);
                // The layer above, applied meanwhile, was the last to read these files
                // (removed by the uploader's thread: unlinking a large sparse file takes
                // a while).
                let _ = up.send(Done::Remove(sealed.scratch));
            }
            Ok(())
        };
        let mut sealing: Option<Sealing<'s>> = None;
        // The bottom layer's work that needs no input (the mkfs) is done while its
        // source is being fetched.
        if matches!(
            self.plans[j].first(),
            Some(Plan::Convert | Plan::Reuse(_, Reuse::Convert))
        ) {
            run.check_abort()?;
            chain
                .prime(&self.layer_job(j, 0))
                .map_err(self.layer_context(0))?;
        }
        // A thread stages the layers in order as their sources are ready; a format that
        // reads ahead has each prepared there, up to `ahead` layers above the one being
        // applied (with none, one layer waits staged, unread).
        let ahead = run.format(k).lookahead();
        std::thread::scope(|ps| -> Result<()> {
            let (staged_tx, staged_rx) = bounded::<Result<Staged<'_>>>(ahead.saturating_sub(1));
            ps.spawn(move || {
                for (i, rx) in rxs.iter().enumerate() {
                    let st = rx
                        .recv()
                        .map_err(|_| Error::Interrupted)
                        .and_then(|r| r)
                        .and_then(|ready| self.stage(j, i, ready, ahead > 0));
                    let failed = st.is_err();
                    if staged_tx.send(st).is_err() || failed {
                        break;
                    }
                }
            });
            let mut apply_all = || -> Result<()> {
                for i in 0..rxs.len() {
                    let staged = staged_rx.recv().map_err(|_| Error::Interrupted)??;
                    run.check_abort()?;
                    let ljob = self.layer_job(j, i);
                    match staged {
                        Staged::Reused(hit, file) => {
                            finish(&mut sealing, chain.as_mut())?;
                            let out = chain
                                .reused(&ljob, &hit, file.as_deref())
                                .map_err(self.layer_context(i))?;
                            stats.layers_reused.fetch_add(1, Ordering::Relaxed);
                            let _ = up.send(Done::Reused(i, out));
                        }
                        Staged::Source { input, copy } => {
                            let name = self.name(j, i);
                            let bar =
                                run.c
                                    .progress
                                    .start_in(self.group(j), &name, Stage::Apply, None);
                            let setter = bar.setter();
                            let applied = chain
                                .apply(&ljob, input, &mut |b| setter(b))
                                .map_err(self.layer_context(i))?;
                            bar.finish(Some(applied.input_bytes), "");
                            finish(&mut sealing, chain.as_mut())?;
                            let group = self.group(j);
                            let push = up.clone();
                            let h = s.spawn(move || {
                                let bar =
                                    run.c.progress.start_in(group, &name, Stage::Commit, None);
                                let sealed = applied.seal.seal(bar.setter())?;
                                bar.finish(Some(sealed.out.desc.size), &sealed.note);
                                // Pushed right away, while the layer above is applied.
                                let _ = push.send(Done::Built(i, sealed.clone()));
                                Ok(sealed)
                            });
                            sealing = Some((i, h));
                            if let Some((p, hold)) = copy {
                                let _ = up.send(Done::CopySource(i, p, hold));
                            }
                        }
                    }
                }
                Ok(())
            };
            let r = apply_all();
            if matches!(&r, Err(e) if !e.is_interrupted()) {
                // Stop the downloads the staging thread may be waiting for.
                run.c.abort.set();
            }
            r
        })?;
        let _ = up.send(Done::Applied);
        finish(&mut sealing, chain.as_mut())
    }

    /// A layer for output `j`'s chain: taken over, or its input (prepared by the format
    /// with `prepare`).
    fn stage(&self, j: usize, i: usize, ready: Ready, prepare: bool) -> Result<Staged<'_>> {
        let blob = match ready {
            Ready::Reused(hit, file) => return Ok(Staged::Reused(hit, file)),
            Ready::Source(blob) => blob,
        };
        let run = self.run;
        let copy = self.copy[j][i].then(|| match &blob {
            SourceBlob::Local(p) => (p.clone(), None),
            SourceBlob::Downloading { file, .. } => (file.path().to_path_buf(), Some(file.clone())),
        });
        let mut input = LayerInput {
            src: run.c.src.as_ref(),
            layer: &self.layers[i],
            blob: Some(blob),
            abort: &run.c.abort,
            prepared: None,
            // Checked for dedup (its keys are made of diff_ids) and where nothing
            // else vouches for the layer's content.
            diff_id: (run.outputs[self.todo[j]].out.dedup.is_some()
                || !run.c.src.digest_vouches_for(&self.layers[i]))
            .then(|| self.diff_ids[i].clone()),
        };
        if prepare {
            run.format(self.todo[j])
                .prepare(&self.layer_job(j, i), &mut input)
                .map_err(self.layer_context(i))?;
        }
        Ok(Staged::Source { input, copy })
    }

    /// Adds `layer i/n (digest)` to an error.
    fn layer_context(&self, i: usize) -> impl Fn(Error) -> Error + '_ {
        let (n, d) = (self.n(), &self.layers[i].digest);
        move |e: Error| e.context(format!("layer {}/{n} ({d})", i + 1))
    }

    fn layer_job(&self, j: usize, i: usize) -> LayerJob<'_> {
        LayerJob {
            index: i,
            layer: &self.layers[i],
            dir: &self.fdirs[j][i],
        }
    }

    /// Pushes output `j`'s layers as they are sealed (and the source layers it must
    /// copy), up to `upload_concurrency` at once; returns the layers in order.
    /// A failed push is reported through `fail` at once, before the abort it causes
    /// makes the layers still being applied fail as well (their errors would
    /// otherwise hide the cause).
    fn upload_loop(
        &self,
        j: usize,
        rx: Receiver<Done>,
        fail: &(dyn Fn(Error) + Sync),
    ) -> Result<Vec<LayerOut>> {
        let n = self.n();
        let c = self.run.c;
        let mut out: Vec<Option<LayerOut>> = vec![None; n];
        let workers = c.opts.upload_concurrency.clamp(1, n.max(1));
        let (job_tx, job_rx) = unbounded::<Upload>();
        // Pushed sealed blobs, kept while a layer may still be applied on them; `None`
        // once every layer is applied (then a pushed blob is removed at once).
        let discard = !c.opts.reserve && !c.opts.no_upload;
        let pushed: Mutex<Option<Vec<PathBuf>>> = Mutex::new(Some(Vec::new()));
        let pushed = &pushed;
        std::thread::scope(|s| {
            let pushers: Vec<_> = (0..workers)
                .map(|_| {
                    let job_rx = job_rx.clone();
                    s.spawn(move || -> Result<()> {
                        for up in job_rx {
                            self.run.check_abort()?;
                            let blob = (discard && up.built).then(|| up.path.clone());
                            if let Err(e) = self.push_layer(j, up) {
                                fail(e);
                                return Err(Error::Interrupted);
                            }
                            if let Some(blob) = blob {
                                let mut kept = pushed.lock().unwrap_or_else(|p| p.into_inner());
                                match kept.as_mut() {
                                    Some(list) => list.push(blob),
                                    None => {
                                        drop(kept);
                                        let _ = fs::remove_file(&blob);
                                    }
                                }
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(job_rx);
            let mut received = Ok(());
            for done in rx {
                if let Err(e) = self.run.check_abort() {
                    received = Err(e);
                    break;
                }
                let up = match done {
                    // Already in the destination (verified or mounted by dedup); its row
                    // exists.
                    Done::Reused(i, o) => {
                        out[i] = Some(o);
                        continue;
                    }
                    Done::Remove(files) => {
                        if !c.opts.reserve {
                            for f in &files {
                                let _ = fs::remove_file(f);
                            }
                        }
                        continue;
                    }
                    Done::Applied => {
                        let kept = pushed.lock().unwrap_or_else(|p| p.into_inner()).take();
                        for f in kept.into_iter().flatten() {
                            let _ = fs::remove_file(&f);
                        }
                        continue;
                    }
                    Done::CopySource(i, path, hold) => Upload {
                        i,
                        desc: self.layers[i].clone(),
                        path,
                        built: false,
                        _hold: hold,
                    },
                    Done::Built(i, sealed) => {
                        out[i] = Some(sealed.out.clone());
                        Upload {
                            i,
                            desc: sealed.out.desc.clone(),
                            path: sealed.blob.clone(),
                            built: true,
                            _hold: None,
                        }
                    }
                };
                if c.opts.no_upload {
                    continue;
                }
                // Every pusher gone: one failed (its error is reported below).
                if job_tx.send(up).is_err() {
                    break;
                }
            }
            drop(job_tx);
            // The first real failure of a pusher, else an interruption.
            let mut first: Option<Error> = None;
            for h in pushers {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Invalid("upload thread panicked".into())));
                if let Err(e) = r {
                    if first.as_ref().is_none_or(|f| f.is_interrupted()) {
                        first = Some(e);
                    }
                }
            }
            match first {
                Some(e) => Err(e),
                None => received,
            }
        })?;
        out.into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(Error::Interrupted)
    }

    /// Pushes one layer blob of output `j` (and records a built layer in its dedup
    /// database).
    fn push_layer(&self, j: usize, up: Upload) -> Result<()> {
        let (n, k, c) = (self.n(), self.todo[j], self.run.c);
        let Upload {
            i,
            desc,
            path,
            built,
            ..
        } = up;
        let what = if built {
            "uploading layer"
        } else {
            "copying source layer"
        };
        let bar = c.progress.start_in(
            self.group(j),
            &self.name(j, i),
            Stage::Upload,
            Some(desc.size),
        );
        // A built layer was hashed by its seal, from this file in the run's own work
        // directory.
        let r = if built {
            c.dst.push_own_file(&desc, &path, Some(bar.setter()))
        } else {
            c.dst
                .push_blob(&desc, BlobSource::File(&path), Some(bar.setter()))
        };
        if let Err(e) = r {
            return Err(e.context(format!(
                "{what} {}/{n} ({}) to {}",
                i + 1,
                desc.digest,
                c.dst.name()
            )));
        }
        bar.finish(Some(desc.size), if built { "" } else { "source layer" });
        if let (Some(dd), true) = (&self.run.outputs[k].out.dedup, built) {
            dd.record_layer(&self.chain[i], &desc);
        }
        Ok(())
    }

    /// Gets layer `i` to every output: dedup hits as their format takes them over (if a
    /// converted blob cannot be downloaded, the layer is converted after all), and the
    /// source blob, once, to the outputs that convert it.
    fn get_layer(
        &self,
        i: usize,
        txs: &[&Sender<Result<Ready>>],
        fail: &dyn Fn(Error),
    ) -> Result<()> {
        let mut converting = Vec::new();
        for (j, tx) in txs.iter().enumerate() {
            match &self.plans[j][i] {
                Plan::Convert | Plan::Reuse(_, Reuse::Convert) => converting.push(*tx),
                Plan::Reuse(hit, Reuse::Descriptor) => {
                    self.run.c.progress.println(&format!(
                        "{}: reused {}{} (not downloaded: no layer above it is converted)",
                        self.name(j, i),
                        hit.digest,
                        hit.from
                            .as_ref()
                            .map(|r| format!(", mounted from {r}"))
                            .unwrap_or_default()
                    ));
                    let _ = tx.send(Ok(Ready::Reused(hit.clone(), None)));
                }
                Plan::Reuse(hit, Reuse::Download(file)) => {
                    let path = self.fdirs[j][i].join(file);
                    match self.fetch_converted(j, i, hit, &path) {
                        Ok(()) => {
                            let _ = tx.send(Ok(Ready::Reused(hit.clone(), Some(path))));
                        }
                        Err(e) if e.is_interrupted() => return Err(e),
                        Err(e) => {
                            let _ = fs::remove_file(&path);
                            tracing::warn!(
                                "{}: cannot download its converted layer {} ({}); converting the layer",
                                self.name(j, i),
                                hit.digest,
                                Chain(&e)
                            );
                            converting.push(*tx);
                        }
                    }
                }
            }
        }
        if converting.is_empty() {
            return Ok(());
        }
        self.fetch_source(i, &converting, fail)
    }

    /// A converted layer reused from the dedup database: download it from the destination
    /// into `path`, verifying its digest.
    fn fetch_converted(&self, j: usize, i: usize, hit: &Reused, path: &Path) -> Result<()> {
        let c = self.run.c;
        let desc = Descriptor::new("application/octet-stream", hit.digest.clone(), hit.size);
        let bar = c.progress.start_in(
            self.group(j),
            &self.name(j, i),
            Stage::Download,
            Some(hit.size),
        );
        // The store's stream verifies size and digest at its end.
        let f = File::create(path).map_err(|e| Error::io(path, e))?;
        let dst = c.dst.clone();
        self.download(move || dst.open_blob(&desc), f, path, |_| {}, &|pos| {
            bar.set(pos)
        })?;
        bar.finish(
            Some(hit.size),
            &match &hit.from {
                Some(repo) => format!("reused (mounted from {repo})"),
                None => "reused".to_string(),
            },
        );
        Ok(())
    }

    /// Gets source layer `i` to the outputs that convert it: local stores need nothing;
    /// registry blobs are downloaded once into the layer directory (compressed,
    /// digest-verified while streaming). Each output gets the layer as soon as the
    /// download starts, and follows it.
    fn fetch_source(
        &self,
        i: usize,
        txs: &[&Sender<Result<Ready>>],
        fail: &dyn Fn(Error),
    ) -> Result<()> {
        let (c, n, layer) = (self.run.c, self.n(), &self.layers[i]);
        if let Some(p) = c.src.local_blob_path(layer) {
            for tx in txs {
                let _ = tx.send(Ok(Ready::Source(SourceBlob::Local(p.clone()))));
            }
            return Ok(());
        }
        let bar = c.progress.start(
            &format!("{} layer {}/{n}", self.label, i + 1),
            Stage::Download,
            Some(layer.size),
        );
        let path = self.dirs[i].join("layer.blob");
        let ctx = |e: Error| e.context(format!("downloading layer {}/{n}", i + 1));
        let f = File::create(&path).map_err(|e| ctx(Error::io(&path, e)))?;
        let file = BlobFile::new(path.clone(), c.opts.reserve);
        let (growing, follows) = Growing::new(txs.len());
        for (tx, follow) in txs.iter().zip(follows) {
            let _ = tx.send(Ok(Ready::Source(SourceBlob::Downloading {
                file: file.clone(),
                follow,
            })));
        }
        let (src, desc, writer) = (c.src.clone(), layer.clone(), growing.clone());
        let res = self
            .download(
                move || src.open_blob(&desc),
                f,
                &path,
                move |pos| writer.advance(pos),
                &|pos| bar.set(pos),
            )
            .map_err(ctx);
        match res {
            Ok(()) => {
                growing.finish(Ok(()));
                bar.finish(Some(layer.size), "");
                Ok(())
            }
            Err(e) => {
                // Recorded as the failure before the outputs following the download
                // see it fail, so that their failure is not reported instead.
                fail(e);
                growing.finish(Err(format!("downloading layer {}/{n} failed", i + 1)));
                Err(Error::Interrupted)
            }
        }
    }

    /// Copy the blob stream `open` opens (it names its store and blob in its errors)
    /// into the file `f` at `path`, until it ends or the conversion is aborted.
    /// `written` gets the bytes in the file after each write; `bar` is updated ten
    /// times a second.
    ///
    /// The copy runs on a thread of its own that is not waited for once the
    /// conversion stops: a read from a registry connection that went silent returns
    /// only at the stall timeout (the blocking HTTP client cannot be interrupted),
    /// and Ctrl-C must not wait for it. That thread ends by itself at its next read.
    fn download(
        &self,
        open: impl FnOnce() -> Result<Box<dyn Read + Send>> + Send + 'static,
        mut f: File,
        path: &Path,
        written: impl Fn(u64) + Send + 'static,
        bar: &dyn Fn(u64),
    ) -> Result<()> {
        let abort = self.run.c.abort.clone();
        let pos = Arc::new(AtomicU64::new(0));
        let (done_tx, done) = bounded::<Result<()>>(1);
        let (stop, at, file) = (abort.clone(), pos.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("download".into())
            .spawn(move || {
                let r = open().and_then(|mut r| {
                    let progress = &mut |n| {
                        at.store(n, Ordering::Relaxed);
                        written(n);
                    };
                    copy(&mut r, &mut f, &|| stop.is_set(), progress)
                        .map(|_| ())
                        .map_err(|e| match e {
                            CopyError::Read(e) => Error::Stream(e),
                            CopyError::Write(e) => Error::io(&file, e),
                            CopyError::Stopped => Error::Interrupted,
                        })
                });
                let _ = done_tx.send(r);
            })
            .map_err(|error| Error::Spawn {
                what: "cannot start a download thread",
                error,
            })?;
        loop {
            select! {
                recv(done) -> r => {
                    bar(pos.load(Ordering::Relaxed));
                    return r.unwrap_or_else(|_| {
                        Err(Error::Invalid("download thread panicked".into()))
                    });
                }
                recv(abort.stopped()) -> _ => return Err(Error::Interrupted),
                default(Duration::from_millis(100)) => bar(pos.load(Ordering::Relaxed)),
            }
        }
    }
}
