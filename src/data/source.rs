//! Dataset files to rows: JSONL, a JSON array, Parquet; a file, a directory of such files, or a
//! glob. Every row keeps where it came from (file and line, or file and row for Parquet), so any
//! error about it can name the place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::Value;

use crate::error::{Error, Result};

/// Where a row came from: `line` for JSON(L) text (1-based), `row` (1-based) for any file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<Path>,
    pub line: Option<usize>,
    pub row: usize,
}

impl Loc {
    /// An error about this row: `file:line: msg`, or `file: row N: msg` for Parquet.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        match self.line {
            Some(line) => Error::Data {
                path: self.file.to_path_buf(),
                line,
                msg: msg.into(),
            },
            None => Error::DataRow {
                path: self.file.to_path_buf(),
                row: self.row,
                msg: msg.into(),
            },
        }
    }
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.file.display()),
            None => write!(f, "{}: row {}", self.file.display(), self.row),
        }
    }
}

/// One row, not parsed yet (JSON text) or already a value (Parquet).
pub enum RowData<'a> {
    Json(&'a str),
    Value(Value),
}

pub struct RawRow<'a> {
    pub loc: Loc,
    pub data: RowData<'a>,
}

enum Content {
    /// (text, [(start, end, line)]): the rows are slices of the text.
    Text(String, Vec<(usize, usize, usize)>),
    Values(Vec<Value>),
}

/// The files of one dataset, read into memory.
pub struct SourceFiles {
    files: Vec<(Arc<Path>, Content)>,
}

const EXTENSIONS: &[&str] = &["jsonl", "json", "parquet"];

fn has_data_ext(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The files a data spec names: the file itself, the JSONL/JSON/Parquet files of a directory
/// (sorted, not recursive), or the files a glob (`*`, `?`, `[..]`, `**`) matches (sorted).
pub fn resolve(spec: &Path) -> Result<Vec<PathBuf>> {
    let s = spec.to_string_lossy();
    if s.contains(['*', '?', '[']) && !spec.exists() {
        let paths = glob::glob(&s)
            .map_err(|e| Error::Config(format!("data path {s}: bad glob pattern: {}", e.msg)))?;
        let mut files = Vec::new();
        for p in paths {
            let p = p.map_err(|e| Error::io(e.path().to_path_buf(), std::io::Error::from(e)))?;
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Dataset {
                path: spec.to_path_buf(),
                msg: "the glob matches no file".into(),
            });
        }
        return Ok(files);
    }
    if spec.is_dir() {
        let mut files = Vec::new();
        for e in std::fs::read_dir(spec).map_err(|e| Error::io(spec, e))? {
            let p = e.map_err(|e| Error::io(spec, e))?.path();
            if p.is_file() && has_data_ext(&p) {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Dataset {
                path: spec.to_path_buf(),
                msg: "the directory holds no .jsonl, .json or .parquet file".into(),
            });
        }
        return Ok(files);
    }
    if !spec.exists() {
        return Err(Error::io(
            spec,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    Ok(vec![spec.to_path_buf()])
}

/// Start, end and line of every element of a JSON array that is known to be valid.
fn array_elements(text: &str) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut depth, mut line, mut start_line) = (0usize, 1usize, 1usize);
    let (mut in_str, mut esc) = (false, false);
    let mut start: Option<usize> = None;
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        let mut begin = |start: &mut Option<usize>| {
            if depth == 1 && start.is_none() {
                *start = Some(i);
                start_line = line;
            }
        };
        match b {
            b'"' => {
                begin(&mut start);
                in_str = true;
            }
            b'[' | b'{' => {
                begin(&mut start);
                depth += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    if let Some(s) = start.take() {
                        out.push((s, i, start_line));
                    }
                }
            }
            b',' if depth == 1 => {
                if let Some(s) = start.take() {
                    out.push((s, i, start_line));
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => begin(&mut start),
        }
    }
    out
}

/// The text of a JSON or JSONL file: compressed files are named as such, invalid UTF-8 names its
/// line, and a UTF-8 byte-order mark at the start is dropped (editors on Windows write one).
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let compressed = if bytes.starts_with(&[0x1f, 0x8b]) {
        Some(("gzip", "gunzip"))
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(("zstd", "unzstd"))
    } else {
        None
    };
    if let Some((kind, tool)) = compressed {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            msg: format!("the file is {kind}-compressed: decompress it first ({tool})"),
        });
    }
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        Error::Data {
            path: path.to_path_buf(),
            line,
            msg: format!("invalid UTF-8 at byte {column} of the line"),
        }
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

fn read_json_text(path: &Path) -> Result<Content> {
    let text = read_utf8(path)?;
    let first = text.trim_start().chars().next();
    if first == Some('[') {
        // A JSON array: check the whole document, then slice it into its elements.
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: e.line(),
                msg: format!("invalid JSON at column {}: {e}", e.column()),
            });
        }
        let rows = array_elements(&text);
        return Ok(Content::Text(text, rows));
    }
    // JSON Lines: one value a line, blank lines skipped.
    let mut rows = Vec::new();
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        if !body.trim().is_empty() {
            rows.push((pos, pos + body.len(), i + 1));
        }
        pos += line.len();
    }
    Ok(Content::Text(text, rows))
}

fn field_value(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::from(()),
        F::Bool(b) => Value::from(*b),
        F::Byte(v) => Value::from(*v as i64),
        F::Short(v) => Value::from(*v as i64),
        F::Int(v) => Value::from(*v as i64),
        F::Long(v) => Value::from(*v),
        F::UByte(v) => Value::from(*v as i64),
        F::UShort(v) => Value::from(*v as i64),
        F::UInt(v) => Value::from(*v as i64),
        F::ULong(v) => Value::from(*v),
        F::Float16(v) => Value::from(f64::from(*v)),
        F::Float(v) => Value::from(*v as f64),
        F::Double(v) => Value::from(*v),
        F::Str(s) => Value::from(s.as_str()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::from(s),
            Err(_) => Value::from_bytes(b.data().to_vec()),
        },
        F::Group(row) => Value::from_iter(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), field_value(v))),
        ),
        F::ListInternal(list) => {
            Value::from(list.elements().iter().map(field_value).collect::<Vec<_>>())
        }
        F::MapInternal(map) => Value::from_iter(
            map.entries()
                .iter()
                .map(|(k, v)| (field_value(k), field_value(v))),
        ),
        other => Value::from(other.to_string()),
    }
}

fn read_parquet(path: &Path) -> Result<Content> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let unreadable = |e: parquet::errors::ParquetError| Error::Dataset {
        path: path.to_path_buf(),
        msg: format!("unreadable Parquet file: {e}"),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(unreadable)?;
    let iter = reader.get_row_iter(None).map_err(unreadable)?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| Error::DataRow {
            path: path.to_path_buf(),
            row: i + 1,
            msg: format!("unreadable Parquet row: {e}"),
        })?;
        rows.push(Value::from_iter(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), field_value(v))),
        ));
    }
    Ok(Content::Values(rows))
}

impl SourceFiles {
    /// Reads every file a data spec names.
    pub fn read(spec: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for p in resolve(spec)? {
            let is_parquet = p
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| e.eq_ignore_ascii_case("parquet"))
                .unwrap_or(false);
            let content = if is_parquet {
                read_parquet(&p)?
            } else {
                read_json_text(&p)?
            };
            files.push((Arc::from(p.as_path()), content));
        }
        Ok(Self { files })
    }

    /// Every row of every file, in order.
    pub fn rows(&self) -> Vec<RawRow<'_>> {
        let mut out = Vec::new();
        for (path, content) in &self.files {
            match content {
                Content::Text(text, rows) => {
                    for (i, &(s, e, line)) in rows.iter().enumerate() {
                        out.push(RawRow {
                            loc: Loc {
                                file: path.clone(),
                                line: Some(line),
                                row: i + 1,
                            },
                            data: RowData::Json(&text[s..e]),
                        });
                    }
                }
                Content::Values(values) => {
                    for (i, v) in values.iter().enumerate() {
                        out.push(RawRow {
                            loc: Loc {
                                file: path.clone(),
                                line: None,
                                row: i + 1,
                            },
                            data: RowData::Value(v.clone()),
                        });
                    }
                }
            }
        }
        out
    }
}

impl RawRow<'_> {
    /// The row as a value (JSON parsed here, keeping the key order of the file).
    pub fn value(&self) -> Result<Value> {
        match &self.data {
            RowData::Value(v) => Ok(v.clone()),
            RowData::Json(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                let line = self.loc.line.unwrap_or(1) + e.line() - 1;
                Error::Data {
                    path: self.loc.file.to_path_buf(),
                    line,
                    msg: format!("invalid JSON at column {}: {e}", e.column()),
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_are_sliced_with_their_lines() {
        let t = "[\n {\"a\": \"x,]\\\"\"},\n [1, [2]],\n 3 ,\n\"s\"\n]";
        let els = array_elements(t);
        let parts: Vec<(&str, usize)> = els.iter().map(|&(s, e, l)| (t[s..e].trim(), l)).collect();
        assert_eq!(
            parts,
            vec![
                ("{\"a\": \"x,]\\\"\"}", 2),
                ("[1, [2]]", 3),
                ("3", 4),
                ("\"s\"", 5)
            ]
        );
        assert!(array_elements("[]").is_empty());
    }
}
