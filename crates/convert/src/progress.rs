//! Conversion progress: one bar per layer stage (download, apply, commit, upload) on a
//! terminal, plain log lines otherwise, and per-stage totals for the final summary.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Download,
    Apply,
    Commit,
    Upload,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Download => "download",
            Stage::Apply => "apply",
            Stage::Commit => "commit",
            Stage::Upload => "upload",
        })
    }
}

#[derive(Default, Clone, Copy, Debug)]
pub struct StageTotal {
    pub busy: Duration,
    pub bytes: u64,
    pub count: u64,
}

/// Shared progress reporter.
pub struct Progress {
    mp: Option<MultiProgress>,
    /// Per (group, stage); the group names an output format in runs that make several.
    totals: Mutex<BTreeMap<(String, Stage), StageTotal>>,
    quiet: bool,
}

impl Progress {
    /// Bars when `tty`, log lines otherwise; `quiet` suppresses per-stage lines.
    pub fn new(tty: bool, quiet: bool) -> Arc<Progress> {
        let mp = tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Arc::new(Progress {
            mp,
            totals: Mutex::new(BTreeMap::new()),
            quiet,
        })
    }

    /// Print a message without breaking the bars.
    pub fn println(&self, msg: &str) {
        match &self.mp {
            Some(mp) => {
                let _ = mp.println(msg);
            }
            // Never `eprintln!`: it panics once stderr is a closed pipe.
            None => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "{msg}");
            }
        }
    }

    /// Start a stage for `label` (e.g. `1-linux_amd64 layer 3/7`). `total` in bytes.
    pub fn start(self: &Arc<Self>, label: &str, stage: Stage, total: Option<u64>) -> StageBar {
        self.start_in("", label, stage, total)
    }

    /// Like [`Progress::start`], totalled under `group` (e.g. an output format's name;
    /// "" for the common totals).
    pub fn start_in(
        self: &Arc<Self>,
        group: &str,
        label: &str,
        stage: Stage,
        total: Option<u64>,
    ) -> StageBar {
        let bar = self.mp.as_ref().map(|mp| {
            let b = mp.add(ProgressBar::new(total.unwrap_or(0)));
            let tmpl = if total.is_some() {
                "{prefix:.bold} {msg:8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}"
            } else {
                "{prefix:.bold} {msg:8} {spinner} {bytes} {bytes_per_sec}"
            };
            b.set_style(
                ProgressStyle::with_template(tmpl)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.set_message(stage.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        tracing::debug!("{label} {stage}: started");
        StageBar {
            progress: self.clone(),
            group: group.to_string(),
            bar,
            label: label.to_string(),
            stage,
            start: Instant::now(),
            pos: Arc::new(AtomicU64::new(0)),
            finished: false,
        }
    }

    fn record(&self, group: &str, stage: Stage, busy: Duration, bytes: u64) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.entry((group.to_string(), stage)).or_default();
        e.busy += busy;
        e.bytes += bytes;
        e.count += 1;
    }

    /// Totals per (group, stage).
    pub fn totals(&self) -> BTreeMap<(String, Stage), StageTotal> {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One line per stage: `stage <name>[ (<group>)]: <n> layers, <s> s, <MB> MB,
    /// <MB/s> MB/s`.
    pub fn summary(&self) -> Vec<String> {
        self.totals()
            .iter()
            .map(|((g, s), t)| {
                let secs = t.busy.as_secs_f64();
                let g = if g.is_empty() {
                    String::new()
                } else {
                    format!(" ({g})")
                };
                format!(
                    "stage {s}{g}: {} layers, {secs:.2} s, {:.1} MB, {:.1} MB/s",
                    t.count,
                    t.bytes as f64 / 1e6,
                    t.bytes as f64 / 1e6 / secs.max(1e-9)
                )
            })
            .collect()
    }
}

/// One running stage. Dropping it without `finish` removes the bar silently.
pub struct StageBar {
    progress: Arc<Progress>,
    group: String,
    bar: Option<ProgressBar>,
    label: String,
    stage: Stage,
    start: Instant,
    pos: Arc<AtomicU64>,
    finished: bool,
}

impl StageBar {
    /// Set the absolute byte position.
    pub fn set(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// A `Send + Sync` setter for callbacks.
    pub fn setter(&self) -> Arc<dyn Fn(u64) + Send + Sync> {
        let pos = self.pos.clone();
        let bar = self.bar.clone();
        Arc::new(move |n| {
            pos.store(n, Ordering::Relaxed);
            if let Some(b) = &bar {
                b.set_position(n);
            }
        })
    }

    /// Finish, reporting `bytes` processed (defaults to the last position).
    pub fn finish(mut self, bytes: Option<u64>, note: &str) {
        self.finished = true;
        let bytes = bytes.unwrap_or_else(|| self.pos.load(Ordering::Relaxed));
        let el = self.start.elapsed();
        tracing::debug!(
            "{} {}: finished, {bytes} bytes in {:.3} s",
            self.label,
            self.stage,
            el.as_secs_f64()
        );
        self.progress.record(&self.group, self.stage, el, bytes);
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
            if let Some(mp) = &self.progress.mp {
                mp.remove(&b);
            }
        }
        if !self.progress.quiet {
            let secs = el.as_secs_f64();
            self.progress.println(&format!(
                "{} {}: {:.1} MB in {secs:.2} s ({:.1} MB/s){}{note}",
                self.label,
                self.stage,
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / secs.max(1e-9),
                if note.is_empty() { "" } else { ", " }
            ));
        }
    }
}

impl Drop for StageBar {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
                if let Some(mp) = &self.progress.mp {
                    mp.remove(&b);
                }
            }
        }
    }
}
