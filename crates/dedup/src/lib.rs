//! Layer and manifest deduplication database (upstream's `--db-type` / `--db-str`).
//!
//! Storage layout: the two tables of upstream accelerated-container-image, unchanged:
//!
//! ```text
//! overlaybd_layers    (host, repo, chain_id, data_digest, data_size)         PK (host, repo, chain_id)
//!                      index index_registry_chainId (host, chain_id)
//! overlaybd_manifests (host, repo, src_digest, out_digest, data_size, mediatype)
//!                      PK (host, repo, src_digest, mediatype)
//!                      index index_registry_src_digest (host, src_digest, mediatype)
//! ```
//!
//! `host` is the registry host as typed (with `:port`), `repo` the repository path without the
//! host, `chain_id` the OCI chain ID of the **source** layers up to this one, `data_digest` /
//! `data_size` the converted (overlaybd) blob, `src_digest` the source manifest digest,
//! `out_digest` the converted manifest, `mediatype` the converted manifest's media type.
//!
//! Format versioning (upstream issue #250): every key we write or look up is namespaced by a
//! *format key* given at [`open`]: `chain_id` is stored as `<format>#<chain id>` and `src_digest`
//! as `<format>#<manifest digest>`. Upstream convertors query with the bare digest, so they never
//! see our rows, and we never see theirs nor the rows of another format version: a different
//! output format can never reuse a stale layer. No schema change, no migration; rows of other
//! formats are left alone (they are misses for us, never deleted). The entries handed out by the
//! [`ConversionDatabase`] methods carry the bare digests.
//!
//! Backends: `mysql` (go-sql-driver DSN, see [`dsn`]) and `sqlite` (a file path; the tables are
//! created on first use, WAL mode, so several processes on one host can share the file). Each
//! is a cargo feature of this crate (both on by default); [`open`] refuses a backend the build
//! does not have.

pub mod dsn;
#[cfg(feature = "mysql")]
mod mysql;
pub mod resolve;
#[cfg(any(feature = "mysql", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "mysql")]
pub use mysql::MysqlError;

use std::fmt;
use std::path::PathBuf;

/// The longest value a `varchar(255)` column of the upstream schema takes. Longer values are
/// rejected before any query (MySQL in non-strict mode would silently truncate them).
pub const MAX_COLUMN_CHARS: usize = 255;

/// Longest accepted format key.
pub const MAX_FORMAT_CHARS: usize = 100;

/// Separator between the format key and the digest in the stored `chain_id` / `src_digest`.
pub const FORMAT_SEPARATOR: char = '#';

/// A converted layer: the overlaybd blob `converted_digest` made from the source layers whose
/// chain ID is `chain_id`, stored in `host/repository`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    pub host: String,
    pub repository: String,
    pub chain_id: String,
    pub converted_digest: String,
    pub data_size: u64,
}

/// A converted manifest: source manifest `original_digest` converted to `converted_digest`
/// (media type `media_type`, `data_size` bytes) in `host/repository`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub host: String,
    pub repository: String,
    pub original_digest: String,
    pub media_type: String,
    pub converted_digest: String,
    pub data_size: u64,
}

/// Result of a store (`create_*_entry`).
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome<E> {
    /// A new row was written.
    Inserted,
    /// Another worker stored the same key with the same digest and size first (a race between
    /// convertors on the same image, which is harmless: the output is deterministic).
    AlreadyPresent,
    /// Another worker stored the same key with a **different** digest or size. The stored row is
    /// kept; ours is dropped. With deterministic conversion this means two convertors of the
    /// same format key produced different bytes: report it, it is a bug or a misconfiguration.
    Conflict { existing: E },
}

impl<E> StoreOutcome<E> {
    /// The same outcome, with the conflicting entry mapped by `f`.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> StoreOutcome<F> {
        match self {
            StoreOutcome::Inserted => StoreOutcome::Inserted,
            StoreOutcome::AlreadyPresent => StoreOutcome::AlreadyPresent,
            StoreOutcome::Conflict { existing } => StoreOutcome::Conflict {
                existing: f(existing),
            },
        }
    }
}

/// Errors of the dedup database. Messages never contain the database password. The
/// driver's or parser's error is the `source()`, not part of the message (print the chain,
/// as [`with_causes`] does).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unknown --db-type {0:?} (expected mysql, sqlite, or none)")]
    UnknownType(String),
    #[error("--db-type {0} needs --db-str ({1})")]
    MissingDbStr(&'static str, &'static str),
    #[error("invalid MySQL --db-str {dsn:?}")]
    BadDsn {
        /// The DSN with the password replaced by `***`.
        dsn: String,
        #[source]
        error: dsn::DsnError,
    },
    /// The server cannot be reached or refuses us; `hint` names the usual fix.
    #[cfg(feature = "mysql")]
    #[error("cannot connect to MySQL {target}{hint}")]
    MysqlConnect {
        target: String,
        #[source]
        error: MysqlError,
        hint: &'static str,
    },
    #[error("cannot connect to MySQL {target}: the server does not offer TLS, which tls= in --db-str requires")]
    MysqlNoTls { target: String },
    /// The endpoint accepted the connection but did not greet as a MySQL server.
    /// `error` is the socket's error when one cut the wait short (not shown
    /// by Display: it is the source).
    #[error("cannot connect to MySQL {target}: {reason} (is it a MySQL or MariaDB server? timeout= in --db-str sets the wait)")]
    MysqlNoGreeting {
        target: String,
        reason: String,
        #[source]
        error: Option<std::io::Error>,
    },
    /// A dedup table cannot be used (missing, unreadable, other columns).
    #[cfg(feature = "mysql")]
    #[error(
        "MySQL {target} is not ready for dedup: {}",
        mysql::schema_problem(table, error)
    )]
    MysqlSchema {
        target: String,
        table: &'static str,
        #[source]
        error: MysqlError,
    },
    #[cfg(feature = "mysql")]
    #[error("MySQL {target}: {op}")]
    Mysql {
        target: String,
        op: &'static str,
        #[source]
        error: MysqlError,
    },
    /// The SQLite file cannot be opened, created, switched to WAL mode or written.
    #[cfg(feature = "sqlite")]
    #[error("cannot use SQLite database {}{}", path.display(), sqlite::open_problem(problem, error))]
    SqliteOpen {
        path: PathBuf,
        problem: Option<String>,
        #[source]
        error: Option<rusqlite::Error>,
    },
    /// A new SQLite file cannot be created: its directory is not writable.
    #[cfg(feature = "sqlite")]
    #[error(
        "cannot create SQLite database {}: directory {} is not writable by this process (SQLite creates the file and its -wal and -shm files there)",
        path.display(),
        dir.display()
    )]
    SqliteDir {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[cfg(feature = "sqlite")]
    #[error("SQLite database {}: {op}", path.display())]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        #[source]
        error: rusqlite::Error,
    },
    #[error(
        "--db-type {0}: this build has no {0} support (cargo feature `{0}` of overlaybd-dedup)"
    )]
    NotBuilt(&'static str),
    #[error("invalid dedup format key {value:?}: {reason}")]
    BadFormat { value: String, reason: &'static str },
    #[error("invalid {what} {value:?} for the dedup database: {reason}")]
    BadValue {
        what: &'static str,
        value: String,
        reason: String,
    },
}

impl DbError {
    /// Whether the database did not answer in time: a MySQL server that stopped answering
    /// (its connect, read or write timeout), an SQLite file whose lock another process kept
    /// past the busy timeout. The next statement would most likely wait as long.
    pub fn is_timeout(&self) -> bool {
        match self {
            #[cfg(feature = "mysql")]
            DbError::Mysql { error, .. } | DbError::MysqlConnect { error, .. } => {
                error.is_timeout()
            }
            #[cfg(feature = "sqlite")]
            DbError::Sqlite {
                error: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => matches!(e.code, rusqlite::ErrorCode::DatabaseBusy),
            _ => false,
        }
    }
}

/// An error and its causes on one line (`error: cause: cause`), as the tools print errors.
///
/// ```
/// let e = obddedup::check_settings("mysql", "u:p@tcp(127.0.0.1:3306").unwrap_err();
/// assert_eq!(e.to_string(), "invalid MySQL --db-str \"u:***@tcp(127.0.0.1:3306\"");
/// let line = obddedup::with_causes(&e);
/// assert!(line.starts_with("invalid MySQL --db-str \"u:***@tcp(127.0.0.1:3306\": no '/' "), "{line}");
/// ```
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

/// Key of a layer row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerKey<'a> {
    pub host: &'a str,
    pub repository: &'a str,
    pub chain_id: &'a str,
}

/// Key of a manifest row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestKey<'a> {
    pub host: &'a str,
    pub repository: &'a str,
    pub original_digest: &'a str,
    /// Media type of the **converted** manifest.
    pub media_type: &'a str,
}

/// Upstream's `ConversionDatabase`, synchronous. Lookups return what is stored for our format
/// key only; rows of other format keys or of upstream convertors are invisible.
///
/// Every method talks to the database; callers on the conversion path should treat errors as a
/// miss (dedup is an optimisation) and log them, as [`resolve`] does.
pub trait ConversionDatabase: Send + Sync + fmt::Debug {
    /// `mysql user@tcp(host:port)/db` or `sqlite /path`, for logs (never the password).
    fn describe(&self) -> String;
    /// The format key rows are namespaced with.
    fn format_key(&self) -> &str;

    fn create_layer_entry(&self, entry: &LayerEntry) -> Result<StoreOutcome<LayerEntry>, DbError>;
    fn get_layer_entry_for_repo(&self, key: LayerKey<'_>) -> Result<Option<LayerEntry>, DbError>;
    /// All repositories of `host` holding a layer converted from `chain_id` (including
    /// `key`'s own repository when it has one).
    fn get_cross_repo_layer_entries(
        &self,
        host: &str,
        chain_id: &str,
    ) -> Result<Vec<LayerEntry>, DbError>;
    /// Deletes the row `entry` was read as: only while the row of its key still names its
    /// converted digest and size, so that a row another convertor wrote meanwhile under
    /// that key stays. Returns whether a row was deleted.
    fn delete_layer_entry(&self, entry: &LayerEntry) -> Result<bool, DbError>;

    fn create_manifest_entry(
        &self,
        entry: &ManifestEntry,
    ) -> Result<StoreOutcome<ManifestEntry>, DbError>;
    fn get_manifest_entry_for_repo(
        &self,
        key: ManifestKey<'_>,
    ) -> Result<Option<ManifestEntry>, DbError>;
    fn get_cross_repo_manifest_entries(
        &self,
        host: &str,
        media_type: &str,
        original_digest: &str,
    ) -> Result<Vec<ManifestEntry>, DbError>;
    /// Deletes the row `entry` was read as (see [`ConversionDatabase::delete_layer_entry`]).
    fn delete_manifest_entry(&self, entry: &ManifestEntry) -> Result<bool, DbError>;
}

/// `--help` text for the convertor's `--db-type` flag.
pub const DB_TYPE_HELP: &str = "Dedup database type: mysql, sqlite, or none. Empty (the default) with an empty \
--db-str disables dedup; empty with --db-str set means mysql for a DSN like user:pass@tcp(host:port)/db and \
sqlite for anything else (a file path)";

/// `--help` text for the convertor's `--db-str` flag.
pub const DB_STR_HELP: &str = "Dedup database: for mysql a go-sql-driver DSN \
user:pass@tcp(host:port)/dbname (or unix(/socket)), tables from scripts/mysql-schema.sql; for sqlite the \
database file path (created if missing). Converted layers and manifests recorded there are reused instead of \
converted again";

/// Which backend `--db-type` / `--db-str` select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbKind {
    Mysql,
    Sqlite,
}

/// Decides the backend from the flags, without opening anything:
/// - both empty, or `--db-type none`: `None` (no dedup, upstream's default);
/// - `--db-type mysql` / `sqlite`: that backend; `--db-str` must be set;
/// - `--db-type` empty and `--db-str` set: `mysql` when the string is a go-sql-driver DSN with an
///   explicit network (`...@tcp(...)/db`, `...@unix(...)/db`), otherwise `sqlite` (a file path).
pub fn select_kind(db_type: &str, db_str: &str) -> Result<Option<DbKind>, DbError> {
    match db_type.trim() {
        "" if db_str.is_empty() => Ok(None),
        "" if dsn::looks_like_mysql_dsn(db_str) => Ok(Some(DbKind::Mysql)),
        "" => Ok(Some(DbKind::Sqlite)),
        "none" => Ok(None),
        t if t.eq_ignore_ascii_case("mysql") => {
            if db_str.is_empty() {
                return Err(DbError::MissingDbStr(
                    "mysql",
                    "a DSN such as user:pass@tcp(127.0.0.1:3306)/conversioncache",
                ));
            }
            Ok(Some(DbKind::Mysql))
        }
        t if t.eq_ignore_ascii_case("sqlite") || t.eq_ignore_ascii_case("sqlite3") => {
            if db_str.is_empty() {
                return Err(DbError::MissingDbStr(
                    "sqlite",
                    "the path of the database file, created if missing",
                ));
            }
            Ok(Some(DbKind::Sqlite))
        }
        other => Err(DbError::UnknownType(other.to_string())),
    }
}

/// [`select_kind`], and for MySQL the DSN parsed too: every setting that can be wrong whatever
/// the database holds (a usage error), checked without connecting.
pub fn check_settings(db_type: &str, db_str: &str) -> Result<Option<DbKind>, DbError> {
    let kind = select_kind(db_type, db_str)?;
    if kind == Some(DbKind::Mysql) {
        parse_dsn(db_str)?;
    }
    Ok(kind)
}

fn parse_dsn(db_str: &str) -> Result<dsn::Dsn, DbError> {
    dsn::Dsn::parse(db_str).map_err(|error| DbError::BadDsn {
        dsn: dsn::redact(db_str),
        error,
    })
}

/// Opens the dedup database named by `--db-type` / `--db-str` (see [`select_kind`]), connects,
/// and checks that the tables are usable, so that a bad setting fails before any conversion
/// work. `format_key` namespaces every row (see the module doc); pass the tool's output format
/// version plus anything else that changes the converted bytes (see [`format_key`]). `Ok(None)` means dedup is off.
pub fn open(
    db_type: &str,
    db_str: &str,
    format_key: &str,
) -> Result<Option<Box<dyn ConversionDatabase>>, DbError> {
    let Some(kind) = select_kind(db_type, db_str)? else {
        return Ok(None);
    };
    if db_type.trim().is_empty() {
        tracing::info!(
            "dedup: --db-type not given, treating --db-str as {}",
            match kind {
                DbKind::Mysql => "a MySQL DSN",
                DbKind::Sqlite => "an SQLite file path",
            }
        );
    }
    validate_format_key(format_key)?;
    let backend: Box<dyn Backend> = match kind {
        DbKind::Mysql => connect_mysql(&parse_dsn(db_str)?)?,
        DbKind::Sqlite => open_sqlite(db_str.as_ref())?,
    };
    Ok(Some(Box::new(Database {
        backend,
        format: format_key.to_string(),
    })))
}

#[cfg(feature = "mysql")]
fn connect_mysql(dsn: &dsn::Dsn) -> Result<Box<dyn Backend>, DbError> {
    Ok(Box::new(mysql::MysqlBackend::connect(dsn)?))
}

#[cfg(not(feature = "mysql"))]
fn connect_mysql(_: &dsn::Dsn) -> Result<Box<dyn Backend>, DbError> {
    Err(DbError::NotBuilt("mysql"))
}

#[cfg(feature = "sqlite")]
fn open_sqlite(path: &std::path::Path) -> Result<Box<dyn Backend>, DbError> {
    Ok(Box::new(sqlite::SqliteBackend::open(path)?))
}

#[cfg(not(feature = "sqlite"))]
fn open_sqlite(_: &std::path::Path) -> Result<Box<dyn Backend>, DbError> {
    Err(DbError::NotBuilt("sqlite"))
}

/// Builds a format key: the tool's output format version followed by `;name=value` for each
/// conversion option that changes the converted bytes, e.g.
/// `format_key("overlaybd-rs/1", &[("vsize", "64"), ("mkfs", "true")])` is
/// `"overlaybd-rs/1;vsize=64;mkfs=true"`. [`open`] validates the result.
pub fn format_key(version: &str, options: &[(&str, &str)]) -> String {
    let mut k = version.to_string();
    for (name, value) in options {
        k.push(';');
        k.push_str(name);
        k.push('=');
        k.push_str(value);
    }
    k
}

fn validate_format_key(f: &str) -> Result<(), DbError> {
    let bad = |reason| {
        Err(DbError::BadFormat {
            value: f.to_string(),
            reason,
        })
    };
    if f.is_empty() {
        return bad("it is empty (an empty key would share rows with upstream convertors)");
    }
    if f.chars().count() > MAX_FORMAT_CHARS {
        return bad("longer than 100 characters");
    }
    if !f
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/+=,;-".contains(c))
    {
        // Lower case only: MySQL compares with a case-insensitive collation.
        return bad("only lower-case ASCII letters, digits and . _ / + = , ; - are allowed");
    }
    Ok(())
}

fn check_value(what: &'static str, v: &str) -> Result<(), DbError> {
    let bad = |reason: String| {
        Err(DbError::BadValue {
            what,
            value: v.chars().take(300).collect(),
            reason,
        })
    };
    if v.is_empty() {
        return bad("empty".into());
    }
    if v.chars().count() > MAX_COLUMN_CHARS {
        return bad(format!(
            "longer than the {MAX_COLUMN_CHARS} characters of the column"
        ));
    }
    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("contains white space or control characters".into());
    }
    Ok(())
}

/// OCI digest grammar: `algorithm ":" encoded`, algorithm `[a-z0-9]+([+._-][a-z0-9]+)*`,
/// encoded `[a-zA-Z0-9=_-]+`.
fn check_digest(what: &'static str, v: &str) -> Result<(), DbError> {
    check_value(what, v)?;
    let ok = v.split_once(':').is_some_and(|(alg, enc)| {
        !alg.is_empty()
            && !enc.is_empty()
            && alg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
            && enc
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c))
    });
    if ok {
        Ok(())
    } else {
        Err(DbError::BadValue {
            what,
            value: v.to_string(),
            reason: "not a digest of the form algorithm:hex".into(),
        })
    }
}

fn check_size(v: u64) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::BadValue {
        what: "data size",
        value: v.to_string(),
        reason: "does not fit the bigint column".into(),
    })
}

/// A row of `overlaybd_layers`, columns as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LayerRow {
    pub host: String,
    pub repo: String,
    pub chain_id: String,
    pub data_digest: String,
    pub data_size: i64,
}

/// A row of `overlaybd_manifests`, columns as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ManifestRow {
    pub host: String,
    pub repo: String,
    pub src_digest: String,
    pub out_digest: String,
    pub data_size: i64,
    pub mediatype: String,
}

/// Whether an INSERT wrote a row or hit an existing primary key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Insert {
    Inserted,
    Duplicate,
}

/// Raw row access on the exact upstream tables; namespacing and validation happen in
/// [`Database`].
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    fn describe(&self) -> String;
    fn insert_layer(&self, row: &LayerRow) -> Result<Insert, DbError>;
    fn get_layer(
        &self,
        host: &str,
        repo: &str,
        chain_id: &str,
    ) -> Result<Option<LayerRow>, DbError>;
    fn get_layers(&self, host: &str, chain_id: &str) -> Result<Vec<LayerRow>, DbError>;
    /// Deletes `row` if it is still stored exactly so.
    fn delete_layer(&self, row: &LayerRow) -> Result<u64, DbError>;
    fn insert_manifest(&self, row: &ManifestRow) -> Result<Insert, DbError>;
    fn get_manifest(
        &self,
        host: &str,
        repo: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Option<ManifestRow>, DbError>;
    fn get_manifests(
        &self,
        host: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Vec<ManifestRow>, DbError>;
    /// Deletes `row` if it is still stored exactly so.
    fn delete_manifest(&self, row: &ManifestRow) -> Result<u64, DbError>;
}

/// A backend plus the format key: the [`ConversionDatabase`] handed out by [`open`].
#[derive(Debug)]
struct Database {
    backend: Box<dyn Backend>,
    format: String,
}

/// How often a store retries when the conflicting row vanished between the failed INSERT and
/// the SELECT (a concurrent delete of a stale row).
const STORE_ATTEMPTS: usize = 3;

impl Database {
    fn ns(&self, digest: &str) -> Result<String, DbError> {
        let v = format!("{}{FORMAT_SEPARATOR}{digest}", self.format);
        if v.chars().count() > MAX_COLUMN_CHARS {
            return Err(DbError::BadValue {
                what: "digest",
                value: digest.to_string(),
                reason: format!(
                    "with the format key it is longer than the {MAX_COLUMN_CHARS} characters of the column"
                ),
            });
        }
        Ok(v)
    }

    fn strip<'v>(&self, stored: &'v str) -> Option<&'v str> {
        stored
            .strip_prefix(self.format.as_str())?
            .strip_prefix(FORMAT_SEPARATOR)
    }

    fn layer_key(&self, key: LayerKey<'_>) -> Result<String, DbError> {
        check_value("registry host", key.host)?;
        check_value("repository", key.repository)?;
        check_digest("chain id", key.chain_id)?;
        self.ns(key.chain_id)
    }

    fn manifest_key(&self, key: ManifestKey<'_>) -> Result<String, DbError> {
        check_value("registry host", key.host)?;
        check_value("repository", key.repository)?;
        check_value("media type", key.media_type)?;
        check_digest("manifest digest", key.original_digest)?;
        self.ns(key.original_digest)
    }

    /// The stored row of `entry` (its key namespaced), its values checked.
    fn layer_row(&self, entry: &LayerEntry) -> Result<LayerRow, DbError> {
        let key = LayerKey {
            host: &entry.host,
            repository: &entry.repository,
            chain_id: &entry.chain_id,
        };
        let row = LayerRow {
            host: entry.host.clone(),
            repo: entry.repository.clone(),
            chain_id: self.layer_key(key)?,
            data_digest: entry.converted_digest.clone(),
            data_size: check_size(entry.data_size)?,
        };
        check_digest("converted layer digest", &row.data_digest)?;
        Ok(row)
    }

    /// The stored row of `entry` (its key namespaced), its values checked.
    fn manifest_row(&self, entry: &ManifestEntry) -> Result<ManifestRow, DbError> {
        let key = ManifestKey {
            host: &entry.host,
            repository: &entry.repository,
            original_digest: &entry.original_digest,
            media_type: &entry.media_type,
        };
        let row = ManifestRow {
            host: entry.host.clone(),
            repo: entry.repository.clone(),
            src_digest: self.manifest_key(key)?,
            out_digest: entry.converted_digest.clone(),
            data_size: check_size(entry.data_size)?,
            mediatype: entry.media_type.clone(),
        };
        check_digest("converted manifest digest", &row.out_digest)?;
        Ok(row)
    }

    fn layer_entry(&self, row: LayerRow) -> Option<LayerEntry> {
        Some(LayerEntry {
            chain_id: self.strip(&row.chain_id)?.to_string(),
            host: row.host,
            repository: row.repo,
            converted_digest: row.data_digest,
            data_size: u64::try_from(row.data_size).ok()?,
        })
    }

    fn manifest_entry(&self, row: ManifestRow) -> Option<ManifestEntry> {
        Some(ManifestEntry {
            original_digest: self.strip(&row.src_digest)?.to_string(),
            host: row.host,
            repository: row.repo,
            media_type: row.mediatype,
            converted_digest: row.out_digest,
            data_size: u64::try_from(row.data_size).ok()?,
        })
    }
}

impl ConversionDatabase for Database {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn format_key(&self) -> &str {
        &self.format
    }

    fn create_layer_entry(&self, entry: &LayerEntry) -> Result<StoreOutcome<LayerEntry>, DbError> {
        let row = self.layer_row(entry)?;
        for _ in 0..STORE_ATTEMPTS {
            if self.backend.insert_layer(&row)? == Insert::Inserted {
                return Ok(StoreOutcome::Inserted);
            }
            let existing = self
                .backend
                .get_layer(&row.host, &row.repo, &row.chain_id)?;
            let Some(existing) = existing else { continue };
            if existing.data_digest == row.data_digest && existing.data_size == row.data_size {
                return Ok(StoreOutcome::AlreadyPresent);
            }
            if let Some(existing) = self.layer_entry(existing) {
                return Ok(StoreOutcome::Conflict { existing });
            }
        }
        Err(DbError::BadValue {
            what: "layer row",
            value: format!("{}/{} {}", entry.host, entry.repository, entry.chain_id),
            reason: "the key stays taken by a row that keeps disappearing; giving up".into(),
        })
    }

    fn get_layer_entry_for_repo(&self, key: LayerKey<'_>) -> Result<Option<LayerEntry>, DbError> {
        let chain = self.layer_key(key)?;
        Ok(self
            .backend
            .get_layer(key.host, key.repository, &chain)?
            .and_then(|r| self.layer_entry(r)))
    }

    fn get_cross_repo_layer_entries(
        &self,
        host: &str,
        chain_id: &str,
    ) -> Result<Vec<LayerEntry>, DbError> {
        check_value("registry host", host)?;
        check_digest("chain id", chain_id)?;
        let chain = self.ns(chain_id)?;
        Ok(self
            .backend
            .get_layers(host, &chain)?
            .into_iter()
            .filter_map(|r| self.layer_entry(r))
            .collect())
    }

    fn delete_layer_entry(&self, entry: &LayerEntry) -> Result<bool, DbError> {
        Ok(self.backend.delete_layer(&self.layer_row(entry)?)? > 0)
    }

    fn create_manifest_entry(
        &self,
        entry: &ManifestEntry,
    ) -> Result<StoreOutcome<ManifestEntry>, DbError> {
        let row = self.manifest_row(entry)?;
        for _ in 0..STORE_ATTEMPTS {
            if self.backend.insert_manifest(&row)? == Insert::Inserted {
                return Ok(StoreOutcome::Inserted);
            }
            let existing =
                self.backend
                    .get_manifest(&row.host, &row.repo, &row.src_digest, &row.mediatype)?;
            let Some(existing) = existing else { continue };
            if existing.out_digest == row.out_digest && existing.data_size == row.data_size {
                return Ok(StoreOutcome::AlreadyPresent);
            }
            if let Some(existing) = self.manifest_entry(existing) {
                return Ok(StoreOutcome::Conflict { existing });
            }
        }
        Err(DbError::BadValue {
            what: "manifest row",
            value: format!(
                "{}/{} {}",
                entry.host, entry.repository, entry.original_digest
            ),
            reason: "the key stays taken by a row that keeps disappearing; giving up".into(),
        })
    }

    fn get_manifest_entry_for_repo(
        &self,
        key: ManifestKey<'_>,
    ) -> Result<Option<ManifestEntry>, DbError> {
        let src = self.manifest_key(key)?;
        Ok(self
            .backend
            .get_manifest(key.host, key.repository, &src, key.media_type)?
            .and_then(|r| self.manifest_entry(r)))
    }

    fn get_cross_repo_manifest_entries(
        &self,
        host: &str,
        media_type: &str,
        original_digest: &str,
    ) -> Result<Vec<ManifestEntry>, DbError> {
        check_value("registry host", host)?;
        check_value("media type", media_type)?;
        check_digest("manifest digest", original_digest)?;
        let src = self.ns(original_digest)?;
        Ok(self
            .backend
            .get_manifests(host, &src, media_type)?
            .into_iter()
            .filter_map(|r| self.manifest_entry(r))
            .collect())
    }

    fn delete_manifest_entry(&self, entry: &ManifestEntry) -> Result<bool, DbError> {
        Ok(self.backend.delete_manifest(&self.manifest_row(entry)?)? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_selection() {
        assert_eq!(select_kind("", "").unwrap(), None);
        assert_eq!(select_kind("none", "").unwrap(), None);
        assert_eq!(
            select_kind("", "u:p@tcp(h:1)/db").unwrap(),
            Some(DbKind::Mysql)
        );
        assert_eq!(
            select_kind("", "/var/cache/dedup.db").unwrap(),
            Some(DbKind::Sqlite)
        );
        assert_eq!(select_kind("mysql", "/db").unwrap(), Some(DbKind::Mysql));
        assert_eq!(select_kind("sqlite", "x.db").unwrap(), Some(DbKind::Sqlite));
        let e = select_kind("mysql", "").unwrap_err().to_string();
        assert!(e.contains("--db-type mysql needs --db-str"), "{e}");
        let e = select_kind("postgres", "x").unwrap_err().to_string();
        assert!(e.contains("unknown --db-type \"postgres\""), "{e}");
    }

    #[test]
    fn format_keys() {
        let k = format_key("overlaybd-rs/1", &[("vsize", "64"), ("mkfs", "true")]);
        assert_eq!(k, "overlaybd-rs/1;vsize=64;mkfs=true");
        assert!(validate_format_key(&k).is_ok());
        for bad in ["", "a#b", "a b", "a:b", "Obd/1", &"x".repeat(101)] {
            assert!(validate_format_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests() {
        assert!(check_digest("d", &format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(check_digest("d", "sha512:AbC=_-").is_ok());
        for bad in [
            "",
            "sha256",
            ":abc",
            "sha256:",
            "SHA256:abc",
            "sha256:a b",
            "sha256:a:b",
        ] {
            assert!(check_digest("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn a_busy_sqlite_file_is_a_timeout() {
        let sqlite = |code| DbError::Sqlite {
            path: "/x.db".into(),
            op: "select from overlaybd_layers",
            error: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        };
        assert!(sqlite(rusqlite::ffi::SQLITE_BUSY).is_timeout());
        // A lock conflict inside one connection, not a wait past the busy timeout.
        assert!(!sqlite(rusqlite::ffi::SQLITE_LOCKED).is_timeout());
        assert!(!sqlite(rusqlite::ffi::SQLITE_CORRUPT).is_timeout());
        assert!(!DbError::UnknownType("x".into()).is_timeout());
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn open_errors_name_the_problem() {
        let e = open("mysql", "u:topsecret@tcp(h:1)", "f/1").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("invalid MySQL --db-str"), "{msg}");
        assert!(msg.contains("u:***@tcp(h:1)"), "{msg}");
        assert!(!msg.contains("topsecret"), "{msg}");
        // The DSN parser's and SQLite's errors are the source, not in the message: printed
        // with the causes, they appear once.
        let once = |e: &DbError| {
            let source = std::error::Error::source(e).expect("a source").to_string();
            let line = with_causes(e);
            assert!(!e.to_string().contains(&source), "{line}");
            assert_eq!(line.matches(&source).count(), 1, "{line}");
            line
        };
        assert!(once(&e).contains("no '/' before the database name"));
        let e = open("sqlite", "/proc/obd-dedup-test.sqlite", "f/1").unwrap_err();
        let line = once(&e);
        assert!(
            line.starts_with("cannot use SQLite database /proc/obd-dedup-test.sqlite: ")
                && line.contains("unable to open database file"),
            "{line}"
        );
        let e = open("sqlite", "/nonexistent-dir/x/y.db", "f/1").unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x/y.db"), "{e}");
        let e = open("sqlite", "/tmp/whatever.db", "").unwrap_err();
        assert!(e.to_string().contains("format key"), "{e}");
    }
}
