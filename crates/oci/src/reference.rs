//! Image repository references as the convertor's `-r` takes them: either
//! `host[:port]/path` (a registry repository, not normalised: the first component is
//! always the host, as upstream) or `oci:PATH[:tag]` (an OCI image-layout directory).

use super::{Digest, Error, Result};
use std::fmt;
use std::path::PathBuf;

/// Where images live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A repository in a registry.
    Registry { host: String, repository: String },
    /// An OCI image layout directory; `tag` is an optional default tag.
    Layout { path: PathBuf, tag: Option<String> },
}

/// A tag or a digest inside a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

impl Reference {
    pub fn tag(t: &str) -> Result<Reference> {
        validate_tag(t)?;
        Ok(Reference::Tag(t.to_string()))
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (distribution's tag grammar).
pub fn validate_tag(t: &str) -> Result<()> {
    let b = t.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidReference {
            reference: t.to_string(),
            reason: "a tag is 1-128 characters of [A-Za-z0-9_.-] not starting with '.' or '-'"
                .into(),
        })
    }
}

fn bad(reference: &str, reason: &str) -> Error {
    Error::InvalidReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    }
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef> {
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(bad(s, "oci: needs a directory path"));
            }
            // A trailing ":tag" is a tag if it contains no '/'.
            if let Some((p, t)) = rest.rsplit_once(':') {
                if !t.contains('/') && !p.is_empty() {
                    validate_tag(t)?;
                    return Ok(ImageRef::Layout {
                        path: PathBuf::from(p),
                        tag: Some(t.to_string()),
                    });
                }
            }
            return Ok(ImageRef::Layout {
                path: PathBuf::from(rest),
                tag: None,
            });
        }
        let Some((host, repo)) = s.split_once('/') else {
            return Err(bad(
                s,
                "expected host[:port]/repository (for example localhost:5000/redis) or oci:PATH",
            ));
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(bad(s, "invalid registry host"));
        }
        if repo.contains('@') || repo.contains(':') {
            return Err(bad(
                s,
                "the repository must not carry a tag or digest; use -i/--input-tag or -g/--input-digest",
            ));
        }
        let comp_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if !repo.split('/').all(comp_ok) {
            return Err(bad(
                s,
                "repository path components must be lowercase [a-z0-9._-] and start and end alphanumeric",
            ));
        }
        Ok(ImageRef::Registry {
            host: host.to_string(),
            repository: repo.to_string(),
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry { host, repository } => write!(f, "{host}/{repository}"),
            ImageRef::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            ImageRef::Layout { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_refs() {
        assert_eq!(
            ImageRef::parse("localhost:5000/a/b-c").unwrap(),
            ImageRef::Registry {
                host: "localhost:5000".into(),
                repository: "a/b-c".into()
            }
        );
        // Not normalised, like upstream: the first component is the host.
        assert_eq!(
            ImageRef::parse("overlaybd/redis").unwrap(),
            ImageRef::Registry {
                host: "overlaybd".into(),
                repository: "redis".into()
            }
        );
        assert!(ImageRef::parse("redis").is_err());
        assert!(ImageRef::parse("localhost:5000/redis:latest").is_err());
        assert!(ImageRef::parse("localhost:5000/Redis").is_err());
        assert!(ImageRef::parse("localhost:5000/").is_err());
    }

    #[test]
    fn layout_refs() {
        assert_eq!(
            ImageRef::parse("oci:/tmp/x:v1").unwrap(),
            ImageRef::Layout {
                path: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:rel/dir").unwrap(),
            ImageRef::Layout {
                path: "rel/dir".into(),
                tag: None
            }
        );
        assert!(ImageRef::parse("oci:").is_err());
        assert!(validate_tag("-x").is_err());
        assert!(validate_tag("v1.0_obd").is_ok());
    }
}
