//! The library's error type: every failure names the file, line or field it came from,
//! so that a user can fix the input without reading our code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Input that is present but wrong: a bad CSV row, JSON line, config field...
    #[error("{location}: {message}")]
    Input { location: String, message: String },
    /// A model file or checkpoint that does not have what we need.
    #[error("model {what}: {message}")]
    Model { what: String, message: String },
    /// Downloads and the hub.
    #[error("{0}")]
    Fetch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// `--resume` on a run whose training finished (callers may treat it as done).
    #[error("{0} already finished; nothing to resume")]
    AlreadyFinished(PathBuf),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn input(location: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Input {
            location: location.into(),
            message: message.into(),
        }
    }
    pub fn model(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Model {
            what: what.into(),
            message: message.into(),
        }
    }
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

impl From<minijinja::Error> for Error {
    fn from(e: minijinja::Error) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::Template(msg)
    }
}

/// Adds the path to an I/O error.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
