//! `--data` strings: `meld:<dir>`, `iemocap:<dir>`, `jsonl:<file or dir>` (or a path to a
//! `.jsonl` file), and `demo`. A spec knows how to load a split and which split the
//! few-shot examples come from.

use super::{demo, iemocap, jsonl, meld, Dataset};
use crate::error::{Error, Result};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Meld(PathBuf),
    Iemocap(PathBuf),
    Jsonl(PathBuf),
    Demo,
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        Ok(match kind {
            "meld" if !rest.is_empty() => DataSpec::Meld(rest.into()),
            "iemocap" if !rest.is_empty() => DataSpec::Iemocap(rest.into()),
            "jsonl" if !rest.is_empty() => DataSpec::Jsonl(rest.into()),
            "demo" => DataSpec::Demo,
            _ if s.ends_with(".jsonl") || s.ends_with(".json") => DataSpec::Jsonl(s.into()),
            _ => {
                return Err(Error::input(
                    "--data",
                    format!("`{s}`: expected meld:<dir>, iemocap:<dir>, jsonl:<file|dir>, a .jsonl file, or demo"),
                ))
            }
        })
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Meld(p) => write!(f, "meld:{}", p.display()),
            DataSpec::Iemocap(p) => write!(f, "iemocap:{}", p.display()),
            DataSpec::Jsonl(p) => write!(f, "jsonl:{}", p.display()),
            DataSpec::Demo => write!(f, "demo"),
        }
    }
}

impl serde::Serialize for DataSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DataSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DataSpec {
    pub fn corpus(&self) -> &'static str {
        match self {
            DataSpec::Meld(_) => "meld",
            DataSpec::Iemocap(_) => "iemocap",
            DataSpec::Jsonl(_) => "jsonl",
            DataSpec::Demo => "demo",
        }
    }

    /// Loads one split. `seed` drives IEMOCAP's dev split, cutting and `xxx` relabelling.
    pub fn load(&self, split: &str, seed: u64) -> Result<Dataset> {
        match self {
            DataSpec::Meld(dir) => meld::load(dir, split),
            DataSpec::Iemocap(dir) => {
                let (root, frames) = iemocap_root(dir)?;
                let opts = iemocap::Options {
                    seed,
                    ..Default::default()
                };
                iemocap::load(&root, split, &opts, frames.as_deref())
            }
            DataSpec::Jsonl(p) => jsonl::load(p, split),
            DataSpec::Demo => Ok(demo::load(split)),
        }
    }

    /// The split the few-shot examples are drawn from: MELD dev (as the authors did),
    /// IEMOCAP train, the demo's dev; for JSON lines `dev.jsonl`, else `train.jsonl`.
    pub fn pool_split(&self) -> Option<&'static str> {
        match self {
            DataSpec::Meld(_) | DataSpec::Demo => Some("dev"),
            DataSpec::Iemocap(_) => Some("train"),
            DataSpec::Jsonl(p) if p.is_dir() => {
                if p.join("dev.jsonl").is_file() {
                    Some("dev")
                } else if p.join("train.jsonl").is_file() {
                    Some("train")
                } else {
                    None
                }
            }
            DataSpec::Jsonl(_) => None,
        }
    }
}

/// An IEMOCAP data dir is either the release root (with `Session1`...) or a folder made by
/// `farcer prepare iemocap`, whose `source.txt` names the root and which holds `frames/`.
fn iemocap_root(dir: &std::path::Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let src = dir.join("source.txt");
    if src.is_file() {
        let root = std::fs::read_to_string(&src).map_err(|e| Error::io(&src, e))?;
        Ok((PathBuf::from(root.trim()), Some(dir.join("frames"))))
    } else {
        Ok((dir.to_path_buf(), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "meld:/x".parse::<DataSpec>().unwrap(),
            DataSpec::Meld("/x".into())
        );
        assert_eq!("demo".parse::<DataSpec>().unwrap(), DataSpec::Demo);
        assert_eq!(
            "a/b.jsonl".parse::<DataSpec>().unwrap(),
            DataSpec::Jsonl("a/b.jsonl".into())
        );
        assert!("meld".parse::<DataSpec>().is_err());
        assert!("foo:bar".parse::<DataSpec>().is_err());
    }
}
