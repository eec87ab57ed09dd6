//! The image `config.json` of overlaybd (as the convertor and snapshotter write it).
//!
//! `{"repoBlobUrl": "...", "lowers": [{"file": "..."} | {"dir": "..."}],
//!   "upper": {"data": "...", "index": "..."}, "resultFile": "..."}`.
//! TurboOCI layers (upstream's shapes): a lower
//! `{"gzipIndex": ..., "file": "<fs>.fs.meta", "targetFile": "layer blob",
//! "targetDigest": "sha256:..."}` (no `gzipIndex` for an uncompressed
//! blob) and an upper `{"index", "data", "target"[, "gzipIndex"]}`.
//! With `"accelerationLayer": true` (the snapshotter's config of an image with a
//! `ctr record-trace` layer) the last lower is that layer's directory, holding the
//! trace, and is left out of the stack, as upstream's `image_file.cpp` does.
//! Unknown keys are ignored. A lower given only as `dir` is looked up as
//! `dir/overlaybd.commit`, `dir/.commit` or `dir/overlaybd.sealed`, in that
//! order, as upstream does. Relative paths are used as given, relative to
//! the current directory, as upstream opens them: its convertor (and ours,
//! with `--reserve`) writes them relative to where it runs, e.g. under
//! `-d tmp_conv`, not to the config file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::stack::LowerSource;
use crate::warp::TargetSource;

#[derive(Debug, Deserialize, Default)]
struct RawLower {
    #[serde(default)]
    file: String,
    #[serde(default)]
    dir: String,
    #[serde(default, rename = "targetFile")]
    target_file: String,
    #[serde(default, rename = "gzipIndex")]
    gzip_index: String,
    #[serde(default, rename = "targetDigest")]
    target_digest: String,
}

#[derive(Debug, Deserialize, Default)]
struct RawUpper {
    #[serde(default)]
    data: String,
    #[serde(default)]
    index: String,
    #[serde(default)]
    target: String,
    #[serde(default, rename = "gzipIndex")]
    gzip_index: String,
}

#[derive(Debug, Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    lowers: Vec<RawLower>,
    /// The last lower is an acceleration layer (a directory holding the trace), not
    /// a layer: upstream's `image_file.cpp` leaves it out of the stack.
    #[serde(default, rename = "accelerationLayer")]
    acceleration_layer: bool,
    #[serde(default)]
    upper: Option<RawUpper>,
    #[serde(default, rename = "resultFile")]
    result_file: String,
}

/// A writable upper layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperConfig {
    pub data: PathBuf,
    pub index: PathBuf,
    /// TurboOCI: the layer blob the warp upper maps file data into.
    pub target: Option<TargetSource>,
}

/// A parsed image config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    /// Lower layer files, bottom first.
    pub lowers: Vec<PathBuf>,
    /// Per lower: its target when it is a TurboOCI layer (same length as
    /// `lowers`).
    pub lower_targets: Vec<Option<TargetSource>>,
    pub upper: Option<UpperConfig>,
    pub result_file: Option<PathBuf>,
}

impl ImageConfig {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<ImageConfig> {
        crate::io::check_regular(path, "an image config file")?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parse config text; `path` names it in errors. Relative paths in it stay
    /// relative to the current directory, as upstream's tools open them.
    pub fn parse(text: &str, path: &Path) -> Result<ImageConfig> {
        let bad = |msg: String| Error::corrupt(path, "config.json", msg);
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            format: "config.json",
            source,
        })?;
        // serde reads a struct from an array of its fields too.
        if text.trim_start().starts_with('[') {
            return Err(bad(
                "it is a JSON array; a config.json is an object: {\"lowers\": [{\"file\": ...}], \
                 \"upper\": {\"data\": ..., \"index\": ...}, \"resultFile\": ...}"
                    .into(),
            ));
        }
        let as_given = |s: &str| PathBuf::from(s);
        let mut lowers = Vec::new();
        let mut lower_targets = Vec::new();
        let raw_lowers = match raw.lowers.split_last() {
            Some((_, below)) if raw.acceleration_layer => below,
            _ => &raw.lowers[..],
        };
        for (i, l) in raw_lowers.iter().enumerate() {
            let turbo = !l.target_file.is_empty()
                || !l.gzip_index.is_empty()
                || !l.target_digest.is_empty();
            if turbo {
                if l.target_file.is_empty() {
                    return Err(bad(format!(
                        "lower {i}: a TurboOCI lower needs \"targetFile\" (remote targets by \"targetDigest\" alone are not supported)"
                    )));
                }
                if !l.target_digest.is_empty() && !is_digest(&l.target_digest) {
                    return Err(bad(format!(
                        "lower {i}: \"targetDigest\" '{}' is not a layer digest (sha256: and 64 lowercase hex digits, or sha512: and 128)",
                        l.target_digest.escape_debug()
                    )));
                }
                lower_targets.push(Some(TargetSource {
                    file: as_given(&l.target_file),
                    gzip_index: (!l.gzip_index.is_empty()).then(|| as_given(&l.gzip_index)),
                }));
            } else {
                lower_targets.push(None);
            }
            if !l.file.is_empty() {
                lowers.push(as_given(&l.file));
            } else if !l.dir.is_empty() {
                let dir = as_given(&l.dir);
                let found = ["overlaybd.commit", ".commit", "overlaybd.sealed"]
                    .iter()
                    .map(|n| dir.join(n))
                    .find(|p| p.exists())
                    .ok_or_else(|| {
                        bad(format!(
                            "lower {i}: no overlaybd.commit, .commit or overlaybd.sealed in {}",
                            dir.display()
                        ))
                    })?;
                lowers.push(found);
            } else {
                return Err(bad(format!("lower {i} has neither \"file\" nor \"dir\"")));
            }
        }
        let upper = match raw.upper {
            Some(u) if !u.data.is_empty() || !u.index.is_empty() => {
                if u.data.is_empty() || u.index.is_empty() {
                    return Err(bad("upper needs both \"data\" and \"index\"".into()));
                }
                if u.target.is_empty() && !u.gzip_index.is_empty() {
                    return Err(bad("upper has \"gzipIndex\" but no \"target\"".into()));
                }
                Some(UpperConfig {
                    data: as_given(&u.data),
                    index: as_given(&u.index),
                    target: (!u.target.is_empty()).then(|| TargetSource {
                        file: as_given(&u.target),
                        gzip_index: (!u.gzip_index.is_empty()).then(|| as_given(&u.gzip_index)),
                    }),
                })
            }
            _ => None,
        };
        let result_file = (!raw.result_file.is_empty()).then(|| as_given(&raw.result_file));
        Ok(ImageConfig {
            lowers,
            lower_targets,
            upper,
            result_file,
        })
    }

    /// The lowers as stack sources (TurboOCI lowers with their targets).
    pub fn lower_sources(&self) -> Vec<LowerSource> {
        self.lowers
            .iter()
            .enumerate()
            .map(
                |(i, f)| match self.lower_targets.get(i).cloned().flatten() {
                    Some(target) => LowerSource::Warp {
                        file: f.clone(),
                        target,
                    },
                    None => LowerSource::File(f.clone()),
                },
            )
            .collect()
    }

    /// Every file the layers of this config are read from or written to: lower
    /// files and their targets and gzip indexes, the upper's data, index, target and
    /// gzip index.
    pub fn layer_files(&self) -> Vec<PathBuf> {
        let mut v = self.lowers.clone();
        let target = |t: &TargetSource| std::iter::once(t.file.clone()).chain(t.gzip_index.clone());
        v.extend(self.lower_targets.iter().flatten().flat_map(target));
        if let Some(u) = &self.upper {
            v.push(u.data.clone());
            v.push(u.index.clone());
            v.extend(u.target.iter().flat_map(target));
        }
        v
    }

    /// The layer file ([`ImageConfig::layer_files`]) or one of `others` that is the
    /// same file as `p`, if any: an output at `p` would destroy it.
    pub fn same_as_layer_file(&self, p: &Path, others: &[&Path]) -> Option<PathBuf> {
        let files = self.layer_files();
        files
            .iter()
            .map(PathBuf::as_path)
            .chain(others.iter().copied())
            .find(|f| crate::io::same_file(p, f))
            .map(Path::to_path_buf)
    }

    /// Whether the result file can be written where the config says, so that a
    /// tool finds out before its work, not after it: not a directory, in an
    /// existing directory, writable (not on a read-only filesystem), and not one of
    /// the layers' files nor of `inputs` (the layer tar, the config itself), which
    /// writing "success" into would destroy.
    pub fn check_result_file(&self, inputs: &[&Path]) -> Result<()> {
        let Some(p) = &self.result_file else {
            return Ok(());
        };
        let bad = |kind: std::io::ErrorKind, why: String| {
            Error::io(p, std::io::Error::new(kind, format!("resultFile: {why}")))
        };
        if p.is_dir() {
            return Err(bad(
                std::io::ErrorKind::IsADirectory,
                "is a directory".into(),
            ));
        }
        if let Some(f) = self.same_as_layer_file(p, inputs) {
            return Err(bad(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "is {}, an input of this apply; writing the result would destroy it",
                    f.display()
                ),
            ));
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(bad(
                std::io::ErrorKind::NotFound,
                "its directory does not exist".into(),
            ));
        }
        // The file if it exists, else its directory, must take writes (access(2)
        // also fails with EROFS on a read-only filesystem, even for root).
        let probe = if p.exists() { p.as_path() } else { dir };
        crate::io::check_writable(probe)
            .map_err(|e| bad(e.kind(), format!("cannot be written ({e})")))
    }

    /// Write `msg` to the result file, if the config names one
    /// ("success" or the error text, as upstream's tools do).
    pub fn write_result(&self, msg: &str) -> Result<()> {
        if let Some(p) = &self.result_file {
            std::fs::write(p, msg).map_err(|e| Error::io(p, e))?;
        }
        Ok(())
    }
}

/// An OCI digest of a layer blob: `sha256:` and 64 lowercase hex digits (or
/// `sha512:` and 128). Upstream uses `targetDigest` to fetch the target from
/// the registry and to key its gzip cache; it is not checked against a local
/// `targetFile`, here either, but a malformed one is a broken config.
fn is_digest(d: &str) -> bool {
    let hex = |h: &str, n: usize| {
        h.len() == n
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if let Some(h) = d.strip_prefix("sha256:") {
        hex(h, 64)
    } else if let Some(h) = d.strip_prefix("sha512:") {
        hex(h, 128)
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_shape_and_ignores_unknown_keys() {
        let c = ImageConfig::parse(
            r#"{"repoBlobUrl":"","lowers":[{"file":"/a/ext4_64"},{"file":"b/overlaybd.commit","digest":"x"}],
                "upper":{"index":"/w/index","data":"/w/data"},"resultFile":"/w/result","accelerationLayer":false}"#,
            Path::new("/cfg/config.json"),
        )
        .unwrap();
        assert_eq!(
            c.lowers,
            vec![
                PathBuf::from("/a/ext4_64"),
                // Relative to the current directory, as upstream opens it, not
                // to the config's: upstream's convertor writes `-d tmp_conv`
                // paths so.
                PathBuf::from("b/overlaybd.commit")
            ]
        );
        assert_eq!(c.upper.unwrap().data, PathBuf::from("/w/data"));
        assert_eq!(c.result_file, Some(PathBuf::from("/w/result")));
    }

    /// The snapshotter's config of an image with an acceleration (trace) layer:
    /// `accelerationLayer: true` and that layer's directory, holding only `trace`, as
    /// the last lower (accelerated-container-image `pkg/snapshot/storage.go`
    /// `constructSpecForAccelLayer`, `updateSpec`). overlaybd leaves the last lower out
    /// of the stack (`src/image_file.cpp:455-458`); so does the parser.
    #[test]
    fn acceleration_layer_is_not_a_lower() {
        let c = ImageConfig::parse(
            r#"{"repoBlobUrl":"","lowers":[{"file":"/a/overlaybd.commit"},{"dir":"/no/such/accel/fs"}],
                "upper":{},"resultFile":"/r","accelerationLayer":true}"#,
            Path::new("/cfg/config.v1.json"),
        )
        .unwrap();
        assert_eq!(c.lowers, vec![PathBuf::from("/a/overlaybd.commit")]);
        assert_eq!(c.lower_targets, vec![None]);
        // Without the flag the same lower is a layer, and its directory has no layer file.
        let e = ImageConfig::parse(
            r#"{"lowers":[{"file":"/a/overlaybd.commit"},{"dir":"/no/such/accel/fs"}]}"#,
            Path::new("/cfg/config.v1.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lower 1: no overlaybd.commit"), "{e}");
    }

    #[test]
    fn parses_turbooci_shapes() {
        let c = ImageConfig::parse(
            r#"{"repoBlobUrl":"","lowers":[{"gzipIndex":"/d0/gzip.meta","file":"/d0/ext4.fs.meta","targetFile":"/d0/layer.tar","targetDigest":"sha256:abababababababababababababababababababababababababababababababab"},
                {"file":"/d1/ext4.fs.meta","targetFile":"/d1/layer.tar","targetDigest":"sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"},{"file":"/d2/x"}],
                "upper":{"index":"/w/i","data":"/w/d","target":"/w/layer.tar"},"resultFile":""}"#,
            Path::new("/cfg/config.json"),
        )
        .unwrap();
        let s = c.lower_sources();
        assert_eq!(
            s[0],
            LowerSource::Warp {
                file: "/d0/ext4.fs.meta".into(),
                target: TargetSource::gzip("/d0/layer.tar", "/d0/gzip.meta")
            }
        );
        assert_eq!(
            s[1],
            LowerSource::Warp {
                file: "/d1/ext4.fs.meta".into(),
                target: TargetSource::tar("/d1/layer.tar")
            }
        );
        assert_eq!(s[2], LowerSource::File("/d2/x".into()));
        assert_eq!(
            c.upper.unwrap().target,
            Some(TargetSource::tar("/w/layer.tar"))
        );
        assert_eq!(c.result_file, None);
        let e = ImageConfig::parse(
            r#"{"lowers":[{"file":"/a","targetDigest":"sha256:ab"}]}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targetFile"), "{e}");
        // A malformed targetDigest is refused, naming the config and the lower.
        for d in [
            "xyz",
            "sha256:ab",
            "sha256:0000",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha256:{}", "ab".repeat(33)),
            &format!("md5:{}", "ab".repeat(32)),
        ] {
            let text = format!(
                r#"{{"lowers":[{{"file":"/a","targetFile":"/t"}},{{"file":"/b","targetFile":"/t","targetDigest":"{d}"}}]}}"#
            );
            let e = ImageConfig::parse(&text, Path::new("/cfg/config.json"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("/cfg/config.json")
                    && e.contains(&format!(
                        "lower 1: \"targetDigest\" '{d}' is not a layer digest"
                    )),
                "{e}"
            );
        }
        for d in [
            format!("sha256:{}", "0".repeat(64)),
            format!("sha512:{}", "0f".repeat(64)),
        ] {
            let text =
                format!(r#"{{"lowers":[{{"file":"/b","targetFile":"/t","targetDigest":"{d}"}}]}}"#);
            ImageConfig::parse(&text, Path::new("/cfg/config.json")).unwrap();
        }
    }

    #[test]
    fn errors_name_the_file() {
        let e = ImageConfig::parse("{nope", Path::new("/x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/config.json"), "{e}");
        let e = ImageConfig::parse(r#"{"lowers":[{}]}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lower 0"), "{e}");
        // An array is not taken for the object it could spell.
        for text in ["[]", " [[{\"file\":\"/a\"}]]"] {
            let e = ImageConfig::parse(text, Path::new("c.json"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(
                    "c.json: corrupt config.json: it is a JSON array; a config.json is an object"
                ),
                "{e}"
            );
        }
    }

    /// Malformed JSON is a corrupt config.json whose source is serde_json's
    /// error (callers can downcast to it); the chain names the file and the
    /// JSON problem once.
    #[test]
    fn malformed_json_keeps_the_parser_error() {
        let e = ImageConfig::parse("{nope", Path::new("/x/config.json")).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Json {
                    format: "config.json",
                    ..
                }
            ),
            "{e:?}"
        );
        let json = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<serde_json::Error>())
            .expect("the serde_json error is the source");
        assert!(json.is_syntax(), "{json}");
        assert_eq!(
            testutil::assert_clean_chain(&e),
            format!("/x/config.json: corrupt config.json: {json}")
        );
    }
}
