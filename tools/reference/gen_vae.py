"""Fixture 10: `vae_override.safetensors`, a VAE to use instead of a model's own (A1111's "SD VAE").

The released SD VAEs (vae-ft-mse-840000-ema-pruned and the like) are single files in the LDM layout
(`encoder.down.*`, `decoder.up.*`, `quant_conv`, `post_quant_conv`, attention projections as 1x1 convs). This is
tiny-sd15's VAE architecture with other weights (seed 505), written that way with gen_single_file.py's
diffusers -> LDM map (checked there against diffusers). The reference renders tiny-sd15 with this VAE in place of
its own: `vae_override.json`, `vae_override_expected.safetensors` (decoded) and `vae_override_lcm_seed42.png`.
"""

import hashlib
import os
import warnings

import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import (AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from common import FIXTURES, SD15_SCHEDULER_CONFIG, TINY_DIR, setup_torch, versions, write_json
from gen_single_file import vae_to_ldm
from tiny_models import VAE_CONFIG, init_weights

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
NAME = "vae_override.safetensors"


def main():
    setup_torch()
    torch.manual_seed(0)
    vae = init_weights(AutoencoderKL(**VAE_CONFIG).eval(), 505, {"decoder.conv_out.bias": 0.0})
    ldm = {k: v.half().contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()}
    path = os.path.join(FIXTURES, NAME)
    save_file(ldm, path, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(os.path.join(TINY_DIR, "unet"), variant="fp16",
                                                    torch_dtype=torch.float32).eval()
        te = CLIPTextModel.from_pretrained(os.path.join(TINY_DIR, "text_encoder"), variant="fp16",
                                           dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(SEED)
    latents = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=1.0, generator=g,
                   output_type="latent").images
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    u8 = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    png = "vae_override_lcm_seed42.png"
    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
    save_file({"decoded": decoded.contiguous()}, os.path.join(FIXTURES, "vae_override_expected.safetensors"),
              metadata={"format": "pt"})
    write_json("vae_override.json", {
        "versions": versions(), "file": NAME, "model": "tiny-sd15", "prompt": PROMPT, "seed": SEED, "steps": 4,
        "guidance": 1.0, "width": 64, "height": 64, "png": png,
        "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
    })


if __name__ == "__main__":
    main()
