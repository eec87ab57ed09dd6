//! Manifests, indexes, descriptors and media types (OCI image-spec 1.1 and Docker schema 2).
//!
//! Field order follows the Go structs of image-spec so that our output looks like
//! upstream's; fields we do not model are kept in `extra` and written back after them.

use super::{Digest, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MT_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const MT_DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
pub const MT_DOCKER_FOREIGN_LAYER: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MT_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const MT_DOCKER_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// BuildKit marks attestation manifests in an index with this annotation.
pub const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// OCI layout: the tag of a manifest listed in `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Every manifest type we ask registries for (`Accept`).
pub const MANIFEST_ACCEPT: &[&str] = &[
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
];

/// Largest manifest or index we accept (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config we accept.
pub const MAX_CONFIG_SIZE: u64 = 64 << 20;

pub fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == MT_OCI_MANIFEST || media_type == MT_DOCKER_MANIFEST
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Platform {
    /// `os_arch[_variant]`, as upstream names per-platform work directories. The
    /// fields come from the source index: anything but ASCII letters, digits, `.`,
    /// `-` and `_` becomes `_`, and the name is cut at [`Platform::DIR_NAME_MAX`]
    /// characters, so it is always one short path component.
    pub fn dir_name(&self) -> String {
        let mut s = format!("{}_{}", self.os, self.architecture);
        if let Some(v) = &self.variant {
            s.push('_');
            s.push_str(v);
        }
        s.chars()
            .take(Self::DIR_NAME_MAX)
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Longest [`Platform::dir_name`].
    pub const DIR_NAME_MAX: usize = 64;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(
        rename = "mediaType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            data: None,
            platform: None,
            artifact_type: None,
            extra: Map::new(),
        }
    }

    /// Descriptor of a byte buffer.
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Self {
        Self::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// `{mediaType, digest, size}` only, as used for `subject`.
    pub fn bare(&self) -> Descriptor {
        Descriptor::new(self.media_type.clone(), self.digest.clone(), self.size)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    pub fn is_attestation(&self) -> bool {
        self.annotation(ANNOTATION_REFERENCE_TYPE) == Some(ATTESTATION_MANIFEST)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

pub fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|error| Error::Json {
        what: what.to_string(),
        error,
    })
}

/// Compact JSON, as Go's `json.Marshal` writes it.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialising an in-memory JSON model cannot fail")
}

/// The media type of a manifest document: its `mediaType` field, or for documents
/// without one, guessed from the shape (`manifests` → OCI index, `config` → OCI manifest).
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = v.get("mediaType").and_then(Value::as_str) {
        return Some(mt.to_string());
    }
    if v.get("manifests").is_some() {
        Some(MT_OCI_INDEX.to_string())
    } else if v.get("config").is_some() {
        Some(MT_OCI_MANIFEST.to_string())
    } else if v.get("fsLayers").is_some() {
        Some(MT_DOCKER_SCHEMA1.to_string())
    } else {
        None
    }
}

/// An image config kept as a JSON value so that every field survives a round trip.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig(pub Value);

impl ImageConfig {
    pub fn parse(what: &str, bytes: &[u8]) -> Result<ImageConfig> {
        let v: Value = parse_json(what, bytes)?;
        if !v.is_object() {
            return Err(Error::Invalid {
                what: what.to_string(),
                reason: "image config is not a JSON object".into(),
            });
        }
        Ok(ImageConfig(v))
    }

    /// `rootfs.diff_ids`.
    /// A missing `rootfs` or `diff_ids` is an empty list; one of the wrong JSON type is
    /// an error that says so.
    pub fn diff_ids(&self, what: &str) -> Result<Vec<Digest>> {
        let invalid = |field: &str, v: &Value, want: &str| Error::Invalid {
            what: what.to_string(),
            reason: format!("{field} is {}, not {want}", json_kind(v)),
        };
        let Some(rootfs) = self.0.get("rootfs") else {
            return Ok(Vec::new());
        };
        if !rootfs.is_object() {
            return Err(invalid("rootfs", rootfs, "an object"));
        }
        let Some(ids) = rootfs.get("diff_ids") else {
            return Ok(Vec::new());
        };
        let ids = ids
            .as_array()
            .ok_or_else(|| invalid("rootfs.diff_ids", ids, "an array"))?;
        ids.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::Invalid {
                        what: what.to_string(),
                        reason: "rootfs.diff_ids holds a non-string".into(),
                    })?
                    .parse()
            })
            .collect()
    }

    /// Replace `rootfs.diff_ids` (and set `rootfs.type` to `layers` if missing).
    pub fn set_diff_ids(&mut self, ids: &[Digest]) {
        let obj = self.0.as_object_mut().expect("checked in parse");
        let rootfs = obj
            .entry("rootfs")
            .or_insert_with(|| Value::Object(Map::new()));
        if !rootfs.is_object() {
            *rootfs = Value::Object(Map::new());
        }
        let r = rootfs.as_object_mut().expect("just made an object");
        r.entry("type")
            .or_insert_with(|| Value::String("layers".into()));
        r.insert(
            "diff_ids".into(),
            Value::Array(ids.iter().map(|d| Value::String(d.to_string())).collect()),
        );
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        to_json(&self.0)
    }
}

/// "a string", "null", ...: the JSON type of `v`, for messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_dir_name_is_one_short_component() {
        let p = |os: &str, arch: &str, variant: Option<&str>| Platform {
            architecture: arch.into(),
            os: os.into(),
            os_version: None,
            os_features: None,
            variant: variant.map(String::from),
            extra: Map::new(),
        };
        assert_eq!(p("linux", "arm64", Some("v8")).dir_name(), "linux_arm64_v8");
        assert_eq!(p("linux", "amd64", None).dir_name(), "linux_amd64");
        assert_eq!(p("../..", "a/b\0c", None).dir_name(), ".._.._a_b_c");
        let long = p(&"x".repeat(5000), "\u{e9}", None).dir_name();
        assert_eq!(long.len(), Platform::DIR_NAME_MAX);
    }

    #[test]
    fn manifest_round_trip_keeps_unknown_fields() {
        let src = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","x-extra":1},"layers":[],"foo":{"bar":[1,2]},"annotations":{"a":"b"}}"#;
        let m: Manifest = parse_json("m", src).unwrap();
        assert_eq!(m.extra.get("foo").unwrap()["bar"][1], 2);
        assert_eq!(m.config.extra.get("x-extra").unwrap(), 1);
        let out = to_json(&m);
        let a: Value = serde_json::from_slice(src).unwrap();
        let b: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn config_keeps_docker_fields_and_sets_diff_ids() {
        let src = br#"{"architecture":"amd64","os":"linux","config":{"Healthcheck":{"Test":["CMD","true"]},"OnBuild":["RUN x"],"Shell":["/bin/sh"]},"container_config":{"Cmd":["x"]},"docker_version":"24","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#;
        let mut c = ImageConfig::parse("c", src).unwrap();
        assert_eq!(c.diff_ids("c").unwrap().len(), 1);
        for (json, want) in [
            (
                r#"{"rootfs":{"diff_ids":"sha256:00"}}"#,
                "rootfs.diff_ids is a string, not an array",
            ),
            (
                r#"{"rootfs":{"diff_ids":null}}"#,
                "rootfs.diff_ids is null, not an array",
            ),
            (r#"{"rootfs":[]}"#, "rootfs is an array, not an object"),
        ] {
            let e = ImageConfig::parse("cfg", json.as_bytes())
                .unwrap()
                .diff_ids("cfg");
            let e = e.unwrap_err().to_string();
            assert!(e.contains("cfg") && e.contains(want), "{e}");
        }
        let none = ImageConfig::parse("cfg", br#"{"rootfs":{"type":"layers"}}"#).unwrap();
        assert!(none.diff_ids("cfg").unwrap().is_empty());
        let d = Digest::of(b"x");
        c.set_diff_ids(&[d.clone(), d.clone()]);
        let v: Value = serde_json::from_slice(&c.to_bytes()).unwrap();
        assert_eq!(v["config"]["Healthcheck"]["Test"][1], "true");
        assert_eq!(v["docker_version"], "24");
        assert_eq!(v["container_config"]["Cmd"][0], "x");
        assert_eq!(v["rootfs"]["diff_ids"][1], d.as_str());
        assert_eq!(v["rootfs"]["type"], "layers");
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MT_OCI_INDEX)
        );
        assert_eq!(
            sniff_media_type(br#"{"mediaType":"x","manifests":[]}"#).as_deref(),
            Some("x")
        );
    }
}
