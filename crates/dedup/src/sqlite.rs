//! SQLite backend: upstream's two tables in one database file, created on first use.
//!
//! The file is opened in WAL mode with a busy timeout, so convertor processes on one host can
//! share it; one connection per process, serialised by a mutex (every statement is a
//! single-row key lookup or write, microseconds long).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::sql::{self, Stmt};
use super::{Backend, DbError, Insert, LayerRow, ManifestRow};

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream schema in SQLite's dialect: same tables, columns, keys and index names.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS overlaybd_layers (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  chain_id varchar(255) NOT NULL,
  data_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  PRIMARY KEY (host, repo, chain_id)
);
CREATE INDEX IF NOT EXISTS index_registry_chainId ON overlaybd_layers (host, chain_id);
CREATE TABLE IF NOT EXISTS overlaybd_manifests (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  src_digest varchar(255) NOT NULL,
  out_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  mediatype varchar(255) NOT NULL,
  PRIMARY KEY (host, repo, src_digest, mediatype)
);
CREATE INDEX IF NOT EXISTS index_registry_src_digest ON overlaybd_manifests (host, src_digest, mediatype);
";

#[derive(Debug)]
pub(crate) struct SqliteBackend {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteBackend {
    /// Opens or creates the database file and the tables; fails if the file cannot be written.
    pub(crate) fn open(path: &Path) -> Result<SqliteBackend, DbError> {
        let fail = |problem: &str, error: Option<rusqlite::Error>| DbError::SqliteOpen {
            path: path.to_path_buf(),
            problem: (!problem.is_empty()).then(|| problem.to_string()),
            error,
        };
        let sqlite = |problem: &'static str| move |e| fail(problem, Some(e));
        if path.is_dir() {
            return Err(fail("it is a directory, not a database file", None));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|p| !p.is_dir()) {
            return Err(fail(
                &format!("directory {} does not exist", parent.display()),
                None,
            ));
        }
        // A new database file is created in its directory (and its -wal and -shm
        // files beside it): say so when that cannot be, rather than SQLite's
        // "unable to open database file".
        if path != Path::new(":memory:") && !path.exists() {
            let dir = parent.map_or_else(
                || std::env::current_dir().unwrap_or_else(|_| ".".into()),
                Path::to_path_buf,
            );
            if let Err(e) = nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK) {
                return Err(DbError::SqliteDir {
                    path: path.to_path_buf(),
                    dir,
                    error: e.into(),
                });
            }
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite(""))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite(""))?;
        if conn.is_readonly(rusqlite::MAIN_DB).map_err(sqlite(""))? {
            return Err(fail("the file is read-only", None));
        }
        // Another process creating the same file at the same moment can hold the lock
        // this needs; SQLite does not call the busy handler for a journal-mode change
        // (it could deadlock), so wait here, as long as the busy timeout.
        let started = std::time::Instant::now();
        let mode: String = loop {
            match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                        && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r.map_err(sqlite("cannot switch to WAL mode"))?,
            }
        };
        if !mode.eq_ignore_ascii_case("wal") && path != Path::new(":memory:") {
            return Err(fail(
                &format!("cannot switch to WAL mode (journal mode stays {mode:?})"),
                None,
            ));
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(sqlite(""))?;
        conn.execute_batch(SCHEMA)
            .map_err(sqlite("cannot create the tables"))?;
        // Prove we can write (a read-only directory or file system shows up here at the latest).
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(sqlite("not writable"))?;
        Ok(SqliteBackend {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// Runs `f` on the cached prepared statement `s`.
    fn with<T>(
        &self,
        s: &Stmt,
        f: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached(s.sql)
            .and_then(|mut st| f(&mut st))
            .map_err(|error| DbError::Sqlite {
                path: self.path.clone(),
                op: s.op,
                error,
            })
    }

    fn insert(
        &self,
        s: &Stmt,
        f: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<usize>,
    ) -> Result<Insert, DbError> {
        self.with(s, |st| match f(st) {
            Ok(_) => Ok(Insert::Inserted),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation
                    && e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Ok(Insert::Duplicate)
            }
            Err(e) => Err(e),
        })
    }
}

/// The text of a [`DbError::SqliteOpen`] after the path: what is wrong, if known (SQLite's
/// error, if any, is the source and follows).
pub(crate) fn open_problem(problem: &Option<String>, error: &Option<rusqlite::Error>) -> String {
    match (problem, error) {
        (Some(p), _) => format!(": {p}"),
        (None, Some(_)) => String::new(),
        (None, None) => ": unusable".into(),
    }
}

fn layer(r: &rusqlite::Row<'_>) -> rusqlite::Result<LayerRow> {
    Ok(LayerRow {
        host: r.get(0)?,
        repo: r.get(1)?,
        chain_id: r.get(2)?,
        data_digest: r.get(3)?,
        data_size: r.get(4)?,
    })
}

fn manifest(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManifestRow> {
    Ok(ManifestRow {
        host: r.get(0)?,
        repo: r.get(1)?,
        src_digest: r.get(2)?,
        out_digest: r.get(3)?,
        data_size: r.get(4)?,
        mediatype: r.get(5)?,
    })
}

/// A layer row's columns in order ([`sql::LAYER_COLS`]), for its insert and its delete.
fn layer_params(r: &LayerRow) -> [&dyn rusqlite::ToSql; 5] {
    [&r.host, &r.repo, &r.chain_id, &r.data_digest, &r.data_size]
}

/// A manifest row's columns in order ([`sql::MANIFEST_COLS`]), for its insert and its
/// delete.
fn manifest_params(r: &ManifestRow) -> [&dyn rusqlite::ToSql; 6] {
    [
        &r.host,
        &r.repo,
        &r.src_digest,
        &r.out_digest,
        &r.data_size,
        &r.mediatype,
    ]
}

impl Backend for SqliteBackend {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn insert_layer(&self, r: &LayerRow) -> Result<Insert, DbError> {
        self.insert(&sql::INSERT_LAYER, |st| st.execute(layer_params(r)))
    }

    fn get_layer(
        &self,
        host: &str,
        repo: &str,
        chain_id: &str,
    ) -> Result<Option<LayerRow>, DbError> {
        self.with(&sql::GET_LAYER, |st| {
            st.query_row(params![host, repo, chain_id], layer)
                .optional()
        })
    }

    fn get_layers(&self, host: &str, chain_id: &str) -> Result<Vec<LayerRow>, DbError> {
        self.with(&sql::GET_LAYERS, |st| {
            st.query_map(params![host, chain_id], layer)?.collect()
        })
    }

    fn delete_layer(&self, r: &LayerRow) -> Result<u64, DbError> {
        self.with(&sql::DELETE_LAYER, |st| {
            st.execute(layer_params(r)).map(|n| n as u64)
        })
    }

    fn insert_manifest(&self, r: &ManifestRow) -> Result<Insert, DbError> {
        self.insert(&sql::INSERT_MANIFEST, |st| st.execute(manifest_params(r)))
    }

    fn get_manifest(
        &self,
        host: &str,
        repo: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Option<ManifestRow>, DbError> {
        self.with(&sql::GET_MANIFEST, |st| {
            st.query_row(params![host, repo, src_digest, mediatype], manifest)
                .optional()
        })
    }

    fn get_manifests(
        &self,
        host: &str,
        src_digest: &str,
        mediatype: &str,
    ) -> Result<Vec<ManifestRow>, DbError> {
        self.with(&sql::GET_MANIFESTS, |st| {
            st.query_map(params![host, src_digest, mediatype], manifest)?
                .collect()
        })
    }

    fn delete_manifest(&self, r: &ManifestRow) -> Result<u64, DbError> {
        self.with(&sql::DELETE_MANIFEST, |st| {
            st.execute(manifest_params(r)).map(|n| n as u64)
        })
    }
}
