//! Models pinned by content: which references of a sweep file may name the model registry
//! (`model`, `vae` and `[[loras]]` names, at the top level and as `model`/`vae` axis values),
//! what a registry name may be, and how a planned cell takes its pins from
//! [`SweepSource::models`](super::SweepSource) — the reference → sha256 map the coordinator
//! filled from its registry at submit and stores with the sweep, so re-planning it gives the
//! same cells even after a name is re-pointed. A reference that is not in the map stays a
//! worker-local file name, as before the registry. The registry itself (lookups, the unknown
//! `sha256:` refusal) is `queue::models`'s; this module never touches the store.

use std::collections::BTreeMap;

use super::cell::CellSpec;
use super::spec::SweepFile;

/// How a sweep names a registered model by content: `sha256:` and 64 lowercase hex digits.
pub const SHA256_REF: &str = "sha256:";

/// Longest registry name, bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 128;

/// Checks a registry name: 1..=128 bytes, no control characters, no `/` or `\` (a name is
/// never a path), and none of the prefixes other references use (`sha256:`, `hf:`, `http`).
pub fn check_model_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!("must be 1..={MAX_MODEL_NAME_BYTES} bytes"));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err("must not contain control characters, `/` or `\\`".into());
    }
    let lower = name.to_ascii_lowercase();
    if [SHA256_REF, "hf:", "http"]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return Err("must not start with `sha256:`, `hf:` or `http`".into());
    }
    Ok(())
}

/// The hash of a `sha256:HEX` reference, if it is one (any case; the hash lowercased).
pub fn sha256_ref(reference: &str) -> Option<String> {
    let hex = reference.get(..SHA256_REF.len()).and_then(|p| {
        p.eq_ignore_ascii_case(SHA256_REF)
            .then(|| &reference[SHA256_REF.len()..])
    })?;
    Some(hex.to_ascii_lowercase())
}

/// Pins `cell`'s model, VAE and LoRAs that `models` maps (reference as written → sha256). What
/// is pinned already (a LoRA whose sweep file gave a sha256, a cell a client sent pinned) keeps
/// its hash.
pub fn pin(cell: &mut CellSpec, models: &BTreeMap<String, String>) {
    if models.is_empty() {
        return;
    }
    if let Some(sha) = models
        .get(&cell.model)
        .filter(|_| cell.model_sha256.is_empty())
    {
        cell.model_sha256.clone_from(sha);
    }
    if let Some(sha) = models.get(&cell.vae).filter(|_| cell.vae_sha256.is_empty()) {
        cell.vae_sha256.clone_from(sha);
    }
    for l in cell.loras.iter_mut().filter(|l| l.sha256.is_empty()) {
        if let Some(sha) = models.get(&l.name) {
            l.sha256.clone_from(sha);
        }
    }
}

impl CellSpec {
    /// The references of this cell that may name the registry: model, VAE, unpinned LoRAs.
    pub fn model_refs(&self) -> impl Iterator<Item = &str> {
        let vae = (!self.vae.is_empty()).then_some(self.vae.as_str());
        let loras = self.loras.iter().filter(|l| l.sha256.is_empty());
        std::iter::once(self.model.as_str())
            .chain(vae)
            .chain(loras.map(|l| l.name.as_str()))
    }

    /// The hashes this cell pins (model, VAE, LoRAs), each once: what a worker must hold.
    pub fn pinned_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = [&self.model_sha256, &self.vae_sha256]
            .into_iter()
            .chain(self.loras.iter().map(|l| &l.sha256));
        for sha in all.filter(|s| !s.is_empty()) {
            if !out.contains(sha) {
                out.push(sha.clone());
            }
        }
        out
    }
}

impl SweepFile {
    /// The references this file may pin (`model`, `vae`, `[[loras]]` names, and the
    /// `model`/`vae` axes' values), as written, each once.
    pub(crate) fn referenced_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let lora_names = self.loras.iter().filter_map(|l| {
            let l = l.get_ref();
            l.name.as_ref().or(l.path.as_ref())
        });
        let top = self
            .model
            .iter()
            .chain(self.vae.iter())
            .chain(lora_names)
            .map(|s| s.get_ref().as_str());
        let axes = self.axis_list();
        let axis = axes
            .iter()
            .filter(|a| matches!(a.name.get_ref().as_str(), "model" | "vae"))
            .flat_map(|a| a.values.get_ref().iter())
            .filter_map(|v| v.get_ref().as_str());
        for r in top.chain(axis) {
            if !out.iter().any(|o| o == r) {
                out.push(r.to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{PlanLimits, SweepSource, plan, referenced_models};

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    const TEXT: &str = "prompt = \"a fox\"\nseeds = [1]\nvae = \"local.pt\"\n\
                        [[loras]]\nname = \"detail\"\n[axes]\nmodel = [\"dream\", \"other.safetensors\"]\n";

    #[test]
    fn names_are_checked() {
        for ok in ["dreamshaper", "SD 1.5 (pruned)", "a.b-c_d"] {
            assert!(check_model_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            " ",
            "a/b",
            "a\\b",
            "a\nb",
            "sha256:ab",
            "HF:x",
            "https-ish",
            &long,
        ] {
            assert!(check_model_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(sha256_ref("SHA256:AB").as_deref(), Some("ab"));
        assert_eq!(sha256_ref("dream"), None);
    }

    #[test]
    fn references_are_listed_once() {
        assert_eq!(
            referenced_models("s.toml", TEXT).unwrap(),
            ["local.pt", "detail", "dream", "other.safetensors"]
        );
    }

    #[test]
    fn mapped_references_pin_the_rest_stay_local() {
        let src = SweepSource::new("s.toml", TEXT)
            .with_model("dream", A)
            .with_model("detail", B);
        let p = plan(&src, &PlanLimits::default(), 0).unwrap();
        let got: Vec<(&str, &str, &str, &str)> = p
            .cells
            .iter()
            .map(|c| {
                (
                    c.model.as_str(),
                    c.model_sha256.as_str(),
                    c.vae_sha256.as_str(),
                    c.loras[0].sha256.as_str(),
                )
            })
            .collect();
        assert_eq!(got, [("dream", A, "", B), ("other.safetensors", "", "", B)]);
        // The pin is part of the identity: the same name pinned elsewhere is another cell,
        // and `sha256:A` is the same render as a name pointing at A.
        let repointed = SweepSource::new("s.toml", TEXT)
            .with_model("dream", B)
            .with_model("detail", B);
        let q = plan(&repointed, &PlanLimits::default(), 0).unwrap();
        assert_ne!(p.cells[0].cell_key(), q.cells[0].cell_key());
        assert_eq!(p.cells[1].cell_key(), q.cells[1].cell_key());
        let by_hash = format!(
            "model = \"sha256:{A}\"\nprompt = \"a fox\"\nseeds = [1]\nvae = \"local.pt\"\n\
             [[loras]]\nname = \"detail\"\n"
        );
        let src = SweepSource::new("s.toml", by_hash)
            .with_model(format!("sha256:{A}"), A)
            .with_model("detail", B);
        let r = plan(&src, &PlanLimits::default(), 0).unwrap();
        assert_eq!(r.cells[0].model_sha256, A);
        assert_eq!(r.cells[0].cell_key(), p.cells[0].cell_key());
    }
}
