//! One error type for the crate. Every variant that comes from user input names the file, line,
//! field or value at fault, so a user can fix the input without reading the source.

use std::path::PathBuf;

/// `std::result::Result` with the crate's `Error` as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `packsft`, from reading a file to a training step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on `path` failed (read, write, create, rename).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The error the operating system reported.
        #[source]
        source: std::io::Error,
    },

    /// A problem with one row of a dataset file: `line` is 1-based.
    #[error("{path}:{line}: {msg}")]
    Data {
        /// The dataset file.
        path: PathBuf,
        /// The 1-based line of the row at fault.
        line: usize,
        /// What is wrong with the row.
        msg: String,
    },

    /// A problem with one row of a file without lines (Parquet): `row` is 1-based.
    #[error("{path}: row {row}: {msg}")]
    DataRow {
        /// The dataset file.
        path: PathBuf,
        /// The 1-based index of the row at fault.
        row: usize,
        /// What is wrong with the row.
        msg: String,
    },

    /// A dataset that is unusable as a whole (empty, all rows dropped, ...).
    #[error("{path}: {msg}")]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// What makes the dataset unusable.
        msg: String,
    },

    /// A recipe that does not parse or does not type-check; line/column are 1-based where known.
    #[error("{path}{}: {msg}", location(*line, *column))]
    Recipe {
        /// The recipe file.
        path: PathBuf,
        /// The 1-based line of the fault; `None` when the parser does not know it.
        line: Option<usize>,
        /// The 1-based column of the fault; `None` when the parser does not know it.
        column: Option<usize>,
        /// What is wrong with the recipe.
        msg: String,
    },

    /// A model directory or checkpoint that cannot be used.
    #[error("{path}: {msg}")]
    Model {
        /// The model directory, or the file in it (config, weights, optimizer state) at fault.
        path: PathBuf,
        /// What makes it unusable.
        msg: String,
    },

    /// A tokenizer file (`tokenizer.json`, or the chat template in `tokenizer_config.json`)
    /// that is missing, does not load, or fails to encode or decode.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// The tokenizer file at fault.
        path: PathBuf,
        /// What went wrong, as the `tokenizers` crate or the template lookup reports it.
        msg: String,
    },

    /// A configuration value that is valid YAML/JSON but not acceptable.
    #[error("{0}")]
    Config(String),

    /// A condition that stops a training or evaluation run: no examples or no target token, a
    /// non-finite loss or gradient norm, an output directory that already holds checkpoints.
    #[error("training stopped: {0}")]
    Training(String),

    /// An error from a candle tensor operation or device, passed through unchanged.
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
    /// An `Io` error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A `Model` error on `path` with the message `msg`.
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
