//! [`PlanError`]: why a sweep file could not be planned, and where ([`Place`]). Every error
//! names a place a user can go to: `file:line:col` in the sweep file or a referenced file, or
//! the key path when the problem is a missing key.

use std::fmt;

/// Where a planning error is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// A position: `file:line:col` (1-based; the column counts characters).
    At {
        /// File name as the user spelled it.
        file: String,
        /// Line.
        line: u32,
        /// Column.
        col: u32,
    },
    /// A key path of the sweep file, for problems with no position (a missing key):
    /// `file: key`.
    Key {
        /// The sweep file.
        file: String,
        /// Dotted key path, e.g. `model` or `axes.cfg`.
        key: String,
    },
    /// A whole file (`file`), e.g. one that is too large.
    File {
        /// File name as the user spelled it.
        file: String,
    },
    /// One planned cell (`cell N`, numbered from 0), for a cell that fails the render
    /// limits after expansion.
    Cell {
        /// The cell's number.
        number: u64,
    },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::At { file, line, col } => write!(f, "{file}:{line}:{col}"),
            Place::Key { file, key } => write!(f, "{file}: {key}"),
            Place::File { file } => write!(f, "{file}"),
            Place::Cell { number } => write!(f, "cell {number}"),
        }
    }
}

/// A sweep file that cannot be planned: what is wrong ([`PlanErrorKind`]) and where
/// ([`Place`]). Displays as `place: message`, e.g.
/// `foxes.toml:7:12: unknown wildcard `__anmial__` (known: animal, place)`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{place}: {kind}")]
pub struct PlanError {
    /// Where.
    pub place: Place,
    /// What.
    pub kind: PlanErrorKind,
}

impl PlanError {
    /// An error at a place.
    pub fn new(place: Place, kind: PlanErrorKind) -> Self {
        Self { place, kind }
    }

    /// Whether the error is a size limit (cells, file bytes) rather than a malformed file.
    pub fn is_limit(&self) -> bool {
        matches!(
            self.kind,
            PlanErrorKind::TooManyCells { .. } | PlanErrorKind::FileTooLarge { .. }
        )
    }
}

/// What is wrong with a sweep file.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanErrorKind {
    /// TOML syntax, an unknown key or a value of the wrong type (toml's own message).
    #[error("{0}")]
    Toml(String),
    /// A file is larger than [`PlanLimits`](super::PlanLimits) allow.
    #[error("{bytes} bytes, more than the limit of {limit} bytes")]
    FileTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The sweep file names a file that the client did not send along.
    #[error("`{file}` was not sent with the sweep (the client must send every referenced file)")]
    FileNotSent {
        /// The reference as written.
        file: String,
    },
    /// A required key is missing.
    #[error("missing: {0}")]
    Missing(String),
    /// Two keys set the same thing.
    #[error("`{key}` conflicts with `{other}`: {hint}")]
    Conflict {
        /// The key reported.
        key: String,
        /// The key it conflicts with.
        other: String,
        /// What to do.
        hint: String,
    },
    /// A value is out of range or malformed; the message names the key.
    #[error("{key}: {message}")]
    Invalid {
        /// Key path.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A list that must have values is empty.
    #[error("{0}: the list is empty")]
    EmptyList(String),
    /// An axis name that is not a parameter.
    #[error("unknown axis `{name}` (axes: {known})")]
    UnknownAxis {
        /// The name.
        name: String,
        /// The names accepted.
        known: String,
    },
    /// A `{` without its `}`.
    #[error("`{{` is never closed")]
    UnclosedBrace,
    /// A `}` without its `{`.
    #[error("`}}` without a matching `{{` (write `\\}}` for a literal brace)")]
    UnmatchedBrace,
    /// `{}`, or a list whose options are all empty.
    #[error("empty alternatives `{{}}`: give at least one non-empty option")]
    EmptyAlternatives,
    /// Alternatives nested deeper than the limit.
    #[error("alternatives nested deeper than {limit} levels")]
    NestingTooDeep {
        /// The limit.
        limit: usize,
    },
    /// A `__name__` that no `[wildcards]` entry declares.
    #[error("unknown wildcard `__{name}__` (declared: {known})")]
    UnknownWildcard {
        /// The name.
        name: String,
        /// The declared names.
        known: String,
    },
    /// A wildcard that (indirectly) refers to itself.
    #[error("wildcard cycle: {0}")]
    WildcardCycle(String),
    /// Wildcards that refer to wildcards deeper than the limit.
    #[error("wildcards nested deeper than {limit} levels: {path}")]
    WildcardTooDeep {
        /// The limit.
        limit: usize,
        /// The chain of wildcards.
        path: String,
    },
    /// The sweep expands to more cells than allowed.
    #[error("the sweep expands to {count} cells, more than the limit of {limit}")]
    TooManyCells {
        /// The count (may be astronomically large, hence text).
        count: String,
        /// The limit.
        limit: u64,
    },
    /// An expanded cell fails the render limits (e.g. a prompt too long).
    #[error("{0}")]
    InvalidCell(String),
}

impl From<PlanError> for crate::Error {
    fn from(e: PlanError) -> Self {
        if e.is_limit() {
            crate::Error::TooLarge(e.to_string())
        } else {
            crate::Error::Invalid(e.to_string())
        }
    }
}
