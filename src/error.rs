//! One error type for the crate. Every variant that comes from user input names the file, line,
//! field or value at fault, so a user can fix the input without reading the source.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A problem with one row of a dataset file: `line` is 1-based.
    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A problem with one row of a file without lines (Parquet): `row` is 1-based.
    #[error("{path}: row {row}: {msg}")]
    DataRow {
        path: PathBuf,
        row: usize,
        msg: String,
    },

    /// A dataset that is unusable as a whole (empty, all rows dropped, ...).
    #[error("{path}: {msg}")]
    Dataset { path: PathBuf, msg: String },

    /// A recipe that does not parse or does not type-check; line/column are 1-based where known.
    #[error("{path}{}: {msg}", location(*line, *column))]
    Recipe {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        msg: String,
    },

    /// A model directory or checkpoint that cannot be used.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// A configuration value that is valid YAML/JSON but not acceptable.
    #[error("{0}")]
    Config(String),

    #[error("training stopped: {0}")]
    Training(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
