//! A cell's identity hashes: [`CellSpec::cell_key`], over the render parameters (the same key
//! is the same image), and [`CellSpec::affinity_key`], over what a worker must have loaded to
//! reuse a pipeline. Keys are stored, so a field added later hashes only when set and earlier
//! cells keep their identity.

use kiln_proto::sampler::{Method, SamplerName, Schedule};
use sha2::{Digest, Sha256};

use super::cell::CellSpec;

impl CellSpec {
    /// Identity of the render: sha256 over the canonical render parameters (bindings and
    /// memory hints excluded — they do not change the image).
    pub fn cell_key(&self) -> String {
        hex::encode(self.cell_digest())
    }

    /// The identity hash as bytes (what [`CellSpec::cell_key`] shows in hex).
    pub fn cell_digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"kiln.cell.v1\0");
        self.hash_pipeline(&mut h);
        field(&mut h, self.prompt.as_bytes());
        field(&mut h, self.negative_prompt.as_bytes());
        field(&mut h, &self.seed.to_le_bytes());
        field(&mut h, &self.steps.to_le_bytes());
        field(&mut h, &self.cfg.to_bits().to_le_bytes());
        field(&mut h, key_sampler(self.sampler).as_bytes());
        field(&mut h, self.rng.as_bytes());
        // Fields added later hash only when set, so earlier cells keep their identity.
        if self.clip_skip != 1 {
            field(&mut h, b"clip_skip");
            field(&mut h, &self.clip_skip.to_le_bytes());
        }
        if self.subseed != 0 {
            field(&mut h, b"subseed");
            field(&mut h, &self.subseed.to_le_bytes());
        }
        if self.subseed_strength != 0.0 {
            field(&mut h, b"subseed_strength");
            field(&mut h, &self.subseed_strength.to_bits().to_le_bytes());
        }
        if let Some((w, h_px)) = self.seed_resize_from {
            field(&mut h, b"seed_resize_from");
            field(&mut h, &w.to_le_bytes());
            field(&mut h, &h_px.to_le_bytes());
        }
        if let Some(eta) = self.eta {
            field(&mut h, b"eta");
            field(&mut h, &eta.to_bits().to_le_bytes());
        }
        if let Some(init) = &self.init {
            // The picture by content: the same file under another name renders the same.
            field(&mut h, b"init");
            field(&mut h, init.sha256.as_bytes());
            field(&mut h, &init.strength.to_bits().to_le_bytes());
        }
        if let Some(hires) = &self.hires {
            field(&mut h, b"hires");
            field(&mut h, &hires.scale.to_bits().to_le_bytes());
            let (w, h_px) = hires.size.unwrap_or((0, 0));
            field(&mut h, &w.to_le_bytes());
            field(&mut h, &h_px.to_le_bytes());
            field(&mut h, hires.upscaler.as_str().as_bytes());
            field(&mut h, &hires.steps.to_le_bytes());
            field(&mut h, &hires.denoise.to_bits().to_le_bytes());
            field(
                &mut h,
                hires
                    .sampler
                    .map(key_sampler)
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
        h.finalize().into()
    }

    /// What a worker must have loaded to reuse a pipeline: model, LoRA stack with strengths,
    /// and image size.
    pub fn affinity_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"kiln.affinity.v1\0");
        self.hash_pipeline(&mut h);
        hex::encode(&h.finalize()[..16])
    }

    pub(super) fn hash_pipeline(&self, h: &mut Sha256) {
        // A pinned model by content only: `sha256:X` and a name pointing at X render the same,
        // and a name re-pointed later is a different render.
        if self.model_sha256.is_empty() {
            field(h, self.model.as_bytes());
        } else {
            field(h, b"model-sha256");
            field(h, self.model_sha256.as_bytes());
        }
        field(h, &(self.loras.len() as u64).to_le_bytes());
        for l in &self.loras {
            field(h, l.name.as_bytes());
            field(h, &l.strength.to_bits().to_le_bytes());
            field(h, l.sha256.as_bytes());
        }
        // Prompt LoRAs change the merged weights too; a prompt without any hashes as before.
        for l in self.prompt_loras() {
            field(h, b"prompt-lora");
            field(h, l.name.as_bytes());
            field(h, &l.te.to_bits().to_le_bytes());
            field(h, &l.unet.to_bits().to_le_bytes());
        }
        field(h, &self.width.to_le_bytes());
        field(h, &self.height.to_le_bytes());
        if !self.vae_sha256.is_empty() {
            field(h, b"vae-sha256");
            field(h, self.vae_sha256.as_bytes());
        } else if !self.vae.is_empty() {
            field(h, b"vae");
            field(h, self.vae.as_bytes());
        }
    }
}

/// The sampler's word in the identity hash. Cells made before the k-diffusion samplers
/// hashed their stored name, `lcm` or `euler_a` (which then meant diffusers' Euler a); those
/// keep exactly that, and every later sampler hashes under a `k-diffusion/` prefix, so
/// k-diffusion's `euler_a` never takes an old diffusers cell's identity.
fn key_sampler(s: SamplerName) -> String {
    match (s.method, s.schedule) {
        (Method::Lcm, Schedule::Normal) => "lcm".into(),
        (Method::EulerADiffusers, Schedule::Normal) => "euler_a".into(),
        _ => format!("k-diffusion/{}", s.as_str()),
    }
}

/// Length-prefixed so that ("ab","c") and ("a","bc") hash differently.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::cell::tests::spec;

    /// Keys of cells made before the k-diffusion samplers and variation seeds, computed by
    /// the code of that time: a plain cell's identity must not move.
    #[test]
    fn keys_of_earlier_cells_are_unchanged() {
        let mut old = Sha256::new();
        old.update(b"kiln.cell.v1\0");
        let s = spec(7);
        s.hash_pipeline(&mut old);
        for part in [s.prompt.as_bytes(), s.negative_prompt.as_bytes()] {
            field(&mut old, part);
        }
        field(&mut old, &7u64.to_le_bytes());
        field(&mut old, &4u32.to_le_bytes());
        field(&mut old, &1.0f32.to_bits().to_le_bytes());
        field(&mut old, b"euler_a");
        field(&mut old, b"cpu");
        let old = hex::encode(old.finalize());
        let mut diffusers = spec(7);
        diffusers.sampler = SamplerName::EULER_A_DIFFUSERS;
        assert_eq!(
            diffusers.cell_key(),
            old,
            "diffusers' Euler a keeps its old key"
        );
        let mut k = diffusers.clone();
        k.sampler = "euler_a".parse().unwrap();
        assert_ne!(k.cell_key(), old, "k-diffusion's Euler a is another render");
        // Unset new fields leave the key alone; set ones change it.
        let plain = spec(7).cell_key();
        let mut with = spec(7);
        with.subseed = 3;
        assert_ne!(with.cell_key(), plain);
        let mut with = spec(7);
        with.subseed_strength = 0.5;
        assert_ne!(with.cell_key(), plain);
        let mut with = spec(7);
        with.seed_resize_from = Some((512, 768));
        assert_ne!(with.cell_key(), plain);
        let mut with = spec(7);
        with.rng = "nv".into();
        assert_ne!(with.cell_key(), plain);
    }

    #[test]
    fn keys_ignore_bindings_but_not_render_parameters() {
        let a = spec(1);
        let mut b = spec(1);
        b.bindings.insert("animal".into(), "fox".into());
        assert_eq!(a.cell_key(), b.cell_key());
        let c = spec(2);
        assert_ne!(a.cell_key(), c.cell_key());
        assert_eq!(a.affinity_key(), c.affinity_key());
        let mut d = spec(1);
        d.loras[0].strength = 0.5;
        assert_ne!(a.affinity_key(), d.affinity_key());
    }
}
