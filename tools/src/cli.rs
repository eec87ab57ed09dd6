//! Small helpers shared by the command-line tools: logging set-up, error
//! reporting and human-readable sizes.
//!
//! Output never panics: `println!`/`eprintln!` panic when the stream is a
//! closed pipe (a dropped SSH session, `| head`), which would kill whatever
//! thread printed (a signal handler, a cleanup path). Log through `tracing`
//! (set up by [`init_logging`]) or print with [`say`] / [`print_out`]:
//! lines that cannot be written are dropped.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

/// Initialise logging: `--verbose` shows debug messages; `RUST_LOG` overrides.
/// By default `fuser` (the kernel engine's FUSE side) shows errors only: it
/// warns about unmounting a mount the engine has already unmounted.
pub fn init_logging(verbose: bool) {
    init_logging_from(
        "RUST_LOG",
        if verbose { "debug" } else { "warn,fuser=error" },
    );
}

/// Initialise logging to stderr with the filter in the environment variable
/// `var` (default `default`). Writing never fails loudly: events that
/// cannot be written (stderr closed) are dropped.
pub fn init_logging_from(var: &str, default: &str) {
    // An empty variable (`RUST_LOG=`) means the default, not "errors only".
    let filter = std::env::var(var)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| QuietStderr)
        .log_internal_errors(false)
        .with_target(false)
        .try_init();
}

/// stderr, where a failed write counts as written.
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Print a line to stderr; dropped if stderr is closed or broken.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Print a line to stdout (flushed); dropped if stdout is closed or broken.
pub fn print_out(line: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}").and_then(|_| o.flush());
}

/// Run a tool's body, printing `<tool>: error: <cause chain>` on failure
/// (exit code 2 for a [`Usage`] error, 1 for any other).
pub fn run(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(tool, e),
    }
}

/// Report a tool's failure: exit code 2 for a [`Usage`] error (as clap's
/// own usage errors), 1 for any other.
pub fn fail(tool: &str, e: anyhow::Error) -> ExitCode {
    match e.downcast::<Usage>() {
        Ok(Usage(e)) => {
            report(tool, &e);
            ExitCode::from(2)
        }
        Err(e) => {
            report(tool, &e);
            ExitCode::FAILURE
        }
    }
}

/// A usage error: arguments that cannot work together or do not parse (a
/// malformed image reference, conflicting flags), found before any work. The
/// tools exit 2 for it, as for clap's own checks; other failures exit 1.
#[derive(Debug)]
pub struct Usage(pub anyhow::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", error_line(&self.0))
    }
}

impl std::error::Error for Usage {}

/// Marks an error as a [`Usage`] error.
pub trait UsageExt<T> {
    fn usage(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> UsageExt<T> for Result<T, E> {
    fn usage(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::Error::new(Usage(e.into())))
    }
}

/// `anyhow::bail!` for a [`Usage`](crate::cli::Usage) error.
#[macro_export]
macro_rules! usage_bail {
    ($($t:tt)*) => {
        return Err(anyhow::Error::new($crate::cli::Usage(anyhow::anyhow!($($t)*))))
    };
}

/// An error and its causes on one line (`error: cause: cause`), each cause once.
pub fn error_line(e: &anyhow::Error) -> String {
    obdoci::error::Chain(e.as_ref()).to_string()
}

/// Print `<tool>: error: <cause chain>` on stderr.
pub fn report(tool: &str, e: &anyhow::Error) {
    let mut line = error_line(e);
    if let Some(hint) = file_size_limit_hint(e, &line) {
        line.push_str(&hint);
    }
    say(format_args!("{tool}: error: {line}"));
}

/// For an error that a write past this process's file size limit (`ulimit -f`,
/// RLIMIT_FSIZE: some CI sandboxes set one) caused, EFBIG "File too large",
/// which does not say which limit: the limit, unless `line` names it already.
fn file_size_limit_hint(e: &anyhow::Error, line: &str) -> Option<String> {
    let efbig = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(nix::libc::EFBIG))
    }) || line.contains(&format!("(os error {})", nix::libc::EFBIG));
    if !efbig || line.contains("ulimit -f") {
        return None;
    }
    let limit = blockdev::io::file_size_limit()?;
    Some(format!(
        " (this process's file size limit (ulimit -f) is {limit} bytes: raise it)"
    ))
}

/// Report on stderr that `tool` (taking `LAYER CONFIG`) cannot load its
/// config.json at `path` (`e`). When the file looks like a layer blob
/// instead, the arguments were given the wrong way round: the line names the
/// order, and this returns true (a usage error, exit code 2).
pub fn report_config_load(tool: &str, path: &std::path::Path, e: &blockdev::Error) -> bool {
    let kind = looks_like_layer(path);
    let order = match kind {
        Some(kind) => format!(
            " (it is {kind}: the layer comes first, then the config.json: {tool} LAYER CONFIG)"
        ),
        None => String::new(),
    };
    say(format_args!(
        "{tool}: error: cannot load image config {}: {}{order}",
        path.display(),
        blockdev::error::Chain(e)
    ));
    kind.is_some()
}

/// Why the file given as a tool's config.json cannot be one, when it looks
/// like a layer blob instead (the arguments given the wrong way round):
/// "a tar archive", "gzip data" or "zstd data". `None` for anything else.
fn looks_like_layer(path: &std::path::Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .ok()?
        .take(512)
        .read_to_end(&mut head)
        .ok()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip data")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd data")
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some("a tar archive")
    } else {
        None
    }
}

/// `1.5 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Throughput in MB/s since `start` for `bytes`.
pub fn rate(bytes: u64, start: Instant) -> String {
    let s = start.elapsed().as_secs_f64().max(1e-6);
    format!("{:.0} MB/s", bytes as f64 / s / 1e6)
}

/// A progress printer for long copies: a bar on a terminal, log lines otherwise.
pub fn progress_reporter(label: &str) -> blockdev::commit::Progress {
    use std::io::IsTerminal;
    let label = label.to_string();
    let tty = std::io::stderr().is_terminal();
    // Made at the first report that has something left to do (a bar is drawn
    // when made: made up front, it showed a full "0 B/0 B" first).
    let bar = std::sync::OnceLock::new();
    blockdev::commit::Progress(std::sync::Arc::new(move |done, total| {
        if !tty {
            return say(format_args!("{label}: {} of {}", human(done), human(total)));
        }
        if bar.get().is_none() && done >= total {
            return;
        }
        let b = bar.get_or_init(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(label.clone());
            BARS.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(b.clone());
            b
        });
        b.set_length(total);
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
        }
    }))
}

/// The progress bars [`progress_reporter`] made, for [`clear_progress`].
static BARS: std::sync::Mutex<Vec<indicatif::ProgressBar>> = std::sync::Mutex::new(Vec::new());

/// Take the progress bars off the screen for good, before a last line
/// printed while the work goes on (a signal's): else the line lands at the
/// end of the bar's, and the bar stays on screen after the exit.
pub fn clear_progress() {
    for b in BARS.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        b.finish_and_clear();
        b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
}

/// A device that reports the bytes written to it as the progress of a long
/// write of about `total` bytes (the bitmaps a large mkfs writes): nothing
/// for the first `after`, so a quick run prints nothing; then a bar on a
/// terminal, or a line every 5 s otherwise ([`progress_reporter`]).
/// [`WriteProgress::finish`] clears the bar.
pub struct WriteProgress {
    dev: std::sync::Arc<dyn blockdev::BlockDevice>,
    written: std::sync::atomic::AtomicU64,
    total: u64,
    start: Instant,
    after: std::time::Duration,
    every: std::time::Duration,
    /// When progress was last reported, if it was.
    last: std::sync::Mutex<Option<Instant>>,
    /// Makes the reporter, at the first report (a bar is drawn when made).
    make: Box<dyn Fn() -> blockdev::commit::Progress + Send + Sync>,
    report: std::sync::OnceLock<blockdev::commit::Progress>,
}

impl WriteProgress {
    /// Report writes to `dev` as progress of `label` towards `total` bytes.
    pub fn new(
        dev: std::sync::Arc<dyn blockdev::BlockDevice>,
        label: &str,
        total: u64,
    ) -> std::sync::Arc<Self> {
        use std::io::IsTerminal;
        let every = match std::io::stderr().is_terminal() {
            true => std::time::Duration::from_millis(200),
            false => std::time::Duration::from_secs(5),
        };
        let label = label.to_string();
        Self::with(
            dev,
            total,
            std::time::Duration::from_secs(2),
            every,
            move || progress_reporter(&label),
        )
    }

    /// [`WriteProgress::new`] with its timing and reporter given.
    pub fn with(
        dev: std::sync::Arc<dyn blockdev::BlockDevice>,
        total: u64,
        after: std::time::Duration,
        every: std::time::Duration,
        make: impl Fn() -> blockdev::commit::Progress + Send + Sync + 'static,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(WriteProgress {
            dev,
            written: 0.into(),
            total: total.max(1),
            start: Instant::now(),
            after,
            every,
            last: std::sync::Mutex::new(None),
            make: Box::new(make),
            report: std::sync::OnceLock::new(),
        })
    }

    fn wrote(&self, n: usize) {
        use std::sync::atomic::Ordering;
        let done = self.written.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if self.start.elapsed() < self.after {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        *last = Some(Instant::now());
        // An estimate: the bar stays short of its end until finish.
        let total = self.total.max(done + 1);
        (self.report.get_or_init(&self.make).0)(done.min(total - 1), total);
    }

    /// The work is done: a bar shown is completed and cleared (a line
    /// printed gets its last one).
    pub fn finish(&self) {
        use std::sync::atomic::Ordering;
        if let Some(report) = self.report.get() {
            let done = self.written.load(Ordering::Relaxed);
            (report.0)(done, done);
        }
    }
}

impl blockdev::BlockDevice for WriteProgress {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.dev.write_at(buf, offset)?;
        self.wrote(buf.len());
        Ok(())
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.dev.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.dev.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.dev.write_zeroes(offset, len)
    }
    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<blockdev::Result<()>> {
        self.dev.read_many(reqs)
    }
    fn extents(&self, offset: u64, len: u64) -> blockdev::Result<Vec<blockdev::Extent>> {
        self.dev.extents(offset, len)
    }
    fn map_target(&self, offset: u64, len: u64, target_offset: u64) -> blockdev::Result<()> {
        self.dev.map_target(offset, len, target_offset)
    }
}

/// A `--threads` value: 0 means every core.
pub fn threads(n: usize) -> usize {
    if n == 0 {
        blockdev::compress::default_threads()
    } else {
        n
    }
}

/// Make writable layers opened by this tool wait up to
/// [`blockdev::lsmt::TOOL_CLAIM_WAIT`] for a claim another process holds
/// (one that runs on idle fails after a second instead), saying so on
/// stderr (`<tool>: waiting up to 10 s for PATH: in use by another process
/// (pid N, NAME, exiting) ...`) once the wait passes a second.
pub fn wait_for_layer_claims() {
    blockdev::lsmt::set_claim_wait(blockdev::lsmt::TOOL_CLAIM_WAIT);
    blockdev::lsmt::set_claim_notice(Some(|m| {
        let tool = std::env::args_os()
            .next()
            .map(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .unwrap_or(&a)
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        say(format_args!("{tool}: {m}"));
    }));
}

#[cfg(test)]
mod tests {

    /// Writes are reported once `after` has passed, at most every `every`,
    /// short of the estimate until `finish`, which reports the end; a run
    /// done before `after` reports nothing (no bar drawn).
    #[test]
    fn write_progress_reports_long_writes_only() {
        use blockdev::BlockDevice;
        use std::sync::{Arc, Mutex};
        use std::time::Duration;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let reporter = |calls: &Arc<Mutex<Vec<(u64, u64)>>>| {
            let calls = calls.clone();
            move || {
                let calls = calls.clone();
                blockdev::commit::Progress(Arc::new(move |d, t| calls.lock().unwrap().push((d, t))))
            }
        };
        let mem = || Arc::new(blockdev::MemDevice::new(1 << 20)) as Arc<dyn BlockDevice>;
        // Quick: nothing, not even at the end.
        let p = super::WriteProgress::with(
            mem(),
            8192,
            Duration::from_secs(3600),
            Duration::ZERO,
            reporter(&calls),
        );
        p.write_at(&[1; 4096], 0).unwrap();
        p.finish();
        assert!(calls.lock().unwrap().is_empty());
        // Long (after = 0): every write, kept short of the total until the end,
        // also when the estimate was low.
        let p = super::WriteProgress::with(
            mem(),
            8192,
            Duration::ZERO,
            Duration::ZERO,
            reporter(&calls),
        );
        for i in 0..3 {
            p.write_at(&[1; 4096], i * 4096).unwrap();
        }
        let mut buf = [0u8; 4096];
        p.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [1; 4096]);
        p.finish();
        assert_eq!(
            *calls.lock().unwrap(),
            [(4096, 8192), (8192, 8193), (12288, 12289), (12288, 12288)]
        );
        // At most every `every`.
        calls.lock().unwrap().clear();
        let p = super::WriteProgress::with(
            mem(),
            1 << 20,
            Duration::ZERO,
            Duration::from_secs(3600),
            reporter(&calls),
        );
        for i in 0..3 {
            p.write_at(&[1; 4096], i * 4096).unwrap();
        }
        assert_eq!(*calls.lock().unwrap(), [(4096, 1 << 20)]);
    }
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(64 << 30), "64.0 GiB");
    }
}
