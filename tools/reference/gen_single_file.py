"""Fixture 7: a single-file checkpoint in the CompVis/LDM layout, as Civitai ships SD1.5 models.

Writes `tiny-ldm.safetensors` (fp16, no EMA keys), `tiny-ldm-diffusers/` (the same model as a diffusers folder),
`tiny-ldm.yaml` (its LDM config, as A1111 reads one
beside a checkpoint), `single_file.json`, `single_file_expected.safetensors` and `single_file_lcm_seed42.png`.

The model is a second tiny random-weight SD1.5 whose architecture an LDM config can express: LDM hard-codes
GroupNorm with 32 groups and takes the head count from `num_heads` (SD1: 8), so every width is 32 and the UNet
has 8 heads (tiny-sd15, with 8 and 4 groups, cannot be written as an LDM checkpoint). The text encoder has one
head: an LDM file has no text-encoder config, and kiln takes the head count as hidden/64 (ViT-L: 768 -> 12),
at least 1.

The diffusers -> LDM key map below is written from the layout described in ../../shared/docs/tech-notes.md
section 4 (the inverse of what a loader does). It is checked against diffusers itself: the file is loaded back
with `StableDiffusionPipeline.from_single_file(file, config=<the diffusers folder>)`, which converts with
diffusers' own LDM -> diffusers code; every weight must come back bit-identical, and the pipeline render from
the single file must equal the render from the diffusers modules exactly.
"""

import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common import FIXTURES, SD15_SCHEDULER_CONFIG, TINY_DIR, setup_torch, tensor_json, versions, write_json
from tiny_models import canonical_state_dict, init_weights

TEXT_HIDDEN = 8
LEVELS = 4
LAYERS = 1  # num_res_blocks: 1, not SD1.5's 2, so a loader that hard-codes SD1.5's block indices fails

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32,) * LEVELS, layers_per_block=LAYERS, norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, use_linear_projection=False,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=LAYERS,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=1,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=8,
)
SEEDS = {"unet": 111, "vae": 222, "text_encoder": 333}
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
STEPS = 4

YAML = f"""# The LDM config of tiny-ldm.safetensors, in the layout of CompVis' v1-inference.yaml.
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: {LAYERS}
        channel_mult: [ 1, 1, 1, 1 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {TEXT_HIDDEN}
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult:
          - 1
          - 1
          - 1
          - 1
          num_res_blocks: {LAYERS}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(sd, levels=LEVELS, layers=LAYERS):
    """diffusers UNet names -> LDM names (without the model.diffusion_model. prefix)."""
    LEVELS, LAYERS = levels, layers  # noqa: N806 (the module constants, for another UNet)
    blocks = {  # diffusers module prefix -> LDM module prefix
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(LEVELS):
        for j in range(LAYERS):
            k = 1 + i * (LAYERS + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < LEVELS - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (LAYERS + 1)}.0.op"
        for j in range(LAYERS + 1):
            k = i * (LAYERS + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < LEVELS - 1:
            k = i * (LAYERS + 1) + LAYERS
            slot = 2 if i > 0 else 1  # up_blocks.0 has no attention before its upsampler
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{slot}.conv"
    out = {}
    for name, t in sd.items():
        match = max((p for p in blocks if name.startswith(p + ".")), key=len)
        rest = name[len(match) + 1:]
        if ".resnets." in match + "." or match.startswith("mid_block.resnets"):
            for a, b in RESNET_TO_LDM:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
        out[blocks[match] + "." + rest] = t
    assert len(out) == len(sd)
    return out


def vae_to_ldm(sd):
    """diffusers VAE names -> LDM names (without first_stage_model.). Attention linears become 1x1 convs."""
    out = {}
    n = len(VAE_CONFIG["block_out_channels"])
    for name, t in sd.items():
        new = name
        for side in ("encoder", "decoder"):
            for j in range(2):
                new = new.replace(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.")
            new = new.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
            new = new.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if t.ndim == 2:
                t = t[:, :, None, None]
        out[new] = t
    assert len(out) == len(sd)
    return out


def build():
    torch.manual_seed(0)
    unet = init_weights(UNet2DConditionModel(**UNET_CONFIG).eval(), SEEDS["unet"])
    vae = init_weights(AutoencoderKL(**VAE_CONFIG).eval(), SEEDS["vae"], {"decoder.conv_out.bias": 0.0})
    cfg = CLIPTextConfig(**TEXT_CONFIG)
    cfg._attn_implementation = "sdpa"
    te = init_weights(CLIPTextModel(cfg).eval(), SEEDS["text_encoder"])
    return unet, vae, te


def write_folder(unet, vae, te):
    """The same model as a diffusers folder (fp16 variant files, no tokenizer: kiln compiles SD1.5's in), so the
    Rust test can render both forms. Loading it back must give the same weights."""
    import json

    d = os.path.join(FIXTURES, "tiny-ldm-diffusers")
    for sub, model, file in (("unet", unet, "diffusion_pytorch_model.fp16.safetensors"),
                             ("vae", vae, "diffusion_pytorch_model.fp16.safetensors"),
                             ("text_encoder", te, "model.fp16.safetensors")):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
        sd = canonical_state_dict(model, sub) if sub == "text_encoder" else model.state_dict()
        sd = {k: v.half().contiguous() for k, v in sd.items() if v.dtype.is_floating_point}
        save_file(sd, os.path.join(d, sub, file), metadata={"format": "pt"})
        if sub == "text_encoder":
            model.config.save_pretrained(os.path.join(d, sub))
        else:
            model.save_config(os.path.join(d, sub))
    os.makedirs(os.path.join(d, "scheduler"), exist_ok=True)
    with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER_CONFIG, f, indent=2)


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(SEED)
    out = pipe(PROMPT, height=128, width=128, num_inference_steps=STEPS, guidance_scale=1.0, generator=g,
               output_type="latent", return_dict=True)
    latents = out.images
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents, decoded


def main():
    setup_torch()
    unet, vae, te = build()
    tok = CLIPTokenizer.from_pretrained(os.path.join(TINY_DIR, "tokenizer"))
    sched = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)

    ldm = {}
    ldm.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict()).items()})
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict()).items()})
    te_sd = canonical_state_dict(te, "text_encoder")
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in te_sd.items() if not k.endswith("position_ids")})
    stored = {k: v.half().contiguous() for k, v in ldm.items()}
    # Buffers real SD1.5 checkpoints carry next to the weights: a loader must ignore them.
    stored["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None, :]
    stored["alphas_cumprod"] = sched.alphas_cumprod.float().contiguous()
    path = os.path.join(FIXTURES, "tiny-ldm.safetensors")
    save_file(stored, path, metadata={"format": "pt"})
    with open(os.path.join(FIXTURES, "tiny-ldm.yaml"), "w") as f:
        f.write(YAML)
    print(f"wrote tiny-ldm.safetensors ({os.path.getsize(path)} bytes, {len(stored)} tensors)", file=sys.stderr)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    latents, decoded = render(pipe)
    write_folder(unet, vae, te)

    # diffusers' own LDM -> diffusers conversion, configured by a diffusers folder of the same model.
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(d, safe_serialization=True)
        back = StableDiffusionPipeline.from_single_file(path, config=d, local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None)
    back.scheduler = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    for name, a, b in (("unet", unet, back.unet), ("vae", vae, back.vae), ("text_encoder", te, back.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb), (name, set(sa) ^ set(sb))
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k].float()), (name, k)
    latents_sf, decoded_sf = render(back)
    assert torch.equal(latents, latents_sf) and torch.equal(decoded, decoded_sf)

    png = "single_file_lcm_seed42.png"
    u8 = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    Image.fromarray(u8[0]).save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
    save_file({"final_latents": latents.contiguous(), "decoded": decoded.contiguous()},
              os.path.join(FIXTURES, "single_file_expected.safetensors"), metadata={"format": "pt"})
    write_json("single_file.json", {
        "versions": versions(),
        "file": "tiny-ldm.safetensors", "yaml": "tiny-ldm.yaml",
        "prompt": PROMPT, "seed": SEED, "steps": STEPS, "guidance": 1.0, "width": 128, "height": 128,
        "sampler": "LCMScheduler.from_config(SD1.5 scheduler config)", "png": png,
        "checks": "from_single_file(config=diffusers folder) weights bit-identical to the diffusers modules; "
                  "its render equals the diffusers-modules render exactly (latents and decoded)",
        "configs": {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_CONFIG},
        "sha256": __import__("hashlib").sha256(open(path, "rb").read()).hexdigest(),
        "final_latents_std": float(latents.std()),
        "decoded_sample": tensor_json(decoded[0, :, 0, :4]),
    })


if __name__ == "__main__":
    main()
