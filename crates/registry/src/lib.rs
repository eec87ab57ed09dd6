//! A blocking client for the OCI distribution API (`/v2/...`), as used by the convertor.
//!
//! Wire protocol summary:
//! * manifests: `GET|HEAD|PUT /v2/<name>/manifests/<tag|digest>`, with `Accept` listing
//!   the OCI and Docker schema-2 manifest and index types (distribution 2.8 answers 404
//!   for OCI manifests otherwise);
//! * blobs: `HEAD|GET /v2/<name>/blobs/<digest>` (redirects followed, resumed with
//!   `Range` after a broken stream, digest verified while streaming); random access
//!   with one `Range: bytes=A-B` request per read ([`Repository::read_blob_range`],
//!   206 expected), for lazily loaded images;
//! * uploads: `POST /v2/<name>/blobs/uploads/` (or `?mount=<digest>&from=<repo>` for a
//!   cross-repository mount, 201 = mounted), then either one `PUT <location>&digest=`
//!   with the whole body (monolithic) or `PATCH <location>` chunks with `Content-Range`
//!   followed by an empty `PUT`; the answer's `Docker-Content-Digest` must match;
//! * auth: see [`auth`]; TLS: system roots plus extra CAs, optional client certificate,
//!   or plain HTTP.
//!
//! Transient failures (connection errors, 429, 5xx) are retried with exponential
//! backoff. Errors name the registry and the operation; credentials are never logged.

pub mod auth;
pub mod dockercfg;
pub mod hosts;

use obdoci::digest::VerifyReader;
use obdoci::error::{take_inner, Chain};
use obdoci::{self as oci, model, Descriptor, Digest, ErrorKind, Reference};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Registry client errors. Every variant names the registry (`peer`) and the operation;
/// causes are kept as sources (see [`obdoci::error::Chain`] to show them on one line).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be sent or its answer not read. `hint` says what to do about
    /// the usual TLS mistakes.
    #[error("{peer}: {what}{hint}")]
    Transport {
        peer: String,
        what: String,
        hint: String,
        #[source]
        error: reqwest::Error,
    },
    #[error("{peer}: {what}: HTTP {status}{detail}")]
    Status {
        peer: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{peer}: {what}: authentication failed{detail}")]
    Unauthorized {
        peer: String,
        what: String,
        detail: String,
    },
    #[error("{peer}: {what}: not found{detail}")]
    NotFound {
        peer: String,
        what: String,
        detail: String,
    },
    #[error("{peer}: {what}: {reason}")]
    Protocol {
        peer: String,
        what: String,
        reason: String,
    },
    /// A JSON answer (e.g. of a token server) that cannot be decoded.
    #[error("{peer}: {what}: {reason}")]
    BadJson {
        peer: String,
        what: String,
        reason: &'static str,
        #[source]
        error: serde_json::Error,
    },
    /// Certificates or keys given for TLS cannot be used.
    #[error("TLS setup: {what}")]
    Tls {
        what: String,
        #[source]
        error: Option<reqwest::Error>,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    /// Reading a response body or an upload source failed.
    #[error("{peer}: {what}")]
    Stream {
        peer: String,
        what: String,
        #[source]
        error: io::Error,
    },
    #[error(transparent)]
    Oci(#[from] oci::Error),
    /// A registry host configuration file (`hosts.toml`) that cannot be used.
    #[error("{}: {reason}", file.display())]
    Config { file: PathBuf, reason: String },
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// HTTP answers worth retrying.
fn is_transient_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// The TLS error behind a transport error, if any (rustls errors may be wrapped in an
/// `io::Error` whose `source()` skips them).
fn tls_cause(e: &reqwest::Error) -> Option<&rustls::Error> {
    causes(e).find_map(|c| {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // hyper's connector wraps tokio-rustls's io::Error in another one.
        let mut inner = c.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        while let Some(i) = inner {
            if let Some(t) = i.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            inner = i.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        }
        None
    })
}

/// Whether `e` is a refused TCP connection (nothing listens at the address).
fn refused(e: &reqwest::Error) -> bool {
    causes(e).any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::ConnectionRefused)
    })
}

/// `e` and its sources, outermost first.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| c.source())
}

/// A hint for the TLS errors users commonly hit, naming the tool's `flags`.
fn tls_hint(e: &rustls::Error, flags: &FlagNames) -> String {
    match e {
        rustls::Error::InvalidMessage(_) => format!(
            " (the registry does not speak TLS here; use {} for plain HTTP)",
            flags.plain_http
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => format!(
            " (TLS verification failed; pass the registry's CA with {}, or use {})",
            flags.tls_ca, flags.insecure
        ),
        _ => String::new(),
    }
}

impl Error {
    /// A transport error of `what` on `peer`, with a hint for TLS mistakes naming
    /// the tool's `flags`.
    pub(crate) fn transport(
        peer: &str,
        what: &str,
        error: reqwest::Error,
        flags: &FlagNames,
    ) -> Error {
        Error::Transport {
            peer: peer.to_string(),
            what: what.to_string(),
            hint: match tls_cause(&error) {
                Some(t) => tls_hint(t, flags),
                None if refused(&error) => {
                    " (nothing listens there: check the host and port, and that the registry runs)"
                        .into()
                }
                None => String::new(),
            },
            error,
        }
    }

    /// What kind of failure this is (retries and dedup branch on it).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Transport { error, .. } if tls_cause(error).is_some() => ErrorKind::Tls,
            Error::Transport { .. } => ErrorKind::Transient,
            Error::Status { status, .. } if is_transient_status(*status) => ErrorKind::Transient,
            Error::Status { .. } | Error::Protocol { .. } | Error::BadJson { .. } => {
                ErrorKind::Protocol
            }
            Error::Unauthorized { .. } => ErrorKind::Auth,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Tls { .. } => ErrorKind::Tls,
            Error::Io { error, .. } => ErrorKind::of_io(error),
            Error::Stream { error, .. } => match ErrorKind::of_io(error) {
                ErrorKind::Io => ErrorKind::Transient,
                k => k,
            },
            Error::Oci(e) => e.kind(),
            Error::Config { .. } => ErrorKind::Invalid,
            Error::Interrupted => ErrorKind::Interrupted,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// Whether the request (or reading its answer) ran out of time: the
    /// registry did not answer within [`ClientOptions::stall_timeout`].
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Transport { error, .. } => error.is_timeout(),
            Error::Stream { error, .. } => timed_out(error),
            _ => false,
        }
    }
}

/// Username and password. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

impl Credentials {
    /// Upstream's `-u user:password` rule: split at the first `:`; credentials are used
    /// only if the user part is non-empty and a colon is present.
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        if u.is_empty() {
            return None;
        }
        Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        })
    }
}

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Plain HTTP for every host (`--plain`).
    pub plain_http: bool,
    /// Skip TLS verification (`--insecure`).
    pub insecure: bool,
    /// Extra root CA PEM files (`--root-ca`).
    pub root_cas: Vec<PathBuf>,
    /// Directories with `*.crt` CAs and `*.cert`/`*.key` client pairs (`--cert-dir`).
    pub cert_dirs: Vec<PathBuf>,
    /// Client certificate and key PEM files (`--client-cert cert:key`).
    pub client_certs: Vec<(PathBuf, PathBuf)>,
    pub credentials: Option<Credentials>,
    /// The tool's flags, as its error hints name them.
    pub flags: FlagNames,
    /// Retries after a transient failure.
    pub retries: u32,
    /// First retry delay; doubles each time.
    pub retry_delay: Duration,
    /// Upload blobs in chunks of this many bytes instead of one PUT.
    pub chunk_size: Option<u64>,
    /// Set to abort transfers in progress.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Without `credentials`, look the host up in Docker's client configuration.
    pub docker_config: bool,
    /// containerd's host configuration directory (`--hosts-dir`, see [`hosts`]).
    pub hosts_dir: Option<PathBuf>,
    /// How long a transfer may go without an end or without progress. A
    /// request (body included) must end within it: it fails as a transient
    /// error (retried), except a blob download, which goes on with a range
    /// request from where it got to (a stalled one gives up after `retries`
    /// such attempts without progress). A streamed upload fails (and is
    /// restarted) when the registry takes none of its body for this long;
    /// once the body is sent, the registry gets [`UPLOAD_COMMIT_TIMEOUT`] to
    /// answer.
    pub stall_timeout: Duration,
}

/// The flags of the tool using the client, named in the hints of its errors (a
/// refused login, a TLS mistake). The defaults are the convertor's and
/// `overlaybd-fuse`'s.
#[derive(Clone, Debug)]
pub struct FlagNames {
    /// What gives `credentials` (`-u`, or e.g. `--dest-creds` for a destination
    /// client).
    pub credentials: &'static str,
    /// What selects plain HTTP.
    pub plain_http: &'static str,
    /// What passes a registry's CA.
    pub tls_ca: &'static str,
    /// What skips TLS verification.
    pub insecure: &'static str,
}

impl Default for FlagNames {
    fn default() -> Self {
        FlagNames {
            credentials: "-u",
            plain_http: "--plain",
            tls_ca: "--root-ca or --cert-dir",
            insecure: "--insecure",
        }
    }
}

/// How long a registry may take to answer once an upload's body is sent (it
/// hashes the blob, and some storage drivers copy it).
pub const UPLOAD_COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// The default [`ClientOptions::stall_timeout`].
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            insecure: false,
            root_cas: vec![],
            cert_dirs: vec![],
            client_certs: vec![],
            credentials: None,
            flags: FlagNames::default(),
            retries: 3,
            retry_delay: Duration::from_millis(500),
            chunk_size: None,
            cancel: None,
            docker_config: false,
            hosts_dir: None,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

/// What a registry's HTTP clients trust and how they connect: system roots + extra
/// CAs, the optional client identity, proxies, `--insecure`.
#[derive(Clone)]
struct HttpConfig {
    roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
    /// Never through a proxy.
    loopback: bool,
    insecure: bool,
    /// [`ClientOptions::stall_timeout`].
    stall: Duration,
}

/// The same settings on either client builder (their types differ, their methods do
/// not).
macro_rules! configure {
    ($b:expr, $cfg:expr) => {{
        let cfg: &HttpConfig = $cfg;
        let mut b = $b
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(30))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!(
                "overlaybd-rs-convertor/",
                env!("CARGO_PKG_VERSION")
            ));
        for c in &cfg.roots {
            b = b.add_root_certificate(c.clone());
        }
        if let Some(id) = &cfg.identity {
            b = b.identity(id.clone());
        }
        if cfg.loopback {
            // HTTP(S)_PROXY is honoured, but never for registries on this machine.
            b = b.no_proxy();
        }
        if cfg.insecure {
            b = b
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        b.build().map_err(|e| Error::Tls {
            what: "cannot build the HTTP client".into(),
            error: Some(e),
        })
    }};
}

/// The blocking client, for every request but streamed uploads. A request,
/// body included, must end within the stall timeout: a silent connection
/// cannot hang the caller. Requests that may rightly take longer say so: a
/// blob download ends at that deadline and resumes where it stopped (see
/// [`ResumingBody`]), upload chunks get [`UPLOAD_COMMIT_TIMEOUT`]. (The
/// blocking client cannot time out single reads: reqwest's read timeout needs
/// a Tokio runtime on the reading thread.)
fn build_http(cfg: &HttpConfig) -> Result<Client> {
    configure!(
        Client::builder()
            .timeout(cfg.stall)
            .pool_max_idle_per_host(32),
        cfg
    )
}

/// The async client that streams blob uploads ([`Repository::put_file`]); it keeps no
/// idle connections, as each upload runs on a runtime of its own. Its stalls are
/// watched by the upload itself (a registry that stops taking data, then one that
/// takes long to commit what it got).
fn build_stream_http(cfg: &HttpConfig) -> Result<reqwest::Client> {
    configure!(
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .read_timeout(UPLOAD_COMMIT_TIMEOUT),
        cfg
    )
}

/// Reads the certificates and the client identity the options name.
fn http_config(opts: &ClientOptions, loopback: bool) -> Result<HttpConfig> {
    let mut roots = Vec::new();
    let mut identity = None;
    let mut ca_files: Vec<PathBuf> = opts.root_cas.clone();
    let mut pairs: Vec<(PathBuf, PathBuf)> = opts.client_certs.clone();
    for dir in &opts.cert_dirs {
        // Like upstream: a missing or unreadable directory is ignored.
        let Ok(rd) = std::fs::read_dir(dir) else {
            tracing::warn!("cert dir {} cannot be read; ignored", dir.display());
            continue;
        };
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            match p.extension().and_then(|e| e.to_str()) {
                Some("crt") => ca_files.push(p),
                Some("cert") => {
                    let key = p.with_extension("key");
                    if key.is_file() {
                        pairs.push((p, key));
                    } else {
                        return Err(Error::Tls {
                            what: format!(
                                "{}: client certificate without matching {}",
                                p.display(),
                                key.display()
                            ),
                            error: None,
                        });
                    }
                }
                _ => {}
            }
        }
    }
    for f in &ca_files {
        let pem = std::fs::read(f).map_err(|error| Error::Io {
            path: f.clone(),
            error,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Tls {
            what: format!("{}: not a PEM certificate", f.display()),
            error: Some(e),
        })?;
        if certs.is_empty() {
            return Err(Error::Tls {
                what: format!("{}: no PEM certificate found", f.display()),
                error: None,
            });
        }
        roots.extend(certs);
    }
    if let Some((cert, key)) = pairs.first() {
        if pairs.len() > 1 {
            tracing::warn!(
                "{} client certificates given; only the first ({}) is used",
                pairs.len(),
                cert.display()
            );
        }
        let mut pem = std::fs::read(cert).map_err(|error| Error::Io {
            path: cert.clone(),
            error,
        })?;
        pem.push(b'\n');
        pem.extend(std::fs::read(key).map_err(|error| Error::Io {
            path: key.clone(),
            error,
        })?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| Error::Tls {
            what: format!(
                "client certificate {} / key {}",
                cert.display(),
                key.display()
            ),
            error: Some(e),
        })?;
        identity = Some(id);
    }
    Ok(HttpConfig {
        roots,
        identity,
        loopback,
        insecure: opts.insecure,
        stall: opts.stall_timeout,
    })
}

/// One registry host: the server, and the mirrors its host configuration lists
/// (`hosts.toml`), each a `Registry` of its own.
pub struct Registry {
    host: String,
    /// `scheme://authority`: relative `Location`s are resolved against it.
    base: String,
    /// The API root: `<base>/v2`, or another path (hosts.toml `override_path`).
    api_root: String,
    http: Client,
    http_config: HttpConfig,
    /// Streams blob uploads; built on the first one (see [`build_stream_http`]).
    http_stream: std::sync::OnceLock<reqwest::Client>,
    auth: auth::Auth,
    opts: ClientOptions,
    /// Extra request headers (hosts.toml `header`).
    headers: Vec<(String, String)>,
    /// What this endpoint serves (hosts.toml `capabilities`).
    can_pull: bool,
    can_resolve: bool,
    /// Tried in order before this one for pulls and tag resolution.
    mirrors: Vec<Arc<Registry>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Registry({})", self.base)
    }
}

impl Registry {
    /// A client for `host` (`name[:port]`). `docker.io` is served by
    /// `registry-1.docker.io`, as in containerd's default configuration. With
    /// `opts.hosts_dir`, the host's `hosts.toml` says where the server is, which
    /// mirrors to try first and how to reach each.
    pub fn new(host: &str, opts: &ClientOptions) -> Result<Arc<Registry>> {
        let config = match &opts.hosts_dir {
            Some(dir) => hosts::load(dir, host, opts.plain_http)?,
            None => None,
        };
        let Some(config) = config else {
            let scheme = if opts.plain_http { "http" } else { "https" };
            let ep = hosts::HostEndpoint::default_for(host, scheme);
            return Self::endpoint(host, &ep, opts, vec![]);
        };
        tracing::debug!("{host}: host configuration {}", config.file.display());
        let mut mirrors = Vec::new();
        for m in config.mirrors.iter().filter(|m| m.pull || m.resolve) {
            mirrors.push(Self::endpoint(&m.authority, m, opts, vec![])?);
        }
        Self::endpoint(host, &config.server, opts, mirrors)
    }

    /// A client for one endpoint; `name` names it in messages and Docker's client
    /// configuration (the registry host for the server, the mirror's own host for a
    /// mirror).
    fn endpoint(
        name: &str,
        ep: &hosts::HostEndpoint,
        opts: &ClientOptions,
        mirrors: Vec<Arc<Registry>>,
    ) -> Result<Arc<Registry>> {
        let mut o = opts.clone();
        o.plain_http = ep.scheme == "http";
        o.insecure |= ep.skip_verify;
        o.root_cas.extend(ep.ca.iter().cloned());
        let mut certs = ep.client.clone();
        certs.extend(opts.client_certs.iter().cloned());
        o.client_certs = certs;
        let authority = ep.authority.as_str();
        let bare = authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.bytes().all(|c| c.is_ascii_digit()) {
                h
            } else {
                authority
            }
        });
        let loopback = bare == "localhost"
            || bare.starts_with("127.")
            || bare == "[::1]"
            || bare.ends_with(".localhost");
        let http_config = http_config(&o, loopback)?;
        let http = build_http(&http_config)?;
        let base = format!("{}://{authority}", ep.scheme);
        Ok(Arc::new(Registry {
            host: name.to_string(),
            api_root: format!("{base}{}", ep.api_path),
            base,
            http,
            http_config,
            http_stream: std::sync::OnceLock::new(),
            auth: auth::Auth::new(
                name,
                opts.cancel.clone(),
                opts.flags.clone(),
                opts.credentials.clone().or_else(|| {
                    opts.docker_config
                        .then(|| dockercfg::lookup(name))
                        .flatten()
                }),
            ),
            opts: o,
            headers: ep.headers.clone(),
            can_pull: ep.pull,
            can_resolve: ep.resolve,
            mirrors,
        }))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn repository(self: &Arc<Self>, name: &str) -> Repository {
        Repository {
            reg: self.clone(),
            name: name.to_string(),
        }
    }

    /// The run's cancel flag, if any.
    fn cancel_flag(&self) -> Option<&AtomicBool> {
        self.opts.cancel.as_deref()
    }

    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// How long to wait before retry number `attempt` (from 0): the first
    /// delay, doubled each time.
    fn backoff(&self, attempt: u32) -> Duration {
        self.opts.retry_delay * 2u32.saturating_pow(attempt)
    }

    /// Sleep for `d` (a retry's delay), or until the run is cancelled.
    fn pause(&self, d: Duration) {
        pause(d, self.opts.cancel.as_deref())
    }

    /// An API URL: `path` below the API root (`/<repo>/manifests/...`).
    fn api(&self, path: &str) -> String {
        format!("{}{path}", self.api_root)
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    /// Send a request with auth, re-authenticating once on 401 and retrying transient
    /// failures when `retry` is set. `build` is called once per attempt.
    fn send(
        &self,
        what: &str,
        scope: &str,
        retry: bool,
        build: &dyn Fn(&Client) -> RequestBuilder,
    ) -> Result<Response> {
        let mut attempt = 0u32;
        let mut reauthed = false;
        loop {
            if self.cancelled() {
                return Err(Error::Interrupted);
            }
            let mut rb = build(&self.http);
            for (k, v) in &self.headers {
                rb = rb.header(k.as_str(), v.as_str());
            }
            let delay = self.backoff(attempt);
            // A token request (to a token server that may be another host) that
            // fails transiently is retried like the request it is for.
            let sent = match self.auth.header_for(&self.http, scope) {
                Ok(sent) => sent,
                Err(e) if self.retries_after(retry, attempt, &e) => {
                    self.pause_to_retry(&e, delay);
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(h) = &sent {
                rb = rb.header(AUTHORIZATION, h);
            }
            let res = send_cancellable(&self.host, rb, self.opts.cancel.as_deref())?;
            match res {
                Err(source) => {
                    let e = Error::transport(&self.host, what, source, &self.opts.flags);
                    if self.retries_after(retry, attempt, &e) {
                        self.pause_to_retry(&e, delay);
                        attempt += 1;
                        continue;
                    }
                    return Err(e);
                }
                Ok(resp) => {
                    let st = resp.status().as_u16();
                    if st == 401 && !reauthed {
                        reauthed = true;
                        match self.reauth(resp.headers(), scope, sent.as_deref()) {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(e) if self.retries_after(retry, attempt, &e) => {
                                self.pause_to_retry(&e, delay);
                                attempt += 1;
                                // The retry is challenged again: answer it.
                                reauthed = false;
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if st == 401 {
                        let detail = error_detail(resp, self.opts.cancel.as_deref());
                        return Err(Error::Unauthorized {
                            peer: self.host.clone(),
                            what: what.to_string(),
                            detail: if !self.auth.has_credentials() {
                                format!(
                                    "{detail} (no credentials given; use {} user:password)",
                                    self.opts.flags.credentials
                                )
                            } else if self.opts.credentials.is_none() {
                                format!(
                                    "{detail} (check the credentials for {} in the Docker configuration, or give {} user:password)",
                                    self.host, self.opts.flags.credentials
                                )
                            } else {
                                format!(
                                    "{detail} (check the {} user:password)",
                                    self.opts.flags.credentials
                                )
                            },
                        });
                    }
                    if is_transient_status(st)
                        && retry
                        && attempt < self.opts.retries
                        && !self.cancelled()
                    {
                        // A registry that says when to come back (429 and 503
                        // answers may) is asked again no sooner, up to the stall
                        // timeout; the back-off's delay if it is longer.
                        let delay = match header_str(resp.headers(), "retry-after")
                            .and_then(|v| retry_after(v, SystemTime::now()))
                        {
                            Some(wait) => delay.max(wait.min(self.opts.stall_timeout)),
                            None => delay,
                        };
                        tracing::warn!(
                            "{}: {what}: HTTP {st}; retrying in {:.1} s",
                            self.host,
                            delay.as_secs_f64()
                        );
                        self.pause(delay);
                        attempt += 1;
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Whether a request that `retry`s, failed with `e` at attempt `attempt`
    /// (its own failure, its token request's or its answer's), is tried again:
    /// a transient failure, retries left, the conversion not cancelled.
    fn retries_after(&self, retry: bool, attempt: u32, e: &Error) -> bool {
        retry
            && attempt < self.opts.retries
            && !self.cancelled()
            && e.kind() == ErrorKind::Transient
    }

    /// Says that `e` is retried after `delay`, and waits that long (less if the
    /// run is cancelled).
    fn pause_to_retry(&self, e: &Error, delay: Duration) {
        tracing::warn!("{}; retrying in {:.1} s", Chain(e), delay.as_secs_f64());
        self.pause(delay);
    }

    /// After a 401 carrying `headers` (to a request that sent `sent`): whether new
    /// credentials for `scope` were obtained from its challenge, so that the request is
    /// worth one more try.
    fn reauth(
        &self,
        headers: &reqwest::header::HeaderMap,
        scope: &str,
        sent: Option<&str>,
    ) -> Result<bool> {
        let challenge = headers
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        self.auth.on_challenge(&self.http, &challenge, scope, sent)
    }

    /// The client that streams uploads (built on first use).
    fn stream_client(&self) -> Result<&reqwest::Client> {
        if let Some(c) = self.http_stream.get() {
            return Ok(c);
        }
        let c = build_stream_http(&self.http_config)?;
        Ok(self.http_stream.get_or_init(|| c))
    }

    fn status_error(&self, what: &str, resp: Response) -> Error {
        let st = resp.status().as_u16();
        let detail = error_detail(resp, self.opts.cancel.as_deref());
        self.status_error_of(what, st, detail)
    }

    /// The error for an unexpected HTTP status `st` (`detail`: see [`error_detail`]).
    fn status_error_of(&self, what: &str, st: u16, detail: String) -> Error {
        match st {
            404 => Error::NotFound {
                peer: self.host.clone(),
                what: what.to_string(),
                detail,
            },
            401 | 403 => Error::Unauthorized {
                peer: self.host.clone(),
                what: what.to_string(),
                detail: format!(" (HTTP {st}){detail}"),
            },
            _ => Error::Status {
                peer: self.host.clone(),
                what: what.to_string(),
                status: st,
                detail,
            },
        }
    }
}

/// `": CODE: message"` from a distribution error body, if there is one.
fn error_detail(resp: Response, cancel: Option<&AtomicBool>) -> String {
    error_detail_of(&read_error_body(resp, cancel))
}

/// The start of an error response's body (enough for any distribution error list);
/// nothing once `cancel` is set (the read is not waited for, see [`cancellable`]).
fn read_error_body(resp: Response, cancel: Option<&AtomicBool>) -> Vec<u8> {
    cancellable("", "error body", cancel, move || {
        let mut buf = Vec::new();
        let _ = resp.take(64 << 10).read_to_end(&mut buf);
        buf
    })
    .unwrap_or_default()
}

#[derive(serde::Deserialize)]
struct ErrorEntry {
    code: Option<String>,
    message: Option<String>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorEntry>,
}

/// The error codes (`MANIFEST_BLOB_UNKNOWN`, ...) of a distribution error body.
fn error_codes(buf: &[u8]) -> impl Iterator<Item = String> {
    serde_json::from_slice::<ErrorBody>(buf)
        .map(|b| b.errors)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.code)
}

/// [`error_detail`] of a response body already read.
fn error_detail_of(buf: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(buf) {
        Ok(b) if !b.errors.is_empty() => b
            .errors
            .iter()
            .map(|e| {
                format!(
                    ": {}: {}",
                    e.code.as_deref().unwrap_or("?"),
                    e.message.as_deref().unwrap_or("")
                )
            })
            .collect(),
        _ => String::new(),
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Where an upload's data comes from. Sources can be re-read for retries.
#[derive(Clone, Copy, Debug)]
pub enum BlobSource<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// What a `HEAD` of a blob found ([`Repository::blob_stat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobStat {
    /// The registry answered 404.
    Missing,
    /// The blob is there; `size` is the answer's `Content-Length`, when it has one (a
    /// length of 0 counts only for the empty blob: a proxy or CDN may answer any `HEAD`
    /// with `Content-Length: 0`).
    Present { size: Option<u64> },
}

/// What a blob push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Existed,
    Mounted,
    Uploaded,
}

/// Byte counter for transfers (absolute position within the current attempt).
pub type ProgressFn = Arc<dyn Fn(u64) + Send + Sync>;

/// A repository in a registry.
#[derive(Clone, Debug)]
pub struct Repository {
    reg: Arc<Registry>,
    name: String,
}

impl Repository {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.reg
    }

    fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.name)
    }

    fn push_scope(&self) -> String {
        format!("repository:{}:pull,push", self.name)
    }

    /// This repository on another endpoint (a mirror).
    fn on(&self, reg: &Arc<Registry>) -> Repository {
        Repository {
            reg: reg.clone(),
            name: self.name.clone(),
        }
    }

    /// Run a pull operation on the mirrors able to serve it (`able`), in order, then on
    /// the server; the first success wins. A mirror's failure is logged and the next
    /// endpoint tried; the server's (or, when it cannot serve it, the last mirror's)
    /// failure is returned.
    fn pulled<T>(
        &self,
        able: impl Fn(&Registry) -> bool,
        op: impl Fn(&Repository) -> Result<T>,
    ) -> Result<T> {
        let mut last = None;
        for m in self.reg.mirrors.iter().filter(|m| able(m)) {
            match op(&self.on(m)) {
                Ok(v) => return Ok(v),
                Err(Error::Interrupted) => return Err(Error::Interrupted),
                Err(e) => {
                    tracing::warn!("mirror {}: {}; trying the next host", m.host, Chain(&e));
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) if !able(&self.reg) => Err(e),
            _ => op(self),
        }
    }

    /// Fetch a manifest or index by tag or digest, with its descriptor. The bytes are
    /// verified against the digest (the requested one, or `Docker-Content-Digest`).
    /// Mirrors of the host configuration are tried first (`resolve` capability for a
    /// tag, `pull` for a digest).
    pub fn get_manifest(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        let by_tag = matches!(r, Reference::Tag(_));
        self.pulled(
            |reg| {
                if by_tag {
                    reg.can_resolve
                } else {
                    reg.can_pull
                }
            },
            |repo| repo.get_manifest_here(r),
        )
    }

    fn get_manifest_here(&self, r: &Reference) -> Result<(Descriptor, Vec<u8>)> {
        let what = format!("manifest {}", ref_name(&self.name, r));
        let url = self.reg.api(&format!("/{}/manifests/{r}", self.name));
        let accept = model::MANIFEST_ACCEPT.join(", ");
        let mut attempt = 0u32;
        let (hdr_digest, ctype, bytes) = loop {
            let resp = self.reg.send(&what, &self.pull_scope(), true, &|c| {
                c.get(&url).header(ACCEPT, &accept)
            })?;
            if !resp.status().is_success() {
                return Err(self.reg.status_error(&what, resp));
            }
            let hdr_digest = header_str(resp.headers(), "docker-content-digest").map(String::from);
            let ctype = header_str(resp.headers(), CONTENT_TYPE.as_str())
                .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
                .unwrap_or_default();
            if let Some(len) = resp.content_length() {
                if len > model::MAX_MANIFEST_SIZE {
                    return Err(oci::Error::TooLarge {
                        what: format!("{}: {what}", self.reg.host),
                        size: len,
                        limit: model::MAX_MANIFEST_SIZE,
                    }
                    .into());
                }
            }
            let read = cancellable(&self.reg.host, &what, self.reg.cancel_flag(), move || {
                let mut bytes = Vec::new();
                resp.take(model::MAX_MANIFEST_SIZE + 1)
                    .read_to_end(&mut bytes)
                    .map(|_| bytes)
            })?;
            match read {
                Ok(bytes) => break (hdr_digest, ctype, bytes),
                Err(error) => {
                    let e = Error::Stream {
                        peer: self.reg.host.clone(),
                        what: what.clone(),
                        error,
                    };
                    // An answer that breaks off (or stalls) is asked for again,
                    // as a request that fails before its answer is.
                    if self.reg.retries_after(true, attempt, &e) {
                        self.reg.pause_to_retry(&e, self.reg.backoff(attempt));
                        attempt += 1;
                        continue;
                    }
                    return Err(e);
                }
            }
        };
        if bytes.len() as u64 > model::MAX_MANIFEST_SIZE {
            return Err(oci::Error::TooLarge {
                what: format!("{}: {what}", self.reg.host),
                size: bytes.len() as u64,
                limit: model::MAX_MANIFEST_SIZE,
            }
            .into());
        }
        let actual = Digest::of(&bytes);
        let expected = match r {
            Reference::Digest(d) => Some(d.to_string()),
            Reference::Tag(_) => hdr_digest,
        };
        if let Some(exp) = expected {
            if exp != actual.as_str() {
                return Err(oci::Error::DigestMismatch {
                    what: format!("{}: {what}", self.reg.host),
                    expected: exp,
                    actual: actual.to_string(),
                }
                .into());
            }
        }
        let media_type = match model::sniff_media_type(&bytes) {
            Some(mt) => mt,
            None if !ctype.is_empty() && ctype != "application/json" => ctype,
            None => {
                return Err(Error::Protocol {
                    peer: self.reg.host.clone(),
                    what,
                    reason: "response is not a manifest or index".into(),
                })
            }
        };
        let size = bytes.len() as u64;
        Ok((Descriptor::new(media_type, actual, size), bytes))
    }

    /// Whether a manifest exists (HEAD); returns its digest if the registry says.
    pub fn manifest_exists(&self, r: &Reference) -> Result<Option<Option<Digest>>> {
        let what = format!("manifest {}", ref_name(&self.name, r));
        let url = self.reg.api(&format!("/{}/manifests/{r}", self.name));
        let accept = model::MANIFEST_ACCEPT.join(", ");
        let resp = self.reg.send(&what, &self.pull_scope(), true, &|c| {
            c.head(&url).header(ACCEPT, &accept)
        })?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                header_str(resp.headers(), "docker-content-digest").and_then(|d| d.parse().ok()),
            )),
            404 => Ok(None),
            _ => Err(self.reg.status_error(&what, resp)),
        }
    }

    /// Push a manifest or index under a tag or its digest. Returns its digest.
    pub fn put_manifest(&self, r: &Reference, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let what = format!("push manifest {}", ref_name(&self.name, r));
        let url = self.reg.api(&format!("/{}/manifests/{r}", self.name));
        let digest = Digest::of(bytes);
        let mut attempt = 0u32;
        let resp = loop {
            let resp = self.reg.send(&what, &self.push_scope(), true, &|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.to_vec())
            })?;
            let st = resp.status().as_u16();
            if resp.status().is_success() {
                break resp;
            }
            let body = read_error_body(resp, self.reg.opts.cancel.as_deref());
            // A registry may not see a blob it has just taken: distribution's
            // filesystem storage rewrites a repository's link to a blob in place
            // (truncate, then write) whenever the blob is pushed again, so a
            // manifest put that races another client's push of the same blob
            // finds the link empty. Eventually consistent storage does the
            // same. Blobs that are really missing fail once the retries are used.
            if st == 400
                && error_codes(&body).any(|c| c == "MANIFEST_BLOB_UNKNOWN")
                && attempt < self.reg.opts.retries
                && !self.reg.cancelled()
            {
                let delay = self.reg.backoff(attempt);
                tracing::warn!(
                    "{}: {what}: the registry does not see a blob the manifest names{}; retrying in {:.1} s",
                    self.reg.host,
                    error_detail_of(&body),
                    delay.as_secs_f64()
                );
                self.reg.pause(delay);
                attempt += 1;
                continue;
            }
            return Err(self.reg.status_error_of(&what, st, error_detail_of(&body)));
        };
        if let Some(d) = header_str(resp.headers(), "docker-content-digest") {
            if d != digest.as_str() {
                return Err(Error::Protocol {
                    peer: self.reg.host.clone(),
                    what,
                    reason: format!("registry stored digest {d}, expected {digest}"),
                });
            }
        }
        Ok(digest)
    }

    /// Checks, before any work, that the registry answers and takes our credentials for
    /// a push to this repository: one `HEAD` of a blob (the empty one) with the push
    /// scope, the request every blob push starts with, through the same auth handshake
    /// (a token obtained here is cached for the pushes). Nothing in the registry changes;
    /// whether the blob is there does not matter. Transient failures are retried as
    /// for any request.
    pub fn check_push_access(&self) -> Result<()> {
        let what = format!("checking push access to {}", self.name);
        let url = self.blob_url(&Digest::of(b""));
        let resp = self
            .reg
            .send(&what, &self.push_scope(), true, &|c| c.head(&url))?;
        match resp.status().as_u16() {
            200 | 404 => Ok(()),
            _ => Err(self.reg.status_error(&what, resp)),
        }
    }

    /// Whether a blob exists (HEAD).
    pub fn blob_exists(&self, d: &Digest) -> Result<bool> {
        self.blob_exists_scoped(d, &self.pull_scope())
    }

    /// Whether a blob exists and, if the registry says, its size: the same `HEAD` as
    /// [`Repository::blob_exists`].
    pub fn blob_stat(&self, d: &Digest) -> Result<BlobStat> {
        self.blob_stat_scoped(d, &self.pull_scope())
    }

    fn blob_exists_scoped(&self, d: &Digest, scope: &str) -> Result<bool> {
        Ok(self.blob_stat_scoped(d, scope)? != BlobStat::Missing)
    }

    /// The URL of blob `d` in this repository, under the registry's API root.
    fn blob_url(&self, d: &Digest) -> String {
        self.reg.api(&format!("/{}/blobs/{d}", self.name))
    }

    /// The one `HEAD` of a blob, for every caller (see [`BlobStat`]): a 404 is
    /// [`BlobStat::Missing`], another answer than 200 an error.
    fn blob_stat_scoped(&self, d: &Digest, scope: &str) -> Result<BlobStat> {
        let what = format!("blob {}@{d}", self.name);
        let url = self.blob_url(d);
        let resp = self.reg.send(&what, scope, true, &|c| c.head(&url))?;
        match resp.status().as_u16() {
            200 => Ok(BlobStat::Present {
                size: header_str(resp.headers(), CONTENT_LENGTH.as_str())
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0 || *d == Digest::of(b"")),
            }),
            404 => Ok(BlobStat::Missing),
            _ => Err(self.reg.status_error(&what, resp)),
        }
    }

    fn get_blob_response(&self, desc: &Descriptor, offset: u64) -> Result<Response> {
        self.pulled(
            |reg| reg.can_pull,
            |repo| repo.get_blob_response_here(desc, offset),
        )
    }

    fn get_blob_response_here(&self, desc: &Descriptor, offset: u64) -> Result<Response> {
        let what = format!("blob {}@{}", self.name, desc.digest);
        let url = self.blob_url(&desc.digest);
        let resp = self.reg.send(&what, &self.pull_scope(), true, &|c| {
            let rb = c.get(&url);
            if offset > 0 {
                rb.header(reqwest::header::RANGE, format!("bytes={offset}-"))
            } else {
                rb
            }
        })?;
        let st = resp.status().as_u16();
        if offset > 0 && st == 200 {
            // A server (or proxy) that ignores Range sends the whole blob again:
            // skip what was already read, as containerd's fetcher does.
            tracing::warn!(
                "{}: {what}: the resume at byte {offset} was answered with the whole blob (Range ignored); skipping {offset} bytes",
                self.reg.host
            );
            let (resp, skipped) =
                cancellable(&self.reg.host, &what, self.reg.cancel_flag(), move || {
                    let mut resp = resp;
                    let skipped = io::copy(&mut (&mut resp).take(offset), &mut io::sink());
                    (resp, skipped)
                })?;
            let skipped = skipped.map_err(|error| Error::Stream {
                peer: self.reg.host.clone(),
                what: what.clone(),
                error,
            })?;
            if skipped != offset {
                return Err(Error::Protocol {
                    peer: self.reg.host.clone(),
                    what,
                    reason: format!(
                        "cannot resume at byte {offset}: the whole blob sent again ended after {skipped} bytes"
                    ),
                });
            }
            return Ok(resp);
        }
        if offset > 0 && st != 206 && resp.status().is_success() {
            return Err(Error::Protocol {
                peer: self.reg.host.clone(),
                what,
                reason: format!("cannot resume at byte {offset}: HTTP {st} instead of 206"),
            });
        }
        if !resp.status().is_success() {
            return Err(self.reg.status_error(&what, resp));
        }
        Ok(resp)
    }

    /// The size of blob `d`: [`Repository::blob_stat`]'s `HEAD`, where a missing blob
    /// is an [`Error::NotFound`] and an answer without a usable `Content-Length` (none,
    /// or 0 for a blob that is not the empty one) an [`Error::Protocol`].
    pub fn blob_size(&self, d: &Digest) -> Result<u64> {
        let what = || format!("blob {}@{d}", self.name);
        match self.blob_stat(d)? {
            BlobStat::Present { size: Some(n) } => Ok(n),
            BlobStat::Present { size: None } => Err(Error::Protocol {
                peer: self.reg.host.clone(),
                what: what(),
                reason: "HEAD answer without a Content-Length giving its size".into(),
            }),
            // A HEAD answer has no body to give details.
            BlobStat::Missing => Err(self.reg.status_error_of(&what(), 404, String::new())),
        }
    }

    /// Fill `buf` with the bytes of blob `d` from `offset`, with one range request
    /// (`Range: bytes=offset-end`, 206 expected; a 200 is taken only for a range that
    /// starts at 0). Connection failures and 5xx answers are retried as for every
    /// request; a body that breaks off is an [`Error::Stream`] (transient: the caller
    /// may ask again). `timeout` bounds the whole request, body included.
    pub fn read_blob_range(
        &self,
        d: &Digest,
        offset: u64,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64 - 1;
        let what = format!("blob {}@{d} bytes {offset}-{end}", self.name);
        let url = self.blob_url(d);
        let resp = self.reg.send(&what, &self.pull_scope(), true, &|c| {
            let rb = c
                .get(&url)
                .header(reqwest::header::RANGE, format!("bytes={offset}-{end}"));
            match timeout {
                Some(t) => rb.timeout(t),
                None => rb,
            }
        })?;
        match resp.status().as_u16() {
            206 => {
                // The bytes must be those asked for: a server or proxy answering
                // another part of the blob would have them taken for these.
                let got = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if content_range(got.as_deref()) != Some((offset, end)) {
                    return Err(Error::Protocol {
                        peer: self.reg.host.clone(),
                        what,
                        reason: format!(
                            "the answer's Content-Range is {}, not bytes {offset}-{end}",
                            got.as_deref()
                                .map_or("missing".into(), |g| format!("{g:?}"))
                        ),
                    });
                }
            }
            200 if offset == 0 => {}
            200 => {
                return Err(Error::Protocol {
                    peer: self.reg.host.clone(),
                    what,
                    reason: "the registry ignores Range requests (HTTP 200 instead of 206)".into(),
                })
            }
            _ => return Err(self.reg.status_error(&what, resp)),
        }
        let body = resp.take(buf.len() as u64);
        let read = match self.reg.cancel_flag() {
            None => fill(body, buf),
            // On a thread of its own (see `cancellable`): into a buffer it owns.
            Some(cancel) => {
                let len = buf.len();
                let (got, read) = cancellable(&self.reg.host, &what, Some(cancel), move || {
                    let mut got = vec![0u8; len];
                    let read = fill(body, &mut got);
                    (got, read)
                })?;
                buf.copy_from_slice(&got);
                read
            }
        };
        read.map_err(|error| Error::Stream {
            peer: self.reg.host.clone(),
            what,
            error,
        })
    }

    /// The error of a read from one of our streams: the client or OCI error it carries
    /// (a failed resume, a digest mismatch), else a stream error of `what`.
    fn stream_error(&self, what: String, e: io::Error) -> Error {
        let e = match take_inner::<Error>(e) {
            Ok(mine) => return mine,
            Err(e) => e,
        };
        match take_inner::<oci::Error>(e) {
            Ok(o) => Error::Oci(o),
            Err(error) => Error::Stream {
                peer: self.reg.host.clone(),
                what,
                error,
            },
        }
    }

    /// Stream a blob. The reader verifies size and digest at its end and resumes with a
    /// range request if the connection breaks.
    pub fn open_blob(&self, desc: &Descriptor) -> Result<BlobReader> {
        let resp = self.get_blob_response(desc, 0)?;
        let body = ResumingBody {
            repo: self.clone(),
            desc: desc.clone(),
            resp: Some(resp),
            pos: 0,
            pos_at_request: 0,
            resumes_left: self.reg.opts.retries,
        };
        let what = format!("{}: blob {}@{}", self.reg.host, self.name, desc.digest);
        Ok(BlobReader(VerifyReader::new(
            body,
            desc.digest.clone(),
            desc.size,
            what,
        )))
    }

    /// Read a whole small blob (e.g. a config), verified.
    pub fn read_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>> {
        if desc.size > limit {
            return Err(oci::Error::TooLarge {
                what: format!("{}: blob {}@{}", self.reg.host, self.name, desc.digest),
                size: desc.size,
                limit,
            }
            .into());
        }
        let mut r = self.open_blob(desc)?;
        let size = desc.size as usize;
        let what = format!("blob {}@{}", self.name, desc.digest);
        cancellable(&self.reg.host, &what, self.reg.cancel_flag(), move || {
            let mut out = Vec::with_capacity(size);
            r.read_to_end(&mut out).map(|_| out)
        })?
        .map_err(|e| self.stream_error(what, e))
    }

    /// Try a cross-repository mount of `desc` from `from`. Returns true if mounted (or
    /// already present). A 202 (the registry would rather take an upload) is cancelled.
    pub fn mount_blob(&self, desc: &Descriptor, from: &str) -> Result<bool> {
        if self.blob_exists_scoped(&desc.digest, &self.push_scope())? {
            return Ok(true);
        }
        let scope = format!("{} repository:{from}:pull", self.push_scope());
        let what = format!("mount blob {} from {from} into {}", desc.digest, self.name);
        let url = self.reg.api(&format!("/{}/blobs/uploads/", self.name));
        let q = [("mount", desc.digest.as_str()), ("from", from)];
        let resp = self
            .reg
            .send(&what, &scope, true, &|c| c.post(&url).query(&q))?;
        match resp.status().as_u16() {
            201 => Ok(true),
            202 => {
                // Not mounted; close the upload session we were given (defect 10 upstream).
                if let Some(loc) = header_str(resp.headers(), "location") {
                    let u = self.reg.url(loc);
                    let _ = self
                        .reg
                        .send(&what, &self.push_scope(), false, &|c| c.delete(&u));
                }
                Ok(false)
            }
            _ => Err(self.reg.status_error(&what, resp)),
        }
    }

    /// Push a blob unless the registry has it. `mount_from` tries a cross-repo mount
    /// first. Whole uploads are retried on transient failure.
    pub fn push_blob(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        mount_from: Option<&str>,
        progress: Option<ProgressFn>,
    ) -> Result<PushOutcome> {
        if self.blob_exists_scoped(&desc.digest, &self.push_scope())? {
            return Ok(PushOutcome::Existed);
        }
        if let Some(from) = mount_from {
            if self.mount_blob(desc, from)? {
                return Ok(PushOutcome::Mounted);
            }
        }
        let mut attempt = 0;
        loop {
            match self.upload_once(desc, src, progress.clone()) {
                Ok(()) => return Ok(PushOutcome::Uploaded),
                Err(e) if self.reg.retries_after(true, attempt, &e) => {
                    let delay = self.reg.backoff(attempt);
                    tracing::warn!(
                        "{}; restarting the upload in {:.1} s",
                        Chain(&e),
                        delay.as_secs_f64()
                    );
                    self.reg.pause(delay);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_upload(&self, what: &str) -> Result<String> {
        let url = self.reg.api(&format!("/{}/blobs/uploads/", self.name));
        let resp = self
            .reg
            .send(what, &self.push_scope(), true, &|c| c.post(&url))?;
        if resp.status().as_u16() != 202 {
            return Err(self.reg.status_error(what, resp));
        }
        location(&self.reg, what, &resp)
    }

    fn upload_once(
        &self,
        desc: &Descriptor,
        src: BlobSource<'_>,
        progress: Option<ProgressFn>,
    ) -> Result<()> {
        let what = format!("upload blob {} to {}", desc.digest, self.name);
        if let BlobSource::File(p) = src {
            let len = std::fs::metadata(p)
                .map_err(|error| Error::Io {
                    path: p.to_path_buf(),
                    error,
                })?
                .len();
            if len != desc.size {
                return Err(Error::Io {
                    path: p.to_path_buf(),
                    error: io::Error::other(format!(
                        "file is {len} bytes, descriptor says {}",
                        desc.size
                    )),
                });
            }
        }
        let mut loc = self.start_upload(&what)?;
        let final_resp = match (self.reg.opts.chunk_size, src) {
            (None, BlobSource::File(p)) => {
                let url = with_query(&self.reg.url(&loc), "digest", desc.digest.as_str());
                let headers = self.put_file(&what, &url, p, desc.size, progress)?;
                return self.check_pushed(what, desc, &headers);
            }
            (None, BlobSource::Bytes(b)) => {
                let url = with_query(&self.reg.url(&loc), "digest", desc.digest.as_str());
                self.reg.send(&what, &self.push_scope(), false, &|c| {
                    c.put(&url)
                        .timeout(UPLOAD_COMMIT_TIMEOUT)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .body(b.to_vec())
                })?
            }
            (Some(chunk), src) => {
                // Each chunk is a PATCH streamed as put_file streams a whole blob:
                // cancelled at once, failed when the registry stops taking it.
                let total = match src {
                    BlobSource::Bytes(b) => b.len() as u64,
                    BlobSource::File(_) => desc.size,
                };
                let path = match src {
                    BlobSource::File(p) => p.to_path_buf(),
                    BlobSource::Bytes(_) => PathBuf::from(format!("blob {}", desc.digest)),
                };
                let mut offset = 0u64;
                while offset < total {
                    let len = chunk.max(1).min(total - offset);
                    let open = || -> io::Result<Box<dyn Read + Send>> {
                        Ok(match src {
                            BlobSource::Bytes(b) => Box::new(io::Cursor::new(
                                b[offset as usize..(offset + len) as usize].to_vec(),
                            )),
                            BlobSource::File(p) => {
                                let mut f = File::open(p)?;
                                f.seek(io::SeekFrom::Start(offset))?;
                                Box::new(f.take(len))
                            }
                        })
                    };
                    let body = StreamedBody {
                        open: &open,
                        size: len,
                        base: offset,
                        progress: progress.clone(),
                    };
                    let end = offset + len - 1;
                    let url = self.reg.url(&loc);
                    let (st, headers) = self.send_streamed(
                        &what,
                        reqwest::Method::PATCH,
                        &url,
                        &[("Content-Range", format!("{offset}-{end}"))],
                        body,
                        &path,
                    )?;
                    if st != 202 {
                        return Err(self.reg.status_error_of(&what, st, String::new()));
                    }
                    loc = location_of(&self.reg, &what, &headers)?;
                    offset = end + 1;
                }
                let url = with_query(&self.reg.url(&loc), "digest", desc.digest.as_str());
                let none = || -> io::Result<Box<dyn Read + Send>> { Ok(Box::new(io::empty())) };
                let body = StreamedBody {
                    open: &none,
                    size: 0,
                    base: total,
                    progress: None,
                };
                let (_, headers) =
                    self.send_streamed(&what, reqwest::Method::PUT, &url, &[], body, &path)?;
                return self.check_pushed(what, desc, &headers);
            }
        };
        if !final_resp.status().is_success() {
            return Err(self.reg.status_error(&what, final_resp));
        }
        self.check_pushed(what, desc, final_resp.headers())
    }

    /// The end of an upload that succeeded (`headers`: of its 2xx reply): the registry
    /// must have stored the digest we sent.
    fn check_pushed(
        &self,
        what: String,
        desc: &Descriptor,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<()> {
        match header_str(headers, "docker-content-digest") {
            Some(d) if d != desc.digest.as_str() => Err(Error::Protocol {
                peer: self.reg.host.clone(),
                what,
                reason: format!("registry stored digest {d}, expected {}", desc.digest),
            }),
            _ => Ok(()),
        }
    }

    /// PUT the file at `path` (`size` bytes) to `url` as one request (see
    /// [`Repository::send_streamed`]).
    fn put_file(
        &self,
        what: &str,
        url: &str,
        path: &Path,
        size: u64,
        progress: Option<ProgressFn>,
    ) -> Result<reqwest::header::HeaderMap> {
        let open = || -> io::Result<Box<dyn Read + Send>> { Ok(Box::new(File::open(path)?)) };
        let body = StreamedBody {
            open: &open,
            size,
            base: 0,
            progress,
        };
        let (_, headers) = self.send_streamed(what, reqwest::Method::PUT, url, &[], body, path)?;
        Ok(headers)
    }

    /// Sends `body` to `url` with `method` (and the `extra` headers) as one request,
    /// the body streamed in 1 MiB pieces by the async client on this thread. (The
    /// blocking client hands a reader body to its runtime thread 8 KiB at a time, each
    /// piece a thread wake-up and a small socket write: about 0.5 CPU-s per 200 MB on
    /// this project's 2-core machines.) The request fails as soon as the conversion is
    /// cancelled, or when the registry takes none of the body for the stall timeout;
    /// once the body is sent, the registry has [`UPLOAD_COMMIT_TIMEOUT`] to answer.
    /// Authenticates as [`Registry::send`] does; returns the status and headers of the
    /// 2xx reply, else the error (`path`: what read errors of the body name).
    fn send_streamed(
        &self,
        what: &str,
        method: reqwest::Method,
        url: &str,
        extra: &[(&str, String)],
        body: StreamedBody<'_>,
        path: &Path,
    ) -> Result<(u16, reqwest::header::HeaderMap)> {
        let reg = &self.reg;
        let scope = self.push_scope();
        let io_err = |error: io::Error| Error::Io {
            path: path.to_path_buf(),
            error,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err)?;
        let mut reauthed = false;
        loop {
            if reg.cancelled() {
                return Err(Error::Interrupted);
            }
            let moved = Arc::new(Progressed::default());
            // An empty body is never polled (the client sends none): the answer
            // is all there is to wait for.
            moved.done.store(body.size == 0, Ordering::Relaxed);
            let chunks = FileChunks {
                src: (body.open)().map_err(io_err)?,
                pos: 0,
                base: body.base,
                progress: body.progress.clone(),
                cancel: reg.opts.cancel.clone(),
                moved: moved.clone(),
                size: body.size,
            };
            let mut rb = reg
                .stream_client()?
                .request(method.clone(), url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, body.size)
                .body(reqwest::Body::wrap_stream(chunks.into_stream()));
            for (k, v) in extra {
                rb = rb.header(*k, v.as_str());
            }
            for (k, v) in &reg.headers {
                rb = rb.header(k.as_str(), v.as_str());
            }
            let sent = reg.auth.header_for(&reg.http, &scope)?;
            if let Some(h) = &sent {
                rb = rb.header(AUTHORIZATION, h);
            }
            let exchange = async {
                let resp = rb.send().await?;
                let st = resp.status().as_u16();
                let headers = resp.headers().clone();
                let body = if (200..300).contains(&st) {
                    Default::default()
                } else {
                    resp.bytes().await.unwrap_or_default()
                };
                Ok::<_, reqwest::Error>((st, headers, body))
            };
            let watch = watch_upload(&moved, reg.opts.cancel.as_deref(), reg.opts.stall_timeout);
            let (st, headers, body) = match rt.block_on(futures_util::future::select(
                std::pin::pin!(exchange),
                std::pin::pin!(watch),
            )) {
                futures_util::future::Either::Left((r, _)) => {
                    r.map_err(|e| Error::transport(&reg.host, what, e, &reg.opts.flags))?
                }
                futures_util::future::Either::Right((stop, _)) => {
                    return Err(match stop {
                        UploadStop::Cancelled => Error::Interrupted,
                        UploadStop::Stalled(secs) => Error::Stream {
                            peer: reg.host.clone(),
                            what: what.to_string(),
                            error: io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("the registry took no data for {secs:.0} s"),
                            ),
                        },
                    })
                }
            };
            if st == 401 && !reauthed {
                reauthed = true;
                if reg.reauth(&headers, &scope, sent.as_deref())? {
                    continue;
                }
            }
            if !(200..300).contains(&st) {
                let n = body.len().min(64 << 10);
                return Err(reg.status_error_of(what, st, error_detail_of(&body[..n])));
            }
            return Ok((st, headers));
        }
    }
}

/// The body of [`Repository::send_streamed`]: `size` bytes from a reader `open`
/// makes (again for a retry); `progress` gets `base` plus the bytes sent.
struct StreamedBody<'a> {
    open: &'a dyn Fn() -> io::Result<Box<dyn Read + Send>>,
    size: u64,
    base: u64,
    progress: Option<ProgressFn>,
}

/// How an upload's body moves: when the client last took a piece, and whether
/// it took the last one.
struct Progressed {
    last: Mutex<Instant>,
    done: AtomicBool,
}

impl Default for Progressed {
    fn default() -> Self {
        Progressed {
            last: Mutex::new(Instant::now()),
            done: AtomicBool::new(false),
        }
    }
}

impl Progressed {
    fn moved(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// Why [`watch_upload`] stopped an upload.
enum UploadStop {
    Cancelled,
    /// No piece of the body was taken for this many seconds.
    Stalled(f64),
}

/// Ends when the upload must stop: cancelled, or its body stalled (the client
/// takes the next piece only when the connection can send it, so a registry
/// that stops reading stops it) for `stall`. Once the whole body is taken, the
/// answer is left to the client's read timeout.
async fn watch_upload(p: &Progressed, cancel: Option<&AtomicBool>, stall: Duration) -> UploadStop {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return UploadStop::Cancelled;
        }
        let idle = p.last.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
        if !p.done.load(Ordering::Relaxed) && idle > stall {
            return UploadStop::Stalled(idle.as_secs_f64());
        }
    }
}

/// A file (or any reader) read in 1 MiB pieces for a streamed request body, with
/// progress and cancellation between pieces.
struct FileChunks {
    src: Box<dyn Read + Send>,
    pos: u64,
    /// Added to `pos` for progress (the body's offset in the blob).
    base: u64,
    progress: Option<ProgressFn>,
    cancel: Option<Arc<AtomicBool>>,
    moved: Arc<Progressed>,
    /// The body's length (its Content-Length).
    size: u64,
}

impl FileChunks {
    const PIECE: u64 = 1 << 20;

    fn into_stream(self) -> impl futures_util::Stream<Item = io::Result<bytes::Bytes>> {
        futures_util::stream::try_unfold(self, |mut c| async move {
            if c.cancel.as_ref().is_some_and(|x| x.load(Ordering::Relaxed)) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
            }
            // A read of the page cache: brief enough to do on the runtime's thread,
            // which serves this one upload.
            let mut buf = Vec::with_capacity(Self::PIECE as usize);
            (&mut c.src).take(Self::PIECE).read_to_end(&mut buf)?;
            c.moved.moved();
            if buf.is_empty() {
                c.moved.done.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            c.pos += buf.len() as u64;
            if c.pos >= c.size {
                // The client may not ask past the Content-Length it sent.
                c.moved.done.store(true, Ordering::Relaxed);
            }
            if let Some(p) = &c.progress {
                p(c.base + c.pos);
            }
            Ok(Some((bytes::Bytes::from(buf), c)))
        })
    }
}

fn location(reg: &Registry, what: &str, resp: &Response) -> Result<String> {
    location_of(reg, what, resp.headers())
}

/// The `Location` of an upload reply's headers.
fn location_of(reg: &Registry, what: &str, headers: &HeaderMap) -> Result<String> {
    header_str(headers, "location")
        .map(String::from)
        .ok_or_else(|| Error::Protocol {
            peer: reg.host.clone(),
            what: what.to_string(),
            reason: "upload response has no Location header".into(),
        })
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    // Digests contain only [a-z0-9:], which need no escaping in a query.
    format!("{url}{sep}{key}={value}")
}

/// `repo:tag` or `repo@digest`, as references are written.
fn ref_name(repo: &str, r: &Reference) -> String {
    match r {
        Reference::Tag(t) => format!("{repo}:{t}"),
        Reference::Digest(d) => format!("{repo}@{d}"),
    }
}

/// How often a caller waiting for a request checks whether the run was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// `rb.send()`, which waits for the registry's answer up to the stall
/// timeout, given up (`Error::Interrupted`) as soon as `cancel` is set: with
/// a cancel flag the request runs on a thread of its own, which is left to
/// end by itself (within the stall timeout) and whose answer is dropped.
pub(crate) fn send_cancellable(
    peer: &str,
    rb: RequestBuilder,
    cancel: Option<&AtomicBool>,
) -> Result<reqwest::Result<Response>> {
    cancellable(peer, "request", cancel, move || rb.send())
}

/// Run `work`, a blocking request or read of an answer's body (which a registry
/// that stops sending holds until the stall timeout), given up
/// (`Error::Interrupted`) as soon as `cancel` is set: with a cancel flag it runs
/// on a thread of its own, which is left to end by itself (within the stall
/// timeout) and whose result is dropped. `what` names the work in errors.
pub(crate) fn cancellable<T: Send + 'static>(
    peer: &str,
    what: &str,
    cancel: Option<&AtomicBool>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let Some(cancel) = cancel else {
        return Ok(work());
    };
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("registry-request".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|error| Error::Stream {
            peer: peer.to_string(),
            what: format!("cannot start a thread for a {what}"),
            error,
        })?;
    loop {
        match rx.recv_timeout(CANCEL_POLL) {
            Ok(r) => return Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
            }
            // The thread ended without an answer: only a panic in the HTTP client does that.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Stream {
                    peer: peer.to_string(),
                    what: what.into(),
                    error: io::Error::other("the HTTP client failed without an answer"),
                })
            }
        }
    }
}

/// Fill `buf` from `body`; an answer that ends first is an `UnexpectedEof`.
fn fill(mut body: impl Read, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match body.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the answer ends after {done} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sleep for `d`, or until `cancel` is set.
fn pause(d: Duration, cancel: Option<&AtomicBool>) {
    let end = Instant::now() + d;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(CANCEL_POLL));
    }
}

/// How long a `Retry-After` value asks to wait at `now`: delay seconds, or an HTTP
/// date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`; a date passed is no wait).
/// `None` for anything else.
fn retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = UNIX_EPOCH + Duration::from_secs(http_date(v)?);
    Some(at.duration_since(now).unwrap_or_default())
}

/// Seconds since the epoch of an IMF-fixdate (RFC 9110 §5.6.7), the form every
/// current server sends.
fn http_date(v: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_weekday, rest) = v.split_once(", ")?;
    let f: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = f[..] else {
        return None;
    };
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let (day, year) = (num(day, 2)?, num(year, 4)?);
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let t: Vec<&str> = time.split(':').collect();
    let [h, m, s] = t[..] else { return None };
    let (h, m, s) = (num(h, 2)?, num(m, 2)?, num(s, 2)?);
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (the proleptic Gregorian calendar; March-based
    // years put the leap day last).
    let (y, mp) = if month > 2 {
        (year, month - 3)
    } else {
        (year - 1, month + 9)
    };
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// The first and last byte of a `Content-Range: bytes A-B/TOTAL` (TOTAL may be `*`).
fn content_range(v: Option<&str>) -> Option<(u64, u64)> {
    let (range, _total) = v?.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Whether a body read failed on the request's deadline.
fn timed_out(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<reqwest::Error>())
            .is_some_and(reqwest::Error::is_timeout)
}

/// A client error as the `io::Error` a reader returns, keeping interruptions, corrupt
/// data and missing objects recognisable by their `io::ErrorKind`.
fn io_error(e: Error) -> io::Error {
    let kind = match e.kind() {
        ErrorKind::Interrupted => io::ErrorKind::Interrupted,
        ErrorKind::Corrupt => io::ErrorKind::InvalidData,
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A blob download stream: resumed with a range request when the connection breaks,
/// verified (size and digest) at its end.
pub struct BlobReader(VerifyReader<ResumingBody>);

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// A blob's body, fetched again from where it broke off (`Range`). Every request
/// ends at the client's deadline (the stall timeout), so a long download is
/// several requests; a resume after at least [`ResumingBody::PROGRESS`] bytes
/// came is free, others count against `retries` (a stalled or failing source
/// gives up after that many).
struct ResumingBody {
    repo: Repository,
    desc: Descriptor,
    resp: Option<Response>,
    /// Bytes delivered so far.
    pos: u64,
    /// `pos` when the current request was made.
    pos_at_request: u64,
    resumes_left: u32,
}

impl ResumingBody {
    /// Progress that makes a resume free.
    const PROGRESS: u64 = 1 << 20;
}

impl Read for ResumingBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.repo.reg.cancelled() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
            }
            let resp = match self.resp.as_mut() {
                Some(r) => r,
                None => {
                    let r = self
                        .repo
                        .get_blob_response(&self.desc, self.pos)
                        .map_err(io_error)?;
                    self.pos_at_request = self.pos;
                    self.resp.insert(r)
                }
            };
            let read = match resp.read(buf) {
                // A body of no declared length that ends cleanly but short of the
                // blob (close-delimited, as a proxy without `Content-Length` sends
                // it) broke off too. One with a `Content-Length` that ends cleanly
                // ends where the server says the blob does, whatever the descriptor
                // says (a body short of its length is an error): the size check
                // names both sizes.
                Ok(0)
                    if !buf.is_empty()
                        && self.pos < self.desc.size
                        && !resp.headers().contains_key(CONTENT_LENGTH) =>
                {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the answer ended at byte {}", self.pos),
                    ))
                }
                // A stream that breaks once every byte of the blob came is complete
                // (a resume at its end would be answered 416): the digest decides.
                Err(e) if self.pos == self.desc.size && e.kind() != io::ErrorKind::Interrupted => {
                    tracing::debug!(
                        "{}: blob {}: the answer broke after its last byte ({e})",
                        self.repo.reg.host,
                        self.desc.digest
                    );
                    Ok(0)
                }
                r => r,
            };
            match read {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let progressed = self.pos - self.pos_at_request >= Self::PROGRESS;
                    if progressed && timed_out(&e) {
                        // The request's deadline, with data still coming: go on
                        // with a new request.
                        tracing::debug!(
                            "{}: blob {}: request deadline at byte {}; continuing",
                            self.repo.reg.host,
                            self.desc.digest,
                            self.pos
                        );
                        self.resp = None;
                        continue;
                    }
                    if !progressed && self.resumes_left == 0 {
                        return Err(io::Error::new(
                            e.kind(),
                            Error::Stream {
                                peer: self.repo.reg.host.clone(),
                                what: format!("blob {}@{}", self.repo.name, self.desc.digest),
                                error: e,
                            },
                        ));
                    }
                    tracing::warn!(
                        "{}: blob {}: stream broke at byte {} ({e}); resuming",
                        self.repo.reg.host,
                        self.desc.digest,
                        self.pos
                    );
                    if !progressed {
                        self.resumes_left -= 1;
                    }
                    self.resp = None;
                    self.repo.reg.pause(self.repo.reg.opts.retry_delay);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_rule() {
        let c = Credentials::parse("u:p:with:colons").unwrap();
        assert_eq!(c.username, "u");
        assert_eq!(c.password, "p:with:colons");
        assert!(Credentials::parse("user").is_none());
        assert!(Credentials::parse(":token").is_none());
        assert!(!format!("{c:?}").contains("colons"));
    }

    #[test]
    fn query_join() {
        assert_eq!(
            with_query("http://h/u?x=1", "digest", "d"),
            "http://h/u?x=1&digest=d"
        );
        assert_eq!(
            with_query("http://h/u", "digest", "d"),
            "http://h/u?digest=d"
        );
    }

    /// Sets `flag` after `after`, from another thread.
    fn cancel_after(flag: &Arc<AtomicBool>, after: Duration) {
        let f = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            f.store(true, Ordering::Relaxed);
        });
    }

    /// A request the server never answers is given up once the cancel flag is
    /// set, long before the client's timeout; without a flag it waits for that.
    #[test]
    fn a_cancelled_request_is_not_waited_for() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v2/", l.local_addr().unwrap());
        let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
        let http = Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        cancel_after(&cancel, Duration::from_millis(200));
        let t0 = Instant::now();
        let r = send_cancellable("h", http.get(&url), Some(&cancel));
        assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(held.join());
        // Already cancelled: nothing is sent.
        assert!(matches!(
            send_cancellable("h", http.get(&url), Some(&cancel)),
            Err(Error::Interrupted)
        ));
        // Without a flag the answer (here a refused connection) is returned.
        let r = send_cancellable("h", http.get("http://127.0.0.1:1/"), None).unwrap();
        assert!(r.is_err());
    }

    /// `Retry-After` in both its forms; anything else is no answer.
    #[test]
    fn retry_after_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        // RFC 9110's example date, 30 s after `now`.
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date passed: no wait.
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:48:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1_835_481_599)
        );
        assert_eq!(
            http_date("Sat, 05 Dec 2026 01:09:00 GMT"),
            Some(1_796_432_940)
        );
        for bad in [
            "-5",
            "soon",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
        ] {
            assert_eq!(retry_after(bad, now), None, "{bad}");
        }
    }

    /// A retry's delay ends when the run is cancelled.
    #[test]
    fn a_retry_delay_ends_on_cancel() {
        let cancel = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        pause(Duration::from_millis(100), Some(&cancel));
        assert!(t0.elapsed() >= Duration::from_millis(100));
        cancel_after(&cancel, Duration::from_millis(100));
        let t0 = Instant::now();
        pause(Duration::from_secs(30), Some(&cancel));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
