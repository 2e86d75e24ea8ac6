"""Fixture: `vae_tiled.safetensors` + `vae_tiled.json`, diffusers' tiled VAE decode (`vae.enable_tiling()`).

tiny-sd15's VAE (sample_size 64, four levels) decodes in tiles of 8x8 latent cells (64x64 px) every 6 cells,
blending 16 px across each seam and keeping 48 px of each tile (`AutoencoderKL.tiled_decode`). The latent here is
19x14 cells (152x112 px): tiles start at rows 0, 6, 12, 18 and columns 0, 6, 12, so the grid is 4x3, the last row
of tiles is one latent cell (8 px) tall and the last column two cells wide, which covers diffusers' shortened
blends at the edges (`min(a, b, blend_extent)`).

Writes, all float32:
  latents        [1, 4, 19, 14]  scaled latents (seed 1919 randn); both decodes divide by scaling_factor first
  tiled          [1, 3, 152, 112] `vae.decode` with tiling enabled
  untiled        [1, 3, 152, 112] `vae.decode` without
"""

import os
import warnings

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL

from common import FIXTURES, TINY_DIR, setup_torch, versions, write_json

SEED = 1919
SHAPE = (1, 4, 19, 14)
NAME = "vae_tiled.safetensors"


def main():
    setup_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = AutoencoderKL.from_pretrained(os.path.join(TINY_DIR, "vae"), variant="fp16",
                                            torch_dtype=torch.float32).eval()
    g = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    z = latents / vae.config.scaling_factor
    untiled = vae.decode(z).sample
    vae.enable_tiling()
    tiled = vae.decode(z).sample
    assert tiled.shape == untiled.shape, (tiled.shape, untiled.shape)
    save_file({"latents": latents.contiguous(), "tiled": tiled.contiguous(), "untiled": untiled.contiguous()},
              os.path.join(FIXTURES, NAME), metadata={"format": "pt"})
    diff = (tiled - untiled).abs().max().item()
    write_json("vae_tiled.json", {
        "versions": versions(), "model": "tiny-sd15", "file": NAME, "seed": SEED, "latent_shape": list(SHAPE),
        "tile_sample_min_size": vae.tile_sample_min_size, "tile_latent_min_size": vae.tile_latent_min_size,
        "tile_overlap_factor": vae.tile_overlap_factor,
        # diffusers' own tiled-vs-untiled difference, in [-1, 1] units and in 8-bit levels (x 127.5)
        "tiled_vs_untiled_max_abs": diff, "tiled_vs_untiled_max_255": diff * 127.5,
    })


if __name__ == "__main__":
    main()
