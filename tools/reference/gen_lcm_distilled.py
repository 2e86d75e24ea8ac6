"""Fixture 8: an LCM-distilled UNet (`time_cond_proj_dim`), as in LCM Dreamshaper v7, and its renders.

Writes `tiny-lcm-unet/{config.json, diffusion_pytorch_model.fp16.safetensors}`, `lcm_distilled.json`,
`lcm_distilled_expected.safetensors` and `lcm_distilled_cfg{1p5,8}_seed42.png`.

The UNet is tiny-sd15's (same config and weights) plus `time_embedding.cond_proj`, a bias-free linear from the
guidance-scale embedding (`time_cond_proj_dim` = 16 wide) to the sinusoidal timestep embedding. Its text encoder,
VAE and scheduler config are tiny-sd15's; a test assembles the model folder from the two. References come from
diffusers' `LatentConsistencyModelPipeline`: one UNet pass per step, conditioned on the embedding of
w = guidance_scale - 1 (`get_guidance_scale_embedding`), no negative prompt, LCMScheduler.
"""

import json
import os
import sys
import warnings

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common import FIXTURES, SD15_SCHEDULER_CONFIG, TINY_DIR, setup_torch, versions, write_json
from tiny_models import UNET_CONFIG, init_weights

COND_DIM = 16
SEED = 42
STEPS = 4
GUIDANCE = [1.5, 8.0]
PROMPT = "a photograph of an astronaut riding a horse"
OUT_DIR = os.path.join(FIXTURES, "tiny-lcm-unet")
WEIGHTS = "diffusion_pytorch_model.fp16.safetensors"


def build_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=COND_DIM).eval()
    init_weights(unet, 404)  # gives cond_proj its values; everything else is replaced below
    base = load_file(os.path.join(TINY_DIR, "unet", WEIGHTS))
    missing, unexpected = unet.load_state_dict({k: v.float() for k, v in base.items()}, strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    return unet


def main():
    setup_torch()
    unet = build_unet()
    os.makedirs(OUT_DIR, exist_ok=True)
    sd = {k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, os.path.join(OUT_DIR, WEIGHTS), metadata={"format": "pt"})
    unet.save_config(OUT_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = AutoencoderKL.from_pretrained(os.path.join(TINY_DIR, "vae"), variant="fp16",
                                            torch_dtype=torch.float32).eval()
        te = CLIPTextModel.from_pretrained(os.path.join(TINY_DIR, "text_encoder"), variant="fp16",
                                           dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                          scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tensors, runs = {}, {}
    for g in GUIDANCE:
        name = f"lcm_distilled_cfg{str(g).replace('.', 'p').removesuffix('p0')}_seed{SEED}"
        gen = torch.Generator("cpu").manual_seed(SEED)
        out = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=g, generator=gen,
                   output_type="latent", return_dict=True)
        latents = out.images
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
        u8 = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        png = f"{name}.png"
        Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
        tensors[f"{name}/final_latents"] = latents.contiguous()
        runs[name] = {"guidance_scale": g, "png": png}
    # The two scales must give different images, or the embedding would not be tested.
    a, b = (tensors[f"{n}/final_latents"] for n in runs)
    assert not torch.allclose(a, b, rtol=1e-3), "guidance embedding has no effect"
    save_file(tensors, os.path.join(FIXTURES, "lcm_distilled_expected.safetensors"), metadata={"format": "pt"})
    write_json("lcm_distilled.json", {
        "versions": versions(),
        "unet": "tiny-lcm-unet", "base": "tiny-sd15 (text_encoder, vae, scheduler)",
        "pipeline": "LatentConsistencyModelPipeline + LCMScheduler.from_config(SD1.5 scheduler config)",
        "prompt": PROMPT, "seed": SEED, "steps": STEPS, "width": 64, "height": 64,
        "time_cond_proj_dim": COND_DIM, "runs": runs,
    })
    print(f"wrote {OUT_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
