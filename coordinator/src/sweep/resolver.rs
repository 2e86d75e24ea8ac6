//! The resolver's state — the sweep's source and the limit on each referenced file — and the
//! small pieces both halves of resolution share: `resolve` (base settings, prompts, wildcards)
//! and `axis` (the grid).

use super::source::{Origin, SweepSource};

/// Checks and resolves the parts of one sweep file.
pub(super) struct Resolver<'a> {
    pub(super) src: &'a SweepSource,
    pub(super) max_file_bytes: usize,
}

/// A prompt template's text before parsing.
#[derive(Clone, Debug)]
pub(crate) struct PromptText {
    pub text: String,
    pub origin: Origin,
    /// The binding recording which prompt this is (`prompts.line`), if any.
    pub binding: Option<(String, String)>,
}

/// A key as it would be written in a TOML path: bare if it can be, quoted otherwise.
pub(super) fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}
