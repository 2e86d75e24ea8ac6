"""Fixture 9: `lora_kohya_ldm.safetensors`, the kohya LoRA of fixture 5 with its UNet modules named the LDM way.

Some SD1 LoRAs (LyCORIS and others trained on CompVis modules) name UNet modules as the single-file checkpoint
does: `lora_unet_input_blocks_1_1_proj_in` instead of `lora_unet_down_blocks_0_attentions_0_proj_in`. This file
holds exactly the tensors of `lora_kohya.safetensors` under those names (text-encoder keys unchanged), so merging
it must give the weights `lora_merged.safetensors` holds. The diffusers -> LDM map is gen_single_file.py's, which
that script checks against diffusers' `from_single_file`; here it runs with tiny-sd15's layout (4 levels, 2 res
blocks per level).
"""

import os

from safetensors.torch import load_file, save_file

from common import FIXTURES, TINY_DIR
from gen_single_file import unet_to_ldm


def main():
    unet_keys = load_file(os.path.join(TINY_DIR, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    to_ldm = {}
    # unet_to_ldm renames keys and keeps values: feeding each name as its own value pairs them up.
    for ldm_name, diffusers_name in unet_to_ldm({k: k for k in unet_keys}, levels=4, layers=2).items():
        if diffusers_name.endswith(".weight"):
            to_ldm[diffusers_name[: -len(".weight")].replace(".", "_")] = ldm_name[: -len(".weight")].replace(".", "_")
    src = load_file(os.path.join(FIXTURES, "lora_kohya.safetensors"))
    out = {}
    renamed = 0
    for key, t in src.items():
        base, _, part = key.partition(".")
        if base.startswith("lora_unet_"):
            module = base[len("lora_unet_"):]
            new = to_ldm[module]
            assert new != module, module
            renamed += 1
            key = f"lora_unet_{new}.{part}"
        out[key] = t
    assert renamed > 0 and len(out) == len(src)
    save_file(out, os.path.join(FIXTURES, "lora_kohya_ldm.safetensors"), metadata={"format": "pt"})
    print(f"wrote lora_kohya_ldm.safetensors ({renamed} UNet tensors renamed)")


if __name__ == "__main__":
    main()
