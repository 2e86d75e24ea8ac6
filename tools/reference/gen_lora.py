"""Fixture 5: LoRA files for tiny-sd15 + merged-weight references + a check against diffusers' own fuse_lora.

Writes:
  lora_kohya.safetensors        kohya keys: lora_unet_<module with . -> _>.{lora_down.weight,lora_up.weight,alpha}
                                and lora_te_text_model_encoder_layers_N_....; fp16 tensors, alpha 0-d fp16 = 2.0
  lora_peft.safetensors         diffusers/peft keys: unet.<module>.lora_A.weight / lora_B.weight and
                                text_encoder.<module>.lora_{A,B}.weight; fp16; no alpha (lora_B pre-scaled by alpha/rank)
  lora_unknown_key.safetensors  lora_kohya + one extra module group that matches no module of the model
  lora_merged.safetensors       f32 merged weights W' for every touched module at strength 0.5 and 1.0:
                                keys "<strength>/<component>.<module>.weight", strength in {0.5, 1.0}
  lora.json                     index: modules, shapes, rule, and the diffusers-vs-kiln comparison
"""

import copy
import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file

from common import FIXTURES, setup_torch, versions, write_json
from lora_defs import (ALPHA, RANK, TE_TARGETS, UNET_TARGETS, UNKNOWN_MODULE, delta, kohya_name, make_lora,
                       merge_into)
from tiny_models import build_all, canonical_modules, canonical_state_dict


def kohya_state_dict(lora):
    sd = {}
    for (comp, name), (down, up) in lora.items():
        k = kohya_name("lora_unet_" if comp == "unet" else "lora_te_", name)
        sd[k + ".lora_down.weight"] = down.half().contiguous()
        sd[k + ".lora_up.weight"] = up.half().contiguous()
        sd[k + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return sd


def peft_state_dict(lora):
    sd = {}
    for (comp, name), (down, up) in lora.items():
        rank = down.shape[0]
        sd[f"{comp}.{name}.lora_A.weight"] = down.half().contiguous()
        b = (up * (ALPHA / rank)).half()
        assert torch.equal(b.float(), up * (ALPHA / rank)), "alpha/rank pre-scaling must be exact"
        sd[f"{comp}.{name}.lora_B.weight"] = b.contiguous()
    return sd


def diffusers_fused(unet, vae, te, path, strength):
    """Merged weights according to diffusers: load_lora_weights + fuse_lora(lora_scale=strength)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from common import SD15_SCHEDULER_CONFIG, TINY_DIR

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(te),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer")),
        unet=copy.deepcopy(unet), scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(path, adapter_name="x")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=strength)
        pipe.unload_lora_weights()
    return pipe.unet, pipe.text_encoder


def main():
    setup_torch()
    unet, vae, te = build_all()
    lora = make_lora(unet, te)
    ksd = kohya_state_dict(lora)
    psd = peft_state_dict(lora)
    paths = {n: os.path.join(FIXTURES, n) for n in
             ("lora_kohya.safetensors", "lora_peft.safetensors", "lora_unknown_key.safetensors",
              "lora_merged.safetensors")}
    # only {"format": "pt"} as metadata: safetensors writes metadata in hash order, so more keys would make the
    # file bytes differ run to run
    save_file(ksd, paths["lora_kohya.safetensors"], metadata={"format": "pt"})
    save_file(psd, paths["lora_peft.safetensors"], metadata={"format": "pt"})
    usd = dict(ksd)
    down0, up0 = lora[("unet", UNET_TARGETS[0])]
    usd[UNKNOWN_MODULE + ".lora_down.weight"] = down0.half().contiguous()
    usd[UNKNOWN_MODULE + ".lora_up.weight"] = up0.half().contiguous()
    usd[UNKNOWN_MODULE + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    save_file(usd, paths["lora_unknown_key.safetensors"], metadata={"format": "pt"})

    # kiln merge at several strengths
    merged = {}
    comps = {"unet": unet, "text_encoder": te}
    base_w = {}
    for s in (0.0, 0.5, 1.0):
        mu = merge_into(copy.deepcopy(unet), "unet", lora, s)
        mt = merge_into(copy.deepcopy(te), "text_encoder", lora, s)
        mm = {"unet": canonical_modules(mu, "unet"), "text_encoder": canonical_modules(mt, "text_encoder")}
        for (comp, name) in lora:
            merged[f"{s}/{comp}.{name}.weight"] = mm[comp][name].weight.detach().clone().contiguous()
    # strength 0.0 (= the base weights, already in tiny-sd15/) is not stored, to save space
    save_file({k: v for k, v in merged.items() if not k.startswith("0.0/")}, paths["lora_merged.safetensors"],
              metadata={"format": "pt"})

    # diffusers' own load_lora_weights + fuse_lora vs the kiln formula
    comparison = {}
    for fname in ("lora_kohya.safetensors", "lora_peft.safetensors"):
        for s in (0.5, 1.0):
            du, dt = diffusers_fused(unet, vae, te, paths[fname], s)
            dmods = {"unet": canonical_modules(du, "unet"), "text_encoder": canonical_modules(dt, "text_encoder")}
            worst = 0.0
            n_exact = 0
            not_applied = []
            differing = {}
            for (comp, name) in lora:
                ours = merged[f"{s}/{comp}.{name}.weight"]
                base = merged[f"0.0/{comp}.{name}.weight"]
                theirs = dmods[comp][name].weight.detach()
                if torch.equal(ours, theirs):
                    n_exact += 1
                    continue
                if torch.equal(theirs, base):
                    not_applied.append(f"{comp}.{name}")
                    continue
                d = (ours - theirs).abs().max().item()
                differing[f"{comp}.{name}"] = d
                worst = max(worst, d)
            # untouched weights must be untouched
            for comp, base in comps.items():
                bsd = canonical_state_dict(base, comp)
                dsd = canonical_state_dict(du if comp == "unet" else dt, comp)
                for k, v in bsd.items():
                    mod = k.rsplit(".", 1)[0]
                    if (comp, mod) in lora:
                        continue
                    assert torch.equal(dsd[k], v), ("diffusers changed an untouched weight", fname, k)
            comparison[f"{fname}@{s}"] = {
                "modules": len(lora),
                "modules_bit_exact": n_exact,
                "modules_not_applied_by_diffusers": not_applied,
                "modules_differing_max_abs_diff": differing,
            }
            print(f"diffusers fuse_lora vs kiln merge, {fname} strength {s}: {n_exact}/{len(lora)} modules "
                  f"bit-exact; not applied by diffusers: {not_applied}; differing: {differing}", file=sys.stderr)
            assert worst < 1e-5, comparison

    modules = []
    for (comp, name), (down, up) in lora.items():
        w = canonical_modules(unet if comp == "unet" else te, comp)[name].weight
        modules.append({
            "component": comp, "module": name,
            "kohya_key": kohya_name("lora_unet_" if comp == "unet" else "lora_te_", name),
            "peft_key": f"{comp}.{name}",
            "weight_shape": list(w.shape), "down_shape": list(down.shape), "up_shape": list(up.shape),
        })
    write_json("lora.json", {
        "description": "LoRA fixtures for tiny-sd15. Merge rule: W' = W + strength * (alpha/rank) * "
                       "(up.reshape(out,rank) @ down.reshape(rank,-1)).reshape(W.shape), float32, rank = "
                       "down.shape[0]. kohya: alpha from '<name>.alpha'. peft/diffusers keys: no alpha -> alpha = "
                       "rank (scale 1); lora_B is stored pre-multiplied by alpha/rank (=0.5, exact) so both files "
                       "merge to bit-identical weights. lora_merged.safetensors holds W' (f32) for strengths 0.5 "
                       "and 1.0 under '<strength>/<component>.<module>.weight' (component = unet | text_encoder, "
                       "module = canonical diffusers name, text encoder names start with text_model.).",
        "versions": versions(),
        "rank": RANK, "alpha": ALPHA, "dtype": "float16 (weights and alpha)",
        "unknown_key_file": {
            "file": "lora_unknown_key.safetensors",
            "extra_keys": [UNKNOWN_MODULE + s for s in (".lora_down.weight", ".lora_up.weight", ".alpha")],
            "note": "identical to lora_kohya.safetensors plus one module group whose name matches no module "
                    "(attn1.to_z); down/up shapes copy attn1.to_q's.",
        },
        "modules": modules,
        "diffusers_fuse_lora_vs_kiln_merge": comparison,
    })


if __name__ == "__main__":
    main()
