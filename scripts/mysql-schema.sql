-- Dedup tables of the overlaybd convertor (`--db-type mysql`).
--
-- Exactly the schema of upstream accelerated-container-image
-- (cmd/convertor/resources/samples/mysql.conf), so an existing upstream database can be shared:
-- upstream convertors and ours use the same tables without touching each other's rows, because
-- our rows store chain_id / src_digest as "<format key>#<digest>" (see README, "Deduplication").
-- No migration is needed for a database created by upstream's sample.
--
-- Apply inside the target database, e.g.
--   mariadb conversioncache < scripts/mysql-schema.sql
-- or let scripts/mysql-setup.sh create the database, the tables and a user.
-- Idempotent: safe to run again.

CREATE TABLE IF NOT EXISTS overlaybd_layers (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  chain_id varchar(255) NOT NULL COMMENT 'chain-id of the normal image layer',
  data_digest varchar(255) NOT NULL COMMENT 'digest of overlaybd layer',
  data_size bigint(20) NOT NULL COMMENT 'size of overlaybd layer',
  PRIMARY KEY (host, repo, chain_id),
  KEY index_registry_chainId (host, chain_id) USING BTREE
) DEFAULT CHARSET=utf8;

CREATE TABLE IF NOT EXISTS overlaybd_manifests (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  src_digest varchar(255) NOT NULL COMMENT 'digest of the normal image manifest',
  out_digest varchar(255) NOT NULL COMMENT 'digest of overlaybd manifest',
  data_size bigint(20) NOT NULL COMMENT 'size of overlaybd manifest',
  mediatype varchar(255) NOT NULL COMMENT 'mediatype of the converted image manifest',
  PRIMARY KEY (host, repo, src_digest, mediatype),
  KEY index_registry_src_digest (host, src_digest, mediatype) USING BTREE
) DEFAULT CHARSET=utf8;
