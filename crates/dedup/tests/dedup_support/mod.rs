//! A throwaway MariaDB server for tests: `mariadb-install-db` into a temp dir, then `mariadbd`
//! on 127.0.0.1 with a free port and a socket in that dir. Include with
//! `#[path = "dedup_support/mod.rs"] mod dedup_support;`.
//!
//! The server is killed and its directory removed when the [`MariaDb`] is dropped; the shared
//! per-process instance ([`shared`]) is dropped at process exit, and dies with the test process
//! even if that crashes (`PR_SET_PDEATHSIG`).
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

/// Password of the test account: every character the go-sql-driver DSN grammar makes tricky.
pub const TEST_PASSWORD: &str = "p@ss:w/rd?x=1&y@";
pub const TEST_USER: &str = "obd";

pub struct MariaDb {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    pub socket: PathBuf,
    server: PathBuf,
    extra_args: Vec<String>,
}

/// Small memory and log sizes: a test server holds a few hundred rows.
const COMMON_ARGS: [&str; 3] = [
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--skip-name-resolve",
];

pub fn find_binary(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found in PATH or /usr/sbin: the MariaDB tests need the Debian package mariadb-server (apt-get install mariadb-server)"
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
        .port()
}

/// A private temporary directory for one server. Never the shared `/tmp`: at start-up (and in
/// `--bootstrap`, which `mariadb-install-db` runs) `mariadbd` deletes every `#sql*` file in its
/// tmpdir, i.e. the temporary tables of any other server running at the same time, which then
/// fails ("Could not remove temporary table ... Unknown table 'mysql.tmp_user_sys'",
/// "Installation of system tables failed").
fn tmp_dir(server_dir: &Path) -> PathBuf {
    let tmp = server_dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("creating the MariaDB tmpdir");
    tmp
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

impl MariaDb {
    /// Installs a fresh data directory and starts the server; panics with a clear message when
    /// MariaDB is missing or does not come up.
    pub fn start() -> MariaDb {
        Self::start_with(&[])
    }

    /// [`MariaDb::start`] with extra `mariadbd` options (e.g. TLS certificates).
    pub fn start_with(extra_args: &[String]) -> MariaDb {
        let install = find_binary("mariadb-install-db");
        let server = find_binary("mariadbd");
        let dir = tempfile::Builder::new()
            .prefix("obd-mariadb-")
            .tempdir()
            .expect("creating a temp dir for MariaDB");
        let data = dir.path().join("data");
        let socket = dir.path().join("mariadbd.sock");
        let root = running_as_root();
        let tmp = tmp_dir(dir.path());

        let mut cmd = Command::new(&install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .args(COMMON_ARGS)
            .stdin(Stdio::null());
        if root {
            cmd.arg("--user=root");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", install.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}\n{}",
            install.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let mut db = MariaDb {
            child: None,
            dir,
            port: free_port(),
            socket,
            server,
            extra_args: extra_args.to_vec(),
        };
        db.spawn_server();
        db.setup_account();
        db
    }

    /// Starts `mariadbd` on the data dir, port and socket of `self`, and waits until it accepts
    /// connections.
    fn spawn_server(&mut self) {
        let dir = self.dir.path();
        let log = dir.join("error.log");
        let mut cmd = Command::new(&self.server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", tmp_dir(dir).display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg("--skip-log-bin")
            .arg("--innodb-flush-log-at-trx-commit=0")
            .args(COMMON_ARGS)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            cmd.arg("--user=root");
        }
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec; prctl and getppid are async-signal-safe
        // and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.server.display()));
        self.child = Some(child);
        self.wait_ready(&log);
    }

    /// Shuts the server down (SIGTERM, a clean shutdown) and starts it again on the same data,
    /// port and socket.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .expect("running kill");
            assert!(status.success(), "kill -TERM mariadbd failed");
            let _ = c.wait();
        }
        self.spawn_server();
    }

    /// Stops the server without closing anything (SIGSTOP): connections are accepted by the
    /// kernel and never answered, as behind a network partition. [`MariaDb::resume`] undoes it;
    /// dropping the server kills it even while paused.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("a running server");
        let status = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} mariadbd failed");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready(&mut self, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "mariadbd exited ({status}) before accepting connections; error log:\n{}",
                    tail(log)
                );
            }
            if self.socket.exists() && self.root_conn(None).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "mariadbd did not accept connections within 60 s; error log:\n{}",
                    tail(log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection as root over the socket (no password: `--auth-root-authentication-method=normal`).
    pub fn root_conn(&self, db: Option<&str>) -> mysql::Result<mysql::Conn> {
        let opts = mysql::OptsBuilder::new()
            .socket(Some(self.socket.to_string_lossy().into_owned()))
            .user(Some("root"))
            .db_name(db.map(str::to_string));
        mysql::Conn::new(opts)
    }

    /// The test account: a password with `@ : / ? & =`, and only SELECT, INSERT, DELETE.
    fn setup_account(&self) {
        let mut c = self.root_conn(None).expect("root connection");
        for host in ["127.0.0.1", "localhost"] {
            let pw = TEST_PASSWORD.replace('\\', "\\\\").replace('\'', "''");
            c.query_drop(format!(
                "CREATE USER '{TEST_USER}'@'{host}' IDENTIFIED BY '{pw}'"
            ))
            .expect("creating the test account");
            c.query_drop(format!(
                "GRANT SELECT, INSERT, DELETE ON *.* TO '{TEST_USER}'@'{host}'"
            ))
            .expect("granting the test account");
        }
    }

    /// Creates database `name` with the tables of `scripts/mysql-schema.sql`.
    pub fn create_database(&self, name: &str) {
        let mut c = self.root_conn(None).expect("root connection");
        c.query_drop(format!("CREATE DATABASE `{name}`"))
            .expect("creating a test database");
        c.query_drop(format!("USE `{name}`")).unwrap();
        for stmt in schema_statements() {
            c.query_drop(&stmt)
                .unwrap_or_else(|e| panic!("applying scripts/mysql-schema.sql: {e}\n{stmt}"));
        }
    }

    /// A fresh, empty database with the tables; returns its name.
    pub fn fresh_database(&self, prefix: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}_{}", N.fetch_add(1, Ordering::Relaxed));
        self.create_database(&name);
        name
    }

    /// go-sql-driver DSN of the test account over TCP.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "{TEST_USER}:{TEST_PASSWORD}@tcp(127.0.0.1:{})/{db}",
            self.port
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The statements of `scripts/mysql-schema.sql` (comments dropped, split at `;`).
pub fn schema_statements() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mysql-schema.sql");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    body.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// What [`shared`] hands out: the server's address (the server itself stays in a static).
#[derive(Clone, Debug)]
pub struct SharedDb {
    pub port: u16,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

static SHARED: Mutex<Option<MariaDb>> = Mutex::new(None);
static SHARED_INFO: OnceLock<SharedDb> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Ok(mut g) = SHARED.lock() {
        g.take();
    }
}

/// One MariaDB per test process, started on first use from a thread that lives as long as the
/// process (so `PR_SET_PDEATHSIG` fires only when the process dies), stopped at exit.
pub fn shared() -> SharedDb {
    SHARED_INFO
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("mariadb-owner".into())
                .spawn(move || {
                    let r = std::panic::catch_unwind(MariaDb::start);
                    let ok = r.is_ok();
                    let _ = tx.send(r.map(|db| {
                        let info = SharedDb {
                            port: db.port,
                            socket: db.socket.clone(),
                            dir: db.dir().to_path_buf(),
                        };
                        *SHARED.lock().unwrap() = Some(db);
                        info
                    }));
                    if ok {
                        loop {
                            std::thread::park();
                        }
                    }
                })
                .expect("spawning the MariaDB owner thread");
            match rx.recv().expect("MariaDB owner thread") {
                Ok(info) => {
                    // SAFETY: registers a plain extern "C" function with no arguments; libc
                    // calls it once at normal process exit.
                    unsafe {
                        libc::atexit(stop_shared);
                    }
                    info
                }
                Err(p) => std::panic::resume_unwind(p),
            }
        })
        .clone()
}

/// Runs `f` with the shared server.
pub fn with_shared<T>(f: impl FnOnce(&MariaDb) -> T) -> T {
    shared();
    let g = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    f(g.as_ref().expect("shared MariaDB is running"))
}
