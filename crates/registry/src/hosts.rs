//! containerd's registry host configuration (`hosts.toml`, as in
//! `/etc/containerd/certs.d`; containerd `core/remotes/docker/config`):
//!
//! ```text
//! <hosts dir>/<host[:port]>/hosts.toml     or <hosts dir>/_default/hosts.toml
//!
//! server = "https://registry.example.com"    # the upstream; default https://<host>
//! ca = "ca.crt"                               # for the server: root CA file(s)
//! client = [["client.cert", "client.key"]]    # client certificate(s)
//! skip_verify = false
//! override_path = false                       # the URL's path replaces /v2
//! capabilities = ["pull", "resolve", "push"]
//! [header]                                    # extra request headers
//!   x-custom = "value"                        # or ["value", ...]
//!
//! [host."https://mirror.example.com"]         # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]
//!   ca = "/etc/certs/mirror.crt"              # a string or a list
//!   client = "/etc/certs/client.pem"          # cert+key in one file, or [cert, key]
//!   skip_verify = true
//!   override_path = true
//!   [host."https://mirror.example.com".header]
//!     authorization = "Basic ..."
//! ```
//!
//! Relative file names are relative to the host's directory. A host directory without
//! `hosts.toml` is read the legacy way: its `*.crt` files are CAs and `*.cert`/`*.key`
//! pairs client certificates of the server.

use super::Error;
use std::path::{Path, PathBuf};

/// One endpoint of a registry host: the server or a mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEndpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// API root path: `/v2`, or the URL's own path with `override_path`.
    pub api_path: String,
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (the same file twice when one holds both).
    pub client: Vec<(PathBuf, PathBuf)>,
    pub skip_verify: bool,
    pub headers: Vec<(String, String)>,
}

/// The host configuration of one registry host: mirrors (in order), then the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The file it came from, for messages.
    pub file: PathBuf,
    pub mirrors: Vec<HostEndpoint>,
    pub server: HostEndpoint,
}

fn bad(file: &Path, reason: String) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        reason,
    }
}

/// Find and read the configuration of `host` under `dir`: `<dir>/<host>/hosts.toml`,
/// else `<dir>/_default/hosts.toml`. `Ok(None)` when neither exists; a host directory
/// without `hosts.toml` gives a server-only configuration with its certificate files.
pub fn load(dir: &Path, host: &str, plain_http: bool) -> Result<Option<HostConfig>, Error> {
    let default_scheme = if plain_http { "http" } else { "https" };
    for name in [host, "_default"] {
        let hdir = dir.join(name);
        let file = hdir.join("hosts.toml");
        match std::fs::read_to_string(&file) {
            Ok(text) => return parse(&text, &file, &hdir, host, default_scheme).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(Error::Io { path: file, error }),
        }
        if name == host && hdir.is_dir() {
            let mut server = endpoint_for(host, default_scheme);
            legacy_certs(&hdir, &mut server)?;
            return Ok(Some(HostConfig {
                file: hdir,
                mirrors: vec![],
                server,
            }));
        }
    }
    Ok(None)
}

impl HostEndpoint {
    /// The endpoint of `host` without configuration: all capabilities, API at `/v2`
    /// (`docker.io` is served by `registry-1.docker.io`).
    pub fn default_for(host: &str, scheme: &str) -> HostEndpoint {
        endpoint_for(host, scheme)
    }
}

fn endpoint_for(host: &str, scheme: &str) -> HostEndpoint {
    HostEndpoint {
        scheme: scheme.to_string(),
        authority: if host == "docker.io" {
            "registry-1.docker.io".to_string()
        } else {
            host.to_string()
        },
        api_path: "/v2".into(),
        pull: true,
        resolve: true,
        push: true,
        ca: vec![],
        client: vec![],
        skip_verify: false,
        headers: vec![],
    }
}

/// `*.crt` CAs and `*.cert` + `*.key` client pairs in a host directory.
fn legacy_certs(hdir: &Path, ep: &mut HostEndpoint) -> Result<(), Error> {
    let rd = std::fs::read_dir(hdir).map_err(|error| Error::Io {
        path: hdir.to_path_buf(),
        error,
    })?;
    let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => ep.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                if !key.is_file() {
                    return Err(bad(
                        &p,
                        format!("client certificate without {}", key.display()),
                    ));
                }
                ep.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parse a `hosts.toml` for `host`; `hdir` resolves relative file names.
pub fn parse(
    text: &str,
    file: &Path,
    hdir: &Path,
    host: &str,
    default_scheme: &str,
) -> Result<HostConfig, Error> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| bad(file, format!("invalid TOML: {}", e.message())))?;
    let (mut server, path) = match table.get("server") {
        None => (endpoint_for(host, default_scheme), String::new()),
        Some(toml::Value::String(url)) => parse_url(file, url, default_scheme)?,
        Some(_) => return Err(bad(file, "server must be a URL string".into())),
    };
    apply_fields(file, hdir, &table, &mut server, &path, "")?;
    let mut mirrors = Vec::new();
    match table.get("host") {
        None => {}
        Some(toml::Value::Table(hosts)) => {
            for (url, v) in hosts {
                let toml::Value::Table(t) = v else {
                    return Err(bad(file, format!("host.{url:?} must be a table")));
                };
                let (mut ep, path) = parse_url(file, url, default_scheme)?;
                apply_fields(file, hdir, t, &mut ep, &path, &format!("host.{url:?}."))?;
                mirrors.push(ep);
            }
        }
        Some(_) => return Err(bad(file, "host must be a table of [host.\"URL\"]".into())),
    }
    for k in table.keys() {
        if !matches!(
            k.as_str(),
            "server"
                | "host"
                | "ca"
                | "client"
                | "skip_verify"
                | "override_path"
                | "header"
                | "capabilities"
        ) {
            tracing::warn!("{}: unknown key {k:?} ignored", file.display());
        }
    }
    Ok(HostConfig {
        file: file.to_path_buf(),
        mirrors,
        server,
    })
}

/// `scheme://authority[/path]`, or a bare `authority[/path]` (default scheme); also
/// returns the path.
fn parse_url(
    file: &Path,
    url: &str,
    default_scheme: &str,
) -> Result<(HostEndpoint, String), Error> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s @ ("http" | "https"), r)) => (s, r),
        Some((s, _)) => {
            return Err(bad(
                file,
                format!("{url:?}: scheme {s:?} is not http or https"),
            ))
        }
        None => (default_scheme, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty()
        || !authority
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:[]_".contains(&c))
    {
        return Err(bad(file, format!("{url:?}: invalid host")));
    }
    let mut ep = endpoint_for(authority, scheme);
    ep.authority = authority.to_string();
    // Without override_path the API is at <path>/v2 (containerd appends /v2).
    ep.api_path = format!("{path}/v2");
    Ok((ep, path.to_string()))
}

fn strings(file: &Path, key: &str, v: &toml::Value) -> Result<Vec<String>, Error> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| match x {
                toml::Value::String(s) => Ok(s.clone()),
                _ => Err(bad(file, format!("{key}: expected strings"))),
            })
            .collect(),
        _ => Err(bad(
            file,
            format!("{key}: expected a string or a list of strings"),
        )),
    }
}

fn apply_fields(
    file: &Path,
    hdir: &Path,
    t: &toml::Table,
    ep: &mut HostEndpoint,
    bare_path: &str,
    prefix: &str,
) -> Result<(), Error> {
    let path_of = |s: &str| -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            hdir.join(p)
        }
    };
    if let Some(v) = t.get("capabilities") {
        let caps = strings(file, &format!("{prefix}capabilities"), v)?;
        ep.pull = false;
        ep.resolve = false;
        ep.push = false;
        for c in caps {
            match c.as_str() {
                "pull" => ep.pull = true,
                "resolve" => ep.resolve = true,
                "push" => ep.push = true,
                o => {
                    return Err(bad(
                        file,
                        format!(
                            "{prefix}capabilities: unknown capability {o:?} (pull, resolve, push)"
                        ),
                    ))
                }
            }
        }
    }
    if let Some(v) = t.get("ca") {
        for s in strings(file, &format!("{prefix}ca"), v)? {
            ep.ca.push(path_of(&s));
        }
    }
    if let Some(v) = t.get("client") {
        let key = format!("{prefix}client");
        // "file" | ["cert", "key"] | [["cert", "key"], "both"...]
        let items: Vec<toml::Value> = match v {
            toml::Value::String(_) => vec![v.clone()],
            toml::Value::Array(a) if a.iter().all(|x| x.is_str()) && a.len() == 2 => {
                vec![v.clone()]
            }
            toml::Value::Array(a) => a.clone(),
            _ => {
                return Err(bad(
                    file,
                    format!("{key}: expected a file or [cert, key] pairs"),
                ))
            }
        };
        for it in items {
            let pair = strings(file, &key, &it)?;
            match pair.as_slice() {
                [both] => ep.client.push((path_of(both), path_of(both))),
                [c, k] => ep.client.push((path_of(c), path_of(k))),
                _ => return Err(bad(file, format!("{key}: expected [cert, key]"))),
            }
        }
    }
    if let Some(v) = t.get("skip_verify") {
        ep.skip_verify = v
            .as_bool()
            .ok_or_else(|| bad(file, format!("{prefix}skip_verify: expected true or false")))?;
    }
    if let Some(v) = t.get("override_path") {
        let o = v.as_bool().ok_or_else(|| {
            bad(
                file,
                format!("{prefix}override_path: expected true or false"),
            )
        })?;
        if o {
            ep.api_path = bare_path.to_string();
        }
    }
    if let Some(v) = t.get("header") {
        let toml::Value::Table(h) = v else {
            return Err(bad(file, format!("{prefix}header: expected a table")));
        };
        for (name, vals) in h {
            for val in strings(file, &format!("{prefix}header.{name}"), vals)? {
                ep.headers.push((name.clone(), val));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerd_examples() {
        let text = r#"
server = "https://registry.example.com:5000"
ca = "server-ca.crt"
[header]
  x-upstream = "1"

[host."https://mirror-a.local"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/a.crt", "rel.crt"]
  client = [["/c.cert", "/c.key"], "/both.pem"]
  skip_verify = true
  [host."https://mirror-a.local".header]
    x-token = ["t1", "t2"]

[host."http://mirror-b.local:8080/custom/path"]
  capabilities = ["pull"]
  override_path = true
"#;
        let c = parse(
            text,
            Path::new("/d/h/hosts.toml"),
            Path::new("/d/h"),
            "h",
            "https",
        )
        .unwrap();
        assert_eq!(c.server.authority, "registry.example.com:5000");
        assert_eq!(c.server.api_path, "/v2");
        assert_eq!(c.server.ca, [PathBuf::from("/d/h/server-ca.crt")]);
        assert_eq!(
            c.server.headers,
            [("x-upstream".to_string(), "1".to_string())]
        );
        assert!(c.server.pull && c.server.push);
        assert_eq!(c.mirrors.len(), 2);
        let a = &c.mirrors[0];
        assert_eq!(
            (a.scheme.as_str(), a.authority.as_str()),
            ("https", "mirror-a.local")
        );
        assert!(a.pull && a.resolve && !a.push && a.skip_verify);
        assert_eq!(
            a.ca,
            [PathBuf::from("/abs/a.crt"), PathBuf::from("/d/h/rel.crt")]
        );
        assert_eq!(
            a.client,
            [
                (PathBuf::from("/c.cert"), PathBuf::from("/c.key")),
                (PathBuf::from("/both.pem"), PathBuf::from("/both.pem"))
            ]
        );
        assert_eq!(a.headers.len(), 2);
        let b = &c.mirrors[1];
        assert_eq!(b.scheme, "http");
        assert_eq!(b.api_path, "/custom/path");
        assert!(b.pull && !b.resolve);
        // Without override_path the path is a prefix of /v2.
        let c = parse(
            "[host.\"https://m/p\"]\n",
            Path::new("f"),
            Path::new("."),
            "h",
            "https",
        )
        .unwrap();
        assert_eq!(c.mirrors[0].api_path, "/p/v2");
        assert_eq!(c.server.authority, "h");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = |t: &str| {
            parse(t, Path::new("/x/hosts.toml"), Path::new("/x"), "h", "https")
                .unwrap_err()
                .to_string()
        };
        assert!(
            e("server = [").contains("invalid TOML"),
            "{}",
            e("server = [")
        );
        assert!(e("server = 1").contains("server must be a URL"));
        assert!(e("server = \"ftp://x\"").contains("not http or https"));
        assert!(e("[host.\"https://m\"]\ncapabilities = [\"fly\"]").contains("unknown capability"));
        assert!(e("skip_verify = \"yes\"").contains("skip_verify"));
        assert!(e("[host.\"https://m\"]\nclient = 3").contains("client"));
        assert!(e("server = 1").starts_with("/x/hosts.toml: "));
    }

    #[test]
    fn lookup_and_legacy_dirs() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path(), "h:5000", false).unwrap(), None);
        let h = d.path().join("h:5000");
        std::fs::create_dir(&h).unwrap();
        std::fs::write(h.join("ca.crt"), b"x").unwrap();
        let c = load(d.path(), "h:5000", true).unwrap().unwrap();
        assert_eq!(c.server.scheme, "http");
        assert_eq!(c.server.ca, [h.join("ca.crt")]);
        std::fs::write(h.join("hosts.toml"), "server = \"https://other\"\n").unwrap();
        let c = load(d.path(), "h:5000", false).unwrap().unwrap();
        assert_eq!(c.server.authority, "other");
        assert!(c.server.ca.is_empty());
        let def = d.path().join("_default");
        std::fs::create_dir(&def).unwrap();
        std::fs::write(def.join("hosts.toml"), "[host.\"https://mirror\"]\n").unwrap();
        let c = load(d.path(), "elsewhere", false).unwrap().unwrap();
        assert_eq!(c.mirrors[0].authority, "mirror");
        assert_eq!(c.server.authority, "elsewhere");
    }
}
