//! Reading one textual-inversion embedding file (A1111's "embeddings": `EasyNegative`,
//! `bad-hands-5`) into host memory.
//!
//! Owns the file formats A1111's `EmbeddingDatabase.load_from_file` accepts from a
//! `.safetensors` file, which `safetensors.torch.load_file` gives it as a flat dict of tensors:
//! one tensor (`[vectors, width]`, or `[width]` for one vector) under any key: `emb_params` (what
//! kohya's scripts and most files on Civitai hold), `string_to_param.*` (A1111's own `.pt`
//! layout, flattened) or a diffusers concept's token (`<cat-toy>`). The embedding's name is the
//! file stem; its hash is the whole file's sha256, of which A1111 writes the first 12 hex digits
//! (`Embedding.shorthash`, in `TI hashes:`).
//!
//! Refused, each naming the file: pickles (`.pt`, `.bin`: A1111 unpickles them, kiln never
//! does), SDXL embeddings (`clip_l` and `clip_g` tensors), files of several tensors (A1111:
//! "embedding file has multiple terms in it"), more than [`MAX_VECTORS`] vectors (one 75-token
//! chunk), widths over [`MAX_WIDTH`], files over [`MAX_FILE_BYTES`] and non-finite values. The
//! width check against a model's text encoder happens where the vectors are used
//! (`text::conditioning`), because one folder serves every model. Knows nothing about prompts
//! or tokens: that is `text::inversion`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::engine::error::{EngineError, Result};
use crate::engine::load::base::is_pickle;
use crate::engine::load::weights::{Weights, open_regular, read_safetensors_bytes};

/// The most vectors an embedding may have: A1111's chunk of 75 tokens, which an embedding is
/// never split across.
pub const MAX_VECTORS: usize = 75;
/// The widest vector accepted (SD1.x is 768, SD2.x 1024, SDXL's halves 768 and 1280).
pub const MAX_WIDTH: usize = 4096;
/// The largest embedding file read: 75 × 4096 f32 values are 1.2 MB; anything much larger is a
/// model or a LoRA in the wrong folder.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// How the file held its one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InversionFormat {
    /// A tensor named `emb_params`.
    EmbParams,
    /// A tensor named `string_to_param.<token>` (A1111's layout).
    StringToParam,
    /// A tensor under any other name (a diffusers concept's token).
    Concept,
}

/// A textual-inversion embedding: `vectors` vectors of `width` values that stand in for the
/// tokens of its name.
#[derive(Clone)]
pub struct Inversion {
    name: String,
    path: PathBuf,
    hash: String,
    format: InversionFormat,
    vectors: usize,
    width: usize,
    /// Row-major `[vectors, width]`, f32.
    values: Vec<f32>,
}

impl std::fmt::Debug for Inversion {
    // The derived form would print every value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inversion")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("vectors", &self.vectors)
            .field("width", &self.width)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Inversion {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.hash == other.hash
    }
}

impl Inversion {
    /// Reads the embedding file `path` (see the module docs for what is accepted).
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::Inversion {
            path: path.to_owned(),
            reason,
        };
        if is_pickle(path) {
            return Err(pickle(path));
        }
        let (_, len) = open_regular(path)?;
        if len > MAX_FILE_BYTES {
            return Err(bad(format!(
                "{len} bytes is too large for an embedding (at most {MAX_FILE_BYTES}): a model or \
                 LoRA in the embeddings folder?"
            )));
        }
        let bytes = read_safetensors_bytes(path)?;
        let hash = hex::encode(Sha256::digest(&bytes));
        let weights = Weights::from_bytes(path, &bytes)?;
        drop(bytes);
        let tensors = weights.tensors;
        let shape_of = |key: &str| tensors.get(key).map(|t| t.dims().to_vec());
        if let (Some(l), Some(g)) = (shape_of("clip_l"), shape_of("clip_g")) {
            return Err(EngineError::Unsupported {
                path: path.to_owned(),
                detected: format!(
                    "an SDXL embedding (clip_l {l:?} and clip_g {g:?}: widths {} and {})",
                    l.last().copied().unwrap_or(0),
                    g.last().copied().unwrap_or(0)
                ),
            });
        }
        if tensors.len() != 1 {
            let mut keys: Vec<&String> = tensors.keys().collect();
            keys.sort();
            let shown: Vec<&str> = keys.iter().take(4).map(|k| k.as_str()).collect();
            return Err(bad(format!(
                "holds {} tensors ({}{}); an embedding file holds one (emb_params or \
                 string_to_param.*)",
                tensors.len(),
                shown.join(", "),
                if keys.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            )));
        }
        let (key, tensor) = tensors.into_iter().next().expect("exactly one tensor");
        let format = match key.as_str() {
            "emb_params" => InversionFormat::EmbParams,
            k if k.starts_with("string_to_param.") => InversionFormat::StringToParam,
            _ => InversionFormat::Concept,
        };
        let (vectors, width) = match *tensor.dims() {
            [width] => (1, width),
            [vectors, width] => (vectors, width),
            ref other => {
                return Err(bad(format!(
                    "tensor `{key}` has shape {other:?}; an embedding is [vectors, width]"
                )));
            }
        };
        if vectors == 0 || width == 0 {
            return Err(bad(format!("tensor `{key}` is empty ({vectors}×{width})")));
        }
        if vectors > MAX_VECTORS {
            return Err(bad(format!(
                "{vectors} vectors; an embedding has at most {MAX_VECTORS} (one prompt chunk)"
            )));
        }
        if width > MAX_WIDTH {
            return Err(bad(format!(
                "vectors of width {width}; the widest accepted is {MAX_WIDTH}"
            )));
        }
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!("tensor `{key}` holds NaN or infinite values")));
        }
        Ok(Self {
            name: stem(path),
            path: path.to_owned(),
            hash,
            format,
            vectors,
            width,
            values,
        })
    }

    /// The name a prompt uses: the file stem, as A1111 names embeddings.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the whole file, lowercase hex (A1111's `Embedding.hash`).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The first 12 hex digits of [`Self::hash`], which A1111 writes in `TI hashes:`.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    /// How the file held its tensor.
    pub fn format(&self) -> InversionFormat {
        self.format
    }

    /// How many vectors (prompt tokens) it takes.
    pub fn vectors(&self) -> usize {
        self.vectors
    }

    /// The width of each vector; it must be the text encoder's hidden size.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Row-major `[vectors, width]`.
    pub(crate) fn values(&self) -> &[f32] {
        &self.values
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The refusal of a pickle embedding, with the command that converts A1111's `.pt` layout (or a
/// diffusers `learned_embeds.bin`) to the `emb_params` form.
fn pickle(path: &Path) -> EngineError {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    EngineError::Pickle {
        path: path.to_owned(),
        convert: format!(
            "python -c \"import torch, safetensors.torch as s; d = torch.load('{name}', \
             map_location='cpu', weights_only=True); t = d['string_to_param']['*'] if \
             'string_to_param' in d else next(iter(d.values())); s.save_file({{'emb_params': \
             t.reshape(-1, t.shape[-1]).float().contiguous()}}, '{}.safetensors')\"",
            stem(path)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|i| i as f32 / 8.0).collect();
                let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
                ((*k).to_owned(), t)
            })
            .collect();
        let path = dir.join(name);
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn each_form_reads_as_vectors_named_by_the_file_stem() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases = [
            ("emb_params", vec![3, 16], InversionFormat::EmbParams, 3),
            (
                "string_to_param.*",
                vec![2, 16],
                InversionFormat::StringToParam,
                2,
            ),
            ("<cat-toy>", vec![16], InversionFormat::Concept, 1),
        ];
        for (i, (key, shape, format, vectors)) in cases.into_iter().enumerate() {
            let path = write(d, &format!("e{i}.v2.safetensors"), &[(key, shape)]);
            let inv = Inversion::read(&path).unwrap();
            assert_eq!(inv.name(), format!("e{i}.v2"));
            assert_eq!(
                (inv.format(), inv.vectors(), inv.width()),
                (format, vectors, 16)
            );
            assert_eq!(inv.values().len(), vectors * 16);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(inv.hash(), hex::encode(Sha256::digest(&bytes)));
            assert_eq!(inv.short_hash().len(), 12);
        }
    }

    #[test]
    fn malformed_files_are_refused_naming_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        /// (file name, its tensors, what the refusal must say)
        type Case<'a> = (&'a str, Vec<(&'a str, Vec<usize>)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                "two.safetensors",
                vec![("a", vec![1, 4]), ("b", vec![1, 4])],
                "holds 2 tensors (a, b)",
            ),
            (
                "cube.safetensors",
                vec![("emb_params", vec![1, 2, 4])],
                "shape [1, 2, 4]",
            ),
            (
                "empty.safetensors",
                vec![("emb_params", vec![0, 4])],
                "empty",
            ),
            (
                "long.safetensors",
                vec![("emb_params", vec![76, 4])],
                "76 vectors",
            ),
            (
                "wide.safetensors",
                vec![("emb_params", vec![1, 4097])],
                "width 4097",
            ),
        ];
        for (name, tensors, says) in cases {
            let e = Inversion::read(&write(d, name, &tensors)).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, EngineError::Inversion { .. }), "{name}: {e:?}");
            assert!(text.contains(name) && text.contains(says), "{text}");
        }
        let sdxl = write(
            d,
            "xl.safetensors",
            &[("clip_l", vec![2, 768]), ("clip_g", vec![2, 1280])],
        );
        let e = Inversion::read(&sdxl).unwrap_err();
        assert!(matches!(e, EngineError::Unsupported { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("xl.safetensors") && text.contains("SDXL") && text.contains("1280"),
            "{text}"
        );
        std::fs::write(d.join("old.pt"), b"PK\x03\x04 a zip").unwrap();
        let e = Inversion::read(&d.join("old.pt")).unwrap_err();
        assert!(matches!(e, EngineError::Pickle { .. }), "{e:?}");
        assert!(e.to_string().contains("'emb_params'"), "{e}");
    }
}
