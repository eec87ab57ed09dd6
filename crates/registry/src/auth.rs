//! Registry authentication: the `WWW-Authenticate` challenge flow of the distribution
//! spec. A `401` answer names a scheme:
//!
//! * `Basic realm="..."`: send `Authorization: Basic base64(user:password)`.
//! * `Bearer realm="<url>",service="<svc>",scope="<scope>"`: get a token with
//!   `GET <realm>?service=<svc>&scope=<scope>...` (Basic credentials if we have them,
//!   anonymous otherwise), answered by `{"token"|"access_token": "...", "expires_in": n}`,
//!   then send `Authorization: Bearer <token>`.
//!
//! Tokens are cached per scope string until shortly before they expire.

use super::{Credentials, Error, FlagNames, Result};
use base64::Engine as _;
use reqwest::blocking::Client;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One parsed challenge from a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parse `WWW-Authenticate` values (RFC 7235): `scheme k=v, k="v", scheme2 k=v`.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let s = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        header[s..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let word = token(&mut i);
        // Look past spaces: '=' means this word was a parameter name.
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Values are ASCII in practice; copy byte-wise through char boundaries.
                    let ch_len = utf8_len(b[i]);
                    v.push_str(&header[i..(i + ch_len).min(b.len())]);
                    i += ch_len;
                }
                i += 1;
                v
            } else {
                token(&mut i)
            };
            out.last_mut()
                .expect("checked non-empty")
                .params
                .insert(word.to_ascii_lowercase(), value);
        } else if !word.is_empty() {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[derive(Clone, Debug)]
enum Scheme {
    /// No challenge seen yet: send nothing.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct Token {
    value: String,
    expires: Instant,
}

/// Per-registry authentication state.
pub(crate) struct Auth {
    creds: Option<Credentials>,
    /// The run's cancel flag: a token request in progress is given up when set.
    cancel: Option<Arc<AtomicBool>>,
    /// The tool's flags, named in error hints.
    flags: FlagNames,
    peer: String,
    scheme: Mutex<Scheme>,
    tokens: Mutex<HashMap<String, Token>>,
}

impl Auth {
    pub(crate) fn new(
        peer: &str,
        cancel: Option<Arc<AtomicBool>>,
        flags: FlagNames,
        creds: Option<Credentials>,
    ) -> Auth {
        Auth {
            creds,
            cancel,
            flags,
            peer: peer.to_string(),
            scheme: Mutex::new(Scheme::Unknown),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn has_credentials(&self) -> bool {
        self.creds.is_some()
    }

    fn basic_value(&self) -> Option<String> {
        self.creds.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    /// The `Authorization` value to send for `scope`, if any (may fetch a token).
    pub(crate) fn header_for(&self, http: &Client, scope: &str) -> Result<Option<String>> {
        let scheme = self
            .scheme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match scheme {
            Scheme::Unknown => Ok(None),
            Scheme::Basic => Ok(self.basic_value()),
            Scheme::Bearer { realm, service } => {
                if let Some(t) = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(scope)
                {
                    if t.expires > Instant::now() {
                        return Ok(Some(format!("Bearer {}", t.value)));
                    }
                }
                let tok = self.fetch_token(http, &realm, service.as_deref(), &[scope])?;
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// React to a `401` of a request that carried `sent` as its `Authorization`.
    /// Returns whether the request should be retried.
    pub(crate) fn on_challenge(
        &self,
        http: &Client,
        header: &str,
        scope: &str,
        sent: Option<&str>,
    ) -> Result<bool> {
        let ch = parse_challenges(header);
        if let Some(b) = ch.iter().find(|c| c.scheme == "bearer") {
            let realm = b
                .params
                .get("realm")
                .cloned()
                .ok_or_else(|| Error::Protocol {
                    peer: self.peer.clone(),
                    what: "authentication".into(),
                    reason: format!("Bearer challenge without realm: {header:?}"),
                })?;
            let service = b.params.get("service").cloned();
            let mut scopes = vec![scope];
            if let Some(s) = b.params.get("scope") {
                if s != scope {
                    scopes.push(s);
                }
            }
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(scope);
            self.fetch_token(http, &realm, service.as_deref(), &scopes)?;
            *self.scheme.lock().unwrap_or_else(|e| e.into_inner()) =
                Scheme::Bearer { realm, service };
            return Ok(true);
        }
        if ch.iter().any(|c| c.scheme == "basic") {
            let basic = self.basic_value();
            if basic.is_none() || sent == basic.as_deref() {
                // Nothing new to offer: no credentials, or these were refused.
                return Ok(false);
            }
            // A request sent before another one's challenge switched to Basic
            // (concurrent uploads) is simply sent again, now with the credentials.
            *self.scheme.lock().unwrap_or_else(|e| e.into_inner()) = Scheme::Basic;
            return Ok(true);
        }
        Ok(false)
    }

    fn fetch_token(
        &self,
        http: &Client,
        realm: &str,
        service: Option<&str>,
        scopes: &[&str],
    ) -> Result<String> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        for s in scopes {
            for part in s.split(' ').filter(|p| !p.is_empty()) {
                query.push(("scope", part));
            }
        }
        let mut rb = http.get(realm).query(&query);
        if let Some(v) = self.basic_value() {
            rb = rb.header(reqwest::header::AUTHORIZATION, v);
        }
        let what = format!("token request to {realm}");
        let resp = crate::send_cancellable(&self.peer, rb, self.cancel.as_deref())?
            .map_err(|source| Error::transport(&self.peer, &what, source, &self.flags))?;
        let status = resp.status();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(Error::Unauthorized {
                peer: self.peer.clone(),
                what,
                detail: if self.creds.is_some() {
                    ": the token server rejected the credentials".into()
                } else {
                    format!(
                        ": anonymous access refused; pass {} user:password",
                        self.flags.credentials
                    )
                },
            });
        }
        if !status.is_success() {
            return Err(Error::Status {
                peer: self.peer.clone(),
                what,
                status: status.as_u16(),
                detail: String::new(),
            });
        }
        // A token server that sends its answer's head and then stalls is not
        // waited for once the run is cancelled.
        let body = crate::cancellable(&self.peer, &what, self.cancel.as_deref(), move || {
            resp.bytes()
        })?
        .map_err(|source| Error::transport(&self.peer, &what, source, &self.flags))?;
        #[derive(serde::Deserialize)]
        struct TokenResp {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let tr: TokenResp = serde_json::from_slice(&body).map_err(|error| Error::BadJson {
            peer: self.peer.clone(),
            what: what.clone(),
            reason: "bad token response",
            error,
        })?;
        let value = tr
            .token
            .filter(|t| !t.is_empty())
            .or(tr.access_token)
            .ok_or_else(|| Error::Protocol {
                peer: self.peer.clone(),
                what,
                reason: "token response has no token".into(),
            })?;
        // Spec: default lifetime 60 s; refresh a little early.
        let life = tr.expires_in.unwrap_or(60).max(10);
        let expires = Instant::now() + Duration::from_secs(life - 5);
        let key = scopes[0].to_string();
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                Token {
                    value: value.clone(),
                    expires,
                },
            );
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bearer_and_basic() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.example/token");
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
        let c = parse_challenges(r#"Basic realm="Registry Realm", Bearer realm=x,service=y"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry Realm");
        assert_eq!(c[1].params["service"], "y");
        let c = parse_challenges(r#"Bearer realm="a\"b""#);
        assert_eq!(c[0].params["realm"], "a\"b");
    }

    /// Concurrent requests: both go out before the first challenge; the second
    /// `401` (a request sent without credentials) must be retried too, while a
    /// `401` to the credentials themselves is final.
    #[test]
    fn basic_challenge_to_a_request_without_credentials_is_retried() {
        let http = Client::new();
        let auth = Auth::new(
            "reg",
            None,
            FlagNames::default(),
            Credentials::parse("bob:pw"),
        );
        let ch = r#"Basic realm="r""#;
        assert_eq!(auth.header_for(&http, "s").unwrap(), None);
        assert!(auth.on_challenge(&http, ch, "s", None).unwrap());
        assert!(auth.on_challenge(&http, ch, "s", None).unwrap());
        let sent = auth.header_for(&http, "s").unwrap();
        assert!(sent.as_deref().unwrap().starts_with("Basic "));
        assert!(!auth.on_challenge(&http, ch, "s", sent.as_deref()).unwrap());
        let anonymous = Auth::new("reg", None, FlagNames::default(), None);
        assert!(!anonymous.on_challenge(&http, ch, "s", None).unwrap());
    }
}
