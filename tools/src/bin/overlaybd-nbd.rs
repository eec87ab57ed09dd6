//! `overlaybd-nbd`: serve an overlaybd layer stack over the NBD protocol.
//!
//! The doc comments of the argument structs are clap's `--help` text, where `[:TAG]`
//! means an optional part, not an intra-doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blockdev::config::UpperConfig;
use blockdev::io::{set_default_backend, IoBackend};
use blockdev::nbd::{
    Allocation, Endpoint, Listener, Server, ServerConfig, ShutdownHandle, ZeroScan,
};
use blockdev::stack::Stack;
use blockdev::{BlockDevice, ImageConfig, RawFileDevice};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nix::sys::signal::Signal;
use obdtools::cli::{print_out, say};

#[derive(Parser, Debug)]
#[command(
    name = "overlaybd-nbd",
    version,
    about = "Expose an overlaybd layer stack as a userspace NBD export",
    long_about = "Expose an overlaybd layer stack as a userspace NBD export, so layers can be \
                  inspected with nbdinfo, nbdcopy, nbdfuse or qemu-img without the overlaybd \
                  TCMU backend."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve a layer stack (or a raw image) until SIGINT, SIGTERM or SIGHUP.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// An overlaybd config.json (lowers and optional upper), or layer files
    /// (sealed LSMT, ZFile, or their tar-wrapped form), lowest layer first,
    /// or one converted image: oci:DIR[:TAG], or HOST/REPO[:TAG|@DIGEST] in
    /// a registry (blobs fetched lazily, see the registry options).
    #[arg(required = true, value_name = "CONFIG.json | LAYER | IMAGE")]
    inputs: Vec<PathBuf>,

    /// Writable upper layer on top of the layers: its data and index files (it
    /// replaces a config.json's upper).
    #[arg(long, num_args = 2, value_names = ["DATA", "INDEX"], conflicts_with = "raw")]
    upper: Option<Vec<PathBuf>>,

    /// Treat the single input as a plain raw disk image instead of a layer stack.
    #[arg(long)]
    raw: bool,

    /// Listen on this Unix socket path (clients: nbd+unix:///?socket=PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    socket: Option<PathBuf>,

    /// Listen on this TCP address (clients: nbd://ADDR): an IP address or a
    /// host name (the first of its addresses that can be bound, IPv4 ones
    /// first) and a port. Default 127.0.0.1:10809 when --socket is not given.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen)]
    listen: Option<ListenAddrs>,

    /// Refuse writes (EPERM) even when the stack has a writable upper layer.
    #[arg(long)]
    read_only: bool,

    /// Export name clients ask for (the default, empty name always works too).
    #[arg(long, value_name = "NAME", default_value = "")]
    export: String,

    #[command(flatten)]
    remote: obdimage::cli::RemoteArgs,

    /// File I/O backend: uring (every read and write), pread (none), or auto
    /// (batches of reads through io_uring when the kernel allows it). Default:
    /// the environment variable OVERLAYBD_IO, else auto.
    #[arg(long, value_name = "uring|pread|auto")]
    io: Option<IoBackend>,

    /// Threads per connection (1 to 64), taking batches of requests in turn.
    /// One is fastest on small machines (the reads of a batch overlap through
    /// io_uring); more can help on a device with slow reads and no io_uring.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    workers: usize,

    /// Sessions served at once (1 to 4096; connections that finished the
    /// handshake); a client asking for one more is told to try later.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    max_connections: usize,

    /// Close connections that have not finished the NBD handshake after
    /// this many seconds (more than 0, at most 86400: a day); idle
    /// connections cannot lock clients out.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_handshake_timeout)]
    handshake_timeout: Duration,

    /// Microseconds (0 to 10000) a connection polls for the next requests
    /// before it sleeps. A pipelining client's next requests come within
    /// microseconds, and waking a sleeping thread costs more than that on a
    /// virtual machine; a connection whose requests come further apart than
    /// twice this sleeps at once, so idle clients cost no CPU. 0 never polls.
    #[arg(long, value_name = "US", default_value_t = blockdev::nbd::BUSY_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    busy_poll_us: u64,

    /// MiB (1 to 65536) of replies and write payloads one connection may
    /// hold at once, all its workers together (default a little over 64:
    /// two of the largest, 32 MiB reads). A client that does not read its replies pins
    /// at most this much; a single larger request still runs when its
    /// connection holds nothing else.
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    connection_reply_memory: Option<u64>,

    /// MiB (1 to 1048576) of replies and write payloads all connections
    /// together may hold at once (default 1024); when it is full, connections
    /// wait for room (at most the 120 s write timeout of the clients holding
    /// it) instead of the machine running out of memory. At least
    /// --connection-reply-memory.
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    reply_memory: Option<u64>,
}

impl ServeArgs {
    /// The reply memory budgets in bytes: (per connection, whole server).
    fn reply_memory(&self) -> (u64, u64) {
        (
            self.connection_reply_memory
                .map_or(blockdev::nbd::REPLY_MEMORY_PER_CONNECTION, |m| m << 20),
            self.reply_memory
                .map_or(blockdev::nbd::REPLY_MEMORY, |m| m << 20),
        )
    }
}

/// `--handshake-timeout`: seconds, fractions allowed, in (0, 86400].
fn parse_handshake_timeout(s: &str) -> std::result::Result<Duration, String> {
    const MAX: f64 = 86_400.0;
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= MAX) {
        return Err(format!("{s} is not in (0, {MAX}] seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--listen`: what it says, and its addresses (resolved when parsed).
#[derive(Debug, Clone)]
struct ListenAddrs {
    arg: String,
    addrs: Vec<SocketAddr>,
}

fn parse_listen(s: &str) -> std::result::Result<ListenAddrs, String> {
    use std::net::ToSocketAddrs;
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?}: expected HOST:PORT"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{s:?}: {port:?} is not a port number"));
    }
    if host.is_empty() {
        return Err(format!("{s:?}: no host before the port"));
    }
    let mut addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host:?} has no addresses"));
    }
    // Stable: the resolver's order among each family.
    addrs.sort_by_key(SocketAddr::is_ipv6);
    addrs.dedup();
    Ok(ListenAddrs {
        arg: s.to_string(),
        addrs,
    })
}

/// Bind the first of `--listen`'s addresses that can be bound.
fn bind_listen(l: &ListenAddrs) -> Result<Listener> {
    let mut last = None;
    for a in &l.addrs {
        match Listener::bind(&Endpoint::Tcp(*a)) {
            Ok(b) => return Ok(b),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("parse_listen returns at least one address");
    Err(anyhow::Error::new(e).context(format!("cannot listen on {}", l.arg)))
}

/// The device to serve, where block status comes from, and a description.
type Opened = (Arc<dyn BlockDevice>, Arc<dyn Allocation>, String);

fn open_device(a: &ServeArgs) -> Result<Opened> {
    if a.raw {
        let p = &a.inputs[0];
        // A FIFO (or a character device) would block the open or serve a
        // stream: a raw image is a regular file or a block device.
        let meta = std::fs::metadata(p)
            .with_context(|| format!("cannot open raw image {}", p.display()))?;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            bail!(
                "{}: not a raw disk image (--raw serves a regular file or a block device)",
                p.display()
            );
        }
        let dev: Arc<dyn BlockDevice> = Arc::new(
            if a.read_only {
                RawFileDevice::open(p)
            } else {
                RawFileDevice::open_rw(p)
            }
            .with_context(|| format!("cannot open raw image {}", p.display()))?,
        );
        let alloc = Arc::new(ZeroScan::new(dev.clone()));
        return Ok((dev, alloc, format!("raw image {}", p.display())));
    }
    if let [one] = a.inputs.as_slice() {
        let arg = one.to_string_lossy().into_owned();
        if obdimage::source::is_image_argument(&arg) {
            let upper = a.upper.as_ref().map(|v| (v[0].clone(), v[1].clone()));
            let spec = obdimage::ImageSpec::from_args(&[arg], upper, &a.remote.options()?)?;
            let stack = spec.open(!a.read_only && spec.upper.is_some())?;
            return Ok((stack.clone(), stack, spec.description));
        }
    }
    let json = a.inputs.len() == 1 && obdimage::source::is_config_file(&a.inputs[0]);
    let (stack, what) = if json {
        let p = &a.inputs[0];
        let mut cfg = ImageConfig::load(p).map_err(|e| {
            // Said once: the error names the file when it is about the file.
            let what = if e.to_string().starts_with(&format!("{}:", p.display())) {
                "cannot read the image config".to_string()
            } else {
                format!("cannot read image config {}", p.display())
            };
            anyhow::Error::new(e).context(what)
        })?;
        // As in overlaybd-fuse, --upper replaces the config's upper.
        if let Some(v) = &a.upper {
            cfg.upper = Some(UpperConfig {
                data: v[0].clone(),
                index: v[1].clone(),
                target: None,
            });
        }
        // (Opening the stack refuses a missing or irregular lower, naming
        // it; the command-line check would add the registry-reference hint,
        // which a config's lowers do not need.)
        let stack = if a.read_only {
            Stack::open_config_read_only(&cfg)
        } else {
            Stack::open_config(&cfg)
        }
        .with_context(|| format!("cannot open the layer stack (image config {})", p.display()))?;
        let turbo = cfg.lower_targets.iter().filter(|t| t.is_some()).count();
        let what = format!(
            "image config {} ({} lower(s){}{})",
            p.display(),
            cfg.lowers.len(),
            if turbo > 0 {
                format!(", {turbo} TurboOCI")
            } else {
                String::new()
            },
            match &cfg.upper {
                Some(u) => format!(", upper {}", u.data.display()),
                None => String::new(),
            }
        );
        (stack, what)
    } else {
        for l in &a.inputs {
            obdimage::source::check_layer_file(&l.to_string_lossy())?;
        }
        let upper = a.upper.as_ref().map(|v| (v[0].clone(), v[1].clone()));
        let up = upper.as_ref().map(|(d, i)| (d.as_path(), i.as_path()));
        let stack = if a.read_only {
            Stack::open_read_only(&a.inputs, up)
        } else {
            Stack::open(&a.inputs, up)
        }
        .context("cannot open the layer stack")?;
        let what = format!(
            "layer stack ({} lower(s){})",
            a.inputs.len(),
            match &upper {
                Some((d, _)) => format!(", upper {}", d.display()),
                None => String::new(),
            }
        );
        (stack, what)
    };
    let stack = Arc::new(stack);
    Ok((stack.clone(), stack, what))
}

fn main() -> std::process::ExitCode {
    // A write to the upper layer past `ulimit -f` fails with EFBIG (an error
    // reply) instead of SIGXFSZ killing the server unflushed.
    let _ = obdsignals::fail_writes_past_file_size_limit();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Logging, like every line below, never panics on a closed stderr.
    obdtools::cli::init_logging_from("OVERLAYBD_LOG", "warn");
    obdtools::cli::wait_for_layer_claims();
    let Cmd::Serve(a) = &cli.cmd;
    let m = matches
        .subcommand_matches("serve")
        .expect("serve is the only subcommand");
    match check_usage(a, m) {
        Ok(warnings) => {
            for w in warnings {
                say(format_args!("overlaybd-nbd: warning: {w}"));
            }
        }
        Err(msg) => {
            // A usage error: exit code 2, as clap's own.
            say(format_args!("overlaybd-nbd: error: {msg}"));
            return std::process::ExitCode::from(2);
        }
    }
    obdtools::cli::run("overlaybd-nbd", || match cli.cmd {
        Cmd::Serve(a) => serve(a),
    })
}

/// The usage errors clap cannot see (the message; exit code 2), and
/// warnings about flags given on the command line (`m`) that do not apply.
fn check_usage(a: &ServeArgs, m: &clap::ArgMatches) -> std::result::Result<Vec<String>, String> {
    if a.raw && a.inputs.len() != 1 {
        return Err(format!(
            "--raw takes exactly one image file, got {}",
            a.inputs.len()
        ));
    }
    let sources: Vec<String> = a
        .inputs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if !a.raw {
        obdimage::cli::check_sources(&sources)?;
    }
    let (conn, server) = a.reply_memory();
    if conn > server {
        return Err(format!(
            "--connection-reply-memory ({} MiB) is more than --reply-memory ({} MiB): \
             one connection can never hold more than the whole server",
            conn.div_ceil(1 << 20),
            server >> 20
        ));
    }
    let mut warnings = Vec::new();
    let remote_given = obdimage::cli::remote_flags_given(m);
    if !remote_given.is_empty() && (a.raw || !obdimage::cli::is_registry_source(&sources)) {
        warnings.push(obdimage::cli::ignored_remote_flags(&remote_given));
    }
    Ok(warnings)
}

fn serve(a: ServeArgs) -> Result<()> {
    // Block the shutdown signals before any thread starts so that only the
    // signal thread below receives them.
    // SIGHUP too (a closed terminal or SSH session), as overlaybd-fuse: its
    // default action killed the server without flushing, leaving the
    // socket file. (Under `nohup` it stays ignored.)
    let sigs = obdsignals::block(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP])
        .context("cannot block SIGINT/SIGTERM/SIGHUP")?;
    let mut stops =
        obdsignals::Stops::new(&sigs).context("cannot watch for SIGINT/SIGTERM/SIGHUP")?;

    // The signal thread starts before the layers open (a registry image
    // can take long): until the server exists a signal exits at once.
    let server_handle: Arc<Mutex<Option<ShutdownHandle>>> = Arc::default();
    let handle = server_handle.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = true;
            while let Ok(sig) = stops.wait() {
                let h = handle.lock().unwrap_or_else(|p| p.into_inner());
                match h.as_ref() {
                    None => {
                        say(format_args!(
                            "overlaybd-nbd: {sig} while opening the layers: exiting"
                        ));
                        std::process::exit(128 + sig as i32);
                    }
                    Some(h) if first => {
                        h.shutdown();
                        say(format_args!(
                            "overlaybd-nbd: {sig}: finishing in-flight requests and flushing"
                        ));
                        first = false;
                    }
                    Some(_) => {
                        say(format_args!(
                            "overlaybd-nbd: {sig} again: exiting without flushing"
                        ));
                        std::process::exit(128 + sig as i32);
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    // Without --io, OVERLAYBD_IO (or auto) applies, as in every user of blockdev.
    if let Some(io) = a.io {
        set_default_backend(io);
    }
    let (dev, alloc, what) = open_device(&a)?;

    let cfg = ServerConfig {
        export_name: a.export.clone(),
        description: what.clone(),
        read_only: a.read_only,
        workers_per_connection: a.workers.max(1),
        max_connections: a.max_connections.max(1),
        handshake_timeout: a.handshake_timeout,
        busy_poll: Duration::from_micros(a.busy_poll_us),
        reply_memory_per_connection: a.reply_memory().0,
        reply_memory: a.reply_memory().1,
        ..ServerConfig::default()
    };
    let server = Server::with_allocation(dev, alloc, cfg);
    let listener = match (&a.socket, &a.listen) {
        (Some(p), _) => {
            let ep = Endpoint::Unix(p.clone());
            Listener::bind(&ep).with_context(|| format!("cannot listen on {ep}"))?
        }
        (None, Some(l)) => bind_listen(l)?,
        (None, None) => {
            let ep = Endpoint::Tcp("127.0.0.1:10809".parse().expect("valid address"));
            Listener::bind(&ep).with_context(|| format!("cannot listen on {ep}"))?
        }
    };
    let ep = listener.endpoint();
    *server_handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(server.shutdown_handle());

    let export = server.export();
    print_out(format_args!(
        "overlaybd-nbd: serving {what} ({} bytes, {}) as export '{}' on {ep}",
        export.size,
        if export.read_only {
            "read-only"
        } else {
            "writable"
        },
        export.name
    ));
    let stats = server
        .serve(&listener)
        .with_context(|| format!("serving {what}"))?;
    print_out(format_args!(
        "overlaybd-nbd: stopped cleanly after {} connections and {} requests; device flushed",
        stats.connections, stats.requests
    ));
    Ok(())
}
