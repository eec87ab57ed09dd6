//! go-sql-driver/mysql data source names, as upstream's `--db-str` takes them.
//!
//! Grammar (from the Go driver's `ParseDSN`):
//!
//! ```text
//! [user[:password]@][net[(addr)]]/dbname[?param1=value1&...&paramN=valueN]
//! ```
//!
//! The Go parser is positional, not a URL parser, and we split exactly where it does:
//! - the database separator is the **last** `/` of the whole string;
//! - credentials end at the **last** `@` before that `/`, so a password may hold `@`, `:` and `/`;
//! - the user name ends at the **first** `:`, so a user name cannot hold `:` but a password can;
//! - the network is what precedes the first `(` after the credentials, the address is inside the
//!   parentheses, which must close right before the `/`;
//! - the database name is path-unescaped (`%xx`), parameter values are query-unescaped.
//!
//! Defaults as in Go: network `tcp`, address `127.0.0.1:3306` for tcp (port 3306 added when
//! missing) and `/tmp/mysql.sock` for unix.

use std::fmt;
use std::time::Duration;

/// Where the MySQL server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP `host` and `port` (IPv6 addresses without brackets).
    Tcp { host: String, port: u16 },
    /// Unix-domain socket path.
    Unix(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp([{host}]:{port})"),
            Endpoint::Tcp { host, port } => write!(f, "tcp({host}:{port})"),
            Endpoint::Unix(path) => write!(f, "unix({path})"),
        }
    }
}

/// The `tls=` parameter, with the Go driver's meanings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// `tls=false` (the default): plain connection.
    #[default]
    Off,
    /// `tls=true`: TLS, server certificate verified against the system CA store (as Go:
    /// `SSL_CERT_FILE` if set, else the distribution's bundle) and the host name.
    Verify,
    /// `tls=skip-verify`: TLS without certificate verification.
    SkipVerify,
    /// `tls=preferred`: TLS without verification when the server offers it, else plain.
    Preferred,
}

/// A parsed go-sql-driver DSN. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn {
    pub user: String,
    pub password: Option<String>,
    pub endpoint: Endpoint,
    pub db_name: String,
    /// `timeout=`: dial timeout.
    pub connect_timeout: Option<Duration>,
    /// `readTimeout=`.
    pub read_timeout: Option<Duration>,
    /// `writeTimeout=`.
    pub write_timeout: Option<Duration>,
    /// `tls=`.
    pub tls: TlsMode,
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dsn")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("endpoint", &self.endpoint)
            .field("db_name", &self.db_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Display for Dsn {
    /// `user@tcp(host:port)/db`: what to name in messages (no password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.user.is_empty() {
            write!(f, "{}@", self.user)?;
        }
        write!(f, "{}/{}", self.endpoint, self.db_name)
    }
}

/// Why a DSN was rejected. The message never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DsnError {
    pub reason: String,
}

fn err<T>(reason: impl Into<String>) -> Result<T, DsnError> {
    Err(DsnError {
        reason: reason.into(),
    })
}

/// Client-side parameters of the Go driver that change nothing for us; accepted and ignored so
/// that DSNs of existing deployments keep working.
const IGNORED_PARAMS: &[&str] = &[
    "allowAllFiles",
    "allowCleartextPasswords",
    "allowFallbackToPlaintext",
    "allowNativePasswords",
    "allowOldPasswords",
    "charset",
    "checkConnLiveness",
    "clientFoundRows",
    "collation",
    "columnsWithAlias",
    "connectionAttributes",
    "interpolateParams",
    "loc",
    "maxAllowedPacket",
    "multiStatements",
    "parseTime",
    "rejectReadOnly",
    "timeTruncate",
];

/// Returns true when `s` looks like a go-sql-driver DSN with an explicit network, which is how
/// `--db-str` is recognised as MySQL when `--db-type` is empty.
pub fn looks_like_mysql_dsn(s: &str) -> bool {
    let head = match s.rfind('@') {
        Some(at) => &s[at + 1..],
        None => s,
    };
    head.starts_with("tcp(") || head.starts_with("unix(") || head.starts_with("tcp6(")
}

/// Replaces the password of a (possibly malformed) DSN by `***`, for error messages.
pub fn redact(s: &str) -> String {
    let slash = s.rfind('/').unwrap_or(s.len());
    let Some(at) = s[..slash].rfind('@') else {
        return s.to_string();
    };
    match s[..at].find(':') {
        Some(colon) => format!("{}:***{}", &s[..colon], &s[at..]),
        None => s.to_string(),
    }
}

impl Dsn {
    /// Parses a go-sql-driver DSN (see the module doc for the exact splitting rules).
    pub fn parse(dsn: &str) -> Result<Dsn, DsnError> {
        if dsn.is_empty() {
            return err("the DSN is empty");
        }
        if dsn.starts_with("mysql://") || dsn.starts_with("mariadb://") {
            return err(
                "URL form is not accepted; write the go-sql-driver form user:pass@tcp(host:port)/dbname",
            );
        }
        let Some(slash) = dsn.rfind('/') else {
            return err(
                "no '/' before the database name (expected user:pass@tcp(host:port)/dbname)",
            );
        };
        let left = &dsn[..slash];
        let (user, password, net_part) = match left.rfind('@') {
            Some(at) => {
                let creds = &left[..at];
                let (user, password) = match creds.find(':') {
                    Some(c) => (&creds[..c], Some(creds[c + 1..].to_string())),
                    None => (creds, None),
                };
                (user.to_string(), password, &left[at + 1..])
            }
            None => (String::new(), None, left),
        };
        let (net, addr) = match net_part.find('(') {
            Some(open) => {
                if !net_part.ends_with(')') {
                    if net_part[open + 1..].contains(')') {
                        return err("text after the ')' of the address (a '/' in the database name or parameters must be escaped as %2F)");
                    }
                    return err("the address has no closing ')' before '/'");
                }
                (
                    &net_part[..open],
                    Some(&net_part[open + 1..net_part.len() - 1]),
                )
            }
            None => (net_part, None),
        };
        let endpoint = match net {
            "" | "tcp" | "tcp4" | "tcp6" => parse_tcp_addr(addr.unwrap_or(""))?,
            "unix" => {
                let path = addr.filter(|a| !a.is_empty()).unwrap_or("/tmp/mysql.sock");
                Endpoint::Unix(path.to_string())
            }
            other => {
                return err(format!(
                "unsupported network {other:?} (expected tcp(host:port) or unix(/path/to/socket))"
            ))
            }
        };

        let rest = &dsn[slash + 1..];
        let (db_raw, params) = match rest.find('?') {
            Some(q) => (&rest[..q], Some(&rest[q + 1..])),
            None => (rest, None),
        };
        let db_name = percent_decode(db_raw, false).map_err(|e| DsnError {
            reason: format!("invalid database name {db_raw:?}: {e}"),
        })?;
        if db_name.is_empty() {
            return err("no database name after '/' (upstream uses conversioncache)");
        }
        let mut out = Dsn {
            user,
            password,
            endpoint,
            db_name,
            connect_timeout: None,
            read_timeout: None,
            write_timeout: None,
            tls: TlsMode::Off,
        };
        if let Some(params) = params {
            for pair in params.split('&').filter(|p| !p.is_empty()) {
                let (key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
                let value = percent_decode(raw_value, true).map_err(|e| DsnError {
                    reason: format!("invalid value of parameter {key}: {e}"),
                })?;
                match key {
                    "timeout" => out.connect_timeout = Some(parse_go_duration(key, &value)?),
                    "readTimeout" => out.read_timeout = Some(parse_go_duration(key, &value)?),
                    "writeTimeout" => out.write_timeout = Some(parse_go_duration(key, &value)?),
                    "tls" => {
                        out.tls = match value.as_str() {
                            "1" | "t" | "T" | "true" | "TRUE" | "True" => TlsMode::Verify,
                            "0" | "f" | "F" | "false" | "FALSE" | "False" => TlsMode::Off,
                            "skip-verify" => TlsMode::SkipVerify,
                            "preferred" => TlsMode::Preferred,
                            other => {
                                return err(format!(
                                    "tls={other}: named TLS configurations exist only in Go programs; use tls=true (CA from the system store or SSL_CERT_FILE), tls=skip-verify or tls=preferred"
                                ))
                            }
                        }
                    }
                    k if IGNORED_PARAMS.contains(&k) => {}
                    other => {
                        return err(format!(
                            "unsupported parameter {other:?} (supported: timeout, readTimeout, writeTimeout, tls; ignored: {})",
                            IGNORED_PARAMS.join(", ")
                        ))
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_tcp_addr(addr: &str) -> Result<Endpoint, DsnError> {
    if addr.is_empty() {
        return Ok(Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 3306,
        });
    }
    // [v6addr]:port, [v6addr], host:port, host
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let Some(close) = rest.find(']') else {
            return err(format!("address {addr:?} has '[' without ']'"));
        };
        let host = &rest[..close];
        let after = &rest[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return err(format!("unexpected text after ']' in address {addr:?}")),
        };
        (host, port)
    } else {
        match addr.rfind(':') {
            Some(c) if addr[..c].contains(':') => {
                return err(format!(
                    "IPv6 address {addr:?} must be written as [addr]:port"
                ))
            }
            Some(c) => (&addr[..c], Some(&addr[c + 1..])),
            None => (addr, None),
        }
    };
    if host.is_empty() {
        return err(format!("address {addr:?} has no host"));
    }
    let port = match port {
        None => 3306,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return err(format!("invalid port {p:?} in address {addr:?}")),
        },
    };
    Ok(Endpoint::Tcp {
        host: host.to_string(),
        port,
    })
}

/// `%xx` decoding; with `plus_is_space` (query values) `+` means a space, as in Go's
/// `url.QueryUnescape`.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => out.push(b),
                    None => return Err(format!("bad escape at byte {i}")),
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "escapes do not decode to UTF-8".to_string())
}

/// Go `time.ParseDuration` for the units a DSN uses: a sequence of `<number><unit>` with units
/// ns, us, µs, ms, s, m, h (e.g. `5s`, `1m30s`, `500ms`, `1.5s`).
fn parse_go_duration(key: &str, v: &str) -> Result<Duration, DsnError> {
    let bad = || DsnError {
        reason: format!("parameter {key}={v:?} is not a Go duration such as 5s, 500ms or 1m30s"),
    };
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let num: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += num * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn upstream_sample_dsn() {
        let d = Dsn::parse("user:pass@tcp(127.0.0.1:3306)/conversioncache").unwrap();
        assert_eq!(d.user, "user");
        assert_eq!(d.password.as_deref(), Some("pass"));
        assert_eq!(d.endpoint, tcp("127.0.0.1", 3306));
        assert_eq!(d.db_name, "conversioncache");
    }

    #[test]
    fn password_with_colon_at_and_slash() {
        // The Go driver splits credentials at the LAST '@' before the last '/', and the user at
        // the FIRST ':'.
        let d = Dsn::parse("u:p:a@s/s@w@tcp(db.example:3307)/cache").unwrap();
        assert_eq!(d.user, "u");
        assert_eq!(d.password.as_deref(), Some("p:a@s/s@w"));
        assert_eq!(d.endpoint, tcp("db.example", 3307));
        assert_eq!(d.db_name, "cache");
    }

    #[test]
    fn password_with_question_mark_and_empty_password() {
        let d = Dsn::parse("u:a?b=c@tcp(h)/db?timeout=2s").unwrap();
        assert_eq!(d.password.as_deref(), Some("a?b=c"));
        assert_eq!(d.endpoint, tcp("h", 3306));
        assert_eq!(d.connect_timeout, Some(Duration::from_secs(2)));

        let d = Dsn::parse("u:@tcp(h:1)/db").unwrap();
        assert_eq!(d.password.as_deref(), Some(""));
        let d = Dsn::parse("u@tcp(h:1)/db").unwrap();
        assert_eq!(d.password, None);
        assert_eq!(d.user, "u");
    }

    #[test]
    fn defaults_and_unix_socket() {
        let d = Dsn::parse("/db").unwrap();
        assert_eq!(d.user, "");
        assert_eq!(d.endpoint, tcp("127.0.0.1", 3306));
        let d = Dsn::parse("root@unix(/run/mysqld/mysqld.sock)/conversioncache").unwrap();
        assert_eq!(d.endpoint, Endpoint::Unix("/run/mysqld/mysqld.sock".into()));
        let d = Dsn::parse("root@unix/x").unwrap();
        assert_eq!(d.endpoint, Endpoint::Unix("/tmp/mysql.sock".into()));
        let d = Dsn::parse("u:p@tcp([::1]:3308)/x").unwrap();
        assert_eq!(d.endpoint, tcp("::1", 3308));
        assert_eq!(d.endpoint.to_string(), "tcp([::1]:3308)");
    }

    #[test]
    fn params_and_escapes() {
        let d = Dsn::parse(
            "u:p@tcp(h:1)/my%2Fdb?readTimeout=1m30s&writeTimeout=250ms&parseTime=true&charset=utf8&tls=false",
        )
        .unwrap();
        assert_eq!(d.db_name, "my/db");
        assert_eq!(d.read_timeout, Some(Duration::from_secs(90)));
        assert_eq!(d.write_timeout, Some(Duration::from_millis(250)));
        assert_eq!(d.tls, TlsMode::Off);
        for (v, mode) in [
            ("true", TlsMode::Verify),
            ("1", TlsMode::Verify),
            ("skip-verify", TlsMode::SkipVerify),
            ("preferred", TlsMode::Preferred),
            ("false", TlsMode::Off),
        ] {
            let d = Dsn::parse(&format!("u:p@tcp(h:1)/db?tls={v}")).unwrap();
            assert_eq!(d.tls, mode, "{v}");
        }
    }

    #[test]
    fn errors_are_clear_and_never_show_the_password() {
        let cases = [
            ("", "empty"),
            ("u:secretpw@tcp(h:1)", "no '/'"),
            ("u:secretpw@tcp(h:1/db", "closing ')'"),
            ("u:secretpw@tcp(h:1)x/db", "text after the ')'"),
            ("u:secretpw@tcp(h:99999)/db", "invalid port"),
            ("u:secretpw@tcp(h:1)/", "no database name"),
            ("u:secretpw@udp(h:1)/db", "unsupported network"),
            ("u:secretpw@tcp(h:1)/db?timeout=5", "Go duration"),
            (
                "u:secretpw@tcp(h:1)/db?foo=bar",
                "unsupported parameter \"foo\"",
            ),
            ("u:secretpw@tcp(h:1)/db?tls=custom", "tls=custom: named TLS"),
            ("u:secretpw@tcp(::1)/db", "IPv6"),
            ("u:secretpw@tcp(h:1)/d%zzb", "invalid database name"),
            ("mysql://u:secretpw@h:1/db", "URL form"),
        ];
        for (dsn, want) in cases {
            let e = Dsn::parse(dsn).unwrap_err().to_string();
            assert!(e.contains(want), "{dsn}: {e}");
            assert!(!e.contains("secretpw"), "{dsn}: {e}");
        }
    }

    #[test]
    fn display_and_debug_hide_password() {
        let d = Dsn::parse("me:hunter2@tcp(h:1)/db").unwrap();
        assert_eq!(d.to_string(), "me@tcp(h:1)/db");
        assert!(!format!("{d:?}").contains("hunter2"));
    }

    #[test]
    fn redact_masks_between_first_colon_and_last_at() {
        assert_eq!(redact("u:p@ss@tcp(h)/db"), "u:***@tcp(h)/db");
        assert_eq!(redact("u:p@tcp(h"), "u:***@tcp(h");
        assert_eq!(redact("/var/lib/x.db"), "/var/lib/x.db");
        assert_eq!(redact("u@tcp(h)/db"), "u@tcp(h)/db");
    }

    #[test]
    fn mysql_detection() {
        assert!(looks_like_mysql_dsn("u:p@tcp(127.0.0.1:3306)/c"));
        assert!(looks_like_mysql_dsn("u:p@x@unix(/s)/c"));
        assert!(looks_like_mysql_dsn("tcp(h)/c"));
        assert!(!looks_like_mysql_dsn("/var/cache/obd/dedup.db"));
        assert!(!looks_like_mysql_dsn("dedup.sqlite"));
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("t", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_go_duration("t", "2h").unwrap(),
            Duration::from_secs(7200)
        );
        assert_eq!(
            parse_go_duration("t", "10us").unwrap(),
            Duration::from_micros(10)
        );
        assert_eq!(parse_go_duration("t", "0").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("t", "").is_err());
        assert!(parse_go_duration("t", "s").is_err());
        assert!(parse_go_duration("t", "3d").is_err());
    }
}
