//! The `docker save` archive format (`docker-archive:`), as `docker load`, skopeo and
//! containerd read it:
//!
//! ```text
//! manifest.json   [{"Config": "<path of the image config>",
//!                   "RepoTags": ["docker.io/library/app:1.0", ...] or null,
//!                   "Layers": ["<path of layer 1>", ...]}, ...]   one item per image
//! repositories    {"<name>": {"<tag>": "<id of the top layer>"}}  (legacy, informative)
//! <paths named by manifest.json>
//! ```
//!
//! Paths are archive members: `<hex>.json` and `<diff id hex>.tar` (skopeo),
//! `<v1 id>/layer.tar` (Docker before 25, often symbolic links), or
//! `blobs/sha256/<hex>` (Docker 25 and later, whose archives are also OCI image
//! layouts). Layers are tars, uncompressed in practice (Docker 25+ with the containerd
//! image store may keep them compressed); an image config's `rootfs.diff_ids` are the
//! digests of the uncompressed layers.
//!
//! There is no manifest in the format: readers make one from the config and the layer
//! files ([`ManifestItem`], [`select`]).

use super::reference::{ArchiveImage, DockerName};
use super::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `manifest.json`.
pub const MANIFEST_JSON: &str = "manifest.json";
/// `repositories`.
pub const REPOSITORIES: &str = "repositories";

/// One image of `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestItem {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
    /// Other fields (`Parent`, `LayerSources`), kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Parse `manifest.json`.
pub fn parse_manifest_json(what: &str, bytes: &[u8]) -> Result<Vec<ManifestItem>> {
    let items: Vec<ManifestItem> = super::model::parse_json(what, bytes)?;
    if items.is_empty() {
        return Err(Error::Invalid {
            what: what.to_string(),
            reason: "the archive holds no image".into(),
        });
    }
    Ok(items)
}

/// Which item of `manifest.json` `want` names: the one tagged so (names normalised as
/// Docker does), the one at a position, or the only one.
pub fn select(items: &[ManifestItem], want: Option<&ArchiveImage>, what: &str) -> Result<usize> {
    let tags = |i: &ManifestItem| i.repo_tags.clone().unwrap_or_default();
    let all: Vec<String> = items.iter().flat_map(tags).collect();
    match want {
        None if items.len() == 1 => Ok(0),
        None => Err(Error::Invalid {
            what: what.to_string(),
            reason: format!(
                "the archive holds {} images; name one as docker-archive:FILE:NAME:TAG or :@N (tags: {})",
                items.len(),
                if all.is_empty() { "none".to_string() } else { all.join(", ") }
            ),
        }),
        Some(ArchiveImage::Index(n)) => {
            if *n < items.len() {
                Ok(*n)
            } else {
                Err(Error::NotFound(format!(
                    "image @{n} in {what} (it holds {} images)",
                    items.len()
                )))
            }
        }
        Some(ArchiveImage::Tagged(name)) => items
            .iter()
            .position(|i| {
                tags(i)
                    .iter()
                    .any(|t| DockerName::parse(t).is_ok_and(|n| &n == name))
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "image {name} in {what} (tags: {})",
                    if all.is_empty() { "none".to_string() } else { all.join(", ") }
                ))
            }),
    }
}

/// `repositories`: for each name and tag, the id of the image's top layer.
pub fn repositories(tags: &[(DockerName, String)]) -> Vec<u8> {
    let mut m: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for (n, top) in tags {
        m.entry(&n.repository).or_default().insert(&n.tag, top);
    }
    serde_json::to_vec(&m).expect("maps of strings serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_select() {
        let j =
            br#"[{"Config":"a.json","RepoTags":["app:1","localhost:5000/x:y"],"Layers":["l1.tar"]},
                     {"Config":"b.json","RepoTags":null,"Layers":["l2.tar"],"Parent":"p"}]"#;
        let items = parse_manifest_json("m", j).unwrap();
        assert_eq!(items[1].extra["Parent"], "p");
        let t = |s: &str| ArchiveImage::Tagged(DockerName::parse(s).unwrap());
        assert_eq!(
            select(&items, Some(&t("docker.io/library/app:1")), "f").unwrap(),
            0
        );
        assert_eq!(
            select(&items, Some(&t("localhost:5000/x:y")), "f").unwrap(),
            0
        );
        assert_eq!(
            select(&items, Some(&ArchiveImage::Index(1)), "f").unwrap(),
            1
        );
        let e = select(&items, None, "f").unwrap_err().to_string();
        assert!(e.contains("holds 2 images") && e.contains("app:1"), "{e}");
        let e = select(&items, Some(&t("app:2")), "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
        assert!(select(&items, Some(&ArchiveImage::Index(2)), "f").is_err());
        assert!(parse_manifest_json("m", b"[]").is_err());
        // Serialised back as Docker writes it.
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&items[0]).unwrap()).unwrap();
        assert_eq!(v["Config"], "a.json");
        assert_eq!(v["Layers"][0], "l1.tar");
        let r = repositories(&[(DockerName::parse("app:1").unwrap(), "ab".into())]);
        assert_eq!(r, br#"{"docker.io/library/app":{"1":"ab"}}"#);
    }
}
