"""Fixture 6: expected.safetensors + expected.json + PNGs -- end-to-end references for tiny-sd15.

Everything is float32 on CPU. The models are loaded from the stored tiny-sd15/ folder (fp16 files upcast to f32)
and the LoRA from the stored lora_kohya.safetensors, merged with the kiln rule
    W' = W + strength * (alpha/rank) * (up.reshape(out,rank) @ down.reshape(rank,-1)).reshape(W.shape)
by a small independent kohya-key parser below (forward map: canonical module name -> 'lora_unet_'/'lora_te_' +
name.replace('.', '_')).
"""

import copy
import functools
import json
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod
import diffusers.schedulers.scheduling_lcm as lcm_mod
from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, LCMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from common import FIXTURES, SD15_SCHEDULER_CONFIG, TINY_DIR, setup_torch, versions, write_json
from tiny_models import canonical_modules

PROMPTS = {
    "prompt_a": "a photograph of an astronaut riding a horse",
    "prompt_b": "a red car on a street at night, high quality",
    "negative_empty": "",
}
LCM_SEEDS = [42, 2**32 + 5]
LCM_GUIDANCE = [1.0, 1.5]
LORA_STRENGTH_PIPE = 1.0
UNET_SEED = 7
UNET_T = 999
UNET_STRENGTHS = [0.0, 0.5, 1.0]


def load_models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(os.path.join(TINY_DIR, "unet"), variant="fp16",
                                                    torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(os.path.join(TINY_DIR, "vae"), variant="fp16",
                                            torch_dtype=torch.float32).eval()
        te = CLIPTextModel.from_pretrained(os.path.join(TINY_DIR, "text_encoder"), variant="fp16",
                                           dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    for m in (unet, vae, te):
        for p in m.parameters():
            assert p.dtype == torch.float32
    return unet, vae, te, tok


def kiln_merge_kohya(model, comp, path, strength):
    """Independent kohya merge (kiln rule). Returns (merged copy, number of modules merged, unmatched keys)."""
    model = copy.deepcopy(model)
    sd = load_file(path)
    prefix = "lora_unet_" if comp == "unet" else "lora_te_"
    by_kohya = {prefix + n.replace(".", "_"): m for n, m in canonical_modules(model, comp).items() if n}
    bases = sorted({k.split(".")[0] for k in sd if k.startswith(prefix)})
    n = 0
    unmatched = []
    with torch.no_grad():
        for b in bases:
            if b not in by_kohya:
                unmatched.append(b)
                continue
            w = by_kohya[b].weight
            down = sd[b + ".lora_down.weight"].float()
            up = sd[b + ".lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(sd[b + ".alpha"].float()) if b + ".alpha" in sd else float(rank)
            d = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)
            w.add_(strength * (alpha / rank) * d)
            n += 1
    return model, n, unmatched


def encode(te, tok, text):
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids, te(ids).last_hidden_state


def to_uint8(decoded):
    """diffusers postprocess: (x/2+0.5).clamp(0,1) -> HWC -> (x*255).round() -> uint8."""
    x = (decoded / 2 + 0.5).clamp(0, 1)
    x = x.cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")


class StepRecorder:
    """Wraps scheduler.step and the scheduler module's randn_tensor to record what the pipeline feeds it."""

    def __init__(self, sched, module):
        self.sched, self.module = sched, module
        self.steps, self.noise = [], []

    def __enter__(self):
        orig_step = self.sched.step
        orig_randn = self.module.randn_tensor
        self._orig = (orig_step, orig_randn)

        # functools.wraps keeps inspect.signature(step) == the original's, so the pipeline still passes
        # generator= to step (prepare_extra_step_kwargs inspects the signature).
        @functools.wraps(orig_step)
        def step(model_output, timestep, sample, *a, **kw):
            assert isinstance(kw.get("generator"), torch.Generator), "pipeline did not pass the generator"
            out = orig_step(model_output, timestep, sample, *a, **kw)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            x0 = out[1] if isinstance(out, tuple) else getattr(out, "denoised", getattr(out, "pred_original_sample", None))
            self.steps.append({"timestep": timestep.clone(), "sample": sample.clone(),
                               "model_output": model_output.clone(), "prev": prev.clone(), "x0": x0.clone()})
            return out

        def randn(*a, **kw):
            t = orig_randn(*a, **kw)
            self.noise.append((len(self.steps), t.clone()))
            return t

        self.sched.step = step
        self.module.randn_tensor = randn
        return self

    def __exit__(self, *exc):
        self.sched.step = self._orig[0]
        self.module.randn_tensor = self._orig[1]


def run_pipeline(name, unet, vae, te, tok, scheduler, sched_module, steps, guidance, seed, tensors, index):
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    per_step = []

    def cb(p, i, t, kw):
        per_step.append((int(i), float(t), kw["latents"].clone()))
        return {}

    g = torch.Generator("cpu").manual_seed(seed)
    with StepRecorder(pipe.scheduler, sched_module) as rec:
        out = pipe(prompt=PROMPTS["prompt_a"], negative_prompt=None, num_inference_steps=steps,
                   guidance_scale=guidance, height=64, width=64, generator=g, output_type="np",
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    img_np = out.images  # [1,64,64,3] float in [0,1]
    final = per_step[-1][2]
    decoded = vae.decode(final / vae.config.scaling_factor).sample
    u8 = to_uint8(decoded)
    assert np.array_equal(u8, (img_np * 255).round().astype("uint8")), "postprocess mismatch"
    png = f"{name}.png"
    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)

    # initial latents = the first 'sample' the scheduler saw
    init = rec.steps[0]["sample"]
    # RNG order check: one CPU generator; the initial latents are drawn first, then the scheduler's noise draws
    g2 = torch.Generator("cpu").manual_seed(seed & 0xFFFFFFFF)   # torch only uses the low 32 bits
    assert torch.equal(torch.randn([1, 4, 8, 8], generator=g2) * pipe.scheduler.init_noise_sigma, init)
    for _, z in rec.noise:
        assert torch.equal(torch.randn([1, 4, 8, 8], generator=g2), z)
    tensors[f"run/{name}/initial_latents"] = init
    for i, (si, t, lat) in enumerate(per_step):
        s = rec.steps[i]
        assert torch.equal(s["prev"], lat)
        tensors[f"run/{name}/step{i}/model_output"] = s["model_output"]
        tensors[f"run/{name}/step{i}/x0"] = s["x0"]
        tensors[f"run/{name}/step{i}/latents"] = lat
    for k, (after_steps, z) in enumerate(rec.noise):
        tensors[f"run/{name}/noise{k}"] = z
    tensors[f"run/{name}/final_latents"] = final.clone()
    tensors[f"run/{name}/decoded"] = decoded
    cfg = pipe.do_classifier_free_guidance
    index["runs"][name] = {
        "scheduler": type(pipe.scheduler).__name__,
        "prompt": PROMPTS["prompt_a"],
        "negative_prompt": "" if cfg else None,
        "steps": steps,
        "guidance_scale": guidance,
        "classifier_free_guidance": bool(cfg),
        "unet_passes_per_step": 2 if cfg else 1,
        "seed": seed,
        "torch_seed_used": seed & 0xFFFFFFFF,
        "timesteps": [float(t) for _, t, _ in per_step],
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "noise_draws": [{"tensor": f"run/{name}/noise{k}", "drawn_in_step": n} for k, (n, _) in enumerate(rec.noise)],
        "png": png,
        "image_stats": {"decoded_mean": float(decoded.mean()), "decoded_std": float(decoded.std()),
                        "frac_clipped": float((decoded.abs() > 1).float().mean()),
                        "u8_min": int(u8.min()), "u8_max": int(u8.max()), "u8_std": float(u8.std())},
    }
    print(f"run {name}: cfg={cfg} timesteps={index['runs'][name]['timesteps']} "
          f"stats={index['runs'][name]['image_stats']}", file=sys.stderr)


def main():
    setup_torch()
    unet, vae, te, tok = load_models()
    kohya = os.path.join(FIXTURES, "lora_kohya.safetensors")
    tensors = {}
    index = {
        "description": "End-to-end references for tiny-sd15 (float32, CPU). Tensor names -> see 'tensors'. "
                       "LoRA = lora_kohya.safetensors merged with the kiln rule (matches diffusers' fuse_lora of "
                       "lora_peft.safetensors bit-exactly; see lora.json).",
        "versions": versions(),
        "prompts": PROMPTS,
        "runs": {},
    }

    # --- text
    te_lora, n_te, um = kiln_merge_kohya(te, "text_encoder", kohya, LORA_STRENGTH_PIPE)
    assert n_te == 3 and not um, (n_te, um)
    embeds = {}
    for key, text in PROMPTS.items():
        ids, h = encode(te, tok, text)
        _, hl = encode(te_lora, tok, text)
        tensors[f"text/{key}/ids"] = ids.to(torch.int64)
        tensors[f"text/{key}/last_hidden_state"] = h
        tensors[f"text/{key}/last_hidden_state_lora1.0"] = hl
        embeds[key] = h
    # --- unet single forward
    g = torch.Generator("cpu").manual_seed(UNET_SEED)
    lat = torch.randn([1, 4, 8, 8], generator=g, dtype=torch.float32)
    tensors["unet/latents"] = lat
    for s in UNET_STRENGTHS:
        u, n_u, um = kiln_merge_kohya(unet, "unet", kohya, s)
        assert n_u == 19 and not um
        tensors[f"unet/out_t{UNET_T}_prompt_a_lora{s}"] = u(lat, UNET_T, encoder_hidden_states=embeds["prompt_a"]).sample
    tensors["unet/out_t259_negative_empty_lora0.0"] = unet(lat, 259, encoder_hidden_states=embeds["negative_empty"]).sample
    # --- vae single decode
    tensors["vae/decode_in"] = lat / vae.config.scaling_factor
    tensors["vae/decode_out"] = vae.decode(lat / vae.config.scaling_factor).sample

    # --- pipelines: LCM + kohya LoRA @1.0 (UNet and TE merged)
    unet_lora, _, _ = kiln_merge_kohya(unet, "unet", kohya, LORA_STRENGTH_PIPE)
    for seed in LCM_SEEDS:
        for gs in LCM_GUIDANCE:
            name = f"lcm_cfg{gs:g}_seed{seed}".replace(".", "p")
            run_pipeline(name, unet_lora, vae, te_lora, tok, LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                         lcm_mod, 4, gs, seed, tensors, index)
            index["runs"][name]["lora"] = {"file": "lora_kohya.safetensors", "strength": LORA_STRENGTH_PIPE,
                                           "applied_to": ["unet", "text_encoder"]}
    # --- Euler a, no LoRA
    name = "euler_a_cfg7p5_seed42"
    run_pipeline(name, unet, vae, te, tok, EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
                 ea_mod, 6, 7.5, 42, tensors, index)
    index["runs"][name]["lora"] = None

    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), k
    tensors = {k: (v.detach().contiguous() if v.dtype == torch.int64 else v.detach().float().contiguous())
               for k, v in tensors.items()}
    save_file(tensors, os.path.join(FIXTURES, "expected.safetensors"), metadata={"format": "pt"})
    index["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in sorted(tensors.items())}
    index["notes"] = {
        "text": "text/<key>/ids = CLIPTokenizer ids (padding max_length 77, truncation, EOS padding) [1,77] int64; "
                "last_hidden_state = CLIPTextModel(ids).last_hidden_state (after final_layer_norm, no attention "
                "mask, causal) [1,77,16]; *_lora1.0 = text encoder with lora_kohya merged at strength 1.0.",
        "unet": f"unet/latents = randn([1,4,8,8], Generator('cpu').manual_seed({UNET_SEED})); "
                f"unet/out_t{UNET_T}_prompt_a_lora<s> = UNet(latents, t={UNET_T}, encoder_hidden_states="
                "text/prompt_a/last_hidden_state (BASE text encoder)).sample with ONLY the UNet part of "
                "lora_kohya merged at strength s; unet/out_t259_negative_empty_lora0.0 = base UNet at t=259 with "
                "the empty-prompt embedding.",
        "vae": "vae/decode_out = vae.decode(vae/decode_in).sample, decode_in = unet/latents / 0.18215.",
        "runs": "StableDiffusionPipeline(components, safety_checker=None, feature_extractor=None), 64x64, "
                "prompt_a, negative_prompt None (with CFG the unconditional text is ''), generator="
                "Generator('cpu').manual_seed(seed). initial_latents = randn([1,4,8,8], g) * init_noise_sigma "
                "(drawn first, before any step). step<i>/model_output = the (guided) eps passed to "
                "scheduler.step: eps_u + g*(eps_c - eps_u) with batch [uncond, cond] when g > 1, else one pass; "
                "step<i>/x0 = LCM 'denoised' / Euler a 'pred_original_sample'; step<i>/latents = prev_sample "
                "(= callback_on_step_end latents). noise<k> = the k-th randn the scheduler drew (order in "
                "runs.<name>.noise_draws). final_latents = last step latents; decoded = vae.decode(final/0.18215)"
                ".sample (raw, unclamped, ~[-1,1]); the PNG = round(clamp(decoded/2+0.5,0,1)*255) as RGB8. "
                "Seed 2**32+5 behaves exactly like seed 5 (torch uses only the low 32 bits of the seed).",
    }
    write_json("expected.json", index)


if __name__ == "__main__":
    main()
