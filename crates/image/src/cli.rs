//! The options of a lazily loaded registry image, as `overlaybd-fuse mount`
//! and `overlaybd-nbd serve` take them (registry flags spelled as the
//! convertor's).

use std::path::PathBuf;
use std::time::Duration;

use obdregistry::{ClientOptions, Credentials};

use crate::error::{Error, Result};
use crate::remote::FetchOptions;
use crate::source::RemoteOptions;

/// The help section of these options.
const HEADING: &str = "Registry images (lazy loading)";

/// Registry access and the local chunk cache.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Registry credentials `user:password` (split at the first ':'); without
    /// -u, Docker's config.json (auths, credHelpers, credsStore) is used.
    #[arg(help_heading = HEADING, short = 'u', long, value_name = "USER[:PASSWORD]")]
    pub username: Option<String>,
    /// Plain HTTP instead of HTTPS for the registry.
    #[arg(help_heading = HEADING, long)]
    pub plain: bool,
    /// Directory with `*.crt` root CAs and `*.cert`/`*.key` client pairs (repeatable).
    #[arg(help_heading = HEADING, long = "cert-dir", value_name = "DIR")]
    pub cert_dir: Vec<PathBuf>,
    /// Extra root CA PEM file (repeatable).
    #[arg(help_heading = HEADING, long = "root-ca", value_name = "FILE")]
    pub root_ca: Vec<PathBuf>,
    /// Client certificate `cert-file:key-file` (repeatable).
    #[arg(help_heading = HEADING, long = "client-cert", value_name = "CERT:KEY")]
    pub client_cert: Vec<String>,
    /// Skip TLS certificate verification.
    #[arg(help_heading = HEADING, long)]
    pub insecure: bool,
    /// Keep fetched blob chunks here (reused by later mounts); default: a
    /// private temporary directory removed at exit.
    #[arg(help_heading = HEADING, long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the chunk cache holds (K, M, G suffixes); the least
    /// recently used chunks go first.
    #[arg(help_heading = HEADING, long = "cache-size", value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Fetch and cache granularity (a power of two, at least 4K).
    #[arg(help_heading = HEADING, long = "chunk-size", value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Largest read-ahead window for sequential reads (0: none).
    #[arg(help_heading = HEADING, long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    pub readahead: u64,
    /// Retries of a failed registry request (with backoff) before a read
    /// fails with EIO.
    #[arg(help_heading = HEADING, long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Seconds one registry request may take before it counts as failed
    /// (and is retried, see --retries): those at start (the manifest) as
    /// well as the range requests of reads.
    #[arg(help_heading = HEADING, long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

impl RemoteArgs {
    /// The options these flags describe.
    pub fn options(&self) -> Result<RemoteOptions> {
        let mut client_certs = Vec::new();
        for cc in &self.client_cert {
            let Some((c, k)) = cc.split_once(':') else {
                return Err(Error::Usage(format!(
                    "--client-cert {cc:?}: expected cert-file:key-file"
                )));
            };
            client_certs.push((PathBuf::from(c), PathBuf::from(k)));
        }
        let timeout = Duration::from_secs(self.timeout.max(1));
        let credentials = self.username.as_deref().and_then(Credentials::parse);
        if self.username.is_some() && credentials.is_none() {
            tracing::warn!("-u without 'user:password': using anonymous access");
        }
        Ok(RemoteOptions {
            client: ClientOptions {
                plain_http: self.plain,
                insecure: self.insecure,
                root_cas: self.root_ca.clone(),
                cert_dirs: self.cert_dir.clone(),
                client_certs,
                docker_config: self.username.is_none(),
                credentials,
                retries: self.retries,
                stall_timeout: timeout,
                ..Default::default()
            },
            fetch: FetchOptions {
                readahead: self.readahead,
                retries: self.retries,
                timeout,
                ..Default::default()
            },
            cache_dir: self.cache_dir.clone(),
            cache_size: self.cache_size,
            chunk_size: self.chunk_size,
        })
    }
}

/// `123`, `64K`, `64M`, `2G`, `1T` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
