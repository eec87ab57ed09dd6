//! Credentials from Docker's client configuration (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`), used when no `-u` is given:
//!
//! ```json
//! {"auths": {"registry.example.com": {"auth": "base64(user:password)"}},
//!  "credHelpers": {"registry.example.com": "helper"}, "credsStore": "helper"}
//! ```
//!
//! A helper is the program `docker-credential-<helper>`; `get` reads the registry name
//! on stdin and answers `{"Username": "...", "Secret": "..."}`.

use super::Credentials;
use base64::Engine as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://host/v1/` → `host`; Docker Hub's names map to `docker.io`.
fn normalise(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

fn from_helper(helper: &str, server: &str) -> Option<Credentials> {
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Resp {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Resp = serde_json::from_slice(&out.stdout).ok()?;
    Some(Credentials {
        username: r.username,
        password: r.secret,
    })
}

/// Where the Docker client configuration says the credentials for a host are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Given in the file (`auths`: `auth`, or `username` and `password`).
    Credentials(Credentials),
    /// To be asked of `docker-credential-<helper>` for `server`
    /// (`credHelpers` or `credsStore`).
    Helper { helper: String, server: String },
}

/// What the Docker client configuration `bytes` holds for `host` (`Ok(None)`:
/// nothing). Malformed entries (bad base64, no `:` in `auth`) count as nothing.
pub fn parse(bytes: &[u8], host: &str) -> Result<Option<Found>, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    let want = normalise(host);
    let server = if want == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    let helper = |h: &str| Found::Helper {
        helper: h.to_string(),
        server: server.clone(),
    };
    if let Some(helpers) = v.get("credHelpers").and_then(|h| h.as_object()) {
        for (k, h) in helpers {
            if normalise(k) == want {
                return Ok(h.as_str().map(helper));
            }
        }
    }
    if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
        for (k, entry) in auths {
            if normalise(k) != want {
                continue;
            }
            if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
                let creds = base64::engine::general_purpose::STANDARD
                    .decode(a)
                    .ok()
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .and_then(|s| {
                        let (u, p) = s.split_once(':')?;
                        Some(Credentials {
                            username: u.to_string(),
                            password: p.to_string(),
                        })
                    });
                return Ok(creds.map(Found::Credentials));
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(|x| x.as_str()),
                entry.get("password").and_then(|x| x.as_str()),
            ) {
                return Ok(Some(Found::Credentials(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                })));
            }
        }
    }
    Ok(v.get("credsStore").and_then(|s| s.as_str()).map(helper))
}

/// Credentials for `host` from the Docker client configuration, if any.
pub fn lookup(host: &str) -> Option<Credentials> {
    let path = config_path()?;
    let bytes = std::fs::read(&path).ok()?;
    match parse(&bytes, host) {
        Ok(Some(Found::Credentials(c))) => Some(c),
        Ok(Some(Found::Helper { helper, server })) => from_helper(&helper, &server),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{}: not valid JSON ({e}); ignored", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_normalisation() {
        assert_eq!(normalise("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalise("localhost:5000"), "localhost:5000");
        assert_eq!(normalise("http://127.0.0.1:5443/v2/"), "127.0.0.1:5443");
    }

    #[test]
    fn parse_finds_helpers_and_credentials() {
        let cfg = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},
            "r.example:5000":{"username":"a","password":"b:c"},"bad":{"auth":"!!"}},
            "credHelpers":{"h.example":"pass"},"credsStore":"desktop"}"#;
        let creds = |u: &str, p: &str| {
            Some(Found::Credentials(Credentials {
                username: u.into(),
                password: p.into(),
            }))
        };
        assert_eq!(parse(cfg, "docker.io").unwrap(), creds("u", "p"));
        assert_eq!(parse(cfg, "r.example:5000").unwrap(), creds("a", "b:c"));
        assert_eq!(parse(cfg, "bad").unwrap(), None);
        let helper = |h: &str, s: &str| {
            Some(Found::Helper {
                helper: h.into(),
                server: s.into(),
            })
        };
        assert_eq!(
            parse(cfg, "h.example").unwrap(),
            helper("pass", "h.example")
        );
        assert_eq!(parse(cfg, "other").unwrap(), helper("desktop", "other"));
        assert!(parse(b"{", "x").is_err());
    }
}
