"""LoRA definitions for the tiny SD1.5 model (shared by gen_lora.py and gen_expected.py).

Merge rule (what kiln implements; kohya sd-scripts / A1111 / peft all agree):
    W' = W + strength * (alpha / rank) * (up_2d @ down_2d).reshape(W.shape)        all in float32
    rank = down.shape[0];  up_2d = up.reshape(out, rank);  down_2d = down.reshape(rank, -1)
    (linear: down [r,in], up [out,r];  conv kxk: down [r,in,k,k], up [out,r,1,1])
kohya file:  alpha is stored per module ('.alpha', a 0-d tensor).
peft file:   no alpha key -> alpha = rank (scale 1). To make both files merge to the same weights the peft
             lora_B holds up * (alpha/rank) = up * 0.5, which is exact in fp16/f32 (power of two), so the two
             files give bit-identical merged weights.
"""

import math

import torch

from tiny_models import canonical_modules

RANK = 4
ALPHA = 2.0
SEED = 4242

UNET_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.resnets.2.conv1",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
    "up_blocks.3.attentions.2.proj_out",
]
TE_TARGETS = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.0.mlp.fc1",
    "text_model.encoder.layers.1.self_attn.v_proj",
]

UNKNOWN_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z"


def kohya_name(prefix, module):
    return prefix + module.replace(".", "_")


def make_lora(unet, te):
    """Returns {(component, module): (down f32, up f32)} with fp16-exact values."""
    g = torch.Generator("cpu").manual_seed(SEED)
    mods = {"unet": canonical_modules(unet, "unet"), "text_encoder": canonical_modules(te, "text_encoder")}
    out = {}
    for comp, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        for name in targets:
            m = mods[comp][name]
            w = m.weight
            if w.ndim == 2:
                o, i = w.shape
                down_shape, up_shape = [RANK, i], [o, RANK]
                fan_in = i
            else:
                o, i, kh, kw = w.shape
                down_shape, up_shape = [RANK, i, kh, kw], [o, RANK, 1, 1]
                fan_in = i * kh * kw
            down = torch.randn(down_shape, generator=g) / math.sqrt(fan_in)
            up = torch.randn(up_shape, generator=g) / math.sqrt(RANK)
            # zero the (rare) |up| < 2^-12 so that up*alpha/rank (peft pre-scaling) stays fp16-exact (no subnormals)
            up = torch.where(up.abs() < 2.0**-12, torch.zeros_like(up), up)
            out[(comp, name)] = (down.half().float(), up.half().float())
    return out


def delta(down, up, weight_shape):
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(weight_shape)


def merge_into(model, comp, lora, strength, alpha=ALPHA):
    """In-place kiln merge of the LoRA modules of `comp` into `model` (float32)."""
    mods = canonical_modules(model, comp)
    with torch.no_grad():
        for (c, name), (down, up) in lora.items():
            if c != comp:
                continue
            w = mods[name].weight
            rank = down.shape[0]
            w.add_(strength * (alpha / rank) * delta(down, up, w.shape))
    return model
