//! Image references as the convertor takes them, named by transport as skopeo names
//! them:
//!
//! * `docker://HOST/REPO[:TAG|@DIGEST]`, or the bare `HOST/REPO[...]`: a registry
//!   repository, not normalised (the first component is always the host, as upstream);
//! * `oci:DIR[:REF]`: an OCI image-layout directory (split at the first `:`, as
//!   skopeo splits it; REF is an OCI reference name, [`validate_ref_name`]);
//! * `oci-archive:FILE[:REF]`: an OCI image layout in a tar file (`.tar.gz` too);
//! * `docker-archive:FILE[:NAME[:TAG]|:@N]`: a `docker save` archive; NAME:TAG picks
//!   an image by its `RepoTags` entry, `@N` by its position in `manifest.json`.
//!
//! [`ImageRef::parse`] takes the convertor's `-r` form (a repository, no tag or
//! digest for registries); [`ImageName::parse`] takes a full source or destination
//! (`convertor obdconv SRC DST`), where a registry reference may carry a tag or digest.

use super::{Digest, Error, Result};
use std::fmt;
use std::path::PathBuf;

/// The transports, as written before the `:`.
pub const TRANSPORTS: &str = "docker://, oci:, oci-archive:, docker-archive:";

/// Where images live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A repository in a registry.
    Registry { host: String, repository: String },
    /// An OCI image layout directory; `tag` is an optional default tag.
    Layout { path: PathBuf, tag: Option<String> },
    /// An OCI image layout in a tar file (optionally gzip-compressed on input).
    OciArchive { path: PathBuf, tag: Option<String> },
    /// A `docker save` archive; `name` picks one of its images.
    DockerArchive {
        path: PathBuf,
        name: Option<ArchiveImage>,
    },
}

/// Which image of a `docker save` archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveImage {
    /// The image tagged so (`RepoTags`), the name normalised as Docker does.
    Tagged(DockerName),
    /// The image at this position of `manifest.json` (`@N`).
    Index(usize),
}

/// A normalised Docker image name with a tag: `docker.io/library/busybox:latest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerName {
    /// The full repository name (`docker.io/library/busybox`, `localhost:5000/x`).
    pub repository: String,
    pub tag: String,
}

impl DockerName {
    /// Parse `NAME[:TAG]` and normalise it as Docker does: a first component without
    /// `.` or `:` that is not `localhost` is a Docker Hub path (`busybox` is
    /// `docker.io/library/busybox`); the tag defaults to `latest`.
    pub fn parse(s: &str) -> Result<DockerName> {
        if s.contains('@') {
            return Err(bad(s, "a docker-archive name takes a tag, not a digest"));
        }
        // The tag is after the last ':' if no '/' follows it (else it is a port).
        let (name, tag) = match s.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (s, "latest"),
        };
        validate_tag(tag)?;
        let (host, path) = match name.split_once('/') {
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), p.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        check_host(s, &host)?;
        check_path(s, &path)?;
        Ok(DockerName {
            repository: format!("{host}/{path}"),
            tag: tag.to_string(),
        })
    }
}

impl fmt::Display for DockerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// A source or destination image: where, and optionally which (a tag or digest given
/// with the name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    pub store: ImageRef,
    pub reference: Option<Reference>,
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
    /// A registry tag ([`validate_tag`]).
    pub fn tag(t: &str) -> Result<Reference> {
        validate_tag(t)?;
        Ok(Reference::Tag(t.to_string()))
    }

    /// An image named in an OCI layout or OCI archive ([`validate_ref_name`]).
    pub fn ref_name(t: &str) -> Result<Reference> {
        validate_ref_name(t)?;
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

/// An OCI image-layout reference name (`org.opencontainers.image.ref.name`, as
/// containers/image checks it): components of `[A-Za-z0-9]+` joined by one of
/// `-._:@+` or `--`, separated by `/`; e.g. `v1.0+build` or
/// `example.com/app:1.0`. Broader than a registry tag ([`validate_tag`]).
pub fn validate_ref_name(r: &str) -> Result<()> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        if !b.first().is_some_and(u8::is_ascii_alphanumeric) {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            if !matches!(b[i], b'-' | b'.' | b'_' | b':' | b'@' | b'+') {
                return false;
            }
            i += if b[i] == b'-' && b.get(i + 1) == Some(&b'-') {
                2
            } else {
                1
            };
            // A separator is followed by an alphanumeric.
            if !b.get(i).is_some_and(u8::is_ascii_alphanumeric) {
                return false;
            }
        }
        true
    };
    if r.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(bad(
            r,
            "an OCI layout reference name is components of [A-Za-z0-9] joined by one of -._:@+ or --, separated by '/'",
        ))
    }
}

fn bad(reference: &str, reason: &str) -> Error {
    Error::InvalidReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    }
}

fn check_host(s: &str, host: &str) -> Result<()> {
    if host.is_empty()
        || !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return Err(bad(s, "invalid registry host"));
    }
    // A port, if any: after the last ':' outside an IPv6 literal's brackets.
    let port = match host.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && (!h.starts_with('[') || h.ends_with(']')) => Some(p),
        _ => None,
    };
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|n| n > 0) {
            return Err(bad(
                s,
                &format!("invalid registry port {p:?} (expected 1 to 65535)"),
            ));
        }
    }
    Ok(())
}

fn check_path(s: &str, repo: &str) -> Result<()> {
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
    Ok(())
}

/// `PATH[:REF]` of `oci:` and `oci-archive:`, split as skopeo (containers/image) splits
/// it: the path ends at the first ':', and the rest, if any, is an OCI reference name
/// ([`validate_ref_name`]; `oci:dir:example.com/app:1.0` names `example.com/app:1.0`).
fn path_and_tag(s: &str, rest: &str, transport: &str) -> Result<(PathBuf, Option<String>)> {
    let (p, t) = match rest.split_once(':') {
        Some((p, t)) => (p, Some(t).filter(|t| !t.is_empty())),
        None => (rest, None),
    };
    if p.is_empty() {
        return Err(bad(s, &format!("{transport} needs a path")));
    }
    if let Some(t) = t {
        validate_ref_name(t)?;
    }
    Ok((PathBuf::from(p), t.map(str::to_string)))
}

/// Whether `s` starts with a transport this module knows (`docker://`, `oci:`,
/// `oci-archive:`, `docker-archive:`).
pub fn names_transport(s: &str) -> bool {
    matches!(split_transport(s), Ok(Some(_)))
}

/// The transport a string names, if it starts with `word:` that is not a registry host
/// with a port (`localhost:5000/...`): `Err` for a transport we do not know.
fn split_transport(s: &str) -> Result<Option<(&str, &str)>> {
    if let Some(rest) = s.strip_prefix("docker://") {
        return Ok(Some(("docker", rest)));
    }
    let Some((word, rest)) = s.split_once(':') else {
        return Ok(None);
    };
    match word {
        "oci" | "oci-archive" | "docker-archive" => return Ok(Some((word, rest))),
        _ => {}
    }
    let looks_like_transport = !word.is_empty()
        && !word.contains('/')
        && word.as_bytes()[0].is_ascii_alphabetic()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !rest.as_bytes().first().is_some_and(u8::is_ascii_digit);
    if looks_like_transport {
        return Err(bad(
            s,
            &format!("unknown transport {word:?} (known: {TRANSPORTS})"),
        ));
    }
    Ok(None)
}

impl ImageRef {
    /// The convertor's `-r/--repository` (and `--output-repository`): a registry
    /// repository without tag or digest (`[docker://]host[:port]/path`), or any other
    /// transport.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let n = ImageName::parse(s)?;
        if let (ImageRef::Registry { .. }, Some(_)) = (&n.store, &n.reference) {
            return Err(bad(
                s,
                "the repository must not carry a tag or digest; use -i/--input-tag or -g/--input-digest",
            ));
        }
        Ok(n.store)
    }

    /// Whether this is a single file written as a whole (an archive).
    pub fn is_archive(&self) -> bool {
        matches!(
            self,
            ImageRef::OciArchive { .. } | ImageRef::DockerArchive { .. }
        )
    }

    /// The tag this reference carries (`oci:DIR:TAG`, `oci-archive:FILE:TAG`,
    /// `docker-archive:FILE:NAME:TAG`).
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Registry { .. } => None,
            ImageRef::Layout { tag, .. } | ImageRef::OciArchive { tag, .. } => tag.as_deref(),
            ImageRef::DockerArchive { name, .. } => match name {
                Some(ArchiveImage::Tagged(n)) => Some(&n.tag),
                _ => None,
            },
        }
    }
}

impl ImageName {
    /// A source or destination image in any transport (see the module documentation).
    pub fn parse(s: &str) -> Result<ImageName> {
        let (transport, rest) = split_transport(s)?.unwrap_or(("docker", s));
        let store = match transport {
            "oci" => {
                let (path, tag) = path_and_tag(s, rest, "oci:")?;
                ImageRef::Layout { path, tag }
            }
            "oci-archive" => {
                let (path, tag) = path_and_tag(s, rest, "oci-archive:")?;
                ImageRef::OciArchive { path, tag }
            }
            "docker-archive" => {
                // skopeo's rule: the path ends at the first ':'.
                let (path, name) = match rest.split_once(':') {
                    Some((p, n)) => (p, Some(n)),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(bad(s, "docker-archive: needs a path"));
                }
                let name = match name {
                    None | Some("") => None,
                    Some(n) => Some(match n.strip_prefix('@') {
                        Some(i) => ArchiveImage::Index(i.parse().map_err(|_| {
                            bad(
                                s,
                                "@N must be an image's position in manifest.json (0, 1, ...)",
                            )
                        })?),
                        None => ArchiveImage::Tagged(DockerName::parse(n)?),
                    }),
                };
                ImageRef::DockerArchive {
                    path: PathBuf::from(path),
                    name,
                }
            }
            _ => return Self::parse_registry(s, rest),
        };
        Ok(ImageName {
            store,
            reference: None,
        })
    }

    fn parse_registry(s: &str, r: &str) -> Result<ImageName> {
        let Some((host, rest)) = r.split_once('/') else {
            return Err(bad(
                s,
                &format!(
                    "expected [docker://]host[:port]/repository (for example localhost:5000/redis) or a transport ({TRANSPORTS})"
                ),
            ));
        };
        check_host(s, host)?;
        let (repo, reference) = if let Some((repo, d)) = rest.split_once('@') {
            let d: Digest = d.parse()?;
            (repo, Some(Reference::Digest(d)))
        } else if let Some((repo, t)) = rest.rsplit_once(':') {
            validate_tag(t)?;
            (repo, Some(Reference::Tag(t.to_string())))
        } else {
            (rest, None)
        };
        check_path(s, repo)?;
        Ok(ImageName {
            store: ImageRef::Registry {
                host: host.to_string(),
                repository: repo.to_string(),
            },
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tagged = |f: &mut fmt::Formatter<'_>, t: &str, p: &PathBuf, tag: &Option<String>| {
            write!(f, "{t}:{}", p.display())?;
            match tag {
                Some(tag) => write!(f, ":{tag}"),
                None => Ok(()),
            }
        };
        match self {
            ImageRef::Registry { host, repository } => write!(f, "{host}/{repository}"),
            ImageRef::Layout { path, tag } => tagged(f, "oci", path, tag),
            ImageRef::OciArchive { path, tag } => tagged(f, "oci-archive", path, tag),
            ImageRef::DockerArchive { path, name } => {
                write!(f, "docker-archive:{}", path.display())?;
                match name {
                    None => Ok(()),
                    Some(ArchiveImage::Tagged(n)) => write!(f, ":{n}"),
                    Some(ArchiveImage::Index(i)) => write!(f, ":@{i}"),
                }
            }
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.store, &self.reference) {
            (s, None) => write!(f, "{s}"),
            (s @ ImageRef::Registry { .. }, Some(Reference::Digest(d))) => write!(f, "{s}@{d}"),
            (s, Some(r)) => write!(f, "{s}:{r}"),
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
        assert_eq!(
            ImageRef::parse("docker://localhost:5000/a").unwrap(),
            ImageRef::parse("localhost:5000/a").unwrap()
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
        for bad_port in [
            "127.0.0.1:99999/x",
            "h:0/x",
            "localhost:123456/x",
            "[::1]:70000/x",
        ] {
            let e = ImageRef::parse(bad_port).unwrap_err().to_string();
            assert!(e.contains("invalid registry port"), "{bad_port}: {e}");
        }
        for good in ["[::1]:5000/x", "[::1]/x", "h:65535/x"] {
            ImageRef::parse(good).unwrap();
        }
        assert!(ImageRef::parse("localhost:5000/").is_err());
    }

    #[test]
    fn names_with_tags_and_digests() {
        let n = ImageName::parse("docker://localhost:5000/a/b:v1").unwrap();
        assert_eq!(n.reference, Some(Reference::Tag("v1".into())));
        assert_eq!(n.to_string(), "localhost:5000/a/b:v1");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let n = ImageName::parse(&format!("127.0.0.1:5000/x@{d}")).unwrap();
        assert_eq!(n.reference, Some(Reference::Digest(d.parse().unwrap())));
        assert_eq!(n.to_string(), format!("127.0.0.1:5000/x@{d}"));
        let n = ImageName::parse("localhost:5000/x").unwrap();
        assert_eq!(n.reference, None);
        assert!(ImageName::parse("localhost:5000/x@sha256:12").is_err());
        assert!(ImageName::parse("localhost:5000/x:-bad").is_err());
    }

    #[test]
    fn transports() {
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
        assert_eq!(
            ImageRef::parse("oci-archive:/a/b.tar.gz:v2").unwrap(),
            ImageRef::OciArchive {
                path: "/a/b.tar.gz".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            ImageRef::parse("docker-archive:img.tar").unwrap(),
            ImageRef::DockerArchive {
                path: "img.tar".into(),
                name: None
            }
        );
        let r = ImageRef::parse("docker-archive:img.tar:localhost:5000/a/b:v3").unwrap();
        assert_eq!(
            r,
            ImageRef::DockerArchive {
                path: "img.tar".into(),
                name: Some(ArchiveImage::Tagged(DockerName {
                    repository: "localhost:5000/a/b".into(),
                    tag: "v3".into()
                }))
            }
        );
        assert_eq!(r.tag(), Some("v3"));
        assert_eq!(
            r.to_string(),
            "docker-archive:img.tar:localhost:5000/a/b:v3"
        );
        assert_eq!(
            ImageRef::parse("docker-archive:img.tar:@1").unwrap(),
            ImageRef::DockerArchive {
                path: "img.tar".into(),
                name: Some(ArchiveImage::Index(1))
            }
        );
        assert!(ImageRef::parse("docker-archive:img.tar:@x").is_err());
        assert!(ImageRef::parse("docker-archive:").is_err());
        for bad in [
            "dir:/tmp/x",
            "containers-storage:x",
            "docker-daemon:busybox:latest",
        ] {
            let e = ImageName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown transport"), "{bad}: {e}");
            assert!(e.contains("oci-archive:"), "{e}");
        }
        // Split at the first ':' as skopeo does; the rest is an OCI reference name.
        assert_eq!(
            ImageRef::parse("oci:cc:example.com/app:1.0").unwrap(),
            ImageRef::Layout {
                path: "cc".into(),
                tag: Some("example.com/app:1.0".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci-archive:a.tar:v1.0+build").unwrap(),
            ImageRef::OciArchive {
                path: "a.tar".into(),
                tag: Some("v1.0+build".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:dir:").unwrap(),
            ImageRef::Layout {
                path: "dir".into(),
                tag: None
            }
        );
        assert!(ImageRef::parse("oci::v1").is_err());
        for good in ["v1.0+build", "a--b", "x/y:z@w", "_"] {
            let ok = validate_ref_name(good).is_ok();
            assert_eq!(ok, good != "_", "{good}");
        }
        for bad in ["", "-x", "a---b", "a..b", "a/", "/a", "a b", "a+"] {
            assert!(validate_ref_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_tag("v1.0+build").is_err());
        assert!(validate_tag("-x").is_err());
        assert!(validate_tag("v1.0_obd").is_ok());
    }

    #[test]
    fn docker_names() {
        let n = |s: &str| DockerName::parse(s).unwrap().to_string();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("user/app:1"), "docker.io/user/app:1");
        assert_eq!(n("localhost/app:1"), "localhost/app:1");
        assert_eq!(n("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(n("quay.io/a/b:c"), "quay.io/a/b:c");
        assert!(DockerName::parse("Busybox").is_err());
        assert!(DockerName::parse("a@sha256:00").is_err());
    }
}
