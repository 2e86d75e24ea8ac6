//! Text conditioning: from a prompt's text to the embeddings the UNet attends to.
//!
//! Owns SD1.5's CLIP tokenizer ([`tokenizer`]), A1111's chunking and emphasis of a parsed
//! prompt ([`conditioning`]; the parsing itself is [`kiln_proto::prompt`], shared with the
//! coordinator), the textual-inversion embeddings a prompt can name ([`inversion`]) and the
//! per-pipeline cache of prompt embeddings ([`embeddings`]). The text encoder network itself is
//! in `super::nets`.

pub mod conditioning;
pub mod embeddings;
pub mod inversion;
pub mod tokenizer;
