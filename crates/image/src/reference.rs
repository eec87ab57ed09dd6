//! Image references on the command line: `host[:port]/repo[:tag]` or
//! `host[:port]/repo@sha256:<hex>` (the tag defaults to `latest`). As in
//! the convertor's `-r`, the first component is always the registry host;
//! nothing is normalised (`docker.io/library/x`, not `x`).

use obdoci::{ImageRef, Reference};

use crate::error::{Error, Result};

/// An image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRef {
    /// `name[:port]`.
    pub host: String,
    /// The repository path.
    pub repository: String,
    /// The tag or digest.
    pub reference: Reference,
}

impl std::fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.host, self.repository),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.host, self.repository),
        }
    }
}

impl RemoteRef {
    /// Parse `host/repo[:tag]` or `host/repo@digest`.
    pub fn parse(s: &str) -> Result<RemoteRef> {
        let oci = |what: &str, source| Error::Oci {
            what: format!("{s}: {what}"),
            source,
        };
        let (base, reference) = if let Some((b, d)) = s.split_once('@') {
            let d = d.parse().map_err(|e| oci("bad digest", e))?;
            (b, Reference::Digest(d))
        } else {
            let slash = s.rfind('/').unwrap_or(0);
            match s[slash..].rfind(':') {
                Some(i) => {
                    let (b, t) = s.split_at(slash + i);
                    let t = &t[1..];
                    (b, Reference::tag(t).map_err(|e| oci("bad tag", e))?)
                }
                None => (s, Reference::Tag("latest".into())),
            }
        };
        match ImageRef::parse(base).map_err(|e| oci("not an image reference", e))? {
            ImageRef::Registry { host, repository } => Ok(RemoteRef {
                host,
                repository,
                reference,
            }),
            ImageRef::Layout { .. } => Err(Error::Usage(format!(
                "{s}: an oci: layout is not a registry reference"
            ))),
            ImageRef::OciArchive { .. } | ImageRef::DockerArchive { .. } => {
                Err(Error::Usage(format!(
                    "{s}: an image archive cannot be served; convert it into an oci: layout \
                     or a registry first"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_digests_and_ports() {
        let r = RemoteRef::parse("localhost:5000/a/b:v1_obd").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        assert_eq!(r.reference, Reference::Tag("v1_obd".into()));
        let r = RemoteRef::parse("localhost:5000/a").unwrap();
        assert_eq!(r.reference, Reference::Tag("latest".into()));
        assert_eq!(r.to_string(), "localhost:5000/a:latest");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = RemoteRef::parse(&format!("reg.example.com/x/y@{d}")).unwrap();
        assert_eq!(r.host, "reg.example.com");
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        for bad in [
            "redis",
            "localhost:5000/Redis:v1",
            "h/r:-bad",
            "h/r@sha256:xyz",
            "/r:v1",
        ] {
            assert!(RemoteRef::parse(bad).is_err(), "{bad}");
        }
    }
}
