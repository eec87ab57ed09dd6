//! The image `config.json` of overlaybd (as the convertor and snapshotter write it).
//!
//! `{"repoBlobUrl": "...", "lowers": [{"file": "..."} | {"dir": "..."}],
//!   "upper": {"data": "...", "index": "..."}, "resultFile": "..."}`.
//! Unknown keys are ignored. A lower given only as `dir` is looked up as
//! `dir/overlaybd.commit`, `dir/.commit` or `dir/overlaybd.sealed`, in that
//! order, as upstream does. Relative paths are taken relative to the
//! config file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

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
}

#[derive(Debug, Deserialize, Default)]
struct RawUpper {
    #[serde(default)]
    data: String,
    #[serde(default)]
    index: String,
    #[serde(default)]
    target: String,
}

#[derive(Debug, Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    lowers: Vec<RawLower>,
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
}

/// A parsed image config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    /// Lower layer files, bottom first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<UpperConfig>,
    pub result_file: Option<PathBuf>,
}

impl ImageConfig {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<ImageConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parse config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<ImageConfig> {
        let bad = |msg: String| Error::corrupt(path, "config.json", msg);
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |s: &str| {
            let p = Path::new(s);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut lowers = Vec::new();
        for (i, l) in raw.lowers.iter().enumerate() {
            if !l.target_file.is_empty() || !l.gzip_index.is_empty() {
                return Err(bad(format!(
                    "lower {i}: TurboOCI lowers (targetFile/gzipIndex) are not supported yet"
                )));
            }
            if !l.file.is_empty() {
                lowers.push(abs(&l.file));
            } else if !l.dir.is_empty() {
                let dir = abs(&l.dir);
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
                if !u.target.is_empty() {
                    return Err(bad("TurboOCI upper (target) is not supported yet".into()));
                }
                if u.data.is_empty() || u.index.is_empty() {
                    return Err(bad("upper needs both \"data\" and \"index\"".into()));
                }
                Some(UpperConfig {
                    data: abs(&u.data),
                    index: abs(&u.index),
                })
            }
            _ => None,
        };
        let result_file = (!raw.result_file.is_empty()).then(|| abs(&raw.result_file));
        Ok(ImageConfig {
            lowers,
            upper,
            result_file,
        })
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
                PathBuf::from("/cfg/b/overlaybd.commit")
            ]
        );
        assert_eq!(c.upper.unwrap().data, PathBuf::from("/w/data"));
        assert_eq!(c.result_file, Some(PathBuf::from("/w/result")));
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
    }
}
