//! MySQL / MariaDB backend: upstream's queries over a small synchronous connection pool.
//!
//! The tables are not created here (a DBA creates them with `scripts/mysql-schema.sql`); at
//! connect time we check that both tables answer a `SELECT ... LIMIT 0` with upstream's column
//! list, so a missing table or privilege fails before any conversion. The account needs only
//! SELECT, INSERT and DELETE on the two tables.
//!
//! TLS follows the DSN's `tls=` parameter with go-sql-driver's meanings (see [`TlsMode`]); it
//! applies to TCP only, as in Go. The CA store for `tls=true` is Go's on Linux: the file named
//! by `SSL_CERT_FILE`, else the first distribution bundle found (plus the built-in Mozilla
//! roots of the client library).

use std::path::PathBuf;
use std::time::Duration;

use ::mysql::prelude::Queryable;
use ::mysql::{DriverError, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn, SslOpts};

use super::dsn::{Dsn, Endpoint, TlsMode};
use super::sql::{self, Stmt, LAYER_COLS, MANIFEST_COLS};
use super::{Backend, DbError, Insert, LayerRow, ManifestRow};

/// MySQL error codes we react to.
const ER_DUP_ENTRY: u16 = 1062;
const ER_ACCESS_DENIED: u16 = 1045;
const ER_BAD_DB: u16 = 1049;
const ER_NO_SUCH_TABLE: u16 = 1146;
const ER_TABLEACCESS_DENIED: u16 = 1142;
const ER_BAD_FIELD: u16 = 1054;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Enough for the per-layer lookups of a few manifests converted at once.
const POOL_MAX: usize = 16;
const ATTEMPTS: usize = 3;

pub(crate) struct MysqlBackend {
    pool: Pool,
    target: String,
}

impl std::fmt::Debug for MysqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlBackend")
            .field("target", &self.target)
            .finish()
    }
}

type LayerTuple = (String, String, String, String, i64);
type ManifestTuple = (String, String, String, String, i64, String);

fn layer_row((host, repo, chain_id, data_digest, data_size): LayerTuple) -> LayerRow {
    LayerRow {
        host,
        repo,
        chain_id,
        data_digest,
        data_size,
    }
}

fn manifest_row(
    (host, repo, src_digest, out_digest, data_size, mediatype): ManifestTuple,
) -> ManifestRow {
    ManifestRow {
        host,
        repo,
        src_digest,
        out_digest,
        data_size,
        mediatype,
    }
}

fn server_code(e: &::mysql::Error) -> Option<u16> {
    match e {
        ::mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}

/// A MySQL client error, shown as `<server message> (MySQL error <code>)` rather than in the
/// driver's own `MySqlError { ... }` form.
#[derive(Debug)]
pub struct MysqlError(::mysql::Error);

impl MysqlError {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<u16> {
        server_code(&self.0)
    }

    /// Whether the server did not answer in time (connect, read or write timeout).
    pub fn is_timeout(&self) -> bool {
        Self::timed_out(&self.0)
    }

    fn timed_out(e: &::mysql::Error) -> bool {
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        };
        match e {
            ::mysql::Error::IoError(e) => timed_out(e),
            // A socket timeout during a statement comes through the packet codec (its
            // source is the socket's error).
            ::mysql::Error::CodecError(c) => std::error::Error::source(c)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(timed_out),
            ::mysql::Error::DriverError(DriverError::ConnectTimeout | DriverError::Timeout) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for MysqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ::mysql::Error::MySqlError(m) => write!(f, "{} (MySQL error {})", m.message, m.code),
            ::mysql::Error::DriverError(d) => write!(f, "{d}"),
            ::mysql::Error::IoError(io) => write!(f, "{io}"),
            ::mysql::Error::TlsError(t) => write!(f, "TLS: {t}"),
            ::mysql::Error::CodecError(c) => write!(f, "{c}"),
            other => write!(f, "{other}"),
        }
    }
}

impl std::error::Error for MysqlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The text above already shows the driver error; its own causes follow.
        match &self.0 {
            ::mysql::Error::IoError(io) => io.source(),
            ::mysql::Error::TlsError(t) => t.source(),
            _ => None,
        }
    }
}

/// A connect error with a hint for the usual causes.
fn connect_error(target: &str, e: ::mysql::Error) -> DbError {
    let hint = match server_code(&e) {
        Some(ER_ACCESS_DENIED) => " (check the user and password in --db-str)",
        Some(ER_BAD_DB) => " (create the database with scripts/mysql-setup.sh --db <name>)",
        _ => "",
    };
    DbError::MysqlConnect {
        target: target.to_string(),
        error: MysqlError(e),
        hint,
    }
}

/// What is wrong with `table`, from the error of the check query (whose text is not
/// repeated: it is the error's source).
pub(crate) fn schema_problem(table: &str, e: &MysqlError) -> String {
    let cols = if table == "overlaybd_layers" {
        LAYER_COLS
    } else {
        MANIFEST_COLS
    };
    match e.code() {
        Some(ER_NO_SUCH_TABLE) => format!(
            "table {table} does not exist; create the tables with scripts/mysql-setup.sh or scripts/mysql-schema.sql"
        ),
        Some(ER_TABLEACCESS_DENIED) => format!(
            "the user may not read table {table}; grant SELECT, INSERT, DELETE on it"
        ),
        Some(ER_BAD_FIELD) => format!("table {table} lacks upstream's columns ({cols})"),
        _ => format!("cannot check table {table}"),
    }
}

/// A lost connection or an InnoDB deadlock. Not a timeout: that attempt waited its full
/// timeout (and the pool's ping and reconnection theirs), and the next would wait as long.
fn is_retryable(e: &::mysql::Error) -> bool {
    (e.is_connectivity_error() && !MysqlError::timed_out(e))
        || matches!(
            server_code(e),
            Some(ER_LOCK_DEADLOCK) | Some(ER_LOCK_WAIT_TIMEOUT)
        )
}

/// CA bundles Go's crypto/x509 reads on Linux, in its order.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn system_ca_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(f));
    }
    SYSTEM_CA_FILES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn ssl_opts(mode: TlsMode) -> Option<SslOpts> {
    match mode {
        TlsMode::Off => None,
        TlsMode::Verify => Some(SslOpts::default().with_root_cert_path(system_ca_file())),
        TlsMode::SkipVerify | TlsMode::Preferred => Some(
            SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true),
        ),
    }
}

/// A MySQL server speaks first: its greeting (protocol 10 handshake, or an
/// error packet such as "host blocked") arrives right after the connection is
/// accepted. Wait for it at most `timeout`, so that a DSN naming some other
/// service fails in seconds with a clear message instead of after the
/// client's I/O timeout with "Resource temporarily unavailable". The probe
/// connection is closed before any authentication.
fn expect_greeting(host: &str, port: u16, timeout: Duration, target: &str) -> Result<(), DbError> {
    use std::io::Read;
    use std::net::{TcpStream, ToSocketAddrs};
    let fail = |reason: String, error: Option<std::io::Error>| DbError::MysqlNoGreeting {
        target: target.to_string(),
        reason,
        error,
    };
    // Unresolvable or refused: left to the client library, which says so.
    let Some(addr) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return Ok(());
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return Ok(());
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| fail("cannot set a read timeout".into(), Some(e)))?;
    // 4-byte packet header, then 10 (handshake v10) or 0xff (error packet).
    let mut head = [0u8; 5];
    match s.read_exact(&mut head) {
        Ok(()) if head[4] == 10 || head[4] == 0xff => Ok(()),
        Ok(()) => Err(fail(
            format!(
                "the server's first bytes {:02x?} are not a MySQL greeting",
                head
            ),
            None,
        )),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(fail(
                format!(
                    "no greeting within {:.1} s of connecting",
                    timeout.as_secs_f64()
                ),
                None,
            ))
        }
        Err(e) => Err(fail(
            "the connection ended before a greeting".into(),
            Some(e),
        )),
    }
}

impl MysqlBackend {
    /// Connects (one connection is opened right away) and checks both tables.
    pub(crate) fn connect(dsn: &Dsn) -> Result<MysqlBackend, DbError> {
        let target = format!("{dsn}");
        if dsn.tls != TlsMode::Off {
            // The client library builds its TLS config with rustls' process-wide default
            // provider; make sure there is exactly one (another crate enabling a second rustls
            // provider would otherwise make that call panic). Fails harmlessly if already set.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut opts = OptsBuilder::new()
            .user((!dsn.user.is_empty()).then(|| dsn.user.clone()))
            .pass(dsn.password.clone())
            .db_name(Some(dsn.db_name.clone()))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(dsn.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)))
            .read_timeout(Some(dsn.read_timeout.unwrap_or(DEFAULT_IO_TIMEOUT)))
            .write_timeout(Some(dsn.write_timeout.unwrap_or(DEFAULT_IO_TIMEOUT)))
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(PoolConstraints::new(1, POOL_MAX).expect("1 <= max"))
                    .with_reset_connection(false),
            );
        opts = match &dsn.endpoint {
            Endpoint::Tcp { host, port } => {
                expect_greeting(
                    host,
                    *port,
                    dsn.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                    &target,
                )?;
                opts.ip_or_hostname(Some(host.clone())).tcp_port(*port)
            }
            Endpoint::Unix(path) => opts.socket(Some(path.clone())),
        };
        let pool = match Pool::new(opts.clone().ssl_opts(ssl_opts(dsn.tls))) {
            Ok(p) => p,
            Err(::mysql::Error::DriverError(DriverError::TlsNotSupported))
                if dsn.tls == TlsMode::Preferred =>
            {
                Pool::new(opts).map_err(|e| connect_error(&target, e))?
            }
            Err(::mysql::Error::DriverError(DriverError::TlsNotSupported)) => {
                return Err(DbError::MysqlNoTls { target })
            }
            Err(e) => return Err(connect_error(&target, e)),
        };
        let backend = MysqlBackend { pool, target };
        backend.check_schema()?;
        Ok(backend)
    }

    fn check_schema(&self) -> Result<(), DbError> {
        let mut conn = self.conn()?;
        for (table, cols) in [
            ("overlaybd_layers", LAYER_COLS),
            ("overlaybd_manifests", MANIFEST_COLS),
        ] {
            let q = format!("SELECT {cols} FROM {table} LIMIT 0");
            if let Err(e) = conn.query_drop(&q) {
                return Err(DbError::MysqlSchema {
                    target: self.target.clone(),
                    table,
                    error: MysqlError(e),
                });
            }
        }
        Ok(())
    }

    fn conn(&self) -> Result<PooledConn, DbError> {
        self.pool
            .get_conn()
            .map_err(|e| connect_error(&self.target, e))
    }

    /// Runs `f` on a pooled connection, retrying lost connections and InnoDB deadlocks.
    fn run<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&mut PooledConn) -> Result<T, ::mysql::Error>,
    ) -> Result<T, DbError> {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20 * attempt as u64));
            }
            let mut conn = match self.pool.get_conn() {
                Ok(c) => c,
                Err(e) if is_retryable(&e) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(connect_error(&self.target, e)),
            };
            match f(&mut conn) {
                Ok(v) => return Ok(v),
                Err(e) if is_retryable(&e) => last = Some(e),
                Err(e) => {
                    return Err(DbError::Mysql {
                        target: self.target.clone(),
                        op,
                        error: MysqlError(e),
                    })
                }
            }
        }
        Err(DbError::Mysql {
            target: self.target.clone(),
            op,
            error: MysqlError(last.expect("at least one attempt")),
        })
    }

    fn insert(&self, s: &Stmt, params: ::mysql::Params) -> Result<Insert, DbError> {
        self.run(s.op, |c| match c.exec_drop(s.sql, params.clone()) {
            Ok(()) => Ok(Insert::Inserted),
            Err(e) if server_code(&e) == Some(ER_DUP_ENTRY) => Ok(Insert::Duplicate),
            Err(e) => Err(e),
        })
    }

    fn delete(&self, s: &Stmt, params: ::mysql::Params) -> Result<u64, DbError> {
        self.run(s.op, |c| {
            c.exec_drop(s.sql, params.clone())?;
            Ok(c.affected_rows())
        })
    }
}

/// A layer row's columns in order ([`sql::LAYER_COLS`]), for its insert and its delete.
fn layer_params(r: &LayerRow) -> ::mysql::Params {
    (&r.host, &r.repo, &r.chain_id, &r.data_digest, r.data_size).into()
}

/// A manifest row's columns in order ([`sql::MANIFEST_COLS`]), for its insert and its
/// delete.
fn manifest_params(r: &ManifestRow) -> ::mysql::Params {
    (
        &r.host,
        &r.repo,
        &r.src_digest,
        &r.out_digest,
        r.data_size,
        &r.mediatype,
    )
        .into()
}

impl Backend for MysqlBackend {
    fn describe(&self) -> String {
        format!("mysql {}", self.target)
    }

    fn insert_layer(&self, r: &LayerRow) -> Result<Insert, DbError> {
        self.insert(&sql::INSERT_LAYER, layer_params(r))
    }

    fn get_layer(
        &self,
        host: &str,
        repo: &str,
        chain_id: &str,
    ) -> Result<Option<LayerRow>, DbError> {
        let s = &sql::GET_LAYER;
        self.run(s.op, |c| {
            c.exec_first::<LayerTuple, _, _>(s.sql, (host, repo, chain_id))
        })
        .map(|r| r.map(layer_row))
    }

    fn get_layers(&self, host: &str, chain_id: &str) -> Result<Vec<LayerRow>, DbError> {
        let s = &sql::GET_LAYERS;
        self.run(s.op, |c| {
            c.exec::<LayerTuple, _, _>(s.sql, (host, chain_id))
        })
        .map(|v| v.into_iter().map(layer_row).collect())
    }

    fn delete_layer(&self, r: &LayerRow) -> Result<u64, DbError> {
        self.delete(&sql::DELETE_LAYER, layer_params(r))
    }

    fn insert_manifest(&self, r: &ManifestRow) -> Result<Insert, DbError> {
        self.insert(&sql::INSERT_MANIFEST, manifest_params(r))
    }

    fn get_manifest(
        &self,
        host: &str,
        repo: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Option<ManifestRow>, DbError> {
        let s = &sql::GET_MANIFEST;
        self.run(s.op, |c| {
            c.exec_first::<ManifestTuple, _, _>(s.sql, (host, repo, src_digest, mediatype))
        })
        .map(|r| r.map(manifest_row))
    }

    fn get_manifests(
        &self,
        host: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Vec<ManifestRow>, DbError> {
        let s = &sql::GET_MANIFESTS;
        self.run(s.op, |c| {
            c.exec::<ManifestTuple, _, _>(s.sql, (host, src_digest, mediatype))
        })
        .map(|v| v.into_iter().map(manifest_row).collect())
    }

    fn delete_manifest(&self, r: &ManifestRow) -> Result<u64, DbError> {
        self.delete(&sql::DELETE_MANIFEST, manifest_params(r))
    }
}
