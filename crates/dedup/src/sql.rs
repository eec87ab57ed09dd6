//! The statements both backends run, in the SQL that MySQL and SQLite share (`?`
//! placeholders), on upstream's two tables. Each carries the short name errors use.

/// One statement and the operation it is named by in errors.
pub(crate) struct Stmt {
    pub op: &'static str,
    pub sql: &'static str,
}

/// The columns of a row of `overlaybd_layers`, in the order the SELECTs return them.
pub(crate) const LAYER_COLS: &str = "host, repo, chain_id, data_digest, data_size";
/// The columns of a row of `overlaybd_manifests`, in the order the SELECTs return them.
pub(crate) const MANIFEST_COLS: &str = "host, repo, src_digest, out_digest, data_size, mediatype";

pub(crate) const INSERT_LAYER: Stmt = Stmt {
    op: "insert into overlaybd_layers",
    sql: "insert into overlaybd_layers(host, repo, chain_id, data_digest, data_size) values(?, ?, ?, ?, ?)",
};
/// Parameters: host, repo, chain_id.
pub(crate) const GET_LAYER: Stmt = Stmt {
    op: "select from overlaybd_layers",
    sql: "select host, repo, chain_id, data_digest, data_size from overlaybd_layers where host=? and repo=? and chain_id=?",
};
/// Parameters: host, chain_id.
pub(crate) const GET_LAYERS: Stmt = Stmt {
    op: "select from overlaybd_layers",
    sql: "select host, repo, chain_id, data_digest, data_size from overlaybd_layers where host=? and chain_id=?",
};
/// Parameters: the row's columns in order ([`LAYER_COLS`], as [`INSERT_LAYER`]): the
/// row as it was read, so that a row written since under the same key (by another
/// convertor) stays.
pub(crate) const DELETE_LAYER: Stmt = Stmt {
    op: "delete from overlaybd_layers",
    sql: "delete from overlaybd_layers where host=? and repo=? and chain_id=? and data_digest=? and data_size=?",
};

pub(crate) const INSERT_MANIFEST: Stmt = Stmt {
    op: "insert into overlaybd_manifests",
    sql: "insert into overlaybd_manifests(host, repo, src_digest, out_digest, data_size, mediatype) values(?, ?, ?, ?, ?, ?)",
};
/// Parameters: host, repo, src_digest, mediatype.
pub(crate) const GET_MANIFEST: Stmt = Stmt {
    op: "select from overlaybd_manifests",
    sql: "select host, repo, src_digest, out_digest, data_size, mediatype from overlaybd_manifests where host=? and repo=? and src_digest=? and mediatype=?",
};
/// Parameters: host, src_digest, mediatype.
pub(crate) const GET_MANIFESTS: Stmt = Stmt {
    op: "select from overlaybd_manifests",
    sql: "select host, repo, src_digest, out_digest, data_size, mediatype from overlaybd_manifests where host=? and src_digest=? and mediatype=?",
};
/// Parameters: the row's columns in order ([`MANIFEST_COLS`], as [`INSERT_MANIFEST`]):
/// the row as it was read (see [`DELETE_LAYER`]).
pub(crate) const DELETE_MANIFEST: Stmt = Stmt {
    op: "delete from overlaybd_manifests",
    sql: "delete from overlaybd_manifests where host=? and repo=? and src_digest=? and out_digest=? and data_size=? and mediatype=?",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_return_the_row_columns() {
        for (s, cols) in [
            (GET_LAYER, LAYER_COLS),
            (GET_LAYERS, LAYER_COLS),
            (GET_MANIFEST, MANIFEST_COLS),
            (GET_MANIFESTS, MANIFEST_COLS),
        ] {
            assert!(
                s.sql.starts_with(&format!("select {cols} from ")),
                "{}",
                s.sql
            );
        }
        for (s, cols) in [(INSERT_LAYER, LAYER_COLS), (INSERT_MANIFEST, MANIFEST_COLS)] {
            assert!(s.sql.contains(&format!("({cols}) values")), "{}", s.sql);
        }
    }

    /// The backends bind a row the same way for its insert and its delete.
    #[test]
    fn deletes_match_the_row_columns_in_insert_order() {
        for (s, cols) in [(DELETE_LAYER, LAYER_COLS), (DELETE_MANIFEST, MANIFEST_COLS)] {
            let cond = cols.replace(", ", "=? and ") + "=?";
            assert!(s.sql.ends_with(&format!(" where {cond}")), "{}", s.sql);
        }
    }
}
