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
    #[arg(help_heading = HEADING, long = "client-cert", value_name = "CERT:KEY", value_parser = parse_client_cert)]
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
    #[arg(help_heading = HEADING, long = "chunk-size", value_name = "SIZE", default_value = "64K", value_parser = parse_chunk_size)]
    pub chunk_size: u64,
    /// Largest read-ahead window for sequential reads (0: none).
    #[arg(help_heading = HEADING, long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    pub readahead: u64,
    /// Retries of a failed registry request (with backoff) before a read
    /// fails with EIO.
    #[arg(help_heading = HEADING, long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Seconds (1 to 3600) one registry request may take before it counts
    /// as failed (and is retried, see --retries): those at start (the
    /// manifest) as well as the range requests of reads.
    #[arg(help_heading = HEADING, long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
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
        let timeout = Duration::from_secs(self.timeout);
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

/// The registry flags given on the command line (not defaulted), spelled as
/// typed, in the order of `--help`: what a caller that serves something
/// else than a registry image ignores, and says so.
pub fn remote_flags_given(m: &clap::ArgMatches) -> Vec<&'static str> {
    const FLAGS: [(&str, &str); 12] = [
        ("username", "-u/--username"),
        ("plain", "--plain"),
        ("cert_dir", "--cert-dir"),
        ("root_ca", "--root-ca"),
        ("client_cert", "--client-cert"),
        ("insecure", "--insecure"),
        ("cache_dir", "--cache-dir"),
        ("cache_size", "--cache-size"),
        ("chunk_size", "--chunk-size"),
        ("readahead", "--readahead"),
        ("retries", "--retries"),
        ("timeout", "--timeout"),
    ];
    FLAGS
        .iter()
        .filter(|(id, _)| {
            m.try_contains_id(id).unwrap_or(false)
                && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|&(_, flag)| flag)
        .collect()
}

/// The warning for registry flags `given` with sources that are no
/// registry image: they are named, and ignored.
pub fn ignored_remote_flags(given: &[&str]) -> String {
    format!(
        "{} only {} to a registry image (HOST/REPO[:TAG]): ignored",
        given.join(", "),
        if given.len() == 1 { "applies" } else { "apply" }
    )
}

/// Whether `sources` (the command line's, mountpoint or socket excluded)
/// name a registry image, the only source for which [`RemoteArgs`] matter.
pub fn is_registry_source(sources: &[String]) -> bool {
    matches!(sources, [one] if !one.starts_with("oci:") && crate::source::is_image_argument(one))
}

/// Check how the sources are combined, before anything is opened: an
/// image (`oci:DIR[:TAG]`, `HOST/REPO[:TAG]`) or a config.json must be the
/// only source, and `oci:` needs a directory. The message of a usage error
/// (exit code 2, as clap's own).
pub fn check_sources(sources: &[String]) -> std::result::Result<(), String> {
    if sources
        .iter()
        .any(|s| s == "oci:" || s.starts_with("oci::"))
    {
        return Err("oci:DIR[:TAG] needs the layout's directory".into());
    }
    if sources.len() < 2 {
        return Ok(());
    }
    for s in sources {
        let what = if crate::source::is_image_argument(s) {
            "an image (oci:DIR[:TAG] or HOST/REPO[:TAG|@DIGEST])"
        } else if crate::source::is_config_file(std::path::Path::new(s)) {
            "a config.json"
        } else {
            continue;
        };
        return Err(format!(
            "{s}: {what} must be the only source (got {} sources; \
             give layer files, or one config.json, or one image)",
            sources.len()
        ));
    }
    Ok(())
}

/// `--client-cert`: `cert-file:key-file`.
fn parse_client_cert(s: &str) -> std::result::Result<String, String> {
    match s.split_once(':') {
        Some((c, k)) if !c.is_empty() && !k.is_empty() => Ok(s.to_string()),
        _ => Err("expected cert-file:key-file".into()),
    }
}

/// `--chunk-size`: a size that is a power of two, at least 4K.
pub fn parse_chunk_size(s: &str) -> std::result::Result<u64, String> {
    let n = parse_size(s)?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} bytes is not a power of two of at least 4K (e.g. 64K, 1M)"
        ));
    }
    Ok(n)
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

    #[test]
    fn chunk_sizes_are_powers_of_two_of_at_least_4k() {
        assert_eq!(parse_chunk_size("4K"), Ok(4096));
        assert_eq!(parse_chunk_size("1M"), Ok(1 << 20));
        for bad in ["3", "2K", "96K", "0"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn images_and_configs_must_be_alone() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(check_sources(&s(&["oci:/x"])), Ok(()));
        assert_eq!(check_sources(&s(&["reg.io/a:b"])), Ok(()));
        assert_eq!(check_sources(&s(&["/no/a.lsmt", "/no/b.lsmt"])), Ok(()));
        let e = check_sources(&s(&["/no/a.lsmt", "oci:/x"])).unwrap_err();
        assert!(e.starts_with("oci:/x: an image"), "{e}");
        let e = check_sources(&s(&["reg.io/a:b", "/no/a.lsmt"])).unwrap_err();
        assert!(e.starts_with("reg.io/a:b: an image"), "{e}");
        let e = check_sources(&s(&["/no/c.json", "/no/a.lsmt"])).unwrap_err();
        assert!(e.starts_with("/no/c.json: a config.json must be"), "{e}");
        assert!(check_sources(&s(&["oci:"])).is_err());
    }

    #[test]
    fn given_remote_flags_are_named() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            r: RemoteArgs,
        }
        use clap::CommandFactory;
        let m = T::command()
            .try_get_matches_from(["t", "--timeout", "5", "--plain", "--readahead=0"])
            .unwrap();
        assert_eq!(
            remote_flags_given(&m),
            ["--plain", "--readahead", "--timeout"]
        );
        let m = T::command().try_get_matches_from(["t"]).unwrap();
        assert!(remote_flags_given(&m).is_empty());
        for bad in [["t", "--timeout", "0"], ["t", "--chunk-size", "3K"]] {
            let e = T::command().try_get_matches_from(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
        let e = T::command()
            .try_get_matches_from(["t", "--client-cert", "only-a-cert"])
            .unwrap_err();
        assert!(e.to_string().contains("expected cert-file:key-file"), "{e}");
    }
}
