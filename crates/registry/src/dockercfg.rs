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

/// Credentials for `host` from the Docker client configuration, if any.
pub fn lookup(host: &str) -> Option<Credentials> {
    let path = config_path()?;
    let bytes = std::fs::read(&path).ok()?;
    let v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("{}: not valid JSON ({e}); ignored", path.display());
            return None;
        }
    };
    let want = normalise(host);
    let server = if want == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    if let Some(helpers) = v.get("credHelpers").and_then(|h| h.as_object()) {
        for (k, helper) in helpers {
            if normalise(k) == want {
                return helper.as_str().and_then(|h| from_helper(h, &server));
            }
        }
    }
    if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
        for (k, entry) in auths {
            if normalise(k) != want {
                continue;
            }
            if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
                let raw = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
                let s = String::from_utf8(raw).ok()?;
                let (u, p) = s.split_once(':')?;
                return Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                });
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(|x| x.as_str()),
                entry.get("password").and_then(|x| x.as_str()),
            ) {
                return Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                });
            }
        }
    }
    if let Some(store) = v.get("credsStore").and_then(|s| s.as_str()) {
        return from_helper(store, &server);
    }
    None
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
}
