//! Text conditioning: from a prompt's text to the embeddings the UNet attends to.
//!
//! Owns SD1.5's CLIP tokenizer ([`tokenizer`]) and the per-pipeline cache of prompt embeddings
//! ([`embeddings`]). The text encoder network itself is in [`super::nets`].

pub mod embeddings;
pub mod tokenizer;
