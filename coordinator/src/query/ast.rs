//! The filter language's tree and limits: what a parsed filter is ([`Filter`], its predicates,
//! fields, tests and values, the [`Column`]s) and the [`FilterError`] that places a mistake.
//! Made by `parser` and `sort`; turned into SQL by `store/filter.rs`.

use std::fmt;

use crate::domain::state::CellState;

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Most values (literals) in one filter; keeps the bound parameters far below both backends'
/// limits.
pub const MAX_VALUES: usize = 1000;
/// Most tests (comparisons) in one filter. SQLite parses `a or b or …` into a tree as deep as
/// the list is long and refuses trees deeper than 1000; use `in (…)` for long lists.
pub const MAX_TESTS: usize = 256;

/// A line and column in the filter text, both from 1; columns count characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, in characters.
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A syntax or type error in a filter or sort, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    /// Where the offending token starts.
    pub pos: Pos,
    /// What is wrong, for people.
    pub message: String,
}

impl FilterError {
    pub(crate) fn at(pos: Pos, message: impl Into<String>) -> Self {
        FilterError {
            pos,
            message: message.into(),
        }
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.message)
    }
}

impl std::error::Error for FilterError {}

impl From<FilterError> for crate::Error {
    fn from(e: FilterError) -> Self {
        crate::Error::Invalid(format!("filter: {e}"))
    }
}

/// A parsed, type-checked filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// Every part matches.
    And(Vec<Filter>),
    /// Some part matches.
    Or(Vec<Filter>),
    /// The part does not match (a missing value counts as not matching).
    Not(Box<Filter>),
    /// One test of one field.
    Pred(Predicate),
}

/// One test of one field.
#[derive(Clone, Debug, PartialEq)]
pub struct Predicate {
    /// What is tested.
    pub field: Field,
    /// How.
    pub test: Test,
}

/// What a predicate tests.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// A column of the cell.
    Column(Column),
    /// A binding, by key.
    Binding(String),
}

/// A test against a field. Values are checked against the field's type by the parser; every
/// list is non-empty and of one [`Value`] kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Test {
    /// `field op value`.
    Cmp(CmpOp, Value),
    /// `low <= field <= high`.
    Between(Value, Value),
    /// `field` equals one of the values.
    In(Vec<Value>),
    /// The field's text contains this literal (no wildcards).
    Contains(String),
}

/// A comparison operator. `!=` is parsed as `not … = …` (see "Missing values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`.
    Eq,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl CmpOp {
    /// The SQL spelling (the same in both backends).
    pub fn as_sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A typed literal.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer (integer columns, ids, unix ms).
    Int(i64),
    /// A number compared as a float (`cfg`, numeric binding comparisons).
    Number(f64),
    /// Text.
    Text(String),
}

/// How a column's values are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// Integer.
    Int,
    /// Floating point (decimal-rounded when stored).
    Float,
    /// Text.
    Text,
    /// A cell state name.
    State,
    /// Unix milliseconds; also accepts a UTC date string.
    Time,
    /// An id (number) or a name (string) of another table.
    IdOrName,
    /// `true` or `false` (stored as 1 or 0); written alone, the field means `= true`.
    Bool,
}

macro_rules! columns {
    ($($(#[$doc:meta])* $variant:ident = $name:literal $(| $alias:literal)*, $kind:ident;)+) => {
        /// A queryable column of a cell. The first spelling is canonical; others are aliases.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Column {
            $($(#[$doc])* $variant),+
        }

        impl Column {
            /// Every column, in documentation order.
            pub const ALL: &'static [Column] = &[$(Column::$variant),+];

            /// The canonical name.
            pub fn name(self) -> &'static str {
                match self {
                    $(Column::$variant => $name),+
                }
            }

            /// How its values are typed.
            pub fn kind(self) -> ColumnKind {
                match self {
                    $(Column::$variant => ColumnKind::$kind),+
                }
            }

            /// The column a name (or alias) means, if any.
            pub fn from_name(s: &str) -> Option<Column> {
                match s {
                    $($name $(| $alias)* => Some(Column::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

columns! {
    /// The sweep: its id (number) or name (string).
    Sweep = "sweep", IdOrName;
    /// The cell's id.
    Id = "id" | "cell", Int;
    /// The cell's number within its sweep, from 0.
    Number = "number", Int;
    /// Lifecycle state (`available`, …, `completed`, `cancelled`, `discarded`).
    State = "state", State;
    /// Model reference.
    Model = "model", Text;
    /// Prompt.
    Prompt = "prompt", Text;
    /// Negative prompt.
    Negative = "negative" | "negative_prompt", Text;
    /// Seed.
    Seed = "seed", Int;
    /// Sampler steps.
    Steps = "steps", Int;
    /// Guidance scale, rounded to 4 decimals.
    Cfg = "cfg", Float;
    /// Sampler, by kiln's name (`lcm`, `euler_a`, `dpmpp_2m_karras`, `euler_a_diffusers`).
    Sampler = "sampler", Text;
    /// Width in pixels.
    Width = "width", Int;
    /// Height in pixels.
    Height = "height", Int;
    /// The worker that holds (running) or won (completed) the cell: id or name.
    Worker = "worker", IdOrName;
    /// Attempts made.
    Attempt = "attempt" | "attempts", Int;
    /// When the cell reached a terminal state (unix ms, or a UTC date string).
    Finished = "finished" | "finished_at", Time;
    /// Device of the result (completed cells).
    Device = "device", Text;
    /// sha256 of the result PNG (completed cells).
    Sha256 = "sha256", Text;
    /// Storage key of the result PNG (completed cells).
    ObjectKey = "object_key", Text;
    /// Marked as a keeper (`kiln star`).
    Starred = "starred", Bool;
    /// A user's rating: 1 to 5 stars, 0 when not rated.
    Rating = "rating", Int;
    /// The hires fix's scale, rounded to 4 decimals (missing without a hires fix, or when a
    /// `hires_size` was given).
    HiresScale = "hires_scale", Float;
    /// The final width of a hires cell in pixels (missing without a hires fix).
    HiresWidth = "hires_width", Int;
    /// The final height of a hires cell in pixels (missing without a hires fix).
    HiresHeight = "hires_height", Int;
    /// The hires upscaler, by kiln's name (`latent`, `latent_nearest`, `lanczos`, …).
    HiresUpscaler = "hires_upscaler", Text;
    /// Hires steps as written; 0: as many as the first pass.
    HiresSteps = "hires_steps", Int;
    /// The hires fix's denoising strength, rounded to 4 decimals.
    HiresDenoise = "hires_denoise", Float;
}

impl Column {
    /// True when a cell may have no value here (the comparison is then false).
    pub fn nullable(self) -> bool {
        matches!(
            self,
            Column::Worker
                | Column::Finished
                | Column::Device
                | Column::Sha256
                | Column::ObjectKey
                | Column::HiresScale
                | Column::HiresWidth
                | Column::HiresHeight
                | Column::HiresUpscaler
                | Column::HiresSteps
                | Column::HiresDenoise
        )
    }
}

/// Parses a cell state name, for `state = "…"`.
pub(crate) fn state_name(s: &str) -> Option<CellState> {
    CellState::ALL.iter().copied().find(|c| c.as_str() == s)
}
