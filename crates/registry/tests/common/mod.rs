//! Test services: a real `docker-registry` (Debian's CNCF distribution 2.8) spawned on a
//! random loopback port with its storage in a temp dir, optionally behind TLS with
//! htpasswd or token auth, plus a PKI made with the `openssl` CLI and a small token
//! server that signs JWTs the registry verifies.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Fail clearly if a required program is missing.
pub fn require_bin(path: &str) {
    let found = if path.contains('/') {
        Path::new(path).is_file()
    } else {
        Command::new("sh")
            .args(["-c", &format!("command -v {path}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(
        found,
        "required program {path} is missing; install it (apt-get install docker-registry openssl apache2-utils skopeo umoci e2fsprogs python3)"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA with a server certificate for 127.0.0.1/localhost, a client certificate,
/// and a self-signed token-signing certificate.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        require_bin("openssl");
        std::fs::create_dir_all(dir).unwrap();
        let o = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
        o(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=overlaybd-test-ca",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            o(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ]);
            o(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        o(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
            "-out",
            "token.crt",
            "-days",
            "2",
            "-subj",
            "/CN=token-signer",
        ]);
        o(&[
            "x509",
            "-in",
            "token.crt",
            "-outform",
            "DER",
            "-out",
            "token.der",
        ]);
        Pki {
            dir: dir.to_path_buf(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

pub enum Auth {
    None,
    Htpasswd { user: String, password: String },
    Token { realm: String },
}

pub struct RegistryOpts<'a> {
    pub tls: Option<&'a Pki>,
    pub client_ca: bool,
    pub auth: Auth,
}

/// A running docker-registry; killed on drop.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    config: PathBuf,
}

impl Registry {
    pub fn plain() -> Registry {
        Self::start(RegistryOpts {
            tls: None,
            client_ca: false,
            auth: Auth::None,
        })
    }

    pub fn start(o: RegistryOpts<'_>) -> Registry {
        require_bin(REGISTRY_BIN);
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some(pki) = o.tls {
            cfg += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.path("server.crt").display(),
                pki.path("server.key").display()
            );
            if o.client_ca {
                cfg += &format!("    clientcas:\n      - {}\n", pki.path("ca.crt").display());
            }
        }
        match &o.auth {
            Auth::None => {}
            Auth::Htpasswd { user, password } => {
                require_bin("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .unwrap();
                assert!(out.status.success());
                let p = dir.path().join("htpasswd");
                std::fs::write(&p, out.stdout).unwrap();
                cfg += &format!(
                    "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                    p.display()
                );
            }
            Auth::Token { realm } => {
                let pki = o.tls.expect("token auth tests also use the PKI");
                cfg += &format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                    pki.path("token.crt").display()
                );
            }
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, cfg).unwrap();
        let child = Self::spawn(&config, dir.path());
        let r = Registry {
            child,
            dir,
            port,
            config,
        };
        r.wait_ready();
        r
    }

    fn spawn(config: &Path, dir: &Path) -> Child {
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {REGISTRY_BIN}: {e}"))
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen on port {} within 20 s; log: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stop the process (storage is kept).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(&self.config, self.dir.path());
        self.wait_ready();
    }

    /// Path of a blob's data file in the registry's storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Path of the file that links a repository to a blob it holds
    /// (`_layers/sha256/<hex>/link`, which holds the digest).
    pub fn layer_link_path(&self, repo: &str, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex)
            .join("link")
    }

    /// Tags of a repository as the registry lists them.
    pub fn tag_link_exists(&self, repo: &str, tag: &str) -> bool {
        self.dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link")
            .is_file()
    }

    /// A client for one of its repositories (plain HTTP, no credentials).
    pub fn client(&self, repo: &str) -> obdregistry::Repository {
        let o = obdregistry::ClientOptions {
            plain_http: true,
            ..Default::default()
        };
        obdregistry::Registry::new(&self.host(), &o)
            .unwrap()
            .repository(repo)
    }

    /// `DELETE /v2/<repo>/blobs/<digest>` (storage.delete is enabled): the repository
    /// loses its link to the blob, as after a registry clean-up.
    pub fn delete_blob(&self, repo: &str, digest: &str) {
        let url = format!("http://{}/v2/{repo}/blobs/{digest}", self.host());
        let r = reqwest::blocking::Client::new()
            .delete(&url)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "DELETE {url}: {r:?}");
    }

    /// Number of manifest revisions stored for a repository.
    pub fn manifest_revisions(&self, repo: &str) -> usize {
        let p = self
            .dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/revisions/sha256");
        std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A token server for distribution's token auth: `GET /token?service=..&scope=..`
/// with Basic credentials; answers RS256 JWTs (signed by `openssl dgst`) whose x5c header
/// carries the signing certificate the registry trusts.
pub struct TokenServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TokenServer {
    pub fn start(pki: &Pki, user: &str, password: &str) -> TokenServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reqs, stop2) = (requests.clone(), stop.clone());
        let key = pki.path("token.key");
        let cert_der = std::fs::read(pki.path("token.der")).unwrap();
        let expected = {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        };
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || loop {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let (s, _) = match l.accept() {
                Ok(x) => x,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            s.set_nonblocking(false).unwrap();
            let _ = handle_token(s, &key, &cert_der, &expected, &reqs);
        });
        TokenServer {
            port,
            requests,
            stop,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn handle_token(
    s: TcpStream,
    key: &Path,
    cert_der: &[u8],
    expected_auth: &str,
    reqs: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            }
        }
    }
    reqs.lock().unwrap().push(target.clone());
    let mut w = s;
    if auth != expected_auth {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        write!(
            w,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    // Grant every scope asked for.
    let query = target.split_once('?').map(|x| x.1).unwrap_or("");
    let mut access = Vec::new();
    for kv in query.split('&') {
        if let Some(v) = kv.strip_prefix("scope=") {
            let v = percent_decode(v);
            let parts: Vec<&str> = v.split(':').collect();
            if parts.len() == 3 {
                access.push(serde_json::json!({
                    "type": parts[0], "name": parts[1],
                    "actions": parts[2].split(',').collect::<Vec<_>>()
                }));
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    use base64::Engine as _;
    let header = serde_json::json!({"alg":"RS256","typ":"JWT",
        "x5c":[base64::engine::general_purpose::STANDARD.encode(cert_der)]});
    let claims = serde_json::json!({"iss":"test-issuer","sub":"user","aud":"test-registry",
        "exp":now+300,"nbf":now-30,"iat":now-30,"jti":format!("{now}-{}", access.len()),
        "access":access});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())?;
    let mut sig = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut sig)?;
    child.wait()?;
    let jwt = format!("{signing_input}.{}", b64url(&sig));
    let body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `req` without its `Range:` header lines (request heads arrive whole here).
fn without_range_header(req: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(req);
    if !text.to_ascii_lowercase().contains("\r\nrange:") {
        return req.to_vec();
    }
    text.split_inclusive("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
        .collect::<String>()
        .into_bytes()
}

/// Which way a [`Proxy`] stalls.
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// It stops sending the registry's answer (a download that stops).
    ToClient,
    /// It stops reading what the client sends (a registry that stops taking an upload).
    FromClient,
}

/// A TCP proxy in front of a registry that can die after a number of client bytes
/// (a registry going down mid-push) or throttle responses (a slow download), and
/// counts the bytes it relays to clients (what a lazy reader fetched).
pub struct Proxy {
    pub port: u16,
    dead: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    to_clients: Arc<std::sync::atomic::AtomicU64>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16, die_after: Option<u64>, rate: Option<u64>) -> Proxy {
        Self::start_with(upstream, die_after, rate, None)
    }

    /// Like `start`; `cut_once_after` drops the first connection whose response
    /// bytes pass that count (a broken download), later connections pass through.
    pub fn start_with(
        upstream: u16,
        die_after: Option<u64>,
        rate: Option<u64>,
        cut_once_after: Option<u64>,
    ) -> Proxy {
        Self::start_full(upstream, die_after, rate, cut_once_after, None)
    }

    /// A proxy whose first connection to pass `after` bytes in the direction
    /// `stall` names stops relaying there and holds the connection open,
    /// silent (a stalled registry); later connections pass through.
    pub fn start_stalling(upstream: u16, stall: Stall, after: u64) -> Proxy {
        Self::start_full(upstream, None, None, None, Some((stall, after)))
    }

    /// Like `start_with(upstream, None, None, Some(cut_once_after))`, and the
    /// `Range` header of every request is removed (a server or proxy that
    /// ignores ranges: resumed downloads get the whole blob again).
    pub fn start_cut_ignoring_range(upstream: u16, cut_once_after: u64) -> Proxy {
        Self::start_opts(upstream, None, None, Some(cut_once_after), None, true)
    }

    fn start_full(
        upstream: u16,
        die_after: Option<u64>,
        rate: Option<u64>,
        cut_once_after: Option<u64>,
        stall: Option<(Stall, u64)>,
    ) -> Proxy {
        Self::start_opts(upstream, die_after, rate, cut_once_after, stall, false)
    }

    fn start_opts(
        upstream: u16,
        die_after: Option<u64>,
        rate: Option<u64>,
        cut_once_after: Option<u64>,
        stall: Option<(Stall, u64)>,
        strip_range: bool,
    ) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stalled = Arc::new(AtomicBool::new(false));
        // Holds a connection: relays nothing more until the proxy dies.
        let hold = |dead: &AtomicBool| {
            while !dead.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let cut_done = Arc::new(AtomicBool::new(false));
        let cut_flag = cut_done.clone();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let to_clients = Arc::new(AtomicU64::new(0));
        let relayed_total = to_clients.clone();
        let d = dead.clone();
        let stalled_flag = stalled.clone();
        std::thread::spawn(move || {
            let kill = |conns: &Mutex<Vec<TcpStream>>| {
                for c in conns.lock().unwrap().iter() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            };
            loop {
                if d.load(Ordering::SeqCst) {
                    kill(&conns);
                    break; // the listener is dropped: new connections are refused
                }
                let (client, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                conns.lock().unwrap().push(client.try_clone().unwrap());
                conns.lock().unwrap().push(server.try_clone().unwrap());
                // client -> server, counting bytes.
                let (mut cr, mut sw) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (d1, s1, c1) = (d.clone(), sent.clone(), conns.clone());
                let st1 = stalled.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    let mut this_conn = 0u64;
                    loop {
                        let n = match cr.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        this_conn += n as u64;
                        if let Some((Stall::FromClient, after)) = stall {
                            if this_conn > after && !st1.swap(true, Ordering::SeqCst) {
                                hold(&d1);
                                break;
                            }
                        }
                        let total = s1.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if die_after.is_some_and(|lim| total > lim) {
                            d1.store(true, Ordering::SeqCst);
                            for c in c1.lock().unwrap().iter() {
                                let _ = c.shutdown(std::net::Shutdown::Both);
                            }
                            break;
                        }
                        let mut chunk = buf[..n].to_vec();
                        if strip_range {
                            chunk = without_range_header(&chunk);
                        }
                        if d1.load(Ordering::SeqCst) || sw.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown(std::net::Shutdown::Write);
                });
                // server -> client, optionally throttled.
                let (mut sr, mut cw) = (server, client);
                let d2 = d.clone();
                let cut = cut_done.clone();
                let total = relayed_total.clone();
                let st2 = stalled.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 8 << 10];
                    let mut relayed = 0u64;
                    loop {
                        let n = match sr.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        relayed += n as u64;
                        if let Some((Stall::ToClient, after)) = stall {
                            if relayed > after && !st2.swap(true, Ordering::SeqCst) {
                                hold(&d2);
                                break;
                            }
                        }
                        if cut_once_after.is_some_and(|lim| relayed > lim)
                            && !cut.swap(true, Ordering::SeqCst)
                        {
                            let _ = cw.shutdown(std::net::Shutdown::Both);
                            let _ = sr.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        if d2.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        total.fetch_add(n as u64, Ordering::SeqCst);
                        if let Some(r) = rate {
                            std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
                        }
                    }
                    let _ = cw.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Proxy {
            port,
            dead,
            cut: cut_flag,
            to_clients,
            stalled: stalled_flag,
        }
    }

    /// Whether a connection stalled (`start_stalling`).
    pub fn has_stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a connection was cut (`cut_once_after`).
    pub fn was_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes relayed from the registry to clients so far (headers included).
    pub fn bytes_to_clients(&self) -> u64 {
        self.to_clients.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.dead.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
