"""Fixture 4: tiny-sd15/ -- random-weight SD1.5-architecture models in diffusers folder layout.

All weights are stored as float16 (`*.fp16.safetensors`, the diffusers "fp16" variant naming) to keep the fixture
small; the values were rounded to fp16 before any reference was computed, so loading them and upcasting to float32
gives exactly the float32 weights the references used.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from common import SD15_SCHEDULER_CONFIG, TINY_DIR, setup_torch
from tiny_models import build_all, canonical_state_dict

FILES = {
    "unet": "diffusion_pytorch_model.fp16.safetensors",
    "vae": "diffusion_pytorch_model.fp16.safetensors",
    "text_encoder": "model.fp16.safetensors",
}


def save_component(model, sub):
    d = os.path.join(TINY_DIR, sub)
    os.makedirs(d, exist_ok=True)
    # canonical SD1.5 key names (text encoder: "text_model.…", as in the real SD1.5 files)
    ref = canonical_state_dict(model, sub)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in ref.items() if v.dtype.is_floating_point}
    save_file(sd, os.path.join(d, FILES[sub]), metadata={"format": "pt"})
    if sub == "text_encoder":
        model.config.save_pretrained(d)
        cfg_path = os.path.join(d, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["dtype"] = "float16"
        cfg["architectures"] = ["CLIPTextModel"]
        json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    else:
        model.save_config(d)
    # verify round trip is exact
    back = load_file(os.path.join(d, FILES[sub]))
    for k, v in back.items():
        assert torch.equal(v.float(), ref[k]), k
    return sorted(back)


def main():
    import diffusers

    setup_torch()
    unet, vae, te = build_all()
    keys = {}
    for sub, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        keys[sub] = save_component(m, sub)
    sd = os.path.join(TINY_DIR, "scheduler")
    os.makedirs(sd, exist_ok=True)
    cfg = dict(SD15_SCHEDULER_CONFIG)
    cfg["_diffusers_version"] = diffusers.__version__
    json.dump(cfg, open(os.path.join(sd, "scheduler_config.json"), "w"), indent=2)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    json.dump(model_index, open(os.path.join(TINY_DIR, "model_index.json"), "w"), indent=2)

    # Loading check: the folder loads with stock diffusers (local path, no hub) and reproduces the weights.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_DIR, variant="fp16", torch_dtype=torch.float32,
                                                   local_files_only=True)
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        loaded = getattr(pipe, name).state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(loaded[k].float(), v), (name, k)
    print("tiny-sd15 written and verified via StableDiffusionPipeline.from_pretrained(variant='fp16')",
          file=sys.stderr)
    for sub, ks in keys.items():
        print(f"  {sub}: {len(ks)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
