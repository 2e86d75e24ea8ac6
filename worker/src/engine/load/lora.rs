//! LoRA files: parsing kohya and PEFT/diffusers layouts and merging them into base weights.
//!
//! Owns the mapping from a LoRA key to the weight it patches and the merge
//! `W' = W + strength · (alpha/rank) · up·down`, computed in f32 on the host before the model
//! is built. kohya files (`lora_unet_*` / `lora_te_*` with `.lora_down`/`.lora_up`/`.alpha`)
//! are matched with the forward name map A1111 and ComfyUI use: every real module name with
//! `.` replaced by `_`; UNet modules named the LDM way (`input_blocks_1_0_in_layers_2`) are
//! renamed first (`ldm::keys`). PEFT files (`unet.<module>.lora_A/lora_B`,
//! `text_encoder.<module>...`) name modules directly. Any key that matches no module fails
//! the load with the full list; nothing is skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::load::ldm;
use crate::engine::load::weights::Weights;

/// One LoRA to merge and its strength.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// The user's multiplier `m` in `W + m·(alpha/rank)·up·down` (A1111's `<lora:name:m>`).
    pub strength: f32,
    /// The multiplier in the text encoder when it differs from `strength` (A1111's
    /// `<lora:name:te:unet>`, where `strength` is the UNet's); `None`: `strength` for both.
    pub text_encoder_strength: Option<f32>,
}

impl LoraSpec {
    /// The multiplier for modules of `component`.
    pub(crate) fn strength_for(&self, component: Component) -> f32 {
        match component {
            Component::Unet => self.strength,
            Component::TextEncoder => self.text_encoder_strength.unwrap_or(self.strength),
        }
    }
}

/// Which model a LoRA module patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Component {
    Unet,
    TextEncoder,
}

/// The weights a LoRA may patch, one map per component.
pub(crate) struct Targets<'a> {
    pub(crate) unet: &'a mut Weights,
    pub(crate) text_encoder: &'a mut Weights,
}

/// One low-rank pair of a file, with the key group it came from.
struct Pair {
    keys: Vec<String>,
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f32>,
}

/// How a base key names its module.
enum Naming {
    /// `lora_unet_down_blocks_0_..._to_q`.
    Kohya(Component, String),
    /// `unet.down_blocks.0.....to_q`.
    Peft(Component, String),
}

/// Splits a LoRA key into its module group and the part it holds.
fn split_key(key: &str) -> Option<(&str, &str)> {
    const SUFFIXES: [&str; 5] = [
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".lora_A.weight",
        ".lora_B.weight",
    ];
    SUFFIXES
        .iter()
        .find_map(|s| key.strip_suffix(s).map(|base| (base, *s)))
}

fn naming(base: &str) -> Option<Naming> {
    if let Some(rest) = base.strip_prefix("lora_unet_") {
        Some(Naming::Kohya(Component::Unet, rest.to_owned()))
    } else if let Some(rest) = base.strip_prefix("lora_te_") {
        Some(Naming::Kohya(Component::TextEncoder, rest.to_owned()))
    } else if let Some(rest) = base.strip_prefix("unet.") {
        Some(Naming::Peft(Component::Unet, rest.to_owned()))
    } else {
        base.strip_prefix("text_encoder.")
            .map(|rest| Naming::Peft(Component::TextEncoder, rest.to_owned()))
    }
}

/// Names the LyCORIS (or other) network type of a file kiln cannot merge, from the tensor
/// names each type uses (A1111's `network_*.py` modules; LyCORIS' module docs).
fn unsupported_format(file: &Weights) -> Option<&'static str> {
    const FORMATS: [(&str, &str); 7] = [
        (".hada_w1_a", "a LyCORIS LoHa file (hada_* tensors)"),
        (".lokr_w1", "a LyCORIS LoKr file (lokr_* tensors)"),
        (
            ".lora_mid.weight",
            "a LoCon file with CP decomposition (lora_mid tensors)",
        ),
        (".oft_blocks", "an OFT file (oft_blocks tensors)"),
        (".oft_diag", "an OFT file (oft_diag tensors)"),
        (".dora_scale", "a DoRA file (dora_scale tensors)"),
        (".diff", "a full-difference network (diff tensors)"),
    ];
    FORMATS.iter().find_map(|(marker, name)| {
        file.tensors
            .keys()
            .any(|k| k.contains(marker))
            .then_some(*name)
    })
}

/// `module.weight` names of `weights` keyed by kohya's underscored module name.
fn kohya_index(weights: &Weights) -> HashMap<String, String> {
    weights
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .map(|m| (m.replace('.', "_"), format!("{m}.weight")))
        .collect()
}

/// Adds the deltas of `file` (the parsed `spec.path`) to `targets`; returns the weights it
/// replaced.
pub(crate) fn merge(
    spec: &LoraSpec,
    file: &Weights,
    targets: &mut Targets,
) -> Result<Vec<(Component, String)>> {
    let path = &spec.path;
    for strength in [spec.strength, spec.strength_for(Component::TextEncoder)] {
        if !strength.is_finite() {
            return Err(lora_error(
                path,
                format!("strength {strength} is not finite"),
            ));
        }
    }
    if let Some(format) = unsupported_format(file) {
        return Err(lora_error(
            path,
            format!(
                "{format}: kiln merges LoRA files (lora_down/lora_up or lora_A/lora_B pairs) \
                 only; use a plain LoRA version of this network"
            ),
        ));
    }
    let mut groups: BTreeMap<String, Pair> = BTreeMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for (key, tensor) in &file.tensors {
        let Some((base, part)) = split_key(key) else {
            unknown.push(key.clone());
            continue;
        };
        let pair = groups.entry(base.to_owned()).or_insert(Pair {
            keys: Vec::new(),
            down: None,
            up: None,
            alpha: None,
        });
        pair.keys.push(key.clone());
        match part {
            ".lora_down.weight" | ".lora_A.weight" => pair.down = Some(tensor.clone()),
            ".lora_up.weight" | ".lora_B.weight" => pair.up = Some(tensor.clone()),
            _ => {
                pair.alpha = Some(
                    tensor
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .first()
                        .copied()
                        .unwrap_or(0.0),
                )
            }
        }
    }

    let unet_index = kohya_index(targets.unet);
    let unet_layers = (0..)
        .take_while(|j| {
            targets
                .unet
                .tensors
                .contains_key(&format!("down_blocks.0.resnets.{j}.conv1.weight"))
        })
        .count();
    let te_index = kohya_index(targets.text_encoder);
    let mut resolved: Vec<(Component, String, Pair)> = Vec::with_capacity(groups.len());
    for (base, pair) in groups {
        let target = match naming(&base) {
            Some(Naming::Kohya(Component::Unet, m)) => unet_index
                .get(&m)
                .or_else(|| {
                    ldm::keys::ldm_lora_module(&m, unet_layers).and_then(|d| unet_index.get(&d))
                })
                .map(|w| (Component::Unet, w.clone())),
            Some(Naming::Kohya(Component::TextEncoder, m)) => te_index
                .get(&m)
                .or_else(|| te_index.get(&format!("text_model_{m}")))
                .map(|w| (Component::TextEncoder, w.clone())),
            Some(Naming::Peft(component, m)) => {
                let weights = match component {
                    Component::Unet => &*targets.unet,
                    Component::TextEncoder => &*targets.text_encoder,
                };
                [format!("{m}.weight"), format!("text_model.{m}.weight")]
                    .into_iter()
                    .find(|w| weights.tensors.contains_key(w))
                    .map(|w| (component, w))
            }
            None => None,
        };
        match target {
            Some((component, weight)) => resolved.push((component, weight, pair)),
            None => unknown.extend(pair.keys),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(EngineError::LoraUnknownKeys {
            path: path.clone(),
            keys: unknown,
        });
    }

    let mut replaced = Vec::with_capacity(resolved.len());
    for (component, weight, pair) in resolved {
        let weights = match component {
            Component::Unet => &mut *targets.unet,
            Component::TextEncoder => &mut *targets.text_encoder,
        };
        apply(path, spec.strength_for(component), weights, &weight, pair)?;
        replaced.push((component, weight));
    }
    Ok(replaced)
}

/// `W += strength · (alpha/rank) · (up[out, r] @ down[r, rest]).reshape(W.shape)`.
fn apply(path: &Path, strength: f32, weights: &mut Weights, name: &str, pair: Pair) -> Result<()> {
    let (Some(down), Some(up)) = (pair.down, pair.up) else {
        return Err(lora_error(
            path,
            format!("{} lacks its down or up matrix", pair.keys.join(", ")),
        ));
    };
    let base = weights
        .tensors
        .get(name)
        .ok_or_else(|| lora_error(path, format!("{name} vanished")))?;
    let shape = base.dims().to_vec();
    let rank = down.dim(0)?;
    let out = up.dim(0)?;
    let rest = down.elem_count() / rank.max(1);
    let fits = rank > 0
        && up.elem_count() == out * rank
        && shape.first() == Some(&out)
        && out * rest == base.elem_count();
    if !fits {
        return Err(lora_error(
            path,
            format!(
                "{}: down {:?} and up {:?} do not fit {name} {shape:?}",
                pair.keys.join(", "),
                down.dims(),
                up.dims()
            ),
        ));
    }
    // kohya: a missing or zero alpha means alpha = rank; PEFT files carry no alpha.
    let alpha = pair.alpha.filter(|a| *a != 0.0).unwrap_or(rank as f32);
    // The reference computes the scale in f64 (Python floats) and multiplies in f32.
    let scale = (f64::from(strength) * (f64::from(alpha) / rank as f64)) as f32;
    let delta = up
        .reshape((out, rank))?
        .matmul(&down.reshape((rank, rest))?)?
        .reshape(shape.as_slice())?;
    let merged = (base + (delta * f64::from(scale))?)?;
    weights.tensors.insert(name.to_owned(), merged);
    Ok(())
}

fn lora_error(path: &Path, reason: String) -> EngineError {
    EngineError::Lora {
        path: path.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference")
            .join(name)
    }

    /// Merges `file` at `strength` into tiny-sd15 and compares every touched weight with the
    /// reference merge (`lora_merged.safetensors`, torch f32).
    fn check(file: &str, strength: f32) -> f32 {
        let mut unet = Weights::read(&fixture(
            "tiny-sd15/unet/diffusion_pytorch_model.fp16.safetensors",
        ))
        .expect("unet");
        let mut te = Weights::read(&fixture("tiny-sd15/text_encoder/model.fp16.safetensors"))
            .expect("text encoder");
        let spec = LoraSpec {
            path: fixture(file),
            strength,
            text_encoder_strength: None,
        };
        let file = Weights::read(&spec.path).expect("lora");
        merge(
            &spec,
            &file,
            &mut Targets {
                unet: &mut unet,
                text_encoder: &mut te,
            },
        )
        .expect("merge");
        let merged = Weights::read(&fixture("lora_merged.safetensors")).expect("merged");
        let prefix = format!("{strength:.1}/");
        let mut worst = 0f32;
        let mut count = 0;
        for (key, want) in &merged.tensors {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let (weights, name) = match rest.split_once('.') {
                Some(("unet", name)) => (&unet, name),
                Some(("text_encoder", name)) => (&te, name),
                _ => panic!("unexpected key {key}"),
            };
            let got = &weights.tensors[name];
            let diff = (got - want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            worst = worst.max(diff);
            count += 1;
        }
        assert_eq!(count, 22, "touched modules");
        worst
    }

    #[test]
    fn kohya_and_peft_merges_match_the_reference_merge() {
        for file in [
            "lora_kohya.safetensors",
            "lora_peft.safetensors",
            "lora_kohya_ldm.safetensors",
        ] {
            for strength in [0.5, 1.0] {
                let worst = check(file, strength);
                eprintln!("{file} at {strength}: max abs diff {worst:e}");
                // A rank-4 f32 matmul may sum in another order than torch: allow an ulp or so.
                assert!(worst <= 1e-6, "{file} at {strength}: max |diff| {worst}");
            }
        }
    }

    #[test]
    fn lycoris_files_are_named_not_listed_key_by_key() {
        let mut unet = Weights::read(&fixture(
            "tiny-sd15/unet/diffusion_pytorch_model.fp16.safetensors",
        ))
        .expect("unet");
        let mut te = Weights::read(&fixture("tiny-sd15/text_encoder/model.fp16.safetensors"))
            .expect("text encoder");
        let one = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        for (key, says) in [
            ("lora_unet_conv_in.hada_w1_a", "LoHa"),
            ("lora_unet_conv_in.lokr_w1", "LoKr"),
            ("lora_unet_conv_in.lora_mid.weight", "LoCon"),
        ] {
            let file = Weights {
                file: "x.safetensors".into(),
                tensors: HashMap::from([(key.to_owned(), one.clone())]),
            };
            let spec = LoraSpec {
                path: PathBuf::from("x.safetensors"),
                strength: 1.0,
                text_encoder_strength: None,
            };
            let e = merge(
                &spec,
                &file,
                &mut Targets {
                    unet: &mut unet,
                    text_encoder: &mut te,
                },
            )
            .unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(says) && text.contains("x.safetensors"),
                "{text}"
            );
        }
    }
}
