//! The CLIP text encoder: transformers' `CLIPTextModel`, built from its `config.json`.
//!
//! Owns the text-encoder config and the forward pass from token ids to `last_hidden_state`
//! (token + position embeddings, pre-norm transformer layers with a causal mask and no padding
//! mask, as SD1.5 uses it, then `final_layer_norm`), or from an earlier layer's output for
//! A1111's clip skip. Token embeddings can be replaced at given positions before the position
//! embeddings are added ([`TokenFix`]: textual-inversion vectors, as A1111's
//! `EmbeddingsWithFixes` places them). Weights are read under `text_model.`; files saved without
//! that prefix are normalised by the loader.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result as EngineResult};
use crate::engine::load::weights::{LayerNorm, Linear, Params};
use crate::engine::nets::attention::scaled_dot_product_attention;
use crate::engine::nets::fused;

/// The activation between the two MLP layers (`hidden_act`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Activation {
    /// `x·sigmoid(1.702x)`: OpenAI CLIP, SD1.5.
    QuickGelu,
    /// Exact erf GELU: OpenCLIP (SD2).
    Gelu,
}

/// The fields of a transformers `text_encoder/config.json` that shape the network.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ClipConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    hidden_act: Activation,
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    /// Parses `text_encoder/config.json`.
    pub(crate) fn from_json(path: &Path, json: &str) -> EngineResult<Self> {
        let bad = |reason: String| EngineError::Config {
            path: path.to_owned(),
            reason,
        };
        let config: Self = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let heads = config.num_attention_heads;
        if heads == 0 || !config.hidden_size.is_multiple_of(heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible into {heads} heads",
                config.hidden_size
            )));
        }
        Ok(config)
    }

    /// Width of the embeddings the encoder outputs.
    pub(crate) fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The longest token sequence the position embedding covers.
    pub(crate) fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Vectors that replace token embeddings: row `row` of the batch, tokens `start ..
/// start + vectors.dim(0)`.
#[derive(Debug)]
pub(crate) struct TokenFix {
    /// Which sequence of the batch.
    pub(crate) row: usize,
    /// The first token replaced.
    pub(crate) start: usize,
    /// `[n, hidden]`, any float dtype (cast to the encoder's).
    pub(crate) vectors: Tensor,
}

/// transformers' `CLIPTextModel` up to `last_hidden_state`.
#[derive(Debug)]
pub(crate) struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    heads: usize,
    activation: Activation,
}

impl ClipTextModel {
    /// Builds the encoder described by `c`; `p` is the weights root (it reads `text_model.*`).
    pub(crate) fn new(p: &Params, c: &ClipConfig) -> EngineResult<Self> {
        let p = p.pp("text_model");
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let emb = p.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let lp = p.pp("encoder.layers").pp(i);
                let attn = lp.pp("self_attn");
                Ok(EncoderLayer {
                    layer_norm1: lp.pp("layer_norm1").layer_norm(d, eps)?,
                    q_proj: attn.pp("q_proj").linear(d, d, true)?,
                    k_proj: attn.pp("k_proj").linear(d, d, true)?,
                    v_proj: attn.pp("v_proj").linear(d, d, true)?,
                    out_proj: attn.pp("out_proj").linear(d, d, true)?,
                    layer_norm2: lp.pp("layer_norm2").layer_norm(d, eps)?,
                    fc1: lp.pp("mlp.fc1").linear(d, c.intermediate_size, true)?,
                    fc2: lp.pp("mlp.fc2").linear(c.intermediate_size, d, true)?,
                })
            })
            .collect::<EngineResult<_>>()?;
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .tensor("weight", &[c.vocab_size, d])?,
            position_embedding: emb
                .pp("position_embedding")
                .tensor("weight", &[c.max_position_embeddings, d])?,
            layers,
            final_layer_norm: p.pp("final_layer_norm").layer_norm(d, eps)?,
            heads: c.num_attention_heads,
            activation: c.hidden_act,
        })
    }

    /// How many transformer layers the encoder has (the most `clip_skip` can be).
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The width of its token embeddings and outputs.
    pub(crate) fn hidden_size(&self) -> usize {
        self.token_embedding.dims().get(1).copied().unwrap_or(0)
    }

    /// The text embeddings (`[batch, tokens, hidden]`) for `ids` (`[batch, tokens]`, u32),
    /// taken `clip_skip` layers from the end as A1111's "Clip skip" does: 1 is
    /// `last_hidden_state`; N > 1 is `hidden_states[-N]` (the output of layer `layers - N + 1`)
    /// passed through `final_layer_norm`. `clip_skip` is clamped to `1..=layers`. The token
    /// embeddings at `fixes` are replaced by their vectors before the position embeddings are
    /// added.
    pub(crate) fn forward(
        &self,
        ids: &Tensor,
        clip_skip: usize,
        fixes: &[TokenFix],
    ) -> Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        let positions = self.position_embedding.narrow(0, 0, tokens)?;
        let mut h = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, tokens, ()))?;
        let hidden = h.dim(2)?;
        for fix in fixes {
            let n = fix.vectors.dim(0)?;
            let vectors = fix.vectors.to_dtype(h.dtype())?.unsqueeze(0)?;
            h = h.slice_assign(
                &[fix.row..fix.row + 1, fix.start..fix.start + n, 0..hidden],
                &vectors,
            )?;
        }
        let mut h = h.broadcast_add(&positions)?;
        let mask = causal_mask(tokens, ids.device())?;
        let skipped = clip_skip.clamp(1, self.layers.len().max(1)) - 1;
        for layer in &self.layers[..self.layers.len() - skipped] {
            h = self.layer_forward(layer, &h, &mask)?;
        }
        self.final_layer_norm.forward(&h)
    }

    fn layer_forward(&self, l: &EncoderLayer, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let normed = l.layer_norm1.forward(x)?;
        let q = split(l.q_proj.forward(&normed)?)?;
        let k = split(l.k_proj.forward(&normed)?)?;
        let v = split(l.v_proj.forward(&normed)?)?;
        let attn = scaled_dot_product_attention(&q, &k, &v, Some(mask))?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        let x = (l.out_proj.forward(&attn)? + x)?;
        let hidden = l.fc1.forward(&l.layer_norm2.forward(&x)?)?;
        let hidden = match self.activation {
            Activation::QuickGelu => fused::quick_gelu(&hidden)?,
            Activation::Gelu => hidden.gelu_erf()?,
        };
        l.fc2.forward(&hidden)? + x
    }
}

/// An additive `[tokens, tokens]` mask: 0 on and below the diagonal, −∞ above.
fn causal_mask(tokens: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (tokens, tokens), device)?.to_dtype(DType::F32)
}
