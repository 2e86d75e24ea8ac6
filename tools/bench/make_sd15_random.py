"""Writes a full-size SD1.5 model with RANDOM weights in diffusers layout, for benchmarks.

Nothing is downloaded: the configs below are SD1.5's published configs
(https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5, unet/vae/text_encoder/scheduler
config.json), and the weights come from the modules' default initialisation under a fixed seed. The images
such a model makes are noise; only the arithmetic cost is real. Weights are stored as fp16
(`*.fp16.safetensors`, ~2 GB) and upcast to f32 by both engines when loaded.

    /work/venv/bin/python tools/bench/make_sd15_random.py /tmp/kiln-bench/sd15-random

`--vae-only DIR` writes only `DIR/vae/` (~160 MB; its weights come first off seed 0, so they are not a full
run's): put into a copy of tiny-sd15 it makes a cheap model whose VAE is SD1.5's size, for
`worker/benches/vae_tiled.rs`.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

UNET = dict(  # SD1.5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
)
VAE = dict(  # SD1.5 vae/config.json
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
TEXT = dict(  # SD1.5 text_encoder/config.json (openai/clip-vit-large-patch14 text tower)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "clip_sample": False, "trained_betas": None,
}


def save(module, folder: Path, weights_name: str, config: dict, prefix: str = ""):
    folder.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()
             if not k.endswith("position_ids")}
    save_file(state, folder / weights_name, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main(out: Path, vae_only: bool = False):
    torch.manual_seed(0)
    if vae_only:
        vae = AutoencoderKL(**VAE)
        save(vae, out / "vae", "diffusion_pytorch_model.fp16.safetensors", {"_class_name": "AutoencoderKL", **VAE})
        print(f"wrote {out / 'vae'}")
        return
    unet = UNet2DConditionModel(**UNET)
    save(unet, out / "unet", "diffusion_pytorch_model.fp16.safetensors", {"_class_name": "UNet2DConditionModel", **UNET})
    del unet
    vae = AutoencoderKL(**VAE)
    save(vae, out / "vae", "diffusion_pytorch_model.fp16.safetensors", {"_class_name": "AutoencoderKL", **VAE})
    del vae
    te = CLIPTextModel(CLIPTextConfig(**TEXT))
    # transformers 5 names the module without `text_model.`; SD checkpoints carry it.
    state_prefix = "" if any(k.startswith("text_model.") for k in te.state_dict()) else "text_model."
    save(te, out / "text_encoder", "model.fp16.safetensors",
         {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **TEXT}, prefix=state_prefix)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--vae-only"]
    main(Path(args[0] if args else "/tmp/kiln-bench/sd15-random"), vae_only="--vae-only" in sys.argv[1:])
