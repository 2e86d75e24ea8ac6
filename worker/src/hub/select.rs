//! Which files of a hub repo a reference needs: exactly what the engine reads from a diffusers
//! SD1.5 folder (`engine/load/base.rs`), or the one `.safetensors` a LoRA repo holds.
//!
//! The same choice is made from the hub's file list when online and from a cached snapshot's
//! files when offline, so a snapshot is complete exactly when it holds what would be fetched.
//! Only `.safetensors` weights are ever chosen, never pickles (`.bin`, `.ckpt`); where a repo
//! has both, devices computing in f16 take the `*.fp16.safetensors` variant (half the bytes)
//! and the CPU, computing in f32, the full one.

/// What a reference resolves to inside a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Files to have in the snapshot, relative, `/`-separated.
    pub files: Vec<String>,
    /// The file that is the model (a LoRA, a single-file checkpoint); `None`: the snapshot
    /// folder is the model (diffusers).
    pub entry: Option<String>,
}

/// The diffusers components the engine reads, each a config and one of two weights files.
const COMPONENTS: [(&str, &str); 3] = [
    ("text_encoder", "model"),
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
];

/// The files `file` (or the whole repo when `None`) needs, chosen from `available`.
pub fn select(
    available: &[String],
    file: Option<&str>,
    prefer_f16: bool,
) -> Result<Selection, String> {
    let has = |name: &str| available.iter().any(|f| f == name);
    if let Some(file) = file {
        if !has(file) {
            return Err(format!("the repo has no file {file}"));
        }
        return Ok(Selection {
            files: vec![file.to_owned()],
            entry: Some(file.to_owned()),
        });
    }
    if has("model_index.json") {
        let mut files = vec![
            "model_index.json".to_owned(),
            "scheduler/scheduler_config.json".to_owned(),
        ];
        if !has(&files[1]) {
            return Err("a diffusers repo without scheduler/scheduler_config.json".into());
        }
        for (part, stem) in COMPONENTS {
            let config = format!("{part}/config.json");
            let full = format!("{part}/{stem}.safetensors");
            let half = format!("{part}/{stem}.fp16.safetensors");
            let order = if prefer_f16 {
                [&half, &full]
            } else {
                [&full, &half]
            };
            let weights = order.into_iter().find(|w| has(w)).ok_or_else(|| {
                format!("a diffusers repo without {full} or {half} (kiln reads safetensors only)")
            })?;
            if !has(&config) {
                return Err(format!("a diffusers repo without {config}"));
            }
            files.push(config);
            files.push(weights.clone());
        }
        return Ok(Selection { files, entry: None });
    }
    let top: Vec<&String> = available
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    match top.as_slice() {
        [one] => Ok(Selection {
            files: vec![(*one).clone()],
            entry: Some((*one).clone()),
        }),
        [] => Err(
            "neither a diffusers repo (model_index.json) nor a repo with a .safetensors file \
             at its top"
                .into(),
        ),
        many => Err(format!(
            "the repo has {} .safetensors files at its top ({}): name one as hf:OWNER/REPO/FILE",
            many.len(),
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const SD15: [&str; 16] = [
        "model_index.json",
        "README.md",
        "v1-5-pruned.ckpt",
        "v1-5-pruned.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ];

    #[test]
    fn a_diffusers_repo_needs_the_engine_files_in_the_device_precision() {
        let all = names(&SD15);
        let cpu = select(&all, None, false).unwrap();
        assert_eq!(cpu.entry, None);
        assert_eq!(
            cpu.files,
            names(&[
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                // Only the fp16 variant exists: taken on the CPU too.
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ])
        );
        let gpu = select(&all, None, true).unwrap();
        assert!(
            gpu.files
                .contains(&"unet/diffusion_pytorch_model.fp16.safetensors".into())
        );
        assert!(
            gpu.files
                .contains(&"text_encoder/model.fp16.safetensors".into())
        );
        assert!(
            gpu.files
                .iter()
                .all(|f| !f.ends_with(".bin") && !f.ends_with(".ckpt"))
        );
        // Pickles alone are never taken.
        let pickles = names(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin",
        ]);
        let e = select(&pickles, None, false).unwrap_err();
        assert!(e.contains("safetensors only"), "{e}");
    }

    #[test]
    fn a_lora_repo_is_its_one_safetensors_and_a_file_is_itself() {
        let lora = names(&[
            "README.md",
            "pytorch_lora_weights.safetensors",
            "x/y.safetensors",
        ]);
        let s = select(&lora, None, false).unwrap();
        assert_eq!(s.entry.as_deref(), Some("pytorch_lora_weights.safetensors"));
        assert_eq!(s.files, names(&["pytorch_lora_weights.safetensors"]));
        let two = names(&["a.safetensors", "b.safetensors"]);
        assert!(select(&two, None, false).unwrap_err().contains("name one"));
        assert!(select(&two, Some("c.safetensors"), false).is_err());
        assert_eq!(
            select(&two, Some("b.safetensors"), false)
                .unwrap()
                .entry
                .as_deref(),
            Some("b.safetensors")
        );
        assert!(select(&names(&["README.md"]), None, false).is_err());
    }
}
