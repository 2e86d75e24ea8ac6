"""Writes a RANDOM kohya-format LoRA shaped like latent-consistency/lcm-lora-sdv1-5, for benchmarks.

The real LCM-LoRA (rank 64) patches every UNet attention projection, feed-forward, transformer
proj_in/proj_out, resnet convolution and time-embedding projection; this script gives every
nn.Linear and nn.Conv2d of those kinds in the given SD1.5 UNet a random rank-64 pair, so merging it
costs what merging the real file costs. Nothing is downloaded.

    /work/venv/bin/python tools/bench/make_lora_random.py /tmp/kiln-bench/sd15-random /tmp/kiln-bench/lcm-lora-random.safetensors
"""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

RANK = 64
KINDS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
         "conv1", "conv2", "time_emb_proj", "conv_shortcut")


def main(model_dir: str, out: str) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", variant="fp16")
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(KINDS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(RANK, module.in_features) * 0.01
            up = torch.randn(module.out_features, RANK) * 0.01
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            down = torch.randn(RANK, module.in_channels, kh, kw) * 0.01
            up = torch.randn(module.out_channels, RANK, 1, 1) * 0.01
        else:
            continue
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(RANK)).half()
    save_file(tensors, out)
    print(f"{out}: {len(tensors) // 3} modules at rank {RANK}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
