//! The library's error type: every failure names the file, line or field it came from,
//! so that a user can fix the input without reading our code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The OS error is part of the message, not a
    /// `source`, so that error chains print it once.
    #[error("{}: {err}{}", path.display(), io_hint(err))]
    Io { path: PathBuf, err: std::io::Error },
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
    /// Training stopped on request (Ctrl-C) between two steps; `--resume` continues
    /// from the last checkpoint, redoing the epoch that was cut short.
    #[error("training in {} stopped before finishing epoch {}; its last checkpoint holds {epochs_done} epoch(s), and a resume redoes the rest", out.display(), epochs_done + 1)]
    Interrupted { out: PathBuf, epochs_done: usize },
    /// The run folder is held by another running process.
    #[error("{} is in use by another farcer run (pid {pid}); wait for it to end or choose another folder", path.display())]
    Locked { path: PathBuf, pid: String },
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
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

/// The next step for the I/O errors a user can fix.
fn io_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ReadOnlyFilesystem => {
            " (the folder is on a read-only file system: choose another output folder)"
        }
        K::StorageFull | K::QuotaExceeded => {
            " (the disk is full: free space or choose another output folder, then run again)"
        }
        K::PermissionDenied => " (check the file's permissions)",
        K::NotFound => "",
        K::FileTooLarge => " (the file system refuses a file this large)",
        _ => "",
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
