"""Fixture 14: the VAE encoder (`AutoencoderKL.encode`), for img2img and hires fix.

Writes `vae_encoder_a.png` (64x64) and `vae_encoder_b.png` (64 high, 96 wide): two 8-bit RGB patterns made in
numpy (gradients, a checkerboard and diagonal stripes, so every channel and both image axes vary); then
`vae_encoder.safetensors` and `vae_encoder.json`.

Each PNG is read back with PIL and turned into a tensor by diffusers' `VaeImageProcessor.preprocess` (x/255*2-1,
NCHW, float32; both sizes are multiples of 8, so it does not resize), then encoded in float32 on CPU by
tiny-sd15's VAE (fp16 variant files upcast to f32, as gen_expected.py loads them):

- `<img>/image`: the preprocessed input `[1, 3, H, W]` in [-1, 1].
- `<img>/mean`, `<img>/logvar`: `latent_dist.mean` and `latent_dist.logvar` (clamped to [-30, 20] by
  `DiagonalGaussianDistribution`), `[1, 4, H/8, W/8]`.
- `<img>/roundtrip`: `vae.decode(mean).sample`, the image decoded from the unscaled mean (`[1, 3, H, W]`).
- `a/argmax_latents`: `scaling_factor * retrieve_latents(enc, sample_mode="argmax")` (= mean * 0.18215).
- `a/sample_latents_seed<SAMPLE_SEED>`: `scaling_factor * retrieve_latents(enc, generator, sample_mode="sample")`
  with `generator = torch.Generator("cpu").manual_seed(SAMPLE_SEED)`: mean + exp(0.5*logvar) * randn(mean.shape,
  generator), the noise being the generator's first draw (what diffusers' img2img `prepare_latents` does before
  it draws the img2img noise from the same generator).
- `ldm/a/mean`, `ldm/a/logvar`: image a encoded by `tiny-ldm-diffusers/vae` (the VAE of the single-file fixture;
  32 groups, one resnet per block), so the single-file path has a diffusers reference too.
"""

import os
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

from common import FIXTURES, TINY_DIR, setup_torch, versions, write_json

SAMPLE_SEED = 1234
# (name, height, width)
IMAGES = [("a", 64, 64), ("b", 64, 96)]


def pattern(name, h, w):
    """A deterministic RGB8 test image."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if name == "a":
        r = 255 * x / (w - 1)
        g = 255 * y / (h - 1)
        b = np.where(((x // 8) + (y // 8)) % 2 == 0, 230.0, 25.0)
    else:
        r = 127.5 + 127.5 * np.sin((x + 2 * y) / 6.0)
        g = 255 * (x + y) / (w + h - 2)
        b = np.where((x // 12) % 2 == 0, 40.0, 200.0) + 15 * np.cos(y / 5.0)
    return np.clip(np.round(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def load_vae(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32).eval()
    for p in vae.parameters():
        assert p.dtype == torch.float32
    return vae


def main():
    setup_torch()
    vae = load_vae(os.path.join(TINY_DIR, "vae"))
    ldm_vae = load_vae(os.path.join(FIXTURES, "tiny-ldm-diffusers", "vae"))
    processor = VaeImageProcessor(vae_scale_factor=8)
    sf = vae.config.scaling_factor
    out = {}
    images = {}
    for name, h, w in IMAGES:
        png = f"vae_encoder_{name}.png"
        Image.fromarray(pattern(name, h, w)).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
        pil = Image.open(os.path.join(FIXTURES, png)).convert("RGB")
        image = processor.preprocess(pil)
        assert image.dtype == torch.float32 and tuple(image.shape) == (1, 3, h, w), image.shape
        enc = vae.encode(image)
        dist = enc.latent_dist
        out[f"{name}/image"] = image
        out[f"{name}/mean"] = dist.mean
        out[f"{name}/logvar"] = dist.logvar
        out[f"{name}/roundtrip"] = vae.decode(dist.mean).sample
        images[name] = {"png": png, "height": h, "width": w}
        if name == "a":
            out["a/argmax_latents"] = sf * retrieve_latents(enc, sample_mode="argmax")
            g = torch.Generator("cpu").manual_seed(SAMPLE_SEED)
            out[f"a/sample_latents_seed{SAMPLE_SEED}"] = sf * retrieve_latents(enc, generator=g, sample_mode="sample")
            ldm = ldm_vae.encode(image).latent_dist
            out["ldm/a/mean"] = ldm.mean
            out["ldm/a/logvar"] = ldm.logvar
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in out.items()},
              os.path.join(FIXTURES, "vae_encoder.safetensors"), metadata={"format": "pt"})
    write_json("vae_encoder.json", {
        "versions": versions(), "model": "tiny-sd15", "ldm_model": "tiny-ldm-diffusers",
        "scaling_factor": float(np.float32(sf)), "sample_seed": SAMPLE_SEED, "images": images,
        "logvar_range": {name: [float(out[f"{name}/logvar"].min()), float(out[f"{name}/logvar"].max())]
                         for name, _, _ in IMAGES},
    })


if __name__ == "__main__":
    main()
