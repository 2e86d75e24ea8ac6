"""Tiny random-weight models with the REAL SD1.5 architecture (shared by the generators).

Configs are fixed here; weights are (re)initialised deterministically by init_weights() and rounded to float16
(they are stored as fp16, so the float32 models used for the references hold exactly the stored values).
"""

import math

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_HIDDEN = 16

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(16, 16, 16, 32),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=8,
    norm_eps=1e-5,
    cross_attention_dim=TEXT_HIDDEN,
    # SD1.5 semantics: "attention_head_dim" is really the NUMBER of heads (SD1.5: 8). Here 4 heads:
    # head dim 4 at 16 channels, 8 in the 32-channel mid block.
    attention_head_dim=4,
    use_linear_projection=False,
    upcast_attention=False,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=16,
    # the (legacy) special ids of the real SD1.5 text_encoder/config.json; they do not affect last_hidden_state
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

WEIGHT_SEED = {"unet": 101, "vae": 202, "text_encoder": 303}

# Output-scale tweaks (multiplying the listed weights after init) that keep activations in a healthy range.
OUTPUT_GAIN = {
    "vae": {"decoder.conv_out.weight": 1.0, "decoder.conv_out.bias": 0.0},
}


def build_unet():
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def build_vae():
    return AutoencoderKL(**VAE_CONFIG).eval()


def build_text_encoder():
    cfg = CLIPTextConfig(**TEXT_CONFIG)
    cfg._attn_implementation = "sdpa"
    return CLIPTextModel(cfg).eval()


def init_weights(model, seed, gains=None):
    """Deterministic init, in sorted parameter-name order, from one CPU generator:
    * 1-D '*.weight' (GroupNorm/LayerNorm scales): 1 + 0.1*N(0,1)
    * '*.bias': 0.05*N(0,1)
    * embeddings (token/position): 0.5*N(0,1)
    * other weights (linear/conv): N(0,1)/sqrt(fan_in), fan_in = prod(shape[1:])
    then optional per-name gains, then every value rounded to float16 (and kept as float32).
    """
    gains = gains or {}
    g = torch.Generator("cpu").manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("bias"):
                v = 0.05 * r
            elif "embedding" in name:
                v = 0.5 * r
            elif p.ndim == 1:
                v = 1.0 + 0.1 * r
            else:
                fan_in = math.prod(p.shape[1:])
                v = r / math.sqrt(fan_in)
            if name in gains:
                v = v * gains[name]
            p.copy_(v.half().float())
    for b_name, b in model.named_buffers():
        assert b.dtype != torch.float32 or torch.equal(b, b.half().float()), b_name
    return model


def build_all():
    torch.manual_seed(0)  # constructors draw default inits; irrelevant after init_weights, but keep them stable
    unet = init_weights(build_unet(), WEIGHT_SEED["unet"], OUTPUT_GAIN.get("unet"))
    vae = init_weights(build_vae(), WEIGHT_SEED["vae"], OUTPUT_GAIN.get("vae"))
    te = init_weights(build_text_encoder(), WEIGHT_SEED["text_encoder"], OUTPUT_GAIN.get("text_encoder"))
    return unet, vae, te


def _te_prefix(te):
    """transformers >= 5 flattens CLIPTextModel (no `text_model.` level); real SD1.5 files and kohya/peft LoRA
    keys use the `text_model.` prefix. Returns the prefix to ADD to this model's own names."""
    return "" if any(n.startswith("text_model.") for n, _ in te.named_parameters()) else "text_model."


def canonical_modules(model, comp):
    """Module dict keyed by the canonical SD1.5/diffusers name (text encoder names start with text_model.)."""
    pre = _te_prefix(model) if comp == "text_encoder" else ""
    return {(pre + n if n else n): m for n, m in model.named_modules()}


def canonical_state_dict(model, comp):
    pre = _te_prefix(model) if comp == "text_encoder" else ""
    return {pre + k: v for k, v in model.state_dict().items()}
